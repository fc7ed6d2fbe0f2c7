"""lmkernels.models.Llama: against transformers' LlamaForCausalLM with the same weights (loss,
gradients, logits), the from_hf / save_hf round trip, and the trainer-facing interface."""
import os

import pytest
import torch
from torch.nn import functional as F

from lmkernels.models import Llama, LlamaConfig

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=88, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def make(**overrides):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**{**TINY, **overrides}))


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="head_dim"):
        LlamaConfig(**{**TINY, "hidden_size": 20})
    with pytest.raises(ValueError, match="vocab_size"):
        LlamaConfig(**{**TINY, "vocab_size": 0})
    with pytest.raises(ValueError, match="exceeds max_position_embeddings"):
        make()(torch.zeros(1, 65, dtype=torch.long))


def test_loss_is_cross_entropy_of_its_logits():
    model = make()
    idx = torch.randint(0, 97, (3, 31))
    targets = idx.roll(-1, 1)
    targets[1, :7] = -1  # the trainer's ignore value
    logits_none, loss = model(idx, targets)
    assert logits_none is None
    eager = F.cross_entropy(model.logits(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, eager)
    g = torch.autograd.grad(loss, list(model.parameters()))
    g_eager = torch.autograd.grad(eager, list(model.parameters()))
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, 97)
    torch.testing.assert_close(last[:, 0], model.logits(idx)[:, -1])


def test_trainer_interface():
    model = make(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    groups = model.configure_optimizer_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    assert model.estimate_flops_per_token() > 6 * model.num_params()
    g = torch.Generator().manual_seed(1)
    out = model.generate(torch.zeros(2, 3, dtype=torch.long), 5, top_k=10, generator=g)
    assert out.shape == (2, 8) and out.max() < 97


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("tied", (False, True))
def test_save_hf_loads_in_transformers_with_the_same_logits(tmp_path, tied):
    model = make(tie_word_embeddings=tied, rope_theta=5000.0)
    model.save_hf(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        ours, theirs = model.logits(idx), hf(idx).logits
    # different kernels (our attention / norms vs transformers'), same maths: fp32 rounding only
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for source in (tmp_path, hf):  # and back: the very same weights
        back = Llama.from_hf(source)
        assert back.config == model.config
        for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
            assert torch.equal(a, b), n
        assert (back.lm_head.weight is back.model.embed_tokens.weight) == tied


def test_matches_transformers_loss_and_gradients():
    """Our Llama and transformers' with the same weights: loss and gradients within 2x the
    error of transformers' fp32 model against its float64 run."""
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model = Llama.from_hf(hf)
    hf64 = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).double()
    hf64.load_state_dict(hf.state_dict())
    idx = torch.randint(0, 97, (2, 37))[:, :-1]
    # transformers shifts the labels inside (position t predicts label t + 1, the last predicts
    # nothing); our targets are the shifted labels, with the trainer's ignore value at the end
    results = [m(idx, labels=idx) for m in (hf, hf64)]
    targets = idx.roll(-1, 1)
    targets[:, -1] = -1
    _, loss = model(idx, targets)
    loss.backward()
    for r in results:
        r.loss.backward()
    eps = torch.finfo(torch.float32).eps
    truth = results[1].loss.double()
    assert (loss.double() - truth).abs() <= 2 * (results[0].loss.double() - truth).abs() + 2 * eps * truth.abs()
    names = dict(hf.named_parameters())
    names64 = dict(hf64.named_parameters())
    for n, p in model.named_parameters():
        t = names64[n].grad
        err = (p.grad.double() - t).abs().max()
        ref_err = (names[n].grad.double() - t).abs().max()
        assert err <= 2 * ref_err + 2 * eps * t.abs().max(), n


def test_from_hf_rejects_what_it_cannot_run():
    for bad, match in ((dict(hidden_act="gelu"), "hidden_act"), (dict(attention_bias=True), "attention_bias"),
                       (dict(rope_parameters=dict(rope_type="linear", factor=2.0, rope_theta=1e4)), "rope_type")):
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **bad}))
        with pytest.raises(ValueError, match=match):
            Llama.from_hf(hf)


def test_export_writes_a_transformers_model(tmp_path):
    from dataclasses import asdict

    from lmkernels.train.export import export_hf

    model = make()
    export_hf(model.state_dict(), asdict(model.config), tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    idx = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model.logits(idx), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="only Llama checkpoints"):
        export_hf({}, dict(n_embd=32, n_layer=1), tmp_path / "gpt")
