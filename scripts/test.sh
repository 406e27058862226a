#!/usr/bin/env bash
# The whole test suite: format, lints, unit + integration tests, benches build, and the
# Autobahn|Testsuite conformance run when the suite is available.
#
#   scripts/test.sh
#
# Environment:
#   AUTOBAHN_DIR              where ../shared/autobahn lives (default: ../shared/autobahn)
#   WSRING_REQUIRE_AUTOBAHN=1 fail instead of skipping when the suite is not found (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test"
cargo test --all-targets

step "cargo bench --no-run"
cargo bench --no-run

if [ -x scripts/autobahn.sh ]; then
    step "Autobahn|Testsuite"
    scripts/autobahn.sh
fi
