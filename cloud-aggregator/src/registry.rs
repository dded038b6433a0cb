//! The fleet registry's engine: a SQLite file (the embedded default, `data_dir/fleet/registry.db`)
//! or a PostgreSQL database (`[fleet] registry_url`) that gateways, API servers and the command
//! line on several hosts share.
//!
//! Every statement is written once, in the SQL both engines speak ([`Tx`], `?N` parameters),
//! and runs inside [`Registry::write`] or [`Registry::read`]:
//! - a write is one transaction, and writers are serialized: SQLite's `BEGIN IMMEDIATE`, or on
//!   PostgreSQL a transaction-scoped advisory lock taken first (redeeming a token, checking an
//!   id and signing are then as atomic on several hosts as in one file);
//! - a read sees committed data only.
//!
//! On PostgreSQL the tables live in their own schema (`actidash_registry`), so that the
//! registry can share a database with the serving store, whose tables have other meanings
//! (the store's `agents` holds heartbeats; the registry's, enrollments). One connection is kept
//! per [`Registry`] and made again after a failure.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context as _;

use crate::store::db::{DbError, Tx};
use crate::store::postgres::{PgTx, StatementCache};

/// The registry's tables, in the SQL both engines take (`BIGINT` is SQLite's integer too).
/// Only additions: older registries are brought up to date by `IF NOT EXISTS`.
pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL, used_at BIGINT, used_by TEXT);
CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
    enrolled_at BIGINT NOT NULL, revoked_at BIGINT);
CREATE TABLE IF NOT EXISTS certs (serial TEXT PRIMARY KEY, agent_id TEXT NOT NULL,
    issued_at BIGINT NOT NULL, not_after BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS ca (id INTEGER PRIMARY KEY, cert_pem TEXT NOT NULL, key_pem TEXT);
CREATE TABLE IF NOT EXISTS api_tokens (hash TEXT PRIMARY KEY, id TEXT NOT NULL UNIQUE,
    tenant TEXT, role TEXT NOT NULL, created_at BIGINT NOT NULL, expires_at BIGINT,
    revoked_at BIGINT);
CREATE TABLE IF NOT EXISTS configs (tenant TEXT NOT NULL, grp TEXT NOT NULL, version BIGINT NOT NULL,
    text TEXT NOT NULL, sha256 TEXT NOT NULL, created_at BIGINT NOT NULL, PRIMARY KEY (tenant, grp, version));
CREATE TABLE IF NOT EXISTS config_activations (tenant TEXT NOT NULL, grp TEXT NOT NULL, n BIGINT NOT NULL,
    version BIGINT NOT NULL, action TEXT NOT NULL, at BIGINT NOT NULL, PRIMARY KEY (tenant, grp, n));
CREATE TABLE IF NOT EXISTS agent_configs (agent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, grp TEXT NOT NULL,
    version BIGINT, state TEXT NOT NULL, failed_version BIGINT, error TEXT, reported_at BIGINT NOT NULL)
";

/// The PostgreSQL schema of the registry's tables.
const PG_SCHEMA: &str = "actidash_registry";

/// Where the registry is: a SQLite file, or a PostgreSQL database (the serving store's kind of
/// location).
pub type RegistryLocation = crate::store::Location;

type PgConn = (postgres::Client, StatementCache);

/// The registry's engine and, on PostgreSQL, its kept connection.
pub struct Registry {
    location: RegistryLocation,
    pg: Mutex<Option<PgConn>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("location", &self.location).finish()
    }
}

impl Drop for Registry {
    /// The synchronous PostgreSQL client closes by blocking on a runtime of its own, which
    /// panics on a thread that drives an async runtime (where a gateway's or the API's state
    /// is dropped at shutdown): the connection is closed on a thread of its own.
    fn drop(&mut self) {
        if let Some(conn) = self.pg.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = std::thread::spawn(move || drop(conn)).join();
        }
    }
}

