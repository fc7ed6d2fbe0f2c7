"""fused_linear_cross_entropy: C++ CPU kernel and Triton path (interpreter) against the float64
reference, loss and gradients.

Tolerance (flash-attention's rule): the kernel's max error against float64 may be at most twice
the error of plain PyTorch (F.linear + F.cross_entropy) in the same dtype, plus two rounding
units of that dtype at the result's magnitude.
"""
import itertools

import pytest
import torch
from torch.nn import functional as F

import lmkernels
from lmkernels.reference.fused_linear_cross_entropy import fused_linear_cross_entropy_reference as reference

BACKENDS = ("cpu", "triton")
# (N, H, V): one token, awkward sizes, chunks that do not divide N. The Triton interpreter runs
# a Python loop per row and tile (128 wide there), so its shapes are smaller (V still spans
# several tiles).
SHAPES = {"cpu": ((1, 8, 1), (97, 24, 1025), (130, 16, 97)),
          "triton": ((1, 8, 1), (21, 24, 300), (13, 16, 97))}
BIG = {"cpu": (97, 24, 1025), "triton": (19, 24, 300)}
# (bias, label_smoothing, z_loss, softcap)
OPTIONS = ((False, 0.0, 0.0, None), (True, 0.1, 1e-3, None), (False, 0.0, 1e-2, 5.0), (True, 0.2, 0.0, 3.0))


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
    loss, zterm = lmkernels.fused_linear_cross_entropy(hidden, weight, target, chunk_size=chunk_size,
                                                       return_z=True, backend=backend, **kw)
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
    loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, backend=backend)
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
    loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, backend=backend)
    assert torch.isnan(loss) and torch.isnan(F.cross_entropy(hidden @ weight.T, target))
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert (dh == 0).all() and (dw == 0).all()  # no row contributes
    assert lmkernels.fused_linear_cross_entropy(hidden, weight, target, reduction="sum", backend=backend) == 0
    target = torch.randint(0, 13, (9,))
    with torch.no_grad():
        bad = hidden.detach().clone()
        bad[3, 2] = float("nan")
        bad[5, 1] = float("inf")
    rows = lmkernels.fused_linear_cross_entropy(bad, weight, target, reduction="none", backend=backend)
    ref = F.cross_entropy(bad @ weight.T, target, reduction="none")
    assert torch.equal(torch.isnan(rows), torch.isnan(ref)) and torch.isnan(rows[3]) and torch.isnan(rows[5])
    torch.testing.assert_close(rows[~torch.isnan(ref)], ref[~torch.isnan(ref)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_backward_recomputes(backend):
    """retain_graph: the forward's gradients are scaled in place by the first backward; a second
    backward must recompute them, not scale them again."""
    hidden, weight, b, target = make_inputs(20, 8, 31, torch.float32, bias=True)
    loss = lmkernels.fused_linear_cross_entropy(hidden, weight, target, bias=b, backend=backend)
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
        f(h, w, t_bad, backend="triton")


def test_opcheck():
    hidden, weight, b, target = make_inputs(13, 8, 21, torch.float32, bias=True)
    fwd = torch.ops.lmkernels.fused_linear_cross_entropy_fwd
    for compute_grad, reduction in ((True, "mean"), (False, "none")):
        args = (hidden, weight, target, b, -100, 0.1, 1e-3, 4.0, reduction, 5, compute_grad)
        torch.library.opcheck(fwd, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
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
