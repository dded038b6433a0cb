//! API tokens: who may read the HTTP API, for which tenant, in which role.
//!
//! A token is `adk_` and 64 hex digits, shown once when it is made; the registry keeps only its
//! SHA-256, its public id (the first 12 hex digits of that hash), its tenant (or every tenant,
//! for the service's own operators), its role, and when it expires or was revoked. They live in
//! the fleet registry ([`crate::registry`]: `<data_dir>/fleet/registry.db`, or PostgreSQL)
//! beside the enrollment tokens.
//!
//! Roles, each including the ones before: `viewer` (the dashboards' reports and live push),
//! `ops` (plus the fleet: agents, counters), `admin` (plus tokens and agents, from the command
//! line or the API).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::fleet::{FleetConfig, sha256_hex};
use crate::registry::Registry;
use crate::store::db::{Cols, Val};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Role {
    Viewer,
    Ops,
    Admin,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Ops => "ops",
            Role::Admin => "admin",
        }
    }

    pub fn by_name(name: &str) -> Option<Role> {
        [Role::Viewer, Role::Ops, Role::Admin].into_iter().find(|r| r.name() == name)
    }
}

/// A token as the registry knows it (never the token itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub id: String,
    /// None: every tenant.
    pub tenant: Option<String>,
    pub role: Role,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

impl ApiToken {
    /// `active`, `expired` (at `now`) or `revoked`.
    pub fn state(&self, now: i64) -> &'static str {
        if self.revoked_at.is_some() {
            "revoked"
        } else if self.expires_at.is_some_and(|e| e <= now) {
            "expired"
        } else {
            "active"
        }
    }
}

/// Why a token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no such API token")]
    Unknown,
    #[error("this API token expired")]
    Expired,
    #[error("this API token was revoked")]
    Revoked,
    #[error("the token registry cannot be read: {0}")]
    Unavailable(String),
}

/// The API tokens of a deployment.
#[derive(Debug, Clone)]
pub struct ApiTokens {
    registry: Arc<Registry>,
}

impl ApiTokens {
    /// Opens (creating if needed) the fleet registry of `data_dir` or `[fleet] registry_url`.
    pub fn open(data_dir: &Path, config: &FleetConfig) -> anyhow::Result<ApiTokens> {
        let registry = Registry::open(config.registry_location(data_dir)?, crate::registry::SCHEMA)?;
        Ok(ApiTokens::on(Arc::new(registry)))
    }

    /// The tokens of an open registry (the fleet's).
    pub fn on(registry: Arc<Registry>) -> ApiTokens {
        ApiTokens { registry }
    }

    /// A new token; returns its id and the token, which is not kept.
    pub fn create(
        &self,
        tenant: Option<&str>,
        role: Role,
        ttl: Option<Duration>,
        now: i64,
    ) -> anyhow::Result<(String, String)> {
        if let Some(t) = tenant {
            anyhow::ensure!(crate::fleet::valid_agent_id(t), "invalid tenant {t:?}");
        }
        let token = format!("adk_{}", hex::encode(rand::random::<[u8; 32]>()));
        let hash = sha256_hex(&token);
        let id = hash[..12].to_owned();
        let expires_at = ttl.map(|d| now.saturating_add(i64::try_from(d.as_secs()).unwrap_or(i64::MAX)));
        self.registry.write(|tx| {
            tx.exec(
                "INSERT INTO api_tokens (hash, id, tenant, role, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                &[hash.into(), (&id).into(), tenant.into(), role.name().into(), now.into(), expires_at.into()],
            )
        })?;
        Ok((id, token))
    }

    /// Every token, oldest first.
    pub fn list(&self) -> anyhow::Result<Vec<ApiToken>> {
        let rows = self.registry.read(|tx| {
            tx.query(
                "SELECT id, tenant, role, created_at, expires_at, revoked_at FROM api_tokens ORDER BY created_at, id",
                &[],
            )
        })?;
        Ok(rows.into_iter().map(row_token).collect())
    }

