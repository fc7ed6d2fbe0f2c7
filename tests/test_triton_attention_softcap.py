"""Softcap (Gemma 2: s = c * tanh(s / c) before masking and softmax) in the dense Triton attention
launchers, forward and exact backward, against a float64 reference; FlashAttention's 2x error rule
(tests/test_attention.py). Runs the launchers on CPU tensors under the interpreter, or on CUDA
tensors in the GPU check (LMK_TEST_GPU=1)."""
import math

import pytest
import torch

from lmkernels.reference.attention import allowed_mask, window_bounds
from lmkernels.triton import attention as tri_attention
from lmkernels.triton._common import triton_interpreted
from tests._backends import ON_GPU
from tests.test_attention import assert_within_pt_error, check_lse

pytestmark = [pytest.mark.skipif(not (ON_GPU or triton_interpreted()), reason="needs TRITON_INTERPRET=1 or a GPU")]
if ON_GPU:
    pytestmark.append(pytest.mark.gpu)
DEVICE = "cuda" if ON_GPU else "cpu"


def head_dim(D: int) -> int:
    """The head dim a case runs at. On a GPU, head dims below 64 run at 64: its kernels are the
    ones bench/gpu_check.sh precompiles (the gate's specializations), so the GPU check's short
    test step does not compile new ones serially. The interpreter runs the case's own D."""
    return max(D, 64) if ON_GPU else D


