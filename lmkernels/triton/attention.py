"""FlashAttention-2 kernels: forward, backward preprocess, backward dK/dV and dQ.

Shapes: Q, O, dO (B, H, T, D); K, V, dK, dV (B, Hkv, S, D); LSE, delta (B, H, T) fp32; any
strides (passed in), H = GROUP * Hkv (head h reads kv head h // GROUP: GQA without copies).
Mask (off = S - T, bottom-right alignment): query i sees key j iff
    i + off - LEFT <= j <= i + off + RIGHT
(an unbounded side is passed as LEFT or RIGHT = T + S, so the same code covers every case).
Forward, per (BLOCK_M query rows, head), scores in the log2 domain (qk_scale = scale*log2 e):
    s = qk_scale * q k^T,  m' = max(m, rowmax s),  p = 2^(s - m'),
    l = l 2^(m - m') + rowsum p,  acc = acc 2^(m - m') + p v;
    out = acc / l,  lse = ln 2 * (m + log2 l)   (a row that sees nothing: out = 0, lse = -inf)
Backward (recomputing p = 2^(qk_scale q k^T - log2e * lse)), delta = rowsum(dO * O) - dlse:
    dV = sum_i p^T dO,  dP = dO V^T,  dS = p (dP - delta),
    dK = scale * sum_i dS^T Q,  dQ = scale * sum_j dS K.
dK/dV programs own one kv block (looping over the query heads of their group and all query
blocks), dQ programs own one query block: no atomics, deterministic. Key blocks a query
block cannot see are never visited; blocks entirely inside the mask skip the masking.
D: any multiple of 8 up to 256, padded to the power of two BLOCK_D with masked loads.
Under the CPU interpreter (UPCAST) inputs are upcast to fp32 right after loading. fp32
inputs use IEEE fp32 dots (DOT_PREC "ieee", not TF32), bf16/fp16 the tensor cores.
"""

import torch
import triton
import triton.language as tl

from lmkernels.reference.attention import window_bounds
from lmkernels.triton._common import cast_for_store, tl_dtype, triton_interpreted

LOG2E = 1.4426950408889634


def _configs(shapes, big_d_shapes):
    """Autotune configs (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter gets one.
    Large head dims (BLOCK_D 256) get smaller tiles so K/V stages fit in shared memory."""
    if triton_interpreted():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BIG_D": big}, num_warps=w, num_stages=st)
            for big, lst in ((False, shapes), (True, big_d_shapes)) for m, n, w, st in lst]


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    big = block_d is not None and block_d > 128
    return [c for c in configs if c.kwargs.get("BIG_D", big) == big] or configs


_AUTOTUNE_KEY = ["T", "S", "D", "GROUP", "LEFT", "RIGHT"]
# H100, bf16: 128 x 128 tiles with 8 warps for the forward (FlashAttention-2 / Triton tutorial
# choices); the backward splits into narrow-M dK/dV and narrow-N dQ programs. Two configs per
# head-dim class keep first-call compile + tuning short (the GPU check has ~90 s).
_FWD_CONFIGS = _configs([(128, 128, 8, 3), (128, 64, 4, 3)], [(64, 64, 4, 2), (64, 32, 4, 2)])
# D = 256 backward: dK, dV (or dQ) accumulators of 32 x 256 fp32 already fill the registers.
_DKDV_CONFIGS = _configs([(64, 128, 8, 3), (32, 128, 4, 3)], [(32, 32, 8, 1), (16, 32, 4, 1)])
_DQ_CONFIGS = _configs([(128, 64, 8, 3), (128, 32, 4, 3)], [(32, 32, 8, 1), (64, 32, 8, 1)])


