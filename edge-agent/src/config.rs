//! The agent's configuration file (TOML).
//!
//! ```toml
//! agent_id = "store-eu-1"
//! tenant = "acme"
//! data_dir = "/var/lib/actidash-agent"
//!
//! [cloud]
//! address = "gateway.example.com:4433"
//! server_name = "gateway.example.com"
//! ca_file = "/etc/actidash/ca.pem"         # the CA of the gateway's certificate
//! # identity_dir = "/var/lib/actidash-agent/identity"   # key and certificate (edge-agent enroll)
//!
//! [[sources]]
//! id = "orders"
//! type = "file"
//! path = "/data/exports/orders.jsonl"
//! [sources.mapping]
//! domain = "sales"
//! event_time = { field = "created_at", format = "rfc3339" }
//! fields = { order_id = "id", customer_id = "customer", channel = "channel", site = "site", country = "country", currency = "currency", amount = "total", status = "status" }
//!
//! [[sources]]
//! id = "web"
//! type = "file"
//! include = ["/var/log/nginx/access.log*"]     # globs; new files are picked up
//! exclude = ["*.tmp"]                          # a pattern without `/` matches file names
//! format = "regex"
//! regex = { preset = "combined" }
//! [sources.mapping]
//! domain = "behavior"
//! event_time = { field = "time", format = "%d/%b/%Y:%H:%M:%S %z" }
//! fields = { visitor_id = "remote", url = "path", referrer = "referrer" }
//! constants = { type = "page_view" }
//!
//! [[sources]]
//! id = "shop-db"
//! type = "postgres"                            # or "mysql" (MySQL and MariaDB)
//! url = "postgres://actidash_reader@db.local:5432/shop"
//! password_file = "/etc/actidash/shop-db.password"   # or password_env = "SHOP_DB_PASSWORD"
//! table = "orders"                             # or query = "SELECT ..."
//! incremental_column = "id"                    # or timestamp_column + tie_breaker
//! tls = { ca_file = "/etc/actidash/shop-db-ca.pem" }  # encrypted, server verified
//! # logical = { create = true }                # PostgreSQL: logical replication instead
//! [sources.mapping]
//! domain = "sales"
//! event_time = { field = "created_at" }
//! fields = { order_id = "id", customer_id = "customer_id", channel = "channel", site = "site", country = "country", currency = "currency", amount = "total", status = "status" }
//! ```
//!
//! Unknown fields are rejected. Errors name the file, the line and the field. Relative paths
//! are resolved against the configuration file's folder.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::sources::SourceConfig;
use crate::spool::SpoolConfig;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// This agent's id, unique in the fleet.
    pub agent_id: String,
    /// The tenant this agent's data belongs to.
    pub tenant: String,
    /// Where the spool and other state live.
    pub data_dir: PathBuf,
    /// How to reach the cloud.
    pub cloud: CloudConfig,
    /// The sources to read.
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    /// Shipping tunables.
    #[serde(default)]
    pub shipper: ShipperConfig,
    /// The spool's limit and durability.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// The Prometheus scrape endpoint (absent: none).
    #[serde(default)]
    pub metrics: Option<crate::telemetry::MetricsConfig>,
    /// `local` (default): this file's sources; `cloud`: the sources the cloud pushes for
    /// `group` ([`crate::central`]), this file's until the first push.
    #[serde(default)]
    pub config_source: ConfigSource,
    /// The agent's group for central configuration.
    #[serde(default = "default_group")]
    pub group: String,
    /// How long a pushed configuration's sources have to start before the agent rolls it back.
    #[serde(default = "default_config_grace_secs")]
    pub config_grace_secs: u64,
}

/// Where the agent's sources come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    #[default]
    Local,
    Cloud,
}

fn default_group() -> String {
    "default".into()
}

fn default_config_grace_secs() -> u64 {
    30
}

/// What the cloud may push: the sources and the shipper's settings. The identity, the cloud,
/// the spool and the data folder stay in the local file, so that a push cannot cut an agent off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PushedConfig {
    #[serde(default)]
    sources: Vec<SourceConfig>,
    #[serde(default)]
    shipper: Option<ShipperConfig>,
}

