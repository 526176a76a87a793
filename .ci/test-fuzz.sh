#!/usr/bin/env bash
# The fuzz targets (fuzz/, libFuzzer on the stable toolchain): each runs for FUZZ_SECONDS
# (default 20) from its committed corpus; a crash, a hang over 10 s or more than 2 GiB of memory
# for one input fails. The long runs are recorded in docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
FUZZ_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/fuzz/target} bash fuzz/run.sh "${FUZZ_SECONDS:-20}"
