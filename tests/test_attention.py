"""attention: C++ CPU kernel and Triton kernels (interpreter) against the float64 reference.

Tolerance (FlashAttention's rule): the kernel's max error against float64 may be at most
twice the error of PyTorch's math path computed in the same dtype, plus two units of rounding
of the dtype at the result's magnitude (at least 1: inputs are randn); flash-attention's tests
add a rounding term of the same kind (their `x + 0.3 - 0.3 - x`).
"""
import importlib
import itertools
import math
import re
import sys

import pytest
import torch

import lmkernels
from lmkernels.reference.attention import attention_reference
from lmkernels.triton import attention as triton_attention
from lmkernels.triton._common import triton_interpreted
from tests._backends import ON_GPU, uses_launcher

attention_op = importlib.import_module("lmkernels.ops.attention")  # the package's `attention` is the function


LENGTHS = (1, 17, 97, 128, 257)
WINDOWS = (None, (32, -1), (5, 7))


def make_inputs(B, H, Hkv, T, S, D, dtype, *, requires_grad=True):
    q = torch.randn(B, H, T, D, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def assert_within_pt_error(name, ours, pt, truth, dtype):
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    pt_err = (pt.double() - truth).abs().max().item()
    # Two rounding units at the result's scale (at least 1: inputs are randn): one for the
    # store, one for summing in another (equally exact) order. It matters only where the
    # sample is tiny (a single key per row) and the math path happens to round exactly.
    floor = 2 * torch.finfo(dtype).eps * max(truth.abs().max().item(), 1.0)
    assert err <= 2 * pt_err + floor, f"{name}: error {err:.3g} > 2 x math-path error {pt_err:.3g} + {floor:.3g}"


def check_lse(ours, pt, truth):
    empty = torch.isneginf(truth)
    assert torch.equal(torch.isneginf(ours), empty), "lse: rows with nothing to attend must be -inf"
    keep = ~empty
    if keep.any():
        assert_within_pt_error("lse", ours[keep], pt[keep], truth[keep], torch.float32)


def launcher_fwd_bwd(q, k, v, kw, g, glse):
    """The Triton launchers on CPU tensors (interpreter): out, lse and the gradients of
    sum(out * g) + sum(finite lse * glse)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    left, right = (-1, -1) if kw["window_size"] is None else kw["window_size"]
    args = (scale, kw["is_causal"], left, right) + ((kw["softcap"],) if kw["softcap"] else ())
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = triton_attention.attention_fwd(q, k, v, *args)
    grad_lse = None if glse is None else torch.where(torch.isfinite(lse), glse, 0.0)
    grads = triton_attention.attention_bwd(g.to(out.dtype), q, k, v, out, lse, grad_lse, *args)
    return out, lse, grads


def run_and_compare(backend, B, H, Hkv, T, S, D, dtype, is_causal, window, *, use_lse=False, softcap=0.0):
    q, k, v = make_inputs(B, H, Hkv, T, S, D, dtype)
    kw = dict(is_causal=is_causal, window_size=window, softcap=softcap)
    if uses_launcher(backend):
        g = torch.randn(B, H, T, D, dtype=dtype)
        glse = torch.randn(B, H, T) if use_lse else None
        out, lse, ours = launcher_fwd_bwd(q, k, v, kw, g, glse)
    else:
        out, lse = lmkernels.attention(q, k, v, return_lse=True, backend=backend, **kw)
        g = torch.randn_like(out)
        glse = torch.randn_like(lse) if use_lse else None
    truth_out, truth_lse = attention_reference(q, k, v, compute_dtype=torch.float64, **kw)
    pt_out, pt_lse = attention_reference(q, k, v, compute_dtype=dtype, **kw)
    _, pt32_lse = attention_reference(q, k, v, compute_dtype=torch.float32, **kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (B, H, T)
    assert_within_pt_error("out", out, pt_out, truth_out, dtype)
    check_lse(lse, pt32_lse, truth_lse)

    def grads(o, l):
        loss = (o.float() * g.float()).sum()
        if use_lse:
            loss = loss + (torch.where(torch.isfinite(l), l, 0.0) * glse).sum()
        return torch.autograd.grad(loss, (q, k, v))

    if not uses_launcher(backend):
        ours = grads(out, lse)
    # The float64 truth of the gradients: the reference's own float64 backward.
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = attention_reference(q64, k64, v64, compute_dtype=torch.float64, **kw)
    loss64 = (o64.double() * g.double()).sum()
    if use_lse:
        loss64 = loss64 + (torch.where(torch.isfinite(l64), l64, 0.0) * glse.double()).sum()
    truth = torch.autograd.grad(loss64, (q64, k64, v64))
    pt = grads(pt_out, pt_lse)
    for name, a, p, t in zip(("dq", "dk", "dv"), ours, pt, truth):
        assert a.dtype == dtype
        assert_within_pt_error(name, a, p, t, dtype)


# ------------------------------------------------------------------ C++ CPU kernel
@pytest.mark.parametrize("D", (16, 64, 80, 128))
@pytest.mark.parametrize("group", (1, 2))
@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("is_causal", (False, True))
def test_cpu_fp32_full_product(is_causal, window, group, D):
    # Every (T, S) pair of the awkward lengths, forward and gradients.
    for T, S in itertools.product(LENGTHS, LENGTHS):
        run_and_compare("cpu", 1, group, 1, T, S, D, torch.float32, is_causal, window)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("T,S", ((1, 17), (97, 257), (257, 97)))
@pytest.mark.parametrize("D", (64, 80))
@pytest.mark.parametrize("is_causal,window", ((True, None), (True, (32, -1)), (False, (5, 7))))
def test_cpu_low_precision(dtype, T, S, D, is_causal, window):
    run_and_compare("cpu", 2, 4, 2, T, S, D, dtype, is_causal, window)


@pytest.mark.parametrize("D", (16, 256))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cpu_head_dims_and_mqa(D, dtype):
    run_and_compare("cpu", 1, 4, 1, 97, 300, D, dtype, True, None)


@pytest.mark.parametrize("is_causal", (False, True))
def test_cpu_lse_gradient(is_causal):
    run_and_compare("cpu", 1, 2, 1, 97, 65, 32, torch.float32, is_causal, None, use_lse=True)


def test_cpu_large_blocks_and_long_rows():
    # Several query and key tiles per head, T != S, sliding window inside.
    run_and_compare("cpu", 1, 2, 2, 700, 1025, 64, torch.float32, True, (300, -1))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("softcap", (0.5, 5.0, 30.0))
@pytest.mark.parametrize("is_causal,window,T,S", ((False, None, 97, 1025), (True, None, 257, 97),
                                                  (True, (20, -1), 130, 130), (False, (5, 7), 1, 17)))
def test_cpu_softcap(dtype, softcap, is_causal, window, T, S):
    # softcap 0.5 saturates most scores (tanh' near 0), 30 barely touches them; GQA, several
    # key tiles (1025 keys) and empty rows (T > S causal) included.
    run_and_compare("cpu", 1, 4, 2, T, S, 64, dtype, is_causal, window, softcap=softcap, use_lse=True)


def test_softcap_matches_explicit_formula():
    """softcap against the formula written out with SDPA: scores capped, then softmax."""
    q, k, v = make_inputs(2, 4, 4, 33, 47, 32, torch.float64, requires_grad=False)
    cap, scale = 2.0, 0.4
    s = cap * torch.tanh(scale * q @ k.transpose(-1, -2) / cap)
    expected = torch.softmax(s, -1) @ v
    out = lmkernels.attention(q.float(), k.float(), v.float(), scale=scale, softcap=cap)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)
    # softcap=0 is off: the same bits as the default call.
    assert torch.equal(lmkernels.attention(q.float(), k.float(), v.float(), softcap=0.0),
                       lmkernels.attention(q.float(), k.float(), v.float()))


@pytest.mark.parametrize("softcap,error", [(-1.0, ValueError), (float("nan"), ValueError),
                                           (float("inf"), ValueError), ("2", TypeError), (True, TypeError)])
def test_softcap_argument_errors(softcap, error):
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, torch.float32, requires_grad=False)
    with pytest.raises(error, match=r"^attention: softcap must be a finite real number >= 0 \(0: off\); got"):
        lmkernels.attention(q, k, v, softcap=softcap)
    if error is ValueError:  # the op itself (what torch.compile'd code and the CUDA path reach)
        with pytest.raises(ValueError, match="attention_fwd: softcap must be a finite number >= 0"):
            torch.ops.lmkernels.attention_fwd(q, k, v, 1.0, False, -1, -1, softcap)
        with pytest.raises(ValueError, match="attention_bwd: softcap must be a finite number >= 0"):
            torch.ops.lmkernels.attention_bwd(q, q, k, v, q, q[..., 0], None, 1.0, False, -1, -1, softcap)


def test_empty_rows_give_zeros():
    # T > S causal: the first T - S queries see no key; a narrow window leaves gaps too.
    q, k, v = make_inputs(1, 2, 2, 40, 8, 16, torch.float32)
    out, lse = lmkernels.attention(q, k, v, is_causal=True, return_lse=True)
    assert torch.equal(out[:, :, :32], torch.zeros_like(out[:, :, :32]))
    assert torch.isneginf(lse[:, :, :32]).all() and torch.isfinite(lse[:, :, 32:]).all()
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.equal(q.grad[:, :, :32], torch.zeros_like(q.grad[:, :, :32]))


def test_non_contiguous_inputs():
    # (B, T, H, D) storage viewed as (B, H, T, D), as models produce it.
    q = torch.randn(2, 33, 4, 64).transpose(1, 2).requires_grad_()
    k = torch.randn(2, 50, 2, 64).transpose(1, 2).requires_grad_()
    v = torch.randn(2, 50, 2, 64).transpose(1, 2).requires_grad_()
    out = lmkernels.attention(q, k, v, is_causal=True)
    ref, _ = attention_reference(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    out.backward(torch.ones_like(out))
    ref_grads = torch.autograd.grad(attention_reference(q, k, v, is_causal=True)[0].sum(), (q, k, v))
    for a, b in zip((q.grad, k.grad, v.grad), ref_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matches_sdpa_and_default_scale():
    q, k, v = make_inputs(2, 4, 4, 64, 64, 32, torch.float32, requires_grad=False)
    for causal in (False, True):
        expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
        torch.testing.assert_close(lmkernels.attention(q, k, v, is_causal=causal), expected,
                                   atol=2e-6, rtol=2e-6)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(lmkernels.attention(q, k, v, scale=0.3), expected, atol=2e-6, rtol=2e-6)


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("backend", ("cpu", "reference"))
def test_bad_input_errors(backend):
    q, k, v = make_inputs(1, 4, 2, 8, 8, 16, torch.float32, requires_grad=False)
    cases = [
        ((q[0], k, v), {}, "4-D"),
        ((q, k.double(), v), {}, "key must be float32"),
        ((q.double(), k.double(), v.double()), {}, "float32, bfloat16 or float16"),
        ((q, k.half(), v), {}, "dtype"),
        ((q[..., :12], k[..., :12], v[..., :12]), {}, "multiple of 8"),
        ((torch.randn(1, 4, 8, 264),) * 1 + (torch.randn(1, 2, 8, 264), torch.randn(1, 2, 8, 264)), {}, "multiple of 8"),
        ((torch.randn(1, 3, 8, 16), k, v), {}, "multiple of key/value heads"),
        ((q, k, v[:, :, :4]), {}, "one shape"),
        ((q, k[..., :8], v[..., :8]), {}, "head dim"),
        ((q[:, :, :0], k, v), {}, "empty"),
        ((q, k, v), {"window_size": (-2, 0)}, "window_size"),
        ((q, k, v), {"window_size": (3,)}, "window_size"),
        ((q, k.to("meta"), v.to("meta")), {}, "is on"),
    ]
    for args, kw, msg in cases:
        with pytest.raises((ValueError, TypeError), match=msg):
            lmkernels.attention(*args, backend=backend, **kw)


def test_cpp_op_checks_its_arguments():
    q, k, v = make_inputs(1, 4, 2, 8, 8, 16, torch.float32, requires_grad=False)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kv3 = torch.randn(1, 3, 8, 16)
        torch.ops.lmkernels.attention_fwd(q, kv3, kv3, 1.0, False, -1, -1)
    with pytest.raises(ValueError, match="window"):
        torch.ops.lmkernels.attention_fwd(q, k, v, 1.0, False, -5, -1)
    # The expected shape reads as a shape ("[1, 4, 8]"; it printed as "1 4 8").
    with pytest.raises(ValueError, match=re.escape("lse must be float32 of shape [1, 4, 8]; got Double [1, 4, 8]")):
        torch.ops.lmkernels.attention_bwd(q, q, k, v, q, q[..., 0].double(), None, 1.0, False, -1, -1)
    with pytest.raises(ValueError, match="grad_out must have query's shape"):
        torch.ops.lmkernels.attention_bwd(q[:, :, :4], q, k, v, q, q[..., 0], None, 1.0, False, -1, -1)
    with pytest.raises(ValueError, match="backend must be one of"):
        lmkernels.attention(q, k, v, backend="nope")
    with pytest.raises(ValueError, match=re.escape("call lmkernels.triton.attention.attention_fwd directly")):
        torch.ops.lmkernels.attention_fwd(q, k, v, 1.0, False, -1, -1, backend="triton")
    with pytest.raises(ValueError, match="backend 'cuda' needs CUDA tensors"):
        lmkernels.attention(q, k, v, backend="cuda")


@pytest.mark.parametrize("kw,error,message", [
    (dict(scale="abc"), TypeError, "scale must be a real number (or None for 1/sqrt(D)); got 'abc' of type str"),
    (dict(window_size=5), ValueError, "window_size must be None or a (left, right) pair of ints >= -1 (-1: unbounded side); got 5"),
    (dict(window_size=("a", "b")), TypeError, "window_size must be None or a (left, right) pair of ints >= -1 (-1: unbounded side); got ('a', 'b') (left is of type str)"),
    (dict(window_size=(3, 2.5)), TypeError, "window_size must be None or a (left, right) pair of ints >= -1 (-1: unbounded side); got (3, 2.5) (right is of type float)"),
    (dict(window_size=(3, -4)), ValueError, "window_size must be None or a (left, right) pair of ints >= -1 (-1: unbounded side); got (3, -4) (right = -4)"),
])
def test_argument_errors_name_the_argument(kw, error, message):
    """Issue 9: these gave Python's own messages (float('abc'), len(5), int('a'))."""
    q, k, v = make_inputs(1, 2, 2, 8, 8, 16, torch.float32, requires_grad=False)
    with pytest.raises(error, match=r"^attention: .*" + re.escape(message)):
        lmkernels.attention(q, k, v, **kw)


@pytest.mark.parametrize("preferred", ["cuda", "triton", "cpu"])
def test_lmk_backend_does_not_break_cpu_tensors(monkeypatch, preferred):
    """LMK_BACKEND=cuda broke attention on CPU ("needs CUDA tensors"): it chooses among GPU
    kernels, and CPU tensors have one kernel."""
    q, k, v = make_inputs(1, 2, 1, 33, 20, 16, torch.float32)
    expected = lmkernels.attention(q, k, v, is_causal=True)
    expected_grads = torch.autograd.grad(expected.sum(), (q, k, v))
    monkeypatch.setenv("LMK_BACKEND", preferred)
    out = lmkernels.attention(q, k, v, is_causal=True)
    assert torch.equal(out, expected)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), expected_grads):
        assert torch.equal(a, b)


