#!/usr/bin/env bash
# bench/run.sh - interleaved benchmark: direct nginx vs HAProxy 2.6 (mode tcp) vs ringlb.
#
#   bench/run.sh                 full run: 5 rounds of 10 s runs, every scenario
#   bench/run.sh --quick         smoke run (< 2 minutes): 2 rounds of 2 s runs, fewer idle conns
#   bench/run.sh --rounds N --duration S --scenarios a,b,bA,bP,c,d,dR,e,f,g,h,hR,i,j,k,hP,hS
#                --systems direct,haproxy,ringlb --workers N --idle-conns N
#                --port-base P --noisy CORES --out DIR
#                --client-threads N (wrk threads, default 1: with one, a full TLS handshake's
#                                 client side caps h; with 2 the client takes what the proxy leaves)
#                --ringlb PATH   (another ringlb binary; then nothing is built)
#                --baseline PATH (A/B: an older ringlb binary, run as system 'base' beside 'ringlb',
#                                 interleaved in the same rounds; e.g. --systems base,ringlb)
#
# Scenarios (all on 127.0.0.1, nginx backends serving a 100-byte and a 1 MiB file):
#   a  keep-alive, 100 B responses, wrk -t1 -c50
#   b  new connection per request (Connection: close), 100 B, wrk -t1 -c50
#   bA as b, through a source ACL: a deny list of 100,000 prefixes (IPv4 and IPv6, none
#      covering the client 127.0.0.1, 1% of them in its /16) read from a file, and an allow
#      list of 127.0.0.0/8 (ringlb deny-file/allow-file, HAProxy `tcp-request connection
#      reject if { src -f ... }`, the same files); the list is made with a fixed seed, as
#      <out>/tmp/acl/deny.lst (1.9 MB, not committed). bA / b is what the ACL costs.
#   bP as b, the proxy sends a PROXY v2 header to the backends (ringlb send-proxy = "v2",
#      HAProxy send-proxy-v2), nginx servers that demand it (listen ... proxy_protocol)
#   'direct' does not run bA and bP; the summary gives bA / b and bP / b per system.
#   c  keep-alive, 1 MiB responses, wrk -t1 -c10          -> MiB/s, proxy CPU per MiB
#   d  iperf3 -c through the proxy to one iperf3 server   -> Gbit/s, proxy CPU per MiB
#   dR the same with iperf3 -R (server sends)
#   e  N idle keep-alive connections held through the proxy -> proxy RSS bytes per connection
#   f  as a, with 2 proxy workers/threads (ringlb --workers 2, HAProxy nbthread 2)
#   g  latency at a fixed moderate rate: wrk -t1 -c10, each connection pauses 2 ms
#      between requests (wrk2 is not packaged; this keeps both proxies far from saturation)
#   TLS at the proxy (HAProxy `bind ... ssl crt`, ringlb `tls = {...}`), the same self-signed
#   certificate for both, plain HTTP to the same nginx backends; 'direct' does not run these:
#   h  new TLS connection per request (Connection: close), full handshake, ECDSA P-256, 100 B,
#      wrk -t1 -c50; wrk resumes its sessions (OpenSSL keeps them across SSL_clear), so these
#      frontends have resumption off: ringlb `tickets = false, session-cache = 0`, HAProxy
#      `no-tls-tickets` and `tune.ssl.cachesize 0`
#   hR the same with an RSA 2048 certificate
#   i  keep-alive requests over TLS, 100 B, wrk -t1 -c50
#   j  keep-alive over TLS, 1 MiB responses, wrk -t1 -c10
#   k  resumed handshakes: as h, to frontends with resumption on (both servers' defaults:
#      tickets and a session cache), so each new connection of wrk resumes its last session
#   The warm-up checks with `openssl s_client -sess_out/-sess_in` that each TLS frontend
#   resumes, or not, as its scenario needs, and warns if not.
#   TLS passed through to nginx (which terminates it; 'direct' is nginx's TLS port):
#   hP new TLS connection per request through a plain TCP frontend, wrk -t1 -c50
#   hS the same through an SNI-routing frontend (ringlb [[frontend.route]], HAProxy
#      inspect-delay + req.ssl_sni): hS / hP is what reading the ClientHello costs
#
# What the edge features cost (issue 12): 6 rounds, so that each of b, bA, bP runs in each
# place of a round twice, once for each order of the two systems (~7 minutes):
#   bench/run.sh --rounds 6 --scenarios b,bA,bP --systems haproxy,ringlb
#
# Every round runs every system once per scenario, the order of the systems (and of b, bA,
# bP among themselves) rotated each round, so slow drifts of the machine hit all alike.
# Figures land in bench/results/<date>-<host>/: header.txt, raw.csv (one line per run),
# table.txt, logs/.
#
# Every process this script starts is stopped by its PID on exit (trap EXIT), never by
# name, and a watchdog ends the whole run after a computed time limit.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$BENCH_DIR")
BIN=$REPO/target/release/ringlb
CUSTOM_BIN=0
LIB=$BENCH_DIR/lib.py
COMMAND_LINE=$(printf '%q ' "$0" "$@")

# ----------------------------------------------------------------------------- options

ROUNDS= DURATION= SCENARIOS= IDLE_CONNS= IDLE_HOLD=
SYSTEMS=direct,haproxy,ringlb
BASE_BIN=
WORKERS=1          # base workers/threads for a,b,c,d,e,g (design.md's reference is 1)
WORKERS_F=2        # scenario f
PORT_BASE=27100
NOISY=0.10         # foreign CPU (in cores) above which a run counts as spoiled
OUT=
QUICK=0
CLIENT_THREADS=1   # wrk threads; a full TLS handshake costs the client more than the proxy

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; }

while (($#)); do
    case $1 in
        --quick) QUICK=1 ;;
        --rounds) ROUNDS=$2; shift ;;
        --duration) DURATION=$2; shift ;;
        --scenarios) SCENARIOS=$2; shift ;;
        --systems) SYSTEMS=$2; shift ;;
        --workers) WORKERS=$2; shift ;;
        --idle-conns) IDLE_CONNS=$2; shift ;;
        --port-base) PORT_BASE=$2; shift ;;
        --noisy) NOISY=$2; shift ;;
        --client-threads) CLIENT_THREADS=$2; shift ;;
        --out) OUT=$2; shift ;;
        --ringlb) BIN=$(realpath "$2"); CUSTOM_BIN=1; shift ;;
        --baseline) BASE_BIN=$(realpath "$2"); shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown option: $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# --quick only fills in what was not given explicitly.
if ((QUICK)); then
    : "${ROUNDS:=2}" "${DURATION:=2}" "${SCENARIOS:=a,b,c,d,e,f,g}" "${IDLE_CONNS:=2000}" "${IDLE_HOLD:=1}"
else
    : "${ROUNDS:=5}" "${DURATION:=10}" "${SCENARIOS:=a,b,bA,bP,c,d,dR,e,f,g,h,hR,i,j,k,hP,hS}" "${IDLE_CONNS:=10000}" "${IDLE_HOLD:=3}"
fi
if [[ ",$SYSTEMS," == *",base,"* && -z $BASE_BIN ]]; then
    echo "system 'base' needs --baseline PATH (the older ringlb binary)" >&2; exit 2
fi
if [[ -n $BASE_BIN && ",$SYSTEMS," != *",base,"* ]]; then SYSTEMS=$SYSTEMS,base; fi
IFS=, read -r -a SCEN <<<"$SCENARIOS"
IFS=, read -r -a SYS <<<"$SYSTEMS"
for s in "${SCEN[@]}"; do
    [[ $s =~ ^(a|b|bA|bP|c|d|dR|e|f|g|h|hR|i|j|k|hP|hS)$ ]] || { echo "unknown scenario '$s'" >&2; exit 2; }
