"""Distributed training: bucketed data parallelism (overlapping all-reduce with backward),
the overlapped per-bucket optimizer, tensor parallelism and the DP x TP mesh."""
from lmkernels.distributed.data_parallel import BucketedDataParallel
from lmkernels.distributed.overlap import OverlappedOptimizer
from lmkernels.distributed.sharded_adamw import ShardedAdamW
from lmkernels.distributed.sharded_data_parallel import ShardedDataParallel
from lmkernels.distributed.timeline import StepTimeline, plot_timeline

__all__ = ["BucketedDataParallel", "OverlappedOptimizer", "ShardedAdamW", "ShardedDataParallel",
           "StepTimeline", "plot_timeline"]
