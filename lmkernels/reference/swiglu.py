"""Pure-PyTorch SwiGLU, the reference: silu(gate) * up, silu(x) = x * sigmoid(x).

compute_dtype=None is the eager composition in the inputs' dtype (F.silu(gate) * up, two
roundings); torch.float64 is the truth.
"""
from typing import Optional

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor,
                     compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if compute_dtype is not None:
        gate, up = gate.to(compute_dtype), up.to(compute_dtype)
    return F.silu(gate) * up
