"""GPU benchmark of lmkernels.attention (Triton FlashAttention-2) against SDPA's flash and
cuDNN backends: TFLOP/s for forward, backward and forward+backward, bf16.

    python3 bench/gpu_attention.py          # prints one markdown section (~90 s on an H100)

FLOPs (as FlashAttention counts them): forward 4*B*H*T*T*D, halved when causal; backward
2.5x the forward. Shapes: B*T = 16k tokens, H*D = 2048 (a 2048-wide model), T in {1k, 4k,
16k}, D in {64, 128}. Times are triton.testing.do_bench medians.
"""
import math

import torch
import torch.nn.functional as F
import triton

import lmkernels

PEAK_BF16 = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core TFLOP/s (SXM)
TOKENS, WIDTH = 16384, 2048


def peak_tflops():
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def providers():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(q, k, v, causal):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return run

    return {
        "ours": lambda q, k, v, causal: lmkernels.attention(q, k, v, is_causal=causal),
        "flash": sdpa(SDPBackend.FLASH_ATTENTION),
        "cudnn": sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def measure(fn, T, D, causal):
    B, H = TOKENS // T, WIDTH // D
    q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    g = torch.randn_like(q)
    flops_fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    try:
        out = fn(q, k, v, causal)
        t_fwd = triton.testing.do_bench(lambda: fn(q, k, v, causal), warmup=5, rep=20)
        t_bwd = triton.testing.do_bench(lambda: out.backward(g, retain_graph=True), warmup=5, rep=20,
                                        grad_to_none=[q, k, v])
        t_all = triton.testing.do_bench(lambda: fn(q, k, v, causal).backward(g), warmup=5, rep=20,
                                        grad_to_none=[q, k, v])
    except RuntimeError:  # backend not available for this shape / build
        return None
    tf = lambda flops, ms: flops / ms * 1e-9  # noqa: E731  (ms -> TFLOP/s)
    return tf(flops_fwd, t_fwd), tf(2.5 * flops_fwd, t_bwd), tf(3.5 * flops_fwd, t_all)


def main():
    peak = peak_tflops()
    impls = providers()
    print(f"## attention (Triton FlashAttention-2), bf16, {torch.cuda.get_device_name()}\n")
    print(f"torch {torch.__version__}, triton {triton.__version__}; B*T = {TOKENS}, H*D = {WIDTH}; "
          f"TFLOP/s (fwd 4BHT^2D, /2 causal; bwd 2.5x){'; peak ' + str(peak) if peak else ''}\n")
    print("| T | D | causal | pass | ours | % peak | SDPA flash | SDPA cuDNN | ours / flash |")
    print("|---|---|---|---|---|---|---|---|---|")
    for T in (1024, 4096, 16384):
        for D in (64, 128):
            for causal in (False, True):
                res = {name: measure(fn, T, D, causal) for name, fn in impls.items()}
                for i, pass_name in enumerate(("fwd", "bwd", "fwd+bwd")):
                    cell = lambda name: "n/a" if res[name] is None else f"{res[name][i]:.0f}"  # noqa: E731
                    ours = res["ours"][i] if res["ours"] else math.nan
                    pct = f"{100 * ours / peak:.0f}%" if peak else "-"
                    ratio = f"{ours / res['flash'][i]:.2f}x" if res["flash"] else "-"
                    print(f"| {T} | {D} | {causal} | {pass_name} | {cell('ours')} | {pct} | "
                          f"{cell('flash')} | {cell('cudnn')} | {ratio} |", flush=True)


if __name__ == "__main__":
    main()
