#!/usr/bin/env bash
# Starts (or reuses) a throwaway PostgreSQL cluster for the test suite under
# .tools/pg, listening on 127.0.0.1:${RUNFLEET_PG_PORT:-55432}, and prints the
# admin URL tests use to create one database per test. PostgreSQL refuses to
# run as root, so the cluster runs as the `postgres` system user when we are root.
#   scripts/postgres.sh start | stop
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DATA="$ROOT/.tools/pg/data"
PORT_FILE="$ROOT/.tools/pg/port"
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
if [ -n "${RUNFLEET_PG_PORT:-}" ]; then
  PORT="$RUNFLEET_PG_PORT"
elif [ -f "$PORT_FILE" ]; then
  PORT="$(cat "$PORT_FILE")"
else
  # Prefer 55432; if something else listens there, take any free port.
  PORT=55432
  port_free "$PORT" || PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
fi
BIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"

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
    if as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
      PORT="$(cat "$PORT_FILE")"   # already running: reuse it
    else
      if ! port_free "$PORT"; then
        PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
      fi
      as_pg "$BIN/pg_ctl" -D "$DATA" -l "$ROOT/.tools/pg/server.log" -w -t 60 \
        -o "-p $PORT -c listen_addresses=127.0.0.1 -k /tmp -c max_connections=300 -c fsync=off" start >/dev/null
    fi
    echo "$PORT" > "$PORT_FILE"
    echo "postgres://runfleet:runfleet@127.0.0.1:$PORT/postgres"
    ;;
  stop)
    as_pg "$BIN/pg_ctl" -D "$DATA" -m fast stop >/dev/null 2>&1 || true
    ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
