# The two commands of the README. Both work on a fresh machine once .ci/run's
# packages are installed (PostgreSQL server binaries, a Rust toolchain).

PG_BIN ?= $(shell ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
export PG_BIN
export PATH := $(PG_BIN):$(PATH)

.PHONY: run test check bench clean-data

## make run: a private PostgreSQL under ./.data with the demo ConstructTrack
## schema, a demo writer, and the gateway; prints the dashboard URL.
run:
	cargo build --release
	./target/release/ws-gateway demo

## make test: the whole test suite against a private PostgreSQL.
test:
	scripts/test.sh

## make check: formatting and lints, as CI would want them.
check:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

clean-data:
	rm -rf .data
