"""Sharded data parallel (ZeRO-1/2) on gloo, CPU: step time against zero=0 and torch DDP, and
per-rank bytes of parameters, gradients and optimizer state, and peak RSS.

    PYTHONPATH=. python3 bench/bench_zero.py --worlds 2 4     # table -> bench/results/zero-cpu.md

Timing: in one run per world size the variants take turns step by step (a barrier before each
timed step; a step's time is the slowest rank's), so a noisy machine slows them alike. A step is
forward + backward + gradient sync + clipping (max norm 1.0) + optimizer step + zero_grad:
  DDP     torch DistributedDataParallel + torch.optim.AdamW (foreach)
  zero=0  BucketedDataParallel + FusedAdamW
  zero=1  ShardedDataParallel(zero=1) + ShardedAdamW
  zero=2  ShardedDataParallel(zero=2) + ShardedAdamW
Memory: one run per variant (peak RSS is per process), bytes from the wrappers' own counts.
Bytes per parameter: fp32 model and bf16 model (bf16 on the wire, fp32 master and moments).
"""
import argparse
import os
import platform
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_dp import BenchGPT  # noqa: E402
from tests._dist import run_distributed  # noqa: E402

VARIANTS = ("DDP", "zero=0", "zero=1", "zero=2")
SHAPE = dict(vocab=4096, dim=256, layers=4, heads=4, seq=64)
BATCH = 2


def _build(variant, dtype=torch.float32):
    from lmkernels.distributed import BucketedDataParallel, ShardedAdamW, ShardedDataParallel
    from lmkernels.optim import FusedAdamW

    torch.manual_seed(0)
    module = BenchGPT(**SHAPE).to(dtype)
    if variant == "DDP":
        model = torch.nn.parallel.DistributedDataParallel(module)
        return model, torch.optim.AdamW(module.parameters(), lr=1e-4, foreach=True)
    if variant == "zero=0":
        model = BucketedDataParallel(module)
        return model, FusedAdamW(module.parameters(), lr=1e-4, master_weights=dtype != torch.float32)
    kwargs = dict(reduce_dtype=None)
    model = ShardedDataParallel(module, zero=int(variant[-1]), **kwargs)
    return model, ShardedAdamW(model, lr=1e-4)


def _step(model, opt, step):
    g = torch.Generator().manual_seed(step * 100 + dist.get_rank())
    idx = torch.randint(0, SHAPE["vocab"], (BATCH, SHAPE["seq"]), generator=g)
    model(idx, torch.roll(idx, -1, 1)).backward()
    if hasattr(model, "clip_grad_norm_"):
        model.clip_grad_norm_(1.0)
    else:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()


def _bytes(model, opt) -> dict:
    from lmkernels.distributed import ShardedDataParallel

    if isinstance(model, ShardedDataParallel):
        return {**model.memory_bytes(), **opt.memory_bytes()}
    params = [p for p in model.parameters()]
    buckets = getattr(model, "_buckets", None)
    grads = (sum(b.grads.numel() * b.grads.element_size()
                 + (0 if b.comm is b.grads else b.comm.numel() * b.comm.element_size()) for b in buckets)
             if buckets is not None else sum(p.numel() * p.element_size() for p in params))
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor) and t.dim() > 0]
    return dict(param_bytes=sum(p.numel() * p.element_size() for p in params), grad_bytes=grads,
                opt_state_bytes=sum(t.numel() * t.element_size() for t in state))


def _timing(steps, warmup):
    built = {v: _build(v) for v in VARIANTS}
    times = {v: [] for v in VARIANTS}
    for step in range(warmup + steps):
        for v, (model, opt) in built.items():
            dist.barrier()
            t0 = time.perf_counter()
            _step(model, opt, step)
            dt = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(dt, op=dist.ReduceOp.MAX)
            if step >= warmup:
                times[v].append(dt.item())
    return {v: statistics.median(ts) for v, ts in times.items()}


def _memory(variant, dtype_name):
    import resource

    model, opt = _build(variant, getattr(torch, dtype_name))
    for step in range(2):
        _step(model, opt, step)
    numel = sum(p.numel() for p in model.module.parameters())
    return dict(_bytes(model, opt), numel=numel,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "zero-cpu.md"))
    args = ap.parse_args()
    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
             f"{os.getloadavg()[0]:.1f} at start; torch {torch.__version__}. Model: BenchGPT {SHAPE}, batch "
             f"{BATCH} per rank. Command: `PYTHONPATH=. python3 bench/bench_zero.py --worlds "
             f"{' '.join(map(str, args.worlds))} --steps {args.steps} --warmup {args.warmup}`", ""]
    lines += ["## Step time (median, variants alternating, slowest rank)", "",
              "| processes | DDP ms | zero=0 ms | zero=1 ms | zero=2 ms | zero=1 / zero=0 | zero=2 / zero=0 | zero=0 / DDP |",
              "|---|---|---|---|---|---|---|---|"]
    for world in args.worlds:
        t = run_distributed(_timing, world, args=(args.steps, args.warmup), timeout=1800)[0]
        ms = {v: 1000 * t[v] for v in VARIANTS}
        lines.append(f"| {world} | {ms['DDP']:.1f} | {ms['zero=0']:.1f} | {ms['zero=1']:.1f} | {ms['zero=2']:.1f} | "
                     f"**{ms['zero=1'] / ms['zero=0']:.3f}** | {ms['zero=2'] / ms['zero=0']:.3f} | "
                     f"{ms['zero=0'] / ms['DDP']:.3f} |")
        print(lines[-1], flush=True)
    lines += ["", "## Bytes per rank (rank 0) and peak RSS", "",
              "| dtype | processes | variant | param B/param | grad B/param | opt-state B/param | total B/param | "
              "formula | opt-state x d / ideal | peak RSS MiB |", "|---|---|---|---|---|---|---|---|---|---|"]
    for dtype_name in ("float32", "bfloat16"):
        for world in args.worlds:
            for variant in ("zero=0", "zero=1", "zero=2"):
                m = run_distributed(_memory, world, args=(variant, dtype_name), timeout=900)[0]
                n = m["numel"]
                p, g, o = m["param_bytes"] / n, m["grad_bytes"] / n, m["opt_state_bytes"] / n
                fp32 = dtype_name == "float32"
                state = 8 if fp32 else 12
                shard = {"zero=0": 1, "zero=1": world, "zero=2": world}[variant]
                grad_shard = world if variant == "zero=2" else 1
                w = 4 if fp32 else 2
                formula = f"{w} + {w}/{grad_shard} + {state}/{shard} = {w + w / grad_shard + state / shard:.2f}"
                ideal = state / shard
                lines.append(f"| {dtype_name} | {world} | {variant} | {p:.3f} | {g:.3f} | {o:.3f} | {p + g + o:.3f} | "
                             f"{formula} | {o / ideal:.4f} | {m['peak_rss_bytes'] / 2**20:.0f} |")
                print(lines[-1], flush=True)
    with open(args.out, "w") as f:
        f.write("# Sharded data parallel on gloo (CPU)\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
