"""The sm_90/sm_100 compile gate (lmkernels.gpu_compile_check). It must run without the
interpreter (conftest turns it on for the other tests), so each test runs it in a subprocess."""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A probe module in the gate's spec format: one good streaming kernel, one that spills, one
# that does not compile, one streaming kernel whose masked loads cannot be vectorized.
PROBE = textwrap.dedent('''
    import torch
    import triton
    import triton.language as tl
    from lmkernels.triton._compile_spec import ArgTensor, CompileSpec, Launch

    @triton.jit
    def scale2(x_ptr, y_ptr, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i) * 2)

    @triton.jit
    def scale2_masked(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * 2, mask=i < n)

    @triton.jit
    def normalize(x_ptr, y_ptr, BLOCK: tl.constexpr):
        # 16384 values live per 32-thread warp until the sum is known: 512 per thread > 255.
        i = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + i)
        tl.store(y_ptr + i, x / tl.sum(x, 0))

    @triton.jit
    def broken(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), undefined_name)

    def compile_specs():
        f32 = ArgTensor(torch.float32)
        yield CompileSpec("good", Launch(scale2, (f32, f32), dict(BLOCK=1024, num_warps=4)), vector_loads=True)
        yield CompileSpec("spills", Launch(normalize, (f32, f32), dict(BLOCK=16384, num_warps=1)), no_spills=True)
        yield CompileSpec("broken", Launch(broken, (f32,), dict(BLOCK=64)))
        yield CompileSpec("scalar", Launch(scale2_masked, (f32, f32, 1000), dict(BLOCK=1024)), vector_loads=True)
''')


def _env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    env.setdefault("TRITON_CACHE_DIR", os.path.expanduser("~/.cache/lmkernels-triton-gate"))
    return env


def test_gate_reports_and_fails_on_bad_kernels(tmp_path):
    (tmp_path / "gate_probe.py").write_text(PROBE)
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "lmkernels.gpu_compile_check", "--arch", "sm_90",
                           "--module", "gate_probe", "--jobs", "1", "--json", str(out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"good", "spills", "broken", "scalar"}
    good = rows["good"]
    assert good["ok"] and good["arch"] == "sm_90" and good["problems"] == ""
    assert 0 < good["registers"] <= 255 and good["spill_bytes"] == 0 and good["shared_bytes"] >= 0
    assert good["vector_loads"] > 0
    assert not rows["spills"]["ok"] and rows["spills"]["spill_bytes"] > 0
    assert "spills" in rows["spills"]["problems"]
    assert not rows["broken"]["ok"] and "compile failed" in rows["broken"]["problems"]
    assert not rows["scalar"]["ok"] and rows["scalar"]["vector_loads"] == 0
    assert "| good" in proc.stdout and "FAIL" in proc.stdout  # the printed table


BIND_CHECK = textwrap.dedent('''
    import torch
    from lmkernels.gpu_compile_check import bind, _configs, _specs, SHARED_LIMIT
    from lmkernels.triton._compile_spec import KERNEL_MODULES, ArgTensor
    from lmkernels.triton import adamw

    # Every spec binds to its kernel's signature on both archs (launch arguments and kernel
    # parameters agree), without compiling.
    n = 0
    for spec in _specs(KERNEL_MODULES):
        for cap in (90, 100):
            for config in _configs(spec, cap):
                bind(spec.launch, config, cap)
                n += 1

    # Seeds 1 and 16 and list lengths 1 and 16 give the same kernel (no specialization).
    def key(seed, n_tensors):
        i64, i32, f32 = ArgTensor(torch.int64), ArgTensor(torch.int32), ArgTensor(torch.float32)
        launch = adamw._fused_adamw_launch(i64, i64, i32, i32, n_tensors, 1e-3, 0.9, 0.999, 1e-8, 0.0,
                                           False, False, True, None, None, None, seed, torch.bfloat16,
                                           torch.float32, False, True, 1024, 8192, f32)
        src, _, _ = bind(launch, None, 90)
        return src.hash()
    assert key(1, 1) == key(16, 16) == key(12345, 7), "seed or n_tensors is specialized"
    print("bound", n)
''')


def test_every_spec_binds_and_adamw_does_not_specialize_on_seed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BIND_CHECK], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.split()[-1]) > 100


def test_attention_d64_forward_does_not_spill_on_sm100(tmp_path):
    # Issue 8: the D = 128 forward tile (128x64, 8 warps) spilled 48 B at D = 64 on sm_100; D <= 64
    # has its own tile class. Every config a D = 64 bf16 forward can run (softcap's too) compiles
    # for sm_100 without spills. (CI's gate step fills the cache first: seconds there.)
    out = tmp_path / "gate.json"
    proc = subprocess.run([sys.executable, "-m", "lmkernels.gpu_compile_check", "--arch", "sm_100",
                           "--module", "lmkernels.triton.attention", "--only", "attention_fwd bf16 D=64",
                           "--jobs", "1", "--json", str(out)],
                          env=_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 3 and all(r["spill_bytes"] == 0 and r["ok"] for r in rows)
