"""Fused ops: one file per op (public function, torch.library registration, fake impl,
autograd, backend choice). Importing this package registers them all."""
from lmkernels.ops.adamw import fused_adamw_
from lmkernels.ops.attention import attention
from lmkernels.ops.attention_varlen import attention_varlen
from lmkernels.ops.bucket import bucket_pack_, bucket_scale_, bucket_unpack_
from lmkernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy
from lmkernels.ops.rms_norm import add_rms_norm, rms_norm
from lmkernels.ops.rotary_embedding import rotary_embedding
from lmkernels.ops.swiglu import swiglu

__all__ = ["add_rms_norm", "attention", "attention_varlen", "bucket_pack_", "bucket_scale_", "bucket_unpack_", "fused_adamw_",
           "fused_linear_cross_entropy", "rms_norm", "rotary_embedding", "swiglu"]
