//! The file source: tails the files matching its globs, maps each record to an event and
//! spools it.
//!
//! Which files, and which is which through renames, rotations and truncations, is
//! [`fileset`]'s business; reading lines of one open file is [`tailer`]'s; records (CSV, regex,
//! multiline) are [`format`]'s. Changes are noticed through `notify` (inotify on Linux) on the
//! globs' folders, with polling as a fallback that always runs (inotify misses events on
//! network file systems). Each round's records, across files, become one spool transaction
//! together with every file's new position.

pub mod fileset;
pub mod format;
pub mod tailer;
pub mod watch;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

use serde::Deserialize;
use tracing::{info, warn};

use self::fileset::{FileSet, FileSetConfig, Notice, SetPosition};
use self::format::{Assembler, RecordParser};
pub use self::format::{CsvConfig, FileFormat, MultilineConfig, RegexConfig};
pub use self::tailer::Encoding;
use self::tailer::{Progress, TailItem};
use super::{Commit, SourceContext, update_status};
use crate::mapping::MappingConfig;

/// Configuration of a file source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Source id, unique in this agent; part of every event's identity.
    pub id: String,
    /// A file, or a glob pattern; the same as `include = [path]`.
    #[serde(default)]
    pub path: Option<String>,
    /// Glob patterns of the files to read (`*`, `?`, `[...]`, `**` for any folders).
    #[serde(default)]
    pub include: Vec<String>,
    /// Glob patterns of files to leave out: a pattern without `/` matches file names.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Record format: `json_lines` (default), `csv` or `regex`.
    #[serde(default)]
    pub format: FileFormat,
    /// CSV settings, for `format = "csv"`.
    #[serde(default)]
    pub csv: Option<CsvConfig>,
    /// Pattern or preset, for `format = "regex"`.
    #[serde(default)]
    pub regex: Option<RegexConfig>,
    /// Records that span several lines.
    #[serde(default)]
    pub multiline: Option<MultilineConfig>,
    /// `utf-8` (default) or `utf-16le`; a byte-order mark at the start of a file is skipped.
    #[serde(default)]
    pub encoding: Encoding,
    /// Longest record accepted, in bytes; longer lines are refused and counted.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// How often to look at the files when no change notification arrives, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How often to look for new, renamed and removed files, in milliseconds.
    #[serde(default = "default_scan_interval_ms")]
    pub scan_interval_ms: u64,
    /// Bytes at the start of a file that identify it (its fingerprint).
    #[serde(default = "default_fingerprint_bytes")]
    pub fingerprint_bytes: usize,
    /// A file rotated out of the globs (or deleted) is read to its end and released once
    /// nothing was written to it for this long, in milliseconds.
    #[serde(default = "default_release_after_ms")]
    pub release_after_ms: u64,
    /// A file with nothing new for this long is closed (and reopened when it grows), in ms.
    #[serde(default = "default_close_inactive_ms")]
    pub close_inactive_ms: u64,
    /// The position of a file not seen for this long is forgotten, in seconds.
    #[serde(default = "default_forget_after_secs")]
    pub forget_after_secs: u64,
    /// How records become events.
    pub mapping: MappingConfig,
}

fn default_max_record_bytes() -> usize {
    1024 * 1024
}

fn default_poll_interval_ms() -> u64 {
    250
}

fn default_scan_interval_ms() -> u64 {
    1_000
}

fn default_fingerprint_bytes() -> usize {
    1024
}

fn default_release_after_ms() -> u64 {
    5_000
}

fn default_close_inactive_ms() -> u64 {
    300_000
}

fn default_forget_after_secs() -> u64 {
    7 * 24 * 3600
}

/// Largest number of lines spooled in one transaction.
const MAX_LINES_PER_COMMIT: usize = 5_000;

/// Soonest rescan after a change notification.
const SCAN_AFTER_WAKE: Duration = Duration::from_millis(100);