def test_backend_table_for_cuda_tensors(monkeypatch):
    """On CUDA tensors attention has one kernel, Triton: backend='cuda' is an error naming the
    choices; LMK_BACKEND=cuda (process-wide, meant for the other ops) runs Triton with a warning."""
    for table, triton in ((attention_op.FWD_TABLE, attention_op._fwd_triton),
                          (attention_op.BWD_TABLE, attention_op._bwd_triton)):
        assert table.pick("auto") is triton and table.pick("triton") is triton
        with pytest.raises(ValueError, match=re.escape("no 'cuda' kernel for this op; on CUDA tensors use one of ('auto', 'triton')")):
            table.pick("cuda")
        monkeypatch.setenv("LMK_BACKEND", "cuda")
        monkeypatch.setattr(table, "_warned", set())  # it warns once per process
        with pytest.warns(UserWarning, match="LMK_BACKEND=cuda has no kernel for this op"):
            assert table.pick("auto") is triton
        monkeypatch.delenv("LMK_BACKEND")


def test_fakes_check_shapes():
    """The fake impls (what torch.compile traces) report bad shapes instead of inventing outputs."""
    q, k, v = (t.to("meta") for t in make_inputs(1, 4, 2, 8, 8, 16, torch.float32, requires_grad=False))
    with pytest.raises(ValueError, match="key batch 2 differs from query batch 1"):
        torch.ops.lmkernels.attention_fwd(q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), 1.0, False, -1, -1)
    with pytest.raises(ValueError, match="query heads H=4 must be a multiple of key/value heads Hkv=3"):
        kv = torch.empty(1, 3, 8, 16, device="meta")
        torch.ops.lmkernels.attention_fwd(q, kv, kv, 1.0, False, -1, -1)
    with pytest.raises(ValueError, match="grad_out must have query's shape"):
        lse = torch.empty(1, 4, 8, device="meta")
        torch.ops.lmkernels.attention_bwd(q[:, :, :3], q, k, v, q, lse, None, 1.0, False, -1, -1)


