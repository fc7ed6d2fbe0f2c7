"""CPU benchmark of the Llama-class ops against their eager PyTorch compositions, fwd+bwd.

    PYTHONPATH=. python3 bench/bench_llama_ops.py            # markdown ratio table
    PYTHONPATH=. python3 -m pytest bench/bench_llama_ops.py  # pytest-benchmark timings

Eager baselines are what HF Llama runs today: LlamaRMSNorm.forward (and `x + residual` before
it), apply_rotary_pos_emb with rotate_half, F.silu(gate) * up. Both sides run alternately in one
process on the same inputs (bench/_timing.py); the table gives median ms, eager / ours (> 1:
ours is faster), and our rate in GB/s of compulsory traffic (each input read once, each
output written once, forward and backward) next to a streaming copy measured in the same run.
"""
import argparse
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lmkernels  # noqa: E402
from bench._timing import alternate, streaming_bandwidth  # noqa: E402
from lmkernels.reference.rms_norm import add_rms_norm_reference, rms_norm_reference  # noqa: E402
from lmkernels.reference.rotary_embedding import rotary_embedding_reference  # noqa: E402
from lmkernels.reference.swiglu import swiglu_reference  # noqa: E402

TOKENS, HIDDEN, INTERMEDIATE = 4096, 1024, 2816
ROPE = (4, 16, 512, 64)  # B, H, T, D (k has the same heads here)
DTYPES = (torch.float32, torch.bfloat16)


def _fwd_bwd(fn, inputs, grads):
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, inputs, grads)
    return step


def cases(dtype):
    """name -> (ours step, eager step, bytes moved by ours fwd+bwd)."""
    e = torch.tensor([], dtype=dtype).element_size()
    out = {}
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype, requires_grad=True)
    r = torch.randn(TOKENS, HIDDEN, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(HIDDEN)).to(dtype).requires_grad_()
    g = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    n = TOKENS * HIDDEN
    # fwd: read x, write out; bwd: read x, g, write dx.
    out["rms_norm"] = (_fwd_bwd(lambda a, b: lmkernels.rms_norm(a, b), (x, w), (g,)),
                       _fwd_bwd(lambda a, b: rms_norm_reference(a, b), (x, w), (g,)), 5 * n * e)
    # fwd: read x, r, write out, sum; bwd: read sum, g, g_sum, write dx.
    out["add_rms_norm"] = (_fwd_bwd(lambda a, b, c: lmkernels.add_rms_norm(a, b, c), (x, r, w), (g, g)),
                           _fwd_bwd(lambda a, b, c: add_rms_norm_reference(a, b, c), (x, r, w), (g, g)),
                           8 * n * e)
    B, H, T, D = ROPE
    q = torch.randn(B, H, T, D, dtype=dtype, requires_grad=True)
    k = torch.randn(B, H, T, D, dtype=dtype, requires_grad=True)
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    emb = torch.arange(T).float()[:, None] * inv
    emb = torch.cat((emb, emb), -1)[None].expand(B, T, D)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)
    nq = q.numel()
    out["rotary_embedding"] = (
        _fwd_bwd(lambda a, b: lmkernels.rotary_embedding(a, b, cos, sin), (q, k), (gq, gk)),
        _fwd_bwd(lambda a, b: rotary_embedding_reference(a, b, cos, sin), (q, k), (gq, gk)),
        8 * nq * e)  # q, k in and out, twice
    gate = torch.randn(TOKENS, INTERMEDIATE, dtype=dtype, requires_grad=True)
    up = torch.randn(TOKENS, INTERMEDIATE, dtype=dtype, requires_grad=True)
    gs = torch.randn(TOKENS, INTERMEDIATE, dtype=dtype)
    ni = gate.numel()
    # fwd: read gate, up, write out; bwd: read g, gate, up, write dgate, dup.
    out["swiglu"] = (_fwd_bwd(lambda a, b: lmkernels.swiglu(a, b), (gate, up), (gs,)),
                     _fwd_bwd(lambda a, b: swiglu_reference(a, b), (gate, up), (gs,)), 8 * ni * e)
    return out


TARGETS = {"rms_norm": 1.5, "add_rms_norm": 1.5, "rotary_embedding": 2.0, "swiglu": 1.3}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    copy = streaming_bandwidth()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"{torch.backends.cpu.get_cpu_capability()}; streaming copy {copy / 1e9:.1f} GB/s\n")
    print(f"sizes: {TOKENS} tokens x {HIDDEN} hidden (norms), x {INTERMEDIATE} (swiglu); "
          f"rotary q and k {ROPE}\n")
    print("| op | dtype | ours ms | eager ms | eager / ours | target | ours GB/s |")
    print("|---|---|---|---|---|---|---|")
    for dtype in DTYPES:
        for name, (ours, eager, nbytes) in cases(dtype).items():
            t = alternate({"ours": ours, "eager": eager}, args.reps)
            print(f"| {name} | {str(dtype).replace('torch.', '')} | {t['ours'] * 1e3:.2f} | "
                  f"{t['eager'] * 1e3:.2f} | {t['eager'] / t['ours']:.2f}x | {TARGETS[name]}x | "
                  f"{nbytes / t['ours'] / 1e9:.1f} |", flush=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("name", list(TARGETS))
@pytest.mark.parametrize("impl", ("ours", "eager"))
def test_bench(benchmark, impl, name, dtype):
    ours, eager, _ = cases(dtype)[name]
    benchmark(ours if impl == "ours" else eager)


if __name__ == "__main__":
    main()
