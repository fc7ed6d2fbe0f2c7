"""attention_varlen (C++ CPU kernel) against a float64 reference that loops over the sequences.

The reference (lmkernels/reference/attention_varlen.py) attends each sequence alone with
explicit (T, S) masks; tolerances follow FlashAttention's rule as in test_attention.py (at most
twice the error of PyTorch's math path in the same dtype, plus two rounding units).
"""
import importlib
import random
import re

import pytest
import torch

import lmkernels
from lmkernels.reference.attention import attention_reference
from lmkernels.reference.attention_varlen import attention_varlen_reference
from tests.test_attention import assert_within_pt_error, check_lse

varlen_op = importlib.import_module("lmkernels.ops.attention_varlen")


def cu_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)


def make(lens_q, lens_k, H, Hkv, D, dtype, requires_grad=True):
    q = torch.randn(sum(lens_q), H, D, dtype=dtype)
    k = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    v = torch.randn(sum(lens_k), Hkv, D, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def run_and_compare(lens_q, lens_k, H, Hkv, D, dtype, *, is_causal=False, window=None, softcap=0.0,
                    use_lse=False, deterministic=True):
    q, k, v = make(lens_q, lens_k, H, Hkv, D, dtype)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    kw = dict(is_causal=is_causal, window_size=window, softcap=softcap)
    out, lse = lmkernels.attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_lse=True,
                                          deterministic=deterministic, **kw)
    assert out.dtype == dtype and out.shape == q.shape and lse.shape == (H, q.shape[0])
    truth_out, truth_lse = attention_varlen_reference(q, k, v, cu_q, cu_k, compute_dtype=torch.float64, **kw)
    pt_out, pt_lse = attention_varlen_reference(q, k, v, cu_q, cu_k, compute_dtype=dtype, **kw)
    _, pt32_lse = attention_varlen_reference(q, k, v, cu_q, cu_k, compute_dtype=torch.float32, **kw)
    if q.shape[0] == 0:
        return
    assert_within_pt_error("out", out, pt_out, truth_out, dtype)
    check_lse(lse, pt32_lse, truth_lse)

    g = torch.randn_like(out, dtype=torch.float32)
    glse = torch.randn_like(lse) if use_lse else None

    def grads(o, l, inputs):
        loss = (o.double() * g.double()).sum()
        if use_lse:
            loss = loss + (torch.where(torch.isfinite(l), l, 0.0).double() * glse.double()).sum()
        if not loss.requires_grad:  # no row sees a key: the references build no graph
            return (None,) * len(inputs)
        return torch.autograd.grad(loss, inputs, allow_unused=True)

    ours = grads(out, lse, (q, k, v))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64, l64 = attention_varlen_reference(q64, k64, v64, cu_q, cu_k, compute_dtype=torch.float64, **kw)
    truth = grads(o64, l64, (q64, k64, v64))
    pt = grads(pt_out, pt_lse, (q, k, v))
    for name, a, p, t, x in zip(("dq", "dk", "dv"), ours, pt, truth, (q, k, v)):
        if x.shape[0] == 0:
            continue
        # A tensor no row reaches (every sequence empty on the other side) gets no gradient
        # from the references: zeros.
        p = torch.zeros_like(x) if p is None else p
        t = torch.zeros_like(x, dtype=torch.float64) if t is None else t
        assert a.dtype == dtype
        assert_within_pt_error(name, a, p, t, dtype)


