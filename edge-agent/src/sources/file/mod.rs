//! The file source: tails a file of JSON lines, maps each line to an event and spools it.
//!
//! Changes are noticed through `notify` (inotify on Linux) on the file's folder, with polling
//! as a fallback that always runs (inotify misses events on network file systems). Each read
//! of new lines becomes one spool transaction holding the events and the new position.

pub mod tailer;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use actidash_shared::event::Event;
use notify::Watcher as _;
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::tailer::{FilePosition, FileTailer, TailItem, TailNotice};
use super::{SharedStatus, update_status};
use crate::mapping::MappingConfig;
use crate::spool::Spool;

/// Configuration of a file source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSourceConfig {
    /// Source id, unique in this agent; part of every event's identity.
    pub id: String,
    /// The file to tail.
    pub path: PathBuf,
    /// Record format. Only `json_lines` today.
    #[serde(default)]
    pub format: FileFormat,
    /// Longest record accepted, in bytes; longer lines are refused and counted.
    #[serde(default = "default_max_record_bytes")]
    pub max_record_bytes: usize,
    /// How often to look at the file when no change notification arrives, in milliseconds.
    #[serde(default = "default_poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How records become events.
    pub mapping: MappingConfig,
}

/// Record formats of a file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line.
    #[default]
    JsonLines,
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
    pub tenant: String,
    pub agent_id: String,
    pub spool: Spool,
    pub status: SharedStatus,
    /// Woken after each commit, so the shipper sends without waiting for its own tick.
    pub spooled: Arc<Notify>,
    pub shutdown: CancellationToken,
}

impl FileSource {
    /// Runs until shutdown. Blocking: call it on a thread of its own.
    ///
    /// A spool error (disk full, a lock held too long) does not stop the source: it waits, then
    /// resumes from the last committed position, so nothing read but not committed is lost.
    pub fn run(mut self) -> anyhow::Result<()> {
        let id = self.config.id.clone();
        let (mut tailer, mut next_seq) = self.resume()?;
        let (wake_tx, wake_rx) = mpsc::sync_channel::<()>(1);
        let _watcher = self.watch(wake_tx);
        let poll_interval = Duration::from_millis(self.config.poll_interval_ms.max(10));

        while !self.shutdown.is_cancelled() {
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
                match self.spool_items(items, &tailer, next_seq)? {
                    Some(n) => next_seq = n,
                    None => break, // shut down while waiting for room
                }
                self.spooled.notify_one();
            }
            update_status(&self.status, |s| {
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
        let state = self.spool.source_state(id)?;
        let position: FilePosition = if state.position.is_empty() {
            FilePosition::default()
        } else {
            serde_json::from_str(&state.position).unwrap_or_else(|e| {
                warn!(source = %id, error = %e, "stored position unreadable; reading the file from its start");
                FilePosition::default()
            })
        };
        info!(source = %id, path = %self.config.path.display(), offset = position.offset, next_seq = state.next_seq, "file source resumed");
        update_status(&self.status, |s| {
            s.next_seq = state.next_seq;
            s.n_errors = state.n_errors;
        });
        Ok((FileTailer::new(self.config.path.clone(), position, self.config.max_record_bytes), state.next_seq))
    }

    fn report_error(&self, message: String) {
        update_status(&self.status, |s| {
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
    fn spool_items(
        &mut self,
        items: Vec<TailItem>,
        tailer: &FileTailer,
        mut next_seq: u64,
    ) -> anyhow::Result<Option<u64>> {
        let id = self.config.id.clone();
        let path = tailer.path().display().to_string();
        let mut bodies = Vec::with_capacity(items.len());
        let mut n_errors = 0;
        let mut last_error = None;
        for item in items {
            let result = match item {
                TailItem::Line { bytes, line, offset } => {
                    self.to_event(&bytes, next_seq).map_err(|reason| (line, offset, reason))
                }
                TailItem::Oversized { line, offset, len } => Err((
                    line,
                    offset,
                    format!("record of {len} bytes exceeds max_record_bytes = {}", self.config.max_record_bytes),
                )),
            };
            match result {
                Ok(event) => {
                    bodies.push(event.to_json());
                    next_seq += 1;
                }
                Err((line, offset, reason)) => {
                    n_errors += 1;
                    warn!(source = %id, path = %path, line, offset, reason = %reason, "bad record skipped");
                    last_error = Some(format!("{path}:{line} (offset {offset}): {reason}"));
                }
            }
        }
        let position = serde_json::to_string(tailer.position())?;
        let mut delay = Duration::from_millis(100);
        let mut paused_since: Option<std::time::Instant> = None;
        loop {
            match self.spool.append(&id, &bodies, &position, n_errors) {
                Ok(_) => break,
                Err(e) => {
                    if paused_since.is_none() {
                        if e.is_full() {
                            warn!(source = %id, error = %e, "spool full: source paused, keeping its position");
                        } else {
                            warn!(source = %id, error = %e, "cannot write to the spool: source paused, retrying");
                        }
                        paused_since = Some(std::time::Instant::now());
                        update_status(&self.status, |s| {
                            s.state = "paused".into();
                            s.last_error = Some(e.to_string());
                        });
                    }
                    if self.shutdown.is_cancelled() {
                        return Ok(None);
                    }
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        if let Some(since) = paused_since {
            info!(source = %id, paused_ms = since.elapsed().as_millis() as u64, "spool has room again: source resumed");
        }
        update_status(&self.status, |s| {
            s.n_errors += n_errors;
            if last_error.is_some() {
                s.last_error = last_error;
            }
        });
        Ok(Some(next_seq))
    }

    fn to_event(&self, line: &[u8], seq: u64) -> Result<Event, String> {
        let text = std::str::from_utf8(line).map_err(|e| format!("not UTF-8: {e}"))?;
        let (event_time, payload) = self.config.mapping.apply_str(text).map_err(|e| e.to_string())?;
        Ok(Event::new(self.tenant.clone(), self.agent_id.clone(), self.config.id.clone(), seq, event_time, payload))
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
