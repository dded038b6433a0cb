//! The MySQL/MariaDB polling driver, with a settle delay and a re-check.
//!
//! MySQL has no snapshot horizon to ask for, so a new largest key is only *observed* at first.
//! It is read up to once `settle_ms` has passed and none of the InnoDB transactions that were
//! writing when it was observed is still running (when the account may see
//! `information_schema.INNODB_TRX`, which needs the PROCESS privilege; without it the delay
//! alone applies). The whole window after the stored position is then read again, so rows
//! that committed late inside it are included.
//!
//! The server refreshes INNODB_TRX from a cache that is renewed only after 100 ms without
//! reads of it; the driver spaces its reads wider. Another client reading it without pause
//! keeps it stale: that only lengthens the wait for transactions already seen, while the
//! settle delay still covers transactions too new to be listed.

use std::time::{Duration, Instant};

use mysql::prelude::Queryable as _;
use mysql::{Conn, Opts, OptsBuilder};
use serde_json::Value;
use tracing::info;

use super::{DbSourceConfig, Dialect, KeyPosition, Row, RowReader};
use crate::secret::Secret;

/// The CA file must exist and hold a certificate (the driver would only say so at connect).
fn check_ca_file(ca_file: &std::path::Path) -> Result<(), String> {
    crate::transport::quic::load_certs(ca_file).map(|_| ()).map_err(|e| format!("tls.ca_file: {e:#}"))
}

/// A key observed, and what it waits for.
#[derive(Debug, Clone)]
struct Pending {
    key: Vec<Value>,
    seen_at: Instant,
    /// InnoDB transactions writing when it was seen (None: not visible to this account).
    writers: Option<Vec<String>>,
}

/// Reads a MySQL/MariaDB table or query.
pub struct MysqlReader {
    opts: Opts,
    describe: String,
    conn: Option<Conn>,
    from: String,
    keys: Vec<String>,
    settle: Duration,
    pending: Option<Pending>,
    waiting: Option<String>,
    /// Whether INNODB_TRX could be read (logged once when not).
    trx_visible: Option<bool>,
    /// When INNODB_TRX was last read: the server refreshes that table's cache only when it
    /// was not read for 100 ms, so reads are spaced wider than that.
    last_trx_read: Option<Instant>,
}

/// Spacing between reads of INNODB_TRX (the server's cache needs 100 ms without reads).
const TRX_READ_SPACING: Duration = Duration::from_millis(150);

impl std::fmt::Debug for MysqlReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MysqlReader").field("database", &self.describe).finish()
    }
}

impl MysqlReader {
    pub fn new(cfg: &DbSourceConfig, password: Option<Secret>) -> Result<MysqlReader, String> {
        let url = cfg.url.replacen("mariadb://", "mysql://", 1);
        let parsed = Opts::from_url(&url).map_err(|e| format!("url: {e}"))?;
        let describe = format!(
            "mysql://{}@{}:{}/{} {}",
            parsed.get_user().unwrap_or(""),
            parsed.get_ip_or_hostname(),
            parsed.get_tcp_port(),
            parsed.get_db_name().unwrap_or(""),
            cfg.table.clone().unwrap_or_else(|| "query".into()),
        );
        let mut builder = OptsBuilder::from_opts(parsed)
            .tcp_connect_timeout(Some(Duration::from_secs(10)))
            .read_timeout(Some(Duration::from_secs(60)))
            .write_timeout(Some(Duration::from_secs(60)))
            .init(vec!["SET time_zone = '+00:00'"]);
        if let Some(p) = password {
            builder = builder.pass(Some(p.expose().to_owned()));
        }
        let describe = match &cfg.tls {
            Some(tls) => {
                check_ca_file(&tls.ca_file)?;
                let ssl = mysql::SslOpts::default().with_root_cert_path(Some(tls.ca_file.clone()));
                builder = builder.ssl_opts(Some(ssl));
                format!("{describe} (TLS)")
            }
            None => describe,
        };
        Ok(MysqlReader {
            opts: builder.into(),
            describe,
            conn: None,
            from: cfg.relation_sql(Dialect::Mysql).map_err(|(f, m)| format!("{f}: {m}"))?,
            keys: cfg.key_columns().map_err(|(f, m)| format!("{f}: {m}"))?,
            settle: Duration::from_millis(cfg.settle_ms),
            pending: None,
            waiting: None,
            trx_visible: None,
            last_trx_read: None,
        })
    }

