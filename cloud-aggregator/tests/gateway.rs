//! The gateway over real QUIC and TLS on 127.0.0.1, with the embedded processor behind it:
//! enrollment, mutual TLS, revocation and per-agent limits; bad input of every kind gets an
//! error (a TLS alert or an error frame naming the problem) and is counted, and good agents
//! keep being served.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actidash_shared::batch;
use actidash_shared::wire::{Batch, Codec, Enroll, ErrorCode, Frame, Hello, PROTOCOL_VERSION, Renew};
use bytes::BytesMut;
use cloud_aggregator::config::GatewayConfig;
use cloud_aggregator::fleet::{Fleet, FleetConfig, identity_of};
use cloud_aggregator::gateway::Gateway;
use cloud_aggregator::gateway::sink::Sink;
use cloud_aggregator::store::Store;
use edge_agent::identity::Identity;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

struct Harness {
    addr: SocketAddr,
    tcp_addr: SocketAddr,
    ca: std::path::PathBuf,
    store: std::path::PathBuf,
    fleet: Arc<Fleet>,
    metrics: Arc<cloud_aggregator::gateway::GatewayMetrics>,
    dir: Arc<tempfile::TempDir>,
    shutdown: CancellationToken,
}

fn gateway_config(dir: &std::path::Path) -> GatewayConfig {
    GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
        tcp_fallback: true,
        cert_file: dir.join("certs/gateway.pem"),
        key_file: dir.join("certs/gateway.key"),
        max_connections: 16,
        max_in_flight: 4,
        heartbeat_interval_ms: 1000,
        max_connections_per_agent: 4,
        max_events_per_sec_per_agent: 100_000,
        max_bytes_per_sec_per_agent: 1 << 30,
        max_batch_bytes: 1024 * 1024,
        max_batch_events: 1_000,
        hello_timeout_ms: 10_000,
        max_unauthenticated_per_address: 32,
        enrollments_per_min_per_address: 30,
        quic_retry_above: 256,
    }
}

async fn start() -> Harness {
    start_with(|_| {}).await
}

async fn start_with(tune: impl FnOnce(&mut GatewayConfig)) -> Harness {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    cloud_aggregator::certs::write_dev_certs(&dir.path().join("certs"), &["localhost".into()]).unwrap();
    let fleet = Arc::new(Fleet::open(dir.path(), &FleetConfig::default()).unwrap());
    start_on(dir, fleet, tune).await
}

/// A gateway on `dir`'s fleet (several gateways may share one).
async fn start_on(dir: Arc<tempfile::TempDir>, fleet: Arc<Fleet>, tune: impl FnOnce(&mut GatewayConfig)) -> Harness {
    let mut config = gateway_config(dir.path());
    tune(&mut config);
    let store = dir.path().join(format!("serving-{}.db", rand_suffix()));
    let (tx, _thread) = cloud_aggregator::process::embedded::spawn(
        cloud_aggregator::store::Location::Sqlite(store.clone()),
        Default::default(),
        16,
    )
    .unwrap();
    let shutdown = CancellationToken::new();
    let gateway = Gateway::bind(&config, fleet.clone(), Sink::Embedded(tx), shutdown.clone()).unwrap();
    let addr = gateway.local_addr().unwrap();
    let tcp_addr = gateway.local_tcp_addr().unwrap();
    let metrics = gateway.metrics.clone();
    tokio::spawn(gateway.run());
    Harness { addr, tcp_addr, ca: dir.path().join("certs/ca.pem"), store, fleet, metrics, dir, shutdown }
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::AtomicU64;
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// An agent's key and certificate.
struct AgentId {
    key_pem: String,
    cert_pem: String,
}

impl AgentId {
    fn identity(&self) -> Identity {
        Identity {
            certs: CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()).collect::<Result<_, _>>().unwrap(),
            key: PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).unwrap(),
            not_before: 0,
            not_after: 0,
            agent_id: String::new(),
            tenant: String::new(),
        }
    }
}

