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

Differences from torch.optim.AdamW: a parameter listed twice in a group is an error (torch warns,
then steps it twice or once with a doubled count depending on the implementation); bad
hyperparameters (NaN or inf lr/eps/weight_decay, betas that are not a pair in [0, 1), non-bool
flags) are refused at construction, naming the argument or the param group.

Each step runs a per-group plan built once (lmkernels/optim/_plan.py): replacing a state tensor
(`opt.state[p]["exp_avg"] = ...`), a param's whole state, the group's params or amsgrad re-builds
it before the next step, as torch.optim would use the new tensors (lmkernels/optim/_state.py).
"""
import math
import numbers
import warnings
from typing import Any, Iterable, Optional

import torch

from lmkernels.ops._common import BACKENDS
from lmkernels.optim._plan import LOW_PRECISION, GroupPlan
from lmkernels.optim._state import OptimizerState

_REQUIRED_STATE = ("step", "exp_avg", "exp_avg_sq")
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_DUPLICATE_WARNING = "optimizer contains a parameter group with duplicate parameters"


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
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, decoupled_weight_decay=adam_w_mode)
        _check_hyperparameters(defaults, "")
        for name, value in (("master_weights", master_weights), ("stochastic_rounding", stochastic_rounding)):
            _check_flag(name, value)
        if master_weights and stochastic_rounding:
            raise ValueError("FusedAdamW: stochastic_rounding is for parameters without master_weights")
        if backend not in BACKENDS:
            raise ValueError(f"FusedAdamW: backend must be one of {BACKENDS}; got {backend!r}")
        self.master_weights = bool(master_weights)
        self.stochastic_rounding = bool(stochastic_rounding)
        self.backend = backend
        self._plans: dict[int, GroupPlan] = {}  # group index -> its plan (lmkernels/optim/_plan.py)
        super().__init__(params, defaults)
        self.state = OptimizerState(self.state)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        # torch warns about a parameter listed twice in a group and then steps it twice per
        # step (the for-loop AdamW) or once with a doubled step count (foreach/fused): there is
        # no one behaviour to match, so it is an error here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_DUPLICATE_WARNING)
            super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        try:
            _check_hyperparameters(self.param_groups[gi], f"param_groups[{gi}]")
            self._check_no_duplicates(gi, self.param_groups[gi])
        except ValueError:
            self.param_groups.pop()
            raise

    # --- pickling and state dicts ----------------------------------------------------------

    _EXTRA_ATTRIBUTES = (("master_weights", False), ("stochastic_rounding", False), ("backend", "auto"))

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim.Optimizer keeps only defaults, state and param_groups: add our settings, so
        # copy.deepcopy / pickle / torch.save of the optimizer round-trip.
        state = super().__getstate__()
        state.update({name: getattr(self, name, default) for name, default in self._EXTRA_ATTRIBUTES})
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by load_state_dict (with state and param_groups only): keep our settings.
        for name, default in self._EXTRA_ATTRIBUTES:
            if name in state:
                setattr(self, name, state.pop(name))
            elif not hasattr(self, name):
                setattr(self, name, default)
        super().__setstate__(state)
        self.state = OptimizerState(self.state)
        self._plans = {}
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("decoupled_weight_decay", True)

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        # New plain per-param dicts: Optimizer.state_dict() hands back our live ones. Steps become
        # CPU copies (torch.optim.AdamW, not fused/capturable, keeps them there; ours are views
        # into a kernel call's step vector, which later steps would keep changing).
        sd["state"] = {
            k: {**s, "step": s["step"].detach().to("cpu", torch.float32, copy=True)}
            if isinstance(s.get("step"), torch.Tensor) else dict(s)
            for k, s in sd["state"].items()
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # Bring loaded state to what the kernel expects (or say which parameter lacks what):
        # step on the param's device as float32, float32 moments for low-precision params,
        # contiguous buffers, master copies.
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                state = self.state.get(p)
                if state:
                    self._conform_state(gi, group, p, state)
                    state["step"] = torch.as_tensor(state["step"]).detach().to(p.device, torch.float32).reshape(())

    # --- state -----------------------------------------------------------------------------

    def _init_state(self, p: torch.Tensor, group: dict) -> dict:
        state = self.state[p]
        moment_dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["exp_avg"] = torch.zeros_like(p, dtype=moment_dtype, memory_format=torch.contiguous_format)
        state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if group["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        if self.master_weights and p.dtype in LOW_PRECISION:
            state["master_param"] = p.detach().float().contiguous()
        return state

    def _conform_state(self, gi: int, group: dict, p: torch.Tensor, state: dict) -> None:
        """Checks an existing state (loaded, or edited by the user) and converts its tensors to
        what the kernel takes; replaces an entry only where a conversion was needed."""
        missing = [key for key in _REQUIRED_STATE if key not in state]
        if missing:
            raise ValueError(
                f"FusedAdamW: the state of {self._name(gi, group, p)} has no {missing[0]!r} entry "
                f"(it has {sorted(map(str, state))}); a parameter's state must have 'step', "
                "'exp_avg' and 'exp_avg_sq' (as torch.optim.AdamW saves it), or be empty")
        step = state["step"]
        if not (isinstance(step, numbers.Real) or isinstance(step, torch.Tensor) and step.numel() == 1):
            raise ValueError(f"FusedAdamW: state['step'] of {self._name(gi, group, p)} must be a "
                             f"number or a one-element tensor; got {step!r}")
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.as_tensor(state["exp_avg_sq"]).clone()
        dtype = torch.float32 if p.dtype in LOW_PRECISION else p.dtype
        for key in _MOMENTS:
            if key in state:
                state[key] = self._conformed(gi, group, p, key, state[key], dtype)
        if self.master_weights and p.dtype in LOW_PRECISION:
            master = state.get("master_param")
            state["master_param"] = (p.detach().float().contiguous() if master is None
                                     else self._conformed(gi, group, p, "master_param", master, torch.float32))

    def _conformed(self, gi: int, group: dict, p: torch.Tensor, key: str, t, dtype: torch.dtype) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.shape != p.shape:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t).__name__)
            raise ValueError(f"FusedAdamW: state[{key!r}] of {self._name(gi, group, p)} must be a "
                             f"tensor of the parameter's shape {tuple(p.shape)}; got {got}")
        return t.detach().to(device=p.device, dtype=dtype).contiguous()

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
            plan = self._plan(gi, group)
            try:
                plan.step(group, inv_scale, found_inf, self.stochastic_rounding, self.backend)
            except (RuntimeError, ValueError):
                self._diagnose(gi, group)
                raise
        return loss

    def _plan(self, gi: int, group: dict) -> GroupPlan:
        """This group's plan, re-built when it is out of date (lmkernels/optim/_plan.py)."""
        plan = self._plans.get(gi)
        if plan is not None and plan.is_current(self, group):
            return plan
        if plan is not None:
            plan.stale = True
        if not isinstance(self.state, OptimizerState):  # the user assigned opt.state
            self.state = OptimizerState(self.state)
        self._check_no_duplicates(gi, group)
        by_kind: dict = {}
        states: dict = {}
        watched = []
        for p in group["params"]:
            state = self.state.get(p)
            if not state and p.grad is None:
                watched.append(p)  # no state to keep yet: the plan grows when it gets a grad
                continue
            if state:
                self._conform_state(gi, group, p, state)
            else:
                state = self._init_state(p, group)
            states[p] = state
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        if len({device for device, _ in by_kind}) > 1:
            self._raise_mixed_devices(gi, group, [ps[0] for ps in by_kind.values()])
        plan = GroupPlan(self, group, states, list(by_kind.values()), watched)
        self._plans[gi] = plan
        return plan

    # --- errors that name the parameter ----------------------------------------------------

    @staticmethod
    def _name(gi: int, group: dict, p: torch.Tensor) -> str:
        index = next(i for i, q in enumerate(group["params"]) if q is p)
        names = group.get("param_names")
        label = f"'{names[index]}' " if names else ""
        return f"parameter {label}(param_groups[{gi}]['params'][{index}], shape {tuple(p.shape)}, {p.dtype}, {p.device})"

    def _check_no_duplicates(self, gi: int, group: dict) -> None:
        seen = set()
        for index, p in enumerate(group["params"]):
            if id(p) in seen:
                first = next(i for i, q in enumerate(group["params"]) if q is p)
                raise ValueError(
                    f"FusedAdamW: param_groups[{gi}]['params'][{index}] is the same tensor as "
                    f"param_groups[{gi}]['params'][{first}] (shape {tuple(p.shape)}); list each "
                    "parameter once (torch.optim.AdamW steps duplicates differently per implementation)")
            seen.add(id(p))

    def _raise_mixed_devices(self, gi: int, group: dict, firsts: list) -> None:
        a, b = firsts[0], next(p for p in firsts if p.device != firsts[0].device)
        raise ValueError(
            f"FusedAdamW: all parameters of a group must be on one device; {self._name(gi, group, a)} "
            f"and {self._name(gi, group, b)} differ"
        )

    def _diagnose(self, gi: int, group: dict) -> None:
        """Runs only after a kernel rejected its input: finds the parameter to blame."""
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
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
            elif g.data_ptr() == p.data_ptr() and p.numel():
                what = "is its own gradient (p.grad shares p's memory)"
            if what is not None:
                raise ValueError(f"FusedAdamW: {self._name(gi, group, p)} {what}")


