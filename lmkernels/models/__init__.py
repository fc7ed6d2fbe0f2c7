"""Models. No parallel code inside: see lmkernels.distributed.tensor_parallel for TP."""
from lmkernels.models.gpt import GPT, GPTConfig
from lmkernels.models.llama import Llama, LlamaConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig"]
