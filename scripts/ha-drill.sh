#!/usr/bin/env bash
# HA drill: two ringlb balancers sharing a virtual IP with keepalived (VRRP), under load.
#
# Network namespaces on one bridge (all inside namespaces created here; the host's own
# network is not touched):
#   sw   the bridge (a switch)
#   cli  the client: wrk -c50 keep-alive, a new-connection probe every 20 ms, and 10
#        keep-alive probe connections (one request each every 20 ms) to VIP:80
#   lb1, lb2  ringlb (the same config file) + keepalived: VRRP v3, advert 0.2 s,
#        vrrp_script `ringlb ctl ready` every 1 s, nopreempt (a repaired balancer
#        comes back as backup: no second move)
#   be   two nginx backends; their access log records which balancer sent each request
# For each fault on the balancer holding the VIP (the master): fault at FAULT_AT s,
# repair at REPAIR_AT s, load for DURATION s:
#   kill       kill -9 of ringlb              repair: start it again
#   stop       SIGSTOP of ringlb              repair: SIGCONT
#   keepalived kill -9 of keepalived          repair: start it again
#   link       the master's link down         repair: link up
#   leave      SIGTERM of ringlb (planned leave, leave-delay 2 s)   repair: start it again
#   sigint     SIGINT of ringlb (a drain without the leave delay, for comparison)
# Prints a table and writes under scripts/results/ha-<UTC date>/: table.txt, rows.jsonl,
# per run timeline.csv (100 ms) + events.csv + the raw logs, and chart PNGs.
#
# Needs root. Installs keepalived, wrk, nginx, iproute2 and python3-matplotlib with
# apt-get if missing. Bounded in time (watchdog), stops every process it started by PID
# and deletes its namespaces on exit.
#
# Usage: scripts/ha-drill.sh [--faults kill,stop,...] [--duration S] [--out DIR] [--preempt]

set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
HA_PY="$SCRIPT_DIR/drill/ha.py"
DRILL_PY="$SCRIPT_DIR/drill/drill.py"
CHART="$SCRIPT_DIR/drill/chart.py"
WRK_LUA="$SCRIPT_DIR/drill/wrk-summary.lua"
RINGLB_BIN="$REPO_DIR/target/release/ringlb"
# Debian's interpreter: it has python3-matplotlib, and starts fast (a pyenv shim
# can take a second on a loaded machine, which would skew the timings).
PY=/usr/bin/python3

FAULTS="kill stop keepalived link leave sigint"
DURATION=12
FAULT_AT=3
REPAIR_AT=8
ADVERT=0.2          # VRRP advert interval (s); VRRP v3 takes hundredths
CHECK_INTERVAL=1    # vrrp_script interval (s); keepalived takes whole seconds
CHECK_TIMEOUT=1     # a `ringlb ctl ready` that does not answer (SIGSTOP) fails after this
# The timing rule: leave-delay > the time the VIP needs to move on a planned leave: the
# next check (<= the check interval) fails, the master goes to FAULT and sends a priority-0
# advert, the backup takes over after its skew time (< 1 advert): < 1.2 s here.
LEAVE_DELAY=2s
PREEMPT=0
OUT_DIR=""

usage() { sed -n '2,30p' "$0"; }
while (($#)); do
    case $1 in
        --faults) FAULTS=${2//,/ }; shift ;;
        --duration) DURATION=$2; shift ;;
        --fault-at) FAULT_AT=$2; shift ;;
        --repair-at) REPAIR_AT=$2; shift ;;
        --leave-delay) LEAVE_DELAY=$2; shift ;;
        --preempt) PREEMPT=1 ;;
        --ringlb) RINGLB_BIN=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

# Targets. The VIP must answer from the backup within 3 adverts + the check interval
# (for a SIGSTOP, + the check's timeout: the check hangs instead of failing).
LIMIT=$(awk -v a=$ADVERT -v c=$CHECK_INTERVAL 'BEGIN{printf "%.2f", 3*a+c}')
LIMIT_STOP=$(awk -v l=$LIMIT -v t=$CHECK_TIMEOUT 'BEGIN{printf "%.2f", l+t}')

SUBNET=10.78.0
VIP=$SUBNET.100
declare -A IP=([cli]=$SUBNET.10 [lb1]=$SUBNET.1 [lb2]=$SUBNET.2 [be]=$SUBNET.20)
NS_PREFIX="rlbha$$"
ns() { echo "${NS_PREFIX}$1"; }
NSES=(sw cli lb1 lb2 be)

