"""attention_varlen: fused attention over packed sequences (documents), forward and backward.

torch.ops.lmkernels.attention_varlen_fwd / _bwd   schemas and checks: csrc/attention_varlen.cpp
    CPU tensors   the C++ kernel (csrc/cpu/attention_varlen_cpu.cpp), the same flash core as
                  the dense op (csrc/cpu/attention_kernel.cpp)
    CUDA tensors  `_fwd_on_cuda` / `_bwd_on_cuda` below: the Triton launchers of
                  lmkernels/triton/attention.py after the C++ checks
How `backend=` and LMK_BACKEND choose: lmkernels/ops/_common.py.

FlashAttention-2's varlen layout: query (total_q, H, D), key and value (total_k, Hkv, D),
cu_seqlens_q / cu_seqlens_k int32 (B + 1,) starting at 0. Sequence b has query rows
[cu_seqlens_q[b], cu_seqlens_q[b+1]) and key rows [cu_seqlens_k[b], cu_seqlens_k[b+1]) and is
attended exactly as lmkernels.attention would attend it alone (bottom-right causal alignment
when its T != S, window, softcap, GQA): no row sees another sequence. Zero-length sequences
are allowed. lse is (H, total_q) float32. Math: lmkernels/reference/attention_varlen.py.

The checks read the values of cu_seqlens (starts at 0, non-decreasing, last entry = total,
no length above max_seqlen): on CUDA tensors that is one small device-to-host copy, and a
sync, per op call (forward and backward once each).

Autograd: attention_varlen_fwd's backward is the attention_varlen_bwd op; that op's own
backward (double backward) differentiates the pure-PyTorch reference in float32.
"""
import numbers
from typing import Optional, Tuple

import torch

from lmkernels._extension import load_extension
from lmkernels.ops._common import BackendTable
from lmkernels.ops.attention import check_qkv_shapes, check_tensors, double_backward, scale_value, softcap_value, window_bounds
from lmkernels.reference.attention_varlen import attention_varlen_reference
from lmkernels.triton import attention as triton_attention


# ---------------------------------------------------------------- fakes (shapes for tracing)
def _check_shapes(op, query, key, value, cu_seqlens_q, cu_seqlens_k):
    check_qkv_shapes(op, query, key, value, "(total, H, D)")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        torch._check_type(cu.dtype == torch.int32, lambda: f"{op}: {name} must be int32; got {cu.dtype}")
        torch._check_value(cu.dim() == 1, lambda: f"{op}: {name} must be a 1-D tensor (B + 1,); got shape {tuple(cu.shape)}")
        torch._check_value(cu.device == query.device, lambda: f"{op}: {name} is on {cu.device} but query is on {query.device}")


@torch.library.register_fake("lmkernels::attention_varlen_fwd")
def _varlen_fwd_fake(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
                     is_causal, window_left, window_right, softcap, *, backend="auto"):
    _check_shapes("attention_varlen_fwd", query, key, value, cu_seqlens_q, cu_seqlens_k)
    total_q, H, D = query.shape
    return query.new_empty((total_q, H, D)), query.new_empty((H, total_q), dtype=torch.float32)


@torch.library.register_fake("lmkernels::attention_varlen_bwd")
def _varlen_bwd_fake(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                     max_seqlen_k, scale, is_causal, window_left, window_right, softcap, deterministic, *,
                     backend="auto"):
    _check_shapes("attention_varlen_bwd", query, key, value, cu_seqlens_q, cu_seqlens_k)
    for name, t in (("grad_out", grad_out), ("out", out)):
        torch._check_value(t.shape == query.shape, lambda: (
            f"attention_varlen_bwd: {name} must have query's shape {tuple(query.shape)}; got {tuple(t.shape)}"))
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


# ---------------------------------------------------------------- CUDA tensors: backend table
def _fwd_triton(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
                window_left, window_right, softcap):
    load_extension().check_attention_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, window_left, window_right, softcap)
    return triton_attention.attention_varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                 max_seqlen_k, scale, is_causal, window_left, window_right,
                                                 softcap=softcap)


