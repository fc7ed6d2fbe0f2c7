"""GPT's training loss goes through lmkernels.fused_linear_cross_entropy (no (B, T, V) logits)
and equals the eager head + F.cross_entropy; a swapped-in criterion (tensor parallelism's
vocab-parallel one) still gets the logits."""
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import lmkernels
from lmkernels.models import GPT, GPTConfig


def make(bias):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=32, bias=bias))


@pytest.mark.parametrize("bias", [False, True])
def test_loss_is_fused_and_equals_eager(monkeypatch, bias):
    model = make(bias)
    if bias:  # a nonzero head bias, so that the fused op's bias path is what is compared
        model.lm_head = nn.Linear(32, 97, bias=True)
        model.lm_head.weight = model.transformer.wte.weight
    idx = torch.randint(0, 97, (3, 13))
    targets = idx.roll(-1, 1)
    targets[1, :5] = -1  # the trainer's ignore value
    calls = []
    real = lmkernels.fused_linear_cross_entropy
    monkeypatch.setattr(lmkernels, "fused_linear_cross_entropy", lambda *a, **k: calls.append(1) or real(*a, **k))
    logits, loss = model(idx, targets)
    assert logits is None and calls == [1]
    eager = F.cross_entropy(model.logits(idx).flatten(0, 1), targets.flatten(), ignore_index=-1)
    torch.testing.assert_close(loss, eager, rtol=1e-6, atol=1e-6)  # fp32 rounding
    params = [p for p in model.parameters()]
    g = torch.autograd.grad(loss, params)
    g_eager = torch.autograd.grad(eager, params)
    for a, b in zip(g, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    last, none = model(idx)
    assert none is None and last.shape == (3, 1, 97)
    torch.testing.assert_close(last[:, 0], model.logits(idx)[:, -1])


def test_swapped_criterion_gets_the_logits():
    """Tensor parallelism replaces `criterion` (and the head) with vocab-parallel modules: the
    model must then compute the (local) logits and call the criterion on them."""
    model = make(False)
    seen = []

    class Recording(nn.Module):
        def forward(self, logits, targets):
            seen.append(logits.shape)
            return F.cross_entropy(logits, targets, ignore_index=-1)

    idx = torch.randint(0, 97, (2, 9))
    fused = model(idx, idx)[1]
    model.criterion = Recording()
    logits, loss = model(idx, idx)
    assert seen == [(18, 97)] and logits.shape == (2, 9, 97)
    torch.testing.assert_close(loss, fused, rtol=1e-6, atol=1e-6)
    model.criterion = nn.CrossEntropyLoss(ignore_index=-1, label_smoothing=0.1)  # not what the fused call does
    assert model(idx, idx)[0] is not None
    model.criterion = nn.CrossEntropyLoss(ignore_index=-1)
    assert model._fused_loss_applies()
    assert not model.double()._fused_loss_applies()  # float64 (tests' ground truth): the eager path
