"""attention: fused scaled-dot-product attention (FlashAttention-2 style), forward and backward.

torch.ops.lmkernels.attention_fwd / attention_bwd   schemas and argument checks: csrc/attention.cpp
    CPU tensors   the C++ kernel (csrc/cpu/attention_cpu.cpp on the flash core shared with
                  attention_varlen, csrc/cpu/attention_kernel.cpp)
    CUDA tensors  `_fwd_on_cuda` / `_bwd_on_cuda` below: the Triton launchers of
                  lmkernels/triton/attention.py after the C++ checks (there is no CUDA C++
                  attention kernel: backend='cuda' is an error, LMK_BACKEND=cuda runs Triton)
How `backend=` and LMK_BACKEND choose: lmkernels/ops/_common.py.

Layout of torch.nn.functional.scaled_dot_product_attention: query (B, H, T, D), key and value
(B, Hkv, S, D) with H a multiple of Hkv (GQA/MQA without repeating K/V). With is_causal and
T != S the mask is aligned bottom-right (the last query sees the last key), as in
FlashAttention-2. window_size=(left, right) keeps keys j with i + S - T - left <= j <=
i + S - T + right (-1: unbounded side). softcap > 0 (Gemma 2) replaces each score s by
softcap * tanh(s / softcap) before masking and softmax (exact backward). The forward also returns the log-sum-exp (B, H, T)
float32, which the backward uses to recompute the probabilities tile by tile. Rows with no
key to attend give zeros (and lse = -inf). Math: lmkernels/reference/attention.py.

Autograd: attention_fwd's backward is the attention_bwd op. attention_bwd's own backward
(double backward, e.g. a gradient penalty) differentiates the pure-PyTorch reference in
float32: correct, but it materializes the (T, S) scores.
"""
import math
import numbers
from typing import Optional, Tuple

import torch

from lmkernels._extension import load_extension
from lmkernels.ops._common import BackendTable
from lmkernels.reference.attention import attention_reference
from lmkernels.triton import attention as triton_attention


# ---------------------------------------------------------------- fakes (shapes for tracing)
def check_qkv_shapes(op, query, key, value, axes):
    """The fakes' mirror of check_qkv (csrc/attention.cpp): query/key/value of the layout `axes`
    (e.g. "(B, H, T, D)"), heads on axis 1 and the head dim last, shared by the dense and varlen ops."""
    dims = axes.count(",") + 1
    for name, t in (("query", query), ("key", key), ("value", value)):
        torch._check_value(t.dim() == dims, lambda: f"{op}: {name} must be {dims}-D {axes}; got shape {tuple(t.shape)}")
        torch._check_type(t.dtype == query.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but query has {query.dtype}")
        torch._check_value(t.device == query.device, lambda: f"{op}: {name} is on {t.device} but query is on {query.device}")
    for d in range(dims):
        torch._check_value(key.shape[d] == value.shape[d], lambda: (
            f"{op}: key and value must have one shape; got {tuple(key.shape)} and {tuple(value.shape)}"))
    torch._check_value(key.shape[-1] == query.shape[-1], lambda: f"{op}: key head dim {key.shape[-1]} differs from query head dim {query.shape[-1]}")
    torch._check_value(query.shape[1] % key.shape[1] == 0, lambda: (
        f"{op}: query heads H={query.shape[1]} must be a multiple of key/value heads Hkv={key.shape[1]}"))


def _check_shapes(op, query, key, value):
    check_qkv_shapes(op, query, key, value, "(B, H, T, D)")
    torch._check_value(key.shape[0] == query.shape[0], lambda: f"{op}: key batch {key.shape[0]} differs from query batch {query.shape[0]}")


@torch.library.register_fake("lmkernels::attention_fwd")
def _attention_fwd_fake(query, key, value, scale, is_causal, window_left, window_right, softcap=0.0, *,
                        backend="auto"):
    _check_shapes("attention_fwd", query, key, value)
    B, H, T, D = query.shape
    return query.new_empty((B, H, T, D)), query.new_empty((B, H, T), dtype=torch.float32)


@torch.library.register_fake("lmkernels::attention_bwd")
def _attention_bwd_fake(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                        window_left, window_right, softcap=0.0, *, backend="auto"):
    _check_shapes("attention_bwd", query, key, value)
    for name, t in (("grad_out", grad_out), ("out", out)):
        torch._check_value(t.shape == query.shape, lambda: (
            f"attention_bwd: {name} must have query's shape {tuple(query.shape)}; got {tuple(t.shape)}"))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


# ---------------------------------------------------------------- CUDA tensors: backend table
def _fwd_triton(query, key, value, scale, is_causal, window_left, window_right, softcap):
    load_extension().check_attention_args(query, key, value, window_left, window_right, softcap)
    return triton_attention.attention_fwd(query, key, value, scale, is_causal, window_left, window_right,
                                          softcap=softcap)


def _bwd_triton(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, window_left, window_right,
                softcap):
    load_extension().check_attention_bwd_args(grad_out, query, key, value, out, lse, grad_lse,
                                              window_left, window_right, softcap)
    return triton_attention.attention_bwd(grad_out, query, key, value, out, lse, grad_lse, scale,
                                          is_causal, window_left, window_right, softcap=softcap)


FWD_TABLE = BackendTable("attention_fwd", {"triton": _fwd_triton})
BWD_TABLE = BackendTable("attention_bwd", {"triton": _bwd_triton})


@torch.library.impl("lmkernels::attention_fwd", "CUDA")
def _fwd_on_cuda(query, key, value, scale, is_causal, window_left, window_right, softcap=0.0, *,
                 backend="auto"):
    return FWD_TABLE.pick(backend)(query, key, value, scale, is_causal, window_left, window_right, softcap)


@torch.library.impl("lmkernels::attention_bwd", "CUDA")
def _bwd_on_cuda(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal, window_left,
                 window_right, softcap=0.0, *, backend="auto"):
    return BWD_TABLE.pick(backend)(grad_out, query, key, value, out, lse, grad_lse, scale,
                                   is_causal, window_left, window_right, softcap)


# ---------------------------------------------------------------- autograd
def _fwd_setup_context(ctx, inputs, keyword_only_inputs, output):
    query, key, value, *args = inputs  # args: scale, is_causal, window_left, window_right[, softcap]
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse)
    ctx.args = tuple(args)
    ctx.backend = keyword_only_inputs.get("backend", "auto")
    ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient to read


