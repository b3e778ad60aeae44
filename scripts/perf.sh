#!/usr/bin/env bash
# Performance measurements of the release binary on this machine:
#   workers   throughput vs --workers (echo, server pinned to core 1; cpu handler unpinned)
#   clients   throughput and p99 vs connections (1 to 1000)
#   sizes     throughput and p99 vs message size (64 B to 1 MiB)
#   memory    resident memory per idle connection with 8,000 connected clients
#   overload  open-loop load with client deadlines (issue 20): `--workers 2 --handler sleep`,
#             10 ms and 100 ms handlers, offered 2x, 5x and 20x capacity, by the C client
#             benches/c/overload.c; goodput, late OK replies, ERR p99, recovery
#   account   where the time goes (issue 23), broker vs c-proxy-dealer, throughput and
#             latency case: callgrind instructions per request by thread and function,
#             perf stat syscalls and context switches per request by thread, and a
#             perf record -e cpu-clock profile; the summary by scripts/account_report.py
# workers/clients/sizes: `broker bench`, medians of RUNS runs of SECONDS_PER_RUN s; results in
# target/perf/*.jsonl and tables on stdout; scripts/plot.py draws target/perf/clients.png.
#   scripts/perf.sh [workers|clients|sizes|memory|all|overload|account]   (all: the first four)
# overload: OVERLOAD_SECS (20) of load per point, OVERLOAD_DEADLINE_MS (1000, both handler
# times), OVERLOAD_HEADER (1, the default: send the deadline header; 0: leave it out, for a
# broker that does not know it), OVERLOAD_DRAIN (25 s of collecting late replies and of recovery
# probing). Every run ends by itself: at most OVERLOAD_SECS + OVERLOAD_DRAIN + 15 s per point.
# account: fixed request counts after a warm-up (a tenth as many) and a pause (3 s for
# callgrind, whose zeroing is slow, 1 s for perf) in which the counters start: ACCOUNT_REQUESTS (60000) and ACCOUNT_REQUESTS_LATENCY (4000) under
# callgrind, ACCOUNT_NATIVE_REQUESTS (1000000) and ACCOUNT_NATIVE_REQUESTS_LATENCY (50000)
# for perf stat and perf record (enabled and disabled through perf's control fifo). Installs
# valgrind and linux-perf from Debian if missing.
# The comparison with libzmq's proxies and the talk's pyzmq server is scripts/compare.sh.
set -euo pipefail
set +m # no job control: servers are started with setsid (spawn_group)
cd "$(dirname "$0")/.."
. scripts/lib.sh
RUNS=${RUNS:-3}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-3}
OUT=target/perf
mkdir -p "$OUT"
LOG=$OUT/perf.log
ulimit -n 65536 2>/dev/null || true
MODE=${1:-all}
case $MODE in
  workers | clients | sizes | memory | all | overload | account) ;;
  *) echo "usage: $0 [workers|clients|sizes|memory|all|overload|account]" >&2; exit 2 ;;
esac
cargo build --release --locked -q -p broker
BIN=$PWD/target/release/broker
CB=target/cbench
benches/c/build.sh
ensure_perf_venv matplotlib
PY=$PERF_PY

