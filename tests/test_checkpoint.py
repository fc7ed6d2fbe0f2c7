"""Checkpoints: sha256 manifest, verification on load, fallback to the newest valid one with a
warning naming the bad file, pruning to keep_checkpoints, and a resume from the fallback that
repeats the uninterrupted run."""
import hashlib
import json

import pytest
import torch

from lmkernels.distributed.mesh import ParallelMesh
from lmkernels.train import checkpoint as ckpt_lib
from lmkernels.train.__main__ import main
from lmkernels.train.errors import CheckpointError
from lmkernels.train.metrics import read_metrics
from tests.test_train import _args, corpus  # noqa: F401  (corpus is a fixture)

MESH = ParallelMesh()


def _save(root, *iters, keep=2):
    for it in iters:
        ckpt_lib.save_checkpoint(root, it, {"w": torch.full((64,), float(it)), "iter_num": it}, MESH, keep=keep)


def _shard(root, it):
    return root / "ckpt" / f"iter-{it:07d}" / "tp0-of-1.pt"


def test_manifest_holds_each_shards_size_and_sha256(tmp_path):
    _save(tmp_path, 3)
    manifest = json.loads((tmp_path / "ckpt" / "iter-0000003" / "manifest.json").read_text())
    data = _shard(tmp_path, 3).read_bytes()
    assert manifest == {"iter_num": 3, "tp_size": 1,
                        "shards": {"tp0-of-1.pt": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}}


@pytest.mark.parametrize("keep, kept", [(1, [5]), (2, [4, 5]), (3, [3, 4, 5])])
def test_keeps_the_newest_keep_checkpoints(tmp_path, keep, kept):
    _save(tmp_path, 1, 2, 3, 4, 5, keep=keep)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [f"iter-{i:07d}" for i in kept] + ["latest"]


def test_a_save_after_a_fallback_drops_the_abandoned_later_checkpoints(tmp_path):
    _save(tmp_path, 10, 20, keep=3)
    _save(tmp_path, 15, keep=3)  # e.g. resumed from 10 because 20 was damaged
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter-0000010", "iter-0000015", "latest"]


def _flip_64_bytes(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, words", [
    ("flip", "does not match its sha256 in the manifest (corrupted)"),
    ("truncate", "bytes, the manifest says"),
    ("empty", "is 0 bytes, the manifest says"),
    ("delete", "is missing"),
])
def test_a_damaged_shard_falls_back_to_the_previous_checkpoint(tmp_path, capsys, damage, words):
    _save(tmp_path, 5, 10)
    bad = _shard(tmp_path, 10)
    if damage == "flip":
        _flip_64_bytes(bad)
    elif damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "empty":
        bad.write_bytes(b"")
    else:
        bad.unlink()
    path, state = ckpt_lib.open_checkpoint(tmp_path)
    assert path.name == "iter-0000005" and state["iter_num"] == 5 and torch.equal(state["w"], torch.full((64,), 5.0))
    err = capsys.readouterr().err
    assert f"skipping checkpoint {str(bad.parent)!r}: shard {str(bad)!r} " in err and words in err, err
    assert f"using the older checkpoint {str(path)!r}" in err


def test_no_valid_checkpoint_is_an_error_naming_the_file(tmp_path, capsys):
    _save(tmp_path, 5)
    _flip_64_bytes(_shard(tmp_path, 5))
    with pytest.raises(CheckpointError, match="no usable checkpoint in .*every one is damaged"):
        ckpt_lib.load_checkpoint(tmp_path)
    assert str(_shard(tmp_path, 5)) in capsys.readouterr().err


def test_garbage_that_matches_its_manifest_is_an_error_naming_the_file(tmp_path):
    """What torch.load cannot read is reported with the file, never as a raw unpickling error."""
    _save(tmp_path, 5)
    shard = _shard(tmp_path, 5)
    shard.write_bytes(b"this is not a checkpoint" * 10)
    manifest_path = shard.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["shards"]["tp0-of-1.pt"] = {"bytes": shard.stat().st_size,
                                         "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=f"shard '{shard}' could not be loaded"):
        ckpt_lib.load_checkpoint(tmp_path)


@pytest.mark.parametrize("damage", ["empty latest", "dangling latest", "missing latest", "missing manifest",
                                    "garbage manifest", "malformed manifest"])
def test_a_bad_pointer_or_manifest_falls_back_with_a_warning(tmp_path, capsys, damage):
    _save(tmp_path, 5, 10)
    root = tmp_path / "ckpt"
    if damage == "empty latest":
        (root / "latest").write_text("")
    elif damage == "dangling latest":
        (root / "latest").write_text("iter-0000077")
    elif damage == "missing latest":
        (root / "latest").unlink()
    elif damage == "missing manifest":
        (root / "iter-0000010" / "manifest.json").unlink()
    elif damage == "garbage manifest":
        (root / "iter-0000010" / "manifest.json").write_bytes(b"\x00\xff{")
    else:
        (root / "iter-0000010" / "manifest.json").write_text('{"tp_size": 1, "shards": {"tp0-of-1.pt": 7}}')
    state = ckpt_lib.load_checkpoint(tmp_path)
    assert state["iter_num"] == (5 if "manifest" in damage else 10)
    err = capsys.readouterr().err
    words = {"missing manifest": "manifest.json' is missing", "garbage manifest": "manifest.json' is unreadable",
             "malformed manifest": "manifest.json' is not a checkpoint manifest"}.get(damage, "latest'")
    assert "checkpoint: warning:" in err and words in err, err


def test_resume_after_a_corrupted_shard_repeats_the_uninterrupted_run(tmp_path, corpus, capsys):  # noqa: F811
    """The issue's repro: 64 flipped bytes in the newest shard. The resume falls back to the
    previous checkpoint with a warning naming the shard and then matches a straight run."""
    common = ("--eval_interval=2", "--sample_tokens=0", "--dropout=0.1")
    assert main(_args(tmp_path, corpus, "--max_iters=6", *common, f"--out_dir={tmp_path / 'straight'}")) == 0
    assert main(_args(tmp_path, corpus, "--max_iters=4", *common)) == 0
    bad = _shard(tmp_path / "out", 4)
    _flip_64_bytes(bad)
    capsys.readouterr()
    assert main(_args(tmp_path, corpus, "--max_iters=6", "--init_from=resume", *common)) == 0
    captured = capsys.readouterr()
    assert f"shard {str(bad)!r} does not match its sha256" in captured.err
    assert f"resumed from {tmp_path / 'out' / 'ckpt' / 'iter-0000002'} at iteration 2" in captured.out

    def losses(out):
        return {r["iter"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}

    assert losses(tmp_path / "out") == losses(tmp_path / "straight")
