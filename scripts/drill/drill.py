#!/usr/bin/env python3
"""Helpers for scripts/failover-drill.sh (Python 3.11 standard library only).

Subcommands:
  stamp            copy stdin to stdout, prefixing each line with the epoch time
                   (seconds, ms precision) at which it arrived. Both proxies' logs
                   go through this, so ringlb and HAProxy are timed the same way.
  freeport         print a TCP port on 127.0.0.1 that is free right now.
  waitport H P S   wait up to S seconds until H:P accepts a TCP connection.
  probe ...        open one NEW connection every --interval seconds for
                   --duration seconds, send an HTTP/1.0 GET, log each attempt.
                   wrk reuses keep-alive connections; the probe is what shows
                   whether *new* connections fail after a backend is marked down.
  analyze RUNDIR   turn one run's raw logs into one result row (rows.jsonl) and
                   a per-100ms timeline (timeline.tsv).
  report ROWS      print the per-run table, the per-system/fault summary and the
                   pass/fail targets.

All times are epoch seconds (time.time(), bash $EPOCHREALTIME and nginx $msec
read the same clock), so no conversion is needed between sources.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import sys
import time
from pathlib import Path


# ---------------------------------------------------------------- small tools

def cmd_stamp(_args) -> int:
    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        out.write(b"%.3f " % time.time() + line)
        out.flush()
    return 0


def cmd_freeport(_args) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])
    return 0


def cmd_waitport(args) -> int:
    deadline = time.time() + args.seconds
    while time.time() < deadline:
        try:
            with socket.create_connection((args.host, args.port), timeout=0.2):
                return 0
        except OSError:
            time.sleep(0.02)
    print(f"waitport: {args.host}:{args.port} not accepting after {args.seconds}s", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- probe

async def _probe_one(host: str, port: int, timeout: float, out) -> None:
    start = time.time()
    outcome, backend = "ok", "-"
    writer = None
    try:
        async def attempt():
            nonlocal writer
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(b"GET /probe HTTP/1.0\r\n\r\n")
            await writer.drain()
            return await reader.read()  # until EOF: nginx closes after an HTTP/1.0 reply
        data = await asyncio.wait_for(attempt(), timeout)
        if not data:
            outcome = "eof"          # proxy accepted, then closed: no backend reached
        elif not data.startswith(b"HTTP/1.1 200"):
            outcome = "bad"
        else:
            m = re.search(rb"backend=(\w+)", data)
            backend = m.group(1).decode() if m else "?"
    except asyncio.TimeoutError:
        outcome = "timeout"
    except ConnectionRefusedError:
        outcome = "refused"
    except ConnectionResetError:
        outcome = "reset"
    except OSError as e:
        outcome = f"oserror{e.errno}"
    finally:
        if writer is not None:
            writer.close()
    out.write(f"{start:.3f}\t{time.time():.3f}\t{outcome}\t{backend}\n")
    out.flush()


async def paced(interval: float, duration: float, start) -> None:
    """Start the coroutine start() every interval s for duration s, each on time however
    long the earlier ones take; return when all have ended. (ha.py's probe uses it too.)"""
    tasks = []
    t0 = time.time()
    n = 0
    while t0 + n * interval < t0 + duration:
        await asyncio.sleep(max(0.0, t0 + n * interval - time.time()))
        tasks.append(asyncio.create_task(start()))
        n += 1
    await asyncio.gather(*tasks)


async def _probe(args) -> None:
    with open(args.out, "w") as out:
        out.write("start\tend\toutcome\tbackend\n")
        await paced(args.interval, args.duration,
                    lambda: _probe_one(args.host, args.port, args.timeout, out))


def cmd_probe(args) -> int:
    asyncio.run(_probe(args))
    return 0


# -------------------------------------------------------------------- analyze

def _read_meta(rundir: Path) -> dict:
    meta = {}
    for line in (rundir / "meta.env").read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k.strip()] = v.strip()
    return meta


