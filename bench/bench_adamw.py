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
import platform

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


def ratio_table(reps: int = 15) -> str:
    stream = streaming_bandwidth()
    rows = [
        f"Streaming bandwidth (x.mul_ over 256 MB, same run): {stream / 1e9:.1f} GB/s\n",
        "| case | params | tensors | lmkernels ms | GB/s (% of stream) | torch fused ms | torch foreach ms | vs fused | vs foreach |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in CASES:
        params, opts = make_optimizers(case)
        n = sum(p.numel() for p in params)
        t = alternate({k: o.step for k, o in opts.items()}, reps if n < 50e6 else 5)
        rate = 28 * n / t["lmkernels"]
        rows.append(
            f"| {case} | {n / 1e6:.2f}M | {len(params)} | {t['lmkernels'] * 1e3:.2f} | "
            f"{rate / 1e9:.1f} ({100 * rate / stream:.0f}%) | {t['torch_fused'] * 1e3:.2f} | "
            f"{t['torch_foreach'] * 1e3:.2f} | {t['torch_fused'] / t['lmkernels']:.2f}x | "
            f"{t['torch_foreach'] / t['lmkernels']:.2f}x |"
        )
        del params, opts
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--write", help="also write the table (markdown) to this file")
    args = ap.parse_args()
    header = (f"# FusedAdamW one step, CPU\n\n{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}. "
              f"Command: `python bench/bench_adamw.py`. Ratios > 1 mean lmkernels is faster.\n\n")
    table = header + ratio_table()
    print(table)
    if args.write:
        with open(args.write, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
