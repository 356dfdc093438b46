#!/usr/bin/env bash
# ECMP drill: three ringlb balancers announcing one service address over BGP to a router
# that spreads flows over them (equal-cost multipath), under load.
#
# Network namespaces (all created here; the host's network is not touched):
#   cli   the client 10.79.1.10: wrk -c50 keep-alive, a new-connection probe every 20 ms,
#         and 30 keep-alive probe connections (one request each every 100 ms) to 10.79.0.100:80
#   rt    the router: BIRD 2, eBGP with each balancer (AS 65000 <-> 65001), the kernel
#         protocol with `merge paths` (one multipath route), fib_multipath_hash_policy=1
#         (L4 hash: flows, not hosts, are spread); a bridge to the balancers and backends
#   lb1..lb3  ringlb (the same config file) listening on the service address (a /32 on lo)
#         + BIRD announcing it while `ringlb ctl ready` exits 0: a watcher runs the check
#         every 200 ms and enables or disables BIRD's static protocol (announce / withdraw)
#   be    two nginx backends; their access log records which balancer sent each request
# Runs (load DURATION s, fault at FAULT_AT s, repair at REPAIR_AT s), each with the router's
# FIB as Linux's plain multipath route (-hash) and as a resilient nexthop group (-resilient):
#   kill-*   kill -9 of ringlb on lb1 -> the watcher withdraws the route;
#            repair: start it again, the route comes back (a balancer added under load)
#   leave-*  SIGTERM of ringlb on lb2 (planned leave, leave-delay 2 s); repair: start it again
# BGP timers: hold 3 s, keepalive 1 s (what a dead host or link costs without BFD);
# ringlb's own failure is seen by the watcher within 200 ms + the check.
# Prints a table and writes under scripts/results/ecmp-<UTC date>/ (table, rows.jsonl,
# per run timeline.csv + events.csv + raw logs, PNG charts).
#
# Needs root. Installs bird2, wrk, nginx, iproute2, python3-matplotlib if missing.
# Bounded in time (watchdog); stops every process it started by PID, deletes its namespaces.
#
# Usage: scripts/ecmp-drill.sh [--runs kill-hash,leave-hash,kill-resilient,leave-resilient]
#                              [--duration S] [--out DIR]

set -euo pipefail
export LC_ALL=C

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$SCRIPT_DIR/.." && pwd)
HA_PY="$SCRIPT_DIR/drill/ha.py"
DRILL_PY="$SCRIPT_DIR/drill/drill.py"
CHART="$SCRIPT_DIR/drill/chart.py"
WRK_LUA="$SCRIPT_DIR/drill/wrk-summary.lua"
RINGLB_BIN="$REPO_DIR/target/release/ringlb"
PY=/usr/bin/python3   # Debian's: has matplotlib, starts fast

RUNS="kill-hash leave-hash kill-resilient leave-resilient"
DURATION=12
FAULT_AT=3
REPAIR_AT=8
# Target for the route to be withdrawn: the watcher's period + a check (up to 1 s when the
# host is loaded) + BGP and FIB.
LIMIT=1.5
WATCH=0.2           # seconds between readiness checks of the announcing watcher
LEAVE_DELAY=2s      # > watcher period + check + BGP withdrawal + FIB update (measured: see table)
OUT_DIR=""

while (($#)); do
    case $1 in
        --runs) RUNS=${2//,/ }; shift ;;
        --duration) DURATION=$2; shift ;;
        --ringlb) RINGLB_BIN=$2; shift ;;
        --out) OUT_DIR=$2; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "unknown option: $1" >&2; exit 2 ;;
    esac
    shift
done

SVC=10.79.0.100
declare -A IP=([cli]=10.79.1.10 [rt_cli]=10.79.1.1 [rt]=10.79.2.1 [lb1]=10.79.2.11 [lb2]=10.79.2.12 [lb3]=10.79.2.13 [be]=10.79.2.20)
LBS=(lb1 lb2 lb3)
NS_PREFIX="rlbec$$"
ns() { echo "${NS_PREFIX}$1"; }

