#!/usr/bin/env bash
# Proves every csrc/cuda/*.cu compiles (and links into lmkernels._C) with nvcc, on a machine
# without a GPU: a CUDA build of torch in its own venv, the build written to a scratch dir so
# the CPU build in the tree is untouched. Usage: .ci/cuda_compile_check.sh [venv-dir]
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-${LMK_CUDA_VENV:-/opt/lmk-cuda-venv}}
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with a CUDA build of torch (a few minutes)"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.14.1 numpy pybind11 ninja setuptools
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
LMK_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-2} \
  "$VENV/bin/python" setup.py build_ext --build-lib "$SCRATCH/lib" --build-temp "$SCRATCH/tmp"
so=$(find "$SCRATCH/lib" -name '_C*.so')
nm -D --defined-only "$so" > "$SCRATCH/symbols"
grep -q PyInit__C "$SCRATCH/symbols" || { echo "no module entry in $so"; exit 1; }
echo "CUDA compile check passed: $(ls csrc/cuda/*.cu 2>/dev/null | wc -l) .cu file(s) built into $(basename "$so")"
