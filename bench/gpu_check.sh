#!/usr/bin/env bash
# The GPU check: one prepared run for a GPU machine lent for a few minutes, under 8 minutes in all.
#
#   bash bench/gpu_check.sh                                # on the GPU machine
#   MOO_GPU_CHECK_REHEARSAL=1 bash bench/gpu_check.sh      # the same steps on the CPU, tiny sizes, ~1 minute
#
# Steps, each under its own timeout (on the GPU 420 s in all, 475 s with the kill graces), each one's output
# kept whole in the log: the environment; the C++ extension, built in parallel (the GPU path does not need it:
# a failed build is reported and the run goes on); Liger-Kernel from its wheel in bench/wheels/ when it is there
# (`make peer-wheels` where there is network; the folder is git-ignored, so carry it; Cut Cross-Entropy's wheel is
# left out: its kernels' first compilation does not fit linear_loss's 40 s here, `make bench` times it); the
# tests that touch
# the GPU (`pytest -m gpu`, in parallel with pytest-xdist when it is installed, a timeout per test with
# pytest-timeout, JUnit XML); the four benchmark suites on cuda, one process each (linear_loss at its small
# sizes and without torch.compile, to fit the budget); the tuning sweep of the fused logits kernel.
#
# Files, at most 9, all in $OUT (a new folder under /tmp when OUT is unset), each written as soon as it
# exists: gpu_check.log; gpu_check_summary.json (every step's status, exit code and seconds, rewritten
# after every step); junit.xml; <suite>_<device>_<date>.json per benchmark suite and
# tune_logits_<device>_<date>.json, both rewritten after every size / setting, so a timeout keeps what
# was measured. No PNG: copy the JSON into bench/results/, then `make plots` draws them and the README's
# performance section. The exit status is 1 when a step failed; the last lines say which.
#
# The rehearsal hides any GPU (CUDA_VISIBLE_DEVICES=), runs the Triton kernels under the interpreter and
# a fast subset of their tests (the CPU twins of the parametrised gpu tests, marker triton_cpu), the
# suites at --quick sizes and the sweep at tiny shapes; python_tests/test_gpu_check.py runs it.
# MOO_KERNELS_GIT_COMMIT names the commit in the results where the tree is not a git checkout.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
REHEARSAL=${MOO_GPU_CHECK_REHEARSAL:-0}
[ "$REHEARSAL" = 0 ] || REHEARSAL=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PY:-python3}

