"""Pure-PyTorch fused linear cross-entropy: the reference for every FLCE kernel.

    logits = hidden @ weight^T + bias                      (N, V), in compute_dtype
    logits = softcap * tanh(logits / softcap)              (Gemma 2; when softcap is given)
    loss_r = F.cross_entropy(logits, target, label_smoothing, ignore_index)[r]
           + z_loss * logsumexp(logits_r)^2                 (PaLM z-loss; 0 on ignored rows)
    loss   = sum_r loss_r / n_valid  (mean) | sum_r loss_r (sum) | loss_r (none)
z is the z-loss term alone, reduced the same way.
"""
from typing import Optional, Tuple

import torch
from torch.nn import functional as F


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss, z) in compute_dtype; differentiable. hidden (..., H), weight (V, H), target (...)."""
    h = hidden.reshape(-1, hidden.shape[-1]).to(compute_dtype)
    t = target.reshape(-1)
    logits = h @ weight.to(compute_dtype).T
    if bias is not None:
        logits = logits + bias.to(compute_dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    rows = F.cross_entropy(logits, t, ignore_index=ignore_index, label_smoothing=label_smoothing,
                           reduction="none")
    valid = t != ignore_index
    z_rows = torch.where(valid, z_loss * torch.logsumexp(logits, dim=-1) ** 2, 0.0)
    rows = rows + z_rows
    if reduction == "none":
        return rows.reshape(target.shape), z_rows.reshape(target.shape)
    if reduction == "sum":
        return rows.sum(), z_rows.sum()
    n_valid = valid.sum()
    return rows.sum() / n_valid, z_rows.sum() / n_valid
