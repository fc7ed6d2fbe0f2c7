"""swiglu: silu(gate) * up, the gated activation of Llama's MLP, fused forward and backward.

torch.ops.lmkernels.swiglu_fwd / swiglu_bwd   schemas and argument checks: csrc/swiglu.cpp
    CPU tensors   the C++ kernel (csrc/cpu/swiglu_cpu.cpp)
    CUDA tensors  the Triton launchers of lmkernels/triton/swiglu.py (no CUDA C++ kernel)
Autograd: registered in C++ (csrc/swiglu.cpp, for every device; the Python register_autograd
path cost more interpreter time than the kernels at the trainer's sizes). The backward is the
swiglu_bwd op, which recomputes silu from gate (nothing but the inputs is saved).
Math: lmkernels/reference/swiglu.py.
"""
import torch

from lmkernels.ops._common import BackendTable
from lmkernels.triton import swiglu as triton_swiglu

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(op: str, gate, up, grad_out=None) -> None:
    """The C++ checks (csrc/swiglu.cpp), for the fakes and the Triton path."""
    for name, t in (("gate", gate), ("up", up), ("grad_out", grad_out)):
        if t is None:
            continue
        torch._check_type(t.dtype in _DTYPES, lambda: f"{op}: {name} must be float32, bfloat16 or float16; got {t.dtype}")
        torch._check_type(t.dtype == gate.dtype, lambda: f"{op}: {name} has dtype {t.dtype} but gate has {gate.dtype}")
        torch._check_value(t.shape == gate.shape, lambda: (
            f"{op}: {name} has shape {tuple(t.shape)} but gate has shape {tuple(gate.shape)}"))
        torch._check_value(t.device == gate.device, lambda: f"{op}: {name} is on {t.device} but gate is on {gate.device}")
    torch._check_value(gate.dim() >= 1, lambda: f"{op}: gate and up must be at least 1-D; got a scalar")


@torch.library.register_fake("lmkernels::swiglu_fwd")
def _swiglu_fwd_fake(gate, up, *, backend="auto"):
    _check_args("swiglu_fwd", gate, up)
    return gate.new_empty(gate.shape)


@torch.library.register_fake("lmkernels::swiglu_bwd")
def _swiglu_bwd_fake(grad_out, gate, up, *, backend="auto"):
    _check_args("swiglu_bwd", gate, up, grad_out)
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


# CUDA tensors: the backend tables (no CUDA C++ kernel for this op: Triton only).
def _fwd_triton(gate, up):
    _check_args("swiglu_fwd", gate, up)
    return triton_swiglu.swiglu_fwd(gate, up)


def _bwd_triton(grad_out, gate, up):
    _check_args("swiglu_bwd", gate, up, grad_out)
    return triton_swiglu.swiglu_bwd(grad_out, gate, up)


FWD_TABLE = BackendTable("swiglu_fwd", {"triton": _fwd_triton})
BWD_TABLE = BackendTable("swiglu_bwd", {"triton": _bwd_triton})


@torch.library.impl("lmkernels::swiglu_fwd", "CUDA")
def _swiglu_fwd_cuda(gate, up, *, backend="auto"):
    return FWD_TABLE.pick(backend)(gate, up)


@torch.library.impl("lmkernels::swiglu_bwd", "CUDA")
def _swiglu_bwd_cuda(grad_out, gate, up, *, backend="auto"):
    return BWD_TABLE.pick(backend)(grad_out, gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """silu(gate) * up in one pass (fp32 math, one rounding). gate and up: one shape and float
    dtype; any strides (a gate/up pair chunked from one fused projection is read in place).
    backend: "auto", "cpu" or "triton" (CUDA tensors). Differentiable in gate and up; the
    backward recomputes silu rather than saving it."""
    return torch.ops.lmkernels.swiglu_fwd(gate, up, backend=backend)
