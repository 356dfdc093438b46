# shellcheck shell=bash
# What scripts/failover-drill.sh, ha-drill.sh and ecmp-drill.sh share; sourced, not run.
#
# A drill sources this first thing after `set -euo pipefail`, then sets DRILL_NAME (its
# log prefix) and, for ns/in_ns, NS_PREFIX. Sourcing installs the exit cleanup: it stops
# every process the drill tracked (and nothing else), runs the drill's own
# drill_cleanup if it defines one, and deletes every namespace made with add_ns.
#
# The namespace balancer pieces (start_backends, start_ringlb_ns, start_load, ...) are
# for ha and ecmp; they expect RESULTS, an associative array IP (IP[be], IP[lb1], ...)
# and, for the load, DURATION.

export LC_ALL=C   # $EPOCHREALTIME and printf must use '.' as the decimal point
SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
DRILL_PY="$SCRIPT_DIR/drill/drill.py"
HA_PY="$SCRIPT_DIR/drill/ha.py"
CHART="$SCRIPT_DIR/drill/chart.py"
WRK_LUA="$SCRIPT_DIR/drill/wrk-summary.lua"
RINGLB_BIN="$REPO_DIR/target/release/ringlb"
# Debian's interpreter: it has python3-matplotlib, and starts fast (a pyenv shim
# can take a second on a loaded machine, which would skew the timings).
PY=/usr/bin/python3
DRILL_NAME=drill

