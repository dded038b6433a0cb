//! The protocol's state machines: [`ClientSession`] for the agent, [`ServerSession`] for the
//! gateway.
//!
//! They do no I/O and read no clock. A driver feeds received frames with `handle_frame`, takes
//! frames to send with `poll_transmit` and decisions with `poll_event`, and passes the time
//! (any monotonic [`Duration`] since an epoch of its choosing) where timing matters.
//!
//! ```text
//! agent                              gateway
//!   Hello ───────────────────────────▶  (driver authenticates by the client certificate:
//!                                        accept / reject)
//!         ◀─────────────────────────── Welcome (tenant, window, limits)
//!   Batch, Batch, … (≤ window) ──────▶  (driver makes each durable, then ack)
//!         ◀─────────────────────────── Ack, Ack, …  (in any order)
//!   Heartbeat (every interval) ──────▶
//!   Renew (a CSR) ───────────────────▶  (any time once ready)
//!         ◀─────────────────────────── Renewed (the new certificate)
//!   Error ◀──────────────────────────▶ Error   (then the connection closes)
//! ```
//!
//! An agent without a certificate sends `Enroll` (a token and a CSR) instead of `Hello`; the
//! gateway answers `Enrolled` (or an error) and the session ends.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use crate::wire::{
    Ack, Batch, ConfigPush, Enroll, Enrolled, ErrorCode, ErrorFrame, Frame, Heartbeat, Hello, PROTOCOL_VERSION,
    Refused, Renew, Renewed, Welcome,
};

/// A breach of the protocol by the peer. The session has queued an error frame for the peer
/// and is closed.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("{code:?}: {message}")]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
        ProtocolError { code, message: message.into() }
    }
}

/// What the agent's session tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// The gateway accepted us; batches may flow.
    Ready(Welcome),
    /// A batch is durable in the cloud: its events may be deleted from the spool.
    Acked(Ack),
    /// The gateway will never take some events of a batch (its ack follows): they leave the
    /// line (moved aside, kept).
    Refused(Refused),
    /// The gateway signed a renewed certificate.
    Renewed(Renewed),
    /// The gateway pushed the configuration of the agent's group.
    Config(ConfigPush),
    /// The gateway closed the session.
    Closed(ErrorFrame),
}

#[derive(Debug)]
enum ClientState {
    AwaitingWelcome,
    Ready(Welcome),
    Closed,
}

/// The agent's side of a connection.
#[derive(Debug)]
pub struct ClientSession {
    state: ClientState,
    outbox: VecDeque<Frame>,
    events: VecDeque<ClientEvent>,
    in_flight: HashSet<(String, u64, u32)>,
    next_heartbeat: Option<Duration>,
    renewing: bool,
    /// The hello asked for pushed configurations.
    takes_config: bool,
}

