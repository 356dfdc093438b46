#!/usr/bin/python3
"""Timeline charts (PNG) for the drills, from the CSVs they keep beside them.

  chart.py RUNDIR [--title T] [--out PNG]
      RUNDIR/timeline.csv: t_s, then req_<system> columns (requests per time step,
      one line each) and *_fail columns (errors per step, drawn as bars below);
      RUNDIR/events.csv: t_s, event (vertical lines: faults, moves, repairs).
  chart.py --combine RESULTS [--title T] --out PNG
      one panel per RESULTS/*/timeline.csv, stacked, sharing the time axis.
  chart.py --failover RESULTS --out PNG
      the failover drill's runs (RESULTS/r*-FAULT-SYSTEM/timeline.tsv and meta.env):
      one panel per fault, ringlb and HAProxy side by side.

Needs matplotlib (Debian: python3-matplotlib), hence /usr/bin/python3.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#17becf"]
FAIL_COLORS = ["#d62728", "#ff7f0e", "#e377c2"]


def read_timeline(path: Path) -> tuple[list[float], dict[str, list[float]]]:
    delim = "\t" if path.suffix == ".tsv" else ","
    with open(path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delim))
    head, body = rows[0], rows[1:]
    t = [float(r[0]) for r in body]
    cols = {}
    for i, name in enumerate(head[1:], start=1):
        try:
            cols[name] = [float(r[i]) for r in body]
        except ValueError:
            continue   # a text column (the failover drill's event marks)
    return t, cols


def read_events(path: Path) -> list[tuple[float, str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    return [(float(r[0]), r[1]) for r in rows if len(r) >= 2]


def panel(ax, t, cols, events, title, step_label):
    req = {k: v for k, v in cols.items() if not k.endswith("fail")}
    fails = {k: v for k, v in cols.items() if k.endswith("fail")}
    for i, (name, ys) in enumerate(req.items()):
        ax.plot(t, ys, color=COLORS[i % len(COLORS)], lw=1.2, label=name.removeprefix("req_"))
    ax.set_ylabel(f"requests / {step_label}")
    ax.set_ylim(bottom=0)
    if fails:
        ax2 = ax.twinx()
        width = (t[1] - t[0]) if len(t) > 1 else 0.1
        bottom = [0.0] * len(t)
        for i, (name, ys) in enumerate(fails.items()):
            ax2.bar(t, ys, width=width, bottom=bottom, align="edge", alpha=0.7,
                    color=FAIL_COLORS[i % len(FAIL_COLORS)], label=name.replace("_", " "))
            bottom = [b + y for b, y in zip(bottom, ys)]
        top = max(bottom + [1])
        ax2.set_ylim(0, max(5, top * 1.3))
        ax2.set_ylabel("errors / step", color=FAIL_COLORS[0])
        h2, l2 = ax2.get_legend_handles_labels()
    else:
        h2, l2 = [], []
    for x, label in events:
        ax.axvline(x, color="black", ls="--", lw=0.8)
        ax.text(x, 1.0, " " + label, rotation=90, va="top", ha="left", fontsize=7,
                transform=ax.get_xaxis_transform())
    h1, l1 = ax.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="lower left", fontsize=7, ncol=4)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)


def one(rundir: Path, title: str, out: Path) -> None:
    t, cols = read_timeline(rundir / "timeline.csv")
    fig, ax = plt.subplots(figsize=(10, 3.2))
    panel(ax, t, cols, read_events(rundir / "events.csv"), title, "100 ms")
    ax.set_xlabel("seconds since the load started")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def combine(results: Path, title: str, out: Path) -> None:
    runs = sorted(p.parent for p in results.glob("*/timeline.csv"))
    runs.sort(key=lambda p: p.stat().st_mtime)
    if not runs:
        sys.exit("no */timeline.csv under " + str(results))
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.6 * len(runs)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs):
        t, cols = read_timeline(run / "timeline.csv")
        panel(ax, t, cols, read_events(run / "events.csv"), run.name, "100 ms")
    axes[-1, 0].set_xlabel("seconds since the load started")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def failover(results: Path, out: Path) -> None:
    """scripts/failover-drill.sh: round 1 of each fault, ringlb beside HAProxy."""
    runs: dict[str, dict[str, Path]] = {}
    for d in sorted(results.glob("r1-*-*")):
        if (d / "meta.env").exists() and (d / "timeline.tsv").exists():
            _, fault, system = d.name.split("-", 2)
            runs.setdefault(fault, {})[system] = d
    if not runs:
        sys.exit("no r1-*/timeline.tsv under " + str(results))
    faults = sorted(runs, key=lambda f: {"kill": 0, "stop": 1, "drop": 2}.get(f, 9))
    systems = ["ringlb", "haproxy"]
    fig, axes = plt.subplots(len(faults), 2, figsize=(13, 2.8 * len(faults)), sharex=True, squeeze=False)
    for row, fault in enumerate(faults):
        for col, system in enumerate(systems):
            ax = axes[row, col]
            d = runs[fault].get(system)
            if d is None:
                ax.set_visible(False)
                continue
            t, cols = read_timeline(d / "timeline.tsv")
            meta = dict(l.split("=", 1) for l in (d / "meta.env").read_text().splitlines() if "=" in l)
            t0 = float(meta["t_start"])
            events = [(float(meta["t_fault"]) - t0, f"{fault}"), (float(meta["t_recover"]) - t0, "recover")]
            # The timeline marks DOWN/UP in its event column at its step.
            with open(d / "timeline.tsv") as f:
                for r in list(csv.reader(f, delimiter="\t"))[1:]:
                    for mark in r[4].split() if len(r) > 4 else []:
                        if mark in ("DOWN", "UP"):
                            events.append((float(r[0]), mark))
            cols = {"req_active": cols["active_req"], "req_passive": cols["passive_req"],
                    "new_conn_fail": cols["probe_fail"]}
            step = t[1] - t[0] if len(t) > 1 else 0.25
            panel(ax, t, cols, events, f"{system}: {fault} of the active backend", f"{int(step * 1000)} ms")
    for ax in axes[-1]:
        ax.set_xlabel("seconds since the load started")
    fig.suptitle("failover-drill: requests per backend and failed new connections, ringlb (left) and HAProxy (right)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("rundir", nargs="?")
    ap.add_argument("--combine", metavar="RESULTS")
    ap.add_argument("--failover", metavar="RESULTS")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.failover:
        failover(Path(a.failover), Path(a.out))
    elif a.combine:
        combine(Path(a.combine), a.title, Path(a.out))
    elif a.rundir:
        one(Path(a.rundir), a.title, Path(a.out))
    else:
        ap.error("give RUNDIR, --combine or --failover")
    return 0


if __name__ == "__main__":
    sys.exit(main())
