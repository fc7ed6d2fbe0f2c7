"""Progress lines, metrics as JSON lines, and the loss-curve plot."""
import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line to `path` (rank 0 only); a scratch run starts it afresh."""

    def __init__(self, path: Path, enabled: bool = True, truncate: bool = False):
        self.file = None
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "w" if truncate else "a")

    def write(self, **record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file is not None:
            self.file.close()
            self.file = None


def read_metrics(path) -> list:
    """The records of a metrics file; where a resumed run repeated iterations, the last wins."""
    latest = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["kind"], r["iter"])] = r
    return sorted(latest.values(), key=lambda r: (r["iter"], r["kind"]))


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def progress_line(it: int, total: int, loss: float, lr: float, tokens_per_s: float, mfu: float,
                  ms_per_iter: float, width: int = 20) -> str:
    done = int(width * it / max(total, 1))
    return (f"iter {it:>{len(str(total))}}/{total} [{'#' * done}{'.' * (width - done)}] loss {loss:.4f} | "
            f"lr {lr:.2e} | {_si(tokens_per_s)} tok/s | mfu {100 * mfu:.1f}% | {ms_per_iter:.1f} ms/iter")


def plot_losses(metrics_path, png_path):
    """Train (per iteration) and val (per evaluation) loss against iteration, as a PNG.
    matplotlib is imported here only; without it the plot is skipped with a note."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss curve: skipped (pip install matplotlib to get loss.png)")
        return None
    records = read_metrics(metrics_path)
    train = [(r["iter"], r["loss"]) for r in records if r["kind"] == "train"]
    val = [(r["iter"], r["val_loss"]) for r in records if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train", linewidth=0.8, alpha=0.8)
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("iteration")
    ax.set_ylabel("cross-entropy loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
