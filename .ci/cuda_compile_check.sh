#!/usr/bin/env bash
# Proves every csrc/cuda/*.cu compiles (and links into lmkernels._C) with nvcc, on a machine
# without a GPU, for sm_90 and (when this nvcc knows it) sm_100, then gates the kernels'
# resources: no register spills, 128-bit global loads/stores in the streaming kernels
# (.ci/cuda_resource_check.py prints the table). A CUDA build of torch lives in its own venv,
# the build goes to a scratch dir so the CPU build in the tree is untouched.
# Usage: .ci/cuda_compile_check.sh [venv-dir]   (LMK_CUDA_REPORT=PATH also writes the table as JSON)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${LMK_CUDA_VENV:-/opt/lmk-cuda-venv}}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with a CUDA build of torch (a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 numpy pybind11 ninja setuptools
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
NVCC="$CUDA_HOME/bin/nvcc"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST="9.0"
  if "$NVCC" --list-gpu-arch | grep -qx compute_100; then TORCH_CUDA_ARCH_LIST="9.0;10.0"; fi
fi
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
echo "building lmkernels._C with CUDA for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
# -Xptxas -v: ptxas reports registers, stack, spills and shared memory of every kernel.
if ! NVCC_APPEND_FLAGS="-Xptxas -v" LMK_CUDA=1 TORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST" \
    MAX_JOBS=${MAX_JOBS:-2} "$VENV/bin/python" setup.py build_ext --build-lib "$SCRATCH/lib" \
    --build-temp "$SCRATCH/tmp" > "$SCRATCH/build.log" 2>&1; then
  grep -E "error|Error" "$SCRATCH/build.log" | head -40 || tail -40 "$SCRATCH/build.log"
  echo "CUDA compile check FAILED: the build did not succeed"
  exit 1
fi
so=$(find "$SCRATCH/lib" -name '_C*.so')
# Demangled into a file first: `c++filt | grep -q` fails under pipefail when grep exits early.
nm -D --defined-only "$so" | c++filt > "$SCRATCH/symbols"
grep -q PyInit__C "$SCRATCH/symbols" || { echo "no module entry in $so"; exit 1; }
for sym in fused_adamw_cuda bucket_pack_cuda bucket_unpack_cuda bucket_scale_cuda; do
  grep -q "lmk::$sym(" "$SCRATCH/symbols" || { echo "lmk::$sym is not defined in $so"; exit 1; }
done
CUOBJDUMP="$CUDA_HOME/bin/cuobjdump"
if [ ! -x "$CUOBJDUMP" ]; then  # a toolkit with only nvcc: triton ships one
  CUOBJDUMP="$("$VENV/bin/python" -c 'import triton, os; print(os.path.dirname(triton.__file__))')/backends/nvidia/bin/cuobjdump"
fi
"$VENV/bin/python" .ci/cuda_resource_check.py "$SCRATCH/build.log" "$so" "$CUOBJDUMP" \
  ${LMK_CUDA_REPORT:+--json "$LMK_CUDA_REPORT"}
echo "CUDA compile check passed: $(ls csrc/cuda/*.cu 2>/dev/null | wc -l) .cu file(s) built into $(basename "$so") for $TORCH_CUDA_ARCH_LIST"
