"""Helpers shared by the Triton kernels."""
import triton
import triton.language as tl


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
