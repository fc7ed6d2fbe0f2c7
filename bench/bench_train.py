"""CPU benchmark: tokens/s of lmkernels-train vs an eager PyTorch reference of the same model.

Config (issue #5): 4 layers, 4 heads, 128 wide, block 64, batch 12, byte vocabulary (256),
fp32, the default corpus. Both start from the same weights (same seed) and see the same
batches; the reference is the same GPT with torch's scaled_dot_product_attention in place of
lmkernels.attention, torch.optim.AdamW (its default implementation on CPU) and
torch.nn.utils.clip_grad_norm_, in a plain eager loop. Ours is the trainer itself
(lmkernels.train.train), whose per-iteration timings exclude evaluation. With --model llama both
train the same Llama (same config names mapped by lmkernels.train.models); the reference swaps
every lmkernels op the Llama calls (rms_norm, add_rms_norm, rotary_embedding, swiglu,
attention, fused_linear_cross_entropy) for its eager PyTorch composition. The two run
alternately in segments of the same length, and the table reports median time per
iteration, tokens/s, their ratio, and the mean loss of the last iterations of each.

    PYTHONPATH=. python3 bench/bench_train.py [--iters 200] [--rounds 2] [--write bench/results/train-cpu.md]
    PYTHONPATH=. python3 bench/bench_train.py --model llama [--write bench/results/train-llama-cpu.md]
    PYTHONPATH=. python3 -m pytest bench/bench_train.py --benchmark-only   # one iteration each
    PYTHONPATH=. python3 bench/bench_train.py --model llama --breakdown [--rounds 8] [--threads 1]

--breakdown times one training step of each side per phase (forward, backward, gradient clip +
optimizer step) in thread CPU time, which a machine shared with other jobs disturbs far less
than wall clock (with --threads 1 the step runs on this thread alone), in alternating segments
of 5 steps; and lists the top ops by self time under torch.profiler, ours next to eager. Ours
there is the trainer's model, clip (tp_utils.clip_grad_norm_) and optimizer (FusedAdamW) driven
by the same plain loop as the reference, not the trainer's loop itself.
"""
import argparse
import collections
import contextlib
import platform
import statistics
import tempfile
import time

import torch
from torch.profiler import profile

import lmkernels
from bench._timing import report
from lmkernels.train import TrainConfig, train
from lmkernels.train.data import BatchSampler, prepare_data
from lmkernels.distributed import tp_utils
from lmkernels.train.loop import get_lr, make_optimizer
from lmkernels.train.models import build_model, model_args_from_config

CONFIG = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12)


def _sdpa(q, k, v, *, is_causal=False, scale=None, **_):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def _sdpa_gqa(q, k, v, *, is_causal=False, scale=None, **_):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale,
                                                            enable_gqa=k.size(1) != q.size(1))


def _rms_norm(x, weight, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def _add_rms_norm(x, residual, weight, eps=1e-6):
    total = x + residual
    return _rms_norm(total, weight, eps), total


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotary(q, k, cos, sin, *, interleaved=False):
    return ((q * cos + _rotate_half(q) * sin).to(q.dtype), (k * cos + _rotate_half(k) * sin).to(k.dtype))


def _swiglu(gate, up):
    return torch.nn.functional.silu(gate) * up


def _linear_cross_entropy(hidden, weight, target, *, bias=None, ignore_index=-100, **_):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=ignore_index)


EAGER = {
    "gpt": dict(attention=_sdpa, fused_linear_cross_entropy=_linear_cross_entropy),
    "llama": dict(attention=_sdpa_gqa, rms_norm=_rms_norm, add_rms_norm=_add_rms_norm, rotary_embedding=_rotary,
                  swiglu=_swiglu, fused_linear_cross_entropy=_linear_cross_entropy),
}


@contextlib.contextmanager
def torch_attention(model: str = "gpt"):
    """The reference model: the same model with eager PyTorch in place of the lmkernels ops
    (for GPT, SDPA as its attention and the eager head + F.cross_entropy as its loss)."""
    real = {name: getattr(lmkernels, name) for name in EAGER[model]}
    for name, fn in EAGER[model].items():
        setattr(lmkernels, name, fn)
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(lmkernels, name, fn)


