-- Spool schema, version 1. See edge-agent/src/spool/mod.rs for the invariants.
CREATE TABLE IF NOT EXISTS events (
    source_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    body      BLOB    NOT NULL,  -- the event's canonical JSON
    PRIMARY KEY (source_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS sources (
    source_id TEXT PRIMARY KEY NOT NULL,
    next_seq  INTEGER NOT NULL,  -- the seq the next spooled event of this source gets
    position  TEXT    NOT NULL,  -- the source's read position (JSON), as of next_seq
    n_errors  INTEGER NOT NULL DEFAULT 0
);
