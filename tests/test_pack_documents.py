"""Packed documents (--pack_documents): document boundaries from the data, packed batch layouts,
and the models' equivalence with running each document alone; the trainer with DP, TP and resume."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import lmkernels
from lmkernels.models import gpt as gpt_module
from lmkernels.models._causal_lm import PackedDocuments
from lmkernels.models.gpt import GPT, GPTConfig
from lmkernels.models.llama import Llama, LlamaConfig
from lmkernels.reference.attention import attention_reference
from lmkernels.reference.rms_norm import add_rms_norm_reference, rms_norm_reference
from lmkernels.reference.rotary_embedding import rotary_embedding_reference
from lmkernels.reference.swiglu import swiglu_reference
from lmkernels.train import TrainConfig, train
from lmkernels.train.data import (IGNORE_INDEX, BatchSampler, ByteTokenizer, TokenData, pack_windows,
                                  prepare_data)
from tests._dist import run_distributed

VOCAB = 97


def test_documents_are_files_or_pieces_between_separators(tmp_path):
    files = tmp_path / "files"
    files.mkdir()
    (files / "a.txt").write_text("first file\nline two\n")
    (files / "b.txt").write_text("")  # empty: no document
    (files / "c.txt").write_text("é<END>second<END><END>third")
    data = prepare_data([str(files)], "byte", 0.3, tmp_path / "cache", verbose=False)
    tokens = np.concatenate([data.train, data.val])
    text = ByteTokenizer().decode(tokens)
    assert text == "first file\nline two\n\né<END>second<END><END>third"  # documents joined by "\n"
    # 49 bytes: 35 train, 14 val; the document the split cuts starts the validation split again
    assert data.train_doc_starts.tolist() == [0, 21] and data.val_doc_starts.tolist() == [0]
    assert ByteTokenizer().decode(tokens[21:26]) == "é<EN"  # offsets count bytes
    assert (data.meta["train_documents"], data.meta["val_documents"]) == (2, 1)

    split = prepare_data([str(files)], "char", 0.3, tmp_path / "cache", verbose=False, doc_separator="<END>")
    assert split.train.filename != data.train.filename  # the separator is part of the cache key
    chars = split.tokenizer.decode(np.concatenate([split.train, split.val]))
    assert chars == "first file\nline two\n\né\nsecond\nthird"  # separators dropped, empty pieces skipped
    # 35 characters: 25 train, 10 val; offsets count characters ("é" is one token)
    assert split.train_doc_starts.tolist() == [0, 21, 23] and split.val_doc_starts.tolist() == [0, 30 - 25]
    with pytest.raises(TypeError, match="doc_separator must be a string"):
        prepare_data([str(files)], "byte", 0.3, tmp_path / "cache", doc_separator=3)


def test_pack_windows_cuts_documents_and_ignores_their_first_targets():
    # documents start at tokens 0, 3, 4, 12, 13; windows of 8 tokens at 0 and at 5
    ignore, packing = pack_windows([0, 5], np.array([0, 3, 4, 12, 13]), 8)
    assert ignore.int().tolist() == [[0, 0, 1, 1, 0, 0, 0, 0],   # y[2] = token 3, y[3] = token 4
                                     [0, 0, 0, 0, 0, 0, 1, 1]]   # y[6] = token 12, y[7] = token 13
    assert packing.cu_seqlens.dtype == torch.int32
    assert packing.cu_seqlens.tolist() == [0, 3, 4, 8, 15, 16]  # row 1 = tokens 5..12: cut at 12
    assert packing.max_seqlen == 7
    assert packing.position_ids.tolist() == [[0, 1, 2, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 0]]


def _token_data(doc_lengths, seed=0):
    """A TokenData of random tokens whose documents have these lengths (train and val alike)."""
    g = np.random.default_rng(seed)
    starts = np.cumsum([0] + list(doc_lengths[:-1])).astype(np.int64)
    n = int(sum(doc_lengths))
    tokens = g.integers(0, VOCAB, n).astype(np.uint8)
    return TokenData(train=tokens, val=tokens.copy(), tokenizer=ByteTokenizer(), meta={},
                     train_doc_starts=starts, val_doc_starts=starts.copy())


def _awkward_lengths(n, seed=0):
    g = np.random.default_rng(seed)
    return g.choice([1, 2, 5, 13, 40, 97], size=n).tolist()


def test_packed_batch_is_the_same_window_with_its_layout():
    data = _token_data(_awkward_lengths(200))
    sampler = BatchSampler(data, 37, 5, seed=1)
    x, y = sampler.get_batch("train", 3, 1)
    px, py, packing = sampler.get_batch("train", 3, 1, packed=True)
    assert torch.equal(x, px)
    ignored = py == IGNORE_INDEX
    assert torch.equal(py[~ignored], y[~ignored]) and ignored.any()
    # every document (a run of positions counting up from 0) is one cu_seqlens segment
    pos = packing.position_ids.flatten()
    starts = torch.nonzero(pos == 0).flatten()
    assert torch.equal(packing.cu_seqlens[:-1].long(), starts) and packing.cu_seqlens[-1] == x.numel()
    assert torch.equal(pos[1:][pos[1:] != 0], (pos[:-1] + 1)[pos[1:] != 0])
    # an ignored target is the token that starts the next document in the window (or just after it)
    T = x.shape[1]
    for row, p in ignored.nonzero().tolist():
        assert p == T - 1 or packing.position_ids[row, p + 1] == 0
    # batch_size 1: x and y are views of one row, and marking y must not change x
    short = _token_data([2, 3] * 40)  # every window holds document starts
    one_x, one_y, _ = BatchSampler(short, 37, 1, seed=1).get_batch("train", 0, packed=True)
    assert torch.equal(one_x, BatchSampler(short, 37, 1, seed=1).get_batch("train", 0)[0])
    assert (one_y == IGNORE_INDEX).any() and not (one_x == IGNORE_INDEX).any()
    with pytest.raises(ValueError, match="every target of a packed train batch begins a document"):
        BatchSampler(_token_data([1] * 50), 8, 2, seed=0).get_batch("train", 0, packed=True)
    # evaluation batches are packed the same way
    ex, ey, epacking = sampler.eval_batch("val", 0, packed=True)
    assert epacking.position_ids.shape == ex.shape == ey.shape


# ---------------------------------------------------------------- equivalence with separate documents
def _float64_ops(monkeypatch):
    """The models' ops as pure-PyTorch references computing in the inputs' dtype (float64 truth)."""
    f64 = torch.float64
    monkeypatch.setattr(lmkernels, "attention", lambda q, k, v, is_causal=False: attention_reference(
        q, k, v, is_causal=is_causal, compute_dtype=f64)[0])
    monkeypatch.setattr(lmkernels, "rms_norm", lambda x, w, eps: rms_norm_reference(x, w, eps, f64))
    monkeypatch.setattr(lmkernels, "add_rms_norm", lambda x, r, w, eps: add_rms_norm_reference(x, r, w, eps, f64))
    monkeypatch.setattr(lmkernels, "rotary_embedding", lambda q, k, cos, sin: rotary_embedding_reference(
        q, k, cos, sin, compute_dtype=f64))
    monkeypatch.setattr(lmkernels, "swiglu", lambda g, u: swiglu_reference(g, u, f64))

    def apply_rotary(x, cos, sin):  # GPT's own rotates in float32
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)

    monkeypatch.setattr(gpt_module, "apply_rotary", apply_rotary)


def _model(kind):
    if kind == "llama":  # grouped-query attention: 4 query heads share 2 key/value heads
        return Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=37))
    return GPT(GPTConfig(block_size=37, vocab_size=VOCAB, n_layer=2, n_head=4, n_embd=32, rotary=kind == "gpt-rotary"))


def _per_token_losses(model, x, y, packing=None):
    logits = model.logits(x, packing)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX,
                           reduction="none").view(y.shape)


def _documents_separately(model, x, y, packing):
    """Per-token losses (B, T) from running every document of the packed batch on its own."""
    out = torch.zeros(x.shape, dtype=next(model.parameters()).dtype)
    T, cu = x.shape[1], packing.cu_seqlens.tolist()
    for a, b in zip(cu[:-1], cu[1:]):
        row, lo, hi = a // T, a % T, a % T + (b - a)
        out[row, lo:hi] = _per_token_losses(model, x[row:row + 1, lo:hi], y[row:row + 1, lo:hi])[0]
    return out


def _grads(model):
    return {n: p.grad.double().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", ["gpt", "gpt-rotary", "llama"])
def test_packed_batch_equals_each_document_alone(kind, monkeypatch):
    """Per-token losses and gradients of a packed batch against each document run alone: within
    twice the error of that fp32 per-document run against the float64 one."""
    data = _token_data(_awkward_lengths(120, seed=2), seed=3)
    x, y, packing = BatchSampler(data, 37, 3, seed=0).get_batch("train", 0, packed=True)
    assert packing.cu_seqlens.numel() > 4  # several documents, including cut ones
    torch.manual_seed(0)
    model = _model(kind)

    packed = _per_token_losses(model, x, y, packing)
    packed.sum().backward()
    packed_grads = _grads(model)
    model.zero_grad()
    alone = _documents_separately(model, x, y, packing)
    alone.sum().backward()
    alone_grads = _grads(model)
    model.zero_grad()
    with pytest.raises(ValueError, match=r"packing.position_ids must have the shape of idx \(3, 37\)"):
        model(x, y, packing=PackedDocuments(packing.cu_seqlens, packing.max_seqlen, packing.position_ids[:2]))
    # the trainer's loss: the mean over the targets that do not begin a document
    _, loss = model(x, y, packing=packing)
    torch.testing.assert_close(loss, packed.sum() / (y != IGNORE_INDEX).sum(), rtol=1e-5, atol=1e-6)

    model.double()
    _float64_ops(monkeypatch)
    truth = _documents_separately(model, x, y, packing)
    truth.sum().backward()
    truth_grads = _grads(model)

    eps = torch.finfo(torch.float32).eps
    err, ref_err = (packed.double() - truth).abs().max(), (alone.double() - truth).abs().max()
    assert err <= 2 * ref_err + 2 * eps * truth.abs().max(), (err, ref_err)
    assert torch.equal(packed == 0, truth == 0)  # the same targets are ignored
    for name, t in truth_grads.items():
        err = (packed_grads[name] - t).abs().max()
        ref_err = (alone_grads[name] - t).abs().max()
        assert err <= 2 * ref_err + 2 * eps * t.abs().max(), (name, err, ref_err)


def test_unpacked_model_sees_across_documents():
    """The check above has teeth: without the layout, a token depends on the previous document."""
    data = _token_data([5, 32, 40], seed=4)
    x, y, packing = BatchSampler(data, 37, 1, seed=0).get_batch("train", 0, packed=True)
    model = _model("gpt")
    changed = x.clone()
    changed[0, 0] = (changed[0, 0] + 1) % VOCAB
    doc_starts = packing.cu_seqlens.tolist()
    first, second = doc_starts[1], doc_starts[2]  # the second document in the row
    with torch.no_grad():
        packed = model.logits(x, packing)[0, first:second]
        assert torch.equal(model.logits(changed, packing)[0, first:second], packed)
        assert not torch.equal(model.logits(changed)[0, first:second], model.logits(x)[0, first:second])


# ---------------------------------------------------------------- the trainer
CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + 1\n<DOC>" for i in range(600))


def _common(corpus, cache, **extra):
    return dict(dict(data=[str(corpus)], data_cache=str(cache), doc_separator="<DOC>", pack_documents=True,
                     n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=2,
                     eval_interval=2, eval_iters=1, log_interval=2, warmup_iters=1, lr_decay_iters=6,
                     sample_tokens=4), **extra)


def _straight_and_resumed(common, out_dir):
    straight = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/straight"))
    train(TrainConfig(**common, max_iters=4, out_dir=f"{out_dir}/resumed"))
    resumed = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/resumed", init_from="resume"))
    assert [r["iter"] for r in resumed] == [4, 5]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight[4:]]
    return [r["loss"] for r in straight]


def _dp_and_tp_training(corpus, cache, out_dir):
    dp = _straight_and_resumed(_common(corpus, cache), f"{out_dir}/dp2")
    tp = _straight_and_resumed(_common(corpus, cache, model="llama", n_kv_head=2, tp=2), f"{out_dir}/tp2")
    return dp, tp


def test_trainer_packs_documents_with_dp2_tp2_and_resume(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS)
    out = run_distributed(_dp_and_tp_training, world_size=2,
                          args=(str(corpus), str(tmp_path / "cache"), str(tmp_path)), timeout=240)
    (dp0, tp0), (dp1, tp1) = out
    assert dp0 == dp1 and tp0 == tp1 and all(math.isfinite(v) for v in dp0 + tp0)
    # TP=2 trains the same model on the same packed batches as one process
    one = train(TrainConfig(**_common(corpus, tmp_path / "cache", model="llama", n_kv_head=2), max_iters=6,
                            out_dir=str(tmp_path / "one")))
    torch.testing.assert_close(torch.tensor(tp0), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-6)
    # and packing changes training (documents of ~33 tokens: many windows are cut)
    unpacked = train(TrainConfig(**{**_common(corpus, tmp_path / "cache", model="llama", n_kv_head=2),
                                    "pack_documents": False}, max_iters=6, out_dir=str(tmp_path / "unpacked")))
    assert [r["loss"] for r in unpacked] != [r["loss"] for r in one]
