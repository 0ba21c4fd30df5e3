-- Where the projector stands in the events stream, written in the same
-- transaction as the events it projected (coordinator/src/projector.rs).
-- One row per projection, named after the stream it projects (the events
-- stream's name, e.g. RUNFLEET_EVENTS):
--   position        the last stream sequence projected (0: nothing yet);
--                   every batch moves it by compare-and-set, so a stream
--                   sequence is projected once however many projectors run;
--   owner           the projector process that holds the projection, NULL
--                   when released; the others stand by;
--   lease_until_ms  when the owner's lease ends (Unix ms, the owner's clock)
--                   unless renewed; after it, another projector may take over;
--   updated_ms      when the row last changed (Unix ms), for operators.
-- Deleting the row, or setting position to 0, rebuilds the registry from the
-- start of the stream (docs/operations.md).
CREATE TABLE projector_positions (
    name           TEXT    NOT NULL PRIMARY KEY,
    position       INTEGER NOT NULL,
    owner          TEXT,
    lease_until_ms INTEGER NOT NULL,
    updated_ms     INTEGER NOT NULL
);
