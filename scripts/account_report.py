#!/usr/bin/env python3
"""The time account of `scripts/perf.sh account`: where a request's work goes on the serving
core, broker against c-proxy-dealer, from the files that run left in one directory.

    account_report.py target/perf/account-<stamp>

Markdown on stdout. Reads:
- cg-<case>-<server>/callgrind.out.<pid>.1-<thread>: callgrind's dump of the measured phase
  (a fixed request count, taken after a warm-up and a pause in which the counters were
  zeroed), one file per thread; with loadgen.json (how many requests that phase held);
- stat-<case>-<server>.csv: perf stat --per-thread of syscalls by kind and context switches,
  with .proc (two /proc snapshots: CPU per thread) and .loadgen.json (requests answered);
- perf-<case>-<server>.dso.txt / .sym.txt: perf report of a cpu-clock profile.
Exit 1 if a file it needs is missing or unreadable.
"""
import json
import os
import re
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CASES = ["throughput", "latency"]
SERVERS = ["broker", "c-proxy-dealer"]
SYSCALLS = ["poll", "getpid", "read", "write", "futex", "getsockopt", "epoll_wait", "epoll_ctl",
            "sendto", "recvfrom", "sched_yield", "pread64", "clock_nanosleep"]


def die(msg):
    sys.exit(f"account_report: {msg}")


# ---- callgrind ------------------------------------------------------------------------------

class Thread:
    """One thread's callgrind file: self cost by (object, function) and by (file, line), calls."""

    def __init__(self, path):
        self.path = path
        self.total = 0
        self.by_fn = defaultdict(int)      # (object, function) -> self Ir
        self.by_line = defaultdict(int)    # (file, line) -> self Ir
        self.calls = defaultdict(int)      # called function -> number of calls
        self.call_cost = defaultdict(int)  # called function -> inclusive Ir of those calls
        self.parse()

    def parse(self):
        names = {}

        def name(value):
            m = re.match(r"\((\d+)\)(?: (.*))?$", value)
            if not m:
                return value
            if m.group(2) is not None:
                names[m.group(1)] = m.group(2)
            return names.get(m.group(1), f"?{m.group(1)}")

        ob = fl = fi = fn = ""
        cfn = ""
        in_call = False
        last = 0
        with open(self.path) as f:
            for line in f:
                line = line.rstrip("\n")
                if not line or line.startswith("#"):
                    continue
                c = line[0]
                if c.isdigit() or c in "+-*":
                    parts = line.split()
                    pos = parts[0]
                    if pos == "*":
                        ln = last
                    elif pos[0] in "+-":
                        ln = last + int(pos)
                    else:
                        ln = int(pos)
                    last = ln
                    cost = int(parts[1]) if len(parts) > 1 else 0
                    if in_call:
                        self.call_cost[cfn] += cost
                        in_call = False
                    else:
                        self.by_fn[(ob, fn)] += cost
                        self.by_line[(fi or fl, ln)] += cost
                    continue
                key, _, value = line.partition("=")
                if key == "summary" or line.startswith("summary:"):
                    self.total = int(line.split()[-1])
                elif key == "ob":
                    ob = name(value)
                elif key == "fl":
                    fl = name(value)
                    fi = ""
                elif key in ("fi", "fe"):
                    fi = name(value)
                elif key == "fn":
                    fn = name(value)
                elif key == "cfn":
                    cfn = name(value)
                elif key in ("cob", "cfi", "cfl"):
                    name(value)
                elif key == "calls":
                    self.calls[cfn] += int(value.split()[0])
                    in_call = True
        if not self.total:
            self.total = sum(self.by_fn.values())

    def has(self, pattern):
        return any(re.search(pattern, fn) for _, fn in self.by_fn)

    def libzmq_share(self):
        z = sum(v for (ob, _), v in self.by_fn.items() if "libzmq" in ob)
        return z / self.total if self.total else 0