@pytest.mark.parametrize("is_causal,window,use_lse,softcap", [(False, None, False, 0.0), (True, None, True, 0.0),
                                                              (False, (5, 3), False, 0.0), (True, None, True, 1.5)])
def test_double_backward_matches_reference(is_causal, window, use_lse, softcap):
    """Issue 9 item 2: grad of a function of the gradients (create_graph=True) returned zeros."""
    q, k, v = make_inputs(1, 4, 2, 19, 23, 16, torch.float32)
    kw = dict(is_causal=is_causal, window_size=window, softcap=softcap)
    g = torch.randn(1, 4, 19, 16)
    glse = torch.randn(1, 4, 19)

    def second_order(fn, inputs):
        out, lse = fn(*inputs)
        loss = (out * g).sum() + ((torch.where(torch.isfinite(lse), lse, 0.0) * glse).sum() if use_lse else 0)
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        penalty = sum((d.double() ** 2).sum() for d in first)  # a gradient penalty
        return torch.autograd.grad(penalty, inputs)

    ours = second_order(lambda *x: lmkernels.attention(*x, return_lse=True, **kw), (q, k, v))
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = second_order(lambda *x: attention_reference(*x, compute_dtype=torch.float64, **kw), inputs64)
    for name, a, b in zip(("q", "k", "v"), ours, truth):
        assert b.abs().max() > 0.1  # a real second derivative
        torch.testing.assert_close(a.double(), b, atol=1e-4 * b.abs().max().item(), rtol=1e-4, msg=name)