    /// Revokes a token by id; false if there is none.
    pub fn revoke(&self, id: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.registry.write(|tx| {
            tx.exec(
                "UPDATE api_tokens SET revoked_at = coalesce(revoked_at, ?2) WHERE id = ?1",
                &[id.into(), now.into()],
            )
        })?;
        Ok(n > 0)
    }

    /// The token's grant, if it may be used at `now`.
    pub fn check(&self, token: &str, now: i64) -> Result<ApiToken, Refused> {
        let rows = self
            .registry
            .read(|tx| {
                tx.query(
                    "SELECT id, tenant, role, created_at, expires_at, revoked_at FROM api_tokens WHERE hash = ?1",
                    &[sha256_hex(token).into()],
                )
            })
            .map_err(|e| Refused::Unavailable(e.to_string()))?;
        let t = rows.into_iter().next().map(row_token).ok_or(Refused::Unknown)?;
        if t.revoked_at.is_some() {
            return Err(Refused::Revoked);
        }
        if t.expires_at.is_some_and(|e| e <= now) {
            return Err(Refused::Expired);
        }
        Ok(t)
    }
}

/// `30m`, `24h`, `7d`, `90s` or plain seconds.
pub fn parse_duration(text: &str) -> anyhow::Result<Duration> {
    let text = text.trim();
    let (digits, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = digits.parse().with_context(|| format!("{text:?} is not a duration such as 30m, 24h or 7d"))?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => anyhow::bail!("unknown unit {other:?} in {text:?}: use s, m, h or d"),
    };
    let secs = n.checked_mul(unit_secs).with_context(|| format!("{text:?} is too long"))?;
    anyhow::ensure!(secs > 0, "the duration must be positive");
    Ok(Duration::from_secs(secs))
}

fn row_token(row: Vec<Val>) -> ApiToken {
    let mut c = Cols::new(row);
    let id = c.text();
    let tenant = c.opt_text();
    let role = c.text();
    ApiToken {
        id,
        tenant,
        // An unknown role (a newer version's) grants the least.
        role: Role::by_name(&role).unwrap_or(Role::Viewer),
        created_at: c.int(),
        expires_at: c.opt_int(),
        revoked_at: c.opt_int(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_kept_hashed_and_checked_for_expiry_and_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = ApiTokens::open(dir.path(), &Default::default()).unwrap();
        let (id, token) = tokens.create(Some("acme"), Role::Viewer, Some(Duration::from_secs(60)), 1_000).unwrap();
        assert!(token.starts_with("adk_") && token.len() == 68);
        let registry = std::fs::read(dir.path().join("fleet/registry.db")).unwrap();
        assert!(!registry.windows(token.len()).any(|w| w == token.as_bytes()), "the token itself is not stored");
        let grant = tokens.check(&token, 1_030).unwrap();
        assert_eq!((grant.id.as_str(), grant.tenant.as_deref(), grant.role), (id.as_str(), Some("acme"), Role::Viewer));
        assert_eq!(tokens.check(&token, 1_060), Err(Refused::Expired));
        assert_eq!(tokens.check("adk_00", 1_030), Err(Refused::Unknown));
        assert!(tokens.revoke(&id, 1_040).unwrap());
        assert_eq!(tokens.check(&token, 1_041), Err(Refused::Revoked));
        assert!(!tokens.revoke("nope", 1_040).unwrap());
        let (_, all) = tokens.create(None, Role::Admin, None, 1_000).unwrap();
        assert_eq!(tokens.check(&all, i64::MAX).unwrap().tenant, None, "no expiry, every tenant");
        assert_eq!(tokens.list().unwrap().len(), 2);
        assert!(tokens.create(Some("no spaces"), Role::Viewer, None, 0).is_err());
    }

    #[test]
    fn durations_read_as_people_write_them() {
        assert_eq!(parse_duration("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(parse_duration(" 30m").unwrap(), Duration::from_secs(1_800));
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        for bad in ["", "0", "7w", "d", "99999999999999999999d", "18446744073709551615d"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }
}
