"""Naming the distributed wait that timed out, and the peer it waited for.

A rank that stops (SIGSTOP, a hung file system, a deadlock) makes the others wait in their next
collective until the process-group timeout (--dist_timeout). torch's gloo error then says only
"Timed out waiting 300000ms for recv operation to complete": neither the collective nor the peer.
So the trainer names each wait before it enters it (`waits.at(...)`), and a heartbeat thread
publishes "beat count | position" in the process group's key-value store twice a second. On a
timeout the error names this rank's wait, and reads the store twice: a rank whose count did not
move has stopped responding (that is the peer the others wait for), and its last position says
where. Under NCCL torch's watchdog ends the process itself on a timeout, printing the collective
(OpType, SeqNum); this module's message needs gloo's exception, which Python can catch.
"""
import datetime
import threading
import time

import torch.distributed as dist

from lmkernels.train.errors import TrainingStopped

_KEY = "lmkernels/heartbeat/"
_TIMED_OUT = "timed out"


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

    def __init__(self, rank: int, world_size: int, timeout_s: float, heartbeat_s: float = 0.5):
        self.rank, self.world_size, self.timeout_s, self.heartbeat_s = rank, world_size, timeout_s, heartbeat_s
        self.where = "start-up"
        self.store = _default_store() if world_size > 1 and dist.is_initialized() else None
        self._stop = threading.Event()
        self._thread = None
        if self.store is not None:
            self._thread = threading.Thread(target=self._beat, name="lmkernels-heartbeat", daemon=True)
            self._thread.start()

    def at(self, where: str):
        self.where = where  # a plain attribute: the heartbeat thread reads it

    def _beat(self):
        count = 0
        while True:
            try:
                self.store.set(f"{_KEY}{self.rank}", f"{count}|{self.where}")
            except Exception:  # the process group is gone: nothing left to report to
                return
            count += 1
            if self._stop.wait(self.heartbeat_s):
                return

    def close(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _read(self) -> dict:
        out = {}
        for r in range(self.world_size):
            key = f"{_KEY}{r}"
            if r != self.rank and self.store.check([key]):
                count, _, where = self.store.get(key).decode().partition("|")
                out[r] = (count, where)
        return out

    def _peers(self) -> str:
        if self.store is None:
            return "the other ranks' positions are unknown"
        try:
            self.store.set_timeout(datetime.timedelta(seconds=2))  # the store's host may be the stopped rank
            self.store.set(f"{_KEY}{self.rank}", f"{_TIMED_OUT}|{self.where}")
            before = self._read()
            time.sleep(3 * self.heartbeat_s)
            after = self._read()
        except Exception as e:
            return f"the other ranks' positions are unknown (the store did not answer: {e})"
        silent = [r for r in range(self.world_size) if r != self.rank and (r not in after or (
            after[r] == before.get(r) and after[r][0] != _TIMED_OUT))]
        if silent:
            shown = ", ".join(f"rank {r} (last at: {after[r][1]})" if r in after else f"rank {r} (never reported)"
                              for r in silent[:8])
            return (f"not responding (stopped or hung): {shown}" + (f" and {len(silent) - 8} more" if len(silent) > 8
                                                                    else ""))
        return "every other rank is alive; " + "; ".join(
            f"rank {r}: {'timed out in' if c == _TIMED_OUT else 'at'} {w}" for r, (c, w) in list(after.items())[:8])

    def explain(self, error: BaseException) -> TrainingStopped:
        self.close()
        return TrainingStopped(
            f"rank {self.rank} waited more than dist_timeout={self.timeout_s:g} s in {self.where}; "
            f"{self._peers()}. Every collective waits for the slowest rank: raise --dist_timeout if the wait "
            f"is legitimately long. (torch: {error})")
