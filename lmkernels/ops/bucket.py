"""Multi-tensor pack / unpack / scale (with a dtype cast) for gradient buckets.

torch.ops.lmkernels.bucket_pack_(tensors, flat, scale)    flat[o_i:o_i+n_i] = cast(tensors[i] * scale)
torch.ops.lmkernels.bucket_unpack_(flat, tensors, scale)  tensors[i] = cast(flat[o_i:o_i+n_i] * scale)
torch.ops.lmkernels.bucket_scale_(tensors, scale)         tensors[i] *= scale

o_i is the running sum of the tensors' sizes, and flat holds exactly that many elements; the
product is formed in float32 (float64 when either side is float64) and rounded once to the
destination dtype. Schemas and checks: csrc/bucket.cpp; reference: lmkernels/reference/bucket.py.
    CPU tensors   the C++ kernel (csrc/cpu/bucket_cpu.cpp)
    CUDA tensors  `_on_cuda` below picks from the op's backend table: the CUDA kernel
                  (csrc/cuda/bucket_cuda.cu). There is no Triton bucket kernel; in a build
                  without CUDA kernels "auto" runs the same maths as plain torch ops.
How `backend=` and LMK_BACKEND choose: lmkernels/ops/_common.py.

BucketedDataParallel uses them where a gradient is not a view of its bucket: casting a bucket
to and from `reduce_dtype`, packing and unpacking gradients without bucket views, and the
average's scale.
"""
from typing import Sequence

import torch

from lmkernels.ops._common import BackendTable, cuda_kernel

__all__ = ["bucket_pack_", "bucket_scale_", "bucket_unpack_"]


# ---------------------------------------------------------------- fakes
@torch.library.register_fake("lmkernels::bucket_pack_")
def _bucket_pack_fake(tensors, flat, scale=1.0, *, backend="auto") -> None:
    _check_total("bucket_pack_", tensors, flat)


@torch.library.register_fake("lmkernels::bucket_unpack_")
def _bucket_unpack_fake(flat, tensors, scale=1.0, *, backend="auto") -> None:
    _check_total("bucket_unpack_", tensors, flat)


@torch.library.register_fake("lmkernels::bucket_scale_")
def _bucket_scale_fake(tensors, scale, *, backend="auto") -> None:
    return None


def _check_total(op, tensors, flat):
    total = sum(t.numel() for t in tensors)
    torch._check(flat.numel() == total, lambda: (
        f"{op}: flat must hold exactly the tensors' {total} elements (their sizes summed); got {flat.numel()}"))


# ---------------------------------------------------------------- the same maths as torch ops
# For CUDA tensors in a build without the CUDA kernels (the table's fallback). The C++ kernels
# check their arguments; these check what would otherwise go silently wrong.
def _opmath(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _pack_torch(tensors, flat, scale):
    _check_total("bucket_pack_", tensors, flat)
    if tensors:
        math = _opmath(tensors[0].dtype, flat.dtype)
        flat.copy_(torch.cat([t.reshape(-1).to(math) for t in tensors]).mul_(scale))


def _unpack_torch(flat, tensors, scale):
    _check_total("bucket_unpack_", tensors, flat)
    offset = 0
    for t in tensors:
        # Out of place: .to() returns flat's own memory when the dtype already matches.
        piece = flat[offset:offset + t.numel()].to(_opmath(flat.dtype, t.dtype)) * scale
        t.copy_(piece.view_as(t))
        offset += t.numel()


def _scale_torch(tensors, scale):
    for t in tensors:
        t.copy_(t.to(_opmath(t.dtype)).mul_(scale))


# ---------------------------------------------------------------- CUDA tensors: backend tables
_PACK = BackendTable("bucket_pack_", {"cuda": cuda_kernel("bucket_pack_cuda")}, _pack_torch)
_UNPACK = BackendTable("bucket_unpack_", {"cuda": cuda_kernel("bucket_unpack_cuda")}, _unpack_torch)
_SCALE = BackendTable("bucket_scale_", {"cuda": cuda_kernel("bucket_scale_cuda")}, _scale_torch)


@torch.library.impl("lmkernels::bucket_pack_", "CUDA")
def _pack_on_cuda(tensors, flat, scale=1.0, *, backend="auto"):
    _PACK.pick(backend)(tensors, flat, scale)


@torch.library.impl("lmkernels::bucket_unpack_", "CUDA")
def _unpack_on_cuda(flat, tensors, scale=1.0, *, backend="auto"):
    _UNPACK.pick(backend)(flat, tensors, scale)


@torch.library.impl("lmkernels::bucket_scale_", "CUDA")
def _scale_on_cuda(tensors, scale, *, backend="auto"):
    _SCALE.pick(backend)(tensors, scale)


# ---------------------------------------------------------------- public functions
def bucket_pack_(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0, *,
                 backend: str = "auto") -> None:
    """Copies `tensors` one after another into the 1-D `flat`, multiplied by `scale` and cast
    to flat's dtype. All tensors share one dtype and flat's device; sizes must add up to
    flat.numel(). backend: "auto", "cpu" or "cuda"."""
    torch.ops.lmkernels.bucket_pack_(list(tensors), flat, float(scale), backend=backend)


def bucket_unpack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0, *,
                   backend: str = "auto") -> None:
    """The inverse of bucket_pack_: tensors[i] = cast(flat[o_i : o_i + n_i] * scale)."""
    torch.ops.lmkernels.bucket_unpack_(flat, list(tensors), float(scale), backend=backend)


def bucket_scale_(tensors: Sequence[torch.Tensor], scale: float, *, backend: str = "auto") -> None:
    """tensors[i] *= scale, in place (product in float32, or float64 for float64 tensors)."""
    tensors = list(tensors)
    if tensors:  # an empty list has no device to dispatch on
        torch.ops.lmkernels.bucket_scale_(tensors, float(scale), backend=backend)