/// Enrolls `agent` for `tenant` directly with the fleet.
fn enroll(h: &Harness, agent: &str, tenant: &str) -> AgentId {
    let token = h.fleet.create_token(tenant, Duration::from_secs(60), now()).unwrap();
    let (key_pem, csr) = edge_agent::identity::new_key_and_csr(agent).unwrap();
    let (_, cert_pem) = h.fleet.enroll(&token, agent, &csr, now()).unwrap();
    AgentId { key_pem, cert_pem }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn tls(h: &Harness, agent: Option<&AgentId>) -> Arc<rustls::ClientConfig> {
    let identity = agent.map(AgentId::identity);
    edge_agent::identity::client_tls(&h.ca, identity.as_ref()).unwrap()
}

/// Opens a QUIC connection and a stream as `agent`, sends `bytes`, and returns the frames
/// received until the gateway closes the stream or `n_frames` arrived.
async fn exchange(h: &Harness, agent: Option<&AgentId>, bytes: &[u8], n_frames: usize) -> Vec<Frame> {
    let (mut send, mut recv, _conn, _endpoint) = open_quic(h, agent).await.unwrap();
    send.write_all(bytes).await.unwrap();
    read_frames(&mut recv, n_frames).await
}

async fn open_quic(
    h: &Harness,
    agent: Option<&AgentId>,
) -> anyhow::Result<(quinn::SendStream, quinn::RecvStream, quinn::Connection, quinn::Endpoint)> {
    let endpoint = edge_agent::transport::quic::client_endpoint_with(tls(h, agent), h.addr)?;
    let conn = endpoint.connect(h.addr, "localhost")?.await?;
    let (send, recv) = conn.open_bi().await?;
    Ok((send, recv, conn, endpoint))
}

/// Why a QUIC session as `agent` could not get a welcome (None: it got one).
async fn quic_refusal(h: &Harness, agent: &AgentId) -> Option<String> {
    let (mut send, mut recv, conn, _endpoint) = match open_quic(h, Some(agent)).await {
        Ok(x) => x,
        Err(e) => return Some(format!("{e:#}")),
    };
    // TLS 1.3: the client may finish its handshake before the server's verdict arrives.
    let _ = send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION)])).await;
    if matches!(read_frames(&mut recv, 1).await.first(), Some(Frame::Welcome(_))) {
        return None;
    }
    Some(conn.closed().await.to_string())
}

/// The same over the TLS-on-TCP fallback.
async fn exchange_tcp(h: &Harness, agent: Option<&AgentId>, bytes: &[u8], n_frames: usize) -> Vec<Frame> {
    let stream = edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", tls(h, agent)).await.unwrap();
    let (mut recv, mut send) = tokio::io::split(stream);
    tokio::io::AsyncWriteExt::write_all(&mut send, bytes).await.unwrap();
    read_frames(&mut recv, n_frames).await
}

