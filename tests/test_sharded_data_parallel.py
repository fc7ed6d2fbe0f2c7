"""ShardedDataParallel + ShardedAdamW (ZeRO-1 / ZeRO-2) on gloo with 2 and 4 local processes.

Against zero=0 (BucketedDataParallel + FusedAdamW, the same fused kernel on whole tensors):
10 steps of 2 no_sync micro-batches with clipping, fp32. zero=1 runs the same all-reduce and
the same kernel per element, so it must match bit for bit except for the clip coefficient,
whose norm is summed in another order; zero=2's reduce-scatter sums in gloo's order. Both are
held to a bound of a few fp32 ulps of the parameters' magnitude per step.
"""
import io

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_distributed
from tests.test_data_parallel import SEQ, VOCAB, TinyGPT, _Tower

STEPS, MICRO, LOCAL_BATCH = 10, 2, 3


def _groups(module):
    decay = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for n, p in module.named_parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]


def _micro_batch(step, micro, rank, world):
    g = torch.Generator().manual_seed(7919 * step + 31 * micro + rank)
    idx = torch.randint(0, VOCAB, (LOCAL_BATCH, SEQ), generator=g)
    return idx, torch.roll(idx, -1, dims=1)


def _build(zero, dtype=torch.float32, seed=0, **kwargs):
    from lmkernels.distributed import BucketedDataParallel, ShardedAdamW, ShardedDataParallel
    from lmkernels.optim import FusedAdamW

    torch.manual_seed(seed)
    module = TinyGPT(unused_branch=False).to(dtype)
    # small caps: several buckets, parameters straddling shard boundaries
    caps = dict(bucket_cap_mb=0.004, first_bucket_cap_mb=0.001)
    if zero == 0:
        model = BucketedDataParallel(module, **caps, **kwargs)
        opt = FusedAdamW(_groups(module), lr=3e-3, master_weights=dtype != torch.float32)
    else:
        model = ShardedDataParallel(module, zero=zero, **caps, **kwargs)
        opt = ShardedAdamW(model, _groups(module), lr=3e-3)
    return model, opt


def _train(model, opt, steps, start=0, clip=0.05):
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for step in range(start, start + steps):
        for micro in range(MICRO):
            idx, tgt = _micro_batch(step, micro, rank, world)
            if micro < MICRO - 1:
                with model.no_sync():
                    model(idx, tgt).backward()
            else:
                loss = model(idx, tgt)
                loss.backward()
        norm = model.clip_grad_norm_(clip)  # small: clipping is active in every step
        opt.step()
        opt.zero_grad()
        losses.append((loss.item(), norm.item()))
    return losses


def _params(model):
    if hasattr(model, "wait_param_gather"):
        model.wait_param_gather()
    return {n: p.detach().clone() for n, p in model.module.named_parameters()}