log() { printf '[ha-drill %s] %s\n' "$(date +%T)" "$*" >&2; }
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
in_ns() { local n; n=$(ns "$1"); shift; ip netns exec "$n" "$@"; }

# ------------------------------------------------------- process bookkeeping
TRACKED=()
track() { TRACKED+=("$1"); }
untrack() {
    local p keep=()
    for p in "${TRACKED[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    TRACKED=("${keep[@]}")
}
alive() { kill -0 "$1" 2>/dev/null; }
stop_pid() {
    local pid=$1 i
    if alive "$pid"; then
        kill -CONT "$pid" 2>/dev/null || true
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 60; i++)); do alive "$pid" || break; sleep 0.05; done
        alive "$pid" && kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    untrack "$pid"
}

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
    # keepalived's VRRP child, which we know by its pid file only.
    for n in lb1 lb2; do
        p=$(cat "$RESULTS/$n/vrrp.pid" 2>/dev/null) && [[ -n $p ]] && kill -KILL "$p" 2>/dev/null
    done
    for n in "${NS_MADE[@]}"; do ip netns del "$n" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (global timeout?)"; exit 143' TERM

install_tools() {
    local missing=() t
    for t in keepalived:keepalived wrk:wrk nginx:nginx ip:iproute2; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
    done
    /usr/bin/python3 -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
    # Packages must not start their own services (a keepalived on the host's network).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    ((made_policy)) && rm -f /usr/sbin/policy-rc.d
    return 0
}

# ------------------------------------------------------------------ network
setup_net() {
    local n
    for n in "${NSES[@]}"; do
        ip netns add "$(ns "$n")"
        NS_MADE+=("$(ns "$n")")
        in_ns "$n" ip link set lo up
    done
    in_ns sw ip link add br0 type bridge
    # VRRP adverts are multicast: no snooping, or the bridge may hold them back.
    in_ns sw ip link set br0 type bridge mcast_snooping 0
    in_ns sw ip link set br0 up
    for n in cli lb1 lb2 be; do
        ip -n "$(ns sw)" link add "p-$n" type veth peer name eth0 netns "$(ns "$n")"
        ip -n "$(ns sw)" link set "p-$n" master br0 up
        in_ns "$n" ip addr add "${IP[$n]}/24" dev eth0
        in_ns "$n" ip link set eth0 up
    done
    # ringlb listens on the VIP before keepalived puts it on a balancer.
    for n in lb1 lb2; do in_ns "$n" sysctl -qw net.ipv4.ip_nonlocal_bind=1; done
}

# ------------------------------------------------------------------ backends
NGINX_PIDS=()
start_backends() {
    local i port d
    for i in 1 2; do
        port=$((8080 + i - 1)); d="$RESULTS/be$i"
        mkdir -p "$d/tmp"
        cat >"$d/nginx.conf" <<EOF
daemon off;
master_process off;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 8192; }
http {
    log_format drill '\$msec \$request_method \$status \$remote_addr \$connection';
    access_log $d/access.log drill buffer=64k flush=100ms;
    client_body_temp_path $d/tmp/body; proxy_temp_path $d/tmp/proxy;
    fastcgi_temp_path $d/tmp/fastcgi; uwsgi_temp_path $d/tmp/uwsgi; scgi_temp_path $d/tmp/scgi;
    keepalive_requests 1000;
    server {
        listen ${IP[be]}:$port;
        default_type text/plain;
        location / { return 200 "backend=be$i via=\$remote_addr\n"; }
    }
}
EOF
        ip netns exec "$(ns be)" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" &
        NGINX_PIDS+=($!); track $!
        # From the client's namespace: the bridge works too.
        in_ns cli "$PY" "$DRILL_PY" waitport "${IP[be]}" "$port" 5 || die "nginx be$i did not start"
    done
}

# ---------------------------------------------------------------- balancers
write_ringlb_conf() {
    cat >"$RESULTS/ringlb.toml" <<EOF
# The same file on both balancers (only the admin socket differs, given as a flag).
workers = 1
leave-delay = "$LEAVE_DELAY"
drain-timeout = "3s"
stats = "0.0.0.0:9100"

[[frontend]]
name = "web"
listen = "$VIP:80"
backends = ["${IP[be]}:8080", "${IP[be]}:8081"]
check-interval = "500ms"
EOF
}

declare -A RINGLB_PID KA_PID STAMP_R STAMP_K
start_stamped() {   # $1 = log file, rest = command; sets STAMPED_PID (the command's PID)
    local logf=$1; shift
    local fifo="$logf.fifo"
    rm -f "$fifo"; mkfifo "$fifo"
    "$PY" -u "$DRILL_PY" stamp <"$fifo" >>"$logf" &
    STAMPER_PID=$!; track $!
    "$@" >"$fifo" 2>&1 &
    STAMPED_PID=$!; track $!
}

