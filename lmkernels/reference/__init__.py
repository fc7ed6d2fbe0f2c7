"""Pure-PyTorch references the tests compare the kernels against."""
