//! The cloud aggregator's configuration file (TOML).
//!
//! ```toml
//! data_dir = "/var/lib/actidash"          # serving store (SQLite) and state
//!
//! [kafka]                                 # absent: the embedded mode (no Kafka)
//! bootstrap_servers = "k1:9092,k2:9092"
//! topic_prefix = "actidash"
//! group_id = "actidash-processors"
//! partitions = 6                          # of every topic, pinned (checked at start); processors beyond it stay idle
//! replication_factor = 3
//! min_insync_replicas = 2
//!
//! [gateway]
//! listen = "0.0.0.0:4433"
//! cert_file = "gateway.pem"                # the gateway's own TLS certificate
//! key_file = "gateway.key"
//! hello_timeout_ms = 10000                # a connection must authenticate (hello or enroll) within this
//!
//! [fleet]                                 # agents' certificates (all optional)
//! # ca_cert_file = "fleet-ca.pem"          # an existing CA; default: created in data_dir/fleet
//! # ca_key_file = "fleet-ca.key"
//! cert_validity_secs = 2592000            # agents renew at two thirds of it
//!
//! [serve]
//! listen = "0.0.0.0:8080"
//! ui_dir = "/usr/share/actidash/ui"        # the built dashboards (desktop/ui/dist); absent: a help page
//! cors_origins = ["tauri://localhost"]    # browser origins allowed to call the API (the desktop app)
//! requests_per_sec_per_token = 50         # per API token, bursts of four seconds' worth
//! agent_offline_after_secs = 60           # alert an agent silent this long as offline
//!
//! [store]                                 # absent: SQLite in data_dir (the embedded default)
//! url = "postgres://actidash@db:5432/actidash"
//! password_env = "ACTIDASH_STORE_PASSWORD"  # or password_file = "/etc/actidash/store.pass"
//!
//! [analytics]                             # metric definitions (all optional; defaults shown)
//! session_gap_secs = 1800                 # a gap of exactly this continues a session
//! allowed_lateness_secs = 86400           # later events still correct sessions and attribution
//! attribution_lookback_secs = 2592000     # touches up to 30 days before an order
//! time_decay_half_life_secs = 604800
//! order_retention_secs = 2592000          # a cancellation retracts credit this long
//! max_future_skew_secs = 300
//! low_stock_threshold = 20
//! funnel_steps = ["page_view", "add_to_cart", "checkout", "purchase"]
//! ```
//!
//! Unknown fields are rejected; errors name the file, the line and the field. Relative paths
//! are resolved against the configuration file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Folder of the serving store and other state.
    pub data_dir: PathBuf,
    /// Kafka; when absent, the gateway hands batches to the processor in-process.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    #[serde(default)]
    pub serve: Option<ServeConfig>,
    /// The fleet CA and registry (agent enrollment, certificates, revocation).
    #[serde(default)]
    pub fleet: crate::fleet::FleetConfig,
    /// Metric definitions and the state horizon ([`crate::analytics`]).
    #[serde(default)]
    pub analytics: crate::analytics::AnalyticsConfig,
    /// The serving store (absent: SQLite in `data_dir`).
    #[serde(default)]
    pub store: StoreConfig,
    /// The Prometheus scrape endpoint (absent: none).
    #[serde(default)]
    pub metrics: Option<crate::telemetry::MetricsConfig>,
}

/// The serving store: PostgreSQL, shared by processors and API servers on several hosts.
#[derive(Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `postgres://user@host:port/database`; absent: SQLite in `data_dir`.
    pub url: Option<String>,
    /// The password, from this environment variable…
    pub password_env: Option<String>,
    /// …or from this file (its first line).
    pub password_file: Option<PathBuf>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url.as_deref().map(crate::store::postgres::redact))
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// Where Kafka is and how ActiDash uses it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Topics are `{topic_prefix}.sales`, `.marketing`, `.behavior`, `.inventory`, `.fleet`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Consumer group of the processors.
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Create missing topics at start (with the two settings below).
    #[serde(default = "yes")]
    pub create_topics: bool,
    /// The partition count of every topic, pinned: created topics get it, and the gateway
    /// refuses to start when a topic has another (an event's partition is a function of its
    /// key and this count; see docs/operations.md before growing it).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// `min.insync.replicas` of created topics (default: 2 with a replication factor of 3 or
    /// more, else 1). With `acks=all` a write needs this many replicas.
    #[serde(default)]
    pub min_insync_replicas: Option<i32>,
    /// Give each event's record the headers `actidash-agent-id`, `actidash-source-id`,
    /// `actidash-seq` and `actidash-schema-version`, for consumers that route or de-duplicate
    /// without reading the JSON (which holds the same fields). Off by default: librdkafka
    /// allocates and frees each header of each record, a quarter of the gateway's CPU per event
    /// (docs/BENCHMARKS.md, P2).
    #[serde(default)]
    pub record_headers: bool,
}

