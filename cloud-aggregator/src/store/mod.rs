//! The serving store: SQLite, holding the roll-ups the API serves and the state that makes
//! processing exactly-once.
//!
//! # Schema
//! `migrations/0001_init.sql`: `sales_minute`, `domain_minute` (roll-ups), `dedup` (highest seq
//! applied per stream and source), `offsets` (Kafka positions), `agents` (fleet health),
//! `counters`.
//!
//! # Invariants
//! * One [`Store::commit`] is one transaction: roll-up changes, de-duplication marks, Kafka
//!   offsets and counters are stored together or not at all. A processor that dies at any
//!   point resumes from the stored offsets and neither loses nor double-counts.
//! * An event is applied only if its seq is above the `dedup.last_seq` of its (stream, agent,
//!   source). This relies on the gateway writing each source's events to any one partition in
//!   seq order, except for re-sends of events already written (see ARCHITECTURE.md).
//! * Offsets are fenced: a commit names the offset it believes is stored for each partition,
//!   and the partition's part of the commit is dropped if another processor moved it since (a
//!   zombie after a rebalance cannot double-count).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use actidash_shared::event::Event;
use actidash_shared::kafka::FleetRecord;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde::Serialize;

use crate::process::rollup::RollupDelta;

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/0001_init.sql")];

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("serving store {path}: {source}")]
pub struct StoreError {
    path: PathBuf,
    source: rusqlite::Error,
}

/// A Kafka partition's position claim in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetClaim {
    pub topic: String,
    pub partition: i32,
    /// What the committer believes is stored (None: nothing stored yet).
    pub expected_next: Option<i64>,
    /// The position after this commit.
    pub new_next: i64,
}

/// The events of one input stream in a commit.
#[derive(Debug, Clone, Default)]
pub struct StreamInput {
    /// `topic/partition`, or `embedded`.
    pub stream: String,
    pub events: Vec<Event>,
    pub offset: Option<OffsetClaim>,
}

/// One transaction's worth of work.
#[derive(Debug, Clone, Default)]
pub struct CommitWork {
    pub inputs: Vec<StreamInput>,
    pub fleet: Vec<FleetRecord>,
    /// Records that could not be decoded (already logged by the caller).
    pub n_bad_records: u64,
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitOutcome {
    pub n_applied: u64,
    pub n_duplicates: u64,
    /// Inputs (by index) dropped because another processor moved their partition.
    pub fenced: Vec<usize>,
}

/// A sales roll-up row, as served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SalesRow {
    pub tenant: String,
    pub minute: String,
    pub channel: String,
    pub currency: String,
    pub orders: i64,
    pub revenue: f64,
    pub average_order_value: Option<f64>,
}

/// Totals per channel and currency, as served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TotalsRow {
    pub tenant: String,
    pub channel: String,
    pub currency: String,
    pub orders: i64,
    /// Exact decimal text of the revenue.
    pub revenue: String,
    pub average_order_value: Option<f64>,
}

/// Event count per domain and minute, as served.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DomainRow {
    pub tenant: String,
    pub minute: String,
    pub domain: String,
    pub events: i64,
}

/// Fleet health row, as served.
#[derive(Debug, Clone, Serialize)]
pub struct AgentRow {
    pub tenant: String,
    pub agent_id: String,
    pub received_at: String,
    pub transport: String,
    pub remote_addr: String,
    pub heartbeat: serde_json::Value,
}

/// A connection to the serving store.
pub struct Store {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

impl Store {
    /// Opens (creating and migrating) the store for reading and writing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError { path: path.to_owned(), source };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        enable_wal(&conn).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
        for (idx, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", idx + 1).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(Store { path: path.to_owned(), conn })
    }

    /// Opens an existing store read-only (the API).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let err = |source| StoreError { path: path.to_owned(), source };
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        Ok(Store { path: path.to_owned(), conn })
    }

    fn err(&self, source: rusqlite::Error) -> StoreError {
        StoreError { path: self.path.clone(), source }
    }

    /// Changes whenever another connection commits (SQLite's `data_version`).
    pub fn data_version(&self) -> Result<i64, StoreError> {
        self.conn.pragma_query_value(None, "data_version", |r| r.get(0)).map_err(|e| self.err(e))
    }

