"""Checkpoints: one file per TP rank, written atomically, verified by sha256 on load; the newest
few are kept so that a damaged one can be skipped.

Layout under out_dir:
    ckpt/iter-0000250/tp0-of-2.pt, tp1-of-2.pt   (one shard per tensor-parallel rank)
    ckpt/iter-0000250/manifest.json               (iteration, tp size, each shard's size and sha256)
    ckpt/latest                                   (text: the name of the newest complete one)
Save: the shards go into ckpt/iter-N.tmp/ (each file itself as a temp file + os.replace, hashed by
reading it back), the ranks exchange the hashes, rank 0 writes the manifest, renames the directory
and only then points `latest` at it (temp file + os.replace), and prunes old checkpoints last. A
crash anywhere before the pointer moves leaves `latest` pointing at the previous, complete one.
DP rank 0 of each TP group writes its shard; out_dir must be shared by all ranks. With zero=1/2
every DP rank also writes its optimizer shard (tp0-of-2.optim-dp1-of-4.pt, listed in the manifest
with optimizer_dp_size); loading merges them into one consolidated optimizer state, so a run
resumes at any DP size (and any zero stage).
Load: the checkpoint `latest` names, else (damaged shard, missing manifest, empty or dangling
`latest`) the newest older one that verifies, with a warning naming the bad file. Every rank
checks the shard it needs and the ranks agree, so all of them resume from the same iteration.
"""
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from lmkernels.train.errors import CheckpointError, ConfigError

LATEST = "latest"
MANIFEST = "manifest.json"
_ITER_DIR = re.compile(r"iter-(\d+)")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier():
    if _distributed():
        dist.barrier()


def _all_gather(obj) -> list:
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_ranks_agree(ok: bool) -> bool:
    """True when `ok` holds on every rank (one small all-reduce; the result is the same everywhere)."""
    if not _distributed():
        return ok
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([int(ok)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(obj, path: Path) -> dict:
    """Writes obj with torch.save; returns the file's size and sha256, hashed from what reached
    the file (read back from the page cache), not from the bytes we meant to write."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    entry = {"bytes": tmp.stat().st_size, "sha256": _sha256(tmp)}
    os.replace(tmp, path)
    return entry


def _write_text_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_name(tp_rank: int, tp_size: int) -> str:
    return f"tp{tp_rank}-of-{tp_size}.pt"


def _iteration(path: Path) -> int:
    return int(_ITER_DIR.fullmatch(path.name).group(1))


def _complete_checkpoints(root: Path) -> list:
    """Renamed (complete) checkpoint directories, newest iteration first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _ITER_DIR.fullmatch(p.name)),
                  key=_iteration, reverse=True)


def optimizer_shard_name(tp_rank: int, tp_size: int, dp_rank: int, dp_size: int) -> str:
    return f"tp{tp_rank}-of-{tp_size}.optim-dp{dp_rank}-of-{dp_size}.pt"


def save_checkpoint(out_dir, iter_num: int, state: dict, mesh, keep: int = 2,
                    optimizer_shard: dict = None) -> Path:
    """Saves this rank's `state` (model shard, optimizer shard, counters, config) as part of
    checkpoint iter_num and keeps the newest `keep` checkpoints. Every rank of the mesh must call it.
    optimizer_shard (zero=1/2): this DP rank's ShardedAdamW.shard_state_dict(); every DP rank
    writes its own file and the manifest records dp_size, so a load can merge them at any size."""
    root = Path(out_dir) / "ckpt"
    final = root / f"iter-{iter_num:07d}"
    tmp = root / f"iter-{iter_num:07d}.tmp"
    if mesh.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an interrupted save
        tmp.mkdir()
    _barrier()
    entry = None
    if mesh.dp_rank == 0:
        name = shard_name(mesh.tp_rank, mesh.tp_size)
        entry = (name, _atomic_write(state, tmp / name))
    entries = [entry]
    if optimizer_shard is not None:
        name = optimizer_shard_name(mesh.tp_rank, mesh.tp_size, mesh.dp_rank, mesh.dp_size)
        entries.append((name, _atomic_write(optimizer_shard, tmp / name)))
    entries = [e for rank_entries in _all_gather(entries) for e in rank_entries]  # also: all on disk
    if mesh.is_main:
        manifest = {"iter_num": iter_num, "tp_size": mesh.tp_size, "shards": dict(e for e in entries if e)}
        if optimizer_shard is not None:
            manifest["optimizer_dp_size"] = mesh.dp_size
        _write_text_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _write_text_atomic(root / LATEST, final.name)
        _fsync_dir(root)
        _prune(root, final, keep)
    _barrier()
    return final