/// The gateway to ship to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// `host:port` of the gateway's QUIC endpoint.
    pub address: String,
    /// The name the gateway's certificate must carry.
    pub server_name: String,
    /// PEM file of the CA that signed the gateway's certificate.
    pub ca_file: PathBuf,
    /// Where the agent's key and certificate live (default `data_dir/identity`); written by
    /// `edge-agent enroll`, renewed by the agent.
    #[serde(default)]
    pub identity_dir: Option<PathBuf>,
    /// `auto` (default: QUIC, falling back to TLS over TCP by itself where UDP is blocked),
    /// `quic` or `tcp`.
    #[serde(default)]
    pub transport: TransportMode,
}

/// Which transport the shipper uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TransportMode {
    #[default]
    Auto,
    Quic,
    Tcp,
}

/// Shipping tunables.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShipperConfig {
    /// Largest number of events in a batch (the gateway may impose less).
    pub max_batch_events: u32,
    /// Largest uncompressed batch, in bytes.
    pub max_batch_bytes: u32,
    /// Upper bound of the reconnection backoff, in milliseconds.
    pub max_backoff_ms: u64,
}

impl Default for ShipperConfig {
    fn default() -> ShipperConfig {
        // A 2 s cap: an agent is back within 2 s of the link's return (target P8).
        ShipperConfig { max_batch_events: 2_000, max_batch_bytes: 2 * 1024 * 1024, max_backoff_ms: 2_000 }
    }
}

/// A configuration error, naming the file, the line (where known) and the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: {message}")]
    Parse { path: PathBuf, line: usize, message: String },
    #[error("{path}:{line}: field `{field}`: {message}")]
    Invalid { path: PathBuf, line: usize, field: String, message: String },
}