done
for s in "${SYS[@]}"; do
    [[ $s =~ ^(direct|haproxy|ringlb|base)$ ]] || { echo "unknown system '$s'" >&2; exit 2; }
done
[[ $ROUNDS =~ ^[0-9]+$ && $DURATION =~ ^[0-9]+$ && $ROUNDS -ge 1 && $DURATION -ge 1 ]] ||
    { echo "--rounds and --duration take positive integers" >&2; exit 2; }

has_scen() { [[ ",$SCENARIOS," == *",$1,"* ]]; }
has_sys() { [[ ",$SYSTEMS," == *",$1,"* ]]; }
has_tls() { has_scen h || has_scen hR || has_scen i || has_scen j || has_scen k || has_pass; }
has_pass() { has_scen hP || has_scen hS; }
is_tls() { [[ $1 =~ ^(h|hR|i|j|k|hP|hS)$ ]]; }
has_edge() { has_scen bA || has_scen bP; }
# Scenario:system pairs left out because that binary cannot run them (an old --baseline).
SKIPPED=" "

runs_on() { # SCENARIO SYSTEM: whether this system runs this scenario
    local sc=$1 sys=$2
    if [[ $sys == direct ]]; then
        # No proxy, no ACL or PROXY header; TLS only where nginx terminates it.
        [[ $sc == bA || $sc == bP ]] && return 1
        is_tls "$sc" && [[ ! $sc =~ ^h[PS]$ ]] && return 1
    fi
    [[ $SKIPPED != *" $sc:$sys "* ]]
}

# Fixed ports in a high range, one per server.
NGINX1_PORT=$((PORT_BASE + 1)) NGINX2_PORT=$((PORT_BASE + 2))
HAP1_PORT=$((PORT_BASE + 11)) RLB1_PORT=$((PORT_BASE + 12))   # a b c g (base workers)
HAP2_PORT=$((PORT_BASE + 13)) RLB2_PORT=$((PORT_BASE + 14))   # f (2 workers)
IPERF_PORT=$((PORT_BASE + 20))
HAPI_PORT=$((PORT_BASE + 21)) RLBI_PORT=$((PORT_BASE + 22))   # d dR (iperf3 server as the only backend)
HAPE_PORT=$((PORT_BASE + 31)) RLBE_PORT=$((PORT_BASE + 32))   # e (fresh instance each round)
# The baseline binary of an A/B (--baseline): the same roles on ports of its own.
BASE1_PORT=$((PORT_BASE + 15)) BASE2_PORT=$((PORT_BASE + 16))
BASEI_PORT=$((PORT_BASE + 23)) BASEE_PORT=$((PORT_BASE + 33))
HAPT_PORT=$((PORT_BASE + 41)) RLBT_PORT=$((PORT_BASE + 42))   # i j k (TLS, ECDSA P-256, resumption on)
HAPTR_PORT=$((PORT_BASE + 43)) RLBTR_PORT=$((PORT_BASE + 44)) # hR (TLS, RSA 2048, resumption off)
BASET_PORT=$((PORT_BASE + 45)) BASETR_PORT=$((PORT_BASE + 46))
HAPTF_PORT=$((PORT_BASE + 47)) RLBTF_PORT=$((PORT_BASE + 48)) BASETF_PORT=$((PORT_BASE + 49)) # h (ECDSA, resumption off)
NGINX1_TLS_PORT=$((PORT_BASE + 3)) NGINX2_TLS_PORT=$((PORT_BASE + 4))  # hP hS: nginx terminates
HAPP_PORT=$((PORT_BASE + 51)) RLBP_PORT=$((PORT_BASE + 52))   # hP (plain TCP frontend)
HAPS_PORT=$((PORT_BASE + 53)) RLBS_PORT=$((PORT_BASE + 54))   # hS (SNI routing)
BASEP_PORT=$((PORT_BASE + 55)) BASES_PORT=$((PORT_BASE + 56))
NGINX1_PP_PORT=$((PORT_BASE + 5)) NGINX2_PP_PORT=$((PORT_BASE + 6))  # bP: nginx demands PROXY
HAPA_PORT=$((PORT_BASE + 61)) RLBA_PORT=$((PORT_BASE + 62)) BASEA_PORT=$((PORT_BASE + 63)) # bA (ACL)
HAPV_PORT=$((PORT_BASE + 64)) RLBV_PORT=$((PORT_BASE + 65)) BASEV_PORT=$((PORT_BASE + 66)) # bP (PROXY v2)
ALL_PORTS=("$HAPT_PORT" "$RLBT_PORT" "$HAPTR_PORT" "$RLBTR_PORT" "$HAPTF_PORT" "$RLBTF_PORT" "$NGINX1_TLS_PORT" "$NGINX2_TLS_PORT"
    "$HAPP_PORT" "$RLBP_PORT" "$HAPS_PORT" "$RLBS_PORT" "$NGINX1_PORT" "$NGINX2_PORT" "$HAP1_PORT" "$RLB1_PORT" "$HAP2_PORT" "$RLB2_PORT"
    "$IPERF_PORT" "$HAPI_PORT" "$RLBI_PORT" "$HAPE_PORT" "$RLBE_PORT"
    "$NGINX1_PP_PORT" "$NGINX2_PP_PORT" "$HAPA_PORT" "$RLBA_PORT" "$HAPV_PORT" "$RLBV_PORT")
[[ -z $BASE_BIN ]] || ALL_PORTS+=("$BASE1_PORT" "$BASE2_PORT" "$BASEI_PORT" "$BASEE_PORT" "$BASET_PORT" "$BASETR_PORT" "$BASETF_PORT" "$BASEP_PORT" "$BASES_PORT"
    "$BASEA_PORT" "$BASEV_PORT")

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { log "ERROR: $*" >&2; exit 1; }

# ----------------------------------------------------------------------------- processes

# Every server is a direct child of this shell; its PID goes into PID_OF and into a file
# that the watchdog can read. Nothing is ever stopped by name.
declare -A PID_OF=()
START_ORDER=()
CURRENT_PID=   # the load (wrk/iperf3 via lib.py) running right now, if any
WATCHDOG_PID=
WORK=

start_server() { # NAME LOGFILE CMD... ; sets PID_OF[NAME]
    local name=$1 logf=$2
    shift 2
    "$@" </dev/null >"$logf" 2>&1 &
    PID_OF[$name]=$!
    START_ORDER+=("$name")
    echo "$! $name" >>"$WORK/pids"
}

