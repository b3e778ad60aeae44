#!/usr/bin/env python3
"""The overload table of `scripts/perf.sh overload` (issue 20): goodput as a share of capacity,
late OK replies, ERR latency and recovery, from the JSON lines benches/c/overload.c printed, one
per point. Usage: overload_report.py RESULTS.jsonl"""
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
r0 = rows[0]["result"]
print(f"Open loop, {r0['clients']} DEALER clients, Poisson arrivals, {r0['duration_s']:g} s per point, "
      f"client deadline {r0['deadline_ms']} ms, deadline header {'on' if r0['header'] else 'off'}; "
      f"`--workers 2 --handler sleep`, capacity = 2 / service time.\n")
print("| handler | offered | req/s | goodput (OK within deadline, share of capacity) | late OK "
      "(share of OK) | late OK latency p50 / p99 | ERR by code | ERR p99 | no reply within "
      "deadline + 100 ms | unanswered at end | recovery (first OK after load; less its own service time) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for row in rows:
    r, cap = row["result"], row["capacity_rps"]
    ok = r["ok_within_deadline"] + r["ok_late"]
    goodput = r["ok_within_deadline"] / (cap * r["duration_s"])
    late = r["ok_late"] / ok if ok else 0
    errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].items())) or "0"
    err_p99 = f"{r['err_latency_us']['p99'] / 1000:.1f} ms" if r["err"] else "n/a"
    ll = r["late_latency_us"]
    late_lat = f"{ll['p50'] / 1e6:.1f} / {ll['p99'] / 1e6:.1f} s" if r["ok_late"] else "n/a"
    rec = r["recovery"]["first_ok_ms"]
    rec = (f"{rec:.0f} ms ({max(rec - row['handler_ms'], 0):.0f} ms)" if rec is not None
           else f"none within {r['collect_s']:.0f} s")
    print(f"| {row['handler_ms']} ms | {row['multiple']}x | {r['rate']:g} | {r['ok_within_deadline']} "
          f"({goodput:.1%}) | {r['ok_late']} ({late:.1%}) | {late_lat} | {errs} | {err_p99} "
          f"| {r['no_reply_within_deadline_plus_grace']} | {r['unanswered_at_end']} | {rec} |")
print(f"\nRaw: {sys.argv[1]}. Late replies are counted until the end of the collection window "
      f"(the drain after the load); what is still queued then is 'unanswered at end'.")
