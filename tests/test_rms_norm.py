"""rms_norm / add_rms_norm: C++ CPU kernel and Triton kernels (interpreter) against the float64
reference, with HF LlamaRMSNorm's eager composition as the same-precision baseline.

Tolerance (flash-attention's rule, as tests/test_attention.py): the kernel's max error against
float64 may be at most twice the eager composition's error in the same dtype, plus two units of
rounding of the dtype at the result's magnitude (at least 1: inputs are randn).
"""
import pytest
import torch

import lmkernels
from lmkernels.reference.rms_norm import add_rms_norm_reference, rms_norm_reference
from lmkernels.triton import rms_norm as triton_rms_norm
from lmkernels.triton._common import triton_interpreted

from tests._backends import ON_GPU

EPS = 1e-6
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 96), (97, 200), (3, 5, 64), (1025, 40))
# The interpreter runs one Python loop per program: smaller row counts (300 rows still gives
# each of the backward's 4 programs several 32-row chunks of dweight).
TRITON_SHAPES = ((1, 96), (37, 200), (3, 5, 64), (300, 40))


def kernels():
    """The implementations under test: the op on CPU, and the Triton launchers (interpreter or GPU)."""
    names = ["cpu"]
    if triton_interpreted() or ON_GPU:
        names.append("triton")
    return names


def device_of(kind):
    return "cuda" if kind == "triton" and ON_GPU else "cpu"


def assert_within_eager_error(name, ours, eager, truth, dtype):
    truth = truth.double()
    fin = torch.isfinite(truth)
    assert torch.equal(torch.isfinite(ours), fin), f"{name}: non-finite pattern differs"
    err = (ours.double() - truth)[fin].abs().max().item()
    eager_err = (eager.double() - truth)[fin].abs().max().item()
    floor = 2 * torch.finfo(dtype).eps * max(truth[fin].abs().max().item(), 1.0)
    assert err <= 2 * eager_err + floor, f"{name}: error {err:.3g} > 2 x eager error {eager_err:.3g} + {floor:.3g}"


def forward(kind, x, w, residual=None):
    """-> (out, sum or None, rstd) from the implementation `kind`."""
    if kind == "cpu":
        if residual is None:
            out, rstd = torch.ops.lmkernels.rms_norm_fwd(x, w, EPS)
            return out, None, rstd
        return torch.ops.lmkernels.add_rms_norm_fwd(x, residual, w, EPS)
    if residual is None:
        out, rstd = triton_rms_norm.rms_norm_fwd(x, w, EPS)
        return out, None, rstd
    return triton_rms_norm.rms_norm_fwd(x, w, EPS, residual=residual)


def backward(kind, g, x, w, rstd, grad_sum=None):
    if kind == "cpu":
        return torch.ops.lmkernels.rms_norm_bwd(g, x, w, rstd, grad_sum)
    return triton_rms_norm.rms_norm_bwd(g, x, w, rstd, grad_sum)


def eager_grads(x, w, g, residual=None, g_sum=None):
    """Gradients of the eager HF composition in the inputs' dtype (and float64 when x is)."""
    leaves = [t.detach().clone().requires_grad_() for t in ((x, w) if residual is None else (x, residual, w))]
    if residual is None:
        out = rms_norm_reference(leaves[0], leaves[1], EPS, compute_dtype=torch.float64 if x.dtype == torch.float64 else None)
        outs, gs = [out], [g]
    else:
        out, s = add_rms_norm_reference(*leaves, EPS)
        outs, gs = [out, s], [g, g_sum]
    return torch.autograd.grad(outs, leaves, gs)


def truth_grads(x, w, g, residual=None, g_sum=None):
    leaves = [t.detach().double().requires_grad_() for t in ((x, w) if residual is None else (x, residual, w))]
    if residual is None:
        outs, gs = [rms_norm_reference(leaves[0], leaves[1], EPS, torch.float64)], [g.double()]
    else:
        out, s = add_rms_norm_reference(*leaves, EPS, compute_dtype=torch.float64)
        outs, gs = [out, s], [g.double(), g_sum.double()]
    return torch.autograd.grad(outs, leaves, gs)


def kernel_shapes(shapes=SHAPES, triton_shapes=TRITON_SHAPES):
    """(kind, shape) pairs: every CPU shape, the interpreter-sized ones for Triton."""
    return [(k, s) for k in kernels() for s in (triton_shapes if k == "triton" and not ON_GPU else shapes)]