def name_threads(threads):
    """Names callgrind's numbered threads by what they ran (callgrind records no names)."""
    named = {}
    workers = 0
    zmq_only = []
    for num, t in sorted(threads.items()):
        if num == 1:
            named[num] = "main"
        elif t.has(r"^broker::guard::"):
            named[num] = "guard"
        elif t.has(r"^worker::pool::") or t.has(r"^worker$"):
            named[num] = f"worker-{workers}"
            workers += 1
        elif t.has(r"^broker::admin") or t.has(r"^tokio::"):
            named[num] = "admin"
        elif t.has(r"^stop_thread_main$"):
            named[num] = "signals"
        else:
            zmq_only.append(num)
    # libzmq's own threads run only libzmq and libc: the busy one is the I/O thread, the other
    # the reaper.
    zmq_only.sort(key=lambda n: -threads[n].total)
    for i, num in enumerate(zmq_only):
        named[num] = "ZMQbg/IO/0" if i == 0 and threads[num].total > 0 else f"ZMQbg/other-{num}"
    return named


def category(ob, fn, file):
    """What kind of code a cost belongs to."""
    if "libzmq" in ob:
        return "libzmq"
    if "libc.so" in ob or "ld-linux" in ob:
        return "libc"
    if "libstdc++" in ob:
        return "libstdc++"
    if "libsodium" in ob:
        return "libsodium"
    f = file or ""
    if "/broker/src/" in f or "/shared/src/" in f or "/worker/src/" in f or fn.startswith(("broker::", "shared::", "worker::")):
        return "project code"
    if "zmq-0." in f or fn.startswith(("zmq::", "<zmq::")):
        return "zmq crate (binding)"
    if "crossbeam" in f or "crossbeam" in fn:
        return "crossbeam"
    if "prometheus" in f or "prometheus" in fn:
        return "prometheus"
    if "/rustc/" in f or fn.startswith(("std::", "core::", "alloc::", "<std::", "<core::", "<alloc::")):
        return "Rust std"
    if "proxy.c" in f or ob.endswith("/proxy"):
        return "proxy.c"
    return "other"


def fn_of_line(path, line, cache={}):
    """The Rust function a source line belongs to: the nearest `fn` at or above it."""
    if path not in cache:
        p = Path(path)
        if not p.is_absolute():
            p = REPO / path
        fns = []
        try:
            for i, text in enumerate(open(p), 1):
                m = re.match(r"\s*(?:pub(?:\([^)]*\))? )?(?:const )?(?:unsafe )?fn (\w+)", text)
                if m:
                    fns.append((i, m.group(1)))
        except OSError:
            pass
        cache[path] = fns
    best = "(outside any fn)"
    for i, name in cache[path]:
        if i > line:
            break
        best = name
    return best


def project_rel(path):
    for root in ("/broker/src/", "/shared/src/", "/worker/src/"):
        if root in path:
            return root.strip("/").split("/")[0] + "/src/" + path.split(root, 1)[1]
    return None


def load_callgrind(d, case, server):
    base = d / f"cg-{case}-{server}"
    files = sorted(base.glob("callgrind.out.*.1-*"))
    if not files:
        die(f"no callgrind dump in {base}")
    try:
        lg = json.load(open(base / "loadgen.json"))
    except (OSError, ValueError) as e:
        die(f"{base}/loadgen.json: {e}")
    n = lg.get("ok_total", 0) + lg.get("errors_total", 0)
    if not n or lg.get("lost") or lg.get("mismatched"):
        die(f"{base}: the measured phase answered {n} requests, lost {lg.get('lost')}, "
            f"mismatched {lg.get('mismatched')}")
    threads = {int(f.name.rsplit("-", 1)[1]): Thread(f) for f in files}
    return n, threads, name_threads(threads)


