"""Fused ops: one file per op (public function, torch.library registration, fake impl,
autograd, backend choice). Importing this package registers them all."""
from lmkernels.ops.adamw import fused_adamw_
from lmkernels.ops.attention import attention
from lmkernels.ops.bucket import bucket_pack_, bucket_scale_, bucket_unpack_
from lmkernels.ops.fused_linear_cross_entropy import fused_linear_cross_entropy

__all__ = ["attention", "bucket_pack_", "bucket_scale_", "bucket_unpack_", "fused_adamw_", "fused_linear_cross_entropy"]
