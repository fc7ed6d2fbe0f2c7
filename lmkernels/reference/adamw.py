"""Pure-PyTorch AdamW/Adam step, in float64, for testing fused_adamw_ (same arguments)."""
from typing import Optional, Sequence

import torch


@torch.no_grad()
def adamw_reference_(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor], state_steps: Sequence[torch.Tensor], *, lr: float,
    beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
    amsgrad: bool = False, maximize: bool = False, adam_w_mode: bool = True,
    max_exp_avg_sqs: Sequence[torch.Tensor] = (), inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
) -> None:
    """Updates the given tensors in place, computing in float64 and storing in their dtype."""
    if found_inf is not None and found_inf.item() != 0:
        return
    lr = float(lr)
    scale = 1.0 if inv_scale is None else inv_scale.double().item()
    for i, p in enumerate(params):
        step = float(state_steps[i].item())
        p64 = p.double()
        g = grads[i].double() * scale
        if maximize:
            g = -g
        if adam_w_mode:
            p64 = p64 * (1 - lr * weight_decay)
        else:
            g = g + weight_decay * p64
        m = exp_avgs[i].double() * beta1 + (1 - beta1) * g
        v = exp_avg_sqs[i].double() * beta2 + (1 - beta2) * g * g
        vden = v
        if amsgrad:
            vden = torch.maximum(max_exp_avg_sqs[i].double(), v)
            max_exp_avg_sqs[i].copy_(vden)
        denom = vden.sqrt() / (1 - beta2 ** step) ** 0.5 + eps
        p64 = p64 - lr / (1 - beta1 ** step) * m / denom
        p.copy_(p64)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