log() { printf '[ecmp-drill %s] %s\n' "$(date +%T)" "$*" >&2; }
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
    for n in "${NS_MADE[@]}"; do ip netns del "$n" 2>/dev/null; done
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (global timeout?)"; exit 143' TERM

install_tools() {
    local missing=() t
    for t in bird:bird2 wrk:wrk nginx:nginx ip:iproute2; do
        command -v "${t%%:*}" >/dev/null || missing+=("${t#*:}")
    done
    "$PY" -c 'import matplotlib' 2>/dev/null || missing+=(python3-matplotlib)
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]}"
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
    for n in cli rt "${LBS[@]}" be; do
        ip netns add "$(ns "$n")"; NS_MADE+=("$(ns "$n")")
        in_ns "$n" ip link set lo up
    done
    # client <-> router
    ip -n "$(ns rt)" link add eth-cli type veth peer name eth0 netns "$(ns cli)"
    in_ns rt ip addr add "${IP[rt_cli]}/24" dev eth-cli
    in_ns rt ip link set eth-cli up
    in_ns cli ip addr add "${IP[cli]}/24" dev eth0
    in_ns cli ip link set eth0 up
    in_ns cli ip route add default via "${IP[rt_cli]}"
    # router's LAN: a bridge to the balancers and the backends
    in_ns rt ip link add br0 type bridge
    in_ns rt ip addr add "${IP[rt]}/24" dev br0
    in_ns rt ip link set br0 up
    for n in "${LBS[@]}" be; do
        ip -n "$(ns rt)" link add "p-$n" type veth peer name eth0 netns "$(ns "$n")"
        in_ns rt ip link set "p-$n" master br0 up
        in_ns "$n" ip addr add "${IP[$n]}/24" dev eth0
        in_ns "$n" ip link set eth0 up
    done
    for n in "${LBS[@]}"; do
        in_ns "$n" ip addr add "$SVC/32" dev lo
        in_ns "$n" ip route add default via "${IP[rt]}"
    done
    in_ns rt sysctl -qw net.ipv4.ip_forward=1
    # L4 hash: each flow (addresses and ports) picks a balancer, not each client host.
    in_ns rt sysctl -qw net.ipv4.fib_multipath_hash_policy=1
    [[ $(in_ns rt sysctl -n net.ipv4.fib_multipath_hash_policy) == 1 ]] ||
        die "fib_multipath_hash_policy=1 did not take in the router's namespace"
}

# ------------------------------------------------------------------ backends
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
        track $!
        in_ns rt "$PY" "$DRILL_PY" waitport "${IP[be]}" "$port" 5 || die "nginx be$i did not start"
    done
}

# ---------------------------------------------------------------------- BIRD
write_router_bird() {
    local n
    {
        cat <<EOF
# The router: one eBGP session per balancer; equal routes to the service address
# are merged into one multipath (ECMP) route in the kernel.
router id ${IP[rt]};
log stderr all;
protocol device { scan time 10; }
# BIRD writes the multipath route into table 100; fib-sync puts it into the main
# table either as Linux's multipath route (hash-threshold) or as a resilient nexthop group.
protocol kernel {
    kernel table 100;
    ipv4 { import none; export all; };
    merge paths on;
}
EOF
        for n in "${LBS[@]}"; do
            cat <<EOF
protocol bgp $n {
    local ${IP[rt]} as 65000;
    neighbor ${IP[$n]} as 65001;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import all; export none; };
}
EOF
        done
    } >"$RESULTS/rt/bird.conf"
}

write_lb_bird() {   # $1 = lbN
    local n=$1
    cat >"$RESULTS/$n/bird.conf" <<EOF
# A balancer: announces the service address while its watcher keeps the static
# protocol 'svc' enabled (ringlb ctl ready exits 0); 'birdc disable svc' withdraws it.
router id ${IP[$n]};
log stderr all;
protocol device { scan time 10; }
protocol static svc {
    disabled;
    ipv4;
    route $SVC/32 blackhole;
}
protocol bgp uplink {
    local ${IP[$n]} as 65001;
    neighbor ${IP[rt]} as 65000;
    hold time 3; keepalive time 1; connect retry time 1;
    ipv4 { import none; export where proto = "svc"; };
}
EOF
}

