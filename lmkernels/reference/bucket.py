"""Pure-PyTorch bucket pack / unpack / scale, computing in float64 (for testing
lmkernels.ops.bucket; same arguments and semantics)."""
from typing import Sequence

import torch


@torch.no_grad()
def bucket_pack_reference_(tensors: Sequence[torch.Tensor], flat: torch.Tensor, scale: float = 1.0) -> None:
    """flat = concatenation of the flattened tensors, times scale, rounded once to flat's dtype."""
    if not tensors:
        return
    flat.copy_(torch.cat([t.reshape(-1).double() for t in tensors]) * scale)


@torch.no_grad()
def bucket_unpack_reference_(flat: torch.Tensor, tensors: Sequence[torch.Tensor], scale: float = 1.0) -> None:
    """tensors[i] = flat's i-th piece times scale, rounded once to the tensor's dtype."""
    offset = 0
    for t in tensors:
        t.copy_((flat[offset:offset + t.numel()].double() * scale).view(t.shape))
        offset += t.numel()


@torch.no_grad()
def bucket_scale_reference_(tensors: Sequence[torch.Tensor], scale: float) -> None:
    for t in tensors:
        t.copy_(t.double() * scale)