    fn key_list(&self) -> String {
        self.keys.iter().map(|k| format!("t.{}", Dialect::Mysql.quote(k))).collect::<Vec<_>>().join(", ")
    }

    fn placeholders(&self) -> String {
        format!("({})", vec!["?"; self.keys.len()].join(", "))
    }

    /// Waits until INNODB_TRX shows fresh data.
    fn space_trx_reads(&mut self) {
        if let Some(t) = self.last_trx_read {
            std::thread::sleep(TRX_READ_SPACING.saturating_sub(t.elapsed()));
        }
        self.last_trx_read = Some(Instant::now());
    }

    /// Transactions writing now, if this account may see them.
    fn writers(&mut self) -> Result<Option<Vec<String>>, String> {
        if self.trx_visible == Some(false) {
            return Ok(None);
        }
        self.space_trx_reads();
        let conn = self.conn.as_mut().ok_or("not connected")?;
        match conn.query::<String, _>(
            "SELECT CAST(trx_id AS CHAR) FROM information_schema.INNODB_TRX WHERE trx_rows_modified > 0",
        ) {
            Ok(ids) => {
                self.trx_visible = Some(true);
                Ok(Some(ids))
            }
            Err(mysql::Error::MySqlError(e)) => {
                info!(database = %self.describe, error = %e.message, "cannot see running transactions (needs PROCESS); the settle delay alone guards late commits");
                self.trx_visible = Some(false);
                Ok(None)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// How many of `ids` are still running.
    fn still_running(&mut self, ids: &[String]) -> Result<usize, String> {
        if ids.is_empty() {
            return Ok(0);
        }
        self.space_trx_reads();
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let list = vec!["?"; ids.len()].join(", ");
        let sql = format!("SELECT COUNT(*) FROM information_schema.INNODB_TRX WHERE CAST(trx_id AS CHAR) IN ({list})");
        let n: Option<u64> = conn.exec_first(sql, ids.to_vec()).map_err(|e| e.to_string())?;
        Ok(n.unwrap_or(0) as usize)
    }
}

/// A column value as the record's JSON (timestamps in RFC 3339, UTC).
fn record_value(v: &mysql::Value) -> Value {
    match v {
        mysql::Value::Date(y, mo, d, h, mi, s, us) => {
            Value::String(format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{us:06}Z"))
        }
        other => key_value(other),
    }
}

/// A column value as a stored key (timestamps in MySQL's own format, to be sent back).
fn key_value(v: &mysql::Value) -> Value {
    match v {
        mysql::Value::NULL => Value::Null,
        mysql::Value::Bytes(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
        },
        mysql::Value::Int(i) => Value::from(*i),
        mysql::Value::UInt(u) => Value::from(*u),
        mysql::Value::Float(f) => serde_json::Number::from_f64(f64::from(*f)).map_or(Value::Null, Value::Number),
        mysql::Value::Double(f) => serde_json::Number::from_f64(*f).map_or(Value::Null, Value::Number),
        mysql::Value::Date(y, mo, d, h, mi, s, us) => {
            Value::String(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"))
        }
        mysql::Value::Time(neg, days, h, mi, s, us) => {
            let sign = if *neg { "-" } else { "" };
            Value::String(format!("{sign}{:02}:{mi:02}:{s:02}.{us:06}", u32::from(*h) + days * 24))
        }
    }
}

fn to_param(v: &Value) -> mysql::Value {
    match v {
        Value::Null => mysql::Value::NULL,
        Value::Number(n) => n
            .as_i64()
            .map(mysql::Value::Int)
            .or_else(|| n.as_u64().map(mysql::Value::UInt))
            .unwrap_or_else(|| mysql::Value::Double(n.as_f64().unwrap_or(0.0))),
        Value::String(s) => mysql::Value::Bytes(s.clone().into_bytes()),
        other => mysql::Value::Bytes(other.to_string().into_bytes()),
    }
}

impl RowReader for MysqlReader {
    fn caught_up(&self) -> bool {
        self.pending.is_none()
    }

    fn connect(&mut self) -> Result<(), String> {
        self.conn = None;
        self.conn = Some(Conn::new(self.opts.clone()).map_err(|e| e.to_string())?);
        Ok(())
    }

    fn rows_behind(&mut self, after: &KeyPosition) -> Result<Option<u64>, String> {
        let has_after = after.key.len() == self.keys.len();
        let cond = if has_after { format!("({}) > {}", self.key_list(), self.placeholders()) } else { "TRUE".into() };
        let sql = format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM {} t WHERE {cond} LIMIT {}) c",
            self.from,
            super::ROWS_BEHIND_CAP
        );
        let params: Vec<mysql::Value> = if has_after { after.key.iter().map(to_param).collect() } else { Vec::new() };
        let conn = self.conn.as_mut().ok_or("not connected")?;
        let n: Option<u64> = conn.exec_first(sql, params).map_err(|e| e.to_string())?;
        Ok(Some(n.unwrap_or(0)))
    }

    fn read(&mut self, after: &KeyPosition, limit: usize) -> Result<Vec<Row>, String> {
        let n = self.keys.len();
        let has_after = after.key.len() == n;
        let after_cond =
            if has_after { format!("({}) > {}", self.key_list(), self.placeholders()) } else { "TRUE".into() };
        let order = self.key_list();
        let mut out = Vec::new();

        let ready = match &self.pending {
            Some(p) if p.seen_at.elapsed() >= self.settle => match p.writers.clone() {
                Some(ids) => self.still_running(&ids)? == 0,
                None => true,
            },
            _ => false,
        };
        if ready && let Some(p) = self.pending.clone() {
            let sql = format!(
                "SELECT * FROM {} t WHERE {after_cond} AND ({order}) <= {} ORDER BY {order} LIMIT {limit}",
                self.from,
                self.placeholders()
            );
            let mut params: Vec<mysql::Value> =
                if has_after { after.key.iter().map(to_param).collect() } else { Vec::new() };
            params.extend(p.key.iter().map(to_param));
            let conn = self.conn.as_mut().ok_or("not connected")?;
            let rows: Vec<mysql::Row> = conn.exec(sql, params).map_err(|e| e.to_string())?;
            for row in rows {
                let mut record = serde_json::Map::new();
                let mut key = vec![Value::Null; n];
                for (i, col) in row.columns_ref().iter().enumerate() {
                    let name = col.name_str();
                    let value = row.as_ref(i).unwrap_or(&mysql::Value::NULL);
                    if let Some(k) = self.keys.iter().position(|k| *k == name) {
                        key[k] = key_value(value);
                    }
                    record.insert(name.into_owned(), record_value(value));
                }
                out.push(Row { json: Value::Object(record).to_string(), key });
            }
            if out.len() < limit {
                self.pending = None;
            }
        }
        if self.pending.is_none() {
            let last = out.last().map(|r| r.key.clone()).or_else(|| has_after.then(|| after.key.clone()));
            let cond = if last.is_some() { format!("({order}) > {}", self.placeholders()) } else { "TRUE".into() };
            let desc: Vec<String> = self.keys.iter().map(|k| format!("t.{} DESC", Dialect::Mysql.quote(k))).collect();
            let sql = format!("SELECT {order} FROM {} t WHERE {cond} ORDER BY {} LIMIT 1", self.from, desc.join(", "));
            let params: Vec<mysql::Value> = last.iter().flatten().map(to_param).collect();
            let conn = self.conn.as_mut().ok_or("not connected")?;
            let max: Option<mysql::Row> = conn.exec_first(sql, params).map_err(|e| e.to_string())?;
            if let Some(row) = max {
                let key = (0..n).map(|i| row.as_ref(i).map_or(Value::Null, key_value)).collect();
                let writers = self.writers()?;
                self.pending = Some(Pending { key, seen_at: Instant::now(), writers });
            }
        }
        self.waiting = self.pending.as_ref().map(|p| {
            let mut text = format!("newer rows settle for {} ms", self.settle.as_millis());
            if let Some(w) = &p.writers
                && !w.is_empty()
            {
                text.push_str(&format!(" and wait for {} running transactions", w.len()));
            }
            text
        });
        Ok(out)
    }

    fn waiting_for(&self) -> Option<String> {
        self.waiting.clone()
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
