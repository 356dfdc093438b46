#!/usr/bin/env bash
# bench/floor.sh: where the floor is for a layer-4 proxy on this machine.
#
# bench/run.sh compares ringlb with HAProxy on every scenario. This script
# answers the question its figures raise: how much faster could any proxy be
# here? It measures, interleaved, with the order rotated each round:
#   direct   wrk straight to one nginx (no proxy)
#   haproxy  HAProxy 2.6, mode tcp, 1 thread, splice-auto (as bench/run.sh)
#   ringlb   ringlb, 1 worker
#   sockmap  bench/experiments/sockmap-proxy.c: the kernel forwards every
#            segment itself (BPF sk_skb redirect), no byte and no wakeup
#            reaches user space: the one design that skips the relay's work
# on keep-alive 100-byte requests (wrk -t1 -c50), 1 MiB responses (-c10)
# and a new connection per 100-byte request (-c50, `Connection: close`;
# without sockmap, whose connection setup is plain epoll code and whose
# close handling is only good enough for keep-alive). It reports per run:
# requests/s, the proxy process's CPU per request, the whole machine's CPU
# per request (the only fair figure for sockmap, whose work runs in kernel
# worker threads), TCP segments sent per request on loopback, both legs and
# both directions (nginx with sendfile sends a response's header and body
# as two segments: 4 per request direct), and wrk's errors. Per-request
# figures divide by wrk's rate x the duration.
# With --perf it also profiles ringlb's worker under keep-alive and under
# new connections, splits its time into the kernel's socket work, io_uring,
# its own sleeps, its user code and the rest (see profile_split), and
# estimates the ceiling:
# the requests/s ringlb would reach if everything it spends outside the
# kernel's socket work cost nothing (an upper bound: a real relay must at
# least sleep and be woken), assuming the machine stays saturated
# (requests/s inversely proportional to the machine's CPU per request).
#
# usage: bench/floor.sh [--rounds N] [--duration S] [--perf]
# Needs root (BPF), gcc, wrk, nginx, haproxy (installed with apt-get if
# missing). Bounded: every load has a timeout and the whole run a watchdog.
set -euo pipefail

ROUNDS=5 DURATION=5 PERF=no PORT_BASE=28100
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --perf) PERF=yes ;;
        -h | --help) sed -n '2,33p' "$0"; exit 0 ;;
        *) echo "floor.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $ROUNDS =~ ^[1-9][0-9]*$ && $DURATION =~ ^[1-9][0-9]*$ ]] ||
    { echo "floor.sh: --rounds and --duration take positive integers" >&2; exit 2; }
[[ $PERF == no ]] || command -v perf >/dev/null ||
    { echo "floor.sh: --perf needs perf (apt-get install linux-perf)" >&2; exit 1; }
[[ $(id -u) == 0 ]] || { echo "floor.sh: needs root (loading a BPF program)" >&2; exit 1; }

REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/ringlb-floor.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 143' TERM
# Watchdog: up to 3 scenarios x 4 systems x rounds x (duration + margin),
# plus setup and the two --perf profiles.
# It kills its own sleep when told to stop, so nothing outlives the run.
LIMIT=$((ROUNDS * 12 * (DURATION + 5) + 600))
(
    trap - EXIT
    trap 'kill "$sp" 2>/dev/null; exit 0' TERM
    sleep "$LIMIT" &
    sp=$!
    wait "$sp"
    echo "floor.sh: watchdog: stopping after ${LIMIT}s" >&2
    # The main shell runs its TERM trap only once its foreground command
    # returns: end that command (a child of the main shell, by PID) too.
    kill -TERM $$
    pkill -TERM -P $$
) &
PIDS+=($!)