def _fwd_backward(ctx, grad_out, grad_lse):
    query, key, value, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.lmkernels.attention_bwd(grad_out, query, key, value, out, lse, grad_lse,
                                                   *ctx.args, backend=ctx.backend)
    return (dq, dk, dv) + (None,) * len(ctx.args)


def _bwd_setup_context(ctx, inputs, keyword_only_inputs, output):
    grad_out, query, key, value, out, lse, grad_lse, *args = inputs
    ctx.save_for_backward(grad_out, query, key, value, grad_lse)
    ctx.args = tuple(args)  # scale, is_causal, window_left, window_right[, softcap]


def double_backward(reference, saved, grads):
    """The vector-Jacobian product of (dq, dk, dv) = <attention backward>(grad_out, q, k, v,
    out, lse, grad_lse), taken through `reference(q, k, v) -> (out, lse)` in float32. out and
    lse are recomputed there from (query, key, value), so their own gradients are zero:
    autograd only ever passes the backward op the out and lse of the same query, key and
    value, and on those the two functions agree identically, so the total derivative is the
    same. saved: (grad_out, query, key, value, grad_lse); grads: (grad_dq, grad_dk, grad_dv).
    Returns the gradients of those five saved tensors (None where a tensor is None)."""
    grad_out, query, key, value, grad_lse = saved
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().float().requires_grad_()
                  for t in (grad_out, query, key, value, grad_lse)]
        g, q, k, v, gl = leaves
        out, lse = reference(q, k, v)
        outputs, weights = [out], [g]
        if gl is not None:
            outputs.append(lse)
            weights.append(gl)
        first = torch.autograd.grad(outputs, (q, k, v), weights, create_graph=True)
        cotangents = [torch.zeros_like(f) if c is None else c.float()
                      for f, c in zip(first, grads)]
        wrt = [t for t in leaves if t is not None]
        second = torch.autograd.grad(first, wrt, cotangents, allow_unused=True)
    it = iter(second)
    cast = lambda d, like: None if d is None else d.to(like.dtype)  # noqa: E731
    return tuple(None if t is None else cast(next(it), t) for t in saved)


