"""The trainer and sampler on bad input and faults: every case ends with one clear error line
(rc 2 for the user's input, rc 1 for a run that cannot go on), never a traceback, a hang or a
silently wrong run. Training runs are tiny (a few iterations of a 1-layer model)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmkernels.train import checkpoint as ckpt_lib
from lmkernels.train.__main__ import main
from lmkernels.train.config import ConfigError, TrainConfig, validate
from lmkernels.train.data import prepare_data
from lmkernels.train.sample import main as sample_main
from tests.test_train import ROOT, TINY, _args, corpus  # noqa: F401  (corpus is a fixture)


@pytest.mark.parametrize("option", ["--learning_rate=inf", "--learning_rate=nan", "--grad_clip=nan",
                                    "--weight_decay=nan", "--min_lr=nan", "--beta2=-inf", "--dropout=nan",
                                    "--val_fraction=inf", "--peak_flops=nan", "--dist_timeout=inf"])
def test_non_finite_float_options_are_refused(tmp_path, corpus, capsys, option):  # noqa: F811
    name, value = option[2:].split("=")
    assert main(_args(tmp_path, corpus, "--max_iters=1", "--sample_tokens=0", option)) == 2
    assert f"lmkernels-train: error: {name} must be a finite number; got {value}" in capsys.readouterr().err


@pytest.mark.parametrize("option, words", [
    ("--dist_timeout=0", "dist_timeout must be > 0 seconds; got 0.0"),
    ("--peak_flops=-1", "peak_flops must be >= 0; got -1.0"),
    ("--keep_checkpoints=0", "keep_checkpoints must be >= 1; got 0"),
    ("--max_nonfinite_steps=-1", "max_nonfinite_steps must be >= 0; got -1"),
])
def test_new_options_are_range_checked(tmp_path, corpus, capsys, option, words):  # noqa: F811
    assert main(_args(tmp_path, corpus, "--max_iters=1", "--sample_tokens=0", option)) == 2
    assert f"lmkernels-train: error: {words}" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, words", [
    (dict(learning_rate="abc"), "learning_rate must be a number; got 'abc' (str)"),
    (dict(n_layer=2.5), "n_layer must be an integer; got 2.5 (float)"),
    (dict(max_iters=True), "max_iters must be an integer; got True (bool)"),
    (dict(data="corpus.txt"), "data must be a list of paths (strings); got 'corpus.txt' (str)"),
    (dict(bias="no"), "bias must be True or False; got 'no' (str)"),
])
def test_a_config_built_in_python_gets_its_types_checked(kwargs, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        validate(TrainConfig(**kwargs))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("content, words", [
    (b"", "contain no text"),
    (b"x", "1 token(s) in all"),
    (bytes(range(256)) * 40, "is a binary file (it contains NUL bytes)"),
    # Latin-1: 4 of every 19 bytes are accented letters, invalid as UTF-8
    ("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e. ".encode("latin-1") * 200, "is not UTF-8 text: 21.1% of its bytes"),
    (b"def f(x):\n    return x\n", "block_size 16 needs at least 18 per rank"),
], ids=["empty", "one-byte", "binary", "latin-1", "shorter-than-block_size"])
def test_unusable_data_files_are_refused(tmp_path, capsys, content, words):
    data = _write(tmp_path / "data.txt", content)
    assert main(_args(tmp_path, data, "--max_iters=1", "--sample_tokens=0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmkernels-train: error: data: ") and words in err, err
    if content:
        assert repr(str(data)) in err or "split has" in err


def test_a_few_invalid_utf8_bytes_warn_with_their_share(tmp_path, capsys):
    text = "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)).encode()
    data = _write(tmp_path / "data.txt", text[:1000] + b"\xff\xfe" + text[1000:])
    assert main(_args(tmp_path, data, "--max_iters=1", "--eval_iters=1", "--sample_tokens=0")) == 0
    assert f"data: warning: {str(data)!r}: 2 bytes (0.0" in capsys.readouterr().out


def test_block_size_longer_than_the_data(tmp_path, corpus, capsys):  # noqa: F811
    assert main(_args(tmp_path, corpus, "--max_iters=1", "--block_size=100000")) == 2
    assert "block_size 100000 needs at least 100002 per rank: give more text or a smaller block_size" in \
        capsys.readouterr().err


def test_out_dir_that_is_a_file(tmp_path, corpus, capsys):  # noqa: F811
    taken = _write(tmp_path / "taken", b"x")
    for out in (taken, taken / "sub"):
        assert main(TINY + [f"--data={corpus}", f"--out_dir={out}", "--max_iters=1"]) == 2
        assert f"out_dir {str(out)!r}: {str(taken)!r} exists and is not a directory" in capsys.readouterr().err


def test_resume_says_which_checkpoint_values_override_the_command_line(tmp_path, corpus, capsys):  # noqa: F811
    assert main(_args(tmp_path, corpus, "--max_iters=2", "--eval_interval=2", "--sample_tokens=0")) == 0
    capsys.readouterr()
    assert main(_args(tmp_path, corpus, "--max_iters=3", "--eval_interval=2", "--sample_tokens=0",
                      "--init_from=resume", "--n_layer=5", "--n_embd=32")) == 0
    out = capsys.readouterr().out
    assert "the checkpoint's model settings override the command line: n_layer=1 (command line: 5), " \
           "n_embd=16 (command line: 32)" in out


def test_resume_with_another_tp_is_a_clear_error(tmp_path, corpus, capsys):  # noqa: F811
    from lmkernels.distributed.mesh import ParallelMesh

    out = tmp_path / "out"
    ckpt_lib.save_checkpoint(out, 4, {"iter_num": 4}, ParallelMesh(tp_size=2))  # rank 0's shard of a tp=2 run
    assert main(_args(tmp_path, corpus, "--max_iters=6", "--init_from=resume")) == 2
    assert f"checkpoint {str(out / 'ckpt' / 'iter-0000004')!r} was written with tp=2; resume it with tp=2 " \
           f"(got tp=1)" in capsys.readouterr().err


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, corpus, capsys):  # noqa: F811
    common = ("--eval_interval=2", "--sample_tokens=0", "--warmup_iters=0", "--decay_lr=false")
    assert main(_args(tmp_path, corpus, "--max_iters=4", *common)) == 0
    good = ckpt_lib.load_checkpoint(tmp_path / "out")["model"]
    capsys.readouterr()
    # learning_rate 1e30 is finite, so allowed; one step makes the weights ~1e30 and the next loss NaN
    assert main(_args(tmp_path, corpus, "--max_iters=20", "--init_from=resume", "--learning_rate=1e30",
                      "--min_lr=0", *common)) == 1
    err = capsys.readouterr().err
    assert "lmkernels-train: error: iteration 5: the loss is nan (1 non-finite step(s) in a row, " \
           "max_nonfinite_steps=0); stopped before updating the weights. The last good checkpoint is " \
           f"{tmp_path / 'out' / 'ckpt' / 'iter-0000004'}" in err, err
    assert sorted(p.name for p in (tmp_path / "out" / "ckpt").iterdir()) == ["iter-0000002", "iter-0000004", "latest"]
    kept = ckpt_lib.load_checkpoint(tmp_path / "out")["model"]
    assert all(torch.equal(kept[k], good[k]) for k in good)


def test_skipped_nan_steps_never_reach_a_checkpoint(tmp_path, corpus, capsys):  # noqa: F811
    common = ("--eval_interval=2", "--sample_tokens=0", "--warmup_iters=0", "--decay_lr=false")
    assert main(_args(tmp_path, corpus, "--max_iters=2", *common)) == 0
    capsys.readouterr()
    assert main(_args(tmp_path, corpus, "--max_iters=20", "--init_from=resume", "--learning_rate=1e30",
                      "--min_lr=0", "--max_nonfinite_steps=5", *common)) == 1
    captured = capsys.readouterr()
    assert "iter 3: loss is nan; step skipped (1 in a row, max_nonfinite_steps=5)" in captured.out
    assert "iteration 4: the weights or evaluation losses" in captured.err and "no checkpoint written. The " \
           f"last good checkpoint is {tmp_path / 'out' / 'ckpt' / 'iter-0000002'}" in captured.err
    assert ckpt_lib.latest_checkpoint(tmp_path / "out").name == "iter-0000002"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished tiny run to sample from."""
    tmp = tmp_path_factory.mktemp("trained")
    data = _write(tmp / "corpus.txt", "".join(f"def f{i}(x):\n    return x * {i}\n\n" for i in range(300)).encode())
    assert main(_args(tmp, data, "--max_iters=2", "--eval_interval=2", "--sample_tokens=0")) == 0
    return tmp / "out"


