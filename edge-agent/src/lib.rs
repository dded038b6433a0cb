//! The ActiDash edge agent.
//!
//! Sources ([`sources`]) read on-prem records, map them ([`mapping`]) to typed events and append
//! them to the durable spool ([`spool`]) together with their read position; the shipper
//! ([`transport`]) sends spooled events to the cloud gateway over QUIC and deletes them once the
//! gateway acknowledged them. [`run`] wires it all together with one shutdown token.

pub mod central;
pub mod config;
pub mod identity;
pub mod mapping;
pub mod preview;
pub mod private;
pub mod quiet;
pub mod reload;
pub mod retry;
pub mod secret;
pub mod sources;
pub mod spool;
pub mod status;
pub mod telemetry;
pub mod transport;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actidash_shared::wire::SourceStatus;
use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::AgentConfig;
use crate::sources::SharedStatus;
use crate::spool::Spool;
use crate::transport::shipper::{Shipper, ShipperSettings};

/// File name of the spool inside the data folder.
pub const SPOOL_FILE: &str = "spool.db";
/// File of the data folder's lock: held by the running agent, naming its pid.
pub const LOCK_FILE: &str = "agent.lock";

/// The running agent's hold on its data folder: one agent per spool. Two agents appending to
/// one spool (an overlapping rollout, a copied unit) would read the same records twice and
/// hand out seqs that disagree with their keys. Released when dropped or when the process ends
/// (an advisory lock of the operating system: a crash leaves nothing to clean up).
#[derive(Debug)]
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    /// Takes the lock of `data_dir`, or says which process holds it.
    pub fn acquire(data_dir: &std::path::Path) -> anyhow::Result<DataDirLock> {
        use std::io::{Read as _, Seek as _, Write as _};
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                anyhow::bail!(
                    "the data folder {} is in use by another agent (pid {}): two agents on one spool would read records twice; stop that one first, or give this one its own data_dir",
                    data_dir.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
        }
        file.set_len(0)?;
        file.rewind()?;
        write!(file, "{}", std::process::id())?;
        file.sync_data()?;
        Ok(DataDirLock { _file: file })
    }
}

/// How often the status file and the metrics' copy of the spool's and sources' figures are
/// refreshed.
const METRICS_REFRESH: Duration = Duration::from_secs(2);

/// Runs the agent until `shutdown` is cancelled or a component fails.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    run_with(config, shutdown, central::Control::detached()).await
}

