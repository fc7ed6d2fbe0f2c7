"""attention (C++ CPU kernel) with NaN/inf in the inputs: non-finite in, non-finite out.

A NaN or inf in Q, K, V or the scale must reach the output (and the gradients) of every row
that attends to it, as in SDPA, so that training sees a NaN loss; rows that see no bad value
stay finite and correct; rows that see no key still give 0 with lse = -inf.

Two float64 oracles bound what the kernel may give:
  * `sliced_reference` computes each row from only the keys it may attend (masked keys are
    removed from the products, never multiplied by 0): the least non-finite pattern the maths
    allows. The kernel must be non-finite at least there.
  * `full_product_reference`, SDPA's math path: full T x S products, where a masked
    probability of 0 times an inf in V gives NaN in rows that never see it: the most. The
    kernel must be finite wherever that one is.
Where the kernel and the sliced oracle are both finite the values must agree (FlashAttention's
tolerance rule, as in test_attention.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import lmkernels
from lmkernels.reference.attention import allowed_mask, window_bounds

from tests.test_attention import assert_within_pt_error

NAN, INF = float("nan"), float("inf")

# Shapes that take the kernel through several query blocks (64 rows) and key tiles (512 keys
# at D <= 64), with GQA (two query heads per kv head).
B, H, HKV, T, S, D = 1, 2, 1, 70, 520, 16
BAD_KEY = 515  # in the second key tile; under the causal mask rows 0..64 do not see it


def sliced_reference(q, k, v, scale, is_causal, compute_dtype):
    """out (B, H, T, D) and lse (B, H, T): row i from only the keys it may attend. Each product
    takes inputs masked per (row, key), so a masked inf meets no 0 (forward or backward)."""
    Hq, Tq, Sk = q.shape[1], q.shape[2], k.shape[2]
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    left, right = window_bounds(is_causal, None)
    mask = allowed_mask(Tq, Sk, left, right)  # (T, S)
    m5 = mask[None, None, :, :, None]  # (1, 1, T, S, 1)
    k_rows = torch.where(m5, k[:, :, None], 0.0)  # (B, H, T, S, D): row i's keys
    v_rows = torch.where(m5, v[:, :, None], 0.0)
    s = (q[:, :, :, None, :] * k_rows).sum(-1) * scale  # (B, H, T, S)
    s = torch.where(mask, s, -INF)
    m = s.detach().amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(s - m)
    l = e.sum(-1, keepdim=True)
    p = e / l
    p_rows = torch.where(mask[..., None], p[..., None], 0.0)  # masked p never meets v
    out = (p_rows * v_rows).sum(-2)
    lse = (torch.log(l) + m).squeeze(-1)
    return out, lse


def full_product_reference(q, k, v, scale, is_causal):
    """SDPA's math path in float64: softmax over the masked T x S scores, then P V."""
    Hq, Tq, Sk = q.shape[1], q.shape[2], k.shape[2]
    q, k, v = (t.double() for t in (q, k, v))
    k = k.repeat_interleave(Hq // k.shape[1], dim=1)
    v = v.repeat_interleave(Hq // v.shape[1], dim=1)
    mask = allowed_mask(Tq, Sk, *window_bounds(is_causal, None))
    s = torch.where(mask, (q @ k.transpose(-1, -2)) * scale, -INF)
    return torch.softmax(s, dim=-1) @ v, torch.logsumexp(s, dim=-1)


def make_case(case, dtype):
    """q, k, v with one bad value (or a bad scale) and the scale to use."""
    g = torch.Generator().manual_seed(1234)
    q, k, v = (torch.randn(B, h, n, D, generator=g) for h, n in ((H, T), (HKV, S), (HKV, S)))
    scale = 1.0 / math.sqrt(D)
    if case == "k_nan":
        k[0, 0, BAD_KEY, 3] = NAN
    elif case == "k_inf":  # scores +inf (NaN rows) or -inf (weight 0) by the sign of q[..., 3]
        k[0, 0, BAD_KEY, 3] = INF
    elif case == "k_neginf_first_tile":  # every score of the first key tile is -inf
        q[..., 0] = q[..., 0].abs() + 0.1
        k[0, 0, :512, 0] = -INF
    elif case == "v_nan":
        v[0, 0, BAD_KEY, 5] = NAN
    elif case == "v_inf":
        v[0, 0, BAD_KEY, 5] = INF
    elif case == "q_nan":
        q[0, 1, 66, 2] = NAN
    elif case == "scale_nan":
        scale = NAN
    elif case == "scale_inf":
        scale = INF
    else:
        raise ValueError(case)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)], scale


