"""What a fused LayerNorm + residual add, or a fused bias + GELU, could save GPT at bench_train's
config at most: the eager ops' forward+backward with and without the part a fusion would remove.

    PYTHONPATH=. python3 bench/bench_gpt_fusion_bounds.py [--reps 30]

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

B, T, C, HIDDEN = 12, 64, 128, 512


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

    return dict(add_then_layer_norm=add_then_layer_norm, layer_norm_alone=layer_norm_alone,
                linear_bias_gelu=linear_bias_gelu, linear_gelu_no_bias=linear_gelu_no_bias,
                gelu_alone=gelu_alone)


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
