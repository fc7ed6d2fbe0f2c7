"""fused_linear_cross_entropy: C++ CPU kernel and Triton path (interpreter) against the float64
reference, loss and gradients. The op's CPU tensors run the C++ kernel; the Triton path is
reached here by calling its checked launchers (lmkernels.ops.fused_linear_cross_entropy
._fwd_triton / _bwd_triton: the C++ checks, then the launchers) directly, as CUDA tensors would.

Tolerance (flash-attention's rule): the kernel's max error against float64 may be at most twice
the error of plain PyTorch (F.linear + F.cross_entropy) in the same dtype, plus two rounding
units of that dtype at the result's magnitude.
"""
import importlib
import itertools
import re

import pytest
import torch
from torch.nn import functional as F

import lmkernels
from lmkernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_reference as reference

flce_op = importlib.import_module("lmkernels.ops.fused_linear_cross_entropy")  # the package's name is the function

BACKENDS = ("cpu", "triton")
# (N, H, V): one token, awkward sizes, chunks that do not divide N. The Triton interpreter runs
# a Python loop per row and tile (128 wide there), so its shapes are smaller (V still spans
# several tiles).
SHAPES = {"cpu": ((1, 8, 1), (97, 24, 1025), (130, 16, 97)),
          "triton": ((1, 8, 1), (21, 24, 300), (13, 16, 97))}
BIG = {"cpu": (97, 24, 1025), "triton": (19, 24, 300)}
# (bias, label_smoothing, z_loss, softcap)
OPTIONS = ((False, 0.0, 0.0, None), (True, 0.1, 1e-3, None), (False, 0.0, 1e-2, 5.0), (True, 0.2, 0.0, 3.0))


