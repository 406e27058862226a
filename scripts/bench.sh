#!/usr/bin/env bash
# Compares wsring with other WebSocket servers on the scenarios of BENCH_PROTOCOL.md
# (docs/PROTOCOL.md), interleaved in one run, and prints one markdown table
# per scenario. See BENCHMARKS.md for the machine, the latest table and what limits it.
#
#   scripts/bench.sh [--scenarios a,b] [--servers x,y] [--rounds N] [--duration S] [--quick]
#
#   --scenarios  echo,echo-large,fanout,fanout-wide,idle,handshake (default: these six),
#                echo-deflate, fanout-deflate (1 KiB JSON-like messages with
#                permessage-deflate offered: `wsring-load --deflate`; servers without it
#                run them plain, the deflate_agreed column says which)
#   --servers    wsring-io-uring,wsring-epoll,bun,tokio-tungstenite,
#                tokio-tungstenite-broadcast,fastwebsockets,sockudo-ws,minimal (default:
#                all eight; minimal is the floor: framing and batching only, no
#                validation, benches/peers/src/bin/peer-minimal.rs; the Rust peers are
#                built from benches/peers/, Bun
#                (uWebSockets) is installed with npm into benches/peers/bun/), and
#                wsring-io-uring-nohistory, wsring-epoll-nohistory (--history-size 0:
#                what per-topic history, on by default, costs)
#   --rounds N   rounds per scenario (default 3); within a round every server runs once,
#                the starting server rotating from round to round
#   --duration S measurement seconds per run (default: the scenario's own, 5 s; idle 10 s)
#   --quick      smoke run: 1 round, 2 s per run
#   --report F   only print the tables for an earlier results file F (.jsonl)
#
# Each run: the server starts pinned to CPU 0 with one worker thread, the script waits for
# its "ws://ADDR" line, runs wsring-load pinned to CPU 1 (--procs 2 for fanout-wide and
# idle, which need more descriptors than one process may hold, else 1) under a timeout,
# then stops the server by its PID (SIGTERM, SIGKILL after 10 s). The load tool's JSON
# line, with the server, scenario, round, exit status, how busy CPU 1 (the load tool's
# core) and CPU 0 (the server's) were, whoever used them, over the busiest seconds of the
# run (as many as the measurement lasts), and whether the server died on its own, is
# appended to bench-results/<timestamp>.jsonl;
# the server's output and the load tool's stderr of every run go to
# bench-results/<timestamp>-logs/.
# Needs: cargo, taskset, timeout, python3 (and npm for Bun). Run as root to widen the local port range.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

