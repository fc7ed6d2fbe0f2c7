"""Triton kernel of fused_adamw_: one launch updates every tensor of a parameter group.

Each program owns one (tensor, chunk) work item. Tensor addresses come from a table
(int64, [7, n_tensors]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, step),
so there is one launch per list whatever the number of tensors. Column t of the table is
params[t] of the caller's list (empty tensors included, they just get no work items), so the
stochastic-rounding hash sees the same tensor index as the C++ kernels.

Per element, in fp32 (g = grad * inv_scale, negated if MAXIMIZE; Adam-L2 adds wd * p):
    p  *= 1 - lr * wd                        (ADAMW)
    m   = m + (1 - beta1) * (g - m)
    v   = beta2 * v + (1 - beta2) * g^2       (vmax = max(vmax, v) with AMSGRAD)
    p  -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Specialization: constexprs only where they change the memory traffic (dtypes, AMSGRAD, master
weights, stochastic rounding, alignment); the cheap scalar switches (lr tensor, GradScaler
inv_scale / found_inf, maximize, AdamW vs Adam-L2) are bits of the runtime `flags`, and `seed`,
`n_tensors`, `flags` are never specialized, so no seed or list length recompiles the kernel.
A chunk that is full and whose tensors are all 16-byte aligned runs unmasked, which lets the
compiler emit 16-byte vector loads; the last chunk of a tensor is masked.
"""
import math
from typing import Sequence

import torch
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype
from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

# Rows of the address table (tl.constexpr objects: a @triton.jit function may read only
# globals that are constexpr instances; an annotation `X: tl.constexpr = 0` is not enough).
ROW_PARAM = tl.constexpr(0)
ROW_GRAD = tl.constexpr(1)
ROW_EXP_AVG = tl.constexpr(2)
ROW_EXP_AVG_SQ = tl.constexpr(3)
ROW_MAX_EXP_AVG_SQ = tl.constexpr(4)
ROW_MASTER = tl.constexpr(5)
ROW_STEP = tl.constexpr(6)
N_ROWS = 7

# Bits of the runtime `flags` argument.
FLAG_LR_TENSOR = tl.constexpr(1)
FLAG_INV_SCALE = tl.constexpr(2)
FLAG_FOUND_INF = tl.constexpr(4)
FLAG_MAXIMIZE = tl.constexpr(8)
FLAG_ADAMW = tl.constexpr(16)

# Elements per program and per loop step. On GPU a program streams CHUNK elements in BLOCK-wide
# tiles (8 tiles in flight per program); the CPU interpreter takes one tile per program.
GPU_BLOCK, GPU_CHUNK = 1024, 8192
INTERPRETER_BLOCK, INTERPRETER_CHUNK = 256, 256
ALIGNMENT = 16  # bytes: one vector load


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
def _load(ptr, idx, numel, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=idx < numel, other=0.0).to(tl.float32)
    else:
        return tl.load(ptr + idx).to(tl.float32)


@triton.jit
def _store(ptr, idx, numel, x, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, x, mask=idx < numel)
    else:
        tl.store(ptr + idx, x)


