-- The recovery loop pages through the runs that are not terminal (in run id
-- order) every few seconds; this partial index keeps that cheap however many
-- finished runs the registry holds. The state list must match the query's
-- literals exactly for the planner to use it.
CREATE INDEX runs_active ON runs (run_id) WHERE state IN ('queued', 'running', 'waiting');
