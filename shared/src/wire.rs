//! Frames of the agent-gateway protocol and their codec.
//!
//! A connection carries one bidirectional stream of frames:
//!
//! ```text
//! frame   := length:u32be  type:u8  body            (length counts type + body)
//! ```
//!
//! | type | frame | body | sent by |
//! |---|---|---|---|
//! | 1 | [`Hello`] | JSON | agent, first |
//! | 2 | [`Welcome`] | JSON | gateway, once the agent is authenticated |
//! | 3 | [`Batch`] | binary, below | agent |
//! | 4 | [`Ack`] | binary, below | gateway, once the batch is durable |
//! | 5 | [`Heartbeat`] | JSON | agent, periodically |
//! | 6 | [`ErrorFrame`] | JSON | either side, then it closes |
//! | 7 | [`Enroll`] | JSON | agent, first, instead of a hello (no client certificate yet) |
//! | 8 | [`Enrolled`] | JSON | gateway, the agent's certificate; then it closes |
//! | 9 | [`Renew`] | JSON | agent, on an authenticated session |
//! | 10 | [`Renewed`] | JSON | gateway, the renewed certificate |
//! | 11 | [`Refused`] | JSON | gateway: events of a batch it will never take, before the batch's ack (to agents whose hello says `refusals`) |
//! | 12 | [`ConfigPush`] | JSON | gateway: the configuration of the agent's group, to agents whose hello says `config` |
//!
//! Control frames are JSON so that they can grow optional fields without a version bump; the
//! hot frames are binary:
//!
//! ```text
//! batch := source_len:u16be source_id:utf8 first_seq:u64be count:u32be codec:u8 payload
//! ack   := source_len:u16be source_id:utf8 first_seq:u64be count:u32be
//! ```
//!
//! Decoding never panics and tells "need more bytes" (`Ok(None)`) from "malformed" (`Err`).

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version of the protocol in this module. A gateway refuses a hello of another version with
/// [`ErrorCode::UnsupportedVersion`].
pub const PROTOCOL_VERSION: u16 = 2;

/// ALPN identifier of the protocol on QUIC and TLS.
pub const ALPN: &[u8] = b"actidash/2";

/// Largest frame a decoder accepts unless told otherwise (16 MiB).
pub const DEFAULT_MAX_FRAME_LEN: usize = 16 * 1024 * 1024;

const HEADER_LEN: usize = 4;
const MAX_SOURCE_ID_LEN: usize = 256;

/// One frame of the protocol.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    Hello(Hello),
    Welcome(Welcome),
    Batch(Batch),
    Ack(Ack),
    Heartbeat(Heartbeat),
    Error(ErrorFrame),
    Enroll(Enroll),
    Enrolled(Enrolled),
    Renew(Renew),
    Renewed(Renewed),
    Refused(Refused),
    ConfigPush(ConfigPush),
}

/// The agent introduces itself. Its identity is its client certificate's; `agent_id` must
/// name the same agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u16,
    pub agent_id: String,
    pub agent_version: String,
    /// The agent takes [`Refused`] for events the gateway will never accept (and moves them
    /// aside); without it the gateway closes the session on such a batch, as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refusals: bool,
    /// The agent takes its configuration from the cloud (`config_source = "cloud"`): its group
    /// and the version it runs. Absent: it keeps its local file and is never pushed one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigState>,
}

/// Where an agent that takes its configuration from the cloud stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigState {
    /// The agent's group (its local file's `group`).
    pub group: String,
    /// The pushed version it runs; none: its local file's sources (nothing pushed yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// `applied` (running and proven), `trial` (running, within its grace period),
    /// `rolled_back` (the last push failed: it runs `version`, the last good one), `refused`
    /// (the last push did not validate on the agent: it runs `version`), `local` (no push yet).
    pub state: String,
    /// The last version that failed on the agent (never pushed to it again), and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_version: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A configuration of the agent's group, pushed over its session: the `[[sources]]` and
/// `[shipper]` of an agent configuration (TOML), never a secret (sources name env or file
/// secrets on the host). The agent validates it, applies it through its reload path and
/// reports the outcome in its heartbeats ([`Heartbeat::config`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigPush {
    pub group: String,
    pub version: u64,
    pub text: String,
}

