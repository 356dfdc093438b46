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
# shellcheck source-path=SCRIPTDIR source=drill/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/drill/lib.sh"
DRILL_NAME=ecmp-drill

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

# ------------------------------------------------------------------ network
setup_net() {
    local n
    for n in cli rt "${LBS[@]}" be; do add_ns "$(ns "$n")"; done
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
    for n in "${LBS[@]}" be; do bridge_port rt "$n"; done
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

start_bird() {   # $1 = rt | lbN
    local n=$1
    start_stamped "$RESULTS/$n/bird.log" ip netns exec "$(ns "$n")" \
        bird -f -c "$RESULTS/$n/bird.conf" -s "$RESULTS/$n/bird.ctl" -P "$RESULTS/$n/bird.pid"
}

# ---------------------------------------------------------------- balancers
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
        kill) kill_ringlb_ns "$2" ;;
        leave) kill -TERM "${RINGLB_PID[$2]}" ;;
    esac
}
repair() {
    case ${1%%-*} in
        kill) start_ringlb_ns "$2" ;;
        leave) replace_ringlb_ns "$2" ;;
    esac
}

run_one() {
    local fault=$1 victim=$2 dir t0 tf tr te n
    wait_all_announced
    dir="$RESULTS/$fault"; mkdir -p "$dir"
    log "$fault on $victim"
    reset_access_logs
    local rt0; rt0=$(wc -c <"$RESULTS/rt/route.log")
    declare -A before after
    # Scraped outside the timed part (an interpreter start can take a second here).
    for n in "${LBS[@]}"; do before[$n]=$(connections_metric "$n"); done
    start_load "$dir" "$SVC" --conns 30 --interval 0.1
    t0=$(now)
    # The spread before the fault, from ringlb itself, scraped in the background.
    ( sleep_until "$(fadd "$t0" "$(awk -v f="$FAULT_AT" 'BEGIN{print f - 1}')")"
      for n in "${LBS[@]}"; do echo "$n $(connections_metric "$n")" & done >"$dir/metrics-at-fault.txt"; wait ) &
    local scrape_pid=$!
    sleep_until "$(fadd "$t0" "$FAULT_AT")"
    tf=$(now); inject "$fault" "$victim"
    sleep_until "$(fadd "$t0" "$REPAIR_AT")"
    tr=$(now); repair "$fault" "$victim"
    wait_load
    te=$(now)
    wait "$scrape_pid" || true
    for n in "${LBS[@]}"; do after[$n]=$(awk -v n="$n" '$1 == n {print $2}' "$dir/metrics-at-fault.txt"); done
    take_access_logs "$dir"
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
    analyze_run "$dir" "ecmp-drill: $fault of ringlb on $victim (3 balancers)"
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
    install_tools bird:bird2 wrk:wrk nginx:nginx ip:iproute2
    [[ -x $RINGLB_BIN ]] || die "no ringlb at $RINGLB_BIN (cargo build --release)"
    local nr budget n
    nr=$(wc -w <<<"$RUNS")
    budget=$((nr * (DURATION + 30) + 90))
    log "runs [$RUNS], ${DURATION}s of load each; global timeout ${budget}s"
    start_watchdog "$budget"

    RESULTS=${OUT_DIR:-$SCRIPT_DIR/results/ecmp-$(date -u +%Y-%m-%dT%H%M%SZ)}
    mkdir -p "$RESULTS/rt"; for n in "${LBS[@]}"; do mkdir -p "$RESULTS/$n"; done
    : >"$RESULTS/rows.jsonl"
    {
        settings_head "$@"
        echo "bird: $(bird --version 2>&1 | head -n1)"
        echo "ringlb: $(ringlb_version)"
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
    start_backends rt
    write_router_bird; start_bird rt
    write_ringlb_conf "$SVC:80" "127.0.0.1:9100"
    for n in "${LBS[@]}"; do
        write_lb_bird "$n"; start_bird "$n"
        start_ringlb_ns "$n"
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
    tidy_results
}

main "$@"
