# Echo: build, run, test, lint, bench, install.
#   make run      demo origin on 127.0.0.1:9000 + echod on 127.0.0.1:8080 (memory store)
#   make test     every test (unit + integration, real sockets)
#   make bench    micro, invalidation and load benchmarks (load: Echo vs nginx vs Varnish)
#   make install  PREFIX=/opt/echo (default), DESTDIR honoured

PREFIX ?= /opt/echo
DESTDIR ?=
CARGO ?= cargo
RELEASE := target/release
# The echod that install copies. The tests install their debug build with
# ECHOD=<path> NOBUILD=1 instead of waiting on a release build.
ECHOD ?= $(RELEASE)/echod
NOBUILD ?=

.PHONY: all build run test lint bench install uninstall clean redis-server

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

# The load comparison (benches/load.rs) runs the release echod and demo-origin: they are
# built first. It needs wrk (nginx and varnishd are compared when installed) and
# writes target/bench/load.md and load.svg; ECHO_BENCH_SECONDS sets each wrk run (5 s).
bench: redis-server
	$(CARGO) build --release --locked --bins
	$(CARGO) bench --locked

install: $(if $(NOBUILD),,build)
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/etc $(DESTDIR)$(PREFIX)/log
	install -m 0755 $(ECHOD) $(DESTDIR)$(PREFIX)/bin/echod
	@# An operator's config is never overwritten.
	@if [ -e $(DESTDIR)$(PREFIX)/etc/echo.toml ]; then \
		echo "keeping existing $(DESTDIR)$(PREFIX)/etc/echo.toml"; \
	else \
		install -m 0640 etc/echo.toml $(DESTDIR)$(PREFIX)/etc/echo.toml; \
	fi
	@# The unit names its paths under /opt/echo: they follow PREFIX (DESTDIR is only
	@# where the files land, never part of the paths the service runs with).
	sed 's|/opt/echo|$(PREFIX)|g' etc/echo.service > $(DESTDIR)$(PREFIX)/etc/echo.service
	chmod 0644 $(DESTDIR)$(PREFIX)/etc/echo.service

# Removes exactly what install added; config (etc/echo.toml) and logs (log/) stay.
uninstall:
	rm -f $(DESTDIR)$(PREFIX)/bin/echod $(DESTDIR)$(PREFIX)/etc/echo.service
	@# Only when empty: anything an operator put there stays.
	rmdir $(DESTDIR)$(PREFIX)/bin 2>/dev/null || true

clean:
	$(CARGO) clean