async fn read_frames(recv: &mut (impl tokio::io::AsyncRead + Unpin), n_frames: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    let mut buf = BytesMut::new();
    let read = async {
        while frames.len() < n_frames {
            match recv.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            while let Ok(Some(f)) = Frame::decode(&mut buf, 1 << 20) {
                frames.push(f);
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read).await.expect("gateway answered in time");
    frames
}

fn hello(agent: &str, version: u16) -> Frame {
    Frame::Hello(Hello {
        protocol_version: version,
        agent_id: agent.into(),
        agent_version: "test".into(),
        refusals: false,
        config: None,
    })
}

fn order_batch(tenant: &str, first_seq: u64, n: u64) -> Frame {
    let events: Vec<Vec<u8>> = (first_seq..first_seq + n)
        .map(|seq| actidash_shared::testing::sale(tenant, "a1", seq, "10.00").to_json())
        .collect();
    Frame::Batch(Batch {
        source_id: "orders".into(),
        first_seq,
        count: n as u32,
        codec: Codec::Zstd,
        payload: batch::pack(events.iter().map(Vec::as_slice), Codec::Zstd).into(),
    })
}

fn encode(frames: &[Frame]) -> Vec<u8> {
    let mut out = BytesMut::new();
    for f in frames {
        f.encode(&mut out);
    }
    out.to_vec()
}

fn error_code(frames: &[Frame]) -> (ErrorCode, String) {
    match frames.last() {
        Some(Frame::Error(e)) => (e.code, e.message.clone()),
        other => panic!("expected an error frame, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_and_counted_while_good_agents_are_served() {
    let h = start().await;
    let a1 = enroll(&h, "a1", "acme");

    // An HTTP request on the QUIC port: a "frame" of 1.2 GB.
    let frames = exchange(&h, None, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
    assert!(message.contains("exceeds the limit"), "{message}");

    // Garbage within the size limit.
    let frames = exchange(&h, None, &[0, 0, 0, 3, 42, 1, 2], 1).await;
    assert_eq!(error_code(&frames), (ErrorCode::MalformedFrame, "unknown frame type 42".into()));

    // A client of another protocol version.
    let frames = exchange(&h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION + 1)]), 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(message.contains("speaks protocol 3"), "{message}");

    // Data before authentication; a hello without a certificate; a hello naming someone else.
    let frames = exchange(&h, Some(&a1), &encode(&[order_batch("acme", 0, 1)]), 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::Unauthenticated);
    let frames = exchange(&h, None, &encode(&[hello("a1", PROTOCOL_VERSION)]), 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("no client certificate"), "{message}");
    let frames = exchange(&h, Some(&a1), &encode(&[hello("a9", PROTOCOL_VERSION)]), 1).await;
    assert!(error_code(&frames).1.contains("certificate is for \"a1\""), "{frames:?}");

    // An authenticated agent writing for another tenant.
    let frames =
        exchange(&h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION), order_batch("globex", 0, 2)]), 2).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::InvalidBatch);
    assert!(message.contains("claims tenant \"globex\""), "{message}");

    // The good agent is served: welcome, then an ack per batch, in order.
    let frames = exchange(
        &h,
        Some(&a1),
        &encode(&[hello("a1", PROTOCOL_VERSION), order_batch("acme", 0, 3), order_batch("acme", 3, 2)]),
        3,
    )
    .await;
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.tenant == "acme" && w.max_in_flight == 4), "{frames:?}");
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 0 && a.count == 3), "{frames:?}");
    assert!(matches!(&frames[2], Frame::Ack(a) if a.first_seq == 3 && a.count == 2), "{frames:?}");
    let totals = Store::open_read_only(&h.store).unwrap().sales_totals(Some("acme")).unwrap();
    assert_eq!((totals[0].orders, totals[0].revenue.as_str()), (5, "50"));
    assert!(Store::open_read_only(&h.store).unwrap().sales_totals(Some("globex")).unwrap().is_empty());

    let m = &h.metrics;
    assert_eq!(m.bad_frames.load(Ordering::Relaxed), 2);
    assert_eq!(m.protocol_errors.load(Ordering::Relaxed), 2, "version and unauthenticated batch");
    assert_eq!(m.auth_failures.load(Ordering::Relaxed), 2);
    assert_eq!(m.invalid_batches.load(Ordering::Relaxed), 1);
    assert_eq!(m.foreign_tenant_batches.load(Ordering::Relaxed), 1);
    assert_eq!(m.events_acked.load(Ordering::Relaxed), 5);
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_expired_or_never_enrolled_are_refused() {
    let h = start().await;
    let a1 = enroll(&h, "a1", "acme");

    // Another CA (another fleet) signed it: the TLS handshake fails, on QUIC and on TCP.
    let other = start().await;
    let foreign = enroll(&other, "a1", "acme");
    let why = quic_refusal(&h, &foreign).await.expect("a certificate of another CA must not get a session");
    assert!(why.contains("handshake") || why.contains("certificate"), "{why}");
    let tcp = edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", tls(&h, Some(&foreign))).await;
    if let Ok(stream) = tcp {
        // TLS 1.3: the client may finish before the server's verdict; the session then dies.
        let (mut recv, mut send) = tokio::io::split(stream);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut send, &encode(&[hello("a1", PROTOCOL_VERSION)])).await;
        assert!(read_frames(&mut recv, 1).await.is_empty(), "no welcome for a foreign certificate");
    }

    // Expired, though signed by the right CA.
    let key = rcgen::KeyPair::generate().unwrap();
    let expired_pem = h.fleet.sign_unregistered(&key, "a1", "acme", now() - 60).unwrap();
    let expired = AgentId { key_pem: key.serialize_pem(), cert_pem: expired_pem };
    let why = quic_refusal(&h, &expired).await.expect("an expired certificate must not get a session");
    assert!(why.contains("handshake") || why.contains("certificate"), "{why}");

    // Valid and signed by the CA, but for an agent the registry never enrolled.
    let key = rcgen::KeyPair::generate().unwrap();
    let ghost_pem = h.fleet.sign_unregistered(&key, "ghost", "acme", now() + 3600).unwrap();
    let ghost = AgentId { key_pem: key.serialize_pem(), cert_pem: ghost_pem };
    let frames = exchange(&h, Some(&ghost), &encode(&[hello("ghost", PROTOCOL_VERSION)]), 1).await;
    assert_eq!(error_code(&frames), (ErrorCode::Unauthenticated, "agent \"ghost\" is not enrolled".into()));

    assert!(h.metrics.tls_failures.load(Ordering::Relaxed) >= 2, "handshake failures are counted");
    // The good agent is still served.
    let frames = exchange(&h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION), order_batch("acme", 0, 1)]), 2).await;
    assert!(matches!(&frames[1], Frame::Ack(_)), "{frames:?}");
    h.shutdown.cancel();
    other.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_over_the_wire_is_single_use_and_renewal_keeps_the_identity() {
    let h = start().await;
    let token = h.fleet.create_token("acme", Duration::from_secs(600), now()).unwrap();
    let enroll_frame = |token: &str| {
        let (key_pem, csr_pem) = edge_agent::identity::new_key_and_csr("a7").unwrap();
        let frame = Frame::Enroll(Enroll {
            protocol_version: PROTOCOL_VERSION,
            agent_id: "a7".into(),
            token: token.into(),
            csr_pem,
        });
        (key_pem, encode(&[frame]))
    };
    let (key_pem, bytes) = enroll_frame(&token);
    let frames = exchange_tcp(&h, None, &bytes, 1).await;
    let Some(Frame::Enrolled(enrolled)) = frames.first() else { panic!("{frames:?}") };
    assert_eq!((enrolled.agent_id.as_str(), enrolled.tenant.as_str()), ("a7", "acme"));
    let der = CertificateDer::from_pem_slice(enrolled.cert_pem.as_bytes()).unwrap();
    assert_eq!(identity_of(&der).unwrap(), ("a7".into(), "acme".into()));

    // Replayed, unknown and expired tokens.
    let frames = exchange_tcp(&h, None, &enroll_frame(&token).1, 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("already used"), "{message}");
    assert!(!message.contains(&token));
    let frames = exchange(&h, None, &enroll_frame("adt_forged").1, 1).await;
    assert!(error_code(&frames).1.contains("unknown enrollment token"), "{frames:?}");
    let stale = h.fleet.create_token("acme", Duration::from_secs(1), now() - 10).unwrap();
    let frames = exchange(&h, None, &enroll_frame(&stale).1, 1).await;
    assert!(error_code(&frames).1.contains("expired"), "{frames:?}");
    assert_eq!(h.metrics.enrollments.load(Ordering::Relaxed), 1);
    assert_eq!(h.metrics.enroll_failures.load(Ordering::Relaxed), 3);

    // The new certificate opens a session; a renewal over it names the same agent.
    let a7 = AgentId { key_pem, cert_pem: enrolled.cert_pem.clone() };
    let (_, csr_pem) = edge_agent::identity::new_key_and_csr("someone-else").unwrap();
    let frames =
        exchange(&h, Some(&a7), &encode(&[hello("a7", PROTOCOL_VERSION), Frame::Renew(Renew { csr_pem })]), 2).await;
    let Some(Frame::Renewed(renewed)) = frames.get(1) else { panic!("{frames:?}") };
    let der = CertificateDer::from_pem_slice(renewed.cert_pem.as_bytes()).unwrap();
    assert_eq!(identity_of(&der).unwrap(), ("a7".into(), "acme".into()), "the CA, not the CSR, names the agent");
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_closes_the_agent_out_of_every_gateway_within_a_heartbeat_interval() {
    let first = start().await;
    let second = start_on(first.dir.clone(), first.fleet.clone(), |_| {}).await;
    let a1 = enroll(&first, "a1", "acme");
    let mut sessions = Vec::new();
    for h in [&first, &second] {
        let (mut send, mut recv, conn, endpoint) = open_quic(h, Some(&a1)).await.unwrap();
        send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION)])).await.unwrap();
        assert!(matches!(read_frames(&mut recv, 1).await.first(), Some(Frame::Welcome(_))));
        sessions.push((send, recv, conn, endpoint));
    }
    assert!(first.fleet.revoke("a1", now()).unwrap());
    // Each gateway reloads the revoked set every half interval (500 ms here).
    for (_, recv, _, _) in &mut sessions {
        let frames = read_frames(recv, 1).await;
        let (code, message) = error_code(&frames);
        assert_eq!(code, ErrorCode::Unauthenticated);
        assert!(message.contains("was revoked"), "{message}");
    }
    for h in [&first, &second] {
        assert_eq!(h.metrics.revoked_disconnects.load(Ordering::Relaxed), 1);
        let frames = exchange(h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION)]), 1).await;
        assert_eq!(error_code(&frames), (ErrorCode::Unauthenticated, "agent \"a1\" is revoked".into()));
    }
    first.shutdown.cancel();
    second.shutdown.cancel();
}