kill_pid() { # PID: TERM, wait up to 5 s (ringlb drains on TERM), then KILL
    local pid=$1 i
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

stop_server() { # NAME
    local pid=${PID_OF[$1]:-}
    [[ -n $pid ]] || return 0
    kill_pid "$pid"
    unset "PID_OF[$1]"
    # Forget it in the watchdog's list too, so a reused PID is never hit later.
    grep -v "^$pid " "$WORK/pids" >"$WORK/pids.new" || true
    mv "$WORK/pids.new" "$WORK/pids"
}

alive() { [[ -n ${PID_OF[$1]:-} ]] && kill -0 "${PID_OF[$1]}" 2>/dev/null; }

cleanup() {
    local rc=$? i
    trap - EXIT INT TERM
    set +e
    [[ -n $CURRENT_PID ]] && kill_pid "$CURRENT_PID"
    for ((i = ${#START_ORDER[@]} - 1; i >= 0; i--)); do
        stop_server "${START_ORDER[i]}"
    done
    if [[ -n $WATCHDOG_PID ]]; then
        kill -TERM "$WATCHDOG_PID" 2>/dev/null
        wait "$WATCHDOG_PID" 2>/dev/null
    fi
    [[ -n $WORK && -d $WORK ]] && rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated (global timeout?)"; exit 143' TERM

start_watchdog() { # SECONDS: TERM this script when the run overruns, KILL 20 s later
    local limit=$1 main=$$ pidfile=$WORK/pids
    (
        trap - EXIT INT
        trap 'kill "$sp" 2>/dev/null; exit 0' TERM
        sleep "$limit" &
        sp=$!
        wait "$sp"
        echo "GLOBAL TIMEOUT after ${limit}s: stopping the benchmark" >&2
        kill -TERM "$main" 2>/dev/null
        sleep 20 &
        sp=$!
        wait "$sp"
        # The main shell did not clean up in time: kill what it started, by PID.
        if kill -0 "$main" 2>/dev/null; then
            while read -r pid _; do kill -KILL "$pid" 2>/dev/null; done <"$pidfile"
            kill -KILL "$main" 2>/dev/null
        fi
    ) &
    WATCHDOG_PID=$!
}

# ----------------------------------------------------------------------------- setup

ensure_tools() {
    local missing=() t
    for t in wrk nginx haproxy iperf3; do
        command -v "$t" >/dev/null || missing+=("$t")
    done
    ((${#missing[@]})) || return 0
    log "installing ${missing[*]} with apt-get"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"; then
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi
}

build_ringlb() {
    # Build before any measurement so that cargo never competes with a run.
    if ((!CUSTOM_BIN)); then
        if [[ ! -x $BIN ]] || [[ -n $(find "$REPO/src" "$REPO/Cargo.toml" "$REPO/Cargo.lock" \
            -newer "$BIN" -print -quit 2>/dev/null) ]]; then
            log "building ringlb (cargo build --release)"
            (cd "$REPO" && timeout 1800 cargo build --release)
        fi
    fi
    [[ -x $BIN ]] || die "no executable $BIN"
}

write_nginx_conf() { # NAME PORT TLS_PORT PP_PORT -> $WORK/NAME/nginx.conf; one process, own temp folders
    local dir=$WORK/$1 port=$2 tls_server= pp_server=
    # The passthrough scenarios (hP, hS) need a backend that terminates TLS.
    if has_pass; then
        tls_server="    server {
        listen 127.0.0.1:$3 ssl backlog=4096;
        ssl_certificate $WORK/tls/ec.pem;
        ssl_certificate_key $WORK/tls/ec.key;
        root $WORK/www;
        location / { }
    }"
    fi
    # bP: a listener that closes any connection not starting with a PROXY header.
    if has_scen bP; then
        pp_server="    server {
        listen 127.0.0.1:$4 proxy_protocol backlog=4096;
        root $WORK/www;
        location / { }
    }"
    fi
    mkdir -p "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
# One nginx process (no master), so that the PID we start is the one that serves.
worker_processes 1;
master_process off;
daemon off;
pid $dir/nginx.pid;
error_log $RESULTS/logs/$1-error.log warn;
events {
    worker_connections $((NOFILE - 500));
}
http {
    access_log off;
    sendfile on;
    keepalive_timeout 600s;         # longer than any idle hold (scenario e)
    keepalive_requests 1000000000;  # the default (1000) would close keep-alive connections
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    default_type application/octet-stream;
    server {
        listen 127.0.0.1:$port backlog=4096;
        root $WORK/www;
        location / { }
    }
$tls_server
$pp_server
}
EOF
}

write_haproxy_conf() { # FILE PORT THREADS CHECKS(yes|no) BACKEND_PORT...
    # Optional: $HAP_FE_RULES (lines for the frontend), $HAP_SERVER_OPTS (for each server).
    local file=$1 port=$2 threads=$3 checks=$4 i=0 b check= nl=$'\n'
    shift 4
    # Same health checks as ringlb's defaults: TCP connect every 2 s, rise 2, fall 3.
    [[ $checks == yes ]] && check=" check inter 2s rise 2 fall 3"
    cat >"$file" <<EOF
# HAProxy 2.6 in its best layer-4 setup for this benchmark: mode tcp, round robin,
# splice-auto (design.md fact 9: ~0.7x of direct on bulk instead of 0.3-0.4x).
global
    nbthread $threads
    maxconn $HAP_MAXCONN
    maxpipes 256
    # Same pipe size as ringlb's splice pipes (1 MiB), so that bulk compares
    # the two designs, not two pipe sizes.
    tune.pipesize 1048576
defaults
    mode tcp
    balance roundrobin
    option splice-auto
    maxconn $HAP_MAXCONN
    timeout connect 2s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 127.0.0.1:$port${HAP_FE_RULES:+$nl$HAP_FE_RULES}
    default_backend be
backend be
EOF
    for b in "$@"; do
        i=$((i + 1))
        echo "    server b$i 127.0.0.1:$b$check${HAP_SERVER_OPTS:-}" >>"$file"
    done
}

start_haproxy() { # NAME PORT THREADS CHECKS(yes|no) BACKEND_PORT...
    local name=$1 port=$2 threads=$3 checks=$4 cfg=$WORK/$1.cfg
    shift 4
    write_haproxy_conf "$cfg" "$port" "$threads" "$checks" "$@"
    haproxy -c -q -f "$cfg" || die "bad HAProxy config $cfg"
    cp "$cfg" "$RESULTS/configs/$name.cfg"
    start_server "$name" "$RESULTS/logs/$name.log" haproxy -db -f "$cfg"
}

start_ringlb() { # NAME PORT WORKERS CHECKS(yes|no) BACKEND_PORT...  (binary: $START_BIN or $BIN)
    local name=$1 port=$2 workers=$3 checks=$4 b
    local cmd=("${START_BIN:-$BIN}" --listen "127.0.0.1:$port")
    shift 4
    for b in "$@"; do cmd+=(--backend "127.0.0.1:$b"); done
    # Idle timeout longer than any hold; connect timeout and health checks spelled out
    # (they are ringlb's defaults) to match the HAProxy configs exactly. ringlb cannot
    # turn checks off, but its backends start up: an interval of 1 h means no check.
    cmd+=(--workers "$workers" --idle-timeout 10m --connect-timeout 2s --rise 2 --fall 3)
    if [[ $checks == yes ]]; then cmd+=(--check-interval 2s); else cmd+=(--check-interval 1h); fi
    printf '%q ' "${cmd[@]}" >"$RESULTS/configs/$name.cmd"
    start_server "$name" "$RESULTS/logs/$name.log" "${cmd[@]}"
}

make_acl() { # -> $ACL_DIR/{deny,allow}.lst, for both proxies
    mkdir -p "$ACL_DIR"
    log "writing the deny list of scenario bA (100,000 prefixes)"
    python3 "$LIB" aclgen --out "$ACL_DIR/deny.lst" --n 100000 --seed 12 || die "no deny list for bA"
    printf '# bench/run.sh scenario bA: the benchmark runs on loopback\n127.0.0.0/8\n' >"$ACL_DIR/allow.lst"
}

# TLS at the proxy: one self-signed certificate per key type, used by both proxies.
make_certs() { # -> $WORK/tls/{ec,rsa}.{pem,key,both}; kind ecfull uses the ec files
    local dir=$WORK/tls kind
    mkdir -p "$dir"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 7 \
        -subj /CN=bench.ringlb.test -addext subjectAltName=DNS:bench.ringlb.test \
        -keyout "$dir/ec.key" -out "$dir/ec.pem" 2>/dev/null || die "openssl: no ECDSA certificate"
    openssl req -x509 -newkey rsa:2048 -nodes -days 7 \
        -subj /CN=bench.ringlb.test -addext subjectAltName=DNS:bench.ringlb.test \
        -keyout "$dir/rsa.key" -out "$dir/rsa.pem" 2>/dev/null || die "openssl: no RSA certificate"
    for kind in ec rsa; do cat "$dir/$kind.pem" "$dir/$kind.key" >"$dir/$kind.both"; done
}

start_haproxy_tls() { # NAME PORT THREADS KIND(ec|ecfull|rsa) BACKEND_PORT...
    local name=$1 port=$2 threads=$3 kind=$4 cfg=$WORK/$1.cfg i=0 b cache= tickets=
    shift 4
    # Debian's defaults for TLS (1.2 and 1.3, tickets and a 20,000-session cache on), the
    # same checks as the layer-4 configs; no splice on a TLS side (HAProxy cannot either).
    # ecfull and rsa: resumption off (every handshake of wrk a full one).
    [[ $kind == ec ]] || { cache="    tune.ssl.cachesize 0"; tickets=" no-tls-tickets"; }
    cat >"$cfg" <<EOF
global
    nbthread $threads
    maxconn $HAP_MAXCONN
    ssl-default-bind-options ssl-min-ver TLSv1.2
$cache
defaults
    mode tcp
    balance roundrobin
    maxconn $HAP_MAXCONN
    timeout connect 2s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 127.0.0.1:$port ssl crt $WORK/tls/${kind%full}.both$tickets
    default_backend be
backend be
EOF
    for b in "$@"; do
        i=$((i + 1))
        echo "    server b$i 127.0.0.1:$b check inter 2s rise 2 fall 3" >>"$cfg"
    done
    haproxy -c -q -f "$cfg" || die "bad HAProxy config $cfg"
    cp "$cfg" "$RESULTS/configs/$name.cfg"
    start_server "$name" "$RESULTS/logs/$name.log" haproxy -db -f "$cfg"
}

start_ringlb_tls() { # NAME PORT WORKERS KIND(ec|ecfull|rsa) BACKEND_PORT...  (binary: $START_BIN or $BIN)
    local name=$1 port=$2 workers=$3 kind=$4 cfg=$WORK/$1.toml list= b resume=
    shift 4
    [[ $kind == ec ]] || resume=", tickets = false, session-cache = 0"
    for b in "$@"; do list+="${list:+, }\"127.0.0.1:$b\""; done
    cat >"$cfg" <<EOF
workers = $workers
[[frontend]]
name = "tls"
listen = "127.0.0.1:$port"
backends = [$list]
idle-timeout = "10m"
connect-timeout = "2s"
check-interval = "2s"
rise = 2
fall = 3
tls = { cert = "$WORK/tls/${kind%full}.pem", key = "$WORK/tls/${kind%full}.key"$resume }
EOF
    cp "$cfg" "$RESULTS/configs/$name.toml"
    start_server "$name" "$RESULTS/logs/$name.log" "${START_BIN:-$BIN}" --config "$cfg"
}

start_haproxy_pass() { # NAME PORT THREADS MODE(plain|sni) BACKEND_PORT...
    local name=$1 port=$2 threads=$3 mode=$4 cfg=$WORK/$1.cfg i=0 b rules=
    shift 4
    # The classic SNI passthrough of HAProxy's docs: wait (up to 5 s) for a whole
    # ClientHello, then route on its server name. wrk sends the URL's host, 127.0.0.1.
    [[ $mode == sni ]] && rules="    tcp-request inspect-delay 5s
    tcp-request content accept if { req.ssl_hello_type 1 }
    use_backend be if { req.ssl_sni -i 127.0.0.1 bench.ringlb.test }"
    cat >"$cfg" <<EOF
global
    nbthread $threads
    maxconn $HAP_MAXCONN
defaults
    mode tcp
    balance roundrobin
    maxconn $HAP_MAXCONN
    timeout connect 2s
    timeout client 10m
    timeout server 10m
frontend fe
    bind 127.0.0.1:$port
$rules
    default_backend be
backend be
EOF
    for b in "$@"; do
        i=$((i + 1))
        echo "    server b$i 127.0.0.1:$b check inter 2s rise 2 fall 3" >>"$cfg"
    done
    haproxy -c -q -f "$cfg" || die "bad HAProxy config $cfg"
    cp "$cfg" "$RESULTS/configs/$name.cfg"
    start_server "$name" "$RESULTS/logs/$name.log" haproxy -db -f "$cfg"
}

start_ringlb_pass() { # NAME PORT WORKERS MODE(plain|sni) BACKEND_PORT...  (binary: $START_BIN or $BIN)
    local name=$1 port=$2 workers=$3 mode=$4 cfg=$WORK/$1.toml list= b
    shift 4
    for b in "$@"; do list+="${list:+, }\"127.0.0.1:$b\""; done
    cat >"$cfg" <<EOF
workers = $workers
[[frontend]]
name = "pass"
listen = "127.0.0.1:$port"
backends = [$list]
idle-timeout = "10m"
connect-timeout = "2s"
check-interval = "2s"
rise = 2
fall = 3
EOF
    # The route has the same backends: both paths end at nginx; wrk's SNI is 127.0.0.1.
    [[ $mode == sni ]] && cat >>"$cfg" <<EOF
[[frontend.route]]
name = "bench"
sni = ["127.0.0.1", "bench.ringlb.test"]
backends = [$list]
EOF
    cp "$cfg" "$RESULTS/configs/$name.toml"
    start_server "$name" "$RESULTS/logs/$name.log" "${START_BIN:-$BIN}" --config "$cfg"
}

# bA and bP: b's proxies (the same settings and checks) plus the ACL or the PROXY header.
start_haproxy_edge() { # NAME PORT THREADS KIND(acl|pp) BACKEND_PORT...
    local name=$1 port=$2 threads=$3 kind=$4 HAP_FE_RULES= HAP_SERVER_OPTS=
    shift 4
    if [[ $kind == acl ]]; then
        # Deny first, then allow, as ringlb checks them: an allowed client walks both lists.
        HAP_FE_RULES="    tcp-request connection reject if { src -f $ACL_DIR/deny.lst }
    tcp-request connection reject if !{ src -f $ACL_DIR/allow.lst }"
    else
        # Checks go to the traffic port, so HAProxy sends them the header too.
        HAP_SERVER_OPTS=" send-proxy-v2"
    fi
    start_haproxy "$name" "$port" "$threads" yes "$@"
}

start_ringlb_edge() { # NAME PORT WORKERS KIND(acl|pp) BACKEND_PORT...  (binary: $START_BIN or $BIN)
    local name=$1 port=$2 workers=$3 kind=$4 cfg=$WORK/$1.toml list= b bin=${START_BIN:-$BIN}
    shift 4
    for b in "$@"; do list+="${list:+, }\"127.0.0.1:$b\""; done
    # The settings of start_ringlb's flags, as a file: 100,000 prefixes need a list file.
    cat >"$cfg" <<EOF
workers = $workers
[[frontend]]
name = "edge"
listen = "127.0.0.1:$port"
backends = [$list]
idle-timeout = "10m"
connect-timeout = "2s"
check-interval = "2s"
rise = 2
fall = 3
EOF
    if [[ $kind == acl ]]; then
        printf 'allow-file = "%s"\ndeny-file = "%s"\n' "$ACL_DIR/allow.lst" "$ACL_DIR/deny.lst" >>"$cfg"
    else
        echo 'send-proxy = "v2"' >>"$cfg"
    fi
    cp "$cfg" "$RESULTS/configs/$name.toml"
    # An older binary (--baseline) may not know these keys: the caller decides.
    "$bin" --config "$cfg" --check >"$RESULTS/logs/$name-check.log" 2>&1 || return 1
    start_server "$name" "$RESULTS/logs/$name.log" "$bin" --config "$cfg"
}

start_edge() { # KIND(acl|pp) SYSTEM: start SYSTEM's proxy for bA (acl) or bP (pp), wait until it serves
    local kind=$1 sys=$2 sc=bA name backends=("$NGINX1_PORT" "$NGINX2_PORT")
    [[ $kind == pp ]] && sc=bP backends=("$NGINX1_PP_PORT" "$NGINX2_PP_PORT")
    target "$sc" "$sys"
    case $sys in
        haproxy) name=hap_$kind
            start_haproxy_edge "$name" "$T_PORT" "$WORKERS" "$kind" "${backends[@]}" ;;
        ringlb) name=rlb_$kind
            start_ringlb_edge "$name" "$T_PORT" "$WORKERS" "$kind" "${backends[@]}" ||
                die "ringlb refuses the $sc config (see $RESULTS/logs/$name-check.log)" ;;
        base) name=base_$kind
            if ! START_BIN=$BASE_BIN start_ringlb_edge "$name" "$T_PORT" "$WORKERS" "$kind" "${backends[@]}"; then
                log "WARNING: the baseline binary refuses the $sc config (see $RESULTS/logs/$name-check.log): base does not run $sc"
                SKIPPED+="$sc:base "
                return 0
            fi ;;
        *) return 0 ;;
    esac
    wait_http "$name" "$T_PORT"
}

check_edge() { # the bA and bP setups do what they claim, or the run stops
    local sys code n port_var
    if has_scen bA; then
        for sys in "${SYS[@]}"; do
            runs_on bA "$sys" || continue
            target bA "$sys"
            code=$(python3 "$LIB" httpstatus --source 127.0.0.2 127.0.0.1 "$T_PORT" /100b)
            [[ $code == none ]] || die "bA: $sys served 127.0.0.2 (HTTP $code), which deny.lst lists: is its ACL loaded?"
        done
        log "bA: each proxy serves 127.0.0.1 and refuses 127.0.0.2 (listed in deny.lst)"
    fi
    if has_scen bP; then
        for n in 1 2; do
            port_var=NGINX${n}_PP_PORT
            code=$(python3 "$LIB" httpstatus 127.0.0.1 "${!port_var}" /100b)
            [[ $code == none ]] || die "bP: nginx$n answered a request without a PROXY header (HTTP $code)"
        done
        log "bP: nginx refuses a request without a PROXY header; through each proxy it answers 200"
    fi
}

wait_https() { # NAME PORT: a GET of the 100 B file over TLS returns 200
    local i
    python3 "$LIB" waitport 127.0.0.1 "$2" 20 || die "$1 on port $2 is not ready (see $RESULTS/logs/$1.log)"
    for ((i = 0; i < 100; i++)); do
        [[ $(curl -sk -o /dev/null -w '%{http_code}' --max-time 2 "https://127.0.0.1:$2/100b") == 200 ]] && break
        sleep 0.2
    done
    ((i < 100)) || die "$1 on port $2 does not answer over TLS (see $RESULTS/logs/$1.log)"
    alive "$1" || die "$1 exited (see $RESULTS/logs/$1.log)"
}

wait_http() { # NAME PORT: the port answers and a GET of the 100 B file returns 200
    python3 "$LIB" waitport 127.0.0.1 "$2" 20 && python3 "$LIB" waithttp 127.0.0.1 "$2" /100b 20 ||
        die "$1 on port $2 is not ready (see $RESULTS/logs/$1.log)"
    alive "$1" || die "$1 exited (see $RESULTS/logs/$1.log)"
}

wait_port() { # NAME PORT
    python3 "$LIB" waitport 127.0.0.1 "$2" 20 || die "$1 on port $2 is not ready (see $RESULTS/logs/$1.log)"
    alive "$1" || die "$1 exited (see $RESULTS/logs/$1.log)"
}

write_header() {
    {
        echo "ringlb benchmark (bench/run.sh)"
        echo "command:   $COMMAND_LINE"
        echo "date:      $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "host:      $(uname -n)"
        echo "kernel:    $(uname -srvm)"
        echo "cpu:       $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ //'), $(nproc) cores"
        echo "memory:    $(awk '/MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
        echo "haproxy:   $HAP_VERSION"
        echo "nginx:     $(nginx -v 2>&1)"
        echo "wrk:       $(wrk -v 2>&1 | head -1)"
        echo "iperf3:    $(iperf3 -v | head -1)"
        if has_sys base; then
            echo "baseline:  $BASE_BIN (built $(date -u -r "$BASE_BIN" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BASE_BIN" | cut -c1-16))"
        fi
        if has_sys ringlb; then
            echo "ringlb:    $BIN (built $(date -u -r "$BIN" '+%Y-%m-%d %H:%M:%S UTC'), sha256 $(sha256sum "$BIN" | cut -c1-16))"
            echo "git:       $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo 'no commit yet')$(
                [[ -n $(git -C "$REPO" status --porcelain -- src 2>/dev/null) ]] && echo ' (src/ has uncommitted changes)')"
        fi
        echo "settings:  rounds $ROUNDS, duration ${DURATION}s, scenarios $SCENARIOS, systems $SYSTEMS"
        if has_scen bA; then
            echo "           bA: $ACL_DIR/deny.lst, $(grep -cv '^#' "$ACL_DIR/deny.lst") prefixes (lib.py aclgen --seed 12), sha256 $(sha256sum "$ACL_DIR/deny.lst" | cut -c1-16)"
        fi
        echo "           proxy workers/threads $WORKERS (f: $WORKERS_F), wrk threads $CLIENT_THREADS, idle connections $IDLE_N (hold ${IDLE_HOLD}s)"
        echo "           RLIMIT_NOFILE $NOFILE, ports $PORT_BASE+, no CPU pinning"
        echo "           a run is 'noisy' when other work took > $NOISY cores (or steal did)"
        echo "load avg:  $(cut -d' ' -f1-3 /proc/loadavg) at start"
        echo "expected:  ~${EXPECTED}s of measurement; global timeout ${LIMIT}s"
    } >"$RESULTS/header.txt"
}