start_stamped() {   # $1 = log file, rest = command; sets STAMPED_PID
    local logf=$1; shift
    rm -f "$logf.fifo"; mkfifo "$logf.fifo"
    "$PY" -u "$DRILL_PY" stamp <"$logf.fifo" >>"$logf" &
    track $!
    "$@" >"$logf.fifo" 2>&1 &
    STAMPED_PID=$!; track $!
}

start_bird() {   # $1 = rt | lbN
    local n=$1
    start_stamped "$RESULTS/$n/bird.log" ip netns exec "$(ns "$n")" \
        bird -f -c "$RESULTS/$n/bird.conf" -s "$RESULTS/$n/bird.ctl" -P "$RESULTS/$n/bird.pid"
}

# ---------------------------------------------------------------- balancers
declare -A RINGLB_PID
write_ringlb_conf() {
    cat >"$RESULTS/ringlb.toml" <<EOF
# The same file on every balancer (the admin socket differs: a flag).
workers = 1
leave-delay = "$LEAVE_DELAY"
drain-timeout = "3s"
stats = "127.0.0.1:9100"

[[frontend]]
name = "web"
listen = "$SVC:80"
backends = ["${IP[be]}:8080", "${IP[be]}:8081"]
check-interval = "500ms"
EOF
}

start_ringlb() {   # $1 = lbN
    local n=$1 i
    RUST_LOG=info start_stamped "$RESULTS/$n/ringlb.log" ip netns exec "$(ns "$n")" \
        "$RINGLB_BIN" --config "$RESULTS/ringlb.toml" --admin-socket "$RESULTS/$n/ringlb.sock"
    RINGLB_PID[$n]=$STAMPED_PID
    for ((i = 0; i < 100; i++)); do
        in_ns "$n" "$RINGLB_BIN" ctl --socket "$RESULTS/$n/ringlb.sock" ready >/dev/null 2>&1 && return 0
        sleep 0.05
    done
    die "ringlb on $n did not become ready"
}

# The announcing watcher: `ringlb ctl ready` every WATCH s; BIRD's static protocol follows
# it. A definite "not ready" (leaving, draining) or no ringlb at all withdraws at once; a
# check that does not answer within 1 s (a stopped or starved ringlb) withdraws on the
# second in a row, so that one slow answer on a loaded host does not flap the route.
start_watcher() {   # $1 = lbN
    local n=$1
    RINGLB=$RINGLB_BIN RINGLB_SOCKET=$RESULTS/$n/ringlb.sock BIRD_CTL=$RESULTS/$n/bird.ctl PERIOD=$WATCH \
        start_stamped "$RESULTS/$n/watcher.log" ip netns exec "$(ns "$n")" \
        "$REPO_DIR/examples/ha/ringlb-bgp-watch.sh"
}

nexthops() {   # how many balancers the router's route to the service uses
    in_ns rt ip route show "$SVC" | grep -o "via 10\.79\.2\.1[0-9]" | sort -u | wc -l
}

