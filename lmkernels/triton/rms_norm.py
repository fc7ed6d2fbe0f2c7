"""RMSNorm kernels (forward, fused residual add, backward) and their launchers.

Shapes: x, residual, sum, dx (rows, H) with unit stride along H (row strides passed in); out,
grad_out (rows, H) in weight's dtype; weight (H,); rstd (rows,) float32. One program per row
for the forward (the whole row in registers, BLOCK_H = next power of two >= H):
    s    = round_x(x + residual)                          (add_rms_norm only; stored)
    rstd = 1 / sqrt(sum(x^2) / H + eps)
    out  = round_out(weight * round_x(x * rstd))           (HF LlamaRMSNorm)
Backward, G programs each owning a contiguous block of rows (n = x * rstd, dn = g * w):
    dx = rstd * (dn - n * sum(dn * n) / H) [+ grad_sum],  dweight_partial[pid] = sum g * n
and dweight = dweight_partial.sum(0) afterwards (no atomics, deterministic).
All arithmetic in fp32.
"""
import torch
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype, triton_interpreted
from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

MAX_HIDDEN = 65536  # one row lives in registers: 64 Ki fp32 over 16 warps is 128 per thread


@triton.jit
def rms_norm_fwd_kernel(X, R, W, OUT, SUM, RSTD, stride_x, stride_r, H, eps,
                        HAS_RESIDUAL: tl.constexpr, X_DTYPE: tl.constexpr,
                        OUT_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        s = cast_for_store(x + r, X_DTYPE)
        tl.store(SUM + row * H + cols, s, mask=mask)
        x = s.to(tl.float32)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / H + eps)
    tl.store(RSTD + row, rstd)
    n = cast_for_store(x * rstd, X_DTYPE).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * H + cols, cast_for_store(n * w, OUT_DTYPE), mask=mask)


@triton.jit
def rms_norm_bwd_kernel(G, X, W, RSTD, GSUM, DX, DW_PARTIAL, stride_g, stride_x, stride_gs,
                        rows, H, rows_per_program, HAS_GRAD_SUM: tl.constexpr, CHUNK_ROWS: tl.constexpr,
                        X_DTYPE: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_H], dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    # Two-level summation of dweight (chunks of CHUNK_ROWS rows, then across chunks): keeps
    # its fp32 error near torch's cascade sum when a program owns hundreds of rows.
    for c in range(0, rows_per_program, CHUNK_ROWS):
        dw_chunk = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i in range(0, CHUNK_ROWS):
            row = row_start + c + i
            ok = (row < rows) & (c + i < rows_per_program)  # blocks may end mid-chunk
            m = mask & ok
            rstd = tl.load(RSTD + row, mask=ok, other=0.0)
            n = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32) * rstd
            g = tl.load(G + row * stride_g + cols, mask=m, other=0.0).to(tl.float32)
            dw_chunk += g * n
            dn = g * w
            c_row = tl.sum(dn * n, axis=0) / H
            dx = rstd * (dn - n * c_row)
            if HAS_GRAD_SUM:
                dx += tl.load(GSUM + row * stride_gs + cols, mask=m, other=0.0).to(tl.float32)
            tl.store(DX + row * H + cols, cast_for_store(dx, X_DTYPE), mask=m)
        dw += dw_chunk
    tl.store(DW_PARTIAL + pid.to(tl.int64) * H + cols, dw, mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, H) view with unit stride along H (a copy only when no such view exists)."""
    v = t.reshape(-1, t.shape[-1])
    return v if v.stride(1) == 1 else v.contiguous()


def _block_and_warps(H: int, backward: bool = False):
    if H > MAX_HIDDEN:
        raise ValueError(f"rms_norm (Triton): hidden size H must be <= {MAX_HIDDEN}; got {H}")
    block = triton.next_power_of_2(H)
    # A warp loads 512 B per 16-byte-vector instruction: aim at <= 8 vectors per thread.
    warps = 1 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    # The backward keeps ~6 row arrays live (w, dweight, its chunk sum, n, g, dn): with the
    # forward's warps it spilled (sm_90: 8 B at H = 1000 bf16, 24 B at H = 8192 fp32, 230-255
    # registers); twice the warps halves the elements per thread.
    return block, min(32, 2 * warps) if backward else warps


def _fwd_launch(x2, r2, weight, out, s, rstd, eps, has_residual) -> Launch:
    """The forward's kernel call (shared by the launcher and compile_specs)."""
    H = x2.size(1)
    block, warps = _block_and_warps(H)
    return Launch(rms_norm_fwd_kernel,
                  (x2, r2, weight, out, s, rstd, x2.stride(0), r2.stride(0), H, float(eps)),
                  dict(HAS_RESIDUAL=has_residual, X_DTYPE=tl_dtype(x2.dtype),
                       OUT_DTYPE=tl_dtype(weight.dtype), BLOCK_H=block, num_warps=warps))


