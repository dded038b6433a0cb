//! The agent's identity: a private key generated on this host (it never leaves it) and the
//! certificate the fleet CA signed for it, naming the agent id and tenant.
//!
//! Both live in `data_dir/identity/` with owner-only permissions, written atomically (a
//! temporary file, then a rename), so a crash during enrollment or renewal leaves the old pair
//! or the new one, never half of each: the key and the certificate of a pair share a
//! generation suffix, and `current` names the generation in use.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use actidash_shared::wire::{DEFAULT_MAX_FRAME_LEN, Enroll, Enrolled, Frame, PROTOCOL_VERSION};
use anyhow::Context as _;
use bytes::BytesMut;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// The files of an identity.
#[derive(Debug, Clone)]
pub struct IdentityStore {
    dir: PathBuf,
}

/// A loaded key and certificate.
#[derive(Debug)]
pub struct Identity {
    pub certs: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
    /// The agent id and tenant the fleet CA wrote into the certificate (CN, O).
    pub agent_id: String,
    pub tenant: String,
}

impl Identity {
    /// Renewal is due once two thirds of the certificate's lifetime have passed.
    pub fn renewal_due(&self, now: i64) -> bool {
        renewal_due((self.not_before, self.not_after), now)
    }
}

/// Whether two thirds of the lifetime `(not_before, not_after)` have passed at `now`.
pub fn renewal_due((not_before, not_after): (i64, i64), now: i64) -> bool {
    let lifetime = (not_after - not_before).max(1);
    now >= not_before + lifetime * 2 / 3
}

/// A new key and a certificate signing request for it (PEM of both).
pub fn new_key_and_csr(agent_id: &str) -> anyhow::Result<(String, String)> {
    let key = rcgen::KeyPair::generate().context("generating a key")?;
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(rcgen::DnType::CommonName, agent_id);
    let csr = params.serialize_request(&key).context("building the signing request")?.pem()?;
    Ok((key.serialize_pem(), csr))
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Gives `dir` (an identity folder) and its files to the owner of `data_dir`, if another: an
/// agent enrolled by root (`sudo edge-agent enroll`) for a service that runs as its own user.
/// Nothing changes when the owners are the same (an agent enrolled by its own user).
pub fn give_to_owner_of(dir: &Path, data_dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(owner) = std::fs::metadata(data_dir) else { return Ok(()) };
    let mine = std::fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if (mine.uid(), mine.gid()) == (owner.uid(), owner.gid()) {
        return Ok(());
    }
    let give = |p: &Path| {
        std::os::unix::fs::chown(p, Some(owner.uid()), Some(owner.gid()))
            .with_context(|| format!("giving {} to the owner of {}", p.display(), data_dir.display()))
    };
    give(dir)?;
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        give(&entry?.path())?;
    }
    Ok(())
}

impl IdentityStore {
    pub fn new(dir: PathBuf) -> IdentityStore {
        IdentityStore { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn current(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("current")).ok().map(|s| s.trim().to_owned())
    }

    pub fn is_enrolled(&self) -> bool {
        self.current().is_some()
    }

    /// Stores a key and its certificate as the identity in use.
    pub fn store(&self, key_pem: &str, cert_pem: &str, ca_pem: Option<&str>) -> anyhow::Result<()> {
        std::fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o700))?;
        }
        let generation = format!("{}", chrono::Utc::now().timestamp_micros());
        write_private(&self.dir.join(format!("agent-{generation}.key")), key_pem.as_bytes())?;
        write_private(&self.dir.join(format!("agent-{generation}.crt")), cert_pem.as_bytes())?;
        if let Some(ca) = ca_pem {
            write_private(&self.dir.join("fleet-ca.pem"), ca.as_bytes())?;
        }
        let previous = self.current();
        write_private(&self.dir.join("current"), generation.as_bytes())?;
        if let Some(old) = previous {
            let _ = std::fs::remove_file(self.dir.join(format!("agent-{old}.key")));
            let _ = std::fs::remove_file(self.dir.join(format!("agent-{old}.crt")));
        }
        Ok(())
    }

    /// The identity in use.
    pub fn load(&self) -> anyhow::Result<Identity> {
        let generation = self.current().with_context(|| {
            format!("this agent is not enrolled ({} is empty): run `edge-agent enroll`", self.dir.display())
        })?;
        let cert_path = self.dir.join(format!("agent-{generation}.crt"));
        let key_path = self.dir.join(format!("agent-{generation}.key"));
        let certs = CertificateDer::pem_file_iter(&cert_path)
            .with_context(|| format!("reading {}", cert_path.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", cert_path.display()))?;
        let first = certs.first().with_context(|| format!("{} holds no certificate", cert_path.display()))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(first)
            .map_err(|e| anyhow::anyhow!("parsing {}: {e}", cert_path.display()))?;
        let validity = parsed.validity();
        let (not_before, not_after) = (validity.not_before.timestamp(), validity.not_after.timestamp());
        let subject = parsed.subject();
        let name = |v: Option<&x509_parser::x509::AttributeTypeAndValue<'_>>| {
            v.and_then(|a| a.as_str().ok()).map(str::to_owned).unwrap_or_default()
        };
        let agent_id = name(subject.iter_common_name().next());
        let tenant = name(subject.iter_organization().next());
        let key = PrivateKeyDer::from_pem_file(&key_path).with_context(|| format!("reading {}", key_path.display()))?;
        Ok(Identity { certs, key, not_before, not_after, agent_id, tenant })
    }

    /// Refuses a configuration whose `agent_id` or `tenant` disagrees with the enrolled
    /// certificate: the gateway binds the agent to the certificate's identity and refuses every
    /// event naming another, so such an agent would read records only to have them refused.
    /// Nothing to check before enrollment.
    pub fn check_matches(&self, agent_id: &str, tenant: &str) -> anyhow::Result<()> {
        if !self.is_enrolled() {
            return Ok(());
        }
        let identity = self.load()?;
        if identity.agent_id == agent_id && identity.tenant == tenant {
            return Ok(());
        }
        let mut wrong = Vec::new();
        if identity.agent_id != agent_id {
            wrong.push(format!("agent_id = {agent_id:?}"));
        }
        if identity.tenant != tenant {
            wrong.push(format!("tenant = {tenant:?}"));
        }
        anyhow::bail!(
            "the configuration says {}, but this agent's certificate (in {}) was issued to agent {:?} of tenant {:?}: \
             events carry the certificate's identity and the gateway refuses any other. Fix the configuration \
             (agent_id = {:?}, tenant = {:?}), or enroll this host anew for the other identity (a new agent_id, an \
             empty data_dir, `edge-agent enroll`)",
            wrong.join(" and "),
            self.dir.display(),
            identity.agent_id,
            identity.tenant,
            identity.agent_id,
            identity.tenant
        )
    }
}

