"""CPU benchmark: tokens/s of sampling 500 new tokens with the KV cache (generate's default) vs
without it (use_cache=False: a full forward of the context for every token).

As lmkernels-sample does it: one sequence, a one-token prompt, temperature 0.8, fp32, eval mode,
random weights (speed does not depend on them). Models are the trainer's (built from its
options by lmkernels.train.models):
- gpt: the trainer's default GPT (4 layers, 4 heads, 128 wide, block_size 64, byte vocabulary).
  500 tokens run far past block_size, where each token costs a forward of the whole 64-token
  window with or without the cache (see lmkernels/models/_causal_lm.py): the cache speeds up
  only the first 63 tokens.
- gpt-ctx512: the same GPT with block_size 512, so all 500 tokens are decoded from the cache.
- llama: a small GQA Llama from the trainer's --model=llama mapping (4 layers, 4 query heads,
  2 key/value heads, 128 wide, max_position_embeddings 512).
Both variants run alternately in one process (bench/_timing.py), so machine noise hits them
alike; the table gives median seconds per 500 tokens, tokens/s and the ratio, and checks the
tokens are identical.

    PYTHONPATH=. python3 bench/bench_decode.py [--reps 3] [--threads 1] [--write bench/results/decode-cpu.md]
"""
import argparse
import os

import torch

from bench._timing import alternate, report
from bench.bench_adamw import cpu_model
from lmkernels.train import TrainConfig
from lmkernels.train.models import build_model, model_args_from_config

NEW_TOKENS = 500
MODELS = {
    "gpt": dict(),
    "gpt-ctx512": dict(block_size=512),
    "llama": dict(model="llama", n_kv_head=2, block_size=512),
}


def measure(name: str, options: dict, reps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(model_args_from_config(TrainConfig(**options), vocab_size=256)).eval()
    prompt = torch.tensor([[10]])  # "\n", lmkernels-sample's default prompt
    out = {}

    def run(use_cache):
        g = torch.Generator().manual_seed(1337)
        out[use_cache] = model.generate(prompt, NEW_TOKENS, temperature=0.8, generator=g, use_cache=use_cache)

    t = alternate({"cache": lambda: run(True), "no cache": lambda: run(False)}, reps, warmup=1)
    return dict(name=name, context=model.config.block_size, cache=t["cache"], no_cache=t["no cache"],
                same_tokens=torch.equal(out[True], out[False]))


def table(results) -> str:
    rows = ["| model | context | no cache s | cache s | no cache tok/s | cache tok/s | speedup | same tokens |",
            "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['name']} | {r['context']} | {r['no_cache']:.2f} | {r['cache']:.2f} | "
                    f"{NEW_TOKENS / r['no_cache']:.0f} | {NEW_TOKENS / r['cache']:.0f} | "
                    f"**{r['no_cache'] / r['cache']:.2f}x** | {r['same_tokens']} |")
    return "\n".join(rows)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="alternating rounds per model (median reported)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {list(MODELS)}")
    parser.add_argument("--write", default=None, help="also write the markdown to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.models.split(",")
    for n in names:
        if n not in MODELS:
            parser.error(f"--models: {n!r} is not one of {list(MODELS)}")
    with torch.no_grad():
        results = [measure(n, MODELS[n], args.reps) for n in names]
    md = (f"## Decoding {NEW_TOKENS} tokens, KV cache vs full re-forward, CPU\n\n{cpu_model()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f}; batch 1, one-token prompt, temperature 0.8, fp32; median of "
          f"{args.reps} alternating rounds.\n\n{table(results)}\n\nPast block_size both variants run the same "
          f"full-window forward per token (lmkernels/models/_causal_lm.py), so with block_size 64 the cache "
          f"speeds up only the first 63 of the 500 tokens; with a 512-token context all 500 come from the cache.\n")
    report(md, args.write)


if __name__ == "__main__":
    main()