/// A gateway on a host of its own (its own data folder and TLS certificate) whose fleet
/// registry is the PostgreSQL database at `url`.
async fn start_on_postgres(url: &str) -> Harness {
    let dir = Arc::new(tempfile::tempdir().unwrap());
    cloud_aggregator::certs::write_dev_certs(&dir.path().join("certs"), &["localhost".into()]).unwrap();
    let config = FleetConfig { registry_url: Some(url.to_owned()), ..FleetConfig::default() };
    let fleet = Arc::new(Fleet::open(dir.path(), &config).unwrap());
    start_on(dir, fleet, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_on_several_hosts_share_enrollment_and_revocation_through_postgres() {
    let Some(admin) = actidash_tests::postgres_admin("gateways on a postgres registry") else { return };
    // The synchronous client, off the test's runtime.
    let url = std::thread::spawn(move || {
        actidash_tests::fresh_postgres_database(&admin, "actidash_gateway_registry_test").unwrap()
    })
    .join()
    .unwrap();
    let first = start_on_postgres(&url).await;
    let second = start_on_postgres(&url).await;
    assert_eq!(first.fleet.ca_pem(), second.fleet.ca_pem(), "one fleet CA, kept in the registry");

    // Enrolled over the wire at the first gateway, with a token made on the second host.
    let token = second.fleet.create_token("acme", Duration::from_secs(600), now()).unwrap();
    let (key_pem, csr_pem) = edge_agent::identity::new_key_and_csr("a1").unwrap();
    let enroll = Frame::Enroll(Enroll { protocol_version: PROTOCOL_VERSION, agent_id: "a1".into(), token, csr_pem });
    let frames = exchange_tcp(&first, None, &encode(std::slice::from_ref(&enroll)), 1).await;
    let Some(Frame::Enrolled(enrolled)) = frames.first() else { panic!("{frames:?}") };
    // The token is spent for every gateway.
    let frames = exchange_tcp(&second, None, &encode(&[enroll]), 1).await;
    assert!(error_code(&frames).1.contains("already used"), "{frames:?}");

    // Served by both.
    let a1 = AgentId { key_pem, cert_pem: enrolled.cert_pem.clone() };
    let mut sessions = Vec::new();
    for h in [&first, &second] {
        let (mut send, mut recv, conn, endpoint) = open_quic(h, Some(&a1)).await.unwrap();
        send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION), order_batch("acme", 0, 3)])).await.unwrap();
        let frames = read_frames(&mut recv, 2).await;
        assert!(matches!(&frames[1], Frame::Ack(a) if a.count == 3), "{frames:?}");
        sessions.push((send, recv, conn, endpoint));
    }

    // Revoked from a third host (the command line): both gateways close the agent out within
    // a heartbeat interval (they reload the revoked set every half interval, 500 ms here).
    let cli_host = tempfile::tempdir().unwrap();
    let cli = Fleet::open(cli_host.path(), &FleetConfig { registry_url: Some(url), ..FleetConfig::default() }).unwrap();
    let revoked_at = std::time::Instant::now();
    assert!(cli.revoke("a1", now()).unwrap());
    for (_, recv, _, _) in &mut sessions {
        let frames = read_frames(recv, 1).await;
        let (code, message) = error_code(&frames);
        assert_eq!(code, ErrorCode::Unauthenticated);
        assert!(message.contains("was revoked"), "{message}");
    }
    eprintln!("both gateways closed the revoked agent out {:?} after the revocation", revoked_at.elapsed());
    for h in [&first, &second] {
        let frames = exchange(h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION)]), 1).await;
        assert_eq!(error_code(&frames), (ErrorCode::Unauthenticated, "agent \"a1\" is revoked".into()));
    }
    first.shutdown.cancel();
    second.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_limits_on_connections_batch_size_and_rate() {
    let h = start_with(|c| {
        c.max_connections_per_agent = 1;
        c.max_events_per_sec_per_agent = 100;
        c.max_batch_events = 60;
    })
    .await;
    let a1 = enroll(&h, "a1", "acme");
    let (mut send, mut recv, _conn, _endpoint) = open_quic(&h, Some(&a1)).await.unwrap();
    send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION)])).await.unwrap();
    assert!(matches!(read_frames(&mut recv, 1).await.first(), Some(Frame::Welcome(w)) if w.max_batch_events == 60));

    // A second connection of the same agent is one too many.
    let frames = exchange(&h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION)]), 1).await;
    assert!(error_code(&frames).1.contains("too many connections"), "{frames:?}");

    // Over the rate (100 events/s, a second of burst): batches are read more slowly, never lost.
    send.write_all(&encode(&[order_batch("acme", 0, 60), order_batch("acme", 60, 60), order_batch("acme", 120, 60)]))
        .await
        .unwrap();
    let frames = read_frames(&mut recv, 3).await;
    assert_eq!(frames.iter().filter(|f| matches!(f, Frame::Ack(_))).count(), 3, "{frames:?}");
    assert!(h.metrics.rate_limited.load(Ordering::Relaxed) >= 1);

    // A batch over the size limit closes the session with a clear error.
    send.write_all(&encode(&[order_batch("acme", 180, 61)])).await.unwrap();
    let frames = read_frames(&mut recv, 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::InvalidBatch);
    assert!(message.contains("batch of 61 events exceeds 60"), "{message}");
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_fallback_speaks_the_same_protocol_with_the_same_checks() {
    let h = start().await;
    let a1 = enroll(&h, "a1", "acme");
    let frames =
        exchange_tcp(&h, Some(&a1), &encode(&[hello("a1", PROTOCOL_VERSION), order_batch("acme", 0, 3)]), 2).await;
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.tenant == "acme"), "{frames:?}");
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 0 && a.count == 3), "{frames:?}");
    let frames = exchange_tcp(&h, None, b"GET / HTTP/1.1\r\n\r\n", 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::FrameTooLarge);
    let frames = exchange_tcp(&h, None, &encode(&[hello("a1", PROTOCOL_VERSION)]), 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::Unauthenticated);
    // A plain-text client gets no protocol at all: the TLS handshake fails.
    let mut plain = tokio::net::TcpStream::connect(h.tcp_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, &encode(&[hello("a1", PROTOCOL_VERSION)])).await.unwrap();
    let mut buf = Vec::new();
    let _ =
        tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut buf)).await.expect("the gateway hangs up");
    assert!(buf.windows(7).all(|w| w != b"welcome"), "no welcome in plain text: {buf:?}");
    assert_eq!(h.metrics.events_acked.load(Ordering::Relaxed), 3);
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_session_survives_the_agent_changing_address() {
    let h = start().await;
    let a1 = enroll(&h, "a1", "acme");
    let (mut send, mut recv, _conn, endpoint) = open_quic(&h, Some(&a1)).await.unwrap();
    send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION), order_batch("acme", 0, 2)])).await.unwrap();
    let frames = read_frames(&mut recv, 2).await;
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 0), "{frames:?}");
    let before = endpoint.local_addr().unwrap();
    endpoint.rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap()).unwrap();
    assert_ne!(endpoint.local_addr().unwrap(), before);
    send.write_all(&encode(&[order_batch("acme", 2, 2)])).await.unwrap();
    let frames = read_frames(&mut recv, 1).await;
    assert!(matches!(&frames[0], Frame::Ack(a) if a.first_seq == 2 && a.count == 2), "{frames:?}");
    assert_eq!(h.metrics.connections_accepted.load(Ordering::Relaxed), 1, "the same connection carried on");
    h.shutdown.cancel();
}

