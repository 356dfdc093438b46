#!/usr/bin/env bash
# Failover drill: ringlb vs HAProxy 2.6, active-passive, three faults on the ACTIVE backend.
#
# For each round, fault (kill -9 / SIGSTOP / blackhole) and system (ringlb, haproxy) this
#   1. starts two fresh nginx backends: ACTIVE inside a network namespace created here
#      (so it can be blackholed with iptables in that namespace only), PASSIVE on 127.0.0.1;
#   2. starts the proxy in active-passive mode with the same health-check settings
#      (inter 500ms, fall 2, rise 2, check timeout 500ms, connect timeout 500ms,
#      send "HEAD / HTTP/1.0\r\n\r\n" / expect "HTTP/1.");
#   3. runs wrk -t1 -c50 for DURATION s plus a probe that opens one new connection every
#      20 ms; injects the fault at FAULT_AT s and recovers at RECOVER_AT s;
#   4. reads the proxy's own DOWN/UP log lines (timestamped on arrival, same for both),
#      the nginx access logs ($msec) and the probe log, and prints one row.
# At the end it prints the table, the medians and the pass/fail targets, and saves them
# with the raw logs under scripts/results/<date>/.
#
# Needs root (network namespace, iptables inside it). Installs wrk, nginx, haproxy and
# iptables with apt-get if missing. Bounded in time (global watchdog), cleans up every
# process it started by PID and deletes the namespace it created.
#
# Usage: scripts/failover-drill.sh [--quick] [--rounds N] [options]; --help for all.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=drill/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/drill/lib.sh"

# ------------------------------------------------------------------ settings
ROUNDS=3
DURATION=12          # seconds of load per run
FAULT_AT=2           # seconds after the load starts
RECOVER_AT=7
FAULTS="kill stop drop"
SYSTEMS="ringlb haproxy"
THREADS=1            # proxy threads (ringlb --workers, haproxy nbthread): 2 cores are shared
                     # with wrk and two nginx, and the same number keeps the comparison fair
SHUTDOWN_SESSIONS=0  # 1: ringlb --on-down shutdown / haproxy on-marked-down shutdown-sessions
RINGLB_VIA=flags     # flags: the contract's command line; config: the same settings as a TOML --config file
CONNECT_CHECK=0      # 1: connect-only health checks for both (no send/expect; misses a SIGSTOPped backend, fact 7)
KEEP_RAW=0           # 1: keep the nginx access logs (~10-20 MB per run)
OUT_DIR=""
BUDGET=""           # global timeout in seconds (default: 1.5 x the estimate + 60)
SETTLE=1.5           # seconds between proxy start and load start (let the first checks pass)

# Health-check settings, identical for both proxies.
INTER_MS=500; FALL=2; RISE=2; CHECK_TIMEOUT_MS=500; CONNECT_TIMEOUT_MS=500
CHECK_SEND='HEAD / HTTP/1.0\r\n\r\n'   # literal backslashes: both proxies unescape them
CHECK_EXPECT='HTTP/1.'
# Detection target: fall x inter + check timeout.
DETECT_LIMIT=$(awk -v f=$FALL -v i=$INTER_MS -v t=$CHECK_TIMEOUT_MS 'BEGIN{printf "%.1f", (f*i+t)/1000}')

# Namespace for the ACTIVE backend. Names carry our PID so two drills never share one;
# the subnet is fixed, so a second concurrent drill refuses to start (checked below).
NS="rlbdrill$$"
VETH_HOST="rlbd$$h"
VETH_NS="rlbd$$n"
HOST_IP=10.77.0.1
NS_IP=10.77.0.2
SUBNET=10.77.0.0/24
ACTIVE_PORT=8080

usage() {
    cat <<EOF
Usage: $0 [options]
  --quick              smoke run: 1 round, first fault only (default kill)
  --rounds N           rounds of the whole matrix (default $ROUNDS)
  --faults LIST        comma list of kill,stop,drop (default: all)
  --systems LIST       comma list of ringlb,haproxy (default: both)
  --duration S         load seconds per run (default $DURATION); fault at $FAULT_AT s, recovery at $RECOVER_AT s
  --fault-at S / --recover-at S
  --ringlb PATH        ringlb binary (default target/release/ringlb)
  --threads N          proxy threads for both (default $THREADS)
  --shutdown-sessions  close sessions on a backend marked down (both proxies)
  --ringlb-config      give ringlb its settings as a --config TOML file instead of flags
  --connect-check      connect-only health checks for both proxies (no send/expect), for comparison
  --keep-raw           keep the nginx access logs in the results folder
  --out DIR            results folder (default scripts/results/<UTC date-time>)
  --timeout S          global timeout (default 1.5 x the printed estimate + 60 s)
EOF
}

