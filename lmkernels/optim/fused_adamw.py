"""FusedAdamW: a drop-in for torch.optim.AdamW whose step is one fused multi-tensor kernel
per (parameter group, device, dtype).

Beyond torch.optim.AdamW:
- `adam_w_mode=False` gives Adam with L2 weight decay (stored as torch's
  `decoupled_weight_decay` group key, so state dicts load both ways).
- GradScaler support inside the kernel (`_step_supports_amp_scaling`): gradients are
  unscaled in registers and an inf/NaN step changes nothing, with no extra passes.
- bf16/fp16 parameters keep float32 moments; `master_weights=True` keeps float32 master
  copies and writes the rounded result to the parameters; without master weights,
  `stochastic_rounding=True` rounds bf16 parameter updates stochastically.
"""
from typing import Any, Iterable, Optional

import torch

from lmkernels.ops.adamw import fused_adamw_

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class FusedAdamW(torch.optim.Optimizer):
    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale / found_inf

    def __init__(
        self,
        params: Iterable,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        adam_w_mode: bool = True,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        backend: str = "auto",
    ):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError(f"FusedAdamW: lr as a tensor must have one element; got shape {tuple(lr.shape)}")
        if not 0.0 <= float(lr):
            raise ValueError(f"FusedAdamW: invalid learning rate {float(lr)}")
        if not 0.0 <= eps:
            raise ValueError(f"FusedAdamW: invalid eps {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"FusedAdamW: invalid beta at index {i}: {float(b)}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"FusedAdamW: invalid weight_decay {weight_decay}")
        if master_weights and stochastic_rounding:
            raise ValueError("FusedAdamW: stochastic_rounding is for parameters without master_weights")
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=adam_w_mode)
        super().__init__(params, defaults)
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.backend = backend
        self._plans: dict = {}  # group index -> (ids of params with grad, [_Bucket])

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", True)

    # --- state -----------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        if state:
            return state
        moment_dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if self.master_weights and p.dtype in _LOW_PRECISION:
            state["master_param"] = p.detach().float().contiguous()
        return state

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # New per-param dicts: Optimizer.state_dict() hands back our live ones. Steps become CPU
        # copies (torch.optim.AdamW, not fused/capturable, keeps them there; ours are views
        # into the bucket's step vector, which later steps would keep changing).
        sd["state"] = {
            k: {**s, "step": s["step"].detach().to("cpu", torch.float32, copy=True)} if "step" in s else dict(s)
            for k, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._plans = {}
        # Bring loaded state to what the kernel expects: step on the param's device as float32,
        # float32 moments for low-precision params, contiguous buffers, master copies.
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state.get(p)
                if not state:
                    continue
                state["step"] = torch.as_tensor(state["step"]).detach().to(p.device, torch.float32).reshape(())
                for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
                    if key in state:
                        dtype = torch.float32 if p.dtype in _LOW_PRECISION else p.dtype
                        state[key] = state[key].to(device=p.device, dtype=dtype).contiguous()
                if group["amsgrad"] and "max_exp_avg_sq" not in state:
                    state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
                if self.master_weights and p.dtype in _LOW_PRECISION:
                    master = state.get("master_param")
                    state["master_param"] = (p.detach().float() if master is None else master.float()).to(p.device).contiguous()

    # --- step ------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Set by GradScaler.step() on optimizers with _step_supports_amp_scaling.
        grad_scale: Optional[torch.Tensor] = getattr(self, "grad_scale", None)
        found_inf: Optional[torch.Tensor] = getattr(self, "found_inf", None)
        inv_scale = None if grad_scale is None else grad_scale.double().reciprocal().float()
        for gi, group in enumerate(self.param_groups):
            self._step_group(gi, group, inv_scale, found_inf)
        return loss

    def _plan(self, gi: int, group: dict) -> list["_Bucket"]:
        """The kernel calls for this group: one per (device, dtype) of the params that have a
        grad. Cached while that set of params stays the same, so a step costs no per-tensor
        Python work beyond collecting the grads."""
        with_grad = [p for p in group["params"] if p.grad is not None]
        key = tuple(map(id, with_grad))
        cached = self._plans.get(gi)
        if cached is not None and cached[0] == key:
            return cached[1]
        by_kind: dict = {}
        for p in with_grad:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        if len({device for device, _ in by_kind}) > 1:
            self._raise_mixed_devices(gi, group)
        buckets = [_Bucket(params, [self._init_state(p, group) for p in params], group)
                   for params in by_kind.values()]
        self._plans[gi] = (key, buckets)
        return buckets

    def _step_group(self, gi: int, group: dict, inv_scale, found_inf) -> None:
        beta1, beta2 = group["betas"]
        for bucket in self._plan(gi, group):
            device = bucket.device
            bucket.flat_steps.add_(1.0)
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = lr.to(device=device, dtype=torch.float32)
            scale = None if inv_scale is None else inv_scale.to(device)
            inf = None if found_inf is None else found_inf.to(device=device, dtype=torch.float32)
            seed = -1
            if self.stochastic_rounding and bucket.dtype == torch.bfloat16 and not bucket.masters:
                seed = int(torch.randint(0, 2**31 - 1, ()).item())
            grads = [p.grad for p in bucket.params]
            try:
                fused_adamw_(
                    bucket.params, grads, bucket.exp_avgs, bucket.exp_avg_sqs, bucket.steps, lr=lr,
                    beta1=float(beta1), beta2=float(beta2), eps=group["eps"],
                    weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                    maximize=group["maximize"], adam_w_mode=group["decoupled_weight_decay"],
                    max_exp_avg_sqs=bucket.max_exp_avg_sqs, master_params=bucket.masters,
                    inv_scale=scale, found_inf=inf, stochastic_rounding_seed=seed,
                    backend=self.backend,
                )
            except (RuntimeError, ValueError):
                bucket.flat_steps.sub_(1.0)
                self._diagnose(gi, group, bucket.params, grads)
                raise
            if inf is not None:
                bucket.flat_steps.sub_(inf)  # a skipped step does not count

    # --- errors that name the parameter ----------------------------------------------------

    @staticmethod
    def _name(gi: int, group: dict, p: torch.Tensor) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        label = f"'{names[index]}' " if names else ""
        return f"parameter {label}(param_groups[{gi}]['params'][{index}], shape {tuple(p.shape)}, {p.dtype}, {p.device})"

    def _raise_mixed_devices(self, gi: int, group: dict) -> None:
        first = next(p for p in group["params"] if p.grad is not None)
        other = next(p for p in group["params"] if p.grad is not None and p.device != first.device)
        raise ValueError(
            f"FusedAdamW: all parameters of a group must be on one device; {self._name(gi, group, first)} "
            f"and {self._name(gi, group, other)} differ"
        )

    def _diagnose(self, gi: int, group: dict, params: list, grads: list) -> None:
        """Runs only after the kernel rejected its input: finds the parameter to blame."""
        for p, g in zip(params, grads):
            what = None
            if g.is_sparse or g.layout != torch.strided:
                what = f"has a sparse gradient ({g.layout}); FusedAdamW does not support sparse gradients"
            elif g.is_complex() or p.is_complex():
                what = "is complex; FusedAdamW supports real float32, bfloat16 and float16 parameters"
            elif g.dtype != p.dtype:
                what = f"has gradient dtype {g.dtype} but parameter dtype {p.dtype}"
            elif g.shape != p.shape:
                what = f"has gradient shape {tuple(g.shape)} but parameter shape {tuple(p.shape)}"
            elif g.device != p.device:
                what = f"has its gradient on {g.device}"
            elif not p.is_contiguous() or not g.is_contiguous():
                what = "(or its gradient) is not contiguous"
            if what is not None:
                raise ValueError(f"FusedAdamW: {self._name(gi, group, p)} {what}")


class _Bucket:
    """The tensors of one kernel call. Step counts live in one vector per bucket, and each
    param's state["step"] is a 0-d view into it: one add_ per step instead of one per tensor."""

    def __init__(self, params: list, states: list, group: dict):
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        self.max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else []
        self.masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
        self.flat_steps = torch.stack([s["step"].reshape(()).to(self.device, torch.float32) for s in states])
        for i, s in enumerate(states):
            s["step"] = self.flat_steps[i]
        self.steps = [s["step"] for s in states]