def _bwd_backward(ctx, grad_dq, grad_dk, grad_dv):
    """Double backward through the float32 reference (see double_backward)."""
    scale, is_causal, window_left, window_right, *rest = ctx.args
    softcap = rest[0] if rest else 0.0

    def reference(q, k, v):
        return attention_reference(q, k, v, is_causal=is_causal, scale=scale,
                                   window_size=(window_left, window_right), softcap=softcap,
                                   compute_dtype=torch.float32)

    g_out, g_q, g_k, g_v, g_lse = double_backward(reference, ctx.saved_tensors, (grad_dq, grad_dk, grad_dv))
    return (g_out, g_q, g_k, g_v, None, None, g_lse) + (None,) * len(ctx.args)


torch.library.register_autograd("lmkernels::attention_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("lmkernels::attention_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)


# ---------------------------------------------------------------- public function
def scale_value(scale, query, op: str = "attention", dims: int = 4) -> float:
    """`scale` as a float; None: 1/sqrt(D) (a query of the wrong rank is reported by the op's
    checks, so any placeholder will do there)."""
    if scale is None:
        return 1.0 / math.sqrt(query.shape[-1]) if query.dim() == dims and query.shape[-1] > 0 else 1.0
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{op}: scale must be a real number (or None for 1/sqrt(D)); "
                        f"got {scale!r} of type {type(scale).__name__}")
    return float(scale)


def window_bounds(window_size, op: str = "attention") -> Tuple[int, int]:
    allowed = "None or a (left, right) pair of ints >= -1 (-1: unbounded side)"
    if window_size is None:
        return -1, -1
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise ValueError(f"{op}: window_size must be {allowed}; got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, numbers.Integral):
            raise TypeError(f"{op}: window_size must be {allowed}; got {window_size!r} "
                            f"({side} is of type {type(w).__name__})")
        if w < -1:
            raise ValueError(f"{op}: window_size must be {allowed}; got {window_size!r} "
                             f"({side} = {w})")
    return int(window_size[0]), int(window_size[1])


def softcap_value(softcap, op: str = "attention") -> float:
    """softcap as a float: a finite real number >= 0 (0: off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{op}: softcap must be a finite real number >= 0 (0: off); "
                        f"got {softcap!r} of type {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{op}: softcap must be a finite real number >= 0 (0: off); got {softcap!r}")
    return float(softcap)


def check_tensors(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor; got {type(t).__name__}")


def attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = None,
    softcap: float = 0.0,
    return_lse: bool = False,
    backend: str = "auto",
):
    """softmax(scale * query @ key^T + mask) @ value, fused (never materializes T x S).

    query (B, H, T, D), key/value (B, Hkv, S, D); float32, bfloat16 or float16 (fp32
    accumulation); D a multiple of 8 up to 256; H a multiple of Hkv (GQA/MQA). scale
    defaults to 1/sqrt(D). is_causal: bottom-right aligned when T != S (query i sees keys
    j <= i + S - T). window_size=(left, right): sliding window, -1 = unbounded side.
    softcap > 0: scores s = scale * q.k become softcap * tanh(s / softcap) before masking
    (Gemma 2; 0 = off). Rows that see no key give zeros. return_lse: also return the
    log-sum-exp (B, H, T) float32 of the final scores (-inf for such rows). backend: "auto"
    (C++ on CPU, Triton on CUDA), "cpu", "triton" (CUDA tensors), or "reference" (pure
    PyTorch, float32 math). Differentiable in query, key and value (and through lse), twice.
    """
    check_tensors("attention", query=query, key=key, value=value)
    scale = scale_value(scale, query)
    left, right = window_bounds(window_size)
    softcap = softcap_value(softcap)
    if backend == "reference":
        load_extension().check_attention_args(query, key, value, left, right, softcap)
        out, lse = attention_reference(query, key, value, is_causal=is_causal, scale=scale,
                                       window_size=(left, right), softcap=softcap,
                                       compute_dtype=torch.float32)
    else:
        out, lse = torch.ops.lmkernels.attention_fwd(query, key, value, scale, bool(is_causal),
                                                     left, right, softcap, backend=backend)
    return (out, lse) if return_lse else out
