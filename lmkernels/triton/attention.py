"""FlashAttention-2 kernels: forward, backward preprocess, backward dK/dV and dQ, dense and
varlen (packed sequences), with optional softcap.

Dense shapes: Q, O, dO (B, H, T, D); K, V, dK, dV (B, Hkv, S, D); LSE, delta (B, H, T) fp32.
Varlen shapes (VARLEN = 1, FA2's layout): Q, O, dO (total_q, H, D); K, V (total_k, Hkv, D);
LSE, delta (H, total_q); sequence b is rows [cu_q[b], cu_q[b+1]) of Q and [cu_k[b], cu_k[b+1])
of K, V. One kernel serves both: a program finds its sequence's first row and lengths
(`_sequence`) and from there works on positions inside that sequence, so every mask, range and
early exit below is per sequence. Any strides (passed in); H = GROUP * Hkv (head h reads kv head
h // GROUP: GQA without copies).
Mask (off = S - T, bottom-right alignment per sequence): query i sees key j iff
    i + off - LEFT <= j <= i + off + RIGHT
(an unbounded side is passed as LEFT or RIGHT = T + S, so the same code covers every case).
Scores: s = scale q k^T, or with softcap c > 0 (SOFTCAP=True, Gemma 2) s = c tanh(scale q k^T / c);
then the mask, softmax, out = P v.
Forward, per (BLOCK_M query rows, head), scores in the log2 domain (s2 = log2(e) s):
    m' = max(m, rowmax s2),  p = 2^(s2 - m'),
    l = l 2^(m - m') + rowsum p,  acc = acc 2^(m - m') + p v;
    out = acc / l,  lse = ln 2 * (m + log2 l)
A row that sees no key gives out = 0, lse = -inf (documented). A NaN or inf reaching a row's
scores or values (NaN/inf in Q, K, V or scale) gives a NaN/inf out and lse, as SDPA does: the
"empty row" test is l == 0, which a NaN l fails.
Backward (recomputing p = 2^(s2 - log2e * lse)), delta = rowsum(dO * O) - dlse:
    dV = sum_i p^T dO,  dP = dO V^T,  dS = p (dP - delta) [* (1 - tanh^2) with softcap],
    dK = scale * sum_i dS^T Q,  dQ = scale * sum_j dS K.
dK/dV programs own one kv block (looping over the query heads of their group and all query
blocks), dQ programs own one query block: no atomics, deterministic. Key blocks a query
block cannot see are never visited; blocks entirely inside the mask skip the masking.
D: any multiple of 8 up to 256. The forward pads to the power of two BLOCK_D with masked loads;
the backward launchers pad Q, K, V, dO on the host to BLOCK_D instead (zeros change no score),
so the backward kernels always see D == BLOCK_D: masked padded-D loads (with head-dim strides
that are not a multiple of 16 elements) spilled 472 B in every dK/dV tile at D = 72 on sm_90.

GPU details:
- Grid: axis 0 is B*H (or B*Hkv), axis 1 the row blocks (axis 1 is capped at 65535; B*H is not).
  Varlen grids cover max_seqlen; programs past their own sequence's end return at once.
- Row offsets: each block's base pointer advances by row * stride in int64, so T * stride (or
  total_q * stride) may pass 2^31; offsets inside a tile stay int32.
- Accumulators go through tl.dot's accumulator operand (acc = dot(p, v, acc)): no second
  BLOCK_M x BLOCK_D fp32 tile live, which keeps the 128 x 64 bf16 forward spill-free.
- fp32 inputs use "tf32x3" dots (three TF32 tensor-core products: fp32-level error, not the
  FMA loops, spills and minutes of compile of "ieee") with their own small tiles.
- Softcap is a constexpr (SOFTCAP): without it no softcap instruction is compiled (softcap = 0
  costs the main path nothing); with it tanh is libdevice's on GPU (the interpreter has no
  libdevice: an expm1-based tanh there). VARLEN is a runtime flag instead (see _sequence).
- Autotune: one config list per tile class (`_tile_class`); configs that need more shared
  memory than the device gives one block are pruned before launch (`_usable_configs`, also what
  the compile gate compiles). Softcap launches have their own classes with one config each (the
  tanh tile raises register use; the gate proves that config, and a softcap launch never runs an
  ungated one). The key buckets T and S (max_seqlen for varlen) to the next power of two, so a
  new length does not re-tune. LMK_TRITON_ONE_CONFIG=1 (read at import) keeps the first config
  per class: for GPU tests, which need correctness, not tuning, in a short run.
Under the CPU interpreter (UPCAST) inputs are upcast to fp32 right after loading, and each
kernel has one small config.
"""
import contextlib
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lmkernels.reference.attention import window_bounds
from lmkernels.triton._common import cast_for_store, tl_dtype, triton_interpreted
from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

LOG2E = 1.4426950408889634