def train_config(iters: int, out_dir: str, **extra) -> TrainConfig:
    # the reference's thread count, explicitly (the trainer's automatic choice could differ)
    return TrainConfig(**CONFIG, threads=torch.get_num_threads(), max_iters=iters, eval_interval=10 ** 9, eval_iters=1, log_interval=10 ** 9,
                       sample_tokens=0, out_dir=out_dir, **extra)


class Reference:
    """Eager PyTorch: same model, SDPA, torch.optim.AdamW, torch's clip_grad_norm_.
    With ours=True (--breakdown only): the lmkernels ops, FusedAdamW and the trainer's clip."""

    def __init__(self, cfg: TrainConfig, ours: bool = False):
        self.cfg, self.ours = cfg, ours
        self.data = prepare_data(cfg.data, cfg.tokenizer, cfg.val_fraction, verbose=False)
        torch.manual_seed(cfg.seed)  # the trainer's initialization
        self.model = build_model(model_args_from_config(cfg, self.data.vocab_size))
        groups = self.model.configure_optimizer_groups(cfg.weight_decay)
        self.optimizer = make_optimizer(groups, cfg) if ours else torch.optim.AdamW(
            groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        self.sampler = BatchSampler(self.data, cfg.block_size, cfg.batch_size, cfg.seed)

    def step(self, it: int, clock=None) -> float:
        """One iteration; with clock, returns (forward, backward, clip + step) times instead."""
        for group in self.optimizer.param_groups:
            group["lr"] = get_lr(it, self.cfg)
        x, y = self.sampler.get_batch("train", it)
        t0 = clock() if clock else 0.0
        with contextlib.nullcontext() if self.ours else torch_attention(self.cfg.model):
            _, loss = self.model(x, y)
        t1 = clock() if clock else 0.0
        loss.backward()
        t2 = clock() if clock else 0.0
        if self.ours:
            tp_utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        else:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return (t1 - t0, t2 - t1, clock() - t2) if clock else loss.item()

    def run(self, iters: int) -> list:
        records = []
        for it in range(iters):
            t0 = time.perf_counter()
            loss = self.step(it)
            records.append(dict(iter=it, loss=loss, dt_ms=1000 * (time.perf_counter() - t0)))
        return records


def compare(iters: int, rounds: int, compiled: bool = False, warmup: int = 10, tail: int = 20,
            model: str = "gpt") -> dict:
    names = ["ours", "reference"] + (["ours_compiled"] if compiled else [])
    times = {name: [] for name in names}
    losses = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = train_config(iters, tmp, model=model)
        for r in range(rounds):
            for name in names:
                if name == "ours":
                    records = train(cfg)
                elif name == "ours_compiled":  # the first iterations (compilation) are skipped below
                    records = train(train_config(iters, tmp, compile=True, model=model))
                else:
                    records = Reference(cfg).run(iters)
                times[name] += [rec["dt_ms"] for rec in records[warmup:]]
                losses.setdefault(name, statistics.fmean(rec["loss"] for rec in records[-tail:]))
    tokens = CONFIG["batch_size"] * CONFIG["block_size"]
    ms = {name: statistics.median(t) for name, t in times.items()}
    return dict(model=model, ms=ms, tokens_per_s={n: 1000 * tokens / v for n, v in ms.items()}, losses=losses,
                ratio=ms["reference"] / ms["ours"], iters=iters, rounds=rounds, tail=tail,
                ratio_compiled=ms["reference"] / ms["ours_compiled"] if compiled else None)


def breakdown(rounds: int, model: str = "gpt", segment: int = 5, top: int = 25) -> str:
    """Per-phase thread-CPU-time medians and the top ops by self time, ours next to eager."""
    sides = {"ours": Reference(train_config(1, "unused", model=model), ours=True),
             "eager": Reference(train_config(1, "unused", model=model))}
    phases = {name: [] for name in sides}
    op_ms, calls = ({name: collections.Counter() for name in sides} for _ in range(2))
    for side in sides.values():  # warm-up
        for it in range(3):
            side.step(it)
    for r in range(rounds):
        for name, side in sides.items():
            for it in range(segment):
                phases[name].append(side.step(r * segment + it, clock=time.thread_time))
            with profile() as prof:
                for it in range(segment):
                    side.step(r * segment + it)
            for e in prof.key_averages():
                op_ms[name][e.key] += e.self_cpu_time_total / 1000
                calls[name][e.key] += e.count
    med = {n: [1000 * statistics.median(p[k] for p in phases[n]) for k in range(3)] for n in sides}
    tot = {n: 1000 * statistics.median(sum(p) for p in phases[n]) for n in sides}
    rows = ["| ms / iteration (thread CPU time, median) | forward | backward | clip + step | total |",
            "|---|---:|---:|---:|---:|"]
    rows += [f"| {n} | " + " | ".join(f"{v:.1f}" for v in med[n]) + f" | {tot[n]:.1f} |" for n in sides]
    rows.append(f"\n**eager / ours: {tot['eager'] / tot['ours']:.2f}x** (CPU time)\n")
    n = rounds * segment
    keys = sorted(set(op_ms["ours"]) | set(op_ms["eager"]), key=lambda k: -max(op_ms["ours"][k], op_ms["eager"][k]))
    rows += ["| op (torch.profiler self time, wall, ms / iteration) | ours | eager | calls ours / eager |",
             "|---|---:|---:|---:|"]
    rows += [f"| {k[:70]} | {op_ms['ours'][k] / n:.2f} | {op_ms['eager'][k] / n:.2f} | "
             f"{calls['ours'][k] // n} / {calls['eager'][k] // n} |" for k in keys[:top]]
    return "\n".join(rows)


def table(result: dict) -> str:
    rows = ["| trainer | ms / iteration (median) | tokens/s | mean loss, last {tail} of {iters} iterations |".format(**result),
            "|---|---:|---:|---:|"]
    ops = "lmkernels.attention" if result["model"] == "gpt" else "lmkernels ops"
    names = {"ours": f"lmkernels-train ({ops}, FusedAdamW)",
             "ours_compiled": "lmkernels-train --compile=true",
             "reference": "eager PyTorch (SDPA" + ("" if result["model"] == "gpt" else ", eager ops")
                          + ", torch.optim.AdamW)"}
    for key in [k for k in names if k in result["ms"]]:
        rows.append(f"| {names[key]} | {result['ms'][key]:.1f} | {result['tokens_per_s'][key]:,.0f} | "
                    f"{result['losses'][key]:.4f} |")
    rows.append(f"\n**Speed-up: {result['ratio']:.2f}x** tokens/s, lmkernels-train vs eager PyTorch (target >= 1.3x).")
    if result["ratio_compiled"]:
        rows.append(f"With compile=true: **{result['ratio_compiled']:.2f}x** (compilation time excluded).")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time the trainer with compile=true")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--model", default="gpt", choices=("gpt", "llama"), help="the trainer's --model")
    parser.add_argument("--write", default=None, help="also write the markdown to this file")
    parser.add_argument("--breakdown", action="store_true",
                        help="per-phase CPU time and per-op profile instead of the trainer's tokens/s")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.breakdown:
        print(f"## Step breakdown, CPU, model={args.model}\n\n{torch.get_num_threads()} threads, torch "
              f"{torch.__version__}; config {CONFIG}; {args.rounds} rounds of 5 + 5 profiled steps per side.\n")
        print(breakdown(args.rounds, args.model))
        return
    result = compare(args.iters, args.rounds, args.compile, model=args.model)
    md = (f"## Trainer tokens/s, CPU, model={args.model}\n\n{platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; config {CONFIG}, fp32, default corpus "
          f"(byte tokenizer); {args.rounds} alternating rounds of {args.iters} iterations each.\n\n{table(result)}\n")
    report(md, args.write)


# ---- pytest-benchmark: one training iteration each --------------------------------------------

def test_iteration_reference(benchmark):
    ref = Reference(train_config(1, "unused"))
    it = iter(range(10 ** 9))
    benchmark(lambda: ref.step(next(it) % 1000))


def test_iteration_ours(benchmark, tmp_path):
    # the trainer's own loop, 5 iterations per round; reported per iteration by the ratio above
    cfg = train_config(5, str(tmp_path))
    benchmark.pedantic(lambda: train(cfg), rounds=3, iterations=1)


if __name__ == "__main__":
    main()
