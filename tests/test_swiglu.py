"""swiglu: C++ CPU kernel and Triton kernels (interpreter) against the float64 reference, with
the eager F.silu(gate) * up in the same dtype as the baseline (tolerance rule of
tests/test_rms_norm.py: at most 2x the eager error plus two roundings)."""
import pytest
import torch
import torch.nn.functional as F

import lmkernels
from lmkernels.reference.swiglu import swiglu_reference
from lmkernels.triton import swiglu as triton_swiglu

from tests.test_rms_norm import assert_within_eager_error, device_of, kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHAPES = ((1, 96), (97, 200), (2, 3, 1025), (5,))


def forward(kind, gate, up):
    if kind == "cpu":
        return torch.ops.lmkernels.swiglu_fwd(gate, up)
    return triton_swiglu.swiglu_fwd(gate, up)


def backward(kind, g, gate, up):
    if kind == "cpu":
        return torch.ops.lmkernels.swiglu_bwd(g, gate, up)
    return triton_swiglu.swiglu_bwd(g, gate, up)


def grads(gate, up, g, compute_dtype=None):
    leaves = [t.detach().clone().requires_grad_() for t in (gate, up)]
    out = swiglu_reference(*leaves, compute_dtype=compute_dtype)
    return torch.autograd.grad(out, leaves, g.to(out.dtype))


@pytest.mark.parametrize("kind", kernels())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward(kind, dtype, shape):
    dev = device_of(kind)
    gate = (3 * torch.randn(shape, device=dev)).to(dtype)
    up = torch.randn(shape, device=dev).to(dtype)
    out = forward(kind, gate, up)
    assert out.dtype == dtype and out.shape == gate.shape
    assert_within_eager_error("out", out, swiglu_reference(gate, up),
                              swiglu_reference(gate, up, torch.float64), dtype)
    g = torch.randn(shape, device=dev).to(dtype)
    ours = backward(kind, g, gate, up)
    for name, a, e, t in zip(("dgate", "dup"), ours, grads(gate, up, g), grads(gate, up, g, torch.float64)):
        assert a.dtype == dtype
        assert_within_eager_error(name, a, e, t, dtype)


def test_public_function_autograd():
    gate = torch.randn(9, 31, requires_grad=True)
    up = torch.randn(9, 31, requires_grad=True)
    out = lmkernels.swiglu(gate, up)
    g = torch.randn_like(out)
    out.backward(g)
    eg, eu = grads(gate, up, g)
    torch.testing.assert_close(out, F.silu(gate) * up)
    torch.testing.assert_close(gate.grad, eg)
    torch.testing.assert_close(up.grad, eu)


@pytest.mark.parametrize("kind", kernels())
def test_non_contiguous_inputs(kind):
    dev = device_of(kind)
    gate_up = torch.randn(4, 7, 2 * 40, device=dev)
    gate, up = gate_up.chunk(2, dim=-1)       # row stride 80: read in place
    gt = torch.randn(40, 28, device=dev).t()  # copied
    for a, b in ((gate, up), (gt, up.reshape(28, 40))):
        assert torch.equal(forward(kind, a, b), forward(kind, a.contiguous(), b.contiguous()))
        g = torch.randn(a.shape, device=dev)
        for x, y in zip(backward(kind, g, a, b), backward(kind, g, a.contiguous(), b.contiguous())):
            assert torch.equal(x, y)


@pytest.mark.parametrize("kind", kernels())
def test_nan_and_inf_like_pytorch(kind):
    dev = device_of(kind)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, 100.0, -100.0], device=dev)
    gate = special.repeat(2, 1)
    up = torch.tensor([[1.0], [-2.0]], device=dev).expand(2, 6).contiguous()
    torch.testing.assert_close(forward(kind, gate, up), F.silu(gate) * up, equal_nan=True)
    g = torch.ones_like(gate)
    eg, eu = grads(gate, up, g)
    dg, du = backward(kind, g, gate, up)
    torch.testing.assert_close(dg, eg, equal_nan=True)
    torch.testing.assert_close(du, eu, equal_nan=True)


def test_opcheck():
    gate, up = torch.randn(5, 24, requires_grad=True), torch.randn(5, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.lmkernels.swiglu_fwd, (gate, up))
    gb, ub = gate.detach().bfloat16(), up.detach().bfloat16()
    torch.library.opcheck(torch.ops.lmkernels.swiglu_bwd, (torch.randn_like(gb), gb, ub))


def test_torch_compile_fullgraph():
    class MLP(torch.nn.Module):
        def __init__(self, dim=32, hidden=48):
            super().__init__()
            self.gate_up = torch.nn.Linear(dim, 2 * hidden, bias=False)
            self.down = torch.nn.Linear(hidden, dim, bias=False)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(lmkernels.swiglu(gate, up))

    model = MLP()
    x = torch.randn(3, 5, 32)
    y = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    y_eager = model(x)
    torch.testing.assert_close(y, y_eager)
    y.square().sum().backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager.square().sum().backward()
    for a, p in zip(grads_c, model.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("call,match", [
    (lambda: lmkernels.swiglu(torch.randn(3, 8), torch.randn(3, 7)), r"up has shape .3, 7. but gate has shape .3, 8."),
    (lambda: lmkernels.swiglu(torch.randn(3, 8), torch.randn(3, 8).half()), "up has dtype"),
    (lambda: lmkernels.swiglu(torch.randn(3, 8).int(), torch.randn(3, 8).int()), "gate must be float32, bfloat16 or float16"),
    (lambda: lmkernels.swiglu(torch.tensor(1.0), torch.tensor(2.0)), "at least 1-D"),
    (lambda: lmkernels.swiglu(torch.randn(3, 8), torch.randn(3, 8), backend="cuda"), "backend must be 'auto' or 'cpu'"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
