#!/usr/bin/env python3
"""Draws throughput and latency percentiles against the number of clients from the JSON lines
that scripts/perf.sh writes:  plot.py target/perf/clients.jsonl target/perf/clients.png"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main() -> None:
    rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    clients = [r["clients"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(clients, [r["result"]["throughput_rps"] / 1000 for r in rows], marker="o")
    left.set(xscale="log", xlabel="client connections (window 4)", ylabel="thousand requests/s",
             title="Throughput")
    for key, label in (("p50_us", "p50"), ("p99_us", "p99"), ("p999_us", "p99.9")):
        right.plot(clients, [r["result"][key] / 1000 for r in rows], marker="o", label=label)
    right.set(xscale="log", yscale="log", xlabel="client connections (window 4)", ylabel="ms",
              title="Latency")
    right.legend()
    for ax in (left, right):
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("broker, echo, 64 B, 2 workers, 2-core machine (server core 1, client core 0)")
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=100)


if __name__ == "__main__":
    main()
