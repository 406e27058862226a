#!/usr/bin/env bash
# Soak: every hostile-peer attack at once (scripts/attackers.py: ping, echo and pong
# floods, announced-huge frames, slowloris, peers that never read and then close, hanging
# handshakes, unread request bodies, HEAD) beside well-behaved traffic that checks every
# message (wsring-load echo and fan-out), against one `wsring serve --threads 1`, for a
# bounded time; then stops by itself.
#
# Passes when: the well-behaved clients lost, reordered or corrupted nothing and were
# never closed by the server; the server's RSS stayed under --rss-limit-mib the whole
# time (sampled every second); and afterwards nothing is left behind: no connection, no
# socket (`/metrics`), and the server's descriptor count is back to where it started.
# The RSS bound (128 MiB) is what the design allows here: the 64 MiB reassembly budget
# set below, plus ~40 attacking connections' queues at their 1 MiB hard limit, plus the
# buffer ring and the well-behaved clients' state; 15-19 MiB is what it measured.
#
#   scripts/soak.sh [--duration 600] [--backend io-uring|epoll] [--rss-limit-mib 128]
set -euo pipefail
cd "$(dirname "$0")/.."
duration=600
backend=io-uring
rss_limit_mib=128
while [ $# -gt 0 ]; do
    case "$1" in
        --duration) duration=$2; shift 2 ;;
        --backend) backend=$2; shift 2 ;;
        --rss-limit-mib) rss_limit_mib=$2; shift 2 ;;
        *) echo "usage: $0 [--duration SECONDS] [--backend io-uring|epoll] [--rss-limit-mib N]" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/common.sh
. scripts/common.sh
# Short deadlines so that the attacks' connections cycle many times within the run.
start_server "$backend" --message-timeout 10s --send-timeout 5s --close-timeout 2s \
    --reassembly-budget 64MiB
pid=$SERVER_PID
addr=$SERVER_ADDR
work=$(mktemp -d)
pids=()
# shellcheck disable=SC2064  # expand now: stop exactly the processes started here
trap 'for p in "${pids[@]}" '"$pid"'; do kill "$p" 2>/dev/null || true; done; rm -rf "'"$work"'" "'"$SERVER_LOG"'"' EXIT

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status"; }
fds() { find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l; }
metric() {
    python3 - "$addr" "$1" <<'PY'
import sys, urllib.request
addr, name = sys.argv[1], sys.argv[2]
text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=5).read().decode()
for line in text.splitlines():
    if line.startswith(name + " "):
        print(line.split()[1])
PY
}

fds_before=$(fds)
rss_before=$(rss_kib)
echo "soak ($backend): $duration s against $addr (pid $pid), RSS ${rss_before} KiB, $fds_before descriptors"

python3 scripts/attackers.py "$addr" "$duration" >"$work/attackers.json" 2>"$work/attackers.err" &
pids+=($!)
load=target/release/wsring-load
timeout $((duration + 60)) taskset -c 1 "$load" --target "$addr" --mode echo --connections 50 \
    --window 4 --size 64 --duration "$duration" >"$work/echo.json" 2>"$work/echo.err" &
pids+=($!)
timeout $((duration + 60)) taskset -c 1 "$load" --target "$addr" --mode fanout --connections 200 \
    --window 8 --size 64 --topic soak --duration "$duration" >"$work/fanout.json" 2>"$work/fanout.err" &
pids+=($!)

rss_max=$rss_before
end=$((SECONDS + duration + 90))
while [ "$SECONDS" -lt "$end" ]; do
    kill -0 "$pid" 2>/dev/null || { echo "soak: the server died" >&2; cat "$SERVER_LOG" >&2; exit 1; }
    r=$(rss_kib)
    [ "$r" -gt "$rss_max" ] && rss_max=$r
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" -eq 0 ] && break
    sleep 1
done
for p in "${pids[@]}"; do wait "$p" || true; done
pids=()

# Nothing left behind: every attacker's connection closed (its deadlines at most: 10 s
# message, 2 s close, 5 s send), the one socket open being the /metrics request itself.
left_conns="" left_sockets=""
for _ in $(seq 1 60); do
    left_conns=$(metric wsring_connections_open)
    left_sockets=$(metric wsring_sockets_open)
    [ "$left_conns" = 0 ] && [ "$left_sockets" = 1 ] && [ "$(fds)" -le "$fds_before" ] && break
    sleep 0.5
done
fds_after=$(fds)
rss_after=$(rss_kib)

python3 - "$work" "$rss_max" "$rss_limit_mib" "$left_conns" "$left_sockets" \
    "$fds_before" "$fds_after" "$rss_before" "$rss_after" "$backend" <<'PY'
import json, sys
work, rss_max, limit_mib, conns, sockets, fds_before, fds_after, rss_before, rss_after, backend = sys.argv[1:]
failures = []
def load(name):
    try:
        return json.loads(open(f"{work}/{name}.json").read().strip().splitlines()[-1])
    except Exception as e:
        failures.append(f"{name}: no result ({e}): " + open(f"{work}/{name}.err").read()[-500:])
        return None
attacks = load("attackers") or {}
for name in ("echo", "fanout"):
    r = load(name)
    if r is None:
        continue
    bad = {k: r[k] for k in ("losses", "gaps", "reordered", "corrupt", "bad_accept", "errors", "closed_by_server") if r.get(k)}
    if bad:
        failures.append(f"{name}: {bad}")
    counted = r.get("messages", r.get("deliveries", 0))
    if not counted:
        failures.append(f"{name}: nothing delivered")
    print(f"soak {name}: {counted} messages checked, {r['rate_per_s']:.0f}/s, p99 {r['p99_us']/1000:.1f} ms, "
          f"{r['upgrades']} upgrades, losses/gaps/reordered/corrupt {r['losses']}/{r['gaps']}/{r['reordered']}/{r['corrupt']}, "
          f"closed by server {r['closed_by_server']}")
print("soak attacks: " + json.dumps(attacks))
limit = int(limit_mib) * 1024
print(f"soak ({backend}) server RSS: {rss_before} KiB at start, max {rss_max} KiB (limit {limit} KiB), {rss_after} KiB after; "
      f"descriptors {fds_before} -> {fds_after}; connections left {conns}, sockets left {sockets} (1 = the /metrics request)")
if int(rss_max) > limit:
    failures.append(f"RSS reached {rss_max} KiB, over the {limit} KiB limit")
if conns != "0" or sockets != "1":
    failures.append(f"left behind: {conns} connections, {sockets} sockets")
if int(fds_after) > int(fds_before):
    failures.append(f"descriptors: {fds_before} before, {fds_after} after")
if attacks.get("post_answers_lost"):
    failures.append(f"{attacks['post_answers_lost']} answers to unread-body POSTs lost")
if attacks.get("head_bad"):
    failures.append(f"{attacks['head_bad']} HEAD answers with a body or a bad status")
if not attacks.get("upgrades"):
    failures.append("the attackers never got in")
if failures:
    sys.exit("soak FAILED: " + "; ".join(failures))
print(f"soak ({backend}): PASS")
PY
