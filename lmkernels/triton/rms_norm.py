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


def _block_and_warps(H: int):
    if H > MAX_HIDDEN:
        raise ValueError(f"rms_norm (Triton): hidden size H must be <= {MAX_HIDDEN}; got {H}")
    block = triton.next_power_of_2(H)
    # A warp loads 512 B per 16-byte-vector instruction: aim at <= 8 vectors per thread.
    warps = 1 if block <= 512 else 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, warps


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
        block, warps = _block_and_warps(H)
        rms_norm_fwd_kernel[(rows,)](
            x2, r2, weight.contiguous(), out, s, rstd, x2.stride(0), r2.stride(0), H, float(eps),
            HAS_RESIDUAL=residual is not None, X_DTYPE=tl_dtype(x.dtype),
            OUT_DTYPE=tl_dtype(weight.dtype), BLOCK_H=block, num_warps=warps)
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
    block, warps = _block_and_warps(H)
    programs = _programs(rows, x.device)
    per_program = triton.cdiv(rows, programs)
    programs = triton.cdiv(rows, per_program)
    partial = torch.empty((programs, H), dtype=torch.float32, device=x.device)
    rms_norm_bwd_kernel[(programs,)](
        g2, x2, weight.contiguous(), rstd.contiguous(), gs2, dx, partial, g2.stride(0),
        x2.stride(0), gs2.stride(0), rows, H, per_program, HAS_GRAD_SUM=grad_sum is not None, CHUNK_ROWS=32,
        X_DTYPE=tl_dtype(x.dtype), BLOCK_H=block, num_warps=warps)
    return dx, partial.sum(0).to(weight.dtype)