def callgrind_section(d):
    print("## Instructions per request (callgrind)\n")
    print("Fixed request counts after a warm-up; callgrind counts user-space instructions only "
          "(the kernel's share is in the profile below). Valgrind runs one thread at a time and "
          "about 50x slower, so work paid per wake-up or per turn is spread over the batches "
          "it sees, and time-driven work (the guard's ticks, heartbeats) is paid over a longer "
          "run: those rows are per second below, not per request.\n")
    out = {}
    for case in CASES:
        for server in SERVERS:
            n, threads, names = load_callgrind(d, case, server)
            out[(case, server)] = (n, threads, names)
    print("| case | server | requests | thread | Ir/request | of which libzmq |")
    print("|---|---|---|---|---|---|")
    for (case, server), (n, threads, names) in out.items():
        total = 0
        for num, t in sorted(threads.items(), key=lambda kv: -kv[1].total):
            if t.total < n:  # under one instruction per request: idle
                continue
            total += t.total
            print(f"| {case} | {server} | {n} | {names[num]} | {t.total / n:,.0f} | {t.libzmq_share():.0%} |")
        print(f"| {case} | {server} | {n} | **all threads** | **{total / n:,.0f}** | |")
    print()
    for case in CASES:
        for server in SERVERS:
            n, threads, names = out[(case, server)]
            main = next(t for num, t in threads.items() if names[num] == "main")
            cats = defaultdict(int)
            for (ob, fn), v in main.by_fn.items():
                cats[category(ob, fn, "")] += v
            # Project code and the Rust std inlined into it share objects: split by source file.
            files = defaultdict(int)
            fns = defaultdict(int)
            for (file, line), v in main.by_line.items():
                rel = project_rel(file)
                if rel:
                    files[rel] += v
                    fns[f"{rel}: {fn_of_line(REPO / rel, line)}"] += v
            label = "coordinator (main)" if server == "broker" else "zmq_proxy (main)"
            print(f"### {case} / {server}: {label} thread, {main.total / n:,.0f} Ir per request\n")
            print("| code | Ir/request | share |")
            print("|---|---|---|")
            for k, v in sorted(cats.items(), key=lambda kv: -kv[1]):
                print(f"| {k} | {v / n:,.0f} | {v / main.total:.0%} |")
            print()
            if fns:
                print("Source lines of the project run on this thread, by function (inlined "
                      "code counted where its source lives):\n")
                print("| function | Ir/request |")
                print("|---|---|")
                for k, v in sorted(fns.items(), key=lambda kv: -kv[1])[:20]:
                    if v / n >= 1:
                        print(f"| {k} | {v / n:,.1f} |")
                print()
            # Calls made at least once per 100 requests (the loop's own frames, main() and
            # the like, are entered once and show no count).
            top = sorted(((fn, c) for fn, c in main.calls.items() if c >= n / 100),
                         key=lambda kv: -main.call_cost[kv[0]])[:25]
            print("Calls made on this thread, by inclusive cost (a callee's cost includes what "
                  "it calls, so rows overlap):\n")
            print("| callee | calls/request | Ir/call | Ir/request |")
            print("|---|---|---|---|")
            for fn, calls in top:
                cost = main.call_cost[fn]
                print(f"| `{fn[:90]}` | {calls / n:.3f} | {cost / calls:,.0f} | {cost / n:,.0f} |")
            print()
    return out


def guard_section(out, stats):
    """The guard's cost per tick and per scan (callgrind), times its native rates (perf stat)."""
    print("## The guard thread\n")
    for case in CASES:
        n, threads, names = out[(case, "broker")]
        g = next((t for num, t in threads.items() if names[num] == "guard"), None)
        if g is None:
            continue
        ticks = g.calls.get("pread", 0) + g.calls.get("pread64", 0)
        scans = g.calls.get("getsockopt", 0)
        s = stats.get((case, "broker"), {})
        th = s.get("threads", {}).get("guard", {})
        secs = s.get("counted_s") or 1
        native_ticks = th.get("pread64", 0) / secs
        native_info = th.get("getsockopt", 0) / secs
        rps = s.get("rps") or 0
        per_tick = g.total / ticks if ticks else None
        print(f"- {case}: under callgrind {g.total:,} Ir in {ticks} ticks (statm reads) and "
              f"{scans} TCP_INFO reads: {fmt(per_tick)} Ir per tick all included. Natively "
              f"{native_ticks:.0f} ticks/s and {native_info:.0f} TCP_INFO reads/s; at "
              f"{rps:,.0f} req/s that is {fmt(per_tick * native_ticks / rps if per_tick and rps else None, '{:.1f}')} "
              f"Ir per request, {fmt(th.get('cpu_s', 0) / secs * 1e6, '{:.0f}')} µs of CPU per second "
              f"({fmt(th.get('cs', 0) / secs, '{:.0f}')} context switches/s, "
              f"{fmt(th.get('sched_yield', 0) / secs, '{:.0f}')} sched_yield/s, "
              f"{fmt(th.get('futex', 0) / secs, '{:.0f}')} futex/s).")
    print()


