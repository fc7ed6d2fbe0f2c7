"""BucketedDataParallel: data parallelism whose gradient all-reduce overlaps backward.

    model = BucketedDataParallel(GPT(cfg).to(device), bucket_cap_mb=25)
    loss = model(x, y); loss.backward()        # buckets are all-reduced while backward runs
    optimizer.step()                           # the gradients are averaged when backward returns

How it works (the same on NCCL and gloo):
  * At construction every rank checks that all ranks hold the same model (parameters, buffers,
    shapes, dtypes, order, bucketing options) and raises the same clear error if not; then
    rank 0's parameters and buffers are broadcast.
  * Parameters that require grad (tied ones once) are grouped into buckets in reverse
    registration order (the order backward produces them), with a small first bucket. Each
    bucket owns a flat gradient buffer and every parameter's `.grad` is a view into it.
  * A post-accumulate-grad hook counts a bucket's gradients; when its last one has arrived the
    bucket's all-reduce is launched asynchronously (buckets launch in index order, so every
    rank issues the same collectives in the same order). The average is ReduceOp.AVG where the
    backend serving the gradients' device has it (NCCL), otherwise a 1/world_size scale fused
    into the pack/cast op.
  * At the end of backward (an autograd final callback, as in torch DDP) the buckets still in
    flight are waited for and cast / unpacked, so a plain `optimizer.step()` sees averaged
    gradients. On NCCL that wait only orders the CUDA streams; the host does not block.
  * Every wait has a timeout (the process group's, or `timeout=`): a rank whose peers stop
    raises an error naming the collective and the bucket instead of waiting forever.
  * After the first synchronized iteration the buckets are rebuilt once in the order the
    gradients actually arrived (rank 0's order, broadcast), as DDP does.
  * An OverlappedOptimizer (lmkernels.distributed.overlap) attached to the model is called with
    each bucket as soon as that bucket's reduction is done.
"""
import contextlib
import math
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from lmkernels.distributed import comm
from lmkernels.distributed.buckets import Bucket, assign_buckets, make_bucket
from lmkernels.distributed.overlap import CLIP_REFUSAL
from lmkernels.distributed.replicas import check_same_model, checksum, describe
from lmkernels.distributed.timeline import BucketEvent, StepTimeline
from lmkernels.ops.bucket import bucket_pack_, bucket_scale_, bucket_unpack_

__all__ = ["BucketedDataParallel"]

_REDUCE_DTYPES = (None, torch.float32, torch.bfloat16, torch.float16)


def _check_cap(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"BucketedDataParallel: {name} must be a number of MiB; got "
                        f"{type(value).__name__} ({value!r})")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"BucketedDataParallel: {name} must be a finite number of MiB >= 0 "
                         f"(0: one parameter per bucket); got {value!r}")
    return float(value)


def _sparse_modules(module: nn.Module) -> list:
    """Names of submodules that produce sparse gradients (nn.Embedding / EmbeddingBag with
    sparse=True) for a parameter that requires grad."""
    return [name or type(m).__name__ for name, m in module.named_modules()
            if getattr(m, "sparse", False) is True
            and any(p.requires_grad for p in m.parameters(recurse=False))]


