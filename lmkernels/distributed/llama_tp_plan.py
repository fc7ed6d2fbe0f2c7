"""Tensor-parallel plan for lmkernels.models.Llama (Megatron's split, applied from outside).

q/k/v and gate/up are column-parallel (each rank keeps whole query heads and whole key/value
heads, so grouped-query attention stays local), o_proj and down_proj row-parallel (one
all-reduce each), the token embedding and the LM head vocab-parallel as in the GPT plan (the
loss is the head's vocab-parallel fused linear cross-entropy: no rank holds (N, V) logits; a
tied embedding and head share one shard).
"""
from lmkernels.distributed.tensor_parallel import ColwiseParallel, RowwiseParallel, VocabParallel, parallelize


def llama_tp_plan(head_dim: int) -> dict:
    """Module-name patterns -> styles for Llama; head_dim keeps whole heads on each rank."""
    return {
        "model.embed_tokens": VocabParallel(),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(unit=head_dim),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(unit=head_dim),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(unit=head_dim),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(unit=head_dim),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": VocabParallel(),
    }


def parallelize_llama(model, tp_group):
    """parallelize(model, llama_tp_plan(...), tp_group) with Llama-worded checks first."""
    from lmkernels.distributed.tensor_parallel import _size

    c, size = model.config, _size(tp_group)
    checks = (("num_attention_heads", c.num_attention_heads, "query heads are split across ranks"),
              ("num_key_value_heads", c.num_key_value_heads, "key/value heads are split across ranks"),
              ("intermediate_size", c.intermediate_size, "the MLP is split across ranks"),
              ("vocab_size", c.vocab_size, "the embedding and LM head are split across ranks (pad it with "
               "vocab_size=...)"))
    for name, value, why in checks:
        if value % size:
            raise ValueError(f"tensor parallelism: {name} ({value}) must be divisible by tp ({size}); {why}")
    return parallelize(model, llama_tp_plan(c.head_dim), tp_group)
