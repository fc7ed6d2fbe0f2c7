"""The training loop: one process or torchrun, data x tensor parallel.

Per iteration: gradient_accumulation_steps micro-batches (DP gradient sync only on the last,
through BucketedDataParallel's no_sync), the global gradient norm clipped across TP and DP,
one FusedAdamW step, learning rate from linear warm-up then cosine decay. Every eval_interval:
train/val loss and perplexity, and a checkpoint. Batches and dropout seeds are pure functions
of (seed, rank, iteration), so a resumed run repeats the uninterrupted run's losses exactly.
With pack_documents each batch carries its document layout (PackedDocuments) to the model.
"""
import datetime
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

from lmkernels.distributed import mesh as mesh_lib
from lmkernels.distributed import tp_utils
from lmkernels.train import checkpoint as ckpt_lib
from lmkernels.train.config import TrainConfig, to_dict, validate
from lmkernels.train.data import BatchSampler, prepare_data
from lmkernels.train.errors import ConfigError, TrainingStopped
from lmkernels.train.models import (build_model, context_length, model_args_from_config, model_kind,
                                    parallelize_model)
from lmkernels.train.metrics import MetricsLog, plot_losses, progress_line
from lmkernels.train.waits import WaitTracker, is_timeout


def make_optimizer(param_groups, cfg: TrainConfig):
    """The one place the optimizer is chosen."""
    from lmkernels.optim import FusedAdamW

    return FusedAdamW(param_groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def get_lr(it: int, cfg: TrainConfig) -> float:
    """Linear warm-up to learning_rate, cosine decay to min_lr at lr_decay_iters, then min_lr."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(decay_iters - cfg.warmup_iters, 1)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def setup_distributed(cfg: TrainConfig):
    """Initializes torch.distributed under torchrun (gloo on CPU, NCCL on GPU); returns the mesh
    and this rank's device."""
    initialized = dist.is_available() and dist.is_initialized()  # e.g. by a test harness
    world = dist.get_world_size() if initialized else int(os.environ.get("WORLD_SIZE", "1"))
    validate(cfg, world)
    want_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but torch sees no CUDA device; use device=cpu")
    local_rank = local_rank_of_process()
    if want_cuda:
        device = torch.device(cfg.device if ":" in cfg.device else f"cuda:{local_rank}")
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=cfg.dist_timeout))
    return mesh_lib.init_mesh(cfg.tp, device.type), device


def choose_cpu_threads(cfg: TrainConfig, say) -> None:
    """threads=0: torch's default, unless the machine's load average already exceeds its cores;
    then 1, since OpenMP threads that lose their core stall each other at every barrier (on a
    shared 2-core machine at load 5-6 a step took ~5x longer with 2 threads than with 1)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
        return
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return
    if torch.get_num_threads() > 1 and load > cores:
        torch.set_num_threads(1)
        say(f"cpu: load average {load:.1f} on {cores} cores, so 1 thread per process (--threads=N to override)")


def local_rank_of_process() -> int:
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def peak_flops_per_device(device: torch.device, dtype: torch.dtype) -> float:
    """Dense peak for known GPUs (bf16/fp16 tensor cores); otherwise a quick measured matmul rate,
    so MFU on CPU is relative to what this machine's sgemm reaches."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L4": 121e12}
        for key, value in table.items():
            if key in name and dtype in (torch.bfloat16, torch.float16):
                return value
    n = 512 if device.type == "cpu" else 4096
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < 0.2:
        a @ b
        reps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def wrap_data_parallel(model, mesh, zero: int = 0):
    if mesh.dp_size == 1:
        return model  # zero>0 on one DP rank: nothing to shard, the plain optimizer
    from lmkernels.distributed import BucketedDataParallel, ShardedDataParallel

    if zero:
        return ShardedDataParallel(model, process_group=mesh.dp_group, zero=zero)
    return BucketedDataParallel(model, process_group=mesh.dp_group)


