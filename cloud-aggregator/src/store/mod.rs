//! The serving store: the roll-ups the API serves, the analytics state behind them, and what
//! makes processing exactly-once — SQLite here (the embedded default); every statement goes
//! through [`db::Tx`] so that the same code runs on PostgreSQL.
//!
//! # Schema
//! Version 1 (`migrations/0001_init.sql`): `dedup` (highest seq applied per stream and
//! source), `offsets` (Kafka positions), `agents` (fleet health), `counters`. Version 2: the
//! roll-ups ([`crate::analytics::tables`]) and the analytics state ([`crate::analytics`]);
//! version 1's revenue and domain roll-ups are carried over. Versions 3 to 5: see
//! [`migrations`] (5: attribution credits are derived, no longer stored with each order).
//!
//! # Invariants
//! * One [`Store::commit`] is one transaction: roll-up changes, analytics state,
//!   de-duplication marks, Kafka offsets and counters are stored together or not at all. A
//!   processor that dies at any point resumes from the stored offsets and neither loses nor
//!   double-counts.
//! * An event is applied only if its seq is above the `dedup.last_seq` of its (stream, agent,
//!   source). This relies on the gateway writing each source's events to any one partition in
//!   seq order, except for re-sends of events already written (see ARCHITECTURE.md).
//! * Offsets are fenced: a commit names the offset it believes is stored for each partition,
//!   and the partition's part of the commit is dropped if another processor moved it since (a
//!   zombie after a rebalance cannot double-count).
//! * Offsets are continuous: a partition's part of a commit must start at the stored next
//!   offset (its first message's offset equals it), else it is dropped — a consumer that
//!   skipped a range (a failed seek, a reset) cannot commit past events it never applied.

pub mod db;
pub mod postgres;
pub mod query;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Duration;

use actidash_shared::event::Event;
use actidash_shared::kafka::FleetRecord;
use rusqlite::{Connection, OpenFlags};

use crate::analytics::{self, AnalyticsConfig};
use db::{DbError, Tx, Val};
use postgres::{PgTx, StatementCache};

/// Where the serving store is: a SQLite file (the embedded default) or a PostgreSQL database
/// shared by processors and API servers on several hosts.
#[derive(Clone)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres { url: String, password: Option<String> },
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Location {
    /// The path, or the URL without its password.
    pub fn name(&self) -> String {
        match self {
            Location::Sqlite(p) => p.display().to_string(),
            Location::Postgres { url, .. } => postgres::redact(url),
        }
    }

    /// Whether processes on other hosts may share it.
    pub fn is_shared(&self) -> bool {
        matches!(self, Location::Postgres { .. })
    }

    /// Opens the store for reading and writing (creating or migrating its schema).
    pub fn open(&self) -> Result<Store, StoreError> {
        match self {
            Location::Sqlite(p) => Store::open(p),
            Location::Postgres { url, password } => Store::open_postgres(url, password.as_deref()),
        }
    }

    /// Opens the store for the API's reads (the schema is made to exist first).
    pub fn open_reader(&self) -> Result<Store, StoreError> {
        match self {
            Location::Sqlite(p) => {
                drop(Store::open(p)?);
                Store::open_read_only(p)
            }
            Location::Postgres { .. } => self.open(),
        }
    }
}

/// The schema, one migration per version.
fn migrations() -> Vec<String> {
    vec![
        include_str!("../../migrations/0001_init.sql").to_owned(),
        migration_2(),
        migration_3(),
        migration_4(),
        MIGRATION_5.to_owned(),
    ]
}

/// Version 5: orders' credits are derived, no longer stored; the credits that older versions
/// stored stay as `legacy_credits` until their order is credited again. The rename also fences
/// processes of older versions sharing the store during an upgrade: their statements name
/// `credits` and fail (a commit refused) instead of reading a derived order as uncredited and
/// crediting it twice.
const MIGRATION_5: &str = "ALTER TABLE attr_orders RENAME COLUMN credits TO legacy_credits;\n";

/// [`MIGRATION_5`] for PostgreSQL, whose schema is applied whole at every start.
const POSTGRES_MIGRATION_5: &str = "
DO $$ BEGIN
    IF EXISTS (SELECT 1 FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'attr_orders' AND column_name = 'credits') THEN
        ALTER TABLE attr_orders RENAME COLUMN credits TO legacy_credits;
    END IF;
