//! The shipper: reads spooled events, sends them in batches, deletes them once acknowledged.
//!
//! One connection at a time, one bidirectional stream on it: QUIC, or TLS over TCP when QUIC
//! cannot reach the gateway (UDP blocked) — then QUIC is tried again every few minutes. The shipper is the I/O driver of
//! [`ClientSession`]; the session decides what may be sent (window, heartbeats) and checks what
//! comes back. After any disconnection the shipper reconnects with exponential backoff and
//! jitter, and starts again from the oldest spooled event of each source: the cloud drops the
//! duplicates this may cause, so nothing is lost and nothing counts twice.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actidash_shared::batch::{self, RefusalKind};
use actidash_shared::session::{ClientEvent, ClientSession};
use actidash_shared::wire::{
    Batch, Codec, DEFAULT_MAX_FRAME_LEN, Frame, Heartbeat, Hello, PROTOCOL_VERSION, Refused, SourceStatus,
};
use anyhow::Context as _;
use bytes::BytesMut;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::TransportMode;
use crate::sources::SharedStatus;
use crate::spool::Spool;
use crate::telemetry;

/// What the shipper needs to know.
#[derive(Debug, Clone)]
pub struct ShipperSettings {
    pub agent_id: String,
    pub address: String,
    pub server_name: String,
    pub ca_file: std::path::PathBuf,
    /// The agent's key and certificate (renewed in place).
    pub identity: crate::identity::IdentityStore,
    pub max_batch_events: u32,
    pub max_batch_bytes: u32,
    pub max_backoff: Duration,
    pub transport: TransportMode,
    /// `[spool] max_bytes`, reported in heartbeats.
    pub spool_max_bytes: u64,
}

/// The shipping task.
#[derive(Debug)]
pub struct Shipper {
    pub settings: ShipperSettings,
    pub spool: Spool,
    pub source_ids: Vec<String>,
    /// The seq after each running source's last spooled event (sources no longer configured
    /// have none: their events are read until none is left).
    pub heads: HashMap<String, crate::sources::SpoolHead>,
    pub statuses: Vec<SharedStatus>,
    /// Woken by sources after they spooled something.
    pub spooled: Arc<Notify>,
    pub shutdown: CancellationToken,
    pub started: Instant,
    /// Reused from batch to batch.
    pub packer: batch::Packer,
    /// Deletes acknowledged events off the sending path.
    pub acker: Acker,
    /// The largest event the gateway can deliver, from its Welcome (read by the sources too).
    pub event_limit: crate::sources::EventLimit,
    /// Why events are held rather than sent (the gateway cannot read their schema version).
    pub holding: Option<String>,
    /// Times without the cloud, reported once it is back.
    pub outages: Outages,
    /// The link's state for `edge-agent status`.
    pub link: Arc<crate::status::Link>,
    /// Central configuration: what the agent runs (in hellos and heartbeats), pushes out.
    pub control: crate::central::Control,
}

/// The agent's times without the cloud: it is "cut off" from its first failed attempt until a
/// session is up again, and reports that window (and what it spooled meanwhile) in the
/// heartbeats after, so that the fleet shows an outage rather than an unexplained silence.
#[derive(Debug, Default)]
pub struct Outages {
    /// Since when (Unix ms) and the events spooled in all at that moment (if they could be
    /// counted), while down.
    down: Option<(i64, Option<u64>)>,
    /// Whether an attempt failed since `down` began (a first connection that works at once is
    /// no outage).
    failed: bool,
    last: Option<actidash_shared::wire::Outage>,
}

impl Outages {
    /// The cloud is out of reach from now (unless it already was).
    fn lost(&mut self, now_ms: i64, spooled: Option<u64>) {
        self.down.get_or_insert((now_ms, spooled));
    }

    fn failed(&mut self) {
        self.failed = true;
    }

