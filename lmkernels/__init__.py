"""lmkernels: fused kernels, data/tensor parallelism and a thin trainer for GPT training."""
import torch  # noqa: F401  (first: lmkernels._C links against libtorch/libc10)

from lmkernels._extension import build_info, load_extension  # noqa: E402

load_extension()  # registers torch.ops.lmkernels.* (C++ and CUDA kernels)

from lmkernels import ops  # noqa: E402  (registers the Python-side ops: fakes, Triton, autograd)
from lmkernels.ops import attention, fused_adamw_  # noqa: E402
from lmkernels.optim import FusedAdamW  # noqa: E402

__all__ = ["FusedAdamW", "attention", "build_info", "fused_adamw_", "ops"]
