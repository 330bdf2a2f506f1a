#!/usr/bin/env bash
# `make test`: one private PostgreSQL for the whole run (each test creates its
# own database in it), the test suite, and the cluster stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --workspace --bins --tests
dir="${TMPDIR:-/tmp}/ws-gateway-test-pg-$$"
url=$(target/debug/ws-gateway dev-db start --dir "$dir")
cleanup() {
  target/debug/ws-gateway dev-db stop --dir "$dir" || true
  rm -rf "$dir"
}
trap cleanup EXIT
export TEST_DATABASE_URL="$url"

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@"
else
  cargo test --workspace --no-fail-fast "$@"
fi
