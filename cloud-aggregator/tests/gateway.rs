//! The gateway over real QUIC on 127.0.0.1, with the embedded processor behind it: bad input
//! of every kind gets an error frame naming the problem and is counted, and good agents keep
//! being served.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use actidash_shared::batch;
use actidash_shared::wire::{Batch, Codec, ErrorCode, Frame, Hello, PROTOCOL_VERSION};
use bytes::BytesMut;
use cloud_aggregator::config::{AgentEntry, GatewayConfig};
use cloud_aggregator::gateway::Gateway;
use cloud_aggregator::gateway::auth::credential_sha256;
use cloud_aggregator::gateway::sink::Sink;
use cloud_aggregator::store::Store;
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;

struct Harness {
    addr: SocketAddr,
    tcp_addr: SocketAddr,
    ca: std::path::PathBuf,
    store: std::path::PathBuf,
    metrics: std::sync::Arc<cloud_aggregator::gateway::GatewayMetrics>,
    _dir: tempfile::TempDir,
    shutdown: CancellationToken,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    cloud_aggregator::certs::write_dev_certs(&dir.path().join("certs"), &["localhost".into()]).unwrap();
    let config = GatewayConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        listen_tcp: Some("127.0.0.1:0".parse().unwrap()),
        tcp_fallback: true,
        cert_file: dir.path().join("certs/gateway.pem"),
        key_file: dir.path().join("certs/gateway.key"),
        max_connections: 16,
        max_in_flight: 4,
        heartbeat_interval_ms: 1000,
        agents: vec![AgentEntry {
            id: "a1".into(),
            tenant: "acme".into(),
            credential_sha256: credential_sha256("secret"),
        }],
    };
    let store = dir.path().join("serving.db");
    let (tx, _thread) = cloud_aggregator::process::embedded::spawn(&store, 16).unwrap();
    let shutdown = CancellationToken::new();
    let gateway = Gateway::bind(&config, Sink::Embedded(tx), shutdown.clone()).unwrap();
    let addr = gateway.local_addr().unwrap();
    let tcp_addr = gateway.local_tcp_addr().unwrap();
    let metrics = gateway.metrics.clone();
    tokio::spawn(gateway.run());
    Harness { addr, tcp_addr, ca: dir.path().join("certs/ca.pem"), store, metrics, _dir: dir, shutdown }
}

/// Opens a connection and a stream, sends `bytes`, and returns the frames received until the
/// gateway closes the stream or `n_frames` arrived.
async fn exchange(h: &Harness, bytes: &[u8], n_frames: usize) -> Vec<Frame> {
    let endpoint = edge_agent::transport::quic::client_endpoint(&h.ca, h.addr).unwrap();
    let conn = endpoint.connect(h.addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    read_frames(&mut recv, n_frames).await
}

/// The same over the TLS-on-TCP fallback.
async fn exchange_tcp(h: &Harness, bytes: &[u8], n_frames: usize) -> Vec<Frame> {
    let tls = edge_agent::transport::quic::client_tls_config(&h.ca).unwrap();
    let stream = edge_agent::transport::quic::connect_tcp(h.tcp_addr, "localhost", tls).await.unwrap();
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

fn hello(agent: &str, credential: &str, version: u16) -> Frame {
    Frame::Hello(Hello {
        protocol_version: version,
        agent_id: agent.into(),
        agent_version: "test".into(),
        credential: credential.into(),
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

    // An HTTP request on the QUIC port: a "frame" of 1.2 GB.
    let frames = exchange(&h, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::FrameTooLarge, "{message}");
    assert!(message.contains("exceeds the limit"), "{message}");

    // Garbage within the size limit.
    let frames = exchange(&h, &[0, 0, 0, 3, 42, 1, 2], 1).await;
    assert_eq!(error_code(&frames), (ErrorCode::MalformedFrame, "unknown frame type 42".into()));

    // A client of another protocol version.
    let frames = exchange(&h, &encode(&[hello("a1", "secret", PROTOCOL_VERSION + 1)]), 1).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::UnsupportedVersion);
    assert!(message.contains("speaks protocol 2"), "{message}");

    // Data before authentication, unknown agents, wrong credentials.
    let frames = exchange(&h, &encode(&[order_batch("acme", 0, 1)]), 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::Unauthenticated);
    let frames = exchange(&h, &encode(&[hello("a9", "secret", PROTOCOL_VERSION)]), 1).await;
    assert_eq!(error_code(&frames), (ErrorCode::Unauthenticated, "unknown agent \"a9\"".into()));
    let frames = exchange(&h, &encode(&[hello("a1", "guess", PROTOCOL_VERSION)]), 1).await;
    assert_eq!(error_code(&frames), (ErrorCode::Unauthenticated, "wrong credential for agent \"a1\"".into()));

    // An authenticated agent writing for another tenant.
    let frames =
        exchange(&h, &encode(&[hello("a1", "secret", PROTOCOL_VERSION), order_batch("globex", 0, 2)]), 2).await;
    let (code, message) = error_code(&frames);
    assert_eq!(code, ErrorCode::InvalidBatch);
    assert!(message.contains("claims tenant \"globex\""), "{message}");

    // The good agent is served: welcome, then an ack per batch, in order.
    let frames = exchange(
        &h,
        &encode(&[hello("a1", "secret", PROTOCOL_VERSION), order_batch("acme", 0, 3), order_batch("acme", 3, 2)]),
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
    assert_eq!(m.events_acked.load(Ordering::Relaxed), 5);
    h.shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tcp_fallback_speaks_the_same_protocol_with_the_same_checks() {
    let h = start().await;
    let frames =
        exchange_tcp(&h, &encode(&[hello("a1", "secret", PROTOCOL_VERSION), order_batch("acme", 0, 3)]), 2).await;
    assert!(matches!(&frames[0], Frame::Welcome(w) if w.tenant == "acme"), "{frames:?}");
    assert!(matches!(&frames[1], Frame::Ack(a) if a.first_seq == 0 && a.count == 3), "{frames:?}");
    let frames = exchange_tcp(&h, b"GET / HTTP/1.1\r\n\r\n", 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::FrameTooLarge);
    let frames = exchange_tcp(&h, &encode(&[hello("a1", "nope", PROTOCOL_VERSION)]), 1).await;
    assert_eq!(error_code(&frames).0, ErrorCode::Unauthenticated);
    // A plain-text client gets no protocol at all: the TLS handshake fails.
    let mut plain = tokio::net::TcpStream::connect(h.tcp_addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut plain, &encode(&[hello("a1", "secret", PROTOCOL_VERSION)])).await.unwrap();
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
    let endpoint = edge_agent::transport::quic::client_endpoint(&h.ca, h.addr).unwrap();
    let conn = endpoint.connect(h.addr, "localhost").unwrap().await.unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&encode(&[hello("a1", "secret", PROTOCOL_VERSION), order_batch("acme", 0, 2)])).await.unwrap();
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
