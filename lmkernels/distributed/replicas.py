"""Checks that every rank holds the same model: at construction (same parameters and buffers in
the same order, with the same shapes and dtypes, and the same bucketing options) and later
(bit-identical values, `verify_replicas`).

The construction check all-gathers one fixed-size signature per rank (a count and a hash), so
ranks whose models differ in any way, even in the number of parameters, finish the exchange and
raise the same error together instead of aborting or hanging inside a mismatched collective.
Only when the signatures differ is the per-parameter description gathered, to name the first
difference.
"""
import hashlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist


def describe(named_tensors: Sequence[tuple], options: dict) -> list:
    """What must agree across ranks, as plain tuples: (kind, name, shape, dtype, requires_grad)
    per tensor and one ("options", ...) entry. Names are reported, not compared (two ranks may
    name a layer differently and still be compatible, as with torch DDP)."""
    rows = [(kind, name, tuple(t.shape), str(t.dtype), bool(t.requires_grad))
            for kind, name, t in named_tensors]
    rows.append(("options", "", tuple(sorted((k, repr(v)) for k, v in options.items())), "", False))
    return rows


def _signature(rows: list, device: torch.device) -> torch.Tensor:
    compared = [(kind, shape, dtype, grad) for kind, _, shape, dtype, grad in rows]
    digest = hashlib.sha256(repr(compared).encode()).digest()
    hash_words = [int.from_bytes(digest[i:i + 7], "little") for i in (0, 7, 14)]  # < 2**63
    return torch.tensor([len(rows)] + hash_words, dtype=torch.int64, device=device)


def _first_difference(ref: list, rows: list, rank: int) -> str:
    """The first way rank `rank`'s rows differ from rank 0's (`ref`)."""
    def show(row):
        kind, name, shape, dtype, grad = row
        return f"{kind} '{name}' {list(shape)} {dtype}{'' if grad else ' (frozen)'}"

    for i, (a, b) in enumerate(zip(ref[:-1], rows[:-1])):
        if (a[0], a[2], a[3], a[4]) != (b[0], b[2], b[3], b[4]):
            return f"entry #{i} is {show(a)} on rank 0 but {show(b)} on rank {rank}"
    if len(ref) != len(rows):
        return (f"rank 0 has {len(ref) - 1} parameters and buffers, rank {rank} has "
                f"{len(rows) - 1}")
    return f"options differ: rank 0 has {dict(ref[-1][2])}, rank {rank} has {dict(rows[-1][2])}"


def check_same_model(rows: list, group, device: torch.device, wait: Callable) -> None:
    """Raises on every rank when the ranks' `describe(...)` rows differ. `wait(work, what)`
    waits for a collective with the wrapper's timeout."""
    world = dist.get_world_size(group)
    if world == 1:
        return
    mine = _signature(rows, device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    wait(dist.all_gather(gathered, mine, group=group, async_op=True),
         "the all-gather of the model signatures (at construction)")
    if all(torch.equal(g, gathered[0]) for g in gathered):
        return
    # Every rank saw the same gathered signatures, so every rank takes this path together.
    everyone = [None] * world
    dist.all_gather_object(everyone, rows, group=group)
    rank = dist.get_rank(group)
    differing = [r for r in range(world) if not torch.equal(gathered[r], gathered[0])]
    lines = [_first_difference(everyone[0], everyone[r], r) for r in differing]
    raise ValueError(
        "BucketedDataParallel: the ranks do not hold the same model (every rank must build the "
        "same parameters and buffers, in the same order, with the same shapes, dtypes and "
        f"requires_grad, and pass the same bucketing options); this is rank {rank} of {world}:\n  " + "\n  ".join(lines))


def checksum(t: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """An int64 checksum of the tensor's bits, position-weighted so permutations differ
    (integer sums wrap exactly, so the result is independent of summation order). Works in
    chunks so a large parameter needs little temporary memory."""
    flat = t.contiguous().reshape(-1)
    flat = flat.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[flat.element_size()])
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for start in range(0, flat.numel(), chunk):
        bits = flat[start:start + chunk].to(torch.int64)
        weights = torch.arange(start, start + bits.numel(), device=t.device, dtype=torch.int64) % 65521 + 1
        total += (bits * weights).sum()
    return total
