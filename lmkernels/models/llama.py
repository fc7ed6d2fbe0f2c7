"""A Llama language model: pre-norm decoder blocks with RMSNorm, rotary positions (rotate-half),
grouped-query attention, a SwiGLU MLP, no biases; the loss through the fused linear
cross-entropy (the (B*T, V) logits never exist in training).

Parameter names and config names are Hugging Face's (`LlamaForCausalLM`), so `from_hf` and
`save_hf` are plain copies of the state dict. No parallel code lives here: the
attention infers its local number of heads from the width of what q_proj/k_proj return, so a
tensor-parallel plan can shard the projections from outside, as for GPT.
"""
import json
import os
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn as nn

import lmkernels
from lmkernels.models._causal_lm import CausalLM, causal_attention


@dataclass
class LlamaConfig:
    vocab_size: int = 256
    hidden_size: int = 384
    intermediate_size: int = 1024
    num_hidden_layers: int = 6
    num_attention_heads: int = 6
    num_key_value_heads: Optional[int] = None  # None: as many as query heads (no GQA)
    head_dim: Optional[int] = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 256
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and self.num_attention_heads > 0:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"LlamaConfig: {name} must be >= 1; got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                             f"multiple of num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 8 != 0 or self.head_dim > 256:
            raise ValueError(f"LlamaConfig: head_dim must be a multiple of 8 up to 256 (lmkernels.attention); "
                             f"got {self.head_dim}")
        if not self.rms_norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"LlamaConfig: rms_norm_eps and rope_theta must be > 0; got "
                             f"{self.rms_norm_eps}, {self.rope_theta}")

    @property
    def block_size(self) -> int:  # the trainer's name for the context length
        return self.max_position_embeddings


