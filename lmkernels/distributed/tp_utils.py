"""What a training loop needs around tensor-parallel (TP) parameters: the global gradient norm
and clipping across TP ranks, the shard layout of a model, and merging per-rank shards into one
full state dict (for checkpoints, sampling and exports). The layers and `parallelize` live in
tensor_parallel.py; they mark each sharded parameter with `param.tp_shard` (a TPShard).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from lmkernels.distributed.tensor_parallel import _size

__all__ = ["clip_grad_norm_", "full_state_dict", "is_tp_sharded", "merge_shards", "shard_layout"]

def is_tp_sharded(p: torch.Tensor) -> bool:
    return getattr(p, "tp_shard", None) is not None


@torch.no_grad()
def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float, tp_group=None) -> torch.Tensor:
    """Scales gradients so that their global 2-norm is at most max_norm; returns the norm before.

    The norm is the full model's: squares of TP-sharded gradients are summed over the TP group,
    replicated ones (identical on every TP rank) are counted once. DP gradients must already be
    averaged (so they are identical across DP ranks and add no term)."""
    params = [p for p in dict.fromkeys(parameters) if p.grad is not None]  # tied ones once
    if not params:
        return torch.tensor(0.0)
    grads = [p.grad for p in params]
    sharded = [p.grad for p in params if is_tp_sharded(p)]
    replicated = [p.grad for p in params if not is_tp_sharded(p)]
    device = grads[0].device

    def sum_sq(gs):
        if not gs:
            return torch.zeros((), device=device)
        return torch.stack(torch._foreach_norm([g.float() for g in gs])).square().sum()

    total_sq = sum_sq(sharded)
    if _size(tp_group) > 1:
        dist.all_reduce(total_sq, group=tp_group)
    total = (total_sq + sum_sq(replicated)).sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    return total


def shard_layout(model: nn.Module) -> dict:
    """{state_dict key: (dim, chunks)} for every TP-sharded tensor, tied names included."""
    layout = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if is_tp_sharded(p):
            layout[name] = (p.tp_shard.dim, p.tp_shard.chunks)
    return layout


def merge_shards(shards: Sequence[Mapping[str, torch.Tensor]], layout: Mapping[str, Sequence[int]]) -> dict:
    """Full state dict from the per-TP-rank state dicts (rank order), undoing `_split`."""
    full = {}
    for key, value in shards[0].items():
        if key not in layout:
            full[key] = value
            continue
        dim, chunks = layout[key]
        pieces = [s[key].chunk(chunks, dim=dim) for s in shards]  # [rank][chunk]
        full[key] = torch.cat([torch.cat([p[c] for p in pieces], dim=dim) for c in range(chunks)], dim=dim)
    return full


def full_state_dict(model: nn.Module, tp_group) -> dict:
    """The unsharded state dict, gathered from every rank of tp_group (for sampling, exports)."""
    local = model.state_dict()
    size = _size(tp_group)
    if size == 1:
        return dict(local)
    layout = shard_layout(model)
    shards = [dict() for _ in range(size)]
    for key, value in local.items():
        if key in layout:
            gathered = [torch.empty_like(value) for _ in range(size)]
            dist.all_gather(gathered, value.contiguous(), group=tp_group)
        else:
            gathered = [value] * size
        for r in range(size):
            shards[r][key] = gathered[r]
    return merge_shards(shards, layout)
