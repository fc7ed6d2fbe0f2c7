"""What every op shares: backend choice and the Triton interpreter switch.

Backends: "cpu" (C++ kernel), "cuda" (CUDA C++ kernel), "triton" (Triton kernel; on CPU
tensors only under TRITON_INTERPRET=1, which is how the tests run it), "auto" (the fastest
one available for the tensors' device). LMK_BACKEND=<name> replaces "auto" process-wide.
"""
import os

import torch

from lmkernels._extension import has_cuda_kernels
from lmkernels.triton._common import triton_interpreted  # noqa: F401  (re-exported for the ops)

BACKENDS = ("auto", "cpu", "triton", "cuda")


def resolve_backend(op: str, backend: str, device: torch.device, *, prefer_cuda_cpp: bool = True) -> str:
    """Turns `backend` into the one that runs on `device`, or raises saying why not.

    `prefer_cuda_cpp`: for "auto" on a GPU, whether the op's CUDA C++ kernel (when compiled)
    beats its Triton kernel."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        backend = os.environ.get("LMK_BACKEND", "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{op}: LMK_BACKEND must be one of {BACKENDS}; got {backend!r}")
    if backend == "auto":
        if device.type == "cpu":
            return "cpu"
        if device.type == "cuda":
            return "cuda" if prefer_cuda_cpp and has_cuda_kernels() else "triton"
        raise ValueError(f"{op}: tensors on {device} are not supported (cpu or cuda expected)")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors; got tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors; got tensors on {device}")
        if not has_cuda_kernels():
            raise RuntimeError(f"{op}: lmkernels._C was built without CUDA kernels; rebuild with LMK_CUDA=1")
    if backend == "triton" and device.type == "cpu" and not triton_interpreted():
        raise ValueError(
            f"{op}: backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (set before importing lmkernels)"
        )
    return backend
