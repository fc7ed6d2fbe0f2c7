"""The GPT trainer behind `lmkernels-train` (also `python -m lmkernels.train`)."""
from lmkernels.train.config import ConfigError, TrainConfig, parse_args
from lmkernels.train.loop import train

__all__ = ["ConfigError", "TrainConfig", "parse_args", "train"]
