#!/usr/bin/env python3
"""The report of scripts/compare.sh: tables, issue 23's targets as ratio ranges, and the
soundness checks, from the JSON lines the harness wrote (one per run).

    compare_report.py RUNS.jsonl [--broker-ok 0|1] [--summary OUT.json]

Markdown on stdout. Exit 1 if a server lost or garbled a reply, a run gave no result, or the
broker did not build (then its rows are missing); 0 otherwise, whether targets are met or not
(the report says which).

Per run, from the harness's two /proc snapshots around the measured window:
- server CPU per request: utime + stime of the whole process over the window / requests
  answered in it (the client's answered_rps x its measured window);
- context switches per request: voluntary + involuntary, summed over the server's threads;
- foreign CPU: machine busy time less server and client, in cores: what others ran meanwhile.
Syscalls per request come from the separate counting runs (mode "count").
"""
import argparse
import json
import statistics
import sys

BASELINES = ["c-proxy", "c-proxy-dealer"]
LEAN = "c-proxy-dealer"
# A run in which the rest of the machine used more than this many cores is not of record.
FOREIGN_LIMIT = 0.15
# A client at this share of its CPUs sets the pace itself: its ratio is not claimed.
SATURATED = 0.95
# A measured window this much longer than asked for means the whole machine stalled.
STALL_LIMIT = 0.5

CASE_TITLES = {
    "throughput": "Throughput: 16 clients x 16 window x 64 B",
    "latency": "Latency: 1 client x 1 window x 64 B (server and client on one CPU)",
    "large": "Large: 4 clients x 4 window x 65536 B",
}
SERVERS = ["broker", "broker-no-metrics", "c-proxy", "c-proxy-dealer", "router-echo",
           "pyzmq-talk", "broker-curve", "c-proxy-curve"]


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec="{:.0f}"):
    return "n/a" if x is None else spec.format(x)


def ratio(a, b):
    return a / b if a is not None and b else None


def pin_label(pin):
    s, c = pin.split("/")
    return f"server CPU {s}, client CPU {c}" if s != c else f"both on CPU {s}"


def run_measures(row):
    """Per-run figures from the /proc snapshots: CPU and switches per request, foreign load.

    The snapshots bracket about the client's window but not exactly (each is a process start
    on a busy machine), so the server's figures are rates over the snapshots' own span,
    divided by the client's request rate over its own window."""
    res = row.get("result") or {}
    snaps = row.get("snapshots")
    rps = res.get("answered_rps") or 0
    if not snaps or not rps:
        return {}
    a, b = snaps
    tck = row["clk_tck"]
    span = b.get("time", 0) - a.get("time", 0)
    if span <= 0:
        span = row["window_s"]
    cpu_s = (b["ticks"] - a["ticks"]) / tck
    threads = {}
    cs_total = 0
    for tid, now in b["tasks"].items():
        if tid not in a["tasks"]:
            continue
        name, ticks, vol, invol = now[:4]
        before = a["tasks"][tid]
        cs = (vol - before[2]) + (invol - before[3])
        cs_total += cs
        t = threads.setdefault(name, {"cpu_s": 0.0, "cs": 0, "vol": 0})
        # Per thread, schedstat's nanoseconds where the snapshot has them (ticks are 10 ms).
        t["cpu_s"] += ((now[4] - before[4]) / 1e9 if len(now) > 4 and len(before) > 4
                       else (ticks - before[1]) / tck)
        t["cs"] += cs
        t["vol"] += vol - before[2]
    per_req = lambda x: x / span / rps  # a count over the span, per request
    client_cores = res.get("client_cpu_ratio") or 0
    foreign = ((b["machine_busy"] - a["machine_busy"]) / tck - cpu_s) / span - client_cores
    steal = (b["machine_steal"] - a["machine_steal"]) / tck / span
    return {
        "cpu_us_per_req": per_req(cpu_s) * 1e6,
        "server_cpu": cpu_s / span,
        "cs_per_req": per_req(cs_total),
        "foreign_cores": max(foreign, 0.0),
        "steal_cores": steal,
        # The client's own clock: a window that ran long means the whole machine stalled.
        "stretch_s": (res.get("measured_s") or 0) - (res.get("duration_s") or 0),
        "threads": {n: {"cpu_us_per_req": per_req(t["cpu_s"]) * 1e6,
                        "cs_per_req": per_req(t["cs"]),
                        "vol_per_req": per_req(t["vol"])} for n, t in threads.items()},
    }


