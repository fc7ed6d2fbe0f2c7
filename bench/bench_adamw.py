"""CPU benchmark of one FusedAdamW step vs torch.optim.AdamW(fused=True) and (foreach=True).

Four parameter lists (issue #2): (a) 10M fp32 params in 10 tensors; (b) GPT-2 small shapes
(148 tensors, 124M params); (c) 1000 tensors of 1000 elements; (d) a small GPT (4 layers, 128
wide, vocab 65, block 64: 52 tensors, 0.8M params, fits in cache). An AdamW step moves 28 bytes
per fp32 parameter (read p, g, m, v; write p, m, v); the rate is compared with in-place
streaming (x.mul_) measured in the same run.

    python bench/bench_adamw.py [--write bench/results/adamw-cpu.md]   # ratio table
    pytest bench/bench_adamw.py --benchmark-only                        # pytest-benchmark
"""
import argparse
import os
import platform
import statistics
import time

import pytest
import torch

from lmkernels.optim import FusedAdamW

try:
    from bench._timing import alternate, streaming_bandwidth
except ImportError:  # run as a script from bench/
    from _timing import alternate, streaming_bandwidth


def gpt_shapes(n_layer, d, vocab, block):
    shapes = [(vocab, d), (block, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


CASES = {
    "a_10M_in_10": [(1_000_000,)] * 10,
    "b_gpt2_small": gpt_shapes(12, 768, 50257, 1024),
    "c_1000x1000": [(1000,)] * 1000,
    "d_small_gpt": gpt_shapes(4, 128, 65, 64),
}
IMPLS = {
    "lmkernels": lambda ps: FusedAdamW(ps, lr=1e-3, weight_decay=0.1),
    "torch_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
    "torch_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
}


def make_optimizers(case):
    """One shared set of params + grads; each optimizer keeps its own state."""
    params = [torch.nn.Parameter(torch.randn(s) * 0.02) for s in CASES[case]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opts = {name: make(params) for name, make in IMPLS.items()}
    for o in opts.values():
        o.step()  # allocate state outside the timing
    return params, opts


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_adamw_step(benchmark, case, impl):
    benchmark.group = f"adamw-{case}"
    _, opts = make_optimizers(case)
    benchmark(opts[impl].step)


def alternate_cpu_time(fns: dict, reps: int, warmup: int = 2) -> dict:
    """bench._timing.alternate with this process's CPU time (time.process_time) in place of
    wall time: on a shared, busy machine it counts the work done, not the waits for a core.
    Use it with one thread (--threads 1), where CPU time is the time of that thread."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def ratio_table(reps: int = 15, cpu_time: bool = False) -> str:
    timer = alternate_cpu_time if cpu_time else alternate
    if cpu_time:
        x = torch.ones(64 * 2**20)
        stream = 2 * x.numel() * 4 / timer({"mul_": lambda: x.mul_(1.0000001)}, 10)["mul_"]
        del x
    else:
        stream = streaming_bandwidth()
    rows = [
        f"Streaming bandwidth (x.mul_ over 256 MB, same run, same clock): {stream / 1e9:.1f} GB/s\n",
        "| case | params | tensors | lmkernels ms | GB/s (% of stream) | torch fused ms | torch foreach ms | vs fused | vs foreach |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        params, opts = make_optimizers(case)
        n = sum(p.numel() for p in params)
        t = timer({k: o.step for k, o in opts.items()}, reps if n < 50e6 else 5)
        rate = 28 * n / t["lmkernels"]
        rows.append(
            f"| {case} | {n / 1e6:.2f}M | {len(params)} | {t['lmkernels'] * 1e3:.2f} | "
            f"{rate / 1e9:.1f} ({100 * rate / stream:.0f}%) | {t['torch_fused'] * 1e3:.2f} | "
            f"{t['torch_foreach'] * 1e3:.2f} | {t['torch_fused'] / t['lmkernels']:.2f}x | "
            f"{t['torch_foreach'] / t['lmkernels']:.2f}x |"
        )
        del params, opts
    return "\n".join(rows)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="also write the table (markdown) to this file")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with CPU time instead of wall time (for a busy shared machine; "
                         "implies --threads 1)")
    args = ap.parse_args()
    if args.cpu_time:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    table = ratio_table(cpu_time=args.cpu_time)
    # The load average says how quiet the (shared) machine was: busy cores slow torch's
    # per-tensor parallel regions more than our one region per step.
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    header = (f"# FusedAdamW one step, CPU\n\n{cpu_model()}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, load average {load} (1/5/15 min) at the end of the run. "
              f"{'CPU' if args.cpu_time else 'Wall'} time per step. Command: `python bench/bench_adamw.py"
              f"{' --cpu-time' if args.cpu_time else ' --threads %d' % args.threads if args.threads else ''}`. "
              f"Ratios > 1 mean lmkernels is faster.\n\n")
    table = header + table
    print(table)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
