"""A key/value cache for decoding: each layer's keys and values of the tokens seen so far, in a
buffer allocated once, (B, Hkv, max_len, D), so a new token is written in place (no torch.cat
growth per token) and attention reads a view of the filled part.

The models take it as `hidden_states(idx, kv_cache=cache)`: idx holds the tokens that follow the
`kv_cache.length` cached ones, at positions length, length + 1, ... Each attention layer appends
its new keys/values through its `LayerKVCache` and attends with `lmkernels.attention(q, k, v,
is_causal=True)` against all of them; with T new queries and S = length + T keys the causal mask
is aligned bottom-right, so query i sees keys j <= length + i, exactly what a full forward gives.

A layer's buffer is sized by the first keys it sees (batch, heads, head size, dtype, device), so
the cache needs no model config: grouped-query models store their Hkv heads only, and a model
whose heads were sharded by tensor parallelism would store its local heads.
"""
import torch


class LayerKVCache:
    """One layer's keys and values; `length` tokens of `max_len` are filled."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.keys = self.values = None  # (B, Hkv, max_len, D), allocated by the first append

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Stores k, v (B, Hkv, T, D) after the cached tokens and returns the keys and values of
        all length + T tokens, (B, Hkv, length + T, D) views of the buffer."""
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"LayerKVCache.append: k and v must be one (B, Hkv, T, D) shape; got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        B, H, T, D = k.shape
        if self.keys is None:
            self.keys = k.new_empty((B, H, self.max_len, D))
            self.values = v.new_empty((B, H, self.max_len, D))
        elif (B, H, D) != (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3]) or k.dtype != self.keys.dtype:
            raise ValueError(f"LayerKVCache.append: the cache holds (B, Hkv, D) = "
                             f"{(self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])} {self.keys.dtype}; "
                             f"got {(B, H, D)} {k.dtype}")
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"LayerKVCache.append: {self.length} cached + {T} new tokens exceed "
                             f"max_len {self.max_len}")
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class KVCache:
    """The cache of every layer of a model (`layer(i)`, created on first use); all layers hold
    the same tokens between forwards."""

    def __init__(self, max_len: int):
        if not isinstance(max_len, int) or max_len < 1:
            raise ValueError(f"KVCache: max_len must be an int >= 1; got {max_len!r}")
        self.max_len = max_len
        self.layers = []

    def layer(self, i: int) -> LayerKVCache:
        while len(self.layers) <= i:
            self.layers.append(LayerKVCache(self.max_len))
        return self.layers[i]

    @property
    def length(self) -> int:
        """Tokens cached: the position of the next token."""
        return self.layers[0].length if self.layers else 0

    def check_room(self, model: str, new_tokens: int, context: int) -> int:
        """The position of the first of new_tokens, after checking they fit in the cache and in the
        model's context length (context: block_size or max_position_embeddings)."""
        start = self.length
        if start + new_tokens > min(self.max_len, context):
            raise ValueError(f"{model}: {start} cached + {new_tokens} new tokens exceed the "
                             f"{'context length' if context <= self.max_len else 'KV cache max_len'} "
                             f"{min(self.max_len, context)}")
        return start
