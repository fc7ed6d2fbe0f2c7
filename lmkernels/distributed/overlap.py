"""OverlappedOptimizer: steps each gradient bucket as soon as its all-reduce completes, so the
optimizer runs while backward is still computing the earlier layers' gradients.

    model = BucketedDataParallel(GPT(cfg))
    opt = OverlappedOptimizer(model, FusedAdamW, lr=3e-4, weight_decay=0.1)   # or param groups
    loss = model(x, y); loss.backward()   # each bucket is stepped when its reduction is done
    opt.step()                            # a no-op: backward ended with every bucket stepped

Design: the OverlappedOptimizer is a torch.optim.Optimizer over the user's parameter groups (so
param_groups, state, state_dict, load_state_dict, zero_grad and LR schedulers work as usual),
and it owns one ordinary optimizer of `optimizer_class` per bucket, built over that bucket's
parameters split by the user's groups (the bucket -> param-group map). The per-bucket optimizers
share the OverlappedOptimizer's `state` dict (keyed by parameter, so each touches only its own
entries). BucketedDataParallel calls `step_bucket(index)` when a bucket's reduction finishes and
`rebuild()` when it re-buckets; nothing is patched and no process-wide hook is installed.

No gradient clipping and no GradScaler: both need every bucket's gradients (the global norm,
the inf check), known only after every all-reduce, while this optimizer steps each bucket as
soon as it is reduced.
"""
from typing import Any, Callable, Iterable, Optional

import torch

__all__ = ["OverlappedOptimizer"]

# Names an optimizer may use for a gradient-clipping request (FusedAdamW: max_grad_norm).
_CLIP_KEYS = ("max_grad_norm", "clip_grad_norm", "grad_clip", "clip_norm")

CLIP_REFUSAL = ("an OverlappedOptimizer cannot clip gradients: clipping needs the global gradient "
                "norm, known only after every bucket's all-reduce, while the overlapped optimizer "
                "steps each bucket as soon as it is reduced. Use a plain optimizer, call "
                "model.clip_grad_norm_(max_norm) and then optimizer.step()")


def param_group_index(owner: str, param_groups: list, model_params: list) -> dict:
    """id(param) -> index of its param group; refuses a parameter the model does not train
    (the optimizer steps the model's own gradient buckets, nothing else)."""
    mine = {id(p) for p in model_params}
    group_of = {}
    for g, group in enumerate(param_groups):
        for p in group["params"]:
            if id(p) not in mine:
                raise ValueError(f"{owner}: param group {g} holds a parameter of shape "
                                 f"{list(p.shape)} that is not one of the model's parameters "
                                 "that require grad")
            group_of[id(p)] = g
    return group_of


