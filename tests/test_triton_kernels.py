"""The Triton launchers called directly on CPU tensors (conftest turns the interpreter on):
multi-tensor launch splitting, stochastic-rounding rules, NaN/inf propagation in attention,
and the launch arguments the autotuner keys on."""
import math

import pytest
import torch

from lmkernels.reference.adamw import adamw_reference_
from lmkernels.reference.attention import attention_reference
from lmkernels.triton import adamw as tri_adamw
from lmkernels.triton import attention as tri_attention
from lmkernels.triton._common import triton_interpreted

pytestmark = pytest.mark.skipif(not triton_interpreted(), reason="needs TRITON_INTERPRET=1 (set by conftest)")


def _adamw_lists(sizes, dtype, state_dtype=None):
    state_dtype = state_dtype or dtype
    params = [torch.randn(n).to(dtype) for n in sizes]
    grads = [torch.randn(n).to(dtype) for n in sizes]
    m = [torch.randn(n).mul(0.1).to(state_dtype) for n in sizes]
    v = [torch.rand(n).mul(0.01).to(state_dtype) for n in sizes]
    steps = [torch.tensor(float(i % 5 + 1)) for i in range(len(sizes))]
    return params, grads, m, v, steps


def _launch(params, grads, m, v, steps, seed=-1, **kw):
    tri_adamw.fused_adamw(params, grads, m, v, [], [], steps, 1e-2, 0.9, 0.999, 1e-8, 0.1,
                          False, False, True, None, None, None, seed, **kw)


def test_adamw_split_many_tensors_and_multi_chunk_tensors():
    # 70 tensors (empty ones included), several spanning many chunks, with a 64-element chunk
    # streamed in 32-element tiles: every element must be updated exactly once.
    sizes = [1, 97, 0, 1025, 64, 65, 0, 300, 2, 129] * 7
    lists = _adamw_lists(sizes, torch.float32)
    ref = [[t.double() for t in lst] for lst in lists[:4]] + [lists[4]]
    _launch(*lists, block=32, chunk=64)
    adamw_reference_(*ref, lr=1e-2, weight_decay=0.1)
    for k in range(4):
        for ours, theirs in zip(lists[k], ref[k]):
            torch.testing.assert_close(ours.double(), theirs, rtol=2e-6, atol=1e-7)


def test_adamw_unaligned_tensors_take_the_masked_path():
    # Views starting one element in: addresses not 16-byte aligned.
    base = _adamw_lists([1 + 1025, 1 + 97], torch.float32)
    views = [[t[1:] for t in lst] for lst in base[:4]] + [base[4]]
    ref = [[t.double() for t in lst] for lst in views[:4]] + [views[4]]
    table = tri_adamw._work_tables(views[:4] + [[], []] + [views[4]], 64, torch.device("cpu"))
    assert table[-1] is False  # the launcher saw the misalignment
    _launch(*views, block=32, chunk=64)
    adamw_reference_(*ref, lr=1e-2, weight_decay=0.1)
    for ours, theirs in zip(views[0], ref[0]):
        torch.testing.assert_close(ours.double(), theirs, rtol=2e-6, atol=1e-7)


def test_adamw_seed_does_not_round_fp32_params():
    # Stochastic rounding is for bf16 params: fp32 params with a seed must round to nearest
    # (i.e. be the seedless result), not be quantized to bf16.
    a = _adamw_lists([97, 1025], torch.float32)
    b = [[t.clone() for t in lst] for lst in a]
    _launch(*a, seed=1234)
    _launch(*b)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    assert any((x.to(torch.bfloat16).float() != x).any() for x in a[0])


def test_adamw_rounding_hash_counts_empty_tensors_like_the_cpu_kernel():
    # The hash's tensor index is the position in the caller's list, empty tensors included, as
    # in the C++ kernels: both must produce identical bf16 bits.
    sizes = [0, 1025, 0, 97]
    ours = _adamw_lists(sizes, torch.bfloat16, torch.float32)
    cpu = [[t.clone() for t in lst] for lst in ours]
    _launch(*ours, seed=7)
    torch.ops.lmkernels.fused_adamw_(cpu[0], cpu[1], cpu[2], cpu[3], [], [], cpu[4], lr=1e-2, beta1=0.9,
                                     beta2=0.999, eps=1e-8, weight_decay=0.1, amsgrad=False,
                                     maximize=False, adam_w_mode=True, stochastic_rounding_seed=7)
    for x, y in zip(ours[0], cpu[0]):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))


def _qkv(B=1, H=2, Hkv=1, T=5, S=7, D=16, dtype=torch.float32):
    return (torch.randn(B, H, T, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype),
            torch.randn(B, Hkv, S, D, dtype=dtype))


@pytest.mark.parametrize("where", ["k_nan", "v_nan", "k_inf", "v_inf", "q_nan"])
def test_attention_nonfinite_inputs_give_nonfinite_outputs(where):
    q, k, v = _qkv()
    t = {"k": k, "v": v, "q": q}[where[0]]
    t[0, 0, 2, 3] = float("nan") if where.endswith("nan") else float("inf")
    out, lse = tri_attention.attention_fwd(q, k, v, 0.25, False, -1, -1)
    ref, _ = attention_reference(q, k, v, scale=0.25)
    # Same non-finite pattern as the reference (every row sees the poisoned key or query row).
    assert torch.equal(~torch.isfinite(out), ~torch.isfinite(ref))
    assert not torch.isfinite(out).all()
    if where[0] == "k" and where.endswith("nan"):
        assert torch.isnan(lse[0]).all()  # not -inf: the row saw keys
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5)


