"""GPU check: tokens/s and MFU of lmkernels-train for a ~100M-parameter GPT in bf16 (~60 s).

Config: 14 layers, 12 heads, 768 wide (99M parameters without embeddings), block 1024,
batch 16, byte vocabulary, bf16 autocast, the default corpus. Ours is the trainer itself
(lmkernels.train.train: lmkernels.attention, FusedAdamW, global-norm clip); the baseline is the
same model in a plain eager loop with torch's SDPA and torch.optim.AdamW(fused=True), measured
in the same run. MFU = 6 N + attention FLOPs per token x tokens/s / the card's dense bf16 peak
(H100/H200 SXM: 989 TFLOP/s). Prints one markdown section.

    python3 bench/gpu_train.py            # on an H100/H200
    python3 bench/gpu_train.py --smoke    # a tiny config on whatever device is there (CPU: checks the code path)
"""
import argparse
import statistics
import subprocess
import tempfile
import time

import torch

import lmkernels
from lmkernels.models.gpt import GPT, GPTConfig
from lmkernels.train import TrainConfig, train
from lmkernels.train.data import BatchSampler, prepare_data
from lmkernels.train.loop import get_lr, peak_flops_per_device

FULL = dict(n_layer=14, n_head=12, n_embd=768, block_size=1024, batch_size=16, iters=60, ref_iters=30)
SMOKE = dict(n_layer=2, n_head=4, n_embd=64, block_size=64, batch_size=4, iters=6, ref_iters=4)


def _sdpa(q, k, v, *, is_causal=False, scale=None, **_):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def reference_ms(cfg: TrainConfig, iters: int, device: torch.device, dtype) -> list:
    data = prepare_data(cfg.data, cfg.tokenizer, verbose=False)
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(vocab_size=data.vocab_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                          block_size=cfg.block_size)).to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.configure_optimizer_groups(cfg.weight_decay), lr=cfg.learning_rate,
                                  betas=(cfg.beta1, cfg.beta2), fused=fused)
    sampler = BatchSampler(data, cfg.block_size, cfg.batch_size, cfg.seed)
    real, times = lmkernels.attention, []
    lmkernels.attention = _sdpa
    try:
        for it in range(iters):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = get_lr(it, cfg)
            x, y = (t.to(device, non_blocking=True) for t in sampler.get_batch("train", it))
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                _, loss = model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(1000 * (time.perf_counter() - t0))
    finally:
        lmkernels.attention = real
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    shape = SMOKE if args.smoke else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model_keys = ("n_layer", "n_head", "n_embd", "block_size", "batch_size")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig(**{k: shape[k] for k in model_keys}, max_iters=shape["iters"], warmup_iters=5,
                          eval_interval=10 ** 9, eval_iters=1, log_interval=10, sample_tokens=0, out_dir=tmp,
                          device=device.type, dtype="bfloat16" if dtype == torch.bfloat16 else "float32")
        ours = train(cfg)
    skip = min(5, len(ours) // 2)
    ours_ms = statistics.median(r["dt_ms"] for r in ours[skip:])
    ref = reference_ms(cfg, shape["ref_iters"], device, dtype)
    ref_ms = statistics.median(ref[skip:])
    tokens = shape["batch_size"] * shape["block_size"]
    probe = GPT(GPTConfig(vocab_size=256, **{k: shape[k] for k in model_keys[:4]}))
    flops = probe.estimate_flops_per_token()
    peak = peak_flops_per_device(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    print(f"## Trainer, ~100M-parameter GPT in {str(dtype).replace('torch.', '')}\n")
    print(f"{name}, torch {torch.__version__}, commit {commit}; {probe.num_params() / 1e6:.0f}M parameters "
          f"({shape['n_layer']} layers, {shape['n_head']} heads, {shape['n_embd']} wide), block {shape['block_size']}, "
          f"batch {shape['batch_size']}; peak {peak / 1e12:.0f} TFLOP/s; {flops / 1e6:.0f} MFLOP per token.\n")
    print("| loop | ms / iteration | tokens/s | TFLOP/s | MFU |")
    print("|---|---:|---:|---:|---:|")
    for label, ms in (("lmkernels-train (lmkernels.attention, FusedAdamW)", ours_ms),
                      ("eager PyTorch (SDPA, AdamW fused=True)", ref_ms)):
        rate = 1000 * tokens / ms
        print(f"| {label} | {ms:.1f} | {rate:,.0f} | {flops * rate / 1e12:.1f} | {100 * flops * rate / peak:.1f}% |")
    print(f"\nSpeed-up vs eager PyTorch: {ref_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
