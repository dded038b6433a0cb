//! Database sources over the network: PostgreSQL and MySQL/MariaDB, read-only.
//!
//! Rows of a table (or a query) are read in the order of an increasing column, or of a
//! timestamp with a tie-breaker, after the stored position; each batch's events and the
//! position after its last row go to the spool in one transaction.
//!
//! Polling by an id or a timestamp misses rows committed out of order: a transaction takes
//! id 10, another takes 11 and commits first, the poller reads 11 and moves past 10 before 10
//! is visible. Each driver therefore reads only up to a *commit-safe watermark*:
//! - PostgreSQL ([`postgres`]): the largest key visible in an earlier snapshot, once every
//!   transaction that was running at that snapshot has ended (the current snapshot's oldest
//!   running transaction is past that snapshot's horizon);
//! - MySQL/MariaDB ([`mysql`]): the largest key seen, once a settle delay has passed and the
//!   InnoDB transactions that were writing when it was seen have ended (when the account may
//!   see them); then the window is read again, so late commits inside it are included.
//!
//! PostgreSQL can instead be read by logical replication ([`logical`], opt-in).
//!
//! Connection loss and server restarts are retried with backoff, reported in the source's
//! status, and reading resumes from the stored position.

pub mod logical;
pub mod mysql;
pub mod pgoutput;
pub mod postgres;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};

use super::{Commit, SourceContext, update_status};
use crate::mapping::MappingConfig;
use crate::secret::{Secret, SecretSource};

/// Configuration of a PostgreSQL or MySQL/MariaDB source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbSourceConfig {
    /// Source id, unique in this agent.
    pub id: String,
    /// `postgres://user@host:port/database` or `mysql://user@host:port/database`. A password
    /// here is accepted but better given by `password_env` or `password_file`.
    pub url: String,
    /// The password, from an environment variable...
    #[serde(default)]
    pub password_env: Option<String>,
    /// ...or a file (its content, without a trailing newline)...
    #[serde(default)]
    pub password_file: Option<std::path::PathBuf>,
    /// ...or inline (discouraged: the configuration file then holds a secret).
    #[serde(default)]
    pub password: Option<Secret>,
    /// The table to read; or `query`.
    #[serde(default)]
    pub table: Option<String>,
    /// A `SELECT` to read from instead of a table (no `ORDER BY` or `LIMIT`).
    #[serde(default)]
    pub query: Option<String>,
    /// An increasing column (an id): rows are read in its order.
    #[serde(default)]
    pub incremental_column: Option<String>,
    /// Or a timestamp column...
    #[serde(default)]
    pub timestamp_column: Option<String>,
    /// ...with a unique tie-breaker for rows of the same timestamp.
    #[serde(default)]
    pub tie_breaker: Option<String>,
    /// Rows per spool transaction.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// How often to look for new rows, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// MySQL/MariaDB: how long a new largest key waits before its window is read, in ms.
    #[serde(default = "default_settle_ms")]
    pub settle_ms: u64,
    /// PostgreSQL: read by logical replication instead of polling (opt-in).
    #[serde(default)]
    pub logical: Option<logical::LogicalConfig>,
    /// TLS to the server, verified against `ca_file` (absent: no TLS, for a local network).
    #[serde(default)]
    pub tls: Option<DbTls>,
    /// Longest wait between reconnection attempts, in milliseconds.
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// How rows become events (columns are the record's fields).
    pub mapping: MappingConfig,
}

/// `tls = { ca_file = "..." }` of a database source: the connection is encrypted and the
/// server's certificate verified (chain and name); there is no unverified mode.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbTls {
    /// PEM file of the CA that signed the server's certificate; the certificate must name the
    /// URL's host.
    pub ca_file: std::path::PathBuf,
}

/// A rustls client configuration trusting only `ca_file` (TLS 1.2 or 1.3: database servers
/// often offer only 1.2).
pub fn tls_client_config(ca_file: &std::path::Path) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = crate::transport::quic::load_certs(ca_file).map_err(|e| format!("{e:#}"))?;
    for cert in certs {
        roots.add(cert).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(config)
}

fn default_batch_rows() -> usize {
    5_000
}

fn default_poll_ms() -> u64 {
    500
}