need=()
for tool in wrk nginx haproxy gcc curl; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [[ ${#need[@]} -gt 0 ]]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
(cd "$REPO" && cargo build --release --quiet)
gcc -O2 -Wall -o "$WORK/sockmap-proxy" "$REPO/bench/experiments/sockmap-proxy.c"

N1=$((PORT_BASE + 1)) N2=$((PORT_BASE + 2)) HAP=$((PORT_BASE + 10)) RLB=$((PORT_BASE + 11)) SMP=$((PORT_BASE + 12))
mkdir -p "$WORK/www"
head -c 100 /dev/zero | tr '\0' x >"$WORK/www/100b"
head -c 1048576 /dev/urandom >"$WORK/www/1m"
echo 'wrk.headers["Connection"] = "close"' >"$WORK/close.lua"
for port in $N1 $N2; do
    mkdir -p "$WORK/n$port"
    cat >"$WORK/n$port/nginx.conf" <<EOF
worker_processes 1; master_process off; daemon off;
pid $WORK/n$port/nginx.pid; error_log $WORK/n$port/error.log warn;
events { worker_connections 4096; }
http {
    access_log off; sendfile on; keepalive_requests 1000000000;
    client_body_temp_path $WORK/n$port; proxy_temp_path $WORK/n$port;
    fastcgi_temp_path $WORK/n$port; uwsgi_temp_path $WORK/n$port; scgi_temp_path $WORK/n$port;
    server { listen 127.0.0.1:$port backlog=4096; root $WORK/www; }
}
EOF
    nginx -c "$WORK/n$port/nginx.conf" -p "$WORK/n$port" &
    PIDS+=($!)
done
cat >"$WORK/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn 4000
    tune.pipesize 1048576
defaults
    mode tcp
    balance roundrobin
    option splice-auto
    timeout connect 2s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 127.0.0.1:$HAP
    default_backend be
backend be
    server b1 127.0.0.1:$N1 check inter 2s rise 2 fall 3
    server b2 127.0.0.1:$N2 check inter 2s rise 2 fall 3
EOF
declare -A PORT=([direct]=$N1 [haproxy]=$HAP [ringlb]=$RLB [sockmap]=$SMP) PID=()
haproxy -db -f "$WORK/haproxy.cfg" >"$WORK/haproxy.log" 2>&1 &
PID[haproxy]=$!
"$REPO/target/release/ringlb" --listen "127.0.0.1:$RLB" --backend "127.0.0.1:$N1" \
    --backend "127.0.0.1:$N2" --workers 1 --idle-timeout 10m >"$WORK/ringlb.log" 2>&1 &
PID[ringlb]=$!
"$WORK/sockmap-proxy" "$SMP" "$N1" "$N2" >"$WORK/sockmap.log" 2>&1 &
PID[sockmap]=$!
PIDS+=("${PID[haproxy]}" "${PID[ringlb]}" "${PID[sockmap]}")
sleep 1
for sys in direct haproxy ringlb sockmap; do
    curl -sf --max-time 5 -o /dev/null "http://127.0.0.1:${PORT[$sys]}/1m" ||
        { echo "floor.sh: $sys does not serve (logs in $WORK)" >&2; exit 1; }
done

busy_jiffies() { awk '/^cpu /{print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
proc_jiffies() { [[ -n ${1:-} ]] && awk '{print $14 + $15}' "/proc/$1/stat" || echo 0; }
out_segs() { awk '/^Tcp:/ {n++; if (n == 1) for (i = 1; i <= NF; i++) if ($i == "OutSegs") c = i; if (n == 2) print $c}' /proc/net/snmp; }

HZ=$(getconf CLK_TCK)
RAW=$WORK/raw.txt
measure() { # ROUND SCENARIO SYSTEM PATH CONNS [WRK_OPTION...]
    local r=$1 sc=$2 sys=$3 path=$4 conns=$5 m0 p0 s0 m1 p1 s1 out rps errors
    shift 5
    m0=$(busy_jiffies) p0=$(proc_jiffies "${PID[$sys]:-}") s0=$(out_segs)
    out=$(timeout $((DURATION + 10)) wrk -t1 "-c$conns" "-d${DURATION}s" "$@" "http://127.0.0.1:${PORT[$sys]}$path")
    m1=$(busy_jiffies) p1=$(proc_jiffies "${PID[$sys]:-}") s1=$(out_segs)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    # Socket errors and non-2xx answers are counted in wrk's rate: report them.
    errors=$(awk '/Socket errors/ {gsub(",", ""); e += $4 + $6 + $8 + $10} /Non-2xx/ {e += $NF} END {print e + 0}' <<<"$out")
    [[ $errors == 0 ]] || echo "floor.sh: WARNING: $sys $sc round $r: $errors wrk errors" >&2
    awk -v r="$r" -v sc="$sc" -v sys="$sys" -v rps="$rps" -v d="$DURATION" -v hz="$HZ" \
        -v m=$((m1 - m0)) -v p=$((p1 - p0)) -v s=$((s1 - s0)) -v e="$errors" 'BEGIN {
        n = rps * d
        printf "%d %s %s %.0f %.2f %.2f %.2f %d\n", r, sc, sys, rps, p / hz * 1e6 / n, m / hz * 1e6 / n, s / n, e }' |
        tee -a "$RAW"
}

echo "floor.sh: $(date -u +%FT%TZ), $(nproc) cores, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'), $ROUNDS rounds x ${DURATION}s, order rotated each round"
echo "round scenario system req/s proxy_us/req machine_us/req segments/req wrk_errors"
systems=(direct haproxy ringlb sockmap)
for r in $(seq "$ROUNDS"); do
    k=$(((r - 1) % ${#systems[@]}))
    order=("${systems[@]:k}" "${systems[@]:0:k}")
    for sys in "${order[@]}"; do measure "$r" keepalive "$sys" /100b 50; done
    for sys in "${order[@]}"; do measure "$r" 1MiB "$sys" /1m 10; done
    for sys in "${order[@]}"; do
        [[ $sys == sockmap ]] || measure "$r" newconn "$sys" /100b 50 -s "$WORK/close.lua"
    done
done

echo
echo "medians (ratio: req/s over HAProxy's median)"
awk '
    function median(list,   a, n, i, j, t) {
        n = split(list, a, " ")
        for (i = 2; i <= n; i++) { t = a[i]; for (j = i - 1; j >= 1 && a[j] > t; j--) a[j + 1] = a[j]; a[j + 1] = t }
        return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
    }
    { k = $2 " " $3; rps[k] = rps[k] " " $4; pc[k] = pc[k] " " $5; mc[k] = mc[k] " " $6; sg[k] = sg[k] " " $7; seen[k] = 1 }
    END {
        printf "%-10s %-8s %10s %7s %14s %16s %13s\n", "scenario", "system", "req/s", "ratio", "proxy_us/req", "machine_us/req", "segments/req"
        split("keepalive 1MiB newconn", scs, " "); split("direct haproxy ringlb sockmap", syss, " ")
        for (i = 1; i <= 3; i++) for (j = 1; j <= 4; j++) {
            k = scs[i] " " syss[j]; if (!seen[k]) continue
            h = median(rps[scs[i] " haproxy"])
            printf "%-10s %-8s %10.0f %7.2f %14.2f %16.2f %13.2f\n", scs[i], syss[j], median(rps[k]),
                median(rps[k]) / h, median(pc[k]), median(mc[k]), median(sg[k])
            print scs[i], syss[j], median(rps[k]), median(pc[k]), median(mc[k]) >"/dev/stderr"
        }
    }' "$RAW" 2>"$WORK/medians.txt"

# Splits ringlb's worker time (perf, cpu-clock, call graphs) under a load
# by what each sample is part of, from its call chain: the kernel's work on
# the sockets (TCP/IP, socket setup and teardown, the wakeups of peers it
# causes: what a relay sending these segments must pay) if a kernel frame
# of it appears anywhere in the chain; else io_uring's own work or the
# worker's sleeps and timers, whichever kernel frame is nearest the sampled
# function (a sleep in io_uring_enter counts as a sleep); else its user code
# (sampled outside the kernel); else the rest (kernel code matching none of
# these, mostly system call entry). Only the worker thread is sampled.
# Prints the split, then the share outside socket work as a last line.
profile_split() { # WRK_OPTION...
    timeout 20 wrk -t1 -c50 -d8s "$@" "http://127.0.0.1:$RLB/100b" >/dev/null &
    local load=$!
    sleep 2
    perf record -q -g -e cpu-clock -p "${PID[ringlb]}" -o "$WORK/perf.data" -- sleep 4 >/dev/null 2>&1
    wait "$load" || true
    perf script -i "$WORK/perf.data" -F comm,ip,sym,dso 2>/dev/null | awk -v comm=ringlb-worker-0 '
        function classify(   i, k) {
            if (n == 0) return
            k = leaf_dso ~ /kernel/ ? "other" : "user"
            for (i = 1; i <= n && k != "socket"; i++)
                if (kernel[i] && frame[i] ~ /^_*(tcp|inet|ip_|sock|sk_|skb|net|netif|dev_|loopback|sys_socket|sys_shutdown|sys_setsockopt|do_sock_setsockopt|sys_connect|do_accept|fput|filp_close|x64_sys_close|close_fd|splice|do_splice)/)
                    k = "socket"
            for (i = 1; i <= n && k != "socket" && k != "io_uring" && k != "sched"; i++)
                if (!kernel[i]) continue
                else if (frame[i] ~ /schedule|finish_task_switch|try_to_wake|hrtimer|tick_|timer/) k = "sched"
                else if (frame[i] ~ /^_*io_|uring/) k = "io_uring"
            count[k]++; total++; n = 0
        }
        /^[^ \t]/ { classify(); take = $1 == comm; next }
        /^$/ { classify(); next }
        take { if (n == 0) leaf_dso = $NF; frame[++n] = $2; kernel[n] = $NF ~ /kernel/ }
        END {
            classify()
            if (total == 0) { print "  no samples (is perf allowed here?)"; exit 1 }
            printf "  socket work (TCP/IP, setup and teardown, wakeups of peers) %.0f%%, io_uring %.0f%%, own sleeps and timers %.0f%%, user code %.0f%%, other (syscall entry) %.0f%% of %d samples\n",
                100 * count["socket"] / total, 100 * count["io_uring"] / total, 100 * count["sched"] / total,
                100 * count["user"] / total, 100 * count["other"] / total, total
            print 1 - count["socket"] / total
        }'
}

# The ceiling estimate for one scenario, from the medians (each column's own
# median) and the split.
ceiling() { # SCENARIO OUTSIDE_SHARE
    awk -v sc="$1" -v out="$2" '
        $1 == sc && $2 == "haproxy" { h = $3 }
        $1 == sc && $2 == "ringlb" { r = $3; p = $4; m = $5 }
        END {
            if (!h || !r) exit
            c = r * m / (m - p * out)
            printf "  ceiling: ringlb at zero cost outside socket work: machine %.1f -> %.1f us/req, %.0f req/s = %.2fx HAProxy (now %.2fx)\n",
                m, m - p * out, c, c / h, r / h
        }' "$WORK/medians.txt"
}

if [[ $PERF == yes ]]; then
    for sc in keepalive newconn; do
        echo
        echo "ringlb worker profile (perf, cpu-clock, 4 s of $sc):"
        opts=()
        [[ $sc == newconn ]] && opts=(-s "$WORK/close.lua")
        split=$(profile_split "${opts[@]}") || { echo "$split"; continue; }
        head -n -1 <<<"$split"
        ceiling "$sc" "$(tail -n 1 <<<"$split")"
    done
fi
