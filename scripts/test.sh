#!/usr/bin/env bash
# Runs the whole test suite on a fresh Debian machine with only the Rust
# toolchain: installs nats-server (PyPI) and PostgreSQL (Debian) if missing,
# starts a throwaway PostgreSQL cluster, then runs every test of the workspace
# against real nats-server processes, SQLite and PostgreSQL.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh --test e2e`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NATS_DIR="$(scripts/install-deps.sh --postgres)"
export PATH="$NATS_DIR:$PATH"
export RUNFLEET_NATS_SERVER="$NATS_DIR/nats-server"
RUNFLEET_TEST_POSTGRES_URL="$(scripts/postgres.sh start)"
export RUNFLEET_TEST_POSTGRES_URL
trap 'scripts/postgres.sh stop' EXIT

echo "nats-server: $("$RUNFLEET_NATS_SERVER" --version)"
echo "postgres:    $RUNFLEET_TEST_POSTGRES_URL"
cargo test --workspace --locked "$@"
