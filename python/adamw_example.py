"""FusedAdamW in a plain PyTorch training loop: fit a small MLP to a noisy sine, with
torch.optim.AdamW trained side by side from the same start to show they agree.

    python python/adamw_example.py [--steps 300] [--bf16-master]
"""
import argparse
import copy
import time

import torch

from lmkernels.optim import FusedAdamW


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bf16-master", action="store_true", help="bf16 model with fp32 master weights")
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.linspace(-3, 3, 512).unsqueeze(1)
    y = torch.sin(2 * x) + 0.05 * torch.randn_like(x)
    model = torch.nn.Sequential(torch.nn.Linear(1, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                                torch.nn.GELU(), torch.nn.Linear(64, 1))
    reference = copy.deepcopy(model)
    if args.bf16_master:
        model = model.to(torch.bfloat16)
    opt = FusedAdamW(model.parameters(), lr=3e-3, weight_decay=0.01, master_weights=args.bf16_master)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=3e-3, weight_decay=0.01)
    t_ours = t_ref = 0.0
    for step in range(args.steps):
        for m, o, which in ((model, opt, "ours"), (reference, ref_opt, "ref")):
            t0 = time.perf_counter()
            loss = torch.nn.functional.mse_loss(m(x.to(next(m.parameters()).dtype)).float(), y)
            o.zero_grad(set_to_none=True)
            loss.backward()
            o.step()
            dt = time.perf_counter() - t0
            if which == "ours":
                t_ours, ours_loss = t_ours + dt, loss.item()
            else:
                t_ref, ref_loss = t_ref + dt, loss.item()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss FusedAdamW {ours_loss:.5f}  torch AdamW {ref_loss:.5f}")
    print(f"time per step: FusedAdamW {1e3 * t_ours / args.steps:.2f} ms, torch AdamW {1e3 * t_ref / args.steps:.2f} ms")


if __name__ == "__main__":
    main()
