"""CPU benchmark: a transformers LlamaForCausalLM train step (forward with labels, backward,
AdamW step), unpatched vs patched by lmkernels.integrations.huggingface.apply_lmkernels_to_llama.

    PYTHONPATH=. python3 bench/bench_hf_llama.py
    PYTHONPATH=. python3 bench/bench_hf_llama.py --layers 2 --seq 128     # quicker

Tokens/s: medians of alternating steps in one process (same weights, same batch). Peak
memory: one step in a fresh subprocess per case, peak RSS (VmHWM) minus the RSS after the
model, optimizer state and batch were made and one warm-up step ran.
"""
import argparse
import copy
import json
import subprocess
import sys

import torch

from bench._timing import alternate
from bench.bench_flce import _maxrss_bytes, _rss_bytes


def make(args, patched: bool):
    import transformers

    from lmkernels.integrations.huggingface import apply_lmkernels_to_llama

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden,
                                   intermediate_size=args.inter, num_hidden_layers=args.layers,
                                   num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                   max_position_embeddings=args.seq)
    model = transformers.LlamaForCausalLM(cfg)
    model.set_attn_implementation("sdpa")  # transformers' fastest CPU attention for the baseline
    if patched:
        apply_lmkernels_to_llama(model)
    return model


def make_step(model, batch):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)

    def step():
        loss = model(batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def peak_memory(args, patched: bool) -> int:
    code = (
        "import sys, json, argparse, torch; sys.path.insert(0, '.');"
        "from bench.bench_hf_llama import make, make_step, _maxrss_bytes, _rss_bytes;"
        f"args = argparse.Namespace(**{vars(args)!r}); torch.manual_seed(1);"
        f"batch = torch.randint(0, args.vocab, (args.batch, args.seq)); model = make(args, {patched});"
        "step = make_step(model, batch); step(); base = _rss_bytes(); step();"
        "print(json.dumps(_maxrss_bytes() - base))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=688)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv_heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    mem = {"unpatched": peak_memory(args, False), "patched": peak_memory(args, True)}  # before we grow
    torch.manual_seed(1)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq))
    base, ours = make(args, False), make(args, True)
    ours.load_state_dict(copy.deepcopy(base.state_dict()))
    with torch.no_grad():
        l0, l1 = base(batch, labels=batch).loss, ours(batch, labels=batch).loss
    print(f"loss unpatched {l0.item():.6f} patched {l1.item():.6f}")
    times = alternate({"unpatched": make_step(base, batch), "patched": make_step(ours, batch)}, args.reps)
    tokens = args.batch * args.seq
    print(f"\nLlamaForCausalLM train step (fwd + bwd + AdamW), {vars(args)}, float32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| model | step (s) | tokens/s | speed vs unpatched | peak memory added (MiB) | memory vs unpatched |")
    print("|---|---|---|---|---|---|")
    for k in ("unpatched", "patched"):
        print(f"| {k} | {times[k]:.3f} | {tokens / times[k]:.0f} | {times['unpatched'] / times[k]:.2f}x | "
              f"{mem[k] / 2**20:.0f} | {mem[k] / max(mem['unpatched'], 1):.2f} |")


if __name__ == "__main__":
    main()
