//! The ActiDash cloud aggregator: a QUIC gateway ([`gateway`]), processors ([`process`]) that
//! turn events into roll-ups in the serving store ([`store`]), and the HTTP API ([`serve`]).
//!
//! The three roles scale independently (each is a `--role` of the binary) or run together in
//! one process ([`run`]). With Kafka configured the gateway writes to Kafka and processors
//! consume from it; without, the gateway hands batches to an in-process processor (the
//! embedded mode) — the same store commit either way.

pub mod analytics;
pub mod api_tokens;
pub mod central;
pub mod certs;
pub mod config;
pub mod fleet;
pub mod gateway;
pub mod health;
pub mod process;
pub mod registry;
pub mod serve;
pub mod status;
pub mod store;
pub mod telemetry;

use std::collections::BTreeSet;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::CloudConfig;
use crate::gateway::Gateway;
use crate::gateway::sink::Sink;

/// File name of the serving store inside the data folder.
pub const STORE_FILE: &str = "serving.db";

/// What a process does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    /// The QUIC gateway.
    Gateway,
    /// A processor (Kafka consumer group member, or the embedded processor).
    Process,
    /// The HTTP API.
    Serve,
}

/// Capacity of the gateway-to-embedded-processor queue, in batches.
const EMBEDDED_QUEUE: usize = 256;

/// Runs `roles` until `shutdown` is cancelled or one of them fails.
pub async fn run(config: CloudConfig, roles: BTreeSet<Role>, shutdown: CancellationToken) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let store = config.store_location()?;
    if let Some(metrics) = &config.metrics {
        telemetry::install(metrics.listen)?;
    }
    let mut tasks = tokio::task::JoinSet::new();
    let mut threads = Vec::new();

    let sink = match (&config.kafka, roles.contains(&Role::Gateway)) {
        (_, false) => None,
        (Some(kafka), true) => Some(Sink::kafka(kafka).await?),
        (None, true) => {
            anyhow::ensure!(
                roles.contains(&Role::Process),
                "without [kafka] the gateway hands batches to an in-process processor: run the gateway and process roles together"
            );
            let (tx, handle) = process::embedded::spawn(store.clone(), config.analytics.clone(), EMBEDDED_QUEUE)?;
            threads.push(handle);
            Some(Sink::Embedded(tx))
        }
    };
    if let Some(sink) = sink {
        let gateway_config = config.gateway.clone().context("the gateway role needs a [gateway] section")?;
        let fleet = std::sync::Arc::new(fleet::Fleet::open(&config.data_dir, &config.fleet)?);
        let gateway = Gateway::bind(&gateway_config, fleet, sink, shutdown.clone())?;
        tasks.spawn(gateway.run());
    }
    if roles.contains(&Role::Process)
        && let Some(kafka) = &config.kafka
    {
        let processor = process::kafka::KafkaProcessor {
            config: kafka.clone(),
            store: store.clone(),
            analytics: config.analytics.clone(),
            shutdown: shutdown.clone(),
        };
        tasks.spawn(
            async move { tokio::task::spawn_blocking(move || processor.run()).await.context("processor thread")? },
        );
    }
    if roles.contains(&Role::Serve) {
        let serve_config = config.serve.clone().context("the serve role needs a [serve] section")?;
        let fleet = std::sync::Arc::new(fleet::Fleet::open(&config.data_dir, &config.fleet)?);
        let options = serve::ServeOptions {
            tokens: api_tokens::ApiTokens::on(fleet.registry().clone()),
            ui_dir: serve_config.ui_dir.clone(),
            cors_origins: serve_config.cors_origins.clone(),
            rate_per_token: serve_config.requests_per_sec_per_token.unwrap_or(serve::DEFAULT_RATE_PER_TOKEN),
            fleet,
            agent_offline_after: std::time::Duration::from_secs(serve_config.agent_offline_after_secs),
            header_read_timeout: std::time::Duration::from_millis(serve_config.header_read_timeout_ms.max(1)),
            fleet_metrics: config.metrics.is_some(),
        };
        tasks.spawn(serve::run(
            serve_config.listen,
            store.clone(),
            config.analytics.clone(),
            options,
            shutdown.clone(),
        ));
    }
    info!(roles = ?roles, mode = if config.kafka.is_some() { "kafka" } else { "embedded" }, "cloud aggregator started");

    let mut result = Ok(());
    while let Some(done) = tasks.join_next().await {
        let outcome = done.context("a role panicked").and_then(|r| r);
        if let Err(e) = outcome {
            error!(error = format!("{e:#}"), "a role failed; stopping");
            if result.is_ok() {
                result = Err(e);
            }
        }
        shutdown.cancel();
    }
    // The embedded processor stops once the gateway (its only sender) is gone.
    for t in threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    result
}
