#!/usr/bin/env bash
# Performance curves with `broker bench` against the release binary, on this machine:
#   workers  throughput vs --workers (echo, server pinned to core 1; cpu handler unpinned)
#   clients  throughput and p99 vs connections (1 to 1000)
#   sizes    throughput and p99 vs message size (64 B to 1 MiB)
#   memory   resident memory per idle connection with 10,000 connected clients
# Each point is the median of RUNS runs of SECONDS s. Results: target/perf/*.json and tables
# on stdout; scripts/plot.py draws target/perf/clients.png from clients.json.
#   scripts/perf.sh [workers|clients|sizes|memory|all]
# The comparison with libzmq's proxy and the talk's pyzmq server, by an independent C client,
# is scripts/compare.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
OUT=target/perf
mkdir -p "$OUT"
ulimit -n 65536 2>/dev/null || true
cargo build --release --locked -q -p broker
BIN=$PWD/target/release/broker
PY=target/tools/perf-venv/bin/python3
# Shared with scripts/compare.sh, which installs only pyzmq.
if [[ ! -x $PY ]] || ! "$PY" -c 'import zmq, matplotlib' 2>/dev/null; then
  [[ -x $PY ]] || python3 -m venv target/tools/perf-venv
  target/tools/perf-venv/bin/pip install -q --disable-pip-version-check pyzmq matplotlib
fi
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

SERVER_PID=
stop_server() { if [[ -n $SERVER_PID ]]; then kill -TERM "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=; fi; }
trap stop_server EXIT

# start_broker CPUS ARGS...: runs the broker (taskset -c CPUS) on free ports; sets ENDPOINT, ADMIN.
start_broker() {
  local cpus=$1; shift
  ENDPOINT=tcp://127.0.0.1:$(free_port); ADMIN=127.0.0.1:$(free_port)
  taskset -c "$cpus" "$BIN" --frontend "$ENDPOINT" --admin "$ADMIN" --max-inflight 100000 \
    --max-message-bytes 2MiB --max-connection-bytes 8MiB --log-level warn "$@" &
  SERVER_PID=$!
  for _ in $(seq 100); do "$BIN" probe --endpoint "$ENDPOINT" --timeout 100ms >/dev/null 2>&1 && return; done
  echo "perf: broker did not start" >&2; exit 1
}

# point CLIENT_CPUS BENCH_ARGS...: median over RUNS of one bench configuration, as JSON.
point() {
  local cpus=$1; shift
  for _ in $(seq "$RUNS"); do
    taskset -c "$cpus" "$BIN" bench --endpoint "$ENDPOINT" --duration "${SECONDS_PER_RUN}s" --json "$@"
  done | python3 -c '
import json, statistics, sys
runs = [json.loads(l) for l in sys.stdin if l.strip()]
med = lambda f: statistics.median(f(r) for r in runs)
print(json.dumps({"throughput_rps": med(lambda r: r["throughput_rps"]),
                  "p50_us": med(lambda r: r["latency_us"]["p50"]),
                  "p99_us": med(lambda r: r["latency_us"]["p99"]),
                  "p999_us": med(lambda r: r["latency_us"]["p999"]),
                  "lost": sum(r["lost"] for r in runs), "errors": [r["errors"] for r in runs],
                  "runs": [round(r["throughput_rps"]) for r in runs]}))'
}

workers() {
  echo "## throughput vs --workers (echo: server on core 1, client on core 0, 16x16 64 B)"
  echo "| workers | req/s | p99 µs | runs |"; echo "|---|---|---|---|"
  : >"$OUT/workers.jsonl"
  for w in 1 2 3 4 8; do
    start_broker 1 --workers "$w"
    r=$(point 0 --clients 16 --window 16 --size 64)
    stop_server
    echo "{\"workers\": $w, \"handler\": \"echo\", \"result\": $r}" >>"$OUT/workers.jsonl"
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'| $w | {r[\"throughput_rps\"]:.0f} | {r[\"p99_us\"]} | {r[\"runs\"]} |')" "$r"
  done
  echo; echo "## throughput vs --workers (cpu handler, 20000 rounds, unpinned, 8x4)"
  echo "| workers | req/s | p99 µs | runs |"; echo "|---|---|---|---|"
  for w in 1 2 3 4; do
    start_broker 0,1 --workers "$w" --handler cpu --cpu-rounds 20000
    r=$(point 0,1 --clients 8 --window 4 --size 64 --no-verify)
    stop_server
    echo "{\"workers\": $w, \"handler\": \"cpu\", \"result\": $r}" >>"$OUT/workers.jsonl"
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'| $w | {r[\"throughput_rps\"]:.0f} | {r[\"p99_us\"]} | {r[\"runs\"]} |')" "$r"
  done
}