log() { printf '[%s %s] %s\n' "$DRILL_NAME" "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
now() { echo "$EPOCHREALTIME"; }
fadd() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.6f", a+b}'; }
# In bash, not an interpreter: starting one can take seconds on a loaded host, and the
# fault must come on time.
usec() { local s=${1%.*} f=${1#*.}000000; [[ $1 == *.* ]] || f=000000; echo $((s * 1000000 + 10#${f:0:6})); }
sleep_until() {
    local d=$(($(usec "$1") - $(usec "$EPOCHREALTIME")))
    ((d > 0)) && sleep "$((d / 1000000)).$(printf %06d $((d % 1000000)))"
    return 0
}

# ------------------------------------------------------- process bookkeeping
# Every background process a drill starts is recorded here, and only these are ever
# stopped: by PID, never by name.
TRACKED=()
track() { TRACKED+=("$1"); }
untrack() {
    local p keep=()
    for p in "${TRACKED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    TRACKED=("${keep[@]}")
}
alive() { kill -0 "$1" 2>/dev/null; }

# Stop one process we started: SIGCONT first (the drill may have SIGSTOPped it),
# then SIGTERM, then SIGKILL after `grace` seconds (default 3).
stop_pid() {
    local pid=$1 grace=${2:-3} i
    if alive "$pid"; then
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 20; i++)); do alive "$pid" || break; sleep 0.05; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
}

# A command whose stdout+stderr go through a FIFO into the timestamper (appended to
# the log file), so that STAMPED_PID is the command's own PID and every line is
# stamped on arrival the same way. STAMPER_PID is the timestamper's.
start_stamped() {   # $1 = log file, rest = command
    local logf=$1; shift
    rm -f "$logf.fifo"; mkfifo "$logf.fifo"
    "$PY" -u "$DRILL_PY" stamp <"$logf.fifo" >>"$logf" &
    STAMPER_PID=$!; track $!
    "$@" >"$logf.fifo" 2>&1 &
    STAMPED_PID=$!; track $!
}

# ------------------------------------------------------------ cleanup, watchdog
WATCHDOG_PID=""
NS_MADE=()
cleanup() {
    local rc=$? p n
    trap - EXIT INT TERM
    set +e
    [[ -n $WATCHDOG_PID ]] && kill "$WATCHDOG_PID" 2>/dev/null
    for p in "${TRACKED[@]}"; do kill -CONT "$p" 2>/dev/null; kill -TERM "$p" 2>/dev/null; done
    sleep 0.3
    for p in "${TRACKED[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do alive "$p" || break; sleep 0.2; done
        alive "$p" && kill -KILL "$p" 2>/dev/null
    done
    declare -F drill_cleanup >/dev/null && drill_cleanup
    # Deleting a namespace also deletes its veth pairs, bridges and iptables rules.
    for n in "${NS_MADE[@]}"; do ip netns del "$n" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (global timeout?)"; exit 143' TERM

# Sends the drill SIGTERM (whose trap cleans up) if it runs longer than $1 seconds.
# It sleeps in 1 s steps so that killing it leaves no sleep behind for long.
start_watchdog() {
    local budget=$1
    ( trap 'exit 0' TERM
      end=$((SECONDS + budget))
      while ((SECONDS < end)); do sleep 1; done
      kill -TERM $$ ) &
    WATCHDOG_PID=$!
}

# ------------------------------------------------------------------- packages
# $@ = command:package pairs; python3-matplotlib (for the charts) is checked too.
install_tools() {
    local missing=() t
    for t in "$@"; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
    done
    "$PY" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Packages must not start their own services (an nginx on :80, a keepalived or a
    # BIRD on the host's network): a policy-rc.d that says 101 tells invoke-rc.d not
    # to. Docker images ship one.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    for t in "$@"; do command -v "${t%%:*}" >/dev/null || die "${t%%:*} still missing"; done
}

# ------------------------------------------------------------------- network
# Names carry the drill's PID (in NS_PREFIX) so that two drills never share one.
ns() { echo "${NS_PREFIX}$1"; }
in_ns() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

add_ns() {   # $1 = full name; deleted on exit
    ip netns add "$1"
    NS_MADE+=("$1")
    ip netns exec "$1" ip link set lo up
}

# Namespace $2 on the bridge br0 of namespace $1: its eth0 has IP[$2]/24.
bridge_port() {   # $1 = namespace with br0, $2 = namespace to attach
    local sw=$1 n=$2
    ip -n "$(ns "$sw")" link add "p-$n" type veth peer name eth0 netns "$(ns "$n")"
    ip -n "$(ns "$sw")" link set "p-$n" master br0 up
    in_ns "$n" ip addr add "${IP[$n]}/24" dev eth0
    in_ns "$n" ip link set eth0 up
}

# -------------------------------------------------------------------- nginx
# One nginx per backend, single process (master_process off) so that kill -9 and
# SIGSTOP of one PID hit the whole server. The access log is buffered: $msec is taken
# when the request ends, not when the buffer is written. A keep-alive client
# reconnects after 1000 requests: that is how wrk's connections find their way back
# to a backend after a failback.
write_nginx_conf() {   # $1 = dir, $2 = listen address, $3 = access log format, $4 = response
    mkdir -p "$1/tmp"
    cat >"$1/nginx.conf" <<EOF
daemon off;
master_process off;
pid $1/nginx.pid;
error_log $1/error.log warn;
events { worker_connections 8192; }
http {
    log_format drill '$3';
    access_log $1/access.log drill buffer=64k flush=100ms;
    client_body_temp_path $1/tmp/body; proxy_temp_path $1/tmp/proxy;
    fastcgi_temp_path $1/tmp/fastcgi; uwsgi_temp_path $1/tmp/uwsgi; scgi_temp_path $1/tmp/scgi;
    keepalive_requests 1000;
    server {
        listen $2;
        default_type text/plain;
        location / { return 200 "$4"; }
    }
}
EOF
}

# Two nginx in namespace be, ports 8080 and 8081. The access log records which
# balancer sent each request ($remote_addr). $1 = the namespace to wait for them from.
start_backends() {
    local from=$1 i port d
    for i in 1 2; do
        port=$((8080 + i - 1)); d="$RESULTS/be$i"
        # shellcheck disable=SC2016 # nginx variables, for nginx to expand
        write_nginx_conf "$d" "${IP[be]}:$port" '$msec $request_method $status $remote_addr $connection' \
            'backend=be'"$i"' via=$remote_addr\n'
        ip netns exec "$(ns be)" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
        track $!
        in_ns "$from" "$PY" "$DRILL_PY" waitport "${IP[be]}" "$port" 5 || die "nginx be$i did not start"
    done
}

# ------------------------------------------------------------------ balancers
declare -A RINGLB_PID

write_ringlb_conf() {   # $1 = listen address, $2 = stats address
    cat >"$RESULTS/ringlb.toml" <<EOF
# The same file on every balancer (only the admin socket differs, given as a flag).
workers = 1
leave-delay = "$LEAVE_DELAY"
drain-timeout = "3s"
stats = "$2"

[[frontend]]
name = "web"
listen = "$1"
backends = ["${IP[be]}:8080", "${IP[be]}:8081"]
check-interval = "500ms"
EOF
}

ringlb_ready() {   # $1 = balancer namespace
    in_ns "$1" "$RINGLB_BIN" ctl --socket "$RESULTS/$1/ringlb.sock" ready >/dev/null 2>&1
}

start_ringlb_ns() {   # $1 = balancer namespace; returns once it is ready
    local n=$1 i
    RUST_LOG=info start_stamped "$RESULTS/$n/ringlb.log" ip netns exec "$(ns "$n")" \
        "$RINGLB_BIN" --config "$RESULTS/ringlb.toml" --admin-socket "$RESULTS/$n/ringlb.sock"
    RINGLB_PID[$n]=$STAMPED_PID
    for ((i = 0; i < 100; i++)); do
        ringlb_ready "$n" && return 0
        sleep 0.05
    done
    die "ringlb on $n did not become ready (see $RESULTS/$n/ringlb.log)"
}

kill_ringlb_ns() {   # $1 = balancer namespace: kill -9, as a crash
    kill -KILL "${RINGLB_PID[$1]}"
    wait "${RINGLB_PID[$1]}" 2>/dev/null || true
    untrack "${RINGLB_PID[$1]}"
}

# After a SIGTERM or SIGINT: it drains (drain-timeout 3 s) and exits; a new one takes
# its place.
replace_ringlb_ns() {   # $1 = balancer namespace
    local i
    for ((i = 0; i < 100; i++)); do alive "${RINGLB_PID[$1]}" || break; sleep 0.05; done
    stop_pid "${RINGLB_PID[$1]}"
    start_ringlb_ns "$1"
}

# ------------------------------------------------------------------- a run
# From namespace cli to http://$2/ for DURATION s: wrk -c50 keep-alive, a new-connection
# probe every 20 ms, and keep-alive probe connections (the rest: ha.py kprobe options).
# Returns once both probes run (an interpreter may take a while to start), so that the
# caller's time 0 is when every load generator runs. LOAD_PIDS: the three.
start_load() {   # $1 = run dir, $2 = host, rest = kprobe options
    local dir=$1 host=$2 i; shift 2
    LOAD_PIDS=()
    in_ns cli timeout -k 2 $((DURATION + 15)) wrk -t1 -c50 -d"${DURATION}s" --timeout 2s -s "$WRK_LUA" \
        "http://$host/" >"$dir/wrk.out" 2>&1 &
    LOAD_PIDS+=($!); track $!
    in_ns cli timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" probe --host "$host" \
        --duration "$DURATION" --out "$dir/probe.tsv" &
    LOAD_PIDS+=($!); track $!
    in_ns cli timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" kprobe --host "$host" "$@" \
        --duration "$DURATION" --out "$dir/kprobe.tsv" &
    LOAD_PIDS+=($!); track $!
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/probe.tsv && -s $dir/kprobe.tsv ]] &&
            (($(wc -l <"$dir/probe.tsv") > 1 && $(wc -l <"$dir/kprobe.tsv") > 1)) && break
        sleep 0.05
    done
}

wait_load() {
    local p
    for p in "${LOAD_PIDS[@]}"; do wait "$p" || true; untrack "$p"; done
}

# nginx appends (O_APPEND): truncating starts this run's log.
reset_access_logs() {
    local i
    for i in 1 2; do : >"$RESULTS/be$i/access.log"; done
}

take_access_logs() {   # $1 = run dir
    local i
    sleep 0.2   # nginx flushes its log every 100 ms
    for i in 1 2; do cp "$RESULTS/be$i/access.log" "$1/access-be$i.log"; done
}

# The run's row, its chart; the access logs (~1 MB each) go: timeline.csv keeps their counts.
analyze_run() {   # $1 = run dir, $2 = chart title
    "$PY" "$HA_PY" analyze "$1" --rows "$RESULTS/rows.jsonl"
    rm -f "$1"/access-be*.log
    "$PY" "$CHART" "$1" --title "$2" --out "$1/timeline.png" || log "no chart for $(basename "$1")"
}

settings_head() {   # $@ = the drill's arguments
    echo "date: $(date -u +%FT%TZ)"
    echo "command: $0 $*"
    echo "host: $(uname -r), $(nproc) cores, load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
}

ringlb_version() {
    echo "$RINGLB_BIN ($(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
}

# What is left of the backends and the FIFOs goes; the logs stay.
tidy_results() {
    rm -rf "$RESULTS"/be*/tmp "$RESULTS"/be*/access.log
    find "$RESULTS" -name '*.fifo' -delete
    log "results in $RESULTS"
}