impl AgentConfig {
    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        AgentConfig::parse(&text, path)
    }

    /// Parses and validates configuration text that was read from `path`.
    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| parse_error(text, path, &e))?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        config.validate().map_err(|(field, message)| ConfigError::Invalid {
            path: path.to_owned(),
            line: find_line(text, &field),
            field,
            message,
        })?;
        Ok(config)
    }

    /// This configuration with the sources (and shipper settings) of a pushed configuration
    /// whose text is named `path` in errors ([`crate::central`]); checked as a whole, as
    /// [`AgentConfig::parse`] checks a file, and refused if it holds a secret.
    pub fn with_pushed(&self, text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let pushed: PushedConfig = toml::from_str(text).map_err(|e| parse_error(text, path, &e))?;
        let mut config = self.clone();
        config.sources = pushed.sources;
        if let Some(shipper) = pushed.shipper {
            config.shipper = shipper;
        }
        let base = path.parent().unwrap_or(Path::new("."));
        for source in &mut config.sources {
            source.resolve_paths(base);
        }
        let invalid = |(field, message): (String, String)| ConfigError::Invalid {
            path: path.to_owned(),
            line: find_line(text, &field),
            field,
            message,
        };
        config.validate().map_err(invalid)?;
        no_secrets(&config.sources).map_err(invalid)?;
        Ok(config)
    }

    /// Checks a configuration meant to be pushed to agents of `tenant` (the cloud's `config
    /// push`): the same checks, and the same errors, as an agent applying it.
    pub fn check_pushed(text: &str, path: &Path, tenant: &str) -> Result<(), ConfigError> {
        let template = AgentConfig {
            agent_id: "config-check".into(),
            tenant: tenant.into(),
            data_dir: PathBuf::from("/nonexistent"),
            cloud: CloudConfig {
                address: "cloud.invalid:4433".into(),
                server_name: "cloud.invalid".into(),
                ca_file: PathBuf::from("/nonexistent/ca.pem"),
                identity_dir: None,
                transport: TransportMode::Auto,
            },
            sources: Vec::new(),
            shipper: ShipperConfig::default(),
            spool: SpoolConfig::default(),
            metrics: None,
            config_source: ConfigSource::Cloud,
            group: default_group(),
            config_grace_secs: default_config_grace_secs(),
        };
        template.with_pushed(text, path).map(drop)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        resolve(&mut self.cloud.ca_file);
        if let Some(p) = &mut self.cloud.identity_dir {
            resolve(p);
        }
        for source in &mut self.sources {
            source.resolve_paths(base);
        }
    }

    /// Checks what serde cannot: returns the offending field's dotted path and a message.
    fn validate(&self) -> Result<(), (String, String)> {
        check_id("agent_id", &self.agent_id)?;
        check_id("tenant", &self.tenant)?;
        check_id("group", &self.group)?;
        if self.cloud.address.parse::<SocketAddr>().is_err() && !self.cloud.address.contains(':') {
            return Err(("cloud.address".into(), format!("{:?} is not host:port", self.cloud.address)));
        }
        if self.spool.max_bytes < 1024 * 1024 {
            return Err(("spool.max_bytes".into(), format!("{} is below the minimum of 1 MiB", self.spool.max_bytes)));
        }
        if self.shipper.max_batch_events == 0 {
            return Err(("shipper.max_batch_events".into(), "must be at least 1".into()));
        }
        let mut seen = HashSet::new();
        for (idx, source) in self.sources.iter().enumerate() {
            let id = source.id();
            check_id(&format!("sources[{idx}].id"), id)?;
            if !seen.insert(id) {
                return Err((format!("sources[{idx}].id"), format!("duplicate source id {id:?}")));
            }
            source.mapping().validate().map_err(|(field, msg)| (format!("sources[{idx}].mapping.{field}"), msg))?;
            match source {
                SourceConfig::File(f) => {
                    f.validate().map_err(|(field, msg)| (format!("sources[{idx}].{field}"), msg))?;
                }
                SourceConfig::Sqlite(d) => {
                    d.sql().map_err(|(field, msg)| (format!("sources[{idx}].{field}"), msg))?;
                }
                SourceConfig::Postgres(d) => d
                    .validate(crate::sources::db::Dialect::Postgres)
                    .map_err(|(field, msg)| (format!("sources[{idx}].{field}"), msg))?,
                SourceConfig::Mysql(d) => d
                    .validate(crate::sources::db::Dialect::Mysql)
                    .map_err(|(field, msg)| (format!("sources[{idx}].{field}"), msg))?,
            }
        }
        Ok(())
    }

    /// Loads every secret the configuration names (database passwords), to prove they are
    /// there; errors name where each was looked for, never its value.
    pub fn check_secrets(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        for source in &self.sources {
            if let SourceConfig::Postgres(d) | SourceConfig::Mysql(d) = source {
                d.password_source().load().with_context(|| format!("source {}", d.id))?;
            }
        }
        Ok(())
    }

    /// Where the agent's key and certificate live.
    pub fn identity_dir(&self) -> PathBuf {
        self.cloud.identity_dir.clone().unwrap_or_else(|| self.data_dir.join("identity"))
    }
}

/// Refuses secrets in pushed sources: a database password inline or in the URL.
fn no_secrets(sources: &[SourceConfig]) -> Result<(), (String, String)> {
    const HOW: &str = "secrets are never pushed: name an environment variable or a file on the agent's host (password_env, password_file)";
    for (idx, source) in sources.iter().enumerate() {
        if let SourceConfig::Postgres(d) | SourceConfig::Mysql(d) = source {
            if d.password.is_some() {
                return Err((format!("sources[{idx}].password"), HOW.into()));
            }
            let userinfo = d.url.split_once("://").and_then(|(_, rest)| rest.split_once('@')).map(|(u, _)| u);
            if userinfo.is_some_and(|u| u.contains(':')) {
                return Err((format!("sources[{idx}].url"), format!("the URL holds a password; {HOW}")));
            }
        }
    }
    Ok(())
}

/// A TOML or serde error of `text` (read from `path`), with its field and line where known.
fn parse_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    match locate_source_error(text) {
        // Inside a source serde's tagged enum loses the place: found again, field and line.
        Some((field, message)) => {
            ConfigError::Invalid { path: path.to_owned(), line: find_line(text, &field), field, message }
        }
        None => ConfigError::Parse {
            path: path.to_owned(),
            line: e.span().map(|s| line_of(text, s.start)).unwrap_or(0),
            message: e.message().to_owned(),
        },
    }
}

fn check_id(field: &str, value: &str) -> Result<(), (String, String)> {
    let ok = !value.is_empty()
        && value.len() <= 128
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if ok {
        Ok(())
    } else {
        Err((field.to_owned(), format!("{value:?} must be 1-128 characters of A-Z a-z 0-9 - _ .")))
    }
}

