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

status=0
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast "$@" || status=$?
else
  cargo test --workspace --no-fail-fast "$@" || status=$?
fi

# The JavaScript client's suite (clients/js): the declarations type-checked,
# unit tests, the client against this gateway binary under faults, and
# headless Chromium (the client, the dashboard, the demo board) importing
# the gateway's own /client.js. Its npm dependencies come from the lockfile
# (`npm ci`, which .ci/run does; done here too when they are missing or older
# than the lockfile, so `make test` works from a clean clone).
if [ ! -f clients/js/node_modules/.package-lock.json ] ||
  [ clients/js/package-lock.json -nt clients/js/node_modules/.package-lock.json ]; then
  (cd clients/js && npm ci --no-audit --no-fund) || {
    echo "clients/js: npm ci failed (Node 20+ and npm, and the npm registry, are needed)" >&2
    exit 1
  }
fi
(
  cd clients/js
  GATEWAY_BIN="$PWD/../../target/debug/ws-gateway" CLIENT_JS_URL='{gateway}/client.js' npm test
) || status=$?
exit "$status"
