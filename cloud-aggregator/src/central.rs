//! Central configuration of agents, kept in the fleet registry ([`crate::registry`]).
//!
//! - An agent whose file says `config_source = "cloud"` names its `group`; each (tenant, group)
//!   has numbered versions of an agent configuration's `[[sources]]` and `[shipper]`, and one
//!   active version.
//! - `config push` validates a file with the agent's own code (the errors of `edge-agent
//!   check`, with file and line) and refuses secrets, then stores it as the next version and
//!   makes it active; `config rollback` makes an earlier version active again (by default the
//!   one active before the current). Every activation is kept (`config_activations`).
//! - Gateways reload the active versions with the revoked set (every half heartbeat interval)
//!   and push a version to each connected agent of the group that runs another — never one the
//!   agent reported as failed. Agents report what they run in their heartbeats; gateways record
//!   each change here (`agent_configs`), which `config status` reads.

use std::collections::HashMap;
use std::path::Path;

use actidash_shared::wire::ConfigState;

use crate::registry::Registry;
use crate::store::db::{Cols, DbError, Tx};

/// Largest configuration pushed (a frame's JSON; sources are a few hundred bytes each).
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

/// A stored version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub version: u64,
    pub text: String,
    pub created_at: i64,
    pub sha256: String,
}

/// An agent's last report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentReport {
    pub agent_id: String,
    pub group: String,
    pub version: Option<u64>,
    pub state: String,
    pub failed_version: Option<u64>,
    pub error: Option<String>,
    pub reported_at: i64,
}

/// A group's configuration as `config status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupStatus {
    pub group: String,
    pub active: Option<u64>,
    pub latest: Option<u64>,
    pub agents: Vec<AgentReport>,
}

/// Checks a configuration as an agent of `tenant` would before applying it.
pub fn validate(text: &str, name: &Path, tenant: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        text.len() <= MAX_CONFIG_BYTES,
        "{}: {} bytes; a pushed configuration is at most {MAX_CONFIG_BYTES}",
        name.display(),
        text.len()
    );
    edge_agent::config::AgentConfig::check_pushed(text, name, tenant)?;
    Ok(())
}

fn version_of(v: Option<i64>) -> Option<u64> {
    v.and_then(|v| u64::try_from(v).ok())
}

/// Validates `text` (named `name` in errors) and makes it the next active version of
/// (`tenant`, `group`); returns the version.
pub fn push(registry: &Registry, tenant: &str, group: &str, text: &str, name: &Path, now: i64) -> anyhow::Result<u64> {
    anyhow::ensure!(crate::fleet::valid_agent_id(tenant), "invalid tenant {tenant:?}");
    anyhow::ensure!(
        crate::fleet::valid_agent_id(group),
        "invalid group {group:?}: 1-128 characters of A-Z a-z 0-9 - _ ."
    );
    validate(text, name, tenant)?;
    let sha = crate::fleet::sha256_hex(text);
    registry.write(|tx| {
        let version = max_of(tx, "SELECT max(version) FROM configs WHERE tenant = ?1 AND grp = ?2", tenant, group)? + 1;
        tx.exec(
            "INSERT INTO configs (tenant, grp, version, text, sha256, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            &[tenant.into(), group.into(), version.into(), text.into(), (&sha).into(), now.into()],
        )?;
        activate(tx, tenant, group, version, "push", now)?;
        Ok(version as u64)
    })
}

/// The `max(…)` of a group's rows (0 when it has none).
fn max_of(tx: &mut dyn Tx, sql: &str, tenant: &str, group: &str) -> Result<i64, DbError> {
    Ok(tx
        .query(sql, &[tenant.into(), group.into()])?
        .into_iter()
        .next()
        .and_then(|r| Cols::new(r).opt_int())
        .unwrap_or(0))
}

fn activate(tx: &mut dyn Tx, tenant: &str, group: &str, version: i64, action: &str, now: i64) -> anyhow::Result<()> {
    let n = max_of(tx, "SELECT max(n) FROM config_activations WHERE tenant = ?1 AND grp = ?2", tenant, group)?;
    tx.exec(
        "INSERT INTO config_activations (tenant, grp, n, version, action, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        &[tenant.into(), group.into(), (n + 1).into(), version.into(), action.into(), now.into()],
    )?;
    Ok(())
}

/// The active version of each (tenant, group).
pub fn active_versions(registry: &Registry) -> anyhow::Result<HashMap<(String, String), u64>> {
    let rows = registry.read(|tx| {
        tx.query(
            "SELECT a.tenant, a.grp, a.version FROM config_activations a
             WHERE a.n = (SELECT max(n) FROM config_activations b WHERE b.tenant = a.tenant AND b.grp = a.grp)",
            &[],
        )
    })?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let mut c = Cols::new(r);
            let (tenant, group) = (c.text(), c.text());
            version_of(c.opt_int()).map(|v| ((tenant, group), v))
        })
        .collect())
}

