#!/usr/bin/env bash
# The broker next to libzmq's own limits, measured by an independent C load client
# (benches/c/loadgen.c, system libzmq, no code shared with the broker), in one run.
#
# Servers, each started fresh on free 127.0.0.1 ports and stopped with SIGTERM after its run:
#   broker             target/release/broker --workers 2 (+ $BROKER_ARGS): defaults, metrics
#                      and the memory guard on
#   broker-no-metrics  the same with BROKER_NO_METRICS=true
#   c-proxy            benches/c/proxy.c: ROUTER -> zmq_proxy -> inproc DEALER -> 2 REP workers
#   c-proxy-dealer     the same with 2 plain DEALER echo workers that send back exactly what
#                      they read (client runs --raw): the least work libzmq's pool can do
#   router-echo        benches/c/router_echo.c: one ROUTER echoing on one thread (no hop)
#   pyzmq-talk         scripts/talk_server.py: one pyzmq REP socket (client runs --raw)
#   broker-curve       the broker with --curve-secret-key-file (CURVE on the front socket)
#   c-proxy-curve      the C proxy with its front a CURVE server: libzmq's own cost of CURVE
# (keys for the -curve servers come from pyzmq; CURVE=0 leaves them out)
#
# Cases and pinnings (server CPU / client CPU), each case on both CPUs:
#   throughput 16 x 16 x 64 B      1/0 and 0/1
#   latency     1 x  1 x 64 B      0/0 and 1/1 (both on one CPU: on 2 cores, unpinned latency
#                                  is noise)
#   large       4 x  4 x 64 KiB    1/0 and 0/1
# The baselines, router-echo and pyzmq-talk run on every pinning; broker-no-metrics, the
# CURVE pair and `broker bench` on router-echo on the first pinning of a case only.
# Runs are interleaved: every round visits every case, pinning and server (in a rotated
# order), so slow drift of the machine hits all alike. Tables hold medians over rounds.
#
# Per run, besides the client's figures: the server's CPU seconds per request (utime + stime
# from /proc/PID/stat over the measured window, all threads), its context switches per request
# (voluntary + involuntary over /proc/PID/task/*/status), per thread, and what the rest of the
# machine ran meanwhile (busy ticks of /proc/stat less server and client), so a run taken
# while others compiled says so. Syscalls per request come from a separate counting run per
# case and server after the rounds (perf stat -e raw_syscalls:sys_enter --per-thread on the
# server, COUNT_SECS long, first pinning), so counting never slows a timed run.
#
# The report (scripts/compare_report.py) prints per case and pinning the tables, the ratio
# RANGE of each target of issue 23 over baselines x pinnings, and these soundness checks:
#   router-echo / c-proxy >= 1.5 per pinning: the client can drive well past the baseline
#     pool, so it is not what limits the numbers (else they mean nothing);
#   broker bench / C client on router-echo >= 0.8: the project's own Rust load tool agrees;
#   the C client's own CPU is not saturated in a run whose ratio is claimed.
# Raw results go to target/perf/compare-<stamp>.jsonl, the report to .md, a summary to
# -summary.json.
#
#   scripts/compare.sh            ROUNDS=3 SECS=5 WARMUP=1 C_THREADS=2 COUNT_SECS=2 by default;
#                                 extra broker flags in BROKER_ARGS (e.g. "--max-inflight 1024")
#   ROUNDS=1 SECS=1 COUNT_SECS=0 scripts/compare.sh      a smoke run (COUNT_SECS=0: no counts)
#   BROKER_BIN=/path/to/broker scripts/compare.sh        another build (then nothing is built)
# Exit 1 if any server lost or garbled a reply, did not start or answer, or the broker did
# not build; 2 on a bad setting.
set -euo pipefail
set +m # no job control: servers are started with setsid, see spawn_group
cd "$(dirname "$0")/.."
. scripts/lib.sh

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
WARMUP=${WARMUP:-1}
C_THREADS=${C_THREADS:-2} # loop threads of the C client (measured: 2 beat 1 by ~10% on one CPU)
COUNT_SECS=${COUNT_SECS:-2}
CURVE=${CURVE:-1}
BROKER_ARGS=${BROKER_ARGS:-}
for v in ROUNDS SECS WARMUP C_THREADS COUNT_SECS CURVE; do
  [[ ${!v} =~ ^[0-9]+$ ]] || { echo "compare: $v must be a whole number, not '${!v}'" >&2; exit 2; }