# ------------------------------------------------------------------ op contracts
def test_opcheck_cpu_ops():
    q, k, v = make_inputs(2, 4, 2, 19, 23, 16, torch.float32)
    for causal, left, right, cap in ((False, -1, -1, 0.0), (True, 4, -1, 0.0), (True, -1, -1, 3.0)):
        args = (q, k, v, 0.25, causal, left, right, cap)
        torch.library.opcheck(torch.ops.lmkernels.attention_fwd, args)
        out, lse = torch.ops.lmkernels.attention_fwd(*args)
        g = torch.randn_like(out)
        bargs = (g.detach(), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                 torch.randn_like(lse), 0.25, causal, left, right, cap)
        torch.library.opcheck(torch.ops.lmkernels.attention_bwd, bargs, {"backend": "cpu"})


def test_torch_compile_fullgraph():
    class Block(torch.nn.Module):
        def __init__(self, dim=32, heads=4, kv_heads=2):
            super().__init__()
            self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
            self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x):
            B, T, C = x.shape
            q, k, v = self.qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = q.view(B, T, self.heads, self.hd).transpose(1, 2)  # (B, nh, T, hd)
            k = k.view(B, T, self.kv_heads, self.hd).transpose(1, 2)
            v = v.view(B, T, self.kv_heads, self.hd).transpose(1, 2)
            y = lmkernels.attention(q, k, v, is_causal=True)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))

    model = Block()
    x = torch.randn(2, 37, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager = model(x)
    y = compiled(x)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager.sum().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ Triton (interpreter on CPU)
TRITON_CASES = [
    # (H, Hkv, T, S, D, is_causal, window)
    (2, 2, 17, 17, 16, False, None),
    (2, 1, 1, 33, 16, True, None),
    (4, 2, 97, 64, 80, True, None),
    (2, 2, 40, 97, 32, False, (10, 3)),
    (2, 2, 70, 20, 16, True, None),  # empty rows
    (2, 1, 64, 64, 24, True, (16, -1)),
]


# The launchers themselves on CPU tensors (the ops run Triton only on CUDA tensors).
needs_interpreter = pytest.mark.skipif(ON_GPU or not triton_interpreted(),
                                       reason="Triton launchers on CPU tensors need TRITON_INTERPRET=1")


@needs_interpreter
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("case", TRITON_CASES)
def test_triton_interpreter(case, dtype):
    H, Hkv, T, S, D, is_causal, window = case
    run_and_compare("triton", 1, H, Hkv, T, S, D, dtype, is_causal, window)


@needs_interpreter
def test_triton_lse_gradient():
    run_and_compare("triton", 1, 2, 1, 33, 40, 16, torch.float32, True, None, use_lse=True)


# ------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", TRITON_CASES + [(8, 2, 1000, 1000, 128, True, None),
                                                  (4, 4, 513, 2049, 256, False, (128, 64)),
                                                  (4, 1, 300, 300, 96, False, None)])