def is_sharded(ddp_model) -> bool:
    from lmkernels.distributed import ShardedDataParallel

    return isinstance(ddp_model, ShardedDataParallel)


def memory_bytes(model, ddp_model, optimizer) -> dict:
    """This rank's persistent bytes of parameters, gradients and optimizer state, and its peak
    resident memory (ru_maxrss)."""
    import resource

    if is_sharded(ddp_model):
        out = {**ddp_model.memory_bytes(), **optimizer.memory_bytes()}
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        buckets = getattr(ddp_model, "_buckets", None)
        if buckets is not None:
            grads = sum(b.grads.numel() * b.grads.element_size()
                        + (0 if b.comm is b.grads else b.comm.numel() * b.comm.element_size()) for b in buckets)
        else:
            grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        state = [t for s in optimizer.state.values() for t in s.values()
                 if isinstance(t, torch.Tensor) and t.dim() > 0]
        out = dict(param_bytes=sum(p.numel() * p.element_size() for p in params), grad_bytes=grads,
                   opt_state_bytes=sum(t.numel() * t.element_size() for t in state))
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return out


def seed_for(cfg: TrainConfig, mesh, it: int) -> int:
    # TP ranks of one DP rank share dropout masks (their activations are replicated); DP ranks differ
    return (cfg.seed * 1_000_003 + mesh.dp_rank * 7919 + it) & 0x7FFF_FFFF


def check_out_dir(out_dir: Path):
    for path in (out_dir, *out_dir.parents):  # the nearest existing one must be a directory
        if path.exists():
            if not path.is_dir():
                raise ConfigError(f"out_dir {str(out_dir)!r}: {str(path)!r} exists and is not a directory")
            return


