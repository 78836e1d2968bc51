#!/usr/bin/env bash
# One run on a lent GPU machine, from the repository root: the GPU tests, the projection benchmark,
# and the step benchmark when it exists. Writes its tables and a log under $OUT, within 10 minutes (the stages' limits add up to 590 s).
#
#   OUT=/tmp/out BLUR_COMMIT=$(git rev-parse --short HEAD) bash benchmarks/gpu_check.sh
#
# (The device machine gets a copy of the working tree without .git: BLUR_COMMIT names the commit
# in the CSV rows; without it they say "unknown".)
#
# Files under $OUT (at most 8 come back from the device machine, at most 2 folders down):
#   gpu_check.log                 everything printed, with the time of each stage
#   projection.csv / .md / .png   the projection benchmark (rows, summary table, plot)
#   step/                         whatever benchmarks/bench_step.py writes
# Environment knobs: PYTHON (default python3), BENCH_ARGS (extra bench_projection.py arguments),
# SKIP_STEP=1 (leave out bench_step.py).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: >"$LOG"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
START=$(date +%s)
say() { echo "[gpu_check +$(($(date +%s) - START))s] $*" | tee -a "$LOG"; }
run() {  # run <seconds> <command...>: bounded, output to the log and the terminal, status logged
  local limit=$1
  shift
  say "\$ $*  (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local status=${PIPESTATUS[0]}
  say "exit $status"
  return "$status"
}

say "host $(hostname), $(nproc) CPUs"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
$PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee -a "$LOG"

# blur_lightning.kernels lives in kernels/ (blur_lightning/kernels.py points its __path__ there), so
# the repository root on the path is enough; an editable install (offline with --no-build-isolation)
# also puts the console script in place.
if ! $PYTHON -c "import blur_lightning.kernels" >/dev/null 2>&1; then
  if ! timeout 60 $PYTHON -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 ||
    ! $PYTHON -c "import blur_lightning.kernels" >>"$LOG" 2>&1; then
    say "pip install -e . failed: using the repository root on PYTHONPATH"
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
$PYTHON -c "import blur_lightning.kernels as k, blur_lightning; print('blur_lightning from', blur_lightning.__file__, '| kernels from', k.__file__)" 2>&1 | tee -a "$LOG"

status=0
run 150 $PYTHON -m pytest -m gpu tests/test_kernels*.py tests/test_step_host_reads.py -q -p no:cacheprovider --timeout=120 || status=1
# shellcheck disable=SC2086
run 240 $PYTHON benchmarks/bench_projection.py --out "$OUT" --sweep ${BENCH_ARGS:-} || status=1
if [ -n "${SKIP_STEP:-}" ]; then
  say "SKIP_STEP set: bench_step.py skipped"
elif [ -f benchmarks/bench_step.py ]; then
  mkdir -p "$OUT/step"
  # --profile: the top ops and the GPU busy time of two steps per provider (where the GPU waits)
  run 200 $PYTHON benchmarks/bench_step.py --out "$OUT/step" --profile || status=1
else
  say "benchmarks/bench_step.py not present: skipped"
fi
say "done, status $status"
ls -la "$OUT" | tee -a "$LOG"
exit $status
