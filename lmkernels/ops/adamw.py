"""fused_adamw_: one multi-tensor AdamW/Adam step over a parameter group, in place.

torch.ops.lmkernels.fused_adamw_  schema and argument checks: csrc/adamw.cpp
    CPU tensors   the C++ kernel (csrc/cpu/adamw_cpu.cpp)
    CUDA tensors  `_on_cuda` below picks from BACKEND_TABLE: the CUDA C++ kernel
                  (csrc/cuda/adamw_cuda.cu, when compiled) or the Triton launcher
                  lmkernels.triton.adamw.fused_adamw (after the C++ checks)
How `backend=` and LMK_BACKEND choose: lmkernels/ops/_common.py.

The caller increments state_steps (float32, one per tensor) before the call, as torch's
fused AdamW does; a step count below 1 is an error where it costs no device sync, i.e. for
CPU step tensors (CUDA step counts are not read on the host: a 0 there gives NaN weights).
Math: lmkernels/reference/adamw.py.
"""
from typing import Optional, Sequence

import torch

from lmkernels._extension import load_extension
from lmkernels.ops._common import BackendTable, cuda_kernel
from lmkernels.triton import adamw as triton_adamw

_LISTS = ("grads", "exp_avgs", "exp_avg_sqs", "state_steps")
_LIKE_PARAMS = ("grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params")


@torch.library.register_fake("lmkernels::fused_adamw_")
def _fused_adamw_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params,
                      state_steps, **kwargs) -> None:
    # Mutates in place, returns nothing: under tracing, check what shapes can be checked.
    lists = dict(grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                 max_exp_avg_sqs=max_exp_avg_sqs, master_params=master_params,
                 state_steps=state_steps)
    n = len(params)
    for name in _LISTS + (("max_exp_avg_sqs",) if kwargs.get("amsgrad") else ()):
        torch._check(len(lists[name]) == n, lambda: (
            f"fused_adamw_: {name} must have one tensor per entry of params ({n}); got {len(lists[name])}"))
    for name in _LIKE_PARAMS:
        for i, t in enumerate(lists[name][:n] if len(lists[name]) else ()):
            torch._check(t.shape == params[i].shape, lambda: (
                f"fused_adamw_: {name}[{i}] has shape {tuple(t.shape)} but params[{i}] has shape "
                f"{tuple(params[i].shape)}"))
    for i, s in enumerate(state_steps):
        torch._check(s.numel() == 1, lambda: (
            f"fused_adamw_: state_steps[{i}] must hold exactly one value; got shape {tuple(s.shape)}"))


def _triton_kernel(*args) -> None:
    """The Triton path: the C++ checks, then the launcher (args in schema order, no backend)."""
    load_extension().check_fused_adamw_args(*args)
    triton_adamw.fused_adamw(*args)


# On CUDA tensors, "auto" prefers the CUDA C++ kernel (apex-style multi-tensor launch) when
# compiled, else Triton.
BACKEND_TABLE = BackendTable("fused_adamw_", {"cuda": cuda_kernel("fused_adamw_cuda"),
                                              "triton": _triton_kernel})


@torch.library.impl("lmkernels::fused_adamw_", "CUDA")
def _on_cuda(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps, *,
             lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode, lr_tensor=None,
             inv_scale=None, found_inf=None, stochastic_rounding_seed=-1, backend="auto") -> None:
    BACKEND_TABLE.pick(backend)(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, state_steps,
        lr, beta1, beta2, eps, weight_decay, amsgrad, maximize, adam_w_mode, lr_tensor,
        inv_scale, found_inf, stochastic_rounding_seed)


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

    params, grads: same shapes and dtype (float32, bfloat16 or float16), one device, contiguous,
    distinct tensors. exp_avgs, exp_avg_sqs (and max_exp_avg_sqs with amsgrad): the params'
    dtype or float32. master_params: optional float32 master weights; the update happens there
    and params get the rounded result. state_steps: one float32 scalar per tensor (CPU for the
    CPU kernel, on the params' device otherwise), already incremented for this step (>= 1).
    lr >= 0 (a float, or a float32 tensor on the params' device).
    inv_scale / found_inf: from a GradScaler; grads are multiplied by inv_scale, and if
    found_inf is non-zero nothing changes. stochastic_rounding_seed >= 0 rounds bf16 params
    stochastically (no master weights). backend: "auto", "cpu", "cuda" or "triton"
    (lmkernels/ops/_common.py).
    """
    params = list(params)
    if not params:
        return
    lr_tensor = lr if isinstance(lr, torch.Tensor) else None
    lr_value = 0.0 if lr_tensor is not None else float(lr)
    if lr_tensor is not None and lr_tensor.dtype != torch.float32:
        lr_tensor = lr_tensor.float()
    torch.ops.lmkernels.fused_adamw_(
        params, list(grads), list(exp_avgs), list(exp_avg_sqs), list(max_exp_avg_sqs),
        list(master_params), list(state_steps), lr=lr_value, beta1=float(beta1),
        beta2=float(beta2), eps=float(eps), weight_decay=float(weight_decay),
        amsgrad=bool(amsgrad), maximize=bool(maximize), adam_w_mode=bool(adam_w_mode),
        lr_tensor=lr_tensor, inv_scale=inv_scale, found_inf=found_inf,
        stochastic_rounding_seed=int(stochastic_rounding_seed), backend=backend)
