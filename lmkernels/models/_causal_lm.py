"""What every causal language model here shares beyond its architecture: the trainer's interface
(`logits` for evaluation and comparisons, the optimizer's two weight-decay groups), and causal
attention over packed documents."""
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

import lmkernels


@dataclass(frozen=True)
class PackedDocuments:
    """The layout of a (B, T) batch whose rows hold several documents back to back (the trainer's
    --pack_documents): each document is its own causal sequence, with positions from 0.

    cu_seqlens: (N + 1,) int32, the documents' starts in the flattened B * T tokens, then B * T
        (a document cut by a row's end is two documents; every row starts one).
    max_seqlen: the longest document, in tokens.
    position_ids: (B, T) int64, each token's position within its document.
    """
    cu_seqlens: torch.Tensor
    max_seqlen: int
    position_ids: torch.Tensor

    def check(self, idx: torch.Tensor) -> None:
        """The layout must describe idx (B, T); cu_seqlens itself is checked by attention_varlen."""
        if not isinstance(self.position_ids, torch.Tensor) or self.position_ids.shape != idx.shape:
            raise ValueError(f"packing.position_ids must have the shape of idx {tuple(idx.shape)}; got "
                             f"{getattr(self.position_ids, 'shape', type(self.position_ids).__name__)}")

    def to(self, device, non_blocking: bool = False) -> "PackedDocuments":
        return PackedDocuments(self.cu_seqlens.to(device, non_blocking=non_blocking), self.max_seqlen,
                               self.position_ids.to(device, non_blocking=non_blocking))


def causal_attention(q, k, v, packing: Optional[PackedDocuments] = None):
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) -> (B, H, T, D); with packing,
    within each document only (lmkernels.attention_varlen on the flattened B * T tokens)."""
    if packing is None:
        return lmkernels.attention(q, k, v, is_causal=True)
    B, H, T, D = q.shape

    def tokens(t):  # (B, h, T, D) -> (B * T, h, D); a view when t came from a (B, T, h * D) projection
        return t.transpose(1, 2).reshape(B * T, t.shape[1], D)

    cu, n = packing.cu_seqlens, packing.max_seqlen
    y = lmkernels.attention_varlen(tokens(q), tokens(k), tokens(v), cu, cu, n, n, is_causal=True)
    return y.view(B, T, H, D).transpose(1, 2)


class CausalLM(nn.Module):
    """A model with `hidden_states(idx, packing=None) -> (B, T, C)` and an `lm_head`."""

    def logits(self, idx, packing: Optional[PackedDocuments] = None):
        """(B, T, V) logits for every position (evaluation, comparisons with other stacks)."""
        return self.lm_head(self.hidden_states(idx, packing))

    def configure_optimizer_groups(self, weight_decay: float):
        """Two parameter groups: matrices and embeddings decay; vectors (biases, norm weights) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