/// The dotted field and message of an error inside one of the `[[sources]]`, found by reading
/// each source alone as its `type` says, with the path of the error tracked
/// (`sources[0].mapping.fields.amount`); None when the sources read (the error is elsewhere).
fn locate_source_error(text: &str) -> Option<(String, String)> {
    fn check<T: serde::de::DeserializeOwned>(value: toml::Value) -> Result<(), (String, String)> {
        serde_path_to_error::deserialize::<_, T>(value)
            .map(|_| ())
            .map_err(|e| (e.path().to_string(), e.inner().message().to_owned()))
    }
    let table: toml::Table = toml::from_str(text).ok()?;
    let sources = table.get("sources")?.as_array()?;
    for (idx, source) in sources.iter().enumerate() {
        let mut source = source.as_table()?.clone();
        let kind = source.remove("type").and_then(|t| t.as_str().map(str::to_owned)).unwrap_or_default();
        let value = toml::Value::Table(source);
        let result = match kind.as_str() {
            "file" => check::<crate::sources::file::FileSourceConfig>(value),
            "sqlite" => check::<crate::sources::sqlite::SqliteSourceConfig>(value),
            "postgres" | "mysql" => check::<crate::sources::db::DbSourceConfig>(value),
            _ => continue,
        };
        if let Err((field, message)) = result {
            let field = if field == "." { format!("sources[{idx}]") } else { format!("sources[{idx}].{field}") };
            return Some((field, message));
        }
    }
    None
}

