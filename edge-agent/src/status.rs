//! `edge-agent status`: what a running agent is doing, read from the status file it rewrites
//! every [`crate::METRICS_REFRESH`] in its data folder (no port, no connection to the agent):
//! its sources, their rates and lag, the spool and the link to the cloud.
//!
//! The file is written whole and renamed into place, so a reader never sees half of one.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use actidash_shared::wire::Heartbeat;
use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// File name of the status file in the data folder.
pub const STATUS_FILE: &str = "status.json";

/// A status older than this means the agent is not running (it rewrites it every 2 s).
pub const STALE_AFTER_MS: i64 = 10_000;

/// An agent that has not reached the cloud since it started is "connecting" this long, then
/// "cut off" (its first status is written before its first connection).
const CONNECTING_FOR_SECS: u64 = 30;

/// The shipper's side of the status: the link to the cloud.
#[derive(Debug, Default)]
pub struct Link {
    connected: AtomicBool,
    shipped_events: AtomicU64,
    transport: Mutex<String>,
}

impl Link {
    pub fn connected(&self, transport: &str) {
        self.connected.store(true, Ordering::Relaxed);
        *self.transport.lock().unwrap_or_else(|p| p.into_inner()) = transport.to_owned();
    }

    pub fn disconnected(&self) {
        self.connected.store(false, Ordering::Relaxed);
    }