END $$;
";

/// The agents' health history (both engines).
const AGENT_HEALTH_DDL: &str = "CREATE TABLE IF NOT EXISTS agent_health (
    tenant TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    since TEXT NOT NULL,
    state TEXT NOT NULL,
    reasons TEXT NOT NULL,
    PRIMARY KEY (tenant, agent_id, since)
);
";

/// Version 4: agents' health history, and when each agent's bad records last grew.
fn migration_4() -> String {
    format!("ALTER TABLE agents ADD COLUMN errors_rising_at TEXT;\n{AGENT_HEALTH_DDL}")
}

/// Version 3: attribution and products are kept from the hour up; their minute rows, which no
/// report reads any more, are removed (their hour and day rows hold the same sums).
fn migration_3() -> String {
    analytics::tables::ALL
        .iter()
        .filter(|t| t.finest > 60)
        .map(|t| format!("DELETE FROM {} WHERE grain < {};\n", t.name, t.finest))
        .collect()
}

/// Version 2: the analytics roll-ups and state; version 1's roll-ups carried over (its orders
/// and revenue were net of cancellations, and had no site or country).
fn migration_2() -> String {
    let mut sql = analytics::state_ddl(true);
    for grain in analytics::tables::GRAINS {
        sql += &format!(
            "INSERT INTO sales_rollup (tenant, grain, bucket, channel, site, country, currency, placed_orders, gross_revenue)
             SELECT tenant, {grain}, (minute / {grain}) * {grain}, channel, '', '', currency, sum(orders), sum(revenue)
             FROM sales_minute GROUP BY tenant, (minute / {grain}) * {grain}, channel, currency;
             INSERT INTO domain_rollup (tenant, grain, bucket, domain, events)
             SELECT tenant, {grain}, (minute / {grain}) * {grain}, domain, sum(events)
             FROM domain_minute GROUP BY tenant, (minute / {grain}) * {grain}, domain;\n"
        );
    }
    sql += "INSERT INTO stat_counters (name, writer, value) SELECT name, '', value FROM counters;\n";
    // Every tenant with figures has a watermark (reads find tenants there).
    sql += "INSERT INTO watermarks (tenant, writer, max_event_ms)
            SELECT tenant, '', max(minute) * 1000 + 59999 FROM domain_minute GROUP BY tenant;\n";
    sql += "DROP TABLE sales_minute;\nDROP TABLE domain_minute;\nDROP TABLE counters;\n";
    sql
}

/// The whole schema on PostgreSQL (created at once: there is no older PostgreSQL schema).
/// `sat_sum(x)`: the exact sum of 64-bit integers, clamped to the 64-bit range at the end
/// instead of failing (SQLite's `sum` raises "integer overflow"; PostgreSQL's `sum(bigint)` is a
/// `numeric` that a cast to `BIGINT` would fail on). Every metric sum the API reads goes through
/// it, so that one outlier cannot turn a tenant's dashboards into errors; PostgreSQL gets the
/// same function in its schema ([`POSTGRES_FUNCTIONS`]).
struct SatSum;

impl rusqlite::functions::Aggregate<i128, i64> for SatSum {
    fn init(&self, _: &mut rusqlite::functions::Context<'_>) -> rusqlite::Result<i128> {
        Ok(0)
    }

    fn step(&self, ctx: &mut rusqlite::functions::Context<'_>, sum: &mut i128) -> rusqlite::Result<()> {
        if let Some(v) = ctx.get::<Option<i64>>(0)? {
            // 2^64 rows of i64::MAX would be needed to overflow an i128.
            *sum += i128::from(v);
        }
        Ok(())
    }

    fn finalize(&self, _: &mut rusqlite::functions::Context<'_>, sum: Option<i128>) -> rusqlite::Result<i64> {
        Ok(clamp_i64(sum.unwrap_or(0)))
    }
}

/// `x` within the 64-bit range.
pub fn clamp_i64(x: i128) -> i64 {
    x.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_aggregate_function(
        "sat_sum",
        1,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        SatSum,
    )
}

