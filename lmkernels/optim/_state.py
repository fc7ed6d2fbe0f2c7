"""FusedAdamW's `state`: plain-looking dicts that tell the optimizer's cached kernel plans when
a state tensor is replaced.

FusedAdamW keeps, per parameter group, a plan holding the group's tensors (lmkernels/optim/
_plan.py), so a step does no per-tensor Python work. torch.optim lets a user replace a state
entry (`opt.state[p]["exp_avg"] = torch.zeros_like(p)`, `opt.state[p] = {...}`), and the next
step must use the new tensor. Checking every entry's identity each step would cost ~0.3 ms per
1000 parameters; instead each parameter's state dict knows the plans built on it and marks them
stale when an entry is set to another object or removed. A step then checks one flag per plan.

Both classes pickle and deep-copy as plain dicts (`defaultdict(dict)` for the outer one), so
optimizer pickles and state dicts hold only standard types.
"""
from collections import defaultdict

_MISSING = object()


class _UpdatesThroughSetitem:
    """dict.update and |= bypass __setitem__; route them through it so replacements are seen."""

    __slots__ = ()

    def update(self, *args, **kwargs):
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other):
        self.update(other)
        return self


class ParamState(_UpdatesThroughSetitem, dict):
    """One parameter's state (step, exp_avg, ...); marks the plans that use it stale when an
    entry changes identity. In-place tensor updates (`state["step"] += 1`) change nothing."""

    __slots__ = ("_plans",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._plans = []

    def watch(self, plan) -> None:
        """`plan` reads this state's tensors: mark it stale when one is replaced."""
        self._plans = [q for q in self._plans if not q.stale]
        self._plans.append(plan)

    def _changed(self) -> None:
        for plan in self._plans:
            plan.stale = True
        self._plans = []

    def __setitem__(self, key, value):
        if dict.get(self, key, _MISSING) is not value:
            self._changed()
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._changed()
        super().__delitem__(key)

    def pop(self, *args):
        self._changed()
        return super().pop(*args)

    def popitem(self):
        self._changed()
        return super().popitem()

    def clear(self):
        self._changed()
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __reduce__(self):
        return dict, (dict(self),)


class OptimizerState(_UpdatesThroughSetitem, defaultdict):
    """Optimizer.state (param -> ParamState). Replacing or removing a parameter's state marks
    the plans that used the old one stale; a plain dict stored here becomes a ParamState."""

    def __init__(self, items=()):
        super().__init__(ParamState)
        for key, value in dict(items).items():
            self[key] = value

    def __setitem__(self, key, value):
        old = dict.get(self, key)
        if old is not value:
            if isinstance(old, ParamState):
                old._changed()
            if not isinstance(value, ParamState):
                value = ParamState(value)
        super().__setitem__(key, value)

    def __delitem__(self, key):
        self._forget(dict.get(self, key))
        super().__delitem__(key)

    def pop(self, key, *default):
        self._forget(dict.get(self, key))
        return super().pop(key, *default)

    def popitem(self):
        key, value = super().popitem()
        self._forget(value)
        return key, value

    def clear(self):
        for value in self.values():
            self._forget(value)
        super().clear()

    def setdefault(self, key, default=None):
        if key not in self:
            self[key] = {} if default is None else default
        return self[key]

    @staticmethod
    def _forget(value) -> None:
        if isinstance(value, ParamState):
            value._changed()

    def __reduce__(self):
        return defaultdict, (dict,), None, None, iter((k, dict(v)) for k, v in self.items())
