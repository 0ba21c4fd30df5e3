#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster for the test suite under
# .tools/pg, listening on 127.0.0.1:${RUNFLEET_PG_PORT:-55432}, and prints the
# admin URL tests use to create one database per test. PostgreSQL refuses to
# run as root, so the cluster runs as the `postgres` system user when we are root.
#   scripts/postgres.sh start | stop
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PORT="${RUNFLEET_PG_PORT:-55432}"
DATA="$ROOT/.tools/pg/data"
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
URL="postgres://runfleet:runfleet@127.0.0.1:$PORT/postgres"

as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "${1:-start}" in
  start)
    mkdir -p "$ROOT/.tools/pg"
    if [ "$(id -u)" = 0 ]; then chown postgres "$ROOT/.tools/pg"; chmod 755 "$ROOT/.tools" "$ROOT/.tools/pg"; fi
    if [ ! -f "$DATA/PG_VERSION" ]; then
      pwfile="$(mktemp)"; echo runfleet > "$pwfile"; chmod 644 "$pwfile"
      as_pg "$BIN/initdb" -D "$DATA" -U runfleet --pwfile="$pwfile" -A scram-sha-256 >/dev/null
      rm -f "$pwfile"
    fi
    if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
      as_pg "$BIN/pg_ctl" -D "$DATA" -l "$ROOT/.tools/pg/server.log" -w -t 60 \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=300 -c fsync=off" start >/dev/null
    fi
    echo "$URL"
    ;;
  stop)
    as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
