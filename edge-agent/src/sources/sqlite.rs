//! The SQLite source: reads new rows of a table (or a query) incrementally, read-only.
//!
//! Rows are read in the order of an increasing column (`incremental_column`), or of a timestamp
//! with a tie-breaker (`timestamp_column` + `tie_breaker`), after the stored position; each
//! batch's events and the position after its last row are written to the spool in one
//! transaction. The database is opened read-only and never written to.
//!
//! SQLite serialises its writers, so a row with a smaller key cannot commit after a larger one
//! was read: reading by an increasing rowid-like column is commit-safe. (A timestamp column set
//! by the application can go backwards; that is the application's choice, and is documented.)

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{info, warn};

use super::{Commit, SourceContext, update_status};
use crate::mapping::MappingConfig;

/// Configuration of a SQLite source.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSourceConfig {
    /// Source id, unique in this agent.
    pub id: String,
    /// The database file (opened read-only).
    pub path: PathBuf,
    /// The table to read; or `query`.
    #[serde(default)]
    pub table: Option<String>,
    /// A `SELECT` to read from instead of a table (no `ORDER BY` or `LIMIT`: the source adds them).
    #[serde(default)]
    pub query: Option<String>,
    /// An increasing column (an id, a rowid): rows are read in its order.
    #[serde(default)]
    pub incremental_column: Option<String>,
    /// Or a timestamp column...
    #[serde(default)]
    pub timestamp_column: Option<String>,
    /// ...with a unique tie-breaker for rows of the same timestamp.
    #[serde(default)]
    pub tie_breaker: Option<String>,
    /// Rows per spool transaction.
    #[serde(default = "default_batch_rows")]
    pub batch_rows: usize,
    /// How often to look for new rows, in milliseconds.
    #[serde(default = "default_poll_ms")]
    pub poll_interval_ms: u64,
    /// How rows become events (columns are the record's fields).
    pub mapping: MappingConfig,
}

fn default_batch_rows() -> usize {
    5_000
}

fn default_poll_ms() -> u64 {
    1_000
}

/// Where a SQLite source stands; stored in the spool as JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SqlitePosition {
    /// The ordering column's value of the last row read (null: from the start).
    pub last: Value,
    /// The tie-breaker's value of that row, in timestamp mode.
    #[serde(default)]
    pub tie: Value,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl SqliteSourceConfig {
    /// The ordered, paged query and the number of position parameters it takes.
    pub fn sql(&self) -> Result<(String, usize), (String, String)> {
        let from = match (&self.table, &self.query) {
            (Some(t), None) => quote_ident(t),
            (None, Some(q)) => format!("({q})"),
            _ => return Err(("table".into(), "set table or query, one of them".into())),
        };
        match (&self.incremental_column, &self.timestamp_column, &self.tie_breaker) {
            (Some(c), None, None) => {
                let c = quote_ident(c);
                Ok((format!("SELECT * FROM {from} WHERE ?1 IS NULL OR {c} > ?1 ORDER BY {c} LIMIT ?2"), 1))
            }
            (None, Some(ts), Some(tie)) => {
                let (ts, tie) = (quote_ident(ts), quote_ident(tie));
                Ok((
                    format!(
                        "SELECT * FROM {from} WHERE ?1 IS NULL OR {ts} > ?1 OR ({ts} = ?1 AND {tie} > ?2) ORDER BY {ts}, {tie} LIMIT ?3"
                    ),
                    2,
                ))
            }
            _ => Err((
                "incremental_column".into(),
                "set incremental_column, or timestamp_column with tie_breaker".into(),
            )),
        }
    }

    fn order_columns(&self) -> (String, Option<String>) {
        match (&self.incremental_column, &self.timestamp_column) {
            (Some(c), _) => (c.clone(), None),
            (None, Some(ts)) => (ts.clone(), self.tie_breaker.clone()),
            (None, None) => (String::new(), None),
        }
    }
}

/// Everything a running SQLite source needs.
#[derive(Debug)]
pub struct SqliteSource {
    pub config: SqliteSourceConfig,
    pub ctx: SourceContext,
}

fn to_json(value: ValueRef<'_>) -> Value {
    match value {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
    }
}

fn to_sql(value: &Value) -> rusqlite::types::Value {
    match value {
        Value::Null => rusqlite::types::Value::Null,
        Value::Number(n) => n
            .as_i64()
            .map_or_else(|| rusqlite::types::Value::Real(n.as_f64().unwrap_or(0.0)), rusqlite::types::Value::Integer),
        Value::String(s) => rusqlite::types::Value::Text(s.clone()),
        other => rusqlite::types::Value::Text(other.to_string()),
    }
}