/// The TLS client configuration: TLS 1.3, trusting only `ca_file` for the gateway, presenting
/// the agent's certificate when it has one.
pub fn client_tls(ca_file: &Path, identity: Option<&Identity>) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::transport::quic::load_certs(ca_file)? {
        roots.add(cert).with_context(|| format!("adding CA certificate from {}", ca_file.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS 1.3 configuration")?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.certs.clone(), id.key.clone_key())
            .context("the agent's certificate and key do not match")?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![actidash_shared::wire::ALPN.to_vec()];
    Ok(Arc::new(tls))
}

/// Enrolls over TLS on TCP: sends the token and a CSR for a key made here, stores the key and
/// the certificate the gateway returns.
pub async fn enroll(
    address: &str,
    server_name: &str,
    ca_file: &Path,
    agent_id: &str,
    token: &str,
    store: &IdentityStore,
) -> anyhow::Result<Enrolled> {
    let remote = tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to no address"))?;
    let tls = client_tls(ca_file, None)?;
    let stream = crate::transport::quic::connect_tcp(remote, server_name, tls).await?;
    let (mut recv, mut send) = tokio::io::split(stream);
    let (key_pem, csr_pem) = new_key_and_csr(agent_id)?;
    let frame = Frame::Enroll(Enroll {
        protocol_version: PROTOCOL_VERSION,
        agent_id: agent_id.to_owned(),
        token: token.to_owned(),
        csr_pem,
    });
    send.write_all(&frame.to_bytes()).await.context("sending the enrollment")?;
    send.flush().await?;
    let mut rx = BytesMut::new();
    let reply = loop {
        if let Some(frame) = Frame::decode(&mut rx, DEFAULT_MAX_FRAME_LEN).context("decoding the gateway's answer")? {
            break frame;
        }
        let n = tokio::time::timeout(std::time::Duration::from_secs(30), recv.read_buf(&mut rx))
            .await
            .context("no answer from the gateway within 30 s")??;
        anyhow::ensure!(n > 0, "the gateway closed the connection without an answer");
    };
    match reply {
        Frame::Enrolled(enrolled) => {
            anyhow::ensure!(
                enrolled.agent_id == agent_id,
                "the gateway enrolled {:?}, not {agent_id:?}",
                enrolled.agent_id
            );
            store.store(&key_pem, &enrolled.cert_pem, Some(&enrolled.ca_pem))?;
            Ok(enrolled)
        }
        Frame::Error(e) => anyhow::bail!("the gateway refused: {}", e.message),
        other => anyhow::bail!("unexpected {} frame from the gateway", other.name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_is_owner_only_and_replaces_a_pair_whole() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let store = IdentityStore::new(dir.path().join("identity"));
        assert!(!store.is_enrolled());
        let err = format!("{:#}", store.load().unwrap_err());
        assert!(err.contains("edge-agent enroll"), "{err}");

        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a1".into()]).unwrap();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::seconds(100);
        params.not_after = now + time::Duration::seconds(200);
        let cert = params.self_signed(&key).unwrap();
        store.store(&key.serialize_pem(), &cert.pem(), Some(&cert.pem())).unwrap();
        let id = store.load().unwrap();
        assert!(!id.renewal_due(now.unix_timestamp()));
        assert!(id.renewal_due(now.unix_timestamp() + 101));
        for entry in std::fs::read_dir(store.dir()).unwrap() {
            let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        store.store(&key.serialize_pem(), &cert.pem(), None).unwrap();
        let n_keys = std::fs::read_dir(store.dir())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "key"))
            .count();
        assert_eq!(n_keys, 1, "the previous pair is removed");
    }
}