def _prune(root: Path, newest: Path, keep: int):
    """Keeps `newest` and the keep - 1 checkpoints before it. Directories from later iterations
    belong to a run that was abandoned (resume fell back past them, or a new run from scratch
    reused out_dir) and go too, as does the debris of interrupted saves."""
    older = [p for p in _complete_checkpoints(root) if _iteration(p) < _iteration(newest)]
    keep_set = {newest} | set(older[:keep - 1])
    for path in root.iterdir():
        if path.is_dir() and path not in keep_set:
            shutil.rmtree(path, ignore_errors=True)


def _read_manifest(path: Path) -> dict:
    file = path / MANIFEST
    try:
        manifest = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(file)!r} is missing (an incomplete or pre-manifest checkpoint)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{str(file)!r} is unreadable ({type(e).__name__}: {e})") from None
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    well_formed = (isinstance(shards, dict) and isinstance(manifest.get("tp_size"), int) and manifest["tp_size"] >= 1
                   and all(isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
                           for e in shards.values()))
    if not well_formed:
        raise CheckpointError(f"{str(file)!r} is not a checkpoint manifest (expected tp_size and shards with "
                              f"bytes and sha256)")
    return manifest


def _verify_shard(path: Path, manifest: dict, tp_rank: int, tp_size: int, name: str = None) -> Path:
    name = name or shard_name(tp_rank, tp_size)
    file = path / name
    expected = manifest["shards"].get(name)
    if expected is None:
        raise CheckpointError(f"{str(path / MANIFEST)!r} lists no shard {name!r}")
    if not file.is_file():
        raise CheckpointError(f"shard {str(file)!r} is missing")
    size = file.stat().st_size
    if size != expected["bytes"]:
        raise CheckpointError(f"shard {str(file)!r} is {size:,} bytes, the manifest says {expected['bytes']:,} "
                              f"(truncated or overwritten)")
    if _sha256(file) != expected["sha256"]:
        raise CheckpointError(f"shard {str(file)!r} does not match its sha256 in the manifest (corrupted)")
    return file


def _candidates(root: Path) -> tuple:
    """(checkpoint directories to try in order, problems with the `latest` pointer)."""
    found = _complete_checkpoints(root)
    pointer = root / LATEST
    if not pointer.exists():
        return found, ([f"{str(pointer)!r} is missing"] if found else [])
    name = pointer.read_text().strip()
    if not name:
        return found, [f"{str(pointer)!r} is empty"]
    named = root / name
    if named not in found:
        return found, [f"{str(pointer)!r} names {name!r}, which is not a checkpoint directory in {str(root)!r}"]
    return [named] + [p for p in found if p != named], []


def _warn(text: str):
    print(f"checkpoint: warning: {text}", file=sys.stderr, flush=True)


def _load_file(file: Path, map_location) -> dict:
    try:
        return torch.load(file, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"shard {str(file)!r} could not be loaded ({type(e).__name__}: {e})") from None


