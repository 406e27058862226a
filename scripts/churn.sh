#!/usr/bin/env bash
# Connection churn: opens, upgrades and closes N connections (32 at a time, wsring-load's
# handshake mode) against `wsring serve`, then checks that nothing leaked: no connection
# left open, every accepted socket closed, the server's descriptor count back to where
# it started.
#
#   scripts/churn.sh [--connections 100000] [--backend io-uring|epoll]
set -euo pipefail
cd "$(dirname "$0")/.."
connections=100000
backend=io-uring
while [ $# -gt 0 ]; do
    case "$1" in
        --connections) connections=$2; shift 2 ;;
        --backend) backend=$2; shift 2 ;;
        *) echo "usage: $0 [--connections N] [--backend io-uring|epoll]" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/common.sh
. scripts/common.sh
start_server "$backend"
pid=$SERVER_PID
addr=$SERVER_ADDR
fds_before=$(find /proc/"$pid"/fd -mindepth 1 -maxdepth 1 | wc -l)
metric() { curl -s "http://$addr/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }
done_upgrades=0
rounds=0
while [ "$done_upgrades" -lt "$connections" ] && [ "$rounds" -lt 60 ]; do
    r=$(timeout 60 taskset -c 1 target/release/wsring-load --target "$addr" --mode handshake \
        --connections 32 --duration 3 --server-pid "$pid" 2>/dev/null)
    n=$(python3 -c 'import json,sys; r=json.loads(sys.argv[1]); print(int(r["upgrades"]) if r["errors"]==0 and r["bad_accept"]==0 else -1)' "$r")
    if [ "$n" -lt 0 ]; then echo "churn: load errors: $r" >&2; exit 1; fi
    done_upgrades=$((done_upgrades + n))
    rounds=$((rounds + 1))
done
# Let the last closes finish.
for _ in $(seq 1 50); do
    [ "$(metric wsring_connections_open)" = 0 ] && break
    sleep 0.1
done
open=$(metric wsring_connections_open)
accepted=$(metric wsring_accepted_total)
closed=$(metric wsring_closed_total)
upgraded=$(metric wsring_upgraded_total)
# The metrics request itself is an accepted socket that closes after the answer.
sleep 0.2
fds_after=$(find /proc/"$pid"/fd -mindepth 1 -maxdepth 1 | wc -l)
rss=$(awk '/VmRSS/ {print $2}' /proc/"$pid"/status)
echo "churn ($backend): $done_upgrades upgrades, upgraded=$upgraded accepted=$accepted closed=$closed open=$open, descriptors $fds_before -> $fds_after, RSS ${rss} KiB"
fail=0
[ "$done_upgrades" -ge "$connections" ] || { echo "churn: only $done_upgrades upgrades" >&2; fail=1; }
[ "$open" = 0 ] || { echo "churn: $open connections still open" >&2; fail=1; }
# Every accepted socket but the one answering this metrics request is closed.
[ $((accepted - closed)) -le 1 ] || { echo "churn: accepted $accepted but closed $closed" >&2; fail=1; }
[ "$fds_after" -le $((fds_before + 2)) ] || { echo "churn: descriptors grew $fds_before -> $fds_after" >&2; fail=1; }
exit "$fail"
