//! The ActiDash edge agent.
//!
//! Sources ([`sources`]) read on-prem records, map them ([`mapping`]) to typed events and append
//! them to the durable spool ([`spool`]) together with their read position; the shipper
//! ([`transport`]) sends spooled events to the cloud gateway over QUIC and deletes them once the
//! gateway acknowledged them. [`run`] wires it all together with one shutdown token.

pub mod config;
pub mod identity;
pub mod mapping;
pub mod reload;
pub mod retry;
pub mod secret;
pub mod sources;
pub mod spool;
pub mod transport;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actidash_shared::wire::SourceStatus;
use anyhow::Context as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::AgentConfig;
use crate::sources::{SharedStatus, SourceConfig};
use crate::spool::Spool;
use crate::transport::shipper::{Shipper, ShipperSettings};

/// File name of the spool inside the data folder.
pub const SPOOL_FILE: &str = "spool.db";

/// Runs the agent until `shutdown` is cancelled or a component fails.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
    let spool_path = config.data_dir.join(SPOOL_FILE);
    // Opened first: creates the database, switches it to WAL and migrates it before the
    // sources open their own connections; a damaged spool is salvaged before anything runs.
    let shipper_spool = open_checked_spool(&spool_path, config.spool)?;
    let spooled = Arc::new(Notify::new());
    let started = Instant::now();

    let mut statuses: Vec<SharedStatus> = Vec::new();
    let mut threads = Vec::new();
    for source in &config.sources {
        let status: SharedStatus = Arc::new(Mutex::new(SourceStatus {
            source_id: source.id().to_owned(),
            state: "starting".into(),
            ..SourceStatus::default()
        }));
        statuses.push(status.clone());
        let spool = Spool::open_with(&spool_path, config.spool)?;
        let ctx = sources::SourceContext {
            tenant: config.tenant.clone(),
            agent_id: config.agent_id.clone(),
            spool,
            status,
            spooled: spooled.clone(),
            shutdown: shutdown.clone(),
            dead_letter: config.data_dir.join("dead-letter").join(format!("{}.jsonl", source.id())),
        };
        let runner: Box<dyn FnOnce() -> anyhow::Result<()> + Send> = match source.clone() {
            SourceConfig::File(file_config) => {
                let source = sources::file::FileSource { config: file_config, ctx };
                Box::new(move || source.run())
            }
            SourceConfig::Sqlite(db_config) => {
                let source = sources::sqlite::SqliteSource { config: db_config, ctx };
                Box::new(move || source.run())
            }
            SourceConfig::Postgres(config) => {
                let source = sources::db::DbSource { config, dialect: sources::db::Dialect::Postgres, ctx };
                Box::new(move || source.run())
            }
            SourceConfig::Mysql(config) => {
                let source = sources::db::DbSource { config, dialect: sources::db::Dialect::Mysql, ctx };
                Box::new(move || source.run())
            }
        };
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

    // Sources known to the spool but no longer configured still get their events shipped.
    let mut source_ids: Vec<String> = config.sources.iter().map(|s| s.id().to_owned()).collect();
    for id in shipper_spool.source_ids()? {
        if !source_ids.contains(&id) {
            source_ids.push(id);
        }
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
        },
        spool: shipper_spool,
        source_ids,
        statuses,
        spooled,
        shutdown: shutdown.clone(),
        started,
        packer: Default::default(),
        acker: transport::shipper::Acker::spawn(Spool::open_with(&spool_path, config.spool)?)?,
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