def _open(out_dir, tp_ranks, tp_size, map_location):
    """The newest checkpoint whose shards for `tp_ranks` (None: all) verify on every rank:
    (directory, [loaded shard per rank in tp_ranks])."""
    root = Path(out_dir) / "ckpt"
    candidates, problems = _candidates(root)
    if not candidates:
        raise FileNotFoundError(f"no checkpoint in {str(root)!r} ("
                                + ("; ".join(problems) or "the file 'latest' is missing")
                                + "); train with init_from=scratch first or point out_dir at a run")
    for problem in problems:
        _warn(f"{problem}; looking for the newest complete checkpoint instead")
    for i, path in enumerate(candidates):
        files, problem = [], None
        try:
            manifest = _read_manifest(path)
            saved_tp = manifest["tp_size"]
            if tp_size is not None and saved_tp != tp_size:
                raise ConfigError(f"checkpoint {str(path)!r} was written with tp={saved_tp}; resume it with "
                                  f"tp={saved_tp} (got tp={tp_size}), or sample from it with lmkernels-sample, "
                                  f"which merges shards")
            ranks = range(saved_tp) if tp_ranks is None else tp_ranks
            files = [_verify_shard(path, manifest, r, saved_tp) for r in ranks]
            dp = manifest.get("optimizer_dp_size")
            if dp is not None and not (isinstance(dp, int) and dp >= 1):
                raise CheckpointError(f"{str(path / MANIFEST)!r}: optimizer_dp_size must be an integer >= 1")
            optim_files = [[_verify_shard(path, manifest, r, saved_tp, optimizer_shard_name(r, saved_tp, d, dp))
                            for d in range(dp)] if dp else [] for r in ranks]
        except CheckpointError as e:
            problem = str(e)
        if all_ranks_agree(problem is None):
            if i:
                _warn(f"using the older checkpoint {str(path)!r}")
            return path, [_with_optimizer(_load_file(f, map_location), o, map_location)
                          for f, o in zip(files, optim_files)]
        if problem:  # only the rank(s) that found the problem know it
            _warn(f"skipping checkpoint {str(path)!r}: {problem}")
    raise CheckpointError(f"no usable checkpoint in {str(root)!r}: every one is damaged (see the warnings "
                          f"above); start again with init_from=scratch or restore the files")


def _with_optimizer(state: dict, optim_files: list, map_location) -> dict:
    """A sharded checkpoint's (zero=1/2) optimizer files merged into one consolidated,
    FusedAdamW-style state dict under state["optimizer"] (loadable at any DP size)."""
    if optim_files:
        from lmkernels.distributed.sharded_adamw import consolidate

        shards = [_load_file(f, map_location) for f in optim_files]
        try:
            state["optimizer"] = consolidate(shards)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CheckpointError(f"the optimizer shards {[str(f) for f in optim_files]} do not fit together "
                                  f"({type(e).__name__}: {e})") from None
    return state


def open_checkpoint(out_dir, tp_rank: int = 0, tp_size: int = 1, map_location="cpu") -> tuple:
    """(directory, this TP rank's shard) of the newest checkpoint that verifies; see the module
    docstring. Raises ConfigError when it was written with another tp size."""
    path, (state,) = _open(out_dir, [tp_rank], tp_size, map_location)
    return path, state


def load_checkpoint(out_dir, tp_rank: int = 0, tp_size: int = 1, map_location="cpu") -> dict:
    """This TP rank's shard of the newest checkpoint that verifies."""
    return open_checkpoint(out_dir, tp_rank, tp_size, map_location)[1]


def latest_checkpoint(out_dir) -> Path:
    """The directory `latest` points at (not verified: open_checkpoint verifies)."""
    pointer = Path(out_dir) / "ckpt" / LATEST
    if not pointer.exists():
        raise FileNotFoundError(f"no checkpoint in {str(pointer.parent)!r} (the file 'latest' is missing)")
    return pointer.parent / pointer.read_text().strip()


def load_all_shards(out_dir, map_location="cpu") -> list:
    """Every TP rank's shard of the newest checkpoint that verifies, in rank order (one process)."""
    return _open(out_dir, None, None, map_location)[1]
