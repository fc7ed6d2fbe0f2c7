"""How FusedAdamW steps one parameter group: a plan built once and re-built only when the
group's tensors change, so a step does no per-tensor Python work.

A GroupPlan holds one kernel call per (device, dtype) of the group's params that have a grad or
state. Each call keeps its param and state lists (and one float32 vector of step counts, whose
0-d views are the params' state["step"]):
- CpuKernelCall: CPU tensors, C++ kernel. The lists live in C++
  (torch.classes.lmkernels.FusedAdamWCpuPlan, csrc/cpu/adamw_cpu.cpp): a step passes only the
  hyperparameters; the kernel reads the grads, counts the steps and checks every tensor.
- OpKernelCall: any other device or backend: one torch.ops.lmkernels.fused_adamw_ call with
  the lists (the grads gathered per step).

A plan is out of date when (checked every step in O(1) plus one identity pass over the params):
a state entry was replaced or removed (lmkernels/optim/_state.py marks it stale), the optimizer's
`state` or the group's params were replaced, amsgrad / master_weights / backend changed, or a
param that has no state yet got a grad (it must be added).
"""
import operator
from typing import Optional

import torch

from lmkernels.ops.adamw import fused_adamw_

LOW_PRECISION = (torch.bfloat16, torch.float16)


class Hyper:
    """One step's arguments shared by the group's kernel calls."""

    __slots__ = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad", "maximize",
                 "adam_w_mode", "inv_scale", "found_inf", "stochastic_rounding")

    def __init__(self, group: dict, inv_scale, found_inf, stochastic_rounding: bool):
        self.lr = group["lr"]
        beta1, beta2 = group["betas"]
        self.beta1, self.beta2 = float(beta1), float(beta2)
        self.eps, self.weight_decay = float(group["eps"]), float(group["weight_decay"])
        self.amsgrad, self.maximize = bool(group["amsgrad"]), bool(group["maximize"])
        self.adam_w_mode = bool(group["decoupled_weight_decay"])
        self.inv_scale, self.found_inf = inv_scale, found_inf
        self.stochastic_rounding = stochastic_rounding

    def seed_for(self, call: "KernelLists") -> int:
        """A fresh stochastic-rounding seed for bf16 params without master weights, else -1."""
        if self.stochastic_rounding and call.dtype == torch.bfloat16 and not call.masters:
            return int(torch.randint(0, 2**31 - 1, ()).item())
        return -1

    def on(self, device: torch.device) -> tuple:
        """(lr float, lr tensor or None, inv_scale, found_inf) as the kernel wants them on `device`."""
        lr = self.lr
        lr_tensor = lr.to(device=device, dtype=torch.float32) if isinstance(lr, torch.Tensor) else None
        inv_scale = None if self.inv_scale is None else self.inv_scale.to(device)
        found_inf = None if self.found_inf is None else self.found_inf.to(device=device, dtype=torch.float32)
        return (0.0 if lr_tensor is not None else float(lr)), lr_tensor, inv_scale, found_inf


class KernelLists:
    """The state tensors of one kernel call, in the order of its params."""

    def __init__(self, params: list, states: list, amsgrad: bool):
        self.params = params
        self.device, self.dtype = params[0].device, params[0].dtype
        self.exp_avgs = [s["exp_avg"] for s in states]
        self.exp_avg_sqs = [s["exp_avg_sq"] for s in states]
        self.max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in states] if amsgrad else []
        self.masters = [s["master_param"] for s in states] if "master_param" in states[0] else []
        # One vector of step counts; each state["step"] becomes a 0-d view of it.
        self.flat_steps = torch.stack([torch.as_tensor(s["step"]).detach().reshape(()).to(self.device, torch.float32)
                                       for s in states])
        for i, s in enumerate(states):
            s["step"] = self.flat_steps[i]
        self.steps = [s["step"] for s in states]

    def grads(self) -> list:
        return [p.grad for p in self.params]


