"""rotary_embedding: C++ CPU kernel and Triton kernel (interpreter) against the float64
reference, with HF's eager apply_rotary_pos_emb in the same dtype as the baseline (tolerance
rule of tests/test_rms_norm.py: at most 2x the eager error plus two roundings)."""
import pytest
import torch

import lmkernels
from lmkernels.reference.rotary_embedding import rotary_embedding_reference
from lmkernels.triton import rotary_embedding as triton_rotary

from tests._backends import ON_GPU
from tests.test_rms_norm import assert_within_eager_error, device_of, kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cos_sin(Bc, T, D, *, interleaved=False, offset=0, dtype=torch.float32, device="cpu"):
    """HF's tables: angle (pos + offset) * base^(-2j/D), cat(freqs, freqs) (or pairwise repeat)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    pos = torch.arange(T, dtype=torch.float64)[None, :] + offset + torch.arange(Bc, dtype=torch.float64)[:, None] * 3
    freqs = pos[..., None] * inv_freq
    emb = freqs.repeat_interleave(2, dim=-1) if interleaved else torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype).to(device), emb.sin().to(dtype).to(device)


def forward(kind, q, k, cos, sin, interleaved, inverse=False):
    if kind == "cpu":
        return torch.ops.lmkernels.rotary_embedding(q, k, cos, sin, interleaved, inverse)
    return triton_rotary.rotary_embedding(q, k, cos, sin, interleaved, inverse)


def grads(q, k, cos, sin, interleaved, gq, gk, compute_dtype=None):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k)]
    oq, ok = rotary_embedding_reference(*leaves, cos, sin, interleaved, compute_dtype)
    return torch.autograd.grad((oq, ok), leaves, (gq.to(oq.dtype), gk.to(ok.dtype)))


CASES = [  # B, H, Hkv, T, D, batch-specific cos/sin
    (1, 1, 1, 1, 2, False),
    (2, 4, 2, 97, 64, True),
    (1, 3, 1, 33, 80, False),
    (2, 2, 2, 17, 128, True),
]
# The interpreter runs one Python loop per (position, head block): fewer positions.
TRITON_CASES = [(1, 1, 1, 1, 2, False), (2, 4, 2, 13, 64, True), (1, 3, 1, 5, 80, False),
                (1, 2, 2, 3, 128, True)]


def kernel_cases():
    return [(k, c) for k in kernels() for c in (TRITON_CASES if k == "triton" and not ON_GPU else CASES)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("interleaved", (False, True))
@pytest.mark.parametrize("kind,case", kernel_cases())
def test_forward_and_backward(kind, case, interleaved, dtype):
    B, H, Hkv, T, D, per_batch = case
    dev = device_of(kind)
    q = torch.randn(B, H, T, D, device=dev).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=dev).to(dtype)
    for table_dtype in {torch.float32, dtype}:
        cos, sin = cos_sin(B if per_batch else 1, T, D, interleaved=interleaved, offset=5,
                           dtype=table_dtype, device=dev)
        oq, ok = forward(kind, q, k, cos, sin, interleaved)
        eq, ek = rotary_embedding_reference(q, k, cos, sin, interleaved)
        tq, tk = rotary_embedding_reference(q, k, cos, sin, interleaved, torch.float64)
        assert oq.dtype == dtype and oq.shape == q.shape and ok.shape == k.shape
        assert_within_eager_error("q_rot", oq, eq, tq, dtype)
        assert_within_eager_error("k_rot", ok, ek, tk, dtype)
        gq, gk = torch.randn_like(oq), torch.randn_like(ok)
        dq, dk = forward(kind, gq, gk, cos, sin, interleaved, inverse=True)
        e = grads(q, k, cos, sin, interleaved, gq, gk)
        t = grads(q, k, cos, sin, interleaved, gq, gk, torch.float64)
        assert_within_eager_error("dq", dq, e[0], t[0], dtype)
        assert_within_eager_error("dk", dk, e[1], t[1], dtype)


@pytest.mark.parametrize("kind", kernels())
def test_inverse_is_the_transpose_for_any_tables(kind):
    # <R x, y> == <x, R^T y> even when the halves of cos/sin differ (not a pure rotation).
    dev = device_of(kind)
    q, k = torch.randn(2, 3, 9, 16, device=dev, dtype=torch.float64), torch.randn(2, 1, 9, 16, device=dev, dtype=torch.float64)
    cos, sin = torch.randn(2, 9, 16, device=dev), torch.randn(2, 9, 16, device=dev)
    yq, yk = torch.randn_like(q).float(), torch.randn_like(k).float()
    for interleaved in (False, True):
        rq, rk = forward(kind, q.float(), k.float(), cos, sin, interleaved)
        tq, tk = forward(kind, yq, yk, cos, sin, interleaved, inverse=True)
        lhs = (rq.double() * yq.double()).sum() + (rk.double() * yk.double()).sum()
        rhs = (q * tq.double()).sum() + (k * tk.double()).sum()
        torch.testing.assert_close(lhs, rhs, rtol=1e-5, atol=1e-5)


def test_public_function_hf_layouts_and_autograd():
    B, H, Hkv, T, D = 2, 4, 2, 11, 32
    proj_q = torch.randn(B, T, H * D, requires_grad=True)
    q = proj_q.view(B, T, H, D).transpose(1, 2)           # HF's non-contiguous (B, H, T, D)
    k = torch.randn(B, T, Hkv, D).transpose(1, 2).requires_grad_()
    cos, sin = cos_sin(B, T, D)
    for c, s in ((cos, sin), (cos[:, None], sin[:, None]), (cos[:1, :].squeeze(0), sin[:1].squeeze(0))):
        oq, ok = lmkernels.rotary_embedding(q, k, c, s)
        eq, ek = rotary_embedding_reference(q, k, c, s)
        torch.testing.assert_close(oq, eq)
        torch.testing.assert_close(ok, ek)
    gq, gk = torch.randn_like(oq), torch.randn_like(ok)
    torch.autograd.backward((oq, ok), (gq, gk))
    e = grads(proj_q.view(B, T, H, D).transpose(1, 2), k, cos[:1], sin[:1], False, gq, gk)
    torch.testing.assert_close(proj_q.grad, e[0].transpose(1, 2).reshape(B, T, H * D))
    torch.testing.assert_close(k.grad, e[1])


@pytest.mark.parametrize("kind", kernels())
def test_nan_and_inf_propagate_like_pytorch(kind):
    dev = device_of(kind)
    q = torch.randn(1, 2, 3, 8, device=dev)
    q[0, 0, 1, 2] = float("nan")
    q[0, 1, 2, 5] = float("inf")
    k = torch.randn(1, 1, 3, 8, device=dev)
    cos, sin = cos_sin(1, 3, 8, device=dev)
    oq, _ = forward(kind, q, k, cos, sin, False)
    eq, _ = rotary_embedding_reference(q, k, cos, sin)
    torch.testing.assert_close(oq, eq, equal_nan=True)


def test_opcheck():
    q = torch.randn(2, 4, 7, 16, requires_grad=True)
    k = torch.randn(2, 2, 7, 16, requires_grad=True)
    cos, sin = cos_sin(2, 7, 16)
    for interleaved in (False, True):
        torch.library.opcheck(torch.ops.lmkernels.rotary_embedding, (q, k, cos, sin, interleaved, False))
    torch.library.opcheck(torch.ops.lmkernels.rotary_embedding,
                          (q.detach().half(), k.detach().half(), cos[:1].half(), sin[:1].half(), False, True))


def test_torch_compile_fullgraph():
    B, H, T, D = 2, 2, 9, 16
    lin = torch.nn.Linear(D, 2 * H * D)
    cos, sin = cos_sin(1, T, D)

    def f(x):
        q, k = lin(x).view(B, T, 2 * H, D).transpose(1, 2).chunk(2, dim=1)
        oq, ok = lmkernels.rotary_embedding(q, k, cos, sin)
        return (oq * ok).sum(-1)

    x = torch.randn(B, T, D)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    y_eager = f(x)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    g = lin.weight.grad.clone()
    lin.zero_grad()
    y_eager.sum().backward()
    torch.testing.assert_close(g, lin.weight.grad)


@pytest.mark.parametrize("call,match", [
    (lambda: lmkernels.rotary_embedding(torch.randn(2, 4, 8), torch.randn(2, 4, 8), *cos_sin(1, 4, 8)), "q must be 4-D"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 7), torch.randn(1, 2, 4, 7), torch.randn(4, 7), torch.randn(4, 7)), "head dim D must be even"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 5, 8), *cos_sin(1, 4, 8)), r"k must be \(B, Hkv, T, D\)"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), *cos_sin(1, 3, 8)), r"cos must be \(1 or B, T, D\)"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8).half(), torch.randn(1, 2, 4, 8).half(), *cos_sin(1, 4, 8, dtype=torch.bfloat16)), "cos must be float32 or q's dtype"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8).half(), *cos_sin(1, 4, 8)), "k has dtype"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)), "cos and sin get no gradient"),
    (lambda: lmkernels.rotary_embedding(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8), *cos_sin(1, 4, 8), backend="triton"), "backend must be 'auto' or 'cpu'"),
])
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
