"""Tensor parallelism with Megatron-LM's split (Shoeybi et al., 2019), applied from outside a model.

Layers (each rank holds a 1/tp slice of the weight):
  ColumnParallelLinear   W split along out_features: y_local = x W_localᵀ   (no communication
                         forward; the input's gradient is all-reduced over the TP group)
  RowParallelLinear      W split along in_features:  y = Σ_ranks x_local W_localᵀ + b
                         (one all-reduce forward, none backward)
  VocabParallelEmbedding the table split along the vocabulary; tokens outside a rank's range
                         look up zeros; the partial embeddings are summed by one all-reduce
  vocab_parallel_cross_entropy
                         the loss from vocabulary-sharded logits without gathering them:
                         all-reduces of (N,) max, sum of exp and target logit only
  VocabParallelLMHead    (vocab_parallel.py) the LM head split along the vocabulary, whose
                         fused_loss is the fused linear cross-entropy without (N, V / tp) logits

`parallelize(model, plan, tp_group)` swaps a model's submodules for these, following a plan
that maps module-name patterns to a style; gpt_tp_plan is the plan for lmkernels.models.GPT
(QKV and MLP-in column-parallel, heads split across ranks; attention-out and MLP-out
row-parallel; embedding and LM head vocab-parallel, the head computing the loss). Every sharded parameter carries
`param.tp_shard = TPShard(dim, chunks)`, which tells lmkernels.distributed.tp_utils
(clip_grad_norm_, shard_layout, merge_shards, full_state_dict) how it was cut.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TPShard:
    """How a parameter was cut: along `dim`, each of its `chunks` equal parts split into tp
    pieces separately (chunks=3 for a fused [q | k | v] weight, so a rank gets its heads' q, k, v)."""
    dim: int
    chunks: int = 1


def _size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


# ---- communication with autograd -------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input feeds every rank's shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce (sum of partial results) forward; identity backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel_region(x, group):
    return x if _size(group) == 1 else _CopyToRegion.apply(x, group)


def reduce_from_tensor_parallel_region(x, group):
    return x if _size(group) == 1 else _ReduceFromRegion.apply(x, group)


# ---- layers ----------------------------------------------------------------------------------

def _split(tensor: torch.Tensor, shard: TPShard, rank: int, size: int) -> torch.Tensor:
    """This rank's piece of a full tensor (cut as `shard` says), contiguous."""
    parts = [c.chunk(size, dim=shard.dim)[rank] for c in tensor.chunk(shard.chunks, dim=shard.dim)]
    return torch.cat(parts, dim=shard.dim).contiguous()


def _check_divisible(what: str, length: int, shard: TPShard, size: int, unit: int = 1):
    piece = length // shard.chunks
    if length % shard.chunks or piece % (size * unit):
        need = f"a multiple of tensor-parallel size {size}" + (f" x {unit}" if unit > 1 else "")
        raise ValueError(f"{what}: {length} (in {shard.chunks} part(s) of {piece}) must split into "
                         f"{need}; choose a size or tp that divides it")


def _sharded_parameter(full: torch.Tensor, shard: TPShard, group) -> nn.Parameter:
    p = nn.Parameter(_split(full.detach(), shard, _rank(group), _size(group)), requires_grad=full.requires_grad)
    p.tp_shard = shard
    return p


class ColumnParallelLinear(nn.Module):
    """Linear with out_features split across the TP group; output stays sharded on the last dim."""

    def __init__(self, linear: nn.Linear, tp_group, *, chunks: int = 1, unit: int = 1):
        super().__init__()
        self.tp_group = tp_group
        shard = TPShard(0, chunks)
        _check_divisible("ColumnParallelLinear out_features", linear.out_features, shard, _size(tp_group), unit)
        self.in_features = linear.in_features
        self.out_features = linear.out_features // _size(tp_group)  # local
        self.weight = _sharded_parameter(linear.weight, shard, tp_group)  # (out / tp, in)
        self.bias = None if linear.bias is None else _sharded_parameter(linear.bias, shard, tp_group)

    def forward(self, x):
        return F.linear(copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """Linear with in_features split across the TP group; takes a sharded input, returns the full
    output (all-reduced), with the replicated bias added once after the reduction."""

    def __init__(self, linear: nn.Linear, tp_group, *, unit: int = 1):
        super().__init__()
        self.tp_group = tp_group
        shard = TPShard(1)
        _check_divisible("RowParallelLinear in_features", linear.in_features, shard, _size(tp_group), unit)
        self.in_features = linear.in_features // _size(tp_group)  # local
        self.out_features = linear.out_features
        self.weight = _sharded_parameter(linear.weight, shard, tp_group)  # (out, in / tp)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        y = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.tp_group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding table split along the vocabulary; rank r holds rows [r V/tp, (r+1) V/tp)."""

    def __init__(self, embedding: nn.Embedding, tp_group):
        super().__init__()
        self.tp_group = tp_group
        size, rank = _size(tp_group), _rank(tp_group)
        _check_divisible("VocabParallelEmbedding num_embeddings (vocab size)", embedding.num_embeddings,
                         TPShard(0), size)
        self.num_embeddings = embedding.num_embeddings // size  # local
        self.vocab_start = rank * self.num_embeddings
        self.weight = _sharded_parameter(embedding.weight, TPShard(0), tp_group)  # (V / tp, C)

    def forward(self, idx):
        if _size(self.tp_group) == 1:
            return F.embedding(idx, self.weight)
        local = idx - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel_region(out, self.tp_group)


def _at_least_fp32(t):
    return t if t.dtype == torch.float64 else t.float()


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, group, ignore_index):
        # logits: (N, V / tp) this rank's vocabulary slice; targets: (N,) global ids
        ctx.logits_dtype = logits.dtype
        logits = _at_least_fp32(logits)
        v_local = logits.size(-1)
        start = _rank(group) * v_local
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max.unsqueeze(-1)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        local_t = targets - start
        mine = (local_t >= 0) & (local_t < v_local)
        local_t = local_t.masked_fill(~mine, 0)
        target_logit = shifted.gather(-1, local_t.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        both = torch.stack((sum_exp, target_logit))  # one all-reduce for the two sums
        dist.all_reduce(both, group=group)
        sum_exp, target_logit = both.unbind(0)
        valid = targets != ignore_index
        count = valid.sum().clamp(min=1)
        loss = ((sum_exp.log() - target_logit) * valid).sum() / count
        exp.div_(sum_exp.unsqueeze(-1))  # softmax of this slice, kept for backward
        ctx.save_for_backward(exp, local_t, mine, valid, count)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local_t, mine, valid, count = ctx.saved_tensors
        grad = softmax  # d loss_i / d logit_j = softmax_j - [j == target_i]
        grad.scatter_add_(-1, local_t.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((valid.to(grad.dtype) * (grad_loss / count)).unsqueeze(-1))
        return grad.to(ctx.logits_dtype), None, None, None


def vocab_parallel_cross_entropy(logits, targets, tp_group, ignore_index: int = -1):
    """Mean cross-entropy of (N, V / tp) vocabulary-sharded logits against (N,) targets; the full
    (N, V) logits never exist on one rank. Targets equal to ignore_index count for nothing."""
    if _size(tp_group) == 1:
        return F.cross_entropy(_at_least_fp32(logits), targets, ignore_index=ignore_index)
    return _VocabParallelCrossEntropy.apply(logits, targets, tp_group, ignore_index)


class VocabParallelCrossEntropy(nn.Module):
    """Drop-in for nn.CrossEntropyLoss on vocabulary-sharded logits."""

    def __init__(self, tp_group, ignore_index: int = -1):
        super().__init__()
        self.tp_group, self.ignore_index = tp_group, ignore_index

    def forward(self, logits, targets):
        return vocab_parallel_cross_entropy(logits, targets, self.tp_group, self.ignore_index)


# ---- plans -----------------------------------------------------------------------------------

class ColwiseParallel:
    """nn.Linear -> ColumnParallelLinear. chunks: parts of out_features split separately (3 for
    fused QKV); unit: each rank's share must be a multiple of it (the head size, so no head is cut)."""

    def __init__(self, chunks: int = 1, unit: int = 1):
        self.chunks, self.unit = chunks, unit

    def apply(self, module, tp_group):
        return ColumnParallelLinear(module, tp_group, chunks=self.chunks, unit=self.unit)


class RowwiseParallel:
    """nn.Linear -> RowParallelLinear."""

    def __init__(self, unit: int = 1):
        self.unit = unit

    def apply(self, module, tp_group):
        return RowParallelLinear(module, tp_group, unit=self.unit)


class VocabParallel:
    """nn.Embedding -> VocabParallelEmbedding; nn.Linear (LM head) -> VocabParallelLMHead (its
    fused_loss is the loss; calling it gathers full logits, for sampling)."""

    def apply(self, module, tp_group):
        from lmkernels.distributed.vocab_parallel import VocabParallelLMHead

        if isinstance(module, nn.Embedding):
            return VocabParallelEmbedding(module, tp_group)
        if isinstance(module, nn.Linear):
            return VocabParallelLMHead(module, tp_group)
        if isinstance(module, nn.CrossEntropyLoss):
            # the head it would pair with now returns gathered logits, so a sharded criterion
            # would be silently wrong
            raise TypeError("VocabParallel: the loss is the vocab-parallel LM head's fused_loss (no "
                            "logits); leave nn.CrossEntropyLoss out of the plan (for logits sharded "
                            "by a ColumnParallelLinear, use VocabParallelCrossEntropy directly)")
        raise TypeError(f"VocabParallel: cannot shard {type(module).__name__}")


def gpt_tp_plan(head_dim: int) -> dict:
    """Megatron's split of lmkernels.models.GPT; head_dim keeps whole heads on each rank."""
    return {
        "transformer.wte": VocabParallel(),
        "transformer.h.*.attn.c_attn": ColwiseParallel(chunks=3, unit=head_dim),
        "transformer.h.*.attn.c_proj": RowwiseParallel(unit=head_dim),
        "transformer.h.*.mlp.c_fc": ColwiseParallel(),
        "transformer.h.*.mlp.c_proj": RowwiseParallel(),
        "lm_head": VocabParallel(),
    }


def parallelize(model: nn.Module, plan: Mapping[str, object], tp_group) -> nn.Module:
    """Replaces, in place, each submodule whose qualified name matches a plan pattern (fnmatch)
    with its sharded version, and re-ties parameters the model shared (the tied embedding and
    LM head stay one parameter). Call it after building the model on every rank of tp_group
    with the same initial weights (same seed). Returns the model."""
    # remember which modules shared a parameter, by the parameter's identity
    owners: dict[int, list[tuple[str, str]]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for p_name, p in mod.named_parameters(recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((mod_name, p_name))
    used = set()
    for name, module in list(model.named_modules()):
        pattern = next((pat for pat in plan if fnmatch.fnmatchcase(name, pat)), None)
        if pattern is None:
            continue
        used.add(pattern)
        new = plan[pattern].apply(module, tp_group)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, new)
    missing = [pat for pat in plan if pat not in used]
    if missing:
        raise ValueError(f"parallelize: plan patterns matched no module: {missing}")
    for places in owners.values():  # re-tie shared parameters
        if len(places) < 2:
            continue
        params = [getattr(model.get_submodule(m), p) for m, p in places]
        first = params[0]
        for (m, p), other in zip(places[1:], params[1:]):
            if other is first:
                continue
            if other.shape != first.shape or getattr(other, "tp_shard", None) != getattr(first, "tp_shard", None):
                raise ValueError(f"parallelize: {m}.{p} was tied to {places[0][0]}.{places[0][1]} but the "
                                 f"plan shards them differently; shard both the same way")
            setattr(model.get_submodule(m), p, first)
    return model


def parallelize_gpt(model: nn.Module, tp_group) -> nn.Module:
    """parallelize(model, gpt_tp_plan(...), tp_group) with GPT-worded checks first."""
    c, size = model.config, _size(tp_group)
    if c.n_head % size:
        raise ValueError(f"tensor parallelism: n_head ({c.n_head}) must be divisible by tp ({size}); "
                         f"heads are split across ranks")
    if c.vocab_size % size:
        raise ValueError(f"tensor parallelism: vocab_size ({c.vocab_size}) must be divisible by tp ({size}); "
                         f"the vocabulary is split across ranks (pad it with vocab_size=...)")
    return parallelize(model, gpt_tp_plan(c.n_embd // c.n_head), tp_group)
