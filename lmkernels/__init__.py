"""lmkernels: fused kernels, data/tensor parallelism and a thin trainer for GPT training."""
import torch  # noqa: F401  (loads libtorch/libc10, which lmkernels._C links against)

from lmkernels._extension import build_info, load_extension

load_extension()  # registers torch.ops.lmkernels.* (schemas and C++ CPU kernels)

from lmkernels import ops  # noqa: E402  (registers fakes, the CUDA-tensor backend tables, autograd)
from lmkernels.ops import attention, attention_varlen, fused_adamw_  # noqa: E402
from lmkernels.ops import add_rms_norm, rms_norm, rotary_embedding, swiglu  # noqa: E402
from lmkernels.ops import fused_linear_cross_entropy  # noqa: E402
from lmkernels.optim import FusedAdamW  # noqa: E402

__all__ = ["FusedAdamW", "add_rms_norm", "attention", "attention_varlen", "build_info", "fused_adamw_",
           "fused_linear_cross_entropy", "ops", "rms_norm", "rotary_embedding", "swiglu"]