/// Before authentication a connection gets little: a client that says nothing is closed once
/// `hello_timeout_ms` has passed, and a frame over 64 KiB (a 100 KiB enrollment here) is refused
/// before it is buffered whole — so certificate-less clients cannot hold the connection slots
/// or the gateway's memory.
#[tokio::test(flavor = "multi_thread")]
async fn silent_or_oversized_clients_before_authentication_are_closed() {
    let h = start_with(|c| c.hello_timeout_ms = 300).await;
    let started = std::time::Instant::now();
    let frames = exchange_tcp(&h, None, &[], 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::Unauthenticated, "{message}");
    assert!(message.contains("no hello or enrollment within"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(5));

    let enroll = Frame::Enroll(actidash_shared::wire::Enroll {
        protocol_version: actidash_shared::wire::PROTOCOL_VERSION,
        agent_id: "big".into(),
        token: "adt_x".into(),
        csr_pem: "A".repeat(100 * 1024),
    });
    let frames = exchange_tcp(&h, None, &encode(&[enroll]), 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
}

/// A session ends with its certificate: a batch is not taken on a certificate past its end
/// (the agent renews it over the session before, or reconnects with the new one).
#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_closed_when_its_certificate_expires() {
    let h = start().await;
    let _enrolled = enroll(&h, "a1", "acme");
    for transport in ["quic", "tcp"] {
        // A certificate of the enrolled agent that ends in 3 seconds.
        let key = rcgen::KeyPair::generate().unwrap();
        let short = h.fleet.sign_unregistered(&key, "a1", "acme", now() + 3).unwrap();
        let a1 = AgentId { key_pem: key.serialize_pem(), cert_pem: short };
        let bytes = encode(&[hello("a1", PROTOCOL_VERSION)]);
        let frames = if transport == "quic" {
            exchange(&h, Some(&a1), &bytes, 2).await
        } else {
            exchange_tcp(&h, Some(&a1), &bytes, 2).await
        };
        assert!(matches!(frames.first(), Some(Frame::Welcome(_))), "{transport}: {frames:?}");
        let (code, message) = error_code(&frames[1..]);
        assert_eq!(code, ErrorCode::Unauthenticated, "{transport}: {message}");
        assert!(message.contains("certificate expired"), "{transport}: {message}");
    }
}

/// TLS over TCP without the agreed protocol (ALPN) is refused, as QUIC refuses it.
#[tokio::test(flavor = "multi_thread")]
async fn tls_over_tcp_without_the_protocol_is_refused() {
    let h = start().await;
    let a1 = enroll(&h, "a1", "acme");
    let mut config = (*tls(&h, Some(&a1))).clone();
    config.alpn_protocols.clear();
    let before = h.metrics.tls_failures.load(Ordering::Relaxed);
    if let Ok(stream) = edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", Arc::new(config)).await {
        let (mut recv, mut send) = tokio::io::split(stream);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut send, &encode(&[hello("a1", PROTOCOL_VERSION)])).await;
        assert!(read_frames(&mut recv, 1).await.is_empty(), "no welcome without the protocol");
    }
    assert_eq!(h.metrics.tls_failures.load(Ordering::Relaxed), before + 1);
}

