"""Tensor-parallel layers and the TP-parallelized GPT against the single-process model (TP=2),
and DP x TP (2 x 2) training against single-process training. gloo, local processes, timeouts.

Tolerances: the layers run in float64, where the only difference is summation order (1e-12).
The GPT runs in float32; its TP outputs and gradients must be as close to a float64 reference
as the single-process float32 model is (at most 2x its error, flash-attention's rule, plus one
float32 ulp of the quantity's scale for quantities the single model gets exactly).
"""
import pytest
import torch

from tests._dist import run_distributed

F32_EPS = torch.finfo(torch.float32).eps


def _attention64(q, k, v, *, is_causal=False, scale=None, **_):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)


def _within(name, got, ref32, ref64):
    """got (TP, float32) vs ref64 may be off by at most 2x what ref32 (single, float32) is."""
    got, ref32, ref64 = got.double(), ref32.double(), ref64.double()
    err, base = (got - ref64).abs().max().item(), (ref32 - ref64).abs().max().item()
    bound = 2 * base + F32_EPS * ref64.abs().max().item()
    assert err <= bound, f"{name}: TP error {err:.3e} vs float64 exceeds 2x single-process error {base:.3e}"


def _tp_layers(mesh):
    import torch.nn as nn
    import torch.nn.functional as F

    from lmkernels.distributed import tensor_parallel as TP

    g, rank = mesh.tp_group, mesh.tp_rank
    split = lambda t, dim, chunks=1: TP._split(t, TP.TPShard(dim, chunks), rank, 2)  # noqa: E731
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)  # noqa: E731
    torch.manual_seed(1)
    d = torch.float64
    # column-parallel, fused [q | k | v] layout: 3 chunks, each rank keeps whole "heads" of 5
    lin = nn.Linear(17, 30, dtype=d)
    x = torch.randn(3, 7, 17, dtype=d, requires_grad=True)
    dy = torch.randn(3, 7, 30, dtype=d)
    col = TP.ColumnParallelLinear(lin, g, chunks=3, unit=5)
    x_tp = x.detach().clone().requires_grad_()
    y = col(x_tp)
    close(y, split(lin(x), -1, 3))
    (lin(x) * dy).sum().backward()
    (y * split(dy, -1, 3)).sum().backward()
    close(x_tp.grad, x.grad)  # all-reduced across the TP group
    close(col.weight.grad, split(lin.weight.grad, 0, 3))
    close(col.bias.grad, split(lin.bias.grad, 0, 3))
    # row-parallel: sharded input, full output, bias added once
    lin = nn.Linear(30, 11, dtype=d)
    x = torch.randn(4, 30, dtype=d, requires_grad=True)
    dy = torch.randn(4, 11, dtype=d)
    row = TP.RowParallelLinear(lin, g)
    x_tp = split(x.detach(), -1).requires_grad_()
    y = row(x_tp)
    close(y, lin(x))
    (lin(x) * dy).sum().backward()
    (y * dy).sum().backward()
    close(x_tp.grad, split(x.grad, -1))
    close(row.weight.grad, split(lin.weight.grad, 1))
    close(row.bias.grad, lin.bias.grad)
    # vocab-parallel embedding
    emb = nn.Embedding(10, 6, dtype=d)
    idx = torch.randint(0, 10, (3, 9))
    dy = torch.randn(3, 9, 6, dtype=d)
    vemb = TP.VocabParallelEmbedding(emb, g)
    y = vemb(idx)
    close(y, emb(idx))
    (emb(idx) * dy).sum().backward()
    (y * dy).sum().backward()
    close(vemb.weight.grad, split(emb.weight.grad, 0))
    # vocab-parallel cross-entropy, with ignored targets
    logits = (3 * torch.randn(97, 10, dtype=d)).requires_grad_()
    targets = torch.randint(0, 10, (97,))
    targets[::7] = -1
    ref = F.cross_entropy(logits, targets, ignore_index=-1)
    local = split(logits.detach(), -1).requires_grad_()
    loss = TP.vocab_parallel_cross_entropy(local, targets, g, ignore_index=-1)
    close(loss, ref)
    ref.backward()
    (2.5 * loss).backward()
    close(local.grad, 2.5 * split(logits.grad, -1))


