"""Trainer options: nanoGPT's names, plain values with defaults, one place for their checks.

The defaults train a small byte-level GPT on the default corpus in a couple of minutes on a
2-core CPU. Command line: `--name=value` or `--name value` (nanoGPT's style).
"""
import argparse
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import List

from lmkernels.train.errors import ConfigError


@dataclass
class TrainConfig:
    # model
    model: str = field(default="gpt", metadata={
        "help": "gpt (LayerNorm, GELU, tied embedding) or llama (RMSNorm, rotary, SwiGLU, GQA, no biases; "
                "n_layer/n_head/n_embd/block_size map onto its num_hidden_layers/num_attention_heads/"
                "hidden_size/max_position_embeddings, intermediate_size = 8/3 n_embd rounded up to 64)"})
    n_layer: int = field(default=4, metadata={"help": "Transformer blocks"})
    n_head: int = field(default=4, metadata={"help": "attention heads (divisible by tp)"})
    n_kv_head: int = field(default=0, metadata={
        "help": "llama: key/value heads (grouped-query attention; divides n_head). 0: n_head"})
    n_embd: int = field(default=128, metadata={"help": "model width (divisible by n_head)"})
    block_size: int = field(default=64, metadata={"help": "context length in tokens"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on embeddings and residual branches (gpt only)"})
    bias: bool = field(default=True, metadata={"help": "biases in Linear and LayerNorm (gpt; llama has none)"})
    rotary: bool = field(default=False, metadata={"help": "rotary positions instead of learned ones (gpt; llama is always rotary)"})
    vocab_size: int = field(default=0, metadata={"help": "0: the tokenizer's; larger pads the vocabulary"})
    # data
    data: List[str] = field(default_factory=list, metadata={
        "help": "text files or directories (default: this Python's standard-library sources)"})
    tokenizer: str = field(default="byte", metadata={"help": "byte or char"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of tokens held out for validation"})
    data_cache: str = field(default="", metadata={"help": "token cache directory (default ~/.cache/lmkernels/data)"})
    doc_separator: str = field(default="", metadata={
        "help": "splits text files into documents at this string (dropped); empty: each file is one document"})
    # on by default: as fast as unpacked on CPU (bench/results/pack-cpu.md: 1.02x step by step)
    pack_documents: bool = field(default=True, metadata={
        "help": "each document in a batch window is its own sequence: attention stays inside it "
                "(lmkernels.attention_varlen), positions restart at 0, and the first token of a document is "
                "not predicted from the previous one (false: windows run across document boundaries)"})
    # optimization
    batch_size: int = field(default=12, metadata={"help": "sequences per micro-step per data-parallel rank"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-steps per iteration (per rank)"})
    max_iters: int = field(default=1000, metadata={"help": "optimizer steps"})
    learning_rate: float = field(default=2e-3, metadata={"help": "peak learning rate"})
    min_lr: float = field(default=2e-4, metadata={"help": "learning rate at the end of the cosine decay"})
    warmup_iters: int = field(default=50, metadata={"help": "linear warm-up steps"})
    lr_decay_iters: int = field(default=0, metadata={"help": "end of the cosine decay (0: max_iters)"})
    decay_lr: bool = field(default=True, metadata={"help": "warm-up then cosine decay (else constant)"})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (matrices only)"})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    beta2: float = field(default=0.99, metadata={"help": "AdamW beta2"})
    grad_clip: float = field(default=1.0, metadata={"help": "clip the global gradient norm (0: off)"})
    max_nonfinite_steps: int = field(default=0, metadata={
        "help": "consecutive steps with a NaN/inf loss skipped (no weight update) before training stops"})
    # parallelism and hardware
    tp: int = field(default=1, metadata={"help": "tensor-parallel size; data-parallel size = world / tp"})
    zero: int = field(default=0, metadata={
        "help": "sharded data parallel: 0 all-reduce (every rank holds everything), 1 optimizer state "
                "sharded over the DP ranks, 2 gradients too (reduce-scatter)"})
    device: str = field(default="auto", metadata={"help": "auto, cpu, cuda or cuda:N"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16"})
    threads: int = field(default=0, metadata={"help": "CPU threads per process (0: torch's default, or 1 when "
                                                       "the machine is already busy)"})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model"})
    seed: int = field(default=1337, metadata={"help": "random seed (weights, batches, dropout)"})
    # 300 s: the longest legitimate waits are local rank 0 tokenizing (the default corpus: 1.2 s on a
    # loaded 2-core Xeon), one rank writing its checkpoint shard, an evaluation; torch's defaults
    # (gloo 30 min, NCCL 10 min) leave a stopped rank's peers idle for far longer
    dist_timeout: float = field(default=300.0, metadata={
        "help": "seconds a rank waits in a collective (or barrier) for the others before it stops with an "
                "error naming the wait; raise it when tokenizing a very large data set or saving to a slow disk"})
    # evaluation, checkpoints, output
    eval_interval: int = field(default=250, metadata={"help": "evaluate (and checkpoint) every this many steps"})
    eval_iters: int = field(default=20, metadata={"help": "batches per evaluation"})
    log_interval: int = field(default=25, metadata={"help": "print progress every this many steps"})
    out_dir: str = field(default="out", metadata={"help": "checkpoints, metrics.jsonl and loss.png go here"})
    init_from: str = field(default="scratch", metadata={"help": "scratch or resume (from out_dir)"})
    keep_checkpoints: int = field(default=2, metadata={
        "help": "checkpoints kept in out_dir/ckpt; resume falls back to an older one when the newest is damaged"})
    sample_tokens: int = field(default=300, metadata={"help": "tokens sampled and printed at the end (0: none)"})
    peak_flops: float = field(default=0.0, metadata={"help": "per-device peak FLOP/s for MFU (0: known GPU or measured)"})


def _bool(text: str) -> bool:
    low = text.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmkernels-train",
        description="Train a GPT or a Llama on text (one process, or torchrun for data x tensor parallel).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in fields(TrainConfig):
        kind = {int: int, float: float, bool: _bool, str: str}.get(f.type)
        default = f.default_factory() if f.name == "data" else f.default
        if f.name == "data":
            parser.add_argument("--data", nargs="+", default=default, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=kind, default=default, help=f.metadata["help"],
                                metavar=f.type.__name__.upper())
    return parser


def parse_args(argv=None) -> TrainConfig:
    """Command line -> TrainConfig. Also accepts nanoGPT's bare `name=value` form."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [f"--{a}" if "=" in a and not a.startswith("-") else a for a in argv]
    cfg = TrainConfig(**vars(build_parser().parse_args(argv)))
    return cfg


def _type_ok(kind, value) -> bool:
    if kind is float:  # an int is a fine float; a bool is neither a number nor a count here
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind in (bool, str):
        return isinstance(value, kind)
    return isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)  # data: List[str]


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    # a TrainConfig built in Python skips argparse's conversions: check the types first
    for f in fields(TrainConfig):
        value = getattr(cfg, f.name)
        if not _type_ok(f.type, value):
            expected = {float: "a number", int: "an integer", bool: "True or False", str: "a string"}.get(
                f.type, "a list of paths (strings)")
            raise ConfigError(f"{f.name} must be {expected}; got {value!r} ({type(value).__name__})")
        # NaN passes every `<`/`>` range check, and inf passes most: test finiteness before ranges
        if f.type is float and not math.isfinite(value):
            raise ConfigError(f"{f.name} must be a finite number; got {value}")
    positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "gradient_accumulation_steps",
                "eval_iters", "log_interval", "eval_interval", "tp", "keep_checkpoints")
    for name in positive:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1; got {getattr(cfg, name)}")
    for name in ("max_iters", "threads", "warmup_iters", "lr_decay_iters", "sample_tokens", "vocab_size",
                 "max_nonfinite_steps"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(cfg, name)}")
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(f"n_embd ({cfg.n_embd}) must be divisible by n_head ({cfg.n_head}); "
                          f"e.g. n_embd={cfg.n_head * max(cfg.n_embd // cfg.n_head, 1)}")
    head_size = cfg.n_embd // cfg.n_head
    if head_size % 8 or head_size > 256:
        raise ConfigError(f"head size n_embd / n_head = {head_size} must be a multiple of 8 and at most 256 "
                          f"(what lmkernels.attention supports)")
    if cfg.model not in ("gpt", "llama"):
        raise ConfigError(f"model must be 'gpt' or 'llama'; got {cfg.model!r}")
    if cfg.n_kv_head < 0:
        raise ConfigError(f"n_kv_head must be >= 0 (0: n_head); got {cfg.n_kv_head}")
    if cfg.model == "gpt" and cfg.n_kv_head not in (0, cfg.n_head):
        raise ConfigError(f"n_kv_head ({cfg.n_kv_head}) is for model=llama (grouped-query attention); "
                          f"the GPT has n_head key/value heads")
    if cfg.model == "llama":
        if cfg.dropout:
            raise ConfigError(f"dropout must be 0 with model=llama (the Llama has no dropout); got {cfg.dropout}")
        kv = cfg.n_kv_head or cfg.n_head
        if cfg.n_head % kv:
            raise ConfigError(f"n_kv_head ({kv}) must divide n_head ({cfg.n_head}): each key/value head "
                              f"serves a group of query heads")
        if kv % cfg.tp:
            raise ConfigError(f"tp ({cfg.tp}) must divide n_kv_head ({kv}): key/value heads are split across "
                              f"tensor-parallel ranks")
    if cfg.n_head % cfg.tp:
        raise ConfigError(f"tp ({cfg.tp}) must divide n_head ({cfg.n_head}): attention heads are split "
                          f"across tensor-parallel ranks")
    if world_size % cfg.tp:
        raise ConfigError(f"tp ({cfg.tp}) must divide the number of processes ({world_size}); launch with "
                          f"torchrun --nproc_per_node <a multiple of {cfg.tp}>")
    if cfg.zero not in (0, 1, 2):
        raise ConfigError(f"zero must be 0, 1 or 2; got {cfg.zero}")
    if cfg.zero and cfg.dtype == "float16":
        raise ConfigError("zero=1/2 does not support dtype=float16 (its GradScaler unscales full "
                          "gradients, which zero=2 does not keep); use bfloat16 or float32")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1); got {cfg.dropout}")
    if cfg.learning_rate <= 0 or cfg.min_lr < 0 or cfg.min_lr > cfg.learning_rate:
        raise ConfigError(f"need 0 <= min_lr <= learning_rate and learning_rate > 0; got learning_rate="
                          f"{cfg.learning_rate}, min_lr={cfg.min_lr}")
    for name in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be in [0, 1); got {getattr(cfg, name)}")
    for name in ("weight_decay", "grad_clip", "peak_flops"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(cfg, name)}")
    if cfg.dist_timeout <= 0:
        raise ConfigError(f"dist_timeout must be > 0 seconds; got {cfg.dist_timeout}")
    if cfg.tokenizer not in ("byte", "char"):
        raise ConfigError(f"tokenizer must be 'byte' or 'char'; got {cfg.tokenizer!r}")
    if cfg.init_from not in ("scratch", "resume"):
        raise ConfigError(f"init_from must be 'scratch' or 'resume'; got {cfg.init_from!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16; got {cfg.dtype!r}")
    if not (cfg.device in ("auto", "cpu", "cuda") or cfg.device.startswith("cuda:")):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {cfg.device!r}")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1); got {cfg.val_fraction}")


def to_dict(cfg: TrainConfig) -> dict:
    return asdict(cfg)
