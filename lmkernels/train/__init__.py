"""The GPT/Llama trainer behind `lmkernels-train` (also `python -m lmkernels.train`)."""
from lmkernels.train.config import TrainConfig, parse_args
from lmkernels.train.errors import CheckpointError, ConfigError, DataError, TrainingStopped
from lmkernels.train.loop import train

__all__ = ["CheckpointError", "ConfigError", "DataError", "TrainConfig", "TrainingStopped", "parse_args", "train"]