fn default_settle_ms() -> u64 {
    2_000
}

fn default_max_backoff_ms() -> u64 {
    30_000
}

/// Which server a [`DbSourceConfig`] is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Mysql,
}

impl Dialect {
    fn quote(self, name: &str) -> String {
        match self {
            Dialect::Postgres => format!("\"{}\"", name.replace('"', "\"\"")),
            Dialect::Mysql => format!("`{}`", name.replace('`', "``")),
        }
    }
}

impl DbSourceConfig {
    /// Checks what serde cannot; the error names the setting.
    pub fn validate(&self, dialect: Dialect) -> Result<(), (String, String)> {
        let scheme = match dialect {
            Dialect::Postgres => ["postgres://", "postgresql://"],
            Dialect::Mysql => ["mysql://", "mariadb://"],
        };
        if !scheme.iter().any(|s| self.url.starts_with(s)) {
            return Err(("url".into(), format!("must start with {}", scheme.join(" or "))));
        }
        self.password_source().validate(false)?;
        if self.logical.is_some() {
            if dialect != Dialect::Postgres {
                return Err(("logical".into(), "logical replication is for PostgreSQL sources only".into()));
            }
            if self.table.is_none() || self.query.is_some() {
                return Err(("table".into(), "logical replication reads a table: set table, not query".into()));
            }
            return Ok(());
        }
        self.relation_sql(dialect)?;
        self.key_columns()?;
        if self.batch_rows == 0 {
            return Err(("batch_rows".into(), "must be at least 1".into()));
        }
        Ok(())
    }

    /// Where the password comes from.
    pub fn password_source(&self) -> SecretSource<'_> {
        SecretSource {
            name: "password",
            inline: self.password.as_ref(),
            env: self.password_env.as_deref(),
            file: self.password_file.as_deref(),
        }
    }

    /// The table or query, as a FROM item.
    fn relation_sql(&self, dialect: Dialect) -> Result<String, (String, String)> {
        match (&self.table, &self.query) {
            (Some(t), None) => Ok(t.split('.').map(|part| dialect.quote(part)).collect::<Vec<_>>().join(".")),
            (None, Some(q)) => Ok(format!("({q})")),
            _ => Err(("table".into(), "set table or query, one of them".into())),
        }
    }

    /// The ordering columns: the incremental column, or the timestamp and its tie-breaker.
    fn key_columns(&self) -> Result<Vec<String>, (String, String)> {
        match (&self.incremental_column, &self.timestamp_column, &self.tie_breaker) {
            (Some(c), None, None) => Ok(vec![c.clone()]),
            (None, Some(ts), Some(tie)) => Ok(vec![ts.clone(), tie.clone()]),
            _ => Err((
                "incremental_column".into(),
                "set incremental_column, or timestamp_column with tie_breaker".into(),
            )),
        }
    }
}

/// Where a database source stands: the key of the last row read (its ordering columns'
/// values; empty before the first row). Stored in the spool as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyPosition {
    pub key: Vec<Value>,
}

impl std::fmt::Display for KeyPosition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.key.is_empty() {
            return f.write_str("(start)");
        }
        let parts: Vec<String> = self.key.iter().map(|v| v.to_string()).collect();
        f.write_str(&parts.join(", "))
    }
}

/// One row: the record as JSON text, and its key.
#[derive(Debug, Clone)]
pub struct Row {
    pub json: String,
    pub key: Vec<Value>,
}

/// A driver's view of the database: commit-safe reads after a position.
pub trait RowReader {
    /// Connects, or connects again after a failure.
    fn connect(&mut self) -> Result<(), String>;
    /// Rows after `after` in key order that are safe to read now, at most `limit`.
    fn read(&mut self, after: &KeyPosition, limit: usize) -> Result<Vec<Row>, String>;
    /// What the reader waits for, if anything (for the status).
    fn waiting_for(&self) -> Option<String>;
    /// Whether the last read left nothing known to read (no rows noted for a later read):
    /// what `waiting` means in the source's status. True by default.
    fn caught_up(&self) -> bool {
        true
    }
    /// The WAL a replication slot retains and the most allowed, in bytes (logical replication).
    fn retained_wal(&self) -> Option<(u64, u64)> {
        None
    }
    /// How many committed rows are after `after` (at most [`ROWS_BEHIND_CAP`]): how far behind
    /// the table the source is. None where rows are not what it follows (logical replication).
    fn rows_behind(&mut self, _after: &KeyPosition) -> Result<Option<u64>, String> {
        Ok(None)
    }
    /// Where it reads, without credentials (for logs and dead letters).
    fn describe(&self) -> String;
}

