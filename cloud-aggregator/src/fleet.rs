//! The fleet: the certificate authority that signs agent certificates, and the registry of
//! enrollment tokens, enrolled agents, issued certificates and revocations.
//!
//! - The CA is created on first start in `data_dir/fleet/` (an ECDSA P-256 key, owner-only),
//!   or supplied by the operator (`[fleet] ca_cert_file` and `ca_key_file`).
//! - Enrollment tokens are random, stored only as their SHA-256, single-use and expiring:
//!   redeeming one is a single SQLite transaction, so two agents racing with one token cannot
//!   both win.
//! - An agent's identity (agent id, tenant) is written by the CA into its certificate (subject
//!   CN and O); the gateway reads it from there, never from what the agent says.
//! - Revocation marks the agent; every gateway instance sharing the registry reloads the
//!   revoked set each heartbeat interval and closes that agent's connections.
//!
//! The registry ([`crate::registry`]) is a SQLite file that the processes of one host share, or
//! a PostgreSQL database that gateways and API servers on several hosts share (`[fleet]
//! registry_url`): a revocation reaches every gateway within half a heartbeat interval. Nothing
//! secret is in it but token hashes — and, on PostgreSQL without CA files, the CA's key, which
//! every gateway sharing the registry needs (protect the database as you would the key file).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::registry::{Registry, RegistryLocation};
use crate::store::db::{Cols, DbError, Tx, Val};

/// `[fleet]` of the cloud configuration.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// An existing CA certificate (PEM) to sign agent certificates with...
    #[serde(default)]
    pub ca_cert_file: Option<PathBuf>,
    /// ...and its private key (PEM). Both or neither; neither: a CA is created once, in
    /// `data_dir/fleet` (a SQLite registry) or in the registry itself (PostgreSQL).
    #[serde(default)]
    pub ca_key_file: Option<PathBuf>,
    /// Lifetime of an agent certificate, in seconds (agents renew at two thirds of it).
    #[serde(default = "default_cert_validity_secs")]
    pub cert_validity_secs: u64,
    /// The registry on PostgreSQL (`postgres://user@host:port/database`), shared by every
    /// gateway and API server; absent: a SQLite file in `data_dir/fleet`.
    #[serde(default)]
    pub registry_url: Option<String>,
    /// The registry's password, from this environment variable…
    #[serde(default)]
    pub registry_password_env: Option<String>,
    /// …or from this file (its first line).
    #[serde(default)]
    pub registry_password_file: Option<PathBuf>,
}

impl std::fmt::Debug for FleetConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetConfig")
            .field("ca_cert_file", &self.ca_cert_file)
            .field("ca_key_file", &self.ca_key_file)
            .field("cert_validity_secs", &self.cert_validity_secs)
            .field("registry_url", &self.registry_url.as_deref().map(crate::store::postgres::redact))
            .field("registry_password_env", &self.registry_password_env)
            .field("registry_password_file", &self.registry_password_file)
            .finish()
    }
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig {
            ca_cert_file: None,
            ca_key_file: None,
            cert_validity_secs: default_cert_validity_secs(),
            registry_url: None,
            registry_password_env: None,
            registry_password_file: None,
        }
    }
}

impl FleetConfig {
    /// Where the registry of `data_dir` is, with its password read.
    pub fn registry_location(&self, data_dir: &Path) -> anyhow::Result<RegistryLocation> {
        Ok(match &self.registry_url {
            None => RegistryLocation::Sqlite(data_dir.join("fleet").join("registry.db")),
            Some(url) => RegistryLocation::Postgres {
                url: url.clone(),
                password: crate::config::read_password(
                    "fleet.registry_password",
                    self.registry_password_env.as_deref(),
                    self.registry_password_file.as_deref(),
                )?,
            },
        })
    }
}

fn default_cert_validity_secs() -> u64 {
    30 * 24 * 3600
}

