"""BucketedDataParallel on gloo with 2 and 3 local processes, against torch DDP and against the
single-process full-batch gradients.

Each spawned run checks many cases (process start-up costs seconds on a small machine).
Tolerance, per gradient tensor: the error against the full-batch float64 gradient may be at
most twice the larger error of the baselines computed the same way (DDP with the same bucket
cap / compression; single-process full batch in the model's dtype), with a floor of one unit
of rounding of the gradient's dtype at its magnitude.
"""
import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tests._dist import DistributedTestError, run_distributed

VOCAB, DIM, SEQ, HIDDEN = 37, 24, 9, 61


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)
        self.ln2 = nn.LayerNorm(DIM)
        self.fc = nn.Linear(DIM, HIDDEN)
        self.out = nn.Linear(HIDDEN, DIM)

    def forward(self, x):  # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, 2, C // 2).permute(2, 0, 3, 1, 4)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class TinyGPT(nn.Module):
    """Tied embedding / LM head, an unused branch, a frozen parameter, a buffer, and
    parameters of uneven sizes (37x24, 61x24, 24, 1, ...)."""

    def __init__(self, unused_branch=True):
        super().__init__()
        self.wte = nn.Embedding(VOCAB, DIM)
        self.wpe = nn.Embedding(SEQ, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.ln_f = nn.LayerNorm(DIM)
        self.gate = nn.Parameter(torch.ones(1))
        self.frozen = nn.Parameter(torch.randn(DIM), requires_grad=False)
        self.register_buffer("pos", torch.arange(SEQ))
        self.unused = nn.Linear(DIM, 5) if unused_branch else None
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx, targets):  # idx, targets: (B, T)
        x = self.wte(idx) + self.wpe(self.pos[: idx.shape[1]]) + self.frozen
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x) * self.gate)  # (B, T, V)
        return F.cross_entropy(logits.reshape(-1, VOCAB).float(), targets.reshape(-1))


def _batch(step, global_batch):
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (global_batch, SEQ), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _shard(t, rank, world):
    n = t.shape[0] // world
    return t[rank * n:(rank + 1) * n]


def _grads(model):
    return {n: (None if p.grad is None else p.grad.detach().clone())
            for n, p in model.named_parameters() if p.requires_grad}


def _full_batch_grads(model, idx, tgt, dtype):
    m = copy.deepcopy(model).to(dtype)
    for p in m.parameters():
        p.grad = None
    m(idx, tgt).backward()
    return _grads(m)


def _check_close(case, ours, baselines, ref64):
    """ours / baselines: {name: grad}; ref64: the full-batch float64 gradients."""
    assert ours.keys() == ref64.keys(), (case, sorted(ours), sorted(ref64))
    for name, r in ref64.items():
        if r is None:
            assert ours[name] is None, f"{case}: {name} should have no gradient (unused)"
            for b in baselines:
                assert b[name] is None
            continue
        assert ours[name] is not None, f"{case}: {name} has no gradient"
        err = (ours[name].double() - r).abs().max().item()
        base = max((b[name].double() - r).abs().max().item() for b in baselines)
        floor = torch.finfo(ours[name].dtype).eps * r.abs().max().item()
        assert err <= 2 * base + floor, (
            f"{case}: {name}: error {err:.3e} vs baselines' {base:.3e} (floor {floor:.1e})")


def _bf16_compress_hook(group, bucket):
    """torch's default_hooks.bf16_compress_hook (which refuses gloo): divide, compress to
    bf16, all-reduce, decompress."""
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16).div_(dist.get_world_size())
    fut = dist.all_reduce(compressed, async_op=True).get_future()

    def decompress(fut):
        buffer.copy_(fut.value()[0])
        return buffer

    return fut.then(decompress)


def _ddp(model, case):
    from torch.nn.parallel import DistributedDataParallel as DDP

    ddp = DDP(model, bucket_cap_mb=case.get("bucket_cap_mb", 25),
              find_unused_parameters=case.get("find_unused_parameters", False))
    if case.get("reduce_dtype") == torch.bfloat16 and case.get("dtype", torch.float32) == torch.float32:
        ddp.register_comm_hook(None, _bf16_compress_hook)
    return ddp


