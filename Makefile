# flyproxy: `make run` and `make test` work on a fresh Debian 12 machine as root, given a Rust
# toolchain (rust-version in Cargo.toml, or newer; `make` says so first if there is none). Each
# installs what else it needs with apt first (only what is missing); `make test` installs
# cargo-nextest from crates.io if it is missing.

CARGO        ?= cargo
RELEASE      := target/release/flyproxy
ECHO         := target/release/examples/echo
# Build: clang compiles the eBPF program, libelf/zlib/pkg-config build the vendored libbpf.
BUILD_DEPS   := clang libelf-dev zlib1g-dev pkg-config linux-libc-dev
# Run and test: nc for the quick-start example, ip/bpftool for the bpf tests' namespaces.
RUN_DEPS     := netcat-openbsd iproute2 bpftool
# Tests only: a real etcd for the fleet tests (tests/fleet.rs start their own members on free
# loopback ports; without etcd they fail in CI). Debian's etcd-server also enables an etcd.service
# of its own on 127.0.0.1:2379 where systemd runs; the tests leave it alone.
# openssl and curl for the TLS server-name tests (tests/shared_ports.rs).
# `make deb`: dpkg-buildpackage (dpkg-dev) with debhelper, then lintian on what it built.
DEB_DEPS     := dpkg-dev debhelper lintian
# The package tests (tests/packaging.rs) build the package (DEB_DEPS) and check it with lintian,
# systemd-analyze (systemd), man (man-db) and readelf (binutils).
TEST_DEPS    := etcd-server etcd-client openssl curl $(DEB_DEPS) systemd man-db binutils chromium prometheus
# The backends `make run` starts, matching the targets in the shipped config.json.
ECHO_ADDRS   := 127.0.0.1:15001 127.0.0.1:15002 127.0.0.1:16001 127.0.0.1:16002 127.0.0.1:17001 [::1]:17002

.PHONY: all toolchain deps test-deps build run test test-repeat lint nextest clean bench deb scale scale-fleet

all: build

