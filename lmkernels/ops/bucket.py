"""Multi-tensor pack / unpack / scale (with a dtype cast) for gradient buckets.

torch.ops.lmkernels.bucket_pack_(tensors, flat, scale)    flat[o_i:o_i+n_i] = cast(tensors[i] * scale)
torch.ops.lmkernels.bucket_unpack_(flat, tensors, scale)  tensors[i] = cast(flat[o_i:o_i+n_i] * scale)
torch.ops.lmkernels.bucket_scale_(tensors, scale)         tensors[i] *= scale

o_i is the running sum of the tensors' sizes, and flat holds exactly that many elements; the
product is formed in float32 (float64 when either side is float64) and rounded once to the
destination dtype. C++ CPU kernel: csrc/cpu/bucket_cpu.cpp; CUDA kernel: csrc/cuda/bucket_cuda.cu;
checks and schemas: csrc/bucket.cpp; reference: lmkernels/reference/bucket.py.

BucketedDataParallel uses them where a gradient is not a view of its bucket: casting a bucket
to and from `reduce_dtype`, packing and unpacking gradients without bucket views, and the
average's scale. On a device whose kernel was not compiled (a GPU with a CPU-only build)
the same maths runs as plain torch ops.
"""
import functools
from typing import Sequence

import torch

__all__ = ["bucket_pack_", "bucket_scale_", "bucket_unpack_"]

_OPS = ("bucket_pack_", "bucket_unpack_", "bucket_scale_")


@functools.lru_cache(maxsize=None)
def _compiled(device_type: str) -> bool:
    """Whether lmkernels._C has a kernel for this device (no CUDA kernel in a CPU-only build)."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("lmkernels::bucket_pack_", key)


for _op in _OPS:
    # Mutating ops that return nothing: the fake impl has nothing to compute.
    torch.library.register_fake(f"lmkernels::{_op}")(lambda *args, **kwargs: None)


def _opmath(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def bucket_pack_(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> None:
    """Copies `tensors` one after another into the 1-D `flat`, multiplied by `scale` and cast
    to flat's dtype. All tensors share one dtype and flat's device; sizes must add up to
    flat.numel()."""
    tensors = list(tensors)
    if _compiled(flat.device.type):
        torch.ops.lmkernels.bucket_pack_(tensors, flat, float(scale))
        return
    if sum(t.numel() for t in tensors) != flat.numel():
        raise ValueError("bucket_pack_: flat must hold exactly the tensors' elements")
    if not tensors:
        return
    math = _opmath(tensors[0].dtype, flat.dtype)
    flat.copy_(torch.cat([t.reshape(-1).to(math) for t in tensors]).mul_(scale))


def bucket_unpack_(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """The inverse of bucket_pack_: tensors[i] = cast(flat[o_i : o_i + n_i] * scale)."""
    tensors = list(tensors)
    if _compiled(flat.device.type):
        torch.ops.lmkernels.bucket_unpack_(flat, tensors, float(scale))
        return
    if sum(t.numel() for t in tensors) != flat.numel():
        raise ValueError("bucket_unpack_: flat must hold exactly the tensors' elements")
    offset = 0
    for t in tensors:
        piece = flat[offset:offset + t.numel()].to(_opmath(flat.dtype, t.dtype)).mul_(scale)
        t.copy_(piece.view_as(t))
        offset += t.numel()


def bucket_scale_(tensors: Sequence[torch.Tensor], scale: float) -> None:
    """tensors[i] *= scale, in place (product in float32, or float64 for float64 tensors)."""
    tensors = list(tensors)
    if not tensors:
        return
    if _compiled(tensors[0].device.type):
        torch.ops.lmkernels.bucket_scale_(tensors, float(scale))
        return
    for t in tensors:
        t.copy_(t.to(_opmath(t.dtype)).mul_(scale))