/// Events of the batch (`source_id`, `first_seq`, `count`) the gateway will never take: each
/// is invalid (naming another tenant or agent, an unknown schema, an empty key…), not
/// unavailable. The batch's other events are written as usual and the batch is acknowledged
/// after; the refused ones are declared holes in the source's seqs (like quarantined events),
/// which the agent moves aside with their reasons. Sent before the batch's [`Ack`].
///
/// A batch that cannot be read as a whole (it does not decompress within the limit, or holds
/// more events than it announced) is refused whole: `whole` says why and every event of the
/// span is moved aside, so that a damaged batch cannot stop its source either.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    pub source_id: String,
    pub first_seq: u64,
    pub count: u32,
    pub events: Vec<crate::batch::RefusedEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole: Option<WholeRefusal>,
}

/// Why a whole batch was refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WholeRefusal {
    pub kind: crate::batch::RefusalKind,
    pub reason: String,
}

/// An agent without a certificate asks for one with an enrollment token. Never logged whole:
/// the token is a secret, so drivers log fields.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Enroll {
    pub protocol_version: u16,
    /// The id the agent asks to be enrolled under.
    pub agent_id: String,
    pub token: String,
    /// A PKCS#10 request (PEM) for the agent's key, which never leaves its host.
    pub csr_pem: String,
}

impl std::fmt::Debug for Enroll {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroll").field("agent_id", &self.agent_id).field("token", &"***").finish_non_exhaustive()
    }
}

/// The agent's certificate, naming its id and tenant, and the CA that signed it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Enrolled {
    pub agent_id: String,
    pub tenant: String,
    pub cert_pem: String,
    pub ca_pem: String,
}

/// An authenticated agent asks for a new certificate for a new key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Renew {
    pub csr_pem: String,
}

/// The renewed certificate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Renewed {
    pub cert_pem: String,
}

/// The gateway accepted the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    pub protocol_version: u16,
    /// The tenant the gateway bound this agent to.
    pub tenant: String,
    /// How many batches the agent may have unacknowledged at once.
    pub max_in_flight: u32,
    /// The largest batch payload (compressed bytes) the gateway accepts.
    pub max_batch_bytes: u32,
    /// The largest number of events in one batch.
    pub max_batch_events: u32,
    /// How often the gateway expects a heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u64,
    /// The largest event (its JSON) the gateway can deliver to its store (Kafka's message
    /// limit, less room for the key and the record's framing); the agent treats a bigger one
    /// as a bad record instead of sending it for ever. Absent: no limit stated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_event_bytes: Option<u32>,
    /// The event schema versions the gateway reads ([`crate::event::SCHEMA_VERSION`]); an
    /// agent writing another holds its events until a gateway that reads them appears. Absent
    /// (an older gateway): version 1 only.
    #[serde(default = "legacy_schema_versions")]
    pub schema_versions: Vec<u16>,
    /// The gateway reads a zstd payload made of several frames one after another (what the
    /// agent's spooled blocks are, sent as they are). Absent (an older gateway): one frame only,
    /// and the agent packs each batch whole.
    #[serde(default)]
    pub zstd_frames: bool,
}

fn legacy_schema_versions() -> Vec<u16> {
    vec![1]
}

/// How a batch payload is packed (see [`crate::batch`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// JSON lines.
    Plain = 0,
    /// JSON lines, zstd-compressed.
    Zstd = 1,
}

/// Events of one source from the span of seqs `first_seq .. first_seq + count`, in increasing
/// seq order. A span may have holes: seqs the agent quarantined (a damaged spool row) or dropped
/// (`drop_oldest`) are never sent, and the acknowledgement covers the whole span.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub source_id: String,
    pub first_seq: u64,
    pub count: u32,
    pub codec: Codec,
    pub payload: Bytes,
}

/// The gateway made the batch (`source_id`, `first_seq`, `count`) durable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ack {
    pub source_id: String,
    pub first_seq: u64,
    pub count: u32,
}

/// Health of an agent, sent periodically.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub agent_version: String,
    /// The transport in use: `quic`, or `tcp` (the fallback).
    #[serde(default)]
    pub transport: String,
    pub uptime_secs: u64,
    /// Events waiting in the spool.
    pub spool_events: u64,
    /// Bytes used by the spool file.
    pub spool_bytes: u64,
    pub sources: Vec<SourceStatus>,
    /// Why the agent holds its events instead of sending them (a gateway that cannot read
    /// their schema version), if it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<String>,
    /// The spool's limit (`[spool] max_bytes`), to judge how full it is.
    #[serde(default)]
    pub spool_max_bytes: u64,
    /// When the agent's certificate expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_not_after: Option<i64>,
    /// The agent's last time without the cloud while it ran (cut off), reported from the
    /// session after it; repeated in every heartbeat until the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_outage: Option<Outage>,
    /// Where the agent's configuration stands, if it takes it from the cloud.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ConfigState>,
}