def _bwd_launch(g2, x2, weight, rstd, gs2, dx, partial, rows, per_program, has_grad_sum) -> Launch:
    H = x2.size(1)
    block, warps = _block_and_warps(H, backward=True)
    return Launch(rms_norm_bwd_kernel,
                  (g2, x2, weight, rstd, gs2, dx, partial, g2.stride(0), x2.stride(0), gs2.stride(0),
                   rows, H, per_program),
                  dict(HAS_GRAD_SUM=has_grad_sum, CHUNK_ROWS=32, X_DTYPE=tl_dtype(x2.dtype),
                       BLOCK_H=block, num_warps=warps))


def rms_norm_fwd(x, weight, eps, residual=None):
    """-> (out, rstd) or, with residual, (out, sum, rstd). Arguments checked by the caller."""
    H = x.shape[-1]
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=weight.dtype, device=x.device)
    s = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else out
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if rows > 0:
        _fwd_launch(x2, r2, weight.contiguous(), out, s, rstd, eps, residual is not None).run((rows,))
    return (out, s, rstd) if residual is not None else (out, rstd)


def _programs(rows: int, device: torch.device) -> int:
    if triton_interpreted() or device.type != "cuda":
        return max(1, min(rows, 4))
    return max(1, min(rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


def rms_norm_bwd(grad_out, x, weight, rstd, grad_sum=None):
    """-> (dx in x's dtype, dweight in weight's dtype). Arguments checked by the caller."""
    H = x.shape[-1]
    x2, g2 = _rows(x), _rows(grad_out)
    gs2 = _rows(grad_sum) if grad_sum is not None else x2
    rows = x2.shape[0]
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if rows == 0:
        return dx, torch.zeros_like(weight)
    _block_and_warps(H)  # the size check, before any allocation
    programs = _programs(rows, x.device)
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    partial = torch.empty((programs, H), dtype=torch.float32, device=x.device)
    _bwd_launch(g2, x2, weight.contiguous(), rstd.contiguous(), gs2, dx, partial, rows, per_program,
                grad_sum is not None).run((programs,))
    return dx, partial.sum(0).to(weight.dtype)


def compile_specs():
    """Every specialization the launchers make at Llama sizes (H = 4096, 8192; an unaligned
    H = 1000), for lmkernels.gpu_compile_check."""
    f32 = torch.float32
    for x_dtype, w_dtype in ((f32, f32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, f32),
                             (torch.float16, torch.float16)):
        low = x_dtype != f32
        name = f"{str(x_dtype)[6:]}/w {str(w_dtype)[6:]}"
        for H in (1000, 4096, 8192):
            rows = 4096
            x = ArgTensor(x_dtype, shape=(rows, H))
            out = ArgTensor(w_dtype, shape=(rows, H))
            w = ArgTensor(w_dtype, shape=(H,))
            stat = ArgTensor(f32, shape=(rows,))
            aligned = H % 16 == 0
            for res in (False, True):
                yield CompileSpec(f"rms_norm_fwd {name} H={H}{' +residual' if res else ''}",
                                  _fwd_launch(x, x, w, out, x, stat, 1e-6, res),
                                  no_spills=low, vector_loads=aligned)
                yield CompileSpec(f"rms_norm_bwd {name} H={H}{' +grad_sum' if res else ''}",
                                  _bwd_launch(out, x, w, stat, x, x, ArgTensor(f32, shape=(528, H)),
                                              rows, 8, res),
                                  no_spills=low, vector_loads=aligned)
