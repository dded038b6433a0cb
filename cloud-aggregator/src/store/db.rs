//! The SQL the store speaks, independent of the engine: values, rows and a transaction trait
//! implemented for SQLite (and, with the same statements, for PostgreSQL).
//!
//! Statements are written once in the subset both engines share (`INSERT … ON CONFLICT … DO
//! UPDATE`, row values, `?N` parameters — rewritten to `$N` for PostgreSQL) and run through
//! [`Tx`], so the analytics code does not know which engine holds its state.

use rusqlite::types::ValueRef;

/// A parameter or column value.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Val {
    Null,
    Int(i64),
    Text(String),
}

impl Val {
    pub fn int(&self) -> Option<i64> {
        match self {
            Val::Int(i) => Some(*i),
            _ => None,
        }
    }

    /// The integer, 0 for NULL (a SQL `sum` over no rows).
    pub fn int_or_zero(&self) -> i64 {
        self.int().unwrap_or(0)
    }

    pub fn text(&self) -> &str {
        match self {
            Val::Text(s) => s,
            _ => "",
        }
    }

    pub fn into_text(self) -> String {
        match self {
            Val::Text(s) => s,
            Val::Int(i) => i.to_string(),
            Val::Null => String::new(),
        }
    }
}

/// The columns of a result row, read in order (a missing or NULL column reads as 0 or "").
#[derive(Debug)]
pub struct Cols(std::vec::IntoIter<Val>);

impl Cols {
    pub fn new(row: Vec<Val>) -> Cols {
        Cols(row.into_iter())
    }

    /// The next column as an integer.
    pub fn int(&mut self) -> i64 {
        self.0.next().map_or(0, |v| v.int_or_zero())
    }

    /// The next column as an integer, None for NULL.
    pub fn opt_int(&mut self) -> Option<i64> {
        self.0.next().and_then(|v| v.int())
    }

    /// The next column as text.
    pub fn text(&mut self) -> String {
        self.0.next().map(Val::into_text).unwrap_or_default()
    }

    /// The next column as text, None for NULL.
    pub fn opt_text(&mut self) -> Option<String> {
        match self.0.next() {
            Some(Val::Text(t)) => Some(t),
            Some(Val::Int(i)) => Some(i.to_string()),
            _ => None,
        }
    }

    /// The columns not read yet, as integers.
    pub fn rest_ints(self) -> Vec<i64> {
        self.0.map(|v| v.int_or_zero()).collect()
    }
}

impl From<i64> for Val {
    fn from(v: i64) -> Val {
        Val::Int(v)
    }
}
impl From<&str> for Val {
    fn from(v: &str) -> Val {
        Val::Text(v.to_owned())
    }
}
impl From<String> for Val {
    fn from(v: String) -> Val {
        Val::Text(v)
    }
}
impl From<&String> for Val {
    fn from(v: &String) -> Val {
        Val::Text(v.clone())
    }
}
impl<T: Into<Val>> From<Option<T>> for Val {
    fn from(v: Option<T>) -> Val {
        v.map_or(Val::Null, Into::into)
    }
}

/// A database error, with whether the transaction may simply be tried again (a serialization
/// failure or deadlock between concurrent writers).
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct DbError {
    pub message: String,
    pub retryable: bool,
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> DbError {
        let retryable = matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        );
        DbError { message: e.to_string(), retryable }
    }
}

/// Statements inside one transaction (or on a read connection).
pub trait Tx {
    /// Runs a statement; returns the number of rows changed.
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, DbError>;
    /// Runs a query; returns every row.
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, DbError>;
    /// Serializes writers of one key for the rest of the transaction (PostgreSQL: an advisory
    /// transaction lock; SQLite: nothing, it has one writer at a time).
    fn lock_key(&mut self, _key: &str) -> Result<(), DbError> {
        Ok(())
    }
    /// SQL for the exact sum of the 64-bit integer `column`, clamped to the 64-bit range at the
    /// end ([`super::SatSum`] on SQLite).
    fn saturating_sum(&self, column: &str) -> String {
        format!("sat_sum({column})")
    }
}

/// Bound as borrowed: SQLite copies a bound text itself, so a copy here would be a second one
/// (a string allocated per text parameter showed in the processor's profile).
impl rusqlite::ToSql for Val {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        Ok(rusqlite::types::ToSqlOutput::Borrowed(match self {
            Val::Null => ValueRef::Null,
            Val::Int(i) => ValueRef::Integer(*i),
            Val::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

fn from_sqlite(v: ValueRef<'_>) -> Val {
    match v {
        ValueRef::Null => Val::Null,
        ValueRef::Integer(i) => Val::Int(i),
        // Sums of integers are integers; a float here would be a schema mistake.
        ValueRef::Real(f) => Val::Int(f as i64),
        ValueRef::Text(t) => Val::Text(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Val::Text(String::from_utf8_lossy(b).into_owned()),
    }
}

fn sqlite_exec(c: &rusqlite::Connection, sql: &str, params: &[Val]) -> Result<usize, DbError> {
    let mut stmt = c.prepare_cached(sql)?;
    Ok(stmt.execute(rusqlite::params_from_iter(params))?)
}

fn sqlite_query(c: &rusqlite::Connection, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, DbError> {
    let mut stmt = c.prepare_cached(sql)?;
    let n = stmt.column_count();
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next()? {
        out.push((0..n).map(|i| row.get_ref(i).map(from_sqlite)).collect::<Result<Vec<_>, _>>()?);
    }
    Ok(out)
}

impl Tx for rusqlite::Connection {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, DbError> {
        sqlite_exec(self, sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, DbError> {
        sqlite_query(self, sql, params)
    }
}

impl Tx for rusqlite::Transaction<'_> {
    fn exec(&mut self, sql: &str, params: &[Val]) -> Result<usize, DbError> {
        sqlite_exec(self, sql, params)
    }
    fn query(&mut self, sql: &str, params: &[Val]) -> Result<Vec<Vec<Val>>, DbError> {
        sqlite_query(self, sql, params)
    }
}

/// Rewrites `?N` parameters as `$N` (PostgreSQL's form). Text in quotes is left alone.
pub fn dollar_params(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut in_quote = false;
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_quote = !in_quote;
                out.push(c);
            }
            '?' if !in_quote && chars.peek().is_some_and(char::is_ascii_digit) => out.push('$'),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_rewritten_outside_quotes() {
        assert_eq!(
            dollar_params("SELECT a FROM t WHERE b = ?1 AND c = '?2' AND d = ?12"),
            "SELECT a FROM t WHERE b = $1 AND c = '?2' AND d = $12"
        );
    }

    #[test]
    fn sqlite_round_trip() {
        let mut c = rusqlite::Connection::open_in_memory().unwrap();
        c.exec("CREATE TABLE t (a BIGINT, b TEXT)", &[]).unwrap();
        c.exec("INSERT INTO t VALUES (?1, ?2)", &[Val::Int(7), "x".into()]).unwrap();
        c.exec("INSERT INTO t VALUES (?1, ?2)", &[Val::Null, Val::from(None::<String>)]).unwrap();
        let rows = c.query("SELECT a, b FROM t ORDER BY a", &[]).unwrap();
        assert_eq!(rows, vec![vec![Val::Null, Val::Null], vec![Val::Int(7), Val::Text("x".into())]]);
    }
}