def random_lengths(rng, B, high):
    """Heavy-ish mix: zeros, ones and longer sequences."""
    return [rng.choice((0, 1, rng.randint(2, high), rng.randint(2, high // 4 + 2))) for _ in range(B)]


# ------------------------------------------------------------------ fuzz
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("seed", range(8))
def test_fuzz_against_reference(dtype, seed):
    rng = random.Random(seed * 31 + {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype])
    torch.manual_seed(seed)
    B = rng.randint(1, 6)
    lens_q = random_lengths(rng, B, 150)
    self_attention = rng.random() < 0.5
    lens_k = lens_q if self_attention else random_lengths(rng, B, 150)
    if sum(lens_q) == 0:
        lens_q[0] = 1
    H, Hkv = rng.choice(((2, 2), (4, 1), (4, 2), (3, 1)))
    D = rng.choice((16, 64, 80))
    is_causal = rng.random() < 0.6
    window = rng.choice((None, None, (16, -1), (5, 7), (0, 0)))
    softcap = rng.choice((0.0, 0.0, 2.0, 20.0))
    run_and_compare(lens_q, lens_k, H, Hkv, D, dtype, is_causal=is_causal, window=window, softcap=softcap,
                    use_lse=rng.random() < 0.5)


def test_long_sequences_several_tiles():
    # Several 64-row query blocks and 512-key tiles in one sequence, next to tiny ones; T != S.
    run_and_compare([300, 1, 0, 90], [600, 3, 5, 0], 2, 1, 64, torch.float32, is_causal=True,
                    window=(200, -1), use_lse=True)


def test_zero_and_one_lengths_only():
    run_and_compare([0, 1, 0, 1, 1], [1, 0, 0, 1, 2], 2, 1, 16, torch.float32, is_causal=True)


def test_all_sequences_empty():
    q, k, v = make([0, 0], [3, 0], 2, 2, 16, torch.float32)
    out, lse = lmkernels.attention_varlen(q, k, v, cu_of([0, 0]), cu_of([3, 0]), 0, 3, return_lse=True)
    assert out.shape == (0, 2, 16) and lse.shape == (2, 0)
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
    assert torch.equal(dk, torch.zeros_like(k)) and torch.equal(dv, torch.zeros_like(v))


def test_rows_without_keys_give_zero_and_neg_inf():
    # Sequence 0 has no keys; sequence 1 is causal with T > S (its first 3 queries see nothing).
    q, k, v = make([4, 5], [0, 2], 2, 2, 16, torch.float32)
    out, lse = lmkernels.attention_varlen(q, k, v, cu_of([4, 5]), cu_of([0, 2]), 5, 2, is_causal=True,
                                          return_lse=True)
    empty = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.isneginf(lse[:, empty]).all() and torch.isfinite(lse[:, ~empty]).all()
    out.sum().backward()
    assert torch.equal(q.grad[empty], torch.zeros_like(q.grad[empty]))


def test_matches_dense_attention_per_sequence():
    """attention_varlen is lmkernels.attention on each sequence alone (same core, same tiles)."""
    lens_q, lens_k = [37, 200, 1], [50, 130, 9]
    q, k, v = make(lens_q, lens_k, 4, 2, 32, torch.float32)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    kw = dict(is_causal=True, window_size=(40, -1), softcap=10.0)
    out = lmkernels.attention_varlen(q, k, v, cu_q, cu_k, 200, 130, **kw)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    for b in range(3):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        qb, kb, vb = (t[s].transpose(0, 1)[None].detach().requires_grad_() for t, s in ((q, qs), (k, ks), (v, ks)))
        ob = lmkernels.attention(qb, kb, vb, **kw)
        torch.testing.assert_close(out[qs], ob[0].transpose(0, 1), atol=1e-6, rtol=1e-6)
        dense_grads = torch.autograd.grad(ob, (qb, kb, vb), g[qs].transpose(0, 1)[None])
        for a, d, s in zip(grads, dense_grads, (qs, ks, ks)):
            torch.testing.assert_close(a[s], d[0].transpose(0, 1), atol=1e-6, rtol=1e-6)


def test_no_attention_across_sequences():
    """Changing one document's keys and values changes no other document's output."""
    lens = [20, 33, 15]
    q, k, v = make(lens, lens, 2, 2, 16, torch.float32, requires_grad=False)
    cu = cu_of(lens)
    out = lmkernels.attention_varlen(q, k, v, cu, cu, 33, 33, is_causal=True)
    k2, v2 = k.clone(), v.clone()
    k2[20:53] = torch.randn(33, 2, 16)
    v2[20:53] = 100.0
    out2 = lmkernels.attention_varlen(q, k2, v2, cu, cu, 33, 33, is_causal=True)
    assert torch.equal(out[:20], out2[:20]) and torch.equal(out[53:], out2[53:])
    assert not torch.equal(out[20:53], out2[20:53])


def test_non_contiguous_inputs():
    # q, k, v split from one packed qkv projection (total, 3, H, D): row stride 3 * H * D.
    lens = [30, 70]
    qkv = torch.randn(100, 3, 4, 32, requires_grad=True)
    q, k, v = qkv.unbind(1)
    cu = cu_of(lens)
    out = lmkernels.attention_varlen(q, k, v, cu, cu, 70, 70, is_causal=True)
    expected, _ = attention_varlen_reference(q, k, v, cu, cu, is_causal=True, compute_dtype=torch.float64)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), qkv)
    (grad_ref,) = torch.autograd.grad(expected.sum(), qkv)
    torch.testing.assert_close(grad, grad_ref.float(), atol=1e-5, rtol=1e-5)


def test_deterministic_flag_same_gradients_on_cpu():
    lens = [40, 17]
    q, k, v = make(lens, lens, 4, 2, 16, torch.float32)
    cu = cu_of(lens)
    grads = []
    for det in (True, False):
        out = lmkernels.attention_varlen(q, k, v, cu, cu, 40, 40, is_causal=True, deterministic=det)
        grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_same_bits_for_any_thread_count():
    """Threads take tasks dynamically, but each task owns its outputs: the bits do not depend on
    how many threads run (or on which thread ran what)."""
    lens = [150, 0, 1, 77, 5]
    q, k, v = make(lens, lens, 4, 2, 32, torch.float32)
    cu = cu_of(lens)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out = lmkernels.attention_varlen(q, k, v, cu, cu, 150, 150, is_causal=True)
            results.append((out,) + torch.autograd.grad(out.square().sum(), (q, k, v)))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("deterministic", (True, False))
def test_double_backward_matches_reference(deterministic):
    lens_q, lens_k = [7, 0, 12], [9, 4, 12]
    q, k, v = make(lens_q, lens_k, 4, 2, 16, torch.float32)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    kw = dict(is_causal=True, softcap=3.0)
    glse = torch.randn(4, 19)

    def second_order(fn, inputs):
        out, lse = fn(*inputs)
        loss = out.square().sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * glse).sum()
        first = torch.autograd.grad(loss, inputs, create_graph=True)
        return torch.autograd.grad(sum((d.double() ** 2).sum() for d in first), inputs)

    ours = second_order(lambda *x: lmkernels.attention_varlen(*x, cu_q, cu_k, 12, 12, return_lse=True,
                                                              deterministic=deterministic, **kw), (q, k, v))
    inputs64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    truth = second_order(lambda *x: attention_varlen_reference(*x, cu_q, cu_k, compute_dtype=torch.float64, **kw),
                         inputs64)
    for name, a, b in zip(("q", "k", "v"), ours, truth):
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a.double(), b, atol=1e-4 * b.abs().max().item(), rtol=1e-4, msg=name)