/// Everything a running file source needs.
#[derive(Debug)]
pub struct FileSource {
    pub config: FileSourceConfig,
    pub ctx: SourceContext,
}

impl FileSourceConfig {
    /// The record parser this configuration asks for; the error names the setting.
    pub fn parser(&self) -> Result<RecordParser, (String, String)> {
        RecordParser::new(self.format, self.csv.as_ref(), self.regex.as_ref())
    }

    /// The multiline assembler, if configured; the error names the setting.
    pub fn assembler(&self) -> Result<Option<Assembler>, (String, String)> {
        self.multiline.as_ref().map(|m| Assembler::new(m, self.max_record_bytes)).transpose()
    }

    /// Every include pattern: `path` and `include`.
    pub fn patterns(&self) -> Vec<String> {
        self.path.iter().chain(&self.include).cloned().collect()
    }

    /// Checks the patterns and limits; the error names the setting.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if self.path.is_none() && self.include.is_empty() {
            return Err(("path".into(), "set path, or include with at least one pattern".into()));
        }
        for (field, list) in [("include", self.patterns()), ("exclude", self.exclude.clone())] {
            for p in list {
                glob::Pattern::new(&p).map_err(|e| (field.to_owned(), format!("pattern {p:?}: {e}")))?;
            }
        }
        if !(16..=1024 * 1024).contains(&self.fingerprint_bytes) {
            return Err(("fingerprint_bytes".into(), format!("{} is not within 16..=1048576", self.fingerprint_bytes)));
        }
        self.parser()?;
        self.assembler()?;
        Ok(())
    }

    /// Makes relative patterns relative to `base` (the configuration file's folder).
    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut String| {
            if Path::new(p.as_str()).is_relative() {
                *p = base.join(&*p).to_string_lossy().into_owned();
            }
        };
        self.path.iter_mut().for_each(resolve);
        self.include.iter_mut().for_each(resolve);
    }

    fn set_config(&self) -> FileSetConfig {
        FileSetConfig {
            include: self.patterns(),
            exclude: self.exclude.clone(),
            fingerprint_bytes: self.fingerprint_bytes,
            release_after: Duration::from_millis(self.release_after_ms),
            close_inactive: Duration::from_millis(self.close_inactive_ms),
            forget_after: Duration::from_secs(self.forget_after_secs),
            max_record_bytes: self.max_record_bytes,
            encoding: self.encoding,
        }
    }
}

