"""Pure-PyTorch rotary position embedding (Hugging Face's apply_rotary_pos_emb), the reference.

    out = x * cos + rot(x) * sin
    rot = rotate_half:      (x1, x2) -> (-x2, x1) on the two halves of the head dim (HF Llama)
    rot = rotate_pairs:     (x[2j], x[2j+1]) -> (-x[2j+1], x[2j])  (interleaved, GPT-J layout)

q (B, H, T, D), k (B, Hkv, T, D); cos/sin (T, D), (1 or B, T, D) or (1 or B, 1, T, D), the
angle of each of the D entries (HF: cat(freqs, freqs); interleaved: freqs repeated pairwise).
compute_dtype=None is HF's eager computation (cos/sin cast to q's dtype, every product rounded
in it); torch.float64 is the truth.
"""
from typing import Optional, Tuple

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((-odd, even), dim=-1).flatten(-2)


def as_heads_broadcast(t: torch.Tensor) -> torch.Tensor:
    """cos/sin as (1 or B, 1, T, D), broadcasting over heads."""
    if t.dim() == 2:
        return t[None, None]
    if t.dim() == 3:
        return t[:, None]
    return t


def rotary_embedding_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                               sin: torch.Tensor, interleaved: bool = False,
                               compute_dtype: Optional[torch.dtype] = None
                               ) -> Tuple[torch.Tensor, torch.Tensor]:
    rot = rotate_pairs if interleaved else rotate_half
    dtype = compute_dtype or q.dtype
    c, s = as_heads_broadcast(cos).to(dtype), as_heads_broadcast(sin).to(dtype)
    q, k = q.to(dtype), k.to(dtype)
    return q * c + rot(q) * s, k * c + rot(k) * s