/// One version's text.
pub fn version(registry: &Registry, tenant: &str, group: &str, version: u64) -> anyhow::Result<Option<Version>> {
    let rows = registry.read(|tx| {
        tx.query(
            "SELECT version, text, created_at, sha256 FROM configs WHERE tenant = ?1 AND grp = ?2 AND version = ?3",
            &[tenant.into(), group.into(), i64::try_from(version).unwrap_or(i64::MAX).into()],
        )
    })?;
    Ok(rows.into_iter().next().map(|r| {
        let mut c = Cols::new(r);
        Version { version: version_of(c.opt_int()).unwrap_or(0), text: c.text(), created_at: c.int(), sha256: c.text() }
    }))
}

/// Makes an earlier version active again: `to`, or the one active before the current one.
/// Returns (from, to).
pub fn rollback(
    registry: &Registry,
    tenant: &str,
    group: &str,
    to: Option<u64>,
    now: i64,
) -> anyhow::Result<(u64, u64)> {
    registry.write(|tx| {
        let history: Vec<i64> = tx
            .query(
                "SELECT version FROM config_activations WHERE tenant = ?1 AND grp = ?2 ORDER BY n DESC",
                &[tenant.into(), group.into()],
            )?
            .into_iter()
            .map(|r| Cols::new(r).int())
            .collect();
        let Some(&current) = history.first() else {
            anyhow::bail!("tenant {tenant:?} has no configuration for group {group:?}");
        };
        let target = match to {
            Some(v) => {
                let v = i64::try_from(v).unwrap_or(i64::MAX);
                let known = !tx
                    .query(
                        "SELECT 1 FROM configs WHERE tenant = ?1 AND grp = ?2 AND version = ?3",
                        &[tenant.into(), group.into(), v.into()],
                    )?
                    .is_empty();
                anyhow::ensure!(known, "group {group:?} of tenant {tenant:?} has no version {v}");
                v
            }
            None => *history.iter().find(|v| **v != current).ok_or_else(|| {
                anyhow::anyhow!(
                    "group {group:?} of tenant {tenant:?} has had only version {current}: nothing to roll back to"
                )
            })?,
        };
        anyhow::ensure!(target != current, "version {target} is already active");
        activate(tx, tenant, group, target, "rollback", now)?;
        Ok((current as u64, target as u64))
    })
}

/// Records what an agent reports it runs (when it changed).
pub fn record(registry: &Registry, agent_id: &str, tenant: &str, state: &ConfigState, now: i64) -> anyhow::Result<()> {
    let v = |x: Option<u64>| x.map(|x| i64::try_from(x).unwrap_or(i64::MAX));
    registry.write(|tx| {
        tx.exec(
            "INSERT INTO agent_configs (agent_id, tenant, grp, version, state, failed_version, error, reported_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT (agent_id) DO UPDATE SET tenant = excluded.tenant, grp = excluded.grp,
                 version = excluded.version, state = excluded.state, failed_version = excluded.failed_version,
                 error = excluded.error, reported_at = excluded.reported_at",
            &[
                agent_id.into(),
                tenant.into(),
                (&state.group).into(),
                v(state.version).into(),
                (&state.state).into(),
                v(state.failed_version).into(),
                state.error.clone().into(),
                now.into(),
            ],
        )?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Every group of `tenant` (or one), with its versions and its agents' reports.
pub fn status(registry: &Registry, tenant: &str, group: Option<&str>) -> anyhow::Result<Vec<GroupStatus>> {
    let active = active_versions(registry)?;
    let (latest, agents) = registry.read(|tx| {
        let latest =
            tx.query("SELECT grp, max(version) FROM configs WHERE tenant = ?1 GROUP BY grp", &[tenant.into()])?;
        let agents = tx.query(
            "SELECT agent_id, grp, version, state, failed_version, error, reported_at FROM agent_configs
             WHERE tenant = ?1 ORDER BY grp, agent_id",
            &[tenant.into()],
        )?;
        Ok::<_, anyhow::Error>((latest, agents))
    })?;
    let mut groups: std::collections::BTreeMap<String, GroupStatus> = std::collections::BTreeMap::new();
    let key = |g: &str| (tenant.to_owned(), g.to_owned());
    for ((t, g), v) in &active {
        if t == tenant {
            groups.insert(
                g.clone(),
                GroupStatus { group: g.clone(), active: Some(*v), latest: None, agents: Vec::new() },
            );
        }
    }
    let blank = |g: &str| GroupStatus {
        group: g.to_owned(),
        active: active.get(&key(g)).copied(),
        latest: None,
        agents: Vec::new(),
    };
    for r in latest {
        let mut c = Cols::new(r);
        let g = c.text();
        groups.entry(g.clone()).or_insert_with(|| blank(&g)).latest = version_of(c.opt_int());
    }
    for r in agents {
        let mut c = Cols::new(r);
        let report = AgentReport {
            agent_id: c.text(),
            group: c.text(),
            version: version_of(c.opt_int()),
            state: c.text(),
            failed_version: version_of(c.opt_int()),
            error: c.opt_text(),
            reported_at: c.int(),
        };
        let g = report.group.clone();
        groups.entry(g.clone()).or_insert_with(|| blank(&g)).agents.push(report);
    }
    Ok(groups.into_values().filter(|g| group.is_none_or(|want| g.group == want)).collect())
}
