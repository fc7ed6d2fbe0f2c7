"""KV-cache decoding (lmkernels/models/kv_cache.py, CausalLM.generate): the same tokens as the
full re-forward under one generator, the same logits within fp32 tolerance, one-token attention
calls against the cache, and clear errors."""
import pytest
import torch

import lmkernels
from lmkernels.models import GPT, GPTConfig, Llama, LlamaConfig
from lmkernels.models.kv_cache import KVCache, LayerKVCache
from lmkernels.reference.attention import attention_reference
from lmkernels.triton import attention as triton_attention
from lmkernels.triton._common import triton_interpreted
from tests._backends import ON_GPU

BLOCK = 13  # an awkward context length; prompts and generations cross it below
VOCAB = 97


def make_model(kind, block_size=BLOCK):
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=2, n_head=3, n_embd=48))
    elif kind == "gpt_rotary":
        model = GPT(GPTConfig(block_size=block_size, vocab_size=VOCAB, n_layer=2, n_head=2, n_embd=32, rotary=True))
    else:  # GQA: 4 query heads share 2 key/value heads (the cache stores 2)
        model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                  max_position_embeddings=block_size))
    return model.eval()


KINDS = ("gpt", "gpt_rotary", "llama_gqa")
SAMPLING = {"greedy": dict(top_k=1), "top_k": dict(temperature=0.7, top_k=5), "full": dict(temperature=1.3)}


@pytest.mark.parametrize("sampling", SAMPLING)
@pytest.mark.parametrize("prompt_len", [1, 6, BLOCK - 1, BLOCK, BLOCK + 4])
@pytest.mark.parametrize("kind", KINDS)
def test_same_tokens_as_without_cache(kind, prompt_len, sampling):
    """BLOCK + 3 new tokens: every generation here ends past block_size (the window slides)."""
    model = make_model(kind)
    idx = torch.randint(0, VOCAB, (2, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    runs = [model.generate(idx, BLOCK + 3, generator=torch.Generator().manual_seed(7), use_cache=use_cache,
                           **SAMPLING[sampling]) for use_cache in (True, False)]
    assert runs[0].shape == (2, prompt_len + BLOCK + 3)
    assert torch.equal(runs[0], runs[1])
    assert torch.equal(runs[0][:, :prompt_len], idx)


@pytest.mark.parametrize("kind", KINDS)
def test_same_tokens_within_block_size(kind):
    """A generation that ends inside the context: the cache is never full."""
    model = make_model(kind)
    idx = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(1))
    a, b = (model.generate(idx, BLOCK - 6, temperature=0.9, top_k=11, generator=torch.Generator().manual_seed(3),
                           use_cache=use_cache) for use_cache in (True, False))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_logits_match_full_forward(kind):
    """Prefill a prompt, then feed tokens one at a time (and one chunk of 3): each step's logits
    are those of a full forward over the whole sequence, within fp32 tolerance."""
    model = make_model(kind)
    seq = torch.randint(0, VOCAB, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    full = model.logits(seq)  # (B, BLOCK, V)
    cache = KVCache(BLOCK)
    with torch.no_grad():
        pieces = [(0, 5)] + [(t, t + 1) for t in range(5, 9)] + [(9, 12), (12, 13)]
        for lo, hi in pieces:
            step = model.lm_head(model.hidden_states(seq[:, lo:hi], kv_cache=cache))
            torch.testing.assert_close(step, full[:, lo:hi])
    assert cache.length == BLOCK


def test_decode_attends_one_query_against_the_cache(monkeypatch):
    """Prefill is one forward of the prompt; each later token (until the window slides) is one
    attention call per layer with T=1 against S = all tokens so far; past block_size each token
    is a full forward of the window."""
    model = make_model("llama_gqa", block_size=8)
    shapes = []
    attention = lmkernels.attention

    def recording(q, k, v, **kw):
        shapes.append((q.shape[2], k.shape[2], k.shape[1]))  # (T, S, Hkv)
        return attention(q, k, v, **kw)

    monkeypatch.setattr(lmkernels, "attention", recording)
    model.generate(torch.zeros(1, 5, dtype=torch.long), 12, generator=torch.Generator().manual_seed(0))
    per_step = [(5, 5, 2), (1, 6, 2), (1, 7, 2), (1, 8, 2)] + [(8, 8, 2)] * 8
    assert shapes == [s for s in per_step for _ in range(2)]  # 2 layers


def test_layer_cache_writes_in_place():
    """One buffer per layer, allocated at the first append; appends are views of it."""
    cache = LayerKVCache(max_len=7)
    chunks = [torch.randn(2, 3, t, 8) for t in (3, 1, 2)]
    for i, c in enumerate(chunks):
        k, v = cache.append(c, -c)
        if i == 0:
            ptr = cache.keys.data_ptr()
        assert cache.keys.data_ptr() == ptr and k.data_ptr() == ptr and cache.keys.shape == (2, 3, 7, 8)
    assert torch.equal(k, torch.cat(chunks, dim=2)) and torch.equal(v, -k) and cache.length == 6


def test_cache_errors():
    cache = LayerKVCache(max_len=4)
    with pytest.raises(ValueError, match="one \\(B, Hkv, T, D\\) shape"):
        cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 2, 8))
    cache.append(torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8))
    with pytest.raises(ValueError, match="3 cached \\+ 2 new tokens exceed max_len 4"):
        cache.append(torch.randn(1, 2, 2, 8), torch.randn(1, 2, 2, 8))
    with pytest.raises(ValueError, match="the cache holds"):
        cache.append(torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8))
    with pytest.raises(ValueError, match="max_len must be an int >= 1"):
        KVCache(0)


