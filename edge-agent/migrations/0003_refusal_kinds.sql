-- Spool schema, version 3: refused events counted by the kind of refusal (`foreign_tenant`,
-- `unknown_schema`, `too_large`…, see `actidash_shared::batch::RefusalKind`), for heartbeats
-- and `edge-agent status`. The counts stay when refused events are purged: they say how many
-- were ever refused.
ALTER TABLE refused ADD COLUMN kind TEXT NOT NULL DEFAULT 'invalid_event';

CREATE TABLE IF NOT EXISTS refused_counts (
    source_id TEXT    NOT NULL,
    kind      TEXT    NOT NULL,
    n         INTEGER NOT NULL,
    PRIMARY KEY (source_id, kind)
);

-- Refusals counted before version 3 had no kind: they are counted as `invalid_event`.
INSERT INTO refused_counts (source_id, kind, n)
    SELECT source_id, 'invalid_event', n_refused FROM sources WHERE n_refused > 0;
