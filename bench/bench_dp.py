"""Data-parallel step time on gloo with 2 local processes: BucketedDataParallel vs torch DDP
(same bucket cap) vs all-reduce after backward (no overlap), and how much communication is
exposed. Also pytest-benchmark cases for the bucket ops.

    PYTHONPATH=. python3 bench/bench_dp.py            # table -> bench/results/dp-cpu.md, plot -> dp-timeline.png
    PYTHONPATH=. python3 -m pytest bench/bench_dp.py  # the bucket-op micro-benchmarks

A step is forward + backward + gradient sync (no optimizer, the same for everyone). Variants
run alternately, a barrier before each timed step; a step's time is the slower rank's.
exposed communication = step time - the same step without communication (no_sync), measured
the same way for every variant; total communication = the all-reduce phase of the
all-reduce-after-backward variant (nothing to overlap with, so all of it is exposed there).
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class BenchGPT(nn.Module):
    def __init__(self, vocab, dim, layers, heads, seq):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _worker(cfg):
    from torch.nn.parallel import DistributedDataParallel as DDP

    from lmkernels.distributed import BucketedDataParallel, StepTimeline
    from lmkernels.distributed.timeline import BucketEvent
    from lmkernels.ops.bucket import bucket_scale_

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    base = BenchGPT(cfg["vocab"], cfg["dim"], cfg["layers"], cfg["heads"], cfg["seq"])
    nbytes = sum(p.numel() * 4 for p in base.parameters())
    g = torch.Generator().manual_seed(rank)
    idx = torch.randint(0, cfg["vocab"], (cfg["batch"], cfg["seq"]), generator=g)
    tgt = torch.roll(idx, -1, 1)
    cap = cfg["cap"]
    ours = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=cap)
    ddp = DDP(copy.deepcopy(base), bucket_cap_mb=cap)
    ddp_view = DDP(copy.deepcopy(base), bucket_cap_mb=cap, gradient_as_bucket_view=True)
    after = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=cap, record_timeline=False)
    after_tl = []

    def step_ours():
        ours(idx, tgt).backward()  # ends synchronized (waits for the buckets still in flight)

    def step_ddp():
        ddp(idx, tgt).backward()

    def step_ddp_view():
        ddp_view(idx, tgt).backward()

    def step_after():  # the same buckets, reduced one by one once backward is over
        tl = StepTimeline(forward_start=time.perf_counter())
        with after.no_sync():
            loss = after(idx, tgt)
            tl.backward_start = time.perf_counter()
            loss.backward()
        tl.backward_end = time.perf_counter()
        for b in after._buckets:
            t0 = time.perf_counter()
            bucket_scale_([b.grads], 1.0 / world)
            dist.all_reduce(b.grads)
            tl.buckets.append(BucketEvent(b.index, b.grads.numel(), b.grads.numel() * 4, t0, time.perf_counter()))
        tl.sync_end = time.perf_counter()
        after_tl.append(tl)

    def step_local():  # no communication at all: the compute floor
        with ours.no_sync():
            ours(idx, tgt).backward()

    steps = {"ours": step_ours, "ddp": step_ddp, "ddp_view": step_ddp_view, "after": step_after,
             "local": step_local}
    times = {k: [] for k in steps}
    cpu = {k: [] for k in steps}  # CPU seconds of the whole process (all threads) per step
    ours_tl = []
    names = list(steps)
    for r in range(cfg["warmup"] + cfg["steps"]):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            for m in (ours, ddp, ddp_view, after):
                m.zero_grad(set_to_none=False)
            dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            steps[name]()
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if r >= cfg["warmup"]:
                times[name].append(dt)
                cpu[name].append(dc)
                if name == "ours":
                    ours_tl.append(ours.last_timeline)
    # The slower rank decides a step.
    t = torch.tensor([times[n] for n in names], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    comm = torch.tensor([tl.sync_end - tl.backward_end for tl in after_tl[-cfg["steps"]:]], dtype=torch.float64)
    dist.all_reduce(comm, op=dist.ReduceOp.MAX)
    out = {n: t[i].tolist() for i, n in enumerate(names)}
    c = torch.tensor([statistics.median(cpu[n]) for n in names], dtype=torch.float64)
    dist.all_reduce(c)  # summed over the ranks
    out.update({f"cpu_{n}": c[i].item() for i, n in enumerate(names)})
    out["after_comm"] = comm.tolist()
    out["ours_exposed_timeline"] = [tl.exposed_comm() for tl in ours_tl]
    out["ours_busy_timeline"] = [tl.comm_busy() for tl in ours_tl]
    out["nbytes"] = nbytes
    out["buckets"] = len(ours.bucket_layout)
    med = statistics.median(out["ours_exposed_timeline"])
    pick = min(range(len(ours_tl)), key=lambda i: abs(out["ours_exposed_timeline"][i] - med))
    out["timelines"] = (ours_tl[pick], after_tl[-cfg["steps"]:][pick])
    return out


def _median(x):
    return statistics.median(x)


def main():
    from _dist import run_distributed

    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--caps", type=float, nargs="+", default=[25.0, 4.0])
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    rows, plots = [], {}
    for cap in args.caps:
        cfg = dict(vocab=4096, dim=args.dim, layers=args.layers, heads=6, seq=64, batch=args.batch,
                   cap=cap, steps=args.steps, warmup=args.warmup)
        res = run_distributed(_worker, 2, args=(cfg,), timeout=1200)[0]
        m = {k: _median(res[k]) for k in ("ours", "ddp", "ddp_view", "after", "local", "after_comm")}
        exp = {k: max(0.0, m[k] - m["local"]) for k in ("ours", "ddp", "ddp_view", "after")}
        m.update({k: res[k] for k in res if k.startswith("cpu_")})
        rows.append((cap, res["nbytes"], res["buckets"], m, exp, _median(res["ours_exposed_timeline"]),
                     _median(res["ours_busy_timeline"])))
        tl_ours, tl_after = res["timelines"]
        plots[f"BucketedDataParallel, bucket_cap_mb={cap:g}: exposed {tl_ours.exposed_comm() * 1e3:.0f} ms"] = tl_ours
        plots[f"all-reduce after backward, bucket_cap_mb={cap:g}: exposed {tl_after.exposed_comm() * 1e3:.0f} ms"] = tl_after
    lines = [
        "## Data parallel on gloo, 2 processes (CPU)",
        "",
        f"Model: GPT, {args.layers} layers, dim {args.dim}, vocab 4096 (tied), seq 64, batch {args.batch} per rank; "
        f"{rows[0][1] / 2**20:.1f} MiB of fp32 gradients. Median of {args.steps} steps per variant, "
        "variants alternating, 1 intra-op thread per process. Step = forward + backward + gradient sync.",
        "",
        "| bucket cap MiB | buckets | ours ms | DDP ms | DDP (bucket view) ms | after-backward ms | no-comm ms "
        "| ours / DDP | ours / DDP (view) | ours / after-backward |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cap, nbytes, nb, m, exp, tl_exp, busy in rows:
        lines.append(
            f"| {cap:g} | {nb} | {m['ours'] * 1e3:.1f} | {m['ddp'] * 1e3:.1f} | {m['ddp_view'] * 1e3:.1f} | "
            f"{m['after'] * 1e3:.1f} | {m['local'] * 1e3:.1f} | **{m['ours'] / m['ddp']:.3f}** | "
            f"**{m['ours'] / m['ddp_view']:.3f}** | {m['ours'] / m['after']:.3f} |")
    lines += [
        "",
        "CPU time per step (both processes, all threads: compute, hooks, gloo), median; on a loaded "
        "machine this shows the work each variant costs better than wall time does:",
        "",
        "| bucket cap MiB | ours ms | DDP ms | DDP (bucket view) ms | after-backward ms | no-comm ms "
        "| ours / DDP | ours / DDP (view) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cap, nbytes, nb, m, exp, tl_exp, busy in rows:
        lines.append(
            f"| {cap:g} | {m['cpu_ours'] * 1e3:.0f} | {m['cpu_ddp'] * 1e3:.0f} | {m['cpu_ddp_view'] * 1e3:.0f} | "
            f"{m['cpu_after'] * 1e3:.0f} | {m['cpu_local'] * 1e3:.0f} | {m['cpu_ours'] / m['cpu_ddp']:.3f} | "
            f"{m['cpu_ours'] / m['cpu_ddp_view']:.3f} |")
    lines += [
        "",
        "Exposed communication (step time minus the no-communication step, the same for every "
        "variant) as a fraction of the total communication time (the all-reduce phase of the "
        "after-backward variant, where nothing overlaps it):",
        "",
        "| bucket cap MiB | total comm ms | exposed: ours | DDP | DDP (bucket view) | after-backward "
        "| ours from its timeline (backward end -> last bucket done) | ours: all-reduce in flight ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cap, nbytes, nb, m, exp, tl_exp, busy in rows:
        c = m["after_comm"]
        f = lambda k: f"{exp[k] * 1e3:.1f} ms = {exp[k] / c:.0%}"  # noqa: E731
        lines.append(f"| {cap:g} | {c * 1e3:.1f} | **{f('ours')}** | {f('ddp')} | {f('ddp_view')} | {f('after')} "
                     f"| {tl_exp * 1e3:.1f} ms = {tl_exp / c:.0%} | {busy * 1e3:.1f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    from lmkernels.distributed import plot_timeline

    plot_timeline(plots, os.path.join(args.out, "dp-timeline.png"),
                  title="One step on gloo, 2 processes, 2-core CPU (median-exposed step)")
    with open(os.path.join(args.out, "dp-cpu-table.md"), "w") as f:
        f.write(text)


# ---------------------------------------------------------------- pytest-benchmark cases
def _bucket_inputs():
    torch.manual_seed(0)
    sizes = [1, 17, 97, 1025, 4096 * 384, 384 * 1536, 384, 384 * 1152] * 4
    return [torch.randn(n) for n in sizes]


def test_bucket_pack_bf16_lmkernels(benchmark):
    import lmkernels  # noqa: F401
    from lmkernels.ops.bucket import bucket_pack_

    ts = _bucket_inputs()
    flat = torch.empty(sum(t.numel() for t in ts), dtype=torch.bfloat16)
    benchmark(bucket_pack_, ts, flat, 0.5)


def test_bucket_pack_bf16_torch(benchmark):
    ts = _bucket_inputs()
    flat = torch.empty(sum(t.numel() for t in ts), dtype=torch.bfloat16)
    benchmark(lambda: flat.copy_(torch.cat([t.reshape(-1) for t in ts]).mul_(0.5)))


def test_bucket_unpack_bf16_lmkernels(benchmark):
    import lmkernels  # noqa: F401
    from lmkernels.ops.bucket import bucket_unpack_

    ts = _bucket_inputs()
    flat = torch.randn(sum(t.numel() for t in ts)).to(torch.bfloat16)
    benchmark(bucket_unpack_, flat, ts, 2.0)


def test_bucket_unpack_bf16_torch(benchmark):
    ts = _bucket_inputs()
    flat = torch.randn(sum(t.numel() for t in ts)).to(torch.bfloat16)

    def unpack():
        for t, piece in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(piece.view_as(t)).mul_(2.0)

    benchmark(unpack)


if __name__ == "__main__":
    main()
