"""What every causal language model here shares beyond its architecture: the trainer's interface
(`logits` for evaluation and comparisons, the optimizer's two weight-decay groups)."""
from torch import nn

import lmkernels


class CausalLM(nn.Module):
    """A model with `hidden_states(idx) -> (B, T, C)` and an `lm_head`."""

    def logits(self, idx):
        """(B, T, V) logits for every position (evaluation, comparisons with other stacks)."""
        return self.lm_head(self.hidden_states(idx))

    def head_loss(self, h, targets, ignore_index: int):
        """Mean cross-entropy of lm_head(h) against targets without materializing the logits:
        the head's own `fused_loss` when it has one (the vocab-parallel head tensor parallelism
        swaps in), else lmkernels.fused_linear_cross_entropy on the nn.Linear head."""
        if hasattr(self.lm_head, "fused_loss"):
            return self.lm_head.fused_loss(h, targets, ignore_index=ignore_index)
        return lmkernels.fused_linear_cross_entropy(h, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                                    ignore_index=ignore_index)

    def configure_optimizer_groups(self, weight_decay: float):
        """Two parameter groups: matrices and embeddings decay; vectors (biases, norm weights) do not."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]