fn line_of(text: &str, byte_offset: usize) -> usize {
    text[..byte_offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Best-effort line of a dotted field path such as `sources[1].mapping.domain`: the line of
/// the last key, searched after the `[[sources]]` table of that index.
fn find_line(text: &str, field: &str) -> usize {
    let mut from = 0;
    let mut key = field;
    for part in field.split('.') {
        if let Some((name, idx)) = part.strip_suffix(']').and_then(|p| p.split_once('[')) {
            let idx: usize = idx.parse().unwrap_or(0);
            let header = format!("[[{name}]]");
            let mut pos = 0;
            for _ in 0..=idx {
                match text[pos..].find(&header) {
                    Some(p) => {
                        from = pos + p;
                        pos = from + header.len();
                    }
                    None => break,
                }
            }
        }
        key = part;
    }
    let key = key.split('[').next().unwrap_or(key);
    text[from..]
        .lines()
        .scan(from, |offset, line| {
            let start = *offset;
            *offset += line.len() + 1;
            Some((start, line))
        })
        .find(|(_, line)| {
            let t = line.trim_start();
            t.starts_with(key) && t[key.len()..].trim_start().starts_with('=')
                || t.contains(&format!(" {key} ="))
                || t.contains(&format!("{{{key} ="))
        })
        .map(|(start, _)| line_of(text, start))
        .unwrap_or_else(|| line_of(text, from))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
agent_id = "a1"
tenant = "acme"
data_dir = "state"

[cloud]
address = "127.0.0.1:4433"
server_name = "localhost"
ca_file = "ca.pem"

[[sources]]
id = "orders"
type = "file"
path = "orders.jsonl"
[sources.mapping]
domain = "sales"
event_time = { field = "ts", format = "rfc3339" }
fields = { order_id = "id", customer_id = "customer", channel = "channel", site = "site", country = "country", currency = "currency", amount = "total", status = "status" }
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let cfg = AgentConfig::parse(GOOD, Path::new("/etc/actidash/agent.toml")).unwrap();
        assert_eq!(cfg.data_dir, Path::new("/etc/actidash/state"));
        assert_eq!(cfg.cloud.ca_file, Path::new("/etc/actidash/ca.pem"));
        assert_eq!(cfg.identity_dir(), Path::new("/etc/actidash/state/identity"));
        assert_eq!(cfg.sources.len(), 1);
    }

    #[test]
    fn the_documented_example_is_valid() {
        let text = actidash_shared::testing::doc_toml(include_str!("config.rs")).unwrap();
        let cfg = AgentConfig::parse(&text, Path::new("/etc/actidash/agent.toml")).unwrap();
        assert_eq!(cfg.sources.len(), 3);
    }

    #[test]
    fn database_sources_are_checked_with_their_secrets() {
        let pg = GOOD.replace(
            "type = \"file\"\npath = \"orders.jsonl\"",
            "type = \"postgres\"\nurl = \"postgres://reader@db:5432/shop\"\npassword_file = \"pw\"\ntable = \"orders\"\nincremental_column = \"id\"",
        );
        let cfg = AgentConfig::parse(&pg, Path::new("/etc/actidash/agent.toml")).unwrap();
        let SourceConfig::Postgres(d) = &cfg.sources[0] else { panic!() };
        assert_eq!(d.password_file.as_deref(), Some(Path::new("/etc/actidash/pw")));
        let err = format!("{:#}", cfg.check_secrets().unwrap_err());
        assert!(err.contains("source orders") && err.contains("/etc/actidash/pw"), "{err}");

        let mysql_url = pg.replace("type = \"postgres\"", "type = \"mysql\"");
        let err = AgentConfig::parse(&mysql_url, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("field `sources[0].url`") && err.contains("mysql://"), "{err}");

        let logical_mysql = pg
            .replace("type = \"postgres\"", "type = \"mysql\"")
            .replace("postgres://", "mysql://")
            .replace("table = \"orders\"", "table = \"orders\"\nlogical = { create = true }");
        let err = AgentConfig::parse(&logical_mysql, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("field `sources[0].logical`"), "{err}");

        let two = pg.replace("password_file = \"pw\"", "password_file = \"pw\"\npassword_env = \"PW\"");
        let err = AgentConfig::parse(&two, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("field `sources[0].password`"), "{err}");
        let secret = pg.replace("password_file = \"pw\"", "password = \"hunter2\"");
        let cfg = AgentConfig::parse(&secret, Path::new("agent.toml")).unwrap();
        let debug = format!("{cfg:?}");
        assert!(!debug.contains("hunter2"), "inline secrets never show in Debug");
    }

    #[test]
    fn unknown_field_names_file_line_and_field() {
        let text = GOOD.replace("server_name", "sever_name");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:8:"), "{err}");
        assert!(err.contains("sever_name"), "{err}");
    }

    #[test]
    fn semantic_errors_name_the_field_and_its_line() {
        let text = GOOD.replace("domain = \"sales\"", "domain = \"sails\"");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("sails"), "{err}");

        let text = GOOD.replace("agent_id = \"a1\"", "agent_id = \"a 1\"");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:2: field `agent_id`"), "{err}");

        let text = GOOD.replace("path = \"orders.jsonl\"", "path = \"orders.jsonl\"\nmultiline = { start = \"(\" }");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("field `sources[0].multiline.start`"), "{err}");

        let text = GOOD
            .replace("type = \"file\"", "type = \"sqlite\"")
            .replace("path = \"orders.jsonl\"", "path = \"shop.db\"\ntable = \"orders\"");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.contains("field `sources[0].incremental_column`"), "{err}");

        let text = GOOD.replace("order_id = \"id\"", "order_number = \"id\"");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:18: field `sources[0].mapping.fields.order_number`"), "{err}");
    }

    /// A wrong value type inside a source names its own line and dotted field, not the
    /// `[[sources]]` header (issue 10).
    #[test]
    fn type_errors_inside_a_source_name_their_line_and_field() {
        let text = GOOD.replace(
            "fields = { order_id",
            "where = [{ field = \"env\", not_equals = \"test\" }]\nfields = { amount_x = 1, order_id",
        );
        let text = text.replace("amount = \"total\"", "amount = [\"total\"]").replace("amount_x = 1, ", "");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(
            err.starts_with("agent.toml:19: field `sources[0].mapping.fields.amount`: invalid type: sequence"),
            "{err}"
        );
        let text = GOOD.replace("path = \"orders.jsonl\"", "path = \"orders.jsonl\"\npoll_interval_ms = \"fast\"");
        let err = AgentConfig::parse(&text, Path::new("agent.toml")).unwrap_err().to_string();
        assert!(err.starts_with("agent.toml:15: field `sources[0].poll_interval_ms`: invalid type: string"), "{err}");
    }
}
