-- Spool schema, version 2: events the gateway refused for good (an event naming another tenant,
-- a schema it cannot read…), moved out of the line with the gateway's reason. Kept until the
-- operator exports and purges them (`edge-agent spool refused export|purge`); never shipped.
CREATE TABLE IF NOT EXISTS refused (
    source_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    body      BLOB    NOT NULL,
    reason    TEXT    NOT NULL,
    at        INTEGER NOT NULL,  -- unix milliseconds
    PRIMARY KEY (source_id, seq)
);

ALTER TABLE sources ADD COLUMN n_refused INTEGER NOT NULL DEFAULT 0;  -- events moved to `refused`

-- A source whose next seq could not be established (a salvage that could not read its events):
-- appending is refused with this reason, so that no seq is ever used twice.
ALTER TABLE sources ADD COLUMN blocked TEXT;
