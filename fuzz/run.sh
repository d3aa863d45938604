#!/usr/bin/env bash
# `make fuzz`: the fuzz targets' checks as plain tests, then each target under libFuzzer for
# FUZZ_SECONDS (default 60). Not part of `make test`.
#
#   FUZZ_SECONDS=30 make fuzz                 # shorter
#   FUZZ_TARGETS="proxy_header" make fuzz     # some targets only
#   FUZZ_JOBS=2 make fuzz                     # libFuzzer workers per target (default 1)
#
# cargo-fuzz needs nightly-only flags (-Zsanitizer=address, ...). This machine has only the
# stable toolchain, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them; nothing else changes.
# New inputs go to fuzz/corpus/<target> (not committed); the small seeds in fuzz/seeds/<target>
# are read too. A crash leaves its input in fuzz/artifacts/<target>/ and fails the run; replay
# it with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz -O <target> <file>
set -uo pipefail
cd "$(dirname "$0")/.."
CARGO=${CARGO:-cargo}
SECONDS_PER=${FUZZ_SECONDS:-60}
TARGETS=${FUZZ_TARGETS:-config_parse config_structured proxy_header cli_args client_hello client_hello_structured handover_env names}
JOBS=${FUZZ_JOBS:-1}
export RUSTC_BOOTSTRAP=1

if ! $CARGO fuzz --version >/dev/null 2>&1; then
  echo "installing cargo-fuzz"
  $CARGO install cargo-fuzz --locked || exit 1
fi

echo "== the fuzz checks on their seeds, as plain tests"
$CARGO test --release --manifest-path fuzz/Cargo.toml || exit 1

echo "== building the fuzz targets (address sanitizer, optimized)"
$CARGO fuzz build --fuzz-dir fuzz -O || exit 1

failed=()
summary=()
for t in $TARGETS; do
  mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
  args=(-max_total_time="$SECONDS_PER" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1)
  [ -f "fuzz/dicts/$t.dict" ] && args+=(-dict="fuzz/dicts/$t.dict")
  [ "$JOBS" -gt 1 ] && args+=(-fork="$JOBS")
  log="fuzz/artifacts/$t/last-run.log"
  echo "== fuzzing $t for $SECONDS_PER s (log: $log)"
  $CARGO fuzz run --fuzz-dir fuzz -O "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- "${args[@]}" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  [ -n "$runs" ] || runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | tail -n 1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -n 1)
  corpus=$(find "fuzz/corpus/$t" -type f | wc -l)
  if [ $rc -ne 0 ]; then
    failed+=("$t")
    summary+=("$t: FAILED (exit $rc) after ${runs:-?} runs; see $log and fuzz/artifacts/$t/")
    grep -E "panicked|ERROR: |SUMMARY|Test unit written" "$log" | head -n 20
  else
    summary+=("$t: ${runs:-?} runs in ${SECONDS_PER} s, ${cov:-cov: ?}, corpus $corpus inputs, no crash")
  fi
done
echo
echo "== fuzz summary"
printf '  %s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ] || { echo "crashes in: ${failed[*]}"; exit 1; }