/// The count of rows behind stops here: past a million, "over a million" is all that matters,
/// and the count stays a bounded index scan.
pub const ROWS_BEHIND_CAP: u64 = 1_000_000;
/// How often the rows behind are counted.
const ROWS_BEHIND_EVERY: Duration = Duration::from_secs(10);

/// A running PostgreSQL or MySQL/MariaDB source.
#[derive(Debug)]
pub struct DbSource {
    pub config: DbSourceConfig,
    pub dialect: Dialect,
    pub ctx: SourceContext,
}

impl DbSource {
    /// Runs until shutdown. Blocking: call it on a thread of its own.
    pub fn run(mut self) -> anyhow::Result<()> {
        let id = self.config.id.clone();
        let password = self.config.password_source().load().map_err(|e| anyhow::anyhow!("source {id}: {e:#}"))?;
        let fail = |e: String| anyhow::anyhow!("source {id}: {e}");
        let mut reader: Box<dyn RowReader> = match (self.dialect, &self.config.logical) {
            (Dialect::Postgres, Some(_)) => {
                Box::new(logical::LogicalReader::new(&self.config, password).map_err(fail)?)
            }
            (Dialect::Postgres, None) => Box::new(postgres::PgReader::new(&self.config, password).map_err(fail)?),
            (Dialect::Mysql, _) => Box::new(mysql::MysqlReader::new(&self.config, password).map_err(fail)?),
        };
        run_polling(&self.config, &mut self.ctx, reader.as_mut())
    }
}

/// Runs a polling database source until shutdown. Blocking: call it on a thread of its own.
pub fn run_polling(config: &DbSourceConfig, ctx: &mut SourceContext, reader: &mut dyn RowReader) -> anyhow::Result<()> {
    let id = config.id.clone();
    let state = ctx.spool.source_state(&id)?;
    let mut position: KeyPosition = if state.position.is_empty() {
        KeyPosition::default()
    } else {
        serde_json::from_str(&state.position)
            .map_err(|e| anyhow::anyhow!("source {id}: the stored position is unreadable ({e})"))?
    };
    let mut next_seq = state.next_seq;
    let where_ = reader.describe();
    info!(source = %id, database = %where_, position = %position, next_seq, "database source started");
    let poll = Duration::from_millis(config.poll_interval_ms.max(10));
    let (mut rows_behind, mut rows_counted_at): (Option<u64>, Option<std::time::Instant>) = (None, None);
    let mut backoff = Backoff::new(poll, Duration::from_millis(config.max_backoff_ms.max(100)));
    let mut connected = false;
    while !ctx.shutdown.is_cancelled() {
        if !connected {
            match reader.connect() {
                Ok(()) => {
                    if backoff.failures > 0 {
                        info!(source = %id, database = %where_, attempts = backoff.failures, "database reconnected");
                    }
                    backoff.reset();
                    connected = true;
                }
                Err(e) => {
                    let delay = backoff.fail();
                    warn!(source = %id, database = %where_, error = %e, retry_ms = delay.as_millis() as u64, "cannot connect to the database; retrying");
                    report_error(ctx, format!("{where_}: {e}"));
                    sleep_unless_shutdown(ctx, delay);
                    continue;
                }
            }
        }
        let rows = match reader.read(&position, config.batch_rows) {
            Ok(rows) => rows,
            Err(e) => {
                let delay = backoff.fail();
                warn!(source = %id, database = %where_, error = %e, retry_ms = delay.as_millis() as u64, "database read failed; reconnecting");
                report_error(ctx, format!("{where_}: {e}"));
                connected = false;
                sleep_unless_shutdown(ctx, delay);
                continue;
            }
        };
        let n_rows = rows.len();
        ctx.spool.settle(n_rows > 0);
        if n_rows > 0 {
            match spool_rows(config, ctx, &where_, rows, &mut position, next_seq)? {
                Some(n) => next_seq = n,
                None => break,
            }
        }
        let waiting = reader.waiting_for();
        let caught_up = reader.caught_up();
        let wal = reader.retained_wal();
        if rows_counted_at.is_none_or(|t| t.elapsed() >= ROWS_BEHIND_EVERY) {
            rows_counted_at = Some(std::time::Instant::now());
            match reader.rows_behind(&position) {
                Ok(n) => rows_behind = n,
                Err(e) => warn!(source = %id, database = %where_, error = %e, "cannot count the rows behind"),
            }
        }
        update_status(&ctx.status, |s| {
            (s.retained_wal_bytes, s.max_retained_wal_bytes) = (wal.map(|w| w.0), wal.map(|w| w.1));
            s.rows_behind = rows_behind;
            // Held: rows may still be committed below the watermark by running transactions.
            s.state = match (n_rows > 0, &waiting, caught_up) {
                (true, _, _) => "running".into(),
                (false, Some(_), _) => "held".into(),
                // Rows noted by this read are taken by the next.
                (false, None, false) => "running".into(),
                (false, None, true) => "waiting".into(),
            };
            s.position = match &waiting {
                Some(w) => format!("{where_}: {position}; {w}"),
                None => format!("{where_}: {position}"),
            };
            s.next_seq = next_seq;
            if n_rows > 0 {
                s.last_error = None;
            }
        });
        if n_rows < config.batch_rows {
            sleep_unless_shutdown(ctx, poll);
        }
    }
    info!(source = %id, next_seq, "database source stopped");
    Ok(())
}