done
((ROUNDS >= 1 && SECS >= 1)) || { echo "compare: ROUNDS and SECS must be at least 1" >&2; exit 2; }
OUT=target/perf
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSONL=$OUT/compare-$STAMP.jsonl
MD=$OUT/compare-$STAMP.md
LOG=$OUT/compare-$STAMP.log
CB=target/cbench
BIN=${BROKER_BIN:-target/release/broker}
mkdir -p "$OUT"
: >"$JSONL"
: >"$LOG"
ulimit -n 65536 2>/dev/null || true
say() { echo "compare: $*" >&2; }

# ---- build ---------------------------------------------------------------------------
benches/c/build.sh
BROKER_OK=1
if [[ -n ${BROKER_BIN:-} ]]; then
  [[ -x $BIN ]] || { BROKER_OK=0; say "BROKER_BIN=$BIN is not an executable"; }
elif ! cargo build --release --locked -q -p broker 2>>"$LOG"; then
  BROKER_OK=0
  say "BROKER DID NOT BUILD (see $LOG): its rows are skipped, exit status will be 1"
fi
ensure_perf_venv # pyzmq only
PY=$PERF_PY
if ((COUNT_SECS > 0)); then
  ensure_tool perf linux-perf
  if ! perf stat -e raw_syscalls:sys_enter -- true >/dev/null 2>&1; then
    say "perf cannot count the raw_syscalls:sys_enter tracepoint here: no syscall counts"
    COUNT_SECS=0
  fi
fi
KEYS=$(mktemp -d)
if [[ $CURVE == 1 ]]; then
  # Server and client key pairs (Z85), made by pyzmq: nothing of the broker's is involved.
  read -r SERVER_PUBLIC SERVER_SECRET CLIENT_PUBLIC CLIENT_SECRET < <("$PY" -c '
import zmq
print(*(k.decode() for _ in range(2) for k in zmq.curve_keypair()))')
  printf 'secret-key = "%s"\n' "$SERVER_SECRET" >"$KEYS/server.key"
fi

# ---- servers -------------------------------------------------------------------------
SERVER_PID=
SAMPLER_PID=
SERVER_RC=
# shellcheck disable=SC2317 # called from the trap
cleanup() {
  [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
  stop_server
  rm -rf "$KEYS"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  stop_group "$SERVER_PID" 15 2>>"$LOG"
  SERVER_RC=$STOPPED_RC
  SERVER_PID=
}

# start_server NAME CPU: sets ENDPOINT, SERVER_ARGV, SERVER_PID; returns 1 if it does not
# become ready within 20 s.
start_server() {
  local name=$1 cpu=$2 admin=
  ENDPOINT=tcp://127.0.0.1:$(free_port)
  case $name in
    broker | broker-no-metrics | broker-curve)
      admin=127.0.0.1:$(free_port)
      SERVER_ARGV=(taskset -c "$cpu" "$BIN" --workers 2 --frontend "$ENDPOINT" --admin "$admin")
      # shellcheck disable=SC2206 # BROKER_ARGS is a list of flags, split on purpose
      [[ -n $BROKER_ARGS ]] && SERVER_ARGV+=($BROKER_ARGS)
      [[ $name == broker-no-metrics ]] && SERVER_ARGV=(env BROKER_NO_METRICS=true "${SERVER_ARGV[@]}")
      [[ $name == broker-curve ]] && SERVER_ARGV+=(--curve-secret-key-file "$KEYS/server.key")
      ;;
    c-proxy) SERVER_ARGV=("$CB/proxy" --endpoint "$ENDPOINT" --workers 2 --cpu "$cpu") ;;
    c-proxy-dealer) SERVER_ARGV=("$CB/proxy" --endpoint "$ENDPOINT" --workers 2 --worker dealer
      --cpu "$cpu") ;;
    c-proxy-curve) SERVER_ARGV=("$CB/proxy" --endpoint "$ENDPOINT" --workers 2 --cpu "$cpu"
      --curve-secret-key "$SERVER_SECRET") ;;
    router-echo) SERVER_ARGV=("$CB/router_echo" --endpoint "$ENDPOINT" --cpu "$cpu") ;;
    pyzmq-talk) SERVER_ARGV=(taskset -c "$cpu" "$PY" scripts/talk_server.py "$ENDPOINT") ;;
  esac
  echo "== $name: ${SERVER_ARGV[*]}" >>"$LOG"
  # env and taskset exec the server, so SERVER_PID is the server's own pid.
  spawn_group "$LOG" "${SERVER_ARGV[@]}"
  SERVER_PID=$SPAWNED_PID
  if [[ -n $admin ]]; then
    wait_http_ok "http://$admin/readyz" "$SERVER_PID" 20
  else
    wait_tcp "${ENDPOINT##*:}" "$SERVER_PID" 20
  fi
}

