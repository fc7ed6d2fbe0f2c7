"""Vocab-parallel fused linear cross-entropy (lmkernels/distributed/vocab_parallel.py) and the
op's vocab-shard mode under it.

- The op's shard mode, in one process (C++ kernel and the Triton launchers under the
  interpreter): the shards' partial statistics combine into the full loss, and their gradients
  into the full ones, for uneven shards.
- The function across real gloo process groups (2 and 4 ranks): loss and gradients against the
  float64 reference within 2x the single-device float32 op's error (flash-attention's rule, plus
  two float32 ulps of the result's magnitude); vocabularies that tp does not divide (uneven
  slices); ignore_index rows, label smoothing, z-loss, softcap, bias, every reduction.
"""
import importlib

import pytest
import torch

import lmkernels
from lmkernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_reference as reference
from tests._dist import run_distributed

flce_op = importlib.import_module("lmkernels.ops.fused_linear_cross_entropy")

F32_EPS = torch.finfo(torch.float32).eps
# (bias, label_smoothing, z_loss, softcap)
OPTIONS = ((False, 0.0, 0.0, None), (True, 0.1, 1e-3, None), (False, 0.2, 1e-2, 5.0))


def make_inputs(N, H, V, *, bias, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    target = torch.randint(0, V, (N,), generator=g)
    target[torch.rand(N, generator=g) < 0.2] = -100
    return hidden, weight, b, target


def within(name, ours, ours_single, truth, eps=F32_EPS):
    """ours (vocab-parallel) vs float64 truth: at most 2x the single-device op's error + 2 ulps."""
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    base = (ours_single.double() - truth).abs().max().item()
    floor = 2 * eps * max(truth.abs().max().item(), 1e-30)
    assert err <= 2 * base + floor, f"{name}: error {err:.3g} > 2 x single-device error {base:.3g} + {floor:.3g}"


def bounds(V, tp):
    """Uneven slices when tp does not divide V: the first V % tp ranks get one more row."""
    sizes = [V // tp + (r < V % tp) for r in range(tp)]
    starts = [sum(sizes[:r]) for r in range(tp)]
    return starts, sizes


# ---------------------------------------------------------------- the op's shard mode, one process
@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("option", OPTIONS)
def test_shard_statistics_combine_to_the_full_loss(backend, option):
    bias, ls, z, softcap = option
    N, H, V, tp = (37, 16, 97, 3) if backend == "cpu" else (13, 8, 300, 3)
    hidden, weight, b, target = make_inputs(N, H, V, bias=bias)
    fwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd if backend == "cpu" else flce_op._fwd_triton
    bwd = torch.ops.lmkernels.fused_linear_cross_entropy_bwd if backend == "cpu" else flce_op._bwd_triton
    opts = (-100, ls, z, softcap)
    starts, sizes = bounds(V, tp)
    shards = [(weight[s:s + n], None if b is None else b[s:s + n], s) for s, n in zip(starts, sizes)]
    stats = [fwd(hidden, w, target, bs, *opts, "none", 5, False, s, V)[:3] for w, bs, s in shards]
    lse = torch.logsumexp(torch.stack([st[2] for st in stats]).double(), 0)
    valid = target != -100
    rows = torch.where(valid, lse + sum(st[0].double() for st in stats) + z * lse ** 2, 0.0)
    truth = reference(hidden, weight, target, bias=b, label_smoothing=ls, z_loss=z, softcap=softcap,
                      reduction="none")[0]
    single = reference(hidden, weight, target, bias=b, label_smoothing=ls, z_loss=z, softcap=softcap,
                       reduction="none", compute_dtype=torch.float32)[0]
    within("loss rows", rows, single, truth)
    # gradients of a per-row upstream gradient: the shards' dh sum to the full dh, dW/db concatenate
    up = torch.randn(N, dtype=torch.float64)
    lse32 = torch.where(valid, lse, 0.0).float()
    parts = [bwd(up.float(), hidden, w, target, bs, lse32, *opts, "none", 5, s, V) for w, bs, s in shards]
    ours = [sum(p[0] for p in parts), torch.cat([p[1] for p in parts])]
    if bias:
        ours.append(torch.cat([p[2] for p in parts]))
    leaves = [t.double().requires_grad_() for t in (hidden, weight, b) if t is not None]
    truth_g = torch.autograd.grad((reference(*leaves[:2], target, bias=leaves[2] if bias else None,
                                             label_smoothing=ls, z_loss=z, softcap=softcap,
                                             reduction="none")[0] * up).sum(), leaves)
    leaves32 = [t.detach().float().requires_grad_() for t in leaves]
    single_g = torch.autograd.grad((reference(*leaves32[:2], target, bias=leaves32[2] if bias else None,
                                              label_smoothing=ls, z_loss=z, softcap=softcap, reduction="none",
                                              compute_dtype=torch.float32)[0] * up.float()).sum(), leaves32)
    for name, o, s, t in zip(("dhidden", "dweight", "dbias"), ours, single_g, truth_g):
        within(name, o, s, t)


def test_shard_mode_bad_arguments():
    hidden, weight, _, target = make_inputs(6, 8, 20, bias=False)
    fwd, bwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd, torch.ops.lmkernels.fused_linear_cross_entropy_bwd
    w = weight[:10]
    with pytest.raises(RuntimeError, match=r"must lie inside \[0, vocab_size = 15\); got vocab_start = 10"):
        fwd(hidden, w, target, None, -100, 0.0, 0.0, None, "none", 0, False, 10, 15)
    with pytest.raises(RuntimeError, match="needs reduction 'none' and compute_grad false"):
        fwd(hidden, w, target, None, -100, 0.0, 0.0, None, "mean", 0, False, 0, 20)
    with pytest.raises(RuntimeError, match="vocab_start must be 0 without vocab_size"):
        fwd(hidden, w, target, None, -100, 0.0, 0.0, None, "none", 0, False, 3, 0)
    t_bad = target.clone()
    t_bad[1] = 20  # a global id past the whole vocabulary
    with pytest.raises(RuntimeError, match=r"target\[1\] = 20 is out of range for V = 20"):
        fwd(hidden, w, t_bad, None, -100, 0.0, 0.0, None, "none", 0, False, 10, 20)
    with pytest.raises(ValueError, match=r"target\[1\] = 20 is out of range for V = 20"):
        flce_op._fwd_triton(hidden, w, t_bad, None, -100, 0.0, 0.0, None, "none", 0, False, 10, 20)
    # the partial statistics are not a loss: differentiating them through the op is an error
    h = hidden.clone().requires_grad_()
    partial = fwd(h, w, target, None, -100, 0.0, 0.0, None, "none", 0, False, 10, 20)[0]
    with pytest.raises(RuntimeError, match="not differentiable on their own"):
        partial.sum().backward()


def test_opcheck_shard_mode():
    hidden, weight, b, target = make_inputs(13, 8, 21, bias=True)
    fwd, bwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd, torch.ops.lmkernels.fused_linear_cross_entropy_bwd
    args = (hidden, weight[7:15], target, b[7:15], -100, 0.1, 0.0, 4.0, "none", 5, False, 7, 21)
    torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor"))
    lse = torch.randn(13)
    torch.library.opcheck(bwd, (torch.randn(13), *args[:4], lse, -100, 0.1, 1e-3, 4.0, "none", 5, 7, 21))
    meta = [t.to("meta") for t in (hidden, weight[7:15], target)]
    with pytest.raises(ValueError, match="needs reduction 'none' and compute_grad false"):
        fwd(*meta, None, -100, 0.0, 0.0, None, "mean", 0, False, 7, 21)


def test_backward_op_checks_targets():
    """The backward op reads target[r]'s logit: called on its own with a bad target it must
    raise, not read out of bounds (it did not check before the vocab-shard change)."""
    hidden, weight, _, target = make_inputs(6, 8, 20, bias=False)
    t_bad = target.clone()
    t_bad[4] = 1 << 40
    lse = torch.zeros(6)
    with pytest.raises(RuntimeError, match=r"target\[4\] = 1099511627776 is out of range for V = 20"):
        torch.ops.lmkernels.fused_linear_cross_entropy_bwd(torch.ones(6), hidden, weight, t_bad, None, lse,
                                                           -100, 0.0, 0.0, None, "none", 0)


# ---------------------------------------------------------------- across processes (gloo)
def _vocab_parallel_checks(V, uneven):
    import torch.distributed as dist

    from lmkernels.distributed.vocab_parallel import vocab_parallel_fused_linear_cross_entropy as vpce

    rank, tp = dist.get_rank(), dist.get_world_size()
    starts, sizes = bounds(V, tp)
    s, n = starts[rank], sizes[rank]
    cases = [(o, red) for o in OPTIONS for red in ("mean", "sum", "none")]
    for seed, ((bias, ls, z, softcap), reduction) in enumerate(cases):
        hidden, weight, b, target = make_inputs(41, 16, V, bias=bias, seed=seed)
        kw = dict(label_smoothing=ls, z_loss=z, softcap=softcap, reduction=reduction)
        h = hidden.clone().requires_grad_()
        w = weight[s:s + n].clone().requires_grad_()
        bs = None if b is None else b[s:s + n].clone().requires_grad_()
        shard = dict(vocab_start=s, vocab_size=V) if uneven else {}
        loss, zterm = vpce(h, w, target, dist.group.WORLD, bias=bs, chunk_size=9, return_z=True, **shard, **kw)
        # the single-device op (float32) and the float64 reference
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, b) if t is not None]
        single, single_z = lmkernels.fused_linear_cross_entropy(*leaves[:2], target, bias=leaves[2] if bias else None,
                                                                return_z=True, **kw)
        leaves64 = [t.double().requires_grad_() for t in (hidden, weight, b) if t is not None]
        truth, truth_z = reference(*leaves64[:2], target, bias=leaves64[2] if bias else None, **kw)
        within("loss", loss, single, truth)
        within("z", zterm, single_z, truth_z)
        up = torch.randn(truth.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        ours_g = torch.autograd.grad((loss * up.float()).sum(), [t for t in (h, w, bs) if t is not None])
        single_g = torch.autograd.grad((single * up.float()).sum(), leaves)
        truth_g = torch.autograd.grad((truth * up).sum(), leaves64)
        cut = (lambda t: t, lambda t: t[s:s + n], lambda t: t[s:s + n])
        for name, c, o, sg, tg in zip(("dhidden", "dweight", "dbias"), cut, ours_g, single_g, truth_g):
            within(f"{name} ({reduction}, option {seed})", o, c(sg), c(tg))
    # bfloat16 in (fp32 statistics and dh all-reduce inside): as close as the single-device op
    hidden, weight, b, target = make_inputs(41, 16, V, bias=True, dtype=torch.bfloat16)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight[s:s + n], b[s:s + n])]
    loss = vpce(leaves[0], leaves[1], target, dist.group.WORLD, bias=leaves[2], label_smoothing=0.1, **shard)
    single_leaves = [t.clone().requires_grad_() for t in (hidden, weight, b)]
    single = lmkernels.fused_linear_cross_entropy(*single_leaves[:2], target, bias=single_leaves[2], label_smoothing=0.1)
    leaves64 = [t.double().requires_grad_() for t in (hidden, weight, b)]
    truth = reference(*leaves64[:2], target, bias=leaves64[2], label_smoothing=0.1)[0]
    bf16_eps = torch.finfo(torch.bfloat16).eps
    within("loss (bfloat16)", loss, single, truth, bf16_eps)
    grads = [torch.autograd.grad(x, xs) for x, xs in ((loss, leaves), (single, single_leaves), (truth, leaves64))]
    cut = (lambda t: t, lambda t: t[s:s + n], lambda t: t[s:s + n])
    for name, c, o, sg, tg in zip(("dhidden", "dweight", "dbias"), cut, *grads):
        assert o.dtype == torch.bfloat16
        within(f"{name} (bfloat16)", o, c(sg), c(tg), bf16_eps)
    # non-finite hidden values: NaN rows exactly where PyTorch has them
    hidden, weight, _, target = make_inputs(41, 16, V, bias=False)
    target[3] = target[5] = 1
    hidden[3, 2], hidden[5, 1] = float("nan"), float("inf")
    rows = vpce(hidden, weight[s:s + n], target, dist.group.WORLD, reduction="none", **shard)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, target, reduction="none")
    assert torch.equal(rows.isnan(), ref.isnan()) and rows[3].isnan() and rows[5].isnan()
    return True


