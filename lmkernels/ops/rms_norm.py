"""rms_norm and add_rms_norm: RMSNorm with Hugging Face LlamaRMSNorm semantics, and the same
fused with the residual add that precedes it in a pre-norm block.

torch.ops.lmkernels.rms_norm_fwd / add_rms_norm_fwd / rms_norm_bwd   schemas and argument
    checks: csrc/rms_norm.cpp
    CPU tensors   the C++ kernel (csrc/cpu/rms_norm_cpu.cpp)
    CUDA tensors  the Triton launchers of lmkernels/triton/rms_norm.py (no CUDA C++ kernel)
Autograd: registered in C++ (csrc/rms_norm.cpp, every device; the Python register_autograd path
cost as much interpreter time as the kernels at the trainer's sizes). The backward of both
forwards is the rms_norm_bwd op; add_rms_norm's gradient reaches x and residual through both of
its outputs; rstd is not differentiable. Math: lmkernels/reference/rms_norm.py.
"""
from typing import Optional, Tuple

import torch

from lmkernels.ops._common import BackendTable
from lmkernels.triton import rms_norm as triton_rms_norm

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(op: str, x, residual, weight, eps) -> None:
    """The C++ checks (csrc/rms_norm.cpp), for the fakes and the Triton path."""
    torch._check_type(x.dtype in _DTYPES, lambda: f"{op}: x must be float32, bfloat16 or float16; got {x.dtype}")
    torch._check_value(x.dim() >= 1 and x.shape[-1] > 0, lambda: (
        f"{op}: x must have a non-empty last (hidden) dimension; got shape {tuple(x.shape)}"))
    H = x.shape[-1]
    torch._check_value(weight.dim() == 1 and weight.shape[0] == H, lambda: (
        f"{op}: weight must be 1-D of size H={H} (x's last dimension); got shape {tuple(weight.shape)}"))
    torch._check_type(weight.dtype in (x.dtype, torch.float32), lambda: (
        f"{op}: weight must have x's dtype ({x.dtype}) or float32; got {weight.dtype}"))
    torch._check_value(weight.device == x.device, lambda: f"{op}: weight is on {weight.device} but x is on {x.device}")
    if residual is not None:
        torch._check_value(residual.shape == x.shape, lambda: (
            f"{op}: residual must have x's shape {tuple(x.shape)}; got {tuple(residual.shape)}"))
        torch._check_type(residual.dtype == x.dtype, lambda: (
            f"{op}: residual must have x's dtype {x.dtype}; got {residual.dtype}"))
        torch._check_value(residual.device == x.device, lambda: (
            f"{op}: residual is on {residual.device} but x is on {x.device}"))
    torch._check_value(eps >= 0 and eps != float("inf"), lambda: f"{op}: eps must be finite and >= 0; got {eps}")


def _check_bwd_args(grad_out, x, weight, rstd, grad_sum) -> None:
    op = "rms_norm_bwd"
    _check_args(op, x, None, weight, 0.0)
    torch._check_value(grad_out.shape == x.shape, lambda: (
        f"{op}: grad_out must be a dense tensor of x's shape {tuple(x.shape)}; got {tuple(grad_out.shape)}"))
    torch._check_type(grad_out.dtype == weight.dtype, lambda: (
        f"{op}: grad_out must have the output's dtype (weight's, {weight.dtype}); got {grad_out.dtype}"))
    torch._check_value(rstd.dtype == torch.float32 and rstd.numel() == x.numel() // x.shape[-1], lambda: (
        f"{op}: rstd must be float32 with one element per row of x; got {rstd.dtype} {tuple(rstd.shape)}"))
    if grad_sum is not None:
        torch._check_value(grad_sum.shape == x.shape and grad_sum.dtype == x.dtype, lambda: (
            f"{op}: grad_sum must be like x ({x.dtype} {tuple(x.shape)}); got {grad_sum.dtype} {tuple(grad_sum.shape)}"))