usage() { sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'; }

# Prints the markdown tables for a results file.
report() {
    python3 - "$1" <<'EOF'
import json, statistics, sys
from collections import OrderedDict

rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
scenarios = OrderedDict()
for r in rows:
    scenarios.setdefault(r["scenario"], OrderedDict()).setdefault(r["server"], []).append(r)

def med(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None

def fmt(v, digits=0):
    if v is None:
        return "-"
    return f"{v:,.{digits}f}"

units = {"echo": "msg/s", "echo-large": "msg/s", "fanout": "deliveries/s",
         "fanout-wide": "deliveries/s", "idle": "-", "handshake": "upgrades/s",
         "echo-deflate": "msg/s", "fanout-deflate": "deliveries/s"}
for scenario, servers in scenarios.items():
    ref = servers.get("wsring-io-uring")
    ref_rate = med(ref, "rate_per_s") if ref else None
    ref_cpu = med(ref, "server_cpu_s_per_million") if ref else None
    print(f"\n### {scenario} ({units.get(scenario, '')}, {max(len(v) for v in servers.values())} rounds)\n")
    head = ["server", "rate (median)", "spread (min-max)", "io_uring / this (rate)",
            "server CPU-s per million", "io_uring / this (CPU)", "server core busy %", "p50 ms", "p99 ms", "max ms"]
    if scenario == "idle":
        head = ["server", "connections", "RSS bytes/conn (median)", "spread (min-max)",
                "kernel Slab bytes/conn (median)"]
    if scenario.endswith("-deflate"):
        head += ["deflate agreed (median)", "compressed received (median)"]
    head += ["losses+gaps+corrupt", "errors", "closed by server", "CPU 1 (load) busy %", "CPU 0 (server) busy %", "runs not ok"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for server, runs in servers.items():
        # The medians are over the runs that measured something: the load tool reported,
        # connections upgraded and the server lived. A run whose data had errors (exit 1)
        # still counts there; its losses show in their own column and in "runs not ok".
        usable = lambda r: (r.get("rate_per_s") is not None and r.get("upgrades")
                            and not r["server_died"])
        ok = [r for r in runs if usable(r)]
        bad = sum(1 for r in runs if not usable(r) or r["rc"] != 0)
        damage = sum(r.get("losses", 0) + r.get("gaps", 0) + r.get("corrupt", 0)
                     + r.get("reordered", 0) + r.get("bad_accept", 0) for r in runs)
        tail = [fmt(damage), fmt(sum(r.get("errors", 0) for r in runs)),
                fmt(sum(r.get("closed_by_server", 0) for r in runs)),
                fmt(med(runs, "load_cpu_pct")), fmt(med(runs, "cpu0_busy_pct")),
                f"{bad}/{len(runs)}"]
        if scenario == "idle":
            rss = [r["rss_bytes_per_conn"] for r in ok if "rss_bytes_per_conn" in r]
            cells = [server, fmt(med(ok, "idle_connections")), fmt(med(ok, "rss_bytes_per_conn")),
                     f"{fmt(min(rss))}-{fmt(max(rss))}" if rss else "-",
                     fmt(med(ok, "slab_bytes_per_conn"))]
        else:
            rates = [r["rate_per_s"] for r in ok]
            rate, cpu = med(ok, "rate_per_s"), med(ok, "server_cpu_s_per_million")
            ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
            us = lambda key: fmt(med(ok, key) / 1000, 2) if ok and med(ok, key) else "-"
            cells = [server, fmt(rate), f"{fmt(min(rates))}-{fmt(max(rates))}" if rates else "-",
                     ratio(ref_rate, rate), fmt(cpu, 2), ratio(ref_cpu, cpu),
                     fmt(cpu * rate / 1e4) if cpu and rate else "-",
                     us("p50_us"), us("p99_us"), us("max_us")]
        if scenario.endswith("-deflate"):
            cells += [fmt(med(ok, "deflate_agreed")), fmt(med(ok, "compressed_received"))]
        print("| " + " | ".join(cells + tail) + " |")
EOF
}

scenarios="echo,echo-large,fanout,fanout-wide,idle,handshake"
servers="wsring-io-uring,wsring-epoll,bun,tokio-tungstenite,tokio-tungstenite-broadcast,fastwebsockets,sockudo-ws,minimal"
rounds=3
duration=""
while [ $# -gt 0 ]; do
    case "$1" in
        --scenarios) scenarios="$2"; shift 2 ;;
        --servers) servers="$2"; shift 2 ;;
        --rounds) rounds="$2"; shift 2 ;;
        --duration) duration="$2"; shift 2 ;;
        --quick) rounds=1; duration=2; shift ;;
        --report) report "$2"; exit 0 ;;
        -h | --help) usage; exit 0 ;;
        *) echo "bench: unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done
IFS=, read -r -a scenario_list <<<"$scenarios"
IFS=, read -r -a server_list <<<"$servers"

for scenario in "${scenario_list[@]}"; do
    case "$scenario" in
        echo | echo-large | fanout | fanout-wide | idle | handshake | echo-deflate | fanout-deflate) ;;
        *) echo "bench: unknown scenario: $scenario" >&2; exit 2 ;;
    esac
done

