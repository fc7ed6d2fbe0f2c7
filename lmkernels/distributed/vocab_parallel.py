"""The LM head and its loss when tensor parallelism splits the vocabulary: each TP rank holds the
rows [vocab_start, vocab_start + V_local) of the head's (V, H) weight, and no rank ever holds
logits for the whole vocabulary (nor more than one chunk of its own slice).

Forward, per rank (torch.ops.lmkernels.fused_linear_cross_entropy_fwd in its vocab-shard mode,
chunk by chunk over tokens): this shard's per-token logsumexp lse_r and the partial loss
a_r = -(1 - eps) y_target [target in this shard] - eps sum_j y_j / V. One all-gather of those
two (N,) vectors; then on every rank (float64)
    lse  = logsumexp over ranks of lse_r
    loss = lse + sum over ranks of a_r + z_loss lse^2          (0 on ignored rows)
which is F.cross_entropy's loss with label smoothing, plus the PaLM z-loss.
Backward (the op's bwd in vocab-shard mode, with the full lse): each rank recomputes its logits
chunk by chunk and takes d(loss)/d(its logits) -> its dW and db shard and its part of dh, and
dh is summed over the TP group (the input gradient of a column-parallel layer). That is 4 GEMMs
(the forward's logits are recomputed, since the forward cannot know the global lse while it has
its chunk), against eager TP's 3 with (N, V / tp) logits kept.

VocabParallelLMHead is the module the TP plans put in place of an nn.Linear LM head: its
`fused_loss(h, targets)` is the loss above; calling it gives full (..., V) logits gathered from
the ranks, for sampling and evaluation only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn import functional as F

from lmkernels.distributed.tensor_parallel import (TPShard, _check_divisible, _rank, _sharded_parameter,
                                                   _size, copy_to_tensor_parallel_region)
from lmkernels.ops.fused_linear_cross_entropy import check_flce_args

_NAME = "vocab_parallel_fused_linear_cross_entropy"


def _reduce(rows: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    """As the op's reduction: float64 sum, mean over non-ignored rows (0/0 = NaN if none)."""
    if reduction == "none":
        return rows.float()
    total = rows.sum()
    if reduction == "mean":
        total = total / valid.sum()
    return total.float()


class _VocabParallelFLCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, group, vocab_start, vocab_size, ignore_index,
                label_smoothing, z_loss, softcap, reduction, chunk_size, backend):
        # hidden (N, H) replicated over the group; weight (V_local, H) and bias (V_local,) this
        # rank's rows; target (N,) global class ids
        opts = (ignore_index, label_smoothing, z_loss, softcap, reduction, chunk_size)
        partial, _, lse_local, *_ = torch.ops.lmkernels.fused_linear_cross_entropy_fwd(
            hidden, weight, target, bias, ignore_index, label_smoothing, 0.0, softcap, "none",
            chunk_size, False, vocab_start, vocab_size, backend=backend)
        stats = torch.stack((lse_local, partial))  # (2, N): one collective for both
        gathered = [stats]
        if _size(group) > 1:
            gathered = [torch.empty_like(stats) for _ in range(_size(group))]
            dist.all_gather(gathered, stats, group=group)
        gathered = torch.stack(gathered).double()  # (tp, 2, N), the same on every rank
        valid = target != ignore_index
        lse = torch.logsumexp(gathered[:, 0], dim=0).masked_fill(~valid, 0.0)
        z_rows = (z_loss * lse * lse).masked_fill(~valid, 0.0)
        rows = (lse + gathered[:, 1].sum(0) + z_rows).masked_fill(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, target, lse.float())
        ctx.args = (group, vocab_start, vocab_size, opts, backend)
        loss, z = _reduce(rows, valid, reduction), _reduce(z_rows, valid, reduction)
        ctx.mark_non_differentiable(z)  # the z-loss term, for logging
        return loss, z

    @staticmethod
    def backward(ctx, grad_loss, _grad_z):
        hidden, weight, bias, target, lse = ctx.saved_tensors
        group, vocab_start, vocab_size, opts, backend = ctx.args
        gh, gw, gb = torch.ops.lmkernels.fused_linear_cross_entropy_bwd(
            grad_loss.contiguous(), hidden, weight, target, bias, lse, *opts, vocab_start, vocab_size,
            backend=backend)
        # dh = sum over the shards of dX_shard W_shard; summed in fp32 whatever the input dtype
        gh32 = gh.float()
        if _size(group) > 1:
            dist.all_reduce(gh32, group=group)
        gh = gh32.to(gh.dtype) if gh.dtype != torch.float32 else gh32
        return (gh, gw, gb if bias is not None else None) + (None,) * 11