def weight_dtypes(dtype):
    return (dtype,) if dtype == torch.float32 else (dtype, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape", kernel_shapes())
def test_rms_norm_forward_and_backward(kind, shape, dtype):
    dev = device_of(kind)
    for wdtype in weight_dtypes(dtype):
        x = torch.randn(shape, device=dev).to(dtype)
        w = (1 + 0.5 * torch.randn(shape[-1], device=dev)).to(wdtype)
        out, _, rstd = forward(kind, x, w)
        eager = rms_norm_reference(x, w, EPS)
        assert out.dtype == eager.dtype == wdtype and out.shape == x.shape
        assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
        assert_within_eager_error("out", out, eager, rms_norm_reference(x, w, EPS, torch.float64), dtype)
        # HF semantics exactly: the only difference is the summation order of the mean, which
        # moves rstd by an fp32 ulp or so and may flip the two later roundings (n, then n * w).
        torch.testing.assert_close(out, eager, rtol=4 * torch.finfo(dtype).eps, atol=0)

        g = torch.randn(shape, device=dev).to(wdtype)
        dx, dw = backward(kind, g, x, w, rstd)
        assert dx.dtype == dtype and dw.dtype == wdtype and dw.shape == w.shape
        for name, a, e, t in zip(("dx", "dweight"), (dx, dw), eager_grads(x, w, g), truth_grads(x, w, g)):
            assert_within_eager_error(name, a, e, t, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind,shape", kernel_shapes(((1, 96), (97, 200)), ((1, 96), (37, 200))))
def test_add_rms_norm_forward_and_backward(kind, shape, dtype):
    dev = device_of(kind)
    x, r = torch.randn(shape, device=dev).to(dtype), torch.randn(shape, device=dev).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=dev)).to(dtype)
    out, s, rstd = forward(kind, x, w, r)
    eager_out, eager_s = add_rms_norm_reference(x, r, w, EPS)
    assert torch.equal(s, eager_s)  # the same one rounding of x + residual
    truth_out, _ = add_rms_norm_reference(x, r, w, EPS, torch.float64)
    assert_within_eager_error("out", out, eager_out, truth_out, dtype)

    g, g_sum = torch.randn(shape, device=dev).to(dtype), torch.randn(shape, device=dev).to(dtype)
    dx, dw = backward(kind, g, s, w, rstd, g_sum)
    e_dx, e_dr, e_dw = eager_grads(x, w, g, r, g_sum)
    t_dx, t_dr, t_dw = truth_grads(x, w, g, r, g_sum)
    assert_within_eager_error("dx", dx, e_dx, t_dx, dtype)
    assert_within_eager_error("dresidual", dx, e_dr, t_dr, dtype)
    assert_within_eager_error("dweight", dw, e_dw, t_dw, dtype)


def test_public_functions_autograd_reach_every_input():
    x = torch.randn(7, 33, requires_grad=True)
    r = torch.randn(7, 33, requires_grad=True)
    w = torch.randn(33, requires_grad=True)
    out, s = lmkernels.add_rms_norm(x, r, w)
    (out.sum() + 3 * s.sum()).backward()
    xe, re, we = (t.detach().clone().requires_grad_() for t in (x, r, w))
    oe, se = add_rms_norm_reference(xe, re, we, EPS)
    (oe.sum() + 3 * se.sum()).backward()
    for a, b in ((x, xe), (r, re), (w, we)):
        torch.testing.assert_close(a.grad, b.grad)
    y = lmkernels.rms_norm(x, w, eps=1e-5)
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-5))
    # Only the sum used: its gradient passes straight through; weight gets none.
    x.grad = w.grad = None
    lmkernels.add_rms_norm(x, r, w)[1].sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_autograd_unused_outputs_and_rstd():
    """The C++ autograd: an unused sum (the last layer's) reaches rms_norm_bwd as None, and
    rstd is an output without a gradient."""
    x, r = torch.randn(9, 40, requires_grad=True), torch.randn(9, 40, requires_grad=True)
    w = (1 + 0.1 * torch.randn(40)).requires_grad_()
    g = torch.randn(9, 40)
    out, _, rstd = torch.ops.lmkernels.add_rms_norm_fwd(x, r, w, EPS)
    assert out.requires_grad and not rstd.requires_grad
    out.backward(g)
    xe, re, we = (t.detach().double().requires_grad_() for t in (x, r, w))
    add_rms_norm_reference(xe, re, we, EPS)[0].backward(g.double())
    for a, b in ((x, xe), (r, re), (w, we)):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-5, atol=1e-5)
    assert not torch.ops.lmkernels.rms_norm_fwd(x, w, EPS)[1].requires_grad


@pytest.mark.parametrize("kind", kernels())
def test_non_contiguous_inputs(kind):
    dev = device_of(kind)
    base = torch.randn(3, 2, 2 * 48, device=dev)
    x = base[..., :48]                        # row stride 96: read in place
    xt = torch.randn(48, 6, device=dev).t()   # no unit stride along H: copied
    w = torch.randn(48, device=dev)
    for t in (x, xt, base.transpose(0, 1)[..., 1::2]):
        out, _, rstd = forward(kind, t, w)
        ref_out, _, ref_rstd = forward(kind, t.contiguous(), w)
        assert torch.equal(out, ref_out) and torch.equal(rstd, ref_rstd)
        g = torch.randn(t.shape, device=dev)
        for a, b in zip(backward(kind, g.t().contiguous().t() if g.dim() == 2 else g, t, w, rstd),
                        backward(kind, g, t.contiguous(), w, rstd)):
            assert torch.equal(a, b)
    out, s, _ = forward(kind, x, w, base[..., 48:])
    out2, s2, _ = forward(kind, x.contiguous(), w, base[..., 48:].contiguous())
    assert torch.equal(out, out2) and torch.equal(s, s2)