# sample_server FILE CPU: two snapshots of the server (proc_snapshot) bracketing the client's
# measured window (WARMUP, then SECS), one JSON line each, into FILE; runs on CPU (the
# client's), in the background.
sample_server() {
  local file=$1 cpu=$2 pid=$SERVER_PID
  (
    sleep "$WARMUP"
    taskset -c "$cpu" bash -c ". scripts/lib.sh; proc_snapshot $pid" >"$file"
    sleep "$SECS"
    taskset -c "$cpu" bash -c ". scripts/lib.sh; proc_snapshot $pid" >>"$file"
  ) &
  SAMPLER_PID=$!
}

# count_syscalls FILE: perf stat's raw_syscalls:sys_enter per server thread over COUNT_SECS
# after the warm-up, CSV into FILE, in the background.
count_syscalls() {
  local file=$1 pid=$SERVER_PID
  (
    sleep "$WARMUP"
    perf stat -e raw_syscalls:sys_enter --per-thread -x, -o "$file" -p "$pid" -- sleep "$COUNT_SECS" \
      >/dev/null 2>>"$LOG" || true
  ) &
  SAMPLER_PID=$!
}

# record: one JSON line from the named values below (strings; "measures" is a file holding
# the sampler's output, "out" the client's).
record() {
  python3 - "$@" >>"$JSONL" <<'EOF'
import json, sys

a = dict(arg.split("=", 1) for arg in sys.argv[1:])
def load(text):
    try:
        return json.loads(text) if text.strip() else None
    except ValueError:
        return None
out = a.get("out", "")
result = load(out)
row = {
    "round": int(a["round"]), "mode": a["mode"], "case": a["case"], "pin": a["pin"],
    "server": a["server"], "server_cmd": a.get("scmd", ""), "client_cmd": a.get("ccmd", ""),
    "client_rc": int(a["crc"]) if a.get("crc") else None,
    "server_rc": int(a["src"]) if a.get("src") else None,
    "note": a.get("note") or None, "result": result,
    "raw_output": None if result is not None else out[-2000:],
}
m = a.get("measures")
if m:
    text = open(m).read()
    if a["mode"] == "count":
        threads = {}
        for line in text.splitlines():
            parts = line.split(",")
            # perf stat -x, --per-thread: "comm-tid,count,unit,event,..."
            if len(parts) > 3 and parts[3].startswith("raw_syscalls:sys_enter"):
                name = parts[0].rsplit("-", 1)[0]
                if parts[1].isdigit():
                    threads[name] = threads.get(name, 0) + int(parts[1])
        row["syscalls_by_thread"] = threads or None
        row["syscalls"] = sum(threads.values()) if threads else None
        row["count_s"] = float(a["count_s"])
    else:
        snaps = [load(l) for l in text.splitlines() if l.strip()]
        row["snapshots"] = snaps if len(snaps) == 2 and all(snaps) else None
        row["window_s"] = float(a["window_s"])
        row["clk_tck"] = int(a["clk_tck"])
print(json.dumps(row))
EOF
}

# ---- cases ---------------------------------------------------------------------------
# Load per case (clients window size), pinnings (server/client CPU), the servers run on every
# pinning, and those run on the first pinning only.
declare -A LOAD=([throughput]="16 16 64" [latency]="1 1 64" [large]="4 4 65536")
declare -A PINS=([throughput]="1/0 0/1" [latency]="0/0 1/1" [large]="1/0 0/1")
declare -A EVERY=(
  [throughput]="broker c-proxy c-proxy-dealer router-echo pyzmq-talk"
  [latency]="broker c-proxy c-proxy-dealer router-echo pyzmq-talk"
  [large]="broker c-proxy c-proxy-dealer router-echo"
)
declare -A FIRST=([throughput]="broker-no-metrics broker-bench-on-router-echo" [latency]="" [large]="")
if [[ $CURVE == 1 ]]; then
  FIRST[throughput]+=" broker-curve c-proxy-curve"
  FIRST[latency]+=" broker-curve c-proxy-curve"
fi
CASES=(throughput latency large)
CLK_TCK=$(getconf CLK_TCK)