def finite_weights(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def train(cfg: TrainConfig) -> list:
    """Runs training as configured; returns the per-iteration records (rank 0's view). Bad
    options, data or checkpoints raise the errors of lmkernels.train.errors before training starts;
    a non-finite loss or a timed-out collective raises TrainingStopped."""
    check_out_dir(Path(cfg.out_dir))
    mesh, device = setup_distributed(cfg)
    waits = WaitTracker(mesh.rank, mesh.world_size, cfg.dist_timeout)
    try:
        return _train(cfg, mesh, device, waits)
    except RuntimeError as e:
        if mesh.world_size > 1 and not isinstance(e, TrainingStopped) and is_timeout(e):
            raise waits.explain(e) from None
        raise
    finally:
        waits.close()


def _train(cfg: TrainConfig, mesh, device, waits: WaitTracker) -> list:
    say = print if mesh.is_main else (lambda *a, **k: None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
    autocast = nullcontext() if dtype == torch.float32 else torch.autocast(device.type, dtype=dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    out_dir = Path(cfg.out_dir)
    if device.type == "cpu":
        choose_cpu_threads(cfg, say)

    # data: local rank 0 tokenizes into the cache while the others wait, then all open it
    local_main = local_rank_of_process() == 0
    waits.at("the barrier after local rank 0 tokenizes the data")
    if not local_main:
        ckpt_lib._barrier()
    data = prepare_data(cfg.data, cfg.tokenizer, cfg.val_fraction, cfg.data_cache or None, verbose=mesh.is_main,
                        doc_separator=cfg.doc_separator)
    if local_main:
        ckpt_lib._barrier()

    # model: every rank builds the same full model (same seed), then keeps its TP shard
    resume = resume_path = None
    if cfg.init_from == "resume":
        waits.at("the all-reduce that agrees on a valid checkpoint to resume from")
        resume_path, resume = ckpt_lib.open_checkpoint(cfg.out_dir, mesh.tp_rank, mesh.tp_size)
        model_args = resume["model_args"]
        if resume["tokenizer"] != data.tokenizer.state():
            raise ConfigError("init_from=resume: the data/tokenizer differ from the checkpoint's (other vocabulary)")
        given = model_args_from_config(cfg, cfg.vocab_size or model_args["vocab_size"])
        saved = dict(model_args, model=model_kind(model_args))  # checkpoints from before --model hold a GPT
        overridden = [f"{k}={v} (command line: {given[k]})" for k, v in saved.items() if given.get(k, v) != v]
        if overridden:
            say(f"resume: the checkpoint's model settings override the command line: {', '.join(overridden)}")
    else:
        vocab = cfg.vocab_size or data.vocab_size
        if vocab < data.vocab_size:
            raise ConfigError(f"vocab_size ({vocab}) is smaller than the tokenizer's ({data.vocab_size})")
        model_args = model_args_from_config(cfg, vocab)
    if model_args["vocab_size"] % cfg.tp:
        raise ConfigError(f"tp ({cfg.tp}) must divide the vocabulary size ({model_args['vocab_size']}, "
                          f"{cfg.tokenizer} tokenizer); pad it with vocab_size=<a multiple of {cfg.tp}>")
    torch.manual_seed(cfg.seed)
    model = build_model(model_args)
    flops_per_token = model.estimate_flops_per_token()
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {model_args}; "
        f"dp={mesh.dp_size} tp={mesh.tp_size} on {device} ({dtype})".replace("torch.", ""))
    model.to(device)
    if mesh.tp_size > 1:
        parallelize_model(model, model_args, mesh.tp_group)
    start_iter, best_val = 0, float("inf")
    if resume is not None:
        model.load_state_dict(resume["model"])
    if cfg.compile:
        model.compile()  # in place: state_dict names and the DP wrapper see the same module
    ddp_model = forward = wrap_data_parallel(model, mesh, cfg.zero)
    groups = model.configure_optimizer_groups(cfg.weight_decay)
    if is_sharded(ddp_model):
        from lmkernels.distributed import ShardedAdamW

        optimizer = ShardedAdamW(ddp_model, groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    else:
        optimizer = make_optimizer(groups, cfg)
    if resume is not None:
        # a consolidated (FusedAdamW-style) state: the checkpoint merges a sharded one's files,
        # so any zero stage and any DP size resumes from any other
        optimizer.load_state_dict(resume["optimizer"])
        start_iter, best_val = resume["iter_num"], resume["best_val_loss"]
        say(f"resumed from {resume_path} at iteration {start_iter}")
        del resume
    block_size = context_length(model_args)
    sampler = BatchSampler(data, block_size, cfg.batch_size, cfg.seed, mesh.dp_rank, mesh.dp_size)
    tokens_per_iter = cfg.gradient_accumulation_steps * cfg.batch_size * block_size * mesh.dp_size
    peak = cfg.peak_flops or peak_flops_per_device(device, dtype)
    log = MetricsLog(out_dir / "metrics.jsonl", enabled=mesh.is_main, truncate=cfg.init_from == "scratch")
    say(f"training {cfg.max_iters} iterations of {tokens_per_iter:,} tokens "
        f"(batch {cfg.batch_size} x {block_size} x accumulation {cfg.gradient_accumulation_steps} x dp {mesh.dp_size})"
        + (", documents packed" if cfg.pack_documents else ""))

    def batch_on_device(split: str, *position, evaluation: bool = False):
        """(x, y, model keyword arguments) on this rank's device: the packing layout when packed."""
        get = sampler.eval_batch if evaluation else sampler.get_batch
        x, y, *packing = get(split, *position, packed=cfg.pack_documents)
        kwargs = dict(packing=packing[0].to(device, non_blocking=True)) if packing else {}
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True), kwargs

    last_saved = resume_path  # the newest checkpoint known good

    def mean_over_dp(value: torch.Tensor) -> float:
        if mesh.dp_size > 1:
            value = value.detach().float().clone()
            dist.all_reduce(value, group=mesh.dp_group)
            value /= mesh.dp_size
        return value.item()

    @torch.no_grad()
    def evaluate() -> dict:
        model.eval()
        out = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=device)
            for k in range(cfg.eval_iters):
                x, y, kwargs = batch_on_device(split, k, evaluation=True)
                with autocast:
                    _, loss = model(x, y, **kwargs)
                total += loss.float()
            out[split] = mean_over_dp(total / cfg.eval_iters)
        model.train()
        return out

    def save(it: int, ev: dict):
        nonlocal last_saved
        waits.at(f"the all-reduce that checks the weights before the checkpoint of iteration {it}")
        finite = all(math.isfinite(v) for v in ev.values()) and finite_weights(params)
        if not ckpt_lib.all_ranks_agree(finite):  # a NaN model must never replace the last good checkpoint
            raise TrainingStopped(f"iteration {it}: the weights or evaluation losses ({ev}) are not finite; no "
                                  f"checkpoint written. {last_good()}")
        sharded = is_sharded(ddp_model)
        if sharded:
            ddp_model.wait_param_gather()
        state = dict(model=model.state_dict(), optimizer=None if sharded else optimizer.state_dict(), iter_num=it,
                     best_val_loss=best_val, model_args=model_args, config=to_dict(cfg),
                     tokenizer=data.tokenizer.state(), tp_size=mesh.tp_size, tp_rank=mesh.tp_rank,
                     tp_layout=tp_utils.shard_layout(model))
        waits.at(f"saving the checkpoint of iteration {it}")
        # a run from scratch replaces the checkpoints of any earlier run in out_dir at its first save
        keep = cfg.keep_checkpoints if last_saved is not None else 1
        last_saved = ckpt_lib.save_checkpoint(cfg.out_dir, it, state, mesh, keep=keep,
                                              optimizer_shard=optimizer.shard_state_dict() if sharded else None)
        say(f"checkpoint: {last_saved}")

    def last_good() -> str:
        return (f"The last good checkpoint is {last_saved}: resume from it with init_from=resume (e.g. with a "
                f"lower learning_rate)" if last_saved else "No checkpoint was written by this run.")

    records, window_t, window_tokens, window_loss = [], time.perf_counter(), 0, []
    params = [p for p in model.parameters() if p.requires_grad]
    nonfinite_in_a_row = 0
    for it in range(start_iter, cfg.max_iters + 1):
        if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and (it > start_iter or it == 0):
            waits.at(f"the evaluation at iteration {it} (loss all-reduce over DP)")
            ev = evaluate()
            best_val = min(best_val, ev["val"])
            say(f"eval {it}: train loss {ev['train']:.4f}, val loss {ev['val']:.4f}, "
                f"val perplexity {math.exp(min(ev['val'], 50)):.2f}")
            log.write(kind="eval", iter=it, train_loss=ev["train"], val_loss=ev["val"],
                      val_ppl=math.exp(min(ev["val"], 50)))
            if it > start_iter:
                save(it, ev)
            window_t = time.perf_counter()  # evaluation time is not training throughput
        if it == cfg.max_iters:
            break
        lr = get_lr(it, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(seed_for(cfg, mesh, it))
        t0 = time.perf_counter()
        waits.at(f"forward and backward of iteration {it} (TP all-reduces, DP gradient all-reduce)")
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.gradient_accumulation_steps):
            x, y, kwargs = batch_on_device("train", it, micro)
            last = micro == cfg.gradient_accumulation_steps - 1
            sync = nullcontext() if last or ddp_model is model else ddp_model.no_sync()
            with sync:
                with autocast:
                    _, loss = forward(x, y, **kwargs)
                    loss = loss / cfg.gradient_accumulation_steps
                scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        if ddp_model is not model:
            ddp_model.finish_gradient_sync()
        # checked before the step, so a NaN loss never reaches the weights; every rank sees the same
        # value (NaN survives the TP loss all-reduce and this DP mean) and takes the same branch
        waits.at(f"the loss all-reduce of iteration {it}")
        loss_value = mean_over_dp(loss_sum)
        if not math.isfinite(loss_value):
            # under DP the gradients are views into the all-reduce buckets: zero them in place
            optimizer.zero_grad(set_to_none=ddp_model is model)
            nonfinite_in_a_row += 1
            if nonfinite_in_a_row > cfg.max_nonfinite_steps:
                raise TrainingStopped(
                    f"iteration {it}: the loss is {loss_value} ({nonfinite_in_a_row} non-finite step(s) in a row, "
                    f"max_nonfinite_steps={cfg.max_nonfinite_steps}); stopped before updating the weights. "
                    f"{last_good()}")
            say(f"iter {it}: loss is {loss_value}; step skipped ({nonfinite_in_a_row} in a row, "
                f"max_nonfinite_steps={cfg.max_nonfinite_steps})")
            continue
        nonfinite_in_a_row = 0
        if cfg.grad_clip > 0:
            waits.at(f"the gradient-norm all-reduce of iteration {it}")
            scaler.unscale_(optimizer)
            if is_sharded(ddp_model):
                ddp_model.clip_grad_norm_(cfg.grad_clip, tp_group=mesh.tp_group if mesh.tp_size > 1 else None)
            else:
                tp_utils.clip_grad_norm_(params, cfg.grad_clip, mesh.tp_group)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=ddp_model is model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the step is done: dt below is its time
        dt = time.perf_counter() - t0
        tok_s = tokens_per_iter / dt
        mfu = flops_per_token * tok_s / (peak * mesh.world_size)
        records.append(dict(iter=it, loss=loss_value, lr=lr, tokens_per_s=tok_s, mfu=mfu, dt_ms=1000 * dt))
        log.write(kind="train", **records[-1])
        if it == start_iter or (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
            waits.at(f"gathering every rank's memory record at iteration {it}")
            ranks = ckpt_lib._all_gather(dict(rank=mesh.rank, **memory_bytes(model, ddp_model, optimizer)))
            log.write(kind="memory", iter=it, zero=cfg.zero if is_sharded(ddp_model) else 0, ranks=ranks)
        window_tokens += tokens_per_iter
        window_loss.append(loss_value)
        if (it + 1) % cfg.log_interval == 0 or it + 1 == cfg.max_iters:
            elapsed = time.perf_counter() - window_t
            say(progress_line(it + 1, cfg.max_iters, sum(window_loss) / len(window_loss), lr,
                              window_tokens / elapsed, flops_per_token * window_tokens / elapsed / (peak * mesh.world_size),
                              1000 * elapsed / len(window_loss)))
            window_t, window_tokens, window_loss = time.perf_counter(), 0, []
    log.close()
    if mesh.is_main:
        plot = plot_losses(out_dir / "metrics.jsonl", out_dir / "loss.png")
        if plot:
            say(f"loss curve: {plot}")
    if cfg.sample_tokens > 0:
        waits.at("gathering the TP shards for the sample")
        if is_sharded(ddp_model):
            ddp_model.wait_param_gather()
        full = tp_utils.full_state_dict(model, mesh.tp_group)
        if mesh.is_main:
            say("sample:\n" + sample_text(full, model_args, data.tokenizer, cfg.sample_tokens, device, cfg.seed))
    return records


def sample_text(state_dict, model_args, tokenizer, max_new_tokens, device, seed=0, start="\n",
                temperature=0.8, top_k=None) -> str:
    """Text generated by the (unsharded) model with these weights, after `start`."""
    model = build_model(model_args)
    model.load_state_dict(state_dict)
    model.to(device).eval()
    try:
        prompt = tokenizer.encode(start)
    except ValueError:
        prompt = [0]
    idx = torch.tensor([prompt or [0]], dtype=torch.long, device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g)
    return tokenizer.decode(out[0].tolist())
