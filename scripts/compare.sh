#!/usr/bin/env bash
# The broker next to libzmq's own limits, measured by an independent C load client
# (benches/c/loadgen.c, system libzmq, no code shared with the broker), in one run.
#
# Servers, each started fresh on free 127.0.0.1 ports and stopped with SIGTERM after its run:
#   broker             target/release/broker --workers 2 (+ $BROKER_ARGS)
#   broker-no-metrics  the same with BROKER_NO_METRICS=true (throughput case only)
#   c-proxy            benches/c/proxy.c: ROUTER -> zmq_proxy -> inproc DEALER -> 2 REP workers
#   router-echo        benches/c/router_echo.c: one ROUTER echoing on one thread (no hop)
#   pyzmq-talk         scripts/talk_server.py: one pyzmq REP socket (client runs --raw)
#   broker-curve       the broker with --curve-secret-key-file (CURVE on the front socket)
#   c-proxy-curve      the C proxy with its front a CURVE server: libzmq's own cost of CURVE
# (the -curve servers run in the throughput and latency cases; keys come from pyzmq, and the
# C client connects with --curve-*-key; CURVE=0 leaves them out)
# Cases: throughput 16x16x64 B (server CPU 1, client CPU 0), latency 1x1x64 B (both CPU 0),
# large 4x4x64 KiB (server CPU 1, client CPU 0). Runs are interleaved: every round visits
# every case and server (in a rotated order), so slow drift of the machine hits all alike.
# Tables hold medians over rounds; raw results go to target/perf/compare-<stamp>.jsonl and
# the report to target/perf/compare-<stamp>.md.
#
# Soundness checks printed with the tables:
#   router-echo / c-proxy >= 1.5: the client can drive well past the baseline pool, so it
#     is not what limits the numbers (else they mean nothing);
#   broker bench / C client on router-echo >= 0.8: the project's own Rust load tool agrees.
#
#   scripts/compare.sh            ROUNDS=3 SECS=5 WARMUP=1 C_THREADS=2 by default; extra
#                                 broker flags in BROKER_ARGS (e.g. "--max-inflight 1024")
#   ROUNDS=1 SECS=1 scripts/compare.sh
# Exit 1 if any server lost or garbled a reply, did not start or answer, or the broker did
# not build.
set -euo pipefail
set +m # no job control: servers are started with setsid, see start_server
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
SECS=${SECS:-5}
WARMUP=${WARMUP:-1}
C_THREADS=${C_THREADS:-2} # loop threads of the C client (measured: 2 beat 1 by ~10% on one CPU)
BROKER_ARGS=${BROKER_ARGS:-}
OUT=target/perf
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
JSONL=$OUT/compare-$STAMP.jsonl
MD=$OUT/compare-$STAMP.md
LOG=$OUT/compare-$STAMP.log
CB=target/cbench
BIN=${BROKER_BIN:-target/release/broker} # set to compare another build (then nothing is built)
VENV=target/tools/perf-venv
PY=$VENV/bin/python3
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
elif ! cargo build --release -q -p broker 2>>"$LOG"; then
  BROKER_OK=0
  say "BROKER DID NOT BUILD (see $LOG): its rows are skipped, exit status will be 1"
fi
if [[ ! -x $PY ]] || ! "$PY" -c 'import zmq' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check pyzmq
fi
CURVE=${CURVE:-1}
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

# A port below the ephemeral range (32768+), so no client connection can be holding it.
free_port() {
  python3 -c '
import random, socket
for _ in range(500):
    p = random.randrange(20000, 32000)
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    print(p)
    break'
}

# group_alive PGID: true while a live (non-zombie) process is in that process group.
group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'; }