while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --faults) FAULTS=${2//,/ }; shift ;;
        --systems) SYSTEMS=${2//,/ }; shift ;;
        --duration) DURATION=$2; shift ;;
        --fault-at) FAULT_AT=$2; shift ;;
        --recover-at) RECOVER_AT=$2; shift ;;
        --ringlb) RINGLB_BIN=$2; shift ;;
        --threads) THREADS=$2; shift ;;
        --shutdown-sessions) SHUTDOWN_SESSIONS=1 ;;
        --ringlb-config) RINGLB_VIA=config ;;
        --connect-check) CONNECT_CHECK=1 ;;
        --keep-raw) KEEP_RAW=1 ;;
        --out) OUT_DIR=$2; shift ;;
        --timeout) BUDGET=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done
if [[ ${QUICK:-0} == 1 ]]; then
    ROUNDS=1
    FAULTS=${FAULTS%% *}
fi
for f in $FAULTS; do
    [[ $f == kill || $f == stop || $f == drop ]] || { echo "unknown fault: $f" >&2; exit 2; }
done
for s in $SYSTEMS; do
    [[ $s == ringlb || $s == haproxy ]] || { echo "unknown system: $s" >&2; exit 2; }
done

# The host end of the veth pair: deleting it deletes both ends, even when the drill
# stopped before the other end was moved into the namespace.
drill_cleanup() {
    ((${#NS_MADE[@]})) && ip link del "$VETH_HOST" 2>/dev/null
    return 0
}

# ---------------------------------------------------------------- preflight
check_ringlb() {
    [[ -x $RINGLB_BIN ]] || die "no ringlb binary at $RINGLB_BIN (cargo build --release, or --systems haproxy)"
    local help flag missing=()
    help=$("$RINGLB_BIN" --help 2>&1) || true
    for flag in --listen --backend --mode --workers --connect-timeout --idle-timeout --check-interval \
                --check-timeout --rise --fall; do
        grep -q -- "$flag" <<<"$help" || missing+=("$flag")
    done
    ((CONNECT_CHECK)) || for flag in --check-send --check-expect; do
        grep -q -- "$flag" <<<"$help" || missing+=("$flag")
    done
    ((SHUTDOWN_SESSIONS)) && { grep -q -- --on-down <<<"$help" || missing+=(--on-down); }
    ((${#missing[@]} == 0)) || die "ringlb lacks flags the drill needs: ${missing[*]}"
    [[ $RINGLB_VIA == flags ]] || return 0
    # --help lists a flag even when parsing it fails: start ringlb for a moment with the
    # check flags (a backend on 127.0.0.1:9, nothing there) and look for its startup line.
    local out
    out=$(timeout -s INT 1 "$RINGLB_BIN" --listen 127.0.0.1:0 --backend 127.0.0.1:9 \
        --check-send "$CHECK_SEND" --check-expect "$CHECK_EXPECT" 2>&1) || true
    grep -q "listening on" <<<"$out" || die "ringlb does not start with the drill's flags" \
        "(try --ringlb-config):"$'\n'"$(head -n 5 <<<"$out")"
}

setup_namespace() {
    [[ -z $(ip route show "$SUBNET") ]] || die "$SUBNET is already routed on this host (another drill running?)"
    add_ns "$NS"
    ip link add "$VETH_HOST" type veth peer name "$VETH_NS"
    ip link set "$VETH_NS" netns "$NS"
    ip addr add "$HOST_IP/24" dev "$VETH_HOST"
    ip link set "$VETH_HOST" up
    ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$VETH_NS"
    ip netns exec "$NS" ip link set "$VETH_NS" up
    ip netns exec "$NS" iptables -L INPUT -n >/dev/null || die "iptables does not work in the namespace"
}

# -------------------------------------------------------------------- nginx
# The access log records $msec (epoch, ms) of every request; HEAD lines are the
# proxies' health checks.
write_backend_conf() {   # $1 = dir, $2 = name, $3 = listen address
    # shellcheck disable=SC2016 # nginx variables, for nginx to expand
    write_nginx_conf "$1" "$3" '$msec $request_method $status $connection $connection_requests' \
        "backend=$2\\n"
}

ACTIVE_PID=""; PASSIVE_PID=""
start_active() {   # $1 = backend dir; runs inside the namespace
    ip netns exec "$NS" nginx -p "$1" -c "$1/nginx.conf" -e "$1/error.log" &
    ACTIVE_PID=$!   # ip netns exec execs nginx in place: this is nginx's PID
    track "$ACTIVE_PID"
}
start_passive() {
    nginx -p "$1" -c "$1/nginx.conf" -e "$1/error.log" &
    PASSIVE_PID=$!
    track "$PASSIVE_PID"
}

# -------------------------------------------------------------------- proxies
PROXY_PID=""; STAMP_PID=""
# Both proxies' lines are stamped on arrival the same way.
start_proxy() {   # $1 = run dir, rest = command
    local dir=$1; shift
    start_stamped "$dir/proxy.log" "$@"
    PROXY_PID=$STAMPED_PID; STAMP_PID=$STAMPER_PID
}

start_ringlb() {   # $1 = run dir, $2 = listen port, $3 = passive addr
    local cmd=("$RINGLB_BIN" --listen "127.0.0.1:$2" --mode active-passive
        --backend "$NS_IP:$ACTIVE_PORT" --backend "$3"
        --workers "$THREADS"
        --connect-timeout "${CONNECT_TIMEOUT_MS}ms" --idle-timeout 5m
        --check-interval "${INTER_MS}ms" --check-timeout "${CHECK_TIMEOUT_MS}ms"
        --fall "$FALL" --rise "$RISE")
    ((CONNECT_CHECK)) || cmd+=(--check-send "$CHECK_SEND" --check-expect "$CHECK_EXPECT")
    ((SHUTDOWN_SESSIONS)) && cmd+=(--on-down shutdown)
    if [[ $RINGLB_VIA == config ]]; then
        ringlb_toml "$2" "$3" >"$1/ringlb.toml"
        cmd=("$RINGLB_BIN" --config "$1/ringlb.toml")
    fi
    printf '%q ' "${cmd[@]}" >"$1/ringlb.cmd"; echo >>"$1/ringlb.cmd"
    # RUST_LOG=debug (env RINGLB_LOG) adds one line per connection, like option tcplog
    RUST_LOG=${RINGLB_LOG:-info} start_proxy "$1" "${cmd[@]}"
}

# The same settings as the flags above, as a ringlb TOML config (--ringlb-config).
ringlb_toml() {   # $1 = listen port, $2 = passive addr
    cat <<EOF
workers = $THREADS
[[frontend]]
name = "default"
listen = "127.0.0.1:$1"
mode = "active-passive"
backends = ["$NS_IP:$ACTIVE_PORT", "$2"]
connect-timeout = "${CONNECT_TIMEOUT_MS}ms"
idle-timeout = "5m"
check-interval = "${INTER_MS}ms"
check-timeout = "${CHECK_TIMEOUT_MS}ms"
rise = $RISE
fall = $FALL
EOF
    ((CONNECT_CHECK)) || printf "check-send = '%s'\ncheck-expect = '%s'\n" "$CHECK_SEND" "$CHECK_EXPECT"
    ((SHUTDOWN_SESSIONS)) && echo 'on-down = "shutdown"'
    return 0
}

start_haproxy() {   # $1 = run dir, $2 = listen port, $3 = passive addr
    local shut="" check
    ((SHUTDOWN_SESSIONS)) && shut="on-marked-down shutdown-sessions"
    check=$(printf '    option tcp-check\n    tcp-check send "%s"\n    tcp-check expect string %s' \
        "$CHECK_SEND" "$CHECK_EXPECT")
    ((CONNECT_CHECK)) && check="    # connect-only checks (--connect-check)"
    cat >"$1/haproxy.cfg" <<EOF
# Same settings as ringlb; 'option redispatch' + 'retries 3' is HAProxy's fair best
# for failover; the passive server is a 'backup'.
global
    log stdout format raw local0
    nbthread $THREADS
    maxconn 4096

defaults
    mode tcp
    log global
    option tcplog
    option dontlog-normal          # log only failed sessions, not every good one
    option redispatch
    retries 3
    timeout connect ${CONNECT_TIMEOUT_MS}ms
    timeout client 5m
    timeout server 5m
    timeout check ${CHECK_TIMEOUT_MS}ms

frontend fe
    bind 127.0.0.1:$2
    default_backend be

backend be
$check
    server active  $NS_IP:$ACTIVE_PORT check inter $INTER_MS fall $FALL rise $RISE $shut
    server passive $3 check inter $INTER_MS fall $FALL rise $RISE backup $shut
EOF
    start_proxy "$1" haproxy -db -f "$1/haproxy.cfg"
}

# --------------------------------------------------------------------- faults
inject_fault() {
    case $1 in
        kill) kill -KILL "$ACTIVE_PID"; wait "$ACTIVE_PID" 2>/dev/null || true; untrack "$ACTIVE_PID" ;;
        stop) kill -STOP "$ACTIVE_PID" ;;
        drop) ip netns exec "$NS" iptables -A INPUT -j DROP ;;
    esac
}
recover_fault() {   # $2 = active backend dir
    case $1 in
        kill) start_active "$2" ;;
        stop) kill -CONT "$ACTIVE_PID" ;;
        drop) ip netns exec "$NS" iptables -D INPUT -j DROP ;;
    esac
}

