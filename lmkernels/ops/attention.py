"""attention: fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

torch.ops.lmkernels.attention_fwd / attention_bwd   C++ CPU kernel (csrc/cpu/attention_cpu.cpp);
                                                    on CUDA tensors the Triton kernels
torch.ops.lmkernels.attention_fwd_triton / _bwd_triton  the Triton kernels on any device (CPU
                                                    tensors under TRITON_INTERPRET=1, as tests do)
    (lmkernels/triton/attention.py)

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
from lmkernels.triton import attention as kernels

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


# ---------------------------------------------------------------- the ops: fakes, CUDA, autograd
@torch.library.register_fake("lmkernels::attention_fwd")
def _attention_fwd_fake(query, key, value, scale, is_causal, window_left, window_right):
    B, H, T, D = query.shape
    out = query.new_empty((B, H, T, D))
    lse = query.new_empty((B, H, T), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("lmkernels::attention_bwd")
def _attention_bwd_fake(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                        window_left, window_right):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


# On CUDA tensors the C++ schema runs the Triton kernels.
def _attention_fwd_triton_checked(query, key, value, scale, is_causal, window_left, window_right):
    check_attention_args(query, key, value, (window_left, window_right))
    return kernels.attention_fwd(query, key, value, scale, is_causal, window_left, window_right)


def _attention_bwd_triton_checked(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                                  window_left, window_right):
    check_attention_args(query, key, value, (window_left, window_right))
    return kernels.attention_bwd(grad_out, query, key, value, out, lse, grad_lse, scale,
                                 is_causal, window_left, window_right)


torch.library.impl("lmkernels::attention_fwd", "CUDA")(_attention_fwd_triton_checked)
torch.library.impl("lmkernels::attention_bwd", "CUDA")(_attention_bwd_triton_checked)


@torch.library.custom_op("lmkernels::attention_fwd_triton", mutates_args=())
def _attention_fwd_triton(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          scale: float, is_causal: bool, window_left: int,
                          window_right: int) -> Tuple[torch.Tensor, torch.Tensor]:
    return _attention_fwd_triton_checked(query, key, value, scale, is_causal, window_left, window_right)


@torch.library.custom_op("lmkernels::attention_bwd_triton", mutates_args=())
def _attention_bwd_triton(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                          grad_lse: Optional[torch.Tensor], scale: float, is_causal: bool,
                          window_left: int, window_right: int
                          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _attention_bwd_triton_checked(grad_out, query, key, value, out, lse, grad_lse, scale,
                                         is_causal, window_left, window_right)


_attention_fwd_triton.register_fake(_attention_fwd_fake)
_attention_bwd_triton.register_fake(_attention_bwd_fake)


def _setup_context(ctx, inputs, output):
    query, key, value, scale, is_causal, window_left, window_right = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.args = (scale, is_causal, window_left, window_right)
    ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient to read


def _make_backward(bwd_op):
    def backward(ctx, grad_out, grad_lse):
        query, key, value, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = bwd_op(grad_out, query, key, value, out, lse, grad_lse, *ctx.args)
        return dq, dk, dv, None, None, None, None

    return backward


torch.library.register_autograd("lmkernels::attention_fwd",
                                _make_backward(torch.ops.lmkernels.attention_bwd),
                                setup_context=_setup_context)
torch.library.register_autograd("lmkernels::attention_fwd_triton",
                                _make_backward(torch.ops.lmkernels.attention_bwd_triton),
                                setup_context=_setup_context)


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
    accumulation); D a multiple of 8 up to 256; H a multiple of Hkv (GQA/MQA). scale
    defaults to 1/sqrt(D). is_causal: bottom-right aligned when T != S (query i sees keys
    j <= i + S - T). window_size=(left, right): sliding window, -1 = unbounded side. Rows
    that see no key give zeros. return_lse: also return the log-sum-exp (B, H, T) float32
    (-inf for such rows). backend: "auto" (C++ on CPU, Triton on CUDA), "cpu", "triton", or
    "reference" (pure PyTorch, float32 math). Differentiable in query, key and value (and
    through lse).
    """
    check_attention_args(query, key, value, window_size)
    D = query.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    left, right = window_bounds(False, window_size)
    if backend == "reference":
        out, lse = attention_reference(query, key, value, is_causal=is_causal, scale=scale,
                                       window_size=window_size, compute_dtype=torch.float32)
    else:
        which = resolve_backend("attention", backend, query.device, prefer_cuda_cpp=False)
        if which == "cuda":
            raise ValueError("attention: there is no CUDA C++ kernel; use backend='triton' or 'auto'")
        op = torch.ops.lmkernels.attention_fwd if which == "cpu" else torch.ops.lmkernels.attention_fwd_triton
        out, lse = op(query, key, value, scale, bool(is_causal), left, right)
    return (out, lse) if return_lse else out
