"""rotary_embedding: rotary position embedding of q and k in one pass (HF apply_rotary_pos_emb).

torch.ops.lmkernels.rotary_embedding   schema and argument checks: csrc/rotary_embedding.cpp
    CPU tensors   the C++ kernel (csrc/cpu/rotary_embedding_cpu.cpp)
    CUDA tensors  the Triton launcher of lmkernels/triton/rotary_embedding.py (no CUDA C++ kernel)
Autograd: registered in C++ (csrc/rotary_embedding.cpp, every device; the Python
register_autograd path cost as much interpreter time as the kernel at the trainer's sizes). The
backward is the same op with `inverse` flipped (the rotation's transpose, i.e.
the rotation by -theta). cos and sin get no gradient (they are position tables). Math:
lmkernels/reference/rotary_embedding.py.
"""
from typing import Tuple

import torch

from lmkernels.ops._common import BackendTable
from lmkernels.triton import rotary_embedding as triton_rotary

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_args(q, k, cos, sin) -> None:
    """The C++ checks (csrc/rotary_embedding.cpp), for the fake and the Triton path."""
    op = "rotary_embedding"
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        torch._check_type(t.dtype in _DTYPES, lambda: f"{op}: {name} must be float32, bfloat16 or float16; got {t.dtype}")
        torch._check_value(t.device == q.device, lambda: f"{op}: {name} is on {t.device} but q is on {q.device}")
    torch._check_value(q.dim() == 4, lambda: f"{op}: q must be 4-D (B, H, T, D); got shape {tuple(q.shape)}")
    torch._check_value(k.dim() == 4, lambda: f"{op}: k must be 4-D (B, Hkv, T, D); got shape {tuple(k.shape)}")
    torch._check_type(k.dtype == q.dtype, lambda: f"{op}: k has dtype {k.dtype} but q has {q.dtype}")
    B, _, T, D = q.shape
    torch._check_value(D > 0 and D % 2 == 0, lambda: f"{op}: head dim D must be even and > 0; got q shape {tuple(q.shape)}")
    torch._check_value(k.shape[0] == B and k.shape[2] == T and k.shape[3] == D, lambda: (
        f"{op}: k must be (B, Hkv, T, D) = ({B}, Hkv, {T}, {D}) like q; got shape {tuple(k.shape)}"))
    for name, t in (("cos", cos), ("sin", sin)):
        torch._check_value(t.dim() == 3 and t.shape[0] in (1, B) and t.shape[1] == T and t.shape[2] == D, lambda: (
            f"{op}: {name} must be (1 or B, T, D) = (1 or {B}, {T}, {D}); got shape {tuple(t.shape)}"))
        torch._check_type(t.dtype in (torch.float32, q.dtype), lambda: (
            f"{op}: {name} must be float32 or q's dtype ({q.dtype}); got {t.dtype}"))
    torch._check_value(sin.shape == cos.shape and sin.dtype == cos.dtype, lambda: (
        f"{op}: sin must match cos; got {sin.dtype} {tuple(sin.shape)} and {cos.dtype} {tuple(cos.shape)}"))


@torch.library.register_fake("lmkernels::rotary_embedding")
def _rotary_embedding_fake(q, k, cos, sin, interleaved, inverse, *, backend="auto"):
    _check_args(q, k, cos, sin)
    return q.new_empty(q.shape), k.new_empty(k.shape)


# CUDA tensors: the backend table (no CUDA C++ kernel for this op: Triton only).
def _rotary_triton(q, k, cos, sin, interleaved, inverse):
    _check_args(q, k, cos, sin)
    return triton_rotary.rotary_embedding(q, k, cos, sin, interleaved, inverse)


TABLE = BackendTable("rotary_embedding", {"triton": _rotary_triton})


@torch.library.impl("lmkernels::rotary_embedding", "CUDA")
def _rotary_embedding_cuda(q, k, cos, sin, interleaved, inverse, *, backend="auto"):
    return TABLE.pick(backend)(q, k, cos, sin, interleaved, inverse)


def _as_batch_table(name: str, t: torch.Tensor) -> torch.Tensor:
    """cos/sin as (1 or B, T, D): HF passes (B, T, D), or (B, 1, T, D) once unsqueezed."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"rotary_embedding: {name} must be a Tensor; got {type(t).__name__}")
    if t.dim() == 2:
        return t.unsqueeze(0)
    if t.dim() == 4 and t.shape[1] == 1:
        return t.squeeze(1)
    if t.dim() != 3:
        raise ValueError(f"rotary_embedding: {name} must be (T, D), (1 or B, T, D) or (1 or B, 1, T, D); "
                         f"got shape {tuple(t.shape)}")
    return t


def rotary_embedding(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *,
                     interleaved: bool = False, backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """(q * cos + rot(q) * sin, k * cos + rot(k) * sin) in one pass, fp32 math.

    q (B, H, T, D), k (B, Hkv, T, D), any strides (HF's transposed projections are read in
    place); outputs contiguous, in q's dtype. cos/sin: the angle table per position with D
    entries, (T, D), (1 or B, T, D) or (1 or B, 1, T, D) as HF's rotary module returns it;
    float32 or q's dtype. Position offsets come in through cos/sin. rot: HF rotate-half
    ((-x2, x1) on the halves), or with interleaved=True the GPT-J pairs ((-x[2j+1], x[2j]);
    cos/sin then repeat each angle pairwise). Differentiable in q and k (not cos/sin)."""
    cos, sin = _as_batch_table("cos", cos), _as_batch_table("sin", sin)
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        raise ValueError("rotary_embedding: cos and sin get no gradient; pass them detached "
                         "(HF's rotary module computes them under no_grad)")
    return torch.ops.lmkernels.rotary_embedding(q, k, cos, sin, bool(interleaved), False, backend=backend)
