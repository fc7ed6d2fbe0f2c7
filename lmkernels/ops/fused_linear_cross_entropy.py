"""fused_linear_cross_entropy: the LM head and the cross-entropy loss in one chunked pass.

torch.ops.lmkernels.fused_linear_cross_entropy_fwd / _bwd   schemas and argument checks:
                  csrc/fused_linear_cross_entropy.cpp
    CPU tensors   the C++ kernel (csrc/cpu/fused_linear_cross_entropy_cpu.cpp)
    CUDA tensors  `_fwd_on_cuda` / `_bwd_on_cuda` below: the Triton launchers of
                  lmkernels/triton/fused_linear_cross_entropy.py after the C++ checks (there is
                  no CUDA C++ kernel: backend='cuda' is an error, LMK_BACKEND=cuda runs Triton)
How `backend=` and LMK_BACKEND choose: lmkernels/ops/_common.py. The interpreter tests call the
Triton launchers (flce_fwd / flce_bwd) directly on CPU tensors.

Never materializes the (N, V) logits or their gradient: chunks of C token rows go through
X = h W^T + b, the loss and dX = d(loss)/dX, then dh = dX W and dW += dX^T h. When a
gradient is needed and the loss is a scalar (mean/sum), the forward computes dh, dW, db in
its own chunk loop (3 GEMMs in all, as eager) and the backward only scales them by the
upstream gradient; reduction="none" recomputes X in the backward from the saved lse (4
GEMMs). bench/bench_flce.py measures both. Math: lmkernels/reference/fused_linear_cross_entropy.py.

Vocab-parallel shard mode (the ops' vocab_start / vocab_size arguments; the schema comment in
csrc/fused_linear_cross_entropy.cpp): the forward returns a shard's per-row partial statistics
and the backward its gradients given the full lse. The tensor-parallel loss built on it, and the
only caller: lmkernels/distributed/vocab_parallel.py.
"""
from typing import Optional, Tuple

import torch

from lmkernels._extension import load_extension
from lmkernels.ops._common import BackendTable
from lmkernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_reference
from lmkernels.triton import fused_linear_cross_entropy as kernels

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_REDUCTIONS = ("mean", "sum", "none")
_OP = "fused_linear_cross_entropy"