# ---------------------------------------------------------------------- a run
run_one() {
    local system=$1 fault=$2 round=$3
    local dir="$RESULTS/r$round-$fault-$system"
    mkdir -p "$dir/active" "$dir/passive"
    log "round $round  fault $fault  system $system"

    # Fresh backends.
    local pport; pport=$(python3 "$DRILL_PY" freeport)
    write_backend_conf "$dir/active" active "$NS_IP:$ACTIVE_PORT"
    write_backend_conf "$dir/passive" passive "127.0.0.1:$pport"
    start_active "$dir/active"
    start_passive "$dir/passive"
    python3 "$DRILL_PY" waitport "$NS_IP" "$ACTIVE_PORT" 5 || die "active nginx did not start"
    python3 "$DRILL_PY" waitport 127.0.0.1 "$pport" 5 || die "passive nginx did not start"

    # Fresh proxy.
    local lport; lport=$(python3 "$DRILL_PY" freeport)
    "start_$system" "$dir" "$lport" "127.0.0.1:$pport"
    python3 "$DRILL_PY" waitport 127.0.0.1 "$lport" 5 || die "$system did not start (see $dir/proxy.log)"
    sleep "$SETTLE"

    # Load and probe, both bounded by their own duration and by timeout(1).
    local t_start wrk_pid probe_pid t_fault t_recover t_end
    t_start=$(now)
    timeout -k 2 $((DURATION + 15)) wrk -t1 -c50 -d"${DURATION}s" --timeout 2s -s "$WRK_LUA" \
        "http://127.0.0.1:$lport/" >"$dir/wrk.out" 2>&1 &
    wrk_pid=$!; track "$wrk_pid"
    timeout -k 2 $((DURATION + 10)) python3 "$DRILL_PY" probe --port "$lport" --duration "$DURATION" \
        --out "$dir/probe.tsv" &
    probe_pid=$!; track "$probe_pid"

    sleep_until "$(fadd "$t_start" "$FAULT_AT")"
    t_fault=$(now)   # the instant the fault action starts (recovery is timed the same way)
    inject_fault "$fault"
    sleep_until "$(fadd "$t_start" "$RECOVER_AT")"
    t_recover=$(now)
    recover_fault "$fault" "$dir/active"

    wait "$wrk_pid" || log "wrk exited with $?"
    untrack "$wrk_pid"
    wait "$probe_pid" || log "probe exited with $?"
    untrack "$probe_pid"
    t_end=$(now)

    # Tear down: proxy first (its log ends, so the stamper sees EOF), then backends.
    stop_pid "$PROXY_PID" 5
    stop_pid "$STAMP_PID" 2
    stop_pid "$ACTIVE_PID" 3
    stop_pid "$PASSIVE_PID" 3
    ip netns exec "$NS" iptables -F INPUT   # in case the run stopped between fault and recovery
    rm -f "$dir/proxy.log.fifo"

    cat >"$dir/meta.env" <<EOF
system=$system
fault=$fault
round=$round
t_start=$t_start
t_fault=$t_fault
t_recover=$t_recover
t_end=$t_end
active=$NS_IP:$ACTIVE_PORT
passive=127.0.0.1:$pport
EOF
    mv "$dir/active/access.log" "$dir/active.access.log" 2>/dev/null || true
    mv "$dir/passive/access.log" "$dir/passive.access.log" 2>/dev/null || true
    python3 "$DRILL_PY" analyze "$dir" --rows "$RESULTS/rows.jsonl"
    ((KEEP_RAW)) || rm -f "$dir/active.access.log" "$dir/passive.access.log"
    rm -rf "$dir/active/tmp" "$dir/passive/tmp"
    tail -n1 "$RESULTS/rows.jsonl" | python3 -c '
import json,sys; r=json.loads(sys.stdin.read())
print("    requests %s errors %s down %s backup %s up %s back(new) %s new-conn fails %s/%s/%s %s" % (
  r["requests"], r["errors"], r["down_s"], r["backup_s"], r["up_s"], r["back_new_s"],
  r["probe_fail_fault_to_down"], r["probe_fail_after_down"], r["probe_fail_after_recover"],
  "; ".join(r["notes"])))' >&2
}

