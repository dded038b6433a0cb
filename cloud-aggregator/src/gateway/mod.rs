//! The gateway: authenticates agents by their client certificates, enrolls new ones, checks
//! their batches and writes them to the sink, acknowledging each batch only once every event in
//! it is durable.
//!
//! Agents connect over QUIC, or over TLS on TCP where their network blocks UDP (the fallback):
//! the same protocol and the same TLS 1.3 certificate on both. Each connection is a driver of
//! [`ServerSession`] over one bidirectional byte stream (a QUIC stream or the TLS stream). Batches are
//! enqueued into the sink in the order they arrive and acknowledged in that order too (a
//! [`FuturesOrdered`] of pending batches, bounded by the session's window). Bad input (garbage
//! or oversized frames, a wrong protocol version, unknown agents, invalid batches) closes that
//! connection with an error frame, is logged with the peer and counted in [`GatewayMetrics`];
//! other connections are not affected.

pub mod auth;
pub mod preauth;
pub mod sink;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actidash_shared::batch;
use actidash_shared::kafka::FleetRecord;
use actidash_shared::session::{ServerEvent, ServerLimits, ServerSession};
use actidash_shared::wire::{
    ALPN, Ack, Batch, ConfigPush, ConfigState, DEFAULT_MAX_FRAME_LEN, Enrolled, ErrorCode, Frame, Refused, Renewed,
    WholeRefusal,
};
use anyhow::Context as _;
use bytes::BytesMut;
use futures::StreamExt as _;
use futures::stream::FuturesOrdered;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use self::auth::Admission;
use self::sink::{Pending, Sink};
use crate::config::GatewayConfig;
use crate::fleet::Fleet;

/// The verified identity of a connection's client certificate: (agent id, tenant), or why it
/// could not be read; None without a certificate.
type PeerIdentity = Option<Result<(String, String), String>>;

fn now_unix() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A connection with no packet for this long is gone (the agent keeps it alive every second).
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// QUIC endpoint settings derived from the gateway's private key rather than chosen at random
/// per process: the stateless-reset key, and the key that connection IDs are hashed with. A
/// restarted gateway (or another instance with the same certificate) then recognises an agent's
/// old connection IDs and answers them with a valid stateless reset, so the agent learns at once
/// that its connection is gone instead of waiting for its idle timeout. That is what lets an
/// agent reconnect within about a second of a gateway's return.
fn stable_endpoint_config(private_key_der: &[u8]) -> quinn::EndpointConfig {
    let mut material = b"actidash quic endpoint v1".to_vec();
    material.extend_from_slice(private_key_der);
    let seed = ring::digest::digest(&ring::digest::SHA256, &material);
    let seed = seed.as_ref();
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &seed[..16]);
    let cid_key = u64::from_le_bytes(seed[16..24].try_into().unwrap_or_default());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    config
}

/// An agent renews its certificate once in its validity (at two thirds of it); more often is
/// refused, so that an enrolled agent cannot fill the registry with certificates: at most once
/// a minute, or once a quarter of the validity where certificates live less than four minutes.
fn min_renewal_interval(validity: Duration) -> Duration {
    (validity / 4).min(Duration::from_secs(60))
}

/// Counters of what the gateway accepted and refused.
#[derive(Debug, Default, Serialize)]
pub struct GatewayMetrics {
    pub connections_accepted: AtomicU64,
    pub connections_refused: AtomicU64,
    pub auth_failures: AtomicU64,
    /// TLS handshakes that failed (no or a wrong certificate chain, an expired certificate…).
    pub tls_failures: AtomicU64,
    pub enrollments: AtomicU64,
    pub enroll_failures: AtomicU64,
    pub renewals: AtomicU64,
    /// Connections closed because their agent was revoked.
    pub revoked_disconnects: AtomicU64,
    /// Batches refused because an event claimed another tenant than the certificate's.
    pub foreign_tenant_batches: AtomicU64,
    /// Events refused for good (declared holes; the agent keeps them aside).
    pub refused_events: AtomicU64,
    /// Heartbeats answered but not stored (more than one per half interval from an agent).
    pub heartbeats_dropped: AtomicU64,
    /// Certificate renewals refused (more than one a minute from an agent).
    pub renewals_refused: AtomicU64,
    /// Connections refused because their address had its maximum open without authentication.
    pub unauthenticated_refused: AtomicU64,
    /// Enrollment attempts refused because their address made too many.
    pub enrollments_throttled: AtomicU64,
    /// QUIC clients asked to prove their address (Retry) under load.
    pub quic_retries: AtomicU64,
    /// Batches delayed by their agent's rate limit.
    pub rate_limited: AtomicU64,
    pub bad_frames: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub invalid_batches: AtomicU64,
    pub batches_acked: AtomicU64,
    pub events_acked: AtomicU64,
    pub sink_failures: AtomicU64,
    /// Configurations pushed to agents ([`crate::central`]).
    pub config_pushes: AtomicU64,
}

/// What the gateway knows of a session's agent's configuration ([`crate::central`]).
#[derive(Debug, Default)]
struct SessionConfig {
    /// The agent's own account, from its hello and then its heartbeats (none: it keeps its
    /// local file).
    state: Option<ConfigState>,
    /// The version pushed on this session (each at most once).
    pushed: Option<u64>,
    /// The account last recorded in the registry.
    recorded: Option<ConfigState>,
    /// `state` changed since the last look at what to push (a hello, a heartbeat): only then,
    /// or when the active versions change, is there anything to compare — not on every batch.
    changed: bool,
}

