"""FlashAttention-2 kernels: forward, backward preprocess, backward dK/dV and dQ.

Shapes: Q, O, dO (B, H, T, D); K, V, dK, dV (B, Hkv, S, D); LSE, delta (B, H, T) fp32; any
strides (passed in), H = GROUP * Hkv (head h reads kv head h // GROUP: GQA without copies).
Mask (off = S - T, bottom-right alignment): query i sees key j iff
    i + off - LEFT <= j <= i + off + RIGHT
(an unbounded side is passed as LEFT or RIGHT = T + S, so the same code covers every case).
Forward, per (BLOCK_M query rows, head), scores in the log2 domain (qk_scale = scale*log2 e):
    s = qk_scale * q k^T,  m' = max(m, rowmax s),  p = 2^(s - m'),
    l = l 2^(m - m') + rowsum p,  acc = acc 2^(m - m') + p v;
    out = acc / l,  lse = ln 2 * (m + log2 l)
A row that sees no key gives out = 0, lse = -inf (documented). A NaN or inf reaching a row's
scores or values (NaN/inf in Q, K, V or scale) gives a NaN/inf out and lse, as SDPA does: the
"empty row" test is l == 0, which a NaN l fails.
Backward (recomputing p = 2^(qk_scale q k^T - log2e * lse)), delta = rowsum(dO * O) - dlse:
    dV = sum_i p^T dO,  dP = dO V^T,  dS = p (dP - delta),
    dK = scale * sum_i dS^T Q,  dQ = scale * sum_j dS K.
dK/dV programs own one kv block (looping over the query heads of their group and all query
blocks), dQ programs own one query block: no atomics, deterministic. Key blocks a query
block cannot see are never visited; blocks entirely inside the mask skip the masking.
D: any multiple of 8 up to 256, padded to the power of two BLOCK_D with masked loads.

GPU details:
- Grid: axis 0 is B*H (or B*Hkv), axis 1 the row blocks (axis 1 is capped at 65535; B*H is not).
- Row offsets: each block's base pointer advances by block_start * stride in int64, so
  T * stride may pass 2^31; offsets inside a tile stay int32.
- Accumulators go through tl.dot's accumulator operand (acc = dot(p, v, acc)): no second
  BLOCK_M x BLOCK_D fp32 tile live, which keeps the 128 x 128 bf16 forward spill-free.
- fp32 inputs use "tf32x3" dots (three TF32 tensor-core products: fp32-level error, not the
  FMA loops, spills and minutes of compile of "ieee") with their own small tiles.
- Autotune: one config list per tile class (bf16/fp16 D <= 128, bf16/fp16 D = 256, fp32
  D <= 128, fp32 D = 256); configs that need more shared memory than the device gives one
  block are pruned before launch (`_usable_configs`, also what the compile gate compiles). The
  key buckets T and S to the next power of two, so a new length does not re-tune.
  LMK_TRITON_ONE_CONFIG=1 (read at import) keeps the first config per class: for GPU tests,
  which need correctness, not tuning, in a short run.
Under the CPU interpreter (UPCAST) inputs are upcast to fp32 right after loading, and each
kernel has one small config.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from lmkernels.reference.attention import window_bounds
from lmkernels.triton._common import cast_for_store, tl_dtype, triton_interpreted
from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

LOG2E = 1.4426950408889634

# Tile classes (a config's TILE_CLASS kwarg; the prune keeps the launch's class only).
# LOW_PADDED_D: bf16/fp16 head dims <= 128 that are not a power of two (e.g. 72): BLOCK_D pads
# to the next power of two and the masked loads keep more registers live, so they take
# smaller tiles than LOW_SMALL_D to stay spill-free.
LOW_SMALL_D, LOW_BIG_D, FP32_SMALL_D, FP32_BIG_D, LOW_PADDED_D = 0, 1, 2, 3, 4


def _tile_class(dtype, head_dim: int) -> int:
    block_d = _block_d(head_dim)
    big = block_d > 128
    if dtype == torch.float32:
        return FP32_BIG_D if big else FP32_SMALL_D
    if big:
        return LOW_BIG_D
    return LOW_SMALL_D if block_d == head_dim else LOW_PADDED_D


def _configs(per_class):
    """Autotune configs from {tile class: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}.
    The interpreter gets one small config (any class); LMK_TRITON_ONE_CONFIG=1 the first of
    each class."""
    if triton_interpreted():  # one config: the autotuner then neither prunes nor benchmarks
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "TILE_CLASS": -1}, num_warps=4)]
    one = os.environ.get("LMK_TRITON_ONE_CONFIG", "0") == "1"
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TILE_CLASS": c}, num_warps=w, num_stages=st)
            for c, lst in per_class.items() for m, n, w, st in (lst[:1] if one else lst)]


# H100, bf16, D <= 128: the forward's 128 x 64 tiles with 8 warps are the largest that compile
# without spills with plain pointer loads (128 x 128 needs 255 registers and spills: the
# tutorial's spill-free 128 x 128 uses TMA descriptors). The backward splits into narrow-M
# dK/dV and narrow-N dQ programs. Two configs per class keep first-call compile + tuning short. fp32 (tf32x3: three MMAs per product, operands
# split in registers) takes 64-wide tiles.
_FWD_CONFIGS = _configs({
    LOW_SMALL_D: [(128, 64, 8, 3), (128, 64, 8, 2)],
    LOW_PADDED_D: [(128, 32, 8, 2)],
    LOW_BIG_D: [(64, 64, 4, 2), (64, 32, 4, 2)],
    FP32_SMALL_D: [(64, 32, 4, 2)],
    FP32_BIG_D: [(32, 32, 4, 1)],
})
# sm_90 compile gate, bf16 D = 128 dK/dV (BLOCK_M streamed x BLOCK_N held): 64x64 w8 s2 spills
# 152 B, 32x64 w8 40 B, 32x32 w4 8 B; holding 32 K/V rows with 8 warps is spill-free (64x32
# 250 regs, 32x32 223). D = 72 (padded): fwd 128x32 w8 and dQ 128x16 w8 are spill-free; every
# dK/dV tile tried (16x16 .. 64x32, 4/8 warps) spills, smaller tiles not less.
# D = 256 backward: dK, dV (or dQ) accumulators of 32 x 256 fp32 already fill the registers.
_DKDV_CONFIGS = _configs({
    LOW_SMALL_D: [(64, 32, 8, 2), (32, 32, 8, 2)],
    LOW_PADDED_D: [(16, 16, 4, 1)],  # still spills 472 B on sm_90 (open: see the gate table)
    LOW_BIG_D: [(32, 32, 8, 1), (16, 32, 4, 1)],
    FP32_SMALL_D: [(32, 64, 4, 1)],
    FP32_BIG_D: [(16, 32, 4, 1)],
})
_DQ_CONFIGS = _configs({
    LOW_SMALL_D: [(128, 64, 8, 3), (128, 32, 8, 3)],
    LOW_PADDED_D: [(128, 16, 8, 2), (128, 16, 8, 1)],
    LOW_BIG_D: [(32, 32, 8, 1), (64, 32, 8, 1)],
    FP32_SMALL_D: [(64, 32, 4, 1)],
    FP32_BIG_D: [(32, 16, 4, 1)],
})


def _smem_estimate(config, block_d: int, elem_bytes: int) -> int:
    """Upper estimate of a config's shared memory, bytes: the pipelined operand tiles
    (num_stages copies of the streamed BLOCK_M and BLOCK_N tiles, two each) plus one fixed tile.
    The compile gate checks each usable config's real figure against the arch's budget."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stages = max(config.num_stages, 1)
    return (2 * stages * max(m, n) + max(m, n)) * block_d * elem_bytes


