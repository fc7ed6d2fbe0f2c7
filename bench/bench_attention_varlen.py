"""CPU benchmark of lmkernels.attention_varlen on a packed batch of documents, forward+backward,
against the two ways to do it with PyTorch's scaled_dot_product_attention:

    loop   one SDPA call per document (is_causal), outputs concatenated
    mask   one SDPA call on the whole packed row with a block-diagonal causal bool mask
           (total x total), what a trainer does without a varlen kernel

    PYTHONPATH=. python3 bench/bench_attention_varlen.py [--tokens 4096] [--reps 5]

Document lengths are drawn from a lognormal (median ~150 tokens, heavy tail) clipped to
[1, tokens], packed until `tokens` are filled (the last one cut). All three run alternately
in one process on the same inputs (bench/_timing.py); the table gives median ms, the ratios
(> 1: attention_varlen is faster) and attention_varlen's GFLOP/s: 4 * H * D * (visible
query-key pairs) forward, 2.5x that backward.
"""
import argparse
import platform
import subprocess

import torch
import torch.nn.functional as F

import lmkernels
from bench._timing import alternate


def document_lengths(tokens: int, seed: int, median: float = 150.0, sigma: float = 1.2) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths, total = [], 0
    while total < tokens:
        n = int(torch.empty(1).log_normal_(mean=float(torch.tensor(median).log()), std=sigma, generator=gen))
        n = max(1, min(n, tokens - total))
        lengths.append(n)
        total += n
    return lengths


def block_causal_mask(lengths: list[int]) -> torch.Tensor:
    """(total, total) bool: True where query i may see key j (same document, j <= i)."""
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    pos = torch.arange(len(doc))
    return (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])


def providers(q, k, v, lengths, g):
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    max_len = max(lengths)
    mask = block_causal_mask(lengths)
    H = q.shape[1]

    def ours():
        out = lmkernels.attention_varlen(q, k, v, cu, cu, max_len, max_len, is_causal=True)
        torch.autograd.grad(out, (q, k, v), g)

    def loop():
        outs = []
        for b in range(len(lengths)):
            s = slice(int(cu[b]), int(cu[b + 1]))
            qb, kb, vb = (t[s].transpose(0, 1) for t in (q, k, v))  # (H, T, D)
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, is_causal=True,
                                                       enable_gqa=H != k.shape[1]).transpose(0, 1))
        torch.autograd.grad(torch.cat(outs), (q, k, v), g)

    def masked():
        qb, kb, vb = (t.transpose(0, 1)[None] for t in (q, k, v))  # (1, H, total, D)
        out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=H != k.shape[1])
        torch.autograd.grad(out[0].transpose(0, 1), (q, k, v), g)

    return {"varlen": ours, "loop": loop, "mask": masked}


def flops(lengths, H, D) -> float:
    pairs = sum(n * (n + 1) // 2 for n in lengths)  # causal: visible (query, key) pairs
    return 4 * H * D * pairs * 3.5  # forward + 2.5x backward


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv_heads", type=int, default=8)
    ap.add_argument("--head_dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seeds", type=int, default=2, help="document-length draws")
    args = ap.parse_args()
    print(f"CPU: {cpu_model()}; torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}\n")
    print("| dtype | docs | longest | varlen ms | loop ms | mask ms | loop / varlen | mask / varlen | varlen GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for seed in range(args.seeds):
            lengths = document_lengths(args.tokens, seed)
            torch.manual_seed(seed)
            q = torch.randn(args.tokens, args.heads, args.head_dim, dtype=dtype, requires_grad=True)
            k = torch.randn(args.tokens, args.kv_heads, args.head_dim, dtype=dtype, requires_grad=True)
            v = torch.randn(args.tokens, args.kv_heads, args.head_dim, dtype=dtype, requires_grad=True)
            g = torch.randn_like(q)
            t = alternate(providers(q, k, v, lengths, g), args.reps, warmup=1)
            rate = flops(lengths, args.heads, args.head_dim) / t["varlen"] / 1e9
            print(f"| {str(dtype).replace('torch.', '')} | {len(lengths)} | {max(lengths)} | "
                  f"{t['varlen'] * 1e3:.1f} | {t['loop'] * 1e3:.1f} | {t['mask'] * 1e3:.1f} | "
                  f"{t['loop'] / t['varlen']:.2f}x | {t['mask'] / t['varlen']:.2f}x | {rate:.1f} |", flush=True)


if __name__ == "__main__":
    main()