# ---------------------------------------------------------------- fakes (shapes for tracing)
@torch.library.register_fake("lmkernels::rms_norm_fwd")
def _rms_norm_fwd_fake(x, weight, eps, *, backend="auto"):
    _check_args("rms_norm_fwd", x, None, weight, eps)
    return x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.register_fake("lmkernels::add_rms_norm_fwd")
def _add_rms_norm_fwd_fake(x, residual, weight, eps, *, backend="auto"):
    _check_args("add_rms_norm_fwd", x, residual, weight, eps)
    return (x.new_empty(x.shape, dtype=weight.dtype), x.new_empty(x.shape),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@torch.library.register_fake("lmkernels::rms_norm_bwd")
def _rms_norm_bwd_fake(grad_out, x, weight, rstd, grad_sum, *, backend="auto"):
    _check_bwd_args(grad_out, x, weight, rstd, grad_sum)
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


# ---------------------------------------------------------------- CUDA tensors: Triton
# CUDA tensors: the backend tables (no CUDA C++ kernel for these ops: Triton only).
def _fwd_triton(x, weight, eps):
    _check_args("rms_norm_fwd", x, None, weight, eps)
    return triton_rms_norm.rms_norm_fwd(x, weight, eps)


def _add_fwd_triton(x, residual, weight, eps):
    _check_args("add_rms_norm_fwd", x, residual, weight, eps)
    return triton_rms_norm.rms_norm_fwd(x, weight, eps, residual=residual)


def _bwd_triton(grad_out, x, weight, rstd, grad_sum):
    _check_bwd_args(grad_out, x, weight, rstd, grad_sum)
    return triton_rms_norm.rms_norm_bwd(grad_out, x, weight, rstd, grad_sum)


FWD_TABLE = BackendTable("rms_norm_fwd", {"triton": _fwd_triton})
ADD_FWD_TABLE = BackendTable("add_rms_norm_fwd", {"triton": _add_fwd_triton})
BWD_TABLE = BackendTable("rms_norm_bwd", {"triton": _bwd_triton})


@torch.library.impl("lmkernels::rms_norm_fwd", "CUDA")
def _rms_norm_fwd_cuda(x, weight, eps, *, backend="auto"):
    return FWD_TABLE.pick(backend)(x, weight, eps)


@torch.library.impl("lmkernels::add_rms_norm_fwd", "CUDA")
def _add_rms_norm_fwd_cuda(x, residual, weight, eps, *, backend="auto"):
    return ADD_FWD_TABLE.pick(backend)(x, residual, weight, eps)


@torch.library.impl("lmkernels::rms_norm_bwd", "CUDA")
def _rms_norm_bwd_cuda(grad_out, x, weight, rstd, grad_sum, *, backend="auto"):
    return BWD_TABLE.pick(backend)(grad_out, x, weight, rstd, grad_sum)


# ---------------------------------------------------------------- autograd
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *,
             backend: str = "auto") -> torch.Tensor:
    """weight * (x / sqrt(mean(x^2, -1) + eps)).to(x.dtype), normalized in float32 (exactly HF
    LlamaRMSNorm). x (..., H) float32/bfloat16/float16, any strides; weight (H,) in x's dtype or
    float32 (the output takes weight's dtype, as HF's promotion gives). backend: "auto", "cpu"
    or "triton" (CUDA tensors). Differentiable in x and weight."""
    out, _ = torch.ops.lmkernels.rms_norm_fwd(x, weight, float(eps), backend=backend)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 *, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual, weight, eps), x + residual) in one pass: the sum (rounded to x's
    dtype, as the eager `x + residual` is) is written once and normalized from registers.
    residual: x's shape and dtype. Gradients flow to x and residual through both outputs."""
    out, s, _ = torch.ops.lmkernels.add_rms_norm_fwd(x, residual, weight, float(eps), backend=backend)
    return out, s
