//! The serving store on PostgreSQL: [`Tx`] over a `postgres` transaction, with prepared
//! statements cached per connection and `?N` parameters rewritten to `$N`.
//!
//! Concurrency: processors on several hosts share the database. Each commit runs in READ
//! COMMITTED and serializes what must not interleave with transaction-scoped advisory locks
//! ([`Tx::lock_key`]): a partition before its offset is checked (fencing), a customer before
//! its orders are re-credited. A statement after a lock sees everything committed before the
//! lock was granted. Deadlocks and serialization failures are reported as retryable; the
//! commit is then tried again from the start.

use std::collections::HashMap;

use postgres::types::{ToSql, Type};
use postgres::{Client, Statement};

use super::db::{DbError, Tx, Val, dollar_params};

impl From<postgres::Error> for DbError {
    fn from(e: postgres::Error) -> DbError {
        use postgres::error::SqlState;
        let retryable = e
            .code()
            .is_some_and(|c| *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE);
        // The server's own message (and SQLSTATE), not just "db error".
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => e.to_string(),
        };
        DbError { message, retryable }
    }
}

/// Most statements kept prepared per connection.
const MAX_STATEMENTS: usize = 512;

/// Statements prepared on one connection, by their `?N` text.
#[derive(Default)]
pub struct StatementCache(HashMap<String, Statement>);

/// One transaction (or, for reads, a read-only snapshot) on PostgreSQL.
pub struct PgTx<'a, 'c> {
    pub tx: &'a mut postgres::Transaction<'c>,
    pub cache: &'a mut StatementCache,
}

impl PgTx<'_, '_> {
    fn prepare(&mut self, sql: &str) -> Result<Statement, DbError> {
        if let Some(s) = self.cache.0.get(sql) {
            return Ok(s.clone());
        }
        let stmt = self.tx.prepare(&dollar_params(sql))?;
        // Bounded: the API's statements vary with its filters.
        if self.cache.0.len() >= MAX_STATEMENTS {
            self.cache.0.clear();
        }
        self.cache.0.insert(sql.to_owned(), stmt.clone());
        Ok(stmt)
    }
}

/// A parameter as the type the statement expects.
enum Param<'a> {
    I64(Option<i64>),
    I32(Option<i32>),
    Text(Option<&'a str>),
}

impl Param<'_> {
    fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Param::I64(v) => v,
            Param::I32(v) => v,
            Param::Text(v) => v,
        }
    }
}

fn params<'a>(stmt: &Statement, values: &'a [Val]) -> Result<Vec<Param<'a>>, DbError> {
    let types = stmt.params();
    if types.len() != values.len() {
        return Err(DbError {
            message: format!("statement takes {} parameters, {} given", types.len(), values.len()),
            retryable: false,
        });
    }
    values
        .iter()
        .zip(types)
        .map(|(v, t)| {
            Ok(match (v, t) {
                (Val::Int(i), &Type::INT4) => Param::I32(Some(i32::try_from(*i).map_err(|_| DbError {
                    message: format!("{i} does not fit a 32-bit parameter"),
                    retryable: false,
                })?)),
                (Val::Int(i), _) => Param::I64(Some(*i)),
                (Val::Text(s), _) => Param::Text(Some(s)),
                (Val::Null, &Type::INT4) => Param::I32(None),
                (Val::Null, &Type::INT8) => Param::I64(None),
                (Val::Null, _) => Param::Text(None),
            })
        })
        .collect()
}

fn value(row: &postgres::Row, i: usize) -> Result<Val, DbError> {
    let t = row.columns()[i].type_().clone();
    Ok(match t {
        Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map_or(Val::Null, Val::Int),
        Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map_or(Val::Null, |v| Val::Int(i64::from(v))),
        Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map_or(Val::Null, |v| Val::Int(i64::from(v))),
        Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map_or(Val::Null, |v| Val::Int(i64::from(v))),
        Type::VOID => Val::Null,
        _ => row.try_get::<_, Option<String>>(i)?.map_or(Val::Null, Val::Text),
    })
}

impl Tx for PgTx<'_, '_> {
    fn exec(&mut self, sql: &str, values: &[Val]) -> Result<usize, DbError> {
        let stmt = self.prepare(sql)?;
        let p = params(&stmt, values)?;
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(Param::as_sql).collect();
        Ok(self.tx.execute(&stmt, &refs)? as usize)
    }

    fn query(&mut self, sql: &str, values: &[Val]) -> Result<Vec<Vec<Val>>, DbError> {
        let stmt = self.prepare(sql)?;
        let p = params(&stmt, values)?;
        let refs: Vec<&(dyn ToSql + Sync)> = p.iter().map(Param::as_sql).collect();
        self.tx.query(&stmt, &refs)?.iter().map(|row| (0..row.len()).map(|i| value(row, i)).collect()).collect()
    }

    fn lock_key(&mut self, key: &str) -> Result<(), DbError> {
        self.query("SELECT pg_advisory_xact_lock(?1)", &[Val::Int(key_hash(key))])?;
        Ok(())
    }
    fn saturating_sum(&self, column: &str) -> String {
        saturating_sum(column)
    }
}

/// [`Tx::saturating_sum`] on PostgreSQL: its own `sum(bigint)` (exact: a 128-bit state, then
/// `numeric`), clamped inline. `sat_sum`'s clamping final function, in SQL and called per group,
/// cost as much as the rest of a 10 000-group top-products read.
pub fn saturating_sum(column: &str) -> String {
    format!("LEAST(GREATEST(sum({column}), -9223372036854775808), 9223372036854775807)::bigint")
}

/// A stable 64-bit hash of a lock key (FNV-1a), the same in every process.
pub fn key_hash(key: &str) -> i64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)) as i64
}

/// Connects to `url` (a `postgres://` URL) with `password` if given.
pub fn connect(url: &str, password: Option<&str>) -> Result<Client, DbError> {
    let mut config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| DbError { message: format!("invalid store url: {e}"), retryable: false })?;
    if let Some(p) = password {
        config.password(p);
    }
    config.application_name("actidash-cloud-aggregator");
    Ok(config.connect(postgres::NoTls)?)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}@{}", &url[..scheme + 3], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted_and_keys_hash_stably() {
        assert_eq!(redact("postgres://actidash:s3cret@db:5432/serving"), "postgres://actidash@db:5432/serving");
        assert_eq!(redact("postgres://db/serving"), "postgres://db/serving");
        assert_eq!(key_hash("customer/acme/C-1"), key_hash("customer/acme/C-1"));
        assert_ne!(key_hash("customer/acme/C-1"), key_hash("customer/acme/C-2"));
    }
}