impl KafkaConfig {
    /// The `min.insync.replicas` topics are created with.
    pub fn min_insync(&self) -> i32 {
        self.min_insync_replicas.unwrap_or(if self.replication_factor >= 3 { 2 } else { 1 })
    }
}

fn default_prefix() -> String {
    "actidash".into()
}
fn default_group() -> String {
    "actidash-processors".into()
}
fn yes() -> bool {
    true
}
fn default_partitions() -> i32 {
    6
}
fn one() -> i32 {
    1
}

/// The QUIC gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// UDP address of the QUIC endpoint.
    pub listen: SocketAddr,
    /// TCP address of the TLS fallback for agents whose networks block UDP (default: the same
    /// address as `listen`, on TCP). Same protocol, same TLS 1.3 certificate.
    #[serde(default)]
    pub listen_tcp: Option<SocketAddr>,
    /// Whether to offer the TCP fallback at all.
    #[serde(default = "yes")]
    pub tcp_fallback: bool,
    /// PEM certificate chain of the gateway.
    pub cert_file: PathBuf,
    /// PEM private key of the gateway.
    pub key_file: PathBuf,
    /// Most concurrent agent connections.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Batches an agent may have unacknowledged.
    #[serde(default = "default_window")]
    pub max_in_flight: u32,
    /// Expected heartbeat interval, in milliseconds. A revocation reaches every connection
    /// within one interval.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    /// Per agent: most concurrent connections.
    #[serde(default = "default_agent_connections")]
    pub max_connections_per_agent: usize,
    /// Per agent: most events per second, over all its connections (beyond it, the gateway
    /// reads its batches more slowly).
    #[serde(default = "default_agent_rate")]
    pub max_events_per_sec_per_agent: u32,
    /// Per agent: most bytes of events a second once decompressed, over all its connections
    /// (beyond it, the gateway reads its batches more slowly); 256 MiB by default.
    #[serde(default = "default_agent_bytes_rate")]
    pub max_bytes_per_sec_per_agent: u64,
    /// Per agent: largest batch payload, in bytes, compressed and decompressed alike (the
    /// events of a batch, one per line, may take at most this many bytes plus their newlines).
    #[serde(default = "default_batch_bytes")]
    pub max_batch_bytes: u32,
    /// Per agent: most events in one batch.
    #[serde(default = "default_batch_events")]
    pub max_batch_events: u32,
    /// Connections one address may have open without authenticating, at once (32).
    #[serde(default = "default_unauthenticated_per_address")]
    pub max_unauthenticated_per_address: usize,
    /// Enrollment attempts one address may make a minute (30).
    #[serde(default = "default_enrollments_per_min")]
    pub enrollments_per_min_per_address: u32,
    /// Once this many connections are open without authentication, a new QUIC client must
    /// first prove its address (a Retry round trip), so that spoofed sources hold nothing;
    /// 0: always (256).
    #[serde(default = "default_quic_retry_above")]
    pub quic_retry_above: usize,
    /// How long a connection may stay without authenticating (a hello with a certificate, or
    /// an enrollment) once its TLS handshake is done; 10 s by default.
    #[serde(default = "default_hello_timeout_ms")]
    pub hello_timeout_ms: u64,
}

fn default_unauthenticated_per_address() -> usize {
    32
}
fn default_enrollments_per_min() -> u32 {
    30
}
fn default_quic_retry_above() -> usize {
    256
}
fn default_hello_timeout_ms() -> u64 {
    10_000
}

