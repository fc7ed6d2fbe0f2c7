"""`lmkernels-sample`: generate text from the latest checkpoint in out_dir (TP shards merged)."""
import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmkernels-sample", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out_dir", default="out", help="directory of an lmkernels-train run")
    parser.add_argument("--start", default="\n", help="prompt text (FILE:path reads it from a file)")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--max_new_tokens", type=int, default=500)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.max_new_tokens < 1:
        parser.error("num_samples and max_new_tokens must be >= 1")

    import torch  # noqa: F401  (before lmkernels._C, which links against it)
    import lmkernels  # noqa: F401
    from lmkernels.distributed.tp_utils import merge_shards
    from lmkernels.train.checkpoint import load_all_shards
    from lmkernels.train.loop import load_tokenizer, sample_text

    try:
        shards = load_all_shards(args.out_dir)
    except FileNotFoundError as e:
        print(f"lmkernels-sample: error: {e}", file=sys.stderr)
        return 2
    state = merge_shards([s["model"] for s in shards], shards[0]["tp_layout"])
    tokenizer = load_tokenizer(shards[0]["tokenizer"])
    start = args.start
    if start.startswith("FILE:"):
        with open(start[5:], encoding="utf-8") as f:
            start = f.read()
    for i in range(args.num_samples):
        print(sample_text(state, shards[0]["model_args"], tokenizer, args.max_new_tokens, args.device,
                          seed=args.seed + i, start=start, temperature=args.temperature, top_k=args.top_k))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