def forward_and_grads(fn, q, k, v, g):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    grads = torch.autograd.grad((out.double() * g).sum(), (q, k, v))
    return [out.detach(), lse.detach(), *grads]


CASES = ("k_nan", "k_inf", "k_neginf_first_tile", "v_nan", "v_inf", "q_nan", "scale_nan",
         "scale_inf")
NAMES = ("out", "lse", "dq", "dk", "dv")


@pytest.mark.parametrize("is_causal", (False, True))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("case", CASES)
def test_nonfinite_reaches_rows_that_see_it(case, dtype, is_causal):
    (q, k, v), scale = make_case(case, dtype)
    g = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = forward_and_grads(lambda q, k, v: lmkernels.attention(
        q, k, v, is_causal=is_causal, scale=scale, return_lse=True, backend="cpu"), q, k, v, g)
    least = forward_and_grads(lambda q, k, v: sliced_reference(
        q, k, v, scale, is_causal, torch.float64), q, k, v, g)
    same_dtype = forward_and_grads(lambda q, k, v: sliced_reference(
        q, k, v, scale, is_causal, dtype), q, k, v, g)
    most = forward_and_grads(lambda q, k, v: full_product_reference(
        q, k, v, scale, is_causal), q, k, v, g)
    for name, o, lo, pt, hi in zip(NAMES, ours, least, same_dtype, most):
        bad_o, bad_lo, bad_hi = (~torch.isfinite(t) for t in (o, lo, hi))
        if name == "out" and case != "k_neginf_first_tile":
            assert bad_lo.any(), "the case must make some output non-finite"
        missed = bad_lo & ~bad_o
        assert not missed.any(), (
            f"{name}: {int(missed.sum())} values finite where the input makes them non-finite, "
            f"e.g. at {tuple(missed.nonzero()[0].tolist())}")
        extra = bad_o & ~bad_hi
        assert not extra.any(), (
            f"{name}: {int(extra.sum())} values non-finite where even the full-product reference "
            f"is finite, e.g. at {tuple(extra.nonzero()[0].tolist())}")
        keep = ~bad_o & ~bad_lo & torch.isfinite(pt)
        if keep.any():
            assert_within_pt_error(name, o[keep], pt[keep], lo[keep],
                                   torch.float32 if name == "lse" else dtype)


@pytest.mark.parametrize("is_causal", (False, True))
def test_issue_repro_matches_sdpa(is_causal):
    """The issue's repro: a NaN in K gives NaN (not zeros with lse = -inf) where SDPA does."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 1, 4, 8).unbind(0)
    k[0, 0, 2, 0] = NAN
    out, lse = lmkernels.attention(q, k, v, is_causal=is_causal, return_lse=True, backend="cpu")
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert torch.equal(torch.isnan(out), torch.isnan(sdpa))
    sees_bad_key = torch.tensor([not is_causal or i >= 2 for i in range(4)])
    assert torch.isnan(lse[0, 0]).tolist() == sees_bad_key.tolist()
    assert torch.isnan(out[0, 0]).all(dim=-1).tolist() == sees_bad_key.tolist()


def test_rows_without_keys_still_give_zeros_next_to_nan_rows():
    """A window that leaves the first rows without keys: those stay 0 / -inf (and get zero
    gradients) while rows that see a NaN key turn NaN."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 8) for n in (6, 4, 4))  # T > S, causal: rows 0, 1 see nothing
    k[0, 0, 1, 0] = NAN
    for t in (q, k, v):
        t.requires_grad_()
    out, lse = lmkernels.attention(q, k, v, is_causal=True, return_lse=True, backend="cpu")
    assert torch.equal(out[0, 0, :2], torch.zeros(2, 8))
    assert torch.isneginf(lse[0, 0, :2]).all()
    assert torch.isnan(out[0, 0, 3:]).all() and torch.isnan(lse[0, 0, 3:]).all()
    assert torch.isfinite(out[0, 0, 2]).all()  # row 2 sees key 0 only
    dq, = torch.autograd.grad(out.sum(), (q,))
    assert torch.equal(dq[0, 0, :2], torch.zeros(2, 8))
    # (Row 2's dQ may be NaN in column 0: its dS of 0 meets the NaN key in dS K, as in SDPA.)
    assert torch.isnan(dq[0, 0, 3:]).all()