def _two_rank_checks():
    return _vocab_parallel_checks(98, False) and _head_checks()


def test_two_ranks_equal_slices_and_the_lm_head():
    assert run_distributed(_two_rank_checks, world_size=2, timeout=120) == [True] * 2


def test_four_ranks_uneven_slices():
    """V = 97 over 4 ranks: slices of 25, 24, 24, 24 rows."""
    assert run_distributed(_vocab_parallel_checks, world_size=4, args=(97, True), timeout=180) == [True] * 4


def _head_checks():
    """VocabParallelLMHead: calling it gathers the logits (and its gradient flows back to the
    right slice); its fused_loss equals the single-device op."""
    import torch.distributed as dist
    import torch.nn as nn

    from lmkernels.distributed.vocab_parallel import VocabParallelLMHead, vocab_parallel_fused_linear_cross_entropy

    g, rank = dist.group.WORLD, dist.get_rank()
    torch.manual_seed(0)
    lin = nn.Linear(16, 10, bias=True)
    head = VocabParallelLMHead(lin, g)
    assert head.weight.shape == (5, 16) and head.vocab_start == 5 * rank and head.weight.tp_shard.dim == 0
    x = torch.randn(2, 3, 16, requires_grad=True)
    x_tp = x.detach().clone().requires_grad_()
    logits = head(x_tp)  # gathered: the whole vocabulary, for sampling
    torch.testing.assert_close(logits, lin(x))
    dy = torch.randn(2, 3, 10)
    (lin(x) * dy).sum().backward()
    (logits * dy).sum().backward()
    torch.testing.assert_close(x_tp.grad, x.grad)
    torch.testing.assert_close(head.weight.grad, lin.weight.grad[5 * rank:5 * rank + 5])
    targets = torch.randint(0, 10, (2, 3))
    loss = head.fused_loss(x.detach(), targets, ignore_index=-1)
    torch.testing.assert_close(loss, lmkernels.fused_linear_cross_entropy(x.detach(), lin.weight, targets, bias=lin.bias))
    with pytest.raises(ValueError, match="must split into a multiple of tensor-parallel size 2"):
        VocabParallelLMHead(nn.Linear(16, 11), g)
    with pytest.raises(ValueError, match="pass both vocab_start and vocab_size"):
        vocab_parallel_fused_linear_cross_entropy(x, head.weight, targets, g, vocab_start=0)
    return True