def fmt(x, spec="{:,.0f}"):
    return "n/a" if x is None else spec.format(x)


# ---- perf stat ----------------------------------------------------------------------------

def load_stat(d, case, server):
    """perf stat's counts by thread over a phase of a fixed request count, with CPU per thread
    from the /proc snapshots of the perf record run over the same count (counting tracepoints
    slows the server by a fraction of a microsecond per syscall; sampling does not)."""
    base = d / f"stat-{case}-{server}"
    rec = d / f"perf-{case}-{server}"
    try:
        lg = json.load(open(f"{rec}.loadgen.json"))
        counted_lg = json.load(open(f"{base}.loadgen.json"))
        snaps = [json.loads(l) for l in open(f"{rec}.proc") if l.strip()]
        lines = open(f"{base}.csv").read().splitlines()
    except (OSError, ValueError) as e:
        die(f"{base}: {e}")
    threads = defaultdict(lambda: defaultdict(float))
    for line in lines:
        parts = line.split(",")
        if len(parts) < 4 or not parts[1].replace(".", "").isdigit():
            continue
        name = parts[0].rsplit("-", 1)[0]
        event = parts[3]
        value = float(parts[1])
        if event.startswith("raw_syscalls:sys_enter"):
            threads[name]["syscalls"] += value
        elif event.startswith("context-switches"):
            threads[name]["cs"] += value
        elif event.startswith("syscalls:sys_enter_"):
            threads[name][event.split("sys_enter_", 1)[1].split(":")[0]] += value
    n = lg.get("ok_total", 0) + lg.get("errors_total", 0)
    secs = lg.get("measured_s") or 0
    for what, x in (("record", lg), ("stat", counted_lg)):
        answered = x.get("ok_total", 0) + x.get("errors_total", 0)
        if answered != n or not x.get("measured_s") or x.get("lost") or x.get("mismatched"):
            die(f"{d}: the {what} run of {case}/{server} answered {answered} requests (expected "
                f"{n}) in {x.get('measured_s')} s, lost {x.get('lost')}, mismatched {x.get('mismatched')}")
    total_cpu = None
    if len(snaps) == 2 and all(snaps):
        a, b = snaps
        tck = os.sysconf("SC_CLK_TCK")
        for tid, now in b["tasks"].items():
            before = a["tasks"].get(tid)
            if before and len(now) > 4 and len(before) > 4:
                threads[now[0]]["cpu_s"] += (now[4] - before[4]) / 1e9
            elif before:
                threads[now[0]]["cpu_s"] += (now[1] - before[1]) / tck
        total_cpu = (b["ticks"] - a["ticks"]) / tck
        # The counters run from the snapshot before enabling to the one after disabling: the
        # end of the pause and the phase. Rates per second use that span.
        counted = b.get("time", 0) - a.get("time", 0)
        # What the rest of the machine ran meanwhile, in cores (busy less server and client).
        busy = (b["machine_busy"] - a["machine_busy"]) / tck
        client = (lg.get("client_cpu_ratio") or 0) * secs
        others = max(busy - total_cpu - client, 0) / counted if counted > 0 else None
    else:
        counted, others = 0, None
    # The stat run's own span (its snapshots bracket the counters), for rates per second.
    try:
        st = [json.loads(l) for l in open(f"{base}.proc") if l.strip()]
        stat_secs = st[1]["time"] - st[0]["time"]
    except (OSError, ValueError, IndexError, KeyError):
        stat_secs = counted_lg["measured_s"]
    return {"threads": threads, "secs": secs, "n": n, "rps": n / secs, "cpu_s": total_cpu,
            "counted_s": stat_secs, "others": others}


