"""Gradient buckets: which parameters share a flat buffer, and the buffers themselves.

A bucket holds parameters of one dtype and device. Its `grads` buffer is flat and each
parameter's `.grad` is a view into it (gradient_as_bucket_view); `comm` is the buffer the
all-reduce runs on: `grads` itself, or a separate buffer in `reduce_dtype` (or, without views,
the place the gradients are packed into).
"""
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch


def assign_buckets(
    params: Sequence[torch.Tensor], bucket_cap_bytes: int, first_bucket_cap_bytes: int,
) -> list[list[int]]:
    """Groups parameter indices into buckets, filling in the given order (as DDP does).

    Each (dtype, device) has its own open bucket; a bucket closes once its size reaches its
    limit (first_bucket_cap_bytes for the first bucket of a kind, bucket_cap_bytes after), so
    a bucket may exceed the limit by one parameter and a cap of 0 gives one parameter per
    bucket. Buckets come out ordered by their first parameter's position in `params`, which
    is the order they become ready in backward when `params` is in ready order."""
    open_buckets: dict = {}
    closed: list[list[int]] = []
    for i, p in enumerate(params):
        key = (p.dtype, p.device)
        indices, size, limit = open_buckets.get(key, ([], 0, first_bucket_cap_bytes))
        indices.append(i)
        size += p.numel() * p.element_size()
        if size >= limit:
            closed.append(indices)
            open_buckets[key] = ([], 0, bucket_cap_bytes)
        else:
            open_buckets[key] = (indices, size, limit)
    closed += [indices for indices, _, _ in open_buckets.values() if indices]
    closed.sort(key=lambda b: b[0])
    return closed


@dataclass(eq=False)
class Bucket:
    index: int
    params: list[torch.Tensor]
    names: list[str]
    grads: torch.Tensor                 # flat, params' dtype; params' .grad are views into it
    comm: torch.Tensor                  # what the all-reduce runs on (may be `grads` itself)
    views: list[torch.Tensor]           # views[i] is grads[offsets[i]:...] shaped like params[i]
    # (without bucket views: grads is comm, the buffer gradients are packed into; no views)
    offsets: list[int]
    pending: int = 0                    # gradients still to arrive in this iteration
    absent: bool = False                # a parameter got no gradient from this backward
    work: Optional[object] = None       # the in-flight all-reduce
    finalized: bool = False
    launch_time: float = 0.0
    done_time: list = field(default_factory=list)  # filled by the all-reduce's future callback

    def reset(self) -> None:
        self.pending = len(self.params)
        self.absent = False
        self.work = None
        self.finalized = False
        self.done_time = []


def padded_numel(numel: int, shards: int, element_size: int, align_bytes: int = 16) -> int:
    """The smallest size >= numel that splits into `shards` equal shards, each a multiple of
    align_bytes (so every rank's shard has the same size and starts 16-byte aligned)."""
    per_shard_multiple = max(1, align_bytes // element_size)
    shard = -(-numel // shards)
    shard = -(-shard // per_shard_multiple) * per_shard_multiple
    return shard * shards


def make_bucket(index: int, params: list[torch.Tensor], names: list[str],
                reduce_dtype: Optional[torch.dtype], as_view: bool, shards: int = 1) -> Bucket:
    """Allocates the bucket's buffers. With `as_view` the current gradients are copied in and
    the parameters' `.grad` become views of the buffer. shards > 1 pads the buffers (with
    zeros, after the last parameter) to padded_numel(..., shards, ...) for sharded data
    parallel; the packed buffer without views is never padded (it holds exactly the grads)."""
    dtype, device = params[0].dtype, params[0].device
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    padded = total if shards == 1 else padded_numel(total, shards, dtype.itemsize)
    wire = reduce_dtype or dtype
    if not as_view:  # gradients stay autograd's tensors: only the buffer they are packed into
        comm = torch.empty(total, dtype=wire, device=device)
        bucket = Bucket(index, params, names, comm, comm, [], offsets)
        bucket.reset()
        return bucket
    grads = torch.zeros(padded, dtype=dtype, device=device)
    views = [grads[o:o + p.numel()].view_as(p) for o, p in zip(offsets, params)]
    comm = grads if wire == dtype else torch.zeros(padded, dtype=wire, device=device)
    with torch.no_grad():
        for p, v in zip(params, views):
            if p.grad is not None:
                v.copy_(p.grad)
                p.grad = v
    bucket = Bucket(index, params, names, grads, comm, views, offsets)
    bucket.reset()
    return bucket