/// Shortest certificate lifetime (short ones are for tests of renewal).
const MIN_VALIDITY_SECS: u64 = 10;
/// Longest certificate lifetime: a year (the configuration refuses more; the fleet caps it too).
pub const MAX_VALIDITY_SECS: u64 = 365 * 24 * 3600;

/// Why an enrollment or renewal was refused. Messages never contain the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnrollError {
    #[error("unknown enrollment token")]
    UnknownToken,
    #[error("enrollment token expired")]
    ExpiredToken,
    #[error("enrollment token already used (by agent {0:?})")]
    UsedToken(String),
    /// The id is enrolled or was revoked: one answer for both, whatever the tenant, so that a
    /// token tells its holder nothing about other tenants' agents.
    #[error(
        "agent id {0:?} cannot be enrolled: ids are unique across the service and never reused; enroll under another id"
    )]
    IdUnavailable(String),
    #[error("agent id {0:?} was revoked; enroll under another id")]
    Revoked(String),
    #[error("invalid agent id {0:?}: 1-128 characters of A-Z a-z 0-9 - _ .")]
    InvalidAgentId(String),
    #[error("invalid certificate signing request: {0}")]
    InvalidCsr(String),
    #[error("registry: {0}")]
    Registry(String),
}

impl From<DbError> for EnrollError {
    fn from(e: DbError) -> EnrollError {
        EnrollError::Registry(e.message)
    }
}

/// The tenant of a usable enrollment token (known, unused, unexpired).
fn token_tenant(tx: &mut dyn Tx, token: &str, now: i64) -> Result<String, EnrollError> {
    let rows =
        tx.query("SELECT tenant, expires_at, used_by FROM tokens WHERE hash = ?1", &[sha256_hex(token).into()])?;
    let mut row = rows.into_iter().next().map(Cols::new).ok_or(EnrollError::UnknownToken)?;
    let (tenant, expires_at, used_by) = (row.text(), row.int(), row.opt_text());
    if let Some(by) = used_by {
        return Err(EnrollError::UsedToken(by));
    }
    if expires_at <= now {
        return Err(EnrollError::ExpiredToken);
    }
    Ok(tenant)
}

/// An agent as the registry knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    pub agent_id: String,
    pub tenant: String,
    pub enrolled_at: i64,
    pub revoked_at: Option<i64>,
}

impl AgentRecord {
    fn from_row(row: Vec<Val>) -> AgentRecord {
        let mut c = Cols::new(row);
        AgentRecord { agent_id: c.text(), tenant: c.text(), enrolled_at: c.int(), revoked_at: c.opt_int() }
    }
}

/// The CA and the registry.
pub struct Fleet {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    registry: Arc<Registry>,
    validity: Duration,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").field("registry", &self.registry).finish()
    }
}

pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The SHA-256 of a token, as hex: what the registry keeps instead of the token.
pub(crate) fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Creates `dir` if needed, mode 0700 whatever the umask (the fleet's CA key and registry).
pub(crate) fn private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} owner-only", dir.display()))
}

/// Makes sure the file exists with mode 0600 (before SQLite creates a database in it; its WAL
/// gets the same mode). An existing file is only `chmod`ed, never opened: closing a descriptor
/// of a SQLite database drops every POSIX lock this process holds on it (the registry is shared
/// by the roles of one process).
pub(crate) fn private_file(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::OpenOptions::new().create_new(true).write(true).mode(0o600).open(path) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} owner-only", path.display()))
        }
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().create(true).truncate(true).write(true).mode(0o600).open(&tmp)?;
    // A file left by an earlier attempt keeps its mode on open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// A new self-signed CA: (certificate, key), both PEM.
fn new_ca() -> anyhow::Result<(String, String)> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "ActiDash fleet CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let key_pair = KeyPair::generate()?;
    let ca = params.self_signed(&key_pair)?;
    Ok((ca.pem(), key_pair.serialize_pem()))
}