fn bump(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// A bound gateway, ready to run.
pub struct Gateway {
    endpoint: quinn::Endpoint,
    tcp: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
    admission: Arc<Admission>,
    /// Batches decompressed and parsed at once (off the async workers), one per core.
    unpacking: Arc<Semaphore>,
    preauth: Arc<preauth::PreAuth>,
    quic_retry_above: usize,
    revocation_check: Duration,
    sink: Sink,
    limits: ServerLimits,
    max_connections: usize,
    hello_timeout: Duration,
    pub metrics: Arc<GatewayMetrics>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("quic", &self.endpoint.local_addr().ok())
            .field("tcp", &self.local_tcp_addr())
            .finish()
    }
}

impl Gateway {
    /// Binds the QUIC endpoint and the TCP fallback. Clients are verified against the fleet
    /// CA; one without a certificate may only enroll.
    pub fn bind(
        config: &GatewayConfig,
        fleet: Arc<Fleet>,
        sink: Sink,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Gateway> {
        let certs = CertificateDer::pem_file_iter(&config.cert_file)
            .with_context(|| format!("reading {}", config.cert_file.display()))?
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("parsing {}", config.cert_file.display()))?;
        let key = PrivateKeyDer::from_pem_file(&config.key_file)
            .with_context(|| format!("reading the private key {}", config.key_file.display()))?;
        let endpoint_config = stable_endpoint_config(key.secret_der());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(fleet.ca_pem().as_bytes()) {
            roots.add(ca.context("parsing the fleet CA")?).context("the fleet CA certificate")?;
        }
        // A certificate, when presented, must chain to the fleet CA and be valid; without one
        // the TLS session is allowed so that an agent can enroll, and nothing else.
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .context("client certificate verifier")?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .context("TLS 1.3 configuration")?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .context("the gateway's certificate and key do not match")?;
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let tls = Arc::new(tls);
        let tcp = if config.tcp_fallback {
            let addr = config.listen_tcp.unwrap_or(config.listen);
            let std_listener = std::net::TcpListener::bind(addr)
                .with_context(|| format!("binding the gateway's TCP fallback to tcp/{addr}"))?;
            std_listener.set_nonblocking(true)?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            Some((listener, tokio_rustls::TlsAcceptor::from(tls.clone())))
        } else {
            None
        };
        let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::unwrap_or_clone(tls))
            .context("QUIC TLS configuration")?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
        let mut transport = quinn::TransportConfig::default();
        transport.max_idle_timeout(Some(IDLE_TIMEOUT.try_into().context("idle timeout")?));
        transport.max_concurrent_bidi_streams(1u32.into());
        transport.max_concurrent_uni_streams(0u32.into());
        server.transport_config(Arc::new(transport));
        let socket = std::net::UdpSocket::bind(config.listen)
            .with_context(|| format!("binding the gateway to udp/{}", config.listen))?;
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server), socket, Arc::new(quinn::TokioRuntime))
            .context("starting the QUIC endpoint")?;
        // An event must fit in a batch (whose limit is on its compressed size; room is left for
        // the compressed frame) and in a Kafka message.
        let max_event_bytes =
            Some(sink.max_event_bytes().unwrap_or(u32::MAX).min(config.max_batch_bytes.saturating_sub(1_024)));
        let renewal_every = min_renewal_interval(fleet.cert_validity());
        Ok(Gateway {
            endpoint,
            tcp,
            admission: Arc::new(Admission::new(
                fleet,
                auth::AgentLimits {
                    max_connections: config.max_connections_per_agent,
                    events_per_sec: config.max_events_per_sec_per_agent,
                    bytes_per_sec: config.max_bytes_per_sec_per_agent,
                    min_heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms / 2),
                    min_renewal_interval: renewal_every,
                },
            )?),
            unpacking: Arc::new(Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))),
            preauth: preauth::PreAuth::new(preauth::PreAuthLimits {
                max_open_per_address: config.max_unauthenticated_per_address,
                enrollments_per_min: config.enrollments_per_min_per_address,
            }),
            quic_retry_above: config.quic_retry_above,
            revocation_check: Duration::from_millis(config.heartbeat_interval_ms / 2).max(Duration::from_millis(50)),
            sink,
            limits: ServerLimits {
                max_in_flight: config.max_in_flight,
                heartbeat_interval: Duration::from_millis(config.heartbeat_interval_ms),
                max_batch_bytes: config.max_batch_bytes,
                max_batch_events: config.max_batch_events,
                max_event_bytes,
                schema_versions: schema_versions(),
            },
            max_connections: connection_limit(config.max_connections),
            hello_timeout: Duration::from_millis(config.hello_timeout_ms),
            metrics: Arc::new(GatewayMetrics::default()),
            shutdown,
        })
    }

    pub fn local_addr(&self) -> anyhow::Result<SocketAddr> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The TCP fallback's address, if it is offered.
    pub fn local_tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Accepts connections until shutdown.
    pub async fn run(self) -> anyhow::Result<()> {
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let mut next_connection_id: u64 = 0;
        let mut accept_errors = 0u32;
        let (accept_warning, refused_warning) = (EverySecond::default(), EverySecond::default());
        self.admission.spawn_refresher(self.revocation_check, self.shutdown.clone());
        {
            let (counters, permits, shutdown) = (self.metrics.clone(), permits.clone(), self.shutdown.clone());
            let max = self.max_connections;
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(crate::telemetry::REFRESH);
                loop {
                    tokio::select! {
                        _ = tick.tick() => {}
                        () = shutdown.cancelled() => break,
                    }
                    crate::telemetry::record_gateway(&counters, max - permits.available_permits());
                }
            });
        }
        info!(listen = %self.local_addr()?, tcp_fallback = ?self.local_tcp_addr(), "gateway listening (QUIC)");
        loop {
            let accepted = tokio::select! {
                i = self.endpoint.accept() => match i { Some(i) => Accepted::Quic(Box::new(i)), None => break },
                t = accept_tcp(self.tcp.as_ref()) => match t {
                    Ok((stream, remote)) => {
                        accept_errors = 0;
                        Accepted::Tcp(stream, remote)
                    }
                    Err(e) => {
                        // Out of descriptors (or memory): spinning would only fill the log and
                        // starve the rest of the process. Back off, and say so once a second.
                        accept_errors += 1;
                        if accept_warning.due() {
                            warn!(error = %e, consecutive = accept_errors, "accepting a TCP connection failed; backing off");
                        }
                        let pause = Duration::from_millis(10u64 << accept_errors.min(7)).min(Duration::from_secs(1));
                        tokio::select! {
                            () = tokio::time::sleep(pause) => {}
                            () = self.shutdown.cancelled() => break,
                        }
                        continue;
                    }
                },
                () = self.shutdown.cancelled() => break,
                reason = self.sink.fatal() => {
                    // Every later send would fail: stop (the connections with it, unacknowledged
                    // batches failed back to their agents, which re-send them to a fresh gateway).
                    self.shutdown.cancel();
                    self.endpoint.close(1u32.into(), b"gateway restarting");
                    anyhow::bail!("the Kafka producer hit a fatal error ({reason}); exiting so that supervision starts a fresh gateway");
                }
            };
            let remote = match &accepted {
                Accepted::Quic(i) => i.remote_address(),
                Accepted::Tcp(_, remote) => *remote,
            };
            // Under load from clients without credentials, a new QUIC client first proves its
            // address (a Retry round trip, no state kept here), so spoofed sources hold nothing.
            let accepted = match accepted {
                Accepted::Quic(incoming)
                    if self.preauth.unauthenticated() >= self.quic_retry_above && incoming.may_retry() =>
                {
                    bump(&self.metrics.quic_retries, 1);
                    let _ = incoming.retry();
                    continue;
                }
                other => other,
            };
            let Some(slot) = self.preauth.open(remote.ip()) else {
                bump(&self.metrics.unauthenticated_refused, 1);
                if refused_warning.due() {
                    warn!(remote = %remote, limit = self.preauth.limits().max_open_per_address, "connection refused: this address has its maximum of connections open without authentication (warned once a second)");
                }
                if let Accepted::Quic(incoming) = accepted {
                    incoming.refuse();
                }
                continue;
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                bump(&self.metrics.connections_refused, 1);
                if refused_warning.due() {
                    warn!(remote = %remote, limit = self.max_connections, "connection refused: too many connections (warned once a second)");
                }
                if let Accepted::Quic(incoming) = accepted {
                    incoming.refuse();
                }
                continue;
            };
            bump(&self.metrics.connections_accepted, 1);
            next_connection_id += 1;
            let conn = Connection {
                id: next_connection_id,
                admission: self.admission.clone(),
                unpacking: self.unpacking.clone(),
                preauth: self.preauth.clone(),
                preauth_slot: std::sync::Mutex::new(Some(slot)),
                sink: self.sink.clone(),
                limits: self.limits,
                hello_timeout: self.hello_timeout,
                metrics: self.metrics.clone(),
                shutdown: self.shutdown.clone(),
            };
            let acceptor = self.tcp.as_ref().map(|(_, a)| a.clone());
            tokio::spawn(async move {
                let (id, sink) = (conn.id, conn.sink.clone());
                let result = match (accepted, acceptor) {
                    (Accepted::Quic(incoming), _) => conn.run_quic(*incoming).await,
                    (Accepted::Tcp(stream, remote), Some(acceptor)) => conn.run_tcp(stream, remote, acceptor).await,
                    (Accepted::Tcp(..), None) => Ok(()),
                };
                if let Err(e) = result {
                    debug!(remote = %remote, error = format!("{e:#}"), "connection ended");
                }
                sink.connection_closed(id).await;
                drop(permit);
            });
        }
        self.endpoint.close(0u32.into(), b"gateway shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(3), self.endpoint.wait_idle()).await;
        self.sink.flush(Duration::from_secs(10));
        info!("gateway stopped");
        Ok(())
    }
}

