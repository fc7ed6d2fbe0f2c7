"""The trainer with --model=llama: option mapping, training, sampling, export, resume, DP and TP."""
import copy
import math

import pytest
import torch

from lmkernels.train import TrainConfig, train
from lmkernels.train.__main__ import main
from lmkernels.train.config import ConfigError, parse_args, validate
from lmkernels.train.metrics import read_metrics
from lmkernels.train.models import build_model, model_args_from_config
from tests._dist import run_distributed

LLAMA = ["--model=llama", "--n_layer=1", "--n_head=2", "--n_kv_head=1", "--n_embd=16", "--block_size=16",
         "--batch_size=4", "--eval_iters=2", "--log_interval=5"]
CORPUS = "".join(f"def f{i}(x):\n    return x * {i} + 1\n\n" for i in range(600))


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(CORPUS)
    return path


def test_nanogpt_names_map_onto_llama_config():
    cfg = parse_args(["--model=llama", "--n_layer=3", "--n_head=4", "--n_kv_head=2", "--n_embd=96",
                      "--block_size=40"])
    validate(cfg)
    args = model_args_from_config(cfg, 97)
    assert args == dict(model="llama", vocab_size=97, hidden_size=96, intermediate_size=256, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40)
    model = build_model(args)
    assert type(model).__name__ == "Llama" and model.config.head_dim == 24
    # n_kv_head=0 means no GQA; the default model stays the GPT
    assert model_args_from_config(parse_args(["--model=llama", "--n_head=4"]), 256)["num_key_value_heads"] == 4
    gpt = parse_args([])
    assert gpt.model == "gpt" and model_args_from_config(gpt, 256)["model"] == "gpt"
    # checkpoints from before --model existed have no "model" key and hold a GPT
    old = {k: v for k, v in model_args_from_config(gpt, 256).items() if k != "model"}
    assert type(build_model(old)).__name__ == "GPT"


