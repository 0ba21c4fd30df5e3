-- The retention sweep (coordinator/src/retention.rs) removes what an ended
-- run left in JetStream (checkpoints and their blobs, signals, its cancel
-- request, its real input) once it has been over for
-- coordinator.ended_run_retention, and records when here. NULL: not yet.
ALTER TABLE runs ADD COLUMN purged_ms INTEGER;

-- The sweep's queue: ended runs not yet purged, oldest end first. Rows leave
-- it when purged, so it holds about a retention period's worth of runs. The
-- state list must match the query's literals exactly for the planner to use
-- it.
CREATE INDEX runs_ended_unpurged ON runs (updated_ms)
    WHERE purged_ms IS NULL AND state IN ('completed', 'failed', 'cancelled');