# ------------------------------------------------------------------ errors
def _good():
    q, k, v = make([3, 5], [4, 4], 4, 2, 16, torch.float32, requires_grad=False)
    return q, k, v, cu_of([3, 5]), cu_of([4, 4])


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


BAD_CU_SEQLENS = [
    # (cu_seqlens_q, cu_seqlens_k, max_q, max_k, error, message)
    (torch.tensor([0, 3, 8]), None, 5, 4, TypeError, "cu_seqlens_q must be int32; got Long"),
    (None, torch.tensor([0, 4, 8], dtype=torch.float32), 5, 4, TypeError, "cu_seqlens_k must be int32; got Float"),
    (_i32([[0, 3, 8]]), _i32([[0, 4, 8]]), 5, 4, ValueError, "cu_seqlens_q must be a 1-D tensor (B + 1,); got shape [1, 3]"),
    (_i32([8]), _i32([8]), 8, 8, ValueError, "cu_seqlens_q must hold B + 1 >= 2 entries (B >= 1 sequences); got shape [1]"),
    (_i32([1, 3, 8]), None, 5, 4, ValueError, "cu_seqlens_q must start at 0; got cu_seqlens_q[0] = 1"),
    (None, _i32([0, 5, 4, 8]), 5, 5, ValueError, "one entry per sequence + 1; got 3 and 4"),
    (_i32([0, 5, 3, 8]), _i32([0, 4, 4, 8]), 5, 4, ValueError,
     "cu_seqlens_q must be non-decreasing; got cu_seqlens_q[1] = 5 > cu_seqlens_q[2] = 3"),
    (_i32([0, 3, 7]), None, 5, 4, ValueError, "the last entry of cu_seqlens_q must equal query.size(0) = 8; got 7"),
    (None, _i32([0, 4, 9]), 5, 5, ValueError, "the last entry of cu_seqlens_k must equal key.size(0) = 8; got 9"),
    (None, None, 4, 4, ValueError, "max_seqlen_q = 4 is smaller than sequence 1's length 5"),
    (None, None, 5, 3, ValueError, "max_seqlen_k = 3 is smaller than sequence 0's length 4"),
    (None, _i32([0, 4, 8]).to("meta"), 5, 4, ValueError, "cu_seqlens_k is on meta but query is on cpu"),
]