# stop_server: SIGTERM to the server's process group (each server runs in its own session,
# so whatever it started goes too), SIGKILL to what is left after 15 s; sets SERVER_RC.
stop_server() {
  [[ -n $SERVER_PID ]] || return 0
  kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 150); do group_alive "$SERVER_PID" || break; sleep 0.1; done
  if group_alive "$SERVER_PID"; then
    say "  server group $SERVER_PID still running 15 s after SIGTERM: SIGKILL"
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_RC=0
  wait "$SERVER_PID" 2>/dev/null || SERVER_RC=$?
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
    c-proxy-curve) SERVER_ARGV=("$CB/proxy" --endpoint "$ENDPOINT" --workers 2 --cpu "$cpu"
      --curve-secret-key "$SERVER_SECRET") ;;
    router-echo) SERVER_ARGV=("$CB/router_echo" --endpoint "$ENDPOINT" --cpu "$cpu") ;;
    pyzmq-talk) SERVER_ARGV=(taskset -c "$cpu" "$PY" scripts/talk_server.py "$ENDPOINT") ;;
  esac
  echo "== $name: ${SERVER_ARGV[*]}" >>"$LOG"
  # Job control is off, so the child is no group leader and setsid execs in place: the
  # server's pid is its process group id.
  setsid "${SERVER_ARGV[@]}" >>"$LOG" 2>&1 &
  SERVER_PID=$!
  local port=${ENDPOINT##*:}
  for _ in $(seq 200); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    if [[ -n $admin ]]; then
      [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "http://$admin/readyz" || true) == 200 ]] && return 0
    else
      (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    fi
    sleep 0.1
  done
  return 1
}