impl Fleet {
    /// Opens the fleet of `data_dir` (or of `[fleet] registry_url`), creating its CA and
    /// registry on first start — exactly once, however many processes start at the same time.
    pub fn open(data_dir: &Path, config: &FleetConfig) -> anyhow::Result<Fleet> {
        let location = config.registry_location(data_dir)?;
        let shared = location.is_shared();
        let registry = Arc::new(Registry::open(location, crate::registry::SCHEMA)?);
        let (ca_pem, key_pem, origin) = match (&config.ca_cert_file, &config.ca_key_file) {
            (Some(c), Some(k)) => {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(k).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
                if mode & 0o077 != 0 {
                    tracing::warn!(key = %k.display(), mode = format!("{mode:o}"), "the fleet CA's key is readable by others than its owner: chmod 600 it");
                }
                let cert = std::fs::read_to_string(c).with_context(|| format!("reading {}", c.display()))?;
                let key = std::fs::read_to_string(k).with_context(|| format!("reading {}", k.display()))?;
                if shared {
                    Self::check_shared_ca(&registry, &cert, c)?;
                }
                (cert, key, k.display().to_string())
            }
            (None, None) if shared => {
                let (cert, key) = Self::registry_ca(&registry)?;
                (cert, key, registry.location().name())
            }
            (None, None) => {
                let dir = data_dir.join("fleet");
                private_dir(&dir)?;
                let (c, k) = (dir.join("ca.pem"), dir.join("ca.key"));
                // Every process that opens the fleet (each role, `token create`…) may be the
                // first: one creates the CA while the others wait, then all read the same one.
                let lock_path = dir.join("ca.lock");
                let lock = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .with_context(|| format!("opening {}", lock_path.display()))?;
                lock.lock().with_context(|| format!("locking {}", lock_path.display()))?;
                if !c.exists() {
                    let (cert, key) = new_ca()?;
                    write_private(&k, &key)?;
                    // The certificate last, and whole: its presence means the CA is complete.
                    let tmp = c.with_extension("pem.tmp");
                    std::fs::write(&tmp, cert)?;
                    std::fs::rename(&tmp, &c)?;
                    tracing::info!(ca = %c.display(), "fleet certificate authority created");
                }
                drop(lock);
                let cert = std::fs::read_to_string(&c).with_context(|| format!("reading {}", c.display()))?;
                let key = std::fs::read_to_string(&k).with_context(|| format!("reading {}", k.display()))?;
                (cert, key, k.display().to_string())
            }
            _ => anyhow::bail!("fleet: set both ca_cert_file and ca_key_file, or neither"),
        };
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing the CA key of {origin}"))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .with_context(|| format!("parsing the CA certificate of {origin}"))?;
        Ok(Fleet {
            ca_pem,
            issuer,
            registry,
            validity: Duration::from_secs(config.cert_validity_secs.clamp(MIN_VALIDITY_SECS, MAX_VALIDITY_SECS)),
        })
    }

    /// A shared registry with no CA files: the CA lives in the registry, made by the first
    /// process under the registry's write lock and read by every other.
    fn registry_ca(registry: &Registry) -> anyhow::Result<(String, String)> {
        registry.write(|tx| {
            let rows = tx.query("SELECT cert_pem, key_pem FROM ca WHERE id = 1", &[])?;
            if let Some(mut row) = rows.into_iter().next().map(Cols::new) {
                let (cert, key) = (row.text(), row.text());
                anyhow::ensure!(
                    !key.is_empty(),
                    "the registry's CA was given as files by another process (ca_cert_file, ca_key_file): give this one the same files"
                );
                return Ok((cert, key));
            }
            let (cert, key) = new_ca()?;
            tx.exec("INSERT INTO ca (id, cert_pem, key_pem) VALUES (1, ?1, ?2)", &[(&cert).into(), (&key).into()])?;
            tracing::info!(registry = %registry.location().name(), "fleet certificate authority created in the registry");
            Ok((cert, key))
        })
    }

