"""Data-parallel training with BucketedDataParallel, launched with torchrun.

    torchrun --nproc_per_node=2 python/dp_example.py                  # CPU, gloo
    torchrun --nproc_per_node=8 python/dp_example.py --backend nccl   # one GPU per process

Each rank trains on its own shard of a synthetic next-token task; the gradient all-reduce
runs bucket by bucket while backward is still computing, and backward returns once the buckets
still in flight are done, so optimizer.step() sees averaged gradients. Prints the loss, the step time and the exposed communication.
"""
import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lmkernels.distributed import BucketedDataParallel


class TinyLM(nn.Module):
    def __init__(self, vocab=256, dim=128, layers=4):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(
            [nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
             for _ in range(layers)])
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.emb.weight  # tied: counted once by BucketedDataParallel
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, idx, targets):  # idx, targets: (B, T)
        x = self.emb(idx)
        for layer in self.layers:
            x = x + layer(x)
        return F.cross_entropy(self.head(x).flatten(0, 1), targets.flatten())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--accumulate", type=int, default=2, help="micro-batches per step (no_sync)")
    ap.add_argument("--bucket-cap-mb", type=float, default=1.0)
    args = ap.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda")
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    torch.manual_seed(rank)  # different on purpose: construction broadcasts rank 0's weights
    model = BucketedDataParallel(TinyLM().to(device), bucket_cap_mb=args.bucket_cap_mb)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1234 + rank)  # each rank its own data
    for step in range(args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        for micro in range(args.accumulate):
            # A learnable pattern: the next token is the current one plus one.
            idx = torch.randint(0, 255, (16, 32), generator=gen).to(device)
            sync = micro == args.accumulate - 1  # only the last micro-batch communicates
            with (model.no_sync() if not sync else torch.enable_grad()):
                loss = model(idx, (idx + 1) % 256) / args.accumulate
                loss.backward()
        optimizer.step()  # the gradients were averaged as the last backward ended
        if step % 10 == 0 or step == args.steps - 1:
            model.verify_replicas()  # every rank holds the same weights
            tl = model.last_timeline
            if rank == 0:
                print(f"step {step:3d}  loss {loss.item() * args.accumulate:.3f}  "
                      f"{(time.perf_counter() - start) * 1e3:6.1f} ms  buckets {len(tl.buckets)}  "
                      f"exposed comm {tl.exposed_comm() * 1e3:5.2f} ms", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
