//! The durable spool: a bounded SQLite database (WAL mode) between the sources and the shipper.
//!
//! # Schema
//! `events(key, body, crc, spooled_at, n, packed, raw_bytes, max_len)` holds every event not yet
//! acknowledged by the cloud, in blocks: a row is events `seq .. seq + n` of one source (the key
//! packs the source's number and the first seq), its body the batch payload they are sent as (a
//! zstd frame of their JSON lines; one event's JSON in rows spooled before schema version 4); `sources(source_id, next_seq, position, n_errors, n_dropped, n_quarantined)` each
//! source's read position and counters; `totals` the running count and bytes of `events`;
//! `quarantine` damaged events. Migrations are numbered files under `edge-agent/migrations/`,
//! applied by `PRAGMA user_version`.
//!
//! # Invariants
//! * A source's events and its new position are written in **one transaction**: after a crash
//!   the spool holds exactly the events read up to the stored position, so a restarted source
//!   neither skips nor re-reads a record.
//! * `seq` is assigned here, per source, increasing from 0; a seq is never reused (the
//!   `sources.next_seq` counter only grows).
//! * A row is deleted only after the cloud acknowledged its seq ([`Spool::ack`]), or when
//!   `when_full = "drop_oldest"` makes room (counted in `sources.n_dropped`), or when it is
//!   found damaged (moved to `quarantine`, counted in `sources.n_quarantined`).
//! * `totals` always equals `sum(n)` and `sum(raw_bytes)` of `events`.
//! * A row's seqs are consecutive; removing some of them (a partial ack, single refusals,
//!   `drop_oldest`) packs the rest again, one row per run, in the same transaction.
//! * The spool never holds more than `max_bytes` of event bodies: with `when_full = "pause"`
//!   (the default) an append that does not fit fails with [`SpoolError::Full`] and the source
//!   waits, keeping its position. The one exception is a single commit larger than the whole
//!   limit (a source's batch of up to 5 000 records, in a small spool): it is taken alone, into
//!   an empty spool (`drop_oldest`: after dropping everything), since waiting could never make
//!   room for it.
//!
//! # Durability
//! `durability = "process"` (default): a commit survives a crash of the agent process, not a
//! power loss (WAL with `synchronous = NORMAL`). `durability = "power"`: a commit is fsynced
//! (`synchronous = FULL`) and survives a power loss. Their cost is measured by the spool
//! benchmark (docs/BENCHMARKS.md).
//!
//! Each component opens its own [`Spool`] handle (one SQLite connection each); WAL lets the
//! shipper read while a source writes, and write transactions take the lock up front
//! (`IMMEDIATE`), so concurrent writers queue instead of failing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use actidash_shared::batch::{Packer, RefusalKind};
use actidash_shared::wire::Codec;

use rusqlite::{Connection, ErrorCode, OptionalExtension, TransactionBehavior, params};
use serde::Deserialize;

const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/0001_init.sql"),
    include_str!("../../migrations/0002_refused.sql"),
    include_str!("../../migrations/0003_refusal_kinds.sql"),
    include_str!("../../migrations/0004_blocks.sql"),
];

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Sources stop reading (keeping their positions) until the shipper frees space.
    #[default]
    Pause,
    /// The oldest events are deleted to make room; every dropped event is counted.
    DropOldest,
}

/// How durable a commit is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Survives a crash of the process (WAL, `synchronous = NORMAL`).
    #[default]
    Process,
    /// Survives a power loss (`synchronous = FULL`: an fsync per commit).
    Power,
}

/// The `[spool]` section of the agent configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Most bytes of event bodies the spool holds (default 1 GiB).
    pub max_bytes: u64,
    /// `pause` (default) or `drop_oldest`.
    pub when_full: WhenFull,
    /// `process` (default) or `power`.
    pub durability: Durability,
}

impl Default for SpoolConfig {
    fn default() -> SpoolConfig {
        SpoolConfig { max_bytes: 1 << 30, when_full: WhenFull::Pause, durability: Durability::Process }
    }
}

/// A spool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path} is full: {used} of {limit} bytes used, {needed} more needed")]
    Full { path: PathBuf, used: u64, limit: u64, needed: u64 },
    #[error("spool {path}: the disk is full")]
    DiskFull { path: PathBuf },
    #[error("spool {path} is damaged: {source}")]
    Corrupt { path: PathBuf, source: rusqlite::Error },
    #[error("spool {path}: {source}")]
    Sqlite { path: PathBuf, source: rusqlite::Error },
    #[error("spool {path} has schema version {found}, newer than this agent's {known}")]
    TooNew { path: PathBuf, found: usize, known: usize },
    #[error("spool {path}: cannot salvage: {reason}")]
    Salvage { path: PathBuf, reason: String },
    #[error("spool {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("spool {path}: source {source_id} is stopped: {reason}")]
    Blocked { path: PathBuf, source_id: String, reason: String },
}

impl SpoolError {
    fn from_sqlite(path: &Path, source: rusqlite::Error) -> SpoolError {
        match source.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => SpoolError::DiskFull { path: path.to_owned() },
            Some(ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase) => {
                SpoolError::Corrupt { path: path.to_owned(), source }
            }
            _ => SpoolError::Sqlite { path: path.to_owned(), source },
        }
    }

    /// Whether waiting (for the shipper to free space, or for the disk) can resolve it.
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::Full { .. } | SpoolError::DiskFull { .. })
    }
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
    pub n_dropped: u64,
    pub n_quarantined: u64,
    /// Events the gateway refused for good, moved to `refused`.
    pub n_refused: u64,
    /// Why appending is refused (a salvage could not establish the next seq), if it is.
    pub blocked: Option<String>,
}

/// An event the gateway refused for good, with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedEvent {
    pub source_id: String,
    pub seq: u64,
    pub body: Vec<u8>,
    /// The kind of refusal ([`RefusalKind::as_str`]).
    pub kind: String,
    pub reason: String,
    /// Unix milliseconds.
    pub at: i64,
}

/// Depth of the spool, for heartbeats and `spool inspect`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SpoolStats {
    pub n_events: u64,
    /// Bytes of event bodies (what `max_bytes` limits).
    pub n_bytes: u64,
    /// Size of the database file.
    pub file_bytes: u64,
    /// When the oldest event was spooled (unix milliseconds).
    pub oldest_spooled_at: Option<i64>,
}

/// What [`Spool::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// `PRAGMA integrity_check` messages other than "ok".
    pub integrity_errors: Vec<String>,
    pub n_checked: u64,
    /// (source, seq) of rows whose checksum does not match.
    pub bad_checksums: Vec<(String, u64)>,
    /// Whether `totals` disagrees with the rows.
    pub totals_mismatch: bool,
}

impl VerifyReport {
    pub fn is_ok(&self) -> bool {
        self.integrity_errors.is_empty() && self.bad_checksums.is_empty() && !self.totals_mismatch
    }
}

/// What [`Spool::salvage`] recovered from a damaged database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SalvageReport {
    pub n_saved: u64,
    /// Events known to have been in the spool (seqs below `next_seq` not yet acknowledged
    /// cannot be told apart from acknowledged ones, so this counts rows that failed to read).
    pub n_lost: u64,
    /// Where the damaged file was copied.
    pub damaged_copy: PathBuf,
    /// Sources whose next seq could not be established: kept, but blocked (they stop).
    pub blocked: Vec<String>,
}