SERVER_PID=
stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  stop_group "$SERVER_PID" "${1:-15}" 2>>"$LOG"
  SERVER_PID=
}
HOLDERS=()
LG_PID='' PERF_PID='' # the account's load client and perf session while they run
# shellcheck disable=SC2317 # called from the trap
cleanup() {
  local h
  for h in "${HOLDERS[@]}"; do stop_group "$h" 5; done
  for h in $LG_PID $PERF_PID; do kill -INT "$h" 2>/dev/null || true; done
  stop_server
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# start_broker CPUS ARGS...: the broker (taskset -c CPUS) on free ports, with ARGS as its only
# flags besides the endpoints; sets ENDPOINT, ADMIN, SERVER_PID. Exits 1 if it is not ready
# within 20 s.
start_broker() {
  local cpus=$1
  shift
  ENDPOINT=tcp://127.0.0.1:$(free_port)
  ADMIN=127.0.0.1:$(free_port)
  echo "== taskset -c $cpus $BIN --frontend $ENDPOINT --admin $ADMIN $*" >>"$LOG"
  spawn_group "$LOG" taskset -c "$cpus" "$BIN" --frontend "$ENDPOINT" --admin "$ADMIN" "$@"
  SERVER_PID=$SPAWNED_PID
  wait_http_ok "http://$ADMIN/readyz" "$SERVER_PID" 20 || { echo "perf: broker did not start (see $LOG)" >&2; exit 1; }
}

# The curves' broker: room for everything the bench offers.
start_bench_broker() {
  local cpus=$1
  shift
  start_broker "$cpus" --max-inflight 100000 --max-message-bytes 2MiB \
    --max-connection-bytes 8MiB --log-level warn "$@"
}

# point CLIENT_CPUS BENCH_ARGS...: median over RUNS of one bench configuration, as JSON.
point() {
  local cpus=$1
  shift
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

# row JSON FORMAT: prints FORMAT (a Python f-string over r, the point's JSON) as a table row.
row() { python3 -c "import json,sys; r=json.loads(sys.argv[1]); print(f'$2')" "$1"; }

workers() {
  echo "## throughput vs --workers (echo: server on core 1, client on core 0, 16x16 64 B)"
  echo "| workers | req/s | p99 µs | runs |"; echo "|---|---|---|---|"
  : >"$OUT/workers.jsonl"
  local w r
  for w in 1 2 3 4 8; do
    start_bench_broker 1 --workers "$w"
    r=$(point 0 --clients 16 --window 16 --size 64)
    stop_server
    echo "{\"workers\": $w, \"handler\": \"echo\", \"result\": $r}" >>"$OUT/workers.jsonl"
    row "$r" "| $w | {r[\"throughput_rps\"]:.0f} | {r[\"p99_us\"]} | {r[\"runs\"]} |"
  done
  echo; echo "## throughput vs --workers (cpu handler, 20000 rounds, unpinned, 8x4)"
  echo "| workers | req/s | p99 µs | runs |"; echo "|---|---|---|---|"
  for w in 1 2 3 4; do
    start_bench_broker 0,1 --workers "$w" --handler cpu --cpu-rounds 20000
    r=$(point 0,1 --clients 8 --window 4 --size 64 --no-verify)
    stop_server
    echo "{\"workers\": $w, \"handler\": \"cpu\", \"result\": $r}" >>"$OUT/workers.jsonl"
    row "$r" "| $w | {r[\"throughput_rps\"]:.0f} | {r[\"p99_us\"]} | {r[\"runs\"]} |"
  done
}

clients() {
  echo "## throughput and latency vs connections (window 4, 64 B, 2 workers; server core 1, client core 0)"
  echo "| clients | req/s | p50 µs | p99 µs | p99.9 µs |"; echo "|---|---|---|---|---|"
  start_bench_broker 1 --workers 2
  : >"$OUT/clients.jsonl"
  local c r
  for c in 1 10 100 1000; do
    r=$(point 0 --clients "$c" --window 4 --size 64)
    echo "{\"clients\": $c, \"result\": $r}" >>"$OUT/clients.jsonl"
    row "$r" "| $c | {r[\"throughput_rps\"]:.0f} | {r[\"p50_us\"]} | {r[\"p99_us\"]} | {r[\"p999_us\"]} |"
  done
  stop_server
  "$PY" scripts/plot.py "$OUT/clients.jsonl" "$OUT/clients.png"
}

sizes() {
  echo "## throughput vs message size (4 clients x window 4, 2 workers; server core 1, client core 0)"
  echo "| size | req/s | MiB/s each way | p99 µs |"; echo "|---|---|---|---|"
  start_bench_broker 1 --workers 2
  : >"$OUT/sizes.jsonl"
  local s r
  for s in 64 1024 16384 262144 1048576; do
    r=$(point 0 --clients 4 --window 4 --size "$s")
    echo "{\"size\": $s, \"result\": $r}" >>"$OUT/sizes.jsonl"
    row "$r" "| $s | {r[\"throughput_rps\"]:.0f} | {r[\"throughput_rps\"]*$s/1048576:.1f} | {r[\"p99_us\"]} |"
  done
  stop_server
}

resident() {
  python3 -c "
import urllib.request
t = urllib.request.urlopen('http://$ADMIN/metrics').read().decode()
print([l.split()[1] for l in t.splitlines() if l.startswith('process_resident_memory_bytes')][0])"
}

memory() {
  # Two descriptors per connection: 8,000 fit the 20,000 hard limit of these machines.
  local n=${IDLE_CLIENTS:-8000}
  echo "## resident memory with $n idle connections (2 workers)"
  start_bench_broker 0,1 --workers 2 --max-connections "$n"
  local before after i
  before=$(resident)
  # One process per 5000 connections: each needs two fds per socket (TCP + mailbox). Each
  # holds its connections until its stdin (a sleep in the same process group) ends.
  local per=5000
  for ((i = 0; i * per < n; i++)); do
    local m=$((n - i * per < per ? n - i * per : per))
    : >"$OUT/idle-$i.out"
    spawn_group "$OUT/idle-$i.out" bash -c "sleep 600 | exec '$PY' scripts/idle_clients.py '$ENDPOINT' $m"
    HOLDERS+=("$SPAWNED_PID")
  done
  for ((i = 0; i < ${#HOLDERS[@]}; i++)); do
    for _ in $(seq 1200); do grep -q ready "$OUT/idle-$i.out" 2>/dev/null && break; sleep 0.1; done
    grep -q ready "$OUT/idle-$i.out" || { cat "$OUT/idle-$i.out" >&2; exit 1; }
  done
  after=$(resident)
  for i in "${HOLDERS[@]}"; do stop_group "$i" 5; done
  HOLDERS=()
  stop_server
  python3 -c "
b, a, n = float('$before'), float('$after'), $n
print(f'| idle | with {n} connections | per connection |'); print('|---|---|---|')
print(f'| {b/2**20:.1f} MiB | {a/2**20:.1f} MiB | {(a-b)/n/1024:.1f} KiB |')" | tee "$OUT/memory.md"
}

# ---- overload (issue 20) ----------------------------------------------------------------
overload() {
  local secs=${OVERLOAD_SECS:-20} deadline=${OVERLOAD_DEADLINE_MS:-1000}
  local header=${OVERLOAD_HEADER:-1} drain=${OVERLOAD_DRAIN:-25}
  local v
  for v in secs deadline header drain; do
    [[ ${!v} =~ ^[0-9]+$ ]] || { echo "perf: overload: $v must be a whole number" >&2; exit 2; }
  done
  local jsonl ms mult capacity rate out
  jsonl=$OUT/overload-$(date -u +%Y%m%dT%H%M%SZ).jsonl
  local client_flags=()
  [[ $header == 1 ]] || client_flags+=(--no-header)
  : >"$jsonl"
  echo "overload: $(lscpu | sed -n 's/^Model name: *//p' | head -1), load average $(cut -d' ' -f1-3 /proc/loadavg);" \
    "${secs} s per point, deadline ${deadline} ms, header $([[ $header == 1 ]] && echo on || echo off)" >&2
  for ms in 10 100; do
    for mult in 2 5 20; do
      capacity=$((2 * 1000 / ms)) # 2 workers / service time
      rate=$((mult * capacity))
      echo "overload: ${ms} ms handler, ${mult}x capacity = ${rate} req/s for ${secs} s" >&2
      # Broker defaults except the pool and the handler; the shutdown flags act only after
      # the measurement, so that a backlog left behind does not hold the next point up.
      start_broker 1 --workers 2 --handler sleep --shutdown-delay 0s --drain-timeout 1s
      out=$(timeout $((secs + drain + 15)) "$CB/overload" --endpoint "$ENDPOINT" --rate "$rate" \
        --clients 20 --duration "$secs" --deadline-ms "$deadline" --body "$ms" \
        --drain "$drain" --recovery-timeout "$drain" --cpu 0 "${client_flags[@]}" 2>>"$LOG") \
        || { echo "perf: overload client failed at ${ms} ms ${mult}x (see $LOG)" >&2; exit 1; }
      stop_server
      printf '{"handler_ms": %s, "multiple": %s, "capacity_rps": %s, "result": %s}\n' \
        "$ms" "$mult" "$capacity" "$out" >>"$jsonl"
    done
  done
  python3 scripts/overload_report.py "$jsonl" | tee "${jsonl%.jsonl}.md"
}

# ---- account (issue 23) -----------------------------------------------------------------
# account_server NAME CPU [WRAPPER...]: starts broker or c-proxy-dealer pinned to CPU, under
# WRAPPER (valgrind) if given; sets ENDPOINT, SERVER_PID and RAW (client flag).
account_server() {
  local name=$1 cpu=$2
  shift 2
  ENDPOINT=tcp://127.0.0.1:$(free_port)
  ADMIN=127.0.0.1:$(free_port)
  local argv
  case $name in
    broker) argv=("$BIN" --workers 2 --frontend "$ENDPOINT" --admin "$ADMIN"); RAW=() ;;
    c-proxy-dealer) argv=("$CB/proxy" --endpoint "$ENDPOINT" --workers 2 --worker dealer); RAW=(--raw) ;;
  esac
  echo "== taskset -c $cpu $* ${argv[*]}" >>"$LOG"
  spawn_group "$LOG" taskset -c "$cpu" "$@" "${argv[@]}"
  SERVER_PID=$SPAWNED_PID
  local ok
  if [[ $name == broker ]]; then
    wait_http_ok "http://$ADMIN/readyz" "$SERVER_PID" 60 && ok=1 || ok=0
  else
    wait_tcp "${ENDPOINT##*:}" "$SERVER_PID" 60 && ok=1 || ok=0
  fi
  ((ok)) || { echo "perf: account: $name did not start (see $LOG)" >&2; exit 1; }
}

# phase_run DIR/PREFIX N LOAD...: runs loadgen against ENDPOINT with a warm-up of N/10
# requests, a pause and then exactly N requests; calls the function named in ON_START (in the
# pause, once the warm-up is answered) and ON_END (once the N are answered). The loadgen's
# JSON goes to PREFIX.loadgen.json. Exits 1 if the warm-up never comes or loadgen fails.
phase_run() {
  local prefix=$1 n=$2 i
  shift 2
  "$CB/loadgen" --endpoint "$ENDPOINT" "$@" "${RAW[@]}" --warmup 0 --duration 600 \
    --warmup-requests $((n / 10)) --pause "$PAUSE" --requests "$n" \
    >"$prefix.loadgen.json" 2>"$prefix.loadgen.err" &
  LG_PID=$!
  for ((i = 0; i < 1200; i++)); do
    grep -q "warmed up" "$prefix.loadgen.err" && break
    kill -0 "$LG_PID" 2>/dev/null || break
    sleep 0.1
  done
  grep -q "warmed up" "$prefix.loadgen.err" || { echo "perf: account: no warm-up (see $prefix.loadgen.err)" >&2; exit 1; }
  local started=${EPOCHREALTIME/./}
  "$ON_START"
  # The phase begins when the pause ends: the counters must be running by then.
  if (((${EPOCHREALTIME/./} - started) / 1000 >= PAUSE * 1000)); then
    echo "perf: account: the counters started after the pause ended" >&2
    exit 1
  fi
  wait "$LG_PID" || { echo "perf: account: loadgen failed (see $prefix.loadgen.err)" >&2; exit 1; }
  LG_PID=
  "$ON_END"
}

# perf_ctl COMMAND: sends enable/disable to the perf session on fds 8 (control) and 9 (ack).
perf_ctl() {
  local ack
  echo "$1" >&8
  if ! read -r -t 10 ack <&9 || [[ $ack != ack* ]]; then
    echo "perf: account: perf did not acknowledge $1" >&2
    exit 1
  fi
}

# The three ways a phase is measured: callgrind's counters, perf stat, perf record.
cg_start() { callgrind_control -z "$SERVER_PID" >>"$LOG" 2>&1; }
cg_end() { callgrind_control -d "$SERVER_PID" >>"$LOG" 2>&1; }
# CPU time comes from the record run's /proc snapshots: counting tracepoints (perf stat) costs
# the server time per syscall, sampling at 999 Hz next to nothing. The stat run's snapshots
# give the span its counters ran.
stat_start() { proc_snapshot "$SERVER_PID" >"$PREFIX.proc"; perf_ctl enable; }
stat_end() { perf_ctl disable; proc_snapshot "$SERVER_PID" >>"$PREFIX.proc"; }
record_start() { proc_snapshot "$SERVER_PID" >"$PREFIX.proc"; perf_ctl enable; }
record_end() { perf_ctl disable; proc_snapshot "$SERVER_PID" >>"$PREFIX.proc"; }

# perf_session PREFIX PERF-ARGS...: starts perf (stat or record) on the server, disabled, with
# its control fifos on fds 8 and 9; sets PERF_PID.
perf_session() {
  local prefix=$1
  shift
  rm -f "$prefix.ctl" "$prefix.ack"
  mkfifo "$prefix.ctl" "$prefix.ack"
  exec 8<>"$prefix.ctl" 9<>"$prefix.ack"
  perf "$@" -D -1 --control "fifo:$prefix.ctl,$prefix.ack" -p "$SERVER_PID" >/dev/null 2>>"$LOG" &
  PERF_PID=$!
}

perf_session_end() {
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=
  exec 8>&- 9>&-
  rm -f "$PREFIX.ctl" "$PREFIX.ack"
}

account() {
  ensure_tool valgrind valgrind
  ensure_tool perf linux-perf
  local dir case server load n native scpu ccpu t
  dir=$OUT/account-$(date -u +%Y%m%dT%H%M%SZ)
  mkdir -p "$dir"
  local events=raw_syscalls:sys_enter,context-switches
  for t in poll getpid read write futex getsockopt epoll_wait epoll_ctl sendto recvfrom \
    sched_yield pread64 clock_nanosleep; do
    events+=,syscalls:sys_enter_$t
  done
  {
    echo "machine: $(lscpu | sed -n 's/^Model name: *//p' | head -1), $(nproc) CPUs, kernel $(uname -r)"
    echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "broker: $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet HEAD -- broker shared worker 2>/dev/null || echo ' (modified)')"
  } >"$dir/machine.txt"
  for case in throughput latency; do
    if [[ $case == throughput ]]; then
      load=(--clients 16 --window 16 --size 64 --threads 2); scpu=1; ccpu=0
      n=${ACCOUNT_REQUESTS:-60000} native=${ACCOUNT_NATIVE_REQUESTS:-1000000}
    else
      load=(--clients 1 --window 1 --size 64 --threads 1); scpu=0; ccpu=0
      n=${ACCOUNT_REQUESTS_LATENCY:-4000} native=${ACCOUNT_NATIVE_REQUESTS_LATENCY:-50000}
    fi
    for server in broker c-proxy-dealer; do
      echo "account: $case / $server: callgrind, $n requests" >&2
      PREFIX=$dir/cg-$case-$server
      mkdir -p "$PREFIX"
      account_server "$server" "$scpu" valgrind --tool=callgrind --separate-threads=yes \
        --callgrind-out-file="$PREFIX/callgrind.out.%p"
      PAUSE=3 ON_START=cg_start ON_END=cg_end phase_run "$PREFIX/phase" "$n" "${load[@]}" --cpu "$ccpu"
      mv "$PREFIX/phase.loadgen.json" "$PREFIX/loadgen.json"
      stop_server 30

      echo "account: $case / $server: perf stat, $native requests" >&2
      PREFIX=$dir/stat-$case-$server
      account_server "$server" "$scpu"
      perf_session "$PREFIX" stat -e "$events" --per-thread -x, -o "$PREFIX.csv"
      PAUSE=1 ON_START=stat_start ON_END=stat_end phase_run "$PREFIX" "$native" "${load[@]}" --cpu "$ccpu"
      perf_session_end
      stop_server

      echo "account: $case / $server: perf record, $native requests" >&2
      PREFIX=$dir/perf-$case-$server
      account_server "$server" "$scpu"
      perf_session "$PREFIX" record -e cpu-clock -F 999 -g -o "$PREFIX.data"
      PAUSE=1 ON_START=record_start ON_END=record_end phase_run "$PREFIX" "$native" "${load[@]}" --cpu "$ccpu"
      perf_session_end
      stop_server
      perf report -i "$PREFIX.data" --no-children --sort comm,dso --stdio -g none \
        >"$PREFIX.dso.txt" 2>>"$LOG"
      perf report -i "$PREFIX.data" --no-children --sort comm,sym --stdio -g none \
        >"$PREFIX.sym.txt" 2>>"$LOG"
    done
  done
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$dir/machine.txt"
  python3 scripts/account_report.py "$dir" | tee "$dir/account.md"
}

case $MODE in
  workers) workers ;; clients) clients ;; sizes) sizes ;; memory) memory ;;
  all) workers; echo; clients; echo; sizes; echo; memory ;;
  overload) overload ;;
  account) account ;;
esac