@pytest.mark.parametrize("cu_q,cu_k,max_q,max_k,error,message", BAD_CU_SEQLENS)
def test_bad_cu_seqlens(cu_q, cu_k, max_q, max_k, error, message):
    q, k, v, good_q, good_k = _good()
    cu_q = good_q if cu_q is None else cu_q
    cu_k = good_k if cu_k is None else cu_k
    with pytest.raises(error, match=re.escape(message)):
        lmkernels.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k)
    # The op's backward checks the same (its own name in the message).
    lse = torch.zeros(4, 8)
    with pytest.raises(error, match="attention_varlen_bwd: .*" + re.escape(message)):
        torch.ops.lmkernels.attention_varlen_bwd(q, q, k, v, q, lse, None, cu_q, cu_k, max_q, max_k, 0.25, False,
                                                 -1, -1, 0.0, True)


@pytest.mark.parametrize("kw,args,error,message", [
    ({}, dict(max_seqlen_q=-1), ValueError, "max_seqlen_q must be an int >= 0 (the longest sequence); got -1"),
    ({}, dict(max_seqlen_k=4.0), TypeError, "max_seqlen_k must be an int >= 0 (the longest sequence); got 4.0"),
    ({}, dict(cu_seqlens_q=[0, 3, 8]), TypeError, "cu_seqlens_q must be a Tensor; got list"),
    (dict(softcap=-2.0), {}, ValueError, "softcap must be a finite real number >= 0 (0: off); got -2.0"),
    (dict(softcap=float("nan")), {}, ValueError, "softcap must be a finite real number >= 0 (0: off); got nan"),
    (dict(softcap=float("inf")), {}, ValueError, "softcap must be a finite real number >= 0 (0: off); got inf"),
    (dict(window_size=(-3, 0)), {}, ValueError, "window_size must be None or a (left, right) pair"),
    (dict(scale="x"), {}, TypeError, "scale must be a real number"),
    ({}, dict(query=torch.randn(8, 4, 12), key=torch.randn(8, 2, 12), value=torch.randn(8, 2, 12)), ValueError, "head dim D must be a multiple of 8 in [8, 256]; got 12"),
    ({}, dict(query=torch.randn(8, 3, 16)), ValueError, "query heads H=3 must be a multiple of key/value heads Hkv=2"),
    ({}, dict(query=torch.randn(1, 8, 4, 16)), ValueError, "query must be 3-D (total, H, D); got shape [1, 8, 4, 16]"),
    ({}, dict(query=torch.randn(8, 4, 16).double()), TypeError, "query must be float32, bfloat16 or float16"),
    ({}, dict(value=torch.randn(8, 2, 8)), ValueError, "key and value must have one shape"),
])
def test_argument_errors(kw, args, error, message):
    q, k, v, cu_q, cu_k = _good()
    call = dict(query=q, key=k, value=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=5, max_seqlen_k=4)
    call.update(args)
    with pytest.raises(error, match=r"^attention_varlen(_fwd)?: .*" + re.escape(message)):
        lmkernels.attention_varlen(*call.values(), **kw)


def test_op_checks_max_seqlen_sign():
    q, k, v, cu_q, cu_k = _good()
    with pytest.raises(ValueError, match=re.escape("attention_varlen_fwd: max_seqlen_k must be >= 0; got -1")):
        torch.ops.lmkernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, 5, -1, 0.25, False, -1, -1, 0.0)
    with pytest.raises(ValueError, match=re.escape("attention_varlen_fwd: softcap must be a finite number >= 0")):
        torch.ops.lmkernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, 5, 4, 0.25, False, -1, -1, -1.0)


