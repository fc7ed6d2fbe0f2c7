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
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype

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


# Work tables depend only on the tensors' addresses and sizes, which an optimizer keeps from
# step to step: cache them so a step costs no host-side table building or copies.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_MAX = 64


def _work_tables(lists: Sequence[Sequence[torch.Tensor]], chunk: int, device: torch.device):
    params = lists[ROW_PARAM]
    key = (device, chunk) + tuple(
        tuple((t.data_ptr(), t.numel()) for t in lst) for lst in lists
    )
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(params)
    addresses = [[t.data_ptr() for t in lst] if len(lst) else [params[i].data_ptr() for i in range(n)]
                 for lst in lists]
    numel = [p.numel() for p in params]
    work_tensor, work_start = [], []
    for i, count in enumerate(numel):
        for start in range(0, count, chunk):
            work_tensor.append(i)
            work_start.append(start)
    tables = (
        torch.tensor(addresses, dtype=torch.int64).to(device),
        torch.tensor(numel, dtype=torch.int64).to(device),
        torch.tensor(work_tensor, dtype=torch.int32).to(device),
        torch.tensor(work_start, dtype=torch.int64).to(device),
    )
    if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = tables
    return tables


def fused_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode,
    lr_tensor, inv_scale, found_inf, stochastic_rounding_seed,
) -> None:
    """One launch over every tensor of the lists (the arguments of torch.ops.lmkernels.fused_adamw_,
    in schema order; no argument checks: the op checks before calling this on CUDA tensors, the
    interpreter tests call it directly on CPU tensors)."""
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    pick = lambda lst: [lst[i] for i in live] if len(lst) else []  # noqa: E731
    lists = [pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs),
             pick(master_params), pick(state_steps)]
    device = params[0].device
    # On GPU a program streams CHUNK elements in BLOCK-wide tiles; under the CPU interpreter
    # one tile per program keeps the (slow) interpreted loop short.
    block = 1024 if device.type == "cuda" else 256
    chunk = block * 8 if device.type == "cuda" else block
    table, numel, work_tensor, work_start = _work_tables(lists, chunk, device)
    dummy = table  # never read when the matching flag is off
    fused_adamw_kernel[(work_tensor.numel(),)](
        table, numel, work_tensor, work_start, len(live),
        lr, lr_tensor if lr_tensor is not None else dummy,
        # Formed in double here: in fp32, 1 - 0.9 is 2e-7 off and log(beta) loses digits.
        math.log(beta1) if beta1 > 0 else -1e30, math.log(beta2) if beta2 > 0 else -1e30, beta2,
        1.0 - beta1, 1.0 - beta2, eps, weight_decay,
        inv_scale if inv_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        max(stochastic_rounding_seed, 0) & 0xFFFFFFFF,
        PARAM_DTYPE=tl_dtype(params[0].dtype), STATE_DTYPE=tl_dtype(exp_avgs[0].dtype),
        HAS_LR_TENSOR=lr_tensor is not None, HAS_INV_SCALE=inv_scale is not None,
        HAS_FOUND_INF=found_inf is not None, AMSGRAD=amsgrad, HAS_MASTER=len(master_params) > 0,
        MAXIMIZE=maximize, ADAMW=adam_w_mode, STOCHASTIC_ROUNDING=stochastic_rounding_seed >= 0,
        CHUNK=chunk, BLOCK=block, num_warps=4,
    )
