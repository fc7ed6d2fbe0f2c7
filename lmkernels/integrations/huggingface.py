"""Hugging Face transformers: `apply_lmkernels_to_llama(model)` patches a LlamaForCausalLM (or
its close relatives MistralForCausalLM and Qwen2ForCausalLM, same layer structure) in place:

- every RMSNorm goes through lmkernels' rms_norm, and the decoder layers add the attention
  output to the residual inside the post-attention norm (add_rms_norm: one pass fewer);
- the MLP's silu(gate) * up goes through swiglu;
- attention: rotary embedding (rotate-half) + lmkernels.attention (GQA without repeating K/V,
  causal), whenever transformers' mask is the plain causal one (it passes no mask tensor then,
  with the "sdpa" attention implementation this patch selects); with a padding mask the
  original attention runs;
- with labels, the loss goes through fused_linear_cross_entropy: the (B, T, V) logits are
  never made, and the output's logits are None (as Liger-Kernel does). Without labels the
  logits are computed as before.

Outputs, loss and gradients equal the unpatched model's up to rounding. Applying it twice
changes nothing. Unsupported configurations (activation other than silu, RoPE scaling, attention
dropout while training) raise a ValueError naming the setting.
"""
import types

import torch

import lmkernels

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_MARK = "_lmkernels_patched"


def check_config(config) -> None:
    """Raises a ValueError naming the first setting this patch does not support."""
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"apply_lmkernels_to_llama: model_type must be one of {SUPPORTED_MODEL_TYPES}; got {kind!r}")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"apply_lmkernels_to_llama: hidden_act must be 'silu' (SwiGLU); got {act!r}")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"apply_lmkernels_to_llama: only default RoPE is supported; the config has "
                         f"rope_type {rope_type!r}")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 8 != 0 or head_dim > 256:
        raise ValueError(f"apply_lmkernels_to_llama: head_dim must be a multiple of 8 up to 256; got {head_dim}")


# ------------------------------------------------------------------ replacement forwards
def _rms_norm_forward(self, hidden_states):
    return lmkernels.rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(lmkernels.swiglu(self.gate_proj(x), self.up_proj(x)))


def _attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None,
                       past_key_values=None, **kwargs):
    if self.training and self.attention_dropout > 0:
        raise ValueError(f"apply_lmkernels_to_llama: attention dropout ({self.attention_dropout}) in "
                         "training is not supported; set config.attention_dropout = 0")
    if attention_mask is not None:  # padding (or another non-causal mask): the original path
        return self._lmkernels_original_forward(hidden_states, position_embeddings, attention_mask,
                                                past_key_values, **kwargs)
    B, T, _ = hidden_states.shape
    q = self.q_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
    k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
    v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)
    cos, sin = position_embeddings  # (B, T, hd) each
    q, k = lmkernels.rotary_embedding(q, k, cos[:, None], sin[:, None])
    if past_key_values is not None:
        k, v = past_key_values.update(k, v, self.layer_idx)
    # no mask tensor: causal, aligned bottom-right when decoding with a cache (S > T)
    y = lmkernels.attention(q, k, v, is_causal=True, scale=self.scaling)
    return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), None


def _decoder_layer_forward(self, hidden_states, attention_mask=None, position_ids=None,
                           past_key_values=None, use_cache=False, position_embeddings=None, **kwargs):
    residual = hidden_states
    h = self.input_layernorm(hidden_states)
    h, _ = self.self_attn(hidden_states=h, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, use_cache=use_cache,
                          position_embeddings=position_embeddings, **kwargs)
    norm = self.post_attention_layernorm
    h, hidden_states = lmkernels.add_rms_norm(h, residual, norm.weight, norm.variance_epsilon)
    return hidden_states + self.mlp(h)


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                       past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                       logits_to_keep=0, **kwargs):
    if labels is None:
        return self._lmkernels_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, labels=None,
            use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast
    from transformers.modeling_utils import slice_logits_to_keep

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                         use_cache=use_cache, **kwargs)
    hidden = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
    if shift_labels is None:  # tokens < n predict n, as transformers' ForCausalLMLoss
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.to(hidden.device)
    loss = lmkernels.fused_linear_cross_entropy(
        hidden, self.lm_head.weight, shift_labels, bias=self.lm_head.bias, ignore_index=ignore_index,
        reduction="mean" if num_items_in_batch is None else "sum")
    if num_items_in_batch is not None:
        loss = loss / num_items_in_batch
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


def _patch(module, method, name="forward") -> None:
    if getattr(module, _MARK, False):
        return
    setattr(module, f"_lmkernels_original_{name}", getattr(module, name))
    setattr(module, name, types.MethodType(method, module))
    setattr(module, _MARK, True)


def apply_lmkernels_to_llama(model):
    """Patches a transformers LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM (or their
    base *Model) in place and returns it. Idempotent."""
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"apply_lmkernels_to_llama: expected a transformers model; got {type(model).__name__}")
    check_config(config)
    if hasattr(model, "set_attn_implementation") and getattr(config, "_attn_implementation", None) != "sdpa":
        model.set_attn_implementation("sdpa")  # masks that are plainly causal are then passed as None
    for module in model.modules():
        kind = type(module).__name__
        if kind.endswith("RMSNorm"):
            _patch(module, _rms_norm_forward)
        elif kind.endswith("MLP"):
            _patch(module, _mlp_forward)
        elif kind.endswith("Attention"):
            _patch(module, _attention_forward)
        elif kind.endswith("DecoderLayer"):
            _patch(module, _decoder_layer_forward)
    if hasattr(model, "lm_head") and hasattr(model, "model"):
        _patch(model, _causal_lm_forward)
    return model


def apply_lmkernels_to_mistral(model):
    return apply_lmkernels_to_llama(model)


def apply_lmkernels_to_qwen2(model):
    return apply_lmkernels_to_llama(model)
