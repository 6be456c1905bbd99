#!/usr/bin/env bash
# The whole GPU story in one prepared run (about 6 minutes on an H200): build the C++ extension from
# source, benchmark the advantage step and the policy loss on the GPU (correctness is checked before
# anything is timed), then the test suite with the GPU tests. Results JSON, plots and logs go to $OUT
# (the device tool's output folder, which returns at most 8 files: this script writes 7) or, elsewhere,
# to bench/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}
stamp=$(date -u +%Y%m%dT%H%M%S)
gpu=$($PY -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())" 2>/dev/null || echo gpu)

{
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  $PY -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee "$OUT/env_$stamp.txt"

echo "== build"
$PY setup.py -q build_ext --inplace 2>&1 | tail -5  # the GPU path does not need it: go on either way

echo "== benchmark: advantages"
timeout 280 $PY bench/bench_advantages.py --device cuda --keep-going \
  --json "$OUT/advantages_${gpu}_$stamp.json" --plot "$OUT/advantages_${gpu}_$stamp.png" 2>&1 \
  | tee "$OUT/bench_$stamp.log"
bench_rc=${PIPESTATUS[0]}

echo "== benchmark: policy loss"
# --budget-s: the sweep drops its remaining sizes after 85 s (imports not counted): the JSON is written in time.
timeout 120 $PY bench/bench_policy_loss.py --device cuda --keep-going --budget-s 85 \
  --json "$OUT/policy_loss_${gpu}_$stamp.json" --plot "$OUT/policy_loss_${gpu}_$stamp.png" 2>&1 \
  | tee -a "$OUT/bench_$stamp.log"
pl_rc=${PIPESTATUS[0]}

echo "== tests of the ops on CUDA and CPU (property tests and the AOT compile check run in CI)"
timeout 200 $PY -m pytest python_tests/test_advantages.py python_tests/test_brier.py python_tests/test_policy_loss.py \
  -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests_$stamp.log"
test_rc=${PIPESTATUS[0]}

echo "benchmark exit $bench_rc (advantages), $pl_rc (policy loss), tests exit $test_rc"
[ "$bench_rc" -eq 0 ] && [ "$pl_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
