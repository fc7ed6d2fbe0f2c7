"""Fused ops: one file per op (public function, torch.library registration, fake impl,
autograd, backend choice). Importing this package registers them all."""
from lmkernels.ops.adamw import fused_adamw_
from lmkernels.ops.attention import attention

__all__ = ["attention", "fused_adamw_"]