def _usable_configs(configs, dtype, head_dim: int, shared_limit: int):
    """The configs of this launch's tile class that fit in shared_limit bytes."""
    cls = _tile_class(dtype, head_dim)
    block_d = _block_d(head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    usable = [c for c in configs if c.kwargs["TILE_CLASS"] == cls
              and _smem_estimate(c, block_d, elem) <= shared_limit]
    if not usable:
        raise RuntimeError(f"attention (Triton): no kernel config for {dtype}, head dim {block_d} "
                           f"fits in {shared_limit} bytes of shared memory")
    return usable


_SHARED_LIMIT: dict = {}


def _shared_limit(device) -> int:
    """Shared memory one block may use on this device (opt-in maximum), bytes."""
    if device.type != "cuda":
        return 1 << 30  # the interpreter has no limit
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_LIMIT:
        props = torch.cuda.get_device_properties(index)
        _SHARED_LIMIT[index] = getattr(props, "shared_memory_per_block_optin", 227 * 1024)
    return _SHARED_LIMIT[index]


def _prune(configs, named_args, **kwargs):
    q = named_args["Q"]
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    return _usable_configs(configs, q.dtype, named_args["D"], _shared_limit(device))


# Bucketed lengths and the mask kind: what the tuned choice depends on (with D, GROUP, dtypes).
_AUTOTUNE_KEY = ["T_BUCKET", "S_BUCKET", "D", "GROUP", "MASK_KIND"]
# Sizes that vary from call to call are never specialized (no recompiles); strides are, for
# their 16-byte alignment, which vectorizes the loads.
_NO_SPECIALIZE = ["H", "T", "S", "D", "GROUP", "LEFT", "RIGHT", "T_BUCKET", "S_BUCKET", "MASK_KIND"]


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
    cols = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + cols
        k_blk = k_base + tl.cast(n0, tl.int64) * stride_kn
        v_blk = v_base + tl.cast(n0, tl.int64) * stride_vn
        # Mask-free blocks lie inside [0, S): on GPU with D == BLOCK_D their loads need no mask.
        if MASKED or UPCAST or not EVEN_D:
            k = tl.load(k_blk + cols[:, None] * stride_kn + offs_d[None, :],
                        mask=(offs_n[:, None] < S) & d_ok[None, :], other=0.0)
        else:
            k = tl.load(k_blk + cols[:, None] * stride_kn + offs_d[None, :])
        if UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if MASKED:
            s = tl.where(_allowed(offs_m, offs_n, T, S, LEFT, RIGHT), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose scores are all -inf so far (masked, or -inf products) keeps p = 0.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if MASKED or UPCAST or not EVEN_D:
            v = tl.load(v_blk + cols[:, None] * stride_vn + offs_d[None, :],
                        mask=(offs_n[:, None] < S) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(v_blk + cols[:, None] * stride_vn + offs_d[None, :])
        if UPCAST:
            v = v.to(tl.float32)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_fwd_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr = False,
    TILE_CLASS: tl.constexpr = 0,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(m0, tl.int64) * stride_qt
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :],
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
    # Empty rows (no key seen: l == 0) give 0 and -inf. A NaN l (a NaN/inf input) is not 0:
    # it flows into out and lse, as in SDPA.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + tl.cast(m0, tl.int64) * stride_ot
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], cast_for_store(out, OUT_DTYPE),
             mask=(offs_m[:, None] < T) & d_ok[None, :])
    tl.store(LSE + bh.to(tl.int64) * T + offs_m, lse, mask=offs_m < T)


