-- Spool schema, version 1. See edge-agent/src/spool/mod.rs for the invariants.
-- One row per event. The key packs the source's number and the seq, (source_no << 40) | seq, so
-- the table is a single rowid B-tree that each source appends to in order (rows of ~400 bytes
-- are too large for a WITHOUT ROWID table to pay off).
CREATE TABLE IF NOT EXISTS events (
    key        INTEGER PRIMARY KEY,
    body       BLOB    NOT NULL,  -- the event's canonical JSON
    crc        INTEGER NOT NULL,  -- CRC-32 of body: silent corruption is detected on read
    spooled_at INTEGER NOT NULL,  -- unix milliseconds
    source_no  INTEGER GENERATED ALWAYS AS (key >> 40) VIRTUAL,
    seq        INTEGER GENERATED ALWAYS AS (key & 1099511627775) VIRTUAL
);

CREATE TABLE IF NOT EXISTS sources (
    source_id     TEXT PRIMARY KEY NOT NULL,
    source_no     INTEGER NOT NULL UNIQUE,     -- the high bits of its events' keys
    next_seq      INTEGER NOT NULL,            -- the seq the next spooled event of this source gets
    position      TEXT    NOT NULL,            -- the source's read position (JSON), as of next_seq
    n_errors      INTEGER NOT NULL DEFAULT 0,  -- bad records refused
    n_dropped     INTEGER NOT NULL DEFAULT 0,  -- events dropped by when_full = "drop_oldest"
    n_quarantined INTEGER NOT NULL DEFAULT 0   -- events found damaged
);

-- Running totals of `events`, kept in the same transactions, so the byte limit is O(1).
CREATE TABLE IF NOT EXISTS totals (
    id       INTEGER PRIMARY KEY CHECK (id = 1),
    n_events INTEGER NOT NULL,
    n_bytes  INTEGER NOT NULL
);
INSERT OR IGNORE INTO totals (id, n_events, n_bytes) VALUES (1, 0, 0);

-- Damaged events, kept for inspection, never shipped.
CREATE TABLE IF NOT EXISTS quarantine (
    source_id TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    body      BLOB,
    reason    TEXT    NOT NULL,
    at        INTEGER NOT NULL
);