start_ringlb() {   # $1 = lb1|lb2
    local n=$1
    RUST_LOG=info start_stamped "$RESULTS/$n/ringlb.log" \
        ip netns exec "$(ns "$n")" "$RINGLB_BIN" --config "$RESULTS/ringlb.toml" \
        --admin-socket "$RESULTS/$n/ringlb.sock"
    RINGLB_PID[$n]=$STAMPED_PID; STAMP_R[$n]=$STAMPER_PID
    local i
    for ((i = 0; i < 100; i++)); do
        in_ns "$n" "$RINGLB_BIN" ctl --socket "$RESULTS/$n/ringlb.sock" ready >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "ringlb on $n did not become ready (see $RESULTS/$n/ringlb.log)"
}

write_keepalived_conf() {   # $1 = lb1|lb2, $2 = priority
    local n=$1 prio=$2 preempt="nopreempt"
    ((PREEMPT)) && preempt="# preempt: the higher priority takes the VIP back"
    cat >"$RESULTS/$n/keepalived.conf" <<EOF
global_defs {
    router_id $n
    script_user root
    vrrp_version 3
    # Gratuitous ARPs at once on becoming master, so the client's ARP cache follows.
    vrrp_garp_master_delay 0
}
vrrp_script ringlb_ready {
    # exit 0 while ringlb accepts new connections; 1 once it leaves or drains,
    # and no answer (SIGSTOP) fails after the timeout.
    script "$RINGLB_BIN ctl --socket $RESULTS/$n/ringlb.sock ready"
    interval $CHECK_INTERVAL
    timeout $CHECK_TIMEOUT
    fall 1
    rise 1
}
vrrp_instance web {
    state BACKUP
    interface eth0
    virtual_router_id 78
    priority $prio
    advert_int $ADVERT
    $preempt
    virtual_ipaddress {
        $VIP/24 dev eth0
    }
    track_script {
        ringlb_ready
    }
}
EOF
}

start_keepalived() {   # $1 = lb1|lb2
    local n=$1
    start_stamped "$RESULTS/$n/keepalived.log" \
        ip netns exec "$(ns "$n")" keepalived --dont-fork --log-console --log-detail --vrrp \
        -f "$RESULTS/$n/keepalived.conf" -p "$RESULTS/$n/keepalived.pid" -r "$RESULTS/$n/vrrp.pid"
    KA_PID[$n]=$STAMPED_PID; STAMP_K[$n]=$STAMPER_PID
}

kill_keepalived() {   # $1 = lb1|lb2: both of its processes, at once (a crash)
    local n=$1 child
    child=$(cat "$RESULTS/$n/vrrp.pid" 2>/dev/null || true)
    kill -KILL "${KA_PID[$n]}" ${child:+"$child"} 2>/dev/null || true
    wait "${KA_PID[$n]}" 2>/dev/null || true
    untrack "${KA_PID[$n]}"
}

master() {   # prints lb1 or lb2: the one holding the VIP (both: prints both)
    local n out=""
    for n in lb1 lb2; do
        in_ns "$n" ip -4 addr show dev eth0 | grep -q " $VIP/" && out+="$n "
    done
    echo "${out% }"
}

wait_stable() {   # one master, both ringlb ready, both keepalived up; else die
    local i m
    for ((i = 0; i < 200; i++)); do
        m=$(master)
        if [[ $m == lb1 || $m == lb2 ]] &&
            in_ns lb1 "$RINGLB_BIN" ctl --socket "$RESULTS/lb1/ringlb.sock" ready >/dev/null 2>&1 &&
            in_ns lb2 "$RINGLB_BIN" ctl --socket "$RESULTS/lb2/ringlb.sock" ready >/dev/null 2>&1 &&
            [[ $(grep -o "Entering [A-Z]* STATE" "$RESULTS/$(other "$m")/keepalived.log" | tail -n1) == \
               "Entering BACKUP STATE" ]]; then
            echo "$m"; return 0
        fi
        sleep 0.1
    done
    die "no stable master after 20 s (master: '$(master)')"
}
other() { [[ $1 == lb1 ]] && echo lb2 || echo lb1; }

