#!/usr/bin/env bash
# Fan-out to permessage-deflate subscribers against plain ones (issue 16), in one run:
# `wsring serve` (one worker) pinned to CPU 0, benches/deflate_fanout.rs on CPU 1, for
# each backend and subscriber count, deflate on then off, --rounds times. Each run prints
# one JSON line: deliveries, compressed frames, bytes per delivery on the wire, the
# server's CPU seconds per million deliveries.
#
#   scripts/deflate-bench.sh [--subscribers 1000,10000] [--rate 200] [--seconds 5] [--rounds 2]
#                            [--servers io-uring,epoll,bun]
#
# `bun` is the Bun (uWebSockets) peer of benches/peers/bun/, which compresses a publication
# for each deflate subscriber (its --deflate; off: plain), installed with npm on first use.
#
# The publisher sends a changing 1-4 KB JSON order book at --rate messages per second.
set -euo pipefail
cd "$(dirname "$0")/.."
subscribers=1000,10000
rate=200
seconds=5
rounds=2
servers=io-uring,epoll,bun
while [ $# -gt 0 ]; do
    case "$1" in
        --subscribers) subscribers=$2; shift 2 ;;
        --rate) rate=$2; shift 2 ;;
        --seconds) seconds=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --servers) servers=$2; shift 2 ;;
        *) echo "usage: $0 [--subscribers N,M] [--rate R] [--seconds S] [--rounds R] [--servers a,b]" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/common.sh
. scripts/common.sh
cargo build --release --quiet --bins
bench=$(cargo bench --bench deflate_fanout --no-run 2>&1 | grep -o 'target/release/deps/deflate_fanout-[0-9a-f]*' | head -n1)
[ -x "$bench" ] || { echo "deflate-bench: the bench did not build" >&2; exit 1; }
sysctl -w net.ipv4.ip_local_port_range="1024 65535" >/dev/null 2>&1 || true
IFS=, read -r -a counts <<<"$subscribers"
IFS=, read -r -a server_list <<<"$servers"
for round in $(seq 1 "$rounds"); do
    for backend in "${server_list[@]}"; do
        for n in "${counts[@]}"; do
            for deflate in on off; do
                if [ "$backend" = bun ]; then
                    if [ "$deflate" = on ]; then start_bun --deflate; else start_bun; fi
                else
                    start_server "$backend"
                fi
                pid=$SERVER_PID
                addr=$SERVER_ADDR
                timeout 300 taskset -c 1 "$bench" --target "$addr" --server-pid "$pid" \
                    --subscribers "$n" --deflate "$deflate" --rate "$rate" --seconds "$seconds" |
                    python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['backend'] = '$backend'; d['round'] = $round; print(json.dumps(d))"
                kill "$pid" 2>/dev/null || true
                wait "$pid" 2>/dev/null || true
                rm -f "$SERVER_LOG"
            done
        done
    done
done