# fib-sync, on the router: copies BIRD's route (table 100) into the main table every 20 ms,
# in the mode named in $RESULTS/rt/fib-mode:
#   hash       a plain multipath route: Linux's hash-threshold, where a next hop leaving or
#              joining moves part of the other next hops' flows too;
#   resilient  a resilient nexthop group (128 buckets, idle timer 1 s): a next hop leaving
#              moves only its own buckets; one joining takes buckets once they are idle.
start_fib_sync() {
    local n
    for n in "${LBS[@]}"; do in_ns rt ip nexthop add id "${IP[$n]##*.}" via "${IP[$n]}" dev br0; done
    start_stamped "$RESULTS/rt/route.log" ip netns exec "$(ns rt)" bash -c '
        svc=$1 modefile=$2 prev=""
        while :; do
            mode=$(<"$modefile")
            route=$(ip -o route show table 100 "$svc")
            vias=() ids=()
            re="via (10\.79\.2\.([0-9]+))"
            while [[ $route =~ $re ]]; do
                vias+=("${BASH_REMATCH[1]}"); ids+=("${BASH_REMATCH[2]}")
                route=${route#*"${BASH_REMATCH[0]}"}
            done
            cur="$mode ${vias[*]}"
            if [[ $cur != "$prev" ]]; then
                if ((${#vias[@]} == 0)); then
                    ip route del "$svc/32" 2>/dev/null
                elif [[ $mode == resilient ]]; then
                    group=$(IFS=/; echo "${ids[*]}")
                    ip nexthop replace id 100 group "$group" type resilient buckets 128 idle_timer 1 ||
                        ip nexthop add id 100 group "$group" type resilient buckets 128 idle_timer 1
                    ip route replace "$svc/32" nhid 100
                else
                    args=()
                    for v in "${vias[@]}"; do args+=(nexthop via "$v" dev br0); done
                    ip route replace "$svc/32" "${args[@]}"
                fi
                echo "$svc -> $mode: ${vias[*]:-none}"
                prev=$cur
            fi
            sleep 0.02
        done' fib-sync "$SVC" "$RESULTS/rt/fib-mode"
}

wait_all_announced() {
    local i
    for ((i = 0; i < 300; i++)); do
        [[ $(nexthops) == "${#LBS[@]}" ]] && return 0
        sleep 0.1
    done
    die "the router does not use all ${#LBS[@]} balancers: $(in_ns rt ip route show "$SVC")"
}

connections_metric() {   # $1 = lbN: ringlb_frontend_connections_total, or ?
    # bash's /dev/tcp: no interpreter to start (that takes a second on a loaded host).
    in_ns "$1" timeout 5 bash -c '
        exec 3<>/dev/tcp/127.0.0.1/9100 || exit 1
        printf "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n" >&3
        sum=0
        while read -r name value <&3; do
            value=${value%$'"'"'\r'"'"'}
            [[ $name == ringlb_frontend_connections_total* ]] && sum=$((sum + ${value%%.*}))
        done
        echo "$sum"' 2>/dev/null || echo '?'
}

# ---------------------------------------------------------------------- runs
inject() {
    case ${1%%-*} in
        kill) kill -KILL "${RINGLB_PID[$2]}"; wait "${RINGLB_PID[$2]}" 2>/dev/null || true
              untrack "${RINGLB_PID[$2]}" ;;
        leave) kill -TERM "${RINGLB_PID[$2]}" ;;
    esac
}
repair() {
    case ${1%%-*} in
        kill) start_ringlb "$2" ;;
        leave) local i
               for ((i = 0; i < 100; i++)); do alive "${RINGLB_PID[$2]}" || break; sleep 0.05; done
               stop_pid "${RINGLB_PID[$2]}"
               start_ringlb "$2" ;;
    esac
}

