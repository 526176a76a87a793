#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain. Run the prebuilt
# executables from DIR (default: this script's directory):
#   DIR/cuda_fixtures   the cuda_fixtures test executable (cargo test --release -p autoglm-core
#                       --test cuda_fixtures --no-run prints its path; copy it under this name)
#   DIR/e2e             cargo build --release -p autoglm-benches --bin e2e
#   DIR/fixtures/       a copy of tests/fixtures (passed to the tests as AUTOGLM_FIXTURES)
#   DIR/xcheck_transformers.py   benches/python/xcheck_transformers.py
# (.ci/gpu-bundle.sh gathers them.) Results go to $OUT when it is set (the device tool brings
# that folder back; at most 8 files), else to DIR, as gpu-check-*.txt/json, each written as its
# step runs, so a run cut short still leaves what it got. Every step has a time limit and a failing
# step does not stop the next; the exit status says whether all passed. Steps:
#   1. the fixture tests (CUDA backend vs the CPU reference, graphs vs eager, device sampling);
#   2. tests that failed, again one at a time with CUDA_LAUNCH_BLOCKING=1 (errors at the launch
#      that caused them);
#   3. the GLM-4-9B-shaped benchmark with weights generated on the device, then a second start
#      (kernels from the disk cache);
#   4. with GPU_CHECK_MEMCHECK=1: compute-sanitizer memcheck over the fixture tests whose names
#      contain GPU_CHECK_MEMCHECK_FILTER (default: the prompt-logits test; slow).
# All output also goes to gpu-check-log.txt.
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
exec > >(tee "$RES/gpu-check-log.txt") 2>&1

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv 2>&1

step "0. transformers: a random GLM-4-9B-shaped checkpoint, its logits, and its decode speed"
XCHECK=${GPU_CHECK_XCHECK_DIR:-/tmp/autoglm-xcheck}
rm -rf "$XCHECK"
PYTHONUNBUFFERED=1 timeout "${GPU_CHECK_XCHECK_TIMEOUT:-150}" python3 "$DIR/xcheck_transformers.py" "$XCHECK" \
  --layers "${GPU_CHECK_XCHECK_LAYERS:-4}" --baseline-layers "${GPU_CHECK_BASELINE_LAYERS:-40}" \
  --json "$RES/gpu-check-transformers.json"
[ "$?" -eq 0 ] || { status=1; echo "transformers step failed (the cross-check test below will fail too)"; }
export AUTOGLM_XCHECK_DIR="$XCHECK"

step "1. correctness: CUDA backend vs the CPU reference (bf16 tolerance)"
timeout "${GPU_CHECK_FIXTURES_TIMEOUT:-240}" ./cuda_fixtures --include-ignored --test-threads=1 2>&1 | tee "$RES/gpu-check-fixtures.txt"
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
B=${GPU_CHECK_BATCHES:-1,4,8,16,64,256}
timeout "${GPU_CHECK_E2E_TIMEOUT:-240}" ./e2e --device cuda --params 9B --gpu-batches "$B" --json \
  > "$RES/gpu-check-e2e-9B.json" 2> "$RES/gpu-check-e2e-9B.txt" || status=1
cat "$RES/gpu-check-e2e-9B.txt"
step "the same with decode products on the GEMV kernel (--cuda-gemv-max-rows 8), JSON appended"
timeout "${GPU_CHECK_E2E_TIMEOUT:-240}" ./e2e --device cuda --params 9B --gpu-batches "$B" --json \
  --cuda-gemv-max-rows 8 >> "$RES/gpu-check-e2e-9B.txt" 2>&1 || status=1
grep -E "decode batch|prefill of" "$RES/gpu-check-e2e-9B.txt" | tail -n +1
step "second start (kernels from the disk cache)"
timeout 120 ./e2e --device cuda --params 50M --gpu-batches 1 --decode-steps 4 2>&1 | grep -E "device:|backend ready|decode batch"

if [ "${GPU_CHECK_NCU:-0}" = 1 ]; then
  step "3b. kernel times of batch-1 decode steps (Nsight Compute, 9B layer shape, 2 layers)"
  ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
  if [ -n "$ncu" ]; then
    timeout "${GPU_CHECK_NCU_TIMEOUT:-120}" "$ncu" --clock-control none --metrics gpu__time_duration.sum --csv \
      --print-units base ./e2e --device cuda --params 9B --layers 2 --gpu-batches 1,8 --decode-steps 2 \
      --warmup-steps 1 --prefill-runs 1 --gpu-prefill-len 64 --bw-mib 64 --bw-runs 1 \
      > "$RES/gpu-check-ncu.csv" 2>&1 || status=1
    grep -c '"gpu__time_duration.sum"' "$RES/gpu-check-ncu.csv"
  else
    echo "ncu not found" | tee "$RES/gpu-check-ncu.csv"
  fi
fi

if [ "${GPU_CHECK_MEMCHECK:-0}" = 1 ]; then
  step "4. compute-sanitizer memcheck over the fixture tests"
  san=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null | head -1)
  if [ -n "$san" ]; then
    timeout "${GPU_CHECK_MEMCHECK_TIMEOUT:-180}" "$san" --tool memcheck --error-exitcode 3 --print-limit 20 \
      ./cuda_fixtures --include-ignored --test-threads=1 "${GPU_CHECK_MEMCHECK_FILTER:-prompt_logits}" 2>&1 | tail -150 > "$RES/gpu-check-memcheck.txt"
    [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
    tail -40 "$RES/gpu-check-memcheck.txt"
  else
    echo "compute-sanitizer not found" | tee "$RES/gpu-check-memcheck.txt"
  fi
fi
step "gpu check done (status $status); results in $RES/gpu-check-*"
exit $status
