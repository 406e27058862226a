#!/usr/bin/env bash
# Memory per idle connection, from a cold start: starts `wsring serve` (one worker, pinned
# to CPU 0; extra flags after --), opens N upgraded connections to /pubsub/idle with
# wsring-load (pinned to CPU 1, spread over 2 processes), a first fill of N/3 and then the
# rest, holds them, and reports the server's RSS base, its growth per connection over the
# base (and how much of that growth is anonymous memory, how much the file-backed code
# pages the connection path first runs: a fixed cost), the slope between the two fills,
# and the kernel's Slab growth per connection (the
# Slab figure includes the client sockets, which live on this machine too). Fails when the
# server's RSS grows by more than the limit per connection.
#
#   scripts/idle.sh [--connections 15000] [--backend io-uring|epoll] [--limit 1024]
#                   [--deflate] [-- FLAGS]
#
# --deflate: the clients offer permessage-deflate (wsring-load --deflate), so every
# connection negotiates it: what an idle deflate connection costs.
set -euo pipefail
cd "$(dirname "$0")/.."
connections=15000
backend=io-uring
limit=1024
load_flags=()
while [ $# -gt 0 ]; do
    case "$1" in
        --connections) connections=$2; shift 2 ;;
        --backend) backend=$2; shift 2 ;;
        --limit) limit=$2; shift 2 ;;
        --deflate) load_flags+=(--deflate); shift ;;
        --) shift; break ;;
        *) echo "usage: $0 [--connections N] [--backend io-uring|epoll] [--limit BYTES] [--deflate] [-- FLAGS]" >&2; exit 2 ;;
    esac
done
# shellcheck source=scripts/common.sh
. scripts/common.sh
start_server "$backend" "$@"
pid=$SERVER_PID
addr=$SERVER_ADDR
result=$(timeout 300 taskset -c 1 target/release/wsring-load --target "$addr" --scenario idle --topic idle \
    --connections "$connections" --procs 2 --server-pid "$pid" "${load_flags[@]}" 2>/dev/null)
echo "$result"
python3 - "$result" "$limit" "$backend" <<'PY'
import json, sys
r = json.loads(sys.argv[1]); limit = float(sys.argv[2])
per = r["rss_bytes_per_conn"]
print(f"idle ({sys.argv[3]}, cold): {r['idle_connections']} connections, server RSS base "
      f"{r['rss_kb_base']} KiB, {per:.0f} B/connection over it, slope between "
      f"{r.get('first_fill_connections', '-')} and {r['idle_connections']} connections "
      f"{r.get('rss_slope_bytes_per_conn', float('nan')):.0f} B/connection; of the growth, "
      f"{r.get('rss_anon_bytes_per_conn', float('nan')):.0f} B/connection anonymous and "
      f"{r.get('rss_file_kb_growth', 0)} KiB file-backed in all (code pages first run), "
      f"kernel Slab {r['slab_bytes_per_conn']:.0f} B/connection (both ends), "
      f"permessage-deflate agreed on {r['deflate_agreed']}")
if r["idle_connections"] < r["connections"]:
    sys.exit(f"idle: only {r['idle_connections']} of {r['connections']} connections opened")
if per > limit:
    sys.exit(f"idle: {per:.0f} B per connection exceeds the {limit:.0f} B limit")
PY
