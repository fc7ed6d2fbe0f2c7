"""Which backends the tests can run here, and on which device.

The Triton backend runs through the ops on CUDA tensors when a GPU is present and the GPU check
asked for it (LMK_TEST_GPU=1); otherwise the tests call the Triton launchers (plain functions)
directly on CPU tensors under TRITON_INTERPRET=1 (set in conftest): the ops run Triton only on
CUDA tensors."""
import os

import pytest
import torch

from lmkernels._extension import has_cuda_kernels

ON_GPU = torch.cuda.is_available() and bool(os.environ.get("LMK_TEST_GPU"))


def backend_params(*names: str):
    """pytest params for the named backends; CUDA-only ones carry the `gpu` mark and skip without a GPU."""
    params = []
    for name in names:
        if name == "cuda":
            skip = not (torch.cuda.is_available() and has_cuda_kernels())
            params.append(pytest.param(name, marks=[pytest.mark.gpu, pytest.mark.skipif(
                skip, reason="needs a GPU and lmkernels built with CUDA kernels")]))
        elif name == "triton" and ON_GPU:
            params.append(pytest.param(name, marks=pytest.mark.gpu))
        else:
            params.append(name)
    return params


def uses_launcher(backend: str) -> bool:
    """Whether this backend's test calls the Triton launcher on CPU tensors (no GPU here)."""
    return backend == "triton" and not ON_GPU


def op_backend_params(*names: str):
    """backend_params for tests of the op itself (opcheck): Triton only where it runs through
    the op, i.e. on a GPU."""
    return backend_params(*(n for n in names if n != "triton" or ON_GPU))


def device_for(backend: str) -> str:
    if backend == "cpu":
        return "cpu"
    if backend == "cuda":
        return "cuda"
    return "cuda" if ON_GPU else "cpu"
