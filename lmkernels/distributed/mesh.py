"""The 2-D data-parallel x tensor-parallel layout of process groups.

Global rank = dp_rank * tp + tp_rank: the ranks of one TP group are consecutive (on one node
with torchrun, where TP's per-layer collectives belong), and each DP group holds the ranks with
the same tp_rank (the same shards), whose gradients the bucketed all-reduce averages.
Built with torch's DeviceMesh (mesh_dim_names ("dp", "tp")); without an initialized process
group everything is size 1 and the groups are None.
"""
from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist


@dataclass
class ParallelMesh:
    dp_size: int = 1
    tp_size: int = 1
    dp_rank: int = 0
    tp_rank: int = 0
    dp_group: Optional[object] = None  # ProcessGroup, or None when dp_size == 1 and no dist
    tp_group: Optional[object] = None
    device_mesh: Optional[object] = None

    @property
    def world_size(self) -> int:
        return self.dp_size * self.tp_size

    @property
    def rank(self) -> int:
        return self.dp_rank * self.tp_size + self.tp_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_mesh(tp_size: int = 1, device_type: str = "cpu") -> ParallelMesh:
    """The DP x TP mesh over the default process group (initialize it first, e.g. under torchrun).
    Raises a clear error when tp_size does not divide the world size."""
    if tp_size < 1:
        raise ValueError(f"tp must be >= 1; got {tp_size}")
    if not (dist.is_available() and dist.is_initialized()):
        if tp_size != 1:
            raise ValueError(f"tp={tp_size} needs {tp_size} or a multiple of {tp_size} processes: launch with "
                             f"torchrun --nproc_per_node {tp_size} (here there is a single process)")
        return ParallelMesh()
    world = dist.get_world_size()
    if world % tp_size:
        raise ValueError(f"tp={tp_size} must divide the world size {world} (data-parallel size = world / tp)")
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (world // tp_size, tp_size), mesh_dim_names=("dp", "tp"))
    rank = dist.get_rank()
    return ParallelMesh(dp_size=world // tp_size, tp_size=tp_size, dp_rank=rank // tp_size,
                        tp_rank=rank % tp_size, dp_group=mesh.get_group("dp"),
                        tp_group=mesh.get_group("tp"), device_mesh=mesh)
