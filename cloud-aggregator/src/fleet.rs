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
//! The registry is a SQLite file: instances on one host (or a shared volume) share it. Nothing
//! secret is in it but token hashes.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use rcgen::{
    CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rusqlite::{Connection, OptionalExtension as _, TransactionBehavior, params};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

/// `[fleet]` of the cloud configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// An existing CA certificate (PEM) to sign agent certificates with...
    #[serde(default)]
    pub ca_cert_file: Option<PathBuf>,
    /// ...and its private key (PEM). Both or neither; neither: a CA is created in data_dir.
    #[serde(default)]
    pub ca_key_file: Option<PathBuf>,
    /// Lifetime of an agent certificate, in seconds (agents renew at two thirds of it).
    #[serde(default = "default_cert_validity_secs")]
    pub cert_validity_secs: u64,
}

impl Default for FleetConfig {
    fn default() -> FleetConfig {
        FleetConfig { ca_cert_file: None, ca_key_file: None, cert_validity_secs: default_cert_validity_secs() }
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

/// The tenant of a usable enrollment token (known, unused, unexpired).
fn token_tenant(conn: &Connection, token: &str, now: i64) -> Result<String, EnrollError> {
    let row: Option<(String, i64, Option<String>)> = conn
        .query_row("SELECT tenant, expires_at, used_by FROM tokens WHERE hash = ?1", [sha256_hex(token)], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()
        .map_err(|e| EnrollError::Registry(e.to_string()))?;
    let (tenant, expires_at, used_by) = row.ok_or(EnrollError::UnknownToken)?;
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

/// The CA and the registry.
pub struct Fleet {
    ca_pem: String,
    issuer: Issuer<'static, KeyPair>,
    registry: PathBuf,
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

impl Fleet {
    /// Opens the fleet of `data_dir`, creating its CA and registry on first start.
    pub fn open(data_dir: &Path, config: &FleetConfig) -> anyhow::Result<Fleet> {
        let dir = data_dir.join("fleet");
        private_dir(&dir)?;
        let (cert_file, key_file) = match (&config.ca_cert_file, &config.ca_key_file) {
            (Some(c), Some(k)) => {
                use std::os::unix::fs::PermissionsExt as _;
                let mode = std::fs::metadata(k).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
                if mode & 0o077 != 0 {
                    tracing::warn!(key = %k.display(), mode = format!("{mode:o}"), "the fleet CA's key is readable by others than its owner: chmod 600 it");
                }
                (c.clone(), k.clone())
            }
            (None, None) => {
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
                    Self::create_ca(&c, &k)?;
                    tracing::info!(ca = %c.display(), "fleet certificate authority created");
                }
                drop(lock);
                (c, k)
            }
            _ => anyhow::bail!("fleet: set both ca_cert_file and ca_key_file, or neither"),
        };
        let ca_pem = std::fs::read_to_string(&cert_file).with_context(|| format!("reading {}", cert_file.display()))?;
        let key_pem = std::fs::read_to_string(&key_file).with_context(|| format!("reading {}", key_file.display()))?;
        let key = KeyPair::from_pem(&key_pem).with_context(|| format!("parsing the CA key {}", key_file.display()))?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key)
            .with_context(|| format!("parsing the CA certificate {}", cert_file.display()))?;
        let fleet = Fleet {
            ca_pem,
            issuer,
            registry: dir.join("registry.db"),
            validity: Duration::from_secs(config.cert_validity_secs.clamp(MIN_VALIDITY_SECS, MAX_VALIDITY_SECS)),
        };
        fleet.create_schema()?;
        Ok(fleet)
    }

    fn create_ca(cert: &Path, key: &Path) -> anyhow::Result<()> {
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
        params.distinguished_name.push(DnType::CommonName, "ActiDash fleet CA");
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(3650);
        let key_pair = KeyPair::generate()?;
        let ca = params.self_signed(&key_pair)?;
        write_private(key, &key_pair.serialize_pem())?;
        // The certificate last, and whole: its presence means the CA is complete.
        let tmp = cert.with_extension("pem.tmp");
        std::fs::write(&tmp, ca.pem())?;
        std::fs::rename(&tmp, cert)?;
        Ok(())
    }

    /// The CA certificate (PEM) agents' certificates chain to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// A connection to the registry (the schema exists: [`Fleet::create_schema`] ran at open).
    fn connect(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open(&self.registry).with_context(|| format!("opening {}", self.registry.display()))?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Ok(conn)
    }

    /// WAL (a property of the file, set once) and the tables.
    fn create_schema(&self) -> anyhow::Result<()> {
        private_file(&self.registry)?;
        let conn = self.connect()?;
        // Processes opening a new registry at once: the switch to WAL waits its turn.
        crate::store::enable_wal(&conn)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS tokens (hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, created_at INTEGER NOT NULL,
                 expires_at INTEGER NOT NULL, used_at INTEGER, used_by TEXT);
             CREATE TABLE IF NOT EXISTS agents (agent_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                 enrolled_at INTEGER NOT NULL, revoked_at INTEGER);
             CREATE TABLE IF NOT EXISTS certs (serial TEXT PRIMARY KEY, agent_id TEXT NOT NULL,
                 issued_at INTEGER NOT NULL, not_after INTEGER NOT NULL);",
        )?;
        Ok(())
    }

    /// A new single-use token for `tenant`, valid for `ttl`; only its hash is stored.
    pub fn create_token(&self, tenant: &str, ttl: Duration, now: i64) -> anyhow::Result<String> {
        anyhow::ensure!(valid_agent_id(tenant), "invalid tenant {tenant:?}");
        let token = format!("adt_{}", hex::encode(rand::random::<[u8; 32]>()));
        self.connect()?.execute(
            "INSERT INTO tokens (hash, tenant, created_at, expires_at) VALUES (?1, ?2, ?3, ?4)",
            params![sha256_hex(&token), tenant, now, now + ttl.as_secs() as i64],
        )?;
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
        let reg = |e: rusqlite::Error| EnrollError::Registry(e.to_string());
        let mut conn = self.connect().map_err(|e| EnrollError::Registry(format!("{e:#}")))?;
        // The token first, read without the write lock: a stranger's attempt costs one indexed
        // read, not a CSR parse and the registry's lock.
        token_tenant(&conn, token, now)?;
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| EnrollError::InvalidCsr(e.to_string()))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(reg)?;
        // Again under the lock: another enrollment may have used it meanwhile.
        let tenant = token_tenant(&tx, token, now)?;
        let taken: Option<i64> = tx
            .query_row("SELECT 1 FROM agents WHERE agent_id = ?1", [agent_id], |r| r.get(0))
            .optional()
            .map_err(reg)?;
        if taken.is_some() {
            return Err(EnrollError::IdUnavailable(agent_id.to_owned()));
        }
        tx.execute(
            "UPDATE tokens SET used_at = ?1, used_by = ?2 WHERE hash = ?3",
            params![now, agent_id, sha256_hex(token)],
        )
        .map_err(reg)?;
        tx.execute(
            "INSERT INTO agents (agent_id, tenant, enrolled_at) VALUES (?1, ?2, ?3)",
            params![agent_id, tenant, now],
        )
        .map_err(reg)?;
        let cert = self.sign(&tx, csr, agent_id, &tenant, now)?;
        tx.commit().map_err(reg)?;
        Ok((tenant, cert))
    }

    /// A new certificate for an enrolled, unrevoked agent (renewal over its authenticated
    /// connection).
    pub fn renew(&self, agent_id: &str, tenant: &str, csr_pem: &str, now: i64) -> Result<String, EnrollError> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| EnrollError::InvalidCsr(e.to_string()))?;
        let reg = |e: rusqlite::Error| EnrollError::Registry(e.to_string());
        let mut conn = self.connect().map_err(|e| EnrollError::Registry(format!("{e:#}")))?;
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(reg)?;
        let revoked: Option<Option<i64>> = tx
            .query_row("SELECT revoked_at FROM agents WHERE agent_id = ?1 AND tenant = ?2", [agent_id, tenant], |r| {
                r.get(0)
            })
            .optional()
            .map_err(reg)?;
        match revoked {
            Some(None) => {}
            Some(Some(_)) => return Err(EnrollError::Revoked(agent_id.to_owned())),
            None => return Err(EnrollError::Registry(format!("agent {agent_id:?} is not enrolled"))),
        }
        let cert = self.sign(&tx, csr, agent_id, tenant, now)?;
        tx.commit().map_err(reg)?;
        Ok(cert)
    }

    fn sign(
        &self,
        tx: &rusqlite::Transaction<'_>,
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
        tx.execute(
            "INSERT INTO certs (serial, agent_id, issued_at, not_after) VALUES (?1, ?2, ?3, ?4)",
            params![hex::encode(&serial), agent_id, now, now + self.validity.as_secs() as i64],
        )
        .map_err(|e| EnrollError::Registry(e.to_string()))?;
        Ok(cert.pem())
    }

    /// Revokes an agent; false if it is unknown.
    pub fn revoke(&self, agent_id: &str, now: i64) -> anyhow::Result<bool> {
        let n = self.connect()?.execute(
            "UPDATE agents SET revoked_at = COALESCE(revoked_at, ?1) WHERE agent_id = ?2",
            params![now, agent_id],
        )?;
        Ok(n > 0)
    }

    /// Every revoked agent id.
    pub fn revoked(&self) -> anyhow::Result<HashSet<String>> {
        let conn = self.connect()?;
        let mut stmt = conn.prepare("SELECT agent_id FROM agents WHERE revoked_at IS NOT NULL")?;
        let ids = stmt.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        Ok(ids)
    }

    /// One agent, if enrolled.
    pub fn agent(&self, agent_id: &str) -> anyhow::Result<Option<AgentRecord>> {
        let conn = self.connect()?;
        Ok(conn
            .query_row(
                "SELECT agent_id, tenant, enrolled_at, revoked_at FROM agents WHERE agent_id = ?1",
                [agent_id],
                |r| {
                    Ok(AgentRecord {
                        agent_id: r.get(0)?,
                        tenant: r.get(1)?,
                        enrolled_at: r.get(2)?,
                        revoked_at: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    /// Every enrolled agent.
    pub fn agents(&self) -> anyhow::Result<Vec<AgentRecord>> {
        let conn = self.connect()?;
        let mut stmt =
            conn.prepare("SELECT agent_id, tenant, enrolled_at, revoked_at FROM agents ORDER BY agent_id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(AgentRecord {
                    agent_id: r.get(0)?,
                    tenant: r.get(1)?,
                    enrolled_at: r.get(2)?,
                    revoked_at: r.get(3)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(rows)
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

    #[test]
    fn tokens_are_single_use_and_expire_and_identity_comes_from_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Fleet::open(dir.path(), &FleetConfig::default()).unwrap();
        let mode = |p: &str| {
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(dir.path().join(p)).unwrap().permissions())
                & 0o777
        };
        assert_eq!(mode("fleet/ca.key"), 0o600);
        assert_eq!(mode("fleet"), 0o700, "the fleet's folder is owner-only");
        assert_eq!(mode("fleet/registry.db"), 0o600, "so is its registry, whatever the umask");

        let token = fleet.create_token("acme", Duration::from_secs(3600), 1_000).unwrap();
        let (_, csr_pem) = csr();
        let (tenant, cert) = fleet.enroll(&token, "a1", &csr_pem, 1_001).unwrap();
        assert_eq!(tenant, "acme");
        let der =
            <rustls_pki_types::CertificateDer<'_> as rustls_pki_types::pem::PemObject>::from_pem_slice(cert.as_bytes())
                .unwrap();
        assert_eq!(identity_of(&der).unwrap(), ("a1".into(), "acme".into()), "the CSR's own name is ignored");

        assert_eq!(fleet.enroll(&token, "a2", &csr_pem, 1_002), Err(EnrollError::UsedToken("a1".into())));
        assert_eq!(fleet.enroll("adt_nope", "a2", &csr_pem, 1_002), Err(EnrollError::UnknownToken));
        let short = fleet.create_token("acme", Duration::from_secs(10), 1_000).unwrap();
        assert_eq!(fleet.enroll(&short, "a3", &csr_pem, 1_010), Err(EnrollError::ExpiredToken));
        let again = fleet.create_token("acme", Duration::from_secs(3600), 1_000).unwrap();
        assert_eq!(fleet.enroll(&again, "a1", &csr_pem, 1_003), Err(EnrollError::IdUnavailable("a1".into())));
        // The token is looked up before anything else: a bad CSR with a bad token is a token error.
        assert_eq!(fleet.enroll("adt_nope", "a4", "garbage", 1_003), Err(EnrollError::UnknownToken));
        assert!(matches!(fleet.enroll(&again, "a4", "garbage", 1_003), Err(EnrollError::InvalidCsr(_))));

        assert!(fleet.renew("a1", "acme", &csr_pem, 1_004).is_ok());
        assert!(fleet.revoke("a1", 1_005).unwrap());
        assert!(!fleet.revoke("nobody", 1_005).unwrap());
        assert_eq!(fleet.revoked().unwrap(), HashSet::from(["a1".to_owned()]));
        assert_eq!(fleet.renew("a1", "acme", &csr_pem, 1_006), Err(EnrollError::Revoked("a1".into())));
        assert_eq!(
            fleet.enroll(&again, "a1", &csr_pem, 1_006),
            Err(EnrollError::IdUnavailable("a1".into())),
            "revoked or enrolled, the same answer"
        );
        assert!(!format!("{:?}", fleet.enroll(&again, "a1", &csr_pem, 1_006)).contains(&again));

        // Reopened: the same CA, the same registry.
        let reopened = Fleet::open(dir.path(), &FleetConfig::default()).unwrap();
        assert_eq!(reopened.ca_pem(), fleet.ca_pem());
        assert_eq!(reopened.agent("a1").unwrap().unwrap().tenant, "acme");
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
