"""apply_lmkernels_to_llama: a patched transformers model against the unpatched one.

Tolerance (the issue's rule): the patched fp32 model's error against the unpatched model run in
float64 may be at most twice the unpatched fp32 model's error, plus two fp32 rounding units at
the result's magnitude. Tiny random configs, no downloads.
"""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lmkernels  # noqa: E402
from lmkernels.integrations.huggingface import apply_lmkernels_to_llama  # noqa: E402

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make_model(kind="llama", **overrides):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**{**TINY, **overrides})
        return transformers.LlamaForCausalLM(cfg)
    if kind == "mistral":
        cfg = transformers.MistralConfig(**{**TINY, "sliding_window": None, **overrides})
        return transformers.MistralForCausalLM(cfg)
    cfg = transformers.Qwen2Config(**{**TINY, **overrides})  # q/k/v projections with biases
    return transformers.Qwen2ForCausalLM(cfg)


def assert_within_ref_error(name, ours, ref, truth):
    truth = truth.double()
    err = (ours.double() - truth).abs().max().item()
    ref_err = (ref.double() - truth).abs().max().item()
    floor = 2 * torch.finfo(torch.float32).eps * truth.abs().max().item()
    assert err <= 2 * ref_err + floor, f"{name}: error {err:.3g} > 2 x unpatched error {ref_err:.3g} + {floor:.3g}"


def loss_and_grads(model, idx, labels):
    model.zero_grad()
    loss = model(idx, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ("llama", "mistral", "qwen2"))
def test_patched_matches_unpatched(kind):
    ref = make_model(kind)
    truth_model = copy.deepcopy(ref).double()
    ours = apply_lmkernels_to_llama(copy.deepcopy(ref))
    idx = torch.randint(0, 97, (3, 29))
    labels = idx.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        assert_within_ref_error("logits", ours(idx).logits, ref(idx).logits, truth_model(idx).logits)
    l_ours, g_ours = loss_and_grads(ours, idx, labels)
    l_ref, g_ref = loss_and_grads(ref, idx, labels)
    l_truth, g_truth = loss_and_grads(truth_model, idx, labels)
    assert_within_ref_error("loss", l_ours, l_ref, l_truth)
    assert g_ours.keys() == g_ref.keys()
    for name in g_ref:
        assert_within_ref_error(f"grad {name}", g_ours[name], g_ref[name], g_truth[name])


def test_runs_our_ops_and_is_idempotent(monkeypatch):
    model = apply_lmkernels_to_llama(make_model())
    forwards = [m.forward for m in model.modules()]
    apply_lmkernels_to_llama(model)
    assert [m.forward for m in model.modules()] == forwards  # the second call changes nothing
    calls = {"attention": 0, "flce": 0}
    attention, flce = lmkernels.attention, lmkernels.fused_linear_cross_entropy

    def counting(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(lmkernels, "attention", counting("attention", attention))
    monkeypatch.setattr(lmkernels, "fused_linear_cross_entropy", counting("flce", flce))
    idx = torch.randint(0, 97, (2, 11))
    out = model(idx, labels=idx)
    assert calls == {"attention": 2, "flce": 1}
    assert out.logits is None  # the logits are never made when labels are given


def test_padding_mask_and_generate_match_unpatched():
    ref = make_model()
    ours = apply_lmkernels_to_llama(copy.deepcopy(ref))
    idx = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(idx)
    mask[0, :4] = 0  # left padding: the original attention path
    with torch.no_grad():
        torch.testing.assert_close(ours(idx, attention_mask=mask).logits, ref(idx, attention_mask=mask).logits)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones(2, 7, dtype=torch.long))
        assert torch.equal(ours.generate(idx[:, :7], **kw), ref.generate(idx[:, :7], **kw))


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="hidden_act"):
        apply_lmkernels_to_llama(make_model(hidden_act="gelu"))
    with pytest.raises(ValueError, match="rope_type"):
        apply_lmkernels_to_llama(make_model(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=10000.0)))
    with pytest.raises(ValueError, match="model_type"):
        apply_lmkernels_to_llama(transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2)))
    model = apply_lmkernels_to_llama(make_model(attention_dropout=0.1)).train()
    with pytest.raises(ValueError, match="attention dropout"):
        model(torch.randint(0, 97, (1, 5)))
    model.eval()(torch.randint(0, 97, (1, 5)))  # no dropout in eval: fine
