//! Metrics of every role in the Prometheus text format, served at `[metrics] listen` (or
//! `run --metrics-listen`, for several roles on one host).
//!
//! What happens once per batch or request is recorded where it happens (latency and size
//! histograms); the gateway's counters ([`GatewayMetrics`]) are copied in every
//! [`REFRESH`]. Without a listen address no recorder is installed and every recording is a
//! no-op.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use serde::Deserialize;

use crate::gateway::GatewayMetrics;

/// `[metrics]` of the cloud configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the Prometheus scrape endpoint (`/metrics`, plain HTTP): a private address.
    pub listen: SocketAddr,
}

/// How often copied figures are refreshed.
pub const REFRESH: Duration = Duration::from_secs(2);

/// Bounds of the latency histograms, in seconds.
const LATENCY_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
/// Bounds of the batch-size histograms, in events.
const BATCH_BUCKETS: &[f64] = &[1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0];

pub const GATEWAY_CONNECTIONS: &str = "actidash_gateway_connections";
pub const GATEWAY_BATCH_EVENTS: &str = "actidash_gateway_batch_events";
pub const GATEWAY_EVENTS: &str = "actidash_gateway_events_total";
pub const PRODUCE_SECONDS: &str = "actidash_gateway_produce_seconds";
pub const STORE_COMMIT_SECONDS: &str = "actidash_store_commit_seconds";
pub const PROCESSOR_EVENTS: &str = "actidash_processor_events_total";
pub const PROCESSOR_DUPLICATES: &str = "actidash_processor_duplicate_events_total";
pub const PROCESSOR_BAD_RECORDS: &str = "actidash_processor_bad_records_total";
pub const PROCESSOR_LATENCY_SECONDS: &str = "actidash_processor_latency_seconds";
pub const CONSUMER_LAG: &str = "actidash_kafka_consumer_lag_messages";
pub const API_REQUEST_SECONDS: &str = "actidash_api_request_seconds";
pub const FLEET_LAST_HEARTBEAT: &str = "actidash_fleet_agent_last_heartbeat_timestamp_seconds";
pub const FLEET_SPOOL_BYTES: &str = "actidash_fleet_agent_spool_bytes";
pub const FLEET_SPOOL_EVENTS: &str = "actidash_fleet_agent_spool_events";

/// The gateway's counters: a field of [`GatewayMetrics`] is `actidash_gateway_<field>_total`.
const GATEWAY_COUNTERS: &[(&str, &str)] = &[
    ("connections_accepted", "Connections accepted (QUIC and TCP)."),
    ("connections_refused", "Connections refused at the connection limit."),
    ("auth_failures", "Hellos refused: unknown, expired or revoked certificate, wrong identity."),
    ("tls_failures", "TLS handshakes that failed."),
    ("enrollments", "Agents enrolled."),
    ("enroll_failures", "Enrollments refused."),
    ("renewals", "Certificates renewed."),
    ("revoked_disconnects", "Connections closed because their agent was revoked."),
    ("config_pushes", "Configurations pushed to agents of a group."),
    ("foreign_tenant_batches", "Batches with an event claiming another tenant than the certificate's."),
    ("refused_events", "Events refused for good (the agent keeps them aside)."),
    ("heartbeats_dropped", "Heartbeats answered but not stored (more than one per half interval)."),
    ("renewals_refused", "Certificate renewals refused (too frequent)."),
    ("unauthenticated_refused", "Connections refused: their address had its maximum open without authentication."),
    ("enrollments_throttled", "Enrollment attempts refused: their address made too many."),
    ("quic_retries", "QUIC clients asked to prove their address (Retry) under load."),
    ("rate_limited", "Batches delayed by their agent's rate limit."),
    ("bad_frames", "Frames that could not be decoded."),
    ("protocol_errors", "Sessions ended by a protocol error."),
    ("invalid_batches", "Batches with refused events or refused whole."),
    ("batches_acked", "Batches made durable and acknowledged."),
    ("events_acked", "Events acknowledged (the spans of acknowledged batches)."),
    ("sink_failures", "Batches the sink (Kafka or the embedded processor) could not make durable."),
];

