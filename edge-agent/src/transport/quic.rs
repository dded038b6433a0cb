//! The agent's connections to the gateway: QUIC (keep-alives short enough for NAT bindings),
//! or TLS over TCP where UDP is blocked. Both use TLS 1.3 only, verify the gateway's certificate
//! against the configured CA (there is no option to skip that), present the agent's certificate
//! (mutual TLS), and negotiate ALPN `actidash/2`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing certificates in {}", path.display()))?;
    anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", path.display());
    Ok(certs)
}

/// The TLS client configuration shared by QUIC and TCP: TLS 1.3, trusting only `ca_file`, with
/// no client certificate (enrollment, and tests of refusals).
pub fn client_tls_config(ca_file: &Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    crate::identity::client_tls(ca_file, None)
}

/// A QUIC client configuration over `tls`, with the agent's transport settings.
pub fn quic_client_config(tls: Arc<rustls::ClientConfig>) -> anyhow::Result<quinn::ClientConfig> {
    let quic_tls = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::unwrap_or_clone(tls))
        .context("QUIC TLS configuration")?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic_tls));
    let mut transport = quinn::TransportConfig::default();
    // A keep-alive every second (~50 bytes/s): NAT bindings stay open, and a restarted gateway's
    // stateless reset reaches the agent within a second, so it reconnects at once.
    transport.keep_alive_interval(Some(Duration::from_secs(1)));
    transport.max_idle_timeout(Some(Duration::from_secs(15).try_into().context("idle timeout")?));
    client.transport_config(Arc::new(transport));
    Ok(client)
}

/// A client endpoint that trusts only the CA in `ca_file` (and presents no certificate).
pub fn client_endpoint(ca_file: &Path, remote: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    client_endpoint_with(client_tls_config(ca_file)?, remote)
}

/// A client endpoint with the given TLS configuration as its default.
pub fn client_endpoint_with(tls: Arc<rustls::ClientConfig>, remote: SocketAddr) -> anyhow::Result<quinn::Endpoint> {
    let bind: SocketAddr = if remote.is_ipv6() { "[::]:0".parse()? } else { "0.0.0.0:0".parse()? };
    let mut endpoint = quinn::Endpoint::client(bind).context("binding the QUIC client socket")?;
    endpoint.set_default_client_config(quic_client_config(tls)?);
    Ok(endpoint)
}

/// TLS over TCP to the gateway's fallback port.
pub async fn connect_tcp(
    remote: SocketAddr,
    server_name: &str,
    tls: Arc<rustls::ClientConfig>,
) -> anyhow::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let stream = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(remote))
        .await
        .context("TCP connect timed out")?
        .with_context(|| format!("TCP connect to {remote}"))?;
    stream.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_owned())
        .with_context(|| format!("server name {server_name:?}"))?;
    let tls =
        tokio::time::timeout(Duration::from_secs(10), tokio_rustls::TlsConnector::from(tls).connect(name, stream))
            .await
            .context("TLS handshake timed out")?
            .context("TLS handshake")?;
    Ok(tls)
}