clients() {
  echo "## throughput and latency vs connections (window 4, 64 B, 2 workers; server core 1, client core 0)"
  echo "| clients | req/s | p50 µs | p99 µs | p99.9 µs |"; echo "|---|---|---|---|---|"
  start_broker 1 --workers 2
  : >"$OUT/clients.jsonl"
  for c in 1 10 100 1000; do
    r=$(point 0 --clients "$c" --window 4 --size 64)
    echo "{\"clients\": $c, \"result\": $r}" >>"$OUT/clients.jsonl"
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'| $c | {r[\"throughput_rps\"]:.0f} | {r[\"p50_us\"]} | {r[\"p99_us\"]} | {r[\"p999_us\"]} |')" "$r"
  done
  stop_server
  "$PY" scripts/plot.py "$OUT/clients.jsonl" "$OUT/clients.png"
}

sizes() {
  echo "## throughput vs message size (4 clients x window 4, 2 workers; server core 1, client core 0)"
  echo "| size | req/s | MiB/s each way | p99 µs |"; echo "|---|---|---|---|"
  start_broker 1 --workers 2
  : >"$OUT/sizes.jsonl"
  for s in 64 1024 16384 262144 1048576; do
    r=$(point 0 --clients 4 --window 4 --size "$s")
    echo "{\"size\": $s, \"result\": $r}" >>"$OUT/sizes.jsonl"
    python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'| $s | {r[\"throughput_rps\"]:.0f} | {r[\"throughput_rps\"]*$s/1048576:.1f} | {r[\"p99_us\"]} |')" "$r"
  done
  stop_server
}

memory() {
  # Two descriptors per connection: 8,000 fit the 20,000 hard limit of these machines.
  local n=${IDLE_CLIENTS:-8000}
  echo "## resident memory with $n idle connections (2 workers)"
  start_broker 0,1 --workers 2 --max-connections "$n"
  before=$(python3 -c "
import urllib.request
t = urllib.request.urlopen('http://$ADMIN/metrics').read().decode()
print([l.split()[1] for l in t.splitlines() if l.startswith('process_resident_memory_bytes')][0])")
  # One process per 5000 connections: each needs two fds per socket (TCP + mailbox).
  local per=5000 holders=() i
  for ((i = 0; i * per < n; i++)); do
    local m=$((n - i * per < per ? n - i * per : per))
    "$PY" scripts/idle_clients.py "$ENDPOINT" "$m" < <(exec sleep 600 2>/dev/null) >"$OUT/idle-$i.out" 2>&1 &
    holders+=($!)
  done
  for ((i = 0; i < ${#holders[@]}; i++)); do
    for _ in $(seq 1200); do grep -q ready "$OUT/idle-$i.out" 2>/dev/null && break; sleep 0.1; done
    grep -q ready "$OUT/idle-$i.out" || { cat "$OUT/idle-$i.out" >&2; exit 1; }
  done
  after=$(python3 -c "
import urllib.request
t = urllib.request.urlopen('http://$ADMIN/metrics').read().decode()
print([l.split()[1] for l in t.splitlines() if l.startswith('process_resident_memory_bytes')][0])")
  kill "${holders[@]}" 2>/dev/null || true
  pkill -P $$ -x sleep 2>/dev/null || true
  wait "${holders[@]}" 2>/dev/null || true
  stop_server
  python3 -c "
b, a, n = float('$before'), float('$after'), $n
print(f'| idle | with {n} connections | per connection |'); print('|---|---|---|')
print(f'| {b/2**20:.1f} MiB | {a/2**20:.1f} MiB | {(a-b)/n/1024:.1f} KiB |')" | tee "$OUT/memory.md"
}

case ${1:-all} in
  workers) workers ;; clients) clients ;; sizes) sizes ;; memory) memory ;;
  all) workers; echo; clients; echo; sizes; echo; memory ;;
  *) echo "usage: $0 [workers|clients|sizes|memory|all]" >&2; exit 2 ;;
esac
