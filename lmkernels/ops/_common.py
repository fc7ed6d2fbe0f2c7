"""How every op chooses its kernel: the `backend` argument and LMK_BACKEND.

Every op's schema ends in `str backend="auto"` (so the choice is part of the call and survives
torch.compile). The tensors' device picks the dispatch key:

- CPU tensors run the C++ kernel (registered in C++). `backend` must be "auto" or "cpu"; any
  other name is an error saying why (a Triton kernel runs on CPU tensors only when a test
  calls its launcher in lmkernels.triton.<op> directly under TRITON_INTERPRET=1).
- CUDA tensors run one Python function per op (registered here, in lmkernels/ops/<op>.py),
  which picks the kernel from the op's `BackendTable`: "cuda" (CUDA C++ kernel, when the op
  has one and lmkernels._C was built with CUDA) or "triton". "auto" takes the table's first
  available kernel.

`backend=` is a demand: a kernel the op lacks, or one not compiled, is an error. LMK_BACKEND
is a process-wide preference that replaces "auto" on CUDA tensors: honoured where the op has
that kernel, otherwise the op runs its "auto" choice and warns once (e.g. LMK_BACKEND=cuda
with attention, which has no CUDA C++ kernel, runs Triton). An unknown LMK_BACKEND name is an
error. CPU tensors ignore LMK_BACKEND: they have one kernel.
"""
import os
import warnings
from typing import Callable, Optional

BACKENDS = ("auto", "cpu", "cuda", "triton")


class BackendTable:
    """The kernels one op can run on CUDA tensors, by backend name, in "auto" order.

    kernels: name -> callable taking the op's arguments without `backend`; None for a kernel
    the op has but this build lacks (the CUDA C++ kernels in a CPU-only build).
    fallback: what "auto" runs when no kernel is available (plain torch ops), if anything.
    """

    def __init__(self, op: str, kernels: dict[str, Optional[Callable]],
                 fallback: Optional[Callable] = None):
        assert set(kernels) <= {"cuda", "triton"}, kernels
        self.op, self.kernels, self.fallback = op, kernels, fallback
        self._warned: set[str] = set()

    def pick(self, backend: str) -> Callable:
        """The kernel for CUDA tensors and this `backend` argument, or an error saying why not."""
        if backend == "auto":
            return self._auto()
        if backend not in BACKENDS:
            raise ValueError(f"{self.op}: backend must be one of {BACKENDS}; got {backend!r}")
        if backend == "cpu":
            raise ValueError(f"{self.op}: backend 'cpu' needs CPU tensors; got CUDA tensors")
        if backend not in self.kernels:
            raise ValueError(f"{self.op}: there is no {backend!r} kernel for this op; on CUDA "
                             f"tensors use one of {('auto',) + tuple(self.kernels)}")
        kernel = self.kernels[backend]
        if kernel is None:
            raise RuntimeError(f"{self.op}: lmkernels._C was built without CUDA kernels; "
                               "rebuild with LMK_CUDA=1, or use backend='auto'")
        return kernel

    def _auto(self) -> Callable:
        preferred = os.environ.get("LMK_BACKEND", "auto")
        if preferred not in BACKENDS:
            raise ValueError(f"{self.op}: LMK_BACKEND must be one of {BACKENDS}; got {preferred!r}")
        if preferred != "auto":
            if self.kernels.get(preferred) is not None:
                return self.kernels[preferred]
            if preferred not in self._warned:
                self._warned.add(preferred)
                warnings.warn(f"{self.op}: LMK_BACKEND={preferred} has no kernel for this op on "
                              "CUDA tensors in this build; running its 'auto' choice",
                              stacklevel=3)
        for kernel in self.kernels.values():
            if kernel is not None:
                return kernel
        if self.fallback is None:
            raise RuntimeError(f"{self.op}: no kernel for CUDA tensors in this build; rebuild "
                               "lmkernels._C with LMK_CUDA=1")
        return self.fallback


def cuda_kernel(name: str) -> Optional[Callable]:
    """lmkernels._C.<name> (a CUDA C++ kernel), or None in a build without CUDA kernels."""
    from lmkernels._extension import load_extension

    return getattr(load_extension(), name, None)