# ----------------------------------------------------------------------------- runs

# Sets T_PORT, T_PID (proxy PID, empty for direct) and T_WORKERS for SCENARIO SYSTEM.
target() {
    local sc=$1 sys=$2
    T_WORKERS=$WORKERS
    case $sc:$sys in
        d:direct | dR:direct) T_PORT=$IPERF_PORT T_PID= T_WORKERS= ;;
        hP:direct | hS:direct) T_PORT=$NGINX1_TLS_PORT T_PID= T_WORKERS= ;;
        *:direct) T_PORT=$NGINX1_PORT T_PID= T_WORKERS= ;;
        bA:haproxy) T_PORT=$HAPA_PORT T_PID=${PID_OF[hap_acl]:-} ;;
        bA:ringlb) T_PORT=$RLBA_PORT T_PID=${PID_OF[rlb_acl]:-} ;;
        bA:base) T_PORT=$BASEA_PORT T_PID=${PID_OF[base_acl]:-} ;;
        bP:haproxy) T_PORT=$HAPV_PORT T_PID=${PID_OF[hap_pp]:-} ;;
        bP:ringlb) T_PORT=$RLBV_PORT T_PID=${PID_OF[rlb_pp]:-} ;;
        bP:base) T_PORT=$BASEV_PORT T_PID=${PID_OF[base_pp]:-} ;;
        hP:haproxy) T_PORT=$HAPP_PORT T_PID=${PID_OF[hap_pass_plain]:-} ;;
        hP:ringlb) T_PORT=$RLBP_PORT T_PID=${PID_OF[rlb_pass_plain]:-} ;;
        hP:base) T_PORT=$BASEP_PORT T_PID=${PID_OF[base_pass_plain]:-} ;;
        hS:haproxy) T_PORT=$HAPS_PORT T_PID=${PID_OF[hap_pass_sni]:-} ;;
        hS:ringlb) T_PORT=$RLBS_PORT T_PID=${PID_OF[rlb_pass_sni]:-} ;;
        hS:base) T_PORT=$BASES_PORT T_PID=${PID_OF[base_pass_sni]:-} ;;
        hR:haproxy) T_PORT=$HAPTR_PORT T_PID=${PID_OF[hap_tls_rsa]:-} ;;
        hR:ringlb) T_PORT=$RLBTR_PORT T_PID=${PID_OF[rlb_tls_rsa]:-} ;;
        hR:base) T_PORT=$BASETR_PORT T_PID=${PID_OF[base_tls_rsa]:-} ;;
        h:haproxy) T_PORT=$HAPTF_PORT T_PID=${PID_OF[hap_tls_full]:-} ;;
        h:ringlb) T_PORT=$RLBTF_PORT T_PID=${PID_OF[rlb_tls_full]:-} ;;
        h:base) T_PORT=$BASETF_PORT T_PID=${PID_OF[base_tls_full]:-} ;;
        [ijk]:haproxy) T_PORT=$HAPT_PORT T_PID=${PID_OF[hap_tls]:-} ;;
        [ijk]:ringlb) T_PORT=$RLBT_PORT T_PID=${PID_OF[rlb_tls]:-} ;;
        [ijk]:base) T_PORT=$BASET_PORT T_PID=${PID_OF[base_tls]:-} ;;
        d:haproxy | dR:haproxy) T_PORT=$HAPI_PORT T_PID=${PID_OF[hap_iperf]:-} ;;
        d:ringlb | dR:ringlb) T_PORT=$RLBI_PORT T_PID=${PID_OF[rlb_iperf]:-} ;;
        f:haproxy) T_PORT=$HAP2_PORT T_PID=${PID_OF[hap_w2]:-} T_WORKERS=$WORKERS_F ;;
        f:ringlb) T_PORT=$RLB2_PORT T_PID=${PID_OF[rlb_w2]:-} T_WORKERS=$WORKERS_F ;;
        *:haproxy) T_PORT=$HAP1_PORT T_PID=${PID_OF[hap_w1]:-} ;;
        *:ringlb) T_PORT=$RLB1_PORT T_PID=${PID_OF[rlb_w1]:-} ;;
        d:base | dR:base) T_PORT=$BASEI_PORT T_PID=${PID_OF[base_iperf]:-} ;;
        f:base) T_PORT=$BASE2_PORT T_PID=${PID_OF[base_w2]:-} T_WORKERS=$WORKERS_F ;;
        *:base) T_PORT=$BASE1_PORT T_PID=${PID_OF[base_w1]:-} ;;
    esac
}