@triton.jit(do_not_specialize=["H", "T", "D"])
def attention_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, (B, H, T) fp32."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    o = tl.load(O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + tl.cast(m0, tl.int64) * stride_ot
                + rows[:, None] * stride_ot + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + tl.cast(m0, tl.int64) * stride_gt
                + rows[:, None] * stride_gt + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
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
def _allowed_t(offs_n, offs_m, T, S, LEFT, RIGHT):
    """(BLOCK_N, BLOCK_M) bool: the transposed mask."""
    off = S - T
    ok = (offs_n[:, None] < S) & (offs_m[None, :] < T)
    ok = ok & (offs_n[:, None] >= offs_m[None, :] + off - LEFT)
    ok = ok & (offs_n[:, None] <= offs_m[None, :] + off + RIGHT)
    return ok


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_gt,
                offs_n, offs_d, start, end, T, S, D, LEFT, RIGHT, qk_scale,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    d_ok = offs_d < D
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + rows
        m_ok = offs_m < T
        qt = tl.load(q_base + tl.cast(m0, tl.int64) * stride_qt + rows[None, :] * stride_qt + offs_d[:, None],
                     mask=d_ok[:, None] & m_ok[None, :], other=0.0)
        g = tl.load(do_base + tl.cast(m0, tl.int64) * stride_gt + rows[:, None] * stride_gt + offs_d[None, :],
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
        dv = tl.dot(pt.to(g.dtype), g, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(g), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, scale, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TILE_CLASS: tl.constexpr = 0,
):
    """One program: dK, dV of keys [n0, n0 + BLOCK_N) of one kv head, summed over its GROUP
    query heads and every query block that sees them."""
    bhkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    Hkv = H // GROUP
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    n0 = pid_n * BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    offs_n = n0 + cols
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + tl.cast(n0, tl.int64) * stride_kt
                + cols[:, None] * stride_kt + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + tl.cast(n0, tl.int64) * stride_vt
                + cols[:, None] * stride_vt + offs_d[None, :], mask=kv_mask, other=0.0)
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
    tl.store(DK + b.to(tl.int64) * stride_dkb + hkv.to(tl.int64) * stride_dkh + tl.cast(n0, tl.int64) * stride_dkt
             + cols[:, None] * stride_dkt + offs_d[None, :], cast_for_store(dk, OUT_DTYPE), mask=kv_mask)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hkv.to(tl.int64) * stride_dvh + tl.cast(n0, tl.int64) * stride_dvt
             + cols[:, None] * stride_dvt + offs_d[None, :], cast_for_store(dv, OUT_DTYPE), mask=kv_mask)