/// [`SatSum`] for PostgreSQL: a `numeric` accumulator, clamped at the end. Reads no longer use it
/// ([`postgres::saturating_sum`]); it stays for processes of older versions during an upgrade,
/// stepping through PostgreSQL's own `int8_sum` (C) rather than the SQL `SELECT s + v` it had
/// until 2026-12-03 (8x slower per row). That version's `actidash_sat_acc` is left in place,
/// unused: a process of that version may still be starting.
const POSTGRES_FUNCTIONS: &str = "
CREATE OR REPLACE FUNCTION actidash_sat_final(s numeric) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS 'SELECT LEAST(GREATEST(s, -9223372036854775808), 9223372036854775807)::bigint';
CREATE OR REPLACE AGGREGATE sat_sum(bigint) (
    SFUNC = int8_sum, STYPE = numeric, INITCOND = '0', FINALFUNC = actidash_sat_final
);
";

fn postgres_schema() -> String {
    let mut sql = String::from(POSTGRES_FUNCTIONS);
    sql.push_str(
        "CREATE TABLE IF NOT EXISTS dedup (
    stream TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    last_seq BIGINT NOT NULL,
    PRIMARY KEY (stream, agent_id, source_id)
);
CREATE TABLE IF NOT EXISTS offsets (
    topic TEXT NOT NULL,
    partition BIGINT NOT NULL,
    next_offset BIGINT NOT NULL,
    PRIMARY KEY (topic, partition)
);
CREATE TABLE IF NOT EXISTS agents (
    tenant TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    received_at TEXT NOT NULL,
    transport TEXT NOT NULL,
    remote_addr TEXT NOT NULL,
    heartbeat TEXT NOT NULL,
    PRIMARY KEY (tenant, agent_id)
);
ALTER TABLE agents ADD COLUMN IF NOT EXISTS errors_rising_at TEXT;
",
    );
    sql.push_str(AGENT_HEALTH_DDL);
    sql += &analytics::state_ddl(false);
    sql.push_str(POSTGRES_MIGRATION_5);
    sql
}

/// Prepared statements kept per SQLite connection.
const STATEMENT_CACHE: usize = 256;

/// Most attempts of a PostgreSQL commit that meets a deadlock or a serialization failure.
const MAX_ATTEMPTS: u32 = 20;

/// A store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("serving store {path}: {source}")]
pub struct StoreError {
    path: String,
    source: DbError,
}

impl StoreError {
    /// What failed, without the store's name.
    pub fn message(&self) -> &str {
        &self.source.message
    }

    /// Whether trying the same transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.source.retryable
    }
}

/// A Kafka partition's position claim in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetClaim {
    pub topic: String,
    pub partition: i32,
    /// What the committer believes is stored (None: nothing stored yet).
    pub expected_next: Option<i64>,
    /// The offset of the first message of this part: the stored next offset, or the part is
    /// refused (see [`CommitOutcome::discontinuous`]).
    pub first: i64,
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
    /// Events older than the state horizon (applied to additive figures only).
    pub n_late_beyond_horizon: u64,
    /// Inputs (by index) dropped because another processor moved their partition.
    pub fenced: Vec<usize>,
    /// Inputs (by index) dropped because they do not start at their partition's stored next
    /// offset: the consumer is elsewhere than the store, and must seek back to it.
    pub discontinuous: Vec<usize>,
}

enum Engine {
    Sqlite(Connection),
    Postgres(Box<::postgres::Client>, StatementCache),
}

/// A connection to the serving store.
pub struct Store {
    name: String,
    engine: Engine,
    analytics: AnalyticsConfig,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("name", &self.name).finish()
    }
}

