#!/usr/bin/env bash
# Builds the .deb, installs it on this machine, checks what an operator
# relies on, then removes and purges it. Root only (dpkg, setpriv). Run by
# .ci/run after the cargo tests; on a machine where ringlb is already
# installed it refuses to run rather than replace that install.
# Usage: packaging/test-deb.sh      (ends with "N passed, N failed")
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "test-deb: must run as root (dpkg -i)" >&2
    exit 1
fi
if dpkg-query -W -f='${Status}' ringlb 2>/dev/null | grep -q installed; then
    echo "test-deb: a ringlb package is already installed here; dpkg -P ringlb first" >&2
    exit 1
fi

# man (man-db), systemd-analyze and systemd-sysusers (systemd),
# setpriv (util-linux), python3 for the loopback backend.
missing=()
for tool in man:man-db systemd-analyze:systemd systemd-sysusers:systemd \
    setpriv:util-linux python3:python3; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq "${missing[@]}"
fi

passed=0
failed=0
check() {
    local what=$1
    shift
    if "$@" >/tmp/ringlb-test-deb.out 2>&1; then
        passed=$((passed + 1))
        echo "ok: $what"
    else
        failed=$((failed + 1))
        echo "FAILED: $what"
        sed 's/^/    /' /tmp/ringlb-test-deb.out | tail -n 20
    fi
}

pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    # Leave the machine as it was, even when a check or the build failed.
    if dpkg-query -W -f='${Status}' ringlb 2>/dev/null | grep -qv not-installed; then
        dpkg -P ringlb >/dev/null 2>&1 || true
    fi
    rm -f /tmp/ringlb-test-deb.out
}
trap cleanup EXIT

deb=$(packaging/build-deb.sh | tail -n 1)
echo "test-deb: installing $deb"
check "dpkg -i (no systemd running: the scripts must not fail)" dpkg -i "$deb"

# --- Installed --------------------------------------------------------------
check "binary in /usr/bin" test -x /usr/bin/ringlb
check "default config passes --check" \
    /usr/bin/ringlb --config /etc/ringlb/ringlb.toml --check
check "the service user can read the config" \
    setpriv --reuid ringlb --regid ringlb --clear-groups --no-new-privs \
    /usr/bin/ringlb --config /etc/ringlb/ringlb.toml --check
check "config files are conffiles" \
    grep -qx /etc/ringlb/ringlb.toml /var/lib/dpkg/info/ringlb.conffiles
check "system user ringlb, no login, no home" \
    sh -c 'getent passwd ringlb | grep -q ":/nonexistent:/usr/sbin/nologin$" && getent group ringlb'
check "man ringlb shows the page" \
    sh -c 'man -P cat ringlb 2>/dev/null | grep -q "layer-4 TCP load balancer"'
check "man page lists the flags and signals" \
    sh -c 'man -P cat ringlb 2>/dev/null | grep -q -- "--drain-timeout" &&
           man -P cat ringlb 2>/dev/null | grep -q SIGTERM'
check "bash completion offers the flags" \
    bash -c 'source /usr/share/bash-completion/completions/ringlb &&
             complete -p ringlb && grep -q -- --config /usr/share/bash-completion/completions/ringlb'
check "zsh completion installed" test -s /usr/share/zsh/vendor-completions/_ringlb
check "fish completion installed" test -s /usr/share/fish/vendor_completions.d/ringlb.fish
unit=/lib/systemd/system/ringlb.service
check "unit installed" test -s "$unit"
check "installed unit passes systemd-analyze verify (man page found too)" \
    sh -c "systemd-analyze verify $unit 2>&1 | tee /dev/stderr | (! grep -q .)"
check "unit enabled (multi-user.target.wants)" \
    test -L /etc/systemd/system/multi-user.target.wants/ringlb.service

