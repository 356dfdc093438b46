#!/usr/bin/env python3
"""Helpers for bench/run.sh (Python 3.11, standard library only).

Subcommands:
  portcheck PORT...            exit 1 (and name them) if any port on 127.0.0.1 is taken
  waitport HOST PORT SECS      poll until something accepts on HOST:PORT
  waithttp HOST PORT PATH SECS poll until GET PATH answers 200 (through a proxy too)
  httpstatus HOST PORT PATH    one GET (optionally from --source ADDR): print the status
                               code, or 'none' when no HTTP answer came (reset, closed)
  aclgen --out FILE            scenario bA: a deterministic list of N deny prefixes
  measure ...  -- CMD...       run one load (wrk or iperf3), sample CPU of the processes
                               under test before/after, append one row to raw.csv
  idle ...                     scenario e: hold N idle keep-alive connections through a
                               server, record its RSS before/held/after, append one row
  table RAW.csv                print the summary table

Everything that is measured goes through here so that every system is measured by
the same code at the same moments.
"""

from __future__ import annotations

import argparse
import csv
import ipaddress
import json
import os
import random
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20

# One row per run. Empty string where a field does not apply.
FIELDS = [
    "start_utc", "round", "scenario", "system", "workers", "ok", "error",
    "metric", "value", "unit",
    "requests", "bytes", "duration_s", "errors",
    "p50_us", "p90_us", "p99_us", "max_us",
    "proxy_cpu_s", "cpu_per_unit", "cpu_unit",
    "rss_before_kb", "rss_held_kb", "rss_after_kb", "marginal_b_per_conn",
    "conns_ok", "conns_failed", "conns_dropped",
    "busy_cores", "tested_cores", "foreign_cores", "steal_cores", "loadavg1", "noisy",
]

# Scenario descriptions for the table: label, main metric, which way is better.
SCENARIOS = {
    "a": ("a keep-alive, 100 B responses, wrk -t1 -c50", "req/s", "higher"),
    "b": ("b new connection per request (Connection: close), 100 B, wrk -t1 -c50", "req/s", "higher"),
    "bA": ("bA as b, through a source ACL: deny list of 100,000 prefixes + allow 127.0.0.0/8", "req/s", "higher"),
    "bP": ("bP as b, the proxy sends a PROXY v2 header to nginx (listen ... proxy_protocol)", "req/s", "higher"),
    "c": ("c keep-alive, 1 MiB responses, wrk -t1 -c10", "MiB/s", "higher"),
    "d": ("d iperf3 bulk, client -> server (through the proxy)", "Gbit/s", "higher"),
    "dR": ("d iperf3 bulk -R, server -> client (through the proxy)", "Gbit/s", "higher"),
    "e": ("e idle keep-alive connections held: proxy RSS per connection", "B/conn", "lower"),
    "f": ("f keep-alive, 100 B, wrk -t1 -c50, proxies with 2 workers/threads", "req/s", "higher"),
    "g": ("g latency at a fixed moderate rate: wrk -t1 -c10, 2 ms pause per conn (~4-5k req/s)", "p99 us", "lower"),
    "h": ("h TLS: new connection (full handshake, ECDSA P-256; resumption off) per request, 100 B, wrk -t1 -c50", "req/s", "higher"),
    "hR": ("hR TLS: new connection (full handshake, RSA 2048; resumption off) per request, 100 B, wrk -t1 -c50", "req/s", "higher"),
    "i": ("i TLS: keep-alive, 100 B responses, wrk -t1 -c50", "req/s", "higher"),
    "j": ("j TLS: keep-alive, 1 MiB responses, wrk -t1 -c10", "MiB/s", "higher"),
    "k": ("k TLS: new connection per request resuming its session (ECDSA P-256), 100 B, wrk -t1 -c50", "req/s", "higher"),
    "hP": ("hP TLS passed through to nginx, plain TCP frontend, new connection per request, wrk -t1 -c50", "req/s", "higher"),
    "hS": ("hS TLS passed through to nginx, SNI-routing frontend, new connection per request, wrk -t1 -c50", "req/s", "higher"),
}


# ----------------------------------------------------------------------------- /proc

def proc_cpu_s(pid: int) -> float | None:
    """utime+stime of a whole process (all its threads, live and exited), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    fields = s[s.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime is field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def ksoftirqd_pids() -> list[int]:
    """Kernel threads that run deferred network work (loopback traffic is ours)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/comm") as f:
                    if f.read().startswith("ksoftirqd/"):
                        pids.append(int(d))
            except OSError:
                pass
    return pids