    /// A shared registry with CA files: the first process records the certificate, and every
    /// process must sign with the same one (agents enrolled by one gateway are served by all).
    fn check_shared_ca(registry: &Registry, cert: &str, file: &Path) -> anyhow::Result<()> {
        registry.write(|tx| {
            let rows = tx.query("SELECT cert_pem FROM ca WHERE id = 1", &[])?;
            match rows.into_iter().next().map(|r| Cols::new(r).text()) {
                None => {
                    tx.exec("INSERT INTO ca (id, cert_pem, key_pem) VALUES (1, ?1, NULL)", &[cert.into()])?;
                    Ok(())
                }
                Some(known) if known.trim() == cert.trim() => Ok(()),
                Some(_) => anyhow::bail!(
                    "{} is not the CA the fleet registry {} already uses: every process sharing a registry signs with one CA (give each the same ca_cert_file and ca_key_file)",
                    file.display(),
                    registry.location().name()
                ),
            }
        })
    }

    /// The CA certificate (PEM) agents' certificates chain to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The registry the fleet keeps its records in.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// A new single-use token for `tenant`, valid for `ttl`; only its hash is stored.
    pub fn create_token(&self, tenant: &str, ttl: Duration, now: i64) -> anyhow::Result<String> {
        anyhow::ensure!(valid_agent_id(tenant), "invalid tenant {tenant:?}");
        let token = format!("adt_{}", hex::encode(rand::random::<[u8; 32]>()));
        let hash = sha256_hex(&token);
        self.registry.write(|tx| {
            tx.exec(
                "INSERT INTO tokens (hash, tenant, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
                &[hash.into(), tenant.into(), now.into(), (now + ttl.as_secs() as i64).into()],
            )?;
            Ok::<_, anyhow::Error>(())
        })?;
        Ok(token)
    }

    /// How long the certificates this CA signs live.
    pub fn cert_validity(&self) -> Duration {
        self.validity
    }

