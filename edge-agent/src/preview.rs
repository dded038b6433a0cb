//! `edge-agent check --preview N`: the first records of every source, mapped as the cloud would
//! receive them, before anything is shipped.
//!
//! Each source runs its own code (the same reading, parsing, mapping and checks as in the
//! agent) against a scratch spool in a temporary folder, from the start of its data: the
//! agent's own spool, positions and dead-letter files are not touched, files and databases are
//! only read. A source stops after `N` records (events, bad records and skipped ones), when it
//! has nothing more to read, or after a deadline. A PostgreSQL source read by logical
//! replication is not previewed: that would create a replication slot on the server.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actidash_shared::wire::SourceStatus;
use tokio_util::sync::CancellationToken;

use crate::config::AgentConfig;
use crate::sources::{self, SourceConfig};
use crate::spool::Spool;

/// What the preview of one source found.
#[derive(Debug, Default)]
pub struct SourcePreview {
    pub source_id: String,
    /// The mapped events, as spooled (the JSON the gateway receives).
    pub events: Vec<serde_json::Value>,
    /// Bad records: where (`path:line`, or the database and position) and why.
    pub bad: Vec<(String, String)>,
    /// Records the mapping's conditions skipped, by condition.
    pub skipped: BTreeMap<String, u64>,
    /// Why the source was not (fully) previewed, if it was not.
    pub note: Option<String>,
}

/// Previews every source of `config`: its first `n` events and the bad records met on the way
/// (the source reads a round of records at a time, so a few more than `n` may be read), each
/// source for at most `deadline`.
pub fn preview(config: &AgentConfig, n: usize, deadline: Duration) -> anyhow::Result<Vec<SourcePreview>> {
    let scratch = tempfile::tempdir()?;
    let mut out = Vec::new();
    for source in &config.sources {
        if let SourceConfig::Postgres(c) = source
            && c.logical.is_some()
        {
            out.push(SourcePreview {
                source_id: c.id.clone(),
                note: Some("not previewed: reading by logical replication would create a replication slot".into()),
                ..SourcePreview::default()
            });
            continue;
        }
        out.push(preview_source(config, source.clone(), n, deadline, scratch.path())?);
    }
    Ok(out)
}

fn preview_source(
    config: &AgentConfig,
    source: SourceConfig,
    n: usize,
    deadline: Duration,
    scratch: &Path,
) -> anyhow::Result<SourcePreview> {
    let id = source.id().to_owned();
    let spool_path = scratch.join(format!("{id}.db"));
    let dead = scratch.join(format!("{id}.dead.jsonl"));
    let status: sources::SharedStatus = Arc::new(Mutex::new(SourceStatus {
        source_id: id.clone(),
        state: "starting".into(),
        ..SourceStatus::default()
    }));
    let shutdown = CancellationToken::new();
    let ctx = sources::SourceContext {
        tenant: config.tenant.clone(),
        agent_id: config.agent_id.clone(),
        spool: Spool::open(&spool_path)?,
        status: status.clone(),
        spooled: Arc::new(tokio::sync::Notify::new()),
        shutdown: shutdown.clone(),
        dead_letter: dead.clone(),
        event_limit: Arc::new(std::sync::atomic::AtomicU64::new(sources::NO_EVENT_LIMIT)),
        newest_event_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        head: Default::default(),
    };
    let thread = std::thread::spawn(sources::runner(source, ctx));
    let probe = Spool::open(&spool_path)?;
    let started = Instant::now();
    let mut note = None;
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let s = status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let seen = probe.source_state(&id)?.next_seq + s.n_errors + s.skipped.values().sum::<u64>();
        // `waiting` is caught up; `held` (a database waiting for running transactions) is not.
        if seen >= n as u64 || s.state == "waiting" || s.state == "error" || thread.is_finished() {
            if s.state == "error" {
                note = s.last_error.clone();
            }
            break;
        }
        if started.elapsed() > deadline {
            note = Some(format!("stopped after {} s: {}", deadline.as_secs(), s.last_error.unwrap_or_default()));
            break;
        }
    }
    shutdown.cancel();
    match thread.join() {
        Ok(Err(e)) => note = Some(format!("{e:#}")),
        Err(_) => note = Some("the source panicked".into()),
        Ok(Ok(())) => {}
    }
    let mut probe = probe;
    let events = probe
        .read(&id, 0, n, usize::MAX)?
        .into_iter()
        .map(|row| serde_json::from_slice(&row.body).unwrap_or(serde_json::Value::Null))
        .collect();
    let bad = std::fs::read_to_string(&dead)
        .unwrap_or_default()
        .lines()
        .take(n)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|d| (location(&d), d["reason"].as_str().unwrap_or("").to_owned()))
        .collect();
    let skipped = status.lock().unwrap_or_else(|p| p.into_inner()).skipped.clone();
    Ok(SourcePreview { source_id: id, events, bad, skipped, note })
}

/// Where a dead letter's record was: `path:line`, or the database and the row's position.
fn location(dead: &serde_json::Value) -> String {
    match (&dead["path"], &dead["line"], &dead["database"]) {
        (serde_json::Value::String(p), line, _) => format!("{p}:{line}"),
        (_, _, serde_json::Value::String(db)) => format!("{db} at {}", dead["position"]),
        _ => "?".into(),
    }
}