/// An enrolled agent cannot make the gateway work or store far more than it sends (issue 17,
/// medium 3): a 2 KB batch that would decompress to 60 MiB is refused from its frame header;
/// an event over the deliverable size is refused alone; a heartbeat flood is answered but
/// stored once per interval; a second renewal within a minute is refused. A refusal-taking
/// agent's source goes on after each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_agent_cannot_amplify_what_it_sends() {
    let h = start_with(|c| c.heartbeat_interval_ms = 60_000).await;
    let a1 = enroll(&h, "a1", "acme");
    let (mut send, mut recv, _conn, _endpoint) = open_quic(&h, Some(&a1)).await.unwrap();
    let hello = Frame::Hello(Hello {
        protocol_version: PROTOCOL_VERSION,
        agent_id: "a1".into(),
        agent_version: "test".into(),
        refusals: true,
        config: None,
    });
    send.write_all(&encode(&[hello])).await.unwrap();
    let Some(Frame::Welcome(welcome)) = read_frames(&mut recv, 1).await.pop() else { panic!("no welcome") };
    let max_event = welcome.max_event_bytes.expect("the gateway states its event limit") as usize;

    // One event with a 60 MiB field: about 2 KB compressed.
    let sale = |seq| actidash_shared::testing::sale("acme", "a1", seq, "10.00").to_json();
    let mut bomb_line = sale(0);
    bomb_line.truncate(bomb_line.len() - 1);
    bomb_line.extend_from_slice(format!(",\"pad\":\"{}\"}}", "x".repeat(60 << 20)).as_bytes());
    let payload = batch::pack([bomb_line.as_slice()], Codec::Zstd);
    assert!(payload.len() < 8 * 1024, "{} bytes", payload.len());
    let bomb = Frame::Batch(Batch {
        source_id: "orders".into(),
        first_seq: 0,
        count: 1,
        codec: Codec::Zstd,
        payload: payload.into(),
    });
    send.write_all(&encode(&[bomb])).await.unwrap();
    let frames = read_frames(&mut recv, 2).await;
    let Some(Frame::Refused(refused)) = frames.first() else { panic!("{frames:?}") };
    let whole = refused.whole.as_ref().expect("refused whole");
    assert_eq!(whole.kind, batch::RefusalKind::InvalidBatch);
    assert!(whole.reason.contains(&format!("its frames announce {} bytes", bomb_line.len() + 1)), "{}", whole.reason);
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 0 && a.count == 1), "{frames:?}");

    // An event just over the deliverable size, between two good ones: refused alone.
    let big = format!("{{\"seq\":2,\"pad\":\"{}\"}}", "x".repeat(max_event));
    let lines = [sale(1), big.into_bytes(), sale(3)];
    let payload = batch::pack(lines.iter().map(Vec::as_slice), Codec::Zstd);
    let frame = Frame::Batch(Batch {
        source_id: "orders".into(),
        first_seq: 1,
        count: 3,
        codec: Codec::Zstd,
        payload: payload.into(),
    });
    send.write_all(&encode(&[frame])).await.unwrap();
    let frames = read_frames(&mut recv, 2).await;
    let Some(Frame::Refused(refused)) = frames.first() else { panic!("{frames:?}") };
    assert_eq!(refused.events.len(), 1, "{refused:?}");
    assert_eq!((refused.events[0].index, refused.events[0].seq), (1, Some(2)));
    assert_eq!(refused.events[0].kind, batch::RefusalKind::TooLarge);
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 1 && a.count == 3), "{frames:?}");
    let totals = Store::open_read_only(&h.store).unwrap().sales_totals(Some("acme")).unwrap();
    assert_eq!(totals[0].orders, 2, "the good events of the batch are taken");

    // A heartbeat flood, then a batch (answered after them, in order).
    let heartbeat = Frame::Heartbeat(actidash_shared::wire::Heartbeat::default());
    let mut flood: Vec<Frame> = std::iter::repeat_n(heartbeat, 500).collect();
    flood.push(order_batch("acme", 4, 1));
    send.write_all(&encode(&flood)).await.unwrap();
    let frames = read_frames(&mut recv, 1).await;
    assert!(matches!(frames.first(), Some(Frame::Ack(a)) if a.first_seq == 4), "{frames:?}");
    assert_eq!(h.metrics.heartbeats_dropped.load(Ordering::Relaxed), 499, "one stored per interval");

    // One renewal, then another at once: refused.
    let renew = || Frame::Renew(Renew { csr_pem: edge_agent::identity::new_key_and_csr("a1").unwrap().1 });
    send.write_all(&encode(&[renew()])).await.unwrap();
    assert!(matches!(read_frames(&mut recv, 1).await.first(), Some(Frame::Renewed(_))));
    send.write_all(&encode(&[renew()])).await.unwrap();
    let frames = read_frames(&mut recv, 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::Unauthenticated);
    assert!(message.contains("renewal refused: this agent renewed its certificate less than 60 s ago"), "{message}");
    assert_eq!(h.metrics.renewals_refused.load(Ordering::Relaxed), 1);
    assert_eq!(h.metrics.refused_events.load(Ordering::Relaxed), 2);
    h.shutdown.cancel();
}

