#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain. Run the prebuilt
# executables from DIR (default: this script's directory):
#   DIR/cuda_fixtures   the cuda_fixtures test executable (cargo test --release -p autoglm-core
#                       --test cuda_fixtures --no-run prints its path; copy it under this name)
#   DIR/e2e             cargo build --release -p autoglm-benches --bin e2e
#   DIR/fixtures/       a copy of tests/fixtures (passed to the tests as AUTOGLM_FIXTURES)
# (.ci/gpu-bundle.sh gathers all three.) Results go to $OUT when it is set (the device tool brings
# that folder back; at most 8 files), else to DIR, as gpu-check-*.txt/json, each written as its
# step runs, so a run cut short still leaves what it got. Every step has a time limit and a failing
# step does not stop the next; the exit status says whether all passed. Steps:
#   1. the fixture tests (CUDA backend vs the CPU reference, graphs vs eager, device sampling);
#   2. tests that failed, again one at a time with CUDA_LAUNCH_BLOCKING=1 (errors at the launch
#      that caused them);
#   3. the GLM-4-9B-shaped benchmark with weights generated on the device, then a second start
#      (kernels from the disk cache);
#   4. with GPU_CHECK_MEMCHECK=1: the fixture tests under compute-sanitizer memcheck (slow).
# Never changes clocks, power, MIG or persistence settings.
set -uo pipefail
DIR=${1:-$(cd "$(dirname "$0")" && pwd)}
RES=${OUT:-$DIR}
mkdir -p "$RES"
cd "$DIR"
export AUTOGLM_FIXTURES="$DIR/fixtures"
# NVRTC and cuBLAS come from the CUDA toolkit (or PyTorch's nvidia-* wheels) at run time.
if [ -d /usr/local/cuda/lib64 ]; then
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
status=0
step() { echo "== $(date -u +%H:%M:%S) $*"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1 | tee "$RES/gpu-check-device.txt"

step "1. correctness: CUDA backend vs the CPU reference (bf16 tolerance)"
timeout 300 ./cuda_fixtures --include-ignored --test-threads=1 2>&1 | tee "$RES/gpu-check-fixtures.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

failed=$(sed -n 's/^test \([a-z0-9_]*\) \.\.\. FAILED$/\1/p' "$RES/gpu-check-fixtures.txt" | head -6)
if [ -n "$failed" ]; then
  step "2. failed tests again, one at a time, with CUDA_LAUNCH_BLOCKING=1"
  for t in $failed; do
    echo "-- $t"
    CUDA_LAUNCH_BLOCKING=1 RUST_BACKTRACE=1 timeout 90 ./cuda_fixtures --include-ignored --exact "$t" --nocapture 2>&1 | tail -60
  done > "$RES/gpu-check-rerun.txt"
  cat "$RES/gpu-check-rerun.txt"
fi

step "3. benchmark: GLM-4-9B shape, dummy weights generated on the device"
timeout 420 ./e2e --device cuda --params 9B --json > "$RES/gpu-check-e2e-9B.json" 2> "$RES/gpu-check-e2e-9B.txt" || status=1
cat "$RES/gpu-check-e2e-9B.txt"
step "second start (kernels from the disk cache)"
timeout 120 ./e2e --device cuda --params 50M --gpu-batches 1 --decode-steps 4 2>&1 | grep -E "device:|backend ready|decode batch" | tee -a "$RES/gpu-check-e2e-9B.txt"

if [ "${GPU_CHECK_MEMCHECK:-0}" = 1 ]; then
  step "4. compute-sanitizer memcheck over the fixture tests"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$san" ]; then
    timeout 480 "$san" --tool memcheck --error-exitcode 3 --print-limit 20 \
      ./cuda_fixtures --include-ignored --test-threads=1 2>&1 | tail -150 > "$RES/gpu-check-memcheck.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -40 "$RES/gpu-check-memcheck.txt"
  else
    echo "compute-sanitizer not found" | tee "$RES/gpu-check-memcheck.txt"
  fi
fi
step "gpu check done (status $status); results in $RES/gpu-check-*"
exit $status
