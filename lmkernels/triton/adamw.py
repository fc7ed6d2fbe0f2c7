"""Triton kernel of fused_adamw_: one launch updates every tensor of a parameter group.

Each program owns one (tensor, chunk) work item. Tensor addresses come from a table
(int64, [7, n_tensors]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step),
so there is one launch per list whatever the number of tensors.

Per element, in fp32 (g = grad * inv_scale, negated if MAXIMIZE; Adam-L2 adds wd * p):
    p  *= 1 - lr * wd                        (ADAMW)
    m   = m + (1 - beta1) * (g - m)
    v   = beta2 * v + (1 - beta2) * g^2       (vmax = max(vmax, v) with AMSGRAD)
    p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
"""
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store

# Rows of the address table.
ROW_PARAM, ROW_GRAD, ROW_EXP_AVG, ROW_EXP_AVG_SQ, ROW_MAX_EXP_AVG_SQ, ROW_MASTER, ROW_STEP = range(7)


@triton.jit
def _sr_hash(seed, tensor, index):
    # Same mixing as lmk::sr_hash in csrc/adamw.h (all uint32, wrapping).
    h = seed ^ (tensor * 0x9E3779B1) ^ (index * 0x85EBCA77)
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _one_minus_pow(log_beta, step):
    """1 - beta^step = -expm1(step * log(beta)), accurate in fp32.

    1 - beta2^t is a small difference (0.004 for beta2 = 0.999, t = 4): 1 - exp(x) in fp32
    loses ~1e-5 of it, so small |x| uses the Taylor series of expm1 (8 terms: < 1e-8 at 0.5)."""
    x = step * log_beta
    series = x * (1 + x / 2 * (1 + x / 3 * (1 + x / 4 * (1 + x / 5 * (1 + x / 6 * (1 + x / 7 * (1 + x / 8)))))))
    return tl.where(x > -0.5, -series, 1.0 - tl.exp(x))


@triton.jit
def fused_adamw_kernel(
    table_ptr, numel_ptr, work_tensor_ptr, work_start_ptr, n_tensors,
    lr, lr_ptr, log_beta1, log_beta2, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay, inv_scale_ptr, found_inf_ptr, seed,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr,
    HAS_LR_TENSOR: tl.constexpr, HAS_INV_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    AMSGRAD: tl.constexpr, HAS_MASTER: tl.constexpr, MAXIMIZE: tl.constexpr, ADAMW: tl.constexpr,
    STOCHASTIC_ROUNDING: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    w = tl.program_id(0)
    t = tl.load(work_tensor_ptr + w)
    start = tl.load(work_start_ptr + w)
    numel = tl.load(numel_ptr + t)
    p_ptr = tl.load(table_ptr + ROW_PARAM * n_tensors + t).to(tl.pointer_type(PARAM_DTYPE))
    g_ptr = tl.load(table_ptr + ROW_GRAD * n_tensors + t).to(tl.pointer_type(PARAM_DTYPE))
    m_ptr = tl.load(table_ptr + ROW_EXP_AVG * n_tensors + t).to(tl.pointer_type(STATE_DTYPE))
    v_ptr = tl.load(table_ptr + ROW_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(STATE_DTYPE))
    x_ptr = tl.load(table_ptr + ROW_MAX_EXP_AVG_SQ * n_tensors + t).to(tl.pointer_type(STATE_DTYPE))
    w_ptr = tl.load(table_ptr + ROW_MASTER * n_tensors + t).to(tl.pointer_type(tl.float32))
    step = tl.load(tl.load(table_ptr + ROW_STEP * n_tensors + t).to(tl.pointer_type(tl.float32)))

    if HAS_LR_TENSOR:
        lr = tl.load(lr_ptr)
    inv_scale = 1.0
    if HAS_INV_SCALE:
        inv_scale = tl.load(inv_scale_ptr)
    # A GradScaler found inf/NaN: every store is masked off, the step changes nothing.
    store_limit = numel
    if HAS_FOUND_INF:
        store_limit = tl.where(tl.load(found_inf_ptr) == 0.0, numel, 0)
    # Folded: (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)), one division per element.
    bc2_sqrt = tl.sqrt(_one_minus_pow(log_beta2, step))
    step_size = lr * bc2_sqrt / _one_minus_pow(log_beta1, step)
    eps_hat = eps * bc2_sqrt
    gsign = inv_scale
    if MAXIMIZE:
        gsign = -inv_scale

    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        mask = idx < numel
        smask = idx < store_limit
        if HAS_MASTER:
            p = tl.load(w_ptr + idx, mask=mask, other=0.0)
        else:
            p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32) * gsign
        m = tl.load(m_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if ADAMW:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * g * g
        vden = v
        if AMSGRAD:
            vden = tl.maximum(tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32), v)
            tl.store(x_ptr + idx, cast_for_store(vden, STATE_DTYPE), mask=smask)
        p = p - step_size * m / (tl.sqrt(vden) + eps_hat)
        tl.store(m_ptr + idx, cast_for_store(m, STATE_DTYPE), mask=smask)
        tl.store(v_ptr + idx, cast_for_store(v, STATE_DTYPE), mask=smask)
        if HAS_MASTER:
            tl.store(w_ptr + idx, p, mask=smask)
        if STOCHASTIC_ROUNDING:
            # fp32 -> bf16 by adding 16 random bits below the kept ones, then truncating (unbiased).
            rnd = _sr_hash(seed.to(tl.uint32), t.to(tl.uint32), idx.to(tl.uint32)) >> 16
            bits = p.to(tl.uint32, bitcast=True)
            finite = tl.abs(p) < float("inf")
            bits = tl.where(finite, bits + rnd, bits)
            rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
            tl.store(p_ptr + idx, rounded, mask=smask)
        else:
            tl.store(p_ptr + idx, cast_for_store(p, PARAM_DTYPE), mask=smask)