run_one() {
    local fault=$1 victim=$2 dir t0 tf tr te pids=() p n i
    wait_all_announced
    dir="$RESULTS/$fault"; mkdir -p "$dir"
    log "$fault on $victim"
    for i in 1 2; do : >"$RESULTS/be$i/access.log"; done
    local rt0; rt0=$(wc -c <"$RESULTS/rt/route.log")
    declare -A before after
    # Scraped outside the timed part (an interpreter start can take a second here).
    for n in "${LBS[@]}"; do before[$n]=$(connections_metric "$n"); done
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 15)) wrk -t1 -c50 -d"${DURATION}s" --timeout 2s -s "$WRK_LUA" \
        "http://$SVC/" >"$dir/wrk.out" 2>&1 &
    pids+=($!); track $!
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" probe --host "$SVC" \
        --duration "$DURATION" --out "$dir/probe.tsv" &
    pids+=($!); track $!
    ip netns exec "$(ns cli)" timeout -k 2 $((DURATION + 10)) "$PY" "$HA_PY" kprobe --host "$SVC" --conns 30 --interval 0.1 \
        --duration "$DURATION" --out "$dir/kprobe.tsv" &
    pids+=($!); track $!
    for ((i = 0; i < 100; i++)); do
        [[ -s $dir/probe.tsv && -s $dir/kprobe.tsv ]] &&
            (($(wc -l <"$dir/probe.tsv") > 1 && $(wc -l <"$dir/kprobe.tsv") > 1)) && break
        sleep 0.05
    done
    t0=$(now)
    # The spread before the fault, from ringlb itself, scraped in the background.
    ( sleep_until "$(fadd "$t0" "$(awk -v f="$FAULT_AT" 'BEGIN{print f - 1}')")"
      for n in "${LBS[@]}"; do echo "$n $(connections_metric "$n")" & done >"$dir/metrics-at-fault.txt"; wait ) &
    local scrape_pid=$!
    sleep_until "$(fadd "$t0" "$FAULT_AT")"
    tf=$(now); inject "$fault" "$victim"
    sleep_until "$(fadd "$t0" "$REPAIR_AT")"
    tr=$(now); repair "$fault" "$victim"
    for p in "${pids[@]}"; do wait "$p" || true; untrack "$p"; done
    te=$(now)
    wait "$scrape_pid" || true
    for n in "${LBS[@]}"; do after[$n]=$(awk -v n="$n" '$1 == n {print $2}' "$dir/metrics-at-fault.txt"); done
    sleep 0.2
    for i in 1 2; do cp "$RESULTS/be$i/access.log" "$dir/access-be$i.log"; done
    tail -c +$((rt0 + 1)) "$RESULTS/rt/route.log" >"$dir/route.log"
    for n in "${LBS[@]}"; do
        cp "$RESULTS/$n/watcher.log" "$dir/watcher-$n.log"
        if [[ ${before[$n]} =~ ^[0-9]+$ && ${after[$n]} =~ ^[0-9]+$ ]]; then
            echo "$n $((after[$n] - before[$n]))"
        else echo "$n ?"; fi
    done >"$dir/spread.txt"
    cat >"$dir/meta.env" <<EOF
fault=$fault
round=1
t_start=$t0
t_fault=$tf
t_repair=$tr
t_end=$te
victim=${IP[$victim]}
balancers=${IP[lb1]}=lb1,${IP[lb2]}=lb2,${IP[lb3]}=lb3
takeover_log=route.log
takeover_pattern=$SVC
move_by=takeover
EOF
    "$PY" "$HA_PY" analyze "$dir" --rows "$RESULTS/rows.jsonl"
    rm -f "$dir"/access-be*.log   # ~1 MB each; timeline.csv keeps their counts
    "$PY" "$CHART" "$dir" --title "ecmp-drill: $fault of ringlb on $victim (3 balancers)" \
        --out "$dir/timeline.png" || log "no chart for $fault"
    log "connections per balancer in the run (ringlb_frontend_connections_total): $(tr '\n' ' ' <"$dir/spread.txt")"
}

spread_of() {   # new probe connections per balancer before the fault of run $1
    "$PY" - "$RESULTS/rows.jsonl" "$1" <<'EOF'
import json, sys
for r in map(json.loads, open(sys.argv[1])):
    if r["fault"] == sys.argv[2]:
        print(" ".join(f"{k} {v}" for k, v in r["spread"].items()))
EOF
}

