"""CPU benchmark of lmkernels.fused_linear_cross_entropy against eager PyTorch
(F.cross_entropy(F.linear(h, W), t), which materializes the (N, V) logits and their gradient),
forward + backward: time and peak memory.

    PYTHONPATH=. python3 bench/bench_flce.py                      # N=4096, H=1024, V=32768
    PYTHONPATH=. python3 bench/bench_flce.py --n 1024 --chunks 64,256,1024
    PYTHONPATH=. python3 bench/bench_flce.py --tp 2 --n 2048          # vocab-parallel, gloo

Candidates: "eager"; "fused" (gradients computed in the forward's chunk loop: 3 GEMMs, as
eager); "recompute" (reduction='none' then .sum(), whose backward recomputes the logits from
the saved lse: 4 GEMMs), to justify the first design. Times are medians of alternating runs in
one process. Peak memory: each case runs once in a fresh subprocess; we report its peak RSS
(VmHWM) minus the current RSS right after the inputs were made (so: what the loss and its
gradients add on top of hidden, weight and the process).

--tp P: P local processes (gloo), each holding V / P rows of the head. "eager-tp" is Megatron's
loss: the local (N, V / P) logits through tensor_parallel.vocab_parallel_cross_entropy; "fused-tp"
is vocab_parallel.vocab_parallel_fused_linear_cross_entropy (4 GEMMs: its backward recomputes
the logits). Times: medians of alternating runs, rank 0's. Peak memory: rank 0's VmHWM after
fused-tp alone, then after eager-tp too (a peak only grows, and eager's is the larger).
"""
import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

import lmkernels
from bench._timing import alternate


def make_inputs(N, H, V, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype).requires_grad_()
    target = torch.randint(0, V, (N,), generator=g)
    return hidden, weight, target


def step(kind, hidden, weight, target, chunk_size=None):
    if kind == "eager":
        loss = F.cross_entropy(F.linear(hidden, weight), target)
    elif kind == "fused":
        loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size)
    elif kind == "recompute":
        loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, reduction="none",
                                                    chunk_size=chunk_size).sum() / target.numel()
    else:
        raise ValueError(kind)
    hidden.grad = weight.grad = None
    loss.backward()
    return loss


def _maxrss_bytes():
    """This process's peak RSS (VmHWM: reset by exec, unlike ru_maxrss, which a child inherits
    from the process that forked it)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(kind, N, H, V, chunk_size=None) -> int:
    """Peak RSS added by one forward + backward, in a fresh process."""
    code = (
        "import json, sys; sys.path.insert(0, '.');"
        "from bench.bench_flce import make_inputs, step, _maxrss_bytes, _rss_bytes;"
        f"h, w, t = make_inputs({N}, {H}, {V}); base = _rss_bytes();"
        f"step({kind!r}, h, w, t, {chunk_size!r}); print(json.dumps(_maxrss_bytes() - base))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=1024)
    ap.add_argument("--v", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--chunks", default="", help="comma-separated chunk sizes to sweep (fused only)")
    ap.add_argument("--kinds", default="eager,fused,recompute", help="candidates to time")
    ap.add_argument("--tp", type=int, default=1, help="> 1: vocab-parallel over this many processes")
    args = ap.parse_args()
    if args.tp > 1:
        return tp_main(args)
    N, H, V = args.n, args.h, args.v
    # memory first, in subprocesses, before this process grows
    mem = {k: peak_memory(k, N, H, V) for k in ("eager", "fused", "recompute")}
    hidden, weight, target = make_inputs(N, H, V)
    # correctness first: same loss and gradients as eager
    l1 = step("eager", hidden, weight, target)
    g1 = hidden.grad.clone(), weight.grad.clone()
    l2 = step("fused", hidden, weight, target)
    err = max((hidden.grad - g1[0]).abs().max().item(), (weight.grad - g1[1]).abs().max().item())
    print(f"loss eager {l1.item():.6f} fused {l2.item():.6f}; max grad diff {err:.2e}")

    kinds = {k: (lambda k=k: step(k, hidden, weight, target)) for k in args.kinds.split(",")}
    for c in filter(None, args.chunks.split(",")):
        kinds[f"fused chunk={c}"] = lambda c=int(c): step("fused", hidden, weight, target, c)
    times = alternate(kinds, args.reps, warmup=0)  # the correctness run above warmed up
    flops = 3 * 2 * N * H * V  # forward GEMM + two backward GEMMs
    print(f"\nN={N}, H={H}, V={V}, float32, forward + backward, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| candidate | time (s) | GFLOP/s (3 GEMMs) | speed vs eager | peak memory added (MiB) | memory vs eager |")
    print("|---|---|---|---|---|---|")
    for k in dict.fromkeys(list(times) + list(mem)):
        t, m = times.get(k), mem.get(k)
        ttxt = f"{t:.3f} | {flops / t / 1e9:.0f} | {times['eager'] / t:.2f}x" if t else "- | - | -"
        mtxt = f"{m / 2**20:.0f} | {m / max(mem['eager'], 1):.3f}" if m is not None else "- | -"
        print(f"| {k} | {ttxt} | {mtxt} |")


def _tp_rank(rank, world, port, N, H, V, reps):
    import torch.distributed as dist

    from lmkernels.distributed.tensor_parallel import copy_to_tensor_parallel_region, vocab_parallel_cross_entropy
    from lmkernels.distributed.vocab_parallel import vocab_parallel_fused_linear_cross_entropy

    torch.set_num_threads(max(1, os.cpu_count() // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = dist.group.WORLD
    hidden, weight, target = make_inputs(N, H, V)
    w = weight.detach()[rank * V // world:(rank + 1) * V // world].clone().requires_grad_()
    del weight
    base = _rss_bytes()

    def run(kind):
        if kind == "eager-tp":
            logits = F.linear(copy_to_tensor_parallel_region(hidden, g), w)  # (N, V / tp)
            loss = vocab_parallel_cross_entropy(logits, target, g)
        else:
            loss = vocab_parallel_fused_linear_cross_entropy(hidden, w, target, g)
        hidden.grad = w.grad = None
        loss.backward()
        return loss

    lf = run("fused-tp")
    mem = {"fused-tp": _maxrss_bytes() - base}
    le = run("eager-tp")
    mem["eager-tp"] = _maxrss_bytes() - base
    times = alternate({k: (lambda k=k: run(k)) for k in ("eager-tp", "fused-tp")}, reps, warmup=0)
    if rank == 0:
        print(f"loss eager-tp {le.item():.6f} fused-tp {lf.item():.6f}")
        print(f"\nN={N}, H={H}, V={V}, tp={world} (gloo, {torch.get_num_threads()} threads per rank), float32, "
              f"forward + backward, torch {torch.__version__}\n")
        print("| candidate | time (s) | speed vs eager-tp | peak memory added, rank 0 (MiB) | memory vs eager-tp |")
        print("|---|---|---|---|---|")
        for k in ("eager-tp", "fused-tp"):
            print(f"| {k} | {times[k]:.3f} | {times['eager-tp'] / times[k]:.2f}x | {mem[k] / 2**20:.0f} | "
                  f"{mem[k] / mem['eager-tp']:.3f} |")
    dist.destroy_process_group()


def tp_main(args):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_tp_rank, args=(args.tp, port, args.n, args.h, args.v, args.reps), nprocs=args.tp)


if __name__ == "__main__":
    main()
