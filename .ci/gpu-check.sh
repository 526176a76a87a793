#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain. Run the prebuilt
# executables from DIR (default: this script's directory):
#   DIR/cuda_fixtures   the cuda_fixtures test executable (cargo test --release -p autoglm-core
#                       --test cuda_fixtures --no-run prints its path; copy it under this name)
#   DIR/e2e             cargo build --release -p autoglm-benches --bin e2e
#   DIR/fixtures/       a copy of tests/fixtures (passed to the tests as AUTOGLM_FIXTURES)
# Writes DIR/gpu-check-*.txt/json. Never changes clocks, power, MIG or persistence settings.
set -euo pipefail
DIR=${1:-$(cd "$(dirname "$0")" && pwd)}
cd "$DIR"
# NVRTC and cuBLAS come from the CUDA toolkit (or PyTorch's nvidia-* wheels) at run time.
if [ -d /usr/local/cuda/lib64 ]; then
  export LD_LIBRARY_PATH="/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv | tee gpu-check-device.txt

echo "== correctness: CUDA backend vs the CPU reference (bf16 tolerance)"
AUTOGLM_FIXTURES="$DIR/fixtures" ./cuda_fixtures --include-ignored --test-threads=1 2>&1 | tee gpu-check-fixtures.txt

echo "== benchmark: GLM-4-9B shape, dummy weights generated on the device"
./e2e --device cuda --params 9B --json > gpu-check-e2e-9B.json 2> gpu-check-e2e-9B.txt
cat gpu-check-e2e-9B.txt
echo "== second start (kernels from the disk cache)"
./e2e --device cuda --params 50M --gpu-batches 1 --decode-steps 4 2>&1 | grep -E "device:|backend ready" | tee -a gpu-check-e2e-9B.txt
echo "== gpu check done; results in $DIR/gpu-check-*"