impl Registry {
    /// Opens the registry and makes sure `schema` (statements separated by `;`, `CREATE … IF NOT
    /// EXISTS`) is in place, one process at a time.
    pub fn open(location: RegistryLocation, schema: &str) -> anyhow::Result<Registry> {
        if let RegistryLocation::Sqlite(path) = &location {
            if let Some(dir) = path.parent() {
                crate::fleet::private_dir(dir)?;
            }
            crate::fleet::private_file(path)?;
            let conn = sqlite_connect(path)?;
            // Processes opening a new registry at once: the switch to WAL waits its turn.
            crate::store::enable_wal(&conn)?;
        }
        let registry = Registry { location, pg: Mutex::new(None) };
        let schema = schema.to_owned();
        registry
            .write(move |tx| {
                for statement in schema.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                    tx.exec(statement, &[])?;
                }
                Ok::<_, DbError>(())
            })
            .map_err(|e| anyhow::anyhow!("fleet registry {}: creating its tables: {e}", registry.location.name()))?;
        Ok(registry)
    }

    pub fn location(&self) -> &RegistryLocation {
        &self.location
    }

    /// Runs `f` in one write transaction (writers serialized across processes and hosts); commits
    /// when it returns `Ok`, rolls back otherwise.
    pub fn write<T: Send, E: From<DbError> + Send>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, E> + Send,
    ) -> Result<T, E> {
        self.run(true, f)
    }

    /// Runs `f` on committed data (no lock taken).
    pub fn read<T: Send, E: From<DbError> + Send>(
        &self,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, E> + Send,
    ) -> Result<T, E> {
        self.run(false, f)
    }

    /// A failure of the registry itself (not of a statement), naming it.
    fn error(&self, e: impl std::fmt::Display) -> DbError {
        DbError { message: format!("fleet registry {}: {e}", self.location.name()), retryable: false }
    }

    fn run<T: Send, E: From<DbError> + Send>(
        &self,
        write: bool,
        f: impl FnOnce(&mut dyn Tx) -> Result<T, E> + Send,
    ) -> Result<T, E> {
        match &self.location {
            RegistryLocation::Sqlite(path) => {
                let mut conn = sqlite_connect(path).map_err(|e| self.error(format!("{e:#}")))?;
                let behavior = if write {
                    rusqlite::TransactionBehavior::Immediate
                } else {
                    rusqlite::TransactionBehavior::Deferred
                };
                let mut tx = conn.transaction_with_behavior(behavior).map_err(DbError::from)?;
                let out = f(&mut tx)?;
                tx.commit().map_err(DbError::from)?;
                Ok(out)
            }
            RegistryLocation::Postgres { url, password } => {
                // The synchronous client runs its own runtime: never on an async worker.
                crate::store::off_runtime(|| {
                    let mut slot = self.pg.lock().unwrap_or_else(|p| p.into_inner());
                    let conn = match slot.take() {
                        Some(conn) if !conn.0.is_closed() => conn,
                        _ => pg_connect(url, password.as_deref()).map_err(|e| self.error(e))?,
                    };
                    let (client, cache) = slot.insert(conn);
                    let result = (|| {
                        let mut tx = client.transaction().map_err(DbError::from)?;
                        let mut pg = PgTx { tx: &mut tx, cache };
                        if write {
                            pg.lock_key("actidash/registry")?;
                        }
                        let out = f(&mut pg)?;
                        tx.commit().map_err(DbError::from)?;
                        Ok(out)
                    })();
                    if result.is_err() && client.is_closed() {
                        *slot = None;
                    }
                    result
                })
            }
        }
    }
}

fn sqlite_connect(path: &Path) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path).with_context(|| format!("opening {}", path.display()))?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Connects, makes the registry's schema exist (under a lock: several processes may start at
/// once) and puts it first on the connection's search path.
fn pg_connect(url: &str, password: Option<&str>) -> Result<PgConn, DbError> {
    let mut client = crate::store::postgres::connect(url, password)?;
    let mut cache = StatementCache::default();
    {
        let mut tx = client.transaction()?;
        PgTx { tx: &mut tx, cache: &mut cache }.lock_key("actidash/registry-schema")?;
        tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {PG_SCHEMA}"))?;
        tx.commit()?;
    }
    client.batch_execute(&format!("SET search_path TO {PG_SCHEMA}"))?;
    // Statements prepared before the search path changed would name other tables.
    Ok((client, StatementCache::default()))
}
