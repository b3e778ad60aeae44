#!/usr/bin/env python3
"""Draws the Grafana dashboard's panels (broker.json) from Prometheus range-query results, with
matplotlib: Grafana cannot be installed here, so broker/tests/autoscaling.rs evaluates every
panel's queries against its live brokers and hands the results to this script.

    render.py DATA.json OUT.png

DATA.json: {"title": ..., "panels": [{"title", "unit", "threshold", "targets":
[{"legendFormat", "result": <Prometheus matrix result>}]}]} in the dashboard's panel order.
Exits 1 if a target has no series (the test fails before that, with the query)."""

import json
import re
import sys

import matplotlib

matplotlib.use("Agg")  # no display: write the file only
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

UNITS = {
    "s": lambda v: f"{v * 1000:.0f} ms" if v < 1 else f"{v:.1f} s",
    "bytes": lambda v: f"{v / 2**20:.0f} MiB",
    "reqps": lambda v: f"{v:g}/s",
    "short": lambda v: f"{v:g}",
}


def legend(template, labels):
    """Grafana's legendFormat: {{label}} replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template) or str(labels)


def main(data_path, out_path):
    with open(data_path, encoding="utf-8") as f:
        data = json.load(f)
    panels = data["panels"]
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.4 * rows), squeeze=False)
    start = min(float(v[0]) for p in panels for t in p["targets"] for s in t["result"] for v in s["values"])
    for ax, panel in zip(axes.flat, panels):
        for target in panel["targets"]:
            if not target["result"]:
                print(f"render: panel {panel['title']!r}: a query returned no series", file=sys.stderr)
                return 1
            for series in target["result"]:
                xs = [float(t) - start for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, linewidth=1.2, label=legend(target.get("legendFormat", ""), series["metric"]))
        if panel.get("threshold") is not None:
            ax.axhline(panel["threshold"], color="red", linestyle="--", linewidth=1, label="target")
        ax.set_title(panel["title"], fontsize=10, loc="left")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, u=UNITS.get(panel["unit"], UNITS["short"]): u(v)))
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(data["title"], fontsize=12, x=0.01, ha="left")
    fig.tight_layout()
    fig.savefig(out_path, dpi=80)
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1], sys.argv[2]))
