#!/usr/bin/env bash
# Runs every cargo-fuzz target of fuzz/fuzz_targets for SECONDS each (default 60), keeping the
# corpora under fuzz/corpus/<target> and whatever crashes under fuzz/artifacts/<target>, and
# exits non-zero if any target crashed, hung, or allocated past the limits.
#
#   fuzz/run.sh [SECONDS]             # all targets
#   TARGETS="shard delta" fuzz/run.sh 30
#   SANITIZER=none fuzz/run.sh        # see below
#
# Stable Rust only (1.95; no nightly is needed or used). Two things make cargo-fuzz work on it:
#
# * RUSTC_BOOTSTRAP=1. cargo-fuzz asks rustc for AddressSanitizer with `-Zsanitizer=address`
#   (on 1.95 it takes the `-Z` form, sanitizers not being stable yet), and stable rustc refuses
#   `-Z` flags ("the option `Z` is only accepted on the nightly compiler"). RUSTC_BOOTSTRAP=1
#   lets the stable compiler accept them, as the Rust project does to build its own standard
#   library; by itself it changes no generated code. It is set only for this script's commands.
#   The coverage flags (`-Cpasses=sancov-module`, `-Cllvm-args=-sanitizer-coverage-*`) are
#   stable codegen options: `--sanitizer none` builds even without RUSTC_BOOTSTRAP.
# * The sanitizer. AddressSanitizer works on stable with RUSTC_BOOTSTRAP=1 (the rust-std
#   component of x86_64-unknown-linux-gnu ships librustc-stable_rt.asan.a), so `address` is
#   the default. Its allocator is also what makes libFuzzer's -malloc_limit_mb catch a single
#   oversized allocation ("out-of-memory (malloc(N))"); with SANITIZER=none such an allocation
#   is only seen through -rss_limit_mb or as an abort. The standard library itself is not
#   instrumented (that needs -Zbuild-std and the rust-src component).
#
# Limits per input: -rss_limit_mb=2048 (the process), -malloc_limit_mb=512 (one allocation; the
# decoders' own limits allow at most 256 MiB of decoded f32), -timeout=30 (seconds).
#
# The build is slow (burn and libp2p with coverage instrumentation): it runs at nice 19 with
# its own target directory, fuzz/target. Logs: fuzz/target/fuzz-logs/<target>.log.
set -euo pipefail

SECONDS_PER_TARGET="${1:-60}"
SANITIZER="${SANITIZER:-address}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FUZZ="$ROOT/fuzz"
LOGS="$FUZZ/target/fuzz-logs"
# Several codegen units: cargo-fuzz's default of one makes the instrumented release build of
# burn take hours on two cores, for a fuzzing speed that differs by a small factor.
CODEGEN_UNITS="${CODEGEN_UNITS:-16}"

export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    nice -n 19 cargo install cargo-fuzz --locked
fi

cd "$ROOT"
if [ -z "${TARGETS:-}" ]; then
    TARGETS="$(cd "$FUZZ/fuzz_targets" && ls -1 *.rs | sed 's/\.rs$//' | tr '\n' ' ')"
fi

build=(nice -n 19 cargo fuzz build --fuzz-dir "$FUZZ" --sanitizer "$SANITIZER"
    --codegen-units "$CODEGEN_UNITS" --target-dir "$FUZZ/target")
echo "building: ${build[*]}"
start=$(date +%s)
"${build[@]}"
echo "build took $(( $(date +%s) - start )) s"

mkdir -p "$LOGS"
failed=()
summary=()
for target in $TARGETS; do
    mkdir -p "$FUZZ/corpus/$target" "$FUZZ/artifacts/$target"
    echo "=== $target: ${SECONDS_PER_TARGET}s"
    log="$LOGS/$target.log"
    set +e
    nice -n 19 cargo fuzz run --fuzz-dir "$FUZZ" --sanitizer "$SANITIZER" \
        --codegen-units "$CODEGEN_UNITS" --target-dir "$FUZZ/target" \
        "$target" "$FUZZ/corpus/$target" -- \
        -max_total_time="$SECONDS_PER_TARGET" \
        -rss_limit_mb=2048 \
        -malloc_limit_mb=512 \
        -timeout=30 \
        -print_final_stats=1 >"$log" 2>&1
    status=$?
    set -e
    # A crashed run prints no "Done" line: these may find nothing.
    runs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | awk '{print $2}' || true)"
    secs="$(grep -o 'Done [0-9]* runs in [0-9]* second' "$log" | tail -1 | awk '{print $5}' || true)"
    cov="$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{print $2}' || true)"
    files="$(find "$FUZZ/corpus/$target" -type f | wc -l || true)"
    if [ "$status" -ne 0 ]; then
        failed+=("$target")
        echo "!!! $target failed (exit $status); see $log and $FUZZ/artifacts/$target"
        grep -E 'panicked at|ERROR: libFuzzer|ERROR: AddressSanitizer|SUMMARY|Test unit written' "$log" | head -8 || true
        summary+=("$target|FAILED (exit $status)|${runs:-?}|${secs:-?}|${cov:-?}|$files")
    else
        summary+=("$target|ok|${runs:-?}|${secs:-?}|${cov:-?}|$files")
    fi
done

echo
echo "| target | result | runs | seconds | coverage (edges) | corpus files |"
echo "| --- | --- | ---: | ---: | ---: | ---: |"
for row in "${summary[@]}"; do
    IFS='|' read -r t r n s c f <<<"$row"
    echo "| \`$t\` | $r | $n | $s | $c | $f |"
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
