#!/usr/bin/env bash
# Builds the C benchmark programs (load client, open-loop overload client, libzmq proxy pool,
# ROUTER echo) into target/cbench/ against the system libzmq; installs libzmq3-dev first if
# its header is missing. Used by scripts/compare.sh and scripts/perf.sh; safe to run again
# (rebuilds only what changed, common.h included).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ! -f /usr/include/zmq.h ]]; then
  echo "build.sh: installing libzmq3-dev" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libzmq3-dev >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libzmq3-dev >/dev/null; }
fi
out=target/cbench
mkdir -p "$out"
for prog in loadgen overload proxy router_echo; do
  src=benches/c/$prog.c
  if [[ ! -x $out/$prog || $src -nt $out/$prog || benches/c/common.h -nt $out/$prog ]]; then
    gcc -O2 -Wall -Wextra -Werror -o "$out/$prog" "$src" -lzmq -lpthread -lm
  fi
done
