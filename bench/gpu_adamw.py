"""GPU benchmark of fused_adamw_ (CUDA C++ and Triton) vs torch.optim.AdamW(fused=True).

100M fp32 params (10 tensors of 10M, and GPT-2-small shapes); an AdamW step moves 28 bytes
per param, compared with a device-to-device copy measured in the same run (2 x bytes moved).
Prints one markdown section. Run on a GPU machine: python3 bench/gpu_adamw.py
"""
import torch
import triton

import lmkernels
from lmkernels._extension import has_cuda_kernels

try:
    from bench.bench_adamw import gpt_shapes
except ImportError:  # run as a script from bench/
    from bench_adamw import gpt_shapes


def bench_case(name, shapes, copy_gbs):
    params = [torch.randn(s, device="cuda") for s in shapes]
    grads = [torch.randn_like(p) * 1e-3 for p in params]
    n = sum(p.numel() for p in params)
    states = lambda: ([torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params],  # noqa: E731
                      [torch.ones((), device="cuda") for _ in params])
    rows = []
    backends = ["triton"] + (["cuda"] if has_cuda_kernels() else [])
    for backend in backends:
        m, v, s = states()
        ms = triton.testing.do_bench(lambda: lmkernels.fused_adamw_(params, grads, m, v, s, lr=1e-4, weight_decay=0.1, backend=backend))
        rows.append((f"lmkernels {backend}", ms))
    tparams = [torch.nn.Parameter(p.clone()) for p in params]
    for p, g in zip(tparams, grads):
        p.grad = g
    opt = torch.optim.AdamW(tparams, lr=1e-4, weight_decay=0.1, fused=True)
    opt.step()
    rows.append(("torch fused", triton.testing.do_bench(opt.step)))
    torch_ms = rows[-1][1]
    out = []
    for label, ms in rows:
        gbs = 28 * n / ms / 1e6
        out.append(f"| {name} | {n / 1e6:.0f}M / {len(shapes)} | {label} | {ms:.3f} | {gbs:.0f} | "
                   f"{100 * gbs / copy_gbs:.0f}% | {torch_ms / ms:.2f}x |")
    return out


def main():
    x = torch.empty(100 * 2**20, device="cuda")  # 400 MB
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x))
    copy_gbs = 2 * x.numel() * 4 / copy_ms / 1e6
    del x, y
    print(f"## FusedAdamW step ({torch.cuda.get_device_name()})\n")
    print(f"Device-to-device copy (400 MB, same run): {copy_gbs:.0f} GB/s. Targets: >= 90% of copy, >= 1.0x torch fused.\n")
    print("| case | params / tensors | impl | ms | GB/s | % of copy | vs torch fused |")
    print("|---|---|---|---|---|---|---|")
    for line in bench_case("10 x 10M", [(10_000_000,)] * 10, copy_gbs):
        print(line)
    for line in bench_case("GPT-2 small", gpt_shapes(12, 768, 50257, 1024), copy_gbs):
        print(line)
    print()


if __name__ == "__main__":
    main()