/// A time the agent ran without reaching the cloud.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outage {
    /// When it lost the cloud (or started without it), Unix milliseconds.
    pub from_ms: i64,
    /// When it reached the cloud again.
    pub to_ms: i64,
    /// Events its sources spooled meanwhile (kept, then sent).
    pub buffered_events: u64,
}

/// Health of one source of an agent.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceStatus {
    pub source_id: String,
    /// `running`, `waiting` (nothing to read), `held` (a database source waiting for running
    /// transactions before it reads on), `paused` (spool full), `error`.
    pub state: String,
    /// Human-readable position (for a file: path and byte offset).
    pub position: String,
    /// The next sequence number the source will assign.
    pub next_seq: u64,
    /// Records refused (bad input), in all.
    pub n_errors: u64,
    /// Events dropped from a full spool (`when_full = "drop_oldest"`), in all.
    #[serde(default)]
    pub n_dropped: u64,
    /// Events found damaged in the spool and quarantined, in all.
    #[serde(default)]
    pub n_quarantined: u64,
    /// Events the gateway refused for good, moved aside in the spool, in all.
    #[serde(default)]
    pub n_refused: u64,
    /// The same, by kind of refusal ([`crate::batch::RefusalKind`]: `foreign_tenant`,
    /// `unknown_schema`, `too_large`…).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub refused_by_reason: std::collections::BTreeMap<String, u64>,
    /// Records skipped by the mapping's conditions (`where`) since the agent started, by
    /// condition: not errors, not events.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub skipped: std::collections::BTreeMap<String, u64>,
    /// Age of the source's oldest event not yet acknowledged by the cloud, in milliseconds, when
    /// the heartbeat was made (0: none waiting).
    #[serde(default)]
    pub lag_ms: u64,
    /// The event time of the newest record it spooled (Unix ms), if any since it started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time_ms: Option<i64>,
    /// A file source: the bytes of its open files not read yet (how far behind their ends it
    /// is; compressed files are not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_behind: Option<u64>,
    /// A database source read by polling: the committed rows after its position (counted every
    /// 10 s, at most a million).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_behind: Option<u64>,
    /// PostgreSQL logical replication: the WAL its slot retains, and the most allowed
    /// (`max_retained_wal_mb`), in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retained_wal_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_retained_wal_bytes: Option<u64>,
    /// The last error, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Why a side is closing the connection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
}

/// Error codes. `retryable()` tells an agent whether reconnecting may help.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    UnsupportedVersion,
    Unauthenticated,
    ProtocolViolation,
    MalformedFrame,
    FrameTooLarge,
    InvalidBatch,
    /// The gateway could not make data durable (e.g. Kafka unreachable); retry later.
    Unavailable,
    ShuttingDown,
}

impl ErrorCode {
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Unavailable | ErrorCode::ShuttingDown)
    }
}