def stat_section(d):
    print("## Syscalls and context switches per request (perf stat, native)\n")
    stats = {}
    for case in CASES:
        for server in SERVERS:
            stats[(case, server)] = load_stat(d, case, server)
    for case in CASES:
        print(f"### {case}\n")
        cols = ["CPU µs", "cs", "syscalls"] + SYSCALLS
        print("| server | thread | " + " | ".join(cols) + " |")
        print("|---|---|" + "---|" * len(cols))
        for server in SERVERS:
            s = stats[(case, server)]
            req = s["n"]
            rows = dict(s["threads"])
            tot = defaultdict(float)
            for t in rows.values():
                for k, v in t.items():
                    tot[k] += v
            rows["**all**"] = tot
            for name, t in sorted(rows.items(), key=lambda kv: (kv[0] == "**all**", -kv[1].get("cpu_s", 0))):
                cells = [t.get("cpu_s", 0) / req * 1e6, t.get("cs", 0) / req,
                         t.get("syscalls", 0) / req] + [t.get(k, 0) / req for k in SYSCALLS]
                if name != "**all**" and not any(cells):
                    continue
                print(f"| {server} | {name} | " + " | ".join(
                    "" if not v else (f"{v:.2f}" if i == 0 else f"{v:.3f}") for i, v in enumerate(cells)) + " |")
        rates = ", ".join(f"{srv} {stats[(case, srv)]['rps']:,.0f}" for srv in SERVERS)
        counted = ", ".join(f"{srv} {stats[(case, srv)]['n']:,}" for srv in SERVERS)
        others = ", ".join(f"{srv} {fmt(stats[(case, srv)]['others'], '{:.2f}')}" for srv in SERVERS)
        print(f"\nOther processes used {others} cores during the CPU-timed runs (above about "
              "0.15 their CPU times are not of record; the counts per request hardly move).")
        print(f"\nAt {rates} req/s ({counted} requests counted). CPU µs: per request, on a "
              "CPU by /proc/PID/task/*/schedstat in the perf record run (counting tracepoints "
              "would slow the server); cs: context switches (perf's software event); the "
              "syscall columns: per request, by kind.\n")
    return stats


# ---- perf record --------------------------------------------------------------------------

def profile_section(d, stats):
    print("## Profile (perf record -e cpu-clock -F 999 -g, native)\n")
    print("Shares of the server's samples by thread and object, and the same in µs per request "
          "(share x the server's CPU per request in the same run).\n")
    for case in CASES:
        for server in SERVERS:
            path = d / f"perf-{case}-{server}.dso.txt"
            try:
                text = open(path).read()
            except OSError as e:
                die(f"{path}: {e}")
            m = re.search(r"# Samples: (\S+)", text)
            samples = m.group(1) if m else "?"
            s = stats[(case, server)]
            us_req = s["cpu_s"] / s["n"] * 1e6 if s.get("cpu_s") else None
            print(f"### {case} / {server}: {samples} samples, {fmt(us_req, '{:.2f}')} µs of server CPU per request\n")
            print("| share | thread | object | µs/request |")
            print("|---|---|---|---|")
            shown = 0.0
            for line in text.splitlines():
                m = re.match(r"\s+([\d.]+)%\s+(\S+(?: \S+)*?)\s{2,}(\S+)\s*$", line)
                if not m:
                    continue
                share = float(m.group(1))
                if share < 1.0:
                    continue
                shown += share
                print(f"| {share:.1f} % | {m.group(2)} | {m.group(3)} | "
                      f"{fmt(share / 100 * us_req if us_req else None, '{:.3f}')} |")
            print(f"\n(rows under 1 % left out; shown: {shown:.0f} %)\n")
            sym = d / f"perf-{case}-{server}.sym.txt"
            try:
                lines = open(sym).read().splitlines()
            except OSError as e:
                die(f"{sym}: {e}")
            top = []
            for line in lines:
                m = re.match(r"\s+([\d.]+)%\s+(\S+(?: \S+)*?)\s{2,}\[(.)\]\s+(.*)$", line)
                if m and len(top) < 15:
                    top.append((float(m.group(1)), m.group(2), m.group(3), m.group(4).strip()))
            print("Top symbols: " + "; ".join(f"{p:.1f} % {c} {'kernel ' if k == 'k' else ''}`{s[:60]}`"
                                              for p, c, k, s in top) + "\n")


def main():
    if len(sys.argv) != 2:
        die("usage: account_report.py DIR (from scripts/perf.sh account)")
    d = Path(sys.argv[1])
    try:
        print("# Time account: " + d.name + "\n")
        print("```\n" + open(d / "machine.txt").read().strip() + "\n```\n")
    except OSError as e:
        die(f"{d}/machine.txt: {e}")
    out = callgrind_section(d)
    stats = stat_section(d)
    guard_section(out, stats)
    profile_section(d, stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
