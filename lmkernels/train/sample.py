"""`lmkernels-sample`: generate text from the newest valid checkpoint in out_dir (TP shards merged),
decoding with the KV cache (model.generate's default; lmkernels/models/kv_cache.py).
Exit status 2 with one `lmkernels-sample: error:` line for a bad option or an unusable checkpoint."""
import argparse
import math
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmkernels-sample", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="directory of an lmkernels-train run")
    parser.add_argument("--start", default="\n", help="prompt text (FILE:path reads it from a file)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8,
                        help="> 0 divides the logits; 0 means greedy (always the most likely token)")
    parser.add_argument("--top_k", type=int, default=None, help=">= 1: sample among the k most likely tokens "
                                                                "(left out: among all)")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        parser.error(f"num_samples and max_new_tokens must be >= 1; got {args.num_samples} and {args.max_new_tokens}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        parser.error(f"temperature must be a finite number >= 0 (0: greedy); got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        parser.error(f"top_k must be >= 1 (leave it out to sample among all tokens); got {args.top_k}")

    import torch  # (before lmkernels._C, which links against it)
    import lmkernels  # noqa: F401
    from lmkernels.distributed.tp_utils import merge_shards
    from lmkernels.train.checkpoint import load_all_shards
    from lmkernels.train.data import tokenizer_from_state
    from lmkernels.train.errors import USER_ERRORS
    from lmkernels.train.loop import sample_text

    def error(text) -> int:
        print(f"lmkernels-sample: error: {text}", file=sys.stderr)
        return 2

    try:
        device = torch.device(args.device)
    except RuntimeError:
        return error(f"device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type not in ("cpu", "cuda"):
        return error(f"device must be cpu, cuda or cuda:N; got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        return error(f"device={args.device!r} but torch sees no CUDA device; use --device=cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return error(f"device={args.device!r} but torch sees {torch.cuda.device_count()} CUDA device(s)")
    start = args.start
    try:
        if start.startswith("FILE:"):
            with open(start[5:], encoding="utf-8") as f:
                start = f.read()
        shards = load_all_shards(args.out_dir)
    except (*USER_ERRORS, OSError, UnicodeDecodeError) as e:
        return error(e)
    state = merge_shards([s["model"] for s in shards], shards[0]["tp_layout"])
    tokenizer = tokenizer_from_state(shards[0]["tokenizer"])
    # temperature 0 is greedy: top-1 of the logits (generate() itself would divide by 1e-6)
    temperature, top_k = (1.0, 1) if args.temperature == 0 else (args.temperature, args.top_k)
    for i in range(args.num_samples):
        print(sample_text(state, shards[0]["model_args"], tokenizer, args.max_new_tokens, device,
                          seed=args.seed + i, start=start, temperature=temperature, top_k=top_k))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
