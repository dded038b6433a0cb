//! The PostgreSQL polling driver, with a snapshot-based commit-safe watermark.
//!
//! Every read runs in a `REPEATABLE READ READ ONLY` transaction, so the rows and the snapshot
//! it reports (`pg_current_snapshot()`) agree. The largest key visible in a snapshot S is
//! *final* once every transaction that was running at S has ended, i.e. once a later
//! snapshot's oldest running transaction (`xmin`) is at or past S's `xmax`: a transaction
//! that started later draws larger ids from the sequence (or later timestamps). Rows up to a
//! final key are read; the key of the current snapshot waits for the next poll.
//!
//! Assumption, documented for operators: keys come from a sequence without a per-session
//! cache (the default), or a commit-ordered timestamp; an application that draws an id and
//! inserts it in a later transaction can still commit below the watermark.

use postgres::{Client, NoTls};
use serde_json::Value;

use super::{DbSourceConfig, Dialect, KeyPosition, Row, RowReader};
use crate::secret::Secret;

/// A key seen in a snapshot, final once transactions before `xmax` have ended.
#[derive(Debug, Clone)]
struct Pending {
    key: Vec<Value>,
    xmax: u64,
}

/// Reads a PostgreSQL table or query.
pub struct PgReader {
    connect: PgConnect,
    describe: String,
    client: Option<Client>,
    from: String,
    keys: Vec<String>,
    /// SQL types of the key columns, for casting stored (text) positions back.
    key_types: Vec<String>,
    pending: Option<Pending>,
    waiting: Option<String>,
}

impl std::fmt::Debug for PgReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgReader").field("database", &self.describe).finish()
    }
}

/// How to connect: the server's configuration and, with TLS, the verifying client.
#[derive(Clone)]
pub struct PgConnect {
    pub config: postgres::Config,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
}

impl PgConnect {
    /// From a source's URL, password and TLS settings; with a description free of secrets.
    pub fn new(cfg: &DbSourceConfig, password: Option<&Secret>) -> Result<(PgConnect, String), String> {
        let (mut config, describe) = client_config(&cfg.url, password)?;
        let tls = match &cfg.tls {
            None => None,
            Some(t) => {
                config.ssl_mode(postgres::config::SslMode::Require);
                Some(tokio_postgres_rustls::MakeRustlsConnect::new(super::tls_client_config(&t.ca_file)?))
            }
        };
        let describe = if tls.is_some() { format!("{describe} (TLS)") } else { describe };
        Ok((PgConnect { config, tls }, describe))
    }

    /// Connects, with the session settings every reader relies on.
    pub fn connect(&self) -> Result<Client, String> {
        let mut client = match &self.tls {
            Some(tls) => self.config.connect(tls.clone()).map_err(pg_error)?,
            None => self.config.connect(NoTls).map_err(pg_error)?,
        };
        client.batch_execute("SET TIME ZONE 'UTC'; SET statement_timeout = '60s'").map_err(pg_error)?;
        Ok(client)
    }
}

/// A connection configuration from a URL and a password; the description has no secrets.
pub fn client_config(url: &str, password: Option<&Secret>) -> Result<(postgres::Config, String), String> {
    let mut config: postgres::Config = url.parse().map_err(|e| format!("url: {e}"))?;
    if let Some(p) = password {
        config.password(p.expose());
    }
    config.application_name("actidash-edge-agent");
    config.connect_timeout(std::time::Duration::from_secs(10));
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .unwrap_or_default();
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let describe =
        format!("postgres://{}@{host}:{port}/{}", config.get_user().unwrap_or(""), config.get_dbname().unwrap_or(""));
    Ok((config, describe))
}

/// A PostgreSQL error with the server's message and code (its `Display` alone says "db error").
pub fn pg_error(e: postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} (SQLSTATE {})", db.severity(), db.message(), db.code().code()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(&format!(": {s}"));
                source = s.source();
            }
            text
        }
    }
}

impl PgReader {
    pub fn new(cfg: &DbSourceConfig, password: Option<Secret>) -> Result<PgReader, String> {
        let (connect, describe) = PgConnect::new(cfg, password.as_ref())?;
        let from = cfg.relation_sql(Dialect::Postgres).map_err(|(f, m)| format!("{f}: {m}"))?;
        let keys = cfg.key_columns().map_err(|(f, m)| format!("{f}: {m}"))?;
        let what = cfg.table.clone().unwrap_or_else(|| "query".into());
        Ok(PgReader {
            connect,
            describe: format!("{describe} {what}"),
            client: None,
            from,
            keys,
            key_types: Vec::new(),
            pending: None,
            waiting: None,
        })
    }

    fn key_list(&self) -> String {
        self.keys.iter().map(|k| format!("t.{}", Dialect::Postgres.quote(k))).collect::<Vec<_>>().join(", ")
    }

    fn key_text(&self) -> String {
        self.keys.iter().map(|k| format!("t.{}::text", Dialect::Postgres.quote(k))).collect::<Vec<_>>().join(", ")
    }

    /// `($n::text::type, ...)` for the key starting at parameter `first`.
    fn key_params(&self, first: usize) -> String {
        let parts: Vec<String> =
            self.key_types.iter().enumerate().map(|(i, ty)| format!("${}::text::{ty}", first + i)).collect();
        format!("({})", parts.join(", "))
    }
}