# Prints the command line that starts server $1 on a free port with one worker thread, for
# scenario $2.
# shellcheck source=scripts/common.sh
. scripts/common.sh
server_command() {
    case "$1" in
        bun)
            # Bun compresses what it is asked to: asked to only in the deflate scenarios.
            local flags=""
            case "${2:-}" in *-deflate) flags=--deflate ;; esac
            echo "$BUN $root/benches/peers/bun/server.js --listen 127.0.0.1:0 $flags" ;;
        wsring-io-uring | wsring-epoll)
            echo "$root/target/release/wsring serve --listen 127.0.0.1:0 --threads 1 --backend ${1#wsring-} --log-level warn" ;;
        wsring-io-uring-nohistory | wsring-epoll-nohistory)
            # The same without per-topic history (on by default): its cost, same run.
            local backend=${1#wsring-}
            echo "$root/target/release/wsring serve --listen 127.0.0.1:0 --threads 1 --backend ${backend%-nohistory} --log-level warn --history-size 0" ;;
        tokio-tungstenite | tokio-tungstenite-broadcast | fastwebsockets | sockudo-ws | minimal)
            echo "$root/benches/peers/target/release/peer-$1 --listen 127.0.0.1:0 --threads 1" ;;
        *) return 1 ;;
    esac
}
for server in "${server_list[@]}"; do
    server_command "$server" >/dev/null || { echo "bench: unknown server: $server" >&2; exit 2; }
done

echo "bench: building release binaries" >&2
cargo build --release --bins --quiet
(cd benches/peers && cargo build --release --quiet)
case ",$servers," in *,bun,*) ensure_bun ;; esac

# Fanout-wide and idle open 10,000-15,000 sockets; the default range (32768-60999) leaves
# little room once TIME_WAIT sockets of earlier runs are counted.
sysctl -w net.ipv4.ip_local_port_range="1024 65535" >/dev/null 2>&1 ||
    echo "bench: could not widen net.ipv4.ip_local_port_range (not root?); continuing" >&2

stamp=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p bench-results
results="$root/bench-results/$stamp.jsonl"
logs="$root/bench-results/$stamp-logs"
work=$(mktemp -d)
server_pid=""
sampler_pid=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    if [ -n "$sampler_pid" ]; then kill "$sampler_pid" 2>/dev/null || true; fi
    if [ -n "$server_pid" ]; then kill -KILL "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# Stops the server by its PID and waits for it; SIGKILL if it is still there after 10 s.
stop_server() {
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$server_pid" 2>/dev/null || true
    server_exit=0
    wait "$server_pid" 2>/dev/null || server_exit=$?
    server_pid=""
}

# Prints "busy total" jiffies of CPU 0 and of CPU 1 from /proc/stat, on one line.
cpu_ticks() {
    awk '$1 == "cpu0" || $1 == "cpu1" { printf "%d %d ", $2 + $3 + $4 + $7 + $8 + $9, $2 + $3 + $4 + $5 + $6 + $7 + $8 + $9 } END { print "" }' /proc/stat
}

# Prints how busy CPU 0 and CPU 1 were, in percent, over the N busiest one-second
# intervals of a cpu_ticks sample file (N = the measurement seconds, so set-up and the
# drain after the measurement count as little as possible): "cpu0 cpu1".
busiest_seconds() { # file N
    python3 - "$1" "$2" <<'EOF'
import sys
rows = [list(map(int, l.split())) for l in open(sys.argv[1]) if len(l.split()) == 4]
n = max(1, int(sys.argv[2] or 1))
out = []
for cpu in (0, 1):
    busy = sorted((100 * (b[2 * cpu] - a[2 * cpu]) / (b[2 * cpu + 1] - a[2 * cpu + 1])
                   for a, b in zip(rows, rows[1:]) if b[2 * cpu + 1] > a[2 * cpu + 1]),
                  reverse=True)[:n]
    out.append(f"{sum(busy) / len(busy):.1f}" if busy else "-")
print(*out)
EOF
}

# Appends one result line: the load tool's JSON (or {} when it printed none) plus ours.
record() { # server scenario round rc load_cpu_pct server_died server_cpu_busy_pct
    python3 - "$@" "$work/load.out" >>"$results" <<'EOF'
import json, sys
server, scenario, rnd, rc, cpu, died, cpu0, out = sys.argv[1:9]
line = next((l for l in open(out) if l.startswith("{")), "{}")
try:
    row = json.loads(line)
except ValueError:
    row = {}
row.update(server=server, scenario=scenario, round=int(rnd), rc=int(rc),
           load_cpu_pct=float(cpu) if cpu not in ("", "-") else None,
           server_died=died == "1", cpu0_busy_pct=float(cpu0) if cpu0 not in ("", "-") else None)
print(json.dumps(row))
EOF
}

