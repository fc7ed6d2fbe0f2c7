"""Checkpoints: one file per TP rank, written atomically, the previous one kept until the new
one is complete.

Layout under out_dir:
    ckpt/iter-0000250/tp0-of-2.pt, tp1-of-2.pt   (one shard per tensor-parallel rank)
    ckpt/latest                                   (text: the name of the newest complete one)
A save writes into ckpt/iter-N.tmp/ (each file itself as a temp file + os.replace), waits for
every rank, renames the directory and only then points `latest` at it (temp file + os.replace),
and removes older checkpoints last. A crash anywhere before the pointer moves leaves `latest`
pointing at the previous, complete checkpoint. DP rank 0 of each TP group writes its shard;
every rank reads its TP rank's shard on resume. out_dir must be shared by all ranks.
"""
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

LATEST = "latest"


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write(obj, path: Path):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(tp_rank: int, tp_size: int) -> str:
    return f"tp{tp_rank}-of-{tp_size}.pt"


def save_checkpoint(out_dir, iter_num: int, state: dict, mesh) -> Path:
    """Saves this rank's `state` (model shard, optimizer shard, counters, config) as part of
    checkpoint iter_num. Every rank of the mesh must call it."""
    root = Path(out_dir) / "ckpt"
    final = root / f"iter-{iter_num:07d}"
    tmp = root / f"iter-{iter_num:07d}.tmp"
    if mesh.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        tmp.mkdir()
    _barrier()
    if mesh.dp_rank == 0:
        _atomic_write(state, tmp / shard_name(mesh.tp_rank, mesh.tp_size))
    _barrier()
    if mesh.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        pointer = root / (LATEST + ".tmp")
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        for old in root.iterdir():  # older checkpoints go only once the new one is the latest
            if old.is_dir() and old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def latest_checkpoint(out_dir) -> Path:
    root = Path(out_dir) / "ckpt"
    pointer = root / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"init_from=resume: no checkpoint in {str(root)!r} (the file 'latest' is "
                                f"missing); train with init_from=scratch first or point out_dir at a run")
    return root / pointer.read_text().strip()


def load_checkpoint(out_dir, tp_rank: int = 0, tp_size: int = 1, map_location="cpu") -> dict:
    """This TP rank's shard of the latest complete checkpoint."""
    path = latest_checkpoint(out_dir)
    shards = sorted(path.glob("tp*-of-*.pt"))
    if not shards:
        raise FileNotFoundError(f"checkpoint {str(path)!r} has no shard files")
    saved_tp = int(shards[0].stem.split("-of-")[1])
    if saved_tp != tp_size:
        raise ValueError(f"checkpoint {str(path)!r} was written with tp={saved_tp}; resume it with tp={saved_tp} "
                         f"(got tp={tp_size}), or sample from it with lmkernels-sample, which merges shards")
    return torch.load(path / shard_name(tp_rank, tp_size), map_location=map_location, weights_only=False)


def load_all_shards(out_dir, map_location="cpu") -> list:
    """Every TP rank's shard of the latest checkpoint, in rank order."""
    path = latest_checkpoint(out_dir)
    first = load_checkpoint(out_dir, 0, int(next(path.glob("tp0-of-*.pt")).stem.split("-of-")[1]), map_location)
    tp_size = first["tp_size"]
    return [first] + [torch.load(path / shard_name(r, tp_size), map_location=map_location, weights_only=False)
                      for r in range(1, tp_size)]
