"""fused_adamw_: one multi-tensor AdamW/Adam step over a parameter group, in place.

torch.ops.lmkernels.fused_adamw_       C++ CPU kernel and CUDA C++ kernel (csrc/), by dispatch key
torch.ops.lmkernels.fused_adamw_triton_  the Triton kernel (lmkernels/triton/adamw.py)

The caller increments state_steps (float32, one per tensor) before the call, as torch's
fused AdamW does. Math: lmkernels/reference/adamw.py.
"""
import math
from typing import Optional, Sequence

import torch

from lmkernels.ops._common import resolve_backend
from lmkernels.triton import adamw as kernels
from lmkernels.triton._common import tl_dtype

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "master_params")


@torch.library.register_fake("lmkernels::fused_adamw_")
def _fused_adamw_fake(*args, **kwargs) -> None:
    return None


# Work tables depend only on the tensors' addresses and sizes, which an optimizer keeps from
# step to step: cache them so a step costs no host-side table building or copies.
_TABLE_CACHE: dict = {}
_TABLE_CACHE_MAX = 64


def _work_tables(lists: Sequence[Sequence[torch.Tensor]], chunk: int, device: torch.device):
    params = lists[kernels.ROW_PARAM]
    key = (device, chunk) + tuple(
        tuple((t.data_ptr(), t.numel()) for t in lst) for lst in lists
    )
    hit = _TABLE_CACHE.get(key)
    if hit is not None:
        return hit
    n = len(params)
    addresses = [[t.data_ptr() for t in lst] if len(lst) else [params[i].data_ptr() for i in range(n)]
                 for lst in lists]
    numel = [p.numel() for p in params]
    work_tensor, work_start = [], []
    for i, count in enumerate(numel):
        for start in range(0, count, chunk):
            work_tensor.append(i)
            work_start.append(start)
    tables = (
        torch.tensor(addresses, dtype=torch.int64).to(device),
        torch.tensor(numel, dtype=torch.int64).to(device),
        torch.tensor(work_tensor, dtype=torch.int32).to(device),
        torch.tensor(work_start, dtype=torch.int64).to(device),
    )
    if len(_TABLE_CACHE) >= _TABLE_CACHE_MAX:
        _TABLE_CACHE.pop(next(iter(_TABLE_CACHE)))
    _TABLE_CACHE[key] = tables
    return tables


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
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    if not live:
        return
    pick = lambda lst: [lst[i] for i in live] if len(lst) else []  # noqa: E731
    lists = [pick(params), pick(grads), pick(exp_avgs), pick(exp_avg_sqs), pick(max_exp_avg_sqs),
             pick(master_params), pick(state_steps)]
    device = params[0].device
    # On GPU a program streams CHUNK elements in BLOCK-wide tiles; under the CPU interpreter
    # one tile per program keeps the (slow) interpreted loop short.
    block = 1024 if device.type == "cuda" else 256
    chunk = block * 8 if device.type == "cuda" else block
    table, numel, work_tensor, work_start = _work_tables(lists, chunk, device)
    dummy = table  # never read when the matching flag is off
    kernels.fused_adamw_kernel[(work_tensor.numel(),)](
        table, numel, work_tensor, work_start, len(live),
        lr, lr_tensor if lr_tensor is not None else dummy,
        # Formed in double here: in fp32, 1 - 0.9 is 2e-7 off and log(beta) loses digits.
        math.log(beta1) if beta1 > 0 else -1e30, math.log(beta2) if beta2 > 0 else -1e30, beta2,
        1.0 - beta1, 1.0 - beta2, eps, weight_decay,
        inv_scale if inv_scale is not None else dummy,
        found_inf if found_inf is not None else dummy,
        max(stochastic_rounding_seed, 0) & 0xFFFFFFFF,
        PARAM_DTYPE=tl_dtype(params[0].dtype), STATE_DTYPE=tl_dtype(exp_avgs[0].dtype),
        HAS_LR_TENSOR=lr_tensor is not None, HAS_INV_SCALE=inv_scale is not None,
        HAS_FOUND_INF=found_inf is not None, AMSGRAD=amsgrad, HAS_MASTER=len(master_params) > 0,
        MAXIMIZE=maximize, ADAMW=adam_w_mode, STOCHASTIC_ROUNDING=stochastic_rounding_seed >= 0,
        CHUNK=chunk, BLOCK=block, num_warps=4,
    )


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