    /// The stored position of a partition.
    pub fn stored_offset(&self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.conn
            .query_row(
                "SELECT next_offset FROM offsets WHERE topic = ?1 AND partition = ?2",
                params![topic, partition],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    /// Applies `work` in one transaction (see the module's invariants).
    pub fn commit(&mut self, work: CommitWork) -> Result<CommitOutcome, StoreError> {
        let path = self.path.clone();
        let err = |source| StoreError { path: path.clone(), source };
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
        let mut outcome = CommitOutcome::default();
        let mut delta = RollupDelta::default();
        let mut marks: HashMap<(String, String, String), Option<i64>> = HashMap::new();
        {
            let mut get_mark = tx
                .prepare_cached("SELECT last_seq FROM dedup WHERE stream = ?1 AND agent_id = ?2 AND source_id = ?3")
                .map_err(err)?;
            let mut get_offset = tx
                .prepare_cached("SELECT next_offset FROM offsets WHERE topic = ?1 AND partition = ?2")
                .map_err(err)?;
            let mut put_offset = tx
                .prepare_cached(
                    "INSERT INTO offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                     ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                )
                .map_err(err)?;
            for (idx, input) in work.inputs.into_iter().enumerate() {
                if let Some(claim) = &input.offset {
                    let stored: Option<i64> = get_offset
                        .query_row(params![claim.topic, claim.partition], |r| r.get(0))
                        .optional()
                        .map_err(err)?;
                    if stored != claim.expected_next {
                        outcome.fenced.push(idx);
                        continue;
                    }
                }
                // One pass. The mark of the current source is kept at hand and the map (or the
                // table) consulted only when the source changes: runs of one source are the
                // common case, and no key is built per event.
                let mut current: Option<((String, String, String), Option<i64>)> = None;
                for event in input.events {
                    let same_source =
                        current.as_ref().is_some_and(|((_, a, s), _)| *a == event.agent_id && *s == event.source_id);
                    if !same_source {
                        if let Some((key, mark)) = current.take() {
                            marks.insert(key, mark);
                        }
                        let key = (input.stream.clone(), event.agent_id.clone(), event.source_id.clone());
                        let mark = match marks.get(&key) {
                            Some(mark) => *mark,
                            None => get_mark
                                .query_row(params![key.0, key.1, key.2], |r| r.get(0))
                                .optional()
                                .map_err(err)?,
                        };
                        current = Some((key, mark));
                    }
                    let Some((_, mark)) = current.as_mut() else { continue };
                    if mark.is_some_and(|m| event.seq as i64 <= m) {
                        outcome.n_duplicates += 1;
                        continue;
                    }
                    *mark = Some(event.seq as i64);
                    delta.add(&event);
                    outcome.n_applied += 1;
                }
                if let Some((key, mark)) = current {
                    marks.insert(key, mark);
                }
                if let Some(claim) = input.offset {
                    put_offset.execute(params![claim.topic, claim.partition, claim.new_next]).map_err(err)?;
                }
            }
        }
        write_delta(&tx, &delta).map_err(err)?;
        {
            let mut put_mark = tx
                .prepare_cached(
                    "INSERT INTO dedup (stream, agent_id, source_id, last_seq) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (stream, agent_id, source_id) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
                )
                .map_err(err)?;
            for ((stream, agent, source), mark) in &marks {
                if let Some(m) = mark {
                    put_mark.execute(params![stream, agent, source, m]).map_err(err)?;
                }
            }
            let mut put_agent = tx
                .prepare_cached(
                    "INSERT INTO agents (tenant, agent_id, received_at, transport, remote_addr, heartbeat)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (tenant, agent_id) DO UPDATE SET received_at = excluded.received_at,
                         transport = excluded.transport, remote_addr = excluded.remote_addr, heartbeat = excluded.heartbeat
                     WHERE excluded.received_at >= agents.received_at",
                )
                .map_err(err)?;
            for f in &work.fleet {
                let heartbeat = serde_json::to_string(&f.heartbeat).unwrap_or_default();
                put_agent
                    .execute(params![
                        f.tenant,
                        f.agent_id,
                        f.received_at.to_rfc3339(),
                        f.transport,
                        f.remote_addr,
                        heartbeat
                    ])
                    .map_err(err)?;
            }
            let mut bump = tx
                .prepare_cached(
                    "INSERT INTO counters (name, value) VALUES (?1, ?2)
                     ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                )
                .map_err(err)?;
            for (name, n) in [
                ("events_applied", outcome.n_applied),
                ("duplicates_dropped", outcome.n_duplicates),
                ("bad_records", work.n_bad_records),
            ] {
                if n > 0 {
                    bump.execute(params![name, n as i64]).map_err(err)?;
                }
            }
        }
        tx.commit().map_err(err)?;
        Ok(outcome)
    }

    /// Sales roll-up rows from `since` (unix seconds) on, oldest first.
    pub fn sales_minutes(&self, tenant: Option<&str>, since: i64) -> Result<Vec<SalesRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tenant, minute, channel, currency, orders, revenue FROM sales_minute
                 WHERE (?1 IS NULL OR tenant = ?1) AND minute >= ?2 ORDER BY minute, tenant, channel, currency",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant, since], |r| {
                let orders: i64 = r.get(4)?;
                let revenue = actidash_shared::Money(r.get(5)?).to_f64();
                Ok(SalesRow {
                    tenant: r.get(0)?,
                    minute: minute_text(r.get(1)?),
                    channel: r.get(2)?,
                    currency: r.get(3)?,
                    orders,
                    revenue,
                    average_order_value: (orders > 0).then(|| revenue / orders as f64),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// All-time totals per tenant, channel and currency.
    pub fn sales_totals(&self, tenant: Option<&str>) -> Result<Vec<TotalsRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tenant, channel, currency, sum(orders), sum(revenue) FROM sales_minute
                 WHERE (?1 IS NULL OR tenant = ?1) GROUP BY tenant, channel, currency ORDER BY tenant, channel, currency",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant], |r| {
                let orders: i64 = r.get(3)?;
                let revenue = actidash_shared::Money(r.get(4)?);
                Ok(TotalsRow {
                    tenant: r.get(0)?,
                    channel: r.get(1)?,
                    currency: r.get(2)?,
                    orders,
                    revenue: revenue.to_string(),
                    average_order_value: (orders > 0).then(|| revenue.to_f64() / orders as f64),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Event counts per domain and minute from `since` on.
    pub fn domain_minutes(&self, tenant: Option<&str>, since: i64) -> Result<Vec<DomainRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tenant, minute, domain, events FROM domain_minute
                 WHERE (?1 IS NULL OR tenant = ?1) AND minute >= ?2 ORDER BY minute, tenant, domain",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant, since], |r| {
                Ok(DomainRow {
                    tenant: r.get(0)?,
                    minute: minute_text(r.get(1)?),
                    domain: r.get(2)?,
                    events: r.get(3)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// The fleet: every agent's last heartbeat.
    pub fn agents(&self, tenant: Option<&str>) -> Result<Vec<AgentRow>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT tenant, agent_id, received_at, transport, remote_addr, heartbeat FROM agents
                 WHERE (?1 IS NULL OR tenant = ?1) ORDER BY tenant, agent_id",
            )
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![tenant], |r| {
                let heartbeat: String = r.get(5)?;
                Ok(AgentRow {
                    tenant: r.get(0)?,
                    agent_id: r.get(1)?,
                    received_at: r.get(2)?,
                    transport: r.get(3)?,
                    remote_addr: r.get(4)?,
                    heartbeat: serde_json::from_str(&heartbeat).unwrap_or(serde_json::Value::Null),
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }

    /// Makes every later write fail, to test how callers handle a failing store.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) {
        let _ = self.conn.pragma_update(None, "query_only", true);
    }

    /// Processing counters (`events_applied`, `duplicates_dropped`, `bad_records`).
    pub fn counters(&self) -> Result<BTreeMap<String, i64>, StoreError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT name, value FROM counters ORDER BY name").map_err(|e| self.err(e))?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).map_err(|e| self.err(e))?;
        rows.collect::<Result<_, _>>().map_err(|e| self.err(e))
    }
}

/// Switches a database to WAL. Changing the journal mode needs a moment alone with the file and
/// does not wait on the busy timeout, so a process opening a new database while another does
/// the same retries for a while instead of failing.
fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
    let mut attempt = 0;
    loop {
        let result = conn.pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0)).and_then(|mode| {
            if mode.eq_ignore_ascii_case("wal") { Ok(()) } else { conn.pragma_update(None, "journal_mode", "WAL") }
        });
        match result {
            Err(e) if e.sqlite_error_code() == Some(rusqlite::ErrorCode::DatabaseBusy) && attempt < 100 => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

fn write_delta(tx: &rusqlite::Transaction<'_>, delta: &RollupDelta) -> rusqlite::Result<()> {
    let mut sales = tx.prepare_cached(
        "INSERT INTO sales_minute (tenant, minute, channel, currency, orders, revenue) VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (tenant, minute, channel, currency)
         DO UPDATE SET orders = orders + excluded.orders, revenue = revenue + excluded.revenue",
    )?;
    for (k, v) in &delta.sales {
        sales.execute(params![k.tenant, k.minute, k.channel, k.currency, v.orders, v.revenue])?;
    }
    let mut domains = tx.prepare_cached(
        "INSERT INTO domain_minute (tenant, minute, domain, events) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (tenant, minute, domain) DO UPDATE SET events = events + excluded.events",
    )?;
    for (k, n) in &delta.domains {
        domains.execute(params![k.tenant, k.minute, k.domain, n])?;
    }
    Ok(())
}

fn minute_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
