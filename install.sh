#!/usr/bin/env bash
# Installs lmkernels and what it needs into the current Python: torch and triton when missing
# (a CPU machine gets torch 2.13.0 CPU + triton 3.7.1; a machine that already has torch keeps
# it), then builds the extension (CUDA kernels too when torch has CUDA and nvcc is found).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==2.13.0"
fi
if ! "$PY" -c "import triton" 2>/dev/null; then
  "$PY" -m pip install -q "triton==3.7.1"
fi
"$PY" -m pip install -q numpy pybind11 ninja pytest pytest-benchmark matplotlib setuptools
"$PY" -m pip install -q "transformers==5.23.0" "safetensors==0.8.0"  # lmkernels[hf]; tests use it
# No build isolation: an isolated build would download another torch to compile against.
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip install -q --no-build-isolation --no-deps -e .
"$PY" -c "import lmkernels; print('lmkernels installed:', lmkernels.build_info())"
