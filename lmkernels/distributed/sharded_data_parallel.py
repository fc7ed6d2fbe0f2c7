"""ShardedDataParallel: ZeRO-1 / ZeRO-2 on BucketedDataParallel's buckets and hooks.

    model = ShardedDataParallel(GPT(cfg), zero=2)
    opt = ShardedAdamW(model, model.module.configure_optimizer_groups(0.1), lr=3e-4)
    loss = model(x, y); loss.backward()   # zero=2: buckets reduce-scattered while backward runs
    model.clip_grad_norm_(1.0)            # global norm from the shards: one scalar all-reduce
    opt.step()                            # one fused AdamW launch per param group, on the shards;
                                          # then each bucket's all-gather starts

Each bucket's flat buffer is padded (buckets.padded_numel) so it splits into d equal, 16-byte
aligned shards; rank r owns the contiguous slice [r*s, (r+1)*s) of every bucket.
  * Parameters become views of one flat buffer per bucket (full on every rank), so the
    updated shards are all-gathered in place, one collective per bucket.
  * zero=1: gradients are all-reduced exactly as in BucketedDataParallel; the optimizer reads
    only its shard of each bucket's gradient buffer. Its state (both moments, and an fp32
    master copy for bf16/fp16 parameters) exists only for the shard.
  * zero=2: each bucket is packed into a temporary buffer and reduce-scattered asynchronously
    from the same hook that launches the all-reduce today; the rank keeps only its gradient
    shard and the parameters' .grad are dropped (only the shard persists between steps).
  * After the step the all-gather of every bucket is launched; a forward pre-hook on each
    module that owns parameters waits for its buckets only, so the gathers of later layers
    overlap the forward of earlier ones (gather_params="step" waits for all in the step).
The bucket layout is fixed at construction (no rebuild after the first iteration), so the
shards and the optimizer state they own never move; checkpoints map through parameter names.
"""
import time
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from lmkernels.distributed.buckets import Bucket, make_bucket, padded_numel
from lmkernels.distributed.data_parallel import BucketedDataParallel
from lmkernels.distributed.timeline import BucketEvent, GatherEvent

__all__ = ["ShardedDataParallel"]

# torch 2.13 renames these collectives (the GPU machines' 2.11 does not have the new names).
warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*deprecated")


@dataclass(eq=False)
class Shard:
    """This rank's part of one bucket. lo/hi: the shard's range in the bucket's flat buffer."""
    lo: int
    hi: int
    flat_param: torch.Tensor            # the whole bucket's parameters (params are views of it)
    grad: torch.Tensor                  # this rank's averaged gradient shard (params' dtype)
    gather: Optional[object] = None     # the in-flight all-gather of the updated parameters
    gather_launch: float = 0.0          # its launch time (host clock, for the timeline)

    @property
    def param(self) -> torch.Tensor:
        return self.flat_param[self.lo:self.hi]