fn default_max_connections() -> usize {
    10_000
}
fn default_window() -> u32 {
    8
}
fn default_heartbeat_ms() -> u64 {
    5_000
}
fn default_agent_connections() -> usize {
    4
}
/// Above what one agent ships on a 2-core machine (P2: ~310k events a second, a backlog
/// drain the same), so that the limits hold back a runaway agent, not a backlog after an
/// outage (P8): at 200 000 events and 128 MiB a second they capped the drain at ~250k.
fn default_agent_rate() -> u32 {
    500_000
}
fn default_agent_bytes_rate() -> u64 {
    256 * 1024 * 1024
}
fn default_batch_bytes() -> u32 {
    4 * 1024 * 1024
}
fn default_batch_events() -> u32 {
    10_000
}

/// The HTTP API.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// TCP address to listen on.
    pub listen: SocketAddr,
    /// The built dashboards (`desktop/ui/dist`, made by `npm run build` there), served at `/`.
    /// Without it, `/` serves a one-page fallback that says how to build them.
    #[serde(default)]
    pub ui_dir: Option<PathBuf>,
    /// Origins (`https://dash.example.com`) whose pages may call the API from a browser; none
    /// by default (the app served here is same-origin).
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Requests a second each API token may make (bursts of four seconds' worth); 50 by default.
    #[serde(default)]
    pub requests_per_sec_per_token: Option<f64>,
    /// An agent whose last heartbeat is older than this is alerted as offline (or cut off);
    /// 60 seconds by default (twelve heartbeats at the default interval).
    #[serde(default = "default_agent_offline_after_secs")]
    pub agent_offline_after_secs: u64,
    /// How long a client may take to send a request's headers before its connection is
    /// closed; 10 seconds by default.
    #[serde(default = "default_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
}

fn default_agent_offline_after_secs() -> u64 {
    60
}
fn default_header_read_timeout_ms() -> u64 {
    10_000
}

/// A configuration error, naming the file, the line (where known) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{path}: field `{field}`: {message}")]
    Invalid { path: PathBuf, field: String, message: String },
}

/// A database password from the environment variable `env` or the first line of `file` (the
/// variable wins); `field` is the settings' name less `_env`/`_file`, for errors.
pub fn read_password(field: &str, env: Option<&str>, file: Option<&Path>) -> anyhow::Result<Option<String>> {
    use anyhow::Context as _;
    Ok(match (env, file) {
        (Some(var), _) => Some(std::env::var(var).with_context(|| format!("{field}_env: ${var} is not set"))?),
        (_, Some(file)) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("{field}_file: reading {}", file.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .to_owned(),
        ),
        _ => None,
    })
}

impl CloudConfig {
    /// Where the serving store is, with its password read from the environment or its file.
    pub fn store_location(&self) -> anyhow::Result<crate::store::Location> {
        let Some(url) = &self.store.url else {
            return Ok(crate::store::Location::Sqlite(self.data_dir.join(crate::STORE_FILE)));
        };
        let password =
            read_password("store.password", self.store.password_env.as_deref(), self.store.password_file.as_deref())?;
        Ok(crate::store::Location::Postgres { url: url.clone(), password })
    }