@triton.jit
def _kv_range(m0, T, S, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks seen by query rows [m0, m0 + BLOCK_M): [lo, hi) all touched (BLOCK_N
    aligned lo) and [full_lo, full_hi) those needing no mask (every row sees every key, all
    keys < S). Rows >= T are padding: they only make the mask-free range smaller."""
    off = S - T
    m_last = m0 + BLOCK_M - 1
    lo = (tl.maximum(m0 + off - LEFT, 0) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(m_last + off + RIGHT + 1, S)
    full_lo = tl.cdiv(tl.maximum(m_last + off - LEFT, 0), BLOCK_N) * BLOCK_N
    full_hi = (tl.minimum(m0 + off + RIGHT + 1, S) // BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, hi, full_lo, full_hi


@triton.jit
def _allowed(offs_m, offs_n, T, S, LEFT, RIGHT):
    """(BLOCK_M, BLOCK_N) bool: the attention mask plus the bounds of T and S."""
    off = S - T
    ok = (offs_m[:, None] < T) & (offs_n[None, :] < S)
    ok = ok & (offs_n[None, :] >= offs_m[:, None] + off - LEFT)
    ok = ok & (offs_n[None, :] <= offs_m[:, None] + off + RIGHT)
    return ok


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, start, end,
               T, S, D, LEFT, RIGHT, qk_scale,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        # Mask-free blocks lie inside [0, S): on GPU with D == BLOCK_D their loads need no mask.
        if MASKED or UPCAST or not EVEN_D:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None],
                         mask=d_ok[:, None] & (offs_n[None, :] < S), other=0.0)
        else:
            kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None])
        if UPCAST:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            s = tl.where(_allowed(offs_m, offs_n, T, S, LEFT, RIGHT), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw nothing yet
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED or UPCAST or not EVEN_D:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :],
                        mask=(offs_n[:, None] < S) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :])
        if UPCAST:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, T, S, D, GROUP, LEFT, RIGHT, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr = False,
    BIG_D: tl.constexpr = False,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _kv_range(m0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, lo, full_lo, T, S, D, LEFT, RIGHT, qk_scale,
                               True, BLOCK_N, UPCAST, DOT_PREC, EVEN_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, full_lo, full_hi, T, S, D, LEFT, RIGHT, qk_scale,
                               False, BLOCK_N, UPCAST, DOT_PREC, EVEN_D)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, full_hi, hi, T, S, D, LEFT, RIGHT, qk_scale,
                               True, BLOCK_N, UPCAST, DOT_PREC, EVEN_D)
    seen = l_i > 0.0
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_ot + offs_d[None, :], cast_for_store(out, OUT_DTYPE),
             mask=(offs_m[:, None] < T) & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit
def attention_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, (B, H, T) fp32."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
                + offs_m[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                + offs_m[:, None] * stride_gt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * g, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    tl.store(DELTA + bh.to(tl.int64) * T + offs_m, delta, mask=offs_m < T)


@triton.jit
def _q_range(n0, T, S, LEFT, RIGHT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query blocks that see keys [n0, n0 + BLOCK_N): [lo, hi) touched (BLOCK_M aligned lo),
    [full_lo, full_hi) mask-free (every row < T sees every key < S of the block). Padding
    keys (>= S) are zeros whose dK/dV rows are never stored, so they need no mask."""
    off = S - T
    n_last = tl.minimum(n0 + BLOCK_N, S) - 1
    lo = (tl.maximum(n0 - off - RIGHT, 0) // BLOCK_M) * BLOCK_M  # i >= j - off - RIGHT
    hi = tl.minimum(n_last - off + LEFT + 1, T)  # i <= j - off + LEFT
    full_lo = tl.cdiv(tl.maximum(n_last - off - RIGHT, 0), BLOCK_M) * BLOCK_M
    full_hi = (tl.minimum(n0 - off + LEFT + 1, T) // BLOCK_M) * BLOCK_M
    full_lo = tl.minimum(tl.maximum(full_lo, lo), hi)
    full_hi = tl.maximum(tl.minimum(full_hi, hi), full_lo)
    return lo, hi, full_lo, full_hi


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_gt,
                offs_n, offs_d, start, end, T, S, D, LEFT, RIGHT, qk_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr):
    offs_m0 = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + offs_m0
        m_ok = offs_m < T
        qt = tl.load(q_base + offs_m[None, :] * stride_qt + offs_d[:, None],
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        g = tl.load(do_base + offs_m[:, None] * stride_gt + offs_d[None, :],
                    mask=m_ok[:, None] & d_ok[None, :], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            g = g.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see nothing: p = 0
        # Transposed scores: (BLOCK_N, BLOCK_M), so dK/dV need no transposes of their own.
        st = tl.dot(k, qt, input_precision=DOT_PREC) * qk_scale
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            pt = tl.where(_allowed_t(offs_n, offs_m, T, S, LEFT, RIGHT), pt, 0.0)
        dv += tl.dot(pt.to(g.dtype), g, input_precision=DOT_PREC)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(g), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _allowed_t(offs_n, offs_m, T, S, LEFT, RIGHT):
    """(BLOCK_N, BLOCK_M) bool: the transposed mask."""
    off = S - T
    ok = (offs_n[:, None] < S) & (offs_m[None, :] < T)
    ok = ok & (offs_n[:, None] >= offs_m[None, :] + off - LEFT)
    ok = ok & (offs_n[:, None] <= offs_m[None, :] + off + RIGHT)
    return ok


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, T, S, D, GROUP, LEFT, RIGHT, scale, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BIG_D: tl.constexpr = False,
):
    """One program: dK, dV of keys [n0, n0 + BLOCK_N) of one kv head, summed over its GROUP
    query heads and every query block that sees them."""
    pid_n = tl.program_id(0)
    bhkv = tl.program_id(1)
    Hkv = H // GROUP
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
                + offs_n[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
                + offs_n[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _q_range(n0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    for gi in range(0, GROUP):
        h = hkv * GROUP + gi
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
        row = (b * H + h).to(tl.int64) * T
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, lo, full_lo, T, S, D, LEFT, RIGHT,
                             qk_scale, True, BLOCK_M, UPCAST, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, full_lo, full_hi, T, S, D, LEFT, RIGHT,
                             qk_scale, False, BLOCK_M, UPCAST, DOT_PREC)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, full_hi, hi, T, S, D, LEFT, RIGHT,
                             qk_scale, True, BLOCK_M, UPCAST, DOT_PREC)
    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hkv.to(tl.int64) * stride_dkh
             + offs_n[:, None] * stride_dkt + offs_d[None, :], cast_for_store(dk, OUT_DTYPE), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hkv.to(tl.int64) * stride_dvh
             + offs_n[:, None] * stride_dvt + offs_d[None, :], cast_for_store(dv, OUT_DTYPE), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
              start, end, T, S, D, LEFT, RIGHT, qk_scale,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr):
    offs_n0 = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + offs_n0
        kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None],
                     mask=d_ok[:, None] & (offs_n[None, :] < S), other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vt + offs_d[:, None],
                     mask=d_ok[:, None] & (offs_n[None, :] < S), other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_allowed(offs_m, offs_n, T, S, LEFT, RIGHT), p, 0.0)
        dp = tl.dot(g, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=DOT_PREC)
    return dq


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, S, D, GROUP, LEFT, RIGHT, scale, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, BIG_D: tl.constexpr = False,
):
    """One program: dQ of query rows [m0, m0 + BLOCK_M) of one head."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh
                + offs_m[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)
    g = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh
                + offs_m[:, None] * stride_gt + offs_d[None, :], mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        g = g.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + bh.to(tl.int64) * T + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _kv_range(m0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   lo, full_lo, T, S, D, LEFT, RIGHT, qk_scale, True, BLOCK_N, UPCAST, DOT_PREC)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   full_lo, full_hi, T, S, D, LEFT, RIGHT, qk_scale, False, BLOCK_N, UPCAST, DOT_PREC)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   full_hi, hi, T, S, D, LEFT, RIGHT, qk_scale, True, BLOCK_N, UPCAST, DOT_PREC)
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh
             + offs_m[:, None] * stride_dqt + offs_d[None, :], cast_for_store(dq, OUT_DTYPE), mask=mask)


# The autotuned entry points the launchers call (block sizes come from the configs).
_fwd_tuned = triton.autotune(_FWD_CONFIGS, key=_AUTOTUNE_KEY,
                                prune_configs_by={"early_config_prune": _prune})(attention_fwd_kernel)
_dkdv_tuned = triton.autotune(_DKDV_CONFIGS, key=_AUTOTUNE_KEY,
                                     prune_configs_by={"early_config_prune": _prune})(attention_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_DQ_CONFIGS, key=_AUTOTUNE_KEY,
                                   prune_configs_by={"early_config_prune": _prune})(attention_bwd_dq_kernel)


# ---------------------------------------------------------------- launchers
# Plain functions (no argument checks: torch.ops.lmkernels.attention_* checks before calling
# them on CUDA tensors; the interpreter tests call them directly on CPU tensors).
def _bounds(T: int, S: int, is_causal: bool, window_left: int, window_right: int):
    """(LEFT, RIGHT) for the kernels: an unbounded side becomes T + S (always satisfied)."""
    left, right = window_bounds(is_causal, (window_left, window_right))
    return (left if left >= 0 else T + S), (right if right >= 0 else T + S)


def _dot_precision(dtype: torch.dtype):
    return "ieee" if dtype == torch.float32 else None  # None: Triton's default (bf16/fp16 MMA)


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _strides(t: torch.Tensor):
    assert t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_fwd(query, key, value, scale, is_causal, window_left, window_right):
    """-> (out (B, H, T, D) in query's dtype, lse (B, H, T) float32)."""
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    left, right = _bounds(T, S, is_causal, window_left, window_right)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd_tuned[grid](
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, T, S, D, H // Hkv, left, right, scale * LOG2E,
        OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=_block_d(D), UPCAST=triton_interpreted(),
        DOT_PREC=_dot_precision(q.dtype), EVEN_D=_block_d(D) == D)
    return out, lse


def attention_bwd(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                  window_left, window_right):
    """-> (dq, dk, dv). grad_lse may be None."""
    q, k, v, o, g = (_last_dim_contiguous(t) for t in (query, key, value, out, grad_out))
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    left, right = _bounds(T, S, is_causal, window_left, window_right)
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    block_d = _block_d(D)
    attention_bwd_preprocess_kernel[(triton.cdiv(T, 64), B * H)](
        o, g, grad_lse.contiguous() if grad_lse is not None else lse, delta, *_strides(o),
        *_strides(g), H, T, D, HAS_DLSE=grad_lse is not None, BLOCK_M=64, BLOCK_D=block_d)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    common = dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=block_d, UPCAST=triton_interpreted(),
                  DOT_PREC=_dot_precision(q.dtype))
    qk_scale = scale * LOG2E
    _dkdv_tuned[lambda meta: (triton.cdiv(S, meta["BLOCK_N"]), B * Hkv)](
        q, k, v, g, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v), *_strides(g),
        *_strides(dk), *_strides(dv), H, T, S, D, H // Hkv, left, right, scale, qk_scale, **common)
    _dq_tuned[lambda meta: (triton.cdiv(T, meta["BLOCK_M"]), B * H)](
        q, k, v, g, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v), *_strides(g),
        *_strides(dq), H, T, S, D, H // Hkv, left, right, scale, qk_scale, **common)
    return dq, dk, dv