def _tp_gpt(mesh):
    import copy

    import lmkernels
    from lmkernels.distributed import tensor_parallel as TP
    from lmkernels.distributed import tp_utils as TPU
    from lmkernels.models.gpt import GPT, GPTConfig

    g, rank = mesh.tp_group, mesh.tp_rank
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32, rotary=False)
    torch.manual_seed(0)
    single = GPT(cfg)
    model64 = copy.deepcopy(single).double()
    tp_model = TP.parallelize_gpt(copy.deepcopy(single), g)
    assert tp_model.lm_head.weight is tp_model.transformer.wte.weight  # still tied
    idx = torch.randint(0, 64, (3, 13))
    targets = torch.randint(0, 64, (3, 13))
    _, loss32 = single(idx, targets)  # the fused loss: no logits
    loss32.backward()
    logits32 = single.logits(idx).detach()
    real = lmkernels.attention
    lmkernels.attention = _attention64  # the float64 reference (our kernel is fp32/bf16/fp16)
    try:
        logits64, loss64 = model64(idx, targets)
        loss64.backward()
    finally:
        lmkernels.attention = real
    no_logits, loss = tp_model(idx, targets)  # the vocab-parallel fused loss: no logits either
    assert no_logits is None and tp_model.lm_head.weight.shape == (32, 32)  # half the vocabulary
    loss.backward()
    _within("loss", loss, loss32, loss64)
    with torch.no_grad():  # sampling's full logits, gathered from the vocabulary slices
        _within("logits", tp_model.logits(idx), logits32, logits64)
    p32, p64 = dict(single.named_parameters()), dict(model64.named_parameters())
    checked = 0
    for name, p in tp_model.named_parameters():
        shard = getattr(p, "tp_shard", None)
        cut = (lambda t: TP._split(t, shard, rank, 2)) if shard else (lambda t: t)
        assert p.shape == cut(p32[name]).shape, name
        torch.testing.assert_close(p.detach(), cut(p32[name].detach()), rtol=0, atol=0)
        _within(f"grad {name}", p.grad, cut(p32[name].grad), cut(p64[name].grad))
        checked += 1
    assert checked == len(p32)
    # the global gradient norm across TP ranks equals the single model's
    norm_tp = TPU.clip_grad_norm_(tp_model.parameters(), 1e-3, g)
    norm_single = torch.nn.utils.clip_grad_norm_(single.parameters(), 1e-3)
    torch.testing.assert_close(norm_tp, norm_single, rtol=1e-5, atol=0)
    for name, p in tp_model.named_parameters():  # and both clipped the same way
        shard = getattr(p, "tp_shard", None)
        ref = p32[name].grad
        torch.testing.assert_close(p.grad, TP._split(ref, shard, rank, 2) if shard else ref, rtol=1e-5, atol=1e-9)
    # unsharding gathers exactly the single model's weights
    full = TPU.full_state_dict(tp_model, g)
    for key, value in single.state_dict().items():
        torch.testing.assert_close(full[key], value, rtol=0, atol=0)
    # clear errors
    for bad, words in ((GPTConfig(n_head=3, n_embd=48, vocab_size=64), "n_head (3) must be divisible by tp (2)"),
                       (GPTConfig(n_head=4, n_embd=32, vocab_size=65), "vocab_size (65) must be divisible by tp (2)")):
        with pytest.raises(ValueError, match=words.replace("(", r"\(").replace(")", r"\)")):
            TP.parallelize_gpt(GPT(bad), g)
    with pytest.raises(ValueError, match="matched no module"):
        TP.parallelize(GPT(cfg), {"transformer.h.*.atn.c_attn": TP.ColwiseParallel()}, g)
    with pytest.raises(TypeError, match="the loss is the vocab-parallel LM head's fused_loss"):
        TP.parallelize(GPT(cfg), {"criterion": TP.VocabParallel()}, g)


def _tp_llama_tied(mesh):
    """Llama with tie_word_embeddings: the vocab-parallel embedding and LM head share one shard,
    and loss and gradients (the tied one gets both uses') equal the single-process model's."""
    import copy

    from lmkernels.distributed import tensor_parallel as TP
    from lmkernels.distributed.llama_tp_plan import parallelize_llama
    from lmkernels.models.llama import Llama, LlamaConfig

    g, rank = mesh.tp_group, mesh.tp_rank
    torch.manual_seed(0)
    single = Llama(LlamaConfig(vocab_size=98, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                               tie_word_embeddings=True))
    tp_model = parallelize_llama(copy.deepcopy(single), g)
    assert tp_model.lm_head.weight is tp_model.model.embed_tokens.weight
    assert tp_model.lm_head.weight.shape == (49, 32)
    idx, targets = torch.randint(0, 98, (2, 11)), torch.randint(0, 98, (2, 11))
    targets[0, :4] = -1  # Llama's ignore_index
    _, loss = tp_model(idx, targets)
    loss.backward()
    _, loss1 = single(idx, targets)
    loss1.backward()
    torch.testing.assert_close(loss, loss1)
    ref = dict(single.named_parameters())
    for name, p in tp_model.named_parameters():
        shard = getattr(p, "tp_shard", None)
        want = TP._split(ref[name].grad, shard, rank, 2) if shard else ref[name].grad
        torch.testing.assert_close(p.grad, want, msg=f"grad {name}")


def _tp_checks():
    import lmkernels  # noqa: F401
    from lmkernels.distributed.mesh import init_mesh

    mesh = init_mesh(tp_size=2)
    assert (mesh.dp_size, mesh.tp_size) == (1, 2)
    _tp_layers(mesh)
    _tp_gpt(mesh)
    _tp_llama_tied(mesh)
    return True


def test_tp_layers_and_gpt_match_single_process():
    assert run_distributed(_tp_checks, world_size=2, timeout=120) == [True, True]