def _bwd_triton(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, scale, is_causal, window_left, window_right, softcap, deterministic):
    load_extension().check_attention_varlen_bwd_args(grad_out, query, key, value, out, lse, grad_lse,
                                                     cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                     window_left, window_right, softcap)
    return triton_attention.attention_varlen_bwd(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q,
                                                 cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
                                                 window_left, window_right, softcap=softcap,
                                                 deterministic=deterministic)


FWD_TABLE = BackendTable("attention_varlen_fwd", {"triton": _fwd_triton})
BWD_TABLE = BackendTable("attention_varlen_bwd", {"triton": _bwd_triton})


@torch.library.impl("lmkernels::attention_varlen_fwd", "CUDA")
def _fwd_on_cuda(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, is_causal,
                 window_left, window_right, softcap, *, backend="auto"):
    return FWD_TABLE.pick(backend)(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   scale, is_causal, window_left, window_right, softcap)


@torch.library.impl("lmkernels::attention_varlen_bwd", "CUDA")
def _bwd_on_cuda(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                 max_seqlen_k, scale, is_causal, window_left, window_right, softcap, deterministic, *,
                 backend="auto"):
    return BWD_TABLE.pick(backend)(grad_out, query, key, value, out, lse, grad_lse, cu_seqlens_q, cu_seqlens_k,
                                   max_seqlen_q, max_seqlen_k, scale, is_causal, window_left, window_right,
                                   softcap, deterministic)


# ---------------------------------------------------------------- autograd
# The forward's arguments after (query, key, value): cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
# max_seqlen_k, scale, is_causal, window_left, window_right, softcap.
_N_FWD_ARGS = 9


def _fwd_setup_context(ctx, inputs, keyword_only_inputs, output):
    query, key, value, cu_q, cu_k, *args = inputs
    out, lse = output
    ctx.save_for_backward(query, key, value, out, lse, cu_q, cu_k)
    ctx.args = tuple(args)  # max_seqlen_q, max_seqlen_k, scale, is_causal, left, right, softcap
    ctx.backend = keyword_only_inputs.get("backend", "auto")
    ctx.set_materialize_grads(False)  # an unused lse gets no zero gradient to read


def _varlen_grads(ctx, grad_out, grad_lse, deterministic):
    query, key, value, out, lse, cu_q, cu_k = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    return torch.ops.lmkernels.attention_varlen_bwd(
        grad_out, query, key, value, out, lse, grad_lse, cu_q, cu_k, *ctx.args, deterministic,
        backend=ctx.backend)


def _fwd_backward(ctx, grad_out, grad_lse):
    # The op's own autograd: the deterministic backward (the default of attention_varlen).
    return tuple(_varlen_grads(ctx, grad_out, grad_lse, True)) + (None,) * _N_FWD_ARGS


def _bwd_setup_context(ctx, inputs, keyword_only_inputs, output):
    grad_out, query, key, value, out, lse, grad_lse, cu_q, cu_k, *args = inputs
    ctx.save_for_backward(grad_out, query, key, value, grad_lse, cu_q, cu_k)
    ctx.args = tuple(args)  # max_seqlen_q, max_seqlen_k, scale, is_causal, left, right, softcap, deterministic


def _bwd_backward(ctx, grad_dq, grad_dk, grad_dv):
    """Double backward through the float32 reference (lmkernels.ops.attention.double_backward)."""
    grad_out, query, key, value, grad_lse, cu_q, cu_k = ctx.saved_tensors
    _, _, scale, is_causal, left, right, softcap, _ = ctx.args

    def reference(q, k, v):
        return attention_varlen_reference(q, k, v, cu_q, cu_k, is_causal=is_causal, scale=scale,
                                          window_size=(left, right), softcap=softcap,
                                          compute_dtype=torch.float32)

    g_out, g_q, g_k, g_v, g_lse = double_backward(reference, (grad_out, query, key, value, grad_lse),
                                                  (grad_dq, grad_dk, grad_dv))
    return (g_out, g_q, g_k, g_v, None, None, g_lse) + (None,) * (2 + len(ctx.args))


torch.library.register_autograd("lmkernels::attention_varlen_fwd", _fwd_backward,
                                setup_context=_fwd_setup_context)
