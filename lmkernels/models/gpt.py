"""A GPT language model: pre-norm Transformer blocks, GELU MLP, learned positions (or rotary),
token embedding tied to the LM head. Attention is `lmkernels.attention`.

No parallel code lives here. Tensor parallelism is applied from outside by
`lmkernels.distributed.tensor_parallel.parallelize`, which swaps submodules (Linear, Embedding,
the LM head) for sharded ones; the model only has to infer its local number of heads from the
width of what c_attn returns, and compute its loss through `head_loss` (CausalLM).

The loss: with an nn.CrossEntropyLoss criterion it is `lmkernels.fused_linear_cross_entropy`
(or, once TP has made the head vocab-parallel, the head's own vocab-parallel version), which
never materializes the (B, T, V) logits, and forward returns (None, loss). A swapped-in
criterion gets the logits instead, and forward returns (logits, loss).
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

import lmkernels
from lmkernels.models._causal_lm import CausalLM, causal_attention


@dataclass
class GPTConfig:
    block_size: int = 256
    vocab_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 384
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, as GPT-2
    rotary: bool = False  # rotary position embedding instead of learned positions

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPTConfig: {name} must be >= 1; got {getattr(self, name)}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"GPTConfig: n_embd ({self.n_embd}) must be divisible by n_head "
                             f"({self.n_head}); the head size would be {self.n_embd / self.n_head:g}")
        if self.rotary and (self.n_embd // self.n_head) % 2 != 0:
            raise ValueError(f"GPTConfig: rotary needs an even head size; got {self.n_embd // self.n_head}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig: dropout must be in [0, 1); got {self.dropout}")


def rotary_tables(head_dim: int, length: int, device=None, base: float = 10000.0):
    """cos and sin of shape (length, head_dim // 2) for rotating pairs (x[2i], x[2i+1])."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(length, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x, cos, sin):
    """x: (B, nh, T, hs); cos/sin: (T, hs/2), or (B, 1, T, hs/2) for per-row positions (packed
    documents). Rotates each adjacent pair by its position's angle."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    return out.type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.head_dim = config.n_embd // config.n_head
        # q, k, v for all heads in one matmul; output laid out as [q | k | v]
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, rotary=None, packing=None, kv_cache=None):
        B, T, _ = x.size()
        q, k, v = self.c_attn(x).chunk(3, dim=-1)  # each (B, T, nh * hs)
        # the number of heads follows from the width: all of them, or this rank's share under TP
        q = q.view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, -1, self.head_dim).transpose(1, 2)
        v = v.view(B, T, -1, self.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if kv_cache is not None:  # decoding: attend to the cached tokens too (causal is bottom-right)
            k, v = kv_cache.append(k, v)  # (B, nh, cached + T, hs)
        y = causal_attention(q, k, v, packing)  # (B, nh, T, hs); within each document if packed
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hs)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rotary=None, packing=None, kv_cache=None):
        x = x + self.attn(self.ln_1(x), rotary, packing, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLM):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        if not config.rotary:
            self.transformer["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied (https://paperswithcode.com/method/weight-tying)
        # (N, V) logits and (N,) targets -> mean loss; a submodule so TP can swap in its own
        self.criterion = nn.CrossEntropyLoss(ignore_index=-1)

        self.apply(self._init_weights)
        # GPT-2: scale the residual projections' init by 1/sqrt(2 * n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); position embeddings excluded with non_embedding."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def hidden_states(self, idx, packing=None, kv_cache=None):
        """(B, T) token ids -> (B, T, C) hidden states after the final LayerNorm. packing
        (PackedDocuments): rows hold several documents; positions restart at each. With a
        KVCache (lmkernels/models/kv_cache.py) idx follows the cached tokens and is appended to
        them."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"GPT: sequence length {T} exceeds block_size {self.config.block_size}")
        if packing is not None and kv_cache is not None:
            raise ValueError("GPT: packing (training on packed documents) and kv_cache (decoding) "
                             "cannot be combined")
        if packing is not None:
            packing.check(idx)
        start = 0 if kv_cache is None else kv_cache.check_room("GPT", T, self.config.block_size)
        x = self.transformer.wte(idx)  # (B, T, C)
        rotary = None
        pos = torch.arange(start, start + T, device=idx.device) if packing is None else packing.position_ids  # (T,) or (B, T)
        if self.config.rotary:
            cos, sin = rotary_tables(self.config.n_embd // self.config.n_head, start + T, idx.device)
            rotary = (cos[start:], sin[start:]) if packing is None else (cos[pos][:, None], sin[pos][:, None])  # (B, 1, T, hs/2)
        else:
            x = x + self.transformer.wpe(pos)  # (T, C) broadcast, or (B, T, C)
        x = self.transformer.drop(x)
        for i, block in enumerate(self.transformer.h):
            x = block(x, rotary, packing, None if kv_cache is None else kv_cache.layer(i))
        return self.transformer.ln_f(x)

    def _fused_loss_applies(self) -> bool:
        """True while the criterion is the plain one built in __init__ (not one swapped in), the
        head an nn.Linear or TP's vocab-parallel head, with options the fused op reproduces
        exactly, in a dtype it has kernels for (a float64 copy, as tests use for ground truth,
        runs eager)."""
        c = self.criterion
        head = self.lm_head
        return ((type(head) is nn.Linear or hasattr(head, "fused_loss")) and type(c) is nn.CrossEntropyLoss
                and c.weight is None and c.reduction == "mean" and c.label_smoothing == 0.0
                and self.lm_head.weight.dtype in (torch.float32, torch.bfloat16, torch.float16))

    def forward(self, idx, targets=None, packing=None):
        """Training (targets given): (None, mean loss) through the fused linear cross-entropy
        (vocab-parallel under TP), or (logits, loss) through a swapped-in criterion.
        Inference: (logits of the last position (B, 1, V), None). packing: see hidden_states."""
        x = self.hidden_states(idx, packing)
        if targets is None:  # inference: only the last position is needed
            return self.lm_head(x[:, [-1], :]), None
        if self._fused_loss_applies():
            return None, self.head_loss(x, targets, self.criterion.ignore_index)
        B, T = idx.size()
        logits = self.lm_head(x)  # (B, T, V) (gathered from the ranks under tensor parallelism)
        loss = self.criterion(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward): 6 N plus attention's 12 L H Q T / 2,
        as in the PaLM paper's appendix B, halved for the causal mask."""
        c = self.config
        head_dim = c.n_embd // c.n_head
        return 6 * self.num_params() + 6 * c.n_layer * c.n_head * head_dim * c.block_size
