"""Compile gate: every Triton kernel, config and specialization to cubin for sm_90 / sm_100.

    python -m lmkernels.gpu_compile_check --arch sm_90 --arch sm_100 --json gate.json

No GPU needed: Triton's own compiler and the ptxas it ships produce the cubin for a chosen
target. Each kernel module's compile_specs() (see lmkernels/triton/_compile_spec.py) yields the
launches its launcher can make; they are bound with Triton's binder exactly as a real launch is,
compiled, and measured: registers and stack (spill) bytes from cuobjdump, shared memory from the
compiler, and the number of 16-byte global loads in the PTX. Exit status 1 when any row fails:
    - the kernel does not compile;
    - it needs more shared memory than the arch gives one block (a config the launcher can pick:
      the launchers prune by the same budget);
    - it spills and its spec says it must not (bf16/fp16 attention, D <= 128);
    - it has no 16-byte loads and its spec says it must (streaming kernels, aligned data).
Compiled kernels land in Triton's cache (TRITON_CACHE_DIR; default ~/.triton/cache), so a
second run on the same machine takes seconds.
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

# Shared memory one block may use (opt-in maximum), bytes: 227 KB on H100 and B200.
SHARED_LIMIT = {90: 227 * 1024, 100: 227 * 1024}
# 16-byte global loads in PTX: ld.global[.qualifiers].v4.{b,u,s,f}32 or .v2.{b,u,s,f}64.
_VECTOR_LOAD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?\.(?:v4\.[bfsu]32|v2\.[bfsu]64)\b")
_RESOURCES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


@dataclass
class Row:
    kernel: str
    config: str
    arch: str
    registers: int = -1
    spill_bytes: int = -1
    shared_bytes: int = -1
    vector_loads: int = -1
    seconds: float = 0.0
    ok: bool = False
    problems: str = ""


def _arch_number(arch: str) -> int:
    m = re.fullmatch(r"sm_(\d+)[a-z]?", arch)
    if not m:
        raise SystemExit(f"gpu_compile_check: --arch must look like sm_90 or sm_100; got {arch!r}")
    return int(m.group(1))


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    path = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def _config_label(config) -> str:
    if config is None:
        return "-"
    blocks = "x".join(str(v) for k, v in sorted(config.kwargs.items()) if k.startswith("BLOCK"))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


def bind(launch, config, capability: int):
    """(ASTSource, target, options) of the launch for sm_<capability>, bound with Triton's own
    binder: the signature, constexprs and alignment attributes a real launch would get."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_function
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.all_kwargs())
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def _compile(launch, config, capability: int):
    import triton

    src, target, options = bind(launch, config, capability)
    return triton.compile(src, target=target, options=options.__dict__)


def _measure(row: Row, kernel, capability: int, spec) -> Row:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    m = _RESOURCES.search(usage)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump output:\n{usage}")
    row.registers = int(m.group(1))
    row.spill_bytes = int(m.group(2)) + int(m.group(4))  # stack frame + local memory
    row.shared_bytes = int(kernel.metadata.shared)
    row.vector_loads = len(_VECTOR_LOAD.findall(kernel.asm["ptx"]))
    problems = []
    if row.shared_bytes > SHARED_LIMIT[capability]:
        problems.append(f"shared memory {row.shared_bytes} B > {SHARED_LIMIT[capability]} B")
    if spec.no_spills and row.spill_bytes > 0:
        problems.append(f"spills {row.spill_bytes} B")
    if spec.vector_loads and row.vector_loads == 0:
        problems.append("no 16-byte global loads")
    row.problems = "; ".join(problems)
    row.ok = not problems
    return row


def _specs(modules):
    specs = []
    for name in modules:
        specs.extend(importlib.import_module(name).compile_specs())
    return specs


def _configs(spec, capability: int):
    return list(spec.configs(SHARED_LIMIT[capability])) if spec.configs else [None]


def _job(modules, spec_index: int, config_index: int, arch: str) -> Row:
    """One (spec, config, arch) compile, in a worker process."""
    capability = _arch_number(arch)
    spec = _specs(modules)[spec_index]
    config = _configs(spec, capability)[config_index]
    row = Row(spec.name, _config_label(config), arch)
    t0 = time.perf_counter()
    try:
        kernel = _compile(spec.launch, config, capability)
        row.seconds = time.perf_counter() - t0
        return _measure(row, kernel, capability, spec)
    except Exception as e:  # noqa: BLE001  (any compiler failure is a gate failure)
        row.seconds = time.perf_counter() - t0
        row.problems = "compile failed: " + (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        return row


def _table(rows) -> str:
    head = ("kernel", "config", "arch", "regs", "spill B", "smem B", "16B loads", "s", "result")
    lines = [head] + [(r.kernel, r.config, r.arch, str(r.registers), str(r.spill_bytes), str(r.shared_bytes),
                       str(r.vector_loads), f"{r.seconds:.1f}", "ok" if r.ok else "FAIL: " + r.problems)
                      for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(lines[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(x) for x in lines[1:]])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmkernels.gpu_compile_check", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", help="target, e.g. sm_90 (repeatable; default sm_90 and sm_100)")
    parser.add_argument("--json", help="write the rows here as JSON")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--only", help="only kernels whose name contains this string")
    parser.add_argument("--module", action="append", default=[],
                        help="a module with compile_specs() (default: lmkernels' Triton kernels)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        # The interpreter replaces @triton.jit at definition time: the kernels must be imported
        # without it. Run again in a clean environment.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        return subprocess.call([sys.executable, "-m", "lmkernels.gpu_compile_check"] + list(argv or sys.argv[1:]), env=env)
    from lmkernels.triton._compile_spec import KERNEL_MODULES

    archs = args.arch or ["sm_90", "sm_100"]
    modules = tuple(args.module) or KERNEL_MODULES
    specs = _specs(modules)
    jobs = [(i, c, arch) for arch in archs for i, spec in enumerate(specs)
            if not args.only or args.only in spec.name
            for c in range(len(_configs(spec, _arch_number(arch))))]
    t0 = time.perf_counter()
    print(f"gpu_compile_check: {len(jobs)} compiles ({len(specs)} specializations, {', '.join(archs)}), "
          f"{args.jobs} process(es)", flush=True)
    rows = []

    def progress(row):  # one line per compile as it ends, so a CI log shows where time goes
        rows.append(row)
        print(f"[{len(rows)}/{len(jobs)}] {row.arch} {row.kernel} {row.config}: "
              f"{'ok' if row.ok else 'FAIL ' + row.problems} ({row.seconds:.1f} s)", flush=True)

    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            for row in pool.map(_job, *zip(*[(modules, i, c, a) for i, c, a in jobs])):
                progress(row)
    else:
        for i, c, a in jobs:
            progress(_job(modules, i, c, a))
    wall = time.perf_counter() - t0
    print(_table(rows))
    failed = [r for r in rows if not r.ok]
    print(f"gpu_compile_check: {len(rows) - len(failed)} ok, {len(failed)} failed, {wall:.0f} s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_seconds": wall, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