/// [`run`], taking pushed configurations through `control` ([`reload`] runs it so).
pub async fn run_with(
    config: AgentConfig,
    shutdown: CancellationToken,
    control: central::Control,
) -> anyhow::Result<()> {
    private::dir(&config.data_dir).with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    // Before the spool is touched (a salvage writes it): one agent per data folder.
    let _lock = DataDirLock::acquire(&config.data_dir)?;
    identity::IdentityStore::new(config.identity_dir()).check_matches(&config.agent_id, &config.tenant)?;
    let spool_path = config.data_dir.join(SPOOL_FILE);
    // Opened first: creates the database, switches it to WAL and migrates it before the
    // sources open their own connections; a damaged spool is salvaged before anything runs.
    let shipper_spool = open_checked_spool(&spool_path, config.spool)?;
    let spooled = Arc::new(Notify::new());
    let started = Instant::now();
    let event_limit: sources::EventLimit = Arc::new(std::sync::atomic::AtomicU64::new(sources::NO_EVENT_LIMIT));

    if let Some(metrics) = &config.metrics {
        telemetry::install(metrics, config.spool.max_bytes)?;
    }
    let mut statuses: Vec<SharedStatus> = Vec::new();
    let mut heads = std::collections::HashMap::new();
    let mut threads = Vec::new();
    for source in &config.sources {
        let status: SharedStatus = Arc::new(Mutex::new(SourceStatus {
            source_id: source.id().to_owned(),
            state: "starting".into(),
            ..SourceStatus::default()
        }));
        statuses.push(status.clone());
        let mut spool = Spool::open_with(&spool_path, config.spool)?;
        // Blocks the size of the shipper's batches: it sends each as it is spooled.
        spool.set_block_limits(config.shipper.max_batch_events as usize, u64::from(config.shipper.max_batch_bytes));
        let head: sources::SpoolHead =
            Arc::new(std::sync::atomic::AtomicU64::new(spool.source_state(source.id())?.next_seq));
        heads.insert(source.id().to_owned(), head.clone());
        let ctx = sources::SourceContext {
            tenant: config.tenant.clone(),
            agent_id: config.agent_id.clone(),
            spool,
            status,
            spooled: spooled.clone(),
            shutdown: shutdown.clone(),
            dead_letter: config.data_dir.join("dead-letter").join(format!("{}.jsonl", source.id())),
            event_limit: event_limit.clone(),
            newest_event_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
            head,
        };
        let runner = sources::runner(source.clone(), ctx);
        let id = source.id().to_owned();
        let token = shutdown.clone();
        threads.push(
            std::thread::Builder::new()
                .name(format!("source-{id}"))
                .spawn(move || {
                    if let Err(e) = runner() {
                        error!(source = %id, error = format!("{e:#}"), "source failed; stopping the agent");
                        token.cancel();
                    }
                })
                .context("spawning a source thread")?,
        );
    }

    control.set_statuses(statuses.clone());
    // Sources known to the spool but no longer configured still get their events shipped.
    let mut source_ids: Vec<String> = config.sources.iter().map(|s| s.id().to_owned()).collect();
    for id in shipper_spool.source_ids()? {
        if !source_ids.contains(&id) {
            source_ids.push(id);
        }
    }
    let link = Arc::new(status::Link::default());
    {
        // The spool's and the sources' figures, refreshed whether or not the cloud is reachable
        // (while it is not, they are what an operator needs): into the status file
        // (`edge-agent status`) and the metrics.
        let spool = Spool::open_with(&spool_path, config.spool)?;
        let (statuses, shutdown, link, control) = (statuses.clone(), shutdown.clone(), link.clone(), control.clone());
        let (spool_max_bytes, data_dir) = (config.spool.max_bytes, config.data_dir.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(METRICS_REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => break,
                }
                let written = tokio::task::block_in_place(|| {
                    let mut heartbeat = transport::shipper::snapshot(&spool, &statuses, started, spool_max_bytes)?;
                    heartbeat.config = control.state();
                    telemetry::record_heartbeat(&heartbeat);
                    let now_ms = chrono::Utc::now().timestamp_millis();
                    status::write(&data_dir, &status::Status::new(heartbeat, &link, now_ms))
                });
                if let Err(e) = written {
                    warn!(error = format!("{e:#}"), "cannot refresh the status");
                }
            }
        });
    }
    let shipper = Shipper {
        settings: ShipperSettings {
            agent_id: config.agent_id.clone(),
            address: config.cloud.address.clone(),
            server_name: config.cloud.server_name.clone(),
            ca_file: config.cloud.ca_file.clone(),
            identity: identity::IdentityStore::new(config.identity_dir()),
            max_batch_events: config.shipper.max_batch_events,
            max_batch_bytes: config.shipper.max_batch_bytes,
            max_backoff: Duration::from_millis(config.shipper.max_backoff_ms),
            transport: config.cloud.transport,
            spool_max_bytes: config.spool.max_bytes,
        },
        spool: shipper_spool,
        source_ids,
        heads,
        statuses,
        spooled,
        shutdown: shutdown.clone(),
        started,
        packer: Default::default(),
        acker: transport::shipper::Acker::spawn(Spool::open_with(&spool_path, config.spool)?)?,
        event_limit,
        holding: None,
        outages: Default::default(),
        link,
        control,
    };
    info!(agent_id = %config.agent_id, tenant = %config.tenant, n_sources = config.sources.len(), gateway = %config.cloud.address, "agent started");
    let result = shipper.run().await;
    shutdown.cancel();
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    info!("agent stopped");
    result
}

/// Opens the spool, checking its structure first; a damaged spool is salvaged (readable events
/// and every position kept, the rest quarantined and counted) and the damaged file kept aside.
pub fn open_checked_spool(path: &std::path::Path, config: spool::SpoolConfig) -> anyhow::Result<Spool> {
    match Spool::open_with(path, config) {
        Ok(spool) if spool.quick_check().unwrap_or(false) => return Ok(spool),
        Ok(_) | Err(spool::SpoolError::Corrupt { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    error!(path = %path.display(), "the spool is damaged; salvaging what can be read");
    let report = Spool::salvage(path)?;
    error!(
        path = %path.display(),
        n_saved = report.n_saved,
        n_lost = report.n_lost,
        damaged_copy = %report.damaged_copy.display(),
        "spool salvaged: unreadable events quarantined and counted, the rest will be shipped"
    );
    Ok(Spool::open_with(path, config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_agent_per_data_folder() {
        let dir = tempfile::tempdir().unwrap();
        let held = DataDirLock::acquire(dir.path()).unwrap();
        let pid = std::process::id().to_string();
        assert_eq!(std::fs::read_to_string(dir.path().join(LOCK_FILE)).unwrap(), pid);
        let refused = DataDirLock::acquire(dir.path()).unwrap_err().to_string();
        assert!(refused.contains(&format!("in use by another agent (pid {pid})")), "{refused}");
        drop(held);
        DataDirLock::acquire(dir.path()).expect("free again once released");
    }
}