@triton.jit
def _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
              start, end, T, S, D, LEFT, RIGHT, qk_scale,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PREC: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    d_ok = offs_d < D
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + cols
        n_ok = offs_n[None, :] < S
        kt = tl.load(k_base + tl.cast(n0, tl.int64) * stride_kt + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok, other=0.0)
        vt = tl.load(v_base + tl.cast(n0, tl.int64) * stride_vt + cols[None, :] * stride_vt + offs_d[:, None],
                     mask=d_ok[:, None] & n_ok, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_allowed(offs_m, offs_n, T, S, LEFT, RIGHT), p, 0.0)
        dp = tl.dot(g, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dqb, stride_dqh, stride_dqt,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, scale, qk_scale,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TILE_CLASS: tl.constexpr = 0,
):
    """One program: dQ of query rows [m0, m0 + BLOCK_M) of one head."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    m0 = pid_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < T) & (offs_d[None, :] < D)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(m0, tl.int64) * stride_qt
                + rows[:, None] * stride_qt + offs_d[None, :], mask=mask, other=0.0)
    g = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + tl.cast(m0, tl.int64) * stride_gt
                + rows[:, None] * stride_gt + offs_d[None, :], mask=mask, other=0.0)
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
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + tl.cast(m0, tl.int64) * stride_dqt
             + rows[:, None] * stride_dqt + offs_d[None, :], cast_for_store(dq, OUT_DTYPE), mask=mask)


def _autotuned(kernel, configs):
    return triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


# The autotuned entry points the launchers call (block sizes come from the configs).
_fwd_tuned = _autotuned(attention_fwd_kernel, _FWD_CONFIGS)
_dkdv_tuned = _autotuned(attention_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq_tuned = _autotuned(attention_bwd_dq_kernel, _DQ_CONFIGS)
_PREPROCESS_BLOCK_M = 64


# ---------------------------------------------------------------- launch builders
# Shared by the launchers and compile_specs (which passes ArgTensor stand-ins), so the compile
# gate compiles exactly what the launchers launch.
def _bounds(T: int, S: int, is_causal: bool, window_left: int, window_right: int):
    """(LEFT, RIGHT) for the kernels: an unbounded side becomes T + S (always satisfied)."""
    left, right = window_bounds(is_causal, (window_left, window_right))
    return (left if left >= 0 else T + S), (right if right >= 0 else T + S)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _mask_args(T: int, S: int, is_causal: bool, window_left: int, window_right: int):
    """LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND (0 full, 1 causal, 2 other windows)."""
    left, right = window_bounds(is_causal, (window_left, window_right))
    kind = 0 if (left < 0 and right < 0) else 1 if (left < 0 and right == 0) else 2
    return (*_bounds(T, S, is_causal, window_left, window_right), _bucket(T), _bucket(S), kind)


def _dot_precision(dtype: torch.dtype):
    return "tf32x3" if dtype == torch.float32 else None  # None: Triton's default (bf16/fp16 MMA)


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _strides(t):
    assert t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _fwd_launch(q, k, v, out, lse, scale, is_causal, window_left, window_right) -> Launch:
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    return Launch(_fwd_tuned, (
        q, k, v, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, T, S, D, H // Hkv, *_mask_args(T, S, is_causal, window_left, window_right), scale * LOG2E,
    ), dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=_block_d(D), UPCAST=triton_interpreted(),
            DOT_PREC=_dot_precision(q.dtype), EVEN_D=_block_d(D) == D))


def _preprocess_launch(o, g, grad_lse, lse, delta) -> Launch:
    B, H, T, D = o.shape
    return Launch(attention_bwd_preprocess_kernel, (
        o, g, grad_lse if grad_lse is not None else lse, delta, *_strides(o), *_strides(g), H, T, D,
    ), dict(HAS_DLSE=grad_lse is not None, BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=_block_d(D)))


def _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, scale, is_causal, window_left, window_right):
    """-> (dK/dV launch, dQ launch)."""
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    common = dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=_block_d(D), UPCAST=triton_interpreted(),
                  DOT_PREC=_dot_precision(q.dtype))
    sizes = (H, T, S, D, H // Hkv, *_mask_args(T, S, is_causal, window_left, window_right),
             scale, scale * LOG2E)
    dkdv = Launch(_dkdv_tuned, (q, k, v, g, lse, delta, dk, dv, *_strides(q), *_strides(k), *_strides(v),
                                *_strides(g), *_strides(dk), *_strides(dv), *sizes), common)
    dq_launch = Launch(_dq_tuned, (q, k, v, g, lse, delta, dq, *_strides(q), *_strides(k), *_strides(v),
                                   *_strides(g), *_strides(dq), *sizes), common)
    return dkdv, dq_launch


# ---------------------------------------------------------------- launchers
# Plain functions (no argument checks: torch.ops.lmkernels.attention_* checks before calling
# them on CUDA tensors; the interpreter tests call them directly on CPU tensors).
def _on_device(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def attention_fwd(query, key, value, scale, is_causal, window_left, window_right):
    """-> (out (B, H, T, D) in query's dtype, lse (B, H, T) float32)."""
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    B, H, T, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    launch = _fwd_launch(q, k, v, out, lse, scale, is_causal, window_left, window_right)
    with _on_device(q.device):
        launch.run(lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"])))
    return out, lse


def attention_bwd(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                  window_left, window_right):
    """-> (dq, dk, dv). grad_lse may be None."""
    q, k, v, o, g = (_last_dim_contiguous(t) for t in (query, key, value, out, grad_out))
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    pre = _preprocess_launch(o, g, grad_lse.contiguous() if grad_lse is not None else None, lse, delta)
    dkdv, dq_launch = _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, scale, is_causal,
                                    window_left, window_right)
    with _on_device(q.device):
        pre.run((B * H, triton.cdiv(T, _PREPROCESS_BLOCK_M)))
        dkdv.run(lambda meta: (B * Hkv, triton.cdiv(S, meta["BLOCK_N"])))
        dq_launch.run(lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"])))
    return dq, dk, dv


# ---------------------------------------------------------------- compile gate
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Head dims the gate compiles: the three BLOCK_D classes, and one that is not a power of two
# (masked D, strides not a multiple of 16 elements).
GATE_HEAD_DIMS = (64, 128, 256, 72)


def compile_specs():
    """Every attention kernel x usable autotune config for each dtype and head-dim class, the
    launch made for (B, H, Hkv, T, S) = (2, 4, 2, 1000, 1000), causal (the mask only changes
    runtime values). bf16/fp16 with D <= 128 must not spill."""
    B, H, Hkv, T, S = 2, 4, 2, 1000, 1000
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in GATE_HEAD_DIMS:
            q, out, g, dq = (ArgTensor(dtype, shape=(B, H, T, D)) for _ in range(4))
            k, v, dk, dv = (ArgTensor(dtype, shape=(B, Hkv, S, D)) for _ in range(4))
            lse, delta = ArgTensor(torch.float32, shape=(B, H, T)), ArgTensor(torch.float32, shape=(B, H, T))
            no_spills = dtype != torch.float32 and D <= 128
            name = f"{_NAMES[dtype]} D={D}"
            fwd = _fwd_launch(q, k, v, out, lse, D ** -0.5, True, -1, -1)
            dkdv, dq_launch = _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, D ** -0.5, True, -1, -1)
            for kernel, launch in (("attention_fwd", fwd), ("attention_bwd_dkdv", dkdv),
                                   ("attention_bwd_dq", dq_launch)):
                configs = (lambda limit, launch=launch, D=D, dtype=dtype:
                           _usable_configs(launch.kernel.configs, dtype, D, limit))
                yield CompileSpec(f"{kernel} {name}", launch, configs=configs, no_spills=no_spills)
            yield CompileSpec(f"attention_bwd_preprocess {name}", _preprocess_launch(out, g, None, lse, delta))