def _compare_with_zero0():
    out = {}
    model0, opt0 = _build(0)
    losses0 = _train(model0, opt0, STEPS)
    ref = _params(model0)
    ref_state = opt0.state_dict()
    for zero in (1, 2):
        model, opt = _build(zero)
        losses = _train(model, opt, STEPS)
        got = _params(model)
        worst = 0.0
        for name, r in ref.items():
            # per step, a few ulps of the parameter's magnitude (clip coefficient rounding)
            bound = 4 * STEPS * torch.finfo(torch.float32).eps * max(1.0, r.abs().max().item())
            err = (got[name] - r).abs().max().item()
            assert err <= bound, (zero, name, err, bound)
            worst = max(worst, err)
        for (l0, n0), (l, n) in zip(losses0, losses):
            assert abs(n - n0) <= 1e-5 * n0, (zero, n, n0)  # clipping norm = the unsharded one
        # the consolidated optimizer state matches FusedAdamW's (same layout, same values)
        state = opt.consolidated_state_dict()
        assert set(state["state"]) == set(ref_state["state"]), zero
        for k, s in ref_state["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(state["state"][k][key], s[key], rtol=1e-4, atol=1e-7)
            assert float(state["state"][k]["step"]) == float(s["step"]) == STEPS
        out[zero] = worst
    return out


def _bf16_matches_fused_adamw_master():
    """bf16 parameters on the wire, fp32 master and moments on the shard, reduce in fp32."""
    model0, opt0 = _build(0, torch.bfloat16, reduce_dtype=torch.float32)
    _train(model0, opt0, 3)
    ref = _params(model0)
    for zero in (1, 2):
        model, opt = _build(zero, torch.bfloat16, reduce_dtype=torch.float32)
        _train(model, opt, 3)
        got = _params(model)
        for name, r in ref.items():
            diff = (got[name].float() - r.float()).abs()
            ulp = torch.finfo(torch.bfloat16).eps * r.float().abs().clamp(min=1e-3)
            # bf16 rounding of the same fp32 master: at most one bf16 ulp apart
            assert (diff <= 2 * ulp + 1e-6).all(), (zero, name, diff.max().item())
        sd = opt.consolidated_state_dict()
        ref_sd = opt0.state_dict()
        for k, s in ref_sd["state"].items():
            torch.testing.assert_close(sd["state"][k]["master_param"], s["master_param"],
                                       rtol=1e-3, atol=1e-5)
    return True


def _bytes(zero):
    model, opt = _build(zero)
    _train(model, opt, 1)
    return {**model.memory_bytes(), **opt.memory_bytes(),
            "numel": sum(p.numel() for p in model.module.parameters() if p.requires_grad)}


def _overlap_evidence(seconds=0.5):
    """zero=2: the upper layers' buckets are reduce-scattered before the backward of the layers
    below them begins, and complete while it runs."""
    from lmkernels.distributed import ShardedAdamW, ShardedDataParallel

    marks: dict = {}
    model = ShardedDataParallel(_Tower(seconds, marks), zero=2, bucket_cap_mb=0, first_bucket_cap_mb=0)
    opt = ShardedAdamW(model, lr=1e-3)
    upper = {f"upper.{n}" for n, _ in model.module.upper.named_parameters()}
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(dist.get_rank()))
    upper_buckets = [i for i, names in enumerate(model.bucket_layout) if set(names) <= upper]
    assert len(upper_buckets) == 8, model.bucket_layout

    marks["until"] = lambda: True  # the slow backward lasts `seconds`
    report = []
    for step in range(2):
        model(x).backward()
        events = {b.index: b for b in model.last_timeline.buckets}
        early = [i for i in upper_buckets if events[i].launch < marks["slow_start"]]
        # launched before the lower layers' backward began (gloo's reduce-scatter work does not
        # report completion before wait(), so the launch is the evidence)
        assert early == upper_buckets, (step, early)
        assert all(p.grad is None for p in model.module.parameters()), "zero=2 kept full grads"
        # the previous step's parameter all-gathers, waited by this step's forward, one per bucket
        gathers = model.last_timeline.gathers
        assert sorted(g.index for g in gathers) == (list(range(len(model.bucket_layout))) if step else [])
        assert all(g.launch <= g.done <= events[0].launch for g in gathers), gathers
        opt.step()
        report.append(len(early))
    return report


def _to_bytes(obj) -> bytes:
    # tensors through the result queue would travel as shared memory the exiting child owns
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _from_bytes(data: bytes):
    return torch.load(io.BytesIO(data), weights_only=False)


def _reshard_source():
    model, opt = _build(2)
    _train(model, opt, 3)
    return _to_bytes({"shard": opt.shard_state_dict(), "params": model.state_dict()})


def _reshard_target(consolidated, params):
    """Loads a consolidated state saved at d=2 here (any d) with zero=1 and 2; the state
    re-consolidated from this run's shards must be bit-identical, and so must the params."""
    for zero in (1, 2):
        model, opt = _build(zero, seed=99)  # other initial weights: everything must come from the load
        model.module.load_state_dict({k[len("module."):]: v for k, v in params.items()})
        opt.load_state_dict(consolidated)
        again = opt.consolidated_state_dict()
        assert again["param_groups"] == consolidated["param_groups"]
        assert set(again["state"]) == set(consolidated["state"])
        for k, s in consolidated["state"].items():
            for key, value in s.items():
                assert torch.equal(again["state"][k][key], value), (zero, k, key)
        for name, p in model.state_dict().items():
            assert torch.equal(p, params[name]), (zero, name)
        _train(model, opt, 1)  # and it trains on
    return True


def _run2():
    return {"compare": _compare_with_zero0(), "bf16": _bf16_matches_fused_adamw_master(),
            "bytes": {z: _bytes(z) for z in (1, 2)}, "overlap": _overlap_evidence(),
            "reshard": _reshard_source()}