impl Store {
    /// Opens (creating and migrating) a SQLite store for reading and writing.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let err = |e: rusqlite::Error| StoreError { path: path.display().to_string(), source: e.into() };
        let mut conn = Connection::open(path).map_err(err)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(err)?;
        // A commit runs a few dozen distinct statements: keep every one prepared (the default
        // cache of 16 would prepare some again in every commit).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        enable_wal(&conn).map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL").map_err(err)?;
        // Roll-up rows and analytics state are rewritten by commit after commit: checkpoint the
        // WAL every 64 MiB rather than every 4 MiB, so that a page changed by many commits is
        // copied into the database file once.
        conn.pragma_update(None, "wal_autocheckpoint", 16_384).map_err(err)?;
        // The analytics state and the newest roll-up rows are read on every commit: keep them
        // in SQLite's own cache (64 MiB) rather than the kernel's.
        conn.pragma_update(None, "cache_size", -65_536).map_err(err)?;
        register_functions(&conn).map_err(err)?;
        let version: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
        for (idx, sql) in migrations().iter().enumerate().skip(version) {
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate).map_err(err)?;
            // Another process may have migrated while this one waited for the lock.
            let now: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(err)?;
            if now > idx {
                continue;
            }
            tx.execute_batch(sql).map_err(err)?;
            tx.pragma_update(None, "user_version", idx + 1).map_err(err)?;
            tx.commit().map_err(err)?;
        }
        Ok(Store {
            name: path.display().to_string(),
            engine: Engine::Sqlite(conn),
            analytics: AnalyticsConfig::default(),
        })
    }

    /// Opens an existing SQLite store read-only (the API).
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        let err = |e: rusqlite::Error| StoreError { path: path.display().to_string(), source: e.into() };
        let conn =
            Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)
                .map_err(err)?;
        conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.pragma_update(None, "cache_size", -65_536).map_err(err)?;
        register_functions(&conn).map_err(err)?;
        Ok(Store {
            name: path.display().to_string(),
            engine: Engine::Sqlite(conn),
            analytics: AnalyticsConfig::default(),
        })
    }

    /// Connects to a PostgreSQL store, creating its schema if needed (one process at a time).
    pub fn open_postgres(url: &str, password: Option<&str>) -> Result<Store, StoreError> {
        let name = postgres::redact(url);
        let err = |source: DbError| StoreError { path: name.clone(), source };
        let (client, cache) = off_runtime(|| {
            let mut client = postgres::connect(url, password)?;
            let mut cache = StatementCache::default();
            let mut tx = client.transaction()?;
            PgTx { tx: &mut tx, cache: &mut cache }.lock_key("actidash/schema")?;
            tx.batch_execute(&postgres_schema())?;
            tx.commit()?;
            // Statements prepared inside the schema transaction stay valid on the connection.
            Ok::<_, DbError>((client, cache))
        })
        .map_err(err)?;
        Ok(Store { name, engine: Engine::Postgres(Box::new(client), cache), analytics: AnalyticsConfig::default() })
    }

    /// Uses `config` for the analytics of later commits.
    pub fn with_analytics(mut self, config: AnalyticsConfig) -> Store {
        self.analytics = config;
        self
    }

    fn err(&self, source: impl Into<DbError>) -> StoreError {
        StoreError { path: self.name.clone(), source: source.into() }
    }

    /// Statements on this connection (the API's reads; on PostgreSQL, one read-only snapshot).
    pub fn read<T: Send>(&mut self, f: impl FnOnce(&mut dyn Tx) -> Result<T, DbError> + Send) -> Result<T, StoreError> {
        let name = self.name.clone();
        let err = |source: DbError| StoreError { path: name.clone(), source };
        match &mut self.engine {
            Engine::Sqlite(conn) => f(conn).map_err(err),
            Engine::Postgres(client, cache) => off_runtime(|| {
                let mut tx = client
                    .build_transaction()
                    .isolation_level(::postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()?;
                let out = f(&mut PgTx { tx: &mut tx, cache })?;
                tx.commit()?;
                Ok(out)
            })
            .map_err(err),
        }
    }

    /// Changes whenever another connection commits something the API shows.
    pub fn data_version(&mut self) -> Result<i64, StoreError> {
        match &self.engine {
            Engine::Sqlite(conn) => {
                conn.pragma_query_value(None, "data_version", |r| r.get(0)).map_err(|e| self.err(e))
            }
            Engine::Postgres(..) => self.read(|tx| {
                let rows = tx.query("SELECT CAST(coalesce(sum(version), 0) AS BIGINT) FROM changes", &[])?;
                Ok(rows.first().map_or(0, |r| r[0].int_or_zero()))
            }),
        }
    }

    /// The stored position of a partition.
    pub fn stored_offset(&mut self, topic: &str, partition: i32) -> Result<Option<i64>, StoreError> {
        self.read(|tx| stored_offset(tx, topic, partition))
    }

    /// Applies `work` in one transaction (see the module's invariants). On PostgreSQL a commit
    /// that meets a deadlock or a serialization failure is tried again from the start.
    pub fn commit(&mut self, work: CommitWork) -> Result<CommitOutcome, StoreError> {
        let started = std::time::Instant::now();
        let n_bad = work.n_bad_records;
        let outcome = self.commit_once(work)?;
        metrics::histogram!(crate::telemetry::STORE_COMMIT_SECONDS).record(started.elapsed().as_secs_f64());
        metrics::counter!(crate::telemetry::PROCESSOR_EVENTS).increment(outcome.n_applied);
        metrics::counter!(crate::telemetry::PROCESSOR_DUPLICATES).increment(outcome.n_duplicates);
        metrics::counter!(crate::telemetry::PROCESSOR_BAD_RECORDS).increment(n_bad);
        Ok(outcome)
    }

    fn commit_once(&mut self, work: CommitWork) -> Result<CommitOutcome, StoreError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let name = self.name.clone();
        let err = |e: DbError| StoreError { path: name.clone(), source: e };
        match &mut self.engine {
            Engine::Sqlite(conn) => {
                let mut tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(|e| err(e.into()))?;
                let outcome = commit_in(&mut tx, work, &self.analytics, now_ms).map_err(err)?;
                tx.commit().map_err(|e| err(e.into()))?;
                Ok(outcome)
            }
            Engine::Postgres(client, cache) => off_runtime(|| {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let result = (|| {
                        let mut tx = client.transaction()?;
                        let outcome =
                            commit_in(&mut PgTx { tx: &mut tx, cache }, work.clone(), &self.analytics, now_ms)?;
                        tx.commit()?;
                        Ok::<_, DbError>(outcome)
                    })();
                    match result {
                        Err(e) if e.retryable && attempt < MAX_ATTEMPTS => {
                            tracing::debug!(attempt, error = %e, "store commit met a concurrent writer; trying again");
                            std::thread::sleep(Duration::from_millis(rand::random_range(1..20 * u64::from(attempt))));
                        }
                        other => return other.map_err(err),
                    }
                }
            }),
        }
    }

    /// All-time totals per tenant, channel and currency (net orders and revenue).
    pub fn sales_totals(&mut self, tenant: Option<&str>) -> Result<Vec<query::SalesRow>, StoreError> {
        self.read(|tx| query::sales_totals(tx, tenant))
    }

    /// The fleet: every agent's last heartbeat.
    pub fn agents(&mut self, tenant: Option<&str>) -> Result<Vec<query::AgentRow>, StoreError> {
        self.read(|tx| query::agents(tx, tenant))
    }

    /// Processing counters (`events_applied`, `duplicates_dropped`, `bad_records`,
    /// `late_events_beyond_horizon`).
    pub fn counters(&mut self) -> Result<BTreeMap<String, i64>, StoreError> {
        self.read(query::counters)
    }

    /// Makes every later write fail, to test how callers handle a failing store.
    #[cfg(test)]
    pub(crate) fn fail_writes(&self) {
        if let Engine::Sqlite(conn) = &self.engine {
            let _ = conn.pragma_update(None, "query_only", true);
        }
    }
}

