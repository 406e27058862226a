#!/usr/bin/env bash
# History and resume, measured (issue 15):
#  1. a reconnect storm: benches/resume_storm.rs against `wsring serve` (history on, its
#     default) pinned to CPU 0, the clients on CPU 1: N clients drop, M publications go by,
#     all N resume at once; resumes per second, each client's time to recovered
#     (p50/p99/max), the server's CPU seconds per resume; 3 rounds per backend;
#  2. what history costs a fan-out: scripts/bench.sh's fanout and fanout-wide scenarios on
#     both backends with history on (the default) and off (--history-size 0), interleaved
#     in one run.
#
#   scripts/history-bench.sh [--clients N] [--missed M] [--rounds R] [--no-fanout]
#
# Prints one JSON line per storm round, then bench.sh's tables. Needs cargo, taskset,
# python3.
set -euo pipefail
cd "$(dirname "$0")/.."
clients=2000
missed=50
rounds=3
fanout=1
while [ $# -gt 0 ]; do
    case "$1" in
        --clients) clients=$2; shift 2 ;;
        --missed) missed=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --no-fanout) fanout=0; shift ;;
        *) echo "usage: $0 [--clients N] [--missed M] [--rounds R] [--no-fanout]" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/common.sh
. scripts/common.sh
cargo build --release --quiet --bins
bench=$(cargo bench --bench resume_storm --no-run 2>&1 | grep -o 'target/release/deps/resume_storm-[0-9a-f]*' | head -n1)
[ -x "$bench" ] || { echo "history-bench: resume_storm did not build" >&2; exit 1; }

for backend in io-uring epoll; do
    start_server "$backend"
    pid=$SERVER_PID
    addr=$SERVER_ADDR
    timeout 600 taskset -c 1 "$bench" --target "$addr" --server-pid "$pid" \
        --clients "$clients" --missed "$missed" --rounds "$rounds" |
        python3 -c "import json,sys
for l in sys.stdin:
    d = json.loads(l); d['backend'] = '$backend'; print(json.dumps(d))"
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -f "$SERVER_LOG"
done

if [ "$fanout" = 1 ]; then
    scripts/bench.sh --scenarios fanout,fanout-wide \
        --servers wsring-io-uring,wsring-io-uring-nohistory,wsring-epoll,wsring-epoll-nohistory \
        --rounds "$rounds"
fi