# Tile classes (a config's TILE_CLASS kwarg; the prune keeps the launch's class only).
# LOW_*: bf16/fp16. LOW_D64: BLOCK_D <= 64 (the D = 128 forward tile, 128x64 w8, spills 48 B at
# D = 64 on sm_100). LOW_PADDED_D: forward at head dims <= 128 that are not a power of two
# (e.g. 72): BLOCK_D pads to the next power of two and the masked loads keep more registers
# live, so it takes narrower tiles. The backward pads on the host and never uses it.
LOW_D64, LOW_D128, LOW_D256, FP32_D128, FP32_D256, LOW_PADDED_D = 0, 1, 2, 3, 4, 5
CAPPED = 8  # added to a class for softcap launches: one config each, proven by the gate


def _tile_class(dtype, head_dim: int, softcap: bool = False) -> int:
    block_d = _block_d(head_dim)
    if dtype == torch.float32:
        cls = FP32_D256 if block_d > 128 else FP32_D128
    elif block_d > 128:
        cls = LOW_D256
    elif block_d != head_dim:
        cls = LOW_PADDED_D
    else:
        cls = LOW_D64 if block_d <= 64 else LOW_D128
    return cls + (CAPPED if softcap else 0)


def _configs(per_class):
    """Autotune configs from {tile class: [(BLOCK_M, BLOCK_N, num_warps, num_stages), ...]}.
    The interpreter gets one small config (any class); LMK_TRITON_ONE_CONFIG=1 the first of
    each class."""
    if triton_interpreted():  # one config: the autotuner then neither prunes nor benchmarks
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "TILE_CLASS": -1}, num_warps=4)]
    one = os.environ.get("LMK_TRITON_ONE_CONFIG", "0") == "1"
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "TILE_CLASS": c}, num_warps=w, num_stages=st)
            for c, lst in per_class.items() for m, n, w, st in (lst[:1] if one else lst)]


# Numbers are the compile gate's (registers sm_90/sm_100, bf16; bench/results/gpu-compile-check-attention.md).
# H100, bf16, D = 128: the forward's 128 x 64 tiles with 8 warps are the largest that compile
# without spills with plain pointer loads (128 x 128 needs 255 registers and spills: the
# tutorial's spill-free 128 x 128 uses TMA descriptors). D <= 64: 128x64 w8 spills 48 B on
# sm_100; 128x64 w4 s3 (248/226 regs) and 128x32 w8 s3 (150/117) do not. D = 72 (padded):
# 128x32 w8 s2 spills 40 B on sm_100, 64x32 w4 s2 48/432 B; 128x32 w8 s1 is spill-free (254/228).
# D = 256: only the config that spills least (64x64 w4 s2 spilled 1136/192 B against 344/88 B,
# and took 26-67 s to compile: it cannot win, and the CI gate has a time budget). The backward
# splits into narrow-M dK/dV and narrow-N dQ programs. Two configs per class keep first-call
# compile + tuning short. fp32 (tf32x3: three MMAs per product, operands split in registers)
# takes 64-wide tiles.
_FWD_CONFIGS = _configs({
    LOW_D64: [(128, 64, 4, 3), (128, 32, 8, 3)],
    LOW_D128: [(128, 64, 8, 3), (128, 64, 8, 2)],
    LOW_PADDED_D: [(128, 32, 8, 1)],
    LOW_D256: [(64, 32, 4, 2)],
    FP32_D128: [(64, 32, 4, 2)],
    FP32_D256: [(32, 32, 4, 1)],
    LOW_D64 + CAPPED: [(128, 32, 8, 3)],
    LOW_D128 + CAPPED: [(128, 32, 8, 3)],
    LOW_PADDED_D + CAPPED: [(64, 32, 8, 1)],  # 128x32 w8 s1 spills 32 B on sm_90; this: 242/232 regs
    LOW_D256 + CAPPED: [(64, 32, 4, 2)],
    FP32_D128 + CAPPED: [(64, 32, 4, 2)],
    FP32_D256 + CAPPED: [(32, 32, 4, 1)],
})
# sm_90 compile gate, bf16 D = 128 dK/dV (BLOCK_M streamed x BLOCK_N held): 64x64 w8 s2 spills
# 152 B, 32x64 w8 40 B, 32x32 w4 8 B; holding 32 K/V rows with 8 warps is spill-free. With the
# unmasked (padded-D) 16-byte loads 64x32 w8 s2 spills 32/16 B (sm_90/sm_100); s1 does not
# (214/215 regs). D = 256 backward: dK, dV (or dQ) accumulators of 32 x 256 fp32 already fill
# the registers (16x32 w4 dK/dV spilled 192/224 B against 0 for 32x32 w8: dropped). The
# backward pads D to BLOCK_D (no padded class). Softcap keeps one more (BLOCK_N, BLOCK_M) tile
# (tanh) live: dQ at D = 128 takes 128x16 (159/110 regs; 128x32 spilled 8 B on sm_100).
_DKDV_CONFIGS = _configs({
    LOW_D64: [(64, 32, 8, 2), (32, 32, 8, 2)],
    LOW_D128: [(64, 32, 8, 1), (32, 32, 8, 2)],
    LOW_D256: [(32, 32, 8, 1)],
    FP32_D128: [(32, 64, 4, 1)],
    FP32_D256: [(16, 32, 4, 1)],
    LOW_D64 + CAPPED: [(32, 32, 8, 2)],
    LOW_D128 + CAPPED: [(32, 32, 8, 2)],
    LOW_D256 + CAPPED: [(32, 32, 8, 1)],
    FP32_D128 + CAPPED: [(32, 64, 4, 1)],
    FP32_D256 + CAPPED: [(16, 32, 4, 1)],
})
_DQ_CONFIGS = _configs({
    LOW_D64: [(128, 32, 8, 3)],  # 128x64 w8 s3 spills 8 B on sm_100 (128 regs); 128x32: 125/71 regs
    LOW_D128: [(128, 64, 8, 3), (128, 32, 8, 3)],
    LOW_D256: [(32, 32, 8, 1), (64, 32, 8, 1)],
    FP32_D128: [(64, 32, 4, 1)],
    FP32_D256: [(32, 16, 4, 1)],
    LOW_D64 + CAPPED: [(128, 32, 8, 3)],
    LOW_D128 + CAPPED: [(128, 16, 8, 3)],
    LOW_D256 + CAPPED: [(32, 32, 8, 1)],
    FP32_D128 + CAPPED: [(64, 32, 4, 1)],
    FP32_D256 + CAPPED: [(32, 16, 4, 1)],
})