/// Per-file record state: a CSV header, a multiline record in progress.
struct Records {
    parser: RecordParser,
    assembler: Option<Assembler>,
    last_line_at: Instant,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl FileSource {
    /// Runs until shutdown. Blocking: call it on a thread of its own.
    ///
    /// A spool error (disk full, a lock held too long) does not stop the source: it waits, then
    /// resumes from the last committed position, so nothing read but not committed is lost.
    pub fn run(mut self) -> anyhow::Result<()> {
        let id = self.config.id.clone();
        self.config.validate().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        let flush_after = Duration::from_millis(self.config.multiline.as_ref().map_or(0, |m| m.flush_ms));
        let (mut files, mut next_seq) = self.resume()?;
        let mut records: HashMap<u64, Records> = HashMap::new();
        let (wake_tx, wake_rx) = mpsc::sync_channel::<()>(1);
        let _watchers = self.watch(wake_tx);
        let poll_interval = Duration::from_millis(self.config.poll_interval_ms.max(10));
        let scan_interval = Duration::from_millis(self.config.scan_interval_ms.max(10));
        let mut last_scan: Option<Instant> = None;
        let mut woken = false;

        while !self.ctx.shutdown.is_cancelled() {
            let now = Instant::now();
            // A change notification may be a new or renamed file: look soon, not at every write.
            let due = last_scan.is_none_or(|t| {
                let since = now.duration_since(t);
                since >= scan_interval || (woken && since >= SCAN_AFTER_WAKE)
            });
            if due {
                files.scan(now, now_unix());
                last_scan = Some(now);
                woken = false;
            }
            let round = files.poll(now, MAX_LINES_PER_COMMIT);
            self.log_notices(&round.notices);
            let n_items = round.items.len();
            match self.spool_round(round, &files, &mut records, flush_after, next_seq)? {
                Some(n) => next_seq = n,
                None => break, // shut down while waiting for room
            }
            if self.ctx.spool.settle(n_items > 0) {
                files.release_buffers();
            }
            let behind = files.bytes_behind();
            update_status(&self.ctx.status, |s| {
                s.state = if n_items > 0 { "running".into() } else { "waiting".into() };
                s.position = files.summary();
                s.next_seq = next_seq;
                s.bytes_behind = Some(behind);
            });
            if n_items < MAX_LINES_PER_COMMIT {
                match wake_rx.recv_timeout(poll_interval) {
                    Ok(()) => woken = true,
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(poll_interval),
                }
            }
        }
        info!(source = %id, next_seq, "file source stopped");
        Ok(())
    }

    fn log_notices(&self, notices: &[Notice]) {
        let id = &self.config.id;
        for notice in notices {
            match notice {
                Notice::Opened { id: file, path, offset } => {
                    info!(source = %id, file, path = %path, offset, "reading file")
                }
                Notice::Released { id: file, path, offset } => {
                    info!(source = %id, file, path = %path, offset, "file released")
                }
                Notice::Truncated { id: file, path, offset, len, restarted: true } => {
                    warn!(source = %id, file, path = %path, offset, len, "file truncated; reading it again from its start")
                }
                Notice::Truncated { id: file, path, offset, len, restarted: false } => {
                    info!(source = %id, file, path = %path, offset, len, "file truncated or replaced; its rest is read from a copy if one appears, the new content as a new file")
                }
                Notice::Error { path, error } => {
                    warn!(source = %id, path = %path, error = %error, "cannot read file; retrying when it changes");
                    update_status(&self.ctx.status, |s| s.last_error = Some(format!("{path}: {error}")));
                }
            }
        }
    }

    /// The file set at the committed position, and the next seq.
    fn resume(&mut self) -> anyhow::Result<(FileSet, u64)> {
        let id = &self.config.id;
        let state = self.ctx.spool.source_state(id)?;
        let position: SetPosition = if state.position.is_empty() {
            SetPosition::default()
        } else {
            serde_json::from_str(&state.position).map_err(|e| {
                anyhow::anyhow!("source {id}: the stored position is unreadable ({e}); refusing to read the files again from their start")
            })?
        };
        info!(source = %id, patterns = ?self.config.patterns(), files = position.files.len(), next_seq = state.next_seq, "file source resumed");
        update_status(&self.ctx.status, |s| {
            s.next_seq = state.next_seq;
            s.n_errors = state.n_errors;
        });
        let set = FileSet::new(self.config.set_config(), position).map_err(|e| anyhow::anyhow!("source {id}: {e}"))?;
        Ok((set, state.next_seq))
    }

    /// Maps a round's records and appends the good ones with the new positions; returns the
    /// next seq, or None if the agent shut down while the spool was full.
    ///
    /// When the spool is full (or the disk, or the spool is busy), the same append is retried
    /// until it succeeds: the source is paused, keeps its positions, and counts each bad record
    /// once.
    fn spool_round(
        &mut self,
        round: fileset::Round,
        files: &FileSet,
        records: &mut HashMap<u64, Records>,
        flush_after: Duration,
        next_seq: u64,
    ) -> anyhow::Result<Option<u64>> {
        let mut out = Output { next_seq, ..Output::default() };
        // Files dropped before their items (truncated): a record in progress is complete.
        for file in &round.reset {
            if let Some(mut r) = records.remove(file) {
                self.flush(&mut r, files, *file, &mut out);
            }
        }
        for fi in round.items {
            let r = match records.get_mut(&fi.file) {
                Some(r) => r,
                None => {
                    let r = self.records_for(files, fi.file, &fi.item)?;
                    records.entry(fi.file).or_insert(r)
                }
            };
            r.last_line_at = Instant::now();
            match &mut r.assembler {
                // A CSV header is one line, never part of a multiline record.
                Some(a) if !(r.parser.needs_header() && item_line(&fi.item) == 1) => {
                    let mut assembled = Vec::new();
                    a.push(fi.item, &mut assembled);
                    for item in assembled {
                        self.emit(files, fi.file, item, &mut r.parser, &mut out);
                    }
                }
                _ => self.emit(files, fi.file, fi.item, &mut r.parser, &mut out),
            }
        }
        for file in &round.released {
            if let Some(mut r) = records.remove(file) {
                self.flush(&mut r, files, *file, &mut out);
            }
        }
        // A multiline record with no continuation for a while is complete.
        for (file, r) in records.iter_mut() {
            if r.assembler.as_ref().is_some_and(|a| a.pending_start().is_some())
                && r.last_line_at.elapsed() >= flush_after
            {
                self.flush(r, files, *file, &mut out);
            }
        }
        let changed = !(round.reset.is_empty() && round.released.is_empty() && round.notices.is_empty());
        if out.bodies.is_empty() && out.dead.is_empty() && !changed {
            return Ok(Some(out.next_seq));
        }
        // The stored position of a file stays at the start of a record still incomplete, so a
        // restart reads it whole again.
        let position = files.position(|file| {
            let (line, offset) = records.get(&file)?.assembler.as_ref()?.pending_start()?;
            Some(Progress { offset, line: line.saturating_sub(1) })
        });
        let position = serde_json::to_string(&position)?;
        let id = self.config.id.clone();
        let commit =
            Commit { bodies: out.bodies, position, dead: out.dead, last_error: out.last_error, skipped: out.skipped };
        if !self.ctx.commit(&id, commit) {
            return Ok(None);
        }
        Ok(Some(out.next_seq))
    }

    /// Completes a file's record in progress.
    fn flush(&self, r: &mut Records, files: &FileSet, file: u64, out: &mut Output) {
        if let Some(a) = &mut r.assembler {
            let mut assembled = Vec::new();
            a.flush(&mut assembled);
            for item in assembled {
                self.emit(files, file, item, &mut r.parser, out);
            }
        }
    }

    /// One record: an event, a CSV header, or a dead letter.
    fn emit(&self, files: &FileSet, file: u64, item: TailItem, parser: &mut RecordParser, out: &mut Output) {
        let result = match item {
            TailItem::Line { bytes, line, offset } if parser.needs_header() => {
                let header = std::str::from_utf8(&bytes).map_err(|e| format!("CSV header is not UTF-8: {e}"));
                match header.and_then(|h| parser.set_header(h)) {
                    Ok(()) => return,
                    Err(reason) => Err((line, offset, reason, bytes)),
                }
            }
            TailItem::Line { bytes, line, offset } => match self.to_event(&bytes, parser, out.next_seq) {
                super::Mapped::Event(body) => Ok(body),
                super::Mapped::Skipped(condition) => {
                    *out.skipped.entry(condition).or_default() += 1;
                    return;
                }
                super::Mapped::Bad(reason) => Err((line, offset, reason, bytes)),
            },
            TailItem::Oversized { line, offset, len } => Err((
                line,
                offset,
                format!("record of {len} bytes exceeds max_record_bytes = {}", self.config.max_record_bytes),
                Vec::new(),
            )),
            TailItem::Undecodable { line, offset, reason } => Err((line, offset, reason, Vec::new())),
        };
        match result {
            Ok(body) => {
                out.bodies.push(body);
                out.next_seq += 1;
            }
            Err((line, offset, reason, record)) => {
                let id = &self.config.id;
                let path = files.path(file).unwrap_or("?");
                warn!(source = %id, path = %path, line, offset, reason = %reason, "bad record skipped");
                out.last_error = Some(format!("{path}:{line} (offset {offset}): {reason}"));
                out.dead.push(dead_letter_entry(id, path, line, offset, &reason, &record));
            }
        }
    }

    /// New per-file record state; a file resumed past its first line gets its CSV header from
    /// its first line.
    fn records_for(&self, files: &FileSet, file: u64, first: &TailItem) -> anyhow::Result<Records> {
        let id = &self.config.id;
        let mut parser = self.config.parser().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        let assembler =
            self.config.assembler().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        if parser.needs_header()
            && item_line(first) > 1
            && let Some(path) = files.path(file)
            && let Some(header) = first_line(Path::new(path))
            && let Err(e) = parser.set_header(&header)
        {
            warn!(source = %id, path = %path, error = %e, "cannot read the CSV header of a resumed file");
        }
        Ok(Records { parser, assembler, last_line_at: Instant::now() })
    }

    /// A line as the spooled event's JSON.
    fn to_event(&self, line: &[u8], parser: &RecordParser, seq: u64) -> super::Mapped {
        let text = match std::str::from_utf8(line) {
            Ok(text) => text,
            Err(e) => return super::Mapped::Bad(format!("not UTF-8: {e}")),
        };
        match parser.parse(text) {
            Ok(record) => self.ctx.map_record(&self.config.mapping, &self.config.id, seq, &record),
            Err(reason) => super::Mapped::Bad(reason),
        }
    }

    /// Watches the folders the patterns start in (recursively when the pattern goes deeper),
    /// through the process's shared watchers ([`watch`]); changes only wake the loop
    /// (bounded: one pending wake-up).
    fn watch(&self, wake: mpsc::SyncSender<()>) -> Vec<watch::Subscription> {
        let mut subscriptions = Vec::new();
        for pattern in self.config.patterns() {
            let (dir, recursive) = watch_root(&pattern);
            match watch::subscribe(&dir, recursive, wake.clone()) {
                Ok(s) => subscriptions.push(s),
                Err(e) => {
                    warn!(source = %self.config.id, dir = %dir.display(), error = %e, "file change notifications unavailable; polling only")
                }
            }
        }
        subscriptions
    }
}

/// The folder a glob pattern starts in (its part before the first wildcard), and whether
/// matches can be deeper than its direct children.
fn watch_root(pattern: &str) -> (PathBuf, bool) {
    let mut root = PathBuf::new();
    let mut components = Path::new(pattern).components().peekable();
    while let Some(c) = components.next() {
        let text = c.as_os_str().to_string_lossy();
        if text.contains(['*', '?', '[']) || components.peek().is_none() {
            let deeper = components.peek().is_some() || text.contains("**");
            return (root, deeper);
        }
        root.push(c);
    }
    (root, false)
}

/// What a round produced.
#[derive(Default)]
struct Output {
    bodies: Vec<Vec<u8>>,
    dead: Vec<String>,
    last_error: Option<String>,
    skipped: std::collections::BTreeMap<String, u64>,
    next_seq: u64,
}

fn item_line(item: &TailItem) -> u64 {
    match item {
        TailItem::Line { line, .. } | TailItem::Oversized { line, .. } | TailItem::Undecodable { line, .. } => *line,
    }
}

/// The first line of a file (a CSV header), if it can be read.
fn first_line(path: &Path) -> Option<String> {
    let (_, head, _) = fileset::read_head(path, 1024 * 1024).ok()?;
    let end = head.iter().position(|b| *b == b'\n').unwrap_or(head.len());
    let line = String::from_utf8_lossy(&head[..end]);
    Some(line.trim_start_matches('\u{feff}').trim_end_matches('\r').to_owned())
}

fn dead_letter_entry(source: &str, path: &str, line: u64, offset: u64, reason: &str, record: &[u8]) -> String {
    super::dead_letter::entry(
        source,
        serde_json::json!({ "path": path, "line": line, "offset": offset }),
        reason,
        record,
    )
}

#[cfg(test)]
pub(crate) mod tests;
