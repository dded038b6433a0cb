//! PostgreSQL change capture by logical replication (`pgoutput`), opt-in.
//!
//! The source reads its slot with `pg_logical_slot_peek_binary_changes` (changes stay in the
//! slot), spools whole transactions with the commit LSN as its position, and only then moves
//! the slot on (`pg_replication_slot_advance`); a transaction at or below the stored LSN is
//! skipped, so a crash between the two repeats nothing. Inserts and updates become events;
//! deletes and truncations are counted and reported.
//!
//! A slot keeps the server's WAL until it is moved on. The source therefore moves it on while
//! idle too (to the WAL position read before each peek: every transaction committing before it
//! was in the peek), reports how much WAL the slot retains, warns past `max_retained_wal_mb`,
//! and at start warns when the server has no `max_slot_wal_keep_size` cap, which is what
//! protects the server's disk while the agent is stopped.
//!
//! The publication and the slot are created only with `create = true` (it needs the
//! REPLICATION attribute, CREATE on the database and ownership of the table); otherwise
//! missing ones are an error naming what to create.

use postgres::Client;
use serde::Deserialize;
use serde_json::Value;
use tracing::{info, warn};

use super::pgoutput::{self, Message, Relations};
use super::postgres::pg_error;
use super::{DbSourceConfig, Dialect, KeyPosition, Row, RowReader};
use crate::secret::Secret;

/// `logical = { ... }` of a PostgreSQL source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogicalConfig {
    /// The replication slot (default `actidash_<source id>`).
    #[serde(default)]
    pub slot: Option<String>,
    /// The publication (default `actidash_<source id>`).
    #[serde(default)]
    pub publication: Option<String>,
    /// Create the publication and slot when missing.
    #[serde(default)]
    pub create: bool,
    /// Warn when the slot retains more WAL than this, in MiB.
    #[serde(default = "default_max_retained_wal_mb")]
    pub max_retained_wal_mb: u64,
}

fn default_max_retained_wal_mb() -> u64 {
    1024
}

fn default_name(source_id: &str) -> String {
    let clean: String =
        source_id.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' }).collect();
    format!("actidash_{clean}")
}

/// Reads a table's changes from a logical replication slot.
pub struct LogicalReader {
    connect: super::postgres::PgConnect,
    describe: String,
    client: Option<Client>,
    table: String,
    slot: String,
    publication: String,
    create: bool,
    max_retained: u64,
    relations: Relations,
    /// After the rows of the last read are committed (stored position >= `.1`), the slot may
    /// move to `.0`.
    advance: Option<(u64, u64)>,
    n_deletes: u64,
    n_truncates: u64,
    retained: Option<u64>,
    last_retention_check: Option<std::time::Instant>,
}

impl std::fmt::Debug for LogicalReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogicalReader").field("database", &self.describe).field("slot", &self.slot).finish()
    }
}

impl LogicalReader {
    pub fn new(cfg: &DbSourceConfig, password: Option<Secret>) -> Result<LogicalReader, String> {
        let logical = cfg.logical.clone().ok_or("not a logical source")?;
        let (connect, describe) = super::postgres::PgConnect::new(cfg, password.as_ref())?;
        let table = cfg.table.clone().ok_or("table: logical replication reads a table")?;
        let slot = logical.slot.unwrap_or_else(|| default_name(&cfg.id));
        Ok(LogicalReader {
            connect,
            describe: format!("{describe} {table} (slot {slot})"),
            client: None,
            table,
            publication: logical.publication.unwrap_or_else(|| default_name(&cfg.id)),
            slot,
            create: logical.create,
            max_retained: logical.max_retained_wal_mb.saturating_mul(1024 * 1024),
            relations: Relations::new(),
            advance: None,
            n_deletes: 0,
            n_truncates: 0,
            retained: None,
            last_retention_check: None,
        })
    }