impl SqliteSource {
    /// Runs until shutdown. Blocking: call it on a thread of its own. Connection failures (the
    /// file missing, locked, replaced) are retried with backoff and reported.
    pub fn run(mut self) -> anyhow::Result<()> {
        let id = self.config.id.clone();
        let (sql, n_position_params) =
            self.config.sql().map_err(|(field, msg)| anyhow::anyhow!("source {id}: {field}: {msg}"))?;
        let state = self.ctx.spool.source_state(&id)?;
        let mut position: SqlitePosition = serde_json::from_str(&state.position).unwrap_or_default();
        let mut next_seq = state.next_seq;
        info!(source = %id, path = %self.config.path.display(), position = ?position.last, next_seq, "sqlite source started");
        let poll = Duration::from_millis(self.config.poll_interval_ms.max(10));
        let mut conn: Option<Connection> = None;
        let mut delay = poll;
        while !self.ctx.shutdown.is_cancelled() {
            if conn.is_none() {
                match open_read_only(&self.config.path) {
                    Ok(c) => {
                        conn = Some(c);
                        delay = poll;
                    }
                    Err(e) => {
                        warn!(source = %id, path = %self.config.path.display(), error = %e, "cannot open the database; retrying");
                        update_status(&self.ctx.status, |s| {
                            s.state = "error".into();
                            s.last_error = Some(format!("{}: {e}", self.config.path.display()));
                        });
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(30));
                        continue;
                    }
                }
            }
            let rows =
                match conn.as_ref().map(|c| read_rows(c, &sql, n_position_params, &position, self.config.batch_rows)) {
                    Some(Ok(rows)) => rows,
                    Some(Err(e)) => {
                        warn!(source = %id, error = %e, "query failed; reconnecting");
                        conn = None;
                        std::thread::sleep(poll);
                        continue;
                    }
                    None => continue,
                };
            let n_rows = rows.len();
            if self.ctx.spool.settle(n_rows > 0)
                && let Some(c) = &conn
            {
                // The database's pages read so far: the next poll reads them again.
                c.flush_prepared_statement_cache();
                if let Err(e) = c.release_memory() {
                    warn!(source = %id, error = %e, "cannot release the database connection's memory");
                }
            }
            if n_rows > 0 {
                match self.spool_rows(rows, &mut position, next_seq)? {
                    Some(n) => next_seq = n,
                    None => break,
                }
                self.ctx.spooled.notify_one();
            }
            update_status(&self.ctx.status, |s| {
                s.state = if n_rows > 0 { "running".into() } else { "waiting".into() };
                s.position = format!("{}: {}", self.config.path.display(), position.last);
                s.next_seq = next_seq;
            });
            if n_rows < self.config.batch_rows {
                std::thread::sleep(poll);
            }
        }
        info!(source = %id, next_seq, "sqlite source stopped");
        Ok(())
    }

    /// Maps and spools rows; returns the next seq, or None on shutdown while the spool was full.
    fn spool_rows(
        &mut self,
        rows: Vec<Map<String, Value>>,
        position: &mut SqlitePosition,
        mut next_seq: u64,
    ) -> anyhow::Result<Option<u64>> {
        let id = self.config.id.clone();
        let (order, tie) = self.config.order_columns();
        let mut bodies = Vec::with_capacity(rows.len());
        let (mut dead, mut last_error) = (Vec::new(), None);
        let mut skipped = std::collections::BTreeMap::new();
        let mut new_position = position.clone();
        for row in rows {
            new_position.last = row.get(&order).cloned().unwrap_or(Value::Null);
            if let Some(t) = &tie {
                new_position.tie = row.get(t).cloned().unwrap_or(Value::Null);
            }
            let text = Value::Object(row).to_string();
            match self.ctx.map_record(&self.config.mapping, &id, next_seq, &text) {
                super::Mapped::Event(body) => {
                    bodies.push(body);
                    next_seq += 1;
                }
                super::Mapped::Skipped(condition) => *skipped.entry(condition).or_default() += 1,
                super::Mapped::Bad(reason) => {
                    warn!(source = %id, position = %new_position.last, reason = %reason, "bad row skipped");
                    let location = serde_json::json!({ "database": self.config.path.display().to_string(), "position": new_position.last });
                    dead.push(super::dead_letter::entry(&id, location, &reason, text.as_bytes()));
                    last_error = Some(format!("row at {}: {reason}", new_position.last));
                }
            }
        }
        let stored = serde_json::to_string(&new_position)?;
        if !self.ctx.commit(&id, Commit { bodies, position: stored, dead, last_error, skipped }) {
            return Ok(None);
        }
        *position = new_position;
        Ok(Some(next_seq))
    }
}