/// The event schema versions this gateway states it reads: this build's, or for tests of
/// version skew, `ACTIDASH_TEST_SCHEMA_VERSIONS=<lowest>-<highest>` (a gateway that pretends to
/// be older or newer).
fn schema_versions() -> (u16, u16) {
    let own = actidash_shared::event::SCHEMA_VERSION;
    let Ok(text) = std::env::var("ACTIDASH_TEST_SCHEMA_VERSIONS") else { return (own, own) };
    let parse = |t: &str| t.trim().parse::<u16>().ok();
    match text.split_once('-') {
        Some((lo, hi)) => parse(lo).zip(parse(hi)).unwrap_or((own, own)),
        None => parse(&text).map_or((own, own), |v| (v, v)),
    }
}

/// One agent connection.
struct Connection {
    /// Unique in this gateway process.
    id: u64,
    admission: Arc<Admission>,
    unpacking: Arc<Semaphore>,
    preauth: Arc<preauth::PreAuth>,
    /// Its place in its address's budget of unauthenticated connections, until it
    /// authenticates.
    preauth_slot: std::sync::Mutex<Option<preauth::Slot>>,
    sink: Sink,
    limits: ServerLimits,
    /// How long the peer may take to authenticate ([`crate::config::GatewayConfig::hello_timeout_ms`]).
    hello_timeout: Duration,
    metrics: Arc<GatewayMetrics>,
    shutdown: CancellationToken,
}

