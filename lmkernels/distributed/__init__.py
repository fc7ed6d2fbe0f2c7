"""Distributed training: bucketed data parallelism (overlapping all-reduce with backward)."""
from lmkernels.distributed.data_parallel import BucketedDataParallel
from lmkernels.distributed.timeline import StepTimeline, plot_timeline

__all__ = ["BucketedDataParallel", "StepTimeline", "plot_timeline"]