/// A handle on the spool database.
pub struct Spool {
    path: PathBuf,
    conn: Connection,
    config: SpoolConfig,
    /// Packs blocks (appends, and what a partial removal keeps).
    packer: Packer,
    block_events: usize,
    block_bytes: u64,
    /// Sources' numbers read so far (a number, once given, never changes).
    numbers: std::collections::HashMap<String, i64>,
    /// The owner's quiet spell (see [`Spool::settle`]).
    quiet: crate::quiet::Quiet,
}

impl std::fmt::Debug for Spool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spool").field("path", &self.path).finish()
    }
}

/// The row columns of a spool of any version (rows before version 4 hold one event each).
fn salvage_columns(old: &Connection) -> &'static str {
    if old.prepare("SELECT n, packed, raw_bytes, max_len FROM events LIMIT 0").is_ok() {
        "n, packed, raw_bytes, max_len"
    } else {
        "1, 0, length(body), length(body)"
    }
}

/// Copies the readable rows of source `no` from a damaged database into `tx`; returns (events
/// saved, events lost, bytes saved). Rows are read by range; where a damaged page stops the
/// scan, the scan probes forward with a doubling step, and the seqs it skips over count as lost.
fn salvage_source(
    old: &Connection,
    tx: &rusqlite::Transaction<'_>,
    no: i64,
    next_seq: u64,
) -> rusqlite::Result<(u64, u64, i64)> {
    let end = event_key(no, next_seq);
    let (mut saved, mut lost, mut bytes) = (0u64, 0u64, 0i64);
    let mut cursor = event_key(no, 0) - 1; // last key handled
    let mut handled_end = event_key(no, 0); // the key after the last event handled
    let mut stmt = old.prepare(&format!(
        // The columns of `row_of`, in its order.
        "SELECT key, body, crc, {}, spooled_at FROM events WHERE key > ?1 AND key < ?2 ORDER BY key",
        salvage_columns(old)
    ))?;
    let mut step = 1i64;
    let mut damaged_since: Option<i64> = None;
    while cursor < end - 1 {
        let mut progressed = false;
        let scan: rusqlite::Result<()> = (|| {
            let mut rows = stmt.query(params![cursor, end])?;
            while let Some(row) = rows.next()? {
                let (key, crc, block) = row_of(row)?;
                if let Some(from) = damaged_since.take() {
                    lost += (key - from).max(0) as u64;
                }
                if i64::from(crc32fast::hash(&block.body)) == crc {
                    insert_block(tx, no, &block)?;
                    saved += block.n;
                    bytes += block.raw_bytes as i64;
                } else {
                    lost += block.n;
                }
                cursor = key;
                handled_end = key + block.n as i64;
                progressed = true;
            }
            Ok(())
        })();
        match scan {
            Ok(()) => break,
            Err(_) => {
                // A damaged page: skip ahead and try again.
                if progressed {
                    step = 1;
                }
                damaged_since.get_or_insert(handled_end);
                cursor = cursor.saturating_add(step).min(end - 1);
                step = step.saturating_mul(2);
            }
        }
    }
    if let Some(from) = damaged_since {
        // The damage ran to the end: everything after the last readable row up to next_seq
        // that is not found is lost.
        lost += (end - from).max(0) as u64;
    }
    Ok((saved, lost, bytes))
}

/// Bits of an event's key that hold its seq; the bits above hold its source's number.
const SEQ_BITS: u32 = 40;

/// The most events and bytes of events' JSON a block holds unless set otherwise
/// ([`Spool::set_block_limits`]): the shipper's default batch, so that a block is sent as it is.
pub const DEFAULT_BLOCK_EVENTS: usize = 2_000;
pub const DEFAULT_BLOCK_BYTES: u64 = 2 * 1024 * 1024;

/// The key of event `seq` of source number `source_no`.
fn event_key(source_no: i64, seq: u64) -> i64 {
    (source_no << SEQ_BITS) | (seq as i64 & ((1 << SEQ_BITS) - 1))
}

fn seq_of(key: i64) -> u64 {
    (key & ((1 << SEQ_BITS) - 1)) as u64
}

/// The number of `source_id` (None if the spool has never seen it).
fn source_no(conn: &Connection, source_id: &str) -> rusqlite::Result<Option<i64>> {
    conn.prepare_cached("SELECT source_no FROM sources WHERE source_id = ?1")?
        .query_row(params![source_id], |r| r.get(0))
        .optional()
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// One row of the spool: events `first_seq .. first_seq + n` of one source (consecutive seqs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpooledBlock {
    pub first_seq: u64,
    pub n: u64,
    /// Bytes of the events' JSON (what the spool's and a batch's byte limits count).
    pub raw_bytes: u64,
    /// Bytes of the block's largest event.
    pub max_len: u64,
    /// A zstd frame of the events' JSON lines (a [`Codec::Zstd`] batch payload), or, in a row
    /// spooled before schema version 4, one event's JSON.
    body: Vec<u8>,
    packed: bool,
    spooled_at: i64,
}

impl SpooledBlock {
    /// The seq after the block's last event.
    pub fn end_seq(&self) -> u64 {
        self.first_seq + self.n
    }

    /// The block as a zstd batch payload, without packing it again where it is one already.
    pub fn payload(&self) -> Option<&[u8]> {
        self.packed.then_some(self.body.as_slice())
    }

    /// The block's events with their seqs. Err names what is wrong with a block that does not
    /// unpack into its `n` events (a checksum that matches makes this a bug, not damage).
    pub fn events(&self) -> Result<Vec<(u64, Vec<u8>)>, String> {
        if !self.packed {
            return Ok(vec![(self.first_seq, self.body.clone())]);
        }
        let plain = zstd::bulk::decompress(&self.body, (self.raw_bytes + self.n) as usize)
            .map_err(|e| format!("block does not decompress: {e}"))?;
        let lines = plain.strip_suffix(b"\n").unwrap_or(&plain);
        let events: Vec<(u64, Vec<u8>)> =
            lines.split(|b| *b == b'\n').enumerate().map(|(i, l)| (self.first_seq + i as u64, l.to_vec())).collect();
        if plain.is_empty() || events.len() as u64 != self.n {
            return Err(format!("block holds {} events, its row says {}", events.len(), self.n));
        }
        Ok(events)
    }
}

/// The columns of [`row_of`], then the rest of the statement.
macro_rules! select_rows {
    ($rest:literal) => {
        concat!("SELECT key, body, crc, n, packed, raw_bytes, max_len, spooled_at FROM events ", $rest)
    };
}

/// (key, crc, block) of a row selected by [`select_rows`].
fn row_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, i64, SpooledBlock)> {
    let key: i64 = r.get(0)?;
    Ok((
        key,
        r.get(2)?,
        SpooledBlock {
            first_seq: seq_of(key),
            n: r.get::<_, i64>(3)? as u64,
            raw_bytes: r.get::<_, i64>(5)? as u64,
            max_len: r.get::<_, i64>(6)? as u64,
            body: r.get(1)?,
            packed: r.get::<_, i64>(4)? != 0,
            spooled_at: r.get(7)?,
        },
    ))
}

