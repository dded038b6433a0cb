//! Sources: the things an agent reads records from.
//!
//! Every source is built from its [`SourceConfig`] and runs on a thread of its own (reading
//! files and databases blocks), appending mapped events and its new position to the spool in
//! one transaction, then waking the shipper. Kinds: [`file`], [`sqlite`] and [`db`]
//! (PostgreSQL, MySQL/MariaDB).

pub mod db;
mod dead_letter;
pub mod file;
pub mod sqlite;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actidash_shared::wire::SourceStatus;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::mapping::MappingConfig;
use crate::spool::Spool;

/// The configuration of one source, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// A growing file of records.
    File(file::FileSourceConfig),
    /// A table or query of a SQLite database, read incrementally.
    Sqlite(sqlite::SqliteSourceConfig),
    /// A table or query of a PostgreSQL database, polled; or its changes by logical replication.
    Postgres(db::DbSourceConfig),
    /// A table or query of a MySQL or MariaDB database, polled.
    Mysql(db::DbSourceConfig),
}

impl SourceConfig {
    pub fn id(&self) -> &str {
        match self {
            SourceConfig::File(c) => &c.id,
            SourceConfig::Sqlite(c) => &c.id,
            SourceConfig::Postgres(c) | SourceConfig::Mysql(c) => &c.id,
        }
    }

    pub fn mapping(&self) -> &MappingConfig {
        match self {
            SourceConfig::File(c) => &c.mapping,
            SourceConfig::Sqlite(c) => &c.mapping,
            SourceConfig::Postgres(c) | SourceConfig::Mysql(c) => &c.mapping,
        }
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        match self {
            SourceConfig::File(c) => c.resolve_paths(base),
            SourceConfig::Sqlite(c) => {
                if c.path.is_relative() {
                    c.path = base.join(&c.path);
                }
            }
            SourceConfig::Postgres(c) | SourceConfig::Mysql(c) => {
                crate::secret::resolve(&mut c.password_file, base);
                if let Some(tls) = &mut c.tls
                    && tls.ca_file.is_relative()
                {
                    tls.ca_file = base.join(&tls.ca_file);
                }
            }
        }
    }
}

/// The thread body of a source.
pub type Runner = Box<dyn FnOnce() -> anyhow::Result<()> + Send>;

/// The thread body that runs `source` with `ctx` until its shutdown.
pub fn runner(source: SourceConfig, ctx: SourceContext) -> Runner {
    match source {
        SourceConfig::File(config) => {
            let source = file::FileSource { config, ctx };
            Box::new(move || source.run())
        }
        SourceConfig::Sqlite(config) => {
            let source = sqlite::SqliteSource { config, ctx };
            Box::new(move || source.run())
        }
        SourceConfig::Postgres(config) => {
            let source = db::DbSource { config, dialect: db::Dialect::Postgres, ctx };
            Box::new(move || source.run())
        }
        SourceConfig::Mysql(config) => {
            let source = db::DbSource { config, dialect: db::Dialect::Mysql, ctx };
            Box::new(move || source.run())
        }
    }
}

/// A source's live status, shared with the heartbeat.
pub type SharedStatus = Arc<Mutex<SourceStatus>>;

/// Updates a shared status, tolerating a poisoned lock (a status is only informational).
pub(crate) fn update_status(status: &SharedStatus, f: impl FnOnce(&mut SourceStatus)) {
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}

/// What every running source needs besides its own configuration.
#[derive(Debug)]
pub struct SourceContext {
    pub tenant: String,
    pub agent_id: String,
    /// The source's own spool connection.
    pub spool: Spool,
    pub status: SharedStatus,
    /// Woken after each commit, so the shipper sends without waiting for its own tick.
    pub spooled: Arc<Notify>,
    pub shutdown: CancellationToken,
    /// Where refused records go, with their reason and location (a JSON-lines file).
    pub dead_letter: PathBuf,
    /// The largest event the gateway can deliver, as its last Welcome said (shared with the
    /// shipper; [`NO_EVENT_LIMIT`] until one does).
    pub event_limit: EventLimit,
    /// The newest event time (Unix ms) mapped since the last commit; the status takes it once
    /// the events are spooled.
    pub newest_event_ms: std::sync::atomic::AtomicI64,
    /// The seq after the source's last spooled event, published after each commit (shared with
    /// the shipper, which reads the spool only for sources with events it has not sent).
    pub head: SpoolHead,
}

/// The seq after a source's last spooled event (see [`SourceContext::head`]).
pub type SpoolHead = Arc<std::sync::atomic::AtomicU64>;

/// The largest event the gateway can deliver, in bytes of its JSON.
pub type EventLimit = Arc<std::sync::atomic::AtomicU64>;

/// No limit known (no gateway has said one yet).
pub const NO_EVENT_LIMIT: u64 = u64::MAX;

/// One read's worth of a source's output.
#[derive(Debug, Default)]
pub(crate) struct Commit {
    /// The events, serialized.
    pub(crate) bodies: Vec<Vec<u8>>,
    /// The source's position after them (JSON).
    pub(crate) position: String,
    /// Dead-letter entries of the records refused.
    pub(crate) dead: Vec<String>,
    pub(crate) last_error: Option<String>,
    /// Records skipped by the mapping's conditions, by condition.
    pub(crate) skipped: BTreeMap<String, u64>,
}