# --- Runs as the unit runs it: user ringlb, only CAP_NET_BIND_SERVICE, ----
# --- no new privileges; io_uring must work there and a port < 1024 bind. ---
free_port() {
    python3 - "$1" "$2" <<'PY'
import socket, sys
for port in range(int(sys.argv[1]), int(sys.argv[2])):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port)); print(port); break
    except OSError:
        pass
    finally:
        s.close()
PY
}
low_port=$(free_port 700 1000)
backend_port=$(free_port 20700 21000)
python3 - "$backend_port" >/dev/null 2>&1 <<'PY' &
# An echo backend on loopback that stops by itself after 60 s.
import socket, sys, threading
srv = socket.create_server(("127.0.0.1", int(sys.argv[1])))
srv.settimeout(60)
def serve(c):
    with c:
        try:
            while data := c.recv(4096):
                c.sendall(data)
        except OSError:
            pass  # health checks and resets are not this test's business
try:
    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()
except OSError:
    pass
PY
pids+=($!)
backend_up() {
    python3 - "$backend_port" <<'PY'
import socket, sys, time
deadline = time.monotonic() + 30
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.05)
PY
}
check "loopback echo backend up" backend_up
log=$(mktemp)
# setpriv execs ringlb, so $! is ringlb's own pid. stdout to /dev/null: a
# background process holding this script's stdout would keep a pipe open.
setpriv --reuid ringlb --regid ringlb --clear-groups --no-new-privs \
    --inh-caps=-all,+net_bind_service --ambient-caps=-all,+net_bind_service \
    --bounding-set=-all,+net_bind_service \
    /usr/bin/ringlb --listen "127.0.0.1:$low_port" \
    --backend "127.0.0.1:$backend_port" >/dev/null 2>"$log" &
service_pid=$!
pids+=("$service_pid")
listening() {
    for _ in $(seq 1 200); do
        grep -q "listening on" "$log" && return 0
        kill -0 "$service_pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$log"
    return 1
}
relays() {
    python3 - "$low_port" <<'PY'
import socket, sys
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as s:
    s.sendall(b"ping")
    back = b""
    while len(back) < 4 and (part := s.recv(4 - len(back))):
        back += part
    assert back == b"ping", back
PY
}
check "as user ringlb with CAP_NET_BIND_SERVICE: listens on port $low_port" listening
check "as user ringlb: relays through io_uring" relays
stopped() {
    grep -q "ringlb" "/proc/$service_pid/cmdline" || return 1
    kill -TERM "$service_pid"
    # wait, not a poll: it gives ringlb's own exit code (bounded by the
    # leave delay, 2 s, plus the drain timeout, 30 s; no connection is open).
    wait "$service_pid"
    grep -q "SIGTERM: leaving: not ready" "$log" || { cat "$log"; return 1; }
    grep -q "leave delay over: draining" "$log" || { cat "$log"; return 1; }
}
check "as user ringlb: SIGTERM leaves (not ready for leave-delay), drains and exits 0" stopped
check "without the capability the low port is refused (the cap is what grants it)" \
    sh -c "! setpriv --reuid ringlb --regid ringlb --clear-groups --no-new-privs \
           --inh-caps=-all --bounding-set=-all \
           /usr/bin/ringlb --listen 127.0.0.1:$low_port --backend 127.0.0.1:$backend_port"
rm -f "$log"

# --- Remove: binary gone, config kept; purge: config and user gone. --------
check "dpkg -r" dpkg -r ringlb
check "binary gone after remove" test ! -e /usr/bin/ringlb
check "unit gone after remove" test ! -e "$unit"
check "config kept after remove" test -f /etc/ringlb/ringlb.toml
check "package left as config-files" \
    sh -c "dpkg-query -W -f='\${Status}' ringlb | grep -q config-files"
check "dpkg -P" dpkg -P ringlb
check "config gone after purge" test ! -e /etc/ringlb/ringlb.toml
check "user gone after purge" sh -c '! getent passwd ringlb && ! getent group ringlb'
check "enable symlink gone after purge" \
    test ! -e /etc/systemd/system/multi-user.target.wants/ringlb.service

echo "test-deb: $passed passed, $failed failed"
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