@pytest.mark.parametrize("kind", KINDS)
def test_cache_past_context_length_is_refused(kind):
    model = make_model(kind)
    cache = KVCache(2 * BLOCK)  # the cache has room; the model's positions do not
    with torch.no_grad():
        model.hidden_states(torch.zeros(1, BLOCK - 1, dtype=torch.long), kv_cache=cache)
        with pytest.raises(ValueError, match=f"{BLOCK - 1} cached \\+ 2 new tokens exceed the context length {BLOCK}"):
            model.hidden_states(torch.zeros(1, 2, dtype=torch.long), kv_cache=cache)


@pytest.mark.parametrize("bad, match", [
    (dict(idx=torch.zeros(3, dtype=torch.long)), "idx must be a \\(B, T\\) int64 or int32 tensor"),
    (dict(idx=torch.zeros(1, 0, dtype=torch.long)), "idx must be a \\(B, T\\) int64 or int32 tensor"),
    (dict(idx=torch.zeros(1, 2)), "idx must be a \\(B, T\\) int64 or int32 tensor"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0; got -1"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0; got nan"),
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be None or an int >= 1; got 0"),
])
def test_generate_bad_arguments(bad, match):
    model = make_model("gpt")
    kw = dict(idx=torch.zeros(1, 2, dtype=torch.long), max_new_tokens=3) | bad
    with pytest.raises(ValueError, match=match):
        model.generate(**kw)


def test_zero_new_tokens_returns_the_prompt():
    idx = torch.randint(0, VOCAB, (2, 5))
    assert torch.equal(make_model("llama_gqa").generate(idx, 0), idx)


def test_sampler_decodes_with_the_cache(monkeypatch):
    """lmkernels-sample and the trainer's end-of-run sample (train.loop.sample_text) decode one
    token at a time against the cache, and print what the no-cache path gives."""
    from lmkernels.models import _causal_lm
    from lmkernels.train.data import ByteTokenizer
    from lmkernels.train.loop import sample_text

    args = dict(model="gpt", n_layer=2, n_head=2, n_embd=32, block_size=24, vocab_size=256, dropout=0.0,
                bias=True, rotary=False)
    torch.manual_seed(0)
    state = GPT(GPTConfig(**{k: v for k, v in args.items() if k != "model"})).state_dict()
    queries = []
    attention = lmkernels.attention

    def recording(q, k, v, **kw):
        queries.append(q.shape[2])
        return attention(q, k, v, **kw)

    monkeypatch.setattr(lmkernels, "attention", recording)
    text = sample_text(state, args, ByteTokenizer(), 10, torch.device("cpu"), seed=3, start="ab")
    assert queries == [2] * 2 + [1] * 2 * 9  # prompt, then one query per token and layer

    generate = _causal_lm.CausalLM.generate
    monkeypatch.setattr(_causal_lm.CausalLM, "generate", lambda *a, **kw: generate(*a, **kw, use_cache=False))
    assert sample_text(state, args, ByteTokenizer(), 10, torch.device("cpu"), seed=3, start="ab") == text


@pytest.mark.skipif(ON_GPU or not triton_interpreted(), reason="Triton launchers on CPU tensors need TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_triton_attention_reads_the_cache_views(dtype):
    """On CUDA the decode step hands the Triton kernel views of the cache buffer (batch and head
    strides of max_len rows): same result as on contiguous copies, and as the reference."""
    cache = LayerKVCache(max_len=50)
    g = torch.Generator().manual_seed(0)
    kv = [torch.randn(2, 2, 37, 16, generator=g).to(dtype) for _ in range(2)]
    cache.append(*kv)
    q, k_new, v_new = (torch.randn(2, 2 if i else 4, 1, 16, generator=g).to(dtype) for i in range(3))
    k, v = cache.append(k_new, v_new)  # (2, 2, 38, 16) views, not contiguous
    assert not k.is_contiguous()
    out, lse = triton_attention.attention_fwd(q, k, v, 0.25, True, -1, -1)
    out_c, lse_c = triton_attention.attention_fwd(q, k.contiguous(), v.contiguous(), 0.25, True, -1, -1)
    assert torch.equal(out, out_c) and torch.equal(lse, lse_c)
    # flash-attention's rule: at most twice the error of PyTorch's attention in the same dtype
    ref, _ = attention_reference(q.double(), k.double(), v.double(), is_causal=True, scale=0.25)
    torch_out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True)
    assert (out.double() - ref).abs().max() <= 2 * (torch_out.double() - ref).abs().max() + 1e-6
