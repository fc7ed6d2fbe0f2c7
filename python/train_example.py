"""Train a small GPT on the default corpus from Python, then sample from its checkpoint.

    PYTHONPATH=. python3 python/train_example.py            # about a minute on a 2-core CPU
    torchrun --nproc_per_node 4 python/train_example.py --tp 2   # 2 (data) x 2 (tensor) parallel

The same as `lmkernels-train --max_iters=300 --out_dir=out-example` on the command line; every
option of TrainConfig (nanoGPT's names) can be given here or as --name=value.
"""
import sys

import torch  # noqa: F401

import lmkernels  # noqa: F401
from lmkernels.train import parse_args, train
from lmkernels.train.sample import main as sample


def main():
    cfg = parse_args(["--max_iters=300", "--eval_interval=100", "--out_dir=out-example", "--sample_tokens=0",
                      *sys.argv[1:]])
    records = train(cfg)
    if records and records[0]["iter"] == 0:  # rank 0 of a run from scratch
        first, last = records[0]["loss"], sum(r["loss"] for r in records[-20:]) / len(records[-20:])
        print(f"loss {first:.3f} -> {last:.3f} over {len(records)} iterations")
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_rank() == 0:
        sample([f"--out_dir={cfg.out_dir}", "--max_new_tokens=200", "--start=def "])
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