@pytest.mark.parametrize("argv, world, words", [
    (["--model=mamba"], 1, "model must be 'gpt' or 'llama'; got 'mamba'"),
    (["--model=llama", "--n_head=4", "--n_kv_head=3", "--n_embd=64"], 1, "n_kv_head (3) must divide n_head (4)"),
    (["--n_head=4", "--n_kv_head=2", "--n_embd=64"], 1, "n_kv_head (2) is for model=llama"),
    (["--model=llama", "--dropout=0.1"], 1, "dropout must be 0 with model=llama"),
    (["--model=llama", "--n_head=4", "--n_kv_head=1", "--n_embd=64", "--tp=2"], 2, "tp (2) must divide n_kv_head (1)"),
    (["--model=llama", "--n_kv_head=-1"], 1, "n_kv_head must be >= 0"),
])
def test_bad_llama_options_are_named(argv, world, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        validate(parse_args(argv), world)


def test_llama_trains_samples_and_exports(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    argv = LLAMA + [f"--data={corpus}", f"--data_cache={tmp_path / 'cache'}", f"--out_dir={out}",
                    "--max_iters=40", "--eval_interval=20", "--learning_rate=1e-2", "--sample_tokens=20"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "'model': 'llama'" in printed and "sample:" in printed
    val = [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "eval"]
    assert val[0] > math.log(256) - 0.2 and val[-1] < val[0] - 1.0, val

    from lmkernels.models.llama import Llama
    from lmkernels.train.checkpoint import load_checkpoint
    from lmkernels.train.export import main as export_main
    from lmkernels.train.sample import main as sample_main

    assert sample_main([f"--out_dir={out}", "--max_new_tokens=10", "--start=def "]) == 0
    assert capsys.readouterr().out.startswith("def ")
    # lmkernels-export writes the checkpoint's weights in Hugging Face format
    assert export_main([f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"]) == 0
    state = load_checkpoint(out)
    exported = Llama.from_hf(tmp_path / "hf")
    for key, value in state["model"].items():
        torch.testing.assert_close(exported.state_dict()[key], value, rtol=0, atol=0)


def test_export_of_a_gpt_run_is_a_clear_error(tmp_path, corpus, capsys):
    out = tmp_path / "out"
    argv = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--eval_iters=1",
            f"--data={corpus}", f"--data_cache={tmp_path / 'cache'}", f"--out_dir={out}", "--max_iters=1",
            "--sample_tokens=0"]
    assert main(argv) == 0
    from lmkernels.train.export import main as export_main

    assert export_main([f"--out_dir={out}", f"--hf_dir={tmp_path / 'hf'}"]) == 2
    assert "only Llama checkpoints" in capsys.readouterr().err


def _common(corpus, cache, **extra):
    return dict(dict(model="llama", data=[str(corpus)], data_cache=str(cache), n_layer=1, n_head=2, n_kv_head=2,
                     n_embd=16, block_size=16, batch_size=2, gradient_accumulation_steps=2, eval_interval=2,
                     eval_iters=1, log_interval=2, warmup_iters=1, lr_decay_iters=6, sample_tokens=4), **extra)


def _straight_and_resumed(common, out_dir):
    straight = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/straight"))
    train(TrainConfig(**common, max_iters=4, out_dir=f"{out_dir}/resumed"))
    resumed = train(TrainConfig(**common, max_iters=6, out_dir=f"{out_dir}/resumed", init_from="resume"))
    assert [r["iter"] for r in resumed] == [4, 5]
    got, want = [r["loss"] for r in resumed], [r["loss"] for r in straight[4:]]
    assert got == want, (got, want)
    return [r["loss"] for r in straight]


def test_llama_resume_repeats_the_losses_and_keeps_the_model(tmp_path, corpus, capsys):
    _straight_and_resumed(_common(corpus, tmp_path / "cache"), tmp_path)
    # resuming without --model=llama still builds the checkpoint's Llama, and says so
    train(TrainConfig(**{**_common(corpus, tmp_path / "cache"), "model": "gpt", "n_kv_head": 0}, max_iters=7,
                      out_dir=f"{tmp_path}/resumed", init_from="resume"))
    assert "model=llama (command line: gpt)" in capsys.readouterr().out


def _tp_llama_matches_single(mesh):
    from lmkernels.distributed.llama_tp_plan import parallelize_llama
    from lmkernels.distributed.tensor_parallel import _split
    from lmkernels.distributed import tp_utils
    from lmkernels.models.llama import Llama, LlamaConfig

    rank, g = mesh.tp_rank, mesh.tp_group
    torch.manual_seed(0)
    single = Llama(LlamaConfig(vocab_size=98, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16))
    tp_model = parallelize_llama(copy.deepcopy(single), g)
    assert tp_model.lm_head.weight.shape == (49, 32)  # vocab-parallel head: half the vocabulary
    assert tp_model.model.layers[0].self_attn.k_proj.weight.shape == (8, 32)  # one of two kv heads (head_dim 8)
    idx, targets = torch.randint(0, 98, (3, 13)), torch.randint(0, 98, (3, 13))
    _, loss = tp_model(idx, targets)
    loss.backward()
    _, loss1 = single(idx, targets)
    loss1.backward()
    torch.testing.assert_close(loss, loss1)
    ref = dict(single.named_parameters())
    for name, p in tp_model.named_parameters():
        shard = getattr(p, "tp_shard", None)
        want = _split(ref[name].grad, shard, rank, 2) if shard else ref[name].grad
        torch.testing.assert_close(p.grad, want, msg=f"grad {name}")
    full = tp_utils.full_state_dict(tp_model, g)
    assert all(torch.equal(full[k], v) for k, v in single.state_dict().items())
    logits_tp = tp_model(idx)[0]
    torch.testing.assert_close(logits_tp, single(idx)[0])
    with pytest.raises(ValueError, match=r"num_key_value_heads \(1\) must be divisible by tp \(2\)"):
        parallelize_llama(Llama(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=1)), g)


def _dp_and_tp_training(corpus, cache, out_dir):
    from lmkernels.distributed.mesh import init_mesh

    _tp_llama_matches_single(init_mesh(tp_size=2))
    tp = _straight_and_resumed(_common(corpus, cache, tp=2), f"{out_dir}/tp2")
    dp = _straight_and_resumed(_common(corpus, cache, tp=1), f"{out_dir}/dp2")
    return tp, dp


def test_llama_dp2_and_tp2_train_resume_and_tp_matches_one_process(tmp_path, corpus):
    out = run_distributed(_dp_and_tp_training, world_size=2, args=(str(corpus), str(tmp_path / "cache"),
                                                                   str(tmp_path)), timeout=240)
    (tp0, dp0), (tp1, dp1) = out
    assert tp0 == tp1 and dp0 == dp1  # every rank reports the same (all-reduced) losses
    assert all(math.isfinite(v) for v in dp0)
    # TP=2 trains the same model on the same batches as one process: equal up to rounding
    one = train(TrainConfig(**_common(corpus, tmp_path / "cache"), max_iters=6, out_dir=str(tmp_path / "one")))
    torch.testing.assert_close(torch.tensor(tp0), torch.tensor([r["loss"] for r in one]), rtol=1e-5, atol=1e-6)
    ckpt = tmp_path / "tp2" / "resumed" / "ckpt" / "iter-0000006"
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "tp0-of-2.pt", "tp1-of-2.pt"]