@triton.jit
def _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, t, start, numel,
                  gsign, decay, l2, step_size, eps_hat, one_minus_beta1, beta2, one_minus_beta2, seed,
                  PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                  HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr,
                  MASKED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    for off in range(0, CHUNK, BLOCK):
        idx = start + off + tl.arange(0, BLOCK)
        if HAS_MASTER:
            p = _load(w_ptr, idx, numel, MASKED)
        else:
            p = _load(p_ptr, idx, numel, MASKED)
        g = _load(g_ptr, idx, numel, MASKED) * gsign
        m = _load(m_ptr, idx, numel, MASKED)
        v = _load(v_ptr, idx, numel, MASKED)
        p = p * decay  # AdamW's decoupled decay (decay = 1 for Adam-L2)
        g = tl.where(l2 != 0.0, g + l2 * p, g)  # Adam-L2 (where: 0 * inf must not reach g)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * g * g
        vden = v
        if AMSGRAD:
            vden = tl.maximum(_load(x_ptr, idx, numel, MASKED), v)
            _store(x_ptr, idx, numel, cast_for_store(vden, STATE_DTYPE), MASKED)
        p = p - step_size * m / (tl.sqrt(vden) + eps_hat)
        _store(m_ptr, idx, numel, cast_for_store(m, STATE_DTYPE), MASKED)
        _store(v_ptr, idx, numel, cast_for_store(v, STATE_DTYPE), MASKED)
        if HAS_MASTER:
            _store(w_ptr, idx, numel, p, MASKED)
        if STOCHASTIC_ROUNDING:
            # fp32 -> bf16 by adding 16 random bits below the kept ones, then truncating
            # (unbiased); inf/NaN pass through unchanged, as in the C++ kernels.
            rnd = _sr_hash(seed, t.to(tl.uint32), idx.to(tl.uint32)) >> 16
            bits = p.to(tl.uint32, bitcast=True)
            bits = tl.where(tl.abs(p) < float("inf"), bits + rnd, bits)
            _store(p_ptr, idx, numel, (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True), MASKED)
        else:
            _store(p_ptr, idx, numel, cast_for_store(p, PARAM_DTYPE), MASKED)


