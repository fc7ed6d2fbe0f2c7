import os

# The Triton kernels run on CPU tensors through the interpreter in tests; it must be on
# before triton.jit kernels are defined, i.e. before lmkernels is imported.
if not os.environ.get("LMK_TEST_GPU"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import lmkernels  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


