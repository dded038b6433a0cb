//! The file source: tails a file of JSON lines, maps each line to an event and spools it.
//!
//! Changes are noticed through `notify` (inotify on Linux) on the file's folder, with polling
//! as a fallback that always runs (inotify misses events on network file systems). Each read
//! of new lines becomes one spool transaction holding the events and the new position.

pub mod format;
pub mod tailer;

use std::path::PathBuf;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use actidash_shared::event::Event;
use notify::Watcher as _;
use serde::Deserialize;
use tracing::{info, warn};

use self::format::{Assembler, RecordParser};
pub use self::format::{CsvConfig, FileFormat, MultilineConfig, RegexConfig};
pub use self::tailer::Encoding;
use self::tailer::{FilePosition, FileTailer, TailItem, TailNotice};
use super::{Commit, SourceContext, update_status};
use crate::mapping::MappingConfig;

/// Configuration of a file source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Source id, unique in this agent; part of every event's identity.
    pub id: String,
    /// The file to tail.
    pub path: PathBuf,
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
    /// How often to look at the file when no change notification arrives, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How records become events.
    pub mapping: MappingConfig,
}

fn default_max_record_bytes() -> usize {
    1024 * 1024
}

fn default_poll_interval_ms() -> u64 {
    250
}

/// Largest number of lines spooled in one transaction.
const MAX_LINES_PER_COMMIT: usize = 5_000;

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
}

impl FileSource {
    /// Runs until shutdown. Blocking: call it on a thread of its own.
    ///
    /// A spool error (disk full, a lock held too long) does not stop the source: it waits, then
    /// resumes from the last committed position, so nothing read but not committed is lost.
    pub fn run(mut self) -> anyhow::Result<()> {
        let id = self.config.id.clone();
        let mut parser = self.config.parser().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        let mut assembler =
            self.config.assembler().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        let flush_after = Duration::from_millis(self.config.multiline.as_ref().map_or(0, |m| m.flush_ms));
        let mut last_line_at = std::time::Instant::now();
        let (mut tailer, mut next_seq) = self.resume()?;
        if parser.needs_header() && tailer.position().line > 0 {
            // Resuming inside a CSV file: its header is its first line.
            if let Some(header) = first_line(tailer.path()) {
                parser.set_header(&header).map_err(|e| anyhow::anyhow!("source {id}: {e}"))?;
            }
        }
        let (wake_tx, wake_rx) = mpsc::sync_channel::<()>(1);
        let _watcher = self.watch(wake_tx);
        let poll_interval = Duration::from_millis(self.config.poll_interval_ms.max(10));

        while !self.ctx.shutdown.is_cancelled() {
            let items = match tailer.poll(MAX_LINES_PER_COMMIT) {
                Ok(items) => items,
                Err(e) => {
                    warn!(source = %id, path = %tailer.path().display(), error = %e, "cannot read file; retrying");
                    self.report_error(format!("{}: {e}", tailer.path().display()));
                    std::thread::sleep(poll_interval);
                    continue;
                }
            };
            for notice in tailer.take_notices() {
                parser.reset(); // a new file (or the same one again): its first line is a header again
                match notice {
                    TailNotice::Replaced => {
                        info!(source = %id, path = %tailer.path().display(), "new file at path; reading it from its start")
                    }
                    TailNotice::Truncated { offset, len } => {
                        warn!(source = %id, path = %tailer.path().display(), offset, len, "file truncated; reading it again from its start")
                    }
                }
            }
            let n_items = items.len();
            if n_items > 0 {
                last_line_at = std::time::Instant::now();
            }
            // A multiline record with no continuation for a while is complete.
            let flush = assembler.as_ref().is_some_and(|a| a.pending_start().is_some())
                && last_line_at.elapsed() >= flush_after;
            if n_items > 0 || flush {
                match self.spool_items(items, &tailer, &mut parser, assembler.as_mut(), flush, next_seq)? {
                    Some(n) => next_seq = n,
                    None => break, // shut down while waiting for room
                }
                self.ctx.spooled.notify_one();
            }
            update_status(&self.ctx.status, |s| {
                s.state = if n_items > 0 { "running".into() } else { "waiting".into() };
                s.position = format!("{}:{}", tailer.path().display(), tailer.position().offset);
                s.next_seq = next_seq;
            });
            if n_items < MAX_LINES_PER_COMMIT {
                match wake_rx.recv_timeout(poll_interval) {
                    Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => std::thread::sleep(poll_interval),
                }
            }
        }
        info!(source = %id, offset = tailer.position().offset, next_seq, "file source stopped");
        Ok(())
    }