impl ClientSession {
    /// Starts a session; the hello is the first frame to transmit.
    pub fn new(hello: Hello) -> ClientSession {
        ClientSession {
            takes_config: hello.config.is_some(),
            state: ClientState::AwaitingWelcome,
            outbox: VecDeque::from([Frame::Hello(hello)]),
            events: VecDeque::new(),
            in_flight: HashSet::new(),
            next_heartbeat: None,
            renewing: false,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    pub fn is_ready(&self) -> bool {
        matches!(self.state, ClientState::Ready(_))
    }

    pub fn welcome(&self) -> Option<&Welcome> {
        match &self.state {
            ClientState::Ready(w) => Some(w),
            _ => None,
        }
    }

    pub fn n_in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether the window has room for another batch.
    pub fn can_send_batch(&self) -> bool {
        match &self.state {
            ClientState::Ready(w) => self.in_flight.len() < w.max_in_flight.max(1) as usize,
            _ => false,
        }
    }

    /// Asks for a renewed certificate for the key of `csr_pem`; answered by
    /// [`ClientEvent::Renewed`].
    pub fn request_renewal(&mut self, csr_pem: String) {
        if self.is_ready() && !self.renewing {
            self.renewing = true;
            self.outbox.push_back(Frame::Renew(Renew { csr_pem }));
        }
    }

    /// Queues a batch. The caller keeps its events until the matching [`ClientEvent::Acked`].
    pub fn send_batch(&mut self, batch: Batch) -> Result<(), ProtocolError> {
        if !self.can_send_batch() {
            return Err(ProtocolError::new(ErrorCode::ProtocolViolation, "batch sent without room in the window"));
        }
        self.in_flight.insert((batch.source_id.clone(), batch.first_seq, batch.count));
        self.outbox.push_back(Frame::Batch(batch));
        Ok(())
    }

    /// When the driver should next call [`ClientSession::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<Duration> {
        self.next_heartbeat
    }

    /// Returns true when a heartbeat is due: the driver then builds one and calls
    /// [`ClientSession::send_heartbeat`].
    pub fn handle_timeout(&mut self, now: Duration) -> bool {
        matches!(self.next_heartbeat, Some(due) if now >= due)
    }

    pub fn send_heartbeat(&mut self, heartbeat: Heartbeat, now: Duration) {
        if let ClientState::Ready(w) = &self.state {
            self.next_heartbeat = Some(now + Duration::from_millis(w.heartbeat_interval_ms.max(100)));
            self.outbox.push_back(Frame::Heartbeat(heartbeat));
        }
    }

    pub fn handle_frame(&mut self, frame: Frame, now: Duration) -> Result<(), ProtocolError> {
        let result = match (&self.state, frame) {
            (ClientState::Closed, _) => Ok(()),
            (_, Frame::Error(e)) => {
                self.state = ClientState::Closed;
                self.events.push_back(ClientEvent::Closed(e));
                return Ok(());
            }
            (ClientState::AwaitingWelcome, Frame::Welcome(w)) => {
                if w.protocol_version != PROTOCOL_VERSION {
                    Err(ProtocolError::new(
                        ErrorCode::UnsupportedVersion,
                        format!("gateway speaks protocol {}, agent {PROTOCOL_VERSION}", w.protocol_version),
                    ))
                } else {
                    // First heartbeat right away: the fleet view learns of us at once.
                    self.next_heartbeat = Some(now);
                    self.state = ClientState::Ready(w.clone());
                    self.events.push_back(ClientEvent::Ready(w));
                    Ok(())
                }
            }
            (ClientState::Ready(_), Frame::Renewed(r)) if self.renewing => {
                self.renewing = false;
                self.events.push_back(ClientEvent::Renewed(r));
                Ok(())
            }
            (ClientState::Ready(_), Frame::ConfigPush(c)) if self.takes_config => {
                self.events.push_back(ClientEvent::Config(c));
                Ok(())
            }
            (ClientState::Ready(_), Frame::Refused(r)) => {
                // Before the batch's ack, which frees its place in the window.
                if self.in_flight.contains(&(r.source_id.clone(), r.first_seq, r.count)) {
                    self.events.push_back(ClientEvent::Refused(r));
                }
                Ok(())
            }
            (ClientState::Ready(_), Frame::Ack(ack)) => {
                if self.in_flight.remove(&(ack.source_id.clone(), ack.first_seq, ack.count)) {
                    self.events.push_back(ClientEvent::Acked(ack));
                    Ok(())
                } else {
                    Err(ProtocolError::new(
                        ErrorCode::ProtocolViolation,
                        format!("ack for a batch not in flight: {} {}+{}", ack.source_id, ack.first_seq, ack.count),
                    ))
                }
            }
            (_, other) => Err(ProtocolError::new(
                ErrorCode::ProtocolViolation,
                format!("unexpected {} frame from the gateway", other.name()),
            )),
        };
        if let Err(e) = &result {
            self.close_with(e.clone());
        }
        result
    }

    fn close_with(&mut self, e: ProtocolError) {
        self.state = ClientState::Closed;
        self.outbox.push_back(Frame::Error(ErrorFrame { code: e.code, message: e.message }));
    }
}

/// Limits the gateway imposes on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerLimits {
    pub max_in_flight: u32,
    pub max_batch_bytes: u32,
    pub max_batch_events: u32,
    pub heartbeat_interval: Duration,
    /// The largest event the gateway can deliver ([`crate::wire::Welcome::max_event_bytes`]).
    pub max_event_bytes: Option<u32>,
    /// The event schema versions the gateway reads, lowest and highest.
    pub schema_versions: (u16, u16),
}

