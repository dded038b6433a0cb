//! Sources: the things an agent reads records from.
//!
//! Every source is built from its [`SourceConfig`] and runs on a thread of its own (reading
//! files and databases blocks), appending mapped events and its new position to the spool in
//! one transaction, then waking the shipper. Kinds: [`file`] and [`sqlite`].

mod dead_letter;
pub mod file;
pub mod sqlite;

use std::path::Path;
use std::sync::{Arc, Mutex};

use actidash_shared::wire::SourceStatus;
use serde::Deserialize;

use crate::mapping::MappingConfig;

/// The configuration of one source, tagged by `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SourceConfig {
    /// A growing file of records.
    File(file::FileSourceConfig),
    /// A table or query of a SQLite database, read incrementally.
    Sqlite(sqlite::SqliteSourceConfig),
}

impl SourceConfig {
    pub fn id(&self) -> &str {
        match self {
            SourceConfig::File(c) => &c.id,
            SourceConfig::Sqlite(c) => &c.id,
        }
    }

    pub fn mapping(&self) -> &MappingConfig {
        match self {
            SourceConfig::File(c) => &c.mapping,
            SourceConfig::Sqlite(c) => &c.mapping,
        }
    }

    pub(crate) fn resolve_paths(&mut self, base: &Path) {
        match self {
            SourceConfig::File(c) => {
                if c.path.is_relative() {
                    c.path = base.join(&c.path);
                }
            }
            SourceConfig::Sqlite(c) => {
                if c.path.is_relative() {
                    c.path = base.join(&c.path);
                }
            }
        }
    }
}

/// A source's live status, shared with the heartbeat.
pub type SharedStatus = Arc<Mutex<SourceStatus>>;

/// Updates a shared status, tolerating a poisoned lock (a status is only informational).
pub(crate) fn update_status(status: &SharedStatus, f: impl FnOnce(&mut SourceStatus)) {
    let mut guard = status.lock().unwrap_or_else(|p| p.into_inner());
    f(&mut guard);
}
