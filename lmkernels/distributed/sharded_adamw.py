"""ShardedAdamW: AdamW over the shards of a ShardedDataParallel (ZeRO-1/2).

The optimizer's param_groups are the user's groups of full parameters (LR schedules and
per-group weight decay work as usual), but its state exists only for this rank's shard of
every bucket: flat fp32 exp_avg / exp_avg_sq per bucket shard, plus an fp32 master shard for
bf16/fp16 parameters. A step is one fused_adamw_ launch per param group over precomputed views
(the pieces of each parameter that fall in this rank's shards), then the all-gather of the
updated parameters is launched.

Checkpoints: shard_state_dict() is this rank's shards plus the layout (parameter names,
offsets); consolidate() turns the shard dicts of all ranks into a FusedAdamW-style state dict
(state keyed by parameter index in param_groups order); load_consolidated() cuts this rank's
shards out of one, at any data-parallel size. consolidated_state_dict() gathers it live.
"""
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist

from lmkernels.distributed.overlap import param_group_index
from lmkernels.ops.adamw import fused_adamw_

__all__ = ["ShardedAdamW", "consolidate"]

_LOW_PRECISION = (torch.bfloat16, torch.float16)


class ShardedAdamW(torch.optim.Optimizer):
    def __init__(self, model, params: Optional[Iterable] = None, lr: float = 1e-3,
                 betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 backend: str = "auto"):
        from lmkernels.distributed.sharded_data_parallel import ShardedDataParallel

        if not isinstance(model, ShardedDataParallel):
            raise TypeError(f"ShardedAdamW: model must be a ShardedDataParallel; got "
                            f"{type(model).__name__}")
        if not 0.0 <= float(lr):
            raise ValueError(f"ShardedAdamW: invalid learning rate {lr!r}")
        for i, b in enumerate(betas):
            if not 0.0 <= float(b) < 1.0:
                raise ValueError(f"ShardedAdamW: invalid beta at index {i}: {b!r}")
        if not (eps >= 0.0 and weight_decay >= 0.0):
            raise ValueError(f"ShardedAdamW: eps and weight_decay must be >= 0; got {eps!r}, "
                             f"{weight_decay!r}")
        super().__init__(model._params if params is None else params,
                         dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.model = model
        self.backend = backend
        name_of = {id(p): n for n, p in zip(model._names, model._params)}
        self._group_of = param_group_index("ShardedAdamW", self.param_groups, model._params)
        missing = [n for n, p in zip(model._names, model._params) if id(p) not in self._group_of]
        if missing:
            raise ValueError(f"ShardedAdamW: every parameter of the model must be in a param "
                             f"group (the shards span them all); missing: {missing}")
        self.group_names = [[name_of[id(p)] for p in g["params"]] for g in self.param_groups]
        self._build_shard_state()

    # ------------------------------------------------------------------- layout
    def _build_shard_state(self) -> None:
        """Flat fp32 moments (and masters) per bucket shard, and per group the lists of views
        the fused kernel runs on."""
        self.shard_state: list[dict] = []
        pieces = [dict(params=[], grads=[], exp_avgs=[], exp_avg_sqs=[], masters=[])
                  for _ in self.param_groups]
        for bucket, shard in zip(self.model._buckets, self.model.shards):
            n = shard.hi - shard.lo
            low = shard.param.dtype in _LOW_PRECISION
            st = dict(exp_avg=torch.zeros(n, dtype=torch.float32, device=shard.param.device),
                      exp_avg_sq=torch.zeros(n, dtype=torch.float32, device=shard.param.device),
                      master=shard.param.detach().float().clone() if low else None)
            self.shard_state.append(st)
            for o, p in zip(bucket.offsets, bucket.params):
                a, b = max(o, shard.lo), min(o + p.numel(), shard.hi)
                if a >= b:
                    continue
                lists = pieces[self._group_of[id(p)]]
                i, j = a - shard.lo, b - shard.lo
                lists["params"].append(shard.param[i:j])
                lists["grads"].append(shard.grad[i:j])
                lists["exp_avgs"].append(st["exp_avg"][i:j])
                lists["exp_avg_sqs"].append(st["exp_avg_sq"][i:j])
                if low:
                    lists["masters"].append(st["master"][i:j])
        self._pieces = pieces
        # One step count per group (every piece of a group steps together).
        self.steps = torch.zeros(len(self.param_groups), dtype=torch.float32)
        for g, lists in enumerate(pieces):
            n = len(lists["params"])
            lists["flat_steps"] = torch.zeros(n, dtype=torch.float32, device=self.model.device)
            lists["steps"] = [lists["flat_steps"][k] for k in range(n)]

    # --------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("ShardedAdamW.step(closure) is not supported")
        self.model.finish_gradient_sync()
        self.model.wait_param_gather()  # a step before the previous gather was used
        for g, (group, lists) in enumerate(zip(self.param_groups, self._pieces)):
            self.steps[g] += 1
            if not lists["params"]:
                continue
            lists["flat_steps"].fill_(float(self.steps[g]))
            beta1, beta2 = group["betas"]
            fused_adamw_(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"],
                         lists["steps"], lr=group["lr"], beta1=float(beta1), beta2=float(beta2),
                         eps=group["eps"], weight_decay=group["weight_decay"],
                         master_params=lists["masters"], backend=self.backend)
        self.model.start_param_gather()

    def zero_grad(self, set_to_none: bool = True) -> None:
        # zero=1: .grad are views of the buckets (re-adopted if set to None); zero=2: the
        # shards are overwritten by the next reduce-scatter, .grad are None already.
        super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------ memory
    def memory_bytes(self) -> dict:
        total = 0
        for st in self.shard_state:
            for t in st.values():
                if t is not None:
                    total += t.numel() * t.element_size()
        return {"opt_state_bytes": total}

    # ------------------------------------------------------------ checkpoints
    def _hyper(self) -> list:
        return [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]

    def shard_state_dict(self) -> dict:
        """This rank's shards and the layout needed to reassemble them (CPU tensors)."""
        buckets = []
        for bucket, shard, st in zip(self.model._buckets, self.model.shards, self.shard_state):
            buckets.append(dict(
                names=list(bucket.names), offsets=list(bucket.offsets),
                numels=[p.numel() for p in bucket.params], shapes=[list(p.shape) for p in bucket.params],
                lo=shard.lo, hi=shard.hi,
                exp_avg=st["exp_avg"].cpu().clone(), exp_avg_sq=st["exp_avg_sq"].cpu().clone(),
                master=None if st["master"] is None else st["master"].cpu().clone()))
        return dict(format="lmkernels.sharded_adamw.v1", zero=self.model.zero,
                    world_size=self.model.world_size, rank=self.model.rank,
                    steps=self.steps.tolist(), param_groups=self._hyper(),
                    group_names=self.group_names, buckets=buckets)

    def consolidated_state_dict(self) -> dict:
        """Gathers every rank's shards (a collective: call it on every rank) and returns the
        consolidated, FusedAdamW-style state dict."""
        mine = self.shard_state_dict()
        everyone: list = [None] * self.model.world_size
        dist.all_gather_object(everyone, mine, group=self.model.process_group)
        return consolidate(everyone)

    @torch.no_grad()
    def load_consolidated(self, state_dict: dict) -> None:
        """Takes this rank's shards from a consolidated state dict (from consolidate() at any
        data-parallel size) and the groups' hyperparameters. The model's parameters are loaded
        separately (model.module.load_state_dict); for bf16/fp16 the masters come from here."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"ShardedAdamW.load_consolidated: the state has {len(groups)} param "
                             f"groups; this optimizer has {len(self.param_groups)}")
        by_name = {}
        for g, (group, names) in enumerate(zip(groups, self.group_names)):
            if len(group["params"]) != len(names):
                raise ValueError(f"ShardedAdamW.load_consolidated: param group {g} has "
                                 f"{len(group['params'])} parameters in the state, "
                                 f"{len(names)} here")
            for index, name in zip(group["params"], names):
                by_name[name] = state_dict["state"].get(index)
        for mine, loaded in zip(self.param_groups, groups):
            mine.update({k: v for k, v in loaded.items() if k != "params"})
        steps = []
        for bucket, shard, st in zip(self.model._buckets, self.model.shards, self.shard_state):
            for o, p, name in zip(bucket.offsets, bucket.params, bucket.names):
                a, b = max(o, shard.lo), min(o + p.numel(), shard.hi)
                s = by_name[name]
                if s is None:  # never stepped
                    continue
                steps.append((self._group_of[id(p)], float(s["step"])))
                if a >= b:
                    continue
                i, j, pa, pb = a - shard.lo, b - shard.lo, a - o, b - o
                st["exp_avg"][i:j].copy_(s["exp_avg"].reshape(-1)[pa:pb])
                st["exp_avg_sq"][i:j].copy_(s["exp_avg_sq"].reshape(-1)[pa:pb])
                if st["master"] is not None:
                    source = s.get("master_param", p.detach())
                    st["master"][i:j].copy_(source.reshape(-1)[pa:pb])
        for g, value in steps:
            self.steps[g] = value

    def state_dict(self) -> dict:
        raise RuntimeError("ShardedAdamW.state_dict(): the state is sharded; use "
                           "shard_state_dict() (per rank) or consolidated_state_dict() (collective)")

    def load_state_dict(self, state_dict: dict) -> None:
        self.load_consolidated(state_dict)


def consolidate(shard_dicts: list) -> dict:
    """The shard_state_dict() of every rank of one run -> a FusedAdamW-style state dict:
    {"state": {index: {step, exp_avg, exp_avg_sq[, master_param]}}, "param_groups": [...]}
    with parameters indexed in param_groups order. Pure function (no process group)."""
    if not shard_dicts or any(d is None for d in shard_dicts):
        raise ValueError("consolidate: need the shard state dict of every rank")
    world = shard_dicts[0]["world_size"]
    ranks = sorted(d["rank"] for d in shard_dicts)
    if ranks != list(range(world)):
        raise ValueError(f"consolidate: need ranks 0..{world - 1} of a {world}-rank run; got {ranks}")
    shard_dicts = sorted(shard_dicts, key=lambda d: d["rank"])
    first = shard_dicts[0]
    per_name: dict = {}
    for b, layout in enumerate(first["buckets"]):
        parts = {key: [d["buckets"][b][key] for d in shard_dicts] for key in ("exp_avg", "exp_avg_sq", "master")}
        full = {key: (None if parts[key][0] is None else torch.cat(parts[key])) for key in parts}
        for name, o, n, shape in zip(layout["names"], layout["offsets"], layout["numels"], layout["shapes"]):
            entry = {key: full[key][o:o + n].reshape(shape).clone() for key in ("exp_avg", "exp_avg_sq")}
            if full["master"] is not None:
                entry["master_param"] = full["master"][o:o + n].reshape(shape).clone()
            per_name[name] = entry
    state, groups, names_out, index = {}, [], [], 0
    for g, (hyper, names) in enumerate(zip(first["param_groups"], first["group_names"])):
        ids = []
        for name in names:
            if first["steps"][g] > 0:
                state[index] = {"step": torch.tensor(float(first["steps"][g])), **per_name[name]}
            ids.append(index)
            index += 1
        groups.append({**hyper, "params": ids})
        names_out.append(list(names))
    # the names sit outside param_groups: torch's Optimizer.load_state_dict checks a group's
    # "param_names" against its own
    return {"state": state, "param_groups": groups, "param_names": names_out}
