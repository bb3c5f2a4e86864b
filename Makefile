# Echo: build, run, test, lint, bench, install.
#   make run      demo origin on 127.0.0.1:9000 + echod on 127.0.0.1:8080 (memory store)
#   make test     every test (unit + integration, real sockets)
#   make bench    micro, invalidation and load benchmarks (load: Echo vs nginx vs Varnish)
#   make bench-baseline BASE=<git ref>   the load bench with that ref's echod beside this one
#   make install  PREFIX=/opt/echo (default), DESTDIR honoured

PREFIX ?= /opt/echo
DESTDIR ?=
CARGO ?= cargo
RELEASE := target/release
# The echod that install copies. The tests install their debug build with
# ECHOD=<path> NOBUILD=1 instead of waiting on a release build.
ECHOD ?= $(RELEASE)/echod
NOBUILD ?=

.PHONY: all build run test lint bench bench-baseline install uninstall clean redis-server

all: build

build:
	$(CARGO) build --release --locked

run: build
	@set -e; \
	$(RELEASE)/demo-origin --listen 127.0.0.1:9000 & origin=$$!; \
	trap 'kill $$origin 2>/dev/null || true' EXIT INT TERM; \
	echo ""; \
	echo "Echo on http://127.0.0.1:8080 in front of the demo origin on http://127.0.0.1:9000."; \
	echo "In another terminal:"; \
	echo "  curl -i http://127.0.0.1:8080/data      # X-Cache-Status: MISS (fetched from the origin)"; \
	echo "  curl -i http://127.0.0.1:8080/data      # X-Cache-Status: HIT  (served from the cache, same origin_hits)"; \
	echo "  curl -i -X PUT --data 'new text' http://127.0.0.1:8080/data   # changes it; the cached copy is dropped"; \
	echo "  curl -i http://127.0.0.1:8080/data      # MISS again, with the new text"; \
	echo "  curl -s http://127.0.0.1:8081/health    # admin health"; \
	echo "Ctrl-C stops both."; \
	echo ""; \
	$(RELEASE)/echod --config etc/echo.toml

test: redis-server
	$(CARGO) test --locked

# The Redis tests start their own redis-server processes; install it when missing,
# and stop loudly (never skip the tests) when it cannot be had.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "redis-server not found: installing it with apt-get"; \
		SUDO=; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq redis-server; \
	}
	@command -v redis-server >/dev/null 2>&1 || { \
		echo "error: the tests need redis-server and it could not be installed" >&2; exit 1; }

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

# The load comparison (benches/load/) runs the release echod and demo-origin: they are
# built first. It needs wrk (nginx and varnishd are compared when installed) and
# writes target/bench/load.md and load.svg; ECHO_BENCH_SECONDS sets each wrk run (5 s).
bench: redis-server
	$(CARGO) build --release --locked --bins
	$(CARGO) bench --locked

# The same load comparison with an older Echo beside this one, on the memory store and
# on Redis ("same-run ratio against the previous build"): BASE's release echod is built
# in a temporary git worktree under target/bench-baseline/ (removed once built, also
# when the build fails or is interrupted; a leftover from a killed run goes at the
# next), then the load bench runs with ECHO_BENCH_BASELINE pointing at it. The binary
# (echod-<commit>) and the build cache stay in target/bench-baseline/ for the next run:
# remove it to rebuild. ECHO_BENCH_SECONDS and ECHO_BENCH_SCENARIOS pass through, e.g. a
# quick look at hits only:
#   make bench-baseline BASE=927cdf0 ECHO_BENCH_SCENARIOS=hit ECHO_BENCH_SECONDS=3
# By hand, with any echod: ECHO_BENCH_BASELINE=/path/to/echod cargo bench --bench load
BASE ?= HEAD~1
BASELINE_DIR := $(CURDIR)/target/bench-baseline