/// Maps rows and spools them with the position after the last; returns the next seq, or None
/// on shutdown while the spool was full.
pub(crate) fn spool_rows(
    config: &DbSourceConfig,
    ctx: &mut SourceContext,
    where_: &str,
    rows: Vec<Row>,
    position: &mut KeyPosition,
    mut next_seq: u64,
) -> anyhow::Result<Option<u64>> {
    let id = &config.id;
    let mut bodies = Vec::with_capacity(rows.len());
    let (mut dead, mut last_error) = (Vec::new(), None);
    let mut skipped = std::collections::BTreeMap::new();
    let mut new_position = position.clone();
    for row in rows {
        new_position.key = row.key;
        match ctx.map_record(&config.mapping, id, next_seq, &row.json) {
            super::Mapped::Event(body) => {
                bodies.push(body);
                next_seq += 1;
            }
            super::Mapped::Skipped(condition) => *skipped.entry(condition).or_default() += 1,
            super::Mapped::Bad(reason) => {
                warn!(source = %id, database = %where_, position = %new_position, reason = %reason, "bad row skipped");
                let location = serde_json::json!({ "database": where_, "position": new_position.key });
                dead.push(super::dead_letter::entry(id, location, &reason, row.json.as_bytes()));
                last_error = Some(format!("row at {new_position}: {reason}"));
            }
        }
    }
    let stored = serde_json::to_string(&new_position)?;
    if !ctx.commit(id, Commit { bodies, position: stored, dead, last_error, skipped }) {
        return Ok(None);
    }
    *position = new_position;
    Ok(Some(next_seq))
}

pub(crate) fn report_error(ctx: &SourceContext, message: String) {
    update_status(&ctx.status, |s| {
        s.state = "error".into();
        s.last_error = Some(message);
    });
}

/// Sleeps, waking early on shutdown.
pub(crate) fn sleep_unless_shutdown(ctx: &SourceContext, delay: Duration) {
    let deadline = std::time::Instant::now() + delay;
    while !ctx.shutdown.is_cancelled() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            break;
        }
        std::thread::sleep(left.min(Duration::from_millis(50)));
    }
}

/// Exponential backoff with jitter, from `base` up to `max`.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    max: Duration,
    pub(crate) failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, max: Duration) -> Backoff {
        Backoff { base, max, failures: 0 }
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// The wait after one more failure.
    pub(crate) fn fail(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        crate::retry::backoff(self.base, self.failures, self.max).max(Duration::from_millis(10))
    }
}

#[cfg(test)]
mod tests;