def vocab_parallel_fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    tp_group,
    *,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = None,
    return_z: bool = False,
    backend: str = "auto",
):
    """lmkernels.fused_linear_cross_entropy when each rank of tp_group holds a slice of the head.

    hidden (..., H) and target (...) (global class ids) are the same on every rank; weight
    (V_local, H) and bias (V_local,) are this rank's rows [vocab_start, vocab_start + V_local)
    of a vocab_size vocabulary. Default: equal slices in rank order (vocab_size = V_local * tp,
    vocab_start = rank * V_local); uneven slices pass both (the slices must tile [0, vocab_size)
    in rank order; VocabParallelLMHead checks that once at construction). Options and result as
    the single-device op; the loss is identical on every rank, and hidden's gradient is already
    summed over the group. Collectives: one all-gather of 2 N floats forward, one all-reduce of
    hidden's gradient backward.
    """
    check_flce_args(hidden, weight, target, bias, label_smoothing, z_loss, softcap, reduction, chunk_size)
    size, v_local = _size(tp_group), weight.shape[0]
    if (vocab_start is None) != (vocab_size is None):
        raise ValueError(f"{_NAME}: pass both vocab_start and vocab_size (uneven slices) or neither "
                         f"(equal slices); got vocab_start={vocab_start}, vocab_size={vocab_size}")
    if vocab_size is None:
        vocab_start, vocab_size = _rank(tp_group) * v_local, size * v_local
    h2 = hidden.reshape(-1, hidden.shape[-1])
    loss, z = _VocabParallelFLCE.apply(
        h2, weight, bias, target.reshape(-1), tp_group, int(vocab_start), int(vocab_size),
        int(ignore_index), float(label_smoothing), float(z_loss),
        None if softcap is None else float(softcap), reduction, int(chunk_size or 0), backend)
    if reduction == "none":
        loss, z = loss.reshape(target.shape), z.reshape(target.shape)
    return (loss, z) if return_z else loss


class _GatherFromRegion(torch.autograd.Function):
    """All-gather along the last dim forward (each rank's slice -> the whole); each rank keeps
    its own slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.width = group, x.shape[-1]
        parts = [torch.empty_like(x) for _ in range(_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = _rank(ctx.group) * ctx.width
        return grad[..., start:start + ctx.width].contiguous(), None


class VocabParallelLMHead(nn.Module):
    """An nn.Linear LM head (V, H) split along the vocabulary: rank r holds rows
    [r V / tp, (r + 1) V / tp) (tp must divide V; the same split as VocabParallelEmbedding, so a
    tied embedding and head stay one parameter). fused_loss(h, targets, ...) is the
    vocab-parallel fused linear cross-entropy; calling the module returns full (..., V) logits,
    all-gathered (sampling, evaluation)."""

    def __init__(self, linear: nn.Linear, tp_group):
        super().__init__()
        self.tp_group = tp_group
        size = _size(tp_group)
        _check_divisible("VocabParallelLMHead out_features (vocab size)", linear.out_features, TPShard(0), size)
        self.in_features = linear.in_features
        self.vocab_size = linear.out_features
        self.out_features = linear.out_features // size  # local
        self.vocab_start = _rank(tp_group) * self.out_features
        self.weight = _sharded_parameter(linear.weight, TPShard(0), tp_group)  # (V / tp, H)
        self.bias = None if linear.bias is None else _sharded_parameter(linear.bias, TPShard(0), tp_group)

    def forward(self, x):
        local = F.linear(copy_to_tensor_parallel_region(x, self.tp_group), self.weight, self.bias)
        return local if _size(self.tp_group) == 1 else _GatherFromRegion.apply(local, self.tp_group)

    def fused_loss(self, h, targets, **options):
        """Cross-entropy of this head's logits of h against targets without materializing them;
        options as lmkernels.fused_linear_cross_entropy's (ignore_index, label_smoothing, ...)."""
        return vocab_parallel_fused_linear_cross_entropy(
            h, self.weight, targets, self.tp_group, vocab_start=self.vocab_start,
            vocab_size=self.vocab_size, bias=self.bias, **options)

    def extra_repr(self):
        return (f"in_features={self.in_features}, vocab_size={self.vocab_size}, "
                f"rows=[{self.vocab_start}, {self.vocab_start + self.out_features})")
