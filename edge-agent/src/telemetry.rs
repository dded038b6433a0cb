//! The agent's metrics in the Prometheus text format, served at `[metrics] listen` (off by
//! default: an agent on a shop's host opens no port it was not asked to).
//!
//! Counters and histograms are recorded where things happen (the shipper's sessions and
//! acknowledgements); the spool's and the sources' figures are copied from the snapshot the
//! agent takes every 2 s for its status file ([`record_heartbeat`]), the same the heartbeat
//! sends, so the metrics and the fleet view never disagree.
//! Without `[metrics]` no recorder is installed and every recording is a no-op.

use std::net::SocketAddr;

use actidash_shared::wire::Heartbeat;
use anyhow::Context as _;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;

/// `[metrics]` of the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus scrape endpoint (`/metrics`, plain HTTP): a loopback or
    /// private address.
    pub listen: SocketAddr,
}

/// Bounds of the latency histograms, in seconds.
const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Bounds of the batch-size histograms, in events.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0];

/// The states a source reports (`SourceStatus::state`), each a series of
/// `actidash_agent_source_state` (1 for the current one).
const SOURCE_STATES: &[&str] = &["starting", "running", "waiting", "held", "paused", "error"];

pub const SPOOL_EVENTS: &str = "actidash_agent_spool_events";
pub const SPOOL_BYTES: &str = "actidash_agent_spool_bytes";
pub const SPOOL_MAX_BYTES: &str = "actidash_agent_spool_max_bytes";
pub const SOURCE_EVENTS: &str = "actidash_agent_source_events_total";
pub const SOURCE_BAD_RECORDS: &str = "actidash_agent_source_bad_records_total";
pub const SOURCE_DROPPED: &str = "actidash_agent_source_dropped_events_total";
pub const SOURCE_REFUSED: &str = "actidash_agent_source_refused_events_total";
pub const SOURCE_SKIPPED: &str = "actidash_agent_source_skipped_records_total";
pub const SOURCE_STATE: &str = "actidash_agent_source_state";
pub const SOURCE_LAG: &str = "actidash_agent_source_lag_seconds";
pub const CONNECTED: &str = "actidash_agent_connected";
pub const SESSIONS: &str = "actidash_agent_sessions_total";
pub const CONNECTION_FAILURES: &str = "actidash_agent_connection_failures_total";
pub const SHIPPED_EVENTS: &str = "actidash_agent_shipped_events_total";
pub const SHIPPED_BATCHES: &str = "actidash_agent_shipped_batches_total";
pub const BATCH_EVENTS: &str = "actidash_agent_batch_events";
pub const ACK_SECONDS: &str = "actidash_agent_ack_seconds";
pub const CERT_EXPIRY: &str = "actidash_agent_certificate_expiry_timestamp_seconds";
pub const SLOT_RETAINED_WAL: &str = "actidash_agent_replication_slot_retained_wal_bytes";
pub const SLOT_MAX_RETAINED_WAL: &str = "actidash_agent_replication_slot_max_retained_wal_bytes";

/// Installs the recorder and starts the scrape endpoint on the current runtime.
pub fn install(config: &MetricsConfig, spool_max_bytes: u64) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(config.listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(BATCH_EVENTS.into()), BATCH_BUCKETS)?
        .install()
        .with_context(|| format!("starting the metrics endpoint on {}", config.listen))?;
    describe();
    gauge!(SPOOL_MAX_BYTES).set(spool_max_bytes as f64);
    tracing::info!(listen = %config.listen, "metrics endpoint started");
    Ok(())
}

fn describe() {
    describe_gauge!(SPOOL_EVENTS, Unit::Count, "Events waiting in the spool.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes of event bodies in the spool (what spool.max_bytes limits).");
    describe_gauge!(SPOOL_MAX_BYTES, Unit::Bytes, "The spool's limit, spool.max_bytes.");
    describe_counter!(SOURCE_EVENTS, Unit::Count, "Events a source has spooled (its next sequence number).");
    describe_counter!(SOURCE_BAD_RECORDS, Unit::Count, "Records a source refused as bad input (dead letters).");
    describe_counter!(SOURCE_DROPPED, Unit::Count, "Events dropped from a full spool (when_full = drop_oldest).");
    describe_counter!(SOURCE_REFUSED, Unit::Count, "Events the cloud refused for good, by kind of refusal.");
    describe_counter!(SOURCE_SKIPPED, Unit::Count, "Records skipped by a mapping condition since the agent started.");
    describe_gauge!(SOURCE_STATE, "1 for a source's current state, 0 for the others.");
    describe_gauge!(SOURCE_LAG, Unit::Seconds, "Age of a source's oldest event not yet acknowledged by the cloud.");
    describe_gauge!(CONNECTED, "1 while a session with the gateway is up.");
    describe_counter!(SESSIONS, Unit::Count, "Sessions opened with the gateway, by transport.");
    describe_counter!(CONNECTION_FAILURES, Unit::Count, "Sessions that failed or ended with an error.");
    describe_counter!(SHIPPED_EVENTS, Unit::Count, "Events acknowledged by the cloud.");
    describe_counter!(SHIPPED_BATCHES, Unit::Count, "Batches acknowledged by the cloud.");
    describe_histogram!(BATCH_EVENTS, Unit::Count, "Events per batch sent.");
    describe_histogram!(ACK_SECONDS, Unit::Seconds, "Time from sending a batch to its acknowledgement.");
    describe_gauge!(CERT_EXPIRY, Unit::Seconds, "When the agent's certificate expires (Unix time).");
    describe_gauge!(SLOT_RETAINED_WAL, Unit::Bytes, "WAL a PostgreSQL replication slot of a logical source retains.");
    describe_gauge!(SLOT_MAX_RETAINED_WAL, Unit::Bytes, "The retained WAL allowed (max_retained_wal_mb).");
}

/// Copies a heartbeat's figures (the spool's, each source's) into the metrics.
pub fn record_heartbeat(heartbeat: &Heartbeat) {
    gauge!(SPOOL_EVENTS).set(heartbeat.spool_events as f64);
    gauge!(SPOOL_BYTES).set(heartbeat.spool_bytes as f64);
    for s in &heartbeat.sources {
        let source = s.source_id.clone();
        counter!(SOURCE_EVENTS, "source" => source.clone()).absolute(s.next_seq);
        counter!(SOURCE_BAD_RECORDS, "source" => source.clone()).absolute(s.n_errors);
        counter!(SOURCE_DROPPED, "source" => source.clone()).absolute(s.n_dropped);
        for (kind, n) in &s.refused_by_reason {
            counter!(SOURCE_REFUSED, "source" => source.clone(), "kind" => kind.clone()).absolute(*n);
        }
        for (condition, n) in &s.skipped {
            counter!(SOURCE_SKIPPED, "source" => source.clone(), "condition" => condition.clone()).absolute(*n);
        }
        for state in SOURCE_STATES {
            let on = if s.state == *state { 1.0 } else { 0.0 };
            gauge!(SOURCE_STATE, "source" => source.clone(), "state" => *state).set(on);
        }
        gauge!(SOURCE_LAG, "source" => source).set(s.lag_ms as f64 / 1000.0);
    }
}