/// Installs the recorder and starts the scrape endpoint on the current runtime.
pub fn install(listen: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(listen)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_batch_events".into()), BATCH_BUCKETS)?
        .install()
        .with_context(|| format!("starting the metrics endpoint on {listen}"))?;
    describe();
    tracing::info!(listen = %listen, "metrics endpoint started");
    Ok(())
}

fn describe() {
    for (field, help) in GATEWAY_COUNTERS {
        describe_counter!(format!("actidash_gateway_{field}_total"), Unit::Count, *help);
    }
    describe_gauge!(GATEWAY_CONNECTIONS, Unit::Count, "Agent connections open.");
    describe_histogram!(GATEWAY_BATCH_EVENTS, Unit::Count, "Events per batch received.");
    describe_counter!(GATEWAY_EVENTS, Unit::Count, "Events received and handed to the sink, by tenant.");
    describe_histogram!(
        PRODUCE_SECONDS,
        Unit::Seconds,
        "Time from handing a batch to the sink to its durability (all of Kafka's acks, or the embedded store's commit), by sink."
    );
    describe_histogram!(STORE_COMMIT_SECONDS, Unit::Seconds, "Time of one serving-store transaction of a batch.");
    describe_counter!(PROCESSOR_EVENTS, Unit::Count, "Events applied to the serving store.");
    describe_counter!(PROCESSOR_DUPLICATES, Unit::Count, "Events dropped as duplicates (already counted).");
    describe_counter!(PROCESSOR_BAD_RECORDS, Unit::Count, "Kafka records that were not events (skipped, logged).");
    describe_histogram!(
        PROCESSOR_LATENCY_SECONDS,
        Unit::Seconds,
        "Time from a record's append to Kafka to its commit in the serving store (the oldest record of each batch)."
    );
    describe_gauge!(CONSUMER_LAG, Unit::Count, "Messages of a partition not yet read by this processor.");
    describe_histogram!(API_REQUEST_SECONDS, Unit::Seconds, "HTTP API request latency, by route and status.");
    describe_gauge!(FLEET_LAST_HEARTBEAT, Unit::Seconds, "When an agent's last heartbeat was received (Unix time).");
    describe_gauge!(FLEET_SPOOL_BYTES, Unit::Bytes, "Bytes in an agent's spool, at its last heartbeat.");
    describe_gauge!(FLEET_SPOOL_EVENTS, Unit::Count, "Events in an agent's spool, at its last heartbeat.");
}

/// Copies the gateway's counters and its open connections into the metrics.
pub fn record_gateway(counters: &GatewayMetrics, connections: usize) {
    if let Ok(serde_json::Value::Object(fields)) = serde_json::to_value(counters) {
        for (field, value) in fields {
            if let Some(n) = value.as_u64() {
                counter!(format!("actidash_gateway_{field}_total")).absolute(n);
            }
        }
    }
    gauge!(GATEWAY_CONNECTIONS).set(connections as f64);
}

/// The consumer's lag per partition, from librdkafka's statistics.
pub fn record_consumer_lag(statistics: &rdkafka::Statistics) {
    for (topic, t) in &statistics.topics {
        for (partition, p) in &t.partitions {
            // -1: unknown (not assigned here, or not fetched yet); the internal partition -1.
            if *partition >= 0 && p.consumer_lag >= 0 {
                gauge!(CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every counter of the gateway is described (help text), and nothing else is.
    #[test]
    fn every_gateway_counter_has_its_help() {
        let serde_json::Value::Object(fields) = serde_json::to_value(GatewayMetrics::default()).unwrap() else {
            panic!("GatewayMetrics serializes as an object");
        };
        let fields: Vec<&str> = fields.keys().map(String::as_str).collect();
        let described: Vec<&str> = GATEWAY_COUNTERS.iter().map(|(f, _)| *f).collect();
        let (mut a, mut b) = (fields.clone(), described.clone());
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }
}
