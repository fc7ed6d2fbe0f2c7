"""CPU benchmark: the trainer with --pack_documents=true vs false, on the default corpus.

Same config as bench/bench_train.py (4 layers, 4 heads, 128 wide, block 64, batch 12, byte
vocabulary, fp32), same seed, same steps: both see the same token windows (packing only adds
the document layout: attention within documents through lmkernels.attention_varlen, positions
restarting per document, no target predicted across a document boundary). The two run
alternately, `rounds` times each, in one process; the table reports the median time per
iteration, tokens/s, their ratio, and each run's final validation loss (its own evaluation:
the packed run's skips the targets that begin a document: 156 documents in 4.3M tokens of the
default corpus, so packing changes under 0.01% of its targets and windows at block 64, and this
measures packing's cost more than its effect on the loss). Whole runs alternate, so a load change
on a shared machine between runs moves their ratio; the second table removes that: one model's
forward + backward on the same batches, packed and unpacked alternating step by step
(bench/_timing.alternate), the number to decide the default by.

    PYTHONPATH=. python3 bench/bench_pack.py [--iters 200] [--rounds 2] [--model gpt|llama] [--write FILE]
"""
import argparse
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch

from bench._timing import alternate, report
from lmkernels.train import TrainConfig, train
from lmkernels.train.data import BatchSampler, prepare_data
from lmkernels.train.metrics import read_metrics
from lmkernels.train.models import build_model, model_args_from_config

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)  # bench/bench_train.py's
MODES = {"unpacked": False, "packed": True}


def train_config(iters: int, out_dir: str, pack_documents: bool, model: str, eval_iters: int) -> TrainConfig:
    # explicit threads: the trainer's automatic choice could differ between the two runs
    return TrainConfig(**CONFIG, model=model, pack_documents=pack_documents, threads=torch.get_num_threads(),
                       max_iters=iters, eval_interval=10 ** 9, eval_iters=eval_iters, log_interval=10 ** 9,
                       sample_tokens=0, out_dir=out_dir)


def compare(iters: int, rounds: int, model: str = "gpt", warmup: int = 10, eval_iters: int = 20) -> dict:
    times = {name: [] for name in MODES}
    val_loss = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for name, packed in MODES.items():
                out = f"{tmp}/{name}"
                records = train(train_config(iters, out, packed, model, eval_iters))
                times[name] += [rec["dt_ms"] for rec in records[warmup:]]
                evals = [r for r in read_metrics(Path(out) / "metrics.jsonl") if r["kind"] == "eval"]
                val_loss.setdefault(name, evals[-1]["val_loss"])  # the same in every round (deterministic)
    tokens = CONFIG["batch_size"] * CONFIG["block_size"]
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(model=model, iters=iters, rounds=rounds, ms=ms, val_loss=val_loss,
                tokens_per_s={n: 1000 * tokens / v for n, v in ms.items()}, ratio=ms["unpacked"] / ms["packed"])


def step_times(model: str, reps: int = 30, batches: int = 8) -> dict:
    """Median seconds of one forward + backward, unpacked and packed, alternating step by step
    over the same `batches` training batches of the default corpus."""
    cfg = train_config(1, "unused", False, model, 1)
    data = prepare_data(cfg.data, cfg.tokenizer, cfg.val_fraction, verbose=False)
    torch.manual_seed(cfg.seed)
    net = build_model(model_args_from_config(cfg, data.vocab_size))
    sampler = BatchSampler(data, cfg.block_size, cfg.batch_size, cfg.seed)
    packed = [sampler.get_batch("train", i, packed=True) for i in range(batches)]
    unpacked = [sampler.get_batch("train", i) for i in range(batches)]
    counter = {"unpacked": 0, "packed": 0}

    def step(name):
        i = counter[name] = counter[name] + 1
        x, y, *layout = (packed if name == "packed" else unpacked)[i % batches]
        _, loss = net(x, y, **(dict(packing=layout[0]) if layout else {}))
        loss.backward()
        net.zero_grad(set_to_none=True)

    return alternate({name: (lambda name=name: step(name)) for name in MODES}, reps)


def table(result: dict) -> str:
    rows = [f"| --pack_documents | ms / iteration (median) | tokens/s | val loss after {result['iters']} iterations |",
            "|---|---:|---:|---:|"]
    for name, packed in MODES.items():
        rows.append(f"| {str(packed).lower()} | {result['ms'][name]:.1f} | {result['tokens_per_s'][name]:,.0f} | "
                    f"{result['val_loss'][name]:.4f} |")
    rows.append(f"\npacked / unpacked tokens/s, whole runs: {result['ratio']:.3f}x")
    steps = result["step_s"]
    rows += ["", "| --pack_documents | forward + backward, ms (median, alternating per step) |", "|---|---:|"]
    rows += [f"| {str(packed).lower()} | {1000 * steps[name]:.1f} |" for name, packed in MODES.items()]
    rows.append(f"\n**packed / unpacked speed, step by step: {steps['unpacked'] / steps['packed']:.3f}x**")
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration, subprocess.SubprocessError):
        return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default="gpt", choices=("gpt", "llama"), help="the trainer's --model")
    parser.add_argument("--step_reps", type=int, default=30, help="alternating steps timed for the second table")
    parser.add_argument("--write", default=None, help="also write the markdown to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = compare(args.iters, args.rounds, args.model)
    result["step_s"] = step_times(args.model, args.step_reps)
    md = (f"## Packed vs unpacked training, CPU, model={args.model}\n\n{cpu_model()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; config {CONFIG}, fp32, default corpus (byte tokenizer, one "
          f"document per file); {args.rounds} alternating rounds of {args.iters} iterations each.\n\n"
          f"{table(result)}\n")
    report(md, args.write)


if __name__ == "__main__":
    main()
