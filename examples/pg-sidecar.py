#!/usr/bin/env python3
"""A Patroni-style health endpoint for one PostgreSQL node, for ringlb's
`check-http` with `check-port` (see examples/postgres.toml).

    GET /primary   200 when the node is a primary (not in recovery), else 503
    GET /replica   200 when the node is a replica (in recovery), else 503
    GET /health    200 when the node runs a query, primary or replica, else 503

Patroni's `/leader` (= /primary) and `/read-only` (= /health) answer too.
HEAD and OPTIONS answer the same statuses without a body, as Patroni does. Any doubt (the
server is down, refuses us, or does not answer within --timeout) is 503:
a node we cannot ask must not take writes.

Each request runs `psql` once (python3's standard library has no
PostgreSQL driver), so the check sees what a new client sees: a server
at max_connections, or one still starting up, fails it. Connection
settings: the flags below, or libpq's own environment (PGPASSWORD,
PGPASSFILE, PGSSLMODE, ...), which psql reads.

Run it on every node, beside PostgreSQL:

    python3 pg-sidecar.py --listen 0.0.0.0:8008 --port 5432 --user postgres

It prints "pg-sidecar: listening on HOST:PORT" once it accepts (port 0
picks a free one) and logs one line per change of answer, not per check.
"""

import argparse
import http.server
import json
import subprocess
import sys
import threading

QUERY = "select pg_is_in_recovery()"


class Node:
    """Asks PostgreSQL what it is; remembers the last answer for logging."""

    def __init__(self, args):
        self.command = [
            args.psql, "-X", "-A", "-t", "-q",
            "-h", args.host, "-p", str(args.port),
            "-U", args.user, "-d", args.dbname,
            "-v", "ON_ERROR_STOP=1", "-c", QUERY,
        ]
        self.timeout = args.timeout
        self.last = None
        self.lock = threading.Lock()

    def role(self):
        """'primary', 'replica', or None with the reason we could not tell."""
        try:
            done = subprocess.run(
                self.command, capture_output=True, text=True,
                timeout=self.timeout, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return None, f"no answer within {self.timeout}s"
        except OSError as e:
            return None, f"cannot run {self.command[0]}: {e}"
        answer = done.stdout.strip()
        if done.returncode == 0 and answer in ("t", "f"):
            return ("replica" if answer == "t" else "primary"), ""
        reason = (done.stderr.strip().splitlines() or [f"psql exited {done.returncode}"])[-1]
        return None, reason

    def observe(self, role, reason):
        """Logs a change of answer (not every check: they come every second)."""
        now = role or f"unreachable ({reason})"
        with self.lock:
            if now != self.last:
                print(f"pg-sidecar: node is {now}", file=sys.stderr, flush=True)
                self.last = now


# Which roles pass each path.
PATHS = {
    "/primary": {"primary"},
    "/leader": {"primary"},
    "/replica": {"replica"},
    "/health": {"primary", "replica"},
    "/read-only": {"primary", "replica"},
}


def handler_for(node):
    class Handler(http.server.BaseHTTPRequestHandler):
        server_version = "pg-sidecar"
        # One request per connection, as ringlb's and HAProxy's checks
        # send `Connection: close`.
        protocol_version = "HTTP/1.0"

        def answer(self, with_body):
            path = self.path.split("?", 1)[0]
            wanted = PATHS.get(path)
            if wanted is None:
                self.reply(404, {"error": f"unknown path {path}"}, with_body)
                return
            role, reason = node.role()
            node.observe(role, reason)
            body = {"role": role} if role else {"role": None, "reason": reason}
            self.reply(200 if role in wanted else 503, body, with_body)

        def reply(self, status, body, with_body):
            data = (json.dumps(body) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if with_body:
                self.wfile.write(data)

        def do_GET(self):
            self.answer(True)

        def do_HEAD(self):
            self.answer(False)

        def do_OPTIONS(self):
            self.answer(False)

        def log_message(self, format, *args):
            # One line per check would drown the changes that matter.
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8008",
                        help="HOST:PORT to serve on (default 127.0.0.1:8008)")
    parser.add_argument("--host", default="127.0.0.1", help="PostgreSQL host")
    parser.add_argument("--port", type=int, default=5432, help="PostgreSQL port")
    parser.add_argument("--user", default="postgres", help="PostgreSQL user")
    parser.add_argument("--dbname", default="postgres", help="database to connect to")
    parser.add_argument("--psql", default="psql", help="the psql binary")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds one question may take before the answer is 503")
    args = parser.parse_args()

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected HOST:PORT")
    host = host.strip("[]")
    node = Node(args)
    server_class = http.server.ThreadingHTTPServer
    if ":" in host:
        import socket

        class V6Server(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6

        server_class = V6Server
    try:
        server = server_class((host, int(port)), handler_for(node))
    except OSError as e:
        sys.exit(f"pg-sidecar: cannot listen on {args.listen}: {e}")
    server.daemon_threads = True
    bound_host, bound_port = server.server_address[:2]
    print(f"pg-sidecar: listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
