#!/usr/bin/env bash
# Runs the Autobahn|Testsuite (fuzzing client, all cases) against `wsring serve` on both
# backends and checks: no FAILED, no NON-STRICT, no MISSING case, and every close
# behaviour OK or INFORMATIONAL. The per-backend summary is written to
# tests/autobahn/<backend>.json, which is committed: a regression shows as a diff, and
# this script fails when the fresh summary differs from the committed one (set
# WSRING_AUTOBAHN_UPDATE=1 to accept a new summary).
#
# The suite comes from its Python package: tests/autobahn/suite/install.sh downloads it
# with pip (once, ~30 s, into ~/.cache/autobahn-venv), ports it to Python 3 and installs it
# into a venv; nothing outside this repository is needed but python3 with venv and the
# package index.
#
# Environment:
#   AUTOBAHN_DIR              another copy of the suite's scripts (default: tests/autobahn/suite)
#   WSRING_REQUIRE_AUTOBAHN=1 fail (instead of skipping) when the suite cannot be installed
#   WSRING_AUTOBAHN_BACKENDS  backends to run (default: "io-uring epoll")
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
dir="${AUTOBAHN_DIR:-$root/tests/autobahn/suite}"
skip() {
    if [ "${WSRING_REQUIRE_AUTOBAHN:-0}" = 1 ]; then
        echo "autobahn: $1 and WSRING_REQUIRE_AUTOBAHN=1" >&2
        exit 1
    fi
    echo "autobahn: SKIPPED: $1"
    exit 0
}
[ -x "$dir/run.sh" ] || skip "suite scripts not found at $dir (AUTOBAHN_DIR)"
python3 -c 'import venv, ensurepip' 2>/dev/null || skip "python3 with venv is needed (apt-get install python3-venv)"
"$dir/install.sh" >/dev/null || skip "the suite could not be installed (it needs the Python package index once)"

cargo build --release --quiet --bin wsring
bin="$root/target/release/wsring"
work=$(mktemp -d)
server_pid=""
# shellcheck disable=SC2317  # invoked by the EXIT trap
cleanup() {
    if [ -n "$server_pid" ]; then kill "$server_pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

status=0
for backend in ${WSRING_AUTOBAHN_BACKENDS:-io-uring epoll}; do
    "$bin" serve --listen 127.0.0.1:0 --backend "$backend" --log-level warn >"$work/out" 2>"$work/err" &
    server_pid=$!
    addr=""
    for _ in $(seq 1 100); do
        addr=$(grep -o 'ws://[0-9.:]*' "$work/out" 2>/dev/null | head -n1 | sed 's#ws://##') || true
        [ -n "$addr" ] && break
        sleep 0.1
    done
    if [ -z "$addr" ]; then
        echo "autobahn: server ($backend) did not start:" >&2
        cat "$work/err" >&2
        exit 1
    fi
    echo "autobahn: $backend server on $addr"
    agent="wsring_${backend//-/_}"
    rc=0
    AUTOBAHN_AGENT="$agent" AUTOBAHN_REPORT_DIR="$work/reports" \
        "$dir/run.sh" "$addr" >"$work/run-$backend.log" 2>&1 || rc=$?
    tail -n 20 "$work/run-$backend.log"
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
    server_pid=""
    if [ "$rc" -ne 0 ]; then
        echo "autobahn: run.sh exited $rc on $backend" >&2
        status=1
        continue
    fi
    python3 - "$work/reports/servers/summary-$agent.json" "$work/reports/servers/index.json" \
        "$agent" "tests/autobahn/$backend.json" <<'PY' || status=1
import json, sys, os
summary_path, index_path, agent, out_path = sys.argv[1:5]
summary = json.load(open(summary_path))
index = json.load(open(index_path))[agent]
problems = []
counts = summary["counts"]
for bad in ("FAILED", "NON-STRICT"):
    if counts.get(bad):
        problems.append(f"{counts[bad]} {bad}: {' '.join(summary['cases'].get(bad, []))}")
if summary.get("missing"):
    problems.append(f"MISSING: {' '.join(summary['missing'])}")
close_bad = sorted(
    (c for c, r in index.items() if r.get("behaviorClose") not in ("OK", "INFORMATIONAL", "UNIMPLEMENTED")),
    key=lambda c: [int(x) for x in c.split(".")],
)
if close_bad:
    problems.append("close behaviour not OK: " + " ".join(f"{c}={index[c]['behaviorClose']}" for c in close_bad))
# The committed record: counts and the cases of every non-OK behaviour (no timings).
record = {
    "counts": dict(sorted(counts.items())),
    "closeCounts": dict(sorted(summary.get("closeCounts", {}).items())),
    "not_ok": {k: v for k, v in sorted(summary["cases"].items()) if k not in ("OK", "UNIMPLEMENTED")},
}
text = json.dumps(record, indent=1) + "\n"
old = open(out_path).read() if os.path.exists(out_path) else None
if old != text:
    if os.environ.get("WSRING_AUTOBAHN_UPDATE") == "1" or old is None:
        open(out_path, "w").write(text)
        print(f"autobahn: wrote {out_path}")
    else:
        open(out_path, "w").write(text)
        problems.append(f"summary differs from the committed {out_path} (see git diff; WSRING_AUTOBAHN_UPDATE=1 accepts it)")
for p in problems:
    print("autobahn: " + p, file=sys.stderr)
print(f"autobahn: {agent}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
sys.exit(1 if problems else 0)
PY
done
exit "$status"