    /// The slot and publication exist (or are created when allowed).
    fn set_up(&mut self, client: &mut Client) -> Result<(), String> {
        let has_pub = client
            .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&self.publication])
            .map_err(pg_error)?
            .is_some();
        if !has_pub {
            if !self.create {
                return Err(format!(
                    "publication {:?} does not exist: create it (CREATE PUBLICATION ... FOR TABLE {}), or set logical.create = true",
                    self.publication, self.table
                ));
            }
            let table = self.table.split('.').map(|p| Dialect::Postgres.quote(p)).collect::<Vec<_>>().join(".");
            client
                .batch_execute(&format!(
                    "CREATE PUBLICATION {} FOR TABLE {table}",
                    Dialect::Postgres.quote(&self.publication)
                ))
                .map_err(pg_error)?;
            info!(publication = %self.publication, table = %self.table, "publication created");
        }
        let slot = client
            .query_opt(
                "SELECT plugin, wal_status FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
                &[&self.slot],
            )
            .map_err(pg_error)?;
        match slot {
            Some(row) => {
                let plugin: Option<String> = row.get(0);
                let status: Option<String> = row.get(1);
                if plugin.as_deref() != Some("pgoutput") {
                    return Err(format!("slot {:?} uses plugin {plugin:?}, not pgoutput", self.slot));
                }
                if status.as_deref() == Some("lost") {
                    return Err(format!(
                        "slot {:?} lost WAL it needed (max_slot_wal_keep_size was exceeded): changes were lost; drop and recreate the slot, and read the table again",
                        self.slot
                    ));
                }
            }
            None if self.create => {
                client
                    .execute("SELECT pg_create_logical_replication_slot($1, 'pgoutput')", &[&self.slot])
                    .map_err(pg_error)?;
                info!(slot = %self.slot, "replication slot created");
            }
            None => {
                return Err(format!(
                    "replication slot {:?} does not exist: create it (pg_create_logical_replication_slot('{}', 'pgoutput')), or set logical.create = true",
                    self.slot, self.slot
                ));
            }
        }
        let cap: String = client.query_one("SHOW max_slot_wal_keep_size", &[]).map_err(pg_error)?.get(0);
        if cap == "-1" {
            warn!(database = %self.describe, "max_slot_wal_keep_size is unlimited: while this agent is stopped, its slot keeps all WAL and can fill the server's disk; set a cap");
        }
        Ok(())
    }

    /// Moves the slot on to `lsn`, if that is forward.
    fn advance_slot(&mut self, lsn: u64) -> Result<(), String> {
        let client = self.client.as_mut().ok_or("not connected")?;
        let confirmed: Option<String> = client
            .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1", &[&self.slot])
            .map_err(pg_error)?
            .get(0);
        if confirmed.as_deref().and_then(pgoutput::parse_lsn).is_some_and(|c| c >= lsn) {
            return Ok(());
        }
        client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2::text::pg_lsn)",
                &[&self.slot, &pgoutput::format_lsn(lsn)],
            )
            .map_err(pg_error)?;
        Ok(())
    }

    fn check_retention(&mut self) -> Result<(), String> {
        if self.last_retention_check.is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(10)) {
            return Ok(());
        }
        self.last_retention_check = Some(std::time::Instant::now());
        let client = self.client.as_mut().ok_or("not connected")?;
        let row = client
            .query_opt(
                "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, wal_status FROM pg_replication_slots WHERE slot_name = $1",
                &[&self.slot],
            )
            .map_err(pg_error)?
            .ok_or_else(|| format!("replication slot {:?} was dropped", self.slot))?;
        let retained: Option<i64> = row.get(0);
        let status: Option<String> = row.get(1);
        if status.as_deref() == Some("lost") {
            return Err(format!("slot {:?} lost WAL it needed: changes were lost", self.slot));
        }
        let retained = retained.unwrap_or(0).max(0) as u64;
        if retained > self.max_retained {
            warn!(slot = %self.slot, retained_bytes = retained, limit_bytes = self.max_retained, "replication slot retains more WAL than allowed");
        }
        self.retained = Some(retained);
        let slot = self.slot.clone();
        metrics::gauge!(crate::telemetry::SLOT_RETAINED_WAL, "slot" => slot.clone()).set(retained as f64);
        metrics::gauge!(crate::telemetry::SLOT_MAX_RETAINED_WAL, "slot" => slot).set(self.max_retained as f64);
        Ok(())
    }
}