def _smem_estimate(config, block_d: int, elem_bytes: int) -> int:
    """Upper estimate of a config's shared memory, bytes: the pipelined operand tiles
    (num_stages copies of the streamed BLOCK_M and BLOCK_N tiles, two each) plus one fixed tile.
    The compile gate checks each usable config's real figure against the arch's budget."""
    m, n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    stages = max(config.num_stages, 1)
    return (2 * stages * max(m, n) + max(m, n)) * block_d * elem_bytes


def _usable_configs(configs, dtype, head_dim: int, shared_limit: int, softcap: bool = False):
    """The configs of this launch's tile class that fit in shared_limit bytes."""
    cls = _tile_class(dtype, head_dim, softcap)
    block_d = _block_d(head_dim)
    elem = torch.empty((), dtype=dtype).element_size()
    usable = [c for c in configs if c.kwargs["TILE_CLASS"] == cls
              and _smem_estimate(c, block_d, elem) <= shared_limit]
    if not usable:
        raise RuntimeError(f"attention (Triton): no kernel config for {dtype}, head dim {block_d}"
                           f"{' with softcap' if softcap else ''} fits in {shared_limit} bytes of shared memory")
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
    return _usable_configs(configs, q.dtype, named_args["D"], _shared_limit(device), kwargs["SOFTCAP"])


# Bucketed lengths, the mask kind and the specialization: what the tuned choice depends on
# (with D, GROUP, dtypes). SOFTCAP must be in it: softcap launches have their own configs.
_AUTOTUNE_KEY = ["T_BUCKET", "S_BUCKET", "D", "GROUP", "MASK_KIND", "SOFTCAP", "VARLEN"]
# Sizes that vary from call to call are never specialized (no recompiles); strides are, for
# their 16-byte alignment, which vectorizes the loads. The LSE strides are sizes (H * T, T);
# VARLEN is a 0/1 flag (a 1 would otherwise be specialized).
_NO_SPECIALIZE = ["H", "T", "S", "D", "GROUP", "LEFT", "RIGHT", "T_BUCKET", "S_BUCKET", "MASK_KIND",
                  "VARLEN", "stride_lb", "stride_lh"]


@triton.jit
def _sequence(CU_Q, CU_K, b, T, S, VARLEN):
    """(first query row, T, first key row, S) of batch entry b. Dense: each batch entry is its
    own (T, S) slice, starting at row 0; varlen: read from cu_seqlens. VARLEN is a runtime
    flag, not a constexpr: a uniform branch costs a few scalar instructions, and the dense and
    varlen launches then share one compiled kernel (half the compile gate)."""
    q_start = 0
    k_start = 0
    if VARLEN:
        q_start = tl.load(CU_Q + b)
        T = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        S = tl.load(CU_K + b + 1) - k_start
    return q_start, T, k_start, S