# The oldest Rust that builds flyproxy: Cargo.toml's rust-version.
RUST_MIN     := $(shell sed -n 's/^rust-version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
RUSTC        ?= rustc

# Before anything else: a Rust toolchain, new enough. Debian 12's own rustc (1.63) is too old.
toolchain:
	@cargo_v=$$($(CARGO) --version 2>/dev/null | sed -n 's/^cargo \([0-9][0-9.]*\).*/\1/p'); \
	rustc_v=$$($(RUSTC) --version 2>/dev/null | sed -n 's/^rustc \([0-9][0-9.]*\).*/\1/p'); \
	if [ -z "$$cargo_v" ] || [ -z "$$rustc_v" ] || \
	   ! printf '%s\n%s\n' "$(RUST_MIN)" "$$rustc_v" | sort -V -C; then \
	  echo "flyproxy needs a Rust toolchain, $(RUST_MIN) or newer (rust-version in Cargo.toml);" >&2; \
	  echo "found: rustc $${rustc_v:-none}, cargo $${cargo_v:-none} ($(CARGO) and $(RUSTC) in PATH)." >&2; \
	  echo "Get one with rustup (https://rustup.rs), as the user who builds:" >&2; \
	  echo "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal" >&2; \
	  echo "  . \"\$$HOME/.cargo/env\"" >&2; \
	  echo "or Debian's rustc and cargo packages where they are new enough: see" >&2; \
	  echo "'apt-cache policy rustc cargo' (Debian 12 has 1.63: too old)." >&2; \
	  exit 1; \
	fi

# Install only what is missing, so a prepared machine does not touch apt at all.
deps: toolchain
	@$(MAKE) --no-print-directory install-missing PKGS="$(BUILD_DEPS) $(RUN_DEPS)"

test-deps: deps
	@$(MAKE) --no-print-directory install-missing PKGS="$(TEST_DEPS)"

.PHONY: install-missing
install-missing:
	@missing=""; for p in $(PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

build: deps
	$(CARGO) build --release --bin flyproxy --example echo

# Local echo backends plus the proxy on ./config.json; Ctrl-C stops both. Then, elsewhere:
#   echo hello | nc -N localhost 6300
# MODE=bpf runs the single-listener mode instead (needs root).
MODE ?= simple
run: build
	@$(ECHO) $(ECHO_ADDRS) & echo_pid=$$!; \
	trap 'kill $$echo_pid 2>/dev/null' EXIT INT TERM; \
	if [ "$(MODE)" = bpf ]; then $(RELEASE) bpf -p 8000 -c config.json; \
	else $(RELEASE) simple -c config.json; fi

lint: deps
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

# cargo-nextest runs the tests, each in a process of its own (see .config/nextest.toml). If it is
# missing it is installed from crates.io (a few minutes of compiling); if that fails, the same
# tests run with `cargo test` instead.
nextest: toolchain
	@if ! $(CARGO) nextest --version >/dev/null 2>&1; then \
	  echo "cargo-nextest is missing: installing it from crates.io (cargo install --locked cargo-nextest)"; \
	  $(CARGO) install --locked cargo-nextest || \
	    echo "flyproxy: cargo-nextest could not be installed; the tests run with cargo test instead" >&2; \
	fi

test: toolchain test-deps lint nextest
	$(CARGO) build --bins --examples
	@# The package tests (tests/packaging.rs) run in CI or with FLYPROXY_PACKAGING_TESTS=1; build
	@# the package first, so its release build does not compete with the other tests for the CPU.
	@if [ -n "$$CI" ] && [ "$$CI" != 0 ] && [ "$$CI" != false ] || [ "$$FLYPROXY_PACKAGING_TESTS" = 1 ]; then \
	  $(MAKE) --no-print-directory deb; fi
	@# The fuzz crate's checks on their seed corpora (fuzz/tests/seeds.rs, under a second) run
	@# first: its independent validators follow every config key, so a change that forgets them
	@# fails here. The main tests run even when they failed, and their summary is the run's last
	@# line; `make test` fails if either part did.
	@echo "$(CARGO) test --manifest-path fuzz/Cargo.toml --test seeds"; \
	$(CARGO) test --manifest-path fuzz/Cargo.toml --test seeds; fuzz=$$?; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
	  echo "$(CARGO) nextest run --no-fail-fast"; $(CARGO) nextest run --no-fail-fast; \
	else \
	  echo "$(CARGO) test --no-fail-fast"; $(CARGO) test --no-fail-fast; \
	fi; main=$$?; \
	[ $$fuzz -eq 0 ] || echo "flyproxy: the fuzz crate's seed checks failed (above)" >&2; \
	[ $$main -eq 0 ] && [ $$fuzz -eq 0 ]

# The whole suite RUNS times in a row, at twice as many test threads as cores (the load a flaky
# test shows itself under), stopping at the first failing run; each run's log in
# target/test-repeat/. Add `BUSY=1` to keep every core busy as well (a `yes` loop per core).
#   make test-repeat RUNS=20
RUNS ?= 20
test-repeat: test-deps nextest
	$(CARGO) build --bins --examples
	@mkdir -p target/test-repeat; threads=$$(( 2 * $$(nproc) )); busy=; \
	if [ "$(BUSY)" = 1 ]; then for i in $$(seq $$(nproc)); do yes >/dev/null & busy="$$busy $$!"; done; fi; \
	trap '[ -z "$$busy" ] || kill $$busy' EXIT; \
	for i in $$(seq $(RUNS)); do \
	  log=target/test-repeat/run$$i.log; \
	  if $(CARGO) nextest run --no-fail-fast --test-threads $$threads >$$log 2>&1; then \
	    echo "run $$i of $(RUNS): $$(grep -E '^ +Summary' $$log | sed 's/^ *//')"; \
	  else \
	    grep -E '^ +(FAIL|TIMEOUT|Summary)' $$log | sort -u; \
	    echo "flyproxy: run $$i of $(RUNS) failed; its log: $$log" >&2; exit 1; \
	  fi; \
	done

# The benchmark against HAProxy, nginx stream and a direct connection, on loopback in a network
# namespace of its own (root; installs what it needs). Writes bench/results.md and .svg.
#   make bench              # ROUNDS=3 DURATION=5: about 10 minutes, 15 at most (BUDGET)
#   make bench QUICK=1      # smoke test: one round of 2 s runs, to bench/quick-results.*
# More settings (ROUNDS, DURATION, CONFIGS, REV, ...): bench/README.md.
bench:
	bench/run.sh

# Edge scale (issue 20), root, in a network namespace of its own: generated configs of
# SCALE_APPS apps (each its own IPv4 /32 and IPv6 /128 on 1-3 of ports 443/80/8080, two
# targets), as one file and as a directory of per-app files, both modes: start time, RSS per
# app (at start and after SCALE_RELOADS reloads), proxy CPU per one-app change, the longest
# accept stall a 5 ms probe sees during one-app changes and a full rewrite, loop CPU per new
# connection against SCALE_BASE apps, /metrics size and scrape CPU. Writes
# bench/scale-results.json and .md. See bench/README.md.
#   make scale                      # SCALE_APPS=200000
#   make scale SCALE_APPS=20000     # a quick run
# The fleet scenario (real etcd, 3 follower+proxy nodes on loopback, FLEET_APPS keys):
#   make scale-fleet
SCALE_APPS   ?= 200000
scale: deps
	SCALE_APPS=$(SCALE_APPS) bench/scale/run.sh

scale-fleet: deps
	@$(MAKE) --no-print-directory install-missing PKGS="etcd-server etcd-client"
	bench/scale/run.sh --fleet

# The Debian package, target/debian/flyproxy_<version>_<arch>.deb, built from the source package
# in debian/ by `dpkg-buildpackage -us -uc -b` (debhelper; the release build uses rustup's cargo
# from PATH, see debian/rules): /usr/bin/flyproxy, the etcd follower /usr/bin/flyproxy-etcd-sync,
# systemd units for both modes and the follower (none enabled nor started on install),
# /etc/flyproxy/config.json, /etc/default/flyproxy (the proxy units' extra options) and
# /etc/default/flyproxy-etcd-sync (conffiles), both man pages. dpkg-buildpackage writes its
# results beside the source tree (..); they are moved to target/debian/ (the .deb, .changes and
# .buildinfo), where the source package (.dsc and .tar.xz, debian/source/options says what it
# leaves out) is built too, and lintian must find no error nor warning in any of them.
# The package's path is printed last. Install it with `apt install ./target/debian/flyproxy_*.deb`.
VERSION      := $(shell sed -n 's/^version *= *"\([^"]*\)".*/\1/p' Cargo.toml | head -n 1)
DEB_ARCH     := $(shell dpkg --print-architecture 2>/dev/null)
DEB_DIR      := target/debian
DEB          := $(DEB_DIR)/flyproxy_$(VERSION)_$(DEB_ARCH).deb
DEB_OUTPUTS  := flyproxy_$(VERSION)_$(DEB_ARCH).deb flyproxy_$(VERSION)_$(DEB_ARCH).buildinfo \
                flyproxy_$(VERSION)_$(DEB_ARCH).changes
DEB_SOURCE   := flyproxy_$(VERSION).dsc flyproxy_$(VERSION).tar.xz

deb: deps
	@$(MAKE) --no-print-directory install-missing PKGS="$(DEB_DEPS)"
	@# debian/changelog's version is the package's: it must be Cargo.toml's.
	@v=$$(dpkg-parsechangelog -S Version); [ "$$v" = "$(VERSION)" ] || \
	  { echo "debian/changelog is at $$v, Cargo.toml at $(VERSION): add a changelog entry (dch -v $(VERSION))" >&2; exit 1; }
	@mkdir -p $(DEB_DIR) && cd $(DEB_DIR) && rm -f $(DEB_OUTPUTS) $(DEB_SOURCE)
	dpkg-buildpackage -us -uc -b
	@for f in $(DEB_OUTPUTS); do mv -f ../$$f $(DEB_DIR)/ || exit 1; done
	@# The source package too (what sbuild or an archive takes), from the cleaned tree.
	debian/rules clean
	cd $(DEB_DIR) && dpkg-source -b $(CURDIR)
	lintian --fail-on error,warning --info $(DEB_DIR)/flyproxy_$(VERSION)_$(DEB_ARCH).changes \
	  $(DEB_DIR)/flyproxy_$(VERSION).dsc
	@echo $(DEB)

clean:
	$(CARGO) clean

.PHONY: fuzz reliability

# Fuzzing, not part of `make test` (only the targets' checks on their seeds are): the config
# parser (bytes, and structured JSON), app names, the PROXY header writer (parsed back by an
# independent parser), the ClientHello parser (bytes, and structured hellos), the upgrade
# hand-over variables and the command line, eight targets each under libFuzzer for
# FUZZ_SECONDS (default 60). Installs cargo-fuzz if missing. See fuzz/run.sh, fuzz/README.md.
#   make fuzz FUZZ_SECONDS=30 FUZZ_TARGETS="proxy_header names"
fuzz: deps
	CARGO=$(CARGO) fuzz/run.sh

# The long runs (root; about 10 minutes): for simple and bpf mode, each in a network namespace
# of its own, a million connections and 100 GB through the release binary while the config is
# rewritten 1,000 times and targets are killed and reset; then leak checks. Prints a table and
# writes reliability/results.md. Settings (REL_CONNS, REL_GB, REL_MODES, ...): reliability/README.md.
reliability: deps
	$(CARGO) build --release --bin flyproxy
	$(CARGO) build --release --manifest-path reliability/Cargo.toml
	FLYPROXY=$(RELEASE) reliability/target/release/flyproxy-reliability run
