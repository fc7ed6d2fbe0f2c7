#!/usr/bin/env bash
# The one-shot GPU check, under one overall deadline (default 450 s: an 8-minute device slot
# with room to bring the results back). Steps, cheapest first:
#   1. build lmkernels with its CUDA kernels (a failed build stops here, non-zero, last line
#      says why);
#   2. pre-compile the Triton kernels the tests launch, in parallel, into the Triton cache
#      (the compile gate with one autotune config per kernel and tile class);
#   3. the GPU tests except attention, then the attention GPU tests, both with
#      LMK_TRITON_ONE_CONFIG=1 (one autotune config per kernel: correctness, not tuning);
#   4. the GPU benchmarks, each only if the deadline leaves it time.
# Each step appends its row to $RESULTS/gpu-check.md the moment it ends and keeps its log
# ($RESULTS = $OUT when set, else bench/results/gpu-check-<date>); the tests write junit XML
# there. Exit status: 0 only if every step ran and passed.
# Usage, from anywhere: bash bench/gpu_check.sh   (GPU_CHECK_DEADLINE_S=... to change the deadline)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}
START=$(date +%s)
RESULTS=${OUT:-bench/results/gpu-check-$(date -u +%Y-%m-%d)}
mkdir -p "$RESULTS"
SUMMARY="$RESULTS/gpu-check.md"
FAILED=0

left() { echo $((DEADLINE_S - ($(date +%s) - START))); }

{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>&1 | head -1
  echo ", commit $(git rev-parse --short HEAD 2>/dev/null || cat .commit 2>/dev/null || echo unknown)"
  python3 -c "import torch, triton; print(f'torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}')" 2>&1
  echo
  echo "| step | result | seconds | log |"
  echo "|---|---|---|---|"
} >> "$SUMMARY"

# step NAME BUDGET_S CMD...: runs CMD with at most BUDGET_S seconds (less if the deadline is
# nearer), appends its row to the summary at once, prints the log's tail, returns CMD's status.
step() {
  local name=$1 budget=$2
  shift 2
  local remaining
  remaining=$(left)
  if [ "$remaining" -lt 15 ]; then
    echo "| $name | not run: deadline reached | 0 | - |" >> "$SUMMARY"
    echo "== $name: not run (deadline reached)"
    FAILED=1
    return 124
  fi
  [ "$budget" -gt "$remaining" ] && budget=$remaining
  echo "== $name (budget ${budget}s, ${remaining}s left)"
  local t0 rc result
  t0=$(date +%s)
  timeout --kill-after=10 "$budget" "$@" > "$RESULTS/$name.log" 2>&1
  rc=$?
  case $rc in
    0) result="ok" ;;
    124 | 137) result="FAILED: timed out after ${budget}s" ;;
    *) result="FAILED: rc=$rc" ;;
  esac
  local summary_line
  summary_line=$(grep -E '(passed|failed|error|ok, )' "$RESULTS/$name.log" | tail -1 | tr '|' '/')
  echo "| $name | $result${summary_line:+ ($summary_line)} | $(($(date +%s) - t0)) | $name.log |" >> "$SUMMARY"
  tail -n 8 "$RESULTS/$name.log"
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

# 1. Build. Nothing else means anything without it.
if ! step build 240 env LMK_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    pip install --no-build-isolation --no-deps -e .; then
  echo "gpu_check: FAILED at build: $(tail -n 1 "$RESULTS/build.log")" | tee -a "$SUMMARY"
  exit 1
fi

export LMK_TEST_GPU=1
# 2. Compile the kernels the tests will launch, all cores at once (the tests compile serially).
step precompile 120 env LMK_TRITON_ONE_CONFIG=1 python3 -m lmkernels.gpu_compile_check --arch sm_90 \
  --jobs "$(nproc)" --json "$RESULTS/gate-sm90.json"

# 3. Tests: cheap ones first, then attention.
step tests 120 env LMK_TRITON_ONE_CONFIG=1 python3 -m pytest -m gpu tests -q -p no:cacheprovider \
  --ignore=tests/test_attention.py --ignore-glob='tests/test_triton_attention_*.py' \
  --junitxml="$RESULTS/junit-gpu.xml"
# Attention: dense, then softcap and varlen (their cases run at gate head dims on a GPU, so the
# precompile step's kernels serve them).
step attention-tests 180 env LMK_TRITON_ONE_CONFIG=1 python3 -m pytest -m gpu tests/test_attention.py \
  tests/test_triton_attention_softcap.py tests/test_triton_attention_varlen.py -q \
  -p no:cacheprovider --junitxml="$RESULTS/junit-gpu-attention.xml"

# 4. Benchmarks (full autotune lists), while the deadline allows. gpu_attention gets 180 s: its
# varlen/softcap section (first) adds the softcap kernels' compiles and ~36 do_bench calls.
for f in bench/gpu_adamw.py bench/gpu_attention.py bench/gpu_*.py; do
  name=$(basename "$f" .py)
  [ -e "$RESULTS/$name.log" ] && continue  # listed twice: the important ones come first
  budget=120
  [ "$name" = gpu_attention ] && budget=180
  step "$name" "$budget" python3 "$f"
done

if [ $FAILED -ne 0 ]; then
  echo "gpu_check: FAILED (see $SUMMARY)" | tee -a "$SUMMARY"
  exit 1
fi
echo "gpu_check: all steps passed in $(($(date +%s) - START)) s" | tee -a "$SUMMARY"
