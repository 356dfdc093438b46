#!/usr/bin/env python3
"""A Patroni-style health endpoint for one PostgreSQL node, for ringlb's
`check-http` with `check-port` (see examples/postgres.toml).

    GET /primary   200 when the node is a primary (not in recovery), else 503
    GET /replica   200 when the node is a replica (in recovery), else 503
    GET /health    200 when the node runs a query, primary or replica, else 503

Patroni's `/leader` (= /primary) and `/read-only` (= /health) answer too.
HEAD and OPTIONS answer the same statuses without a body, as Patroni does.
Any doubt (the server is down, refuses us, or does not answer within
--timeout) is 503: a node we cannot ask must not take writes.

Each request opens a new session and runs `select pg_is_in_recovery()`,
so the answer is what a new client would see: a server at
max_connections, starting up or shutting down fails it. It speaks
PostgreSQL's protocol itself (python3's standard library only, no
driver, no psql process per check): trust, peer (over the Unix socket),
password, md5 and SCRAM-SHA-256 authentication, without TLS, so run it
beside its server and connect over the Unix socket or loopback.

    python3 pg-sidecar.py --listen 0.0.0.0:8008 --host /var/run/postgresql \\
        --port 5432 --user postgres

The password, when one is needed: PGPASSWORD in the environment or
--password-file. It prints "pg-sidecar: listening on HOST:PORT" once it
accepts (port 0 picks a free one) and logs one line per change of
answer, not one per check.
"""

import argparse
import base64
import hashlib
import hmac
import http.server
import json
import os
import secrets
import socket
import struct
import sys
import threading

QUERY = b"select pg_is_in_recovery()"


class Refused(Exception):
    """The server answered, but not with a session (an error, an
    authentication we cannot do)."""


class Session:
    """One PostgreSQL session over protocol 3.0, enough for one query."""

    def __init__(self, args):
        self.args = args
        if args.host.startswith("/"):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(args.timeout)
            self.sock.connect(os.path.join(args.host, f".s.PGSQL.{args.port}"))
        else:
            self.sock = socket.create_connection((args.host, args.port), timeout=args.timeout)
        self.buffer = b""

    def close(self):
        try:
            self.sock.sendall(b"X\x00\x00\x00\x04")
        except OSError:
            pass
        self.sock.close()

    def send(self, kind, body):
        self.sock.sendall(kind + struct.pack("!I", len(body) + 4) + body)

    def read(self, n):
        while len(self.buffer) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise Refused("the server closed the connection")
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def message(self):
        kind = self.read(1)
        (length,) = struct.unpack("!I", self.read(4))
        if not 4 <= length <= 1 << 24:
            raise Refused(f"bad message length {length}")
        body = self.read(length - 4)
        if kind == b"E":
            raise Refused(error_text(body))
        return kind, body

    def start(self):
        params = {"user": self.args.user, "database": self.args.dbname,
                  "application_name": "pg-sidecar"}
        body = struct.pack("!I", 196608)
        for key, value in params.items():
            body += key.encode() + b"\0" + value.encode() + b"\0"
        body += b"\0"
        self.sock.sendall(struct.pack("!I", len(body) + 4) + body)
        while True:
            kind, body = self.message()
            if kind == b"R":
                self.authenticate(body)
            elif kind == b"Z":
                return

    def authenticate(self, body):
        (code,) = struct.unpack("!I", body[:4])
        if code == 0:
            return
        password = self.args.password
        if password is None:
            raise Refused("the server asks for a password; set PGPASSWORD or --password-file")
        if code == 3:
            self.send(b"p", password.encode() + b"\0")
        elif code == 5:
            inner = hashlib.md5(password.encode() + self.args.user.encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + body[4:8]).hexdigest()
            self.send(b"p", b"md5" + outer.encode() + b"\0")
        elif code == 10:
            mechanisms = body[4:].split(b"\0")
            if b"SCRAM-SHA-256" not in mechanisms:
                raise Refused(f"no SASL mechanism we know in {mechanisms}")
            self.scram(password)
        else:
            raise Refused(f"authentication method {code} is not supported")

    def scram(self, password):
        nonce = base64.b64encode(secrets.token_bytes(18)).decode()
        first_bare = f"n=,r={nonce}"
        first = ("n,," + first_bare).encode()
        self.send(b"p", b"SCRAM-SHA-256\0" + struct.pack("!I", len(first)) + first)
        kind, body = self.message()
        if kind != b"R" or struct.unpack("!I", body[:4])[0] != 11:
            raise Refused("SCRAM: no server-first message")
        server_first = body[4:].decode()
        fields = dict(item.split("=", 1) for item in server_first.split(","))
        if not fields.get("r", "").startswith(nonce):
            raise Refused("SCRAM: the server's nonce does not extend ours")
        salted = hashlib.pbkdf2_hmac("sha256", password.encode(),
                                     base64.b64decode(fields["s"]), int(fields["i"]))
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        final_bare = f"c=biws,r={fields['r']}"
        message = f"{first_bare},{server_first},{final_bare}".encode()
        signature = hmac.digest(hashlib.sha256(client_key).digest(), message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature))
        self.send(b"p", f"{final_bare},p={base64.b64encode(proof).decode()}".encode())
        kind, body = self.message()
        if kind != b"R" or struct.unpack("!I", body[:4])[0] != 12:
            raise Refused("SCRAM: no server-final message")
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        expected = base64.b64encode(hmac.digest(server_key, message, "sha256")).decode()
        if body[4:].decode() != f"v={expected}":
            raise Refused("SCRAM: the server's signature does not match")

    def query_one(self, sql):
        self.send(b"Q", sql + b"\0")
        value = None
        while True:
            kind, body = self.message()
            if kind == b"D" and value is None:
                (length,) = struct.unpack("!i", body[2:6])
                value = body[6:6 + length].decode() if length >= 0 else None
            elif kind == b"Z":
                return value


