"""`lmkernels-export`: write the latest checkpoint of an lmkernels-train run (TP shards merged)
as a Hugging Face model directory (config.json + model.safetensors) that
transformers.LlamaForCausalLM.from_pretrained loads. Llama checkpoints only (GPT has no
transformers twin with the same layout)."""
import argparse
import sys


def export_hf(state_dict, model_args: dict, hf_dir) -> None:
    """Builds the Llama these weights belong to and saves it in Hugging Face format."""
    from lmkernels.models.llama import Llama, LlamaConfig

    if "hidden_size" not in model_args:  # GPT's arguments are n_embd, n_layer, ...
        raise ValueError("lmkernels-export: only Llama checkpoints can be exported to Hugging Face format; "
                         f"this one has model arguments {sorted(model_args)}")
    args = {k: v for k, v in model_args.items() if k != "model"}
    model = Llama(LlamaConfig(**args))
    model.load_state_dict(state_dict)
    model.save_hf(hf_dir)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lmkernels-export", description=__doc__)
    parser.add_argument("--out_dir", default="out", help="directory of an lmkernels-train run")
    parser.add_argument("--hf_dir", required=True, help="where to write config.json + model.safetensors")
    args = parser.parse_args(argv)

    import torch  # noqa: F401  (before lmkernels._C, which links against it)
    import lmkernels  # noqa: F401
    from lmkernels.distributed.tp_utils import merge_shards
    from lmkernels.train.checkpoint import load_all_shards
    from lmkernels.train.errors import USER_ERRORS

    try:
        shards = load_all_shards(args.out_dir)
        state = merge_shards([s["model"] for s in shards], shards[0]["tp_layout"])
        export_hf(state, shards[0]["model_args"], args.hf_dir)
    except (*USER_ERRORS, OSError, ValueError) as e:
        print(f"lmkernels-export: error: {e}", file=sys.stderr)
        return 2
    print(f"lmkernels-export: wrote {args.hf_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
