"""Rotary embedding kernel and its launcher.

One program per (position b*T + t, block of BLOCK_HEADS heads): the position's cos/sin are
loaded once and applied to every head in the block. With the two partners of each rotated pair
(rotate-half: x1 = x[:D/2], x2 = x[D/2:]; interleaved: x1 = x[0::2], x2 = x[1::2]) and their
cos/sin entries c1, c2, s1, s2:
    forward:  o1 = x1 c1 - x2 s1,   o2 = x2 c2 + x1 s2
    inverse:  o1 = x1 c1 + x2 s2,   o2 = x2 c2 - x1 s1     (the transpose: the backward)
x (B, NH, T, D) with any strides (unit last stride); out contiguous; cos/sin (1 or B, T, D)
contiguous. fp32 arithmetic, one rounding per output. Rotate-half halves are contiguous runs
(16-byte loads); the interleaved layout loads every other element.
"""
import torch
import triton
import triton.language as tl

from lmkernels.triton._common import cast_for_store, tl_dtype


@triton.jit
def rotary_embedding_kernel(X, COS, SIN, OUT, stride_xb, stride_xh, stride_xt, stride_cb, NH, T,
                            HALF, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
                            OUT_DTYPE: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                            BLOCK_HALF: tl.constexpr):
    pos = tl.program_id(0).to(tl.int64)
    b = pos // T
    t = pos % T
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    j = tl.arange(0, BLOCK_HALF)
    jmask = j < HALF
    if INTERLEAVED:
        i1 = 2 * j
        i2 = 2 * j + 1
    else:
        i1 = j
        i2 = j + HALF
    cs = b * stride_cb + t * (2 * HALF)
    c1 = tl.load(COS + cs + i1, mask=jmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cs + i2, mask=jmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cs + i1, mask=jmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cs + i2, mask=jmask, other=0.0).to(tl.float32)
    mask = (heads[:, None] < NH) & jmask[None, :]
    x_row = X + b * stride_xb + heads[:, None].to(tl.int64) * stride_xh + t * stride_xt
    x1 = tl.load(x_row + i1[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + i2[None, :], mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        o1 = x1 * c1[None, :] + x2 * s2[None, :]
        o2 = x2 * c2[None, :] - x1 * s1[None, :]
    else:
        o1 = x1 * c1[None, :] - x2 * s1[None, :]
        o2 = x2 * c2[None, :] + x1 * s2[None, :]
    o_row = OUT + ((b * NH + heads[:, None].to(tl.int64)) * T + t) * (2 * HALF)
    tl.store(o_row + i1[None, :], cast_for_store(o1, OUT_DTYPE), mask=mask)
    tl.store(o_row + i2[None, :], cast_for_store(o2, OUT_DTYPE), mask=mask)


def _rotate(x, cos, sin, interleaved, inverse):
    B, NH, T, D = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((B, NH, T, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_half = triton.next_power_of_2(D // 2)
    # ~2K elements per program: enough loads in flight, few registers (checked by the gate).
    block_heads = min(triton.next_power_of_2(NH), max(1, 2048 // (2 * block_half)))
    grid = (B * T, triton.cdiv(NH, block_heads))
    rotary_embedding_kernel[grid](
        x, cos, sin, out, x.stride(0), x.stride(1), x.stride(2), 0 if cos.shape[0] == 1 else T * D,
        NH, T, D // 2, INTERLEAVED=interleaved, INVERSE=inverse, OUT_DTYPE=tl_dtype(x.dtype),
        BLOCK_HEADS=block_heads, BLOCK_HALF=block_half, num_warps=4)
    return out


def rotary_embedding(q, k, cos, sin, interleaved, inverse):
    """-> (q_rot, k_rot), contiguous. Arguments checked by the caller."""
    cos, sin = cos.contiguous(), sin.contiguous()
    return _rotate(q, cos, sin, interleaved, inverse), _rotate(k, cos, sin, interleaved, inverse)
