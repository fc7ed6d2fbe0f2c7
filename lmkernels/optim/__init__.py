"""Optimizers built on the fused ops."""
from lmkernels.optim.fused_adamw import FusedAdamW

__all__ = ["FusedAdamW"]
