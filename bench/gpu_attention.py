"""GPU benchmark of lmkernels.attention (Triton FlashAttention-2) against SDPA's flash and
cuDNN backends: TFLOP/s for forward, backward and forward+backward, bf16; then varlen and
softcap against lmkernels.attention at the same total tokens.

    python3 bench/gpu_attention.py          # prints two markdown sections (~2 min on an H100)

FLOPs (as FlashAttention counts them): forward 4*B*H*T*T*D, halved when causal; backward
2.5x the forward; varlen sums 4*H*T_b*S_b*D over the sequences (causal: halved). Shapes:
B*T = 16k tokens, H*D = 2048 (a 2048-wide model), T in {1k, 4k, 16k}, D in {64, 128}. Times
are triton.testing.do_bench medians.

Varlen/softcap section (issue 12's target: varlen >= 0.9x lmkernels.attention), D = 128, causal,
16k tokens: (a) 16 sequences of 1024 packed, against dense B = 16, T = 1024 (same FLOPs);
(b) heavy-tailed lengths (Pareto, 16k tokens, seeded), TFLOP/s only (no dense equivalent);
(c) dense softcap = 30 against softcap = 0. The varlen section runs first: it is the new code.
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


def _time3(fwd, args, g):
    """(fwd ms, bwd ms, fwd+bwd ms) of fwd(*args) -> out, gradient g."""
    out = fwd(*args)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    t_fwd = triton.testing.do_bench(lambda: fwd(*args), warmup=5, rep=20)
    t_bwd = triton.testing.do_bench(lambda: out.backward(g, retain_graph=True), warmup=5, rep=20,
                                    grad_to_none=leaves)
    t_all = triton.testing.do_bench(lambda: fwd(*args).backward(g), warmup=5, rep=20, grad_to_none=leaves)
    return t_fwd, t_bwd, t_all


def _varlen_inputs(lengths, H, D):
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0).to(torch.int32)
    q, k, v = (torch.randn(sum(lengths), H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return q, k, v, cu


def heavy_tailed_lengths(total, seed=0, alpha=1.2, smallest=32, largest=8192):
    """Document lengths drawn from a Pareto distribution (many short, few long), summing to total."""
    gen = torch.Generator().manual_seed(seed)
    lengths = []
    while sum(lengths) < total:
        u = torch.rand((), generator=gen).item()
        lengths.append(int(min(largest, smallest / (1 - u) ** (1 / alpha))))
    lengths[-1] -= sum(lengths) - total
    return [n for n in lengths if n > 0]


def varlen_and_softcap():
    """Rows: (case, pass, TFLOP/s, reference TFLOP/s, ratio)."""
    D, H, causal = 128, WIDTH // 128, True
    rows = []
    tf = lambda flops, ms: flops / ms * 1e-9  # noqa: E731

    def varlen_fn(lengths):
        q, k, v, cu = _varlen_inputs(lengths, H, D)
        m = max(lengths)
        fn = lambda q, k, v: lmkernels.attention_varlen(q, k, v, cu, cu, m, m, is_causal=causal)  # noqa: E731
        flops = sum(4 * H * n * n * D * (0.5 if causal else 1.0) for n in lengths)
        return _time3(fn, (q, k, v), torch.randn_like(q)), flops

    def dense_fn(B, T, softcap=0.0):
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        fn = lambda q, k, v: lmkernels.attention(q, k, v, is_causal=causal, softcap=softcap)  # noqa: E731
        return _time3(fn, (q, k, v), torch.randn_like(q)), 4 * B * H * T * T * D * (0.5 if causal else 1.0)

    passes = ("fwd", "bwd", "fwd+bwd")
    factor = (1.0, 2.5, 3.5)
    dense_t, dense_flops = dense_fn(TOKENS // 1024, 1024)
    packed_t, packed_flops = varlen_fn([1024] * (TOKENS // 1024))
    for i, name in enumerate(passes):
        ours, ref = tf(factor[i] * packed_flops, packed_t[i]), tf(factor[i] * dense_flops, dense_t[i])
        rows.append(("varlen 16 x 1024 vs dense B=16 T=1024", name, ours, ref, ours / ref))
    mixed = heavy_tailed_lengths(TOKENS)
    mixed_t, mixed_flops = varlen_fn(mixed)
    for i, name in enumerate(passes):
        rows.append((f"varlen {len(mixed)} heavy-tailed docs (max {max(mixed)})", name,
                     tf(factor[i] * mixed_flops, mixed_t[i]), None, None))
    cap_t, cap_flops = dense_fn(TOKENS // 4096, 4096, softcap=30.0)
    plain_t, _ = dense_fn(TOKENS // 4096, 4096)
    for i, name in enumerate(passes):
        ours, ref = tf(factor[i] * cap_flops, cap_t[i]), tf(factor[i] * cap_flops, plain_t[i])
        rows.append(("dense softcap=30 vs softcap=0, B=4 T=4096", name, ours, ref, ours / ref))
    return rows


def main():
    print(f"## attention varlen and softcap (Triton), bf16, D=128, causal, {torch.cuda.get_device_name()}\n")
    print("| case | pass | TFLOP/s | reference TFLOP/s | ratio |")
    print("|---|---|---|---|---|")
    try:
        for case, pass_name, ours, ref, ratio in varlen_and_softcap():
            ref_cell = "-" if ref is None else f"{ref:.0f}"
            ratio_cell = "-" if ratio is None else f"{ratio:.2f}x"
            print(f"| {case} | {pass_name} | {ours:.0f} | {ref_cell} | {ratio_cell} |", flush=True)
    except (AttributeError, TypeError, RuntimeError) as e:  # an op missing or failing: say so, go on
        print(f"| varlen/softcap | FAILED | {type(e).__name__}: {str(e)[:200]} | | |", flush=True)
        failed = True
    else:
        failed = False
    print()
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
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