def _errors():
    """Bad arguments name the argument and what was given."""
    from torch import nn

    from lmkernels.distributed import OverlappedOptimizer, ShardedAdamW, ShardedDataParallel

    def expect(fn, exc, *words):
        with pytest.raises(exc) as info:
            fn()
        assert all(w in str(info.value) for w in words), (words, str(info.value))

    lin = lambda: nn.Linear(4, 3)  # noqa: E731
    expect(lambda: ShardedDataParallel(lin(), zero=3), ValueError, "zero", "3")
    expect(lambda: ShardedDataParallel(lin(), zero=True), ValueError, "zero", "True")
    expect(lambda: ShardedDataParallel(lin(), gather_params="never"), ValueError, "gather_params", "never")
    expect(lambda: ShardedDataParallel(lin(), find_unused_parameters=True), ValueError,
           "find_unused_parameters")
    model = ShardedDataParallel(lin(), zero=2)
    expect(lambda: ShardedAdamW(lin()), TypeError, "ShardedDataParallel", "Linear")
    expect(lambda: ShardedAdamW(model, [model.module.weight]), ValueError, "missing", "bias")
    expect(lambda: ShardedAdamW(model, [nn.Parameter(torch.ones(2))]), ValueError, "not one of the model")
    expect(lambda: ShardedAdamW(model, lr=-1.0), ValueError, "learning rate", "-1.0")
    expect(lambda: OverlappedOptimizer(model, torch.optim.AdamW), ValueError, "ShardedAdamW")
    expect(lambda: model.clip_grad_norm_(1.0, norm_type=1), ValueError, "norm_type", "1")
    expect(lambda: ShardedAdamW(model).state_dict(), RuntimeError, "shard_state_dict")
    return True


def _run_other(saved):
    consolidated, params = _from_bytes(saved)
    return {"bytes": {z: _bytes(z) for z in (1, 2)}, "reshard": _reshard_target(consolidated, params),
            "errors": _errors()}


@pytest.fixture(scope="module")
def world2():
    return run_distributed(_run2, 2, timeout=240)


@pytest.fixture(scope="module")
def saved_at_2(world2):
    from lmkernels.distributed.sharded_adamw import consolidate

    saved = [_from_bytes(r["reshard"]) for r in world2]
    return _to_bytes((consolidate([s["shard"] for s in saved]), saved[0]["params"]))


@pytest.fixture(scope="module")
def world1(saved_at_2):
    return run_distributed(_run_other, 1, args=(saved_at_2,), timeout=120)


@pytest.fixture(scope="module")
def world4(saved_at_2):
    return run_distributed(_run_other, 4, args=(saved_at_2,), timeout=180)


def test_zero1_and_zero2_match_zero0_with_no_sync_and_clipping(world2):
    for r in world2:
        assert set(r["compare"]) == {1, 2}
        assert r["bf16"] is True


def test_zero2_reduce_scatter_starts_before_backward_ends(world2):
    assert [r["overlap"] for r in world2] == [[8, 8], [8, 8]]


def test_resharding_2_to_1_and_4_restores_the_state_bit_identically(saved_at_2, world1, world4):
    assert [r["reshard"] for r in world1 + world4] == [True] * 5
    assert [r["errors"] for r in world1 + world4] == [True] * 5
    # FusedAdamW (zero=0) loads the consolidated state too, bit for bit
    from lmkernels.optim import FusedAdamW

    consolidated, params = _from_bytes(saved_at_2)
    torch.manual_seed(0)
    module = TinyGPT(unused_branch=False)
    module.load_state_dict({k[len("module."):]: v for k, v in params.items()})
    opt = FusedAdamW(_groups(module), lr=3e-3)
    opt.load_state_dict(consolidated)
    back = opt.state_dict()
    for k, s in consolidated["state"].items():
        for key, value in s.items():
            assert torch.equal(back["state"][k][key], value), (k, key)


def test_sharded_bytes_per_rank_fall_as_one_over_d(world1, world2, world4):
    by_d = {1: world1[0]["bytes"], 2: world2[0]["bytes"], 4: world4[0]["bytes"]}
    numel = by_d[1][1]["numel"]
    for d, b in by_d.items():
        for zero in (1, 2):
            # fp32: 4 (params) + 4 (grads: full for zero=1) + 8/d (moments), within padding
            ideal_opt = 8 * numel / d
            assert ideal_opt <= b[zero]["opt_state_bytes"] <= 1.05 * ideal_opt, (d, zero, b[zero])
            assert 4 * numel <= b[zero]["param_bytes"] <= 1.05 * 4 * numel
        assert 4 * numel <= b[1]["grad_bytes"] <= 1.05 * 4 * numel
        assert 4 * numel / d <= b[2]["grad_bytes"] <= 1.05 * 4 * numel / d, (d, b[2])