# ---------------------------------------------------------------------- main
main() {
    [[ $EUID -eq 0 ]] || die "run as root (network namespace, iptables inside it)"
    ((FAULT_AT < RECOVER_AT && RECOVER_AT < DURATION)) || die "need fault-at < recover-at < duration"
    install_tools wrk:wrk nginx:nginx haproxy:haproxy iptables:iptables ip:iproute2
    [[ " $SYSTEMS " == *" ringlb "* ]] && check_ringlb

    local nsys nfault runs per_run estimate budget=$BUDGET
    nsys=$(wc -w <<<"$SYSTEMS"); nfault=$(wc -w <<<"$FAULTS")
    runs=$((ROUNDS * nsys * nfault))
    per_run=$((DURATION + 5))   # + start, settle, teardown, analysis
    estimate=$((runs * per_run + 10))
    [[ -n $budget ]] || budget=$((estimate * 3 / 2 + 60))
    log "$runs runs ($ROUNDS rounds x faults [$FAULTS] x systems [$SYSTEMS]), ~${per_run}s each:" \
        "estimate ${estimate}s, global timeout ${budget}s"

    start_watchdog "$budget"

    RESULTS=${OUT_DIR:-$SCRIPT_DIR/results/$(date -u +%Y-%m-%dT%H%M%SZ)}
    mkdir -p "$RESULTS"
    : >"$RESULTS/rows.jsonl"
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "host: $(uname -r), $(nproc) cores"
        echo "haproxy: $(haproxy -v | head -n1)"
        echo "nginx: $(nginx -v 2>&1)"
        echo "wrk: $(wrk --version 2>&1 | head -n1)"
        [[ -x $RINGLB_BIN ]] && echo "ringlb: $RINGLB_BIN ($(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo "ringlb settings via: $RINGLB_VIA"
        echo "rounds=$ROUNDS faults=[$FAULTS] systems=[$SYSTEMS] duration=${DURATION}s fault_at=${FAULT_AT}s recover_at=${RECOVER_AT}s"
        echo "inter=${INTER_MS}ms fall=$FALL rise=$RISE check_timeout=${CHECK_TIMEOUT_MS}ms connect_timeout=${CONNECT_TIMEOUT_MS}ms threads=$THREADS shutdown_sessions=$SHUTDOWN_SESSIONS"
        if ((CONNECT_CHECK)); then echo "check: connect only"
        else echo "check: send '$CHECK_SEND' expect '$CHECK_EXPECT'"; fi
        echo "load: wrk -t1 -c50 --timeout 2s; probe: 1 new connection / 20 ms, 2 s timeout"
    } >"$RESULTS/settings.txt"

    setup_namespace

    local round fault system systems_order
    for ((round = 1; round <= ROUNDS; round++)); do
        for fault in $FAULTS; do
            # Alternate which system goes first, so neither always runs on a warmer machine.
            systems_order=$SYSTEMS
            ((round % 2 == 0)) && systems_order=$(tr ' ' '\n' <<<"$SYSTEMS" | tac | tr '\n' ' ')
            for system in $systems_order; do
                run_one "$system" "$fault" "$round"
            done
        done
    done

    python3 "$DRILL_PY" report "$RESULTS/rows.jsonl" --detect-limit "$DETECT_LIMIT" | tee "$RESULTS/table.txt"
    # The timeline of round 1, ringlb beside HAProxy (Debian's python3 has matplotlib).
    /usr/bin/python3 "$SCRIPT_DIR/drill/chart.py" --failover "$RESULTS" --out "$RESULTS/failover-drill.png" ||
        log "no chart (python3-matplotlib missing?)"
    log "results and logs in $RESULTS"
}

main