test_pids() { local IFS=,; echo "${PID_OF[*]}"; }

# Runs one load through lib.py (which samples CPU before/after and appends to raw.csv).
# In the background + wait, so that a TERM from the watchdog is handled at once.
run_load() { # ROUND SCENARIO SYSTEM KIND CMD...
    local r=$1 sc=$2 sys=$3 kind=$4 limit=$((DURATION + 30))
    shift 4
    [[ $kind == iperf ]] && limit=$((DURATION + 6))   # a stuck iperf3 never ends by itself
    target "$sc" "$sys"
    python3 "$LIB" measure --raw "$RESULTS/raw.csv" --round "$r" --scenario "$sc" --system "$sys" \
        --workers "$T_WORKERS" --kind "$kind" --proxy-pids "$T_PID" --test-pids "$(test_pids)" \
        --noisy "$NOISY" --timeout "$limit" --log "$RESULTS/logs/r$r-$sc-$sys.txt" -- "$@" &
    CURRENT_PID=$!
    wait "$CURRENT_PID" || log "WARNING: measuring r$r $sc $sys failed"
    CURRENT_PID=
}

wrk_cmd() { # CONNS PATH [extra wrk args...] -> WRK array
    local conns=$1 path=$2
    shift 2
    WRK=(wrk "-t$CLIENT_THREADS" "-c$conns" "-d${DURATION}s" --latency --timeout 5s "$@" "${SCHEME:-http}://127.0.0.1:$T_PORT$path")
}