@triton.jit
def _tanh(x, UPCAST: tl.constexpr):
    """tanh to fp32 accuracy. GPU: libdevice. The CPU interpreter has no libdevice:
    tanh = e / (e + 2) with e = expm1(2x), expm1 by Kahan's (u - 1) * y / log(u), u = exp(y),
    which stays accurate where 1 - 2 / (exp(2x) + 1) cancels (small |x|)."""
    if UPCAST:
        y = 2.0 * tl.where(x > 10.0, 10.0, tl.where(x < -10.0, -10.0, x))  # tanh(10) = 1 in fp32
        u = tl.exp(y)
        um1 = u - 1.0
        e = tl.where(um1 == 0.0, y, um1 * y / tl.log(tl.where(um1 == 0.0, 2.0, u)))
        return e / (e + 2.0)
    else:
        return libdevice.tanh(x)


@triton.jit
def _scores(dot, qk_scale, softcap_in, softcap_out, SOFTCAP: tl.constexpr, UPCAST: tl.constexpr):
    """(log2-domain scores, tanh of the capped ones): s2 = qk_scale * dot, or with
    softcap s2 = softcap_out * tanh(softcap_in * dot) (softcap_in = scale / c,
    softcap_out = c * log2 e)."""
    if SOFTCAP:
        t = _tanh(dot * softcap_in, UPCAST)
        return t * softcap_out, t
    else:
        s = dot * qk_scale
        return s, s  # the second value is unused without softcap (and compiled away)


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
               T, S, D, LEFT, RIGHT, qk_scale, softcap_in, softcap_out,
               MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
               DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr, SOFTCAP: tl.constexpr):
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
        s, _ = _scores(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), qk_scale, softcap_in,
                       softcap_out, SOFTCAP, UPCAST)  # (BLOCK_M, BLOCK_N), log2 domain
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
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, VARLEN, qk_scale, softcap_in, softcap_out,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, EVEN_D: tl.constexpr = False,
    SOFTCAP: tl.constexpr = False, TILE_CLASS: tl.constexpr = 0,
):
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    q_start, T, k_start, S = _sequence(CU_Q, CU_K, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T:  # varlen: the grid covers max_seqlen_q; this sequence is shorter
        return
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(q_start + m0, tl.int64) * stride_qt
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + tl.cast(k_start, tl.int64) * stride_kt
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + tl.cast(k_start, tl.int64) * stride_vt
    q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :],
                mask=(offs_m[:, None] < T) & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _kv_range(m0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, lo, full_lo, T, S, D, LEFT, RIGHT, qk_scale, softcap_in,
                               softcap_out, True, BLOCK_N, UPCAST, DOT_PREC, EVEN_D, SOFTCAP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, full_lo, full_hi, T, S, D, LEFT, RIGHT, qk_scale, softcap_in,
                               softcap_out, False, BLOCK_N, UPCAST, DOT_PREC, EVEN_D, SOFTCAP)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, offs_m,
                               offs_d, full_hi, hi, T, S, D, LEFT, RIGHT, qk_scale, softcap_in,
                               softcap_out, True, BLOCK_N, UPCAST, DOT_PREC, EVEN_D, SOFTCAP)
    # Empty rows (no key seen: l == 0) give 0 and -inf. A NaN l (a NaN/inf input) is not 0:
    # it flows into out and lse, as in SDPA.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = tl.where(empty[:, None], 0.0, acc / l_safe[:, None])
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + tl.cast(q_start + m0, tl.int64) * stride_ot
    tl.store(o_base + rows[:, None] * stride_ot + offs_d[None, :], cast_for_store(out, OUT_DTYPE),
             mask=(offs_m[:, None] < T) & d_ok[None, :])
    lse_base = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    tl.store(lse_base + offs_m, lse, mask=offs_m < T)