# Samples the server's CPU over the client's measured window, into $1.
sample_server_cpu() {
  local file=$1 pid=$SERVER_PID
  ticks() { sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{print $12 + $13}'; }
  (
    sleep "$WARMUP"
    a=$(ticks)
    sleep "$SECS"
    b=$(ticks)
    echo "${a:-} ${b:-}" >"$file"
  ) &
  SAMPLER_PID=$!
}

# record ROUND CASE SERVER SERVER_CMD CLIENT_CMD CLIENT_RC SERVER_RC SERVER_CPU OUTPUT [NOTE]
record() {
  python3 - "$@" >>"$JSONL" <<'EOF'
import json, sys
rnd, case, server, scmd, ccmd, crc, src, scpu, out = sys.argv[1:10]
note = sys.argv[10] if len(sys.argv) > 10 else ""
try:
    result = json.loads(out) if out.strip() else None
except ValueError:
    result = None
print(json.dumps({
    "round": int(rnd), "case": case, "server": server, "server_cmd": scmd,
    "client_cmd": ccmd, "client_rc": int(crc) if crc else None,
    "server_rc": int(src) if src else None,
    "server_cpu_ratio": float(scpu) if scpu else None, "note": note or None,
    "result": result, "raw_output": None if result is not None else out[-2000:],
}))
EOF
}

# ---- cases ---------------------------------------------------------------------------
# name: server_cpu client_cpu clients window size servers...
declare -A CASE=(
  [throughput]="1 0 16 16 64 broker broker-no-metrics c-proxy router-echo pyzmq-talk broker-bench-on-router-echo"
  [latency]="0 0 1 1 64 broker c-proxy router-echo pyzmq-talk"
  [large]="1 0 4 4 65536 broker c-proxy router-echo"
)
CASES=(throughput latency large)
if [[ $CURVE == 1 ]]; then
  CASE[throughput]+=" broker-curve c-proxy-curve"
  CASE[latency]+=" broker-curve c-proxy-curve"
fi
CLK_TCK=$(getconf CLK_TCK)

# run_one ROUND CASE SERVER
run_one() {
  local round=$1 case=$2 server=$3
  local spec
  read -ra spec <<<"${CASE[$case]}"
  local scpu=${spec[0]} ccpu=${spec[1]} clients=${spec[2]} window=${spec[3]} size=${spec[4]}
  local target=$server client_argv out crc=0 cpufile cpu_ratio='' a='' b=''
  if [[ $server == broker* && $BROKER_OK == 0 ]]; then
    record "$round" "$case" "$server" "" "" "" "" "" "" "skipped: the broker did not build"
    return
  fi
  [[ $server == broker-bench-on-router-echo ]] && target=router-echo
  say "round $round/$ROUNDS $case: $server"
  SERVER_RC=
  if ! start_server "$target" "$scpu"; then
    stop_server
    record "$round" "$case" "$server" "${SERVER_ARGV[*]}" "" "" "$SERVER_RC" "" "" "server did not become ready"
    say "  $server did not become ready (see $LOG)"
    return
  fi
  if [[ $server == broker-bench-on-router-echo ]]; then
    client_argv=(taskset -c "$ccpu" "$BIN" bench --endpoint "$ENDPOINT" --clients "$clients"
      --window "$window" --size "$size" --duration "${SECS}s" --threads 2 --json)
    out=$(timeout $((SECS + 30)) "${client_argv[@]}" 2>>"$LOG") || crc=$?
  else
    client_argv=("$CB/loadgen" --endpoint "$ENDPOINT" --clients "$clients" --window "$window"
      --size "$size" --duration "$SECS" --warmup "$WARMUP" --threads "$C_THREADS" --cpu "$ccpu")
    [[ $server == pyzmq-talk ]] && client_argv+=(--raw)
    [[ $server == *-curve ]] && client_argv+=(--curve-server-key "$SERVER_PUBLIC"
      --curve-public-key "$CLIENT_PUBLIC" --curve-secret-key "$CLIENT_SECRET")
    cpufile=$(mktemp)
    sample_server_cpu "$cpufile"
    out=$("${client_argv[@]}" 2>>"$LOG") || crc=$?
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=
    read -r a b <"$cpufile" || true
    rm -f "$cpufile"
    [[ -n ${a:-} && -n ${b:-} ]] && cpu_ratio=$(awk -v a="$a" -v b="$b" -v t="$CLK_TCK" -v s="$SECS" 'BEGIN{printf "%.3f", (b-a)/t/s}')
  fi
  stop_server
  record "$round" "$case" "$server" "${SERVER_ARGV[*]}" "${client_argv[*]}" "$crc" "$SERVER_RC" "$cpu_ratio" "$out"
  [[ $crc == 0 ]] || say "  client exit $crc for $server (see $JSONL)"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
for round in $(seq "$ROUNDS"); do
  for case in "${CASES[@]}"; do
    read -ra spec <<<"${CASE[$case]}"
    servers=("${spec[@]:5}")
    n=${#servers[@]}
    for i in $(seq 0 $((n - 1))); do # rotate the order each round
      run_one "$round" "$case" "${servers[$(((i + round - 1) % n))]}"
    done
  done
done

# ---- report --------------------------------------------------------------------------
{
  echo "# Broker comparison, $STAMP"
  echo
  echo "Machine: $(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p' | head -1), kernel $(uname -r)," \
    "libzmq $(dpkg-query -W -f='${Version}' libzmq5 2>/dev/null || echo '?') (C programs)"
  echo "Load average before the runs: $LOAD_BEFORE; after: $(cut -d' ' -f1-3 /proc/loadavg)"
  echo "Rounds: $ROUNDS x ${SECS}s (+${WARMUP}s warm-up, not measured); medians over rounds."
  echo "Raw results: $JSONL; server logs: $LOG"
  echo
} >"$MD"
set +e
python3 - "$JSONL" "$BROKER_OK" "$CURVE" >>"$MD" <<'EOF'
import json, statistics, sys

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
broker_ok = sys.argv[2] == "1"
curve = ["broker-curve", "c-proxy-curve"] if sys.argv[3] == "1" else []
failed = []  # (case, server, why) that make the exit status 1


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec="{:.0f}"):
    return "n/a" if x is None else spec.format(x)


def ratio(a, b):
    return a / b if a is not None and b else None


groups = {}
for r in rows:
    groups.setdefault((r["case"], r["server"]), []).append(r)


def summary(case, server):
    runs = [r for r in groups.get((case, server), []) if not (r.get("note") or "").startswith("skipped")]
    skipped = len(groups.get((case, server), [])) - len(runs)
    ok = [r for r in runs if r["result"] is not None]
    res = [r["result"] for r in ok]
    errors = {}
    for x in res:
        for code, n in (x.get("errors") or {}).items():
            errors[code] = errors.get(code, 0) + n
    lat = lambda k: med(x.get("latency_us", {}).get(k) for x in res)
    s = {
        "runs": len(runs), "measured": len(res), "skipped": skipped,
        "rps": med(x.get("throughput_rps") for x in res),
        "rps_runs": [round(x.get("throughput_rps") or 0) for x in res],
        "p50": lat("p50"), "p99": lat("p99"), "p999": lat("p999"),
        "errors": errors,
        "lost": sum(x.get("lost") or 0 for x in res),
        "mismatched": sum(x.get("mismatched") or 0 for x in res),
        "client_cpu": med(x.get("client_cpu_ratio") for x in res),
        "client_cpus": med(x.get("client_cpus") for x in res),
        "server_cpu": med(r.get("server_cpu_ratio") for r in ok),
        "notes": sorted({r["note"] for r in groups.get((case, server), []) if r.get("note")}),
        "bad_exit": sorted({r["server_rc"] for r in runs if r.get("server_rc") not in (None, 0)}),
    }
    return s


CASES = {
    "throughput": ("Throughput: 16 clients x 16 window x 64 B, server CPU 1, client CPU 0",
                   ["broker", "broker-no-metrics", "c-proxy", "router-echo", "pyzmq-talk"] + curve),
    "latency": ("Latency: 1 client x 1 window x 64 B, server and client both on CPU 0",
                ["broker", "c-proxy", "router-echo", "pyzmq-talk"] + curve),
    "large": ("Large: 4 clients x 4 window x 65536 B, server CPU 1, client CPU 0",
              ["broker", "c-proxy", "router-echo"]),
}
S = {}
for case, (title, servers) in CASES.items():
    base = summary(case, "c-proxy")
    print(f"## {title}\n")
    if case == "latency":
        print("| server | p50 µs | p99 µs | p99.9 µs | p50 / c-proxy | p99 / c-proxy | req/s "
              "| errors | lost | mismatched | client CPU | server CPU |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print("| server | req/s | / c-proxy | p50 µs | p99 µs | errors | lost | mismatched "
              "| client CPU | server CPU | runs req/s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
    for server in servers:
        s = summary(case, server)
        S[(case, server)] = s
        if s["runs"] + s["skipped"] == 0:
            continue
        why = []
        if s["measured"] < s["runs"]:
            why.append(f"{s['runs'] - s['measured']} of {s['runs']} runs gave no result")
        if s["lost"] or s["mismatched"]:
            why.append(f"{s['lost']} lost, {s['mismatched']} mismatched")
        if why:
            failed.append((case, server, "; ".join(why)))
        errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
        ccpu = "n/a" if s["client_cpu"] is None else f"{s['client_cpu']:.2f}/{s['client_cpus']:.0f}"
        if s["client_cpu"] is not None and s["client_cpus"] and s["client_cpu"] >= 0.95 * s["client_cpus"] and case != "latency":
            ccpu += " (saturated)"
        scpu = fmt(s["server_cpu"], "{:.2f}")
        name = server + (f" ({'; '.join(s['notes'])})" if s["notes"] else "")
        if case == "latency":
            print(f"| {name} | {fmt(s['p50'], '{:.1f}')} | {fmt(s['p99'], '{:.1f}')} "
                  f"| {fmt(s['p999'], '{:.1f}')} | {fmt(ratio(s['p50'], base['p50']), '{:.2f}')} "
                  f"| {fmt(ratio(s['p99'], base['p99']), '{:.2f}')} | {fmt(s['rps'])} | {errs} "
                  f"| {s['lost']} | {s['mismatched']} | {ccpu} | {scpu} |")
        else:
            print(f"| {name} | {fmt(s['rps'])} | {fmt(ratio(s['rps'], base['rps']), '{:.2f}')} "
                  f"| {fmt(s['p50'], '{:.1f}')} | {fmt(s['p99'], '{:.1f}')} | {errs} | {s['lost']} "
                  f"| {s['mismatched']} | {ccpu} | {scpu} | {s['rps_runs']} |")
    print()

print("CPU columns: CPU seconds per wall second over the measured window (client: of the CPUs it "
      "may use). A client at its limit means that row measures the client, not the server.\n")

print("## Checks\n")
echo = S.get(("throughput", "router-echo"), {}).get("rps")
proxy = S.get(("throughput", "c-proxy"), {}).get("rps")
h = ratio(echo, proxy)
e = S.get(("throughput", "router-echo"), {})
print(f"    harness check: router-echo / c-proxy = {fmt(h, '{:.2f}')} (>= 1.5 required)")
print(f"      (on router-echo the client used {fmt(e.get('client_cpu'), '{:.2f}')} of its CPU, "
      f"the server {fmt(e.get('server_cpu'), '{:.2f}')} of its)")
if (e.get("client_cpu") or 0) < 0.85 and (e.get("server_cpu") or 0) < 0.85:
    print("    !!! neither side of router-echo used its CPU: something else is running on these "
          "CPUs (see top); rerun on a quiet machine")
if h is None or h < 1.5:
    print("\n    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!")
    print("    !!! HARNESS CHECK FAILED: the load client is the bottleneck (or a baseline    !!!")
    print("    !!! failed), so the ratios above mean nothing. Do not quote them.            !!!")
    print("    !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n")

bench_runs = groups.get(("throughput", "broker-bench-on-router-echo"), [])
bench = [r["result"] for r in bench_runs
         if r["result"] is not None and r.get("client_rc") == 0 and "throughput_rps" in r["result"]]
b = med(x["throughput_rps"] for x in bench) if bench else None
br = ratio(b, echo)
extra = ""
if b is None:
    why = sorted({r.get("note") or f"exit {r.get('client_rc')}" for r in bench_runs}) or ["not run"]
    extra = f"  (broker bench failed: {', '.join(map(str, why))}; command in {sys.argv[1]})"
else:
    p50 = med(x.get("latency_us", {}).get("p50") for x in bench)
    p99 = med(x.get("latency_us", {}).get("p99") for x in bench)
    extra = f"  (broker bench {b:.0f} req/s, p50 {fmt(p50, '{}')} µs, p99 {fmt(p99, '{}')} µs)"
print(f"    broker bench / C client on router-echo = {fmt(br, '{:.2f}')} (>= 0.8 required){extra}")
if br is not None and br < 0.8:
    print("    !!! the broker's own load tool is well below the C client: its numbers understate")

bm = S.get(("throughput", "broker"), {}).get("rps")
bn = S.get(("throughput", "broker-no-metrics"), {}).get("rps")
cost = (1 - bm / bn) * 100 if bm is not None and bn else None
print(f"    metrics cost = {fmt(cost, '{:.1f}')} % (1 - broker/broker-no-metrics)")
if curve:
    for plain in ("broker", "c-proxy"):
        t = ratio(S.get(("throughput", plain + "-curve"), {}).get("rps"), S.get(("throughput", plain), {}).get("rps"))
        l = ratio(S.get(("latency", plain + "-curve"), {}).get("p50"), S.get(("latency", plain), {}).get("p50"))
        print(f"    CURVE cost, {plain}: throughput x{fmt(t, '{:.2f}')}, p50 latency x{fmt(l, '{:.2f}')} "
              f"({plain}-curve / {plain})")
for (case, server), s in sorted(S.items()):
    if s.get("bad_exit"):
        print(f"    note: {server} ({case}) exited with {s['bad_exit']} after SIGTERM")
print()

print("## Commands (round 1; ports differ per run)\n")
for r in rows:
    if r["round"] == 1 and (r["server_cmd"] or r["client_cmd"]):
        print(f"- {r['case']} / {r['server']}:")
        print(f"  - server: `{r['server_cmd']}`")
        print(f"  - client: `{r['client_cmd']}`")
print()

if not broker_ok:
    failed.append(("all", "broker", "did not build"))
if failed:
    print("## FAILED\n")
    for case, server, why in failed:
        print(f"- {case} / {server}: {why}")
    print()
sys.exit(1 if failed else 0)
EOF
status=$?
set -e
cat "$MD"
exit "$status"