@pytest.mark.parametrize("option, words", [
    ("--top_k=0", "top_k must be >= 1 (leave it out to sample among all tokens); got 0"),
    ("--temperature=-1", "temperature must be a finite number >= 0 (0: greedy); got -1.0"),
    ("--temperature=nan", "temperature must be a finite number >= 0 (0: greedy); got nan"),
])
def test_sampler_options_are_checked(trained, capsys, option, words):
    with pytest.raises(SystemExit) as exit_info:
        sample_main([f"--out_dir={trained}", "--max_new_tokens=3", option])
    assert exit_info.value.code == 2 and words in capsys.readouterr().err


def test_sampler_temperature_zero_is_greedy(trained, capsys):
    outs = []
    for seed in (1, 2):
        assert sample_main([f"--out_dir={trained}", "--max_new_tokens=12", "--temperature=0", f"--seed={seed}"]) == 0
        outs.append(capsys.readouterr().out)
    assert sample_main([f"--out_dir={trained}", "--max_new_tokens=12", "--top_k=1", "--seed=3"]) == 0
    assert outs[0] == outs[1] == capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without a GPU")
def test_sampler_cuda_without_a_gpu(trained, capsys):
    assert sample_main([f"--out_dir={trained}", "--device=cuda"]) == 2
    assert "lmkernels-sample: error: device='cuda' but torch sees no CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("damage, words", [
    ("empty latest", "latest' is empty"),
    ("dangling latest", "names 'iter-0000099', which is not a checkpoint directory"),
    ("missing shard", "tp0-of-1.pt' is missing"),
])
def test_sampler_on_a_damaged_checkpoint(trained, tmp_path, capsys, damage, words):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(trained, out)
    root = out / "ckpt"
    if damage == "empty latest":
        (root / "latest").write_text("")
        shutil.rmtree(root / "iter-0000002")
    elif damage == "dangling latest":
        (root / "latest").write_text("iter-0000099")
        shutil.rmtree(root / "iter-0000002")
    else:
        (root / "iter-0000002" / "tp0-of-1.pt").unlink()
    assert sample_main([f"--out_dir={out}", "--max_new_tokens=3"]) == 2
    err = capsys.readouterr().err
    assert "lmkernels-sample: error:" in err and words in err, err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_stopped_rank_makes_the_others_exit_naming_the_wait_and_the_peer(tmp_path, corpus):  # noqa: F811
    """2 processes (gloo): SIGSTOP rank 1 mid-run; rank 0 must exit soon after dist_timeout with a
    message naming its wait and rank 1, not hang."""
    prepare_data([str(corpus)], "byte", 0.1, tmp_path / "cache", verbose=False)  # both ranks reuse it
    port = _free_port()
    options = ("--max_iters=100000", "--eval_interval=1000", "--dist_timeout=4", "--sample_tokens=0",
               "--peak_flops=1e9")  # no FLOP/s measurement at start-up
    cmd = [sys.executable, "-m", "lmkernels.train", *_args(tmp_path, corpus, *options)]
    procs = []
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2")
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.time() + 120
        while not (metrics.exists() and sum(1 for line in metrics.read_text().splitlines()
                                            if json.loads(line)["kind"] == "train") >= 2):
            if time.time() > deadline or any(p.poll() is not None for p in procs):
                for p in procs:
                    p.kill()
                pytest.fail(f"the 2-process run never trained: {procs[0].communicate()[1].decode()}")
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGSTOP)
        stopped = time.time()
        rc = procs[0].wait(timeout=60)
        waited = time.time() - stopped
    finally:
        for p in procs:
            p.kill()
            p.wait()
    err = procs[0].stderr.read().decode()
    assert rc == 1 and 4 <= waited < 30, (rc, waited, err)
    assert "lmkernels-train: error: rank 0 waited more than dist_timeout=4 s in " in err, err
    assert "not responding (stopped or hung): rank 1 (last at: " in err, err
    assert "Traceback" not in err, err