def check_flce_args(hidden, weight, target, bias, label_smoothing, z_loss, softcap, reduction,
                    chunk_size) -> None:
    """Raises a ValueError/TypeError naming the bad argument (the C++ op checks the same)."""
    for name, t in (("hidden", hidden), ("weight", weight), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{_OP}: {name} must be a Tensor; got {type(t).__name__}")
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"{_OP}: hidden must be float32, bfloat16 or float16; got {hidden.dtype}")
    if hidden.dim() < 1:
        raise ValueError(f"{_OP}: hidden must be (..., H); got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise ValueError(f"{_OP}: weight must be (V, H) with V >= 1 and H = {hidden.shape[-1]} "
                         f"(hidden's last dim, >= 1); got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{_OP}: weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    if target.dtype != torch.int64:
        raise TypeError(f"{_OP}: target must be int64 (class indices); got {target.dtype}")
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"{_OP}: target must have hidden's leading shape {tuple(hidden.shape[:-1])}; "
                         f"got {tuple(target.shape)}")
    if bias is not None:
        if bias.shape != (weight.shape[0],) or bias.dtype != hidden.dtype:
            raise ValueError(f"{_OP}: bias must be ({weight.shape[0]},) {hidden.dtype}; got "
                             f"{tuple(bias.shape)} {bias.dtype}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{_OP}: {name} is on {t.device} but hidden is on {hidden.device}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{_OP}: label_smoothing must be in [0, 1]; got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ValueError(f"{_OP}: z_loss must be >= 0; got {z_loss}")
    if softcap is not None and not softcap > 0.0:
        raise ValueError(f"{_OP}: softcap must be None or > 0; got {softcap}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"{_OP}: reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"{_OP}: chunk_size must be None (automatic) or an int >= 1; got {chunk_size}")


# ---------------------------------------------------------------- fakes (shapes for tracing)
def _check_shapes(op, hidden, weight, target, bias):
    torch._check_value(hidden.dim() == 2, lambda: f"{op}: hidden must be 2-D (N, H); got shape {tuple(hidden.shape)}")
    torch._check_value(weight.dim() == 2 and weight.shape[1] == hidden.shape[1], lambda: (
        f"{op}: weight must be (V, H) with H = {hidden.shape[1]}; got shape {tuple(weight.shape)}"))
    torch._check_type(weight.dtype == hidden.dtype, lambda: f"{op}: weight has dtype {weight.dtype} but hidden has {hidden.dtype}")
    torch._check_value(target.dim() == 1 and target.shape[0] == hidden.shape[0], lambda: (
        f"{op}: target must be 1-D (N,) with N = {hidden.shape[0]}; got shape {tuple(target.shape)}"))
    if bias is not None:
        torch._check_value(bias.dim() == 1 and bias.shape[0] == weight.shape[0], lambda: (
            f"{op}: bias must be (V,) with V = {weight.shape[0]}; got shape {tuple(bias.shape)}"))


@torch.library.register_fake(f"lmkernels::{_OP}_fwd")
def _fwd_fake(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
              reduction, chunk_size, compute_grad, vocab_start=0, vocab_size=0, *, backend="auto"):
    _check_shapes(f"{_OP}_fwd", hidden, weight, target, bias)
    torch._check_value(reduction in _REDUCTIONS, lambda: f"{_OP}_fwd: reduction must be one of {_REDUCTIONS}; got {reduction!r}")
    torch._check_value(not (compute_grad and reduction == "none"), lambda: (
        f"{_OP}_fwd: compute_grad needs reduction 'mean' or 'sum' (a scalar loss)"))
    torch._check_value(vocab_size == 0 or (reduction == "none" and not compute_grad), lambda: (
        f"{_OP}_fwd: a vocab-parallel shard's forward (vocab_size > 0) needs reduction 'none' and "
        f"compute_grad false; got {reduction!r}, {compute_grad}"))
    N = hidden.shape[0]
    loss_shape = (N,) if reduction == "none" else ()
    f32 = dict(dtype=torch.float32)
    loss, z, lse = hidden.new_empty(loss_shape, **f32), hidden.new_empty(loss_shape, **f32), hidden.new_empty((N,), **f32)
    if not compute_grad:  # distinct empties: outputs may not alias
        return loss, z, lse, hidden.new_empty((0,)), hidden.new_empty((0,)), hidden.new_empty((0,))
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return loss, z, lse, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


@torch.library.register_fake(f"lmkernels::{_OP}_bwd")
def _bwd_fake(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing, z_loss,
              softcap, reduction, chunk_size, vocab_start=0, vocab_size=0, *, backend="auto"):
    _check_shapes(f"{_OP}_bwd", hidden, weight, target, bias)
    torch._check_value(lse.dim() == 1 and lse.shape[0] == hidden.shape[0], lambda: (
        f"{_OP}_bwd: lse must be (N,) with N = {hidden.shape[0]}; got shape {tuple(lse.shape)}"))
    gb = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty((0,))
    return hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), gb


# ---------------------------------------------------------------- CUDA tensors: backend table
def _fwd_triton(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                reduction, chunk_size, compute_grad, vocab_start=0, vocab_size=0):
    load_extension().check_flce_fwd_args(hidden, weight, target, bias, label_smoothing, z_loss,
                                         softcap, reduction, chunk_size, compute_grad,
                                         vocab_start, vocab_size)
    return kernels.flce_fwd(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss,
                            softcap, reduction, chunk_size, compute_grad, vocab_start, vocab_size)


def _bwd_triton(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing,
                z_loss, softcap, reduction, chunk_size, vocab_start=0, vocab_size=0):
    load_extension().check_flce_bwd_args(grad_loss, hidden, weight, target, bias, lse,
                                         label_smoothing, z_loss, softcap, reduction, chunk_size,
                                         vocab_start, vocab_size)
    return kernels.flce_bwd(grad_loss, hidden, weight, target, bias, lse, ignore_index,
                            label_smoothing, z_loss, softcap, reduction, chunk_size, vocab_start,
                            vocab_size)


FWD_TABLE = BackendTable(f"{_OP}_fwd", {"triton": _fwd_triton})
BWD_TABLE = BackendTable(f"{_OP}_bwd", {"triton": _bwd_triton})


@torch.library.impl(f"lmkernels::{_OP}_fwd", "CUDA")
def _fwd_on_cuda(hidden, weight, target, bias, ignore_index, label_smoothing, z_loss, softcap,
                 reduction, chunk_size, compute_grad, vocab_start=0, vocab_size=0, *, backend="auto"):
    return FWD_TABLE.pick(backend)(hidden, weight, target, bias, ignore_index, label_smoothing,
                                   z_loss, softcap, reduction, chunk_size, compute_grad,
                                   vocab_start, vocab_size)