class BucketedDataParallel(nn.Module):
    """Wraps `module` for data-parallel training over `process_group` (default: WORLD).

    Arguments follow torch.nn.parallel.DistributedDataParallel where the idea is the same:
    bucket_cap_mb / first_bucket_cap_mb: bucket sizes in MiB (a cap of 0: one parameter per
    bucket). reduce_dtype: dtype on the wire (float32 to reduce bf16/fp16 gradients in fp32,
    bfloat16 to compress fp32 gradients); None: the gradients' dtype. broadcast_buffers:
    broadcast rank 0's buffers before each forward. find_unused_parameters: allow parameters
    that get no gradient (otherwise an error names them). gradient_as_bucket_view: `.grad` are
    views of the buckets (no copies); False packs and unpacks with the multi-tensor ops.
    timeout: seconds (or a timedelta) any wait on a collective may take before it raises;
    default: the process group's timeout (init_process_group(timeout=...)). On NCCL only the
    group's timeout applies (its watchdog enforces it), so timeout= is refused. record_timeline: keep a cheap per-step record
    (see `last_timeline`). To step the optimizer per bucket during backward, wrap the model and
    then build an `OverlappedOptimizer(model, ...)`.
    """

    def __init__(
        self,
        module: nn.Module,
        process_group=None,
        *,
        bucket_cap_mb: float = 25,
        first_bucket_cap_mb: float = 1,
        reduce_dtype: Optional[torch.dtype] = None,
        broadcast_buffers: bool = True,
        find_unused_parameters: bool = False,
        gradient_as_bucket_view: bool = True,
        timeout=None,
        record_timeline: bool = True,
    ):
        super().__init__()
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("BucketedDataParallel needs torch.distributed initialized "
                               "(launch with torchrun and call dist.init_process_group first)")
        if not isinstance(module, nn.Module):
            raise TypeError(f"BucketedDataParallel: module must be a torch.nn.Module; got "
                            f"{type(module).__name__} ({module!r:.60})")
        self.bucket_cap_mb = _check_cap("bucket_cap_mb", bucket_cap_mb)
        self.first_bucket_cap_mb = _check_cap("first_bucket_cap_mb", first_bucket_cap_mb)
        if reduce_dtype not in _REDUCE_DTYPES:
            raise ValueError(f"BucketedDataParallel: reduce_dtype must be one of {_REDUCE_DTYPES}; "
                             f"got {reduce_dtype!r}")
        sparse = _sparse_modules(module)
        if sparse:
            raise ValueError(f"BucketedDataParallel: sparse gradients are not supported (the "
                             f"buckets are dense); these modules have sparse=True: {sparse}. "
                             "Build them with sparse=False")
        self.module = module
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self.rank = dist.get_rank(self.process_group)
        self.reduce_dtype = reduce_dtype
        self.broadcast_buffers = broadcast_buffers
        self.find_unused_parameters = find_unused_parameters
        self.gradient_as_bucket_view = gradient_as_bucket_view
        self.record_timeline = record_timeline

        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]  # tied: once
        if not named:
            raise ValueError("BucketedDataParallel: the module has no parameter that requires grad")
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.device = self._check_device()
        self._backend = (comm.backend_devices(self.process_group) or {}).get(self.device.type)
        self.timeout = comm.as_timeout(timeout) or comm.group_timeout(self.process_group, self.device)
        if timeout is not None and self._backend == "nccl":
            # A host-side timeout would make every NCCL wait block the host (no overlap).
            raise ValueError(f"BucketedDataParallel: timeout={timeout!r} cannot apply to NCCL "
                             "waits; set it for the whole group with "
                             "dist.init_process_group(timeout=...), which NCCL's watchdog enforces")
        # NCCL averages inside the reduction; gloo has no AVG, so we pre-scale by 1/world.
        averages = comm.averages_in_reduction(self._backend)
        self._reduce_op = dist.ReduceOp.AVG if averages else dist.ReduceOp.SUM
        self._prescale = 1.0 if averages else 1.0 / self.world_size

        self._check_same_model()
        self._sync_module_states()
        self.overlap_optimizer = None  # set by OverlappedOptimizer(self, ...)
        # Reverse registration order: roughly the order backward produces the gradients.
        self._build_buckets(list(reversed(range(len(self._params)))))
        self._hooks = [p.register_post_accumulate_grad_hook(self._make_hook(i))
                       for i, p in enumerate(self._params)]
        self._rebuilt = False
        self._require_sync = True
        self._reset_iteration()
        self._used = [False] * len(self._params)  # got a gradient since the last sync
        self.last_timeline: Optional[StepTimeline] = None
        self._timeline = StepTimeline()

    # ----------------------------------------------------------------------------- setup
    def _check_device(self) -> torch.device:
        device = self._params[0].device
        for n, p in zip(self._names, self._params):
            if p.device != device:
                raise ValueError(f"BucketedDataParallel: all parameters must be on one device; "
                                 f"'{self._names[0]}' is on {device} but '{n}' is on {p.device}")
        devices = comm.backend_devices(self.process_group)
        backend = dist.get_backend(self.process_group)
        if devices is not None and device.type not in devices:
            raise ValueError(f"BucketedDataParallel: the module is on {device} but the process "
                             f"group's backend '{backend}' reduces tensors on {sorted(devices)}; "
                             "move the module to a matching device or use a matching backend")
        if device.type == "cuda" and (devices or {}).get("cuda") == "nccl":
            current = torch.cuda.current_device()
            if device.index != current:
                raise ValueError(f"BucketedDataParallel: the module is on {device} but this rank's "
                                 f"current CUDA device is cuda:{current}, which NCCL uses; call "
                                 "torch.cuda.set_device(local_rank) before building the model")
        return device

    def _wait(self, work, what: str) -> None:
        comm.wait(work, what, self.timeout, self._backend, self.rank, self.world_size)

    def _check_same_model(self) -> None:
        """Every rank must hold the same parameters and buffers (and bucketing options), or the
        broadcasts and all-reduces below would abort in the backend or hang."""
        named = [("parameter", n, p) for n, p in self.module.named_parameters()]
        named += [("buffer", n, b) for n, b in self.module.named_buffers()]
        options = dict(bucket_cap_mb=self.bucket_cap_mb, first_bucket_cap_mb=self.first_bucket_cap_mb,
                       reduce_dtype=self.reduce_dtype, find_unused_parameters=self.find_unused_parameters,
                       broadcast_buffers=self.broadcast_buffers)
        check_same_model(describe(named, options), self.process_group, self.device, self._wait)

    def _rank0(self) -> int:
        return dist.get_global_rank(self.process_group, 0) if self.process_group is not dist.group.WORLD else 0

    @torch.no_grad()
    def _broadcast_from_rank0(self, tensors: list, what: str) -> None:
        if self.world_size == 1 or not tensors:
            return
        groups: dict = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch._utils._flatten_dense_tensors([t.detach() for t in group])
            self._wait(dist.broadcast(flat, self._rank0(), group=self.process_group, async_op=True),
                       f"the broadcast of rank 0's {what}")
            for t, f in zip(group, torch._utils._unflatten_dense_tensors(flat, group)):
                t.copy_(f)

    def _sync_module_states(self) -> None:
        """Every rank starts from rank 0's parameters and buffers."""
        params = list(self.module.parameters())  # also those that do not require grad
        self._broadcast_from_rank0(params + list(self.module.buffers()), "parameters and buffers")

    def _build_buckets(self, order: list) -> None:
        """(Re)creates the buckets, filling them with parameters in `order` (indices)."""
        mib = 1024 * 1024
        groups = assign_buckets([self._params[i] for i in order], int(self.bucket_cap_mb * mib),
                                int(self.first_bucket_cap_mb * mib))
        self._buckets: list[Bucket] = []
        self._bucket_of = [0] * len(self._params)
        self._slot_of = [0] * len(self._params)
        for b, members in enumerate(groups):
            idx = [order[m] for m in members]
            for slot, i in enumerate(idx):
                self._bucket_of[i] = b
                self._slot_of[i] = slot
            self._buckets.append(self._make_bucket(b, [self._params[i] for i in idx],
                                                   [self._names[i] for i in idx]))
        self._order = list(order)

    def _make_bucket(self, index: int, params: list, names: list) -> Bucket:
        """One bucket's buffers (ShardedDataParallel pads them to equal shards)."""
        return make_bucket(index, params, names, self.reduce_dtype, self.gradient_as_bucket_view)

    def _reset_iteration(self) -> None:
        self._ready = [False] * len(self._params)
        self._ready_order: list = []
        self._next_launch = 0
        self._next_finalize = 0
        self._in_flight = False
        self._in_backward = False
        self._used_work = None
        self._used_map = None
        self._deferred_steps: list = []
        for b in self._buckets:
            b.reset()

    def _attach_overlap_optimizer(self, optimizer) -> None:
        """Called by OverlappedOptimizer: from now on each bucket is stepped when reduced."""
        if self._in_flight:
            raise RuntimeError("BucketedDataParallel: attach an OverlappedOptimizer between "
                               "iterations, not while gradients are being synchronized")
        self.overlap_optimizer = optimizer

    # ------------------------------------------------------------------------- public
    @contextlib.contextmanager
    def no_sync(self):
        """Gradients of backward passes inside this context accumulate locally (no
        communication); the first backward outside it reduces the accumulated sum."""
        before = self._require_sync
        self._require_sync = False
        try:
            yield
        finally:
            self._require_sync = before

    def forward(self, *args, **kwargs):
        if self.broadcast_buffers and self.world_size > 1:
            self._broadcast_from_rank0(list(self.module.buffers()), "buffers (broadcast_buffers)")
        if self._in_flight and torch.is_grad_enabled():
            # Its backward would accumulate into buffers whose all-reduce is still running.
            raise RuntimeError(f"BucketedDataParallel: forward with grad enabled while the previous "
                               f"backward's buckets are still in flight. {_AGAIN}")
        syncing = self._require_sync and torch.is_grad_enabled()
        if syncing and self.record_timeline and not self._in_flight:
            # gathers: ZeRO all-gathers waited since the last step ended (before this forward)
            self._timeline = StepTimeline(forward_start=time.perf_counter(),
                                          gathers=self._timeline.gathers)
        out = self.module(*args, **kwargs)
        if syncing and self.record_timeline:
            # The module output's gradient marks the start of backward (cheap, host clock).
            first = next((t for t in torch.utils._pytree.tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.requires_grad), None)
            if first is not None:
                timeline = self._timeline
                first.register_hook(lambda g: setattr(timeline, "backward_start", time.perf_counter()))
        return out

    def finish_gradient_sync(self) -> None:
        """Waits for every bucket still in flight and writes the averaged gradients (casting
        back from reduce_dtype, unpacking without views, stepping the overlapped optimizer).
        Backward calls it when it ends, so afterwards it is a no-op; it is public for code
        that must be sure (and for symmetry with no_sync)."""
        if not self._in_flight:
            return
        if self._in_backward:
            raise RuntimeError("BucketedDataParallel.finish_gradient_sync() was called while "
                               "backward is still running")
        if self._next_launch < len(self._buckets):
            missing = [b.names for b in self._buckets[self._next_launch:]]
            self._reset_iteration()
            raise RuntimeError(f"BucketedDataParallel: backward ended with buckets never launched "
                               f"(parameters {missing}); the iteration's gradients are incomplete")
        for bucket in self._buckets[self._next_finalize:]:
            self._finalize(bucket)
        self._next_finalize = len(self._buckets)
        if self._used_work is not None:
            self._wait(self._used_work, "the all-reduce of the used-parameter map "
                                        "(find_unused_parameters)")
            for i in torch.nonzero(self._used_map == 0).flatten().tolist():
                self._params[i].grad = None  # unused on every rank: no gradient, as in DDP
        for bucket in self._deferred_steps:
            self.overlap_optimizer.step_bucket(bucket.index)  # skips params whose grad is None
        timeline = self._timeline
        if self.record_timeline:
            timeline.sync_end = time.perf_counter()
            self.last_timeline = timeline
            self._timeline = StepTimeline()
        first_iteration = not self._rebuilt
        order = self._ready_order
        self._reset_iteration()
        if first_iteration:
            self._rebuild_buckets(order)

    def verify_replicas(self) -> None:
        """Raises if any rank's parameters differ from the others' (bit-exact checksums)."""
        sums = torch.stack([checksum(p.detach()) for p in self.module.parameters()])
        sums = sums.to(self.device)
        high, low = sums.clone(), sums.clone()
        self._wait(dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True),
                   "the all-reduce of the parameter checksums (verify_replicas)")
        self._wait(dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.process_group, async_op=True),
                   "the all-reduce of the parameter checksums (verify_replicas)")
        names = [n for n, _ in self.module.named_parameters()]
        bad = [names[i] for i in torch.nonzero(high != low).flatten().tolist()]
        if bad:
            raise RuntimeError(f"BucketedDataParallel.verify_replicas: parameters differ across "
                               f"ranks: {bad}")

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Finishes the sync, then clips the (identical on every rank) averaged gradients."""
        if self.overlap_optimizer is not None:
            raise RuntimeError(f"BucketedDataParallel.clip_grad_norm_: {CLIP_REFUSAL}")
        self.finish_gradient_sync()
        return torch.nn.utils.clip_grad_norm_(self._params, max_norm, norm_type)

    @property
    def bucket_layout(self) -> list:
        """Parameter names per bucket, in launch order."""
        return [list(b.names) for b in self._buckets]

    # ------------------------------------------------------------------- the hook path
    def _make_hook(self, i: int):
        def hook(param: torch.Tensor) -> None:
            self._on_grad_ready(i)
        return hook

    def _adopt_grad(self, i: int) -> bool:
        """Makes params[i].grad the bucket view (copying a gradient autograd put elsewhere,
        e.g. after zero_grad(set_to_none=True)). False if there is no gradient."""
        p = self._params[i]
        g = p.grad
        if g is None:
            return False
        bucket = self._buckets[self._bucket_of[i]]
        view = bucket.views[self._slot_of[i]]
        if g.data_ptr() != view.data_ptr():
            with torch.no_grad():
                view.copy_(g)
            p.grad = view
        return True

    def _on_grad_ready(self, i: int) -> None:
        if self._params[i].grad is not None and self._params[i].grad.layout != torch.strided:
            raise RuntimeError(f"BucketedDataParallel: parameter '{self._names[i]}' received a "
                               f"{self._params[i].grad.layout} gradient; only dense gradients can "
                               "be bucketed (use sparse=False)")
        if self.gradient_as_bucket_view:
            self._adopt_grad(i)
        self._used[i] = True
        if not self._require_sync:
            return
        if self._ready[i]:
            self._raise_twice(i)
        if not self._in_backward:
            self._in_backward = True
            self._in_flight = True
            torch.autograd.Variable._execution_engine.queue_callback(self._on_backward_end)
        self._ready[i] = True
        self._ready_order.append(i)
        bucket = self._buckets[self._bucket_of[i]]
        bucket.pending -= 1
        if bucket.pending == 0:
            self._launch_ready()
            self._poll()

    def _raise_twice(self, i: int) -> None:
        raise RuntimeError(
            f"BucketedDataParallel: parameter '{self._names[i]}' received a gradient twice in one "
            f"iteration. {_AGAIN}")

    def _on_backward_end(self) -> None:
        self._in_backward = False
        if self.record_timeline:
            self._timeline.backward_end = time.perf_counter()
        missing = [i for i, r in enumerate(self._ready) if not r]
        if missing:
            unused = [self._names[i] for i in missing if not self._used[i]]
            if unused and not self.find_unused_parameters:
                self._reset_iteration()  # lets the user fix the model and try again
                raise RuntimeError(
                    f"BucketedDataParallel: parameters received no gradient in this iteration: "
                    f"{unused}. Make sure every parameter that requires grad takes part in the "
                    "loss, or pass find_unused_parameters=True (or set requires_grad=False).")
            for i in missing:
                self._mark_absent_ready(i)
            self._launch_ready()
        if self.find_unused_parameters:
            self._used_map = torch.tensor([int(u) for u in self._used], dtype=torch.int32,
                                          device=self.device)
            self._used_work = dist.all_reduce(self._used_map, group=self.process_group,
                                              async_op=True)
        self._used = [False] * len(self._params)
        # Wait here, as torch DDP does, so that any optimizer (or clipping, or a check of the
        # gradients) after backward sees the averaged gradients; the overlap happened above.
        self.finish_gradient_sync()

    def _mark_absent_ready(self, i: int) -> None:
        """A parameter with no gradient from this backward: reduce what its .grad holds (an
        earlier no_sync micro-batch's gradient), or zeros."""
        p = self._params[i]
        bucket = self._buckets[self._bucket_of[i]]
        if self.gradient_as_bucket_view:
            if not self._adopt_grad(i):
                bucket.views[self._slot_of[i]].zero_()
        elif p.grad is None:
            p.grad = torch.zeros_like(p)
        self._ready[i] = True
        self._ready_order.append(i)
        bucket.pending -= 1
        bucket.absent = True

    def _launch_ready(self) -> None:
        """Launches ready buckets in index order: every rank issues the same collectives in
        the same order even if its gradients arrive in a different one."""
        while self._next_launch < len(self._buckets) and self._buckets[self._next_launch].pending == 0:
            self._launch(self._buckets[self._next_launch])
            self._next_launch += 1

    def _bucket_grads(self, bucket: Bucket) -> list:
        grads = []
        for p in bucket.params:
            if p.grad is None:  # no gradient on this rank (find_unused_parameters)
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        return grads

    def _launch(self, bucket: Bucket) -> None:
        launch = time.perf_counter()
        if not self.gradient_as_bucket_view:
            bucket_pack_(self._bucket_grads(bucket), bucket.comm, self._prescale)
        elif bucket.comm is not bucket.grads:
            bucket_pack_([bucket.grads], bucket.comm, self._prescale)  # cast to reduce_dtype
        elif self._prescale != 1.0:
            bucket_scale_([bucket.grads], self._prescale)
        bucket.work = dist.all_reduce(bucket.comm, op=self._reduce_op, group=self.process_group,
                                      async_op=True)
        bucket.launch_time = launch
        if self.record_timeline and bucket.comm.device.type == "cpu":
            done = bucket.done_time
            bucket.work.get_future().then(lambda fut: done.append(time.perf_counter()))

    def _poll(self) -> None:
        """Finalizes (in order) the buckets whose all-reduce already completed, so casts and
        overlapped optimizer steps run while backward continues."""
        while (self._next_finalize < self._next_launch
               and self._buckets[self._next_finalize].work.is_completed()):
            self._finalize(self._buckets[self._next_finalize])
            self._next_finalize += 1

    def _finalize(self, bucket: Bucket) -> None:
        if bucket.finalized:
            return
        self._wait(bucket.work, self._describe(bucket))
        if not self.gradient_as_bucket_view:
            bucket_unpack_(bucket.comm, [p.grad for p in bucket.params], 1.0)
        elif bucket.comm is not bucket.grads:
            bucket_unpack_(bucket.comm, [bucket.grads], 1.0)  # cast back from reduce_dtype
        bucket.finalized = True
        if self.record_timeline:
            done = bucket.done_time[0] if bucket.done_time else time.perf_counter()
            self._timeline.buckets.append(BucketEvent(
                bucket.index, bucket.comm.numel(), bucket.comm.numel() * bucket.comm.element_size(),
                bucket.launch_time, done))
        if self.overlap_optimizer is not None:
            if bucket.absent and self.find_unused_parameters:
                # Which of its parameters are unused on every rank (and must not be stepped
                # at all) is known only once the used-map all-reduce is done.
                self._deferred_steps.append(bucket)
            else:
                self.overlap_optimizer.step_bucket(bucket.index)

    def _describe(self, bucket: Bucket) -> str:
        names = bucket.names if len(bucket.names) <= 3 else bucket.names[:3] + ["..."]
        return (f"the all-reduce of gradient bucket {bucket.index} of {len(self._buckets)} "
                f"({len(bucket.params)} parameters: {', '.join(names)}; "
                f"{bucket.comm.numel() * bucket.comm.element_size()} bytes)")

    # --------------------------------------------------------------- bucket rebuilding
    def _rebuild_buckets(self, ready_order: list) -> None:
        """Once, after the first synchronized iteration: refill the buckets in the order the
        gradients arrived (rank 0's order, so every rank builds the same layout)."""
        self._rebuilt = True
        seen = set(ready_order)
        order = list(ready_order) + [i for i in reversed(range(len(self._params))) if i not in seen]
        order_t = torch.tensor(order, dtype=torch.int64, device=self.device)
        if self.world_size > 1:
            self._wait(dist.broadcast(order_t, self._rank0(), group=self.process_group, async_op=True),
                       "the broadcast of rank 0's gradient order (bucket rebuild)")
        order = order_t.tolist()
        if order == self._order:
            return
        self._build_buckets(order)
        for b in self._buckets:
            b.reset()
        if self.overlap_optimizer is not None:
            self.overlap_optimizer.rebuild()


_AGAIN = ("The previous iteration's gradient synchronization has not finished (backward "
          "normally finishes it as it ends; here it raised or was interrupted): see that error, "
          "or call model.finish_gradient_sync() before the next forward.")
