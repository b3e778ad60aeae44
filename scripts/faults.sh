#!/usr/bin/env bash
# The fault tests (broker/tests/faults.rs) with their figures printed. The test command runs
# the same tests in this bounded form; FAULT_SOAK_SECS=60 gives the full overload soak.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup
FAULT_SOAK_SECS=${FAULT_SOAK_SECS:-10} cargo test --locked -p broker --test faults -- --nocapture --test-threads=1 2>&1 \
  | grep -E '^(test |rolling|crash|soak|storm|slow/)|panicked|test result'