/// What a record became.
#[derive(Debug)]
pub(crate) enum Mapped {
    /// An event, as spooled.
    Event(Vec<u8>),
    /// Skipped by the named condition of the mapping.
    Skipped(String),
    /// A bad record, with why.
    Bad(String),
}

impl SourceContext {
    /// Maps one record (JSON text) of `source_id` to its spooled event numbered `seq`.
    pub(crate) fn map_record(&self, mapping: &MappingConfig, source_id: &str, seq: u64, text: &str) -> Mapped {
        // The payload borrows from `data` and is written out at once: no event is built.
        let mut data = String::with_capacity(text.len());
        match mapping.apply_view(text, &mut data) {
            Ok((time, payload)) => {
                self.newest_event_ms.fetch_max(time.timestamp_millis(), std::sync::atomic::Ordering::Relaxed);
                // The gateway's own checks: what it would refuse never enters the spool.
                let sealed =
                    actidash_shared::event::event_json(&self.tenant, &self.agent_id, source_id, seq, &time, &payload)
                        .map_err(|e| e.to_string())
                        .and_then(|body| self.within_limit(body));
                match sealed {
                    Ok(body) => Mapped::Event(body),
                    Err(reason) => Mapped::Bad(reason),
                }
            }
            Err(crate::mapping::MappingError::Skipped { condition }) => Mapped::Skipped(condition),
            Err(e) => Mapped::Bad(e.to_string()),
        }
    }

    /// An event's JSON as spooled, or why it cannot be delivered: it is bigger than the
    /// gateway's limit.
    fn within_limit(&self, body: Vec<u8>) -> Result<Vec<u8>, String> {
        let limit = self.event_limit.load(std::sync::atomic::Ordering::Relaxed);
        if body.len() as u64 > limit {
            return Err(format!(
                "event of {} bytes is larger than the gateway can deliver ({limit} bytes)",
                body.len()
            ));
        }
        Ok(body)
    }

    /// Writes the dead letters, then the events with the new position and the error count in
    /// one spool transaction, and wakes the shipper. While the spool is full (or the disk, or
    /// the spool is unwritable) the same append is retried: the source is paused and keeps its
    /// position, and each bad record is counted once. Returns false if the agent shut down
    /// while waiting.
    pub(crate) fn commit(&mut self, source_id: &str, commit: Commit) -> bool {
        // Before the spool commit: a crash in between writes an entry twice, never loses one.
        if !commit.dead.is_empty()
            && let Err(e) = dead_letter::append(&self.dead_letter, &commit.dead)
        {
            warn!(source = %source_id, path = %self.dead_letter.display(), error = %e, "cannot write the dead-letter file");
        }
        let n_errors = commit.dead.len() as u64;
        let mut delay = Duration::from_millis(100);
        let mut paused_since: Option<Instant> = None;
        let first_seq = loop {
            let e = match self.spool.append(source_id, &commit.bodies, &commit.position, n_errors) {
                Ok(first_seq) => break first_seq,
                Err(e) => e,
            };
            if let crate::spool::SpoolError::Blocked { reason, .. } = &e {
                tracing::error!(source = %source_id, reason = %reason, "source stopped: its next seq is unknown");
                update_status(&self.status, |s| {
                    s.state = "error".into();
                    s.last_error = Some(e.to_string());
                });
                return false;
            }
            if paused_since.is_none() {
                if e.is_full() {
                    warn!(source = %source_id, error = %e, "spool full: source paused, keeping its position");
                } else {
                    warn!(source = %source_id, error = %e, "cannot write to the spool: source paused, retrying");
                }
                paused_since = Some(Instant::now());
                update_status(&self.status, |s| {
                    s.state = "paused".into();
                    s.last_error = Some(e.to_string());
                });
            }
            if self.shutdown.is_cancelled() {
                return false;
            }
            std::thread::sleep(delay);
            delay = (delay * 2).min(Duration::from_secs(2));
        };
        // Before waking the shipper: it reads this to know there is something to send.
        self.head.fetch_max(first_seq + commit.bodies.len() as u64, std::sync::atomic::Ordering::Release);
        if let Some(since) = paused_since {
            info!(source = %source_id, paused_ms = since.elapsed().as_millis() as u64, "spool has room again: source resumed");
        }
        let newest = self.newest_event_ms.swap(i64::MIN, std::sync::atomic::Ordering::Relaxed);
        update_status(&self.status, |s| {
            if newest != i64::MIN && !commit.bodies.is_empty() {
                s.last_event_time_ms = Some(s.last_event_time_ms.map_or(newest, |t| t.max(newest)));
            }
            s.n_errors += n_errors;
            if commit.last_error.is_some() {
                s.last_error = commit.last_error;
            }
            for (condition, n) in commit.skipped {
                *s.skipped.entry(condition).or_default() += n;
            }
        });
        if !commit.bodies.is_empty() {
            self.spooled.notify_one();
        }
        true
    }
}