    /// A tailer at the committed position, and the next seq.
    fn resume(&mut self) -> anyhow::Result<(FileTailer, u64)> {
        let id = &self.config.id;
        let state = self.ctx.spool.source_state(id)?;
        let position: FilePosition = if state.position.is_empty() {
            FilePosition::default()
        } else {
            serde_json::from_str(&state.position).unwrap_or_else(|e| {
                warn!(source = %id, error = %e, "stored position unreadable; reading the file from its start");
                FilePosition::default()
            })
        };
        info!(source = %id, path = %self.config.path.display(), offset = position.offset, next_seq = state.next_seq, "file source resumed");
        update_status(&self.ctx.status, |s| {
            s.next_seq = state.next_seq;
            s.n_errors = state.n_errors;
        });
        let tailer = FileTailer::new(self.config.path.clone(), position, self.config.max_record_bytes)
            .with_encoding(self.config.encoding);
        Ok((tailer, state.next_seq))
    }

    fn report_error(&self, message: String) {
        update_status(&self.ctx.status, |s| {
            s.state = "error".into();
            s.last_error = Some(message);
        });
    }

    /// Maps the items and appends the good ones with the new position; returns the next seq,
    /// or None if the agent shut down while the spool was full.
    ///
    /// When the spool is full (or the disk, or the spool is busy), the same append is retried
    /// until it succeeds: the source is paused, keeps its position, and counts each bad record
    /// once.
    #[allow(clippy::too_many_arguments)]
    fn spool_items(
        &mut self,
        lines: Vec<TailItem>,
        tailer: &FileTailer,
        parser: &mut RecordParser,
        assembler: Option<&mut Assembler>,
        flush: bool,
        mut next_seq: u64,
    ) -> anyhow::Result<Option<u64>> {
        let id = self.config.id.clone();
        let path = tailer.path().display().to_string();
        // Records: lines as they are, or joined by the multiline assembler. The stored position
        // stays at the start of an incomplete record, so a restart reads it whole again.
        let mut position = tailer.position().clone();
        let items = match assembler {
            None => lines,
            Some(a) => {
                let mut records = Vec::with_capacity(lines.len());
                let mut header_pending = parser.needs_header();
                for line in lines {
                    if header_pending {
                        records.push(line); // a CSV header is one line
                        header_pending = false;
                    } else {
                        a.push(line, &mut records);
                    }
                }
                if flush {
                    a.flush(&mut records);
                }
                if let Some((line, offset)) = a.pending_start() {
                    position.offset = offset;
                    position.line = line.saturating_sub(1);
                }
                records
            }
        };
        let mut bodies = Vec::with_capacity(items.len());
        let mut last_error = None;
        let mut dead = Vec::new();
        for item in items {
            let result = match item {
                TailItem::Line { bytes, line, offset } if parser.needs_header() => {
                    let header = std::str::from_utf8(&bytes).map_err(|e| format!("CSV header is not UTF-8: {e}"));
                    match header.and_then(|h| parser.set_header(h)) {
                        Ok(()) => continue,
                        Err(reason) => Err((line, offset, reason, bytes)),
                    }
                }
                TailItem::Line { bytes, line, offset } => match self.to_event(&bytes, parser, next_seq) {
                    Ok(event) => Ok(event),
                    Err(reason) => Err((line, offset, reason, bytes)),
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
                Ok(event) => {
                    bodies.push(event.to_json());
                    next_seq += 1;
                }
                Err((line, offset, reason, record)) => {
                    warn!(source = %id, path = %path, line, offset, reason = %reason, "bad record skipped");
                    last_error = Some(format!("{path}:{line} (offset {offset}): {reason}"));
                    dead.push(dead_letter_entry(&id, &path, line, offset, &reason, &record));
                }
            }
        }
        let position = serde_json::to_string(&position)?;
        if !self.ctx.commit(&id, Commit { bodies, position, dead, last_error }) {
            return Ok(None);
        }
        Ok(Some(next_seq))
    }

    fn to_event(&self, line: &[u8], parser: &RecordParser, seq: u64) -> Result<Event, String> {
        let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
        let record = parser.parse(text)?;
        let (event_time, payload) = self.config.mapping.apply_str(&record).map_err(|e| e.to_string())?;
        Ok(Event::new(
            self.ctx.tenant.clone(),
            self.ctx.agent_id.clone(),
            self.config.id.clone(),
            seq,
            event_time,
            payload,
        ))
    }

    /// Watches the file's folder; events only wake the loop (bounded: one pending wake-up).
    fn watch(&self, wake: mpsc::SyncSender<()>) -> Option<notify::RecommendedWatcher> {
        let dir = self.config.path.parent()?.to_owned();
        let result = notify::recommended_watcher(move |_event: notify::Result<notify::Event>| {
            let _ = wake.try_send(());
        })
        .and_then(|mut w| w.watch(&dir, notify::RecursiveMode::NonRecursive).map(|()| w));
        match result {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(source = %self.config.id, error = %e, "file change notifications unavailable; polling only");
                None
            }
        }
    }
}

/// The first line of a file (a CSV header), if it can be read.
fn first_line(path: &std::path::Path) -> Option<String> {
    use std::io::{BufRead as _, Read as _};
    let file = std::fs::File::open(path).ok()?;
    let mut line = String::new();
    std::io::BufReader::new(file.take(1024 * 1024)).read_line(&mut line).ok()?;
    Some(line.trim_end_matches(['\n', '\r']).to_owned())
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