def test_triton_gpu(case, dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.set_default_device("cuda")
    try:
        H, Hkv, T, S, D, is_causal, window = case
        run_and_compare("auto", 2, H, Hkv, T, S, D, dtype, is_causal, window)
    finally:
        torch.set_default_device("cpu")


@pytest.mark.gpu
def test_op_on_cuda_runs_triton():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    q, k, v = (t.detach().cuda().requires_grad_() for t in make_inputs(2, 4, 2, 200, 150, 64, torch.bfloat16))
    out, lse = torch.ops.lmkernels.attention_fwd(q, k, v, 0.125, True, -1, -1)
    out_t, lse_t = triton_attention.attention_fwd(q.detach(), k.detach(), v.detach(), 0.125, True, -1, -1)
    assert torch.equal(out, out_t) and torch.equal(lse, lse_t)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_t = triton_attention.attention_bwd(g, q.detach(), k.detach(), v.detach(), out_t, lse_t, None,
                                             0.125, True, -1, -1)
    for a, b in zip(grads, grads_t):
        assert torch.equal(a, b)  # deterministic: same kernels, same bits
    for backend in ("auto", "triton"):
        torch.library.opcheck(torch.ops.lmkernels.attention_fwd, (q, k, v, 0.125, True, -1, -1),
                              {"backend": backend})
    with pytest.raises(ValueError, match="no 'cuda' kernel"):
        torch.ops.lmkernels.attention_fwd(q, k, v, 0.125, True, -1, -1, backend="cuda")