bench-baseline: redis-server
	$(CARGO) build --release --locked --bins
	@set -e; \
	rev=$$(git rev-parse --verify --short=12 '$(BASE)^{commit}'); \
	bin='$(BASELINE_DIR)'/echod-$$rev; \
	if [ -x "$$bin" ]; then \
		echo "baseline: $$bin (built before)"; \
	else \
		src='$(BASELINE_DIR)'/src-$$rev; \
		cleanup='git worktree remove --force "$$src" 2>/dev/null || rm -rf "$$src"; git worktree prune'; \
		trap "$$cleanup" EXIT; trap 'exit 130' INT TERM; \
		rm -rf "$$src"; git worktree prune; \
		git worktree add --detach "$$src" $$rev; \
		(cd "$$src" && CARGO_TARGET_DIR='$(BASELINE_DIR)'/target $(CARGO) build --release --locked --bin echod); \
		cp '$(BASELINE_DIR)'/target/release/echod "$$bin.tmp"; \
		mv "$$bin.tmp" "$$bin"; \
		eval "$$cleanup"; trap - EXIT INT TERM; \
		echo "baseline: $$bin (built from $(BASE))"; \
	fi; \
	ECHO_BENCH_BASELINE="$$bin" $(CARGO) bench --locked --bench load

install: $(if $(NOBUILD),,build)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/etc $(DESTDIR)$(PREFIX)/log
	@# Stripped: the release build keeps debug info (38 MB); the installed binary does
	@# not need it (about 7 MB). target/release/echod keeps it for debugging.
	install -s -m 0755 $(ECHOD) $(DESTDIR)$(PREFIX)/bin/echod
	@# The admin token: a random one, made once, readable only by its owner (the
	@# service user when it exists). The installed config reads it with token_file.
	@if [ -e $(DESTDIR)$(PREFIX)/etc/token ]; then \
		echo "keeping existing $(DESTDIR)$(PREFIX)/etc/token"; \
	else \
		umask 077; \
		head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > $(DESTDIR)$(PREFIX)/etc/token; \
		chmod 0600 $(DESTDIR)$(PREFIX)/etc/token; \
		if id echo >/dev/null 2>&1; then chown echo:echo $(DESTDIR)$(PREFIX)/etc/token || true; fi; \
		echo "wrote a new admin token to $(DESTDIR)$(PREFIX)/etc/token"; \
	fi
	@# An operator's config is never overwritten. The demo config's paths follow
	@# PREFIX, and its example token gives way to the token file.
	@if [ -e $(DESTDIR)$(PREFIX)/etc/echo.toml ]; then \
		echo "keeping existing $(DESTDIR)$(PREFIX)/etc/echo.toml"; \
	else \
		sed -e 's|^token = "change-me"|token_file = "$(PREFIX)/etc/token"|' \
			-e 's|/opt/echo|$(PREFIX)|g' etc/echo.toml > $(DESTDIR)$(PREFIX)/etc/echo.toml; \
		chmod 0640 $(DESTDIR)$(PREFIX)/etc/echo.toml; \
	fi
	@# The unit, the service user (systemd-sysusers) and log rotation name their paths
	@# under /opt/echo: they follow PREFIX (DESTDIR is only where the files land, never
	@# part of the paths the service runs with).
	for f in echo.service echo.sysusers.conf echo.logrotate; do \
		sed 's|/opt/echo|$(PREFIX)|g' etc/$$f > $(DESTDIR)$(PREFIX)/etc/$$f; \
		chmod 0644 $(DESTDIR)$(PREFIX)/etc/$$f; \
	done

# Removes exactly what install added; config (etc/echo.toml, etc/token) and logs
# (log/) stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/echod $(DESTDIR)$(PREFIX)/etc/echo.service \
		$(DESTDIR)$(PREFIX)/etc/echo.sysusers.conf $(DESTDIR)$(PREFIX)/etc/echo.logrotate
	@# Only when empty: anything an operator put there stays.
	rmdir $(DESTDIR)$(PREFIX)/bin 2>/dev/null || true

clean:
	$(CARGO) clean