/// Clients without credentials have a budget per address (issue 17, high 1 and low 7): at most
/// `max_unauthenticated_per_address` connections open before authenticating, and a few
/// enrollment attempts a minute; under load QUIC clients prove their address first (Retry),
/// which a real agent passes without noticing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_credentials_have_a_budget_per_address() {
    let h = start_with(|c| {
        c.max_unauthenticated_per_address = 2;
        c.enrollments_per_min_per_address = 2;
        c.hello_timeout_ms = 2_000;
        c.quic_retry_above = 0;
    })
    .await;
    let a1 = enroll(&h, "a1", "acme");

    // Two silent TLS sessions hold this address's budget; a third connection is refused.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", tls(&h, None)).await.unwrap());
    }
    let third = edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", tls(&h, None)).await;
    if let Ok(stream) = third {
        let (mut recv, _send) = tokio::io::split(stream);
        assert!(read_frames(&mut recv, 1).await.is_empty(), "refused: nothing is answered");
    }
    assert!(h.metrics.unauthenticated_refused.load(Ordering::Relaxed) >= 1);
    // Once they are gone (closed here; the hello deadline would close them too), it is free.
    drop(silent);
    let welcomed = async {
        loop {
            // Refused (Err) until the gateway has seen the silent sessions end.
            if let Ok((mut send, mut recv, _conn, _endpoint)) = open_quic(&h, Some(&a1)).await
                && send.write_all(&encode(&[hello("a1", PROTOCOL_VERSION)])).await.is_ok()
                && matches!(read_frames(&mut recv, 1).await.first(), Some(Frame::Welcome(_)))
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), welcomed).await.expect("an agent gets in once the slots are free");
    assert!(h.metrics.quic_retries.load(Ordering::Relaxed) >= 1, "the agent passed a Retry");

    // Two enrollment attempts a minute from this address; the third is refused before the
    // registry is asked.
    let attempt = || {
        let (_, csr_pem) = edge_agent::identity::new_key_and_csr("a9").unwrap();
        let frame = Frame::Enroll(Enroll {
            protocol_version: PROTOCOL_VERSION,
            agent_id: "a9".into(),
            token: "adt_x".into(),
            csr_pem,
        });
        encode(&[frame])
    };
    // (Each exchange reads until the gateway ends the session, which gives its slot back.)
    for _ in 0..2 {
        let frames = exchange_tcp(&h, None, &attempt(), 2).await;
        assert!(error_code(&frames).1.contains("unknown enrollment token"), "{frames:?}");
    }
    let frames = exchange_tcp(&h, None, &attempt(), 2).await;
    assert!(error_code(&frames).1.contains("too many enrollment attempts from this address"), "{frames:?}");
    assert_eq!(h.metrics.enrollments_throttled.load(Ordering::Relaxed), 1);
    h.shutdown.cancel();
}

/// OpenSSL's client handshaking with `addr` in TLS `version` (`-tls1_3`, `-tls1_2`): whether
/// it succeeded, and what it said.
fn openssl_handshake(addr: std::net::SocketAddr, version: &str) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string(), version, "-alpn", "actidash/2", "-brief"])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl (installed by scripts/db.sh) runs");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr))
}

/// TLS 1.3 only (issue 17, "keep it so"): OpenSSL's client gets a handshake with TLS 1.3 and
/// none with TLS 1.2, on the TCP fallback (QUIC is TLS 1.3 by definition).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_below_1_3_is_refused() {
    let h = start().await;
    let addr = h.tcp_addr;
    let (_, said) = tokio::task::spawn_blocking(move || openssl_handshake(addr, "-tls1_3")).await.unwrap();
    assert!(said.contains("Protocol version: TLSv1.3"), "{said}");
    let (ok, said) = tokio::task::spawn_blocking(move || openssl_handshake(addr, "-tls1_2")).await.unwrap();
    assert!(!ok && !said.contains("Protocol version: TLSv1.2"), "{said}");
    h.shutdown.cancel();
}