# ------------------------------------------------------------------ rotary tables
def rope_tables(head_dim: int, length: int, theta: float, device=None):
    """(cos, sin), each (length, head_dim) float32, as Hugging Face's default rotary embedding."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
    freqs = torch.arange(length, dtype=torch.float)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1).to(device)
    return emb.cos(), emb.sin()


# ------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x, residual=None):
        """rms_norm(x), or with a residual (rms_norm(x + residual), x + residual) in one pass."""
        if residual is None:
            return lmkernels.rms_norm(x, self.weight, self.eps)
        return lmkernels.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.head_dim = c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)

    def forward(self, x, cos, sin, packing=None, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)
        q, k = lmkernels.rotary_embedding(q, k, cos, sin)  # rotate-half, cos/sin (T or B, T, hd) float32
        if kv_cache is not None:  # decoding: attend to the cached tokens too (causal is bottom-right)
            k, v = kv_cache.append(k, v)  # (B, nkv, cached + T, hd)
        y = causal_attention(q, k, v, packing)  # GQA without repeating k, v; within each document if packed
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(lmkernels.swiglu(self.gate_proj(x), self.up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, pending, cos, sin, packing=None, kv_cache=None):
        """The residual stream is x + pending (pending: the previous layer's MLP output, not yet
        added, or None); each add happens inside the following RMSNorm (add_rms_norm).
        Returns (x, pending) for the next layer."""
        if pending is None:
            h = self.input_layernorm(x)
        else:
            h, x = self.input_layernorm(pending, x)
        h, x = self.post_attention_layernorm(self.self_attn(h, cos, sin, packing, kv_cache), x)
        return x, self.mlp(h)


class LlamaModel(nn.Module):
    def __init__(self, c: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(c) for _ in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class Llama(CausalLM):
    ignore_index = -1  # target value that counts for nothing (the trainer's convention, as GPT)

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_T, hd) float32
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count (tied weights once); there are no position embeddings to exclude."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx, packing=None, kv_cache=None):
        """(B, T) token ids -> (B, T, C) final-norm hidden states. packing (PackedDocuments):
        rows hold several documents; rotary positions restart at each. With a KVCache
        (lmkernels/models/kv_cache.py) idx follows the cached tokens and is appended to them."""
        B, T = idx.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"Llama: sequence length {T} exceeds max_position_embeddings "
                             f"{self.config.max_position_embeddings}")
        if packing is not None and kv_cache is not None:
            raise ValueError("Llama: packing (training on packed documents) and kv_cache (decoding) "
                             "cannot be combined")
        if packing is not None:
            packing.check(idx)
            cos, sin = self.rope_cos[packing.position_ids], self.rope_sin[packing.position_ids]  # (B, T, hd)
        else:
            start = 0 if kv_cache is None else kv_cache.check_room("Llama", T, self.config.max_position_embeddings)
            cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]  # (T, hd)
        x, pending = self.model.embed_tokens(idx), None  # (B, T, C)
        for i, layer in enumerate(self.model.layers):
            x, pending = layer(x, pending, cos, sin, packing, None if kv_cache is None else kv_cache.layer(i))
        return self.model.norm(pending, x)[0] if pending is not None else self.model.norm(x)

    def forward(self, idx, targets=None, packing=None):
        """Training (targets given): (None, mean loss) through the fused linear cross-entropy.
        Inference: (logits of the last position (B, 1, V), None). packing: see hidden_states."""
        h = self.hidden_states(idx, packing)
        if targets is None:
            return self.lm_head(h[:, [-1], :]), None
        return None, self.head_loss(h, targets, self.ignore_index)

    def estimate_flops_per_token(self) -> float:
        """Training FLOPs per token: 6 N plus causal attention's 6 L nh hd T (PaLM appendix B)."""
        c = self.config
        return 6 * self.num_params() + 6 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * c.block_size

    # ---------------------------------------------------------- Hugging Face conversion
    @classmethod
    def from_hf(cls, hf_model_or_dir) -> "Llama":
        """A Llama with the weights of a transformers LlamaForCausalLM (or MistralForCausalLM
        without sliding window), or of a directory holding its config.json and *.safetensors
        (read directly: transformers is not needed)."""
        if isinstance(hf_model_or_dir, (str, os.PathLike)):
            with open(os.path.join(hf_model_or_dir, "config.json")) as f:
                hf_config = json.load(f)
            state = _load_safetensors_dir(hf_model_or_dir)
        else:
            hf_config = hf_model_or_dir.config.to_dict()
            state = hf_model_or_dir.state_dict()
        model = cls(config_from_hf(hf_config))
        state = {k: v for k, v in state.items() if not k.endswith("rotary_emb.inv_freq")}
        if model.config.tie_word_embeddings:
            state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
        model.load_state_dict(state, strict=True)
        return model

    def save_hf(self, directory) -> None:
        """Writes config.json + model.safetensors that transformers.LlamaForCausalLM.from_pretrained
        loads (tied embeddings are stored once, as transformers does)."""
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        c = self.config
        dtype = self.lm_head.weight.dtype
        hf_config = dict(
            architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
            attention_bias=False, mlp_bias=False, attention_dropout=0.0, pretraining_tp=1,
            rope_scaling=None, use_cache=True, dtype=str(dtype).removeprefix("torch."),
            **{f.name: getattr(c, f.name) for f in fields(c)})
        with open(os.path.join(directory, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if c.tie_word_embeddings:
            del state["lm_head.weight"]
        save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})


def config_from_hf(hf: dict) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config dict; raises for what this model does not have."""
    kind = hf.get("model_type", "llama")
    if kind not in ("llama", "mistral"):
        raise ValueError(f"Llama.from_hf: model_type must be 'llama' or 'mistral'; got {kind!r}")
    unsupported = {
        "hidden_act": (hf.get("hidden_act", "silu") != "silu", "only 'silu' (SwiGLU)"),
        "attention_bias": (bool(hf.get("attention_bias", False)), "no biases"),
        "mlp_bias": (bool(hf.get("mlp_bias", False)), "no biases"),
        "sliding_window": (hf.get("sliding_window") is not None, "full causal attention only"),
        "pretraining_tp": (hf.get("pretraining_tp", 1) != 1, "1"),
    }
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported["rope_type"] = (rope_type != "default", "'default' (no RoPE scaling)")
    for name, (bad, expected) in unsupported.items():
        if bad:
            raise ValueError(f"Llama.from_hf: {name} must be {expected}; the config has "
                             f"{hf.get(name, rope_type)!r}")
    names = {f.name for f in fields(LlamaConfig)} - {"rope_theta"}
    kwargs = {k: hf[k] for k in names if hf.get(k) is not None}
    kwargs["rope_theta"] = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    return LlamaConfig(**kwargs)


def _load_safetensors_dir(directory) -> dict:
    from safetensors.torch import load_file

    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"Llama.from_hf: no *.safetensors file in {directory}")
    state = {}
    for name in files:
        state.update(load_file(os.path.join(directory, name)))
    return state
