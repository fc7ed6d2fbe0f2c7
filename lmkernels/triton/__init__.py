"""@triton.jit kernels only; the ops in lmkernels/ops/ launch them."""