/// A frame that cannot be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge { len: usize, limit: usize },
    #[error("empty frame (no type byte)")]
    Empty,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    #[error("malformed {frame} frame: {reason}")]
    Malformed { frame: &'static str, reason: String },
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Frame::Hello(_) => 1,
            Frame::Welcome(_) => 2,
            Frame::Batch(_) => 3,
            Frame::Ack(_) => 4,
            Frame::Heartbeat(_) => 5,
            Frame::Error(_) => 6,
            Frame::Enroll(_) => 7,
            Frame::Enrolled(_) => 8,
            Frame::Renew(_) => 9,
            Frame::Renewed(_) => 10,
            Frame::Refused(_) => 11,
            Frame::ConfigPush(_) => 12,
        }
    }

    /// A short name for logs and errors.
    pub fn name(&self) -> &'static str {
        type_name(self.type_byte())
    }

    /// Appends the encoded frame to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let start = out.len();
        out.put_u32(0); // patched below
        out.put_u8(self.type_byte());
        match self {
            Frame::Hello(v) => put_json(out, v),
            Frame::Welcome(v) => put_json(out, v),
            Frame::Heartbeat(v) => put_json(out, v),
            Frame::Error(v) => put_json(out, v),
            Frame::Enroll(v) => put_json(out, v),
            Frame::Enrolled(v) => put_json(out, v),
            Frame::Renew(v) => put_json(out, v),
            Frame::Renewed(v) => put_json(out, v),
            Frame::Refused(v) => put_json(out, v),
            Frame::ConfigPush(v) => put_json(out, v),
            Frame::Batch(b) => {
                put_source_id(out, &b.source_id);
                out.put_u64(b.first_seq);
                out.put_u32(b.count);
                out.put_u8(b.codec as u8);
                out.put_slice(&b.payload);
            }
            Frame::Ack(a) => {
                put_source_id(out, &a.source_id);
                out.put_u64(a.first_seq);
                out.put_u32(a.count);
            }
        }
        let len = (out.len() - start - HEADER_LEN) as u32;
        out[start..start + HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    }

    /// The frame as a standalone buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut out = BytesMut::new();
        self.encode(&mut out);
        out.freeze()
    }

    /// Takes one frame off the front of `buf`: `Ok(None)` if more bytes are needed (nothing is
    /// consumed then), `Err` if the bytes can never form a valid frame.
    pub fn decode(buf: &mut BytesMut, max_frame_len: usize) -> Result<Option<Frame>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > max_frame_len {
            return Err(DecodeError::FrameTooLarge { len, limit: max_frame_len });
        }
        if len == 0 {
            return Err(DecodeError::Empty);
        }
        if buf.len() < HEADER_LEN + len {
            return Ok(None);
        }
        buf.advance(HEADER_LEN);
        let mut body = buf.split_to(len).freeze();
        let ty = body.get_u8();
        decode_body(ty, body).map(Some)
    }
}

fn type_name(ty: u8) -> &'static str {
    match ty {
        1 => "hello",
        2 => "welcome",
        3 => "batch",
        4 => "ack",
        5 => "heartbeat",
        6 => "error",
        7 => "enroll",
        8 => "enrolled",
        9 => "renew",
        10 => "renewed",
        11 => "refused",
        12 => "config push",
        _ => "unknown",
    }
}

fn decode_body(ty: u8, mut body: Bytes) -> Result<Frame, DecodeError> {
    let frame = type_name(ty);
    let malformed = |reason: String| DecodeError::Malformed { frame, reason };
    match ty {
        1 => Ok(Frame::Hello(get_json(frame, &body)?)),
        2 => Ok(Frame::Welcome(get_json(frame, &body)?)),
        5 => Ok(Frame::Heartbeat(get_json(frame, &body)?)),
        6 => Ok(Frame::Error(get_json(frame, &body)?)),
        7 => Ok(Frame::Enroll(get_json(frame, &body)?)),
        8 => Ok(Frame::Enrolled(get_json(frame, &body)?)),
        9 => Ok(Frame::Renew(get_json(frame, &body)?)),
        10 => Ok(Frame::Renewed(get_json(frame, &body)?)),
        11 => Ok(Frame::Refused(get_json(frame, &body)?)),
        12 => Ok(Frame::ConfigPush(get_json(frame, &body)?)),
        3 => {
            let source_id = get_source_id(frame, &mut body)?;
            if body.remaining() < 8 + 4 + 1 {
                return Err(malformed(format!("{} bytes left for a 13-byte header", body.remaining())));
            }
            let first_seq = body.get_u64();
            let count = body.get_u32();
            let codec = match body.get_u8() {
                0 => Codec::Plain,
                1 => Codec::Zstd,
                other => return Err(malformed(format!("unknown codec {other}"))),
            };
            if count == 0 {
                return Err(malformed("count is 0".into()));
            }
            if first_seq.checked_add(u64::from(count)).is_none() {
                return Err(malformed(format!("first_seq {first_seq} + count {count} overflows")));
            }
            Ok(Frame::Batch(Batch { source_id, first_seq, count, codec, payload: body }))
        }
        4 => {
            let source_id = get_source_id(frame, &mut body)?;
            if body.remaining() != 8 + 4 {
                return Err(malformed(format!("{} bytes where 12 were expected", body.remaining())));
            }
            Ok(Frame::Ack(Ack { source_id, first_seq: body.get_u64(), count: body.get_u32() }))
        }
        other => Err(DecodeError::UnknownType(other)),
    }
}

