#!/usr/bin/env bash
# Shared by scripts/idle.sh, churn.sh, soak.sh, browser.sh, history-bench.sh,
# deflate-bench.sh and bench.sh (sourced, not run).

# The Bun binary of the Bun (uWebSockets) peer, benches/peers/bun/.
BUN="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/benches/peers/bun/node_modules/@oven/bun-linux-x64/bin/bun"

# ensure_bun: installs the pinned Bun of benches/peers/bun/package.json with npm, once.
ensure_bun() {
    [ -x "$BUN" ] && return 0
    echo "installing Bun (benches/peers/bun/package.json) with npm" >&2
    # No lock file: it would record download addresses; the version is pinned.
    npm install --prefix "$(dirname "${BASH_SOURCE[0]}")/../benches/peers/bun" \
        --no-package-lock --no-audit --no-fund --silent
}

# start_server BACKEND [FLAG...]: builds the release binaries, starts `wsring serve` on a
# free port pinned to CPU 0 with one worker (and the extra flags), and sets SERVER_PID and
# SERVER_ADDR (HOST:PORT) and SERVER_LOG (its output). The server is stopped by PID when
# the calling script exits.
start_server() {
    local backend=$1 out
    shift
    cargo build --release --quiet --bins
    out=$(mktemp)
    # shellcheck disable=SC2034  # read by the scripts that source this file
    SERVER_LOG=$out
    taskset -c 0 target/release/wsring serve --listen 127.0.0.1:0 --threads 1 \
        --backend "$backend" --log-level warn "$@" >"$out" 2>&1 &
    SERVER_PID=$!
    # shellcheck disable=SC2064  # expand now: the trap must kill this server and file
    trap "kill $SERVER_PID 2>/dev/null || true; rm -f '$out'" EXIT
    wait_for_address "$backend"
}

# start_bun [--deflate]: starts the Bun peer (benches/peers/bun/server.js) like
# start_server: pinned to CPU 0, on a free port, setting SERVER_PID, SERVER_ADDR and
# SERVER_LOG.
start_bun() {
    local out
    ensure_bun
    out=$(mktemp)
    # shellcheck disable=SC2034  # read by the scripts that source this file
    SERVER_LOG=$out
    taskset -c 0 "$BUN" benches/peers/bun/server.js --listen 127.0.0.1:0 "$@" >"$out" 2>&1 &
    SERVER_PID=$!
    # shellcheck disable=SC2064  # expand now: the trap must kill this server and file
    trap "kill $SERVER_PID 2>/dev/null || true; rm -f '$out'" EXIT
    wait_for_address bun
}

# wait_for_address NAME: waits for the "ws://ADDR" line in $SERVER_LOG and sets
# SERVER_ADDR, or exits.
wait_for_address() {
    SERVER_ADDR=""
    for _ in $(seq 1 100); do
        SERVER_ADDR=$(grep -o 'ws://[0-9.:]*' "$SERVER_LOG" | head -n1 | sed 's#ws://##') || true
        [ -n "$SERVER_ADDR" ] && return 0
        sleep 0.1
    done
    echo "server ($1) did not start:" >&2
    cat "$SERVER_LOG" >&2
    exit 1
}
