-- The run registry: one row per run, projected from the run's event log, and
-- a copy of every event. Identifiers are the protocol's string forms; JSON
-- values are stored as text so both backends share one query set.
-- run_id uses the "C" collation so that text order is byte order (UUIDv7 time order).
CREATE TABLE runs (
    run_id          TEXT COLLATE "C" NOT NULL PRIMARY KEY,
    tenant          TEXT    NOT NULL,
    agent           TEXT    NOT NULL,
    queue           TEXT    NOT NULL,
    priority        BIGINT  NOT NULL,
    state           TEXT    NOT NULL,
    attempt         BIGINT  NOT NULL,
    max_attempts    BIGINT  NOT NULL,
    input           TEXT    NOT NULL,
    output          TEXT,
    error           TEXT,
    idempotency_key TEXT,
    worker_id       TEXT,
    created_ms      BIGINT  NOT NULL,
    updated_ms      BIGINT  NOT NULL,
    last_seq        BIGINT  NOT NULL
);

-- Lists are per tenant, newest first (run ids are UUIDv7, so they sort by time).
CREATE INDEX runs_tenant_run ON runs (tenant, run_id DESC);
CREATE INDEX runs_tenant_state ON runs (tenant, state, run_id DESC);
CREATE INDEX runs_tenant_queue ON runs (tenant, queue, run_id DESC);
CREATE INDEX runs_tenant_agent ON runs (tenant, agent, run_id DESC);

CREATE TABLE run_events (
    run_id    TEXT COLLATE "C" NOT NULL,
    seq       BIGINT  NOT NULL,
    tenant    TEXT    NOT NULL,
    type      TEXT    NOT NULL,
    ts_ms     BIGINT  NOT NULL,
    attempt   BIGINT  NOT NULL,
    worker_id TEXT,
    body      TEXT    NOT NULL,
    PRIMARY KEY (run_id, seq)
);
