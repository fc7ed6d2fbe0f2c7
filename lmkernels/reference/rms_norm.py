"""Pure-PyTorch RMSNorm (Hugging Face LlamaRMSNorm semantics), the reference for every kernel.

    rstd = 1 / sqrt(mean(x^2, -1) + eps)
    out  = weight * (x * rstd).to(x.dtype)       (normalized in float32, cast back, then scaled;
                                                  the output takes torch's promotion of the two)
    add_rms_norm: s = x + residual (in x's dtype), returns (rms_norm(s), s)

compute_dtype=None runs exactly LlamaRMSNorm.forward (the eager composition users run today);
compute_dtype=torch.float64 runs everything in float64 with no intermediate rounding (the truth).
"""
from typing import Optional, Tuple

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                       compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    if compute_dtype is not None:
        xc = x.to(compute_dtype)
        rstd = torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
        return weight.to(compute_dtype) * (xc * rstd)
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float = 1e-6, compute_dtype: Optional[torch.dtype] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
    if compute_dtype is not None:
        s = x.to(compute_dtype) + residual.to(compute_dtype)
    else:
        s = x + residual
    return rms_norm_reference(s, weight, eps, compute_dtype), s
