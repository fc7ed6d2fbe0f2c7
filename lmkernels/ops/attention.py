"""attention: fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

torch.ops.lmkernels.attention_fwd / attention_bwd                C++ CPU kernel (csrc/cpu/attention_cpu.cpp)
torch.ops.lmkernels.attention_fwd_triton / attention_bwd_triton  Triton kernels (lmkernels/triton/attention.py)

Layout of torch.nn.functional.scaled_dot_product_attention: query (B, H, T, D), key and value
(B, Hkv, S, D) with H a multiple of Hkv (GQA/MQA without repeating K/V). With is_causal and
T != S the mask is aligned bottom-right (the last query sees the last key), as in
FlashAttention-2. window_size=(left, right) keeps keys j with i + S - T - left <= j <=
i + S - T + right (-1: unbounded side). The forward also returns the log-sum-exp (B, H, T)
float32, which the backward uses to recompute the probabilities tile by tile. Rows with no
key to attend give zeros (and lse = -inf). Math: lmkernels/reference/attention.py.
"""
import math
from typing import Optional, Tuple

import torch

from lmkernels.ops._common import resolve_backend
from lmkernels.reference.attention import attention_reference, window_bounds

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_HEAD_DIM = 256


def check_attention_args(query, key, value, window_size=None) -> None:
    """Raises a ValueError/TypeError naming the bad argument (the C++ op checks the same)."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"attention: {name} must be a Tensor; got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"attention: {name} must be 4-D (B, H, T, D); got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"attention: {name} must be float32, bfloat16 or float16; got {t.dtype}")
        if t.layout != torch.strided:
            raise ValueError(f"attention: {name} must be a dense (strided) tensor; got {t.layout}")
    for name, t in (("key", key), ("value", value)):
        if t.dtype != query.dtype:
            raise TypeError(f"attention: {name} has dtype {t.dtype} but query has {query.dtype}")
        if t.device != query.device:
            raise ValueError(f"attention: {name} is on {t.device} but query is on {query.device}")
    B, H, T, D = query.shape
    if key.shape != value.shape:
        raise ValueError(f"attention: key and value must have one shape; got {tuple(key.shape)} and {tuple(value.shape)}")
    Bk, Hkv, S, Dk = key.shape
    if Bk != B:
        raise ValueError(f"attention: key batch {Bk} differs from query batch {B}")
    if Dk != D:
        raise ValueError(f"attention: key head dim {Dk} differs from query head dim {D}")
    if D % 8 != 0 or not 8 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"attention: head dim D must be a multiple of 8 in [8, {MAX_HEAD_DIM}]; got {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"attention: query heads H={H} must be a multiple of key/value heads Hkv={Hkv}")
    if B == 0 or H == 0 or T == 0 or S == 0:
        raise ValueError(f"attention: empty input: query {tuple(query.shape)}, key {tuple(key.shape)}")
    if window_size is not None:
        if len(window_size) != 2 or any(int(w) != w or w < -1 for w in window_size):
            raise ValueError(f"attention: window_size must be (left, right) ints >= -1 (-1: unbounded); got {window_size}")


# ---------------------------------------------------------------- public function
def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """softmax(scale * query @ key^T + mask) @ value, fused (never materializes T x S).

    query (B, H, T, D), key/value (B, Hkv, S, D); float32, bfloat16 or float16 (fp32
    accumulation); D a multiple of 8 up to 256; H a multiple of Hkv. scale defaults to
    1/sqrt(D). is_causal: bottom-right aligned when T != S. window_size=(left, right):
    sliding window, -1 = unbounded side. return_lse: also return the log-sum-exp (B, H, T)
    float32. backend: "auto", "cpu" (C++), "triton", or "reference" (pure PyTorch, float32
    math for low-precision inputs). Differentiable in query, key and value.
    """
    check_attention_args(query, key, value, window_size)
    D = query.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    left, right = window_bounds(False, window_size)
    if backend in ("reference", "auto", "cpu"):  # kernels land in the next commits
        cdt = torch.float32 if query.dtype != torch.float64 else torch.float64
        out, lse = attention_reference(query, key, value, is_causal=is_causal, scale=scale,
                                       window_size=window_size, compute_dtype=cdt)
    else:
        raise ValueError(f"attention: backend {backend!r} is not available yet")
    return (out, lse) if return_lse else out