def test_backend_errors_on_cpu():
    q, k, v, cu_q, cu_k = _good()
    with pytest.raises(ValueError, match=re.escape("call lmkernels.triton.attention.attention_varlen_fwd directly")):
        lmkernels.attention_varlen(q, k, v, cu_q, cu_k, 5, 4, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        lmkernels.attention_varlen(q, k, v, cu_q, cu_k, 5, 4, backend="nope")


def test_bwd_op_checks_lse():
    q, k, v, cu_q, cu_k = _good()
    with pytest.raises(ValueError, match=re.escape("lse must be float32 of shape (H, total_q) = [4, 8]")):
        torch.ops.lmkernels.attention_varlen_bwd(q, q, k, v, q, torch.zeros(8, 4), None, cu_q, cu_k, 5, 4, 0.25,
                                                 False, -1, -1, 0.0, True)


def test_reference_backend_matches():
    q, k, v, cu_q, cu_k = _good()
    out = lmkernels.attention_varlen(q, k, v, cu_q, cu_k, 5, 4, is_causal=True, softcap=4.0)
    ref = lmkernels.attention_varlen(q, k, v, cu_q, cu_k, 5, 4, is_causal=True, softcap=4.0, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6)


def test_backend_table_for_cuda_tensors():
    for table, triton in ((varlen_op.FWD_TABLE, varlen_op._fwd_triton), (varlen_op.BWD_TABLE, varlen_op._bwd_triton)):
        assert table.pick("auto") is triton and table.pick("triton") is triton
        with pytest.raises(ValueError, match="no 'cuda' kernel for this op"):
            table.pick("cuda")


# ------------------------------------------------------------------ op contracts
def test_fakes_check_shapes():
    q, k, v, cu_q, cu_k = (t.to("meta") for t in _good())
    out, lse = torch.ops.lmkernels.attention_varlen_fwd(q, k, v, cu_q, cu_k, 5, 4, 0.25, True, -1, -1, 0.0)
    assert out.shape == (8, 4, 16) and lse.shape == (4, 8) and lse.dtype == torch.float32
    with pytest.raises(ValueError, match="query heads H=4 must be a multiple of key/value heads Hkv=3"):
        kv = torch.empty(8, 3, 16, device="meta")
        torch.ops.lmkernels.attention_varlen_fwd(q, kv, kv, cu_q, cu_k, 5, 4, 0.25, True, -1, -1, 0.0)
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        torch.ops.lmkernels.attention_varlen_fwd(q, k, v, cu_q.long(), cu_k, 5, 4, 0.25, True, -1, -1, 0.0)


def test_opcheck_cpu_ops():
    lens_q, lens_k = [5, 0, 14], [7, 3, 14]
    q, k, v = make(lens_q, lens_k, 4, 2, 16, torch.float32)
    cu_q, cu_k = cu_of(lens_q), cu_of(lens_k)
    for causal, left, right, cap in ((True, 4, -1, 2.5),):  # one config: opcheck is slow
        args = (q, k, v, cu_q, cu_k, 14, 14, 0.25, causal, left, right, cap)
        torch.library.opcheck(torch.ops.lmkernels.attention_varlen_fwd, args)
        out, lse = torch.ops.lmkernels.attention_varlen_fwd(*args)
        bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(),
                 torch.where(torch.isfinite(lse), torch.randn_like(lse), 0.0), cu_q, cu_k, 14, 14, 0.25, causal,
                 left, right, cap, True)
        torch.library.opcheck(torch.ops.lmkernels.attention_varlen_bwd, bargs, {"backend": "cpu"})


def test_torch_compile_fullgraph():
    class PackedBlock(torch.nn.Module):
        def __init__(self, dim=32, heads=4, kv_heads=2):
            super().__init__()
            self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
            self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.hd)
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, x, cu, max_len: int):  # x (total, C): packed documents
            q, k, v = self.qkv(x).split([self.heads * self.hd, self.kv_heads * self.hd, self.kv_heads * self.hd], -1)
            q = q.view(-1, self.heads, self.hd)  # (total, nh, hd)
            k = k.view(-1, self.kv_heads, self.hd)
            v = v.view(-1, self.kv_heads, self.hd)
            y = lmkernels.attention_varlen(q, k, v, cu, cu, max_len, max_len, is_causal=True, softcap=5.0)
            return self.proj(y.reshape(x.shape[0], -1))

    model = PackedBlock()
    x = torch.randn(45, 32)
    cu = cu_of([10, 0, 30, 5])
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    y_eager = model(x, cu, 30)
    y = compiled(x, cu, 30)
    torch.testing.assert_close(y, y_eager)
    y.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y_eager.sum().backward()
    for a, b in zip(grads, (p.grad for p in model.parameters())):
        torch.testing.assert_close(a, b)


def test_dense_reference_is_used_per_sequence():
    """The varlen reference itself: one sequence equals the dense reference."""
    q, k, v = make([9], [13], 2, 1, 16, torch.float64, requires_grad=False)
    out, lse = attention_varlen_reference(q, k, v, cu_of([9]), cu_of([13]), is_causal=True)
    dense, dense_lse = attention_reference(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                           is_causal=True)
    assert torch.equal(out, dense[0].transpose(0, 1)) and torch.equal(lse, dense_lse[0])
