"""Helpers shared by the Triton kernels."""
import os

import triton
import triton.language as tl



def tl_dtype(dtype):
    """The Triton element type of a torch float dtype (float32, bfloat16, float16)."""
    import torch

    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def triton_interpreted() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, read at definition
    time by triton.jit, so it must be set before lmkernels is imported)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, rounding to nearest even.

    bf16 is rounded with integer ops rather than `.to(tl.bfloat16)`: the CPU interpreter's
    float downcast drops the carry into the exponent (errors of a whole binade), and on GPU
    these few integer ops are free in a memory-bound kernel."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