class OverlappedOptimizer(torch.optim.Optimizer):
    """Runs `optimizer_class(bucket's param groups, **defaults)` per bucket of `model` (a
    BucketedDataParallel) as soon as that bucket's all-reduce completes.

    params: parameters or param groups, as for any torch optimizer (default: every parameter of
    the model that requires grad); each must be one of the model's parameters that require grad.
    defaults: the optimizer's hyperparameters (lr, weight_decay, ...). Changes to
    `param_groups[i][key]` (an LR schedule) reach the bucket optimizers at their next step.
    """

    def __init__(self, model, optimizer_class: Callable[..., torch.optim.Optimizer],
                 params: Optional[Iterable] = None, **defaults: Any):
        from lmkernels.distributed.data_parallel import BucketedDataParallel

        if not isinstance(model, BucketedDataParallel):
            raise TypeError(f"OverlappedOptimizer: model must be a BucketedDataParallel; got "
                            f"{type(model).__name__}")
        if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
            raise TypeError(f"OverlappedOptimizer: optimizer_class must be a torch.optim.Optimizer "
                            f"subclass (e.g. torch.optim.AdamW, lmkernels.optim.FusedAdamW); got "
                            f"{optimizer_class!r}")
        if model.overlap_optimizer is not None:
            raise ValueError("OverlappedOptimizer: this model already has an overlapped optimizer")
        self.model = model
        self.optimizer_class = optimizer_class
        super().__init__(model._params if params is None else params, defaults)
        for g, group in enumerate(self.param_groups):
            for key in _CLIP_KEYS:
                value = group.get(key)
                if value is not None and value is not False and value != 0:
                    raise ValueError(f"{CLIP_REFUSAL} (param group {g} has {key}={value})")
        # id(param) -> index of its group in self.param_groups
        self._group_of = param_group_index("OverlappedOptimizer", self.param_groups, model._params)
        self._bucket_optimizers: list = []
        self._bucket_groups: list = []  # per bucket: the user group index of each sub-group
        self.rebuild()
        model._attach_overlap_optimizer(self)

    # ------------------------------------------------------- called by BucketedDataParallel
    def rebuild(self) -> None:
        """(Re)creates the per-bucket optimizers for the model's current bucket layout."""
        self._bucket_optimizers, self._bucket_groups = [], []
        for bucket in self.model._buckets:
            by_group: dict = {}
            for p in bucket.params:
                g = self._group_of.get(id(p))
                if g is not None:
                    by_group.setdefault(g, []).append(p)
            order = sorted(by_group)
            if not order:
                self._bucket_optimizers.append(None)
                self._bucket_groups.append([])
                continue
            opt = self._make([{**self._hyperparameters(g), "params": by_group[g]} for g in order])
            self._bucket_optimizers.append(opt)
            self._bucket_groups.append(order)

    def step_bucket(self, index: int) -> None:
        """Steps bucket `index`'s parameters (those without a gradient are skipped by the
        optimizer), with the groups' current hyperparameters."""
        opt = self._bucket_optimizers[index]
        if opt is None:
            return
        for sub, g in zip(opt.param_groups, self._bucket_groups[index]):
            sub.update(self._hyperparameters(g))
        opt.step()

    def _hyperparameters(self, g: int) -> dict:
        return {k: v for k, v in self.param_groups[g].items() if k != "params"}

    # ------------------------------------------------------------------- for the user
    @torch.no_grad()
    def step(self, closure=None):
        """Every bucket was stepped during backward (the last ones as it ended), so this is a
        no-op after a normal backward; it finishes a sync that did not complete there."""
        if closure is not None:
            raise ValueError("OverlappedOptimizer.step(closure) is not supported: each bucket is "
                             "stepped during backward")
        self.model.finish_gradient_sync()
        return None

    def state_dict(self) -> dict:
        return self._make([dict(g) for g in self.param_groups]).state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        # Loaded by the optimizer class itself over the same groups, so its own rules apply
        # (FusedAdamW keeps fp32 master weights fp32; the base class would cast them to the
        # parameters' dtype).
        whole = self._make([dict(g) for g in self.param_groups])
        whole.load_state_dict(state_dict)
        self.state = whole.state
        for mine, loaded in zip(self.param_groups, whole.param_groups):
            mine.update({k: v for k, v in loaded.items() if k != "params"})
        self.rebuild()  # the bucket optimizers now share the loaded state

    def _make(self, groups: list) -> torch.optim.Optimizer:
        """An optimizer_class over `groups` that keeps its moments and step counts in ours."""
        opt = self.optimizer_class(groups, **self.defaults)
        if type(opt.state) is not type(self.state):
            # The class keeps its state in a dict type of its own (FusedAdamW's tells its cached
            # kernel plans when an entry is replaced, and converts a plain dict it is given into
            # a new one, which would stop the sharing): adopt that type once, with our entries.
            for param, entries in self.state.items():
                opt.state[param].update(entries)
            self.state = opt.state
        else:
            opt.state = self.state
        return opt

    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_bucket_optimizers", None) is not None:
            raise RuntimeError("OverlappedOptimizer: add every param group at construction")
        super().add_param_group(param_group)