    /// A session is up: the outage, if there was one, ends.
    fn reached(&mut self, now_ms: i64, spooled: Option<u64>) {
        if let Some((from_ms, at_start)) = self.down.take()
            && std::mem::take(&mut self.failed)
        {
            // Uncountable at either end: reported as none buffered rather than as a guess.
            let buffered_events = spooled.zip(at_start).map_or(0, |(now, then)| now.saturating_sub(then));
            self.last = Some(actidash_shared::wire::Outage { from_ms, to_ms: now_ms, buffered_events });
        }
        self.failed = false;
    }
}

/// How long a session with a gateway that cannot read this agent's events is kept before
/// looking for another (a rolling upgrade behind a load balancer brings one).
const HOLD_RECHECK: Duration = Duration::from_secs(30);

/// Deletes acknowledged events from the spool on a thread of its own, grouping what arrives
/// together into one transaction. Sending never waits for the spool's write lock (held by a
/// source committing thousands of records), and the window frees as soon as an ack arrives. If
/// the agent stops before a deletion, the events are simply sent again and the cloud drops them
/// as duplicates.
#[derive(Debug)]
pub struct Acker {
    tx: Option<std::sync::mpsc::SyncSender<(String, u64, u32)>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Acker {
    pub fn spawn(mut spool: Spool) -> anyhow::Result<Acker> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<(String, u64, u32)>(4_096);
        let thread = std::thread::Builder::new()
            .name("spool-acker".into())
            .spawn(move || {
                loop {
                    let first = match rx.recv_timeout(crate::quiet::Quiet::AFTER) {
                        Ok(first) => first,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                            spool.settle(false);
                            continue;
                        }
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    };
                    let mut spans = vec![first];
                    spans.extend(rx.try_iter().take(1_023));
                    let mut delay = Duration::from_millis(50);
                    while let Err(e) = spool.ack_many(&spans) {
                        warn!(error = %e, "cannot delete acknowledged events yet; retrying");
                        std::thread::sleep(delay);
                        delay = (delay * 2).min(Duration::from_secs(2));
                    }
                    spool.settle(true);
                }
            })
            .context("spawning the spool acker")?;
        Ok(Acker { tx: Some(tx), thread: Some(thread) })
    }

    fn acknowledged(&self, source_id: String, first_seq: u64, count: u32) -> anyhow::Result<()> {
        let tx = self.tx.as_ref().context("acker stopped")?;
        // Bounded: if deletions fall far behind, shipping waits for them (only then does this
        // block the runtime's thread; handing it over for every ack cost more task switches
        // than the deletions themselves).
        match tx.try_send((source_id, first_seq, count)) {
            Ok(()) => Ok(()),
            Err(std::sync::mpsc::TrySendError::Full(span)) => {
                tokio::task::block_in_place(|| tx.send(span)).context("the spool acker stopped")
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => anyhow::bail!("the spool acker stopped"),
        }
    }

    /// Finishes the pending deletions.
    fn stop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a QUIC handshake may take before the TCP fallback is tried.
const QUIC_CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// After falling back to TCP, how long before QUIC is tried again.
const QUIC_RETRY_AFTER: Duration = Duration::from_secs(300);

/// The agent's version, reported in hellos and heartbeats.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

impl Shipper {
    /// Runs until shutdown, reconnecting as needed.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let remote = resolve(&self.settings.address).await?;
        // Fails early, with a clear message, on an agent that was never enrolled.
        crate::identity::client_tls(&self.settings.ca_file, Some(&self.settings.identity.load()?))?;
        let endpoint =
            super::quic::client_endpoint_with(super::quic::client_tls_config(&self.settings.ca_file)?, remote)?;
        let mut n_failures: u32 = 0;
        let mut quic_blocked_until: Option<Instant> = None;
        // Down until a first session is up: an agent that starts without the cloud is cut off.
        let spooled = self.spooled_in_all();
        self.outages.lost(chrono::Utc::now().timestamp_millis(), spooled);
        while !self.shutdown.is_cancelled() {
            let connected_at = Instant::now();
            match self.session(&endpoint, remote, &mut quic_blocked_until).await {
                Ok(()) => break,
                Err(e) => {
                    metrics::gauge!(telemetry::CONNECTED).set(0.0);
                    metrics::counter!(telemetry::CONNECTION_FAILURES).increment(1);
                    self.link.disconnected();
                    let spooled = self.spooled_in_all();
                    self.outages.lost(chrono::Utc::now().timestamp_millis(), spooled);
                    self.outages.failed();
                    // A session that lived a while was healthy: start the backoff over.
                    if connected_at.elapsed() > Duration::from_secs(10) {
                        n_failures = 0;
                    }
                    let delay = backoff(n_failures, self.settings.max_backoff);
                    n_failures = n_failures.saturating_add(1);
                    warn!(gateway = %remote, error = format!("{e:#}"), retry_in_ms = delay.as_millis() as u64, "shipping interrupted");
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.cancelled() => break,
                    }
                }
            }
        }
        endpoint.close(0u32.into(), b"agent shutting down");
        let _ = tokio::time::timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
        tokio::task::block_in_place(|| self.acker.stop());
        info!("shipper stopped");
        Ok(())
    }

    /// One connection: returns Ok on shutdown, Err when the connection ended otherwise.
    async fn session(
        &mut self,
        endpoint: &quinn::Endpoint,
        remote: SocketAddr,
        quic_blocked_until: &mut Option<Instant>,
    ) -> anyhow::Result<()> {
        // Loaded at every connection: a renewed certificate is used from the next one on.
        let identity = tokio::task::block_in_place(|| self.settings.identity.load())?;
        let tls = &crate::identity::client_tls(&self.settings.ca_file, Some(&identity))?;
        let try_quic = match self.settings.transport {
            TransportMode::Quic => true,
            TransportMode::Tcp => false,
            TransportMode::Auto => quic_blocked_until.is_none_or(|until| Instant::now() >= until),
        };
        let mut quic_error = None;
        if try_quic {
            let connect = async {
                let config = super::quic::quic_client_config(tls.clone())?;
                let conn = endpoint.connect_with(config, remote, &self.settings.server_name)?.await?;
                let (send, recv) = conn.open_bi().await?;
                anyhow::Ok((conn, send, recv))
            };
            let attempt = tokio::select! {
                a = tokio::time::timeout(QUIC_CONNECT_TIMEOUT, connect) => a,
                () = self.shutdown.cancelled() => return Ok(()),
            };
            match attempt {
                Ok(Ok((conn, send, recv))) => {
                    *quic_blocked_until = None;
                    let result = self.drive(recv, send, remote, "quic", &identity).await;
                    conn.close(0u32.into(), b"agent closing");
                    return result;
                }
                Ok(Err(e)) => quic_error = Some(format!("{e:#}")),
                Err(_) => quic_error = Some(format!("no answer within {QUIC_CONNECT_TIMEOUT:?}")),
            }
            if self.settings.transport == TransportMode::Quic {
                anyhow::bail!("QUIC: {}", quic_error.unwrap_or_default());
            }
        }
        let stream = tokio::select! {
            s = super::quic::connect_tcp(remote, &self.settings.server_name, tls.clone()) => s,
            () = self.shutdown.cancelled() => return Ok(()),
        };
        let stream = stream.with_context(|| match &quic_error {
            Some(q) => format!("QUIC failed ({q}), and the TCP fallback too"),
            None => "the TCP fallback".to_owned(),
        })?;
        if let Some(q) = quic_error {
            warn!(gateway = %remote, quic_error = %q, retry_quic_in_s = QUIC_RETRY_AFTER.as_secs(), "QUIC unreachable (UDP blocked?): using the TCP fallback");
            *quic_blocked_until = Some(Instant::now() + QUIC_RETRY_AFTER);
        }
        let (recv, send) = tokio::io::split(stream);
        self.drive(recv, send, remote, "tcp", &identity).await
    }

    /// Drives the protocol over one byte stream.
    async fn drive<R, W>(
        &mut self,
        mut recv: R,
        mut send: W,
        remote: SocketAddr,
        transport: &'static str,
        identity: &crate::identity::Identity,
    ) -> anyhow::Result<()>
    where
        R: tokio::io::AsyncRead + Unpin,
        W: tokio::io::AsyncWrite + Unpin,
    {
        let mut session = ClientSession::new(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: self.settings.agent_id.clone(),
            agent_version: AGENT_VERSION.into(),
            refusals: true,
            config: self.control.state(),
        });
        // The key of a renewal in progress; its certificate comes back on this session. The
        // validity checked is the newest certificate's, so a session that outlives several
        // renewals renews each time.
        let mut renewing_key: Option<String> = None;
        let mut validity = (identity.not_before, identity.not_after);
        let mut cursors: HashMap<String, u64> = HashMap::new();
        // Batches in flight: when each was sent and how many events it holds (the window bounds it).
        let mut in_flight: HashMap<(String, u64), (Instant, usize)> = HashMap::new();
        metrics::gauge!(telemetry::CERT_EXPIRY).set(validity.1 as f64);
        let mut rx = BytesMut::with_capacity(64 * 1024);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let session_start = Instant::now();
        loop {
            // Nothing in flight for a while: the spool connection's memory and the packer's go
            // back (at least every tick comes through here).
            if self.spool.settle(!in_flight.is_empty()) {
                self.packer = batch::Packer::default();
            }
            if session.is_ready() {
                self.fill_window(&mut session, &mut cursors, &mut in_flight)?;
            }
            if let Some(why) = &self.holding
                && session_start.elapsed() > HOLD_RECHECK
            {
                anyhow::bail!("{why}: looking for a gateway that reads it");
            }
            let mut tx = BytesMut::new();
            while let Some(frame) = session.poll_transmit() {
                frame.encode(&mut tx);
            }
            if !tx.is_empty() {
                send.write_all(&tx).await.context("sending to the gateway")?;
                send.flush().await.context("sending to the gateway")?;
            }
            let heartbeat_at = session
                .poll_timeout()
                .map(|d| tokio::time::Instant::from_std(self.started + d))
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                () = self.shutdown.cancelled() => {
                    let _ = send.shutdown().await;
                    return Ok(());
                }
                read = recv.read_buf(&mut rx) => {
                    if read.context("reading from the gateway")? == 0 {
                        anyhow::bail!("the gateway closed the stream");
                    }
                    while let Some(frame) = Frame::decode(&mut rx, DEFAULT_MAX_FRAME_LEN).context("decoding a gateway frame")? {
                        session.handle_frame(frame, self.started.elapsed()).context("gateway broke the protocol")?;
                    }
                }
                () = tokio::time::sleep_until(heartbeat_at) => {
                    let now = self.started.elapsed();
                    if session.handle_timeout(now) {
                        let heartbeat = self.heartbeat(transport, validity.1)?;
                        session.send_heartbeat(heartbeat, now);
                        if renewing_key.is_none()
                            && crate::identity::renewal_due(validity, chrono::Utc::now().timestamp())
                        {
                            let (key, csr) = crate::identity::new_key_and_csr(&self.settings.agent_id)?;
                            info!(not_after = validity.1, "certificate renewal due: asking for a new one");
                            renewing_key = Some(key);
                            session.request_renewal(csr);
                        }
                    }
                }
                () = self.spooled.notified() => {}
                _ = tick.tick() => {}
            }
            while let Some(event) = session.poll_event() {
                match event {
                    ClientEvent::Ready(welcome) => {
                        let limit = welcome.max_event_bytes.map_or(crate::sources::NO_EVENT_LIMIT, u64::from);
                        self.event_limit.store(limit, std::sync::atomic::Ordering::Relaxed);
                        let own = actidash_shared::event::SCHEMA_VERSION;
                        self.holding = (!welcome.schema_versions.contains(&own)).then(|| {
                            format!(
                                "waiting for the cloud to support event schema v{own} (this gateway reads {:?}); events are kept in the spool",
                                welcome.schema_versions
                            )
                        });
                        if let Some(why) = &self.holding {
                            warn!(gateway = %remote, reason = %why, "holding events");
                        }
                        info!(gateway = %remote, transport, tenant = %welcome.tenant, window = welcome.max_in_flight, "connected to the gateway");
                        metrics::counter!(telemetry::SESSIONS, "transport" => transport).increment(1);
                        metrics::gauge!(telemetry::CONNECTED).set(1.0);
                        self.link.connected(transport);
                        let spooled = self.spooled_in_all();
                        self.outages.reached(chrono::Utc::now().timestamp_millis(), spooled);
                        if let Some(o) = &self.outages.last {
                            info!(
                                from_ms = o.from_ms,
                                to_ms = o.to_ms,
                                buffered_events = o.buffered_events,
                                "the cloud is reachable again after an outage; reporting it"
                            );
                        }
                    }
                    ClientEvent::Acked(ack) => {
                        debug!(source = %ack.source_id, first_seq = ack.first_seq, count = ack.count, "batch acknowledged");
                        if let Some((sent_at, n)) = in_flight.remove(&(ack.source_id.clone(), ack.first_seq)) {
                            metrics::histogram!(telemetry::ACK_SECONDS).record(sent_at.elapsed().as_secs_f64());
                            metrics::counter!(telemetry::SHIPPED_EVENTS).increment(n as u64);
                            self.link.shipped(n as u64);
                            metrics::counter!(telemetry::SHIPPED_BATCHES).increment(1);
                        }
                        self.acker.acknowledged(ack.source_id, ack.first_seq, ack.count)?;
                    }
                    ClientEvent::Refused(r) => {
                        // Before the batch's ack (which deletes the rest of its span): the
                        // refused events move aside, by seq (or by their place in the batch);
                        // a batch refused whole moves its whole span.
                        let (moved, kind, reason) = tokio::task::block_in_place(|| self.move_refused(&r))?;
                        warn!(source = %r.source_id, first_seq = r.first_seq, count = r.count, moved, kind = %kind, reason = %reason, "events refused by the gateway for good: moved aside (edge-agent spool refused export); the others go on");
                        if let Some(status) =
                            self.statuses.iter().find(|s| s.lock().is_ok_and(|s| s.source_id == r.source_id))
                        {
                            status.lock().unwrap_or_else(|p| p.into_inner()).last_error =
                                Some(format!("{moved} events refused by the gateway ({kind}): {reason}"));
                        }
                    }
                    ClientEvent::Renewed(r) => {
                        if let Some(key) = renewing_key.take() {
                            let store = self.settings.identity.clone();
                            let new = tokio::task::block_in_place(|| {
                                store.store(&key, &r.cert_pem, None)?;
                                store.load()
                            })?;
                            validity = (new.not_before, new.not_after);
                            metrics::gauge!(telemetry::CERT_EXPIRY).set(validity.1 as f64);
                            info!(not_after = new.not_after, "certificate renewed; the next connection uses it");
                        }
                    }
                    ClientEvent::Config(push) => {
                        info!(group = %push.group, version = push.version, bytes = push.text.len(), "configuration pushed by the cloud");
                        self.control.offer(push);
                    }
                    ClientEvent::Closed(e) => {
                        anyhow::bail!("the gateway closed the session: {:?}: {}", e.code, e.message);
                    }
                }
            }
        }
    }

    /// Sends batches while the window has room and the spool has events.
    fn fill_window(
        &mut self,
        session: &mut ClientSession,
        cursors: &mut HashMap<String, u64>,
        in_flight: &mut HashMap<(String, u64), (Instant, usize)>,
    ) -> anyhow::Result<()> {
        let Some(welcome) = session.welcome().cloned() else { return Ok(()) };
        if self.holding.is_some() {
            return Ok(());
        }
        let max_events = self.settings.max_batch_events.min(welcome.max_batch_events).max(1) as usize;
        let max_bytes = self.settings.max_batch_bytes.min(welcome.max_batch_bytes) as usize;
        let mut idle = 0;
        let mut idx = 0;
        while session.can_send_batch() && idle < self.source_ids.len() {
            let source_id = self.source_ids[idx % self.source_ids.len()].clone();
            let source_id = &source_id;
            idx += 1;
            let cursor = match cursors.get(source_id) {
                Some(c) => *c,
                None => {
                    // The source's next seq first, then its oldest spooled event: events it
                    // appends in between are at or after that next seq, so none is skipped. (In
                    // the other order, a first append landing between the two reads set the
                    // cursor past every event of that append: they were never sent.)
                    let next = self.spool.source_state(source_id)?.next_seq;
                    let start = self.spool.oldest_seq(source_id)?.unwrap_or(next);
                    cursors.insert(source_id.clone(), start);
                    start
                }
            };
            // Nothing spooled past what was sent: no read (a read transaction per source per
            // wake-up was most of the shipper's SQLite work at 10k events/s).
            if self.heads.get(source_id).is_some_and(|h| cursor >= h.load(std::sync::atomic::Ordering::Acquire)) {
                idle += 1;
                continue;
            }
            // Reads run on the runtime's thread: a WAL reader never waits for the writers, and
            // a read of a few blocks takes tens of microseconds; handing the thread over
            // (block_in_place) for each cost more in task switches than the read.
            let blocks = self.spool.read_blocks(source_id, cursor, max_events, max_bytes)?;
            let Some(first) = blocks.first() else {
                idle += 1;
                continue;
            };
            idle = 0;
            let limit = self.event_limit.load(std::sync::atomic::Ordering::Relaxed);
            // Whole blocks as spooled, their zstd frames one after another (a gateway that
            // reads such payloads says so): nothing is unpacked or packed again. Otherwise
            // (an older gateway, a block bigger than this gateway's batch, a block partly
            // sent, an event spooled before the gateway stated its event limit) the events
            // are unpacked and packed here.
            let as_spooled = welcome.zstd_frames
                && first.first_seq >= cursor
                && blocks.iter().all(|b| b.payload().is_some() && b.max_len <= limit)
                && (blocks.len() > 1 || (first.n as usize <= max_events && first.raw_bytes as usize <= max_bytes));
            let (first_seq, end_seq, n_events, payload) = if as_spooled {
                let mut payload = Vec::with_capacity(blocks.iter().filter_map(|b| b.payload()).map(<[u8]>::len).sum());
                for b in &blocks {
                    payload.extend_from_slice(b.payload().unwrap_or_default());
                }
                let n_events = blocks.iter().map(|b| b.n as usize).sum();
                (first.first_seq, blocks.last().map_or(first.end_seq(), |b| b.end_seq()), n_events, payload)
            } else {
                let mut events = Vec::new();
                for b in &blocks {
                    events.extend(b.events().map_err(|e| {
                        anyhow::anyhow!("source {source_id}: spooled block at seq {}: {e}", b.first_seq)
                    })?);
                }
                events.retain(|(seq, _)| *seq >= cursor);
                // Spooled before this gateway stated its limit: bigger events would be refused
                // by Kafka, and their batch sent again for ever. They are quarantined (kept,
                // counted).
                let (big, fit): (Vec<_>, Vec<_>) = events.into_iter().partition(|(_, body)| body.len() as u64 > limit);
                for (seq, body) in big {
                    let reason =
                        format!("event of {} bytes is larger than the gateway can deliver ({limit} bytes)", body.len());
                    warn!(source = %source_id, seq, reason = %reason, "spooled event quarantined");
                    tokio::task::block_in_place(|| self.spool.quarantine_event(source_id, seq, &body, &reason))?;
                }
                let (mut n, mut bytes) = (0, 0);
                let batch: Vec<&(u64, Vec<u8>)> = fit
                    .iter()
                    .take_while(|(_, body)| {
                        let room = n == 0 || (n < max_events && bytes + body.len() <= max_bytes);
                        n += 1;
                        bytes += body.len();
                        room
                    })
                    .collect();
                let (Some(head), Some(last)) = (batch.first(), batch.last()) else {
                    // Everything read was quarantined: on past it.
                    cursors.insert(source_id.clone(), blocks.last().map_or(cursor, |b| b.end_seq()));
                    continue;
                };
                let payload = self.packer.pack(batch.iter().map(|(_, body)| body.as_slice()), Codec::Zstd);
                (head.0, last.0 + 1, batch.len(), payload)
            };
            // The batch covers the span first..end; holes (acknowledged, quarantined or
            // dropped events) are fine.
            let count = u32::try_from(end_seq - first_seq).unwrap_or(u32::MAX);
            cursors.insert(source_id.clone(), first_seq + u64::from(count));
            metrics::histogram!(telemetry::BATCH_EVENTS).record(n_events as f64);
            in_flight.insert((source_id.clone(), first_seq), (Instant::now(), n_events));
            session.send_batch(Batch {
                source_id: source_id.clone(),
                first_seq,
                count,
                codec: Codec::Zstd,
                payload: payload.into(),
            })?;
        }
        Ok(())
    }

    /// Moves the events a [`Refused`] names out of the line; returns how many moved, and the
    /// kind and reason of the first.
    fn move_refused(&mut self, r: &Refused) -> anyhow::Result<(u64, RefusalKind, String)> {
        let span = r.first_seq..r.first_seq + u64::from(r.count);
        if let Some(whole) = &r.whole {
            let moved = self.spool.refuse_span(&r.source_id, r.first_seq, r.count, whole.kind, &whole.reason)?;
            return Ok((moved, whole.kind, whole.reason.clone()));
        }
        // The span's rows only when an event is named by its place alone.
        let rows = if r.events.iter().any(|e| e.seq.is_none()) {
            self.spool.read(&r.source_id, r.first_seq, r.count as usize, usize::MAX)?
        } else {
            Vec::new()
        };
        let named: Vec<(u64, RefusalKind, &str)> = r
            .events
            .iter()
            .filter_map(|e| {
                let seq = e.seq.or_else(|| rows.get(e.index as usize).map(|row| row.seq));
                seq.filter(|s| span.contains(s)).map(|seq| (seq, e.kind, e.reason.as_str()))
            })
            .collect();
        let moved = self.spool.refuse_events(&r.source_id, &named)?;
        let first = r.events.first();
        Ok((moved, first.map_or(RefusalKind::Other, |e| e.kind), first.map(|e| e.reason.clone()).unwrap_or_default()))
    }

    /// Events spooled by every source since the spool began (their next seqs).
    /// Only for the outage report: a spool that cannot be read now (it is retried by what
    /// needs it) leaves the count unknown rather than stopping the shipper.
    fn spooled_in_all(&self) -> Option<u64> {
        let count = || -> anyhow::Result<u64> {
            let mut n = 0;
            for id in &self.source_ids {
                n += self.spool.source_state(id)?.next_seq;
            }
            Ok(n)
        };
        tokio::task::block_in_place(count)
            .map_err(|e| warn!(error = format!("{e:#}"), "cannot count the spooled events for the outage report"))
            .ok()
    }

    fn heartbeat(&self, transport: &str, cert_not_after: i64) -> anyhow::Result<Heartbeat> {
        let mut heartbeat = tokio::task::block_in_place(|| {
            snapshot(&self.spool, &self.statuses, self.started, self.settings.spool_max_bytes)
        })?;
        heartbeat.transport = transport.into();
        heartbeat.holding = self.holding.clone();
        heartbeat.cert_not_after = Some(cert_not_after);
        heartbeat.last_outage = self.outages.last.clone();
        heartbeat.config = self.control.state();
        Ok(heartbeat)
    }
}

