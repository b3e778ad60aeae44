#!/usr/bin/env bash
# Runs the libFuzzer target over the protocol parsing code for FUZZ_SECONDS (default 20),
# starting from the committed corpus (fuzz/corpus/protocol), which it grows. A crash fails.
# cargo-fuzz needs nightly flags: nightly when installed, else stable with RUSTC_BOOTSTRAP=1
# (these machines have one toolchain and can fetch no other).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
command -v cargo-fuzz >/dev/null || cargo install --locked --quiet cargo-fuzz
toolchain=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  toolchain=(+nightly)
else
  export RUSTC_BOOTSTRAP=1
fi
mkdir -p target
if ! cargo "${toolchain[@]}" fuzz run protocol corpus/protocol -- \
  -max_total_time="${FUZZ_SECONDS:-20}" -print_final_stats=1 >target/fuzz.log 2>&1; then
  tail -40 target/fuzz.log >&2
  echo "fuzz: the protocol target failed; the crashing input is in fuzz/artifacts/protocol" >&2
  exit 1
fi
grep -E '^(Done|stat::number_of_executed_units|stat::new_units_added)' target/fuzz.log
