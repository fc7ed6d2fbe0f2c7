"""Resource gate for the CUDA C++ kernels, from a build of lmkernels._C (no GPU needed).

Reads the ptxas report of the build (nvcc -Xptxas -v: registers, stack, spills, shared memory
per kernel and arch) and the SASS of the built module (cuobjdump -sass: 128-bit global loads
and stores), prints one table, and fails when
  * any kernel spills registers (spill stores or loads > 0), or
  * a streaming kernel has fewer 16-byte global loads/stores (LDG.E.128 / STG.E.128, or
    Blackwell's 256-bit forms) than the arrays its main loop streams: the bucket ops'
    copy_scale_cast_kernel reads 1 and writes 1; AdamW's multi_tensor_kernel reads 5 (param or
    master, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) and writes 4 (param and master count as
    one: the master path is a branch).
Usage: cuda_resource_check.py BUILD_LOG MODULE.so CUOBJDUMP [--json PATH]
"""
import json
import re
import subprocess
import sys
from collections import defaultdict

# kernel name -> (16-byte loads, 16-byte stores) its SASS must contain at least.
STREAMING = {"multi_tensor_kernel": (5, 4), "copy_scale_cast_kernel": (1, 1)}
VECTOR_LOAD = re.compile(r"\bLDG\.E\.(?:[A-Z0-9]+\.)*(?:128|256)\b")
VECTOR_STORE = re.compile(r"\bSTG\.E\.(?:[A-Z0-9]+\.)*(?:128|256)\b")


def demangle(names):
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out))


def short(name: str) -> str:
    """lmk::(anon)::copy_scale_cast_kernel<float, c10::BFloat16>(...) -> copy_scale_cast_kernel<float, BFloat16>"""
    name = re.sub(r"\(anonymous namespace\)::|lmk::|c10::", "", name)
    name = name.split("(")[0] if not name.startswith("void ") else name[5:].split("(")[0]
    # The AdamW functor names its dtypes; drop the launcher's other template arguments.
    m = re.match(r"multi_tensor_kernel<7, AdamFunctor<([^>]*)>", name)
    return f"adamw multi_tensor_kernel<{m.group(1)}>" if m else name


def parse_ptxas(log: str):
    """{(mangled, arch): {regs, stack, spill_stores, spill_loads, smem}} from -Xptxas -v output."""
    kernels = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\d+a?)'", line)
        if m:
            current = (m.group(1), m.group(2))
            kernels[current] = dict(regs=0, stack=0, spill_stores=0, spill_loads=0, smem=0)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            kernels[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                                    spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            kernels[current]["regs"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            kernels[current]["smem"] = int(s.group(1)) if s else 0
    return kernels


def parse_sass(cuobjdump: str, module: str, arch: str):
    """{mangled: (vector loads, vector stores)} for one arch."""
    sass = subprocess.run([cuobjdump, "-sass", "-arch", arch, module], capture_output=True,
                          text=True, check=True).stdout
    counts = defaultdict(lambda: [0, 0])
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            counts[current]  # a kernel without any vector access still gets a row
            continue
        if current is not None:
            counts[current][0] += len(VECTOR_LOAD.findall(line))
            counts[current][1] += len(VECTOR_STORE.findall(line))
    return counts


def main(argv):
    log_path, module, cuobjdump = argv[:3]
    json_path = argv[argv.index("--json") + 1] if "--json" in argv else None
    kernels = parse_ptxas(open(log_path, errors="replace").read())
    if not kernels:
        print("cuda resource check: no ptxas report in the build log (was -Xptxas -v passed?)")
        return 1
    archs = sorted({arch for _, arch in kernels})
    sass = {arch: parse_sass(cuobjdump, module, arch) for arch in archs}
    names = demangle(sorted({k for k, _ in kernels}))
    rows, failures = [], []
    for (mangled, arch), r in sorted(kernels.items(), key=lambda kv: (short(names[kv[0][0]]), kv[0][1])):
        name = short(names[mangled])
        loads, stores = sass[arch].get(mangled, (0, 0))
        spills = r["spill_stores"] + r["spill_loads"]
        need = next((n for s, n in STREAMING.items() if s in name), None)
        streaming = need is not None
        row = dict(kernel=name, arch=arch, registers=r["regs"], spill_bytes=spills,
                   stack_bytes=r["stack"], shared_bytes=r["smem"], ldg128=loads, stg128=stores,
                   streaming=streaming)
        rows.append(row)
        if spills:
            failures.append(f"{name} ({arch}) spills {spills} bytes")
        if streaming and (loads < need[0] or stores < need[1]):
            failures.append(f"{name} ({arch}) lacks 128-bit global accesses: LDG.E.128 {loads} "
                            f"(needs {need[0]}), STG.E.128 {stores} (needs {need[1]})")
    width = max(len(r["kernel"]) for r in rows)
    print(f"{'kernel':<{width}}  arch    regs  spill  stack  smem  LDG.128  STG.128")
    for r in rows:
        print(f"{r['kernel']:<{width}}  {r['arch']:<6} {r['registers']:>5} {r['spill_bytes']:>6} "
              f"{r['stack_bytes']:>6} {r['shared_bytes']:>5} {r['ldg128']:>8} {r['stg128']:>8}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    for msg in failures:
        print("FAIL:", msg)
    print(f"cuda resource check: {len(rows)} kernels x archs, {len(failures)} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