/// The agent's state as a heartbeat reports it: the spool's figures and each source's status,
/// with the counts only the spool knows and each source's lag. (Transport and holding are the
/// shipper's to fill in.)
pub fn snapshot(
    spool: &Spool,
    statuses: &[SharedStatus],
    started: Instant,
    spool_max_bytes: u64,
) -> anyhow::Result<Heartbeat> {
    let now_ms = chrono::Utc::now().timestamp_millis();
    let mut sources: Vec<SourceStatus> =
        statuses.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).clone()).collect();
    // One read transaction: the totals and every source's counts are of the same moment.
    let (spool_events, spool_bytes) = spool.read_at_once(|spool| {
        // Drops and quarantines happen outside the source (in other sources' appends, in the
        // shipper's reads): the spool has the true counts.
        for status in &mut sources {
            let state = spool.source_state(&status.source_id)?;
            status.n_dropped = state.n_dropped;
            status.n_quarantined = state.n_quarantined;
            status.n_refused = state.n_refused;
            status.refused_by_reason = spool.refused_counts(&status.source_id)?;
            status.lag_ms =
                spool.oldest_spooled_at(&status.source_id)?.map_or(0, |at| u64::try_from(now_ms - at).unwrap_or(0));
        }
        // The totals only: each source's oldest event was read above, for its lag.
        spool.totals()
    })?;
    Ok(Heartbeat {
        agent_version: AGENT_VERSION.into(),
        transport: String::new(),
        uptime_secs: started.elapsed().as_secs(),
        spool_events,
        spool_bytes,
        sources,
        holding: None,
        spool_max_bytes,
        cert_not_after: None,
        last_outage: None,
        config: None,
    })
}

