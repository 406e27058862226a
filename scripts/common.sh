#!/usr/bin/env bash
# Shared by scripts/idle.sh, churn.sh, soak.sh, browser.sh, history-bench.sh and
# deflate-bench.sh (sourced, not run).

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
    SERVER_ADDR=""
    for _ in $(seq 1 100); do
        SERVER_ADDR=$(grep -o 'ws://[0-9.:]*' "$out" | head -n1 | sed 's#ws://##') || true
        [ -n "$SERVER_ADDR" ] && return 0
        sleep 0.1
    done
    echo "server ($backend) did not start:" >&2
    cat "$out" >&2
    exit 1
}