torch.library.register_autograd("lmkernels::attention_varlen_bwd", _bwd_backward,
                                setup_context=_bwd_setup_context)


class _NonDeterministicBackward(torch.autograd.Function):
    """attention_varlen_fwd whose backward passes deterministic=False (a GPU kernel may then
    accumulate dQ with atomics). The forward op's schema has no `deterministic` (it only
    matters to the backward), so the op's registered autograd always asks for the
    deterministic backward, and this Function carries the other choice."""

    @staticmethod
    def forward(ctx, query, key, value, *args_and_backend):
        *args, backend = args_and_backend
        out, lse = torch.ops.lmkernels.attention_varlen_fwd(query, key, value, *args, backend=backend)
        _fwd_setup_context(ctx, (query, key, value, *args), {"backend": backend}, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return tuple(_varlen_grads(ctx, grad_out, grad_lse, False)) + (None,) * (_N_FWD_ARGS + 1)


# ---------------------------------------------------------------- public function
def _max_seqlen(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"attention_varlen: {name} must be an int >= 0 (the longest sequence); "
                        f"got {value!r} of type {type(value).__name__}")
    if value < 0:
        raise ValueError(f"attention_varlen: {name} must be an int >= 0 (the longest sequence); got {value}")
    return int(value)


def attention_varlen(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    *,
    is_causal: bool = False,
    scale: Optional[float] = None,
    window_size: Optional[Tuple[int, int]] = (-1, -1),
    softcap: float = 0.0,
    return_lse: bool = False,
    deterministic: bool = True,
    backend: str = "auto",
):
    """Attention over packed sequences: each sequence of cu_seqlens attended alone.

    query (total_q, H, D), key/value (total_k, Hkv, D); float32, bfloat16 or float16; D a
    multiple of 8 up to 256; H a multiple of Hkv (GQA/MQA). cu_seqlens_q / cu_seqlens_k:
    int32 (B + 1,) on query's device, starting at 0, non-decreasing, last entry = total_q /
    total_k; sequence b has query rows cu_seqlens_q[b]:cu_seqlens_q[b+1] and key rows
    cu_seqlens_k[b]:cu_seqlens_k[b+1] (zero lengths allowed). max_seqlen_q / max_seqlen_k: at
    least the longest sequence (checked). is_causal (bottom-right aligned within each sequence),
    scale, window_size and softcap as in lmkernels.attention. return_lse: also return the
    log-sum-exp (H, total_q) float32 (-inf for rows that see no key; their output is 0).
    deterministic=False lets a GPU backward accumulate dQ with atomics (faster, run-to-run
    bits may differ); the CPU kernel is always deterministic. backend: "auto", "cpu", "triton"
    (CUDA tensors) or "reference" (pure PyTorch, float32 math). The checks read cu_seqlens'
    values: on CUDA one small device-to-host copy per forward and per backward.
    Differentiable in query, key and value (and through lse), twice.
    """
    op = "attention_varlen"
    check_tensors(op, query=query, key=key, value=value, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    max_seqlen_q = _max_seqlen(max_seqlen_q, "max_seqlen_q")
    max_seqlen_k = _max_seqlen(max_seqlen_k, "max_seqlen_k")
    scale = scale_value(scale, query, op, dims=3)
    left, right = window_bounds(window_size, op)
    softcap = softcap_value(softcap, op)
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, bool(is_causal), left, right, softcap)
    if backend == "reference":
        load_extension().check_attention_varlen_args(query, key, value, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                                     max_seqlen_k, left, right, softcap)
        out, lse = attention_varlen_reference(query, key, value, cu_seqlens_q, cu_seqlens_k, is_causal=is_causal,
                                              scale=scale, window_size=(left, right), softcap=softcap,
                                              compute_dtype=torch.float32)
    elif deterministic or not torch.is_grad_enabled():
        out, lse = torch.ops.lmkernels.attention_varlen_fwd(query, key, value, *args, backend=backend)
    else:
        out, lse = _NonDeterministicBackward.apply(query, key, value, *args, backend)
    return (out, lse) if return_lse else out
