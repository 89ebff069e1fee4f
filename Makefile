# Tether: `make up` runs the whole stack locally, `make test` runs the whole test suite.
# Both install what they need (the pinned nats-server) into .tools/ first.

CARGO ?= cargo
NPM ?= npm
SDK := sdk/ts

.PHONY: tools up build test test-ts test-browser ops-screenshot sdk sdk-deps lint fmt fuzz clean-tools bench-tools bench chaos

## Install the pinned nats-server into .tools/ and, as root, Debian's chromium for the
## browser test (no-op when present).
tools:
	@scripts/install-tools.sh

## Build the release binary and run the whole stack (Ctrl-C stops everything); the demo
## chat page (base port + 40) needs the SDK built, done here when npm is there.
up: tools build
	@if command -v $(NPM) >/dev/null 2>&1; then $(MAKE) --no-print-directory sdk; \
	else echo "npm not found: the demo chat page needs sdk/ts built (make sdk)"; fi
	./target/release/tether up

build:
	$(CARGO) build --release -p tether

## The whole test suite: doc tests, unit, end-to-end (real nats-server processes), then
## the TypeScript SDK's unit tests and build, then the browser test.
# Doc tests first, so the Rust run ends with the main runner's summary line.
test: tools
	$(CARGO) test --workspace --doc
	$(CARGO) build -p tether
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace --no-fail-fast; \
	else \
		$(CARGO) test --workspace --no-fail-fast; \
	fi
	$(MAKE) --no-print-directory test-ts test-browser

## npm ci of the SDK from its committed lockfile (no browser download).
sdk-deps:
	cd $(SDK) && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(NPM) ci --no-audit --no-fund

## Build the TypeScript SDK into sdk/ts/dist (ES2020 modules, .d.ts, tether.min.js).
sdk: sdk-deps
	cd $(SDK) && $(NPM) run build

## The SDK's unit tests (vitest, PROTOCOL.md vectors), its build and bundle size.
test-ts: sdk
	cd $(SDK) && $(NPM) test
	cd $(SDK) && $(NPM) run size

## The web chat page and the ops dashboard in Debian's chromium (playwright-core from the
## SDK's dev dependencies) against `tether up`.
test-browser: tools sdk
	$(CARGO) build -p tether
	@if [ ! -x "$${CHROMIUM:-/usr/bin/chromium}" ]; then \
		echo "SKIP test-browser: no chromium at $${CHROMIUM:-/usr/bin/chromium} (make tools as root installs it)"; \
	else \
		(cd $(SDK) && TETHER_BIN=$(CURDIR)/target/debug/tether $(NPM) run test:browser) && \
		TETHER_BIN=$(CURDIR)/target/debug/tether node ops/web/test/dashboard.browser.mjs; \
	fi

## The ops dashboard's browser test, saving the README's screenshot (docs/ops-dashboard.png).
ops-screenshot: tools sdk
	$(CARGO) build -p tether
	TETHER_BIN=$(CURDIR)/target/debug/tether node ops/web/test/dashboard.browser.mjs --screenshot docs/ops-dashboard.png

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
## the nats and mosquitto peers, servers on cpu 1 and the load on cpu 0 (BENCH_PIN= for
## none); writes docs/bench/{results.json,table.md,*.png}.
BENCH_PIN ?= 1/0
bench: bench-tools
	$(CARGO) run --release -p tether -- bench suite --out docs/bench $(if $(BENCH_PIN),--pin $(BENCH_PIN))

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
