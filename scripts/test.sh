#!/usr/bin/env bash
# The whole test suite: format, lints, unit + integration tests, benches build, the
# system checks (churn, idle memory), and the Autobahn|Testsuite conformance run when the
# suite is available.
#
#   scripts/test.sh
#
# Environment:
#   AUTOBAHN_DIR              another copy of the Autobahn scripts (default: tests/autobahn/suite)
#   WSRING_REQUIRE_AUTOBAHN=1 fail instead of skipping when the suite cannot be installed (CI)
#   WSRING_SKIP_SHELLCHECK=1  skip the shellcheck test (when shellcheck is not installed)
#   WSRING_REQUIRE_BROWSER=1  fail instead of skipping when Chromium is not installed (CI)
#   WSRING_REQUIRE_BROKERS=1  fail instead of skipping when redis-server or nats-server is not
#                             installed (CI; the backplane tests start their own)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "the library alone (default-features = false) compiles no CLI dependency"
cargo clippy --lib --no-default-features -- -D warnings
if cargo tree --no-default-features -e normal --prefix none | grep -E '^(clap|tracing-subscriber|mimalloc|tokio|redis|async-nats) '; then
    echo "test: the library without default features depends on the CLI or broker crates above" >&2
    exit 1
fi

step "cargo test"
cargo test --all-targets

step "cargo test --doc (the README's snippets and the API examples)"
cargo test --doc

step "cargo bench --no-run"
cargo bench --no-run

step "system checks: connection churn and memory per idle connection (both backends)"
for backend in io-uring epoll; do
    scripts/churn.sh --backend "$backend" --connections 100000
    scripts/idle.sh --backend "$backend" --connections 15000
done

step "soak: every hostile-peer attack at once beside checked traffic, 60 s per backend"
for backend in io-uring epoll; do
    scripts/soak.sh --backend "$backend" --duration 60
done

step "a real browser: headless Chromium offering subprotocols (echo, close 1000), and the documented client resuming after drops"
scripts/browser.sh --backend io-uring
scripts/browser.sh --backend epoll

if [ -x scripts/autobahn.sh ]; then
    step "Autobahn|Testsuite"
    scripts/autobahn.sh
fi
