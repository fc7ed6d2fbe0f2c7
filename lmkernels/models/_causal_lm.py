"""What every causal language model here shares beyond its architecture: the trainer's interface
(`logits` for evaluation and comparisons, the optimizer's two weight-decay groups), causal
attention over packed documents, and sampling (`generate`, with a KV cache by default).

Sampling past the context length (`config.block_size`): the model always sees the last
block_size tokens at positions 0 .. block_size - 1, with or without the cache. Sliding that
window drops the oldest token and moves every position, which changes every cached key and
value (all later hidden states attended to the dropped token), so nothing cached can be reused:
once the sequence is longer than block_size, each new token costs one forward of the whole
window, as without the cache. Until then a token costs one forward of one token. This keeps
the tokens identical to the no-cache path (use_cache=False).
"""
import math
import numbers
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

import lmkernels
from lmkernels.models.kv_cache import KVCache


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
    """A model with `hidden_states(idx, packing=None, kv_cache=None) -> (B, T, C)`, an `lm_head`
    and `config.block_size` (its context length)."""

    def logits(self, idx, packing: Optional[PackedDocuments] = None):
        """(B, T, V) logits for every position (evaluation, comparisons with other stacks)."""
        return self.lm_head(self.hidden_states(idx, packing))

    def head_loss(self, h, targets, ignore_index: int):
        """Mean cross-entropy of lm_head(h) against targets without materializing the logits:
        the head's own `fused_loss` when it has one (the vocab-parallel head tensor parallelism
        swaps in), else lmkernels.fused_linear_cross_entropy on the nn.Linear head."""
        if hasattr(self.lm_head, "fused_loss"):
            return self.lm_head.fused_loss(h, targets, ignore_index=ignore_index)
        return lmkernels.fused_linear_cross_entropy(h, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                                    ignore_index=ignore_index)

    def configure_optimizer_groups(self, weight_decay: float):
        """Two parameter groups: matrices and embeddings decay; vectors (biases, norm weights) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k=None, generator=None,
                 use_cache: bool = True):
        """Samples max_new_tokens after idx (B, T) and returns (B, T + max_new_tokens).

        temperature divides the logits (0 is taken as 1e-6: nearly greedy); top_k keeps the k
        most likely tokens. use_cache: one forward of the prompt, then one forward of one token
        per new token against a KVCache (see the module docstring for past block_size);
        use_cache=False runs a full forward of the context for every token. Both give the same
        tokens up to floating-point rounding."""
        _check_generate_args(idx, max_new_tokens, temperature, top_k)
        block_size = self.config.block_size
        cache = None
        if use_cache and idx.size(1) < block_size:  # otherwise every step slides the window
            cache = KVCache(min(block_size, idx.size(1) + max_new_tokens))
        for _ in range(max_new_tokens):
            if cache is not None and idx.size(1) <= block_size:
                new = idx if cache.length == 0 else idx[:, -1:]  # the prompt, then each new token
                logits = self.lm_head(self.hidden_states(new, kv_cache=cache)[:, -1, :])  # (B, V)
            else:  # without the cache, or past block_size
                logits, _ = self(idx[:, -block_size:])
                logits = logits[:, -1, :]  # (B, V)
            logits = logits / max(temperature, 1e-6)
            if top_k is not None:
                v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                logits[logits < v[:, [-1]]] = -float("inf")
            probs = F.softmax(logits.float(), dim=-1)
            idx_next = torch.multinomial(probs, num_samples=1, generator=generator)
            idx = torch.cat((idx, idx_next), dim=1)
        return idx


def _check_generate_args(idx, max_new_tokens, temperature, top_k):
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.size(1) < 1 \
            or idx.dtype not in (torch.int64, torch.int32):  # the dtypes nn.Embedding takes
        got = f"shape {tuple(idx.shape)} {idx.dtype}" if isinstance(idx, torch.Tensor) else type(idx).__name__
        raise ValueError(f"generate: idx must be a (B, T) int64 or int32 tensor of token ids with T >= 1; "
                         f"got {got}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 0:
        raise ValueError(f"generate: max_new_tokens must be an int >= 0; got {max_new_tokens!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"generate: temperature must be a finite number >= 0; got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"generate: top_k must be None or an int >= 1; got {top_k!r}")
