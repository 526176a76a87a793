#!/usr/bin/env bash
# Builds what .ci/gpu-check.sh runs on a GPU machine (which has no Rust toolchain) and gathers it
# in one folder: the cuda_fixtures test executable, the e2e benchmark, the fixtures and the check
# script. Usage: .ci/gpu-bundle.sh [OUT_DIR]   (default target/gpu-bundle); then copy OUT_DIR over
# and run OUT_DIR/gpu-check.sh there (with the device tool: the default folder is ignored by git,
# so `carry` can take it along: run target/gpu-bundle/gpu-check.sh there).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-target/gpu-bundle}
mkdir -p "$OUT"

cargo build --release -p autoglm-benches --bin e2e
cp "${CARGO_TARGET_DIR:-target}/release/e2e" "$OUT/e2e"

exe=$(cargo test --release -p autoglm-core --test cuda_fixtures --no-run --message-format=json \
  | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda_fixtures" and m.get("executable"):
        print(m["executable"])')
if [ -z "$exe" ]; then
  echo "error: cargo did not report the cuda_fixtures executable" >&2
  exit 1
fi
cp "$exe" "$OUT/cuda_fixtures"
rm -rf "$OUT/fixtures"
cp -r tests/fixtures "$OUT/fixtures"
cp .ci/gpu-check.sh "$OUT/gpu-check.sh"
cp benches/python/xcheck_transformers.py "$OUT/xcheck_transformers.py"
# Without debug info (symbol names stay for backtraces): about 10 MB instead of 140, so the
# bundle fits what the device machine takes along (64 MiB).
strip --strip-debug "$OUT/e2e" "$OUT/cuda_fixtures"
size=$(du -sm "$OUT" | cut -f1)
if [ "$size" -gt 60 ]; then
  echo "warning: the bundle is $size MiB; the device machine takes at most 64 MiB along" >&2
fi
echo "bundle ready in $OUT: copy it to the GPU machine and run $OUT/gpu-check.sh"