# ----------------------------------------------------------------------------- the trainer
TRAIN = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=2,
             eval_interval=2, eval_iters=1, log_interval=2, warmup_iters=1, lr_decay_iters=8,
             sample_tokens=0, zero=2)


def _trainer_zero2(text_path, cache_dir, out_dir):
    """--zero=2 on 2 ranks: a straight run, and a run stopped at 4 and resumed, give the same
    losses; the checkpoint holds one optimizer file per DP rank."""
    _straight_and_resumed_match(dict(TRAIN, data=[text_path], data_cache=cache_dir), 4, 6, out_dir)
    return True


def _straight_and_resumed_match(common, stop, total, out_dir):
    """A run of `total` iterations, and a run stopped at `stop` and resumed, log the same losses."""
    from lmkernels.train import TrainConfig, train

    straight = train(TrainConfig(**common, max_iters=total, out_dir=f"{out_dir}/straight"))
    train(TrainConfig(**common, max_iters=stop, out_dir=f"{out_dir}/resumed"))
    resumed = train(TrainConfig(**common, max_iters=total, out_dir=f"{out_dir}/resumed", init_from="resume"))
    got, want = [r["loss"] for r in resumed], [r["loss"] for r in straight[stop:]]
    assert [r["iter"] for r in resumed] == list(range(stop, total)) and got == want, (got, want)


def test_trainer_zero2_resumes_exactly_and_at_one_rank(tmp_path):
    import json

    from lmkernels.train import TrainConfig, train
    from lmkernels.train import checkpoint as ckpt_lib

    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    args = (str(text), str(tmp_path / "cache"), str(tmp_path))
    assert run_distributed(_trainer_zero2, 2, args=args, timeout=180) == [True, True]
    newest = ckpt_lib.latest_checkpoint(tmp_path / "resumed")
    assert sorted(p.name for p in newest.iterdir()) == [
        "manifest.json", "tp0-of-1.optim-dp0-of-2.pt", "tp0-of-1.optim-dp1-of-2.pt", "tp0-of-1.pt"]
    saved = ckpt_lib.load_checkpoint(tmp_path / "resumed")  # the optimizer files merged
    # metrics: per-rank bytes, the sharded optimizer state halved (moments only: 8 bytes / 2)
    memory = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    memory = [m for m in memory if m["kind"] == "memory"]
    assert memory and all(len(m["ranks"]) == 2 and m["zero"] == 2 for m in memory)
    assert saved["optimizer"]["state"] and saved["optimizer"] is not None
    for r in memory[-1]["ranks"]:
        numel = r["param_bytes"] / 4  # fp32, padded
        assert 8 * numel / 2 == r["opt_state_bytes"] and r["grad_bytes"] == 4 * numel / 2, r
        assert r["peak_rss_bytes"] > 0, r
    # 2 -> 1: one process resumes the 2-rank checkpoint (no sharding at d=1: FusedAdamW loads the
    # consolidated state) and trains on
    one = train(TrainConfig(**dict(TRAIN, data=[str(text)], data_cache=str(tmp_path / "cache")),
                            max_iters=8, out_dir=str(tmp_path / "resumed"), init_from="resume"))
    assert [r["iter"] for r in one] == [6, 7] and all(r["loss"] < 10 for r in one)


def _trainer_zero1_tp2(text_path, cache_dir, out_dir):
    """--zero=1 --tp=2 on 4 processes (DP 2 x TP 2): the sharding runs over the DP group, the
    clipping norm over DP and TP; a resumed run repeats the straight run's losses."""
    common = dict(TRAIN, data=[text_path], data_cache=cache_dir, zero=1, tp=2, gradient_accumulation_steps=1)
    _straight_and_resumed_match(common, 2, 4, out_dir)
    return True


def test_trainer_zero1_with_tp2_resumes_exactly(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    args = (str(text), str(tmp_path / "cache"), str(tmp_path))
    assert run_distributed(_trainer_zero1_tp2, 4, args=args, timeout=240) == [True] * 4
    newest = sorted((tmp_path / "resumed" / "ckpt").glob("iter-*"))[-1]
    assert sorted(p.name for p in newest.iterdir()) == sorted(["manifest.json", "tp0-of-2.pt", "tp1-of-2.pt"] + [
        f"tp{t}-of-2.optim-dp{d}-of-2.pt" for t in range(2) for d in range(2)])
