#!/usr/bin/env bash
# The whole GPU story in one prepared run (about 9 minutes on an H200): build the C++ extension from
# source, benchmark the advantage step, the policy loss and the loss from logits on the GPU (correctness
# is checked before anything is timed), the test suite with the GPU tests, then a tuning sweep of the
# fused logits kernel. Results go to $OUT (the device tool's output folder, which returns at most 8
# files: this script writes 8, with the environment, the test output and the sweep's summary in the
# log) or, elsewhere, to bench/results/.
# Liger-Kernel (compared in the logits benchmark) comes from a wheel in bench/wheels/ (`make liger-wheel`
# here; the GPU machine has no network). bench/wheels/ is git-ignored: the device tool carries it only
# when asked to (carry: ["bench/wheels"]).
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
} 2>&1 | tee "$OUT/bench_$stamp.log"

echo "== build"
$PY setup.py -q build_ext --inplace 2>&1 | tail -5  # the GPU path does not need it: go on either way

if compgen -G "bench/wheels/liger_kernel-*.whl" >/dev/null; then
  echo "== install Liger-Kernel from bench/wheels"
  $PY -m pip install -q --no-deps --no-index bench/wheels/liger_kernel-*.whl 2>&1 | tail -3 || true
fi

echo "== benchmark: advantages"
timeout 280 $PY bench/bench_advantages.py --device cuda --keep-going \
  --json "$OUT/advantages_${gpu}_$stamp.json" --plot "$OUT/advantages_${gpu}_$stamp.png" 2>&1 \
  | tee -a "$OUT/bench_$stamp.log"
bench_rc=${PIPESTATUS[0]}

echo "== benchmark: policy loss"
# --budget-s: the sweep drops its remaining sizes after 85 s (imports not counted): the JSON is written in time.
timeout 120 $PY bench/bench_policy_loss.py --device cuda --keep-going --budget-s 85 \
  --json "$OUT/policy_loss_${gpu}_$stamp.json" --plot "$OUT/policy_loss_${gpu}_$stamp.png" 2>&1 \
  | tee -a "$OUT/bench_$stamp.log"
pl_rc=${PIPESTATUS[0]}

echo "== benchmark: policy loss from logits"
# Two shapes, bf16: (4, 4096, 151936) and (8, 2048, 32000); torch.compile compiles once per shape (tens of
# seconds each). --budget-s: the second shape is dropped when 120 s have passed at the end of the first.
timeout 240 $PY bench/bench_logits_loss.py --device cuda --keep-going --budget-s 120 \
  --json "$OUT/logits_loss_${gpu}_$stamp.json" --plot "$OUT/logits_loss_${gpu}_$stamp.png" 2>&1 \
  | tee -a "$OUT/bench_$stamp.log"
ll_rc=${PIPESTATUS[0]}

echo "== tests of the ops on CUDA and CPU (property tests and the AOT compile check run in CI)"
timeout 200 $PY -m pytest python_tests/test_advantages.py python_tests/test_brier.py python_tests/test_policy_loss.py \
  python_tests/test_logits.py -q -p no:cacheprovider -x 2>&1 \
  | tee -a "$OUT/bench_$stamp.log"
test_rc=${PIPESTATUS[0]}

echo "== tuning sweep of the fused logits kernel (chunk, tile, warps, register cap)"
timeout 90 $PY bench/tune_logits.py --quick --budget-s 70 --json "$OUT/tune_logits_${gpu}_$stamp.json" 2>&1 \
  | tail -20 | tee -a "$OUT/bench_$stamp.log"

echo "benchmark exit $bench_rc (advantages), $pl_rc (policy loss), $ll_rc (logits loss), tests exit $test_rc"
[ "$bench_rc" -eq 0 ] && [ "$pl_rc" -eq 0 ] && [ "$ll_rc" -eq 0 ] && [ "$test_rc" -eq 0 ]
