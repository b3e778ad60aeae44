#!/usr/bin/env bash
# The broker next to the talk's single-threaded pyzmq echo server, same client, same run.
# Installs pyzmq into target/tools/perf-venv. See scripts/perf.sh for the other curves.
set -euo pipefail
exec "$(dirname "$0")/perf.sh" talk
