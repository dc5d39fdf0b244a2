# outbox: the two commands of the README, and their parts.
#
#   make demo   set up, build, and run the demo extension against the reference server
#   make test   set up, build, and run every test
#
# Every target sets up what is missing first (scripts/setup is idempotent and quick when
# everything is present).

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(CURDIR)/node_modules/.bin:$(HOME)/.cargo/bin:$(PATH)

.PHONY: demo test setup build wasm server server-pg conformance package package-test native wasm-test e2e chaos-short chaos lint types size bench mutants clean

demo: build
	scripts/demo

test: build
	$(MAKE) --no-print-directory lint types native server-pg package-test wasm-test e2e chaos-short size

setup:
	scripts/setup

build: setup wasm server

wasm:
	scripts/build-wasm

server:
	cargo build --release --quiet -p outbox-server

# The core (unit, model and scenario tests) and the server's integration tests.
native:
	cargo test --workspace --quiet

# outbox-conformance against the reference server and five broken backends (docs/PROTOCOL.md,
# "Check your backend"). Also part of `native`.
conformance: server
	cargo test --quiet -p outbox-conformance

# The npm package @outbox-rs/extension, packed by `npm pack` into target/*.tgz (nothing is
# published from here).
package: setup wasm
	scripts/package

# The tarball installs into an empty folder and a consumer of its three entry points type-checks.
package-test:
	node --test tests/package/package.test.mjs

# The server's integration suite again, on a throwaway PostgreSQL cluster (the same test bodies).
server-pg:
	PG_CLUSTER_FAST=1 scripts/with-postgres cargo test -p outbox-server --tests --quiet

# The shared wasm test bodies in Chromium and Firefox, in a window, a service worker and a
# dedicated worker, against the real server.
wasm-test:
	scripts/test-wasm

# The built extension in headless Chromium (and a Firefox smoke run).
e2e:
	scripts/e2e

# The chaos suite (tests/chaos/README.md): the checker's unit tests, then a seeded run of about
# 2 minutes (300 ops, 3 browser kills, worker stops, a server kill, an offline period).
chaos-short: build
	node --test tests/chaos/
	scripts/chaos --preset short --seed $${CHAOS_SEED:-1}

# The long chaos run: 10,000 ops, 24 browser kills, 3 server kills (tens of minutes). Settings via
# CHAOS_* (e.g. CHAOS_SEED=7 CHAOS_OPS=20000) or flags: scripts/chaos --help.
chaos: build
	scripts/chaos --preset long $${CHAOS_SEED:+--seed $$CHAOS_SEED}

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --quiet -- -D warnings
	cargo clippy --all-targets --target wasm32-unknown-unknown --quiet -- -D warnings

# Every API typed: the generated declarations and the glue's, over tests/types/example.ts.
types:
	tsc -p tests/types

size:
	scripts/size-check

bench: build
	scripts/bench

# Mutation testing of the core (long: tens of minutes). The model test runs its 16 fixed seeds
# with fewer steps per mutant. Needs cargo-mutants (`cargo install --locked cargo-mutants`).
mutants:
	command -v cargo-mutants >/dev/null || cargo install --locked cargo-mutants
	MODEL_STEPS=3000 MODEL_RANDOM=0 cargo mutants --no-shuffle -j 2 --output target/mutants

clean:
	cargo clean
	rm -rf extension/pkg node_modules