run_one() { # ROUND SCENARIO SYSTEM
    local r=$1 sc=$2 sys=$3 SCHEME=http
    runs_on "$sc" "$sys" || return 0
    if is_tls "$sc"; then SCHEME=https; fi
    [[ $sc == e ]] || target "$sc" "$sys"
    if [[ $sc != e && -n $T_PID ]] && ! kill -0 "$T_PID" 2>/dev/null; then
        log "WARNING: the $sys process for scenario $sc is gone (see $RESULTS/logs/)"
    fi
    case $sc in
        a | f) wrk_cmd 50 /100b -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        b | bA | bP) wrk_cmd 50 /100b -H 'Connection: close' -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        c) wrk_cmd 10 /1m -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        g) wrk_cmd 10 /100b -s "$BENCH_DIR/wrk-paced.lua"
            WRK+=(-- 2)   # script argument: 2 ms pause per connection between requests
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        d) run_load "$r" "$sc" "$sys" iperf iperf3 -c 127.0.0.1 -p "$T_PORT" -t "$DURATION" -J --connect-timeout 3000 ;;
        dR) run_load "$r" "$sc" "$sys" iperf iperf3 -c 127.0.0.1 -p "$T_PORT" -t "$DURATION" -J -R --connect-timeout 3000 ;;
        e) run_idle "$r" "$sys" ;;
        h | hR | k | hP | hS) wrk_cmd 50 /100b -H 'Connection: close' -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        i) wrk_cmd 50 /100b -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
        j) wrk_cmd 10 /1m -s "$BENCH_DIR/wrk-report.lua"
            run_load "$r" "$sc" "$sys" wrk "${WRK[@]}" ;;
    esac
}

# Scenario e: a fresh proxy each round (allocators keep freed memory, so a second round
# on the same process would measure almost nothing), RSS before/while holding N idle
# keep-alive connections (each did one request, so each reaches a backend).
run_idle() { # ROUND SYSTEM
    local r=$1 sys=$2 name= port pid
    case $sys in
        direct) port=$NGINX1_PORT pid=${PID_OF[nginx1]} ;;
        haproxy) name=hap_idle port=$HAPE_PORT
            start_haproxy "$name" "$port" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT" ;;
        ringlb) name=rlb_idle port=$RLBE_PORT
            start_ringlb "$name" "$port" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT" ;;
        base) name=base_idle port=$BASEE_PORT
            START_BIN=$BASE_BIN start_ringlb "$name" "$port" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT" ;;
    esac
    if [[ -n $name ]]; then
        wait_http "$name" "$port"
        pid=${PID_OF[$name]}
    fi
    python3 "$LIB" idle --raw "$RESULTS/raw.csv" --round "$r" --system "$sys" \
        --workers "$([[ $sys == direct ]] || echo "$WORKERS")" --pid "$pid" --port "$port" \
        --n "$IDLE_N" --hold "$IDLE_HOLD" --test-pids "$(test_pids)" &
    CURRENT_PID=$!
    wait "$CURRENT_PID" || log "WARNING: idle measurement r$r $sys failed"
    CURRENT_PID=
    if [[ -n $name ]]; then
        alive "$name" || log "WARNING: $sys died during the idle scenario (see $RESULTS/logs/$name.log)"
        stop_server "$name"
        # Keep the last round's log of this instance; START_ORDER may keep the name (harmless).
    fi
}