fn open_read_only(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

fn read_rows(
    conn: &Connection,
    sql: &str,
    n_position_params: usize,
    position: &SqlitePosition,
    limit: usize,
) -> rusqlite::Result<Vec<Map<String, Value>>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let names: Vec<String> = stmt.column_names().into_iter().map(str::to_owned).collect();
    let mut params: Vec<rusqlite::types::Value> = vec![to_sql(&position.last)];
    if n_position_params == 2 {
        params.push(to_sql(&position.tie));
    }
    params.push(rusqlite::types::Value::Integer(limit as i64));
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        let mut object = Map::new();
        for (idx, name) in names.iter().enumerate() {
            object.insert(name.clone(), to_json(row.get_ref(idx)?));
        }
        out.push(object);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;
    use std::time::Instant;
    use tokio_util::sync::CancellationToken;

    fn run_until(cfg: SqliteSourceConfig, spool: &Path, dead: &Path, n: u64) {
        let shutdown = CancellationToken::new();
        let source = SqliteSource {
            config: cfg.clone(),
            ctx: crate::sources::file::tests::test_context(spool, dead, &shutdown),
        };
        let t = std::thread::spawn(move || source.run());
        let probe = Spool::open(spool).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while probe.source_state(&cfg.id).unwrap().next_seq < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        shutdown.cancel();
        t.join().unwrap().unwrap();
    }

    fn skus(spool: &Path) -> Vec<(String, u64)> {
        let mut s = Spool::open(spool).unwrap();
        s.read("db", 0, 1000, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| match actidash_shared::Event::from_json(&r.body).unwrap().payload {
                actidash_shared::Payload::Inventory(i) => (i.sku, r.seq),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn reads_new_rows_incrementally_resumes_after_restart_and_dead_letters_bad_rows() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("shop.db");
        let spool = dir.path().join("spool.db");
        let dead = dir.path().join("dead.jsonl");
        let shop = Connection::open(&db).unwrap();
        shop.execute_batch(
            "CREATE TABLE stock (id INTEGER PRIMARY KEY, sku TEXT, wh TEXT, qty INTEGER, at TEXT);
             INSERT INTO stock (sku, wh, qty, at) VALUES ('S1', 'W', 1, '2026-11-27T10:00:00Z'), ('S2', 'W', NULL, '2026-11-27T10:00:01Z'), ('S3', 'W', 3, '2026-11-27T10:00:02Z');",
        )
        .unwrap();
        let cfg: SqliteSourceConfig = toml::from_str(&format!(
            r#"
id = "db"
path = "{}"
table = "stock"
incremental_column = "id"
poll_interval_ms = 20
[mapping]
domain = "inventory"
event_time = {{ field = "at" }}
fields = {{ sku = "sku", warehouse = "wh", on_hand = "qty" }}
"#,
            db.display()
        ))
        .unwrap();
        run_until(cfg.clone(), &spool, &dead, 2);
        shop.execute("INSERT INTO stock (sku, wh, qty, at) VALUES ('S4', 'W', 4, '2026-11-27T10:00:03Z')", []).unwrap();
        run_until(cfg, &spool, &dead, 3);
        assert_eq!(skus(&spool), [("S1".into(), 0), ("S3".into(), 1), ("S4".into(), 2)]);
        let state = Spool::open(&spool).unwrap().source_state("db").unwrap();
        assert_eq!((state.n_errors, state.position.as_str()), (1, r#"{"last":4,"tie":null}"#));
        let entries = std::fs::read_to_string(&dead).unwrap();
        assert!(entries.contains("\"position\":2") && entries.contains("missing field `on_hand`"), "{entries}");
    }

    #[test]
    fn timestamp_with_tie_breaker_and_config_errors() {
        let cfg = |extra: &str| -> SqliteSourceConfig {
            toml::from_str(&format!(
                "id = \"db\"\npath = \"x.db\"\n{extra}\n[mapping]\ndomain = \"inventory\"\nevent_time = {{ field = \"at\" }}\nfields = {{ sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }}\n"
            ))
            .unwrap()
        };
        let (sql, n) =
            cfg("query = \"SELECT * FROM s\"\ntimestamp_column = \"ts\"\ntie_breaker = \"id\"").sql().unwrap();
        assert_eq!(n, 2);
        assert!(sql.contains("\"ts\" > ?1 OR (\"ts\" = ?1 AND \"id\" > ?2) ORDER BY \"ts\", \"id\""), "{sql}");
        assert_eq!(cfg("table = \"s\"").sql().unwrap_err().0, "incremental_column");
        assert_eq!(cfg("incremental_column = \"id\"").sql().unwrap_err().0, "table");

        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("t.db");
        let c = Connection::open(&db).unwrap();
        c.execute_batch("CREATE TABLE s (id INTEGER, ts TEXT, sku TEXT); INSERT INTO s VALUES (2, 'a', 'x'), (1, 'b', 'y'), (3, 'a', 'z');").unwrap();
        let (sql, n) = cfg("table = \"s\"\ntimestamp_column = \"ts\"\ntie_breaker = \"id\"").sql().unwrap();
        let first = read_rows(&c, &sql, n, &SqlitePosition::default(), 2).unwrap();
        assert_eq!(first.iter().map(|r| r["sku"].as_str().unwrap()).collect::<Vec<_>>(), ["x", "z"]);
        let pos = SqlitePosition { last: Value::from("a"), tie: Value::from(3) };
        let rest = read_rows(&c, &sql, n, &pos, 10).unwrap();
        assert_eq!(rest.iter().map(|r| r["sku"].as_str().unwrap()).collect::<Vec<_>>(), ["y"]);
    }
}