# run_one ROUND MODE CASE PIN SERVER: one server started, loaded, stopped; MODE "timed"
# (ROUNDS of SECS) or "count" (the syscall count, COUNT_SECS).
run_one() {
  local round=$1 mode=$2 case=$3 pin=$4 server=$5
  local clients window size scpu=${pin%/*} ccpu=${pin#*/} secs=$SECS
  read -r clients window size <<<"${LOAD[$case]}"
  [[ $mode == count ]] && secs=$COUNT_SECS
  local target=$server client_argv out crc=0 measures
  local base=(round="$round" mode="$mode" case="$case" pin="$pin" server="$server")
  if [[ $server == broker* && $BROKER_OK == 0 ]]; then
    record "${base[@]}" note="skipped: the broker did not build"
    return
  fi
  [[ $server == broker-bench-on-router-echo ]] && target=router-echo
  say "round $round/$ROUNDS $mode $case $pin: $server"
  SERVER_RC=
  if ! start_server "$target" "$scpu"; then
    stop_server
    record "${base[@]}" scmd="${SERVER_ARGV[*]}" src="$SERVER_RC" note="server did not become ready"
    say "  $server did not become ready (see $LOG)"
    return
  fi
  measures=$(mktemp)
  if [[ $server == broker-bench-on-router-echo ]]; then
    client_argv=(taskset -c "$ccpu" "$BIN" bench --endpoint "$ENDPOINT" --clients "$clients"
      --window "$window" --size "$size" --duration "${secs}s" --threads 2 --json)
  else
    client_argv=("$CB/loadgen" --endpoint "$ENDPOINT" --clients "$clients" --window "$window"
      --size "$size" --duration "$secs" --warmup "$WARMUP" --threads "$C_THREADS" --cpu "$ccpu"
      --drain 10) # a reply is lost only after 10 s: a stalled VM is not a lost reply
    [[ $server == pyzmq-talk || $server == c-proxy-dealer ]] && client_argv+=(--raw)
    [[ $server == *-curve ]] && client_argv+=(--curve-server-key "$SERVER_PUBLIC"
      --curve-public-key "$CLIENT_PUBLIC" --curve-secret-key "$CLIENT_SECRET")
    if [[ $mode == count ]]; then
      count_syscalls "$measures"
    else
      sample_server "$measures" "$ccpu"
    fi
  fi
  out=$(timeout $((WARMUP + secs + 40)) "${client_argv[@]}" 2>>"$LOG") || crc=$?
  if [[ -n $SAMPLER_PID ]]; then
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
  fi
  stop_server
  record "${base[@]}" scmd="${SERVER_ARGV[*]}" ccmd="${client_argv[*]}" crc="$crc" \
    src="$SERVER_RC" out="$out" measures="$measures" window_s="$secs" count_s="$secs" \
    clk_tck="$CLK_TCK"
  rm -f "$measures"
  [[ $crc == 0 ]] || say "  client exit $crc for $server (see $JSONL)"
}

# The runs of one case in a round: (pinning, server) pairs, rotated by the round number.
case_runs() {
  local case=$1 round=$2 first=1 pin s runs=()
  for pin in ${PINS[$case]}; do
    for s in ${EVERY[$case]}; do runs+=("$pin $s"); done
    if ((first)); then
      for s in ${FIRST[$case]}; do runs+=("$pin $s"); done
    fi
    first=0
  done
  local n=${#runs[@]} i
  for ((i = 0; i < n; i++)); do echo "${runs[$(((i + round - 1) % n))]}"; done
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
STARTED=$(date -u +%H:%M)
for round in $(seq "$ROUNDS"); do
  for case in "${CASES[@]}"; do
    while read -r pin server; do
      run_one "$round" timed "$case" "$pin" "$server"
    done < <(case_runs "$case" "$round")
  done
done
if ((COUNT_SECS > 0)); then
  for case in "${CASES[@]}"; do
    pin=${PINS[$case]%% *}
    for server in ${EVERY[$case]} ${FIRST[$case]}; do
      [[ $server == broker-bench-on-router-echo ]] && continue
      run_one 1 count "$case" "$pin" "$server"
    done
  done
fi

# ---- report --------------------------------------------------------------------------
{
  echo "# Broker comparison, $STAMP"
  echo
  echo "Machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r)," \
    "libzmq $(dpkg-query -W -f='${Version}' libzmq5 2>/dev/null || echo '?') (C programs)"
  echo "Runs from $STARTED to $(date -u +%H:%M) UTC. Load average before: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Rounds: $ROUNDS x ${SECS}s (+${WARMUP}s warm-up, not measured); medians over rounds." \
    "Syscall counts: $( ((COUNT_SECS > 0)) && echo "one ${COUNT_SECS}s run per case and server (perf stat -e raw_syscalls:sys_enter)" || echo "not taken")."
  echo "Raw results: $JSONL; server logs: $LOG"
  echo
} >"$MD"
set +e
python3 scripts/compare_report.py "$JSONL" --broker-ok "$BROKER_OK" --summary "${JSONL%.jsonl}-summary.json" >>"$MD"
status=$?
set -e
cat "$MD"
exit "$status"