def error_text(body):
    fields = {f[:1]: f[1:].decode(errors="replace") for f in body.split(b"\0") if f}
    return f"{fields.get(b'M', 'error')} ({fields.get(b'C', '?')})"


class Node:
    """Asks PostgreSQL what it is; remembers the last answer for logging."""

    def __init__(self, args):
        self.args = args
        self.last = None
        self.lock = threading.Lock()

    def role(self):
        """('primary' | 'replica' | None, reason when None)."""
        session = None
        try:
            session = Session(self.args)
            session.start()
            answer = session.query_one(QUERY)
        except (OSError, Refused) as e:
            return None, str(e) or type(e).__name__
        finally:
            if session is not None:
                session.close()
        if answer == "t":
            return "replica", ""
        if answer == "f":
            return "primary", ""
        return None, f"unexpected answer {answer!r}"

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
        timeout = 10

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
    parser.add_argument("--host", default="127.0.0.1",
                        help="PostgreSQL's address, or its Unix socket directory (/...)")
    parser.add_argument("--port", type=int, default=5432, help="PostgreSQL's port")
    parser.add_argument("--user", default="postgres", help="user to connect as")
    parser.add_argument("--dbname", default="postgres", help="database to connect to")
    parser.add_argument("--password-file", help="a file holding the password")
    parser.add_argument("--timeout", type=float, default=2.0,
                        help="seconds one question may take before the answer is 503")
    args = parser.parse_args()
    args.password = os.environ.get("PGPASSWORD")
    if args.password_file:
        with open(args.password_file) as f:
            args.password = f.read().strip()

    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r}: expected HOST:PORT")
    host = host.strip("[]")

    class Server(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    try:
        server = Server((host, int(port)), handler_for(Node(args)))
    except OSError as e:
        sys.exit(f"pg-sidecar: cannot listen on {args.listen}: {e}")
    bound_host, bound_port = server.server_address[:2]
    print(f"pg-sidecar: listening on {bound_host}:{bound_port}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