    pub fn shipped(&self, n: u64) {
        self.shipped_events.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the status file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// When it was written (Unix ms).
    pub written_at_ms: i64,
    pub pid: u32,
    pub connected: bool,
    /// `quic` or `tcp`, for the current or last session.
    pub transport: String,
    /// Events acknowledged by the cloud since the agent started.
    pub shipped_events: u64,
    /// The same snapshot a heartbeat carries: spool and sources.
    pub heartbeat: Heartbeat,
}

impl Status {
    pub fn new(heartbeat: Heartbeat, link: &Link, now_ms: i64) -> Status {
        Status {
            written_at_ms: now_ms,
            pid: std::process::id(),
            connected: link.connected.load(Ordering::Relaxed),
            transport: link.transport.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            shipped_events: link.shipped_events.load(Ordering::Relaxed),
            heartbeat,
        }
    }
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

/// Writes the status whole (a temporary file renamed over the last one).
pub fn write(data_dir: &Path, status: &Status) -> anyhow::Result<()> {
    let target = path(data_dir);
    let tmp = target.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(status)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &target).with_context(|| format!("renaming {} into place", tmp.display()))?;
    Ok(())
}

/// Reads the status file of `data_dir`.
pub fn read(data_dir: &Path) -> anyhow::Result<Status> {
    let p = path(data_dir);
    let text = std::fs::read(&p)
        .with_context(|| format!("no status at {} (has this agent run with this configuration?)", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{}: not a status file", p.display()))
}

/// One source's line of the view.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SourceView {
    pub source: String,
    pub state: String,
    /// Events spooled in all (its next seq).
    pub events: u64,
    /// Events a second since the previous status (none in a one-shot view).
    pub events_per_sec: Option<f64>,
    pub lag_secs: f64,
    pub bad_records: u64,
    pub last_error: Option<String>,
}

/// The whole view: `--once --json` prints it as it is.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct View {
    /// Whether the status is fresh (the agent runs).
    pub running: bool,
    pub status_age_secs: f64,
    pub pid: u32,
    pub connected: bool,
    /// Empty until the first connection since the agent started.
    pub transport: String,
    pub uptime_secs: u64,
    pub shipped_events: u64,
    pub shipped_per_sec: Option<f64>,
    pub spool_events: u64,
    pub spool_bytes: u64,
    pub spool_max_bytes: u64,
    pub last_outage: Option<actidash_shared::wire::Outage>,
    pub sources: Vec<SourceView>,
}

/// The view of `now` (and rates against `before`, an earlier status of the same agent).
pub fn view(now_ms: i64, current: &Status, before: Option<&Status>) -> View {
    let before = before.filter(|b| b.pid == current.pid && b.written_at_ms < current.written_at_ms);
    let secs = before.map(|b| (current.written_at_ms - b.written_at_ms) as f64 / 1000.0);
    let rate = |now: u64, then: u64| secs.map(|s| now.saturating_sub(then) as f64 / s);
    let hb = &current.heartbeat;
    let sources = hb
        .sources
        .iter()
        .map(|s| {
            let then = before.and_then(|b| b.heartbeat.sources.iter().find(|x| x.source_id == s.source_id));
            SourceView {
                source: s.source_id.clone(),
                state: s.state.clone(),
                events: s.next_seq,
                events_per_sec: then.and_then(|t| rate(s.next_seq, t.next_seq)),
                lag_secs: s.lag_ms as f64 / 1000.0,
                bad_records: s.n_errors,
                last_error: s.last_error.clone(),
            }
        })
        .collect();
    let age = now_ms - current.written_at_ms;
    View {
        running: age < STALE_AFTER_MS,
        status_age_secs: age.max(0) as f64 / 1000.0,
        pid: current.pid,
        connected: current.connected,
        transport: current.transport.clone(),
        uptime_secs: hb.uptime_secs,
        shipped_events: current.shipped_events,
        shipped_per_sec: before.and_then(|b| rate(current.shipped_events, b.shipped_events)),
        spool_events: hb.spool_events,
        spool_bytes: hb.spool_bytes,
        spool_max_bytes: hb.spool_max_bytes,
        last_outage: hb.last_outage.clone(),
        sources,
    }
}

fn rate_text(r: Option<f64>) -> String {
    r.map_or_else(|| "-".to_owned(), |r| format!("{r:.0}/s"))
}

/// The view as text for a terminal.
pub fn render(v: &View) -> String {
    let mut out = String::new();
    let link = if !v.running {
        format!("NOT RUNNING: the last status is {:.0} s old (pid {})", v.status_age_secs, v.pid)
    } else if v.connected {
        format!("connected ({})", v.transport)
    } else if v.transport.is_empty() && v.uptime_secs < CONNECTING_FOR_SECS {
        format!("connecting: started {} s ago, not connected yet; reading on into the spool", v.uptime_secs)
    } else {
        "CUT OFF: cannot reach the cloud; reading on into the spool".to_owned()
    };
    out.push_str(&format!("agent   {link}\n"));
    let full = if v.spool_max_bytes > 0 { 100.0 * v.spool_bytes as f64 / v.spool_max_bytes as f64 } else { 0.0 };
    out.push_str(&format!(
        "spool   {} events, {} bytes ({full:.1} % of {})\n",
        v.spool_events, v.spool_bytes, v.spool_max_bytes
    ));
    out.push_str(&format!("shipped {} events, {}\n", v.shipped_events, rate_text(v.shipped_per_sec)));
    if let Some(o) = &v.last_outage {
        out.push_str(&format!(
            "last outage {:.0} s long, {} events buffered\n",
            (o.to_ms - o.from_ms) as f64 / 1000.0,
            o.buffered_events
        ));
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<20} {:<8} {:>12} {:>10} {:>10} {:>8}  last error\n",
        "source", "state", "events", "rate", "lag", "bad"
    ));
    for s in &v.sources {
        out.push_str(&format!(
            "{:<20} {:<8} {:>12} {:>10} {:>9.1}s {:>8}  {}\n",
            s.source,
            s.state,
            s.events,
            rate_text(s.events_per_sec),
            s.lag_secs,
            s.bad_records,
            s.last_error.as_deref().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use actidash_shared::wire::SourceStatus;

    use super::*;

    fn status(at: i64, pid: u32, seq: u64, shipped: u64) -> Status {
        Status {
            written_at_ms: at,
            pid,
            connected: true,
            transport: "quic".into(),
            shipped_events: shipped,
            heartbeat: Heartbeat {
                spool_bytes: 50,
                spool_max_bytes: 200,
                sources: vec![SourceStatus {
                    source_id: "orders".into(),
                    state: "running".into(),
                    next_seq: seq,
                    lag_ms: 1_500,
                    ..Default::default()
                }],
                ..Default::default()
            },
        }
    }

    #[test]
    fn rates_come_from_two_statuses_of_one_process() {
        let (a, b) = (status(10_000, 7, 100, 90), status(12_000, 7, 300, 250));
        let v = view(12_500, &b, Some(&a));
        assert!(v.running);
        assert_eq!(v.sources[0].events_per_sec, Some(100.0));
        assert_eq!(v.shipped_per_sec, Some(80.0));
        assert_eq!(v.sources[0].lag_secs, 1.5);
        // Another process (restarted): no rate rather than a wrong one; none in a one-shot view.
        assert_eq!(view(12_500, &b, Some(&status(10_000, 8, 100, 90))).sources[0].events_per_sec, None);
        assert_eq!(view(12_500, &b, None).shipped_per_sec, None);
        let text = render(&v);
        assert!(
            text.contains("connected (quic)") && text.contains("25.0 % of 200") && text.contains("100/s"),
            "{text}"
        );
    }

    #[test]
    fn an_agent_that_has_not_connected_since_it_started_is_connecting_then_cut_off() {
        let mut s = status(10_000, 7, 1, 0);
        (s.connected, s.transport, s.heartbeat.uptime_secs) = (false, String::new(), 1);
        let text = render(&view(10_500, &s, None));
        assert!(text.starts_with("agent   connecting: started 1 s ago, not connected yet"), "{text}");
        s.heartbeat.uptime_secs = 30;
        assert!(render(&view(10_500, &s, None)).starts_with("agent   CUT OFF"));
        // Connected once, then lost: cut off at once.
        (s.transport, s.heartbeat.uptime_secs) = ("quic".into(), 5);
        assert!(render(&view(10_500, &s, None)).starts_with("agent   CUT OFF"));
    }

    #[test]
    fn an_old_status_says_the_agent_is_not_running() {
        let v = view(30_000, &status(10_000, 7, 1, 1), None);
        assert!(!v.running);
        assert!(render(&v).starts_with("agent   NOT RUNNING: the last status is 20 s old"), "{}", render(&v));
    }

    #[test]
    fn the_file_is_written_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let s = status(1, 2, 3, 4);
        write(dir.path(), &s).unwrap();
        assert_eq!(read(dir.path()).unwrap(), s);
        assert!(!dir.path().join("status.json.tmp").exists());
        std::fs::write(path(dir.path()), b"{").unwrap();
        assert!(format!("{:#}", read(dir.path()).unwrap_err()).contains("not a status file"));
    }
}