GRAD_CASES = [
    dict(name="one param per bucket", bucket_cap_mb=0, first_bucket_cap_mb=0, find_unused_parameters=True),
    dict(name="small buckets", bucket_cap_mb=0.004, first_bucket_cap_mb=0.001, find_unused_parameters=True),
    dict(name="one bucket", bucket_cap_mb=1000, first_bucket_cap_mb=1000, find_unused_parameters=True),
    dict(name="no unused branch", bucket_cap_mb=0.004, unused_branch=False),
    dict(name="no_sync accumulation", bucket_cap_mb=0.004, find_unused_parameters=True, micro_batches=3),
    dict(name="without bucket views", bucket_cap_mb=0.004, find_unused_parameters=True,
         gradient_as_bucket_view=False, micro_batches=2),
    dict(name="bf16 on the wire", bucket_cap_mb=0.004, find_unused_parameters=True,
         reduce_dtype=torch.bfloat16),
    dict(name="bf16 model reduced in fp32", bucket_cap_mb=0.004, find_unused_parameters=True,
         dtype=torch.bfloat16, reduce_dtype=torch.float32),
]


def _grad_cases(case_names, steps=2):
    """Runs every named case for `steps` iterations (the second after the bucket rebuild)."""
    from lmkernels.distributed import BucketedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for case in [c for c in GRAD_CASES if c["name"] in case_names]:
        dtype = case.get("dtype", torch.float32)
        micro = case.get("micro_batches", 1)
        torch.manual_seed(rank)  # different on each rank: construction must broadcast rank 0's
        model = TinyGPT(case.get("unused_branch", True)).to(dtype)
        kwargs = {k: case[k] for k in ("bucket_cap_mb", "first_bucket_cap_mb", "reduce_dtype",
                                       "find_unused_parameters", "gradient_as_bucket_view") if k in case}
        ours = BucketedDataParallel(model, **kwargs)
        start = copy.deepcopy(model)  # rank 0's parameters on every rank
        ddp = _ddp(copy.deepcopy(model), case)
        nparams = len({id(p) for p in model.parameters() if p.requires_grad})
        assert sum(len(b) for b in ours.bucket_layout) == nparams  # tied weight counted once
        assert "frozen" not in sum(ours.bucket_layout, [])  # requires_grad=False: left out
        initial_layout = ours.bucket_layout
        for step in range(steps):
            idx, tgt = _batch(step, 6 * world * micro)
            my_idx, my_tgt = _shard(idx, rank, world), _shard(tgt, rank, world)
            for m in (ours, ddp):
                m.zero_grad(set_to_none=(step == 0))
                for k in range(micro):
                    mb = slice(k * 6, (k + 1) * 6)
                    ctx = m.no_sync() if k < micro - 1 else torch.enable_grad()
                    with ctx:
                        (m(my_idx[mb], my_tgt[mb]) / micro).backward()
            ours.finish_gradient_sync()
            # The full batch in one process: float64 (the reference) and the model's dtype.
            ref64 = _full_batch_grads(start, idx, tgt, torch.float64)
            single = _full_batch_grads(start, idx, tgt, dtype)
            got = _grads(ours.module)
            _check_close(f"{case['name']} step {step}", got, [_grads(ddp.module), single], ref64)
            if case.get("gradient_as_bucket_view", True):
                for b in ours._buckets:  # .grad are views of the buckets (no copies)
                    for p, v in zip(b.params, b.views):
                        assert p.grad is None or p.grad.data_ptr() == v.data_ptr()
        if case["name"] == "one param per bucket":
            # Filled in reverse registration order, then rebuilt once in the order gradients
            # arrived: the unused branch (registered last, never ready) moves to the end.
            names = [n for n, p in ours.module.named_parameters() if p.requires_grad]
            assert initial_layout == [[n] for n in reversed(names)], initial_layout
            assert ours.bucket_layout[-1][0].startswith("unused.") and ours.bucket_layout != initial_layout
        tl = ours.last_timeline  # the sync finishes as backward ends
        assert tl.backward_start <= tl.backward_end <= tl.sync_end, tl
        assert len(tl.buckets) == len(ours.bucket_layout)
        report[case["name"]] = ours.bucket_layout
    return report


