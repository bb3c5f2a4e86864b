#!/bin/sh
# Installs Echo: exactly `make install PREFIX=<prefix>` (default /opt/echo), so that the
# install line `./bang.sh --prefix=/opt/echo` works as `make install` does. DESTDIR and
# the Makefile's other variables are taken from the environment as make takes them.
set -eu

usage() {
    cat <<'USAGE'
usage: ./bang.sh [--prefix=DIR]

Builds Echo (release) and installs it under DIR (default /opt/echo): bin/echod,
etc/echo.toml (kept if present), etc/token (a new random admin token, kept if
present), etc/echo.service, etc/echo.sysusers.conf, etc/echo.logrotate, log/.
Exactly `make install PREFIX=DIR`; DESTDIR=... stages it elsewhere.
USAGE
}

prefix=/opt/echo
for arg in "$@"; do
    case "$arg" in
        --prefix=*) prefix="${arg#--prefix=}" ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bang.sh: unknown argument: $arg" >&2; usage >&2; exit 2 ;;
    esac
done
if [ -z "$prefix" ]; then
    echo "bang.sh: --prefix needs a directory" >&2
    exit 2
fi
cd "$(dirname "$0")"
exec make install PREFIX="$prefix"
