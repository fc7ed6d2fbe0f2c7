"""Side-by-side timing for CPU benchmarks: candidates run alternately in one process, so a
noisy shared machine slows them alike and the ratios stay meaningful."""
import statistics
import time
from typing import Callable


def alternate(fns: dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each fn, calling them round-robin `reps` times."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def streaming_bandwidth(n_bytes: int = 256 * 2**20, reps: int = 10) -> float:
    """In-place streaming rate (read + write) of x.mul_(s) over n_bytes of fp32, bytes/s."""
    import torch

    x = torch.ones(n_bytes // 4)
    t = alternate({"mul_": lambda: x.mul_(1.0000001)}, reps)["mul_"]
    return 2 * n_bytes / t


def report(md: str, path=None) -> None:
    """Prints a benchmark's markdown, and writes it to `path` too when given (--write)."""
    print(md)
    if path:
        with open(path, "w") as f:
            f.write(md)
