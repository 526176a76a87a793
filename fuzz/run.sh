#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer on the stable toolchain and runs each for a bounded time
# from its committed corpus (fuzz/corpus/<target>/). New inputs go to a scratch directory, never
# into the committed corpus; a crash, a timeout or an out-of-memory stops with the reproducer in
# $FUZZ_ARTIFACTS. Usage: fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]   (docs/FUZZING.md)
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-20}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(chat_completion completion tokenize chat_template checkpoint model_configs image)
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
# rustc's stable SanitizerCoverage pass, as cargo-fuzz sets it (without -Zsanitizer, which needs
# nightly). With --target, RUSTFLAGS do not reach build scripts, which must not be instrumented.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing"
cargo build --locked --release --target "$triple" --bins
bin=$CARGO_TARGET_DIR/$triple/release
work=${FUZZ_WORK:-$(mktemp -d)}
artifacts=${FUZZ_ARTIFACTS:-$work/artifacts}
mkdir -p "$artifacts"
status=0
for t in "${targets[@]}"; do
    mkdir -p "$work/$t" "corpus/$t"
    echo "== fuzz $t for ${secs}s"
    # -rss_limit_mb: one input may not make the process hold more than 2 GiB;
    # -timeout: nor take more than 10 s; -max_len covers the largest seed (an image).
    if ! "$bin/$t" "$work/$t" "corpus/$t" -max_total_time="$secs" -timeout=10 \
        -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="$artifacts/$t-" >"$work/$t.log" 2>&1; then
        echo "!! $t failed; reproducer in $artifacts:"
        tail -40 "$work/$t.log"
        status=1
    fi
    grep -E "stat::number_of_executed_units|stat::peak_rss_mb|^#[0-9]+.*DONE" "$work/$t.log" || true
done
exit $status
