"""`lmkernels-train` / `python -m lmkernels.train`: train a GPT or a Llama (--model; see --help).
Exit status: 0 done, 2 a bad option, data file or checkpoint, 1 training stopped (non-finite loss,
timed-out collective); each with one `lmkernels-train: error:` line naming the cause."""
import sys

from lmkernels.train.config import parse_args
from lmkernels.train.errors import USER_ERRORS, TrainingStopped


def main(argv=None) -> int:
    cfg = parse_args(argv)
    import torch  # noqa: F401  (before lmkernels._C, which links against it)
    import lmkernels  # noqa: F401  (loads the kernels; imported after parsing so --help is quick)
    from lmkernels.train.loop import train

    try:
        train(cfg)
    except USER_ERRORS as e:
        print(f"lmkernels-train: error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"lmkernels-train: error: {e}", file=sys.stderr)
        return 1
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