@pytest.mark.parametrize("kind", kernels())
def test_nan_and_inf_propagate_like_pytorch(kind):
    dev = device_of(kind)
    x = torch.randn(4, 40, device=dev)
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    w = torch.randn(40, device=dev)
    out, _, _ = forward(kind, x, w)
    torch.testing.assert_close(out, rms_norm_reference(x, w, EPS), equal_nan=True)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all() and torch.isfinite(out[3]).all()


def test_opcheck():
    x, r = torch.randn(5, 24), torch.randn(5, 24)
    w = torch.randn(24)
    torch.library.opcheck(torch.ops.lmkernels.rms_norm_fwd, (x.requires_grad_(), w.requires_grad_(), EPS))
    torch.library.opcheck(torch.ops.lmkernels.add_rms_norm_fwd, (x, r.requires_grad_(), w, EPS))
    xb, wb = x.detach().bfloat16(), w.detach()
    out, rstd = torch.ops.lmkernels.rms_norm_fwd(xb, wb, EPS)
    torch.library.opcheck(torch.ops.lmkernels.rms_norm_bwd, (torch.randn_like(out), xb, wb, rstd, None))
    torch.library.opcheck(torch.ops.lmkernels.rms_norm_bwd,
                          (torch.randn_like(out), xb, wb, rstd, torch.randn_like(xb)))


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, dim=32):
            super().__init__()
            self.fc = torch.nn.Linear(dim, dim)
            self.w1 = torch.nn.Parameter(1 + 0.1 * torch.randn(dim))
            self.w2 = torch.nn.Parameter(1 + 0.1 * torch.randn(dim))

        def forward(self, x):
            h, res = lmkernels.add_rms_norm(self.fc(x), x, self.w1)
            return lmkernels.rms_norm(h + res, self.w2)

    model = Block()
    x = torch.randn(3, 7, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y = compiled(x)
    y_eager = model(x)
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager.square().sum().backward()
    for a, p in zip(grads, model.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("call,match", [
    (lambda: lmkernels.rms_norm(torch.randn(3, 8, dtype=torch.float64), torch.randn(8)), "x must be float32, bfloat16 or float16; got"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 8), torch.randn(7)), r"weight must be 1-D of size H=8"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 8), torch.randn(8).half()), "weight must have x's dtype"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 0), torch.randn(0)), "non-empty last"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 8), torch.randn(8), eps=-1.0), "eps must be finite and >= 0; got -1"),
    (lambda: lmkernels.add_rms_norm(torch.randn(3, 8), torch.randn(2, 8), torch.randn(8)), "residual must have x's shape"),
    (lambda: lmkernels.add_rms_norm(torch.randn(3, 8), torch.randn(3, 8).bfloat16(), torch.randn(8)), "residual must have x's dtype"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 8), torch.randn(8), backend="triton"), "backend must be 'auto' or 'cpu'.*got 'triton'"),
    (lambda: lmkernels.rms_norm(torch.randn(3, 8), torch.randn(8), backend="fast"), "backend must be 'auto' or 'cpu'.*got 'fast'"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bad_arguments_under_tracing():
    # The fake checks say the same as the C++ ones.
    with torch._subclasses.FakeTensorMode():
        with pytest.raises(ValueError, match=r"weight must be 1-D of size H=8"):
            torch.ops.lmkernels.rms_norm_fwd(torch.randn(3, 8), torch.randn(7), EPS)


@pytest.mark.parametrize("dtype,wdtype", ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.bfloat16, torch.float32), (torch.float16, torch.float16)))
def test_matches_transformers_llama_rms_norm(dtype, wdtype):
    llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = llama.LlamaRMSNorm(200, eps=1e-5).to(wdtype)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(200))
    x = torch.randn(97, 200).to(dtype)
    ours = lmkernels.rms_norm(x, norm.weight.detach(), eps=1e-5)
    hf = norm(x).detach()
    assert ours.dtype == hf.dtype
    torch.testing.assert_close(ours, hf, rtol=4 * torch.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("table", ("rms_norm.FWD_TABLE", "rms_norm.ADD_FWD_TABLE", "rms_norm.BWD_TABLE",
                                   "swiglu.FWD_TABLE", "swiglu.BWD_TABLE", "rotary_embedding.TABLE"))
def test_cuda_backend_choice(table):
    # CUDA tensors run the Triton kernel: 'auto'/'triton' pick it, anything else is a clear error.
    import sys

    module, name = table.split(".")
    table = getattr(sys.modules[f"lmkernels.ops.{module}"], name)
    assert table.pick("auto") is table.pick("triton") is table.kernels["triton"]
    with pytest.raises(ValueError, match="no 'cuda' kernel for this op"):
        table.pick("cuda")
    with pytest.raises(ValueError, match="backend 'cpu' needs CPU tensors"):
        table.pick("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        table.pick("fast")