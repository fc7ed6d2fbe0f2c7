"""Small communication helpers for the data-parallel wrappers: which backend reduces a device's
tensors, how to average with it, and waits that end with a clear error instead of hanging.

A process group may run a different backend per device ("cpu:gloo,cuda:nccl"), so every
decision here is made for the device the tensors are on, never from the group's first name.
"""
import datetime
import math
from typing import Optional

import torch
import torch.distributed as dist

# Device types each backend can reduce on, for groups created with a single backend name.
_BACKEND_DEVICES = {"gloo": ("cpu", "cuda"), "nccl": ("cuda",), "mpi": ("cpu", "cuda")}


def parse_backend_config(config: str) -> Optional[dict]:
    """{device type: backend} from a backend config ("gloo", "nccl", "cpu:gloo,cuda:nccl");
    None for a backend we do not know (a third-party one: trust the user)."""
    devices: dict = {}
    for part in str(config).lower().split(","):
        part = part.strip()
        if ":" in part:
            device_type, backend = (s.strip() for s in part.split(":", 1))
            devices[device_type] = backend
        elif part in _BACKEND_DEVICES:
            for device_type in _BACKEND_DEVICES[part]:
                devices.setdefault(device_type, part)
        else:
            return None
    return devices


def backend_devices(group) -> Optional[dict]:
    """{device type: backend} of a process group (None: unknown backend)."""
    try:
        config = dist.get_backend_config(group)
    except (AttributeError, RuntimeError, ValueError):  # older torch, or no config
        config = dist.get_backend(group)
    return parse_backend_config(config)


def averages_in_reduction(backend: Optional[str]) -> bool:
    """NCCL has ReduceOp.AVG (one pass, no separate scale); gloo and MPI do not."""
    return backend == "nccl"


def group_timeout(group, device: torch.device) -> Optional[datetime.timedelta]:
    """The timeout the process group was created with (init_process_group(timeout=...)), for
    the backend that serves `device`; None if this torch does not expose it."""
    try:
        timeout = group._get_backend(device).options._timeout
    except (AttributeError, RuntimeError, ValueError):
        return None
    return timeout if isinstance(timeout, datetime.timedelta) and timeout.total_seconds() > 0 else None


def as_timeout(value, name: str = "timeout") -> Optional[datetime.timedelta]:
    """Seconds (a positive finite number) or a timedelta, checked; None stays None."""
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        raise TypeError(f"{name} must be a number of seconds or a datetime.timedelta; got "
                        f"{type(value).__name__} ({value!r})")
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive, finite number of seconds; got {value!r}")
    return datetime.timedelta(seconds=seconds)


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the timeout (a peer rank is stopped, crashed or
    far behind)."""


def wait(work, what: str, timeout: Optional[datetime.timedelta], backend: Optional[str],
         rank: int, world_size: int) -> None:
    """Waits for an async collective and turns a timeout or a peer's failure into an error that
    names the collective (`what`). NCCL is never given a timeout here: its wait only orders
    the CUDA streams (the host does not block) and its watchdog enforces the group's timeout;
    a host-side timeout would make every wait block the host."""
    try:
        if timeout is None or backend == "nccl":
            work.wait()
        else:
            work.wait(timeout)
    except RuntimeError as e:
        limit = f"{timeout.total_seconds():g} s" if timeout is not None else "the process group's timeout"
        raise CollectiveTimeout(
            f"BucketedDataParallel: {what} did not complete within {limit} on rank {rank} of "
            f"{world_size}: another rank of the group is stopped, has crashed or is far behind "
            f"(every rank must run the same steps). {backend or 'backend'} said: {e}") from e