enum Accepted {
    Quic(Box<quinn::Incoming>),
    Tcp(tokio::net::TcpStream, SocketAddr),
}

async fn accept_tcp(
    tcp: Option<&(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tcp {
        Some((listener, _)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// How long a peer may take to finish its handshake and open its stream.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest frame read before the peer is authenticated.
const PRE_AUTH_MAX_FRAME: usize = 64 * 1024;

/// Descriptors kept for everything but agent connections (the registry, the store, Kafka's
/// sockets, the API's connections, logs) out of a descriptor limit of `limit`.
fn reserved_descriptors(limit: u64) -> u64 {
    64 + limit / 16
}

/// The connection limit to apply: the soft descriptor limit is raised to the hard one (said in
/// the log), and `configured` is lowered, with a warning, to stay below it less a reserve, so
/// that a flood of connections can never leave the process without descriptors for its
/// registry (revocations) or its store.
fn connection_limit(configured: usize) -> usize {
    let before = rlimit::Resource::NOFILE.get().map(|(soft, _)| soft).unwrap_or(0);
    let limit = match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            warn!(error = %e, "cannot read or raise the descriptor limit; max_connections applied as configured");
            return configured;
        }
    };
    if limit > before {
        info!(from = before, to = limit, "descriptor limit raised to the hard limit");
    }
    let usable = usize::try_from(limit.saturating_sub(reserved_descriptors(limit))).unwrap_or(usize::MAX).max(1);
    if configured > usable {
        warn!(
            configured,
            lowered_to = usable,
            descriptor_limit = limit,
            reserved = reserved_descriptors(limit),
            "max_connections lowered to stay below the descriptor limit (raise LimitNOFILE or ulimit -n to allow more)"
        );
        usable
    } else {
        configured
    }
}

/// Says whether a warning is due: at most one a second, so that a flood of refusals cannot
/// flood the log.
#[derive(Debug, Default)]
struct EverySecond {
    last_ms: AtomicU64,
}

impl EverySecond {
    fn due(&self) -> bool {
        let now = chrono::Utc::now().timestamp_millis().max(0) as u64;
        let last = self.last_ms.load(Ordering::Relaxed);
        now >= last + 1_000 && self.last_ms.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok()
    }
}

/// An untrusted string (an agent id from a hello, an error quoting one) as logged: escaped
/// (`\n` stays two characters, so it cannot start a forged line) and cut to 200 characters.
fn untrusted(text: &str) -> String {
    let cut: String = text.chars().take(200).collect();
    let escaped = cut.escape_debug().to_string();
    if cut.len() < text.len() { format!("{escaped}…") } else { escaped }
}

impl Connection {
    async fn run_quic(self, incoming: quinn::Incoming) -> anyhow::Result<()> {
        let remote = incoming.remote_address();
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => {
                bump(&self.metrics.tls_failures, 1);
                warn!(remote = %remote, transport = "quic", error = %e, "handshake refused");
                return Err(e).context("QUIC handshake");
            }
        };
        let certs = conn.peer_identity().and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok());
        let peer = certs.as_ref().and_then(|certs| certs.first().map(|c| crate::fleet::identity_of(c)));
        let expires = certs.as_ref().and_then(|certs| certs.first().and_then(|c| crate::fleet::not_after_of(c)));
        let (send, recv) = tokio::select! {
            s = conn.accept_bi() => s.context("waiting for the agent's stream")?,
            () = tokio::time::sleep(HANDSHAKE_TIMEOUT) => anyhow::bail!("no stream opened within {HANDSHAKE_TIMEOUT:?}"),
        };
        let result = self.serve(recv, send, remote, "quic", peer, expires).await;
        conn.close(1u32.into(), b"session closed");
        result
    }

    async fn run_tcp(
        self,
        stream: tokio::net::TcpStream,
        remote: SocketAddr,
        acceptor: tokio_rustls::TlsAcceptor,
    ) -> anyhow::Result<()> {
        stream.set_nodelay(true)?;
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                bump(&self.metrics.tls_failures, 1);
                warn!(remote = %remote, transport = "tcp", error = %e, "handshake refused");
                return Err(e).context("TLS handshake");
            }
            Err(_) => {
                bump(&self.metrics.tls_failures, 1);
                anyhow::bail!("TLS handshake timed out");
            }
        };
        // The protocol must be agreed: a client without it is not an agent (QUIC enforces the
        // same in its handshake).
        if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
            bump(&self.metrics.tls_failures, 1);
            warn!(remote = %remote, transport = "tcp", "handshake refused: no agreed protocol (ALPN)");
            anyhow::bail!("the client did not agree on the protocol {:?} (ALPN)", String::from_utf8_lossy(ALPN));
        }
        let first = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
        let peer = first.map(|c| crate::fleet::identity_of(c));
        let expires = first.and_then(|c| crate::fleet::not_after_of(c));
        let (recv, send) = tokio::io::split(tls);
        self.serve(recv, send, remote, "tcp", peer, expires).await
    }

    /// Drives one session over a byte stream until it ends.
    async fn serve<R, W>(
        &self,
        mut recv: R,
        mut send: W,
        remote: SocketAddr,
        transport: &'static str,
        peer: PeerIdentity,
        expires: Option<i64>,
    ) -> anyhow::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut session = ServerSession::new(self.limits);
        // The session ends when its certificate does (a renewed one serves the next session).
        let expires = expires.map(|at| {
            let left = at.saturating_sub(chrono::Utc::now().timestamp()).max(0) as u64;
            tokio::time::Instant::now() + Duration::from_secs(left)
        });
        let mut rx = BytesMut::with_capacity(64 * 1024);
        let mut pending: FuturesOrdered<futures::future::BoxFuture<'static, (Ack, Result<(), sink::SinkError>)>> =
            FuturesOrdered::new();
        let mut identity: Option<(String, String)> = None;
        let mut revoked = self.admission.subscribe();
        let mut configs = self.admission.subscribe_configs();
        let mut config = SessionConfig::default();
        let result = self
            .serve_loop(
                &mut recv,
                &mut send,
                remote,
                transport,
                &peer,
                &mut identity,
                &mut session,
                &mut rx,
                &mut pending,
                &mut revoked,
                (&mut configs, &mut config),
                expires,
            )
            .await;
        if let Some((agent, _)) = &identity {
            self.admission.release(agent);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn serve_loop<R, W>(
        &self,
        recv: &mut R,
        send: &mut W,
        remote: SocketAddr,
        transport: &'static str,
        peer: &PeerIdentity,
        identity: &mut Option<(String, String)>,
        session: &mut ServerSession,
        rx: &mut BytesMut,
        pending: &mut FuturesOrdered<futures::future::BoxFuture<'static, (Ack, Result<(), sink::SinkError>)>>,
        revoked: &mut tokio::sync::watch::Receiver<Arc<std::collections::HashSet<String>>>,
        (configs, config): (&mut tokio::sync::watch::Receiver<auth::ActiveConfigs>, &mut SessionConfig),
        expires: Option<tokio::time::Instant>,
    ) -> anyhow::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let authenticate_by = tokio::time::Instant::now() + self.hello_timeout;
        loop {
            let mut tx = BytesMut::new();
            while let Some(frame) = session.poll_transmit() {
                frame.encode(&mut tx);
            }
            if !tx.is_empty() {
                send.write_all(&tx).await.context("writing to the agent")?;
                send.flush().await.context("writing to the agent")?;
            }
            if session.is_closed() {
                // Its address's budget is given back before the peer sees the end.
                self.preauth_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                let _ = send.shutdown().await;
                // Give the error frame a moment to leave before closing.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(());
            }
            tokio::select! {
                read = recv.read_buf(rx) => {
                    if read.context("reading from the agent")? == 0 {
                        info!(remote = %remote, agent_id = identity.as_ref().map(|i| i.0.as_str()), "agent closed the stream");
                        return Ok(());
                    }
                    // One frame at a time: a frame's events (authentication above all) are
                    // handled before the next frame is looked at, so a pipelining agent works.
                    while !session.is_closed() && self.handle_one_frame(session, rx, remote, identity.as_ref()) {
                        if self.handle_events(session, identity, pending, remote, transport, peer, config).await {
                            return Ok(());
                        }
                        if std::mem::take(&mut config.changed) {
                            let active = configs.borrow_and_update().clone();
                            self.offer_config(session, identity.as_ref(), config, &active).await;
                        }
                    }
                    if identity.is_some() {
                        // Authenticated: no longer counted against its address.
                        self.preauth_slot.lock().unwrap_or_else(|p| p.into_inner()).take();
                    }
                }
                Ok(()) = revoked.changed() => {
                    let set = revoked.borrow_and_update().clone();
                    if let Some((agent, _)) = identity.as_ref()
                        && set.contains(agent)
                    {
                        bump(&self.metrics.revoked_disconnects, 1);
                        warn!(remote = %remote, agent_id = %agent, "agent revoked: closing its connection");
                        session.fail(ErrorCode::Unauthenticated, format!("agent {agent:?} was revoked"));
                    }
                }
                Ok(()) = configs.changed() => {
                    let active = configs.borrow_and_update().clone();
                    self.offer_config(session, identity.as_ref(), config, &active).await;
                }
                Some((ack, result)) = pending.next(), if !pending.is_empty() => match result {
                    Ok(()) => {
                        bump(&self.metrics.batches_acked, 1);
                        bump(&self.metrics.events_acked, u64::from(ack.count));
                        session.ack(ack);
                    }
                    Err(e) => {
                        bump(&self.metrics.sink_failures, 1);
                        warn!(remote = %remote, source = %ack.source_id, first_seq = ack.first_seq, error = %e, "batch not made durable; the agent will re-send");
                        session.fail(ErrorCode::Unavailable, format!("batch {}+{} not made durable: {e}", ack.first_seq, ack.count));
                    }
                },
                () = self.shutdown.cancelled() => {
                    session.fail(ErrorCode::ShuttingDown, "gateway shutting down".into());
                }
                () = sleep_until_some(expires), if identity.is_some() && !session.is_closed() => {
                    warn!(remote = %remote, agent_id = identity.as_ref().map(|i| i.0.as_str()), "the agent's certificate expired: closing the session");
                    session.fail(ErrorCode::Unauthenticated, "your certificate expired during the session; renew it or re-enroll".into());
                }
                () = tokio::time::sleep_until(authenticate_by), if identity.is_none() => {
                    bump(&self.metrics.protocol_errors, 1);
                    warn!(remote = %remote, transport, "no hello or enrollment in time: closing");
                    session.fail(ErrorCode::Unauthenticated, format!("no hello or enrollment within {:?}", self.hello_timeout));
                }
            }
        }
    }

    /// Pushes the active configuration of the agent's group if the agent takes configurations
    /// from the cloud and runs another version — never one it reported as failed, and each
    /// version at most once a session (applying one starts a new session).
    async fn offer_config(
        &self,
        session: &mut ServerSession,
        identity: Option<&(String, String)>,
        config: &mut SessionConfig,
        active: &auth::ActiveConfigs,
    ) {
        let (Some((agent_id, tenant)), Some(state)) = (identity, &config.state) else { return };
        let Some(&want) = active.get(&(tenant.clone(), state.group.clone())) else { return };
        if state.version == Some(want) || state.failed_version == Some(want) || config.pushed == Some(want) {
            return;
        }
        config.pushed = Some(want);
        let registry = self.admission.fleet().registry().clone();
        let (t, group) = (tenant.clone(), state.group.clone());
        match tokio::task::spawn_blocking(move || crate::central::version(&registry, &t, &group, want)).await {
            Ok(Ok(Some(v))) => {
                bump(&self.metrics.config_pushes, 1);
                info!(agent_id = %agent_id, group = %state.group, version = want, running = state.version, "pushing the group's configuration");
                session.push_config(ConfigPush { group: state.group.clone(), version: want, text: v.text });
            }
            Ok(Ok(None)) => {
                warn!(agent_id = %agent_id, group = %state.group, version = want, "the active configuration is missing from the registry")
            }
            Ok(Err(e)) => {
                config.pushed = None;
                warn!(agent_id = %agent_id, error = format!("{e:#}"), "cannot read the configuration to push; trying again at the next change");
            }
            Err(e) => warn!(agent_id = %agent_id, error = %e, "reading the configuration to push failed"),
        }
    }

    /// Acts on what the session decided; returns true when the agent closed the session.
    #[allow(clippy::too_many_arguments)]
    async fn handle_events(
        &self,
        session: &mut ServerSession,
        identity: &mut Option<(String, String)>,
        pending: &mut FuturesOrdered<futures::future::BoxFuture<'static, (Ack, Result<(), sink::SinkError>)>>,
        remote: SocketAddr,
        transport: &'static str,
        peer: &PeerIdentity,
        config: &mut SessionConfig,
    ) -> bool {
        while let Some(event) = session.poll_event() {
            match event {
                ServerEvent::Hello(hello) => {
                    // The registry is a file: read it off the async workers, as enrollment does.
                    let admitted = match peer.clone() {
                        Some(Err(e)) => Err(auth::AuthError::BadCertificate(e)),
                        peer => {
                            let (admission, agent) = (self.admission.clone(), hello.agent_id.clone());
                            let peer = peer.and_then(Result::ok);
                            tokio::task::spawn_blocking(move || admission.admit(&agent, peer.as_ref()))
                                .await
                                .unwrap_or_else(|e| Err(auth::AuthError::Registry(e.to_string())))
                        }
                    };
                    match admitted {
                        Ok((agent_id, tenant)) => {
                            info!(remote = %remote, transport, agent_id = %agent_id, tenant = %tenant, agent_version = %hello.agent_version, "agent connected");
                            *identity = Some((agent_id.clone(), tenant.clone()));
                            config.state = hello.config.clone();
                            config.changed = true;
                            session.accept(agent_id, tenant);
                        }
                        Err(e) => {
                            bump(&self.metrics.auth_failures, 1);
                            warn!(remote = %remote, transport, agent_id = %untrusted(&hello.agent_id), error = %untrusted(&e.to_string()), "agent refused");
                            session.reject(e.to_string());
                        }
                    }
                }
                ServerEvent::Enroll(enroll) => {
                    if !self.preauth.enrollment_allowed(remote.ip()) {
                        bump(&self.metrics.enrollments_throttled, 1);
                        bump(&self.metrics.enroll_failures, 1);
                        session.reject("too many enrollment attempts from this address; try again in a minute".into());
                        continue;
                    }
                    let fleet = self.admission.fleet().clone();
                    let agent_id = enroll.agent_id.clone();
                    let result = tokio::task::spawn_blocking(move || {
                        fleet.enroll(&enroll.token, &enroll.agent_id, &enroll.csr_pem, now_unix())
                    })
                    .await;
                    match result {
                        Ok(Ok((tenant, cert_pem))) => {
                            bump(&self.metrics.enrollments, 1);
                            info!(remote = %remote, agent_id = %agent_id, tenant = %tenant, "agent enrolled");
                            let ca_pem = self.admission.fleet().ca_pem().to_owned();
                            session.enrolled(Enrolled { agent_id, tenant, cert_pem, ca_pem });
                        }
                        Ok(Err(e)) => {
                            bump(&self.metrics.enroll_failures, 1);
                            warn!(remote = %remote, agent_id = %untrusted(&agent_id), error = %untrusted(&e.to_string()), "enrollment refused");
                            session.reject(format!("enrollment refused: {e}"));
                        }
                        Err(e) => {
                            bump(&self.metrics.enroll_failures, 1);
                            session.fail(ErrorCode::Unavailable, format!("enrollment failed: {e}"));
                        }
                    }
                }
                ServerEvent::Renew(renew) => {
                    let Some((agent_id, tenant)) = identity.clone() else { continue };
                    if let Err(wait) = self.admission.renewal_allowed(&agent_id) {
                        bump(&self.metrics.renewals_refused, 1);
                        let every = min_renewal_interval(self.admission.fleet().cert_validity());
                        warn!(remote = %remote, agent_id = %agent_id, retry_in_secs = wait.as_secs() + 1, "renewal refused: renewed too recently");
                        session.reject(format!(
                            "renewal refused: this agent renewed its certificate less than {} s ago; retry in {} s",
                            every.as_secs(),
                            wait.as_secs() + 1
                        ));
                        continue;
                    }
                    let fleet = self.admission.fleet().clone();
                    let (a, t) = (agent_id.clone(), tenant.clone());
                    match tokio::task::spawn_blocking(move || fleet.renew(&a, &t, &renew.csr_pem, now_unix())).await {
                        Ok(Ok(cert_pem)) => {
                            bump(&self.metrics.renewals, 1);
                            info!(remote = %remote, agent_id = %agent_id, "certificate renewed");
                            session.renewed(Renewed { cert_pem });
                        }
                        Ok(Err(e)) => {
                            bump(&self.metrics.enroll_failures, 1);
                            warn!(remote = %remote, agent_id = %agent_id, error = %e, "renewal refused");
                            session.reject(format!("renewal refused: {e}"));
                        }
                        Err(e) => session.fail(ErrorCode::Unavailable, format!("renewal failed: {e}")),
                    }
                }
                ServerEvent::Batch(b) => {
                    let Some((agent_id, tenant)) = identity.as_ref() else { continue };
                    let ack = Ack { source_id: b.source_id.clone(), first_seq: b.first_seq, count: b.count };
                    let wait = self.admission.throttle(agent_id, b.count);
                    if !wait.is_zero() {
                        bump(&self.metrics.rate_limited, 1);
                        debug!(agent_id = %agent_id, wait_ms = wait.as_millis() as u64, "agent over its rate: reading it more slowly");
                        tokio::time::sleep(wait).await;
                    }
                    let (source_id, first_seq, count) = (b.source_id.clone(), b.first_seq, b.count);
                    let unpacked = match self.unpack(b, agent_id, tenant, session.takes_refusals()).await {
                        Ok(unpacked) => unpacked,
                        Err(e) => {
                            warn!(remote = %remote, agent_id = %agent_id, error = %e, "unpacking a batch failed");
                            session.fail(ErrorCode::Unavailable, format!("unpacking the batch failed: {e}"));
                            continue;
                        }
                    };
                    match unpacked {
                        Ok(batch::UnpackedBatch { events, refused, decompressed_bytes: decompressed }) => {
                            let wait = self.admission.throttle_bytes(agent_id, decompressed);
                            if !wait.is_zero() {
                                bump(&self.metrics.rate_limited, 1);
                                debug!(agent_id = %agent_id, wait_ms = wait.as_millis() as u64, "agent over its byte rate: reading it more slowly");
                                tokio::time::sleep(wait).await;
                            }
                            if !refused.is_empty() {
                                bump(&self.metrics.invalid_batches, 1);
                                bump(&self.metrics.refused_events, refused.len() as u64);
                                if refused.iter().any(|r| r.kind == batch::RefusalKind::ForeignTenant) {
                                    bump(&self.metrics.foreign_tenant_batches, 1);
                                }
                                warn!(remote = %remote, agent_id = %agent_id, source = %untrusted(&source_id), first_seq, n_refused = refused.len(), first_kind = %refused[0].kind, first_reason = %untrusted(&refused[0].reason), "events refused for good; the rest of the batch is taken");
                                session.refuse(Refused {
                                    source_id: source_id.clone(),
                                    first_seq,
                                    count,
                                    events: refused,
                                    whole: None,
                                });
                            }
                            if events.is_empty() {
                                pending.push_back(ack_when_done(ack, Box::pin(async { Ok(()) })));
                                continue;
                            }
                            metrics::histogram!(crate::telemetry::GATEWAY_BATCH_EVENTS).record(events.len() as f64);
                            metrics::counter!(crate::telemetry::GATEWAY_EVENTS, "tenant" => tenant.to_owned())
                                .increment(events.len() as u64);
                            match self.sink.submit(self.id, events).await {
                                Ok(done) => pending.push_back(ack_when_done(ack, timed(done, self.sink.kind()))),
                                Err(e) => {
                                    bump(&self.metrics.sink_failures, 1);
                                    warn!(remote = %remote, agent_id = %agent_id, error = %e, "sink unavailable");
                                    session.fail(ErrorCode::Unavailable, e.to_string());
                                }
                            }
                        }
                        Err(e) => {
                            bump(&self.metrics.invalid_batches, 1);
                            if matches!(e, batch::BatchError::ForeignTenant { .. }) {
                                bump(&self.metrics.foreign_tenant_batches, 1);
                            }
                            if session.takes_refusals() {
                                // The batch cannot be read as a whole: every event of its span
                                // is refused (the agent keeps them aside), and its source goes on.
                                bump(&self.metrics.refused_events, u64::from(count));
                                warn!(remote = %remote, agent_id = %agent_id, source = %untrusted(&source_id), first_seq, count, error = %untrusted(&e.to_string()), "batch refused whole for good; its source goes on");
                                let whole = WholeRefusal { kind: e.refusal_kind(), reason: e.to_string() };
                                session.refuse(Refused {
                                    source_id,
                                    first_seq,
                                    count,
                                    events: Vec::new(),
                                    whole: Some(whole),
                                });
                                pending.push_back(ack_when_done(ack, Box::pin(async { Ok(()) })));
                            } else {
                                warn!(remote = %remote, agent_id = %agent_id, source = %untrusted(&source_id), first_seq, error = %untrusted(&e.to_string()), "invalid batch refused");
                                session.fail(ErrorCode::InvalidBatch, e.to_string());
                            }
                        }
                    }
                }
                ServerEvent::Heartbeat(heartbeat) => {
                    if let Some((agent_id, tenant)) = identity.as_ref() {
                        if !self.admission.heartbeat_due(agent_id) {
                            bump(&self.metrics.heartbeats_dropped, 1);
                            continue;
                        }
                        if heartbeat.config != config.recorded {
                            // What the agent runs changed (or is first heard of): for `config status`.
                            config.state = heartbeat.config.clone();
                            config.changed = true;
                            if let Some(state) = heartbeat.config.clone() {
                                let registry = self.admission.fleet().registry().clone();
                                let (a, t) = (agent_id.clone(), tenant.clone());
                                let recorded = tokio::task::spawn_blocking(move || {
                                    crate::central::record(&registry, &a, &t, &state, now_unix())
                                })
                                .await;
                                match recorded {
                                    Ok(Ok(())) => config.recorded = heartbeat.config.clone(),
                                    Ok(Err(e)) => {
                                        warn!(agent_id = %agent_id, error = format!("{e:#}"), "cannot record the agent's configuration; trying at its next heartbeat")
                                    }
                                    Err(e) => {
                                        warn!(agent_id = %agent_id, error = %e, "recording the agent's configuration failed")
                                    }
                                }
                            }
                        }
                        self.sink
                            .heartbeat(FleetRecord {
                                tenant: tenant.clone(),
                                agent_id: agent_id.clone(),
                                received_at: chrono::Utc::now(),
                                transport: transport.into(),
                                remote_addr: remote.to_string(),
                                heartbeat,
                            })
                            .await;
                    }
                }
                ServerEvent::Closed(e) => {
                    info!(remote = %remote, code = ?e.code, message = %e.message, "agent closed the session");
                    return true;
                }
            }
        }
        false
    }

    /// Decodes and handles at most one frame; returns whether one was handled. Bad bytes close
    /// the session with an error frame.
    /// Decompresses and checks a batch off the async workers, one batch per core at once
    /// (a small payload may decompress into megabytes and hold thousands of events). A batch
    /// decompresses to at most its byte limit plus a newline per event (what an agent packs),
    /// and an event is at most what the sink delivers. Err only if the work itself failed.
    async fn unpack(
        &self,
        b: Batch,
        agent_id: &str,
        tenant: &str,
        each: bool,
    ) -> Result<Result<batch::UnpackedBatch, batch::BatchError>, tokio::task::JoinError> {
        let max_decompressed = self.limits.max_batch_bytes as usize + self.limits.max_batch_events as usize;
        let max_event = self.limits.max_event_bytes.map_or(usize::MAX, |n| n as usize);
        let (agent_id, tenant) = (agent_id.to_owned(), tenant.to_owned());
        let _permit = self.unpacking.acquire().await;
        tokio::task::spawn_blocking(move || {
            if each {
                batch::unpack_each(&b, &agent_id, &tenant, max_decompressed, max_event)
            } else {
                batch::unpack(&b, &agent_id, &tenant, max_decompressed).map(|events| batch::UnpackedBatch {
                    decompressed_bytes: events.iter().map(|u| u.json.len() + 1).sum(),
                    events,
                    refused: Vec::new(),
                })
            }
        })
        .await
    }

    fn handle_one_frame(
        &self,
        session: &mut ServerSession,
        rx: &mut BytesMut,
        remote: SocketAddr,
        identity: Option<&(String, String)>,
    ) -> bool {
        let agent_id = identity.map(|i| i.0.as_str());
        // Before authentication only small frames: a hello, an enrollment (a CSR of a few KiB).
        let limit = if identity.is_some() { DEFAULT_MAX_FRAME_LEN } else { PRE_AUTH_MAX_FRAME };
        match Frame::decode(rx, limit) {
            Ok(Some(frame)) => {
                if let Err(e) = session.handle_frame(frame) {
                    bump(&self.metrics.protocol_errors, 1);
                    warn!(remote = %remote, agent_id, code = ?e.code, error = %untrusted(&e.message), "protocol error");
                }
                true
            }
            Ok(None) => false,
            Err(e) => {
                bump(&self.metrics.bad_frames, 1);
                warn!(remote = %remote, agent_id, error = %e, "bad frame");
                session.fail(e.code(), e.to_string());
                rx.clear();
                false
            }
        }
    }
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn ack_when_done(ack: Ack, done: Pending) -> futures::future::BoxFuture<'static, (Ack, Result<(), sink::SinkError>)> {
    Box::pin(async move { (ack, done.await) })
}

/// `done`, recording how long the sink took to make the batch durable.
fn timed(done: Pending, sink: &'static str) -> Pending {
    let started = std::time::Instant::now();
    Box::pin(async move {
        let result = done.await;
        if result.is_ok() {
            metrics::histogram!(crate::telemetry::PRODUCE_SECONDS, "sink" => sink)
                .record(started.elapsed().as_secs_f64());
        }
        result
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent id with a newline cannot forge a log line; a long one is cut.
    #[test]
    fn untrusted_strings_are_logged_escaped_and_cut() {
        assert_eq!(
            untrusted("a1\n2026-12-02T00:00:00Z INFO agent enrolled agent_id=forged"),
            "a1\\n2026-12-02T00:00:00Z INFO agent enrolled agent_id=forged"
        );
        assert_eq!(untrusted("tab\there"), "tab\\there");
        let long = "x".repeat(1_000);
        assert_eq!(untrusted(&long).chars().count(), 201);
        assert_eq!(untrusted("plain-id_1.2"), "plain-id_1.2");
    }
}
