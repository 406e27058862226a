#!/usr/bin/env bash
# Cross-node fan-out, beside the same load on one node, in one run: a `redis-server` on a
# free loopback port, nodes A and B (`wsring serve --broker redis://...`, one worker each),
# and a node C without a broker. wsring-load's `fanout` scenario then runs
#   - one node:   publisher and N subscribers on C;
#   - two nodes:  publisher on A, N subscribers spread over A and B (`--also-target`), so
#                 half the deliveries cross the broker;
# alternately, for --rounds rounds. Each case prints wsring-load's JSON line (deliveries/s,
# publish-to-delivery p50/p99, losses); the two-node case adds the broker's CPU seconds per
# 100,000 messages published through it (redis-server's utime+stime from /proc). Every
# process it starts is stopped by its PID when it ends.
#
#   scripts/nodes-bench.sh [--subscribers 1000] [--duration 5] [--rounds 1] [--broker redis|nats]
#                          [--no-history]
#
# The nodes keep per-topic history (wsring serve's default: with Redis, every publication
# is numbered by a script on Redis and delivered through it, on its own node too);
# --no-history runs them with --history-size 0 (plain pub/sub), to compare.
set -euo pipefail
cd "$(dirname "$0")/.."
subscribers=1000
duration=5
rounds=1
broker=redis
history=()
while [ $# -gt 0 ]; do
    case "$1" in
        --subscribers) subscribers=$2; shift 2 ;;
        --duration) duration=$2; shift 2 ;;
        --rounds) rounds=$2; shift 2 ;;
        --broker) broker=$2; shift 2 ;;
        --no-history) history=(--history-size 0); shift ;;
        *) echo "usage: $0 [--subscribers N] [--duration S] [--rounds R] [--broker redis|nats] [--no-history]" >&2; exit 2 ;;
    esac
done

cargo build --release --bins -q
bin=target/release
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

bport=$(free_port)
case "$broker" in
    redis)
        redis-server --port "$bport" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
        url="redis://127.0.0.1:$bport" ;;
    nats)
        nats=$(command -v nats-server || echo /usr/sbin/nats-server)
        "$nats" -a 127.0.0.1 -p "$bport" >/dev/null 2>&1 &
        url="nats://127.0.0.1:$bport" ;;
    *) echo "--broker redis|nats" >&2; exit 2 ;;
esac
bpid=$!
pids+=("$bpid")

a=$(free_port); b=$(free_port); c=$(free_port)
"$bin/wsring" serve --listen "127.0.0.1:$a" --threads 1 --no-pin --log-level warn "${history[@]}" --broker "$url" >/dev/null &
apid=$!; pids+=("$apid")
"$bin/wsring" serve --listen "127.0.0.1:$b" --threads 1 --no-pin --log-level warn "${history[@]}" --broker "$url" >/dev/null &
pids+=($!)
"$bin/wsring" serve --listen "127.0.0.1:$c" --threads 1 --no-pin --log-level warn "${history[@]}" >/dev/null &
cpid=$!; pids+=("$cpid")
for port in "$a" "$b" "$c"; do
    for _ in $(seq 1 100); do
        curl -sf -o /dev/null "http://127.0.0.1:$port/metrics" && break
        sleep 0.1
    done
done
for port in "$a" "$b"; do
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$port/metrics" | grep -q '^wsring_broker_state 1' && break
        sleep 0.1
    done
done

ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
published() { curl -sf "http://127.0.0.1:$a/metrics" | awk '$1 == "wsring_broker_messages_out_total" {print $2}'; }
hz=$(getconf CLK_TCK)
load=("$bin/wsring-load" --scenario fanout --connections "$subscribers" --duration "$duration")

for round in $(seq 1 "$rounds"); do
    echo "# round $round: one node, $subscribers subscribers"
    "${load[@]}" --target "127.0.0.1:$c" --server-pid "$cpid"
    echo "# round $round: two nodes through $broker, $subscribers subscribers over both, publisher on A"
    t0=$(ticks "$bpid"); p0=$(published)
    "${load[@]}" --target "127.0.0.1:$a" --also-target "127.0.0.1:$b" --server-pid "$apid"
    t1=$(ticks "$bpid"); p1=$(published)
    python3 -c "
t, p = ($t1 - $t0) / $hz, $p1 - $p0
print('{\"broker\":\"$broker\",\"published\":%d,\"broker_cpu_s\":%.3f,\"broker_cpu_s_per_100k\":%s}' % (p, t, ('%.4f' % (t / p * 1e5)) if p else 'null'))"
done
