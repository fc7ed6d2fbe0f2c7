"""SwiGLU kernels (forward, backward) and their launchers.

    out   = silu(g) * u,  silu(g) = g / (1 + exp(-g))
    dgate = grad * u * s * (1 + g * (1 - s)),  dup = grad * g * s,  s = 1 / (1 + exp(-g))
(PyTorch's silu / silu_backward formulas; the backward recomputes s from gate.) Tensors are
(rows, I) with unit stride along I (row strides passed in: a gate/up pair chunked from one fused
projection needs no copy); outputs contiguous. One program per (row, BLOCK columns); fp32
arithmetic, one rounding per output.
"""
import torch
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype

BLOCK = 1024  # 4 warps x 32 lanes x 8 elements: two 16-byte fp32 (one bf16) loads per lane


@triton.jit
def swiglu_fwd_kernel(G, U, OUT, stride_g, stride_u, I, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    out = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + row * I + cols, cast_for_store(out, DTYPE), mask=mask)


@triton.jit
def swiglu_bwd_kernel(D, G, U, DG, DU, stride_d, stride_g, stride_u, I, DTYPE: tl.constexpr,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    d = tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * stride_u + cols, mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    dg = d * u * s * (1.0 + g * (1.0 - s))
    du = d * (g * s)
    tl.store(DG + row * I + cols, cast_for_store(dg, DTYPE), mask=mask)
    tl.store(DU + row * I + cols, cast_for_store(du, DTYPE), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor:
    v = t.reshape(-1, t.shape[-1])
    return v if v.stride(1) == 1 else v.contiguous()


def swiglu_fwd(gate, up):
    """-> silu(gate) * up, contiguous. Arguments checked by the caller."""
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g, u = _rows(gate), _rows(up)
    rows, I = g.shape
    swiglu_fwd_kernel[(rows, triton.cdiv(I, BLOCK))](
        g, u, out, g.stride(0), u.stride(0), I, DTYPE=tl_dtype(gate.dtype), BLOCK=BLOCK, num_warps=4)
    return out


def swiglu_bwd(grad_out, gate, up):
    """-> (dgate, dup), contiguous. Arguments checked by the caller."""
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty_like(dgate)
    if dgate.numel() == 0:
        return dgate, dup
    d, g, u = _rows(grad_out), _rows(gate), _rows(up)
    rows, I = g.shape
    swiglu_bwd_kernel[(rows, triton.cdiv(I, BLOCK))](
        d, g, u, dgate, dup, d.stride(0), g.stride(0), u.stride(0), I,
        DTYPE=tl_dtype(gate.dtype), BLOCK=BLOCK, num_warps=4)
    return dgate, dup
