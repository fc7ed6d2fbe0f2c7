"""GPU check of BucketedDataParallel: the NCCL path at world size 1 (every rank's code runs:
hooks, bucket ops on the GPU, ReduceOp.AVG, the sync at the end of backward), gradients within
the float64 rule (at most twice DDP's error), step times against DDP and all-reduce-after-backward, and the bucket ops' bandwidth.

    python3 bench/gpu_dp.py      # prints one markdown section; about 60 s on an H100

At world size 1 NCCL moves no data between GPUs, so the step times show our overhead on the
compute path (hooks, casts, scale) rather than overlap; overlap needs several GPUs.
"""
import copy
import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main():
    import triton
    from triton.testing import do_bench

    import lmkernels
    from bench_dp import BenchGPT
    from lmkernels.distributed import BucketedDataParallel
    from lmkernels.ops.bucket import bucket_pack_, bucket_unpack_
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.cuda.set_device(0)
    store = dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=60))
    dist.init_process_group("nccl", store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    dev = torch.device("cuda")
    name = torch.cuda.get_device_name()
    lines = [f"## Data parallel (NCCL, world size 1) on {name}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, "
             f"lmkernels CUDA kernels: {lmkernels.build_info()['compiled_backends']}", ""]

    # Correctness, with a tolerance from the math rather than bit equality (attention's and the
    # embedding's CUDA backward are not deterministic, so even DDP differs from itself run to
    # run): per tensor, the error against float64 gradients may be at most twice DDP's error
    # plus one fp32 rounding of the gradient's magnitude, plus one bf16 rounding (2^-8 of the
    # magnitude bounds it) when the wire is bf16.
    torch.manual_seed(0)
    base = BenchGPT(8192, 1024, 8, 16, 256).to(dev)
    idx = torch.randint(0, 8192, (8, 256), device=dev)
    tgt = torch.roll(idx, -1, 1)
    ddp = DDP(copy.deepcopy(base), device_ids=[0], bucket_cap_mb=25)
    ref64 = copy.deepcopy(base).double()
    ref64(idx, tgt).backward()
    rows = []
    for reduce_dtype in (None, torch.bfloat16):
        ours = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=25, reduce_dtype=reduce_dtype)
        assert ours._reduce_op == dist.ReduceOp.AVG, "NCCL must average inside the reduction"
        for _ in range(2):  # the second step runs on the rebuilt buckets
            ours.zero_grad(set_to_none=False)
            ddp.zero_grad(set_to_none=False)
            ours(idx, tgt).backward()
            ddp(idx, tgt).backward()
        wire = 0.0 if reduce_dtype is None else 2.0 ** -8
        worst, worst_name = 0.0, ""
        for (name, p), q, r in zip(ours.module.named_parameters(), ddp.module.parameters(),
                                   ref64.parameters()):
            g64 = r.grad
            err = (p.grad.double() - g64).abs().max().item()
            limit = (2 * (q.grad.double() - g64).abs().max().item()
                     + (torch.finfo(torch.float32).eps + wire) * g64.abs().max().item())
            if err / max(limit, 1e-300) > worst:
                worst, worst_name = err / max(limit, 1e-300), name
        status = "ok" if worst <= 1.0 else "FAIL"
        rows.append(f"| gradients vs float64, reduce_dtype={reduce_dtype} | worst error / limit "
                    f"{worst:.2f} ({worst_name}) | {status} |")
    del ref64
    lines += ["| check | result | |", "|---|---|---|", *rows, ""]

    # Step times (forward + backward + sync), do_bench medians.
    ours = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=25)
    after = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=25, record_timeline=False)

    def step_ours():
        ours(idx, tgt).backward()  # ends synchronized

    def step_ddp():
        ddp(idx, tgt).backward()

    def step_after():
        with after.no_sync():
            after(idx, tgt).backward()
        for b in after._buckets:
            dist.all_reduce(b.grads, op=dist.ReduceOp.AVG)

    def step_local():
        with ours.no_sync():
            ours(idx, tgt).backward()

    ms = {}
    for key, fn in (("ours", step_ours), ("ddp", step_ddp), ("after", step_after), ("local", step_local)):
        ms[key] = do_bench(fn, warmup=50, rep=300, return_mode="median")
    nparam = sum(p.numel() for p in base.parameters())
    lines += [f"Model: GPT 8 layers, dim 1024, vocab 8192, batch 8x256; {nparam / 1e6:.0f} M params, "
              f"{len(ours.bucket_layout)} buckets of <= 25 MiB.", "",
              "| step | ms | vs DDP |", "|---|---|---|"]
    for key, label in (("ours", "BucketedDataParallel"), ("ddp", "torch DDP"),
                       ("after", "all-reduce after backward"), ("local", "no communication")):
        lines.append(f"| {label} | {ms[key]:.2f} | {ms[key] / ms['ddp']:.3f} |")
    lines.append("")

    # Bucket ops: fp32 gradients -> bf16 wire buffer and back, against a same-size copy.
    grads = [torch.randn(n, device=dev) for n in [4096 * 1024, 1024 * 3072, 1024, 17, 1024 * 4096] * 8]
    total = sum(g.numel() for g in grads)
    flat = torch.empty(total, dtype=torch.bfloat16, device=dev)
    src, dst = torch.empty(total, device=dev), torch.empty(total, device=dev)
    t_copy = do_bench(lambda: dst.copy_(src), warmup=20, rep=200, return_mode="median")
    t_pack = do_bench(lambda: bucket_pack_(grads, flat, 0.5), warmup=20, rep=200, return_mode="median")
    t_unpack = do_bench(lambda: bucket_unpack_(flat, grads, 2.0), warmup=20, rep=200, return_mode="median")
    t_torch = do_bench(lambda: flat.copy_(torch.cat(grads).mul_(0.5)), warmup=20, rep=200, return_mode="median")
    moved = total * (4 + 2)  # read fp32, write bf16
    gbps = lambda t, nbytes: nbytes / t / 1e6  # noqa: E731  (t in ms)
    lines += [f"Bucket ops over {len(grads)} tensors, {total / 1e6:.0f} M elements (fp32 <-> bf16):", "",
              "| op | ms | GB/s | vs fp32 copy's GB/s | vs torch cat+mul+cast |", "|---|---|---|---|---|",
              f"| fp32 copy (limit) | {t_copy:.3f} | {gbps(t_copy, total * 8):.0f} | 1.00 | |",
              f"| bucket_pack_ | {t_pack:.3f} | {gbps(t_pack, moved):.0f} | "
              f"{gbps(t_pack, moved) / gbps(t_copy, total * 8):.2f} | {t_torch / t_pack:.2f}x faster |",
              f"| bucket_unpack_ | {t_unpack:.3f} | {gbps(t_unpack, moved):.0f} | "
              f"{gbps(t_unpack, moved) / gbps(t_copy, total * 8):.2f} | |", ""]
    print("\n".join(lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
