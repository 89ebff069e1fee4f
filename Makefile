# Tether: `make up` runs the whole stack locally, `make test` runs the whole test suite.
# Both install what they need (the pinned nats-server) into .tools/ first.

CARGO ?= cargo

.PHONY: tools up build test lint fmt fuzz clean-tools bench-tools bench chaos

## Install the pinned nats-server into .tools/ (no-op when present).
tools:
	@scripts/install-tools.sh

## Build the release binary and run the whole stack (Ctrl-C stops everything).
up: tools build
	./target/release/tether up

build:
	$(CARGO) build --release -p tether

## The whole test suite: doc tests, unit, end-to-end (real nats-server processes).
# Doc tests first, so the run ends with the main runner's summary line.
test: tools
	$(CARGO) test --workspace --doc
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi

## The chaos suite of RELIABILITY.md (~10 min on 2 cores): every role as a `tether` process
## on a 3-node NATS cluster, one fault per scenario under steady QoS1 traffic, a row of
## figures each (lines `CHAOS-ROW`).
chaos: tools
	$(CARGO) build -p tether
	$(CARGO) nextest run -p tether-tests --test chaos --run-ignored ignored-only --no-capture --test-threads 1

## Tools of `make bench`: the pinned nats-server and Mosquitto (apt-get, as root).
bench-tools:
	@scripts/install-tools.sh bench

## The table of BENCHMARKS.md (~10 min on 2 cores): release build, every scenario with
## the nats and mosquitto peers; writes docs/bench/{results.json,table.md,*.png}.
bench: bench-tools
	$(CARGO) run --release -p tether -- bench suite --out docs/bench

## Formatting and lints, as CI expects them.
lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

## Fuzz for 60 s each: the frame decoder (schemas/fuzz) and state's inputs from NATS
## (state/fuzz: event JSON, uplink headers and frames, push headers, business replies).
## Installs cargo-fuzz into .tools/cargo when it is missing (crates.io).
FUZZ_SECS ?= 60
CARGO_FUZZ = $(CURDIR)/.tools/cargo/bin/cargo-fuzz
fuzz:
	@test -x $(CARGO_FUZZ) || $(CARGO) install cargo-fuzz --locked --root $(CURDIR)/.tools/cargo
	cd schemas/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) fuzz run decode_frame -- -max_total_time=$(FUZZ_SECS)
	cd state/fuzz && RUSTC_BOOTSTRAP=1 $(CARGO_FUZZ) fuzz run nats_inputs -- -max_total_time=$(FUZZ_SECS)

clean-tools:
	rm -rf .tools