impl RowReader for LogicalReader {
    fn retained_wal(&self) -> Option<(u64, u64)> {
        self.retained.map(|r| (r, self.max_retained))
    }

    fn connect(&mut self) -> Result<(), String> {
        self.client = None;
        let mut client = self.connect.connect()?;
        self.set_up(&mut client)?;
        self.relations.clear();
        self.client = Some(client);
        Ok(())
    }

    fn read(&mut self, after: &KeyPosition, limit: usize) -> Result<Vec<Row>, String> {
        let committed = after.key.first().and_then(Value::as_u64).unwrap_or(0);
        // What the last read returned is in the spool now: the slot may move on.
        if let Some((to, needs)) = self.advance
            && committed >= needs
        {
            self.advance_slot(to)?;
            self.advance = None;
        }
        let client = self.client.as_mut().ok_or("not connected")?;
        let current: String = client.query_one("SELECT pg_current_wal_lsn()::text", &[]).map_err(pg_error)?.get(0);
        let current = pgoutput::parse_lsn(&current).ok_or("unreadable WAL position")?;
        let messages = client
            .query(
                "SELECT data FROM pg_logical_slot_peek_binary_changes($1, $2::text::pg_lsn, $3, 'proto_version', '1', 'publication_names', $4)",
                &[&self.slot, &pgoutput::format_lsn(current), &(limit.min(i32::MAX as usize) as i32), &self.publication],
            )
            .map_err(pg_error)?;
        let n_messages = messages.len();
        let mut rows = Vec::new();
        let (mut txn_lsn, mut last_end) = (0u64, None);
        for message in messages {
            let data: Vec<u8> = message.get(0);
            match pgoutput::decode(&data).map_err(|e| e.to_string())? {
                Message::Begin { final_lsn, .. } => txn_lsn = final_lsn,
                Message::Commit { end_lsn, .. } => last_end = Some(end_lsn),
                Message::Relation(r) => {
                    self.relations.insert(r.oid, r);
                }
                Message::Insert { relation, new } | Message::Update { relation, new } if txn_lsn > committed => {
                    let rel = self.relations.get(&relation).ok_or("a row of a relation not described first")?;
                    let mut record = pgoutput::row_json(rel, &new).map_err(|e| e.to_string())?;
                    record.insert("_table".into(), Value::String(format!("{}.{}", rel.namespace, rel.name)));
                    rows.push(Row { json: Value::Object(record).to_string(), key: vec![Value::from(txn_lsn)] });
                }
                Message::Delete { relation, old } if txn_lsn > committed => {
                    self.n_deletes += 1;
                    let (table, key) = self.relations.get(&relation).map_or((String::new(), Value::Null), |rel| {
                        (format!("{}.{}", rel.namespace, rel.name), pgoutput::key_json(rel, &old))
                    });
                    info!(slot = %self.slot, table = %table, key = %key, lsn = %pgoutput::format_lsn(txn_lsn), "row deleted at the source");
                }
                Message::Truncate { .. } if txn_lsn > committed => {
                    self.n_truncates += 1;
                    warn!(slot = %self.slot, lsn = %pgoutput::format_lsn(txn_lsn), "table truncated at the source");
                }
                _ => {}
            }
        }
        // Everything committed before `current` was in this peek unless it hit the limit.
        let to = if n_messages < limit { Some(current) } else { last_end };
        if let Some(to) = to {
            let needs = rows.last().and_then(|r| r.key.first()).and_then(Value::as_u64).unwrap_or(0);
            self.advance = Some((to, needs));
        }
        self.check_retention()?;
        Ok(rows)
    }

    fn waiting_for(&self) -> Option<String> {
        let mut text = format!("slot {} retains {} KiB of WAL", self.slot, self.retained.unwrap_or(0) / 1024);
        if self.n_deletes + self.n_truncates > 0 {
            text.push_str(&format!("; deletes seen: {}, truncations: {}", self.n_deletes, self.n_truncates));
        }
        Some(text)
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
