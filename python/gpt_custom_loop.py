"""Your own training loop with lmkernels' pieces: the GPT, tensor parallelism applied from
outside, bucketed data parallelism, FusedAdamW and the global-norm clip.

    PYTHONPATH=. python3 python/gpt_custom_loop.py                      # one process
    torchrun --nproc_per_node 4 python/gpt_custom_loop.py --tp 2        # dp 2 x tp 2 (gloo on CPU)

What each piece does is in its docstring; lmkernels-train (lmkernels/train/loop.py) is the same
loop plus evaluation, checkpoints and metrics.
"""
import argparse
import math
import os
import time

import torch
import torch.distributed as dist

import lmkernels  # noqa: F401
from lmkernels.distributed.mesh import init_mesh
from lmkernels.distributed.tensor_parallel import parallelize_gpt
from lmkernels.distributed.tp_utils import clip_grad_norm_
from lmkernels.models import GPT, GPTConfig
from lmkernels.optim import FusedAdamW
from lmkernels.train.data import BatchSampler, prepare_data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")
    mesh = init_mesh(args.tp)  # DP x TP process groups (DeviceMesh)
    data = prepare_data([], "byte", verbose=mesh.is_main)  # the default corpus, cached
    sampler = BatchSampler(data, block_size=64, batch_size=8, seed=0, dp_rank=mesh.dp_rank, dp_size=mesh.dp_size)

    torch.manual_seed(0)  # every rank builds the same model, then keeps its shard
    model = GPT(GPTConfig(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=data.vocab_size))
    if mesh.tp_size > 1:
        parallelize_gpt(model, mesh.tp_group)  # Megatron split, heads across ranks
    net = model
    if mesh.dp_size > 1:
        from lmkernels.distributed import BucketedDataParallel

        net = BucketedDataParallel(model, process_group=mesh.dp_group)
    optimizer = FusedAdamW(model.configure_optimizer_groups(0.1), lr=args.lr, betas=(0.9, 0.99))

    t0 = time.perf_counter()
    for step in range(args.steps):
        x, y = sampler.get_batch("train", step)
        _, loss = net(x, y)
        loss.backward()  # DP all-reduces overlap this; it returns with averaged gradients
        norm = clip_grad_norm_(model.parameters(), 1.0, mesh.tp_group)  # true global norm
        optimizer.step()
        optimizer.zero_grad(set_to_none=net is model)
        if mesh.is_main and (step % 20 == 0 or step == args.steps - 1):
            print(f"step {step}: loss {loss.item():.4f} (perplexity {math.exp(loss.item()):.1f}), "
                  f"grad norm {norm.item():.3f}, {time.perf_counter() - t0:.1f}s")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