# -------------------------------------------------------------------- faults
inject() {   # $1 = fault, $2 = victim
    local f=$1 n=$2
    case $f in
        kill) kill -KILL "${RINGLB_PID[$n]}"; wait "${RINGLB_PID[$n]}" 2>/dev/null || true
              untrack "${RINGLB_PID[$n]}" ;;
        stop) kill -STOP "${RINGLB_PID[$n]}" ;;
        keepalived) kill_keepalived "$n" ;;
        link) in_ns "$n" ip link set eth0 down ;;
        leave) kill -TERM "${RINGLB_PID[$n]}" ;;
        sigint) kill -INT "${RINGLB_PID[$n]}" ;;
    esac
}
repair() {
    local f=$1 n=$2
    case $f in
        kill) start_ringlb "$n" ;;
        stop) kill -CONT "${RINGLB_PID[$n]}" ;;
        keepalived) start_keepalived "$n" ;;
        link) in_ns "$n" ip link set eth0 up ;;
        leave|sigint)
            # It drains (drain-timeout 3 s) and exits; a new one takes its place.
            local i
            for ((i = 0; i < 100; i++)); do alive "${RINGLB_PID[$n]}" || break; sleep 0.05; done
            stop_pid "${RINGLB_PID[$n]}"
            start_ringlb "$n" ;;
    esac
}

# ---------------------------------------------------------------------- runs
run_one() {
    local fault=$1 victim dir t0 tf tr te wrk_pid probe_pid kprobe_pid
    victim=$(wait_stable)
    dir="$RESULTS/$fault"; mkdir -p "$dir"
    log "fault $fault on the master $victim"
    local b
    # nginx appends (O_APPEND): truncating starts this run's log.
    for b in 1 2; do : >"$RESULTS/be$b/access.log"; done
    local k1 k2 r1 r2
    k1=$(wc -c <"$RESULTS/lb1/keepalived.log"); k2=$(wc -c <"$RESULTS/lb2/keepalived.log")
    r1=$(wc -c <"$RESULTS/lb1/ringlb.log"); r2=$(wc -c <"$RESULTS/lb2/ringlb.log")
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 15)) wrk -t1 -c50 -d"${DURATION}s" --timeout 2s -s "$WRK_LUA" \
        "http://$VIP/" >"$dir/wrk.out" 2>&1 &
    wrk_pid=$!; track $wrk_pid
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" probe --host "$VIP" \
        --duration "$DURATION" --out "$dir/probe.tsv" &
    probe_pid=$!; track $probe_pid
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" kprobe --host "$VIP" --conns 10 \
        --duration "$DURATION" --out "$dir/kprobe.tsv" &
    kprobe_pid=$!; track $kprobe_pid
    # Time 0 is when every load generator runs (an interpreter may take a while to start).
    local i
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/probe.tsv && -s $dir/kprobe.tsv ]] &&
            (($(wc -l <"$dir/probe.tsv") > 1 && $(wc -l <"$dir/kprobe.tsv") > 1)) && break
        sleep 0.05
    done
    t0=$(now)
    sleep_until "$(fadd "$t0" "$FAULT_AT")"
    tf=$(now); inject "$fault" "$victim"
    sleep_until "$(fadd "$t0" "$REPAIR_AT")"
    tr=$(now); repair "$fault" "$victim"
    for p in $wrk_pid $probe_pid $kprobe_pid; do wait "$p" || true; untrack "$p"; done
    te=$(now)
    sleep 0.2   # nginx flushes its log every 100 ms
    for b in 1 2; do cp "$RESULTS/be$b/access.log" "$dir/access-be$b.log"; done
    tail -c +$((k1 + 1)) "$RESULTS/lb1/keepalived.log" >"$dir/keepalived-lb1.log"
    tail -c +$((k2 + 1)) "$RESULTS/lb2/keepalived.log" >"$dir/keepalived-lb2.log"
    tail -c +$((r1 + 1)) "$RESULTS/lb1/ringlb.log" >"$dir/ringlb-lb1.log"
    tail -c +$((r2 + 1)) "$RESULTS/lb2/ringlb.log" >"$dir/ringlb-lb2.log"
    cat >"$dir/meta.env" <<EOF
fault=$fault
round=1
t_start=$t0
t_fault=$tf
t_repair=$tr
t_end=$te
victim=${IP[$victim]}
balancers=${IP[lb1]}=lb1,${IP[lb2]}=lb2
takeover_log=keepalived-$(other "$victim").log
takeover_pattern=Entering MASTER STATE
EOF
    "$PY" "$HA_PY" analyze "$dir" --rows "$RESULTS/rows.jsonl"
    rm -f "$dir"/access-be*.log   # ~1 MB each; timeline.csv keeps their counts
    "$PY" "$CHART" "$dir" --title "ha-drill: $fault on the master ($victim)" \
        --out "$dir/timeline.png" || log "no chart for $fault"
    tail -n1 "$RESULTS/rows.jsonl" >&2
}

