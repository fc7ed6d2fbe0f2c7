#!/usr/bin/env bash
# The one-shot GPU check (under 8 minutes on an H100/H200): build lmkernels with CUDA, run the
# GPU tests, run every bench/gpu_*.py, and write bench/results/<card>-<date>.md naming the card,
# torch, triton and commit (also copied to $OUT when set, for the device tool to bring back).
# Usage, from the repository root: bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr -c 'A-Za-z0-9\n' '-' | sed 's/-*$//')
card=${card:-unknown-gpu}
stamp=$(date -u +%Y-%m-%d)
result="bench/results/${card}-${stamp}.md"
log=$(mktemp)
commit=$(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)

t0=$(date +%s)
echo "== build (LMK_CUDA=1)"
LMK_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 300 python3 setup.py build_ext --inplace > "$log.build" 2>&1
build_rc=$?
tail -5 "$log.build"
t1=$(date +%s)

echo "== GPU tests"
LMK_TEST_GPU=1 PYTHONPATH=. timeout 150 python3 -m pytest -m gpu tests -q -p no:cacheprovider > "$log.tests" 2>&1
tests_rc=$?
tail -25 "$log.tests"
t2=$(date +%s)

echo "== GPU benchmarks"
: > "$log.bench"
for f in bench/gpu_*.py; do
  echo "-- $f"
  PYTHONPATH=. timeout 120 python3 "$f" >> "$log.bench" 2> "$log.err" || {
    echo "$f failed (rc=$?):"; tail -15 "$log.err"
    printf '## %s\n\nFAILED: %s\n\n' "$f" "$(tail -3 "$log.err" | tr '\n' ' ')" >> "$log.bench"; }
done
t3=$(date +%s)

{
  echo "# GPU check: $card, $stamp"
  echo
  python3 -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, ' + torch.cuda.get_device_name())"
  echo ", commit $commit."
  echo
  echo "| step | result | seconds |"
  echo "|---|---|---|"
  echo "| build (LMK_CUDA=1) | rc=$build_rc | $((t1 - t0)) |"
  echo "| GPU tests | $(grep -E '(passed|failed|error)' "$log.tests" | tail -1) | $((t2 - t1)) |"
  echo "| benchmarks | $(ls bench/gpu_*.py | wc -l) scripts | $((t3 - t2)) |"
  echo
  cat "$log.bench"
} > "$result"
[ -n "${OUT:-}" ] && cp "$result" "$OUT/" && cp "$log.tests" "$OUT/gpu-tests.log" && cp "$log.build" "$OUT/gpu-build.log"
cat "$result"
