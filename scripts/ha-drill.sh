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
# shellcheck source-path=SCRIPTDIR source=drill/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/drill/lib.sh"
DRILL_NAME=ha-drill

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
NSES=(sw cli lb1 lb2 be)

# keepalived's VRRP child, which we know by its pid file only.
drill_cleanup() {
    local n p
    for n in lb1 lb2; do
        p=$(cat "${RESULTS:-}/$n/vrrp.pid" 2>/dev/null) && [[ -n $p ]] && kill -KILL "$p" 2>/dev/null
    done
    return 0
}

# ------------------------------------------------------------------ network
setup_net() {
    local n
    for n in "${NSES[@]}"; do add_ns "$(ns "$n")"; done
    in_ns sw ip link add br0 type bridge
    # VRRP adverts are multicast: no snooping, or the bridge may hold them back.
    in_ns sw ip link set br0 type bridge mcast_snooping 0
    in_ns sw ip link set br0 up
    for n in cli lb1 lb2 be; do bridge_port sw "$n"; done
    # ringlb listens on the VIP before keepalived puts it on a balancer.
    for n in lb1 lb2; do in_ns "$n" sysctl -qw net.ipv4.ip_nonlocal_bind=1; done
}

# ---------------------------------------------------------------- balancers
declare -A KA_PID
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
    KA_PID[$n]=$STAMPED_PID
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
            ringlb_ready lb1 && ringlb_ready lb2 &&
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
        kill) kill_ringlb_ns "$n" ;;
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
        kill) start_ringlb_ns "$n" ;;
        stop) kill -CONT "${RINGLB_PID[$n]}" ;;
        keepalived) start_keepalived "$n" ;;
        link) in_ns "$n" ip link set eth0 up ;;
        leave|sigint) replace_ringlb_ns "$n" ;;
    esac
}

# ---------------------------------------------------------------------- runs
run_one() {
    local fault=$1 victim dir t0 tf tr te
    victim=$(wait_stable)
    dir="$RESULTS/$fault"; mkdir -p "$dir"
    log "fault $fault on the master $victim"
    reset_access_logs
    local k1 k2 r1 r2
    k1=$(wc -c <"$RESULTS/lb1/keepalived.log"); k2=$(wc -c <"$RESULTS/lb2/keepalived.log")
    r1=$(wc -c <"$RESULTS/lb1/ringlb.log"); r2=$(wc -c <"$RESULTS/lb2/ringlb.log")
    start_load "$dir" "$VIP" --conns 10
    t0=$(now)
    sleep_until "$(fadd "$t0" "$FAULT_AT")"
    tf=$(now); inject "$fault" "$victim"
    sleep_until "$(fadd "$t0" "$REPAIR_AT")"
    tr=$(now); repair "$fault" "$victim"
    wait_load
    te=$(now)
    take_access_logs "$dir"
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
    analyze_run "$dir" "ha-drill: $fault on the master ($victim)"
    tail -n1 "$RESULTS/rows.jsonl" >&2
}

main() {
    [[ $EUID -eq 0 ]] || die "run as root (network namespaces)"
    ((FAULT_AT < REPAIR_AT && REPAIR_AT < DURATION)) || die "need fault-at < repair-at < duration"
    install_tools keepalived:keepalived wrk:wrk nginx:nginx ip:iproute2
    [[ -x $RINGLB_BIN ]] || die "no ringlb at $RINGLB_BIN (cargo build --release)"
    local nf budget
    nf=$(wc -w <<<"$FAULTS")
    budget=$((nf * (DURATION + 30) + 60))
    log "$nf faults [$FAULTS], ${DURATION}s of load each; global timeout ${budget}s"
    start_watchdog "$budget"

    RESULTS=${OUT_DIR:-$SCRIPT_DIR/results/ha-$(date -u +%Y-%m-%dT%H%M%SZ)}
    mkdir -p "$RESULTS/lb1" "$RESULTS/lb2"
    : >"$RESULTS/rows.jsonl"
    {
        settings_head "$@"
        echo "keepalived: $(keepalived --version 2>&1 | head -n1)"
        echo "nginx: $(nginx -v 2>&1)"
        echo "ringlb: $(ringlb_version)"
        echo "vrrp: v3, advert ${ADVERT}s, vrrp_script 'ringlb ctl ready' every ${CHECK_INTERVAL}s (timeout ${CHECK_TIMEOUT}s, fall 1, rise 1), $( ((PREEMPT)) && echo preempt || echo nopreempt)"
        echo "ringlb: leave-delay $LEAVE_DELAY, drain-timeout 3s, 1 worker each"
        echo "load: wrk -t1 -c50 --timeout 2s; probe: 1 new connection / 20 ms; kprobe: 10 keep-alive connections, 1 request / 20 ms each"
        echo "runs: ${DURATION}s each, fault at ${FAULT_AT}s, repair at ${REPAIR_AT}s"
        echo "target: the VIP answers from the backup within 3 adverts + check interval = ${LIMIT}s (stop: + check timeout = ${LIMIT_STOP}s)"
    } >"$RESULTS/settings.txt"

    setup_net
    start_backends cli
    write_ringlb_conf "$VIP:80" "0.0.0.0:9100"
    start_ringlb_ns lb1; start_ringlb_ns lb2
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
    tidy_results
}

main "$@"
