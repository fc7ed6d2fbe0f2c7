"""Runs a function in N local processes that form a torch.distributed group (gloo by default).

    results = run_distributed(fn, world_size=2, args=(...,), timeout=60)

`fn(*args)` runs in every process after `init_process_group`; `results[r]` is what rank r
returned (it must pickle). The rendezvous store is created here, in the parent, on a port the
OS picks, so concurrent runs never race for a port. If any rank raises, the others are killed
and the parent raises DistributedTestError carrying that rank's traceback; if the ranks do not
all finish within `timeout` seconds they are killed and the parent raises TimeoutError naming
the stragglers. Nothing outlives the call, so a broken collective cannot hang CI.

`fn` must be importable by name from a fresh interpreter (a module-level function), since the
processes are started with the "spawn" method (fork is unsafe once torch has threads).
"""
import datetime
import multiprocessing as mp
import os
import queue
import time
import traceback
from typing import Any, Callable, Sequence

__all__ = ["DistributedTestError", "run_distributed"]

_HOST = "127.0.0.1"


class DistributedTestError(RuntimeError):
    """A rank raised; the message holds its rank and its traceback."""


def _entry(fn, rank, world_size, port, backend, args, kwargs, num_threads, timeout, results):
    try:
        import torch
        import torch.distributed as dist

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        store = dist.TCPStore(_HOST, port, world_size=None, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout))
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(*args, **kwargs)
        except BaseException:  # noqa: BLE001 - reported before teardown, so the root cause
            results.put((rank, False, traceback.format_exc()))  # arrives before its echoes
            dist.destroy_process_group()
            return
        dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    backend: str = "gloo",
    timeout: float = 60.0,
    num_threads: int | None = 1,
) -> list[Any]:
    """Runs fn(*args, **kwargs) on ranks 0..world_size-1 and returns their results by rank.

    num_threads: torch intra-op threads per process (1 keeps N processes from oversubscribing
    a small machine; None leaves torch's default)."""
    import torch.distributed as dist

    if world_size < 1:
        raise ValueError(f"world_size must be >= 1; got {world_size}")
    # The parent owns the store (port 0: the OS picks a free one) and keeps it alive until
    # every rank is done, so ranks rendezvous through it without guessing ports.
    store = dist.TCPStore(_HOST, 0, world_size=None, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=timeout))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_entry, daemon=True, name=f"rank{r}",
                    args=(fn, r, world_size, store.port, backend, tuple(args), dict(kwargs or {}),
                          num_threads, timeout, results))
        for r in range(world_size)
    ]
    env_before = os.environ.get("OMP_NUM_THREADS")
    if num_threads is not None:  # inherited by the children: no oversubscribed OpenMP pools
        os.environ["OMP_NUM_THREADS"] = str(num_threads)
    try:
        for p in procs:
            p.start()
    finally:
        if num_threads is not None:
            if env_before is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = env_before
    deadline = time.monotonic() + timeout
    done: dict[int, Any] = {}
    finished = False
    try:
        while len(done) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(done))
                raise TimeoutError(f"{fn.__name__}: ranks {missing} of {world_size} did not finish "
                                   f"within {timeout:.0f} s (killed)")
            try:
                rank, ok, value = results.get(timeout=min(left, 0.5))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    # A rank died without reporting (segfault, os._exit): say so at once.
                    time.sleep(0.2)
                    if results.empty():
                        raise DistributedTestError(
                            f"{fn.__name__}: {dead[0].name} exited with code {dead[0].exitcode} "
                            "without reporting a result")
                continue
            if not ok:
                # Other ranks usually fail in turn (a peer left a collective): gather their
                # reports briefly, root cause (the first report) first.
                errors = [(rank, value)]
                grace = time.monotonic() + 1.0
                while time.monotonic() < grace:
                    try:
                        r, ok2, v = results.get(timeout=max(0.0, grace - time.monotonic()))
                    except queue.Empty:
                        break
                    if not ok2:
                        errors.append((r, v))
                text = "\n".join(f"--- rank {r} of {world_size} ---\n{v}" for r, v in errors)
                raise DistributedTestError(f"{fn.__name__} failed on rank {rank} of {world_size}:\n{text}")
            done[rank] = value
        finished = True
    finally:
        if finished:  # every rank reported: let them exit on their own
            for p in procs:
                p.join(timeout=max(1.0, min(10.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        del store
    return [done[r] for r in range(world_size)]
