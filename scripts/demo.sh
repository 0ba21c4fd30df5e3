#!/usr/bin/env bash
# The runfleet demo: installs nats-server if missing, builds runfleet, starts
# `runfleet dev` (a child nats-server, a coordinator on SQLite, 2 workers with
# 2 slots each), submits runs of mixed priority, shows one streaming and all
# finishing in priority order, then runs an approval round trip (a run that
# waits for a person without holding a slot, approved with `runfleet
# approve`), then stops the fleet.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

NATS_DIR="$(scripts/install-deps.sh)"
export PATH="$NATS_DIR:$PATH"
echo "==> building runfleet"
cargo build --release --locked --quiet
RF="$ROOT/target/release/runfleet"

DATA="$(mktemp -d)"
PORT="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
export RUNFLEET_NATS_URL="nats://127.0.0.1:$PORT"
echo "==> starting: runfleet dev --data-dir $DATA --nats-port $PORT --workers 2 --slots 2"
"$RF" dev --data-dir "$DATA" --nats-port "$PORT" --workers 2 --slots 2 >"$DATA/dev.log" 2>&1 &
DEV=$!
stop() { kill -INT "$DEV" 2>/dev/null || true; wait "$DEV" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 100); do
  if [ "$("$RF" workers --json 2>/dev/null | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))' 2>/dev/null)" = 2 ]; then break; fi
  sleep 0.2
done
echo "==> runfleet workers"
"$RF" workers

echo "==> filling all 4 slots, then queueing 4 low-priority (band 4) runs and 2 urgent (band 0) runs"
first=""
for i in 1 2 3 4; do
  id="$("$RF" submit --agent sleep --input '{"steps": 4, "ms": 400}' --priority 3)"
  first="${first:-$id}"
done
low=()
for i in 1 2 3 4; do low+=("$("$RF" submit --agent echo --input "{\"job\": \"low-$i\"}" --priority 4)"); done
high=()
for i in 1 2; do high+=("$("$RF" submit --agent echo --input "{\"job\": \"urgent-$i\"}" --priority 0)"); done
"$RF" submit --agent fail --input '{"message": "the model refused"}' --priority 4 >/dev/null

echo "==> runfleet watch $first   (events stream live as the run progresses)"
"$RF" watch "$first"

echo "==> waiting for everything to finish"
for id in "${low[@]}" "${high[@]}"; do
  for _ in $(seq 1 100); do
    state="$("$RF" get "$id" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')"
    [ "$state" = completed ] && break
    sleep 0.1
  done
done
sleep 0.5
echo "==> runfleet list   (newest first; the urgent band-0 runs started before the band-4 ones queued earlier)"
"$RF" list --limit 20
echo "==> start order of the queued echo runs (band: run):"
for id in "${low[@]}" "${high[@]}"; do
  "$RF" watch "$id" --json | python3 -c '
import json, sys
events = [json.loads(l) for l in sys.stdin]
created = next(e for e in events if e["type"] == "run.created")
started = next(e for e in events if e["type"] == "run.started")
print(started["ts_ms"], "band", created["data"]["priority"], created["data"]["input"]["job"])'
done | sort -n | awk '{print "  " $2 " " $3 "  " $4}'
echo "==> a run that waits and fails: runfleet submit --agent fail --wait"
"$RF" submit --agent fail --input '{"message": "tool call rejected"}' --wait || echo "(exit status $? — failed runs exit non-zero)"

state_of() { "$RF" get "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])'; }
# Polls (at most ~20 s) until run $1 is in state $2.
wait_state() {
  for _ in $(seq 1 200); do
    [ "$(state_of "$1")" = "$2" ] && return 0
    sleep 0.1
  done
  echo "run $1 did not reach state $2 (it is $(state_of "$1"))" >&2
  return 1
}
echo "==> an approval round trip: runfleet submit --agent approval --input '{\"action\": \"deploy\"}'"
approval="$("$RF" submit --agent approval --input '{"action": "deploy"}')"
echo "$approval"
wait_state "$approval" waiting
echo "==> runfleet get $approval   (waiting for a person: no lease, no job, no worker slot)"
"$RF" get "$approval"
# `approve` finds the key of the run's approval request in the registry,
# which may lag the run by a moment: wait until it lists the run as waiting.
for _ in $(seq 1 100); do
  "$RF" list --state waiting --agent approval --json | grep -q "$approval" && break
  sleep 0.1
done
echo "==> runfleet approve $approval"
"$RF" approve "$approval"
wait_state "$approval" completed
echo "==> runfleet watch $approval   (the whole round trip: request, wait, resume on any worker, completion)"
"$RF" watch "$approval"
echo "==> runfleet get $approval"
"$RF" get "$approval"
echo "==> done; stopping runfleet dev"
