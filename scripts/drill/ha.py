#!/usr/bin/env python3
"""Helpers for scripts/ha-drill.sh and scripts/ecmp-drill.sh (standard library only).

Subcommands:
  probe      open one NEW connection every --interval s for --duration s, send an
             HTTP/1.0 GET and log which balancer answered (the backends reply
             "backend=NAME via=ADDR", ADDR being the balancer's own address).
  kprobe     hold --conns keep-alive connections, one request each every --interval
             s; a connection that fails is logged and opened again. Shows when and
             through which balancer open connections break.
  analyze    one run's raw logs -> a row (rows.jsonl) and a 100 ms timeline (CSV).
  report     the table of rows.jsonl, with the drill's targets.

All times are epoch seconds (time.time(), bash $EPOCHREALTIME and nginx $msec).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import re
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # importing drill.py must leave no __pycache__ in the tree
from drill import paced  # noqa: E402  (drill.py, beside this file)

VIA = re.compile(rb"backend=(\w+) via=([\d.]+)")


# ---------------------------------------------------------------------- probes

async def _request(reader, writer, keepalive: bool) -> tuple[str, str]:
    """One GET; (outcome, via)."""
    conn = b"keep-alive" if keepalive else b"close"
    writer.write(b"GET /probe HTTP/1.1\r\nHost: vip\r\nConnection: " + conn + b"\r\n\r\n")
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return "bad", "-"
    m = re.search(rb"[Cc]ontent-[Ll]ength: (\d+)", head)
    body = await reader.readexactly(int(m.group(1))) if m else await reader.read()
    v = VIA.search(body)
    return "ok", v.group(2).decode() if v else "?"


def _outcome(e: BaseException) -> str:
    if isinstance(e, asyncio.TimeoutError):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, asyncio.IncompleteReadError):
        return "eof"
    if isinstance(e, OSError):
        return f"oserror{e.errno}"
    return type(e).__name__


async def _probe_one(args, out) -> None:
    start = time.time()
    outcome, via, writer = "ok", "-", None
    try:
        async def attempt():
            nonlocal writer
            reader, writer = await asyncio.open_connection(args.host, args.port)
            return await _request(reader, writer, False)
        outcome, via = await asyncio.wait_for(attempt(), args.timeout)
    except Exception as e:  # every failure is a row, never a crash
        outcome = _outcome(e)
    finally:
        if writer is not None:
            writer.close()
    out.write(f"{start:.3f}\t{time.time():.3f}\t{outcome}\t{via}\n")
    out.flush()


async def _probe(args) -> None:
    with open(args.out, "w") as out:
        out.write("start\tend\toutcome\tvia\n")
        await paced(args.interval, args.duration, lambda: _probe_one(args, out))


async def _kconn(args, idx: int, end: float, out) -> None:
    reader = writer = None
    via = "-"
    while time.time() < end:
        start = time.time()
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(args.host, args.port), args.timeout)
            outcome, via = await asyncio.wait_for(_request(reader, writer, True), args.timeout)
        except Exception as e:
            outcome = _outcome(e)
            if writer is not None:
                writer.close()
            reader = writer = None
        out.write(f"{start:.3f}\t{time.time():.3f}\t{outcome}\t{via}\t{idx}\n")
        out.flush()
        await asyncio.sleep(max(0.0, start + args.interval - time.time()))
    if writer is not None:
        writer.close()


async def _kprobe(args) -> None:
    end = time.time() + args.duration
    with open(args.out, "w") as out:
        out.write("start\tend\toutcome\tvia\tconn\n")
        await asyncio.gather(*(_kconn(args, i, end, out) for i in range(args.conns)))


# --------------------------------------------------------------------- analyze

def _meta(rundir: Path) -> dict:
    meta = {}
    for line in (rundir / "meta.env").read_text().splitlines():
        if "=" in line:
            k, v = line.split("=", 1)
            meta[k] = v
    return meta


def _rows(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()[1:]
    return [l.split("\t") for l in lines if l.count("\t") >= 3]


def _access(paths: list[Path]) -> list[tuple[float, str]]:
    """(time, balancer) of each GET in nginx logs '$msec $method $status $remote_addr'."""
    out = []
    for p in paths:
        if not p.exists():
            continue
        for line in p.read_text(errors="replace").splitlines():
            f = line.split()
            if len(f) >= 4 and f[1] == "GET":
                try:
                    out.append((float(f[0]), f[3]))
                except ValueError:
                    pass
    return out


def _stamped(path: Path, pattern: str) -> list[float]:
    out = []
    if not path.exists():
        return out
    rx = re.compile(pattern)
    for line in path.read_text(errors="replace").splitlines():
        ts, _, rest = line.partition(" ")
        if rx.search(rest):
            try:
                out.append(float(ts))
            except ValueError:
                pass
    return out


def _wrk(path: Path) -> dict:
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("WRK_JSON "):
                return json.loads(line[9:])
    return {}


def _r(x):
    return None if x is None else round(x, 3)


def cmd_analyze(args) -> int:
    rundir = Path(args.rundir)
    m = _meta(rundir)
    t0, tf, tr, te = (float(m[k]) for k in ("t_start", "t_fault", "t_repair", "t_end"))
    names = dict(kv.split("=") for kv in m["balancers"].split(","))   # addr -> name
    victim = m["victim"]                                               # addr
    others = [a for a in names if a != victim]
    probes = [(float(s), float(e), o, v) for s, e, o, v, *_ in _rows(rundir / "probe.tsv")]
    kreqs = [(float(s), float(e), o, v, c) for s, e, o, v, c in _rows(rundir / "kprobe.tsv")]
    ok_fast = lambda p: p[2] == "ok" and p[1] - p[0] < args.prompt

    # The move: the first new connection after the fault that a survivor
    # answered promptly (a SYN retransmitted after 1 s would blur it).
    moved = next((p[0] for p in probes if p[0] >= tf and ok_fast(p) and p[3] in others), None)
    takeover = None
    if m.get("takeover_pattern"):
        hits = [t for t in _stamped(rundir / m["takeover_log"], m["takeover_pattern"]) if t >= tf]
        takeover = min(hits) if hits else None
    # With ECMP the others answer all along: the move is the router's
    # route change (the victim's route withdrawn).
    if m.get("move_by") == "takeover":
        moved = takeover
    failed = [p for p in probes if p[2] != "ok"]
    mv = moved if moved is not None else tr
    row = {
        "fault": m["fault"], "victim": names.get(victim, victim), "round": int(m.get("round", 1)),
        "move_s": _r(moved - tf) if moved is not None else None,
        "takeover_s": _r(takeover - tf) if takeover is not None else None,
        "fail_before": sum(1 for p in failed if p[1] < tf),
        # The port closed while the address still led to it: what a leave
        # delay longer than the move prevents.
        "refused": sum(1 for p in failed if tf <= p[0] < tr and p[2] == "refused"),
        "fail_during_move": sum(1 for p in failed if p[1] >= tf and p[0] < mv),
        "fail_after_move": sum(1 for p in failed if mv <= p[0] < tr),
        "fail_after_repair": sum(1 for p in failed if p[0] >= tr),
        "probe_outcomes": {},
        "probes": len(probes),
        "victim_after_repair_s": None,
    }
    for p in failed:
        row["probe_outcomes"][p[2]] = row["probe_outcomes"].get(p[2], 0) + 1
    # New connections by balancer before the fault: the spread.
    row["spread"] = {n: sum(1 for p in probes if p[0] < tf and p[2] == "ok" and p[3] == a)
                     for a, n in names.items()}
    # After the repair: when the victim answers new connections again (the
    # address moved back, or ECMP gave it its share again).
    back = next((p[0] for p in probes if p[0] >= tr and p[2] == "ok" and p[3] == victim), None)
    row["victim_after_repair_s"] = _r(back - tr) if back is not None else None
    # Its share of the new connections once it is back (ECMP: 1/N when the
    # router gives it its share again; a VIP pair with nopreempt: 0).
    later = [p for p in probes if back is not None and p[0] >= back and p[2] == "ok"]
    row["victim_share_after"] = _r(sum(1 for p in later if p[3] == victim) / len(later)) if later else None
    # Keep-alive connections: errors on those open through the victim vs the
    # survivors when the fault hit (the survivors' must stay at zero); a
    # connection's failed reconnects count against where it was at the fault.
    # Judged by when a request ended: one that hung through the fault (a
    # stopped balancer) fails after it even though it started before.
    at_fault: dict[str, str] = {}
    for s, e, o, v, c in sorted(kreqs, key=lambda k: k[1]):
        if o == "ok" and e < tf:
            at_fault[c] = v
    broken: set[str] = set()
    kerr = {"victim": 0, "survivors": 0, "after_repair": 0}
    for s, e, o, v, c in kreqs:
        if o == "ok" or e < tf:
            continue
        if s >= tr:
            kerr["after_repair"] += 1
        else:
            kerr["victim" if at_fault.get(c) == victim else "survivors"] += 1
            broken.add(c)
    # Connections open when the fault hit, by balancer, and how many broke.
    kerr["open_victim"] = sum(1 for v in at_fault.values() if v == victim)
    kerr["open_others"] = sum(1 for v in at_fault.values() if v in others)
    kerr["broken_victim"] = sum(1 for c in broken if at_fault.get(c) == victim)
    kerr["broken_others"] = sum(1 for c in broken if at_fault.get(c) in others)
    row["kerr"] = kerr
    wrk = _wrk(rundir / "wrk.out")
    row["requests"] = wrk.get("requests")
    row["wrk_errors"] = sum(wrk.get(k, 0) for k in ("connect", "read", "write", "timeout", "status")) if wrk else None
    row["rundir"] = rundir.name
    with open(args.rows, "a") as f:
        f.write(json.dumps(row) + "\n")

    # Timeline, 100 ms steps from the start of the load: requests per balancer
    # (nginx logs), failed new connections, failed keep-alive requests.
    step = 0.1
    nb = int((te - t0) / step) + 2
    cols = {n: [0] * nb for n in names.values()}
    fails = [0] * nb
    kfails = [0] * nb
    for t, addr in _access(sorted(rundir.glob("access-*.log"))):
        i = int((t - t0) / step)
        if 0 <= i < nb and addr in names:
            cols[names[addr]][i] += 1
    for p in failed:
        i = int((p[0] - t0) / step)
        if 0 <= i < nb:
            fails[i] += 1
    for s, e, o, v, c in kreqs:
        i = int((s - t0) / step)
        if o != "ok" and 0 <= i < nb:
            kfails[i] += 1
    with open(rundir / "timeline.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s"] + [f"req_{n}" for n in names.values()] + ["new_conn_fail", "keepalive_fail"])
        for i in range(nb):
            w.writerow([f"{i * step:.1f}"] + [cols[n][i] for n in names.values()] + [fails[i], kfails[i]])
    with open(rundir / "events.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["t_s", "event"])
        w.writerow([f"{tf - t0:.3f}", f"{m['fault']} on {names.get(victim, victim)}"])
        if moved is not None:
            w.writerow([f"{moved - t0:.3f}", "moved"])
        w.writerow([f"{tr - t0:.3f}", "repair"])
    return 0


# ---------------------------------------------------------------------- report

def _f(x, d=2):
    if x is None:
        return "-"
    return f"{x:.{d}f}" if isinstance(x, float) else str(x)


def _table(headers, rows) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def cmd_report(args) -> int:
    rows = [json.loads(l) for l in Path(args.rows).read_text().splitlines() if l.strip()]
    hdr = ["fault", "on", "move", args.takeover_label, "refused", "fail move", "fail after",
           "ka broken victim", "ka broken others", "back", "share", "fail repair", "ka err repair",
           "wrk req", "wrk err", "verdict"]
    out = []
    for r in rows:
        k = r["kerr"]
        limits = dict(kv.split("=") for kv in args.limit_for.split(",") if kv)
        limit = float(limits.get(r["fault"], args.limit))
        ok = r["fail_after_move"] == 0 and r["fail_after_repair"] == 0 and k["survivors"] == 0 \
            and k["after_repair"] == 0 and r["move_s"] is not None and r["move_s"] <= limit
        if r["fault"] in args.planned.split(","):
            ok = ok and r["refused"] == 0
        out.append([r["fault"], r["victim"], _f(r["move_s"]), _f(r["takeover_s"]), str(r["refused"]),
                    str(r["fail_during_move"]), str(r["fail_after_move"]),
                    f"{k['broken_victim']}/{k['open_victim']}", f"{k['broken_others']}/{k['open_others']}",
                    _f(r.get("victim_after_repair_s")), _f(r.get("victim_share_after")),
                    str(r["fail_after_repair"]), str(k["after_repair"]),
                    _f(r["requests"]), _f(r["wrk_errors"]), "PASS" if ok else "FAIL"])
    print(_table(hdr, out))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, fn in (("probe", lambda a: asyncio.run(_probe(a))), ("kprobe", lambda a: asyncio.run(_kprobe(a)))):
        p = sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, default=80)
        p.add_argument("--interval", type=float, default=0.02)
        p.add_argument("--duration", type=float, required=True)
        p.add_argument("--timeout", type=float, default=2.0)
        p.add_argument("--conns", type=int, default=10)
        p.add_argument("--out", required=True)
        p.set_defaults(fn=fn)
    p = sub.add_parser("analyze")
    p.add_argument("rundir")
    p.add_argument("--rows", required=True)
    p.add_argument("--prompt", type=float, default=0.5)
    p.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("report")
    p.add_argument("rows")
    p.add_argument("--limit", type=float, required=True)
    p.add_argument("--limit-for", default="", help="fault=seconds,... (else --limit)")
    p.add_argument("--planned", default="leave")
    p.add_argument("--takeover-label", default="takeover")
    p.set_defaults(fn=cmd_report)
    args = ap.parse_args()
    return args.fn(args) or 0


if __name__ == "__main__":
    sys.exit(main())
