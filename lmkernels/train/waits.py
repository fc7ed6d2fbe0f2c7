"""Naming the distributed wait that timed out, and the ranks it waited for.

A rank that stops (SIGSTOP, a hung file system, a crash that leaves the process alive) makes the
others wait in their next collective until the process-group timeout (--dist_timeout). torch's
gloo error then says only "Timed out waiting 300000ms for recv operation to complete": neither the
collective nor the peer. So the trainer names each wait before it enters it (`waits.at(...)`),
and publishes that position in the process group's key-value store (a few microseconds a call);
on a timeout the error says where this rank waited and where every other rank last was, which
picks out the peer that fell behind. Under NCCL torch's watchdog aborts the process itself on a
timeout and prints the collective (OpType, SeqNum); this module's message needs gloo's exception.
"""
import datetime

import torch.distributed as dist

from lmkernels.train.errors import TrainingStopped

_KEY = "lmkernels/position/"


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # private API: without it the message just lacks the peers' positions
        return None


def is_timeout(error: BaseException) -> bool:
    """gloo: 'Timed out waiting ...' in the collective that timed out, then 'Application timeout
    caused pair closure' in any later one; NCCL: 'Watchdog caught collective operation timeout'."""
    text = str(error).lower()
    return "timed out" in text or "timeout" in text


class WaitTracker:
    """Where this rank is (the wait it is in or about to enter), shared with the other ranks."""

    def __init__(self, rank: int, world_size: int, timeout_s: float):
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.where = "start-up"
        self.store = _default_store() if world_size > 1 and dist.is_initialized() else None

    def at(self, where: str):
        self.where = where
        if self.store is not None:
            self.store.set(f"{_KEY}{self.rank}", where)

    def _others(self) -> str:
        if self.store is None:
            return "the other ranks' positions are unknown"
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))  # the store's host may be the stopped rank
            keys = [f"{_KEY}{r}" for r in range(self.world_size) if r != self.rank]
            lines = [f"rank {k[len(_KEY):]}: {self.store.get(k).decode()}" if self.store.check([k])
                     else f"rank {k[len(_KEY):]}: no position reported" for k in keys]
        except Exception as e:
            return f"the other ranks' positions are unknown (the store did not answer: {e})"
        behind = [line for line in lines if not line.endswith(": " + self.where)]
        shown = (behind or lines)[:8]
        more = len(behind or lines) - len(shown)
        return ("last positions of the ranks not at this wait: " if behind else "every rank is at this wait: ") + \
            "; ".join(shown) + (f"; and {more} more" if more > 0 else "")

    def explain(self, error: BaseException) -> TrainingStopped:
        return TrainingStopped(
            f"rank {self.rank} waited more than dist_timeout={self.timeout_s:g} s in {self.where}; "
            f"{self._others()}. A rank that falls behind (stopped, hung, out of memory) stalls every "
            f"collective; raise --dist_timeout if the wait is legitimately long. (torch: {error})")