/// Runs `f` on a thread of its own, outside any async runtime: the synchronous PostgreSQL
/// client drives its own runtime and must not run on a thread that is inside one (an API
/// worker, a `spawn_blocking` thread).
pub(crate) fn off_runtime<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    std::thread::scope(|scope| match scope.spawn(f).join() {
        Ok(r) => r,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn stored_offset(tx: &mut dyn Tx, topic: &str, partition: i32) -> Result<Option<i64>, DbError> {
    let rows = tx.query(
        "SELECT next_offset FROM offsets WHERE topic = ?1 AND partition = ?2",
        &[topic.into(), i64::from(partition).into()],
    )?;
    Ok(rows.first().and_then(|r| r[0].int()))
}

/// The body of a commit, on any engine: fencing, de-duplication, analytics, marks, fleet,
/// counters and change versions.
pub fn commit_in(
    tx: &mut dyn Tx,
    work: CommitWork,
    cfg: &AnalyticsConfig,
    now_ms: i64,
) -> Result<CommitOutcome, DbError> {
    let mut outcome = CommitOutcome::default();
    // The rows every processor updates (counters, change versions, watermarks) are kept per
    // writer: one of this commit's streams, which no other processor commits concurrently.
    let writer = work.inputs.iter().map(|i| i.stream.clone()).min().unwrap_or_default();
    let mut accepted: Vec<Event> = Vec::new();
    let mut marks: HashMap<(String, String, String), Option<i64>> = HashMap::new();
    for (idx, input) in work.inputs.into_iter().enumerate() {
        if let Some(claim) = &input.offset {
            // Another processor committing this partition (a zombie after a rebalance) waits
            // here, then sees the moved offset and is fenced.
            tx.lock_key(&format!("partition/{}/{}", claim.topic, claim.partition))?;
            let stored = stored_offset(tx, &claim.topic, claim.partition)?;
            if stored != claim.expected_next {
                outcome.fenced.push(idx);
                continue;
            }
            if stored.is_some_and(|next| next != claim.first) {
                outcome.discontinuous.push(idx);
                continue;
            }
        }
        // One pass. The mark of the current source is kept at hand and the map (or the table)
        // consulted only when the source changes: runs of one source are the common case.
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
                    None => {
                        if input.offset.is_none() {
                            // Without a partition to lock (embedded input), the source's mark
                            // is the unit two instances could race on.
                            tx.lock_key(&format!("dedup/{}/{}/{}", key.0, key.1, key.2))?;
                        }
                        tx.query(
                            "SELECT last_seq FROM dedup WHERE stream = ?1 AND agent_id = ?2 AND source_id = ?3",
                            &[(&key.0).into(), (&key.1).into(), (&key.2).into()],
                        )?
                        .first()
                        .and_then(|r| r[0].int())
                    }
                };
                current = Some((key, mark));
            }
            let Some((_, mark)) = current.as_mut() else { continue };
            if mark.is_some_and(|m| event.seq as i64 <= m) {
                outcome.n_duplicates += 1;
                continue;
            }
            *mark = Some(event.seq as i64);
            accepted.push(event);
        }
        if let Some((key, mark)) = current {
            marks.insert(key, mark);
        }
        if let Some(claim) = input.offset {
            tx.exec(
                "INSERT INTO offsets (topic, partition, next_offset) VALUES (?1, ?2, ?3)
                 ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
                &[claim.topic.into(), i64::from(claim.partition).into(), claim.new_next.into()],
            )?;
        }
    }
    outcome.n_applied = accepted.len() as u64;
    let applied = analytics::apply(tx, &accepted, &writer, cfg, now_ms)?;
    outcome.n_late_beyond_horizon = applied.late_beyond_horizon;

    let mut sorted_marks: Vec<_> = marks.into_iter().filter_map(|(k, m)| m.map(|m| (k, m))).collect();
    sorted_marks.sort();
    for ((stream, agent, source), mark) in sorted_marks {
        tx.exec(
            "INSERT INTO dedup (stream, agent_id, source_id, last_seq) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (stream, agent_id, source_id) DO UPDATE SET last_seq = excluded.last_seq
             WHERE excluded.last_seq > dedup.last_seq",
            &[stream.into(), agent.into(), source.into(), mark.into()],
        )?;
    }
    let mut changed = applied.changed;
    for f in &work.fleet {
        changed.insert((f.tenant.clone(), "fleet"));
        crate::health::record(tx, f)?;
    }
    for (name, n) in [
        ("events_applied", outcome.n_applied),
        ("duplicates_dropped", outcome.n_duplicates),
        ("bad_records", work.n_bad_records),
        ("late_events_beyond_horizon", outcome.n_late_beyond_horizon),
    ] {
        if n > 0 {
            tx.exec(
                "INSERT INTO stat_counters (name, writer, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (name, writer) DO UPDATE SET value = stat_counters.value + excluded.value",
                &[name.into(), (&writer).into(), Val::Int(n as i64)],
            )?;
        }
    }
    for (tenant, dashboard) in changed {
        tx.exec(
            "INSERT INTO changes (tenant, dashboard, writer, version) VALUES (?1, ?2, ?3, 1)
             ON CONFLICT (tenant, dashboard, writer) DO UPDATE SET version = changes.version + 1",
            &[tenant.into(), dashboard.into(), (&writer).into()],
        )?;
    }
    Ok(outcome)
}

/// Switches a database to WAL. Changing the journal mode needs a moment alone with the file and
/// does not wait on the busy timeout, so a process opening a new database while another does
/// the same retries for a while instead of failing.
pub(crate) fn enable_wal(conn: &Connection) -> rusqlite::Result<()> {
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

#[cfg(test)]
mod tests;
