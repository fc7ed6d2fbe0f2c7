"""CPU benchmark of lmkernels.attention (C++ flash kernel) against PyTorch's
scaled_dot_product_attention (its CPU flash kernel), forward and forward+backward.

    PYTHONPATH=. python3 bench/bench_attention.py            # ratio table (markdown)
    PYTHONPATH=. python3 bench/bench_attention.py --softcap 30   # + the cost of softcap=30
    PYTHONPATH=. python3 -m pytest bench/bench_attention.py  # pytest-benchmark timings

Both sides run in the same process, alternating, on the same inputs; the table reports
median times and SDPA time / ours (> 1: ours is faster). With --softcap, ours also runs with
that softcap (SDPA has none) and the table adds its time and its cost relative to plain ours.
"""
import argparse
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

import lmkernels

SHAPES = [(4, 8, T, 64) for T in (512, 1024)]
DTYPES = (torch.float32, torch.bfloat16)


def make(B, H, T, D, dtype, grad):
    return [torch.randn(B, H, T, D, dtype=dtype, requires_grad=grad) for _ in range(3)]


def step_fn(impl, q, k, v, causal, backward, softcap=0.0):
    attn = (lambda: lmkernels.attention(q, k, v, is_causal=causal, softcap=softcap)) if impl != "sdpa" else (
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    if not backward:
        def fwd():
            with torch.no_grad():
                attn()
        return fwd
    g = torch.randn_like(q)

    def fwd_bwd():
        out = attn()
        torch.autograd.grad(out, (q, k, v), g)
    return fwd_bwd


def timed(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def compare(B, H, T, D, dtype, causal, backward, rounds=5, reps=2, softcap=0.0):
    q, k, v = make(B, H, T, D, dtype, backward)
    fns = {impl: step_fn(impl, q, k, v, causal, backward) for impl in ("ours", "sdpa")}
    if softcap:
        fns["softcap"] = step_fn("ours", q, k, v, causal, backward, softcap)
    for fn in fns.values():  # warm-up
        fn()
    times = {impl: [] for impl in fns}
    for _ in range(rounds):  # alternate so load changes hit both sides alike
        for impl, fn in fns.items():
            times[impl] += timed(fn, reps)
    return {impl: statistics.median(t) for impl, t in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--softcap", type=float, default=0.0, help="also time ours with this softcap")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    extra = f" softcap={args.softcap:g} ms | softcap / ours |" if args.softcap else ""
    print("| dtype | T | causal | pass | ours ms | SDPA ms | SDPA / ours |" + extra)
    print("|---|---|---|---|---|---|---|" + ("---|---|" if args.softcap else ""))
    for dtype in DTYPES:
        for B, H, T, D in SHAPES:
            for causal in (False, True):
                for backward in (False, True):
                    r = compare(B, H, T, D, dtype, causal, backward, rounds=args.rounds,
                                softcap=args.softcap)
                    name = "fwd+bwd" if backward else "fwd"
                    cap = (f" {r['softcap'] * 1e3:.1f} | {r['softcap'] / r['ours']:.2f}x |"
                           if args.softcap else "")
                    print(f"| {str(dtype).replace('torch.', '')} | {T} | {causal} | {name} | "
                          f"{r['ours'] * 1e3:.1f} | {r['sdpa'] * 1e3:.1f} | "
                          f"{r['sdpa'] / r['ours']:.2f}x |" + cap, flush=True)


@pytest.mark.parametrize("impl", ("ours", "sdpa"))
@pytest.mark.parametrize("backward", (False, True), ids=("fwd", "fwd_bwd"))
@pytest.mark.parametrize("causal", (False, True), ids=("full", "causal"))
@pytest.mark.parametrize("dtype", DTYPES, ids=("fp32", "bf16"))
def test_attention_cpu(benchmark, impl, backward, causal, dtype):
    q, k, v = make(4, 8, 512, 64, dtype, backward)
    benchmark(step_fn(impl, q, k, v, causal, backward))


if __name__ == "__main__":
    main()