fn key_values(row: &postgres::Row, from: usize, n: usize) -> Result<Vec<Value>, String> {
    (from..from + n)
        .map(|i| row.try_get::<_, Option<String>>(i).map(|v| v.map_or(Value::Null, Value::String)).map_err(pg_error))
        .collect()
}

fn key_strings(key: &[Value]) -> Vec<Option<String>> {
    key.iter()
        .map(|v| match v {
            Value::Null => None,
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        })
        .collect()
}

impl RowReader for PgReader {
    fn caught_up(&self) -> bool {
        self.pending.is_none()
    }

    fn connect(&mut self) -> Result<(), String> {
        self.client = None;
        let mut client = self.connect.connect()?;
        // The key columns' types, to compare stored positions in the column's own type.
        let stmt =
            client.prepare(&format!("SELECT {} FROM {} t LIMIT 0", self.key_list(), self.from)).map_err(pg_error)?;
        self.key_types = stmt.columns().iter().map(|c| c.type_().name().to_owned()).collect();
        self.client = Some(client);
        Ok(())
    }

    fn rows_behind(&mut self, after: &KeyPosition) -> Result<Option<u64>, String> {
        let after_strings = key_strings(&after.key);
        let has_after = after_strings.len() == self.keys.len();
        let cond = if has_after { format!("({}) > {}", self.key_list(), self.key_params(1)) } else { "true".into() };
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} t WHERE {cond} LIMIT {}) c",
            self.from,
            super::ROWS_BEHIND_CAP
        );
        let params: Vec<Option<String>> = if has_after { after_strings } else { Vec::new() };
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            params.iter().map(|p| p as &(dyn postgres::types::ToSql + Sync)).collect();
        let client = self.client.as_mut().ok_or("not connected")?;
        let n: i64 = client.query_one(&sql, &refs).map_err(pg_error)?.try_get(0).map_err(pg_error)?;
        Ok(Some(u64::try_from(n).unwrap_or(0)))
    }

    fn read(&mut self, after: &KeyPosition, limit: usize) -> Result<Vec<Row>, String> {
        let n = self.keys.len();
        let after_strings = key_strings(&after.key);
        let has_after = after_strings.len() == n;
        let after_cond =
            if has_after { format!("({}) > {}", self.key_list(), self.key_params(1)) } else { "true".into() };
        let order = self.key_list();
        let rows_sql = format!(
            "SELECT to_jsonb(t)::text, {} FROM {} t WHERE {after_cond} AND ({order}) <= {} ORDER BY {order} LIMIT {limit}",
            self.key_text(),
            self.from,
            self.key_params(if has_after { n + 1 } else { 1 }),
        );
        let max_sql = |has_after: bool| {
            let cond =
                if has_after { format!("({}) > {}", self.key_list(), self.key_params(1)) } else { "true".into() };
            let desc: Vec<String> =
                self.keys.iter().map(|k| format!("t.{} DESC", Dialect::Postgres.quote(k))).collect();
            format!("SELECT {} FROM {} t WHERE {cond} ORDER BY {} LIMIT 1", self.key_text(), self.from, desc.join(", "))
        };
        let max_sql = [max_sql(false), max_sql(true)];
        let client = self.client.as_mut().ok_or("not connected")?;
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(pg_error)?;
        let snap = tx
            .query_one("SELECT pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text FROM pg_current_snapshot() s", &[])
            .map_err(pg_error)?;
        let parse = |i: usize| -> Result<u64, String> {
            snap.try_get::<_, String>(i).map_err(pg_error)?.parse::<u64>().map_err(|e| e.to_string())
        };
        let (xmin, xmax) = (parse(0)?, parse(1)?);

        let mut out = Vec::new();
        if let Some(p) = &self.pending
            && xmin >= p.xmax
        {
            let mut params: Vec<Option<String>> = if has_after { after_strings.clone() } else { Vec::new() };
            params.extend(key_strings(&p.key));
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn postgres::types::ToSql + Sync)).collect();
            for row in tx.query(&rows_sql, &refs).map_err(pg_error)? {
                let json: String = row.try_get(0).map_err(pg_error)?;
                out.push(Row { json, key: key_values(&row, 1, n)? });
            }
            if out.len() < limit {
                self.pending = None; // read up to it
            }
        }
        if self.pending.is_none() {
            let params: Vec<Option<String>> = if let Some(last) = out.last() {
                key_strings(&last.key)
            } else if has_after {
                after_strings
            } else {
                Vec::new()
            };
            let max_sql = &max_sql[usize::from(!params.is_empty())];
            let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
                params.iter().map(|p| p as &(dyn postgres::types::ToSql + Sync)).collect();
            if let Some(row) = tx.query_opt(max_sql, &refs).map_err(pg_error)? {
                self.pending = Some(Pending { key: key_values(&row, 0, n)?, xmax });
            }
        }
        tx.commit().map_err(pg_error)?;
        self.waiting = match &self.pending {
            Some(p) if xmin < p.xmax => Some(format!(
                "newer rows wait for transactions older than xid {} to end (oldest running: {xmin})",
                p.xmax
            )),
            _ => None,
        };
        Ok(out)
    }

    fn waiting_for(&self) -> Option<String> {
        self.waiting.clone()
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