@torch.library.impl(f"lmkernels::{_OP}_bwd", "CUDA")
def _bwd_on_cuda(grad_loss, hidden, weight, target, bias, lse, ignore_index, label_smoothing,
                 z_loss, softcap, reduction, chunk_size, vocab_start=0, vocab_size=0, *, backend="auto"):
    return BWD_TABLE.pick(backend)(grad_loss, hidden, weight, target, bias, lse, ignore_index,
                                   label_smoothing, z_loss, softcap, reduction, chunk_size,
                                   vocab_start, vocab_size)


# ---------------------------------------------------------------- autograd
def _setup_context(ctx, inputs, keyword_only_inputs, output):
    hidden, weight, target, bias, *opts = inputs
    _, z, lse, gh, gw, gb = output
    # opts: ignore_index .. chunk_size, compute_grad[, vocab_start, vocab_size]
    compute_grad = opts[6]
    ctx.opts = tuple(opts[:6]) + tuple(opts[7:])  # as the bwd op takes them
    ctx.vocab_shard = len(opts) > 8 and opts[8] > 0
    ctx.backend = keyword_only_inputs.get("backend", "auto")
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, target, bias, lse)
    # Gradients for a unit upstream gradient, from the forward's chunk loop: used (and scaled
    # in place) by the first backward; a second backward (retain_graph) recomputes.
    ctx.grads = (gh, gw, gb) if compute_grad else None
    ctx.mark_non_differentiable(z, lse, gh, gw, gb)  # z: the z-loss term, for logging
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_unused):
    n_inputs = 4 + len(ctx.opts) + 1
    if grad_loss is None:
        return (None,) * n_inputs
    if ctx.vocab_shard:  # partial statistics: their gradient needs the other shards' lse
        raise RuntimeError(f"{_OP}_fwd: a vocab-parallel shard's partial statistics are not "
                           "differentiable on their own; use lmkernels.distributed.vocab_parallel."
                           "vocab_parallel_fused_linear_cross_entropy")
    hidden, weight, target, bias, lse = ctx.saved_tensors
    if ctx.grads is not None:
        gh, gw, gb = ctx.grads
        ctx.grads = None
        gh, gw, gb = gh.mul_(grad_loss), gw.mul_(grad_loss), gb.mul_(grad_loss)
    else:
        gh, gw, gb = torch.ops.lmkernels.fused_linear_cross_entropy_bwd(
            grad_loss, hidden, weight, target, bias, lse, *ctx.opts, backend=ctx.backend)
    return (gh, gw, None, gb if ctx.has_bias else None) + (None,) * (n_inputs - 4)


torch.library.register_autograd(f"lmkernels::{_OP}_fwd", _backward, setup_context=_setup_context)


# ---------------------------------------------------------------- public function
def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    return_z: bool = False,
    backend: str = "auto",
):
    """F.cross_entropy(hidden @ weight.T + bias, target, ...) without the (N, V) logits.

    hidden (..., H) float32/bfloat16/float16, weight (V, H) and bias (V,) in its dtype, target
    (...) int64 class indices (ignore_index rows count for nothing). softcap: logits become
    softcap * tanh(logits / softcap) (Gemma 2). z_loss: adds z_loss * logsumexp(logits)^2 per
    token (PaLM). reduction "mean" (over non-ignored tokens), "sum" or "none" (shape of
    target). The loss is float32 (fp32 accumulation whatever the input dtype). return_z: also
    return the z-loss term (already inside loss; not differentiable, for logging).
    chunk_size: token rows per chunk (None: about 8M logits per chunk). backend: "auto" (C++
    on CPU, Triton on CUDA), "cpu" (CPU tensors), "triton" (CUDA tensors) or "reference"
    (pure PyTorch, float32).
    Differentiable in hidden, weight and bias.
    """
    check_flce_args(hidden, weight, target, bias, label_smoothing, z_loss, softcap, reduction, chunk_size)
    if backend == "reference":
        loss, z = fused_linear_cross_entropy_reference(
            hidden, weight, target, bias=bias, ignore_index=ignore_index,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction,
            compute_dtype=torch.float32)
        return (loss, z) if return_z else loss
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    h2 = hidden.reshape(-1, hidden.shape[-1])
    loss, z, *_ = torch.ops.lmkernels.fused_linear_cross_entropy_fwd(
        h2, weight, target.reshape(-1), bias, int(ignore_index), float(label_smoothing),
        float(z_loss), None if softcap is None else float(softcap), reduction, int(chunk_size or 0), needs_grad and reduction != "none", backend=backend)
    if reduction == "none":
        loss, z = loss.reshape(target.shape), z.reshape(target.shape)
    return (loss, z) if return_z else loss