impl Default for ServerLimits {
    fn default() -> ServerLimits {
        ServerLimits {
            max_in_flight: 8,
            max_batch_bytes: 4 * 1024 * 1024,
            max_batch_events: 10_000,
            heartbeat_interval: Duration::from_secs(5),
            max_event_bytes: None,
            schema_versions: (crate::event::SCHEMA_VERSION, crate::event::SCHEMA_VERSION),
        }
    }
}

/// What the gateway's session tells its driver.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerEvent {
    /// The agent introduced itself: the driver checks its client certificate and calls
    /// [`ServerSession::accept`] or [`ServerSession::reject`].
    Hello(Hello),
    /// An agent asks to be enrolled: the driver redeems the token and signs the CSR, then
    /// calls [`ServerSession::enrolled`] or [`ServerSession::reject`].
    Enroll(Enroll),
    /// An authenticated agent asks for a renewed certificate: [`ServerSession::renewed`].
    Renew(Renew),
    /// A batch to make durable, then [`ServerSession::ack`].
    Batch(Batch),
    Heartbeat(Heartbeat),
    /// The agent closed the session.
    Closed(ErrorFrame),
}

#[derive(Debug)]
enum ServerState {
    AwaitingHello,
    Authenticating,
    Ready { agent_id: String },
    Closed,
}

/// The gateway's side of a connection.
#[derive(Debug)]
pub struct ServerSession {
    limits: ServerLimits,
    state: ServerState,
    outbox: VecDeque<Frame>,
    events: VecDeque<ServerEvent>,
    n_unacked: u32,
    /// The agent's hello said it takes [`Refused`].
    refusals: bool,
    /// The agent's hello said it takes pushed configurations.
    takes_config: bool,
}

impl ServerSession {
    pub fn new(limits: ServerLimits) -> ServerSession {
        ServerSession {
            limits,
            state: ServerState::AwaitingHello,
            outbox: VecDeque::new(),
            events: VecDeque::new(),
            n_unacked: 0,
            refusals: false,
            takes_config: false,
        }
    }

    pub fn poll_transmit(&mut self) -> Option<Frame> {
        self.outbox.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<ServerEvent> {
        self.events.pop_front()
    }

    pub fn is_closed(&self) -> bool {
        matches!(self.state, ServerState::Closed)
    }

    /// The authenticated agent, once accepted.
    pub fn agent_id(&self) -> Option<&str> {
        match &self.state {
            ServerState::Ready { agent_id } => Some(agent_id),
            _ => None,
        }
    }

    pub fn handle_frame(&mut self, frame: Frame) -> Result<(), ProtocolError> {
        let result = match (&self.state, frame) {
            (ServerState::Closed, _) => Ok(()),
            (_, Frame::Error(e)) => {
                self.state = ServerState::Closed;
                self.events.push_back(ServerEvent::Closed(e));
                Ok(())
            }
            (ServerState::AwaitingHello, Frame::Enroll(e)) => {
                if e.protocol_version != PROTOCOL_VERSION {
                    Err(ProtocolError::new(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "enrollment in protocol {}; this gateway speaks {PROTOCOL_VERSION}",
                            e.protocol_version
                        ),
                    ))
                } else {
                    self.state = ServerState::Authenticating;
                    self.events.push_back(ServerEvent::Enroll(e));
                    Ok(())
                }
            }
            (ServerState::Ready { .. }, Frame::Renew(r)) => {
                self.events.push_back(ServerEvent::Renew(r));
                Ok(())
            }
            (ServerState::AwaitingHello, Frame::Hello(h)) => {
                self.refusals = h.refusals;
                self.takes_config = h.config.is_some();
                if h.protocol_version != PROTOCOL_VERSION {
                    Err(ProtocolError::new(
                        ErrorCode::UnsupportedVersion,
                        format!(
                            "agent {} speaks protocol {}; this gateway speaks {PROTOCOL_VERSION}",
                            h.agent_id, h.protocol_version
                        ),
                    ))
                } else {
                    self.state = ServerState::Authenticating;
                    self.events.push_back(ServerEvent::Hello(h));
                    Ok(())
                }
            }
            (ServerState::Ready { .. }, Frame::Batch(b)) => self.check_batch(&b).map(|()| {
                self.n_unacked += 1;
                self.events.push_back(ServerEvent::Batch(b));
            }),
            (ServerState::Ready { .. }, Frame::Heartbeat(h)) => {
                self.events.push_back(ServerEvent::Heartbeat(h));
                Ok(())
            }
            (ServerState::AwaitingHello | ServerState::Authenticating, other) => Err(ProtocolError::new(
                ErrorCode::Unauthenticated,
                format!("{} frame before the agent was authenticated", other.name()),
            )),
            (_, other) => Err(ProtocolError::new(
                ErrorCode::ProtocolViolation,
                format!("unexpected {} frame from the agent", other.name()),
            )),
        };
        if let Err(e) = &result {
            self.fail(e.code, e.message.clone());
        }
        result
    }

