#!/usr/bin/env bash
# Builds the C benchmark programs (load client, libzmq proxy pool, ROUTER echo) into
# target/cbench/ against the system libzmq; installs libzmq3-dev first if its header is
# missing. Used by scripts/compare.sh; safe to run again (rebuilds only what changed).
set -euo pipefail
cd "$(dirname "$0")/../.."
if [[ ! -f /usr/include/zmq.h ]]; then
  echo "build.sh: installing libzmq3-dev" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libzmq3-dev >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libzmq3-dev >/dev/null; }
fi
out=target/cbench
mkdir -p "$out"
for prog in loadgen proxy router_echo; do
  src=benches/c/$prog.c
  if [[ ! -x $out/$prog || $src -nt $out/$prog ]]; then
    gcc -O2 -Wall -Wextra -Werror -o "$out/$prog" "$src" -lzmq -lpthread
  fi
done