main() {
    [[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
    ((FAULT_AT < REPAIR_AT && REPAIR_AT < DURATION)) || die "need fault-at < repair-at < duration"
    install_tools
    [[ -x $RINGLB_BIN ]] || die "no ringlb at $RINGLB_BIN (cargo build --release)"
    local nf budget
    nf=$(wc -w <<<"$FAULTS")
    budget=$((nf * (DURATION + 30) + 60))
    log "$nf faults [$FAULTS], ${DURATION}s of load each; global timeout ${budget}s"
    ( trap 'exit 0' TERM; end=$((SECONDS + budget))
      while ((SECONDS < end)); do sleep 1; done; kill -TERM $$ ) &
    WATCHDOG_PID=$!

    RESULTS=${OUT_DIR:-$SCRIPT_DIR/results/ha-$(date -u +%Y-%m-%dT%H%M%SZ)}
    mkdir -p "$RESULTS/lb1" "$RESULTS/lb2"
    : >"$RESULTS/rows.jsonl"
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "command: $0 $*"
        echo "host: $(uname -r), $(nproc) cores, load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "keepalived: $(keepalived --version 2>&1 | head -n1)"
        echo "nginx: $(nginx -v 2>&1)"
        echo "ringlb: $RINGLB_BIN ($(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo "vrrp: v3, advert ${ADVERT}s, vrrp_script 'ringlb ctl ready' every ${CHECK_INTERVAL}s (timeout ${CHECK_TIMEOUT}s, fall 1, rise 1), $( ((PREEMPT)) && echo preempt || echo nopreempt)"
        echo "ringlb: leave-delay $LEAVE_DELAY, drain-timeout 3s, 1 worker each"
        echo "load: wrk -t1 -c50 --timeout 2s; probe: 1 new connection / 20 ms; kprobe: 10 keep-alive connections, 1 request / 20 ms each"
        echo "runs: ${DURATION}s each, fault at ${FAULT_AT}s, repair at ${REPAIR_AT}s"
        echo "target: the VIP answers from the backup within 3 adverts + check interval = ${LIMIT}s (stop: + check timeout = ${LIMIT_STOP}s)"
    } >"$RESULTS/settings.txt"

    setup_net
    start_backends
    write_ringlb_conf
    start_ringlb lb1; start_ringlb lb2
    write_keepalived_conf lb1 150; write_keepalived_conf lb2 100
    start_keepalived lb1
    sleep 1   # lb1 first, so that it is the first master
    start_keepalived lb2

    local f
    for f in $FAULTS; do run_one "$f"; done

    {
        cat "$RESULTS/settings.txt"
        echo
        echo "Per fault (times in s from the fault):"
        echo "  move: first new connection answered promptly (< 0.5 s) by the backup"
        echo "  takeover: the backup's keepalived logs 'Entering MASTER STATE'"
        echo "  refused: new connections refused (the port closed while the VIP still led to it)"
        echo "  fail move / fail after: failed new connections (1 every 20 ms) before / after the move, until the repair"
        echo "  ka broken victim / others: keep-alive probe connections (10, 1 request / 20 ms each) open through"
        echo "    the victim / the other balancer when the fault hit: broken / open"
        echo "  back / share: from the repair until the victim answers a new connection again / its share of"
        echo "    the new connections from then on"
        echo "  fail repair / ka err repair: failures after the repair ($( ((PREEMPT)) && echo "preempt: the VIP moves back" || echo "nopreempt: the VIP stays where it is"))"
        echo "  wrk req / err: wrk -c50 keep-alive totals (errors: connect + read + write + timeout + status)"
        echo "  verdict: move within ${LIMIT}s (stop ${LIMIT_STOP}s), 0 fail after, 0 ka broken others, 0 after repair;"
        echo "    leave: also 0 refused"
        "$PY" "$HA_PY" report "$RESULTS/rows.jsonl" --limit "$LIMIT" --limit-for "stop=$LIMIT_STOP" \
            --planned leave --takeover-label takeover
    } | tee "$RESULTS/table.txt"
    "$PY" "$CHART" --combine "$RESULTS" --out "$RESULTS/ha-drill.png" \
        --title "ha-drill: keepalived pair, one panel per fault" || log "no combined chart"
    rm -rf "$RESULTS"/be*/tmp "$RESULTS"/be*/access.log
    find "$RESULTS" -name '*.fifo' -delete
    log "results in $RESULTS"
}

main "$@"
