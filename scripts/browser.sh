#!/usr/bin/env bash
# A real browser as the client: headless Chromium opens tests/browser/subprotocols.html,
# which connects to `wsring serve`'s /echo offering subprotocols (['chat.v2','chat.v1'],
# as a page does), sends a short and a long message and closes. Checks that the
# connection opens with a subprotocol the page offered (browsers fail the connection
# otherwise: close 1006) and with permessage-deflate (which Chromium offers: the long
# echo comes back compressed), that both echoes come back, and that the close is clean
# (1000). Run twice: with the default
# (no --protocols: the client's first offer) and with `--protocols chat.v1`.
# Then tests/browser/resume.html: the documented resuming client (docs/resume-client.js)
# subscribes with recover=1 while the page publishes 300 messages, its socket is dropped
# twice mid-stream, and every publication must arrive exactly once, in order, with each
# resume recovered.
#
#   scripts/browser.sh [--backend io-uring|epoll]
#
# Needs Chromium (Debian: apt-get install chromium); says so and exits 0 when it is not
# installed, unless WSRING_REQUIRE_BROWSER=1 (CI).
set -euo pipefail
cd "$(dirname "$0")/.."
backend=io-uring
while [ $# -gt 0 ]; do
    case "$1" in
        --backend) backend=$2; shift 2 ;;
        *) echo "usage: $0 [--backend io-uring|epoll]" >&2; exit 2 ;;
    esac
done
browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    if [ "${WSRING_REQUIRE_BROWSER:-0}" = 1 ]; then
        echo "browser check: chromium not found (apt-get install chromium)" >&2
        exit 1
    fi
    echo "browser check: SKIPPED (chromium not installed; apt-get install chromium)"
    exit 0
fi
# shellcheck source=scripts/common.sh
. scripts/common.sh

# load_page PAGE MARKER TENTHS LOG: headless Chromium opens tests/browser/PAGE#PORT of the
# server start_server started, until MARKER shows on the console (at most TENTHS tenths of
# a second), with the console in LOG; then Chromium and the server are stopped by PID.
load_page() {
    local page=$1 marker=$2 tenths=$3 log=$4 profile
    profile=$(mktemp -d)
    # The flags keep Chromium off the network (this machine has none) and out of any
    # profile; the page reports on the console, which --enable-logging prints. A page may
    # load scripts beside it (resume.html loads docs/resume-client.js).
    timeout 60 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --allow-file-access-from-files \
        --user-data-dir="$profile" --enable-logging=stderr --v=0 \
        "file://$PWD/tests/browser/$page#${SERVER_ADDR##*:}" >"$log" 2>&1 &
    local chrome=$!
    for _ in $(seq 1 "$tenths"); do
        grep -q "$marker" "$log" && break
        sleep 0.1
    done
    kill "$chrome" 2>/dev/null || true
    wait "$chrome" 2>/dev/null || true
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    rm -rf "$profile" "$SERVER_LOG"
}

# run_page EXPECTED_PROTOCOL [SERVE FLAG...]: one server, one page load.
run_page() {
    local expected=$1 log
    shift
    start_server "$backend" "$@"
    log=$(mktemp)
    load_page subprotocols.html WSRING-CLOSE 300 "$log"
    python3 - "$log" "$expected" "$backend" "$*" <<'PY'
import json, re, sys
log, expected, backend, flags = sys.argv[1:]
seen = {}
for line in open(log, errors="replace"):
    m = re.search(r'WSRING-(\w+) (\{.*?\})"', line)
    if m:
        seen[m.group(1)] = json.loads(m.group(2))
what = f"browser check ({backend}, serve {flags or 'without --protocols'})"
opened = seen.get("OPEN", {}).get("protocol")
extensions = seen.get("OPEN", {}).get("extensions", "")
echo = seen.get("ECHO", {}).get("data")
big = seen.get("BIG", {})
close = seen.get("CLOSE", {})
print(f"{what}: opened with {opened!r}, extensions {extensions!r}, echo {echo!r}, big echo {big}, close {close}")
if opened != expected or echo != "hello from chromium" or not big.get("same") \
        or not extensions.startswith("permessage-deflate") \
        or close.get("code") != 1000 or not close.get("clean"):
    sys.exit(f"{what}: FAILED (expected protocol {expected!r}, permessage-deflate, both echoes, a clean 1000); log: " + open(log, errors="replace").read()[-2000:])
PY
    rm -f "$log"
}

# run_resume_page: the resuming client against a server with history (the default).
run_resume_page() {
    local log
    start_server "$backend"
    log=$(mktemp)
    load_page resume.html WSRING-RESULT 400 "$log"
    python3 - "$log" "$backend" <<'PY'
import json, re, sys
log, backend = sys.argv[1:]
result = None
for line in open(log, errors="replace"):
    m = re.search(r'WSRING-RESULT (\{.*?\})"', line)
    if m:
        result = json.loads(m.group(1))
        break
what = f"browser resume check ({backend})"
print(f"{what}: {result}")
ok = result and result.get("received") == 300 and result.get("inOrder") \
    and result.get("subscriptions", 0) >= 3 and result.get("resumedRecovered")
if not ok:
    sys.exit(f"{what}: FAILED (300 publications once and in order over 2 resumes, each recovered); log: "
             + open(log, errors="replace").read()[-2000:])
PY
    rm -f "$log"
}

run_page chat.v2
run_page chat.v1 --protocols chat.v1
run_resume_page
echo "browser check ($backend): PASS"