class _TritonPath(torch.autograd.Function):
    """The Triton launchers with the op's autograd contract: mean/sum take the forward's
    gradients (compute_grad) scaled by the upstream one; "none" runs the backward launcher."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, opts, reduction, chunk_size):
        compute_grad = reduction != "none"
        loss, z, lse, gh, gw, gb = flce_op._fwd_triton(hidden, weight, target, bias, *opts, reduction,
                                                       chunk_size, compute_grad)
        ctx.save_for_backward(hidden, weight, bias, target, lse)
        ctx.args, ctx.grads = (opts, reduction, chunk_size), (gh, gw, gb)
        ctx.mark_non_differentiable(z)
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        opts, reduction, chunk_size = ctx.args
        if reduction == "none":
            gh, gw, gb = flce_op._bwd_triton(grad_loss, hidden, weight, target, bias, lse, *opts,
                                             reduction, chunk_size)
        else:
            gh, gw, gb = (g * grad_loss for g in ctx.grads)
        return gh, gw, (gb if bias is not None else None), None, None, None, None


def flce(hidden, weight, target, *, backend, bias=None, ignore_index=-100, label_smoothing=0.0,
         z_loss=0.0, softcap=None, reduction="mean", chunk_size=None, return_z=False):
    """lmkernels.fused_linear_cross_entropy, or the same computation through the Triton launchers."""
    kw = dict(bias=bias, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
              softcap=softcap, reduction=reduction, chunk_size=chunk_size, return_z=return_z)
    if backend != "triton":
        return lmkernels.fused_linear_cross_entropy(hidden, weight, target, backend=backend, **kw)
    opts = (ignore_index, float(label_smoothing), float(z_loss), softcap)
    loss, z = _TritonPath.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, target.reshape(-1),
                                opts, reduction, int(chunk_size or 0))
    if reduction == "none":
        loss, z = loss.reshape(target.shape), z.reshape(target.shape)
    return (loss, z) if return_z else loss


def make_inputs(N, H, V, dtype, *, bias, ignore_frac=0.2):
    hidden = torch.randn(N, H, dtype=dtype, requires_grad=True)
    weight = (torch.randn(V, H) / H ** 0.5).to(dtype).requires_grad_()
    b = torch.randn(V, dtype=dtype).requires_grad_() if bias else None
    target = torch.randint(0, V, (N,))
    target[torch.rand(N) < ignore_frac] = -100
    return hidden, weight, b, target


def assert_within_pt_error(name, ours, pt, truth, dtype):
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    pt_err = (pt.double() - truth).abs().max().item()
    floor = 2 * torch.finfo(dtype).eps * max(truth.abs().max().item(), 1e-30)
    assert err <= 2 * pt_err + floor, f"{name}: error {err:.3g} > 2 x PyTorch's error {pt_err:.3g} + {floor:.3g}"


def grads(loss, tensors):
    gs = torch.autograd.grad(loss.sum(), [t for t in tensors if t is not None])
    return list(gs)


def run_and_compare(backend, N, H, V, dtype, option, reduction, chunk_size):
    bias, ls, z, softcap = option
    hidden, weight, b, target = make_inputs(N, H, V, dtype, bias=bias)
    kw = dict(bias=b, label_smoothing=ls, z_loss=z, softcap=softcap, reduction=reduction)
    loss, zterm = flce(hidden, weight, target, chunk_size=chunk_size, return_z=True, backend=backend, **kw)
    truth, truth_z = reference(hidden, weight, target, compute_dtype=torch.float64, **kw)
    pt, pt_z = reference(hidden, weight, target, compute_dtype=dtype, **kw)
    assert loss.dtype == torch.float32 and loss.shape == truth.shape
    assert_within_pt_error("loss", loss, pt, truth, dtype)
    assert_within_pt_error("z", zterm, pt_z, truth_z, dtype)
    # a power of two for scalar losses: scaling before or after the GEMMs rounds alike
    upstream = torch.randn_like(truth) if reduction == "none" else torch.tensor(2.0, dtype=torch.float64)
    ours_g = grads(loss * upstream.float(), (hidden, weight, b))
    truth_g = grads(truth * upstream, (hidden, weight, b))
    pt_g = grads(pt * upstream.to(pt.dtype), (hidden, weight, b))
    for name, o, p, t in zip(("dhidden", "dweight", "dbias"), ours_g, pt_g, truth_g):
        assert o.dtype == dtype and o.shape == t.shape
        assert_within_pt_error(name, o, p, t, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_index", range(3))
@pytest.mark.parametrize("option", OPTIONS)
def test_matches_reference_fp32(backend, shape_index, option):
    run_and_compare(backend, *SHAPES[backend][shape_index], torch.float32, option, "mean", chunk_size=7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,chunk_size", itertools.product(("mean", "sum", "none"), (None, 32)))
def test_reductions_and_chunks(backend, reduction, chunk_size):
    run_and_compare(backend, *BIG[backend], torch.float32, OPTIONS[1], reduction, chunk_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_low_precision(backend, dtype):
    run_and_compare(backend, *BIG[backend], dtype, OPTIONS[1], "mean", chunk_size=None)
    run_and_compare(backend, *SHAPES[backend][2], dtype, OPTIONS[3], "none", chunk_size=8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_f_cross_entropy_leading_dims_and_noncontiguous(backend):
    x = torch.randn(16, 3, 5, requires_grad=True)  # hidden (3, 5, 16) through a permute: not contiguous
    hidden = x.permute(1, 2, 0)
    weight = torch.randn(37, 16, requires_grad=True)
    target = torch.randint(0, 37, (3, 5))
    loss = flce(hidden, weight, target, backend=backend)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 37), target.reshape(-1))
    torch.testing.assert_close(loss, ref)
    g1 = torch.autograd.grad(loss, (x, weight))
    g2 = torch.autograd.grad(ref, (x, weight))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_ignored_and_nonfinite_as_pytorch(backend):
    hidden, weight, _, target = make_inputs(9, 8, 13, torch.float32, bias=False)
    target.fill_(-100)
    loss = flce(hidden, weight, target, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, target))
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert (dh == 0).all() and (dw == 0).all()  # no row contributes
    assert flce(hidden, weight, target, reduction="sum", backend=backend) == 0
    target = torch.randint(0, 13, (9,))
    with torch.no_grad():
        bad = hidden.detach().clone()
        bad[3, 2] = float("nan")
        bad[5, 1] = float("inf")
    rows = flce(bad, weight, target, reduction="none", backend=backend)
    ref = F.cross_entropy(bad @ weight.T, target, reduction="none")
    assert torch.equal(torch.isnan(rows), torch.isnan(ref)) and torch.isnan(rows[3]) and torch.isnan(rows[5])
    torch.testing.assert_close(rows[~torch.isnan(ref)], ref[~torch.isnan(ref)])


def test_second_backward_recomputes():
    """retain_graph: the forward's gradients are scaled in place by the first backward; a second
    backward must recompute them, not scale them again."""
    hidden, weight, b, target = make_inputs(20, 8, 31, torch.float32, bias=True)
    loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, bias=b)
    g1 = torch.autograd.grad(loss * 3.0, (hidden, weight, b), retain_graph=True)
    g2 = torch.autograd.grad(loss * 3.0, (hidden, weight, b))
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c)


def test_bad_arguments_name_the_argument():
    h, w, _, t = make_inputs(4, 8, 10, torch.float32, bias=False)
    f = lmkernels.fused_linear_cross_entropy
    with pytest.raises(ValueError, match="weight must be"):
        f(h, w[:, :5], t)
    with pytest.raises(TypeError, match="target must be int64"):
        f(h, w, t.int())
    with pytest.raises(ValueError, match="target must have"):
        f(h, w, t[:3])
    with pytest.raises(TypeError, match="weight has dtype"):
        f(h, w.double(), t)
    with pytest.raises(ValueError, match="reduction"):
        f(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="softcap"):
        f(h, w, t, softcap=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        f(h, w, t, label_smoothing=1.5)
    with pytest.raises(ValueError, match="chunk_size"):
        f(h, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="bias"):
        f(h, w, t, bias=torch.zeros(9))
    t_bad = t.clone()
    t_bad[2] = 10
    with pytest.raises(RuntimeError, match=r"target\[2\] = 10 is out of range"):
        f(h, w, t_bad, backend="cpu")
    with pytest.raises(ValueError, match=r"target\[2\] = 10 is out of range"):
        flce(h, w, t_bad, backend="triton")
    with pytest.raises(RuntimeError, match="lse must be float32"):  # the C++ checks guard the launchers
        flce_op._bwd_triton(torch.tensor(1.0), h, w, t, None, torch.zeros(3), -100, 0.0, 0.0, None, "mean", 0)
    with pytest.raises(RuntimeError, match="compute_grad needs reduction"):
        flce_op._fwd_triton(h, w, t, None, -100, 0.0, 0.0, None, "none", 0, True)


def test_opcheck():
    hidden, weight, b, target = make_inputs(13, 8, 21, torch.float32, bias=True)
    fwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd
    for compute_grad, reduction in ((True, "mean"), (False, "none")):
        args = (hidden, weight, target, b, -100, 0.1, 1e-3, 4.0, reduction, 5, compute_grad)
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        torch.library.opcheck(fwd, args, {"backend": "cpu"}, test_utils=("test_schema", "test_faketensor"))
    lse = fwd(hidden, weight, target, b, -100, 0.0, 0.0, None, "none", 0, False)[2]
    bwd_args = (torch.randn(13), hidden.detach(), weight.detach(), target, b.detach(), lse, -100, 0.0, 0.0, None, "none", 0)
    torch.library.opcheck(torch.ops.lmkernels.fused_linear_cross_entropy_bwd, bwd_args)


def test_torch_compile_fullgraph():
    hidden, weight, _, target = make_inputs(24, 8, 37, torch.float32, bias=False)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, w, t):
        return lmkernels.fused_linear_cross_entropy(h, w, t, z_loss=1e-3)

    loss = step(hidden, weight, target)
    g = torch.autograd.grad(loss, (hidden, weight))
    ref = reference(hidden, weight, target, z_loss=1e-3, compute_dtype=torch.float32)[0]
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    torch.testing.assert_close(loss, ref)
    for a, c in zip(g, g_ref):
        torch.testing.assert_close(a, c)


def test_one_op_pattern_backend_argument():
    """One schema per op with a trailing backend argument; no twin *_triton ops. On CPU tensors
    backend='triton' is an error that names the launcher to call under TRITON_INTERPRET=1."""
    for name in ("fused_linear_cross_entropy_fwd_triton", "fused_linear_cross_entropy_bwd_triton"):
        assert not hasattr(torch.ops.lmkernels, name)
    for op in (torch.ops.lmkernels.fused_linear_cross_entropy_fwd, torch.ops.lmkernels.fused_linear_cross_entropy_bwd):
        assert op.default._schema.arguments[-1].name == "backend"
    h, w, _, t = make_inputs(5, 8, 11, torch.float32, bias=False)
    expected = lmkernels.fused_linear_cross_entropy(h, w, t)
    assert torch.equal(lmkernels.fused_linear_cross_entropy(h, w, t, backend="cpu"), expected)
    with pytest.raises(ValueError, match=re.escape("backend 'triton' needs CUDA tensors; got CPU tensors (under "
                                                   "TRITON_INTERPRET=1 call lmkernels.triton.fused_linear_cross_entropy.flce_fwd")):
        lmkernels.fused_linear_cross_entropy(h, w, t, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        lmkernels.fused_linear_cross_entropy(h, w, t, backend="fast")
    lse = torch.zeros(5)
    with pytest.raises(ValueError, match="flce_bwd"):
        torch.ops.lmkernels.fused_linear_cross_entropy_bwd(torch.ones(5), h, w, t, None, lse, -100, 0.0, 0.0, None,
                                                           "none", 0, backend="triton")


@pytest.mark.parametrize("preferred", ["cuda", "triton", "cpu"])
def test_lmk_backend_does_not_break_cpu_tensors(monkeypatch, preferred):
    h, w, _, t = make_inputs(7, 8, 11, torch.float32, bias=False)
    expected = lmkernels.fused_linear_cross_entropy(h, w, t, reduction="none")
    monkeypatch.setenv("LMK_BACKEND", preferred)
    assert torch.equal(lmkernels.fused_linear_cross_entropy(h, w, t, reduction="none"), expected)


def test_backend_table_for_cuda_tensors(monkeypatch):
    """On CUDA tensors the op has one kernel, Triton: backend='cuda' is an error naming the
    choices; LMK_BACKEND=cuda runs Triton with a warning."""
    for table, triton in ((flce_op.FWD_TABLE, flce_op._fwd_triton), (flce_op.BWD_TABLE, flce_op._bwd_triton)):
        assert table.pick("auto") is triton and table.pick("triton") is triton
        with pytest.raises(ValueError, match=re.escape("no 'cuda' kernel for this op; on CUDA tensors use one of ('auto', 'triton')")):
            table.pick("cuda")
        monkeypatch.setenv("LMK_BACKEND", "cuda")
        monkeypatch.setattr(table, "_warned", set())
        with pytest.warns(UserWarning, match="LMK_BACKEND=cuda has no kernel for this op"):
            assert table.pick("auto") is triton
        monkeypatch.delenv("LMK_BACKEND")


def test_fakes_check_shapes():
    """The fakes (what torch.compile traces) report bad shapes instead of inventing outputs."""
    h, w, t = torch.empty(6, 8, device="meta"), torch.empty(11, 8, device="meta"), torch.empty(6, dtype=torch.long, device="meta")
    fwd, bwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd, torch.ops.lmkernels.fused_linear_cross_entropy_bwd
    assert fwd(h, w, t, None, -100, 0.0, 0.0, None, "mean", 0, True)[4].shape == (11, 8)
    with pytest.raises(ValueError, match=r"weight must be \(V, H\) with H = 8"):
        fwd(h, w[:, :5], t, None, -100, 0.0, 0.0, None, "mean", 0, False)
    with pytest.raises(ValueError, match="target must be 1-D"):
        fwd(h, w, t[:4], None, -100, 0.0, 0.0, None, "mean", 0, False)
    with pytest.raises(ValueError, match="bias must be"):
        fwd(h, w, t, torch.empty(3, device="meta"), -100, 0.0, 0.0, None, "mean", 0, False)
    with pytest.raises(ValueError, match="lse must be"):
        bwd(torch.empty((), device="meta"), h, w, t, None, torch.empty(4, device="meta"), -100, 0.0, 0.0, None, "mean", 0)