def test_mesh_needs_processes_for_tp():
    from lmkernels.distributed.mesh import init_mesh

    with pytest.raises(ValueError, match="torchrun --nproc_per_node 2"):
        init_mesh(tp_size=2)
    assert init_mesh(1).world_size == 1


def _dp_tp_training(text_path, cache_dir, out_dir):
    """On a 2 x 2 mesh: a few clipped FusedAdamW steps equal single-process steps on the full
    batch; then the real trainer runs DP x TP, checkpoints, and resumes with identical losses."""
    import copy

    import torch.distributed as dist

    import lmkernels
    from lmkernels.distributed import BucketedDataParallel
    from lmkernels.distributed import tensor_parallel as TP
    from lmkernels.distributed import tp_utils as TPU
    from lmkernels.distributed.mesh import init_mesh
    from lmkernels.models.gpt import GPT, GPTConfig
    from lmkernels.optim import FusedAdamW
    from lmkernels.train import TrainConfig, train

    mesh = init_mesh(tp_size=2)
    assert (mesh.dp_size, mesh.tp_size, mesh.rank) == (2, 2, dist.get_rank())
    # the groups hold the ranks the layout promises: TP consecutive, DP strided
    assert dist.get_process_group_ranks(mesh.tp_group) == [2 * mesh.dp_rank, 2 * mesh.dp_rank + 1]
    assert dist.get_process_group_ranks(mesh.dp_group) == [mesh.tp_rank, 2 + mesh.tp_rank]
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=4, n_embd=32)
    torch.manual_seed(0)
    model = GPT(cfg)
    single, model64 = copy.deepcopy(model), copy.deepcopy(model).double()
    TP.parallelize_gpt(model, mesh.tp_group)
    ddp = BucketedDataParallel(model, process_group=mesh.dp_group, bucket_cap_mb=0.01, first_bucket_cap_mb=0.001)
    opt = FusedAdamW(model.configure_optimizer_groups(0.1), lr=3e-3)
    opt32 = FusedAdamW(single.configure_optimizer_groups(0.1), lr=3e-3)
    opt64 = torch.optim.AdamW(model64.configure_optimizer_groups(0.1), lr=3e-3)  # same maths, float64
    g = torch.Generator().manual_seed(5)
    real_attention = lmkernels.attention
    for step in range(3):
        idx, tgt = torch.randint(0, 64, (2, 4, 16), generator=g)  # the global batch of 4
        mine = slice(2 * mesh.dp_rank, 2 * mesh.dp_rank + 2)
        _, loss = ddp(idx[mine], tgt[mine])
        loss.backward()
        ddp.finish_gradient_sync()
        TPU.clip_grad_norm_(model.parameters(), 0.05, mesh.tp_group)  # small: clipping is active
        opt.step()
        opt.zero_grad(set_to_none=False)
        loss = loss.detach().clone()
        dist.all_reduce(loss, group=mesh.dp_group)
        _, loss32 = single(idx, tgt)
        loss32.backward()
        torch.nn.utils.clip_grad_norm_(single.parameters(), 0.05)
        opt32.step()
        opt32.zero_grad()
        lmkernels.attention = _attention64
        try:
            _, loss64 = model64(idx, tgt)
            loss64.backward()
        finally:
            lmkernels.attention = real_attention
        torch.nn.utils.clip_grad_norm_(model64.parameters(), 0.05)
        opt64.step()
        opt64.zero_grad()
        _within(f"loss at step {step}", loss / 2, loss32.detach(), loss64.detach())
    ddp.verify_replicas()  # DP replicas stayed bit-identical

    # the trainer itself on the 2 x 2 mesh: accumulation with no_sync, sharded checkpoints, resume
    common = dict(data=[text_path], data_cache=cache_dir, n_layer=1, n_head=2, n_embd=16, block_size=16,
                  batch_size=2, gradient_accumulation_steps=2, tp=2, eval_interval=2, eval_iters=1,
                  log_interval=2, warmup_iters=1, lr_decay_iters=6, sample_tokens=4)
    straight = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/straight"))
    train(TrainConfig(**common, max_iters=4, out_dir=f"{out_dir}/resumed"))
    resumed = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/resumed", init_from="resume"))
    assert [r["iter"] for r in resumed] == [4, 5]
    got, want = [r["loss"] for r in resumed], [r["loss"] for r in straight[4:]]
    assert got == want, (got, want)
    return True


def test_dp_x_tp_training_matches_single_process(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    out = run_distributed(_dp_tp_training, world_size=4, args=(str(text), str(tmp_path / "cache"), str(tmp_path)),
                          timeout=240)
    assert out == [True] * 4
    ckpt = sorted((tmp_path / "resumed" / "ckpt").iterdir())
    assert [p.name for p in ckpt] == ["iter-0000004", "iter-0000006", "latest"]  # keep_checkpoints=2
    assert sorted(p.name for p in ckpt[1].iterdir()) == ["manifest.json", "tp0-of-2.pt", "tp1-of-2.pt"]