@triton.jit
def _pointer(table_ptr, row, t, n_tensors, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address in the table, as a DTYPE pointer."""
    ptr = tl.load(table_ptr + row * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        # The launcher checked every address of the table. The hint must sit on the pointer:
        # Triton's alignment analysis does not carry it through the int -> pointer cast.
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit(do_not_specialize=["n_tensors", "seed", "flags"])
def fused_adamw_kernel(
    table_ptr, numel_ptr, work_tensor_ptr, work_chunk_ptr, n_tensors,
    lr, lr_ptr, log_beta1, log_beta2, beta2, one_minus_beta1, one_minus_beta2, eps, weight_decay,
    inv_scale_ptr, found_inf_ptr, seed, flags,
    PARAM_DTYPE: tl.constexpr, STATE_DTYPE: tl.constexpr, AMSGRAD: tl.constexpr,
    HAS_MASTER: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, ALIGNED: tl.constexpr,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    w = tl.program_id(0)
    t = tl.load(work_tensor_ptr + w)
    start = tl.load(work_chunk_ptr + w).to(tl.int64) * CHUNK  # a multiple of CHUNK, known to the compiler
    numel = tl.load(numel_ptr + t)
    p_ptr = _pointer(table_ptr, ROW_PARAM, t, n_tensors, PARAM_DTYPE, ALIGNED)
    g_ptr = _pointer(table_ptr, ROW_GRAD, t, n_tensors, PARAM_DTYPE, ALIGNED)
    m_ptr = _pointer(table_ptr, ROW_EXP_AVG, t, n_tensors, STATE_DTYPE, ALIGNED)
    v_ptr = _pointer(table_ptr, ROW_EXP_AVG_SQ, t, n_tensors, STATE_DTYPE, ALIGNED)
    x_ptr = _pointer(table_ptr, ROW_MAX_EXP_AVG_SQ, t, n_tensors, STATE_DTYPE, ALIGNED)
    w_ptr = _pointer(table_ptr, ROW_MASTER, t, n_tensors, tl.float32, ALIGNED)
    step = tl.load(tl.load(table_ptr + ROW_STEP * n_tensors + t).to(tl.pointer_type(tl.float32)))

    if (flags & FLAG_LR_TENSOR) != 0:
        lr = tl.load(lr_ptr)
    inv_scale = 1.0
    if (flags & FLAG_INV_SCALE) != 0:
        inv_scale = tl.load(inv_scale_ptr)
    if (flags & FLAG_FOUND_INF) != 0:
        # A GradScaler found inf/NaN: nothing is read or written, the step changes nothing.
        numel = tl.where(tl.load(found_inf_ptr) == 0.0, numel, 0)
    # Folded: (lr sqrt(bc2) / bc1) * m / (sqrt(v) + eps sqrt(bc2)), one division per element.
    bc2_sqrt = tl.sqrt(_one_minus_pow(log_beta2, step))
    step_size = lr * bc2_sqrt / _one_minus_pow(log_beta1, step)
    eps_hat = eps * bc2_sqrt
    gsign = tl.where((flags & FLAG_MAXIMIZE) != 0, -inv_scale, inv_scale)
    adamw = (flags & FLAG_ADAMW) != 0
    decay = tl.where(adamw, 1.0 - lr * weight_decay, 1.0)
    l2 = tl.where(adamw, 0.0, weight_decay)
    seed = seed.to(tl.uint32)

    if ALIGNED:
        if start + CHUNK <= numel:
            _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, t, start, numel, gsign, decay, l2,
                          step_size, eps_hat, one_minus_beta1, beta2, one_minus_beta2, seed,
                          PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_MASTER, STOCHASTIC_ROUNDING,
                          False, CHUNK, BLOCK)
        else:
            _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, t, start, numel, gsign, decay, l2,
                          step_size, eps_hat, one_minus_beta1, beta2, one_minus_beta2, seed,
                          PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_MASTER, STOCHASTIC_ROUNDING,
                          True, CHUNK, BLOCK)
    else:
        _update_chunk(p_ptr, g_ptr, m_ptr, v_ptr, x_ptr, w_ptr, t, start, numel, gsign, decay, l2,
                      step_size, eps_hat, one_minus_beta1, beta2, one_minus_beta2, seed,
                      PARAM_DTYPE, STATE_DTYPE, AMSGRAD, HAS_MASTER, STOCHASTIC_ROUNDING,
                      True, CHUNK, BLOCK)


# Work tables depend only on the tensors' addresses and sizes, which an optimizer keeps from
# step to step: cache them so a step costs no host-side table building or copies.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_MAX = 64


def _work_tables(lists: Sequence[Sequence[torch.Tensor]], chunk: int, device: torch.device):
    """-> (address table, numel, work tensor index, work chunk index, all addresses aligned)."""
    params = lists[ROW_PARAM]
    key = (device, chunk) + tuple(
        tuple((t.data_ptr(), t.numel()) for t in lst) for lst in lists
    )
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(params)
    # An absent list (no AMSGRAD, no master weights) points at the params: never read.
    addresses = [[t.data_ptr() for t in lst] if len(lst) else [params[i].data_ptr() for i in range(n)]
                 for lst in lists]
    numel = [p.numel() for p in params]
    work_tensor, work_chunk = [], []
    for i, count in enumerate(numel):
        for c in range(triton.cdiv(count, chunk)):
            work_tensor.append(i)
            work_chunk.append(c)
    # Step counters are scalars read one by one: they need no alignment.
    aligned = all(a % ALIGNMENT == 0 for row in addresses[:ROW_STEP] for a in row)
    tables = (
        torch.tensor(addresses, dtype=torch.int64).to(device),
        torch.tensor(numel, dtype=torch.int64).to(device),
        torch.tensor(work_tensor, dtype=torch.int32).to(device),
        torch.tensor(work_chunk, dtype=torch.int32).to(device),
        aligned,
    )
    if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = tables
    return tables


def _fused_adamw_launch(table, numel, work_tensor, work_chunk, n_tensors,
                        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode,
                        lr_tensor, inv_scale, found_inf, stochastic_rounding_seed,
                        param_dtype, state_dtype, has_master, aligned, block, chunk, dummy) -> Launch:
    """The kernel call for these arguments (shared by the launcher and compile_specs). dummy: any
    float32 tensor, passed for an absent lr_tensor / inv_scale / found_inf (never read; float32
    so the kernel's signature does not depend on which are present)."""
    bits = [(lr_tensor is not None, FLAG_LR_TENSOR), (inv_scale is not None, FLAG_INV_SCALE),
            (found_inf is not None, FLAG_FOUND_INF), (maximize, FLAG_MAXIMIZE), (adam_w_mode, FLAG_ADAMW)]
    flags = sum(flag.value for on, flag in bits if on)
    # Stochastic rounding exists for bf16 params only: other dtypes round to nearest even, as
    # in the C++ kernels (an fp32 param must not be quantized to bf16).
    stochastic = stochastic_rounding_seed >= 0 and param_dtype == torch.bfloat16
    return Launch(fused_adamw_kernel, (
        table, numel, work_tensor, work_chunk, n_tensors,
        lr, lr_tensor if lr_tensor is not None else dummy,
        # Formed in double here: in fp32, 1 - 0.9 is 2e-7 off and log(beta) loses digits.
        math.log(beta1) if beta1 > 0 else -1e30, math.log(beta2) if beta2 > 0 else -1e30, beta2,
        1.0 - beta1, 1.0 - beta2, eps, weight_decay,
        inv_scale if inv_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        max(stochastic_rounding_seed, 0) & 0xFFFFFFFF, flags,
    ), dict(
        PARAM_DTYPE=tl_dtype(param_dtype), STATE_DTYPE=tl_dtype(state_dtype), AMSGRAD=bool(amsgrad),
        HAS_MASTER=bool(has_master), STOCHASTIC_ROUNDING=stochastic, ALIGNED=bool(aligned),
        CHUNK=chunk, BLOCK=block, num_warps=4,
    ))


def fused_adamw(
    params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
    lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode,
    lr_tensor, inv_scale, found_inf, stochastic_rounding_seed, *, block=None, chunk=None,
) -> None:
    """One launch over every tensor of the lists (the arguments of torch.ops.lmkernels.fused_adamw_,
    in schema order; no argument checks: the op checks before calling this on CUDA tensors, the
    interpreter tests call it directly on CPU tensors). block / chunk (elements per tile and per
    program, powers of two, block <= chunk) override the defaults, for tests."""
    if not any(p.numel() for p in params):
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps]
    device = params[0].device
    on_gpu = device.type == "cuda"
    block = block or (GPU_BLOCK if on_gpu else INTERPRETER_BLOCK)
    chunk = chunk or (GPU_CHUNK if on_gpu else INTERPRETER_CHUNK)
    table, numel, work_tensor, work_chunk, aligned = _work_tables(lists, chunk, device)
    launch = _fused_adamw_launch(
        table, numel, work_tensor, work_chunk, len(params), lr, beta1, beta2, eps, weight_decay,
        amsgrad, maximize, adam_w_mode, lr_tensor, inv_scale, found_inf, stochastic_rounding_seed,
        params[0].dtype, exp_avgs[0].dtype, len(master_params) > 0, aligned, block, chunk, state_steps[0])
    with torch.cuda.device(device) if on_gpu else _no_context():
        launch.run((work_tensor.numel(),))


class _no_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# dtype pairs the op accepts: state in the param dtype or fp32.
_DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                (torch.float16, torch.float32)]
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compile_specs():
    """Every specialization fused_adamw can launch on GPU: dtype pairs x AMSGRAD x master weights
    x stochastic rounding (bf16 params without master weights) x aligned/unaligned, plus the
    runtime switches at both settings and seeds 1 and 16 (which must not recompile)."""
    i64, i32 = ArgTensor(torch.int64), ArgTensor(torch.int32)
    scalar = ArgTensor(torch.float32)
    for param_dtype, state_dtype in _DTYPE_PAIRS:
        for amsgrad in (False, True):
            for master in (False, True):
                for seed in ((-1, 1, 16) if param_dtype == torch.bfloat16 and not master else (-1,)):
                    for aligned in (True, False):
                        # Runtime switches all on for one variant, all off for the other.
                        on = amsgrad
                        launch = _fused_adamw_launch(
                            i64, i64, i32, i32, 3, 1e-3, 0.9, 0.999, 1e-8, 0.01, amsgrad, on, not on,
                            scalar if on else None, scalar if on else None, scalar if on else None,
                            seed, param_dtype, state_dtype, master, aligned, GPU_BLOCK, GPU_CHUNK, scalar)
                        name = (f"fused_adamw {_NAMES[param_dtype]}/{_NAMES[state_dtype]}"
                                f"{' amsgrad' if amsgrad else ''}{' master' if master else ''}"
                                f"{f' sr seed={seed}' if seed >= 0 else ''}"
                                f"{'' if aligned else ' unaligned'}")
                        yield CompileSpec(name, launch, vector_loads=aligned)