def system_cpu() -> tuple[float, float]:
    """(busy, steal) seconds summed over all CPUs, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
    # guest time is already included in user; without IRQ_TIME_ACCOUNTING irq/softirq
    # ticks are charged to the interrupted task too, so they belong in "busy".
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK


def vm_rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def loadavg1() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


class CpuSampler:
    """Samples machine-wide busy CPU and the CPU of every process under test.

    foreign = machine busy - (processes under test + the load generator + ksoftirqd).
    It is what other work on the machine took while the run ran.
    """

    def __init__(self, test_pids: list[int]):
        self.pids = sorted(set(test_pids) | set(ksoftirqd_pids()))

    def sample(self) -> tuple[float, float, float, dict[int, float]]:
        busy, steal = system_cpu()
        per = {p: c for p in self.pids if (c := proc_cpu_s(p)) is not None}
        return time.monotonic(), busy, steal, per

    @staticmethod
    def diff(a, b, extra_tested_s: float) -> dict:
        t0, busy0, steal0, per0 = a
        t1, busy1, steal1, per1 = b
        wall = max(t1 - t0, 1e-6)
        tested = sum(per1[p] - per0[p] for p in per1 if p in per0) + extra_tested_s
        busy = busy1 - busy0
        return {
            "wall": wall,
            "busy_cores": busy / wall,
            "tested_cores": tested / wall,
            "foreign_cores": max(busy - tested, 0.0) / wall,
            "steal_cores": (steal1 - steal0) / wall,
        }


# ----------------------------------------------------------------------------- output

def append_row(path: str, row: dict) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in FIELDS})


def fmt_num(x: float) -> str:
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.2f}"


def fmt_us(us: float) -> str:
    if us >= 1_000_000:
        return f"{us / 1e6:.2f}s"
    if us >= 1000:
        return f"{us / 1000:.2f}ms"
    return f"{us:.0f}us"


def pids_arg(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


# ----------------------------------------------------------------------------- small tools

def cmd_portcheck(args) -> int:
    busy = []
    for p in args.ports:
        s = socket.socket()
        s.settimeout(0.3)
        try:
            if s.connect_ex(("127.0.0.1", p)) == 0:
                busy.append(p)
                continue
        finally:
            s.close()
        s = socket.socket()
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
        except OSError:
            busy.append(p)
        finally:
            s.close()
    if busy:
        print("ports in use: " + " ".join(map(str, busy)), file=sys.stderr)
        return 1
    return 0


def cmd_waitport(args) -> int:
    deadline = time.monotonic() + args.secs
    while time.monotonic() < deadline:
        try:
            socket.create_connection((args.host, args.port), timeout=0.5).close()
            return 0
        except OSError:
            time.sleep(0.05)
    print(f"nothing listens on {args.host}:{args.port} after {args.secs}s", file=sys.stderr)
    return 1


def http_get_status(host: str, port: int, path: str, timeout: float = 1.0,
                    source: str | None = None) -> int | None:
    try:
        src = (source, 0) if source else None
        with socket.create_connection((host, port), timeout=timeout, source_address=src) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            m = re.match(rb"HTTP/1\.\d (\d{3})", data)
            return int(m.group(1)) if m else None
    except OSError:
        return None


def cmd_waithttp(args) -> int:
    deadline = time.monotonic() + args.secs
    last = None
    while time.monotonic() < deadline:
        last = http_get_status(args.host, args.port, args.path)
        if last == 200:
            return 0
        time.sleep(0.1)
    print(f"GET http://{args.host}:{args.port}{args.path} did not answer 200 within "
          f"{args.secs}s (last: {last})", file=sys.stderr)
    return 1


def cmd_httpstatus(args) -> int:
    code = http_get_status(args.host, args.port, args.path, args.timeout, args.source)
    print(code if code is not None else "none")
    return 0


# ----------------------------------------------------------------------------- aclgen (bA)

# The benchmark's clients (wrk, the readiness probes) connect from 127.0.0.1; the
# deny-list check connects from 127.0.0.2, which the list denies.
ACL_CLIENT = 0x7F000001
ACL_PROBE = "127.0.0.2/32"


def random_v4(rng: random.Random) -> ipaddress.IPv4Network:
    """A unicast IPv4 prefix outside 127.0.0.0/8, lengths as in public blocklists
    (mostly single hosts and /24s, some wider networks)."""
    while True:
        first = rng.randint(1, 223)
        if first != 127:
            break
    plen = rng.choices([32, 24, rng.randint(16, 31)], weights=[50, 25, 25])[0]
    addr = (first << 24) | rng.getrandbits(24)
    return ipaddress.IPv4Network((addr, plen), strict=False)


def random_near(rng: random.Random) -> ipaddress.IPv4Network:
    """A small prefix in 127.0.0.0/16 but never in 127.0.0.0/24: the client's own
    /16 is then crowded, so its lookup lands among many entries (the worst case of a
    table indexed by the top 16 bits, and a deep walk in a radix tree)."""
    addr = rng.randint(ACL_CLIENT - 1 + 0x100, 0x7F00FFFF)
    return ipaddress.IPv4Network((addr, rng.randint(28, 32)), strict=False)


def random_v6(rng: random.Random) -> ipaddress.IPv6Network:
    """A prefix in global unicast space (2000::/3): hosts, /64s, /48s and others."""
    plen = rng.choices([128, 64, 48, rng.randint(32, 127)], weights=[20, 40, 20, 20])[0]
    addr = (1 << 125) | rng.getrandbits(125)
    return ipaddress.IPv6Network((addr, plen), strict=False)


def cmd_aclgen(args) -> int:
    """Writes N distinct prefixes, the same for the same seed: 1% in the client's /16,
    a fifth IPv6, the rest IPv4 all over; none covers the client 127.0.0.1."""
    rng = random.Random(args.seed)
    n_near, n_v6 = args.n // 100, args.n // 5
    probe = ipaddress.ip_network(ACL_PROBE)
    seen = {probe}
    for count, gen in ((n_near, random_near), (n_v6, random_v6), (args.n - 1 - n_near - n_v6, random_v4)):
        goal = len(seen) + count
        while len(seen) < goal:
            seen.add(gen(rng))
    client = ipaddress.ip_address(ACL_CLIENT)
    covering = [n for n in seen if n.version == 4 and client in n]
    if covering:
        print(f"aclgen: {covering[0]} covers the benchmark's client {client}", file=sys.stderr)
        return 1
    # Sorted first: a set's order is not the same from one Python run to the next.
    nets = sorted(str(n) for n in seen)
    rng.shuffle(nets)
    with open(args.out, "w") as f:
        f.write(f"# bench/run.sh scenario bA: {len(nets)} prefixes (lib.py aclgen --seed {args.seed});\n"
                f"# none covers {client} (the client); {ACL_PROBE} is denied (the check that it is loaded)\n")
        f.write("\n".join(nets) + "\n")
    return 0


# ----------------------------------------------------------------------------- measure

def parse_wrk(text: str) -> dict:
    m = re.search(r"^WRKJSON (\{.*\})\s*$", text, re.M)
    if not m:
        raise ValueError("no WRKJSON line in wrk output")
    return json.loads(m.group(1))


def parse_iperf(text: str) -> dict:
    if "{" not in text:
        raise ValueError("no JSON from iperf3 (it hung or was killed)")
    j = json.loads(text[text.index("{"):])
    if j.get("error"):
        raise ValueError("iperf3: " + j["error"])
    return j["end"]["sum_received"]


def cmd_measure(args) -> int:
    """Run one load and record one row. Always returns 0 unless misused: a failed run is
    recorded as ok=0 so that the rest of the benchmark goes on."""
    child: subprocess.Popen | None = None

    def on_term(signum, frame):
        if child is not None and child.poll() is None:
            child.kill()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    sampler = CpuSampler(pids_arg(args.test_pids) + pids_arg(args.proxy_pids))
    proxy_pids = pids_arg(args.proxy_pids)
    row = {
        "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "round": args.round, "scenario": args.scenario, "system": args.system,
        "workers": args.workers, "ok": 0, "error": "", "loadavg1": loadavg1(),
    }
    proxy0 = [proc_cpu_s(p) for p in proxy_pids]
    s0 = sampler.sample()
    with open(args.log, "w") as logf:
        child = subprocess.Popen(args.cmd, stdout=subprocess.PIPE, stderr=logf, text=True)
        try:
            out, _ = child.communicate(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            out, _ = child.communicate()
            row["error"] = f"load timed out after {args.timeout}s"
        logf.write(out)
    # Load generator CPU (wrk/iperf3 client incl. threads), from its rusage.
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = ru.ru_utime + ru.ru_stime
    s1 = sampler.sample()
    proxy1 = [proc_cpu_s(p) for p in proxy_pids]
    row.update({k: round(v, 3) for k, v in CpuSampler.diff(s0, s1, child_cpu).items() if k != "wall"})

    proxy_cpu = None
    if proxy_pids:
        if any(x is None for x in proxy0 + proxy1):
            row["error"] = (row["error"] + "; " if row["error"] else "") + "proxy process gone"
        else:
            proxy_cpu = sum(b - a for a, b in zip(proxy0, proxy1))
            row["proxy_cpu_s"] = round(proxy_cpu, 3)

    try:
        if child.returncode != 0 and not row["error"]:
            row["error"] = f"exit code {child.returncode}"
        if args.kind == "wrk":
            w = parse_wrk(out)
            dur = w["duration_us"] / 1e6
            errs = sum(w[k] for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
            row.update(requests=w["requests"], bytes=w["bytes"], duration_s=round(dur, 3), errors=errs,
                       p50_us=w["p50_us"], p90_us=w["p90_us"], p99_us=w["p99_us"], max_us=w["lat_max_us"])
            if args.scenario in ("c", "j"):
                row.update(metric="MiB/s", value=round(w["bytes"] / MIB / dur, 2), unit="MiB/s")
                units, cpu_unit, scale = w["bytes"] / MIB, "us/MiB", 1e6
            else:
                row.update(metric="req/s", value=round(w["requests"] / dur, 1), unit="req/s")
                units, cpu_unit, scale = w["requests"], "us/req", 1e6
            if w["requests"] == 0:
                raise ValueError("no request completed")
            if errs and not row["error"]:
                row["error"] = (f"wrk errors: connect {w['err_connect']} read {w['err_read']} "
                                f"write {w['err_write']} status {w['err_status']} timeout {w['err_timeout']}")
        else:
            r = parse_iperf(out)
            dur = r["seconds"]
            row.update(bytes=r["bytes"], duration_s=round(dur, 3),
                       metric="Gbit/s", value=round(r["bits_per_second"] / 1e9, 3), unit="Gbit/s")
            units, cpu_unit, scale = r["bytes"] / MIB, "us/MiB", 1e6
            if r["bytes"] == 0:
                raise ValueError("no byte transferred")
        if proxy_cpu is not None and units > 0:
            row.update(cpu_per_unit=round(proxy_cpu * scale / units, 3), cpu_unit=cpu_unit)
        row["ok"] = 0 if (row["error"] and "wrk errors" not in row["error"]) else 1
    except (ValueError, KeyError, json.JSONDecodeError) as e:
        row["ok"] = 0
        row["error"] = (row["error"] + "; " if row["error"] else "") + str(e)

    row["noisy"] = int(row["foreign_cores"] > args.noisy or row["steal_cores"] > args.noisy)
    append_row(args.raw, row)
    print_run_line(row)
    return 0


def print_run_line(row: dict) -> None:
    if row.get("ok") and row.get("value") != "":
        s = f"{row['value']} {row['unit']}"
        if row.get("p99_us") not in (None, ""):
            s += f"  p50 {fmt_us(float(row['p50_us']))} p99 {fmt_us(float(row['p99_us']))}"
        if row.get("cpu_per_unit") not in (None, ""):
            s += f"  proxy CPU {row['cpu_per_unit']} {row['cpu_unit']}"
    else:
        s = "FAILED"
    if row.get("error"):
        s += f"  [{row['error']}]"
    s += f"  (foreign {row['foreign_cores']:.2f} cores, steal {row['steal_cores']:.2f})"
    if row.get("noisy"):
        s += "  WARNING: other work on the machine spoiled this run"
    print(f"    r{row['round']} {row['scenario']:<2} {row['system']:<8} {s}", flush=True)


# ----------------------------------------------------------------------------- idle (e)

def raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def open_idle(host: str, port: int, n: int, path: str, window: int, timeout: float):
    """Open n connections, send one keep-alive GET on each and read its answer, so that
    every connection is known to reach a backend. Returns (held sockets, failures)."""
    req = f"GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n".encode()
    sel = selectors.DefaultSelector()
    held, failed, started = [], 0, 0
    state: dict[socket.socket, list] = {}  # sock -> [phase, buffer, deadline]

    def start_one():
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((host, port))
        state[s] = ["connect", b"", time.monotonic() + timeout]
        sel.register(s, selectors.EVENT_WRITE)

    def finish(s, ok):
        nonlocal failed
        sel.unregister(s)
        del state[s]
        if ok:
            held.append(s)
        else:
            failed += 1
            s.close()

    while started < n or state:
        while started < n and len(state) < window:
            try:
                start_one()
            except OSError:
                failed += 1
            started += 1
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            st = state[s]
            try:
                if st[0] == "connect":
                    if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                        finish(s, False)
                        continue
                    s.send(req)  # tiny: fits in the send buffer at once
                    st[0] = "read"
                    sel.modify(s, selectors.EVENT_READ)
                else:
                    chunk = s.recv(65536)
                    if not chunk:
                        finish(s, False)
                        continue
                    st[1] += chunk
                    head, sep, body = st[1].partition(b"\r\n\r\n")
                    if sep:
                        m = re.search(rb"(?i)content-length:\s*(\d+)", head)
                        if m and len(body) >= int(m.group(1)):
                            finish(s, head.startswith(b"HTTP/1.1 200"))
            except OSError:
                finish(s, False)
        now = time.monotonic()
        for s in [s for s, st in state.items() if st[2] < now]:
            finish(s, False)
    sel.close()
    return held, failed


def count_dropped(held) -> int:
    """Connections that the server side closed (or that got unexpected data) while held."""
    sel = selectors.DefaultSelector()
    for s in held:
        sel.register(s, selectors.EVENT_READ)
    n = len(sel.select(timeout=0))
    sel.close()
    return n


def cmd_idle(args) -> int:
    hard = raise_nofile()
    n = min(args.n, hard - 200)
    row = {
        "start_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "round": args.round, "scenario": "e", "system": args.system, "workers": args.workers,
        "ok": 0, "error": "", "loadavg1": loadavg1(), "metric": "B/conn", "unit": "B/conn",
    }
    sampler = CpuSampler(pids_arg(args.test_pids) + [args.pid])
    rss_before = vm_rss_kb(args.pid)
    s0 = sampler.sample()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    # Two halves: the RSS growth over the second half is the marginal cost of a
    # connection, free of one-time allocations (pools, rings) made by the first ones.
    half = n // 2
    held, failed = open_idle(args.host, args.port, half, args.path, args.window, args.conn_timeout)
    time.sleep(0.3)
    rss_half, held_half = vm_rss_kb(args.pid), len(held)
    held2, failed2 = open_idle(args.host, args.port, n - half, args.path, args.window, args.conn_timeout)
    held += held2
    failed += failed2
    t_open = time.monotonic() - t0 - 0.3
    # Hold them: sample RSS a few times over the hold and keep the highest.
    rss_held = 0
    end = time.monotonic() + args.hold
    while True:
        rss_held = max(rss_held, vm_rss_kb(args.pid) or 0)
        if time.monotonic() >= end:
            break
        time.sleep(0.25)
    dropped = count_dropped(held)
    for s in held:
        s.close()
    time.sleep(args.settle)
    rss_after = vm_rss_kb(args.pid)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    s1 = sampler.sample()
    own = (self1.ru_utime + self1.ru_stime) - (self0.ru_utime + self0.ru_stime)
    row.update({k: round(v, 3) for k, v in CpuSampler.diff(s0, s1, own).items() if k != "wall"})
    row.update(rss_before_kb=rss_before, rss_held_kb=rss_held, rss_after_kb=rss_after,
               conns_ok=len(held), conns_failed=failed, conns_dropped=dropped,
               duration_s=round(t_open, 3))
    if rss_before is None or rss_after is None:
        row["error"] = "server process gone"
    elif not held:
        row["error"] = "no connection could be opened"
    else:
        row["value"] = round((rss_held - rss_before) * 1024 / len(held), 1)
        if rss_half is not None and len(held) > held_half:
            row["marginal_b_per_conn"] = round((rss_held - rss_half) * 1024 / (len(held) - held_half), 1)
        row["ok"] = 1
        problems = []
        if n < args.n:
            problems.append(f"only {n} connections (RLIMIT_NOFILE)")
        if failed:
            problems.append(f"{failed} of {n} connections failed")
        if dropped:
            problems.append(f"{dropped} held connections were closed by the server side")
        row["error"] = "; ".join(problems)
    row["noisy"] = 0  # RSS does not depend on other work on the machine
    append_row(args.raw, row)
    if row["ok"]:
        msg = (f"{row['value']} B/conn (2nd half: {row.get('marginal_b_per_conn', '?')})  RSS {rss_before / 1024:.1f} -> {rss_held / 1024:.1f} -> "
               f"{rss_after / 1024:.1f} MiB  {len(held)} conns opened in {t_open:.1f}s")
    else:
        msg = "FAILED"
    if row["error"]:
        msg += f"  [{row['error']}]"
    print(f"    r{row['round']} e  {row['system']:<8} {msg}", flush=True)
    return 0


# ----------------------------------------------------------------------------- table

def med(xs):
    return statistics.median(xs) if xs else None


def per_round_ratios(rows, num: tuple[str, str], den: tuple[str, str]) -> list[str]:
    """Ratio of the main figure of (scenario, system) num over den, round by round (runs
    of one round are close in time, so these show how steady a ratio of medians is)."""
    def val(sc, sysname, r):
        xs = [row for row in rows if row["scenario"] == sc and row["system"] == sysname
              and row["round"] == r and row["ok"] == "1" and row["value"] != ""]
        if not xs:
            return None
        return float(xs[0]["p99_us"] if sc == "g" else xs[0]["value"])
    out = []
    for r in sorted({row["round"] for row in rows}, key=int):
        a, b = val(*num, r), val(*den, r)
        if a is not None and b:
            out.append(f"{a / b:.2f}")
    return out


def cmd_table(args) -> int:
    with open(args.raw) as f:
        rows = list(csv.DictReader(f))
    systems = ["direct", "haproxy", "base", "ringlb"]
    order = [s for s in SCENARIOS if any(r["scenario"] == s for r in rows)]
    out = []
    hdr = (f"{'system':<8} {'runs':>4} {'median':>10} {'min - max':>21} {'p50':>8} {'p99':>8}"
           f" {'proxy CPU':>14} {'CPU x HAP':>9} {'x HAProxy':>9} {'x direct':>8} {'noisy':>5}")
    hdr_e = (f"{'system':<8} {'runs':>4} {'B/conn':>10} {'min - max':>21} {'2nd half':>10}"
             f" {'RSS before -> held':>20} {'conns':>6} {'x HAProxy':>9} {'x direct':>8}")
    medians: dict[tuple[str, str], float] = {}
    cpu_medians: dict[tuple[str, str], float] = {}
    noisy_runs = []
    failed_runs = []
    for sc in order:
        label, metric, better = SCENARIOS[sc]
        if args.client_threads != 1:
            label = label.replace("wrk -t1 ", f"wrk -t{args.client_threads} ")
        out.append("")
        out.append(f"== {label}")
        out.append(f"   main figure: {metric}, {better} is better; ratios are of medians")
        out.append(hdr_e if sc == "e" else hdr)
        for sysname in systems:
            rs = [r for r in rows if r["scenario"] == sc and r["system"] == sysname]
            if not rs:
                continue
            good = [r for r in rs if r["ok"] == "1" and r["value"] != ""]
            for r in rs:
                if r["ok"] != "1" or r["error"]:
                    failed_runs.append(r)
                if r["noisy"] == "1":
                    noisy_runs.append(r)
            if sc == "g":
                vals = [float(r["p99_us"]) for r in good]
            else:
                vals = [float(r["value"]) for r in good]
            m = med(vals)
            if m is not None:
                medians[(sc, sysname)] = m
            cpus = [float(r["cpu_per_unit"]) for r in good if r["cpu_per_unit"] != ""]
            cm = med(cpus)
            if cm is not None:
                cpu_medians[(sc, sysname)] = cm
            p50 = med([float(r["p50_us"]) for r in good if r["p50_us"] != ""])
            p99 = med([float(r["p99_us"]) for r in good if r["p99_us"] != ""])
            if sc == "g":
                # The main figure is latency; show the achieved rate in the min-max column.
                rate = med([float(r["value"]) for r in good])
                mm = f"at {fmt_num(rate)} req/s" if rate else "-"
                mtxt = fmt_us(m) if m is not None else "-"
            else:
                mm = f"{fmt_num(min(vals))} - {fmt_num(max(vals))}" if vals else "-"
                mtxt = fmt_num(m) if m is not None else "FAILED"
            cpu_txt = f"{cm:.2f} {good[0]['cpu_unit']}" if cm is not None else "-"
            p50s = fmt_us(p50) if p50 is not None else "-"
            p99s = fmt_us(p99) if p99 is not None else "-"
            x_hap = x_dir = cpu_x = ""
            if sysname == "ringlb" and m is not None:
                if (sc, "haproxy") in medians and medians[(sc, "haproxy")]:
                    x_hap = f"{m / medians[(sc, 'haproxy')]:.2f}"
                if (sc, "direct") in medians and medians[(sc, "direct")]:
                    x_dir = f"{m / medians[(sc, 'direct')]:.2f}"
                if cm is not None and cpu_medians.get((sc, "haproxy")):
                    cpu_x = f"{cm / cpu_medians[(sc, 'haproxy')]:.2f}"
            if sysname == "haproxy" and m is not None and (sc, "direct") in medians and medians[(sc, "direct")]:
                x_dir = f"{m / medians[(sc, 'direct')]:.2f}"
            noisy = sum(r["noisy"] == "1" for r in rs)
            if sc == "e":
                # Idle connections: RSS instead of latency and CPU.
                if good:
                    held = med([float(r["rss_held_kb"]) for r in good]) / 1024
                    before = med([float(r["rss_before_kb"]) for r in good]) / 1024
                    conns = med([float(r["conns_ok"]) for r in good])
                    marg = med([float(r["marginal_b_per_conn"]) for r in good if r.get("marginal_b_per_conn")])
                    rss_txt = f"{before:.1f} -> {held:.1f} MiB"
                    marg_txt = fmt_num(marg) if marg is not None else "-"
                else:
                    rss_txt, marg_txt, conns = "-", "-", 0
                out.append(f"{sysname:<8} {len(good):>2}/{len(rs):<1} {mtxt:>10} {mm:>21} {marg_txt:>10}"
                           f" {rss_txt:>20} {conns:>6.0f} {x_hap:>9} {x_dir:>8}")
                continue
            out.append(f"{sysname:<8} {len(good):>2}/{len(rs):<1} {mtxt:>10} {mm:>21} {p50s:>8} {p99s:>8}"
                       f" {cpu_txt:>14} {cpu_x:>9} {x_hap:>9} {x_dir:>8} {noisy:>5}")
    # A/B (--baseline): the new binary against the old one, run for run in the same rounds.
    ab = [sc for sc in order if (sc, "base") in medians and (sc, "ringlb") in medians]
    if ab:
        out.append("")
        out.append("== A/B: ringlb (new binary) / base (old binary), ratios of medians; per-round ratios in brackets")
        for sc in ab:
            per_round = per_round_ratios(rows, (sc, "ringlb"), (sc, "base"))
            cpu = ""
            if cpu_medians.get((sc, "base")) and (sc, "ringlb") in cpu_medians:
                cpu = f", CPU per unit {cpu_medians[(sc, 'ringlb')] / cpu_medians[(sc, 'base')]:.2f}x"
            out.append(f"   {sc:<3} {medians[(sc, 'ringlb')] / medians[(sc, 'base')]:.2f}x{cpu}"
                       f"  [{' '.join(per_round)}]")
    # f versus a: how each proxy scales from 1 to 2 workers.
    if any(k[0] == "f" for k in medians) and any(k[0] == "a" for k in medians):
        out.append("")
        out.append("== f vs a: keep-alive req/s with 2 workers/threads over 1 (same round-robin setup)")
        for sysname in ("haproxy", "ringlb"):
            if (sysname and ("a", sysname) in medians and ("f", sysname) in medians):
                out.append(f"   {sysname:<8} 2 workers / 1 worker = "
                           f"{medians[('f', sysname)] / medians[('a', sysname)]:.2f}")
    if any(k[0] == "hS" for k in medians) and any(k[0] == "hP" for k in medians):
        out.append("")
        out.append("== hS vs hP: new TLS connections/s through SNI routing over a plain TCP frontend (same backends)")
        for sysname in ("haproxy", "ringlb", "base"):
            if ("hP", sysname) in medians and ("hS", sysname) in medians:
                cpu = ""
                if cpu_medians.get(("hP", sysname)) and ("hS", sysname) in cpu_medians:
                    cpu = f", CPU per connection {cpu_medians[('hS', sysname)] / cpu_medians[('hP', sysname)]:.2f}x"
                out.append(f"   {sysname:<8} SNI / plain = {medians[('hS', sysname)] / medians[('hP', sysname)]:.2f}{cpu}")
    edge = [(sc, what) for sc, what in (("bA", "100,000-prefix ACL"), ("bP", "PROXY v2 to the backends"))
            if any(k[0] == sc for k in medians) and any(k[0] == "b" for k in medians)]
    if edge:
        out.append("")
        out.append("== bA, bP vs b: new connections/s with the edge feature over plain b (same rounds, same backends);")
        out.append("   per-round ratios in brackets; CPU = proxy CPU per connection, feature over plain")
        for sysname in ("haproxy", "base", "ringlb"):
            for sc, what in edge:
                if ("b", sysname) not in medians or (sc, sysname) not in medians:
                    continue
                cpu = ""
                if cpu_medians.get(("b", sysname)) and (sc, sysname) in cpu_medians:
                    cpu = f", CPU {cpu_medians[(sc, sysname)] / cpu_medians[('b', sysname)]:.2f}x"
                per_round = per_round_ratios(rows, (sc, sysname), ("b", sysname))
                out.append(f"   {sysname:<8} {sc}/b = {medians[(sc, sysname)] / medians[('b', sysname)]:.2f}{cpu}"
                           f"  [{' '.join(per_round)}]  ({what})")
    out.append("")
    out.append("Notes: 'proxy CPU' = utime+stime of the proxy process (all threads) during the run, per request")
    out.append("or per MiB moved; 'CPU x HAP' = ringlb's proxy CPU over HAProxy's. 'x HAProxy' and 'x direct' are")
    out.append("ratios of the medians of the main figure (for e and g lower is better, so a ratio < 1 favours")
    out.append("ringlb). 'noisy' counts runs in which other work took more than the threshold (see header).")
    out.append("e: B/conn = (RSS holding N connections - RSS before) / N, each proxy freshly started; '2nd half' =")
    out.append("RSS growth over the second N/2 connections only, i.e. without one-time allocations.")
    out.append("Differences under 10-15% are within the run-to-run noise of this machine (design.md fact 9).")
    if noisy_runs:
        out.append("")
        out.append(f"WARNING: {len(noisy_runs)} run(s) shared the machine with other work (foreign CPU or steal above")
        out.append("the threshold); their figures are less trustworthy:")
        for r in noisy_runs:
            out.append(f"   round {r['round']} {r['scenario']:<2} {r['system']:<8} foreign {float(r['foreign_cores']):.2f} "
                       f"cores, steal {float(r['steal_cores']):.2f}, loadavg {r['loadavg1']}")
    if failed_runs:
        out.append("")
        out.append(f"PROBLEMS in {len(failed_runs)} run(s):")
        for r in failed_runs:
            out.append(f"   round {r['round']} {r['scenario']:<2} {r['system']:<8} ok={r['ok']} {r['error']}")
    print("\n".join(out).lstrip("\n"))
    return 0


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd_name", required=True)

    p = sub.add_parser("portcheck")
    p.add_argument("ports", type=int, nargs="+")
    p.set_defaults(fn=cmd_portcheck)

    p = sub.add_parser("waitport")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("secs", type=float)
    p.set_defaults(fn=cmd_waitport)

    p = sub.add_parser("waithttp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("secs", type=float)
    p.set_defaults(fn=cmd_waithttp)

    p = sub.add_parser("httpstatus")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("path")
    p.add_argument("--source", help="local address to connect from")
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(fn=cmd_httpstatus)

    p = sub.add_parser("aclgen")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=12)
    p.set_defaults(fn=cmd_aclgen)

    def common(p):
        p.add_argument("--raw", required=True)
        p.add_argument("--round", type=int, required=True)
        p.add_argument("--system", required=True)
        p.add_argument("--workers", default="")
        p.add_argument("--test-pids", default="", help="comma-separated PIDs of every process under test")
        p.add_argument("--noisy", type=float, default=0.10, help="foreign CPU (cores) that spoils a run")

    p = sub.add_parser("measure")
    common(p)
    p.add_argument("--scenario", required=True)
    p.add_argument("--kind", choices=["wrk", "iperf"], required=True)
    p.add_argument("--proxy-pids", default="", help="PIDs whose CPU is 'proxy CPU' (empty for direct)")
    p.add_argument("--log", required=True)
    p.add_argument("--timeout", type=float, required=True)
    p.add_argument("cmd", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_measure)

    p = sub.add_parser("idle")
    common(p)
    p.add_argument("--pid", type=int, required=True, help="process whose RSS is measured")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--path", default="/100b")
    p.add_argument("--hold", type=float, default=3.0)
    p.add_argument("--settle", type=float, default=1.0)
    p.add_argument("--window", type=int, default=200, help="connections being opened at once")
    p.add_argument("--conn-timeout", type=float, default=10.0)
    p.set_defaults(fn=cmd_idle)

    p = sub.add_parser("table")
    p.add_argument("raw")
    p.add_argument("--client-threads", type=int, default=1, help="wrk threads of the run (labels)")
    p.set_defaults(fn=cmd_table)

    args = ap.parse_args()
    if getattr(args, "cmd", None) and args.cmd and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
