//! Development certificates: a CA and a gateway certificate signed by it, for the demo and the
//! tests. Production gateways use certificates from the operator's PKI.

use std::path::Path;

use anyhow::Context as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Writes `ca.pem`, `gateway.pem` and `gateway.key` (mode 0600) into `dir`, for `names`.
pub fn write_dev_certs(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let ca_key = KeyPair::generate().context("generating the CA key")?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "ActiDash development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).context("signing the CA")?;
    let issuer = Issuer::new(ca_params, ca_key);

    let key = KeyPair::generate().context("generating the gateway key")?;
    let mut params = CertificateParams::new(names.to_vec()).context("gateway certificate names")?;
    params.distinguished_name.push(DnType::CommonName, names.first().map(String::as_str).unwrap_or("gateway"));
    let cert = params.signed_by(&key, &issuer).context("signing the gateway certificate")?;

    write(dir, "ca.pem", &ca_cert.pem(), false)?;
    write(dir, "gateway.pem", &cert.pem(), false)?;
    write(dir, "gateway.key", &key.serialize_pem(), true)?;
    Ok(())
}

fn write(dir: &Path, name: &str, contents: &str, secret: bool) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let path = dir.join(name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(&path).with_context(|| format!("writing {}", path.display()))?;
    file.write_all(contents.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