class CpuKernelCall(KernelLists):
    def __init__(self, params: list, states: list, amsgrad: bool):
        super().__init__(params, states, amsgrad)
        self.cpp = torch.classes.lmkernels.FusedAdamWCpuPlan(
            self.params, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs, self.masters,
            self.flat_steps)

    def step(self, h: Hyper, backend: str) -> None:
        lr, lr_tensor, inv_scale, found_inf = h.on(self.device)
        seed = h.seed_for(self)
        # Counts the steps itself (none when found_inf is set) and undoes them on an error.
        self.cpp.step(lr, h.beta1, h.beta2, h.eps, h.weight_decay, h.amsgrad, h.maximize,
                      h.adam_w_mode, lr_tensor, inv_scale, found_inf, seed)


class OpKernelCall(KernelLists):
    def step(self, h: Hyper, backend: str) -> None:
        grads = self.grads()
        if all(g is not None for g in grads):
            lists = (self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                     self.masters, self.steps)
            self.flat_steps.add_(1.0)
            undo = lambda amount: self.flat_steps.sub_(amount)  # noqa: E731
        else:  # params without a grad this step are skipped, as in torch
            keep = [i for i, g in enumerate(grads) if g is not None]
            lists = tuple([x[i] for i in keep] if x else [] for x in (
                self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.max_exp_avg_sqs,
                self.masters, self.steps))
            for s in lists[6]:
                s.add_(1.0)
            undo = lambda amount: [s.sub_(amount) for s in lists[6]]  # noqa: E731
        lr, lr_tensor, inv_scale, found_inf = h.on(self.device)
        seed = h.seed_for(self)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, steps = lists
        try:
            fused_adamw_(
                params, grads, exp_avgs, exp_avg_sqs, steps,
                lr=lr_tensor if lr_tensor is not None else lr, beta1=h.beta1, beta2=h.beta2,
                eps=h.eps, weight_decay=h.weight_decay, amsgrad=h.amsgrad, maximize=h.maximize,
                adam_w_mode=h.adam_w_mode, max_exp_avg_sqs=max_exp_avg_sqs,
                master_params=masters, inv_scale=inv_scale, found_inf=found_inf,
                stochastic_rounding_seed=seed, backend=backend)
        except (RuntimeError, ValueError):
            undo(1.0)
            raise
        if found_inf is not None:
            undo(found_inf)  # a skipped step does not count (no host sync)


class GroupPlan:
    def __init__(self, optimizer, group: dict, states: dict, members: list, watched: list):
        """members: the group's params to step (a grad or state), grouped by (device, dtype) in
        `members`; states: param -> its (complete) state; watched: the params without state."""
        self.stale = False
        self.state_mapping = optimizer.state
        self.params = list(group["params"])
        self.key = self._key(optimizer, group)
        self.watched = watched
        amsgrad = bool(group["amsgrad"])
        self.calls = []
        for params in members:
            on_cpp = params[0].device.type == "cpu" and optimizer.backend in ("auto", "cpu")
            kind = CpuKernelCall if on_cpp else OpKernelCall
            self.calls.append(kind(params, [states[p] for p in params], amsgrad))
        for state in states.values():  # last: building the lists above rewrote state["step"]
            state.watch(self)

    @staticmethod
    def _key(optimizer, group: dict) -> tuple:
        return bool(group["amsgrad"]), optimizer.master_weights, optimizer.backend

    def is_current(self, optimizer, group: dict) -> bool:
        params = group["params"]
        return (not self.stale and optimizer.state is self.state_mapping
                and self.key == self._key(optimizer, group) and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params))
                and not any(p.grad is not None for p in self.watched))

    def step(self, group: dict, inv_scale: Optional[torch.Tensor],
             found_inf: Optional[torch.Tensor], stochastic_rounding: bool, backend: str) -> None:
        h = Hyper(group, inv_scale, found_inf, stochastic_rounding)
        for call in self.calls:
            call.step(h, backend)
