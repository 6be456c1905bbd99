#!/usr/bin/env bash
# The whole GPU story in one prepared run, under 8 minutes on an H200 (the timeouts below sum to 7.5):
# build the C++ extension, the three benchmark suites on the GPU (correctness is checked before anything
# is timed; results JSON + a PNG per suite), the tests of the ops with the GPU tests, then a tuning sweep
# of the fused logits kernel. Results go to $OUT (the device tool's output folder, which returns at most
# 8 files: this script writes 3 JSON + 3 PNG + the sweep's JSON + the log) or, elsewhere, to bench/results/.
# Liger-Kernel (compared in the logits_loss suite) comes from a wheel in bench/wheels/ (`make liger-wheel`
# here; the GPU machine has no network). bench/wheels/ is git-ignored: the device tool carries it only
# when asked to (carry: ["bench/wheels"]).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
stamp=$(date -u +%Y%m%dT%H%M%S)
log="$OUT/gpu_check_$stamp.log"

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee "$log"

echo "== build" | tee -a "$log"
# The GPU path does not need the C++ extension: go on either way.
timeout 75 $PY setup.py -q build_ext --inplace 2>&1 | tail -5 | tee -a "$log"

if compgen -G "bench/wheels/liger_kernel-*.whl" >/dev/null; then
  echo "== install Liger-Kernel from bench/wheels" | tee -a "$log"
  $PY -m pip install -q --no-deps --no-index bench/wheels/liger_kernel-*.whl 2>&1 | tail -3 | tee -a "$log"
fi

echo "== benchmark: advantages, policy_loss, logits_loss" | tee -a "$log"
# --budget-s: a suite skips its remaining sizes once its share of 135 s is spent (the main size always
# runs; each JSON is written as its suite ends), so the run ends well inside the timeout.
timeout 190 $PY -m moo_kernels.bench --device cuda --keep-going --budget-s 135 --no-progress --out "$OUT" 2>&1 \
  | tee -a "$log"
bench_rc=${PIPESTATUS[0]}

echo "== tests of the ops on CUDA and CPU (property tests and the AOT compile check run in CI)" | tee -a "$log"
timeout 150 $PY -m pytest python_tests/test_advantages.py python_tests/test_brier.py python_tests/test_policy_loss.py \
  python_tests/test_logits.py python_tests/test_compile.py -q -p no:cacheprovider -x 2>&1 | tail -30 | tee -a "$log"
test_rc=${PIPESTATUS[0]}

echo "== tuning sweep of the fused logits kernel (chunk, tile, warps, register cap)" | tee -a "$log"
timeout 55 $PY bench/tune_logits.py --quick --budget-s 40 --json "$OUT/tune_logits_cuda_$stamp.json" 2>&1 \
  | tail -20 | tee -a "$log"

echo "benchmark exit $bench_rc, tests exit $test_rc" | tee -a "$log"
[ "$bench_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