    /// Redeems a token for `agent_id` and signs a certificate for the CSR's key; returns the
    /// tenant and the certificate (PEM). The CSR's own names are ignored: the CA writes the
    /// identity.
    pub fn enroll(
        &self,
        token: &str,
        agent_id: &str,
        csr_pem: &str,
        now: i64,
    ) -> Result<(String, String), EnrollError> {
        if !valid_agent_id(agent_id) {
            return Err(EnrollError::InvalidAgentId(agent_id.to_owned()));
        }
        // The token first, read without the write lock: a stranger's attempt costs one indexed
        // read, not a CSR parse and the registry's lock.
        self.registry.read(|tx| token_tenant(tx, token, now))?;
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| EnrollError::InvalidCsr(e.to_string()))?;
        self.registry.write(|tx| {
            // Again under the lock: another enrollment may have used it meanwhile.
            let tenant = token_tenant(tx, token, now)?;
            if !tx.query("SELECT 1 FROM agents WHERE agent_id = ?1", &[agent_id.into()])?.is_empty() {
                return Err(EnrollError::IdUnavailable(agent_id.to_owned()));
            }
            tx.exec(
                "UPDATE tokens SET used_at = ?1, used_by = ?2 WHERE hash = ?3",
                &[now.into(), agent_id.into(), sha256_hex(token).into()],
            )?;
            tx.exec(
                "INSERT INTO agents (agent_id, tenant, enrolled_at) VALUES (?1, ?2, ?3)",
                &[agent_id.into(), (&tenant).into(), now.into()],
            )?;
            let cert = self.sign(tx, csr, agent_id, &tenant, now)?;
            Ok((tenant, cert))
        })
    }

    /// A new certificate for an enrolled, unrevoked agent (renewal over its authenticated
    /// connection).
    pub fn renew(&self, agent_id: &str, tenant: &str, csr_pem: &str, now: i64) -> Result<String, EnrollError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| EnrollError::InvalidCsr(e.to_string()))?;
        self.registry.write(|tx| {
            let rows = tx.query(
                "SELECT revoked_at FROM agents WHERE agent_id = ?1 AND tenant = ?2",
                &[agent_id.into(), tenant.into()],
            )?;
            match rows.into_iter().next().map(|r| Cols::new(r).opt_int()) {
                Some(None) => {}
                Some(Some(_)) => return Err(EnrollError::Revoked(agent_id.to_owned())),
                None => return Err(EnrollError::Registry(format!("agent {agent_id:?} is not enrolled"))),
            }
            self.sign(tx, csr, agent_id, tenant, now)
        })
    }

    fn sign(
        &self,
        tx: &mut dyn Tx,
        csr: CertificateSigningRequestParams,
        agent_id: &str,
        tenant: &str,
        now: i64,
    ) -> Result<String, EnrollError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id);
        dn.push(DnType::OrganizationName, tenant);
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let serial: [u8; 16] = rand::random();
        let mut serial = serial.to_vec();
        serial[0] &= 0x7f; // a positive integer
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let start = time::OffsetDateTime::from_unix_timestamp(now).unwrap_or_else(|_| time::OffsetDateTime::now_utc());
        // Some slack for clocks behind ours, small against the lifetime: agents renew at two
        // thirds of not_before..not_after.
        let skew = (self.validity.as_secs() / 10).min(300) as i64;
        params.not_before = start - time::Duration::seconds(skew);
        params.not_after = start + time::Duration::seconds(self.validity.as_secs() as i64);
        let cert = CertificateSigningRequestParams { params, public_key: csr.public_key }
            .signed_by(&self.issuer)
            .map_err(|e| EnrollError::InvalidCsr(e.to_string()))?;
        tx.exec(
            "INSERT INTO certs (serial, agent_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            &[hex::encode(&serial).into(), agent_id.into(), now.into(), (now + self.validity.as_secs() as i64).into()],
        )?;
        Ok(cert.pem())
    }

    /// Revokes an agent; false if it is unknown.
    pub fn revoke(&self, agent_id: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.registry.write(|tx| {
            tx.exec(
                "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?1) WHERE agent_id = ?2",
                &[now.into(), agent_id.into()],
            )
        })?;
        Ok(n > 0)
    }

    /// Every revoked agent id.
    pub fn revoked(&self) -> anyhow::Result<HashSet<String>> {
        let rows =
            self.registry.read(|tx| tx.query("SELECT agent_id FROM agents WHERE revoked_at IS NOT NULL", &[]))?;
        Ok(rows.into_iter().map(|r| Cols::new(r).text()).collect())
    }

    /// One agent, if enrolled.
    pub fn agent(&self, agent_id: &str) -> anyhow::Result<Option<AgentRecord>> {
        let rows = self.registry.read(|tx| {
            tx.query(
                "SELECT agent_id, tenant, enrolled_at, revoked_at FROM agents WHERE agent_id = ?1",
                &[agent_id.into()],
            )
        })?;
        Ok(rows.into_iter().next().map(AgentRecord::from_row))
    }

    /// Every enrolled agent.
    pub fn agents(&self) -> anyhow::Result<Vec<AgentRecord>> {
        let rows = self.registry.read(|tx| {
            tx.query("SELECT agent_id, tenant, enrolled_at, revoked_at FROM agents ORDER BY agent_id", &[])
        })?;
        Ok(rows.into_iter().map(AgentRecord::from_row).collect())
    }

    /// A certificate signed by this CA for any identity and end of validity, outside the
    /// registry: for testing how gateways treat expired or foreign-tenant certificates.
    pub fn sign_unregistered(
        &self,
        key: &KeyPair,
        agent_id: &str,
        tenant: &str,
        not_after: i64,
    ) -> anyhow::Result<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, agent_id);
        params.distinguished_name.push(DnType::OrganizationName, tenant);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = time::OffsetDateTime::from_unix_timestamp(not_after - 3600)?;
        params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after)?;
        Ok(params.signed_by(key, &self.issuer)?.pem())
    }
}

/// When a certificate stops being valid (unix seconds), if it can be read.
pub fn not_after_of(cert_der: &[u8]) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert_der).ok().map(|(_, c)| c.validity().not_after.timestamp())
}