    pub fn load(path: &Path) -> Result<CloudConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        CloudConfig::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<CloudConfig, ConfigError> {
        let mut config: CloudConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            line: e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1).unwrap_or(0),
            message: e.message().to_owned(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut config.data_dir);
        if let Some(g) = &mut config.gateway {
            resolve(&mut g.cert_file);
            resolve(&mut g.key_file);
        }
        for p in [&mut config.fleet.ca_cert_file, &mut config.fleet.ca_key_file, &mut config.store.password_file]
            .into_iter()
            .flatten()
        {
            resolve(p);
        }
        config.validate().map_err(|(field, message)| ConfigError::Invalid { path: path.to_owned(), field, message })?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (String, String)> {
        if let Some(k) = &self.kafka {
            if k.partitions < 1 {
                return Err(("kafka.partitions".into(), "must be at least 1".into()));
            }
            if k.replication_factor < 1 {
                return Err(("kafka.replication_factor".into(), "must be at least 1".into()));
            }
            if !(1..=k.replication_factor).contains(&k.min_insync()) {
                return Err((
                    "kafka.min_insync_replicas".into(),
                    format!("must be between 1 and the replication factor ({})", k.replication_factor),
                ));
            }
            if k.topic_prefix.is_empty()
                || !k.topic_prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return Err((
                    "kafka.topic_prefix".into(),
                    format!("{:?} is not a valid topic name prefix", k.topic_prefix),
                ));
            }
        }
        if let Some(g) = &self.gateway {
            if g.max_in_flight == 0 {
                return Err(("gateway.max_in_flight".into(), "must be at least 1".into()));
            }
            for (field, value) in [
                ("max_connections_per_agent", g.max_connections_per_agent as u64),
                ("max_events_per_sec_per_agent", u64::from(g.max_events_per_sec_per_agent)),
                ("max_bytes_per_sec_per_agent", g.max_bytes_per_sec_per_agent),
                ("max_unauthenticated_per_address", g.max_unauthenticated_per_address as u64),
                ("enrollments_per_min_per_address", u64::from(g.enrollments_per_min_per_address)),
                ("max_batch_bytes", u64::from(g.max_batch_bytes)),
                ("max_batch_events", u64::from(g.max_batch_events)),
            ] {
                if value == 0 {
                    return Err((format!("gateway.{field}"), "must be at least 1".into()));
                }
            }
        }
        self.analytics.validate()?;
        if let Some(url) = &self.store.url {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                return Err(("store.url".into(), "expected a postgres:// URL".into()));
            }
            if self.store.password_env.is_some() && self.store.password_file.is_some() {
                return Err(("store.password_env".into(), "set password_env or password_file, not both".into()));
            }
        } else if self.store.password_env.is_some() || self.store.password_file.is_some() {
            return Err(("store.url".into(), "a password is set but no url".into()));
        }
        if self.fleet.ca_cert_file.is_some() != self.fleet.ca_key_file.is_some() {
            return Err(("fleet.ca_cert_file".into(), "set both ca_cert_file and ca_key_file, or neither".into()));
        }
        if self.fleet.cert_validity_secs > crate::fleet::MAX_VALIDITY_SECS {
            return Err((
                "fleet.cert_validity_secs".into(),
                format!(
                    "at most {} (a year): a stolen certificate is good until it ends or is revoked; agents renew by themselves",
                    crate::fleet::MAX_VALIDITY_SECS
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_example_is_valid() {
        let text = actidash_shared::testing::doc_toml(include_str!("config.rs")).unwrap();
        let cfg = CloudConfig::parse(&text, Path::new("/etc/actidash/cloud.toml")).unwrap();
        assert_eq!(cfg.fleet.cert_validity_secs, 2_592_000);
        assert!(cfg.kafka.is_some() && cfg.gateway.is_some() && cfg.serve.is_some());
    }

    #[test]
    fn parses_embedded_and_rejects_unknown_fields_with_line() {
        let text = "data_dir = \"d\"\n[serve]\nlisten = \"127.0.0.1:8080\"\n";
        let cfg = CloudConfig::parse(text, Path::new("/etc/a/cloud.toml")).unwrap();
        assert!(cfg.kafka.is_none());
        assert_eq!(cfg.data_dir, Path::new("/etc/a/d"));

        let err = CloudConfig::parse(
            "data_dir = \"d\"\n[serve]\nlisten = \"127.0.0.1:8080\"\nport = 1\n",
            Path::new("c.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("c.toml:4:"), "{err}");
        assert!(err.contains("port"), "{err}");

        let bad = "data_dir = \"d\"\n[gateway]\nlisten = \"127.0.0.1:1\"\ncert_file = \"c\"\nkey_file = \"k\"\nmax_batch_events = 0\n";
        let err = CloudConfig::parse(bad, Path::new("c.toml")).unwrap_err().to_string();
        assert_eq!(err, "c.toml: field `gateway.max_batch_events`: must be at least 1");
        let long = "data_dir = \"d\"\n[fleet]\ncert_validity_secs = 315360000\n";
        let err = CloudConfig::parse(long, Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.starts_with("c.toml: field `fleet.cert_validity_secs`: at most 31536000 (a year)"), "{err}");
        let half = "data_dir = \"d\"\n[fleet]\nca_cert_file = \"ca.pem\"\n";
        let err = CloudConfig::parse(half, Path::new("c.toml")).unwrap_err().to_string();
        assert!(err.contains("fleet.ca_cert_file"), "{err}");
    }
}