def softcap_reference(q, k, v, *, is_causal, window, scale, softcap, compute_dtype):
    """attention_reference's maths (lmkernels/reference/attention.py) with the softcap applied
    to the scores before the mask: (out in q's dtype, lse float32). Differentiable, finite
    gradients for rows that see no key."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q_, k_, v_ = (t.to(compute_dtype) for t in (q, k, v))
    k_, v_ = k_.repeat_interleave(H // Hkv, dim=1), v_.repeat_interleave(H // Hkv, dim=1)
    s = (q_ @ k_.transpose(-1, -2)) * scale
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    left, right = window_bounds(is_causal, window)
    s = torch.where(allowed_mask(T, S, left, right, device=q.device), s, float("-inf"))
    m = s.detach().amax(dim=-1, keepdim=True) if S > 0 else s.new_zeros(B, H, T, 1)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)
    l = e.sum(dim=-1, keepdim=True)
    l_safe = torch.where(l > 0, l, 1.0)
    out = (e / l_safe) @ v_
    lse = torch.where(l > 0, torch.log(l_safe) + m, float("-inf")).squeeze(-1)
    return out.to(q.dtype), lse.float()


def compare(ours, reference, inputs, g, glse, dtype):
    """ours = (out, lse, dq, dk, dv); reference(*inputs, compute_dtype) -> (out, lse). Checks
    out, lse and the gradients of sum(out * g) + sum(finite lse * glse) with the 2x rule."""
    out, lse, *grads = ours
    truth_out, truth_lse = reference(*inputs, compute_dtype=torch.float64)
    pt_out, _ = reference(*inputs, compute_dtype=dtype)
    _, pt32_lse = reference(*inputs, compute_dtype=torch.float32)
    assert out.dtype == dtype and out.shape == inputs[0].shape
    assert_within_pt_error("out", out.cpu(), pt_out.cpu(), truth_out.cpu(), dtype)
    check_lse(lse.cpu(), pt32_lse.cpu(), truth_lse.cpu())

    def grads_of(compute_dtype, cast):
        leaves = [t.detach().to(cast).requires_grad_() for t in inputs]
        o, l = reference(*leaves, compute_dtype=compute_dtype)
        loss = (o.double() * g.double()).sum()
        if glse is not None:
            loss = loss + (torch.where(torch.isfinite(l), l, 0.0).double() * glse.double()).sum()
        return torch.autograd.grad(loss, leaves)

    truth = grads_of(torch.float64, torch.float64)
    pt = grads_of(dtype, dtype)
    for name, a, p, t in zip(("dq", "dk", "dv"), grads, pt, truth):
        assert a.dtype == dtype and a.shape == t.shape, name
        assert_within_pt_error(name, a.cpu(), p.cpu(), t.cpu(), dtype)


CASES = [
    # (H, Hkv, T, S, D, is_causal, window, softcap)
    (2, 1, 97, 64, 32, True, None, 5.0),
    (2, 2, 40, 97, 72, False, (10, 3), 2.0),  # padded head dim, window
    (4, 2, 70, 20, 16, True, None, 30.0),  # empty rows (T > S causal), GQA
    (2, 2, 1, 33, 16, False, None, 0.5),  # a cap far below the scores: tanh saturates
]


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("case", CASES)
def test_softcap_forward_and_backward(case, dtype):
    H, Hkv, T, S, D, is_causal, window, softcap = case
    D = head_dim(D)
    q = torch.randn(1, H, T, D, device=DEVICE).mul(2).to(dtype)  # scores of a few units: the cap bends them
    k = torch.randn(1, Hkv, S, D, device=DEVICE).mul(2).to(dtype)
    v = torch.randn(1, Hkv, S, D, device=DEVICE).to(dtype)
    g = torch.randn(1, H, T, D, device=DEVICE)
    scale = 1 / math.sqrt(D)
    left, right = window or (-1, -1)
    args = (scale, is_causal, left, right, softcap)
    out, lse = tri_attention.attention_fwd(q, k, v, *args)
    grads = tri_attention.attention_bwd(g.to(dtype), q, k, v, out, lse, None, *args)

    def reference(q, k, v, compute_dtype):
        return softcap_reference(q, k, v, is_causal=is_causal, window=window, scale=scale, softcap=softcap,
                                 compute_dtype=compute_dtype)

    compare((out, lse, *grads), reference, (q, k, v), g, None, dtype)


def test_softcap_lse_gradient():
    q, k, v = (torch.randn(1, 2, n, head_dim(16), device=DEVICE) * 2 for n in (33, 40, 40))
    g, glse = torch.randn_like(q), torch.randn(1, 2, 33, device=DEVICE)
    args = (0.25, True, -1, -1, 3.0)
    out, lse = tri_attention.attention_fwd(q, k, v, *args)
    grads = tri_attention.attention_bwd(g, q, k, v, out, lse, glse, *args)

    def reference(q, k, v, compute_dtype):
        return softcap_reference(q, k, v, is_causal=True, window=None, scale=0.25, softcap=3.0,
                                 compute_dtype=compute_dtype)

    compare((out, lse, *grads), reference, (q, k, v), g, glse, torch.float32)


def test_softcap_zero_is_off_and_changes_nothing():
    """softcap = 0 launches the kernels without the SOFTCAP specialization and gives the same bits
    as before softcap existed (the default); a cap changes the result."""
    q, k, v = (torch.randn(1, 2, n, head_dim(16), device=DEVICE) * 3 for n in (33, 40, 40))
    launch = tri_attention._fwd_launch(q, k, v, torch.empty_like(q), torch.empty(1, 2, 33), 0.25, True, -1, -1, 0.0)
    assert launch.kwargs["SOFTCAP"] is False
    a, _ = tri_attention.attention_fwd(q, k, v, 0.25, True, -1, -1)
    b, _ = tri_attention.attention_fwd(q, k, v, 0.25, True, -1, -1, 0.0)
    c, _ = tri_attention.attention_fwd(q, k, v, 0.25, True, -1, -1, 1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_softcap_nonfinite_inputs_match_pytorch():
    # NaN in a key poisons every row (tanh(NaN) = NaN); +inf scores cap to c: finite, as in PyTorch.
    q, k, v = (torch.randn(1, 1, n, head_dim(16), device=DEVICE) for n in (8, 8, 8))
    k_nan = k.clone()
    k_nan[0, 0, 3, 0] = float("nan")
    out, lse = tri_attention.attention_fwd(q, k_nan, v, 0.25, False, -1, -1, 2.0)
    assert torch.isnan(out).all() and torch.isnan(lse).all()
    out, lse = tri_attention.attention_fwd(q, k, v, float("inf"), False, -1, -1, 2.0)
    ref, ref_lse = softcap_reference(q, k, v, is_causal=False, window=None, scale=float("inf"), softcap=2.0,
                                     compute_dtype=torch.float64)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=1e-5, atol=1e-5)