/// Packs events `seq, seq + 1, …` into a row.
fn pack_block(packer: &mut Packer, first_seq: u64, events: &[&[u8]], spooled_at: i64) -> SpooledBlock {
    SpooledBlock {
        first_seq,
        n: events.len() as u64,
        raw_bytes: events.iter().map(|e| e.len() as u64).sum(),
        max_len: events.iter().map(|e| e.len() as u64).max().unwrap_or(0),
        body: packer.pack(events.iter().copied(), Codec::Zstd),
        packed: true,
        spooled_at,
    }
}

fn insert_block(tx: &Connection, no: i64, block: &SpooledBlock) -> rusqlite::Result<()> {
    tx.prepare_cached(
        "INSERT INTO events (key, body, crc, spooled_at, n, packed, raw_bytes, max_len) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        event_key(no, block.first_seq),
        block.body,
        crc32fast::hash(&block.body),
        block.spooled_at,
        block.n as i64,
        i64::from(block.packed),
        block.raw_bytes as i64,
        block.max_len as i64,
    ])?;
    Ok(())
}

/// The key rows of source `no` holding seq `from_seq` or later start at: the key of the row
/// holding `from_seq` if one does (a block that begins before it), else `from_seq`'s.
fn start_key(conn: &Connection, no: i64, from_seq: u64) -> rusqlite::Result<i64> {
    let at = event_key(no, from_seq);
    let holding: Option<(i64, i64)> = conn
        .prepare_cached("SELECT key, n FROM events WHERE key >= ?1 AND key <= ?2 ORDER BY key DESC LIMIT 1")?
        .query_row(params![event_key(no, 0), at], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match holding {
        Some((key, n)) if key + n > at => key,
        _ => at,
    })
}

/// What a [`Spool::scan`] does after a block.
enum Step {
    Next,
    Stop,
    /// The block is damaged (why): quarantine it and go on.
    Damaged(SpooledBlock, String),
}

/// What [`remove_events`] took out of the spool.
#[derive(Default)]
struct Removed {
    n: u64,
    bytes: u64,
    /// (seq, JSON) of the removed events, when asked for.
    events: Vec<(u64, Vec<u8>)>,
}

/// Removes the events of source `no` with seqs in `from .. to` (those `pick` names, or all)
/// from the spool, keeping the running totals. A block partly inside is unpacked and the events
/// it keeps are packed again, one row per run of consecutive seqs. A row that fails its checksum
/// or does not unpack is quarantined whole (counted for `source_id`).
fn remove_events(
    tx: &Connection,
    packer: &mut Packer,
    source_id: &str,
    (no, from, to): (i64, u64, u64),
    pick: Option<&dyn Fn(u64) -> bool>,
    want_bodies: bool,
) -> rusqlite::Result<Removed> {
    let mut removed = Removed::default();
    if from >= to {
        return Ok(removed);
    }
    let rows: Vec<(i64, i64, SpooledBlock)> = tx
        .prepare_cached(select_rows!("WHERE key >= ?1 AND key < ?2 ORDER BY key"))?
        .query_map(params![start_key(tx, no, from)?, event_key(no, to)], row_of)?
        .collect::<rusqlite::Result<_>>()?;
    for (key, crc, block) in rows {
        let whole = pick.is_none() && block.first_seq >= from && block.end_seq() <= to;
        if whole && !want_bodies {
            tx.prepare_cached("DELETE FROM events WHERE key = ?1")?.execute(params![key])?;
            removed.n += block.n;
            removed.bytes += block.raw_bytes;
            continue;
        }
        let events = if i64::from(crc32fast::hash(&block.body)) == crc {
            block.events()
        } else {
            Err("checksum mismatch".to_owned())
        };
        let events = match events {
            Ok(events) => events,
            Err(reason) => {
                quarantine_block(tx, source_id, key, &block, &reason)?;
                continue;
            }
        };
        tx.prepare_cached("DELETE FROM events WHERE key = ?1")?.execute(params![key])?;
        let mut run: Vec<&[u8]> = Vec::new();
        let mut run_first = 0;
        for (seq, body) in &events {
            let goes = (from..to).contains(seq) && pick.is_none_or(|p| p(*seq));
            if goes {
                if !run.is_empty() {
                    insert_block(tx, no, &pack_block(packer, run_first, &run, block.spooled_at))?;
                    run.clear();
                }
                removed.n += 1;
                removed.bytes += body.len() as u64;
                if want_bodies {
                    removed.events.push((*seq, body.clone()));
                }
            } else {
                if run.is_empty() {
                    run_first = *seq;
                }
                run.push(body);
            }
        }
        if !run.is_empty() {
            insert_block(tx, no, &pack_block(packer, run_first, &run, block.spooled_at))?;
        }
    }
    tx.prepare_cached("UPDATE totals SET n_events = n_events - ?1, n_bytes = n_bytes - ?2 WHERE id = 1")?
        .execute(params![removed.n as i64, removed.bytes as i64])?;
    Ok(removed)
}

/// Moves a damaged row to quarantine (its body kept as stored), counts its events against the
/// source and takes them out of the spool's totals.
fn quarantine_block(
    tx: &Connection,
    source_id: &str,
    key: i64,
    block: &SpooledBlock,
    reason: &str,
) -> rusqlite::Result<()> {
    tracing::warn!(source = %source_id, first_seq = block.first_seq, n = block.n, reason = %reason, "spooled events fail their check; quarantined");
    let reason = if block.n == 1 {
        reason.to_owned()
    } else {
        format!("{reason} (a block of {} events, seqs {} to {})", block.n, block.first_seq, block.end_seq() - 1)
    };
    tx.prepare_cached("DELETE FROM events WHERE key = ?1")?.execute(params![key])?;
    tx.prepare_cached("INSERT INTO quarantine (source_id, seq, body, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)")?
        .execute(params![source_id, block.first_seq as i64, block.body, reason, now_ms()])?;
    tx.prepare_cached("UPDATE sources SET n_quarantined = n_quarantined + ?2 WHERE source_id = ?1")?
        .execute(params![source_id, block.n as i64])?;
    tx.prepare_cached("UPDATE totals SET n_events = n_events - ?1, n_bytes = n_bytes - ?2 WHERE id = 1")?
        .execute(params![block.n as i64, block.raw_bytes as i64])?;
    Ok(())
}

impl Spool {
    /// Opens (and creates or migrates) the spool at `path` with the default configuration.
    pub fn open(path: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(path, SpoolConfig::default())
    }

