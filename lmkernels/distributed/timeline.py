"""A cheap per-step record of when backward ran and when each bucket's all-reduce was
launched and completed (host clock, time.perf_counter seconds), plus a plot of one step.
Sharded data parallel also records its parameter all-gathers: launched by the previous step's
optimizer, waited by this step's forward (GatherEvent.done is when the wait returned).

Exposed communication is the time from the end of backward to the last bucket's completion:
the part of the all-reduce that the step had to wait for. On CUDA the completion times are
host times at which the step observed completion, so exposed time is what the host waited.
"""
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class BucketEvent:
    index: int
    numel: int
    nbytes: int          # bytes on the wire (in the reduce dtype)
    launch: float
    done: float


@dataclass
class GatherEvent:
    index: int           # parameter bucket
    nbytes: int          # the gathered bucket's bytes
    launch: float
    done: float


@dataclass
class StepTimeline:
    forward_start: Optional[float] = None
    backward_start: Optional[float] = None   # the module output's gradient arrived
    backward_end: Optional[float] = None     # autograd finished (end-of-backward callback)
    sync_end: Optional[float] = None         # finish_gradient_sync returned
    buckets: list = field(default_factory=list)
    gathers: list = field(default_factory=list)  # GatherEvent (ZeRO parameter all-gathers)

    @property
    def last_done(self) -> Optional[float]:
        return max((b.done for b in self.buckets), default=None)

    def exposed_comm(self) -> float:
        """Seconds from the end of backward to the last bucket's completion (0 if all done)."""
        if self.backward_end is None or not self.buckets:
            return 0.0
        return max(0.0, self.last_done - self.backward_end)

    def comm_busy(self) -> float:
        """Seconds during which at least one all-reduce was in flight (union of intervals)."""
        spans = sorted((b.launch, b.done) for b in self.buckets)
        total, cur_start, cur_end = 0.0, None, None
        for s, e in spans:
            if cur_end is None or s > cur_end:
                if cur_end is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = s, e
            else:
                cur_end = max(cur_end, e)
        if cur_end is not None:
            total += cur_end - cur_start
        return total


def plot_timeline(steps: dict, path: str, title: str = "") -> None:
    """Draws one row per (label -> StepTimeline): forward, backward, each bucket's all-reduce
    in flight, and the exposed part. Needs matplotlib (imported here only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(steps), 1, figsize=(12, 1.0 + 1.6 * len(steps)), squeeze=False)
    for ax, (label, tl) in zip(axes[:, 0], steps.items()):
        t0 = tl.forward_start if tl.forward_start is not None else tl.backward_start
        t0 = min([t0] + [g.launch for g in tl.gathers])
        ms = lambda t: (t - t0) * 1e3  # noqa: E731
        end = tl.sync_end or tl.last_done or tl.backward_end
        if tl.backward_start is not None:
            ax.broken_barh([(0, ms(tl.backward_start))], (2.0, 0.8), color="#9ecae1", label="forward")
            ax.broken_barh([(ms(tl.backward_start), ms(tl.backward_end) - ms(tl.backward_start))],
                           (2.0, 0.8), color="#3182bd", label="backward")
        n = max(1, len(tl.buckets))
        for k, b in enumerate(sorted(tl.buckets, key=lambda b: b.launch)):
            y = 0.1 + 1.7 * k / n
            ax.broken_barh([(ms(b.launch), max(ms(b.done) - ms(b.launch), 1e-3))], (y, 1.5 / n),
                           color="#fd8d3c", label="all-reduce in flight" if k == 0 else None)
        for k, g in enumerate(sorted(tl.gathers, key=lambda g: g.launch)):
            y = 0.1 + 1.7 * k / max(1, len(tl.gathers))
            ax.broken_barh([(ms(g.launch), max(ms(g.done) - ms(g.launch), 1e-3))],
                           (y, 1.5 / max(1, len(tl.gathers))), color="#74c476", alpha=0.7,
                           label="param all-gather until waited" if k == 0 else None)
        if tl.backward_end is not None and tl.exposed_comm() > 0:
            ax.axvspan(ms(tl.backward_end), ms(tl.last_done), color="#de2d26", alpha=0.18,
                       label=f"exposed {tl.exposed_comm() * 1e3:.1f} ms")
        ax.set_xlim(0, ms(end) * 1.02 if end is not None else 1)
        ax.set_yticks([0.9, 2.4], ["buckets", "compute"])
        ax.set_title(label, fontsize=9, loc="left")
        ax.legend(loc="center left", fontsize=7, bbox_to_anchor=(1.005, 0.5), frameon=False)
        ax.set_xlabel("ms since forward start", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