# --- constructor checks ----------------------------------------------------------------------

def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_number(value, what: str, *, tensor_ok: bool) -> float:
    """`value` as a float, or a ValueError saying what `what` must be."""
    if tensor_ok and isinstance(value, torch.Tensor):
        if value.numel() != 1 or not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"FusedAdamW: {what} as a tensor must hold one real number; got "
                             f"shape {tuple(value.shape)}, {value.dtype}")
        return float(value)
    if not _is_real(value):
        raise ValueError(f"FusedAdamW: {what} must be a number; got {value!r} ({type(value).__name__})")
    return float(value)


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool) and not (isinstance(value, int) and value in (0, 1)):
        raise ValueError(f"FusedAdamW: {name} must be True or False; got {value!r} ({type(value).__name__})")


def _check_hyperparameters(group: dict, where: str) -> None:
    """Checks a group's (or the defaults') hyperparameters; `where` prefixes the names
    ("param_groups[1]" -> "param_groups[1]['lr']")."""
    name = (lambda key: f"{where}[{key!r}]") if where else (lambda key: key)  # noqa: E731
    for key in ("lr", "eps", "weight_decay"):
        value = _as_number(group[key], name(key), tensor_ok=key == "lr")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"FusedAdamW: {name(key)} must be a finite number >= 0; got {value}")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"FusedAdamW: {name('betas')} must be a pair (beta1, beta2) of numbers "
                         f"in [0, 1); got {betas!r}")
    for i, beta in enumerate(betas):
        value = _as_number(beta, f"{name('betas')}[{i}]", tensor_ok=True)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"FusedAdamW: {name('betas')}[{i}] must be in [0, 1); got {value}")
    for key in ("amsgrad", "maximize", "decoupled_weight_decay"):
        _check_flag("adam_w_mode" if key == "decoupled_weight_decay" and not where else name(key), group[key])