    /// Opens (and creates or migrates) the spool at `path`.
    pub fn open_with(path: &Path, config: SpoolConfig) -> Result<Spool, SpoolError> {
        let e = |source| SpoolError::from_sqlite(path, source);
        // Customers' records: owner-only, whatever the umask (SQLite gives the WAL this mode).
        crate::private::file(path).map_err(|source| SpoolError::Io { path: path.to_owned(), source })?;
        let conn = Connection::open(path).map_err(e)?;
        conn.busy_timeout(Duration::from_secs(30)).map_err(e)?;
        // 16 KiB pages: ~35 events a page instead of ~9, so fewer B-tree pages to split and write
        // per append. Takes effect when the file is created (before WAL), a no-op afterwards.
        conn.pragma_update(None, "page_size", 16_384).map_err(e)?;
        enable_wal(&conn).map_err(e)?;
        let synchronous = match config.durability {
            Durability::Process => "NORMAL",
            Durability::Power => "FULL",
        };
        conn.pragma_update(None, "synchronous", synchronous).map_err(e)?;
        // 16 MiB of page cache per connection (a source's batch is ~2 MB), and checkpoints
        // every ~16 MB of WAL rather than every 4 MB: fewer, larger writes.
        conn.pragma_update(None, "cache_size", -16_384).map_err(e)?;
        // Room for every statement the spool runs (rusqlite keeps 16): none is parsed twice.
        conn.set_prepared_statement_cache_capacity(64);
        conn.pragma_update(None, "wal_autocheckpoint", 1_000).map_err(e)?;
        let mut spool = Spool {
            path: path.to_owned(),
            conn,
            config,
            packer: Packer::default(),
            block_events: DEFAULT_BLOCK_EVENTS,
            block_bytes: DEFAULT_BLOCK_BYTES,
            numbers: Default::default(),
            quiet: Default::default(),
        };
        let version: usize = spool.conn.pragma_query_value(None, "user_version", |r| r.get(0)).map_err(e)?;
        if version > MIGRATIONS.len() {
            return Err(SpoolError::TooNew { path: path.to_owned(), found: version, known: MIGRATIONS.len() });
        }
        for (idx, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = spool.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
            tx.execute_batch(sql).map_err(e)?;
            tx.pragma_update(None, "user_version", idx + 1).map_err(e)?;
            tx.commit().map_err(e)?;
        }
        Ok(spool)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The most events and bytes of events' JSON an appended block holds: the shipper's batch
    /// limits, so that it sends a block as it is (a smaller batch limit later is still met: the
    /// shipper then unpacks the block).
    pub fn set_block_limits(&mut self, max_events: usize, max_bytes: u64) {
        self.block_events = max_events.max(1);
        self.block_bytes = max_bytes.max(1);
    }

    fn err(&self, source: rusqlite::Error) -> SpoolError {
        SpoolError::from_sqlite(&self.path, source)
    }

    /// The stored state of `source_id` (zeroes for a new source).
    pub fn source_state(&self, source_id: &str) -> Result<SourceState, SpoolError> {
        self.conn
            .query_row(
                "SELECT next_seq, position, n_errors, n_dropped, n_quarantined, n_refused, blocked FROM sources WHERE source_id = ?1",
                params![source_id],
                |r| {
                    Ok(SourceState {
                        next_seq: r.get::<_, i64>(0)? as u64,
                        position: r.get(1)?,
                        n_errors: r.get::<_, i64>(2)? as u64,
                        n_dropped: r.get::<_, i64>(3)? as u64,
                        n_quarantined: r.get::<_, i64>(4)? as u64,
                        n_refused: r.get::<_, i64>(5)? as u64,
                        blocked: r.get(6)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
            .map_err(|e| self.err(e))
    }

    /// Appends events of `source_id` numbered from its `next_seq`, and stores its new position
    /// and error count, in one transaction. Returns the seq of the first appended event.
    ///
    /// When the events do not fit in `max_bytes`: with `pause`, nothing is written and
    /// [`SpoolError::Full`] is returned; with `drop_oldest`, the oldest events (of any source)
    /// are deleted first and counted.
    pub fn append(
        &mut self,
        source_id: &str,
        bodies: &[Vec<u8>],
        position: &str,
        n_new_errors: u64,
    ) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let e = |source| SpoolError::from_sqlite(&path, source);
        let needed: u64 = bodies.iter().map(|b| b.len() as u64).sum();
        // Packed before the transaction (seqs from 0 here, moved to the source's next seq
        // inside it): compressing does not hold the write lock.
        let blocks = self.pack_blocks(bodies);
        let limit = self.config.max_bytes;
        let when_full = self.config.when_full;
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
        // Statements of the hot paths (append, ack, stats) are prepared once per connection:
        // parsing the SQL again cost 3 % of the agent's CPU at 10k events/s.
        let used: u64 = tx
            .prepare_cached("SELECT n_bytes FROM totals WHERE id = 1")
            .and_then(|mut st| st.query_row([], |r| r.get::<_, i64>(0)))
            .map_err(e)? as u64;
        if needed > 0 && used + needed > limit {
            // A commit larger than the whole limit could never fit: it goes in alone, into an
            // empty spool, rather than stall its source for ever.
            let alone = needed > limit;
            match when_full {
                WhenFull::Pause if alone && used == 0 => {}
                WhenFull::Pause => return Err(SpoolError::Full { path: path.clone(), used, limit, needed }),
                WhenFull::DropOldest => {
                    drop_oldest(&tx, &mut self.packer, if alone { used } else { used + needed - limit }).map_err(e)?;
                }
            }
        }
        let known: Option<(i64, i64, Option<String>)> = tx
            .prepare_cached("SELECT source_no, next_seq, blocked FROM sources WHERE source_id = ?1")
            .and_then(|mut st| st.query_row(params![source_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).optional())
            .map_err(e)?;
        if let Some((_, _, Some(reason))) = known {
            return Err(SpoolError::Blocked { path: path.clone(), source_id: source_id.to_owned(), reason });
        }
        let (no, first_seq) = match known {
            Some((no, next, _)) => (no, next as u64),
            None => {
                let no: i64 =
                    tx.query_row("SELECT coalesce(max(source_no), 0) + 1 FROM sources", [], |r| r.get(0)).map_err(e)?;
                tx.execute(
                    "INSERT INTO sources (source_id, source_no, next_seq, position) VALUES (?1, ?2, 0, '')",
                    params![source_id, no],
                )
                .map_err(e)?;
                (no, 0)
            }
        };
        for block in &blocks {
            let block = SpooledBlock { first_seq: first_seq + block.first_seq, ..block.clone() };
            insert_block(&tx, no, &block).map_err(e)?;
        }
        tx.prepare_cached(
            "UPDATE sources SET next_seq = ?2, position = ?3, n_errors = n_errors + ?4 WHERE source_id = ?1",
        )
        .and_then(|mut st| {
            st.execute(params![source_id, (first_seq + bodies.len() as u64) as i64, position, n_new_errors as i64])
        })
        .map_err(e)?;
        tx.prepare_cached("UPDATE totals SET n_events = n_events + ?1, n_bytes = n_bytes + ?2 WHERE id = 1")
            .and_then(|mut st| st.execute(params![bodies.len() as i64, needed as i64]))
            .map_err(e)?;
        tx.commit().map_err(e)?;
        Ok(first_seq)
    }

    /// `bodies` in blocks within the block limits, numbered from seq 0.
    fn pack_blocks(&mut self, bodies: &[Vec<u8>]) -> Vec<SpooledBlock> {
        let at = now_ms();
        let mut blocks = Vec::new();
        let mut start = 0;
        while start < bodies.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < bodies.len()
                && end - start < self.block_events
                && (end == start || bytes + bodies[end].len() as u64 <= self.block_bytes)
            {
                bytes += bodies[end].len() as u64;
                end += 1;
            }
            let events: Vec<&[u8]> = bodies[start..end].iter().map(Vec::as_slice).collect();
            blocks.push(pack_block(&mut self.packer, start as u64, &events, at));
            start = end;
        }
        blocks
    }

    /// The blocks of `source_id` from the one holding seq `from_seq` (or the first after it),
    /// in seq order, while they hold at most `max_events` events and `max_bytes` bytes of JSON
    /// together (at least one block is returned if any exists). Rows that fail their checksum
    /// are moved to quarantine, counted and skipped.
    pub fn read_blocks(
        &mut self,
        source_id: &str,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<SpooledBlock>, SpoolError> {
        let mut out = Vec::new();
        let (mut n, mut bytes) = (0u64, 0u64);
        self.scan(source_id, from_seq, |block| {
            if !out.is_empty() && (n + block.n > max_events as u64 || bytes + block.raw_bytes > max_bytes as u64) {
                return Step::Stop;
            }
            n += block.n;
            bytes += block.raw_bytes;
            out.push(block);
            Step::Next
        })?;
        Ok(out)
    }

    /// Up to `max_events` events of `source_id` with seq `from_seq` or more, in seq order,
    /// stopping before `max_bytes` would be exceeded (at least one event is returned if any
    /// exists). Rows whose checksum does not match are moved to quarantine, counted and skipped.
    pub fn read(
        &mut self,
        source_id: &str,
        from_seq: u64,
        max_events: usize,
        max_bytes: usize,
    ) -> Result<Vec<SpooledEvent>, SpoolError> {
        let mut out = Vec::new();
        let mut n_bytes = 0;
        self.scan(source_id, from_seq, |block| {
            let events = match block.events() {
                Ok(events) => events,
                Err(reason) => return Step::Damaged(block, reason),
            };
            for (seq, body) in events.into_iter().filter(|(seq, _)| *seq >= from_seq) {
                if out.len() >= max_events || (!out.is_empty() && n_bytes + body.len() > max_bytes) {
                    return Step::Stop;
                }
                n_bytes += body.len();
                out.push(SpooledEvent { seq, body });
            }
            Step::Next
        })?;
        Ok(out)
    }

    /// Calls `each` with the blocks of `source_id` from the one holding `from_seq`, in order,
    /// until it says stop; quarantines (and skips) rows that fail their checksum or that it
    /// finds damaged.
    fn scan(
        &mut self,
        source_id: &str,
        from_seq: u64,
        mut each: impl FnMut(SpooledBlock) -> Step,
    ) -> Result<(), SpoolError> {
        let mut damaged = Vec::new();
        let no = match self.numbers.get(source_id) {
            Some(no) => *no,
            None => {
                let Some(no) = source_no(&self.conn, source_id).map_err(|e| self.err(e))? else { return Ok(()) };
                self.numbers.insert(source_id.to_owned(), no);
                no
            }
        };
        {
            let e = |source| SpoolError::from_sqlite(&self.path, source);
            let start = start_key(&self.conn, no, from_seq).map_err(e)?;
            let mut stmt =
                self.conn.prepare_cached(select_rows!("WHERE key >= ?1 AND key < ?2 ORDER BY key")).map_err(e)?;
            let mut rows = stmt.query(params![start, event_key(no + 1, 0)]).map_err(e)?;
            while let Some(row) = rows.next().map_err(e)? {
                let (key, crc, block) = row_of(row).map_err(e)?;
                if i64::from(crc32fast::hash(&block.body)) != crc {
                    damaged.push((key, block, "checksum mismatch".to_owned()));
                    continue;
                }
                match each(block) {
                    Step::Next => {}
                    Step::Stop => break,
                    Step::Damaged(block, reason) => damaged.push((key, block, reason)),
                }
            }
        }
        if !damaged.is_empty() {
            let path = self.path.clone();
            let e = |source| SpoolError::from_sqlite(&path, source);
            let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
            for (key, block, reason) in damaged {
                quarantine_block(&tx, source_id, key, &block, &reason).map_err(e)?;
            }
            tx.commit().map_err(e)?;
        }
        Ok(())
    }

    /// Moves the events of `source_id` in the span `first_seq .. first_seq + count` to
    /// `refused` with the gateway's `reason`, and counts them (in all and by `kind`); returns
    /// how many moved. The span becomes a hole in the source's seqs (as quarantined events are).
    pub fn refuse_span(
        &mut self,
        source_id: &str,
        first_seq: u64,
        count: u32,
        kind: RefusalKind,
        reason: &str,
    ) -> Result<u64, SpoolError> {
        self.refuse(source_id, first_seq, first_seq + u64::from(count), |_| Some((kind, reason)))
    }

    /// Moves the events `(seq, kind, reason)` of `source_id` to `refused`, as
    /// [`Spool::refuse_span`] does for a span, in one transaction; returns how many moved.
    pub fn refuse_events(&mut self, source_id: &str, events: &[(u64, RefusalKind, &str)]) -> Result<u64, SpoolError> {
        let (Some(from), Some(to)) =
            (events.iter().map(|e| e.0).min(), events.iter().map(|e| e.0).max().map(|s| s + 1))
        else {
            return Ok(0);
        };
        let named: BTreeMap<u64, (RefusalKind, &str)> = events.iter().map(|(s, k, r)| (*s, (*k, *r))).collect();
        self.refuse(source_id, from, to, |seq| named.get(&seq).copied())
    }

    /// Moves the events of `from .. to` that `which` gives a refusal to `refused`.
    fn refuse<'r>(
        &mut self,
        source_id: &str,
        from: u64,
        to: u64,
        which: impl Fn(u64) -> Option<(RefusalKind, &'r str)>,
    ) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let e = |source| SpoolError::from_sqlite(&path, source);
        let Some(no) = source_no(&self.conn, source_id).map_err(|e| self.err(e))? else { return Ok(0) };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
        let pick = |seq: u64| which(seq).is_some();
        let removed = remove_events(&tx, &mut self.packer, source_id, (no, from, to), Some(&pick), true).map_err(e)?;
        let at = now_ms();
        let mut by_kind: BTreeMap<&str, i64> = BTreeMap::new();
        for (seq, body) in &removed.events {
            let Some((kind, reason)) = which(*seq) else { continue };
            tx.prepare_cached(
                "INSERT OR REPLACE INTO refused (source_id, seq, body, reason, at, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut st| st.execute(params![source_id, *seq as i64, body, reason, at, kind.as_str()]))
            .map_err(e)?;
            *by_kind.entry(kind.as_str()).or_default() += 1;
        }
        tx.execute(
            "UPDATE sources SET n_refused = n_refused + ?1 WHERE source_id = ?2",
            params![removed.n as i64, source_id],
        )
        .map_err(e)?;
        for (kind, n) in by_kind {
            tx.execute(
                "INSERT INTO refused_counts (source_id, kind, n) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source_id, kind) DO UPDATE SET n = n + excluded.n",
                params![source_id, kind, n],
            )
            .map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(removed.n)
    }

    /// How many events of `source_id` were ever refused, by kind of refusal.
    pub fn refused_counts(&self, source_id: &str) -> Result<BTreeMap<String, u64>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT kind, n FROM refused_counts WHERE source_id = ?1 ORDER BY kind")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map(params![source_id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<BTreeMap<_, _>>>().map_err(|e| self.err(e))
    }

    /// Every refused event, by source and seq.
    pub fn refused(&self) -> Result<Vec<RefusedEvent>, SpoolError> {
        let mut stmt = self
            .conn
            .prepare("SELECT source_id, seq, body, reason, at, kind FROM refused ORDER BY source_id, seq")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok(RefusedEvent {
                    source_id: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    body: r.get(2)?,
                    kind: r.get(5)?,
                    reason: r.get(3)?,
                    at: r.get(4)?,
                })
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<Vec<_>>>().map_err(|e| self.err(e))
    }

    /// Deletes the refused events (of one source, or all); returns how many. Their count in
    /// the source's state stays: it is how many were ever refused.
    pub fn purge_refused(&mut self, source_id: Option<&str>) -> Result<u64, SpoolError> {
        let n = match source_id {
            Some(id) => self.conn.execute("DELETE FROM refused WHERE source_id = ?1", params![id]),
            None => self.conn.execute("DELETE FROM refused", []),
        }
        .map_err(|e| self.err(e))?;
        Ok(n as u64)
    }

    /// Moves one event that cannot be delivered to quarantine (kept there with `reason`) and
    /// counts it.
    pub fn quarantine_event(&mut self, source_id: &str, seq: u64, body: &[u8], reason: &str) -> Result<(), SpoolError> {
        let path = self.path.clone();
        let e = |source| SpoolError::from_sqlite(&path, source);
        let Some(no) = source_no(&self.conn, source_id).map_err(|e| self.err(e))? else { return Ok(()) };
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
        remove_events(&tx, &mut self.packer, source_id, (no, seq, seq + 1), None, false).map_err(e)?;
        tx.execute(
            "INSERT INTO quarantine (source_id, seq, body, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![source_id, seq as i64, body, reason, now_ms()],
        )
        .map_err(e)?;
        tx.execute("UPDATE sources SET n_quarantined = n_quarantined + 1 WHERE source_id = ?1", params![source_id])
            .map_err(e)?;
        tx.commit().map_err(e)
    }

    /// The smallest seq of `source_id` still in the spool.
    pub fn oldest_seq(&self, source_id: &str) -> Result<Option<u64>, SpoolError> {
        let Some(no) = source_no(&self.conn, source_id).map_err(|e| self.err(e))? else { return Ok(None) };
        self.conn
            .query_row(
                "SELECT min(key) FROM events WHERE key >= ?1 AND key < ?2",
                params![event_key(no, 0), event_key(no + 1, 0)],
                |r| r.get::<_, Option<i64>>(0),
            )
            .map(|v| v.map(seq_of))
            .map_err(|e| self.err(e))
    }

    /// The cloud acknowledged the span `first_seq .. first_seq + count` of `source_id`: delete
    /// it. Returns the number of events deleted.
    pub fn ack(&mut self, source_id: &str, first_seq: u64, count: u32) -> Result<u64, SpoolError> {
        self.ack_many(&[(source_id.to_owned(), first_seq, count)])
    }

    /// Deletes several acknowledged spans `(source, first_seq, count)` in one transaction. A
    /// block partly inside a span keeps the rest of its events.
    pub fn ack_many(&mut self, spans: &[(String, u64, u32)]) -> Result<u64, SpoolError> {
        let path = self.path.clone();
        let e = |source| SpoolError::from_sqlite(&path, source);
        let tx = self.conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(e)?;
        let mut n = 0;
        for (source_id, first_seq, count) in spans {
            let Some(no) = source_no(&tx, source_id).map_err(e)? else { continue };
            let span = (no, *first_seq, first_seq + u64::from(*count));
            n += remove_events(&tx, &mut self.packer, source_id, span, None, false).map_err(e)?.n;
        }
        tx.commit().map_err(e)?;
        Ok(n)
    }

    /// Every source known to the spool.
    pub fn source_ids(&self) -> Result<Vec<String>, SpoolError> {
        let mut stmt =
            self.conn.prepare_cached("SELECT source_id FROM sources ORDER BY source_id").map_err(|e| self.err(e))?;
        let ids = stmt.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
        ids.collect::<Result<Vec<String>, _>>().map_err(|e| self.err(e))
    }

    /// When the oldest event of `source` still in the spool was spooled (unix milliseconds).
    pub fn oldest_spooled_at(&self, source: &str) -> Result<Option<i64>, SpoolError> {
        // A source's oldest event is its first (seqs grow with time): one primary-key lookup,
        // no index to maintain on every insert.
        let Some(no) = source_no(&self.conn, source).map_err(|e| self.err(e))? else { return Ok(None) };
        self.conn
            .prepare_cached("SELECT spooled_at FROM events WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT 1")
            .and_then(|mut st| st.query_row(params![event_key(no, 0), event_key(no + 1, 0)], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// Events and bytes of event bodies in the spool (its running totals: one row read).
    pub fn totals(&self) -> Result<(u64, u64), SpoolError> {
        let (n_events, n_bytes): (i64, i64) = self
            .conn
            .prepare_cached("SELECT n_events, n_bytes FROM totals WHERE id = 1")
            .and_then(|mut st| st.query_row([], |r| Ok((r.get(0)?, r.get(1)?))))
            .map_err(|e| self.err(e))?;
        Ok((n_events as u64, n_bytes as u64))
    }

    pub fn stats(&self) -> Result<SpoolStats, SpoolError> {
        let (n_events, n_bytes) = self.totals()?;
        let mut oldest: Option<i64> = None;
        for id in self.source_ids()? {
            oldest = match (oldest, self.oldest_spooled_at(&id)?) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        let file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0)
            + std::fs::metadata(self.path.with_extension("db-wal")).map(|m| m.len()).unwrap_or(0);
        Ok(SpoolStats { n_events, n_bytes, file_bytes, oldest_spooled_at: oldest })
    }

    /// Checks the database's structure, every row's checksum, and the running totals.
    pub fn verify(&self) -> Result<VerifyReport, SpoolError> {
        let mut report = VerifyReport::default();
        {
            let mut stmt = self.conn.prepare("PRAGMA integrity_check").map_err(|e| self.err(e))?;
            let lines = stmt.query_map([], |r| r.get::<_, String>(0)).map_err(|e| self.err(e))?;
            for line in lines {
                let line = line.map_err(|e| self.err(e))?;
                if line != "ok" {
                    report.integrity_errors.push(line);
                }
            }
        }
        if !report.integrity_errors.is_empty() {
            return Ok(report);
        }
        let mut stmt = self
            .conn
            .prepare("SELECT coalesce(s.source_id, '?'), e.seq, e.body, e.crc, e.n, e.raw_bytes FROM events e LEFT JOIN sources s ON s.source_no = e.source_no")
            .map_err(|e| self.err(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)? as u64,
                    r.get::<_, Vec<u8>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)? as u64,
                    r.get::<_, i64>(5)? as u64,
                ))
            })
            .map_err(|e| self.err(e))?;
        let mut n_bytes = 0u64;
        for row in rows {
            let (source, seq, body, crc, n, raw_bytes) = row.map_err(|e| self.err(e))?;
            report.n_checked += n;
            n_bytes += raw_bytes;
            if i64::from(crc32fast::hash(&body)) != crc {
                report.bad_checksums.push((source, seq));
            }
        }
        let stats = self.stats()?;
        report.totals_mismatch = stats.n_events != report.n_checked || stats.n_bytes != n_bytes;
        Ok(report)
    }

    /// Runs `read` in one read transaction: what it reads is one moment of the spool, and its
    /// queries share one WAL read lock instead of taking one each.
    pub fn read_at_once<T>(&self, read: impl FnOnce(&Spool) -> Result<T, SpoolError>) -> Result<T, SpoolError> {
        let e = |source| SpoolError::from_sqlite(&self.path, source);
        let tx = self.conn.unchecked_transaction().map_err(e)?;
        let out = read(self)?;
        tx.commit().map_err(e)?;
        Ok(out)
    }

    /// Notes a round of the connection's owner (a source, the shipper, the acker; `busy`: it
    /// did something). Once a quiet spell has lasted (see [`crate::quiet`]), gives back the
    /// memory kept for the next round ([`Spool::release_memory`]) and returns true, for the
    /// owner to give back its own.
    pub fn settle(&mut self, busy: bool) -> bool {
        if !self.quiet.settle(busy, std::time::Instant::now()) {
            return false;
        }
        if let Err(e) = self.release_memory() {
            tracing::warn!(error = %e, "cannot release the spool connection's memory");
        }
        true
    }

    /// Gives back the memory kept for the next write or read: the page cache's unused pages,
    /// the parsed statements and the packer's compressor and buffer. For a quiet spell (see
    /// [`crate::quiet`]); the next transaction builds what it needs again.
    pub fn release_memory(&mut self) -> Result<(), SpoolError> {
        self.packer = Packer::default();
        self.conn.flush_prepared_statement_cache();
        self.conn.release_memory().map_err(|source| SpoolError::from_sqlite(&self.path, source))
    }

    /// Quick structural check, for start-up.
    pub fn quick_check(&self) -> Result<bool, SpoolError> {
        let first: String = self.conn.query_row("PRAGMA quick_check(1)", [], |r| r.get(0)).map_err(|e| self.err(e))?;
        Ok(first == "ok")
    }

    /// Recovers what can be read from a damaged spool at `path` into a fresh one: every event
    /// that still reads and passes its checksum, and every source's state. A copy of the
    /// damaged file (with its WAL, named so that SQLite reads it) is kept beside it
    /// (`spool.db.damaged-<unix ms>`) for inspection.
    ///
    /// A seq is never used twice: each source's next seq is the larger of the stored one and
    /// the highest seq found among its events, plus one. A source whose events cannot be read
    /// is kept but blocked: appending to it is refused with the reason (the source stops with
    /// it, telling the operator to re-enroll under a new agent id), the other sources go on.
    /// When the sources table itself is unreadable, no source's next seq can be established:
    /// nothing is changed, the damaged spool stays where it is, and the salvage fails (at every
    /// start) saying so — restarting seqs would drop new events as duplicates of old ones, or
    /// count re-read ones twice.
    pub fn salvage(path: &Path) -> Result<SalvageReport, SpoolError> {
        let salvage_err = |reason: String| SpoolError::Salvage { path: path.to_owned(), reason };
        let damaged_copy = path.with_extension(format!("db.damaged-{}", now_ms()));
        let wal_of = |p: &Path| {
            let mut name = p.as_os_str().to_owned();
            name.push("-wal");
            PathBuf::from(name)
        };
        // Copy the damaged database and its WAL, named as SQLite expects (`<file>-wal`), and
        // read from the copy; the original stays in place until the salvage has succeeded.
        std::fs::copy(path, &damaged_copy)
            .map_err(|e| salvage_err(format!("copying {} aside: {e}", path.display())))?;
        if wal_of(path).exists() {
            std::fs::copy(wal_of(path), wal_of(&damaged_copy))
                .map_err(|e| salvage_err(format!("copying the WAL of {} aside: {e}", path.display())))?;
        }
        let old = Connection::open(&damaged_copy).map_err(|e| salvage_err(format!("opening the damaged copy: {e}")))?;
        let unrecoverable = |what: String| {
            salvage_err(format!(
                "{what}: the next seq of a source cannot be established, and reusing a seq would lose or double-count events; \
                 re-enroll this agent under a new agent id with an empty data_dir (edge-agent enroll); the damaged spool is kept \
                 at {} and a copy at {}",
                path.display(),
                damaged_copy.display()
            ))
        };

        // Sources first: every row, or nothing is written.
        type SourceRow = (String, i64, i64, String, i64, i64, i64);
        let sources: Vec<SourceRow> = (|| {
            let mut stmt = old.prepare(
                "SELECT source_id, source_no, next_seq, position, n_errors, n_dropped, n_quarantined FROM sources",
            )?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?)))?;
            rows.collect::<rusqlite::Result<Vec<SourceRow>>>()
        })()
        .map_err(|e| unrecoverable(format!("the sources table cannot be read ({e})")))?;
        if sources.is_empty() {
            let any_event = old.query_row("SELECT count(*) FROM events", [], |r| r.get::<_, i64>(0)).unwrap_or(1);
            if any_event != 0 {
                return Err(unrecoverable("the sources table is empty but events remain".into()));
            }
        }

        // The fresh spool is built beside, then moved into place.
        let fresh_path = path.with_extension("db.salvage");
        for p in [fresh_path.clone(), wal_of(&fresh_path), fresh_path.with_extension("salvage-shm")] {
            let _ = std::fs::remove_file(p);
        }
        let mut report = SalvageReport { damaged_copy: damaged_copy.clone(), ..SalvageReport::default() };
        {
            let mut fresh = Spool::open(&fresh_path)?;
            let tx = fresh
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            let mut n_bytes = 0i64;
            for (source_id, no, stored_next, position, n_errors, n_dropped, n_quarantined) in &sources {
                // Events beyond the stored next seq (a stale row beside newer events): the
                // next seq follows the highest one.
                // Events beyond the stored next seq (a stale row beside newer events): the
                // next seq follows the highest one. When this source's events cannot be read,
                // its next seq is unknown: the source is kept, blocked (it stops with this
                // reason rather than reuse a seq); the others go on.
                // The last row only (the B-tree's rightmost path): a damaged page elsewhere
                // does not hide the highest seq.
                let last = format!(
                    "SELECT key, {} FROM events WHERE key >= ?1 AND key < ?2 ORDER BY key DESC LIMIT 1",
                    salvage_columns(&old)
                );
                let recovered = old
                    .query_row(&last, params![event_key(*no, 0), event_key(*no + 1, 0)], |r| {
                        Ok(seq_of(r.get(0)?) + r.get::<_, i64>(1)? as u64)
                    })
                    .optional()
                    .map(|end| end.map_or(*stored_next as u64, |end| end.max(*stored_next as u64)))
                    .and_then(|next_seq| salvage_source(&old, &tx, *no, next_seq).map(|r| (next_seq, r)));
                let (next_seq, (saved, lost, bytes), blocked) = match recovered {
                    Ok((next_seq, r)) => (next_seq, r, None),
                    Err(e) => {
                        let reason = format!(
                            "its events could not be read after spool damage ({e}), so its next seq is unknown and a seq must never be used twice: re-enroll this agent under a new agent id with an empty data_dir (edge-agent enroll)"
                        );
                        tracing::error!(source = %source_id, reason = %reason, "salvage: source blocked");
                        report.blocked.push(source_id.clone());
                        (*stored_next as u64, (0, 0, 0), Some(reason))
                    }
                };
                if next_seq != *stored_next as u64 {
                    tracing::warn!(source = %source_id, stored = stored_next, recovered = next_seq, "salvage: the stored next seq was behind the spooled events");
                }
                report.n_saved += saved;
                report.n_lost += lost;
                n_bytes += bytes;
                if lost > 0 {
                    tx.execute(
                        "INSERT INTO quarantine (source_id, seq, body, reason, at) VALUES (?1, -1, NULL, ?2, ?3)",
                        params![source_id, format!("{lost} events unreadable after spool damage"), now_ms()],
                    )
                    .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
                }
                tx.execute(
                    "INSERT INTO sources (source_id, source_no, next_seq, position, n_errors, n_dropped, n_quarantined, blocked)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![source_id, no, next_seq as i64, position, n_errors, n_dropped, n_quarantined + lost as i64, blocked],
                )
                .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            }
            tx.execute(
                "UPDATE totals SET n_events = ?1, n_bytes = ?2 WHERE id = 1",
                params![report.n_saved as i64, n_bytes],
            )
            .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            // Refused events and their counts, as far as they read (a version 1 spool has none;
            // a version 2 one has no kinds).
            /// source, seq, body, reason, at, kind
            type RefusedRow = (String, i64, Vec<u8>, String, i64, String);
            let read_refused = |sql: &str| -> rusqlite::Result<Vec<RefusedRow>> {
                old.prepare(sql)?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)))?
                    .collect()
            };
            let refused = read_refused("SELECT source_id, seq, body, reason, at, kind FROM refused")
                .or_else(|_| read_refused("SELECT source_id, seq, body, reason, at, 'invalid_event' FROM refused"))
                .unwrap_or_default();
            for (source_id, seq, body, reason, at, kind) in refused {
                tx.execute(
                    "INSERT OR REPLACE INTO refused (source_id, seq, body, reason, at, kind) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![source_id, seq, body, reason, at, kind],
                )
                .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            }
            let read_kinds = |sql: &str| -> rusqlite::Result<Vec<(String, String, i64)>> {
                old.prepare(sql)?.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect()
            };
            let kinds = read_kinds("SELECT source_id, kind, n FROM refused_counts")
                .or_else(|_| {
                    read_kinds("SELECT source_id, 'invalid_event', n_refused FROM sources WHERE n_refused > 0")
                })
                .unwrap_or_default();
            for (source_id, kind, n) in kinds {
                tx.execute(
                    "INSERT OR REPLACE INTO refused_counts (source_id, kind, n) VALUES (?1, ?2, ?3)",
                    params![source_id, kind, n],
                )
                .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            }
            let counts: Vec<(String, i64)> = old
                .prepare("SELECT source_id, n_refused FROM sources")
                .and_then(|mut st| st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect())
                .unwrap_or_default();
            for (source_id, n) in counts {
                tx.execute("UPDATE sources SET n_refused = ?1 WHERE source_id = ?2", params![n, source_id])
                    .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            }
            tx.commit().map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
            // Everything into the main file before it is moved.
            fresh
                .conn
                .pragma_update(None, "wal_checkpoint", "TRUNCATE")
                .map_err(|e| SpoolError::from_sqlite(&fresh_path, e))?;
        }
        drop(old);
        // The damaged original goes (its copy stays); the fresh one takes its place.
        for p in [wal_of(path), path.with_extension("db-shm")] {
            let _ = std::fs::remove_file(p);
        }
        std::fs::rename(&fresh_path, path)
            .map_err(|e| salvage_err(format!("moving the salvaged spool into place: {e}")))?;
        for p in [wal_of(&fresh_path), fresh_path.with_extension("salvage-shm")] {
            let _ = std::fs::remove_file(p);
        }
        Ok(report)
    }

    /// Caps the database file at `pages` pages, so that writes beyond it fail like on a full
    /// disk. For tests of the disk-full path.
    #[cfg(test)]
    pub(crate) fn limit_pages_for_test(&self, pages: u64) {
        let _ = self.conn.pragma_update(None, "max_page_count", pages);
    }

    /// The number of pages the database file has now.
    #[cfg(test)]
    pub(crate) fn page_count_for_test(&self) -> u64 {
        self.conn.pragma_query_value(None, "page_count", |r| r.get::<_, i64>(0)).unwrap_or(0) as u64
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

/// Deletes the oldest events until at least `to_free` bytes are freed; counts them per source.
/// The oldest event is always the first of some source, so each step compares the heads of the
/// sources (primary-key lookups) rather than keeping an index by age. A block is dropped whole
/// when all of it must go, else only as many of its first events as free enough.
fn drop_oldest(tx: &rusqlite::Transaction<'_>, packer: &mut Packer, to_free: u64) -> rusqlite::Result<()> {
    let sources: Vec<(String, i64)> = {
        let mut stmt = tx.prepare_cached("SELECT source_id, source_no FROM sources")?;
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?.collect::<Result<_, _>>()?
    };
    let (mut freed, mut n_dropped) = (0u64, 0u64);
    while freed < to_free {
        // (spooled_at, source_id, source_no, block)
        let mut victim: Option<(i64, &str, i64, SpooledBlock)> = None;
        for (source, no) in &sources {
            let row = tx
                .prepare_cached(select_rows!("WHERE key >= ?1 AND key < ?2 ORDER BY key LIMIT 1"))?
                .query_row(params![event_key(*no, 0), event_key(no + 1, 0)], row_of)
                .optional()?;
            if let Some((_, _, block)) = row
                && victim.as_ref().is_none_or(|v| (block.spooled_at, source.as_str()) < (v.0, v.1))
            {
                victim = Some((block.spooled_at, source, *no, block));
            }
        }
        let Some((_, source, no, block)) = victim else { break };
        let mut end = block.end_seq();
        if block.raw_bytes > to_free - freed
            && let Ok(events) = block.events()
        {
            let mut enough = 0;
            end = block.first_seq;
            for (seq, body) in events {
                if enough >= to_free - freed {
                    break;
                }
                enough += body.len() as u64;
                end = seq + 1;
            }
        }
        let removed = remove_events(tx, packer, source, (no, block.first_seq, end), None, false)?;
        tx.prepare_cached("UPDATE sources SET n_dropped = n_dropped + ?2 WHERE source_id = ?1")?
            .execute(params![source, removed.n as i64])?;
        // (A damaged head block is quarantined instead, freeing nothing here: the next step
        // looks again.)
        freed += removed.bytes;
        n_dropped += removed.n;
    }
    tracing::warn!(n_dropped, bytes = freed, "spool full: oldest events dropped (when_full = drop_oldest)");
    Ok(())
}

#[cfg(test)]
mod tests;
