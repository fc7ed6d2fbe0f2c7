"""Varlen (packed sequences, FA2's layout) Triton attention launchers against a float64 reference
that attends each sequence alone: awkward lengths including 0 and 1, T != S per sequence, GQA,
causal (bottom-right per sequence), windows, softcap, fp32/bf16/fp16, gradients (and the lse
gradient); FlashAttention's 2x error rule. Interpreter on CPU tensors, or CUDA tensors in the GPU
check (LMK_TEST_GPU=1)."""
import math

import pytest
import torch

from lmkernels.triton import attention as tri_attention
from tests.test_triton_attention_softcap import DEVICE, compare, head_dim, pytestmark, softcap_reference  # noqa: F401


def cu_seqlens(lengths):
    return torch.tensor([0] + list(lengths), dtype=torch.int32, device=DEVICE).cumsum(0).to(torch.int32)


def varlen_reference(q, k, v, lens_q, lens_k, *, is_causal, window, scale, softcap, compute_dtype):
    """Each sequence through the dense reference alone: out (total_q, H, D), lse (H, total_q)."""
    outs, lses = [], []
    H = q.shape[1]
    cq, ck = [0], [0]
    for n in lens_q:
        cq.append(cq[-1] + n)
    for n in lens_k:
        ck.append(ck[-1] + n)
    for b in range(len(lens_q)):
        qb = q[cq[b]:cq[b + 1]].transpose(0, 1).unsqueeze(0)  # (1, H, Tb, D)
        kb = k[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        vb = v[ck[b]:ck[b + 1]].transpose(0, 1).unsqueeze(0)
        o, l = softcap_reference(qb, kb, vb, is_causal=is_causal, window=window, scale=scale, softcap=softcap,
                                 compute_dtype=compute_dtype)
        outs.append(o[0].transpose(0, 1))
        lses.append(l[0])
    return torch.cat(outs), (torch.cat(lses, dim=1) if lses else torch.empty(H, 0))


def run_varlen(lens_q, lens_k, H, Hkv, D, dtype, is_causal, window, softcap, use_lse=False):
    total_q, total_k = sum(lens_q), sum(lens_k)
    D = head_dim(D)
    q = torch.randn(total_q, H, D, device=DEVICE).to(dtype)
    k = torch.randn(total_k, Hkv, D, device=DEVICE).to(dtype)
    v = torch.randn(total_k, Hkv, D, device=DEVICE).to(dtype)
    g = torch.randn(total_q, H, D, device=DEVICE)
    glse = torch.randn(H, total_q, device=DEVICE) if use_lse else None
    scale = 1 / math.sqrt(D)
    left, right = window or (-1, -1)
    seq = (cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k))
    args = (scale, is_causal, left, right, softcap)
    out, lse = tri_attention.attention_varlen_fwd(q, k, v, *seq, *args)
    assert lse.shape == (H, total_q) and lse.dtype == torch.float32
    grad_lse = None if glse is None else torch.where(torch.isfinite(lse), glse, 0.0)
    grads = tri_attention.attention_varlen_bwd(g.to(dtype), q, k, v, out, lse, grad_lse, *seq, *args)

    def reference(q, k, v, compute_dtype):
        return varlen_reference(q, k, v, lens_q, lens_k, is_causal=is_causal, window=window, scale=scale,
                                softcap=softcap, compute_dtype=compute_dtype)

    compare((out, lse, *grads), reference, (q, k, v), g, glse, dtype)
    return out, lse, grads


# lengths (queries, keys) per sequence: zero-length sequences, single tokens, T != S (both ways,
# including queries without keys: empty rows), a sequence longer than one 32-row block.
LENGTHS = ([3, 0, 1, 97, 40, 0, 17], [5, 0, 1, 64, 40, 3, 0])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("is_causal,window,softcap", ((True, None, 0.0), (False, (9, 4), 0.0), (True, (20, -1), 5.0)))
def test_varlen_matches_each_sequence_alone(dtype, is_causal, window, softcap):
    run_varlen(*LENGTHS, 4, 2, 32, dtype, is_causal, window, softcap)


def test_varlen_padded_head_dim_gqa_softcap():
    run_varlen([1, 50, 0, 33], [60, 50, 2, 1], 6, 2, 72, torch.bfloat16, False, None, 3.0)


def test_varlen_lse_gradient():
    run_varlen([7, 0, 41], [30, 4, 41], 2, 1, 16, torch.float32, True, None, 0.0, use_lse=True)


def test_varlen_equals_dense_on_one_sequence():
    # One sequence: the varlen launch and the dense launch compute the same thing.
    q, k, v = (torch.randn(n, 2, head_dim(16), device=DEVICE) for n in (45, 60, 60))
    seq = (cu_seqlens([45]), cu_seqlens([60]), 45, 60)
    out, lse = tri_attention.attention_varlen_fwd(q, k, v, *seq, 0.25, True, -1, -1)
    dense_out, dense_lse = tri_attention.attention_fwd(*(t.transpose(0, 1)[None] for t in (q, k, v)),
                                                       0.25, True, -1, -1)
    torch.testing.assert_close(out, dense_out[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, dense_lse[0], rtol=1e-6, atol=1e-6)


def test_varlen_empty_batch_and_all_empty_sequences():
    H, D = 2, head_dim(16)
    for lens_q, lens_k in (([0, 0], [0, 0]), ([0, 3], [4, 0])):
        q = torch.randn(sum(lens_q), H, D, device=DEVICE)
        k, v = (torch.randn(sum(lens_k), H, D, device=DEVICE) for _ in range(2))
        seq = (cu_seqlens(lens_q), cu_seqlens(lens_k), max(lens_q), max(lens_k))
        out, lse = tri_attention.attention_varlen_fwd(q, k, v, *seq, 0.25, False, -1, -1)
        assert out.shape == q.shape and lse.shape == (H, sum(lens_q))
        assert (out == 0).all() and torch.isneginf(lse).all()  # no sequence has both queries and keys
        dq, dk, dv = tri_attention.attention_varlen_bwd(torch.ones_like(out), q, k, v, out, lse, None, *seq,
                                                        0.25, False, -1, -1)
        assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
        assert (dq == 0).all() and (dk == 0).all() and (dv == 0).all()
