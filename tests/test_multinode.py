"""Multi-node launch, simulated on one machine: two torchrun launches ("nodes") meet through
torchrun's c10d rendezvous on 127.0.0.1 and train with --zero, then resume at another size.

Round 1: 2 nodes x 1 process (DP size 2) train 4 iterations from scratch. Round 2: 2 nodes x 2
processes (DP size 4) resume that checkpoint (resharding 2 -> 4) and train to 6. Node 1's
processes have LOCAL_RANK 0/1 but global ranks 2/3: the memory records name every global rank
once, and every DP rank wrote its own optimizer shard into the shared out_dir.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nodes: int, per_node: int, train_args: list, timeout: float = 150) -> list:
    """Starts one torchrun per simulated node and waits for all of them; returns their outputs."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = []
    for node in range(nodes):
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nodes}", f"--node_rank={node}",
               f"--nproc_per_node={per_node}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               "--rdzv-id=lmkernels-test",
               # both "nodes" are this machine: say which one hosts the rendezvous store
               f"--rdzv-conf=is_host={'true' if node == 0 else 'false'}",
               "-m", "lmkernels.train", *train_args]
        procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for node, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"node {node} failed:\n{out[-4000:]}"
    return outputs


def test_two_nodes_train_and_resume_resharded(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(300)))
    out = tmp_path / "out"
    common = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
              "--eval_interval=2", "--eval_iters=1", "--log_interval=2", "--warmup_iters=1",
              "--lr_decay_iters=8", "--sample_tokens=0", "--zero=2", "--device=cpu", f"--data={text}",
              f"--data_cache={tmp_path / 'cache'}", f"--out_dir={out}"]
    _launch(2, 1, common + ["--max_iters=4"])
    outputs = _launch(2, 2, common + ["--max_iters=6", "--init_from=resume"])
    assert "at iteration 4" in outputs[0]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["iter"]: r for r in records if r["kind"] == "train"}
    assert sorted(train) == list(range(6)) and all(r["loss"] < 10 for r in train.values())
    memory = [r for r in records if r["kind"] == "memory"]
    assert sorted(r["rank"] for r in memory[0]["ranks"]) == [0, 1]
    assert sorted(r["rank"] for r in memory[-1]["ranks"]) == [0, 1, 2, 3]
    newest = out / "ckpt" / (out / "ckpt" / "latest").read_text().strip()
    assert newest.name == "iter-0000006"
    assert sorted(p.name for p in newest.iterdir()) == ["manifest.json"] + [
        f"tp0-of-1.optim-dp{r}-of-4.pt" for r in range(4)] + ["tp0-of-1.pt"]