class ShardedDataParallel(BucketedDataParallel):
    """BucketedDataParallel whose optimizer state (zero=1) and also gradients (zero=2) are
    sharded over the process group; pair it with lmkernels.distributed.ShardedAdamW.

    gather_params: "forward" (default) waits for each bucket's parameter all-gather in a
    forward pre-hook of the modules that use it; "step" waits for all of them at the end of
    the optimizer step. With "forward", code that reads a parameter outside the forward of the
    module that owns it (a functional use in a parent's forward, an export) must call
    wait_param_gather() first (state_dict() does). Other arguments: as BucketedDataParallel (find_unused_parameters and
    gradient_as_bucket_view are decided here: every parameter must get a gradient)."""

    def __init__(self, module, process_group=None, *, zero: int = 1,
                 gather_params: str = "forward", **kwargs):
        if isinstance(zero, bool) or zero not in (1, 2):
            raise ValueError(f"ShardedDataParallel: zero must be 1 (optimizer state sharded) or 2 "
                             f"(also gradients); got {zero!r} (zero=0 is BucketedDataParallel)")
        if gather_params not in ("forward", "step"):
            raise ValueError(f"ShardedDataParallel: gather_params must be 'forward' or 'step'; "
                             f"got {gather_params!r}")
        for key in ("find_unused_parameters", "gradient_as_bucket_view"):
            if key in kwargs:
                raise ValueError(f"ShardedDataParallel: {key} is not an option here (every "
                                 "parameter must receive a gradient; the shards need the flat "
                                 "gradient layout the sharding stage chooses)")
        self.zero = zero
        self.gather_params = gather_params
        self._shards: list[Shard] = []
        super().__init__(module, process_group, gradient_as_bucket_view=(zero == 1), **kwargs)
        self._rebuilt = True  # fixed layout: the shards and their optimizer state never move
        self._hook_handles = self._register_gather_waits()

    # ----------------------------------------------------------------------- buckets
    def _make_bucket(self, index: int, params: list, names: list) -> Bucket:
        bucket = make_bucket(index, params, names, self.reduce_dtype, self.zero == 1,
                             shards=self.world_size)
        dtype, device = params[0].dtype, params[0].device
        size = padded_numel(sum(p.numel() for p in params), self.world_size, dtype.itemsize)
        s = size // self.world_size
        lo = self.rank * s
        flat = torch.zeros(size, dtype=dtype, device=device)
        with torch.no_grad():
            for o, p in zip(bucket.offsets, params):
                view = flat[o:o + p.numel()].view_as(p)
                view.copy_(p)
                p.data = view  # same Parameter object, its storage is now the bucket's
        if self.zero == 1:
            grad = bucket.grads[lo:lo + s]
        else:
            grad = torch.zeros(s, dtype=dtype, device=device)
            bucket.comm = bucket.grads = torch.empty(0, dtype=bucket.comm.dtype, device=device)
        self._shards.append(Shard(lo, lo + s, flat, grad))
        return bucket

    def _attach_overlap_optimizer(self, optimizer) -> None:
        raise ValueError("ShardedDataParallel: an OverlappedOptimizer steps whole parameters per "
                         "bucket; the sharded model is stepped by ShardedAdamW(model, ...)")

    @property
    def shards(self) -> list:
        """Per bucket (in launch order): this rank's Shard."""
        return self._shards

    # ------------------------------------------------------ zero=2: reduce-scatter
    def _launch(self, bucket: Bucket) -> None:
        if self.zero == 1:
            return super()._launch(bucket)
        launch = time.perf_counter()
        shard = self._shards[bucket.index]
        wire = self.reduce_dtype or bucket.params[0].dtype
        full = torch.empty(shard.flat_param.numel(), dtype=wire, device=self.device)
        used = sum(p.numel() for p in bucket.params)
        full[used:].zero_()
        from lmkernels.ops.bucket import bucket_pack_
        bucket_pack_(self._bucket_grads(bucket), full[:used], self._prescale)
        recv = shard.grad if wire == shard.grad.dtype else torch.empty(
            shard.hi - shard.lo, dtype=wire, device=self.device)
        bucket.comm, bucket.recv = full, recv
        bucket.work = dist.reduce_scatter_tensor(recv, full, op=self._reduce_op,
                                                 group=self.process_group, async_op=True)
        bucket.launch_time = launch
        if self.record_timeline and full.device.type == "cpu":
            done = bucket.done_time
            try:
                bucket.work.get_future().then(lambda fut: done.append(time.perf_counter()))
            except RuntimeError:  # gloo's reduce-scatter has no future: done when finalized
                pass

    def _finalize(self, bucket: Bucket) -> None:
        if self.zero == 1:
            return super()._finalize(bucket)
        if bucket.finalized:
            return
        self._wait(bucket.work, self._describe(bucket))
        shard = self._shards[bucket.index]
        if bucket.recv is not shard.grad:
            shard.grad.copy_(bucket.recv)  # back from reduce_dtype
        for p in bucket.params:
            p.grad = None  # this rank keeps only its shard
        bucket.finalized = True
        if self.record_timeline:
            done = bucket.done_time[0] if bucket.done_time else time.perf_counter()
            nbytes = bucket.comm.numel() * bucket.comm.element_size()
            self._timeline.buckets.append(BucketEvent(bucket.index, bucket.comm.numel(), nbytes,
                                                      bucket.launch_time, done))
        bucket.comm = bucket.recv = torch.empty(0, dtype=bucket.comm.dtype, device=self.device)

    def _describe(self, bucket: Bucket) -> str:
        text = super()._describe(bucket)
        return text.replace("all-reduce", "reduce-scatter") if self.zero == 2 else text

    # ------------------------------------------------------------- clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, tp_group=None) -> torch.Tensor:
        """Clips the gradient shards by the global 2-norm, computed from the shards with one
        all-reduce of the squared sums over the DP group (and, with tp_group, one over the TP
        group for the TP-sharded parameters; replicated ones count once). Equal to the norm of
        the full averaged gradients; returns it, as torch.nn.utils.clip_grad_norm_ does."""
        if norm_type not in (2, 2.0):
            raise ValueError(f"ShardedDataParallel.clip_grad_norm_: only the 2-norm is supported; "
                             f"got norm_type={norm_type!r}")
        self.finish_gradient_sync()
        from lmkernels.distributed.tp_utils import is_tp_sharded

        sharded, replicated = [], []
        for bucket, shard in zip(self._buckets, self._shards):
            for o, p in zip(bucket.offsets, bucket.params):
                a, b = max(o, shard.lo), min(o + p.numel(), shard.hi)
                if a < b:
                    piece = shard.grad[a - shard.lo:b - shard.lo]
                    (sharded if tp_group is not None and is_tp_sharded(p) else replicated).append(piece)

        def sum_sq(gs):
            if not gs:
                return torch.zeros((), dtype=torch.float32, device=self.device)
            return torch.stack([n.float() for n in torch._foreach_norm(gs, 2.0)]).square().sum()

        sums = torch.stack([sum_sq(sharded), sum_sq(replicated)])
        self._wait(dist.all_reduce(sums, group=self.process_group, async_op=True),
                   "the all-reduce of the gradient norm (clip_grad_norm_)")
        if tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(sums[:1], group=tp_group)
        total = sums.sum().sqrt()
        coef = (float(max_norm) / (total + 1e-6)).clamp(max=1.0)
        grads = [s.grad for s in self._shards]
        torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        return total

    # ---------------------------------------------------- parameter all-gather
    def start_param_gather(self) -> None:
        """Launches the all-gather of every bucket's updated shard (the optimizer calls it)."""
        if self.world_size == 1:
            return
        for shard in self._shards:
            shard.gather_launch = time.perf_counter()
            shard.gather = dist.all_gather_into_tensor(shard.flat_param, shard.param,
                                                       group=self.process_group, async_op=True)
        if self.gather_params == "step":
            self.wait_param_gather()

    def wait_param_gather(self, indices=None) -> None:
        """Waits for the parameter all-gathers (all buckets, or those in `indices`)."""
        for i in range(len(self._shards)) if indices is None else indices:
            shard = self._shards[i]
            if shard.gather is not None:
                work, shard.gather = shard.gather, None
                self._wait(work, f"the all-gather of parameter bucket {i} of {len(self._shards)}")
                if self.record_timeline:
                    nbytes = shard.flat_param.numel() * shard.flat_param.element_size()
                    self._timeline.gathers.append(
                        GatherEvent(i, nbytes, shard.gather_launch, time.perf_counter()))

    def _register_gather_waits(self) -> list:
        """A forward pre-hook on every module that owns parameters waits for its buckets."""
        bucket_of = {id(p): b.index for b in self._buckets for p in b.params}
        handles = []
        for module in self.module.modules():
            mine = sorted({bucket_of[id(p)] for p in module.parameters(recurse=False)
                           if id(p) in bucket_of})
            if mine:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, mine=mine: self.wait_param_gather(mine)))
        return handles

    def state_dict(self, *args, **kwargs):
        self.wait_param_gather()
        return super().state_dict(*args, **kwargs)

    # -------------------------------------------------------------- memory
    def memory_bytes(self) -> dict:
        """This rank's persistent bytes: parameters (full, incl. padding) and gradients (the
        gradient buffers for zero=1, the shards for zero=2)."""
        params = sum(s.flat_param.numel() * s.flat_param.element_size() for s in self._shards)
        if self.zero == 1:
            grads = sum(b.grads.numel() * b.grads.element_size()
                        + (0 if b.comm is b.grads else b.comm.numel() * b.comm.element_size())
                        for b in self._buckets)
        else:
            grads = sum(s.grad.numel() * s.grad.element_size() for s in self._shards)
        return {"param_bytes": params, "grad_bytes": grads}