def _training(steps=4):
    """Plain mode (backward ends with averaged gradients; a plain optimizer steps them),
    the OverlappedOptimizer, and the single-process full-batch run, over several AdamW steps."""
    from lmkernels.distributed import BucketedDataParallel, OverlappedOptimizer
    from lmkernels.optim import FusedAdamW

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    base = TinyGPT(unused_branch=False)
    adamw = dict(lr=1e-2, weight_decay=0.1, foreach=False)
    plain = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.004)
    overlapped = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.004)
    overlap_opt = OverlappedOptimizer(overlapped, torch.optim.AdamW, **adamw)
    plain_opt = torch.optim.AdamW(plain.parameters(), **adamw)
    single = copy.deepcopy(plain.module).double()
    single_opt = torch.optim.AdamW(single.parameters(), **adamw)
    ddp = _ddp(copy.deepcopy(plain.module), dict(bucket_cap_mb=0.004))
    ddp_opt = torch.optim.AdamW(ddp.parameters(), **adamw)
    for step in range(steps):
        idx, tgt = _batch(step, 4 * world)
        mine = _shard(idx, rank, world), _shard(tgt, rank, world)
        for model, opt in ((plain, plain_opt), (overlapped, overlap_opt), (single, single_opt),
                           (ddp, ddp_opt)):
            opt.zero_grad()
            (model(*mine) if model is not single else model(idx, tgt)).backward()
            opt.step()
        for (n, p), q in zip(plain.module.named_parameters(), overlapped.module.parameters()):
            assert torch.equal(p, q), f"step {step}: overlapped optimizer differs from plain at {n}"
        plain.verify_replicas()
        overlapped.verify_replicas()
    # The OverlappedOptimizer's state is the plain optimizer's, and it round-trips.
    for (n, p), q in zip(plain.module.named_parameters(), overlapped.module.parameters()):
        theirs = overlap_opt.state.get(q, {})
        assert all(torch.equal(v, theirs[k]) for k, v in plain_opt.state.get(p, {}).items()), n
    assert len(overlap_opt.state_dict()["state"]) == len(overlapped._params)
    # With unused parameters (find_unused_parameters) and param groups, the overlapped mode
    # still equals the plain mode: parameters unused on every rank are not stepped at all.
    # Also with FusedAdamW, which caches kernel plans per group, and after a state_dict reload.
    for cls, kwargs in ((torch.optim.AdamW, dict(foreach=False)), (FusedAdamW, {})):
        torch.manual_seed(7)
        base = TinyGPT()
        models, opts = [], []
        for overlap in (False, True):
            m = BucketedDataParallel(copy.deepcopy(base), bucket_cap_mb=0.004, find_unused_parameters=True)
            decay = [p for n, p in m.module.named_parameters() if p.dim() >= 2]
            rest = [p for n, p in m.module.named_parameters() if p.dim() < 2 and p.requires_grad]
            groups = [dict(params=decay, weight_decay=0.1), dict(params=rest, weight_decay=0.0)]
            opt = (OverlappedOptimizer(m, cls, groups, lr=1e-2, **kwargs) if overlap
                   else cls(groups, lr=1e-2, **kwargs))
            models.append(m)
            opts.append(opt)
        # An LR schedule reaches the bucket optimizers; a state_dict reload keeps the state.
        schedules = [torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3) for opt in opts]
        for step in range(4):
            if step == 2:
                opts[1].load_state_dict(copy.deepcopy(opts[1].state_dict()))
            idx, tgt = _batch(step, 4 * world)
            for m, opt, schedule in zip(models, opts, schedules):
                opt.zero_grad()
                m(_shard(idx, rank, world), _shard(tgt, rank, world)).backward()
                opt.step()
                schedule.step()
            for (n, p), q in zip(models[0].module.named_parameters(), models[1].module.parameters()):
                assert torch.equal(p, q), f"{cls.__name__} step {step}: overlapped != plain at {n}"
        assert torch.equal(models[1].module.unused.weight, base.unused.weight)  # never stepped
    # Bitwise identical on every rank (verify_replicas, and a direct comparison).
    flat = torch.cat([p.detach().reshape(-1) for p in plain.module.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    assert all(torch.equal(g, flat) for g in gathered)
    # As close to single-process full-batch float64 training as DDP is (per tensor, 2x rule).
    for (n, p), q, r in zip(plain.module.named_parameters(), ddp.module.parameters(), single.parameters()):
        err, base = (p.double() - r).abs().max().item(), (q.double() - r).abs().max().item()
        assert err <= 2 * base + torch.finfo(p.dtype).eps * r.abs().max().item(), (n, err, base)
    # verify_replicas notices a rank that diverged, and names the parameter.
    if rank == 1:
        with torch.no_grad():
            plain.module.blocks[0].fc.bias[3] += 1e-3
    try:
        plain.verify_replicas()
        diverged = None
    except RuntimeError as e:
        diverged = str(e)
    assert diverged is not None and "blocks.0.fc.bias" in diverged, diverged
    return {"steps_checked": steps}


def _expect(fn, exc, *fragments):
    try:
        fn()
    except exc as e:
        missing = [f for f in fragments if f not in str(e)]
        assert not missing, f"error message lacks {missing}: {e}"
        return
    raise AssertionError(f"expected {exc.__name__} mentioning {fragments}")


def _error_cases():
    from lmkernels.distributed import BucketedDataParallel

    rank, world = dist.get_rank(), dist.get_world_size()
    idx, tgt = _batch(0, 4 * world)
    mine = _shard(idx, rank, world), _shard(tgt, rank, world)

    # 1. An unused parameter without find_unused_parameters: the error names it.
    model = BucketedDataParallel(TinyGPT(), bucket_cap_mb=0.004)
    _expect(lambda: model(*mine).backward(), RuntimeError, "unused.weight", "unused.bias",
            "find_unused_parameters=True")
    # Nothing hangs and no stale state is left: a fixed model trains on.
    fixed = BucketedDataParallel(TinyGPT(unused_branch=False), bucket_cap_mb=0.004)
    fixed(*mine).backward()
    fixed.finish_gradient_sync()

    # 2. A module on a device the process group does not reduce on, or on two devices.
    on_meta = TinyGPT().to("meta")
    _expect(lambda: BucketedDataParallel(on_meta), ValueError, "meta", "gloo")
    split = TinyGPT()
    split.ln_f.to("meta")
    _expect(lambda: BucketedDataParallel(split), ValueError, "one device", "ln_f.weight")

    # 3. Backward twice without a step: gradients accumulate as in DDP (each backward ends
    #    synchronized, so the second reduces on top of the first's averages).
    ddp = BucketedDataParallel(TinyGPT(unused_branch=False), bucket_cap_mb=0.004)
    ddp(*mine).backward()
    once = {n: p.grad.clone() for n, p in ddp.module.named_parameters() if p.grad is not None}
    loss = ddp(*mine)
    loss.backward(retain_graph=True)
    loss.backward()
    for n, p in ddp.module.named_parameters():
        if n in once:
            torch.testing.assert_close(p.grad, 3 * once[n], rtol=1e-5, atol=1e-6, msg=n)
    ddp.finish_gradient_sync()  # nothing in flight: a no-op

    # 4. The overlapped optimizer refuses gradient clipping.
    from lmkernels.distributed import OverlappedOptimizer

    m = BucketedDataParallel(TinyGPT(unused_branch=False))
    groups = [dict(params=list(m.module.parameters())[:3], max_grad_norm=1.0)]
    _expect(lambda: OverlappedOptimizer(m, torch.optim.AdamW, groups), ValueError, "clip",
            "max_grad_norm=1.0")
    OverlappedOptimizer(m, torch.optim.AdamW, lr=1e-3)
    _expect(lambda: m.clip_grad_norm_(1.0), RuntimeError, "global gradient norm")
    _expect(lambda: OverlappedOptimizer(m, torch.optim.AdamW), ValueError, "already")
    _expect(lambda: OverlappedOptimizer(TinyGPT(), torch.optim.AdamW), TypeError, "BucketedDataParallel")
    m2 = BucketedDataParallel(TinyGPT(unused_branch=False))
    _expect(lambda: OverlappedOptimizer(m2, torch.optim.AdamW, [nn.Parameter(torch.ones(3))]),
            ValueError, "not one of the model's parameters")
    # 5. Bad arguments name the argument and the value.
    for cap, exc in ((-1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
                     ("25", TypeError), (True, TypeError)):
        _expect(lambda: BucketedDataParallel(TinyGPT(), bucket_cap_mb=cap), exc, "bucket_cap_mb", repr(cap))
    _expect(lambda: BucketedDataParallel(TinyGPT(), first_bucket_cap_mb=float("nan")), ValueError,
            "first_bucket_cap_mb", "nan")
    _expect(lambda: BucketedDataParallel(TinyGPT(), reduce_dtype=torch.int8), ValueError, "reduce_dtype")
    _expect(lambda: BucketedDataParallel("hello"), TypeError, "module", "nn.Module", "str", "hello")
    _expect(lambda: BucketedDataParallel(TinyGPT(), timeout=0), ValueError, "timeout", "0")
    _expect(lambda: BucketedDataParallel(TinyGPT(), timeout="1s"), TypeError, "timeout", "1s")
    sparse = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 2))
    _expect(lambda: BucketedDataParallel(sparse), ValueError, "sparse", "'0'")
    # A sparse gradient from a functional call is caught when it arrives.
    table = nn.Linear(4, 10)
    dense = BucketedDataParallel(table, find_unused_parameters=True)
    _expect(lambda: F.embedding(torch.tensor([1, 2]), dense.module.weight, sparse=True).sum().backward(),
            RuntimeError, "'weight'", "sparse")
    return True


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward stands in for the compute of the layers below it: it lasts at
    least `seconds`, and until marks["until"]() holds (at most 20 s), so that it is long
    enough for the all-reduces launched above it however loaded the machine is."""

    @staticmethod
    def forward(ctx, x, seconds, marks):
        ctx.seconds, ctx.marks = seconds, marks
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import time

        start = ctx.marks["slow_start"] = time.perf_counter()
        time.sleep(ctx.seconds)
        while not ctx.marks["until"]() and time.perf_counter() - start < 20:
            time.sleep(0.01)
        ctx.marks["slow_end"] = time.perf_counter()
        return grad, None, None


class _Tower(nn.Module):
    """8 linear layers with a slow-backward stand-in between the 4th and the 5th."""

    def __init__(self, seconds, marks):
        super().__init__()
        self.lower = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        self.upper = nn.Sequential(*[nn.Linear(16, 16) for _ in range(4)])
        self.seconds, self.marks = seconds, marks

    def forward(self, x):
        return self.upper(_SlowBackward.apply(self.lower(x), self.seconds, self.marks)).square().mean()


_STEP_TIMES: list = []


class _TimedAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        import time

        _STEP_TIMES.append(time.perf_counter())
        return super().step(closure)


def _overlap_evidence(seconds=0.05):
    """The overlap itself: the upper layers' buckets are launched before the backward of the
    layers below them has even started, their all-reduces complete while that backward is still
    running, and the OverlappedOptimizer steps them before backward ends."""
    from lmkernels.distributed import BucketedDataParallel, OverlappedOptimizer

    rank, world = dist.get_rank(), dist.get_world_size()
    marks: dict = {}
    model = BucketedDataParallel(_Tower(seconds, marks), bucket_cap_mb=0, first_bucket_cap_mb=0)
    opt = OverlappedOptimizer(model, _TimedAdamW, lr=1e-3, foreach=False)
    upper = {f"upper.{n}" for n, _ in model.module.upper.named_parameters()}
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    report = []
    for step in range(2):  # the second runs on the rebuilt buckets
        _STEP_TIMES.clear()
        opt.zero_grad()
        # Lower-layer compute lasts until the upper buckets' all-reduces are done (a bucket
        # holds one parameter; the upper layers' 8 are the first 8 buckets in either layout).
        marks["until"] = lambda: all(b.work is not None and b.work.is_completed() and b.done_time
                                     for b in model._buckets[:8])
        model(x).backward()
        opt.step()
        tl = model.last_timeline
        events = {b.index: b for b in tl.buckets}
        upper_buckets = [i for i, names in enumerate(model.bucket_layout) if set(names) <= upper]
        assert len(upper_buckets) == 8, model.bucket_layout
        early = [i for i in upper_buckets if events[i].launch < marks["slow_start"]]
        done_early = [i for i in upper_buckets if events[i].done < marks["slow_end"]]
        stepped_early = [t for t in _STEP_TIMES if t < tl.backward_end]
        # Every upper bucket was launched before the lower layers' backward began ...
        assert early == upper_buckets, (step, early, upper_buckets)
        # ... and at least one completed under that backward and was stepped before it ended.
        assert done_early, (step, [events[i].done - marks["slow_end"] for i in upper_buckets])
        assert stepped_early, (step, [t - tl.backward_end for t in _STEP_TIMES])
        report.append((len(early), len(done_early), len(stepped_early)))
    return report


def _linear_with(bias_requires_grad=True, buffer_size=4):
    m = nn.Linear(4, 4)
    m.bias.requires_grad_(bias_requires_grad)
    m.register_buffer("scale", torch.ones(buffer_size))
    return m


def _mismatch_and_timeout():
    """Ranks with different models fail together, at once, with a message naming the
    difference; a rank whose peer stops raises a timeout naming the collective and bucket."""
    import time

    from lmkernels.distributed import BucketedDataParallel
    from lmkernels.distributed.comm import CollectiveTimeout

    rank = dist.get_rank()
    errors = {}
    cases = {
        "shape": lambda: nn.Linear(4, 4 if rank == 0 else 5),
        "count": lambda: nn.Sequential(*[nn.Linear(4, 4) for _ in range(1 + rank)]),
        "dtype": lambda: nn.Linear(4, 4).to(torch.float64 if rank else torch.float32),
        "frozen": lambda: _linear_with(bias_requires_grad=rank == 0),
        "buffer": lambda: _linear_with(buffer_size=4 + rank),
    }
    for name, make in cases.items():
        start = time.perf_counter()
        try:
            BucketedDataParallel(make())
            errors[name] = None
        except ValueError as e:
            errors[name] = (str(e), time.perf_counter() - start)
    start = time.perf_counter()
    try:
        BucketedDataParallel(nn.Linear(4, 4), bucket_cap_mb=1 + rank)
    except ValueError as e:
        errors["options"] = (str(e), time.perf_counter() - start)
    # A stopped peer: rank 1 runs backward 4 s late; rank 0 gives up after 1.5 s.
    model = BucketedDataParallel(nn.Linear(4, 4), timeout=1.5)
    loss = model(torch.ones(2, 4)).sum()
    if rank == 1:
        time.sleep(4)
    start = time.perf_counter()
    try:
        loss.backward()
        errors["timeout"] = None
    except CollectiveTimeout as e:
        errors["timeout"] = (str(e), time.perf_counter() - start)
    except RuntimeError as e:  # rank 1: rank 0 already gave up and left
        errors["timeout"] = ("peer left: " + str(e), time.perf_counter() - start)
    return errors


# The spawned runs below are shared by several tests each (process start-up dominates).
WORLD3_CASES = ["one param per bucket", "no_sync accumulation", "bf16 on the wire"]


def _world2_run():
    return {"layouts": _grad_cases([c["name"] for c in GRAD_CASES]), "training": _training(),
            "overlap": _overlap_evidence()}


def _world3_run():
    return {"layouts": _grad_cases(WORLD3_CASES), "errors": _error_cases()}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_world2_run, 2, timeout=300)


@pytest.fixture(scope="module")
def world3():
    return run_distributed(_world3_run, 3, timeout=300)


def _same_layouts(results):
    layouts = [r["layouts"] for r in results]
    assert all(l == layouts[0] for l in layouts), "ranks built different bucket layouts"
    assert all(len(b) == 1 for b in layouts[0]["one param per bucket"])
    return layouts[0]


def test_gradients_match_ddp_and_full_batch_2_ranks(world2):
    layouts = _same_layouts(world2)
    assert len(layouts["one bucket"]) == 1
    assert set(layouts) == {c["name"] for c in GRAD_CASES}


def test_gradients_match_ddp_and_full_batch_3_ranks(world3):
    assert set(_same_layouts(world3)) == set(WORLD3_CASES)


def test_training_steps_identical_on_ranks_and_overlap_equals_plain(world2):
    # The comparisons run (and raise) inside the ranks; here: every rank checked every step.
    assert [r["training"]["steps_checked"] for r in world2] == [4, 4]


def test_backward_overlaps_the_all_reduce_and_the_optimizer(world2):
    # Asserted inside the ranks (launch before the lower layers' backward, completion and the
    # bucket's optimizer step before backward ends); here: both ranks, both steps.
    assert [len(r["overlap"]) for r in world2] == [2, 2]


def test_different_models_on_ranks_fail_fast_and_stopped_peers_time_out():
    errors = run_distributed(_mismatch_and_timeout, 2, timeout=90)
    words = {"shape": ["[4, 4]", "[5, 4]", "rank 1"], "count": ["rank 0 has 2", "rank 1 has 4"],
             "dtype": ["torch.float32", "torch.float64"], "frozen": ["(frozen)"],
             "buffer": ["buffer 'scale'", "[4]", "[5]"], "options": ["bucket_cap_mb", "1.0", "2.0"]}
    for rank, errs in enumerate(errors):
        for case, fragments in words.items():
            assert errs[case] is not None, f"rank {rank}: {case}: no error"
            text, seconds = errs[case]
            assert "do not hold the same model" in text and seconds < 10, (rank, case, seconds, text)
            assert all(f in text for f in fragments), (rank, case, fragments, text)
    text, seconds = errors[0]["timeout"]
    assert 1.4 < seconds < 3.5, seconds
    for fragment in ("gradient bucket 0 of 1", "weight", "1.5 s", "rank 0 of 2"):
        assert fragment in text, (fragment, text)


def test_error_cases(world3):
    # Each case raises inside the ranks if the expected error (and its wording) is missing.
    assert [r["errors"] for r in world3] == [True, True, True]


def _fails_on_rank1():
    if dist.get_rank() == 1:
        raise ValueError("rank 1 broke on purpose")
    dist.barrier()  # rank 0 would wait here forever: the helper must kill it


def _sleeps():
    import time

    time.sleep(60)


def test_helper_reports_child_errors_and_timeouts():
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2.*rank 1 broke on purpose"):
        run_distributed(_fails_on_rank1, 2, timeout=60)
    with pytest.raises(TimeoutError, match=r"ranks \[0\] of 1 did not finish"):
        run_distributed(_sleeps, 1, timeout=5)


def test_needs_an_initialized_process_group():
    from lmkernels.distributed import BucketedDataParallel

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_process_group"):
        BucketedDataParallel(nn.Linear(2, 2))


def _nccl_world1():
    """World size 1 on NCCL: the CUDA path (bucket ops on the GPU, ReduceOp.AVG in the reduction,
    waits that only order streams), then the OverlappedOptimizer on CUDA, whose last buckets are
    stepped as backward ends: every parameter must be stepped exactly once per iteration with its
    averaged gradient, which a plain AdamW stepping those same gradients reproduces bit for bit.
    (The model's own backward is not deterministic on CUDA (attention), so gradients are compared
    with the float64 rule, never bitwise.)"""
    from lmkernels.distributed import BucketedDataParallel, OverlappedOptimizer

    torch.cuda.set_device(0)
    idx, tgt = (t.cuda() for t in _batch(0, 8))
    report = {}
    for reduce_dtype in (None, torch.bfloat16):
        torch.manual_seed(0)
        model = TinyGPT().cuda()
        start = copy.deepcopy(model)
        ours = BucketedDataParallel(model, bucket_cap_mb=0.004, first_bucket_cap_mb=0.001,
                                    find_unused_parameters=True, reduce_dtype=reduce_dtype)
        assert ours._reduce_op == dist.ReduceOp.AVG and ours._prescale == 1.0  # NCCL averages
        with pytest.raises(ValueError, match="init_process_group"):
            BucketedDataParallel(TinyGPT().cuda(), timeout=5)
        for step in range(2):  # the second on the rebuilt buckets
            ours.zero_grad()
            ours(idx, tgt).backward()
            ref64 = _full_batch_grads(start, idx, tgt, torch.float64)
            single = _full_batch_grads(start, idx, tgt, torch.float32)
            # bf16 on the wire rounds each averaged gradient once: 2^-9 of its magnitude.
            wire = 0.0 if reduce_dtype is None else 2.0 ** -8
            for n, p in ours.module.named_parameters():
                if not p.requires_grad:
                    continue
                r = ref64[n]
                if r is None:
                    assert p.grad is None, n
                    continue
                err = (p.grad.double() - r).abs().max().item()
                base = (single[n].double() - r).abs().max().item()
                limit = 2 * base + (torch.finfo(torch.float32).eps + wire) * r.abs().max().item()
                assert err <= limit, (str(reduce_dtype), step, n, err, limit)
        report[str(reduce_dtype)] = len(ours.bucket_layout) > 1
    torch.manual_seed(1)
    over = BucketedDataParallel(TinyGPT(unused_branch=False).cuda(), bucket_cap_mb=0.004,
                                first_bucket_cap_mb=0.001)
    opt = OverlappedOptimizer(over, torch.optim.AdamW, lr=1e-2, weight_decay=0.1, foreach=False)
    shadow = [p.detach().clone().requires_grad_() for p in over._params]
    shadow_opt = torch.optim.AdamW(shadow, lr=1e-2, weight_decay=0.1, foreach=False)
    for step in range(3):
        opt.zero_grad(set_to_none=False)
        over(idx, tgt).backward()  # every bucket is stepped by the time backward returns
        after_backward = [p.detach().clone() for p in over._params]
        opt.step()  # nothing left to do
        assert all(torch.equal(a, p) for a, p in zip(after_backward, over._params)), step
        for s, p in zip(shadow, over._params):
            s.grad = p.grad.detach().clone()
        shadow_opt.step()
        for name, s, p in zip(over._names, shadow, over._params):
            assert torch.equal(s, p), f"step {step}: {name} stepped differently by the overlap"
    report["overlap steps"] = step + 1
    return report


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nccl_world_size_1():
    [report] = run_distributed(_nccl_world1, 1, backend="nccl", timeout=120)
    assert report == {"None": True, "torch.bfloat16": True, "overlap steps": 3}, report


def test_the_backend_of_the_tensors_device_decides_the_average():
    """ReduceOp.AVG wherever NCCL reduces the gradients' device, a mixed group included."""
    from lmkernels.distributed.comm import averages_in_reduction, parse_backend_config

    cases = {"nccl": {"cuda": True}, "gloo": {"cpu": False, "cuda": False},
             "cpu:gloo,cuda:nccl": {"cpu": False, "cuda": True},
             "cpu:gloo, cuda:gloo": {"cpu": False, "cuda": False}}
    for config, expected in cases.items():
        devices = parse_backend_config(config)
        assert {d: averages_in_reduction(devices.get(d)) for d in expected} == expected, config
    assert parse_backend_config("nccl") == {"cuda": "nccl"}
    assert parse_backend_config("my_backend") is None  # unknown: no device check


def test_bucket_assignment_follows_ddp_rules():
    from lmkernels.distributed.buckets import assign_buckets

    params = [torch.empty(n) for n in (10, 10, 10, 300, 10)] + [torch.empty(5, dtype=torch.float64)]
    # caps in bytes: first bucket closes at >= 40 B (10 floats), the others at >= 100 B.
    assert assign_buckets(params, 100, 40) == [[0], [1, 2, 3], [4], [5]]
    assert assign_buckets(params, 0, 0) == [[i] for i in range(6)]
    assert assign_buckets(params, 10 ** 9, 10 ** 9) == [[0, 1, 2, 3, 4], [5]]
    assert math.isclose(sum(p.numel() for p in params), 345)
