-- Serving store schema, version 1. See cloud-aggregator/src/store/mod.rs for the invariants.

-- Revenue roll-up: one row per tenant, minute (unix seconds, floored), channel and currency.
CREATE TABLE IF NOT EXISTS sales_minute (
    tenant   TEXT    NOT NULL,
    minute   INTEGER NOT NULL,
    channel  TEXT    NOT NULL,
    currency TEXT    NOT NULL,
    orders   INTEGER NOT NULL,   -- placed minus cancelled/refunded
    revenue  INTEGER NOT NULL,   -- ten-thousandths of the currency unit
    PRIMARY KEY (tenant, minute, channel, currency)
) WITHOUT ROWID;

-- Event counts per domain and minute.
CREATE TABLE IF NOT EXISTS domain_minute (
    tenant TEXT    NOT NULL,
    minute INTEGER NOT NULL,
    domain TEXT    NOT NULL,
    events INTEGER NOT NULL,
    PRIMARY KEY (tenant, minute, domain)
) WITHOUT ROWID;

-- De-duplication: the highest seq applied per input stream and (agent, source).
CREATE TABLE IF NOT EXISTS dedup (
    stream    TEXT    NOT NULL,  -- "topic/partition", or "embedded"
    agent_id  TEXT    NOT NULL,
    source_id TEXT    NOT NULL,
    last_seq  INTEGER NOT NULL,
    PRIMARY KEY (stream, agent_id, source_id)
) WITHOUT ROWID;

-- Kafka consumer positions, committed with the roll-ups they produced.
CREATE TABLE IF NOT EXISTS offsets (
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
) WITHOUT ROWID;

-- Fleet health: the last heartbeat of each agent.
CREATE TABLE IF NOT EXISTS agents (
    tenant      TEXT NOT NULL,
    agent_id    TEXT NOT NULL,
    received_at TEXT NOT NULL,
    transport   TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    heartbeat   TEXT NOT NULL,   -- JSON
    PRIMARY KEY (tenant, agent_id)
);

CREATE TABLE IF NOT EXISTS counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