# Whether a second handshake to PORT resumes the first one's session (TLS 1.3 ticket or
# cache): h and hR must not, i j k must, or the scenario measures something else.
check_resumption() { # SYSTEM SCENARIO PORT
    local sys=$1 sc=$2 port=$3 sess=$WORK/resume-$1-$2.pem out want=yes got=no
    [[ $sc == h || $sc == hR ]] && want=no
    rm -f "$sess"
    # The sleep lets the ticket arrive after the handshake before s_client quits.
    (sleep 0.5; printf 'GET /100b HTTP/1.0\r\n\r\n') |
        timeout 10 openssl s_client -connect "127.0.0.1:$port" -sess_out "$sess" >/dev/null 2>&1 || true
    if [[ -s $sess ]]; then
        out=$( (sleep 0.5; printf 'GET /100b HTTP/1.0\r\n\r\n') |
            timeout 10 openssl s_client -connect "127.0.0.1:$port" -sess_in "$sess" 2>&1 || true)
        [[ $out == *"Reused, TLSv1"* ]] && got=yes
    fi
    if [[ $got == "$want" ]]; then
        log "resumption through $sys for $sc: $got, as intended"
    else
        log "WARNING: resumption through $sys for $sc: $got, expected $want; the figures of $sc measure something else"
    fi
}

warm_up() {
    # One short unrecorded load per system and proxy instance: page in binaries and
    # files, open the proxies' first backend connections. Not part of any figure; a
    # failure here is reported and the measured runs then show what goes wrong.
    local sys sc
    log "warming up"
    for sys in "${SYS[@]}"; do
        if has_scen a || has_scen b || has_scen c || has_scen g; then
            target a "$sys"
            timeout 10 wrk -t1 -c10 -d1s "http://127.0.0.1:$T_PORT/100b" >/dev/null ||
                log "WARNING: warm-up wrk through $sys failed"
        fi
        if has_scen f; then
            target f "$sys"
            timeout 10 wrk -t1 -c10 -d1s "http://127.0.0.1:$T_PORT/100b" >/dev/null ||
                log "WARNING: warm-up wrk through $sys (2 workers) failed"
        fi
        for sc in bA bP; do
            has_scen "$sc" && runs_on "$sc" "$sys" || continue
            target "$sc" "$sys"
            timeout 10 wrk -t1 -c10 -d1s "http://127.0.0.1:$T_PORT/100b" >/dev/null ||
                log "WARNING: warm-up wrk through $sys ($sc) failed"
        done
        if has_tls && [[ $sys != direct ]]; then
            for sc in h hR i; do
                case $sc in
                    i) has_scen i || has_scen j || has_scen k || continue ;;
                    *) has_scen $sc || continue ;;
                esac
                target $sc "$sys"
                timeout 10 wrk -t1 -c10 -d1s "https://127.0.0.1:$T_PORT/100b" >/dev/null ||
                    log "WARNING: warm-up wrk over TLS ($sc) through $sys failed"
                check_resumption "$sys" "$sc" "$T_PORT"
            done
        fi
        if has_scen d || has_scen dR; then
            target d "$sys"
            timeout 6 iperf3 -c 127.0.0.1 -p "$T_PORT" -t 1 --connect-timeout 3000 >/dev/null ||
                log "WARNING: warm-up iperf3 through $sys failed (hung or refused)"
        fi
    done
}

# ----------------------------------------------------------------------------- main

# Many sockets: idle connections, and a proxy needs two descriptors per connection.
ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
# HAProxy: 2 fds per connection + pipes for splicing; stay under the descriptor limit.
HAP_MAXCONN=$(((NOFILE - 2 * 256 - 200) / 2))
# A proxy holds two sockets per idle connection: cap N below what the limit allows.
IDLE_N=$IDLE_CONNS
if ((IDLE_N > (NOFILE - 2000) / 2)); then
    IDLE_N=$(((NOFILE - 2000) / 2))
    IDLE_NOTE="idle connections capped at $IDLE_N (asked $IDLE_CONNS): RLIMIT_NOFILE is $NOFILE and cannot be raised here, a proxy needs 2 per connection"
fi

ensure_tools
# Read whole: `haproxy -v | grep -q` fails under pipefail when grep exits first (SIGPIPE).
HAP_VERSION=$(haproxy -v 2>&1 || true)
HAP_VERSION=${HAP_VERSION%%$'\n'*}
[[ $HAP_VERSION == *'version 2.6'* ]] || log "WARNING: HAProxy is not 2.6: $HAP_VERSION"
if has_sys ringlb; then build_ringlb; fi

# Expected duration (measured on this machine): each wrk/iperf3 run is DURATION plus
# ~0.2 s; an idle run starts a proxy, opens the connections (~3000/s), holds them and
# waits 1 s after closing; warm-up is ~3.5 s per system; writing bA's list takes a few s.
n_timed=0 n_idle=0
for s in "${SCEN[@]}"; do
    for y in "${SYS[@]}"; do
        runs_on "$s" "$y" || continue
        if [[ $s == e ]]; then n_idle=$((n_idle + 1)); else n_timed=$((n_timed + 1)); fi
    done