/// The identity a verified client certificate names: (agent id, tenant).
pub fn identity_of(cert_der: &[u8]) -> Result<(String, String), String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|e| format!("unreadable certificate: {e}"))?;
    let subject = cert.subject();
    let cn = subject.iter_common_name().next().and_then(|a| a.as_str().ok()).ok_or("certificate has no CN")?;
    let o = subject.iter_organization().next().and_then(|a| a.as_str().ok()).ok_or("certificate has no O (tenant)")?;
    Ok((cn.to_owned(), o.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> (KeyPair, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, "i-claim-to-be-someone-else");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        (key, csr)
    }

    /// Enrollment, renewal and revocation on the fleet `open` opens (twice: two processes, or
    /// two hosts sharing one registry).
    fn tokens_and_identities(open: &(dyn Fn() -> Fleet + Sync)) {
        let fleet = open();
        let token = fleet.create_token("acme", Duration::from_secs(3600), 1_000).unwrap();
        let (_, csr_pem) = csr();
        let (tenant, cert) = fleet.enroll(&token, "a1", &csr_pem, 1_001).unwrap();
        assert_eq!(tenant, "acme");
        let der =
            <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::from_pem_slice(cert.as_bytes())
                .unwrap();
        assert_eq!(identity_of(&der).unwrap(), ("a1".into(), "acme".into()), "the CSR's own name is ignored");

        // Another process (or host) sees the same registry and signs with the same CA.
        let other = open();
        assert_eq!(other.ca_pem(), fleet.ca_pem());
        assert_eq!(other.enroll(&token, "a2", &csr_pem, 1_002), Err(EnrollError::UsedToken("a1".into())));
        assert_eq!(fleet.enroll("adt_nope", "a2", &csr_pem, 1_002), Err(EnrollError::UnknownToken));
        let short = fleet.create_token("acme", Duration::from_secs(10), 1_000).unwrap();
        assert_eq!(fleet.enroll(&short, "a3", &csr_pem, 1_010), Err(EnrollError::ExpiredToken));
        let again = other.create_token("acme", Duration::from_secs(3600), 1_000).unwrap();
        assert_eq!(fleet.enroll(&again, "a1", &csr_pem, 1_003), Err(EnrollError::IdUnavailable("a1".into())));
        // The token is looked up before anything else: a bad CSR with a bad token is a token error.
        assert_eq!(fleet.enroll("adt_nope", "a4", "garbage", 1_003), Err(EnrollError::UnknownToken));
        assert!(matches!(fleet.enroll(&again, "a4", "garbage", 1_003), Err(EnrollError::InvalidCsr(_))));

        assert!(other.renew("a1", "acme", &csr_pem, 1_004).is_ok());
        assert!(other.revoke("a1", 1_005).unwrap());
        assert!(!fleet.revoke("nobody", 1_005).unwrap());
        assert_eq!(fleet.revoked().unwrap(), HashSet::from(["a1".to_owned()]), "a revocation made elsewhere");
        assert_eq!(fleet.renew("a1", "acme", &csr_pem, 1_006), Err(EnrollError::Revoked("a1".into())));
        assert_eq!(
            fleet.enroll(&again, "a1", &csr_pem, 1_006),
            Err(EnrollError::IdUnavailable("a1".into())),
            "revoked or enrolled, the same answer"
        );
        assert!(!format!("{:?}", fleet.enroll(&again, "a1", &csr_pem, 1_006)).contains(&again));
        assert_eq!(other.agent("a1").unwrap().unwrap().tenant, "acme");
        assert_eq!(other.agents().unwrap().len(), 1);

        // One token, many enrollments at once: exactly one wins.
        let contested = fleet.create_token("acme", Duration::from_secs(3600), 1_000).unwrap();
        let wins = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..6)
                .map(|i| {
                    let (contested, csr_pem) = (&contested, &csr_pem);
                    scope.spawn(move || open().enroll(contested, &format!("racer{i}"), csr_pem, 1_007).is_ok())
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).filter(|won| *won).count()
        });
        assert_eq!(wins, 1, "a token is redeemed once, whichever process redeems it");
    }

    #[test]
    fn tokens_are_single_use_and_expire_and_identity_comes_from_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        tokens_and_identities(&|| Fleet::open(dir.path(), &FleetConfig::default()).unwrap());
        let mode = |p: &str| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(p)).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode("fleet/ca.key"), 0o600);
        assert_eq!(mode("fleet"), 0o700, "the fleet's folder is owner-only");
        assert_eq!(mode("fleet/registry.db"), 0o600, "so is its registry, whatever the umask");
    }

    #[test]
    fn a_registry_on_postgres_is_shared_by_processes_on_several_hosts() {
        let Some(admin) = actidash_tests::postgres_admin("fleet registry on postgres") else { return };
        let url = actidash_tests::fresh_postgres_database(&admin, "actidash_registry_test").unwrap();
        let config = FleetConfig { registry_url: Some(url.clone()), ..FleetConfig::default() };
        // Each "host" has its own data folder: nothing is shared but the database.
        let hosts: Vec<tempfile::TempDir> = (0..8).map(|_| tempfile::tempdir().unwrap()).collect();
        // A first start on several hosts at once: one CA, made once, in the registry.
        let cas: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = hosts
                .iter()
                .map(|h| scope.spawn(|| Fleet::open(h.path(), &config).unwrap().ca_pem().to_owned()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(cas.iter().all(|ca| *ca == cas[0]), "every host reads the one CA");
        assert!(!hosts[0].path().join("fleet/ca.key").exists(), "no key file on the host");
        let next = std::sync::atomic::AtomicUsize::new(0);
        tokens_and_identities(&|| {
            let host = &hosts[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % hosts.len()];
            Fleet::open(host.path(), &config).unwrap()
        });

        // CA files on a shared registry must be the same everywhere.
        let url2 = actidash_tests::fresh_postgres_database(&admin, "actidash_registry_files_test").unwrap();
        let files = tempfile::tempdir().unwrap();
        let write_ca = |name: &str| {
            let (cert, key) = new_ca().unwrap();
            let (c, k) = (files.path().join(format!("{name}.pem")), files.path().join(format!("{name}.key")));
            std::fs::write(&c, cert).unwrap();
            write_private(&k, &key).unwrap();
            (c, k)
        };
        let (c1, k1) = write_ca("one");
        let (c2, k2) = write_ca("two");
        let with_files = |c: &Path, k: &Path| FleetConfig {
            registry_url: Some(url2.clone()),
            ca_cert_file: Some(c.to_owned()),
            ca_key_file: Some(k.to_owned()),
            ..FleetConfig::default()
        };
        Fleet::open(hosts[0].path(), &with_files(&c1, &k1)).unwrap();
        Fleet::open(hosts[1].path(), &with_files(&c1, &k1)).unwrap();
        let err = Fleet::open(hosts[2].path(), &with_files(&c2, &k2)).unwrap_err().to_string();
        assert!(err.contains("is not the CA the fleet registry") && err.contains("two.pem"), "{err}");
        let err = Fleet::open(hosts[3].path(), &FleetConfig { registry_url: Some(url2), ..FleetConfig::default() })
            .unwrap_err()
            .to_string();
        assert!(err.contains("give this one the same files"), "{err}");
        assert!(!err.contains(&admin), "{err}");
    }

    #[test]
    fn processes_opening_a_new_fleet_at_once_share_one_ca() {
        // The cloud's roles and `token create` open the fleet concurrently on a first start.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_owned();
        let cas: Vec<String> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|_| scope.spawn(|| Fleet::open(&path, &FleetConfig::default()).map(|f| f.ca_pem().to_owned())))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
        });
        assert!(cas.iter().all(|ca| *ca == cas[0]), "every opener reads the one CA");
    }
}
