"""Parts of GPT's step at bench_train's config, forward+backward, each with and without one cost:
- what a fused LayerNorm + residual add, or a fused bias + GELU, could save at most (the eager ops
  with and without the part a fusion would remove);
- attention on q, k, v that are views of c_attn's output (as GPT calls it) vs contiguous copies,
  lmkernels.attention next to SDPA (SDPA returns out and dq/dk/dv in the (B, T, H, D) memory order
  of such views, so the model's transpose/reshape and their backward are free; a contiguous
  (B, H, T, D) result costs copies there).

    PYTHONPATH=. python3 bench/bench_gpt_parts.py [--reps 30]

Shapes: the residual stream (12, 64, 128) and the MLP's (768, 512) pre-activation, fp32, 1 thread.
Time: thread CPU time (a machine shared with other jobs disturbs it far less than wall clock),
median over alternating repetitions in one process. The upper bound of a fusion's saving per call
is the difference of the two rows of a pair; a GPT step has 8 residual adds (4 layers x 2) and 4
bias + GELU.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import lmkernels

B, T, C, HIDDEN, N_HEAD = 12, 64, 128, 512, 4


def cases():
    x, a = torch.randn(B, T, C, requires_grad=True), torch.randn(B, T, C, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    g = torch.randn(B, T, C)
    xin = torch.randn(B * T, C, requires_grad=True)
    weight, bias = 0.02 * torch.randn(HIDDEN, C), torch.zeros(HIDDEN, requires_grad=True)
    gh = torch.randn(B * T, HIDDEN)

    def add_then_layer_norm():  # GPT today: x = x + attn(...); ln_2(x), both outputs used
        s = x + a
        torch.autograd.grad((F.layer_norm(s, (C,), w, b), s), (x, a, w, b), (g, g))

    def layer_norm_alone():
        torch.autograd.grad(F.layer_norm(x, (C,), w, b), (x, w, b), g)

    def linear_bias_gelu():  # GPT today: c_fc (addmm with bias), then GELU
        torch.autograd.grad(F.gelu(F.linear(xin, weight, bias)), (xin, bias), gh)

    def linear_gelu_no_bias():
        torch.autograd.grad(F.gelu(F.linear(xin, weight)), (xin,), gh)

    def gelu_alone():
        h = F.linear(xin, weight).detach().requires_grad_()
        torch.autograd.grad(F.gelu(h), (h,), gh)

    qkv = torch.randn(B, T, 3 * C, requires_grad=True)

    def heads():  # as GPT's CausalSelfAttention: (B, nh, T, hs) views of c_attn's output
        return [t.view(B, T, N_HEAD, -1).transpose(1, 2) for t in qkv.chunk(3, dim=-1)]

    contiguous = [t.detach().contiguous().requires_grad_() for t in heads()]
    gy = torch.randn(B, T, C)

    def attention_case(fn, views: bool):
        def run():
            q, k, v = heads() if views else contiguous
            y = fn(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)  # as GPT
            torch.autograd.grad(y, (qkv,) if views else contiguous, gy)
        return run

    return dict(add_then_layer_norm=add_then_layer_norm, layer_norm_alone=layer_norm_alone,
                linear_bias_gelu=linear_bias_gelu, linear_gelu_no_bias=linear_gelu_no_bias,
                gelu_alone=gelu_alone,
                lmkernels_attention_on_c_attn_views=attention_case(lmkernels.attention, True),
                lmkernels_attention_on_contiguous=attention_case(lmkernels.attention, False),
                sdpa_on_c_attn_views=attention_case(F.scaled_dot_product_attention, True),
                sdpa_on_contiguous=attention_case(F.scaled_dot_product_attention, False))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    fns = cases()
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(args.reps):
        for name, fn in fns.items():
            for _ in range(5):
                t0 = time.thread_time()
                fn()
                times[name].append(time.thread_time() - t0)
    print("| forward + backward, 1 thread | us (thread CPU time, median) |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {1e6 * statistics.median(t):.0f} |")


if __name__ == "__main__":
    main()