async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving {address}"))?
        .next()
        .with_context(|| format!("{address} resolves to no address"))
}

/// Exponential backoff from 100 ms, capped, with full jitter in [50 %, 100 %].
fn backoff(n_failures: u32, max: Duration) -> Duration {
    crate::retry::backoff(Duration::from_millis(100), n_failures, max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_is_reported_after_a_failed_attempt_with_what_was_spooled_meanwhile() {
        let mut o = Outages::default();
        o.lost(1_000, Some(10));
        o.reached(1_500, Some(12));
        assert_eq!(o.last, None, "a first connection that works at once is no outage");
        o.lost(2_000, Some(12));
        o.failed();
        o.lost(2_500, Some(15)); // still the same outage
        o.failed();
        o.reached(9_000, Some(40));
        let expected = actidash_shared::wire::Outage { from_ms: 2_000, to_ms: 9_000, buffered_events: 28 };
        assert_eq!(o.last, Some(expected));
        o.lost(10_000, None);
        o.failed();
        o.reached(11_000, Some(50));
        assert_eq!(o.last.as_ref().map(|x| (x.from_ms, x.buffered_events)), Some((10_000, 0)), "uncounted: none");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let max = Duration::from_secs(30);
        assert!(backoff(0, max) <= Duration::from_millis(100));
        assert!(backoff(0, max) >= Duration::from_millis(50));
        assert!(backoff(5, max) >= Duration::from_millis(1600));
        for n in [20, 100, u32::MAX] {
            let d = backoff(n, max);
            assert!(d <= max && d >= max / 2, "{d:?}");
        }
    }
}