def test_attention_nan_scale_gives_nan():
    q, k, v = _qkv()
    out, lse = tri_attention.attention_fwd(q, k, v, float("nan"), True, -1, -1)
    assert torch.isnan(out).all()
    assert torch.isnan(lse).all()


def test_attention_inf_scale_matches_reference():
    # scale = inf: a row with a +inf score gives NaN (inf - inf); a row whose scores are all
    # -inf has no finite weight and gives 0, as in the reference.
    q, k, v = _qkv(T=64, S=64)
    out, lse = tri_attention.attention_fwd(q, k, v, float("inf"), True, -1, -1)
    ref, _ = attention_reference(q, k, v, is_causal=True, scale=float("inf"))
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.isnan(out).any()
    torch.testing.assert_close(out[~torch.isnan(ref)], ref[~torch.isnan(ref)])


def test_attention_rows_without_keys_stay_zero():
    # Causal with T > S (bottom-right aligned): the first T - S rows see no key.
    q, k, v = _qkv(T=9, S=4)
    out, lse = tri_attention.attention_fwd(q, k, v, 0.25, True, -1, -1)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (lse[:, :, :5] == float("-inf")).all()
    ref, ref_lse = attention_reference(q, k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_attention_autotune_key_buckets_lengths():
    # The autotuner keys on T_BUCKET, S_BUCKET, D, GROUP, MASK_KIND, SOFTCAP, VARLEN: lengths in
    # one power-of-two bucket share a tuned config; LEFT/RIGHT (which carry T + S) are not in the
    # key; softcap launches (own tile classes) never reuse a config tuned without it.
    def key(T, S, causal=True, softcap=0.0):
        q, k, v = _qkv(T=T, S=S)
        launch = tri_attention._fwd_launch(q, k, v, torch.empty_like(q), torch.empty(1, 2, T), 0.25,
                                           causal, -1, -1, softcap)
        args = {**launch.named_args(), **launch.kwargs}
        return tuple(args[name] for name in tri_attention._AUTOTUNE_KEY)

    assert key(1000, 1000) == key(1001, 600) == key(513, 1024)
    assert key(1000, 1000) != key(1025, 1000)
    assert key(1000, 1000) != key(1000, 1000, causal=False)
    assert key(1000, 1000) != key(1000, 1000, softcap=30.0)
    assert set(tri_attention._AUTOTUNE_KEY) <= set(tri_attention.attention_fwd_kernel.arg_names)
    assert {"T", "S", "LEFT", "RIGHT"}.isdisjoint(tri_attention._AUTOTUNE_KEY)
    assert math.isfinite(tri_attention._bucket(1))


def test_attention_tile_classes():
    """bf16/fp16 forwards at head dims that pad BLOCK_D (72 -> 128) keep more registers live than
    D = 64 or 128 and spill with the power-of-two class's tiles on sm_90; D <= 64 spills with
    D = 128's forward tile on sm_100; softcap launches have classes of their own."""
    from lmkernels.triton import attention as att
    for dtype in (torch.bfloat16, torch.float16):
        assert att._tile_class(dtype, 72) == att.LOW_PADDED_D
        assert att._tile_class(dtype, 64) == att._tile_class(dtype, 32) == att.LOW_D64
        assert att._tile_class(dtype, 128) == att.LOW_D128
        assert att._tile_class(dtype, 256) == att.LOW_D256
        assert att._tile_class(dtype, 128, softcap=True) == att.LOW_D128 + att.CAPPED
    assert att._tile_class(torch.float32, 72) == att.FP32_D128


def test_attention_backward_pads_head_dim_to_block_d():
    """The backward kernels take D == BLOCK_D: a padded head dim (72) is zero-padded on the host,
    so the dK/dV kernel never runs the masked padded-D loads that spilled on sm_90. Gradients
    still match the reference at the true head dim."""
    q, k, v = _qkv(T=33, S=40, D=72)
    g = torch.randn_like(q)
    out, lse = tri_attention.attention_fwd(q, k, v, 72 ** -0.5, True, -1, -1)
    launches = []
    real = tri_attention._bwd_launches
    def spy(*args, **kw):
        launches.append(real(*args, **kw))
        return launches[-1]
    tri_attention._bwd_launches = spy
    try:
        dq, dk, dv = tri_attention.attention_bwd(g, q, k, v, out, lse, None, 72 ** -0.5, True, -1, -1)
    finally:
        tri_attention._bwd_launches = real
    for launch in launches[0]:
        args = {**launch.named_args(), **launch.kwargs}
        assert args["D"] == args["BLOCK_D"] == 128
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
    ref, _ = attention_reference(q64, k64, v64, is_causal=True)
    truth = torch.autograd.grad((ref * g.double()).sum(), (q64, k64, v64))
    for ours, t in zip((dq, dk, dv), truth):
        torch.testing.assert_close(ours.double(), t, rtol=1e-4, atol=1e-4)
