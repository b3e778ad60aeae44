# shellcheck shell=bash
# Shell helpers the scripts share (compare.sh, perf.sh, container-test): free ports, servers
# started in a process group of their own and stopped with a bounded wait, readiness waits,
# the benchmark venv, tools installed from Debian on first use, and per-process CPU and
# context-switch counts from /proc. Source it; it changes no shell options of its caller.
#   . "$(dirname "$0")/lib.sh"

# free_port: a free TCP port on 127.0.0.1, below the ephemeral range (32768+), so no client
# connection of this machine can be holding it when a server binds it a moment later.
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
    break
else:
    raise SystemExit("free_port: no free port found in 500 tries")'
}

# group_alive PGID: true while a live (non-zombie) process is in that process group.
group_alive() { ps -e -o pgid=,stat= | awk -v g="$1" '$1 == g && $2 !~ /^Z/ {f = 1} END {exit !f}'; }

# spawn_group LOG CMD...: starts CMD in a session of its own, output appended to LOG, and
# sets SPAWNED_PID, which is also its process group id (so stop_group ends whatever CMD
# started too). The caller must have job control off (set +m, the default in scripts):
# then the background child is no group leader and setsid execs CMD in place.
spawn_group() {
  local log=$1
  shift
  setsid "$@" >>"$log" 2>&1 &
  # shellcheck disable=SC2034 # for the caller
  SPAWNED_PID=$!
}

# stop_group PID [GRACE_S]: SIGTERM to the process group PID, SIGKILL to what is left after
# GRACE_S seconds (default 15); sets STOPPED_RC to PID's exit status (0 when it was not our
# child any more). Prints a line on stderr when it had to kill.
stop_group() {
  local pid=$1 grace=${2:-15} i
  STOPPED_RC=0
  [[ -n $pid ]] || return 0
  kill -TERM -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do group_alive "$pid" || break; sleep 0.1; done
  if group_alive "$pid"; then
    echo "process group $pid still running ${grace} s after SIGTERM: SIGKILL" >&2
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  # shellcheck disable=SC2034 # for the caller
  wait "$pid" 2>/dev/null || STOPPED_RC=$?
}

# wait_http_ok URL PID [SECS]: true once URL answers 200; false if PID exits first or SECS
# (default 20) pass.
wait_http_ok() {
  local url=$1 pid=$2 secs=${3:-20} i
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]] && return 0
    sleep 0.1
  done
  return 1
}

# wait_tcp PORT PID [SECS]: true once 127.0.0.1:PORT accepts a connection; false if PID exits
# first or SECS (default 20) pass.
wait_tcp() {
  local port=$1 pid=$2 secs=${3:-20} i
  for ((i = 0; i < secs * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || return 1
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# ensure_tool COMMAND PACKAGE: installs the Debian PACKAGE when COMMAND is missing.
ensure_tool() {
  command -v "$1" >/dev/null && return 0
  echo "installing $2 (for $1)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >/dev/null; }
}

# ensure_perf_venv [PACKAGE...]: the benchmarks' venv (target/tools/perf-venv) with pyzmq
# and the PACKAGEs (pip names = import names here); sets PERF_PY to its interpreter.
ensure_perf_venv() {
  local venv=target/tools/perf-venv mods=zmq p
  for p in "$@"; do mods+=", $p"; done
  PERF_PY=$venv/bin/python3
  if [[ ! -x $PERF_PY ]] || ! "$PERF_PY" -c "import $mods" 2>/dev/null; then
    [[ -x $PERF_PY ]] || python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check pyzmq "$@"
  fi
}

# proc_snapshot PID: one JSON line: the time (CLOCK_MONOTONIC, s), the process's CPU ticks from
# /proc/PID/stat (utime +
# stime, all threads, in ticks of getconf CLK_TCK), per thread [name, CPU ticks, voluntary,
# involuntary context switches, ns on a CPU] from /proc/PID/task/*, and the machine's busy and
# steal ticks
# from /proc/stat (busy minus what the measured processes used is what others ran meanwhile).
# Two snapshots bracket a measured window; "{}" if the process is gone.
proc_snapshot() {
  python3 - "$1" <<'EOF'
import json, os, sys, time

pid = sys.argv[1]


def stat_of(path):
    text = open(path).read()
    return text[text.rindex(")") + 2:].split(), text[text.index("(") + 1:text.rindex(")")]


try:
    fields, _ = stat_of(f"/proc/{pid}/stat")
    tids = os.listdir(f"/proc/{pid}/task")
except OSError:
    print("{}")
    raise SystemExit
tasks = {}
for tid in tids:
    try:
        f, comm = stat_of(f"/proc/{pid}/task/{tid}/stat")
        status = open(f"/proc/{pid}/task/{tid}/status").read().splitlines()
        # schedstat's first field: ns on a CPU, finer than the 10 ms ticks of stat.
        on_cpu_ns = int(open(f"/proc/{pid}/task/{tid}/schedstat").read().split()[0])
    except (OSError, ValueError, IndexError):
        continue  # a thread that just exited
    cs = dict(line.split(":", 1) for line in status if "ctxt_switches:" in line)
    tasks[tid] = [comm, int(f[11]) + int(f[12]), int(cs.get("voluntary_ctxt_switches", 0)),
                  int(cs.get("nonvoluntary_ctxt_switches", 0)), on_cpu_ns]
cpu = [int(x) for x in open("/proc/stat").readline().split()[1:]]
# /proc/stat's cpu line: user nice system idle iowait irq softirq steal ...
print(json.dumps({"time": time.monotonic(), "ticks": int(fields[11]) + int(fields[12]), "tasks": tasks,
                  "machine_busy": sum(cpu[:3]) + sum(cpu[5:7]), "machine_steal": cpu[7]}))
EOF
}
