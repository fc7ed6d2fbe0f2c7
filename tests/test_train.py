"""The trainer in one process: options, data, schedule, checkpoints, kill-and-resume, sampling."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lmkernels.train import checkpoint as ckpt_lib
from lmkernels.train.__main__ import main
from lmkernels.train.config import ConfigError, TrainConfig, parse_args, validate
from lmkernels.train.data import BatchSampler, ByteTokenizer, default_corpus_files, prepare_data
from lmkernels.train.loop import get_lr
from lmkernels.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4", "--eval_iters=2",
        "--log_interval=5"]


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(600)))
    return path


def _args(tmp_path, corpus, *extra):
    return TINY + [f"--data={corpus}", f"--data_cache={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}",
                   *extra]


def test_options_take_nanogpt_names_and_forms():
    cfg = parse_args(["--n_layer=3", "n_head=2", "--n_embd", "64", "--dropout=0.1", "--bias=false",
                      "--init_from=resume", "--data", "a.txt", "b"])
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias) == (3, 2, 64, 0.1, False)
    assert cfg.init_from == "resume" and cfg.data == ["a.txt", "b"]
    names = set(TrainConfig.__dataclass_fields__)
    nanogpt = ("n_layer n_head n_embd block_size batch_size max_iters learning_rate min_lr warmup_iters "
               "lr_decay_iters weight_decay beta1 beta2 grad_clip dropout eval_interval eval_iters "
               "gradient_accumulation_steps dtype device seed out_dir init_from data tokenizer").split()
    assert not set(nanogpt) - names


@pytest.mark.parametrize("argv, world, words", [
    (["--n_embd=100", "--n_head=3"], 1, "n_embd (100) must be divisible by n_head (3)"),
    (["--n_head=6", "--n_embd=48", "--tp=4"], 4, "tp (4) must divide n_head (6)"),
    (["--n_head=4", "--tp=2"], 3, "tp (2) must divide the number of processes (3)"),
    (["--n_head=4", "--n_embd=40"], 1, "head size n_embd / n_head = 10 must be a multiple of 8"),
    (["--tokenizer=word"], 1, "tokenizer must be 'byte' or 'char'"),
    (["--init_from=gpt2"], 1, "init_from must be 'scratch' or 'resume'"),
    (["--min_lr=1", "--learning_rate=0.1"], 1, "min_lr <= learning_rate"),
])
def test_bad_options_are_named(argv, world, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate(parse_args(argv), world)


def test_bad_values_and_missing_data_give_messages(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--n_layer=two"])
    assert "invalid int value: 'two'" in capsys.readouterr().err
    missing = tmp_path / "no-such.txt"
    assert main([f"--data={missing}", f"--out_dir={tmp_path}"]) == 2
    assert f"data: '{missing}' does not exist" in capsys.readouterr().err
    assert main([f"--out_dir={tmp_path / 'empty'}", "--init_from=resume"] + TINY) == 2
    assert "no checkpoint in" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [get_lr(i, cfg) for i in range(120)]
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[110:] == [0.1] * 10


def test_data_cache_split_and_disjoint_deterministic_shards(tmp_path, corpus):
    data = prepare_data([str(corpus)], "byte", 0.1, tmp_path / "cache", verbose=False)
    text = corpus.read_text()
    assert ByteTokenizer().decode(np.concatenate([data.train, data.val])) == text
    assert len(data.val) == int(len(text) * 0.1)
    again = prepare_data([str(corpus)], "byte", 0.1, tmp_path / "cache", verbose=False)
    assert again.train.filename == data.train.filename  # the cache is reused
    chars = prepare_data([str(corpus)], "char", 0.1, tmp_path / "cache", verbose=False)
    assert chars.vocab_size == len(set(text)) and chars.tokenizer.decode(chars.train[:50]) == text[:50]
    ranks = [BatchSampler(data, 16, 8, seed=3, dp_rank=r, dp_size=2) for r in range(2)]
    x0, y0 = ranks[0].get_batch("train", 7, 1)
    torch.testing.assert_close(x0, ranks[0].get_batch("train", 7, 1)[0], rtol=0, atol=0)
    torch.testing.assert_close(x0[:, 1:], y0[:, :-1], rtol=0, atol=0)
    assert not torch.equal(x0, ranks[0].get_batch("train", 8, 1)[0])
    half = len(data.train) // 2  # each DP rank owns a contiguous half of the split
    assert np.array_equal(ranks[0].shards["train"], data.train[:half])
    assert np.array_equal(ranks[1].shards["train"], data.train[half:2 * half])
    assert not torch.equal(x0, ranks[1].get_batch("train", 7, 1)[0])
    with pytest.raises(ValueError, match="block_size 100000 needs at least"):
        BatchSampler(data, 100000, 1, seed=0)


def test_default_corpus_is_deterministic_stdlib_text(tmp_path):
    files = default_corpus_files()
    assert files == default_corpus_files()
    assert all(f.suffix == ".py" for f in files)
    total = sum(f.stat().st_size for f in files)
    assert 4 * 2 ** 20 <= total < 5 * 2 ** 20
    assert not any("test" in f.parts for f in files)


def test_default_corpus_trains_and_samples(tmp_path, capsys):
    """The quick start's path (no data given), shortened: tokenizes the standard library,
    trains, writes metrics and prints a sample."""
    argv = TINY + [f"--data_cache={tmp_path / 'cache'}", f"--out_dir={tmp_path / 'out'}", "--max_iters=4",
                   "--eval_interval=4", "--sample_tokens=20"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "data: tokenized" in out and "sample:" in out and "tok/s" in out and "mfu" in out
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["iter"] for r in records if r["kind"] == "train"] == [0, 1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records if r["kind"] == "train")


def test_loss_goes_down_and_sample_cli(tmp_path, corpus, capsys):
    assert main(_args(tmp_path, corpus, "--max_iters=60", "--eval_interval=30", "--learning_rate=1e-2",
                      "--sample_tokens=0")) == 0
    records = read_metrics(tmp_path / "out" / "metrics.jsonl")
    val = [r["val_loss"] for r in records if r["kind"] == "eval"]
    assert val[0] > math.log(256) - 0.2 and val[-1] < val[0] - 1.5, val
    out = capsys.readouterr().out
    try:
        import matplotlib  # noqa: F401  (optional: the plot is skipped with a note without it)
    except ImportError:
        assert "pip install matplotlib" in out
    else:
        png = (tmp_path / "out" / "loss.png").read_bytes()
        assert png.startswith(b"\x89PNG") and f"loss curve: {tmp_path / 'out' / 'loss.png'}" in out
    from lmkernels.train.sample import main as sample_main

    assert sample_main([f"--out_dir={tmp_path / 'out'}", "--max_new_tokens=30", "--start=def "]) == 0
    assert capsys.readouterr().out.startswith("def ")


def test_interrupted_checkpoint_write_keeps_the_previous(tmp_path, monkeypatch):
    from lmkernels.distributed.mesh import ParallelMesh

    mesh = ParallelMesh()
    state = {"w": torch.arange(5.0), "iter_num": 5, "tp_size": 1}
    ckpt_lib.save_checkpoint(tmp_path, 5, state, mesh)

    def crash(obj, f):  # dies half-way through writing the new shard
        f.write(b"partial")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt_lib.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt_lib.save_checkpoint(tmp_path, 10, {"w": torch.zeros(5), "iter_num": 10, "tp_size": 1}, mesh)
    monkeypatch.undo()
    assert ckpt_lib.latest_checkpoint(tmp_path).name == "iter-0000005"
    loaded = ckpt_lib.load_checkpoint(tmp_path)
    assert loaded["iter_num"] == 5 and torch.equal(loaded["w"], torch.arange(5.0))
    ckpt_lib.save_checkpoint(tmp_path, 10, {"w": torch.ones(5), "iter_num": 10, "tp_size": 1}, mesh)
    assert ckpt_lib.load_checkpoint(tmp_path)["iter_num"] == 10  # debris of the crash cleaned up
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["iter-0000005", "iter-0000010", "latest"]


def _train_cmd(tmp_path, corpus, out, *extra):
    return [sys.executable, "-m", "lmkernels.train", *TINY, f"--data={corpus}", f"--data_cache={tmp_path / 'cache'}",
            f"--out_dir={out}", "--eval_interval=5", "--lr_decay_iters=30", "--warmup_iters=3",
            "--sample_tokens=0", "--dropout=0.1", *extra]


def _losses(out):
    return {r["iter"]: r["loss"] for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "train"}


def test_kill_and_resume_repeats_the_losses(tmp_path, corpus):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = lambda *a: subprocess.run(_train_cmd(tmp_path, corpus, *a), env=env, cwd=ROOT, capture_output=True,  # noqa: E731
                                    text=True, timeout=120)
    done = run(tmp_path / "straight", "--max_iters=20")
    assert done.returncode == 0, done.stderr
    # a long run, killed (SIGKILL) once it has checkpointed and gone on a little
    victim = subprocess.Popen(_train_cmd(tmp_path, corpus, tmp_path / "killed", "--max_iters=100000"), env=env,
                              cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            metrics = tmp_path / "killed" / "metrics.jsonl"
            if (tmp_path / "killed" / "ckpt" / "latest").exists() and metrics.exists() and max(
                    [json.loads(line)["iter"] for line in metrics.read_text().splitlines()] or [0]) >= 12:
                break
            assert victim.poll() is None, victim.stderr.read().decode()
            time.sleep(0.05)
        else:
            pytest.fail("the run never checkpointed")
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    start = ckpt_lib.load_checkpoint(tmp_path / "killed")["iter_num"]
    assert start >= 10  # a second checkpoint: the first one's save must not have disturbed the optimizer
    resumed = run(tmp_path / "killed", "--max_iters=20", "--init_from=resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"at iteration {start}" in resumed.stdout
    straight, after = _losses(tmp_path / "straight"), _losses(tmp_path / "killed")
    assert [after[i] for i in range(start, 20)] == [straight[i] for i in range(start, 20)]
    assert [after[i] for i in range(start)] == [straight[i] for i in range(start)]


@pytest.mark.parametrize("rotary", [False, True])
def test_gpt_is_causal_and_tied(rotary):
    from lmkernels.models import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=2, n_head=2, n_embd=16, rotary=rotary))
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 40, (2, 11))
    logits, loss = model.logits(idx), model(idx, idx)[1]
    assert logits.shape == (2, 11, 40) and math.isfinite(loss.item())
    changed = idx.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 40  # the future must not leak into positions < 7
    torch.testing.assert_close(model.logits(changed)[:, :7], logits[:, :7], rtol=0, atol=0)
    assert not torch.equal(model.logits(changed)[:, 7:], logits[:, 7:])
    with pytest.raises(ValueError, match="exceeds block_size 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    assert model.generate(idx[:1, :3], 5).shape == (1, 8)