runs=$((${#scenario_list[@]} * rounds * ${#server_list[@]}))
run=0
for scenario in "${scenario_list[@]}"; do
    procs=1
    case "$scenario" in fanout-wide | idle) procs=2 ;; esac
    # The deflate scenarios are echo and fanout with 1 KiB compressible messages.
    scenario_args=(--scenario "$scenario")
    case "$scenario" in
        echo-deflate) scenario_args=(--scenario echo --size 1024 --deflate) ;;
        fanout-deflate) scenario_args=(--scenario fanout --size 1024 --deflate) ;;
    esac
    measure=${duration:-5}
    [ -z "$duration" ] && [ "$scenario" = idle ] && measure=10
    for ((round = 1; round <= rounds; round++)); do
        for ((k = 0; k < ${#server_list[@]}; k++)); do
            server=${server_list[$(((k + round - 1) % ${#server_list[@]}))]}
            run=$((run + 1))
            read -r -a cmd <<<"$(server_command "$server" "$scenario")"
            taskset -c 0 "${cmd[@]}" >"$work/server.out" 2>"$work/server.err" &
            server_pid=$!
            addr=""
            for _ in $(seq 1 100); do
                addr=$(grep -o 'ws://[0-9.:]*' "$work/server.out" 2>/dev/null | head -n1 | sed 's#ws://##') || true
                [ -n "$addr" ] && break
                sleep 0.1
            done
            rc=0
            cpu=""
            cpu0=""
            died=0
            : >"$work/load.out"
            : >"$work/load.err"
            if [ -z "$addr" ]; then
                echo "bench: $server did not start" >&2
                rc=125
            else
                load=("$root/target/release/wsring-load" --target "$addr" "${scenario_args[@]}"
                    --procs "$procs" --server-pid "$server_pid")
                [ -n "$duration" ] && load+=(--duration "$duration")
                # One /proc/stat sample of both CPUs a second while the load runs.
                while :; do cpu_ticks; sleep 1; done >"$work/cpu.samples" &
                sampler_pid=$!
                # Set-up of 15,000 connections and the close at the end take a while too.
                timeout -k 5 $((measure + 120)) taskset -c 1 "${load[@]}" \
                    >"$work/load.out" 2>"$work/load.err" || rc=$?
                kill "$sampler_pid" 2>/dev/null || true
                wait "$sampler_pid" 2>/dev/null || true
                sampler_pid=""
                read -r cpu0 cpu <<<"$(busiest_seconds "$work/cpu.samples" "${measure%.*}")"
                # A server that exited is a zombie until it is waited for: kill -0 still works.
                state=$(awk '{ print $3 }' "/proc/$server_pid/stat" 2>/dev/null) || true
                if [ -z "$state" ] || [ "$state" = Z ]; then died=1; fi
            fi
            stop_server
            if [ "$died" = 1 ]; then
                echo "bench: $server exited on its own during $scenario round $round (status $server_exit)" >&2
            fi
            record "$server" "$scenario" "$round" "$rc" "$cpu" "$died" "$cpu0"
            python3 -c 'import json,sys; r=json.loads(open(sys.argv[1]).readlines()[-1])
print("bench: [%s/%s] %-11s round %d %-17s rc=%d rate=%s/s p99=%sus load-cpu=%s%%" % (sys.argv[2], sys.argv[3],
      r["scenario"], r["round"], r["server"], r["rc"], r.get("rate_per_s"), r.get("p99_us"), r["load_cpu_pct"]))' \
                "$results" "$run" "$runs" >&2
            mkdir -p "$logs"
            name="$scenario-$server-$round"
            cp "$work/server.out" "$logs/$name.server.out"
            cp "$work/server.err" "$logs/$name.server.err"
            cp "$work/load.err" "$logs/$name.load.err"
        done
    done
done

echo "bench: raw results in ${results#"$root"/}" >&2
report "$results"
