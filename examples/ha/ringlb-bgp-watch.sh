#!/usr/bin/env bash
# Announce the service address over BGP while ringlb is ready, withdraw it
# otherwise (bird-balancer.conf's static protocol 'svc'); scripts/ecmp-drill.sh
# runs this. Run it next to ringlb and BIRD (e.g. a systemd unit with
# Restart=always, after bird.service).
#
# A definite "not ready" (ringlb leaving or draining, or not running) withdraws
# at once; a check that gets no answer within 1 s (a stopped or starved ringlb)
# withdraws on the second in a row, so that one slow answer on a loaded host
# does not flap the route (which rehashes other balancers' flows on a router
# without resilient hashing).
#
# The timing rule: ringlb's leave-delay must exceed PERIOD + the BGP update's
# way into the router's FIB (measured in scripts/ecmp-drill.sh).
set -u
RINGLB=${RINGLB:-ringlb}
SOCKET=${RINGLB_SOCKET:-/run/ringlb.sock}
BIRD_CTL=${BIRD_CTL:-/run/bird/bird.ctl}
PERIOD=${PERIOD:-0.2}
state="" slow=0
while :; do
    timeout 1 "$RINGLB" ctl --socket "$SOCKET" ready >/dev/null 2>&1
    case $? in
        0) want=enable slow=0 ;;
        124) slow=$((slow + 1)); ((slow >= 2)) && want=disable || want=$state ;;
        *) want=disable slow=0 ;;
    esac
    if [[ -n $want && $want != "$state" ]]; then
        birdc -s "$BIRD_CTL" "$want" svc >/dev/null && state=$want && echo "svc: $want"
    fi
    sleep "$PERIOD"
done