fn put_json<T: Serialize>(out: &mut BytesMut, value: &T) {
    // Plain data structs with string keys always serialize.
    let json = serde_json::to_vec(value).unwrap_or_default();
    out.put_slice(&json);
}

fn get_json<T: for<'de> Deserialize<'de>>(frame: &'static str, body: &Bytes) -> Result<T, DecodeError> {
    serde_json::from_slice(body).map_err(|e| DecodeError::Malformed { frame, reason: e.to_string() })
}

fn put_source_id(out: &mut BytesMut, source_id: &str) {
    let bytes = &source_id.as_bytes()[..source_id.len().min(MAX_SOURCE_ID_LEN)];
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn get_source_id(frame: &'static str, body: &mut Bytes) -> Result<String, DecodeError> {
    let malformed = |reason: String| DecodeError::Malformed { frame, reason };
    if body.remaining() < 2 {
        return Err(malformed("truncated source id length".into()));
    }
    let len = body.get_u16() as usize;
    if len == 0 || len > MAX_SOURCE_ID_LEN {
        return Err(malformed(format!("source id length {len} not in 1..={MAX_SOURCE_ID_LEN}")));
    }
    if body.remaining() < len {
        return Err(malformed(format!("source id of {len} bytes but {} left", body.remaining())));
    }
    let raw = body.split_to(len);
    String::from_utf8(raw.to_vec()).map_err(|_| malformed("source id is not UTF-8".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_./-]{1,40}"
    }

    fn arb_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (any::<u16>(), arb_text(), arb_text()).prop_map(|(v, a, b)| Frame::Hello(Hello {
                refusals: v % 2 == 0,
                config: (v % 3 == 0).then(|| ConfigState {
                    group: b.clone(),
                    version: (v % 5 != 0).then_some(u64::from(v)),
                    state: "applied".into(),
                    failed_version: (v % 7 == 0).then_some(u64::from(v) + 1),
                    error: (v % 7 == 0).then(|| a.clone()),
                }),
                protocol_version: v,
                agent_id: a,
                agent_version: b,
            })),
            (arb_text(), any::<u64>(), ".{0,200}").prop_map(|(group, version, text)| Frame::ConfigPush(ConfigPush {
                group,
                version,
                text
            })),
            (arb_text(), arb_text(), arb_text()).prop_map(|(a, t, c)| Frame::Enroll(Enroll {
                protocol_version: PROTOCOL_VERSION,
                agent_id: a,
                token: t,
                csr_pem: c
            })),
            (arb_text(), arb_text(), arb_text()).prop_map(|(a, t, c)| Frame::Enrolled(Enrolled {
                agent_id: a,
                tenant: t,
                cert_pem: c.clone(),
                ca_pem: c
            })),
            arb_text().prop_map(|c| Frame::Renew(Renew { csr_pem: c })),
            arb_text().prop_map(|c| Frame::Renewed(Renewed { cert_pem: c })),
            (arb_text(), any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(tenant, a, b, c, d)| {
                Frame::Welcome(Welcome {
                    protocol_version: PROTOCOL_VERSION,
                    tenant,
                    max_in_flight: a,
                    max_batch_bytes: b,
                    max_batch_events: c,
                    heartbeat_interval_ms: d,
                    max_event_bytes: (a % 2 == 0).then_some(b),
                    schema_versions: vec![1, (c % 5) as u16],
                    zstd_frames: d % 2 == 0,
                })
            }),
            (arb_text(), 0..u64::MAX / 2, 1..u32::MAX, any::<bool>(), proptest::collection::vec(any::<u8>(), 0..300))
                .prop_map(|(source_id, first_seq, count, zstd, payload)| Frame::Batch(Batch {
                    source_id,
                    first_seq,
                    count,
                    codec: if zstd { Codec::Zstd } else { Codec::Plain },
                    payload: payload.into()
                })),
            (arb_text(), any::<u64>(), any::<u32>()).prop_map(|(source_id, first_seq, count)| Frame::Ack(Ack {
                source_id,
                first_seq,
                count
            })),
            (arb_text(), any::<u64>(), arb_text(), any::<u64>()).prop_map(|(v, up, sid, n)| {
                Frame::Heartbeat(Heartbeat {
                    agent_version: v,
                    transport: "quic".into(),
                    uptime_secs: up,
                    spool_events: n,
                    spool_bytes: n / 2,
                    sources: vec![SourceStatus {
                        source_id: sid,
                        state: "running".into(),
                        position: "f:10".into(),
                        next_seq: n,
                        n_errors: 1,
                        n_dropped: 2,
                        n_quarantined: 3,
                        n_refused: 4,
                        refused_by_reason: [("foreign_tenant".to_owned(), 3), ("too_large".to_owned(), 1)].into(),
                        skipped: [("test orders".to_owned(), 2)].into(),
                        lag_ms: n / 3,
                        bytes_behind: (n % 2 == 1).then_some(n / 7),
                        last_event_time_ms: (n % 3 == 1).then_some(1_796_000_000_000),
                        rows_behind: (n % 5 == 2).then_some(n / 11),
                        retained_wal_bytes: Some(n),
                        max_retained_wal_bytes: None,
                        last_error: Some("bad".into()),
                    }],
                    holding: (n % 2 == 0).then(|| "waiting for schema v2".into()),
                    spool_max_bytes: n.saturating_mul(4),
                    cert_not_after: (n % 3 == 0).then_some(1_800_000_000),
                    config: (n % 4 == 0).then(|| ConfigState {
                        group: "stores".into(),
                        version: Some(n),
                        state: "rolled_back".into(),
                        failed_version: Some(n + 1),
                        error: Some("source shop: unable to open database file".into()),
                    }),
                    last_outage: (n % 2 == 1).then_some(Outage {
                        from_ms: 1_000,
                        to_ms: 2_000,
                        buffered_events: n / 5,
                    }),
                })
            }),
            arb_text().prop_map(|m| Frame::Error(ErrorFrame { code: ErrorCode::InvalidBatch, message: m })),
            (arb_text(), any::<u64>(), any::<u32>(), arb_text()).prop_map(|(source_id, first_seq, count, reason)| {
                let kind = crate::batch::RefusalKind::ALL[count as usize % 7];
                let whole = (count % 3 == 0).then(|| WholeRefusal { kind, reason: reason.clone() });
                let events = vec![crate::batch::RefusedEvent { index: count % 7, seq: Some(first_seq), kind, reason }];
                Frame::Refused(Refused { source_id, first_seq, count, events, whole })
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_in_any_split(frames in proptest::collection::vec(arb_frame(), 1..6), split in 0usize..2000) {
            let mut wire = BytesMut::new();
            for f in &frames {
                f.encode(&mut wire);
            }
            let split = split.min(wire.len());
            let mut buf = BytesMut::from(&wire[..split]);
            let mut decoded = Vec::new();
            while let Some(f) = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
                decoded.push(f);
            }
            buf.extend_from_slice(&wire[split..]);
            while let Some(f) = Frame::decode(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap() {
                decoded.push(f);
            }
            prop_assert!(buf.is_empty());
            prop_assert_eq!(decoded, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Decode until an error or a need for more bytes; every step must consume or stop.
            while let Ok(Some(_)) = Frame::decode(&mut buf, 1024) {}
        }

        #[test]
        fn valid_header_with_garbage_body_never_panics(ty in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32 + 1);
            buf.put_u8(ty);
            buf.put_slice(&body);
            let _ = Frame::decode(&mut buf, 1024);
        }
    }

    #[test]
    fn tells_partial_from_malformed() {
        let frame = Frame::Ack(Ack { source_id: "s".into(), first_seq: 1, count: 2 });
        let bytes = frame.to_bytes();
        let mut partial = BytesMut::from(&bytes[..bytes.len() - 1]);
        assert_eq!(Frame::decode(&mut partial, 1024), Ok(None));
        assert_eq!(partial.len(), bytes.len() - 1, "nothing consumed on partial input");

        let mut too_large = BytesMut::from(&[0u8, 1, 0, 0, 3][..]);
        assert_eq!(Frame::decode(&mut too_large, 1024), Err(DecodeError::FrameTooLarge { len: 65536, limit: 1024 }));
        let mut unknown = BytesMut::from(&[0u8, 0, 0, 1, 99][..]);
        assert_eq!(Frame::decode(&mut unknown, 1024), Err(DecodeError::UnknownType(99)));
        let mut bad_json = BytesMut::from(&[0u8, 0, 0, 2, 1, b'{'][..]);
        let err = Frame::decode(&mut bad_json, 1024).unwrap_err();
        assert!(err.to_string().starts_with("malformed hello frame"), "{err}");
    }
}
