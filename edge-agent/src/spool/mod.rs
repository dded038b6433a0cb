//! The durable spool: a SQLite database (WAL mode) between the sources and the shipper.
//!
//! # Schema
//! `events(source_id, seq, body)` holds every event not yet acknowledged by the cloud, and
//! `sources(source_id, next_seq, position, n_errors)` holds each source's read position.
//! Migrations are numbered files under `edge-agent/migrations/`, applied by `PRAGMA user_version`.
//!
//! # Invariants
//! * A source's events and its new position are written in **one transaction**: after a crash
//!   the spool holds exactly the events read up to the stored position, so a restarted source
//!   neither skips nor re-reads a record.
//! * `seq` is assigned here, per source, gap-free and increasing from 0; a seq is never reused
//!   (the `sources.next_seq` counter only grows).
//! * A row is deleted only after the cloud acknowledged its seq ([`Spool::ack`]).
//! * Rows of one source present in the spool form one contiguous range of seqs: acknowledgements
//!   may arrive out of order, so a hole can open temporarily, but the shipper only ever reads
//!   forward from its own cursor and re-reads from the oldest row after a reconnection.
//!
//! Each component opens its own [`Spool`] handle (one SQLite connection each); SQLite's WAL
//! lets the shipper read while a source writes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

const MIGRATIONS: &[&str] = &[include_str!("../../migrations/0001_init.sql")];

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("spool {path} has schema version {found}, newer than this agent's {known}")]
    TooNew { path: PathBuf, found: usize, known: usize },
}

/// One spooled event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledEvent {
    pub seq: u64,
    pub body: Vec<u8>,
}

/// A source's stored state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SourceState {
    pub next_seq: u64,
    /// The source's position as JSON (opaque to the spool), empty for a new source.
    pub position: String,
    pub n_errors: u64,
}

/// Depth of the spool, for heartbeats and `spool inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    pub n_events: u64,
    pub n_bytes: u64,
}