@triton.jit(do_not_specialize=["H", "T", "D"])
def attention_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, stride_ob, stride_oh, stride_ot, stride_gb, stride_gh, stride_gt,
    H, T, D, HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta = rowsum(dO * O) - dlse, (B, H, T) fp32 (varlen: B = 1, T = total_q)."""
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
                offs_n, offs_d, start, end, T, S, LEFT, RIGHT, qk_scale, softcap_in, softcap_out,
                MASKED: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr,
                DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + rows
        m_ok = offs_m < T
        qt = tl.load(q_base + tl.cast(m0, tl.int64) * stride_qt + rows[None, :] * stride_qt + offs_d[:, None],
                     mask=m_ok[None, :], other=0.0)
        g = tl.load(do_base + tl.cast(m0, tl.int64) * stride_gt + rows[:, None] * stride_gt + offs_d[None, :],
                    mask=m_ok[:, None], other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            g = g.to(tl.float32)
        lse = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that see nothing: p = 0
        # Transposed scores: (BLOCK_N, BLOCK_M), so dK/dV need no transposes of their own.
        st, tt = _scores(tl.dot(k, qt, input_precision=DOT_PREC), qk_scale, softcap_in, softcap_out,
                         SOFTCAP, UPCAST)
        pt = tl.math.exp2(st - lse[None, :])
        if MASKED:
            pt = tl.where(_allowed_t(offs_n, offs_m, T, S, LEFT, RIGHT), pt, 0.0)
        dv = tl.dot(pt.to(g.dtype), g, dv, input_precision=DOT_PREC)
        delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)
        dpt = tl.dot(v, tl.trans(g), input_precision=DOT_PREC)
        dst = pt * (dpt - delta[None, :])
        if SOFTCAP:
            dst = dst * (1.0 - tt * tt)  # d/dx of c tanh(x / c)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=DOT_PREC)
    return dk, dv


# The backward kernels take D == BLOCK_D (the launchers pad): only rows are masked.
@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt, stride_lb, stride_lh,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, VARLEN, scale, qk_scale, softcap_in,
    softcap_out,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr = False, TILE_CLASS: tl.constexpr = 0,
):
    """One program: dK, dV of keys [n0, n0 + BLOCK_N) of one kv head, summed over its GROUP
    query heads and every query block that sees them."""
    bhkv = tl.program_id(0)
    pid_n = tl.program_id(1)
    Hkv = H // GROUP
    b = bhkv // Hkv
    hkv = bhkv % Hkv
    q_start, T, k_start, S = _sequence(CU_Q, CU_K, b, T, S, VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= S:
        return
    cols = tl.arange(0, BLOCK_N)
    offs_n = n0 + cols
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n[:, None] < S
    row_k = tl.cast(k_start + n0, tl.int64)
    k = tl.load(K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + row_k * stride_kt
                + cols[:, None] * stride_kt + offs_d[None, :], mask=n_ok, other=0.0)
    v = tl.load(V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + row_k * stride_vt
                + cols[:, None] * stride_vt + offs_d[None, :], mask=n_ok, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _q_range(n0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    for gi in range(0, GROUP):
        h = hkv * GROUP + gi
        q_base = Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + tl.cast(q_start, tl.int64) * stride_qt
        do_base = DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + tl.cast(q_start, tl.int64) * stride_gt
        row = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, lo, full_lo, T, S, LEFT, RIGHT,
                             qk_scale, softcap_in, softcap_out, True, BLOCK_M, UPCAST, DOT_PREC, SOFTCAP)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, full_lo, full_hi, T, S, LEFT, RIGHT,
                             qk_scale, softcap_in, softcap_out, False, BLOCK_M, UPCAST, DOT_PREC, SOFTCAP)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, LSE + row, DELTA + row, stride_qt,
                             stride_gt, offs_n, offs_d, full_hi, hi, T, S, LEFT, RIGHT,
                             qk_scale, softcap_in, softcap_out, True, BLOCK_M, UPCAST, DOT_PREC, SOFTCAP)
    dk = dk * scale
    tl.store(DK + b.to(tl.int64) * stride_dkb + hkv.to(tl.int64) * stride_dkh + row_k * stride_dkt
             + cols[:, None] * stride_dkt + offs_d[None, :], cast_for_store(dk, OUT_DTYPE), mask=n_ok)
    tl.store(DV + b.to(tl.int64) * stride_dvb + hkv.to(tl.int64) * stride_dvh + row_k * stride_dvt
             + cols[:, None] * stride_dvt + offs_d[None, :], cast_for_store(dv, OUT_DTYPE), mask=n_ok)


@triton.jit
def _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
              start, end, T, S, LEFT, RIGHT, qk_scale, softcap_in, softcap_out,
              MASKED: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
              DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + cols
        n_ok = offs_n[None, :] < S
        kt = tl.load(k_base + tl.cast(n0, tl.int64) * stride_kt + cols[None, :] * stride_kt + offs_d[:, None],
                     mask=n_ok, other=0.0)
        vt = tl.load(v_base + tl.cast(n0, tl.int64) * stride_vt + cols[None, :] * stride_vt + offs_d[:, None],
                     mask=n_ok, other=0.0)
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s, t = _scores(tl.dot(q, kt, input_precision=DOT_PREC), qk_scale, softcap_in, softcap_out,
                       SOFTCAP, UPCAST)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(_allowed(offs_m, offs_n, T, S, LEFT, RIGHT), p, 0.0)
        dp = tl.dot(g, vt, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)  # d/dx of c tanh(x / c)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=DOT_PREC)
    return dq


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt, stride_gb, stride_gh, stride_gt,
    stride_dqb, stride_dqh, stride_dqt, stride_lb, stride_lh,
    H, T, S, D, GROUP, LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND, VARLEN, scale, qk_scale, softcap_in,
    softcap_out,
    OUT_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
    SOFTCAP: tl.constexpr = False, TILE_CLASS: tl.constexpr = 0,
):
    """One program: dQ of query rows [m0, m0 + BLOCK_M) of one head."""
    bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = bh // H
    h = bh % H
    hkv = h // GROUP
    q_start, T, k_start, S = _sequence(CU_Q, CU_K, b, T, S, VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= T:
        return
    rows = tl.arange(0, BLOCK_M)
    offs_m = m0 + rows
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m[:, None] < T
    row_q = tl.cast(q_start + m0, tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + row_q * stride_qt
                + rows[:, None] * stride_qt + offs_d[None, :], mask=m_ok, other=0.0)
    g = tl.load(DO + b.to(tl.int64) * stride_gb + h.to(tl.int64) * stride_gh + row_q * stride_gt
                + rows[:, None] * stride_gt + offs_d[None, :], mask=m_ok, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        g = g.to(tl.float32)
    lse_base = b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + q_start
    lse = tl.load(LSE + lse_base + offs_m, mask=offs_m < T, other=0.0) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + lse_base + offs_m, mask=offs_m < T, other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + hkv.to(tl.int64) * stride_kh + tl.cast(k_start, tl.int64) * stride_kt
    v_base = V + b.to(tl.int64) * stride_vb + hkv.to(tl.int64) * stride_vh + tl.cast(k_start, tl.int64) * stride_vt
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi, full_lo, full_hi = _kv_range(m0, T, S, LEFT, RIGHT, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   lo, full_lo, T, S, LEFT, RIGHT, qk_scale, softcap_in, softcap_out, True, BLOCK_N,
                   UPCAST, DOT_PREC, SOFTCAP)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   full_lo, full_hi, T, S, LEFT, RIGHT, qk_scale, softcap_in, softcap_out, False, BLOCK_N,
                   UPCAST, DOT_PREC, SOFTCAP)
    dq = _dq_inner(dq, q, g, lse, delta, k_base, v_base, stride_kt, stride_vt, offs_m, offs_d,
                   full_hi, hi, T, S, LEFT, RIGHT, qk_scale, softcap_in, softcap_out, True, BLOCK_N,
                   UPCAST, DOT_PREC, SOFTCAP)
    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * stride_dqb + h.to(tl.int64) * stride_dqh + row_q * stride_dqt
             + rows[:, None] * stride_dqt + offs_d[None, :], cast_for_store(dq, OUT_DTYPE), mask=m_ok)


def _autotuned(kernel, configs):
    return triton.autotune(configs, key=_AUTOTUNE_KEY, prune_configs_by={"early_config_prune": _prune})(kernel)


# The autotuned entry points the launchers call (block sizes come from the configs).
_fwd_tuned = _autotuned(attention_fwd_kernel, _FWD_CONFIGS)
_dkdv_tuned = _autotuned(attention_bwd_dkdv_kernel, _DKDV_CONFIGS)
_dq_tuned = _autotuned(attention_bwd_dq_kernel, _DQ_CONFIGS)
_PREPROCESS_BLOCK_M = 64


# ---------------------------------------------------------------- launch builders
# Shared by the launchers (dense here, varlen in attention_varlen.py) and compile_specs (which
# passes ArgTensor stand-ins), so the compile gate compiles exactly what the launchers launch.
# A layout is what the kernels need to address one tensor: (batch, head, row) strides.
def _bounds(T: int, S: int, is_causal: bool, window_left: int, window_right: int):
    """(LEFT, RIGHT) for the kernels: an unbounded side becomes T + S (always satisfied)."""
    left, right = window_bounds(is_causal, (window_left, window_right))
    return (left if left >= 0 else T + S), (right if right >= 0 else T + S)


def _bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _mask_args(T: int, S: int, is_causal: bool, window_left: int, window_right: int):
    """LEFT, RIGHT, T_BUCKET, S_BUCKET, MASK_KIND (0 full, 1 causal, 2 other windows). Varlen
    passes max_seqlen_q, max_seqlen_k as T, S."""
    left, right = window_bounds(is_causal, (window_left, window_right))
    kind = 0 if (left < 0 and right < 0) else 1 if (left < 0 and right == 0) else 2
    return (*_bounds(T, S, is_causal, window_left, window_right), _bucket(T), _bucket(S), kind)


def _score_args(scale: float, softcap: float):
    """qk_scale, softcap_in, softcap_out (see _scores)."""
    if softcap > 0:
        return scale * LOG2E, scale / softcap, softcap * LOG2E
    return scale * LOG2E, 0.0, 0.0


def _dot_precision(dtype: torch.dtype):
    return "tf32x3" if dtype == torch.float32 else None  # None: Triton's default (bf16/fp16 MMA)


def _block_d(D: int) -> int:
    return max(16, 1 << (D - 1).bit_length())


def _strides(t):
    """(batch, head, row) strides of a dense (B, H, T, D) tensor."""
    assert t.stride(-1) == 1
    return t.stride(0), t.stride(1), t.stride(2)


def _varlen_strides(t):
    """(batch, head, row) strides of a varlen (total, H, D) tensor: sequences start at their
    cu_seqlens row, so the batch stride is 0."""
    assert t.stride(-1) == 1
    return 0, t.stride(1), t.stride(0)


_NO_CU_SEQLENS: dict = {}


def _no_cu_seqlens(like):
    """The cu_seqlens argument of a dense launch: never read (VARLEN = 0), but an int32 pointer,
    so dense and varlen launches bind the same kernel signature."""
    if isinstance(like, ArgTensor):
        return ArgTensor(torch.int32, shape=(1,))
    if like.device not in _NO_CU_SEQLENS:
        _NO_CU_SEQLENS[like.device] = torch.zeros(1, dtype=torch.int32, device=like.device)
    return _NO_CU_SEQLENS[like.device]


def _fwd_launch(q, k, v, out, lse, scale, is_causal, window_left, window_right, softcap=0.0,
                cu_seqlens=None, max_seqlens=None) -> Launch:
    """Dense (B, H, T, D) tensors, or varlen (total, H, D) ones with cu_seqlens = (cu_q, cu_k)
    and max_seqlens = (max_seqlen_q, max_seqlen_k)."""
    varlen = cu_seqlens is not None
    D = q.shape[-1]
    if varlen:
        H, Hkv = q.shape[1], k.shape[1]
        T, S = max_seqlens
        layout = _varlen_strides
        lse_strides = (0, lse.stride(0))  # (H, total_q)
    else:
        H, T, Hkv, S = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        layout = _strides
        lse_strides = (lse.stride(0), lse.stride(1))  # (B, H, T)
    cu_q, cu_k = cu_seqlens if varlen else (_no_cu_seqlens(q),) * 2
    return Launch(_fwd_tuned, (
        q, k, v, out, lse, cu_q, cu_k, *layout(q), *layout(k), *layout(v), *layout(out), *lse_strides,
        H, T, S, D, H // Hkv, *_mask_args(T, S, is_causal, window_left, window_right), int(varlen),
        *_score_args(scale, softcap),
    ), dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=_block_d(D), UPCAST=triton_interpreted(),
            DOT_PREC=_dot_precision(q.dtype), EVEN_D=_block_d(D) == D, SOFTCAP=softcap > 0))


def _preprocess_launch(o, g, grad_lse, lse, delta) -> Launch:
    """Dense (B, H, T, D) o, g and (B, H, T) lse/delta; varlen passes o, g as (1, H, total, D)
    views and lse/delta as (1, H, total)."""
    B, H, T, D = o.shape
    return Launch(attention_bwd_preprocess_kernel, (
        o, g, grad_lse if grad_lse is not None else lse, delta, *_strides(o), *_strides(g), H, T, D,
    ), dict(HAS_DLSE=grad_lse is not None, BLOCK_M=_PREPROCESS_BLOCK_M, BLOCK_D=_block_d(D)))


def _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, scale, is_causal, window_left, window_right,
                  softcap=0.0, cu_seqlens=None, max_seqlens=None):
    """-> (dK/dV launch, dQ launch). q, k, v, g, dq, dk, dv already padded to BLOCK_D (see
    _pad_head_dim); layouts as in _fwd_launch."""
    varlen = cu_seqlens is not None
    D = q.shape[-1]
    assert D == _block_d(D), "the backward kernels take D == BLOCK_D (pad on the host)"
    if varlen:
        H, Hkv = q.shape[1], k.shape[1]
        T, S = max_seqlens
        layout = _varlen_strides
        lse_strides = (0, lse.stride(0))
    else:
        H, T, Hkv, S = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
        layout = _strides
        lse_strides = (lse.stride(0), lse.stride(1))
    cu_q, cu_k = cu_seqlens if varlen else (_no_cu_seqlens(q),) * 2
    common = dict(OUT_DTYPE=tl_dtype(q.dtype), BLOCK_D=D, UPCAST=triton_interpreted(),
                  DOT_PREC=_dot_precision(q.dtype), SOFTCAP=softcap > 0)
    sizes = (*lse_strides, H, T, S, D, H // Hkv, *_mask_args(T, S, is_causal, window_left, window_right),
             int(varlen), scale, *_score_args(scale, softcap))
    dkdv = Launch(_dkdv_tuned, (q, k, v, g, lse, delta, dk, dv, cu_q, cu_k, *layout(q), *layout(k),
                                *layout(v), *layout(g), *layout(dk), *layout(dv), *sizes), common)
    dq_launch = Launch(_dq_tuned, (q, k, v, g, lse, delta, dq, cu_q, cu_k, *layout(q), *layout(k),
                                   *layout(v), *layout(g), *layout(dq), *sizes), common)
    return dkdv, dq_launch


# ---------------------------------------------------------------- launchers
# Plain functions (no argument checks: torch.ops.lmkernels.attention_* checks before calling
# them on CUDA tensors; the interpreter tests call them directly on CPU tensors).
def _on_device(device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _pad_head_dim(t: torch.Tensor) -> torch.Tensor:
    """t with its last dim zero-padded to BLOCK_D (t itself when already a power of two >= 16).
    Zero columns add nothing to any score or gradient row."""
    D = t.shape[-1]
    return _last_dim_contiguous(t) if _block_d(D) == D else F.pad(t, (0, _block_d(D) - D))


def _unpad_head_dim(t: torch.Tensor, D: int) -> torch.Tensor:
    return t if t.shape[-1] == D else t[..., :D].contiguous()


def attention_fwd(query, key, value, scale, is_causal, window_left, window_right, softcap=0.0):
    """-> (out (B, H, T, D) in query's dtype, lse (B, H, T) float32)."""
    q, k, v = (_last_dim_contiguous(t) for t in (query, key, value))
    B, H, T, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    launch = _fwd_launch(q, k, v, out, lse, scale, is_causal, window_left, window_right, softcap)
    with _on_device(q.device):
        launch.run(lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"])))
    return out, lse


def attention_bwd(grad_out, query, key, value, out, lse, grad_lse, scale, is_causal,
                  window_left, window_right, softcap=0.0):
    """-> (dq, dk, dv). grad_lse may be None."""
    D = query.shape[-1]
    o, g0 = (_last_dim_contiguous(t) for t in (out, grad_out))
    q, k, v, g = (_pad_head_dim(t) for t in (query, key, value, grad_out))
    B, H, T, _ = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    pre = _preprocess_launch(o, g0, grad_lse.contiguous() if grad_lse is not None else None, lse, delta)
    dkdv, dq_launch = _bwd_launches(q, k, v, g, lse, delta, dq, dk, dv, scale, is_causal,
                                    window_left, window_right, softcap)
    with _on_device(q.device):
        pre.run((B * H, triton.cdiv(T, _PREPROCESS_BLOCK_M)))
        dkdv.run(lambda meta: (B * Hkv, triton.cdiv(S, meta["BLOCK_N"])))
        dq_launch.run(lambda meta: (B * H, triton.cdiv(T, meta["BLOCK_M"])))
    return tuple(_unpad_head_dim(t, D) for t in (dq, dk, dv))


# ---------------------------------------------------------------- compile gate
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Head dims the gate compiles: the three BLOCK_D classes, and one that is not a power of two
# (forward: masked D, strides not a multiple of 16 elements; backward: padded to 128 on the host).
GATE_HEAD_DIMS = (64, 128, 256, 72)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def gate_configs(launch, dtype, D: int, softcap: bool):
    """The configs function of a CompileSpec: what _prune leaves this launch on a budget."""
    return lambda limit: _usable_configs(launch.kernel.configs, dtype, D, limit, softcap)


def compile_specs():
    """Every attention kernel x usable autotune config for each dtype and head-dim class, the
    launch made for (B, H, Hkv, T, S) = (2, 4, 2, 1000, 1000), causal (the mask only changes
    runtime values), without and with softcap. bf16/fp16 with D <= 128 must not spill."""
    B, H, Hkv, T, S = 2, 4, 2, 1000, 1000
    for dtype in DTYPES:
        for D in GATE_HEAD_DIMS:
            Dp = _block_d(D)  # the backward's padded head dim
            q, out, g = (ArgTensor(dtype, shape=(B, H, T, D)) for _ in range(3))
            k, v = (ArgTensor(dtype, shape=(B, Hkv, S, D)) for _ in range(2))
            qp, gp, dq = (ArgTensor(dtype, shape=(B, H, T, Dp)) for _ in range(3))
            kp, vp, dk, dv = (ArgTensor(dtype, shape=(B, Hkv, S, Dp)) for _ in range(4))
            lse, delta = ArgTensor(torch.float32, shape=(B, H, T)), ArgTensor(torch.float32, shape=(B, H, T))
            no_spills = dtype != torch.float32 and D <= 128
            for softcap in (0.0, 30.0):
                name = f"{_NAMES[dtype]} D={D}" + (" softcap" if softcap else "")
                fwd = _fwd_launch(q, k, v, out, lse, D ** -0.5, True, -1, -1, softcap)
                dkdv, dq_launch = _bwd_launches(qp, kp, vp, gp, lse, delta, dq, dk, dv, D ** -0.5, True,
                                                -1, -1, softcap)
                launches = [("attention_fwd", fwd, D)]
                if Dp == D:  # a padded head dim's backward is the launch of D = Dp: compiled once
                    launches += [("attention_bwd_dkdv", dkdv, Dp), ("attention_bwd_dq", dq_launch, Dp)]
                for kernel, launch, d in launches:
                    yield CompileSpec(f"{kernel} {name}", launch, configs=gate_configs(launch, dtype, d, softcap > 0),
                                      no_spills=no_spills)
            yield CompileSpec(f"attention_bwd_preprocess {_NAMES[dtype]} D={D}",
                              _preprocess_launch(out, g, None, lse, delta))


# The varlen launchers live in their own module; re-exported here (attn-interface.md).
from lmkernels.triton.attention_varlen import attention_varlen_bwd, attention_varlen_fwd  # noqa: E402,F401