class Report:
    def __init__(self, rows, broker_ok):
        self.rows = rows
        self.broker_ok = broker_ok
        self.failed = []  # (where, why): exit status 1
        self.timed = {}
        self.counts = {}
        for r in rows:
            key = (r["case"], r["pin"], r["server"])
            (self.counts if r.get("mode") == "count" else self.timed).setdefault(key, []).append(r)
        self.S = {}

    def pins(self, case):
        seen = []
        for (c, pin, _), _ in self.timed.items():
            if c == case and pin not in seen:
                seen.append(pin)
        return seen

    def summary(self, case, pin, server):
        key = (case, pin, server)
        if key in self.S:
            return self.S[key]
        all_runs = self.timed.get(key, [])
        runs = [r for r in all_runs if not (r.get("note") or "").startswith("skipped")]
        ok = [r for r in runs if r["result"] is not None]
        res = [r["result"] for r in ok]
        errors = {}
        for x in res:
            for code, n in (x.get("errors") or {}).items():
                errors[code] = errors.get(code, 0) + n
        lat = lambda k: med(x.get("latency_us", {}).get(k) for x in res)
        m = [run_measures(r) for r in ok]
        threads = {}
        for x in m:
            for name, t in (x.get("threads") or {}).items():
                threads.setdefault(name, []).append(t)
        count = self.count_summary(case, pin, server)
        s = {
            "runs": len(runs), "measured": len(res), "skipped": len(all_runs) - len(runs),
            "rps": med(x.get("throughput_rps") for x in res),
            "rps_runs": [round(x.get("throughput_rps") or 0) for x in res],
            "p50": lat("p50"), "p99": lat("p99"), "p999": lat("p999"),
            "errors": errors,
            "lost": sum(x.get("lost") or 0 for x in res),
            "mismatched": sum(x.get("mismatched") or 0 for x in res),
            "client_cpu": med(x.get("client_cpu_ratio") for x in res),
            "client_cpus": med(x.get("client_cpus") for x in res),
            "server_cpu": med(x.get("server_cpu") for x in m),
            "cpu_us_per_req": med(x.get("cpu_us_per_req") for x in m),
            "cs_per_req": med(x.get("cs_per_req") for x in m),
            "foreign_max": max((x.get("foreign_cores") for x in m if x), default=None),
            "steal_max": max((x.get("steal_cores") for x in m if x), default=None),
            "stretch_max": max((x.get("stretch_s") for x in m if x), default=None),
            "threads": {n: {k: med(t[k] for t in ts) for k in ts[0]} for n, ts in threads.items()},
            "syscalls_per_req": count.get("per_req"),
            "syscalls_by_thread": count.get("by_thread"),
            "notes": sorted({r["note"] for r in all_runs if r.get("note")}),
            "bad_exit": sorted({r["server_rc"] for r in runs if r.get("server_rc") not in (None, 0)}),
        }
        s["saturated"] = (s["client_cpu"] is not None and bool(s["client_cpus"])
                          and s["client_cpu"] >= SATURATED * s["client_cpus"])
        self.S[key] = s
        if s["runs"]:
            why = []
            if s["measured"] < s["runs"]:
                why.append(f"{s['runs'] - s['measured']} of {s['runs']} runs gave no result")
            if s["lost"] or s["mismatched"]:
                why.append(f"{s['lost']} lost, {s['mismatched']} mismatched")
            if why:
                self.failed.append((f"{case} {pin} / {server}", "; ".join(why)))
        return s

    def count_summary(self, case, pin, server):
        for r in self.counts.get((case, pin, server), []):
            res = r.get("result") or {}
            requests = (res.get("answered_rps") or 0) * (res.get("measured_s") or 0)
            if r.get("syscalls") is None or not requests:
                continue
            return {"per_req": r["syscalls"] / requests,
                    "by_thread": {n: c / requests for n, c in r["syscalls_by_thread"].items()}}
        return {}

    # ---- tables --------------------------------------------------------------------------

    def tables(self):
        for case in CASE_TITLES:
            for pin in self.pins(case):
                self.table(case, pin)
        print("CPU columns: server CPU seconds per wall second over the measured window, and its "
              "CPU µs per request (all threads, /proc/PID/stat); client CPU of the CPUs it may use. "
              "cs/req: context switches per request, all server threads; sys/req: syscalls per "
              "request (separate counting run, first pinning only). A client at its limit means "
              "that row measures the client, not the server.\n")

    def table(self, case, pin):
        servers = [s for s in SERVERS if self.timed.get((case, pin, s))]
        if not servers:
            return
        base = {b: self.summary(case, pin, b) for b in BASELINES}
        print(f"## {CASE_TITLES[case]}; {pin_label(pin)}\n")
        if case == "latency":
            print("| server | p50 µs | p99 µs | p99.9 µs | p50 / c-proxy | p50 / dealer | p99 / c-proxy "
                  "| p99 / dealer | req/s | errors | lost | mismatched | server CPU | CPU µs/req "
                  "| cs/req | sys/req |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        else:
            print("| server | req/s | / c-proxy | / dealer | p50 µs | p99 µs | errors | lost "
                  "| mismatched | client CPU | server CPU | CPU µs/req | cs/req | sys/req | runs req/s |")
            print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        for server in servers:
            s = self.summary(case, pin, server)
            errs = ", ".join(f"{k}: {v}" for k, v in sorted(s["errors"].items())) or "0"
            ccpu = ("n/a" if s["client_cpu"] is None
                    else f"{s['client_cpu']:.2f}/{s['client_cpus']:.0f}")
            if s["saturated"] and case != "latency":
                ccpu += " (saturated)"
            name = server + (f" ({'; '.join(s['notes'])})" if s["notes"] else "")
            if s["foreign_max"] is not None and s["foreign_max"] > FOREIGN_LIMIT:
                name += f" [others used {s['foreign_max']:.2f} cores]"
            common = (f"| {fmt(s['server_cpu'], '{:.2f}')} | {fmt(s['cpu_us_per_req'], '{:.2f}')} "
                      f"| {fmt(s['cs_per_req'], '{:.2f}')} | {fmt(s['syscalls_per_req'], '{:.2f}')} |")
            if case == "latency":
                print(f"| {name} | {fmt(s['p50'], '{:.1f}')} | {fmt(s['p99'], '{:.1f}')} "
                      f"| {fmt(s['p999'], '{:.1f}')} "
                      + "".join(f"| {fmt(ratio(s[k], base[b]['p50' if k == 'p50' else 'p99']), '{:.2f}')} "
                                for k in ("p50", "p99") for b in BASELINES)
                      + f"| {fmt(s['rps'])} | {errs} | {s['lost']} | {s['mismatched']} " + common)
            else:
                print(f"| {name} | {fmt(s['rps'])} "
                      + "".join(f"| {fmt(ratio(s['rps'], base[b]['rps']), '{:.2f}')} " for b in BASELINES)
                      + f"| {fmt(s['p50'], '{:.1f}')} | {fmt(s['p99'], '{:.1f}')} | {errs} "
                      f"| {s['lost']} | {s['mismatched']} | {ccpu} " + common
                      + f" {s['rps_runs']} |")
        bench = self.timed.get((case, pin, "broker-bench-on-router-echo"))
        if bench:
            self.summary(case, pin, "broker-bench-on-router-echo")
        print()

    # ---- targets -------------------------------------------------------------------------

    def ratios(self, case, metric, server="broker", against=BASELINES):
        """[(pin, baseline, ratio, claimed)] of server's metric to each baseline's, per pin."""
        out = []
        for pin in self.pins(case):
            s = self.summary(case, pin, server)
            for b in against:
                t = self.summary(case, pin, b)
                r = ratio(s[metric], t[metric])
                if r is None:
                    continue
                claimed = case == "latency" or not (s["saturated"] or t["saturated"])
                out.append((pin, b, r, claimed))
        return out

    def targets(self):
        print("## Issue 23's targets: ratio ranges over baselines x pinnings\n")
        print("Each range is min..max over the medians of every (baseline, pinning) pair; the "
              "target is judged against the leaner c-proxy-dealer on both pinnings. A ratio "
              "marked * came from a run whose client was saturated: it is shown, not claimed.\n")
        print("| target | goal | all baselines x pinnings | vs c-proxy-dealer | per pinning | met |")
        print("|---|---|---|---|---|---|")
        rows = [
            ("throughput 16x16x64 B, broker / proxy", ">= 1.3", self.ratios("throughput", "rps"), lambda r: r >= 1.3),
            ("throughput case p99, broker / proxy", "<= 1.0", self.ratios("throughput", "p99"), lambda r: r <= 1.0),
            ("latency p50, broker / proxy", "<= 1.0", self.ratios("latency", "p50"), lambda r: r <= 1.0),
            ("latency p99, broker / proxy", "<= 1.0", self.ratios("latency", "p99"), lambda r: r <= 1.0),
            ("latency p50, broker / pyzmq-talk", "<= 1.1",
             self.ratios("latency", "p50", against=["pyzmq-talk"]), lambda r: r <= 1.1),
            ("CPU per request (throughput), broker / proxy", "<= 1.0",
             self.ratios("throughput", "cpu_us_per_req"), lambda r: r <= 1.0),
            ("CPU per request (latency), broker / proxy", "<= 1.0",
             self.ratios("latency", "cpu_us_per_req"), lambda r: r <= 1.0),
            ("64 KiB 4x4, broker / proxy", ">= 1.0", self.ratios("large", "rps"), lambda r: r >= 1.0),
        ]
        self.target_rows = []
        for name, goal, rs, ok in rows:
            if not rs:
                print(f"| {name} | {goal} | n/a | n/a | | n/a |")
                continue
            allr = [r for _, _, r, _ in rs]
            lean = [(p, r, c) for p, b, r, c in rs if b in (LEAN, "pyzmq-talk")]
            judged = [r for _, r, c in lean if c]
            met = "n/a" if not judged else ("yes" if all(ok(r) for r in judged) else "**no**")
            if lean and len(judged) < len(lean):
                met += " (not all claimed)"
            per_pin = "; ".join(
                f"{p}: " + ", ".join(f"{'dealer' if b == LEAN else b} {r:.2f}{'' if c else '*'}"
                                     for pp, b, r, c in rs if pp == p)
                for p in dict.fromkeys(p for p, _, _, _ in rs))
            lean_range = (f"{min(r for _, r, _ in lean):.2f}..{max(r for _, r, _ in lean):.2f}"
                          if lean else "n/a")
            print(f"| {name} | {goal} | {min(allr):.2f}..{max(allr):.2f} | {lean_range} "
                  f"| {per_pin} | {met} |")
            self.target_rows.append({"target": name, "goal": goal, "range": [min(allr), max(allr)],
                                     "per_pinning": [{"pin": p, "baseline": b, "ratio": r,
                                                      "claimed": c} for p, b, r, c in rs],
                                     "met": met})
        refusals = {}
        for (case, pin, server), runs in self.timed.items():
            if server.startswith("broker") and server != "broker-bench-on-router-echo":
                for code, n in self.summary(case, pin, server)["errors"].items():
                    refusals[code] = refusals.get(code, 0) + n
        total = sum(refusals.values())
        detail = ", ".join(f"{k}: {v}" for k, v in sorted(refusals.items())) or "none"
        print(f"| refusals (ERR replies) in every broker run | 0 | {total} ({detail}) | | "
              f"| {'yes' if total == 0 else '**no**'} |")
        print()

    # ---- checks --------------------------------------------------------------------------

    def checks(self):
        print("## Checks\n")
        for pin in self.pins("throughput"):
            echo = self.summary("throughput", pin, "router-echo")
            for b in BASELINES:
                h = ratio(echo["rps"], self.summary("throughput", pin, b)["rps"])
                required = b == "c-proxy"
                print(f"    harness check ({pin}): router-echo / {b} = {fmt(h, '{:.2f}')}"
                      + (" (>= 1.5 required)" if required else " (shown)"))
                if required and (h is None or h < 1.5):
                    print("    !!! HARNESS CHECK FAILED on this pinning: the load client is the "
                          "bottleneck (or a baseline failed), so its ratios mean nothing.")
            print(f"      (on router-echo the client used {fmt(echo['client_cpu'], '{:.2f}')} of "
                  f"its CPU, the server {fmt(echo['server_cpu'], '{:.2f}')} of its)")
            if (echo["client_cpu"] or 0) < 0.85 and (echo["server_cpu"] or 0) < 0.85:
                print("    !!! neither side of router-echo used its CPU: something else is running "
                      "on these CPUs (see top); rerun on a quiet machine")
        self.bench_check()
        sat = []
        for case in ("throughput", "large"):
            for pin in self.pins(case):
                for server in ["broker"] + BASELINES:
                    s = self.summary(case, pin, server)
                    if s["client_cpu"] is not None:
                        sat.append((case, pin, server, s["client_cpu"], s["client_cpus"], s["saturated"]))
        bad = [x for x in sat if x[5]]
        print(f"    client CPU where ratios are claimed (< {SATURATED:.0%} of its CPUs required): "
              + ("all below" if not bad else "SATURATED in " + ", ".join(
                  f"{c} {p} {s} ({u:.2f}/{n:.0f})" for c, p, s, u, n, _ in bad)
                  + ": those ratios are not claimed"))
        busy = sorted({(c, p, s, round(x["foreign_max"], 2)) for (c, p, s), _ in self.timed.items()
                       for x in [self.summary(c, p, s)]
                       if x["foreign_max"] is not None and x["foreign_max"] > FOREIGN_LIMIT})
        print(f"    quiet machine (others used <= {FOREIGN_LIMIT} cores in every run): "
              + ("yes" if not busy else f"NO, in {len(busy)} series, e.g. "
                 + ", ".join(f"{c} {p} {s} {f}" for c, p, s, f in busy[:6])
                 + ": these timings are not of record"))
        stalled = sorted({(c, p, s, round(x["stretch_max"], 1)) for (c, p, s), _ in self.timed.items()
                          for x in [self.summary(c, p, s)]
                          if x["stretch_max"] is not None and x["stretch_max"] > STALL_LIMIT})
        if stalled:
            print(f"    !!! the machine stalled (a measured window ran over {STALL_LIMIT} s long) in: "
                  + ", ".join(f"{c} {p} {s} (+{t} s)" for c, p, s, t in stalled)
                  + ": those series are not of record")
        bm = self.summary("throughput", self.pins("throughput")[0], "broker")["rps"] if self.pins("throughput") else None
        bn = self.summary("throughput", self.pins("throughput")[0], "broker-no-metrics")["rps"] if self.pins("throughput") else None
        cost = (1 - bm / bn) * 100 if bm is not None and bn else None
        print(f"    metrics cost = {fmt(cost, '{:.1f}')} % (1 - broker/broker-no-metrics, first pinning)")
        for case in ("throughput", "latency"):
            pins = self.pins(case)
            if not pins:
                continue
            for plain in ("broker", "c-proxy"):
                key = "rps" if case == "throughput" else "p50"
                r = ratio(self.summary(case, pins[0], plain + "-curve")[key],
                          self.summary(case, pins[0], plain)[key])
                if r is not None:
                    print(f"    CURVE cost, {plain}, {case}: {'throughput' if key == 'rps' else 'p50'} "
                          f"x{r:.2f} ({plain}-curve / {plain})")
        for (case, pin, server), s in sorted(self.S.items()):
            if s.get("bad_exit"):
                print(f"    note: {server} ({case} {pin}) exited with {s['bad_exit']} after SIGTERM")
        print()

    def bench_check(self):
        for pin in self.pins("throughput"):
            runs = self.timed.get(("throughput", pin, "broker-bench-on-router-echo"), [])
            if not runs:
                continue
            bench = [r["result"] for r in runs if r["result"] is not None and r.get("client_rc") == 0
                     and "throughput_rps" in r["result"]]
            b = med(x["throughput_rps"] for x in bench) if bench else None
            echo = self.summary("throughput", pin, "router-echo")["rps"]
            br = ratio(b, echo)
            if b is None:
                why = sorted({r.get("note") or f"exit {r.get('client_rc')}" for r in runs})
                extra = f"  (broker bench failed: {', '.join(map(str, why))})"
            else:
                p50 = med(x.get("latency_us", {}).get("p50") for x in bench)
                p99 = med(x.get("latency_us", {}).get("p99") for x in bench)
                extra = f"  (broker bench {b:.0f} req/s, p50 {fmt(p50, '{}')} µs, p99 {fmt(p99, '{}')} µs)"
            print(f"    broker bench / C client on router-echo ({pin}) = {fmt(br, '{:.2f}')} "
                  f"(>= 0.8 required){extra}")
            if br is not None and br < 0.8:
                print("    !!! the broker's own load tool is well below the C client: its numbers understate")

    # ---- per-thread view -----------------------------------------------------------------

    def threads(self):
        print("## Server threads (median per run, first pinning)\n")
        print("| case | server | thread | CPU µs/req | cs/req | voluntary cs/req | sys/req |")
        print("|---|---|---|---|---|---|---|")
        for case in ("throughput", "latency"):
            pins = self.pins(case)
            if not pins:
                continue
            for server in ["broker"] + BASELINES:
                s = self.summary(case, pins[0], server)
                sysc = s.get("syscalls_by_thread") or {}
                for name, t in sorted(s["threads"].items(), key=lambda kv: -(kv[1]["cpu_us_per_req"] or 0)):
                    print(f"| {case} | {server} | {name} | {fmt(t['cpu_us_per_req'], '{:.3f}')} "
                          f"| {fmt(t['cs_per_req'], '{:.3f}')} | {fmt(t['vol_per_req'], '{:.3f}')} "
                          f"| {fmt(sysc.get(name), '{:.3f}')} |")
        print()

    def commands(self):
        print("## Commands (round 1; ports differ per run)\n")
        for r in self.rows:
            if r["round"] == 1 and r.get("mode") == "timed" and (r["server_cmd"] or r["client_cmd"]):
                print(f"- {r['case']} {r['pin']} / {r['server']}:")
                print(f"  - server: `{r['server_cmd']}`")
                print(f"  - client: `{r['client_cmd']}`")
        print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--broker-ok", default="1", choices=["0", "1"])
    ap.add_argument("--summary", help="also write the summaries and targets as JSON here")
    args = ap.parse_args()
    try:
        rows = [json.loads(line) for line in open(args.jsonl) if line.strip()]
    except (OSError, ValueError) as e:
        sys.exit(f"compare_report: cannot read {args.jsonl}: {e}")
    rep = Report(rows, args.broker_ok == "1")
    rep.tables()
    rep.targets()
    rep.checks()
    rep.threads()
    rep.commands()
    if not rep.broker_ok:
        rep.failed.append(("all / broker", "did not build"))
    if rep.failed:
        print("## FAILED\n")
        for where, why in rep.failed:
            print(f"- {where}: {why}")
        print()
    if args.summary:
        with open(args.summary, "w") as f:
            json.dump({"series": [{"case": c, "pin": p, "server": s, **v}
                                  for (c, p, s), v in sorted(rep.S.items())],
                       "targets": rep.target_rows, "failed": rep.failed}, f, indent=1)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