/// A handle on the spool database.
pub struct Spool {
    path: PathBuf,
    conn: Connection,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

impl Spool {
    /// Opens (and creates or migrates) the spool at `path`.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        let conn = Connection::open(path).map_err(|source| SpoolError::Sqlite { path: path.to_owned(), source })?;
        let mut spool = Spool { path: path.to_owned(), conn };
        spool.init().map_err(|source| SpoolError::Sqlite { path: path.to_owned(), source })?;
        let version: usize =
            spool.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(|e| spool.err(e))?;
        if version > MIGRATIONS.len() {
            return Err(SpoolError::TooNew { path: path.to_owned(), found: version, known: MIGRATIONS.len() });
        }
        for (idx, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = spool
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|source| SpoolError::Sqlite { path: path.to_owned(), source })?;
            tx.execute_batch(sql)
                .and_then(|()| tx.pragma_update(None, "user_version", idx + 1))
                .and_then(|()| tx.commit())
                .map_err(|source| SpoolError::Sqlite { path: path.to_owned(), source })?;
        }
        Ok(spool)
    }

    fn init(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(Duration::from_secs(30))?;
        self.conn.pragma_update(None, "journal_mode", "WAL")?;
        // NORMAL in WAL mode: a commit survives a crash of the process (not a power loss).
        self.conn.pragma_update(None, "synchronous", "NORMAL")?;
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::Sqlite { path: self.path.clone(), source }
    }

    /// The stored state of `source_id` (zeroes for a new source).
    pub fn source_state(&self, source_id: &str) -> Result<SourceState, SpoolError> {
        self.conn
            .query_row(
                "SELECT next_seq, position, n_errors FROM sources WHERE source_id = ?1",
                params![source_id],
                |r| {
                    Ok(SourceState {
                        next_seq: r.get::<_, i64>(0)? as u64,
                        position: r.get(1)?,
                        n_errors: r.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    /// Appends events of `source_id` numbered from its `next_seq`, and stores its new position
    /// and error count, in one transaction. Returns the seq of the first appended event.
    pub fn append(
        &mut self,
        source_id: &str,
        bodies: &[Vec<u8>],
        position: &str,
        n_new_errors: u64,
    ) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let e = |source| SpoolError::Sqlite { path: path.clone(), source };
        // IMMEDIATE: take the write lock up front. A deferred transaction that reads first
        // cannot be upgraded once another connection wrote (SQLITE_BUSY_SNAPSHOT).
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
        let first_seq: u64 = tx
            .query_row("SELECT next_seq FROM sources WHERE source_id = ?1", params![source_id], |r| r.get::<_, i64>(0))
            .optional()
            .map_err(e)?
            .unwrap_or(0) as u64;
        {
            let mut insert =
                tx.prepare_cached("INSERT INTO events (source_id, seq, body) VALUES (?1, ?2, ?3)").map_err(e)?;
            for (idx, body) in bodies.iter().enumerate() {
                insert.execute(params![source_id, (first_seq + idx as u64) as i64, body]).map_err(e)?;
            }
        }
        tx.execute(
            "INSERT INTO sources (source_id, next_seq, position, n_errors) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (source_id) DO UPDATE SET next_seq = excluded.next_seq, position = excluded.position,
                 n_errors = sources.n_errors + ?4",
            params![source_id, (first_seq + bodies.len() as u64) as i64, position, n_new_errors as i64],
        )
        .map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(first_seq)
    }

    /// Up to `max_events` consecutive events of `source_id` from `from_seq` on, stopping before
    /// `max_bytes` would be exceeded (at least one event is returned if any exists).
    pub fn read(
        &self,
        source_id: &str,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<SpooledEvent>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT seq, body FROM events WHERE source_id = ?1 AND seq >= ?2 ORDER BY seq LIMIT ?3")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![source_id, from_seq as i64, max_events as i64], |r| {
                Ok(SpooledEvent { seq: r.get::<_, i64>(0)? as u64, body: r.get(1)? })
            })
            .map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        let mut n_bytes = 0;
        let mut expected = from_seq;
        for row in rows {
            let row = row.map_err(|e| self.err(e))?;
            // Stop at a hole (an out-of-order ack deleted rows ahead of an unacked one).
            if (!out.is_empty() && row.seq != expected) || (!out.is_empty() && n_bytes + row.body.len() > max_bytes) {
                break;
            }
            expected = row.seq + 1;
            n_bytes += row.body.len();
            out.push(row);
        }
        Ok(out)
    }

    /// The smallest seq of `source_id` still in the spool.
    pub fn oldest_seq(&self, source_id: &str) -> Result<Option<u64>, SpoolError> {
        self.conn
            .query_row("SELECT min(seq) FROM events WHERE source_id = ?1", params![source_id], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.map(|s| s as u64))
            .map_err(|e| self.err(e))
    }

    /// The cloud acknowledged `first_seq .. first_seq + count` of `source_id`: delete them.
    pub fn ack(&mut self, source_id: &str, first_seq: u64, count: u32) -> Result<usize, SpoolError> {
        self.conn
            .execute(
                "DELETE FROM events WHERE source_id = ?1 AND seq >= ?2 AND seq < ?3",
                params![source_id, first_seq as i64, (first_seq + u64::from(count)) as i64],
            )
            .map_err(|e| self.err(e))
    }

    /// Every source known to the spool.
    pub fn source_ids(&self) -> Result<Vec<String>, SpoolError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT source_id FROM sources ORDER BY source_id").map_err(|e| self.err(e))?;
        let ids = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
        ids.collect::<Result<Vec<String>, _>>().map_err(|e| self.err(e))
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let n_events: i64 =
            self.conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        let page_count: i64 =
            self.conn.pragma_query_value(None, "page_count", |r| r.get(0)).map_err(|e| self.err(e))?;
        let page_size: i64 = self.conn.pragma_query_value(None, "page_size", |r| r.get(0)).map_err(|e| self.err(e))?;
        Ok(SpoolStats { n_events: n_events as u64, n_bytes: (page_count * page_size) as u64 })
    }
}

#[cfg(test)]
mod tests;