main() {
    [[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
    install_tools
    [[ -x $RINGLB_BIN ]] || die "no ringlb at $RINGLB_BIN (cargo build --release)"
    local nr budget n
    nr=$(wc -w <<<"$RUNS")
    budget=$((nr * (DURATION + 30) + 90))
    log "runs [$RUNS], ${DURATION}s of load each; global timeout ${budget}s"
    ( trap 'exit 0' TERM; end=$((SECONDS + budget))
      while ((SECONDS < end)); do sleep 1; done; kill -TERM $$ ) &
    WATCHDOG_PID=$!

    RESULTS=${OUT_DIR:-$SCRIPT_DIR/results/ecmp-$(date -u +%Y-%m-%dT%H%M%SZ)}
    mkdir -p "$RESULTS/rt"; for n in "${LBS[@]}"; do mkdir -p "$RESULTS/$n"; done
    : >"$RESULTS/rows.jsonl"
    {
        echo "date: $(date -u +%FT%TZ)"
        echo "command: $0 $*"
        echo "host: $(uname -r), $(nproc) cores, load average at the start: $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "bird: $(bird --version 2>&1 | head -n1)"
        echo "ringlb: $RINGLB_BIN ($(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo '?'))"
        echo "router: BIRD 'merge paths on' into table 100, copied into the main table (fib-sync, every 20 ms) as a"
        echo "  multipath route (runs *-hash: hash-threshold) or a resilient nexthop group (runs *-resilient: 128"
        echo "  buckets, idle timer 1 s); fib_multipath_hash_policy=1 (L4 hash)"
        echo "bgp: eBGP, hold 3s, keepalive 1s, no BFD; announce while 'ringlb ctl ready' (examples/ha/ringlb-bgp-watch.sh: every ${WATCH}s; withdrawn at once on a 'not ready' or no ringlb, on the second 1 s timeout in a row)"
        echo "ringlb: leave-delay $LEAVE_DELAY, drain-timeout 3s, 1 worker each; 3 balancers"
        echo "load: wrk -t1 -c50 --timeout 2s; probe: 1 new connection / 20 ms; kprobe: 30 keep-alive connections, 1 request / 100 ms each"
        echo "runs: ${DURATION}s each, fault at ${FAULT_AT}s, repair at ${REPAIR_AT}s"
    } >"$RESULTS/settings.txt"

    setup_net
    echo hash >"$RESULTS/rt/fib-mode"
    start_fib_sync
    start_backends
    write_router_bird; start_bird rt
    write_ringlb_conf
    for n in "${LBS[@]}"; do
        write_lb_bird "$n"; start_bird "$n"
        start_ringlb "$n"
        start_watcher "$n"
    done
    wait_all_announced
    log "route: $(in_ns rt ip route show "$SVC" | tr '\n\t' '  ')"

    local f victim
    for f in $RUNS; do
        case $f in kill-*) victim=lb1 ;; leave-*) victim=lb2 ;; *) die "unknown run $f" ;; esac
        case $f in *-hash) echo hash ;; *-resilient) echo resilient ;; *) die "unknown run $f" ;; esac \
            >"$RESULTS/rt/fib-mode"
        run_one "$f" "$victim"
    done
    {
        cat "$RESULTS/settings.txt"
        echo
        echo "Spread before the fault: connections each balancer accepted from the start of the load to 1 s"
        echo "before the fault (ringlb_frontend_connections_total: wrk's 50, the probes'), and the new probe"
        echo "connections each answered before the fault:"
        for f in $RUNS; do
            echo "  $f: metrics: $(tr '\n' ' ' <"$RESULTS/$f/spread.txt")  probes: $(spread_of "$f")"
        done
        echo
        echo "Per run (times in s from the fault):"
        echo "  move = route: the router's first change of the route to $SVC after the fault (fib-sync's log)"
        echo "  refused / fail move / fail after: failed new connections (refused: port closed) before / after the move"
        echo "  ka broken victim / others: keep-alive probe connections open through the victim / the others when the"
        echo "    fault hit, broken / open (others > 0: the router rehashed survivors' flows)"
        echo "  back / share: from the repair until the victim answers a new connection again / its share of"
        echo "    the new connections from then on"
        echo "  fail repair / ka err repair: after the balancer is back (its route re-added under load)"
        echo "  verdict: route changed within ${LIMIT}s, 0 failed new connections after it, 0 ka broken others,"
        echo "    0 after the repair; leave: also 0 refused"
        "$PY" "$HA_PY" report "$RESULTS/rows.jsonl" --limit "$LIMIT" --planned leave-hash,leave-resilient \
            --takeover-label route
    } | tee "$RESULTS/table.txt"
    "$PY" "$CHART" --combine "$RESULTS" --out "$RESULTS/ecmp-drill.png" \
        --title "ecmp-drill: 3 balancers behind a BIRD router (ECMP), one panel per run" || log "no combined chart"
    rm -rf "$RESULTS"/be*/tmp "$RESULTS"/be*/access.log
    find "$RESULTS" -name '*.fifo' -delete
    log "results in $RESULTS"
}

main "$@"