done
EXPECTED=$((2 + ${#SYS[@]} * 35 / 10 + $(has_scen bA && echo 10 || echo 0) + ROUNDS * ((n_timed * (10 * DURATION + 2) + n_idle * (20 + 10 * IDLE_N / 3000 + 10 * ${IDLE_HOLD%.*})) / 10)))
LIMIT=${BENCH_TIME_LIMIT:-$((EXPECTED * 3 / 2 + 60))}   # BENCH_TIME_LIMIT: for testing the watchdog

STAMP=$(date -u +%Y%m%d-%H%M%S)
RESULTS=${OUT:-$BENCH_DIR/results/$STAMP-$(uname -n)}
mkdir -p "$RESULTS/logs" "$RESULTS/configs"
WORK=$(mktemp -d /tmp/ringlb-bench.XXXXXX)
: >"$WORK/pids"
start_watchdog "$LIMIT"
# Under tmp/ (not committed: see .gitignore); the seed makes the same list again.
ACL_DIR=$RESULTS/tmp/acl
if has_scen bA; then make_acl; fi
write_header
cat "$RESULTS/header.txt"
if [[ -n ${IDLE_NOTE:-} ]] && has_scen e; then log "NOTE: $IDLE_NOTE" | tee -a "$RESULTS/header.txt"; fi
log "expected duration ~$((EXPECTED / 60))m$((EXPECTED % 60))s; everything is stopped after ${LIMIT}s"

python3 "$LIB" portcheck "${ALL_PORTS[@]}" || die "pick other ports with --port-base"

# Certificates first: nginx serves TLS with one for the passthrough scenarios.
if has_tls; then make_certs; fi

# Content: exactly 100 bytes and exactly 1 MiB.
mkdir -p "$WORK/www"
head -c 99 /dev/zero | tr '\0' 'x' >"$WORK/www/100b" && echo >>"$WORK/www/100b"
head -c 1048576 /dev/urandom >"$WORK/www/1m"

log "starting servers"
for n in 1 2; do
    port_var=NGINX${n}_PORT tls_var=NGINX${n}_TLS_PORT pp_var=NGINX${n}_PP_PORT
    write_nginx_conf "nginx$n" "${!port_var}" "${!tls_var}" "${!pp_var}"
    cp "$WORK/nginx$n/nginx.conf" "$RESULTS/configs/nginx$n.conf"
    start_server "nginx$n" "$RESULTS/logs/nginx$n.log" \
        nginx -p "$WORK/nginx$n/" -c "$WORK/nginx$n/nginx.conf" -e "$RESULTS/logs/nginx$n-error.log"
done
wait_http nginx1 "$NGINX1_PORT"
wait_http nginx2 "$NGINX2_PORT"

if has_scen a || has_scen b || has_scen c || has_scen g; then
    if has_sys haproxy; then
        start_haproxy hap_w1 "$HAP1_PORT" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http hap_w1 "$HAP1_PORT"
    fi
    if has_sys ringlb; then
        start_ringlb rlb_w1 "$RLB1_PORT" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http rlb_w1 "$RLB1_PORT"
    fi
    if has_sys base; then
        START_BIN=$BASE_BIN start_ringlb base_w1 "$BASE1_PORT" "$WORKERS" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http base_w1 "$BASE1_PORT"
    fi
fi
if has_scen f; then
    if has_sys haproxy; then
        start_haproxy hap_w2 "$HAP2_PORT" "$WORKERS_F" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http hap_w2 "$HAP2_PORT"
    fi
    if has_sys ringlb; then
        start_ringlb rlb_w2 "$RLB2_PORT" "$WORKERS_F" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http rlb_w2 "$RLB2_PORT"
    fi
    if has_sys base; then
        START_BIN=$BASE_BIN start_ringlb base_w2 "$BASE2_PORT" "$WORKERS_F" yes "$NGINX1_PORT" "$NGINX2_PORT"
        wait_http base_w2 "$BASE2_PORT"
    fi
fi
if has_scen d || has_scen dR; then
    # iperf3 opens a control and a data connection; both must reach the same server, so
    # these proxies have the iperf3 server as their only backend. No health checks on
    # either: iperf3's server takes every connection for a client of its own, so checks
    # disturb it (its log fills with "unable to receive cookie" errors).
    start_server iperf3 "$RESULTS/logs/iperf3-server.log" iperf3 -s -B 127.0.0.1 -p "$IPERF_PORT"
    wait_port iperf3 "$IPERF_PORT"
    if has_sys haproxy; then
        start_haproxy hap_iperf "$HAPI_PORT" "$WORKERS" no "$IPERF_PORT"
        wait_port hap_iperf "$HAPI_PORT"
    fi
    if has_sys ringlb; then
        start_ringlb rlb_iperf "$RLBI_PORT" "$WORKERS" no "$IPERF_PORT"
        wait_port rlb_iperf "$RLBI_PORT"
    fi
    if has_sys base; then
        START_BIN=$BASE_BIN start_ringlb base_iperf "$BASEI_PORT" "$WORKERS" no "$IPERF_PORT"
        wait_port base_iperf "$BASEI_PORT"
    fi
fi

if has_tls; then
    for kind in ec ecfull rsa; do
        case $kind in
            ec) has_scen i || has_scen j || has_scen k || continue; sc=i sfx= ;;
            ecfull) has_scen h || continue; sc=h sfx=_full ;;
            rsa) has_scen hR || continue; sc=hR sfx=_rsa ;;
        esac
        for sys in haproxy ringlb base; do
            has_sys $sys || continue
            pre=$([[ $sys == haproxy ]] && echo hap || { [[ $sys == ringlb ]] && echo rlb || echo base; })
            target "$sc" "$sys"
            if [[ $sys == haproxy ]]; then
                start_haproxy_tls "hap_tls$sfx" "$T_PORT" "$WORKERS" "$kind" "$NGINX1_PORT" "$NGINX2_PORT"
            elif [[ $sys == ringlb ]]; then
                start_ringlb_tls "rlb_tls$sfx" "$T_PORT" "$WORKERS" "$kind" "$NGINX1_PORT" "$NGINX2_PORT"
            else
                START_BIN=$BASE_BIN start_ringlb_tls "base_tls$sfx" "$T_PORT" "$WORKERS" "$kind" "$NGINX1_PORT" "$NGINX2_PORT"
            fi
            wait_https "$pre""_tls$sfx" "$T_PORT"
        done
    done
fi

if has_pass; then
    for mode in plain sni; do
        [[ $mode == plain ]] && ! has_scen hP && continue
        [[ $mode == sni ]] && ! has_scen hS && continue
        if has_sys haproxy; then
            port=$([[ $mode == sni ]] && echo "$HAPS_PORT" || echo "$HAPP_PORT")
            start_haproxy_pass "hap_pass_$mode" "$port" "$WORKERS" "$mode" "$NGINX1_TLS_PORT" "$NGINX2_TLS_PORT"
            wait_https "hap_pass_$mode" "$port"
        fi
        if has_sys ringlb; then
            port=$([[ $mode == sni ]] && echo "$RLBS_PORT" || echo "$RLBP_PORT")
            start_ringlb_pass "rlb_pass_$mode" "$port" "$WORKERS" "$mode" "$NGINX1_TLS_PORT" "$NGINX2_TLS_PORT"
            wait_https "rlb_pass_$mode" "$port"
        fi
        if has_sys base; then
            port=$([[ $mode == sni ]] && echo "$BASES_PORT" || echo "$BASEP_PORT")
            START_BIN=$BASE_BIN start_ringlb_pass "base_pass_$mode" "$port" "$WORKERS" "$mode" "$NGINX1_TLS_PORT" "$NGINX2_TLS_PORT"
            wait_https "base_pass_$mode" "$port"
        fi
    done
fi

if has_edge; then
    for kind in acl pp; do
        [[ $kind == acl ]] && ! has_scen bA && continue
        [[ $kind == pp ]] && ! has_scen bP && continue
        for sys in "${SYS[@]}"; do start_edge "$kind" "$sys"; done
    done
    check_edge
fi

warm_up

# b, bA and bP are read against one another: their order rotates each round too, so that
# none of them always runs first, right after the warm-up or another scenario's load.
b_family=()
for s in "${SCEN[@]}"; do
    if [[ $s =~ ^(b|bA|bP)$ ]]; then b_family+=("$s"); fi
done

for ((r = 1; r <= ROUNDS; r++)); do
    # Rotate the order of the systems each round.
    order=()
    for ((i = 0; i < ${#SYS[@]}; i++)); do order+=("${SYS[(i + r - 1) % ${#SYS[@]}]}"); done
    scen=("${SCEN[@]}") k=0
    for i in "${!scen[@]}"; do
        if [[ ${scen[i]} =~ ^(b|bA|bP)$ ]]; then
            scen[i]=${b_family[(k + r - 1) % ${#b_family[@]}]}
            k=$((k + 1))
        fi
    done
    log "round $r/$ROUNDS (order: ${order[*]}; scenarios: ${scen[*]}; load avg $(cut -d' ' -f1 /proc/loadavg))"
    for sc in "${scen[@]}"; do
        for sys in "${order[@]}"; do
            run_one "$r" "$sc" "$sys"
        done
    done
done

{
    cat "$RESULTS/header.txt"
    echo
    python3 "$LIB" table "$RESULTS/raw.csv" --client-threads "$CLIENT_THREADS"
} >"$RESULTS/table.txt"
echo
python3 "$LIB" table "$RESULTS/raw.csv" --client-threads "$CLIENT_THREADS"
echo
log "results in $RESULTS (header.txt, raw.csv, table.txt, logs/)"
