"""Pure-PyTorch attention, the reference for every attention kernel.

Shapes follow torch.nn.functional.scaled_dot_product_attention:
    query (B, H, T, D), key / value (B, Hkv, S, D), H a multiple of Hkv (GQA / MQA).
Query row i may attend key column j when (off = S - T aligns the last query with the last key,
FlashAttention-2's bottom-right convention):
    j >= i + off - left    (if left  >= 0; -1 = unbounded)
    j <= i + off + right   (if right >= 0; -1 = unbounded)
is_causal sets right = 0. Rows with no allowed key give out = 0 and lse = -inf.
    s = scale * q @ k^T;  softcap > 0: s = softcap * tanh(s / softcap) (before the mask)
    lse = logsumexp_j(s),  out = softmax(s) @ v
"""
import math
from typing import Optional, Tuple

import torch


def window_bounds(is_causal: bool, window_size: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """(left, right) with -1 for unbounded; is_causal clips right to 0."""
    left, right = (-1, -1) if window_size is None else (int(window_size[0]), int(window_size[1]))
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def allowed_mask(T: int, S: int, left: int, right: int, device=None) -> torch.Tensor:
    """(T, S) bool: True where query i may attend key j."""
    i = torch.arange(T, device=device)[:, None] + (S - T)
    j = torch.arange(S, device=device)[None, :]
    mask = torch.ones(T, S, dtype=torch.bool, device=device)
    if left >= 0:
        mask &= j >= i - left
    if right >= 0:
        mask &= j <= i + right
    return mask


def attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(out in query's dtype, lse float32), computed in `compute_dtype` (float64: the truth;
    the inputs' own dtype: "PyTorch's math path in that precision", the tolerance yardstick).
    Differentiable, with finite gradients for rows that attend to nothing."""
    B, H, T, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    q, k, v = (t.to(compute_dtype) for t in (query, key, value))
    if H != Hkv:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    left, right = window_bounds(is_causal, window_size)
    mask = allowed_mask(T, S, left, right, device=query.device)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, T, S)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    s = torch.where(mask, s, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)  # softmax is shift-invariant; keeps empty rows finite
    e = torch.exp(s - m)  # masked entries: exp(-inf) = 0 with zero gradient
    l = e.sum(dim=-1, keepdim=True)
    nonempty = l > 0
    l_safe = torch.where(nonempty, l, 1.0)
    out = (e / l_safe) @ v
    lse = torch.where(nonempty, torch.log(l_safe) + m, float("-inf")).squeeze(-1)
    return out.to(query.dtype), lse.float()
