"""The trainer's model choice (--model=gpt|llama), in one place: the nanoGPT-named options mapped
onto each model's config, building a model from a checkpoint's model_args, and its TP plan.

model_args (stored in every checkpoint) are the model config's own keyword arguments plus
"model": "gpt" or "llama"; checkpoints from before the choice existed have no "model" key and
hold a GPT.
"""
import torch.nn as nn

MODELS = ("gpt", "llama")
GPT_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias", "rotary")


def llama_intermediate_size(n_embd: int) -> int:
    """Llama's SwiGLU width, 8/3 of the model width (same MLP parameters as GPT's 4x GELU MLP),
    rounded up to a multiple of 64 (Llama rounds to 256, too coarse for tiny models)."""
    return -(-8 * n_embd // (3 * 64)) * 64


def model_args_from_config(cfg, vocab_size: int) -> dict:
    """The model config's keyword arguments (plus "model") that the trainer's options ask for."""
    if cfg.model == "gpt":
        return dict({k: getattr(cfg, k) for k in GPT_KEYS}, vocab_size=vocab_size, model="gpt")
    return dict(model="llama", vocab_size=vocab_size, hidden_size=cfg.n_embd,
                intermediate_size=llama_intermediate_size(cfg.n_embd), num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head or cfg.n_head,
                max_position_embeddings=cfg.block_size)


def model_kind(model_args: dict) -> str:
    return model_args.get("model", "gpt")


def config_args(model_args: dict) -> dict:
    return {k: v for k, v in model_args.items() if k != "model"}


def build_model(model_args: dict) -> nn.Module:
    """A freshly initialized model (uses the global RNG) of the kind model_args name."""
    kind = model_kind(model_args)
    if kind == "gpt":
        from lmkernels.models.gpt import GPT, GPTConfig

        return GPT(GPTConfig(**config_args(model_args)))
    if kind == "llama":
        from lmkernels.models.llama import Llama, LlamaConfig

        return Llama(LlamaConfig(**config_args(model_args)))
    raise ValueError(f"model_args: model must be one of {MODELS}; got {kind!r}")


def context_length(model_args: dict) -> int:
    return model_args["block_size"] if model_kind(model_args) == "gpt" else model_args["max_position_embeddings"]


def parallelize_model(model: nn.Module, model_args: dict, tp_group) -> nn.Module:
    """Applies the model's tensor-parallel plan (from outside the model) in place."""
    if model_kind(model_args) == "gpt":
        from lmkernels.distributed.tensor_parallel import parallelize_gpt

        return parallelize_gpt(model, tp_group)
    from lmkernels.distributed.llama_tp_plan import parallelize_llama

    return parallelize_llama(model, tp_group)