    fn check_batch(&self, b: &Batch) -> Result<(), ProtocolError> {
        if self.n_unacked >= self.limits.max_in_flight {
            return Err(ProtocolError::new(
                ErrorCode::ProtocolViolation,
                format!("more than {} batches in flight", self.limits.max_in_flight),
            ));
        }
        if b.payload.len() > self.limits.max_batch_bytes as usize {
            return Err(ProtocolError::new(
                ErrorCode::InvalidBatch,
                format!("batch payload of {} bytes exceeds {}", b.payload.len(), self.limits.max_batch_bytes),
            ));
        }
        if b.count > self.limits.max_batch_events {
            return Err(ProtocolError::new(
                ErrorCode::InvalidBatch,
                format!("batch of {} events exceeds {}", b.count, self.limits.max_batch_events),
            ));
        }
        Ok(())
    }

    /// The driver authenticated the agent as `agent_id` of `tenant`.
    pub fn accept(&mut self, agent_id: String, tenant: String) {
        if matches!(self.state, ServerState::Authenticating) {
            self.state = ServerState::Ready { agent_id };
            self.outbox.push_back(Frame::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                tenant,
                max_in_flight: self.limits.max_in_flight,
                max_batch_bytes: self.limits.max_batch_bytes,
                max_batch_events: self.limits.max_batch_events,
                heartbeat_interval_ms: self.limits.heartbeat_interval.as_millis() as u64,
                max_event_bytes: self.limits.max_event_bytes,
                schema_versions: (self.limits.schema_versions.0..=self.limits.schema_versions.1).collect(),
                zstd_frames: true,
            }));
        }
    }

    pub fn reject(&mut self, message: String) {
        self.fail(ErrorCode::Unauthenticated, message);
    }

    /// The agent is enrolled: send its certificate, then the session ends.
    pub fn enrolled(&mut self, enrolled: Enrolled) {
        if matches!(self.state, ServerState::Authenticating) {
            self.state = ServerState::Closed;
            self.outbox.push_back(Frame::Enrolled(enrolled));
        }
    }

    /// A renewed certificate for the agent.
    pub fn renewed(&mut self, renewed: Renewed) {
        if matches!(self.state, ServerState::Ready { .. }) {
            self.outbox.push_back(Frame::Renewed(renewed));
        }
    }

    /// A batch is durable: acknowledge it.
    pub fn ack(&mut self, ack: Ack) {
        if matches!(self.state, ServerState::Ready { .. }) {
            self.n_unacked = self.n_unacked.saturating_sub(1);
            self.outbox.push_back(Frame::Ack(ack));
        }
    }

    /// Pushes a configuration to an agent that takes them (its hello said so).
    pub fn push_config(&mut self, push: ConfigPush) {
        if self.takes_config && matches!(self.state, ServerState::Ready { .. }) {
            self.outbox.push_back(Frame::ConfigPush(push));
        }
    }

    /// Whether the agent takes [`Refused`] (its hello said so).
    pub fn takes_refusals(&self) -> bool {
        self.refusals
    }

    /// Events of a batch will never be taken: tells the agent, which moves them aside; the
    /// batch's ack follows once its other events are durable. (Only for an agent that takes
    /// refusals: see [`ServerSession::takes_refusals`].)
    pub fn refuse(&mut self, refused: Refused) {
        if self.refusals && matches!(self.state, ServerState::Ready { .. }) {
            self.outbox.push_back(Frame::Refused(refused));
        }
    }

    /// Closes the session with an error for the agent.
    pub fn fail(&mut self, code: ErrorCode, message: String) {
        if !self.is_closed() {
            self.state = ServerState::Closed;
            self.outbox.push_back(Frame::Error(ErrorFrame { code, message }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Codec;
    use bytes::BytesMut;

    fn hello(version: u16) -> Hello {
        Hello {
            protocol_version: version,
            agent_id: "a1".into(),
            agent_version: "0.1.0".into(),
            refusals: true,
            config: None,
        }
    }

    /// Configurations go only to agents whose hello asks for them, once they are accepted; an
    /// agent that did not ask treats one as a protocol violation.
    #[test]
    fn configurations_are_pushed_only_to_agents_that_take_them() {
        let push = ConfigPush { group: "stores".into(), version: 3, text: "[[sources]]".into() };
        let state = crate::wire::ConfigState { group: "stores".into(), state: "local".into(), ..Default::default() };
        let mut client = ClientSession::new(Hello { config: Some(state), ..hello(PROTOCOL_VERSION) });
        let mut server = ServerSession::new(ServerLimits::default());
        assert!(pump_to_server(&mut client, &mut server).iter().all(Result::is_ok));
        let _ = server.poll_event();
        server.push_config(push.clone());
        assert_eq!(server.poll_transmit(), None, "not before the agent is accepted");
        server.accept("a1".into(), "acme".into());
        server.push_config(push.clone());
        pump_to_client(&mut server, &mut client, Duration::ZERO);
        assert!(matches!(client.poll_event(), Some(ClientEvent::Ready(_))));
        assert_eq!(client.poll_event(), Some(ClientEvent::Config(push.clone())));

        let mut local = ClientSession::new(hello(PROTOCOL_VERSION));
        let mut server = ServerSession::new(ServerLimits::default());
        assert!(pump_to_server(&mut local, &mut server).iter().all(Result::is_ok));
        server.accept("a1".into(), "acme".into());
        server.push_config(push.clone());
        pump_to_client(&mut server, &mut local, Duration::ZERO);
        assert!(matches!(local.poll_event(), Some(ClientEvent::Ready(_))));
        assert_eq!(local.poll_event(), None, "an agent that keeps its local file is pushed nothing");
        let err = local.handle_frame(Frame::ConfigPush(push), Duration::ZERO).unwrap_err();
        assert_eq!(err.code, ErrorCode::ProtocolViolation);
    }

    fn batch(first_seq: u64) -> Batch {
        Batch { source_id: "s".into(), first_seq, count: 2, codec: Codec::Plain, payload: vec![b'x'; 10].into() }
    }

    /// Moves every queued frame from one side to the other through the real codec.
    fn pump_to_server(client: &mut ClientSession, server: &mut ServerSession) -> Vec<Result<(), ProtocolError>> {
        let mut wire = BytesMut::new();
        while let Some(f) = client.poll_transmit() {
            f.encode(&mut wire);
        }
        let mut results = Vec::new();
        while let Some(f) = Frame::decode(&mut wire, 1 << 20).unwrap() {
            results.push(server.handle_frame(f));
        }
        results
    }

    fn pump_to_client(server: &mut ServerSession, client: &mut ClientSession, now: Duration) {
        let mut wire = BytesMut::new();
        while let Some(f) = server.poll_transmit() {
            f.encode(&mut wire);
        }
        while let Some(f) = Frame::decode(&mut wire, 1 << 20).unwrap() {
            client.handle_frame(f, now).unwrap();
        }
    }

    #[test]
    fn enrollment_replaces_the_hello_and_renewal_happens_on_a_ready_session() {
        let mut server = ServerSession::new(ServerLimits::default());
        let enroll = Enroll {
            protocol_version: PROTOCOL_VERSION,
            agent_id: "a1".into(),
            token: "t".into(),
            csr_pem: "c".into(),
        };
        assert!(!format!("{enroll:?}").contains("\"t\""), "the token never shows in Debug");
        server.handle_frame(Frame::Enroll(enroll.clone())).unwrap();
        assert_eq!(server.poll_event(), Some(ServerEvent::Enroll(enroll)));
        let enrolled =
            Enrolled { agent_id: "a1".into(), tenant: "acme".into(), cert_pem: "C".into(), ca_pem: "CA".into() };
        server.enrolled(enrolled.clone());
        assert_eq!(server.poll_transmit(), Some(Frame::Enrolled(enrolled)));
        assert!(server.is_closed(), "an enrollment session ends with the certificate");

        // No batch or renewal before authentication; a renewal after it.
        let mut server = ServerSession::new(ServerLimits::default());
        let err = server.handle_frame(Frame::Renew(Renew { csr_pem: "c".into() })).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated);
        let mut client = ClientSession::new(hello(PROTOCOL_VERSION));
        let mut server = ServerSession::new(ServerLimits::default());
        pump_to_server(&mut client, &mut server);
        server.poll_event();
        server.accept("a1".into(), "acme".into());
        pump_to_client(&mut server, &mut client, Duration::ZERO);
        client.poll_event();
        client.request_renewal("csr".into());
        client.request_renewal("csr".into()); // one at a time
        pump_to_server(&mut client, &mut server);
        assert_eq!(server.poll_event(), Some(ServerEvent::Renew(Renew { csr_pem: "csr".into() })));
        assert_eq!(server.poll_event(), None);
        server.renewed(Renewed { cert_pem: "new".into() });
        pump_to_client(&mut server, &mut client, Duration::ZERO);
        assert_eq!(client.poll_event(), Some(ClientEvent::Renewed(Renewed { cert_pem: "new".into() })));
    }

    #[test]
    fn handshake_window_acks_out_of_order_and_heartbeats_in_virtual_time() {
        let limits =
            ServerLimits { max_in_flight: 2, heartbeat_interval: Duration::from_secs(5), ..Default::default() };
        let mut client = ClientSession::new(hello(PROTOCOL_VERSION));
        let mut server = ServerSession::new(limits);
        assert!(!client.can_send_batch());
        pump_to_server(&mut client, &mut server);
        assert_eq!(server.poll_event(), Some(ServerEvent::Hello(hello(PROTOCOL_VERSION))));
        server.accept("a1".into(), "acme".into());
        pump_to_client(&mut server, &mut client, Duration::ZERO);
        assert!(matches!(client.poll_event(), Some(ClientEvent::Ready(w)) if w.tenant == "acme"));

        // The first heartbeat is due at once, the next one an interval later.
        assert!(client.handle_timeout(Duration::ZERO));
        client.send_heartbeat(Heartbeat::default(), Duration::ZERO);
        assert!(!client.handle_timeout(Duration::from_secs(4)));
        assert!(client.handle_timeout(Duration::from_secs(5)));

        client.send_batch(batch(0)).unwrap();
        client.send_batch(batch(2)).unwrap();
        assert!(!client.can_send_batch(), "window of 2 is full");
        assert!(client.send_batch(batch(4)).is_err());
        pump_to_server(&mut client, &mut server);
        assert!(matches!(server.poll_event(), Some(ServerEvent::Heartbeat(_))));
        assert_eq!(server.poll_event(), Some(ServerEvent::Batch(batch(0))));
        assert_eq!(server.poll_event(), Some(ServerEvent::Batch(batch(2))));

        // Acks in reverse order are fine.
        server.ack(Ack { source_id: "s".into(), first_seq: 2, count: 2 });
        server.ack(Ack { source_id: "s".into(), first_seq: 0, count: 2 });
        pump_to_client(&mut server, &mut client, Duration::from_secs(1));
        assert!(matches!(client.poll_event(), Some(ClientEvent::Acked(a)) if a.first_seq == 2));
        assert!(matches!(client.poll_event(), Some(ClientEvent::Acked(a)) if a.first_seq == 0));
        assert!(client.can_send_batch());
        assert_eq!(client.n_in_flight(), 0);
    }

    #[test]
    fn server_refuses_wrong_version_unauthenticated_batches_and_window_overrun() {
        let mut server = ServerSession::new(ServerLimits::default());
        let err = server.handle_frame(Frame::Hello(hello(99))).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert!(matches!(server.poll_transmit(), Some(Frame::Error(e)) if e.code == ErrorCode::UnsupportedVersion));
        assert!(server.is_closed());

        let mut server = ServerSession::new(ServerLimits::default());
        let err = server.handle_frame(Frame::Batch(batch(0))).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthenticated);

        let mut server = ServerSession::new(ServerLimits { max_in_flight: 1, ..Default::default() });
        server.handle_frame(Frame::Hello(hello(PROTOCOL_VERSION))).unwrap();
        server.accept("a1".into(), "t".into());
        server.handle_frame(Frame::Batch(batch(0))).unwrap();
        let err = server.handle_frame(Frame::Batch(batch(2))).unwrap_err();
        assert_eq!(err.code, ErrorCode::ProtocolViolation);

        let mut server = ServerSession::new(ServerLimits { max_batch_bytes: 4, ..Default::default() });
        server.handle_frame(Frame::Hello(hello(PROTOCOL_VERSION))).unwrap();
        server.reject("unknown agent a1".into());
        assert!(server.is_closed());
        let mut server = ServerSession::new(ServerLimits { max_batch_bytes: 4, ..Default::default() });
        server.handle_frame(Frame::Hello(hello(PROTOCOL_VERSION))).unwrap();
        server.accept("a1".into(), "t".into());
        let err = server.handle_frame(Frame::Batch(batch(0))).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidBatch);
    }

    #[test]
    fn client_refuses_unknown_acks_and_reports_gateway_errors() {
        let mut client = ClientSession::new(hello(PROTOCOL_VERSION));
        client.poll_transmit();
        let err = client
            .handle_frame(Frame::Ack(Ack { source_id: "s".into(), first_seq: 0, count: 1 }), Duration::ZERO)
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::ProtocolViolation);

        let mut client = ClientSession::new(hello(PROTOCOL_VERSION));
        let e = ErrorFrame { code: ErrorCode::Unauthenticated, message: "no".into() };
        client.handle_frame(Frame::Error(e.clone()), Duration::ZERO).unwrap();
        assert_eq!(client.poll_event(), Some(ClientEvent::Closed(e)));
        assert!(!client.can_send_batch());
    }

    /// Refused events come before their batch's ack; only the ack frees the window. An agent
    /// that does not take refusals gets none (the gateway closes on such batches instead).
    #[test]
    fn refusals_precede_the_ack_and_only_for_agents_that_take_them() {
        let mut server = ServerSession::new(ServerLimits::default());
        server.handle_frame(Frame::Hello(hello(PROTOCOL_VERSION))).unwrap();
        assert!(server.takes_refusals());
        let mut old = ServerSession::new(ServerLimits::default());
        old.handle_frame(Frame::Hello(Hello { refusals: false, ..hello(PROTOCOL_VERSION) })).unwrap();
        assert!(!old.takes_refusals());

        let mut client = ClientSession::new(hello(PROTOCOL_VERSION));
        let _ = client.poll_transmit();
        client
            .handle_frame(
                Frame::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    tenant: "acme".into(),
                    max_in_flight: 2,
                    max_batch_bytes: 1 << 20,
                    max_batch_events: 100,
                    heartbeat_interval_ms: 5_000,
                    max_event_bytes: None,
                    schema_versions: vec![crate::event::SCHEMA_VERSION],
                    zstd_frames: true,
                }),
                Duration::ZERO,
            )
            .unwrap();
        let _ = client.poll_event();
        let batch = Batch {
            source_id: "s".into(),
            first_seq: 0,
            count: 3,
            codec: crate::wire::Codec::Plain,
            payload: "x".into(),
        };
        client.send_batch(batch).unwrap();
        let refused = Refused {
            source_id: "s".into(),
            first_seq: 0,
            count: 3,
            events: vec![crate::batch::RefusedEvent {
                index: 1,
                seq: Some(1),
                kind: crate::batch::RefusalKind::ForeignTenant,
                reason: "bad".into(),
            }],
            whole: None,
        };
        client.handle_frame(Frame::Refused(refused.clone()), Duration::ZERO).unwrap();
        assert_eq!(client.poll_event(), Some(ClientEvent::Refused(refused)));
        assert_eq!(client.n_in_flight(), 1, "the ack frees the window, not the refusal");
        client.handle_frame(Frame::Ack(Ack { source_id: "s".into(), first_seq: 0, count: 3 }), Duration::ZERO).unwrap();
        assert!(matches!(client.poll_event(), Some(ClientEvent::Acked(_))));
        assert_eq!(client.n_in_flight(), 0);
    }
}
