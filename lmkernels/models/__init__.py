"""Models. No parallel code inside: see lmkernels.distributed.tensor_parallel for TP."""
from lmkernels.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