def _access_times(path: Path, method: str = "GET") -> list[float]:
    """Times ($msec) of the requests with this method in an nginx access log
    written with log_format '$msec $request_method $status ...'. HEAD lines are
    the proxies' health checks and are left out."""
    times = []
    if not path.exists():
        return times
    with open(path, errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[1] == method:
                try:
                    times.append(float(parts[0]))
                except ValueError:
                    pass
    times.sort()
    return times


def _first_at_or_after(times: list[float], t: float):
    for x in times:
        if x >= t:
            return x
    return None


def _stamped_matches(path: Path, pattern: re.Pattern) -> list[float]:
    out = []
    if not path.exists():
        return out
    with open(path, errors="replace") as f:
        for line in f:
            ts, _, rest = line.partition(" ")
            if pattern.search(rest):
                try:
                    out.append(float(ts))
                except ValueError:
                    pass
    return out


def _wrk_summary(path: Path) -> dict | None:
    if not path.exists():
        return None
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("WRK_JSON "):
            return json.loads(line[len("WRK_JSON "):])
    return None


def _rnd(x):
    return None if x is None else round(x, 3)


def cmd_analyze(args) -> int:
    rundir = Path(args.rundir)
    meta = _read_meta(rundir)
    system, fault = meta["system"], meta["fault"]
    t_start, t_fault = float(meta["t_start"]), float(meta["t_fault"])
    t_recover, t_end = float(meta["t_recover"]), float(meta["t_end"])
    active, passive = meta["active"], meta["passive"]

    # Down/up transitions, as each proxy logs them (contract: "backend ADDR is
    # DOWN"; HAProxy: "Server be/active is DOWN").
    if system == "ringlb":
        pat = lambda addr, st: re.compile(r"backend " + re.escape(addr) + r" is " + st + r"\b")
        a_down, a_up = pat(active, "DOWN"), pat(active, "UP")
        p_down = pat(passive, "DOWN")
    else:
        # The raw log line (stdout) only; the same event also goes to stderr as
        # "[WARNING] (pid) : Server ...", which would count it twice.
        a_down = re.compile(r"^Server \S+/active is DOWN")
        a_up = re.compile(r"^Server \S+/active is UP")
        p_down = re.compile(r"^Server \S+/passive is DOWN")
    log = rundir / "proxy.log"
    downs = _stamped_matches(log, a_down)
    ups = _stamped_matches(log, a_up)
    passive_downs = _stamped_matches(log, p_down)
    t_down = _first_at_or_after(downs, t_fault)
    t_up = _first_at_or_after(ups, t_recover)

    act = _access_times(rundir / "active.access.log")
    pas = _access_times(rundir / "passive.access.log")
    t_backup = _first_at_or_after(pas, t_fault)
    t_back_log = _first_at_or_after(act, t_recover)

    # Probe: one new connection every 20 ms.
    probes = []
    ppath = rundir / "probe.tsv"
    if ppath.exists():
        for line in ppath.read_text().splitlines()[1:]:
            s, e, outcome, backend = line.split("\t")
            probes.append((float(s), float(e), outcome, backend))
    probes.sort()
    failed = [p for p in probes if p[2] != "ok"]
    # An attempt still in flight when the fault hit is the fault's doing: only
    # attempts that ended before the fault count as "before" (should be none).
    fail_before_fault = sum(1 for p in failed if p[1] < t_fault)
    # "After detection": connection attempts started once the proxy had logged
    # the DOWN. If it never did, every attempt after the fault counts.
    detect = t_down if t_down is not None else t_fault
    fail_fault_to_down = sum(1 for p in failed if p[1] >= t_fault and p[0] < detect)
    fail_after_down = sum(1 for p in failed if p[0] >= detect and p[0] < t_recover)
    fail_after_recover = sum(1 for p in failed if p[0] >= t_recover)
    outcomes = {}
    for p in failed:
        outcomes[p[2]] = outcomes.get(p[2], 0) + 1
    # Slowest successful new connection during the outage: HAProxy's retries
    # (1 s apart) show up here even when nothing fails.
    waits = [p[1] - p[0] for p in probes if t_fault <= p[0] < t_recover and p[2] == "ok"]
    max_wait = max(waits) if waits else None
    t_back_new = next((p[0] for p in probes if p[0] >= t_recover and p[3] == "active"), None)

    wrk = _wrk_summary(rundir / "wrk.out") or {}
    errors = None
    if wrk:
        errors = sum(wrk[k] for k in ("connect", "read", "write", "timeout", "status"))

    notes = []
    if len([d for d in downs if d >= t_fault]) > 1:
        notes.append("active flapped")
    if [d for d in downs if d < t_fault]:
        notes.append("active DOWN before fault")
    if passive_downs:
        notes.append("passive marked DOWN")
    if not wrk:
        notes.append("no wrk summary")
    if fail_before_fault:
        notes.append(f"{fail_before_fault} probe fails before the fault")
    if t_down is None:
        notes.append("DOWN never logged")

    row = {
        "system": system, "fault": fault, "round": int(meta["round"]),
        "requests": wrk.get("requests"), "errors": errors,
        "wrk_errors": {k: wrk.get(k) for k in ("connect", "read", "write", "timeout", "status")},
        "rps": round(wrk["requests"] / (wrk["duration_us"] / 1e6)) if wrk else None,
        "down_s": _rnd(t_down - t_fault) if t_down else None,
        "backup_s": _rnd(t_backup - t_fault) if t_backup else None,
        "up_s": _rnd(t_up - t_recover) if t_up else None,
        "back_log_s": _rnd(t_back_log - t_recover) if t_back_log else None,
        "back_new_s": _rnd(t_back_new - t_recover) if t_back_new else None,
        "probes": len(probes),
        "probe_fail_before_fault": fail_before_fault,
        "probe_fail_fault_to_down": fail_fault_to_down,
        "probe_fail_after_down": fail_after_down,
        "probe_fail_after_recover": fail_after_recover,
        "probe_outcomes": outcomes,
        "probe_max_wait_s": _rnd(max_wait),
        "notes": notes,
        "rundir": rundir.name,
    }
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")

    # Per-100ms timeline relative to the start of the load, for a reader who
    # wants to see where the traffic went (and chart.py --failover draws).
    step = 0.1
    nb = int((t_end - t_start) / step) + 2
    cols = {"active": [0] * nb, "passive": [0] * nb, "probe_fail": [0] * nb}
    for name, times in (("active", act), ("passive", pas)):
        for t in times:
            i = int((t - t_start) / step)
            if 0 <= i < nb:
                cols[name][i] += 1
    for p in failed:
        i = int((p[0] - t_start) / step)
        if 0 <= i < nb:
            cols["probe_fail"][i] += 1
    marks = {}
    for label, t in (("FAULT", t_fault), ("DOWN", t_down), ("RECOVER", t_recover), ("UP", t_up)):
        if t is not None:
            i = int((t - t_start) / step)
            marks[i] = (marks.get(i, "") + " " + label).strip()
    with open(rundir / "timeline.tsv", "w") as f:
        f.write("t_s\tactive_req\tpassive_req\tprobe_fail\tevent\n")
        for i in range(nb):
            f.write(f"{i * step:.2f}\t{cols['active'][i]}\t{cols['passive'][i]}\t{cols['probe_fail'][i]}\t{marks.get(i, '')}\n")
    return 0


# --------------------------------------------------------------------- report

def _fmt(x, digits=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) if i > 1 else h.ljust(w) for i, (h, w) in enumerate(zip(headers, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _median(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def cmd_report(args) -> int:
    rows = [json.loads(l) for l in Path(args.rows).read_text().splitlines() if l.strip()]
    if not rows:
        print("no results")
        return 1
    fault_order = {"kill": 0, "stop": 1, "drop": 2}
    rows.sort(key=lambda r: (fault_order.get(r["fault"], 9), r["round"], r["system"]))
    limit = args.detect_limit

    print("Per run (times in seconds; '-' = never happened in the run):")
    print("  requests/errors: wrk totals (errors = connect+read+write+timeout+non-2xx)")
    print("  down: fault -> proxy logged the active DOWN   backup: fault -> first GET on the passive")
    print("  up: recovery -> proxy logged the active UP    back(log): recovery -> first GET in the active's access log")
    print("  back(new): recovery -> first NEW probe connection answered by the active")
    print("     (back(log) is ~0 for stop/drop: requests held during the fault complete right after")
    print("      recovery; back(new) is the failback time that new connections see)")
    print("  new-conn fails: failed probe connections (1 new connection every 20 ms) started")
    print("     fault..down / after down (until recovery) / after recovery")
    print("  max wait: slowest successful probe connection started between fault and recovery")
    hdr = ["system", "fault", "round", "requests", "errors", "down", "backup", "up",
           "back(log)", "back(new)", "new-conn fails", "max wait", "notes"]
    out = []
    for r in rows:
        fails = f"{r['probe_fail_fault_to_down']}/{r['probe_fail_after_down']}/{r['probe_fail_after_recover']}"
        out.append([r["system"], r["fault"], str(r["round"]), _fmt(r["requests"]), _fmt(r["errors"]),
                    _fmt(r["down_s"]), _fmt(r["backup_s"]), _fmt(r["up_s"]), _fmt(r["back_log_s"]),
                    _fmt(r["back_new_s"]), fails, _fmt(r.get("probe_max_wait_s")), "; ".join(r["notes"]) or ""])
    print(_table(hdr, out))
    print()

    # Summary: medians over rounds, and the targets.
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["fault"], r["system"]), []).append(r)
    # Client errors = wrk's errors + failed probe connections. HAProxy's per
    # (fault, round), for "no more errors than HAProxy in the same drill".
    def client_errors(r):
        if r["errors"] is None:
            return None
        return r["errors"] + r["probe_fail_before_fault"] + r["probe_fail_fault_to_down"] \
            + r["probe_fail_after_down"] + r["probe_fail_after_recover"]
    ha_err = {(r["fault"], r["round"]): client_errors(r) for r in rows if r["system"] == "haproxy"}

    print(f"Targets: [A] zero failed new connections once the DOWN is logged; "
          f"[B] DOWN within fall x inter + timeout = {limit:.1f} s; "
          f"[C] client errors (wrk errors + failed probe connections) <= HAProxy's in the same fault and round (ringlb only).")
    hdr = ["system", "fault", "runs", "requests", "errors", "down", "backup", "max wait", "up", "back(new)",
           "A fails-after-down", "B detect", "C errors<=haproxy", "verdict"]
    out = []
    for (fault, system), rs in sorted(groups.items(), key=lambda kv: (fault_order.get(kv[0][0], 9), kv[0][1] != "ringlb")):
        after = [r["probe_fail_after_down"] for r in rs]
        a_ok = all(x == 0 for x in after) and all(r["down_s"] is not None for r in rs)
        downs = [r["down_s"] for r in rs]
        b_ok = all(d is not None and d <= limit for d in downs)
        if system == "haproxy":
            c_txt, c_ok = "n/a", True
        else:
            cmp = [(client_errors(r), ha_err.get((fault, r["round"]))) for r in rs]
            if any(h is None or e is None for e, h in cmp):
                c_txt, c_ok = "no haproxy run", True
            else:
                c_ok = all(e <= h for e, h in cmp)
                c_txt = ("PASS " if c_ok else "FAIL ") + ",".join(f"{e}<={h}" if e <= h else f"{e}>{h}" for e, h in cmp)
        a_txt = ("PASS " if a_ok else "FAIL ") + ",".join(str(x) for x in after)
        b_txt = ("PASS " if b_ok else "FAIL ") + "max " + _fmt(max((d for d in downs if d is not None), default=None))
        verdict = "PASS" if (a_ok and b_ok and c_ok) else "FAIL"
        out.append([system, fault, str(len(rs)), _fmt(_median([r["requests"] for r in rs]), 0),
                    _fmt(_median([r["errors"] for r in rs]), 0), _fmt(_median(downs)),
                    _fmt(_median([r["backup_s"] for r in rs])), _fmt(_median([r.get("probe_max_wait_s") for r in rs])),
                    _fmt(_median([r["up_s"] for r in rs])),
                    _fmt(_median([r["back_new_s"] for r in rs])), a_txt, b_txt, c_txt, verdict])
    print("Summary (medians over rounds):")
    print(_table(hdr, out))
    return 0


# ----------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("stamp").set_defaults(fn=cmd_stamp)
    sub.add_parser("freeport").set_defaults(fn=cmd_freeport)
    p = sub.add_parser("waitport")
    p.add_argument("host"); p.add_argument("port", type=int); p.add_argument("seconds", type=float)
    p.set_defaults(fn=cmd_waitport)
    p = sub.add_parser("probe")
    p.add_argument("--host", default="127.0.0.1"); p.add_argument("--port", type=int, required=True)
    p.add_argument("--interval", type=float, default=0.02); p.add_argument("--duration", type=float, required=True)
    p.add_argument("--timeout", type=float, default=2.0); p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_probe)
    p = sub.add_parser("analyze")
    p.add_argument("rundir"); p.add_argument("--rows", required=True)
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("report")
    p.add_argument("rows"); p.add_argument("--detect-limit", type=float, default=1.5)
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
