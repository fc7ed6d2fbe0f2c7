"""fused_adamw_: one multi-tensor AdamW/Adam step over a parameter group, in place.

torch.ops.lmkernels.fused_adamw_       C++ CPU kernel and CUDA C++ kernel (csrc/), by dispatch key
torch.ops.lmkernels.fused_adamw_triton_  the Triton kernel (launcher: lmkernels.triton.adamw.fused_adamw)

The caller increments state_steps (float32, one per tensor) before the call, as torch's
fused AdamW does. Math: lmkernels/reference/adamw.py.
"""
from typing import Optional, Sequence

import torch

from lmkernels.ops._common import resolve_backend
from lmkernels.triton import adamw as kernels

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params")


@torch.library.register_fake("lmkernels::fused_adamw_")
def _fused_adamw_fake(*args, **kwargs) -> None:
    return None


@torch.library.custom_op("lmkernels::fused_adamw_triton_", mutates_args=_MUTATED)
def _fused_adamw_triton(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor],
    master_params: list[torch.Tensor], state_steps: list[torch.Tensor],
    lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    amsgrad: bool, maximize: bool, adam_w_mode: bool,
    lr_tensor: Optional[torch.Tensor], inv_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor], stochastic_rounding_seed: int,
) -> None:
    torch.ops.lmkernels.fused_adamw_check(  # the C++ kernels' argument checks
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
        lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
        maximize=maximize, adam_w_mode=adam_w_mode, lr_tensor=lr_tensor, inv_scale=inv_scale,
        found_inf=found_inf, stochastic_rounding_seed=stochastic_rounding_seed)
    kernels.fused_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                        state_steps, lr, beta1, beta2, eps, weight_decay, amsgrad, maximize,
                        adam_w_mode, lr_tensor, inv_scale, found_inf, stochastic_rounding_seed)


@_fused_adamw_triton.register_fake
def _(*args, **kwargs) -> None:
    return None


def fused_adamw_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    state_steps: Sequence[torch.Tensor],
    *,
    lr: float | torch.Tensor,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    adam_w_mode: bool = True,
    max_exp_avg_sqs: Sequence[torch.Tensor] = (),
    master_params: Sequence[torch.Tensor] = (),
    inv_scale: Optional[torch.Tensor] = None,
    found_inf: Optional[torch.Tensor] = None,
    stochastic_rounding_seed: int = -1,
    backend: str = "auto",
) -> None:
    """One AdamW (or Adam with L2 decay, adam_w_mode=False) step over lists of tensors, in place.

    params, grads: same shapes and dtype (float32, bfloat16 or float16), one device, contiguous.
    exp_avgs, exp_avg_sqs (and max_exp_avg_sqs with amsgrad): the params' dtype or float32.
    master_params: optional float32 master weights; the update happens there and params get
    the rounded result. state_steps: one float32 scalar per tensor (CPU for the CPU kernel,
    on the params' device otherwise), already incremented for this step.
    inv_scale / found_inf: from a GradScaler; grads are multiplied by inv_scale, and if
    found_inf is non-zero nothing changes. stochastic_rounding_seed >= 0 rounds bf16 params
    stochastically (no master weights). backend: "auto", "cpu", "cuda" or "triton".
    """
    params = list(params)
    if not params:
        return
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    if lr_tensor is not None and lr_tensor.dtype != torch.float32:
        lr_tensor = lr_tensor.float()
    which = resolve_backend("fused_adamw_", backend, params[0].device)
    args = (params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
            list(master_params), list(state_steps))
    kwargs = dict(lr=lr_value, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
                  weight_decay=float(weight_decay), amsgrad=bool(amsgrad), maximize=bool(maximize),
                  adam_w_mode=bool(adam_w_mode), lr_tensor=lr_tensor, inv_scale=inv_scale,
                  found_inf=found_inf, stochastic_rounding_seed=int(stochastic_rounding_seed))
    if which == "triton":
        torch.ops.lmkernels.fused_adamw_triton_(*args, **kwargs)
    else:
        torch.ops.lmkernels.fused_adamw_(*args, **kwargs)