have() { "$PY" -c "import $1" 2>/dev/null; }
# The test files that hold tests touching the GPU (parametrised through conftest.targets(), or marked gpu).
mapfile -t test_files < <(grep -l -E 'targets\(\)|mark\.gpu|CUDA device' python_tests/test_*.py)
if [ "$REHEARSAL" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
  mode=rehearsal device=cpu
  # Timeouts in seconds: bounds, far above the ~1 minute the rehearsal takes (the build: a no-op when current).
  t_env=60 t_build=300 t_wheels=60 t_tests=180 t_bench=60 t_logits=60 t_tune=60 t_linear=60
  budget_adv=20 budget_pol=20 budget_logits=20 budget_tune=20 budget_linear=20
  linear_sizes=(--sizes linear_loss=tiny)
  bench_args=(--device cpu --quick --no-compile)
  # The CPU twins of the parametrised gpu tests, less the slow ones (the interpreter runs ~1 test a second).
  test_select=(-m triton_cpu -k "not gradcheck and not reference and not agrees_with and not test_token_logprobs")
  jobs=1 per_test=60  # one xdist worker: the same path as on the GPU, at the cost of one start-up
  tune_args=(--device cpu --grid tiny)
else
  mode=gpu device=cuda
  # Timeouts in seconds, 420 in all, 475 with every kill grace: under 8 minutes even if nothing stops when told.
  # The benchmark's and the sweep's budgets leave each process time to start and to finish its last size.
  t_env=15 t_build=60 t_wheels=20 t_tests=105 t_bench=35 t_logits=80 t_tune=30 t_linear=40
  budget_adv=20 budget_pol=20 budget_logits=55 budget_tune=20 budget_linear=20
  linear_sizes=(--sizes linear_loss=small)
  bench_args=(--device cuda --keep-going)
  test_select=(-m gpu)
  jobs=8 per_test=90
  tune_args=(--device cuda --grid quick)
fi
planned=$((t_env + t_build + t_wheels + t_tests + 2 * t_bench + t_logits + t_linear + t_tune))
# A step that outlives its timeout is sent SIGTERM (the tests: SIGINT, so that pytest writes its report), then
# SIGKILL this many seconds later.
grace_term=5 grace_int=15
worst=$((planned + 8 * grace_term + grace_int))
if [ "${MOO_GPU_CHECK_PLAN:-0}" = 1 ]; then  # the plan alone: nothing runs, nothing is written
  echo "gpu_check plan ($mode): environment $t_env, build_cpp $t_build, liger_kernel $t_wheels, tests $t_tests," \
    "bench_advantages $t_bench, bench_policy_loss $t_bench, bench_logits_loss $t_logits," \
    "bench_linear_loss $t_linear, tune_logits $t_tune"
  echo "planned_s $planned worst_case_s $worst"
  exit 0
fi

if [ -z "${OUT:-}" ]; then
  OUT=$(mktemp -d /tmp/gpu_check.XXXXXX)
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
day=$(date -u +%Y%m%d)
log="$OUT/gpu_check.log"
summary="$OUT/gpu_check_summary.json"
: >"$log"

now() { date +%s.%N; }
t_start=$(now)
steps_json=""
failed=()
recap=()

write_summary() {  # write_summary COMPLETE
  local fail_json="" f
  for f in "${failed[@]}"; do fail_json+="${fail_json:+, }\"$f\""; done
  local ok=true
  [ ${#failed[@]} -eq 0 ] || ok=false
  cat >"$summary.tmp" <<EOF
{
  "mode": "$mode",
  "device": "$device",
  "started_utc": "$started",
  "seconds": $(awk "BEGIN {printf \"%.1f\", $(now) - $t_start}"),
  "planned_s": $planned,
  "worst_case_s": $worst,
  "complete": $1,
  "ok": $ok,
  "failed": [$fail_json],
  "steps": [$steps_json
  ]
}
EOF
  mv "$summary.tmp" "$summary"
}

# step NAME TIMEOUT_S [--int] COMMAND...: run under timeout (SIGTERM, or SIGINT with --int; SIGKILL after the
# grace), output into the log whole, status into the summary.
step() {
  local name=$1 limit=$2 signal=TERM grace=$grace_term
  shift 2
  if [ "$1" = --int ]; then signal=INT grace=$grace_int; shift; fi
  printf '\n== %s (timeout %s s): %s\n' "$name" "$limit" "$*" | tee -a "$log"
  local t0 rc status secs
  t0=$(now)
  timeout -s "$signal" -k "$grace" "$limit" "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  secs=$(awk "BEGIN {printf \"%.1f\", $(now) - $t0}")
  case $rc in
    0) status=ok ;;
    124 | 137) status=timeout ;;
    *) status=failed ;;
  esac
  [ "$rc" -eq 0 ] || failed+=("$name")
  recap+=("$(printf '%-18s %-8s exit %-3s %6s s of %s' "$name" "$status" "$rc" "$secs" "$limit")")
  printf '== %s: %s (exit %s) in %s s\n' "$name" "$status" "$rc" "$secs" | tee -a "$log"
  steps_json+="${steps_json:+,}
    {\"name\": \"$name\", \"status\": \"$status\", \"rc\": $rc, \"seconds\": $secs, \"timeout_s\": $limit}"
  write_summary false
  return "$rc"
}

skip_step() {  # skip_step NAME WHY
  printf '\n== %s: skipped: %s\n' "$1" "$2" | tee -a "$log"
  recap+=("$(printf '%-18s skipped: %s' "$1" "$2")")
  steps_json+="${steps_json:+,}
    {\"name\": \"$1\", \"status\": \"skipped\", \"rc\": 0, \"seconds\": 0, \"timeout_s\": 0, \"why\": \"$2\"}"
  write_summary false
}

started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
echo "gpu_check: $mode, results in $OUT, step timeouts sum to $planned s ($worst s with the kill graces)" \
  | tee -a "$log"
write_summary false

env_check() {
  uname -a
  git rev-parse HEAD 2>/dev/null || true
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total,power.limit,temperature.gpu \
      --format=csv
  else
    echo "no nvidia-smi"
  fi
  "$PY" - <<'PYTHON'
import importlib.metadata as md, os, platform, sys, torch
print("python", platform.python_version(), sys.executable)
print("torch", torch.__version__, "cuda", torch.version.cuda)
for dist in ("triton", "numpy", "pytest", "pytest-xdist", "pytest-timeout", "pybind11", "matplotlib",
             "hypothesis", "liger-kernel"):
    try:
        print(dist, md.version(dist))
    except md.PackageNotFoundError:
        print(dist, "not installed")
print("cpus", os.cpu_count(), "torch threads", torch.get_num_threads())
print("git commit", os.environ.get("MOO_KERNELS_GIT_COMMIT", "(from git)"))
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"gpu {p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {p.major}.{p.minor}, devices {torch.cuda.device_count()}")
elif os.environ.get("MOO_GPU_CHECK_REHEARSAL", "0") != "0":
    print("no CUDA device: the rehearsal runs on the CPU (CUDA_VISIBLE_DEVICES is empty)")
else:
    sys.exit("torch sees no CUDA device")
PYTHON
}
export -f env_check
export PY
step environment "$t_env" bash -c env_check

step build_cpp "$t_build" "$PY" setup.py build_ext --inplace

wheel=$(compgen -G "bench/wheels/liger_kernel-*.whl" | head -1)
if [ -z "$wheel" ]; then
  skip_step liger_kernel "no Liger-Kernel wheel in bench/wheels (make peer-wheels): Liger-Kernel is not timed"
elif [ "$REHEARSAL" = 1 ]; then
  step liger_kernel "$t_wheels" "$PY" -m pip install --dry-run -q --no-deps --no-index "$wheel"
else
  # Into a folder of its own: the image's packages stay as they are.
  step liger_kernel "$t_wheels" "$PY" -m pip install -q --no-deps --no-index --target /tmp/moo_site "$wheel" \
    && export PYTHONPATH="$PYTHONPATH:/tmp/moo_site"
fi

pytest_args=("${test_select[@]}" -p no:cacheprovider -v -rfEs --junitxml="$OUT/junit.xml" -o junit_family=xunit2)
if have xdist; then
  pytest_args+=(-n "$jobs")
else
  echo "pytest-xdist is not installed: the tests run one at a time" | tee -a "$log"
fi
if have pytest_timeout; then
  # thread: a test stuck in a CUDA call is stopped too (its worker exits, and xdist starts another)
  pytest_args+=(--timeout "$per_test" --timeout-method thread)
fi
step tests "$t_tests" --int "$PY" -m pytest "${test_files[@]}" "${pytest_args[@]}"
tests_line=$(grep -E '^=+ .*(passed|failed|error|skipped|deselected).* in [0-9.]+s' "$log" | tail -1)

for suite in advantages policy_loss logits_loss linear_loss; do
  extra=()
  case $suite in
    advantages) limit=$t_bench budget=$budget_adv ;;
    policy_loss) limit=$t_bench budget=$budget_pol ;;
    logits_loss) limit=$t_logits budget=$budget_logits ;;
    linear_loss) limit=$t_linear budget=$budget_linear extra=("${linear_sizes[@]}" --no-compile) ;;
  esac
  step "bench_$suite" "$limit" "$PY" -m moo_kernels.bench --suites "$suite" "${bench_args[@]}" --budget-s "$budget" \
    "${extra[@]}" --no-progress --no-plot --out "$OUT"
done

step tune_logits "$t_tune" "$PY" bench/tune_logits.py "${tune_args[@]}" --budget-s "$budget_tune" \
  --json "$OUT/tune_logits_${device}_$day.json"

rm -f "$OUT"/*.tmp
write_summary true
{
  echo
  echo "gpu_check: $mode done in $(awk "BEGIN {printf \"%.0f\", $(now) - $t_start}") s; files in $OUT:"
  (cd "$OUT" && find . -maxdepth 1 -type f -printf '%10s  %f\n' | sort -k2)
  printf '%s\n' "${recap[@]}"
  echo "tests: ${tests_line:-no pytest summary line}"
  if [ ${#failed[@]} -eq 0 ]; then
    echo "gpu_check: every step succeeded"
  else
    echo "gpu_check: FAILED steps: ${failed[*]} (see gpu_check_summary.json and gpu_check.log)"
  fi
} 2>&1 | tee -a "$log"
[ ${#failed[@]} -eq 0 ]
