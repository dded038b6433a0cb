//! Packing a batch's events into a payload, and unpacking it with limits.
//!
//! A payload is the events' canonical JSON, one per line (`\n`-terminated), either as is
//! ([`Codec::Plain`]) or zstd-compressed ([`Codec::Zstd`]). Unpacking bounds the decompressed
//! size, so a small hostile payload cannot expand into gigabytes.

use bytes::Bytes;

use crate::event::{Domain, Event, EventError, EventView};
use crate::wire::{Batch, Codec};

/// Largest decompressed payload accepted unless told otherwise (64 MiB).
pub const DEFAULT_MAX_DECOMPRESSED: usize = 64 * 1024 * 1024;

/// zstd level for batches: fast, and still ~5x smaller on e-commerce JSON.
const ZSTD_LEVEL: i32 = 1;

/// Why a batch payload was refused.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error("payload does not decompress (zstd) within {limit} bytes: {reason}")]
    Decompress { limit: usize, reason: String },
    #[error("batch spans {announced} seqs but its payload holds {found} events")]
    CountMismatch { announced: u32, found: usize },
    #[error("batch payload holds no event")]
    Empty,
    #[error("event {index} of the batch: {source}")]
    Event { index: usize, source: EventError },
    #[error(
        "event {index} of the batch has (agent {agent_id:?}, source {source_id:?}, seq {seq}); expected (agent {expected_agent:?}, source {expected_source:?}, a seq from {expected_seq} inside the batch's span)"
    )]
    WrongIdentity {
        index: usize,
        agent_id: String,
        source_id: String,
        seq: u64,
        expected_agent: String,
        expected_source: String,
        expected_seq: u64,
    },
    #[error("event {index} of the batch claims tenant {found:?}; this agent belongs to {expected:?}")]
    ForeignTenant { index: usize, found: String, expected: String },
    #[error("event {index} of the batch is {len} bytes long; the gateway delivers events of at most {limit} bytes")]
    EventTooLarge { index: usize, len: usize, limit: usize },
}

impl BatchError {
    /// The kind of refusal this fault is, for counting by reason.
    pub fn refusal_kind(&self) -> RefusalKind {
        match self {
            BatchError::Decompress { .. } | BatchError::CountMismatch { .. } | BatchError::Empty => {
                RefusalKind::InvalidBatch
            }
            BatchError::Event { source: EventError::UnsupportedVersion { .. }, .. } => RefusalKind::UnknownSchema,
            BatchError::Event { .. } => RefusalKind::InvalidEvent,
            BatchError::WrongIdentity { .. } => RefusalKind::WrongIdentity,
            BatchError::ForeignTenant { .. } => RefusalKind::ForeignTenant,
            BatchError::EventTooLarge { .. } => RefusalKind::TooLarge,
        }
    }
}

/// Why events were refused for good, as a stable name agents count by (in heartbeats and
/// `edge-agent status`). A name a newer gateway adds reads as `other`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// Not a valid event (JSON, keys, amounts out of bounds…).
    #[default]
    InvalidEvent,
    /// An event schema version the gateway does not read.
    UnknownSchema,
    /// The event names another tenant than the agent's.
    ForeignTenant,
    /// The event names another agent or source, or a seq outside its batch's span.
    WrongIdentity,
    /// Larger than the gateway can deliver.
    TooLarge,
    /// The batch as a whole could not be read (it does not decompress within the limit, or
    /// holds more events than it announced, or none): every event of its span is refused.
    InvalidBatch,
    #[serde(other)]
    Other,
}

impl RefusalKind {
    pub const ALL: [RefusalKind; 7] = [
        RefusalKind::InvalidEvent,
        RefusalKind::UnknownSchema,
        RefusalKind::ForeignTenant,
        RefusalKind::WrongIdentity,
        RefusalKind::TooLarge,
        RefusalKind::InvalidBatch,
        RefusalKind::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefusalKind::InvalidEvent => "invalid_event",
            RefusalKind::UnknownSchema => "unknown_schema",
            RefusalKind::ForeignTenant => "foreign_tenant",
            RefusalKind::WrongIdentity => "wrong_identity",
            RefusalKind::TooLarge => "too_large",
            RefusalKind::InvalidBatch => "invalid_batch",
            RefusalKind::Other => "other",
        }
    }

    /// The kind named `name` (`other` for a name this build does not know).
    pub fn parse(name: &str) -> RefusalKind {
        RefusalKind::ALL.into_iter().find(|k| k.as_str() == name).unwrap_or(RefusalKind::Other)
    }
}

impl std::fmt::Display for RefusalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Packs already-serialized events (each one JSON object, without newline).
pub fn pack<'a>(events: impl IntoIterator<Item = &'a [u8]>, codec: Codec) -> Vec<u8> {
    Packer::default().pack(events, codec)
}

/// Packs batches, reusing its buffer and its zstd context from one batch to the next.
#[derive(Default)]
pub struct Packer {
    plain: Vec<u8>,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl std::fmt::Debug for Packer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packer").finish_non_exhaustive()
    }
}

impl Packer {
    pub fn pack<'a>(&mut self, events: impl IntoIterator<Item = &'a [u8]>, codec: Codec) -> Vec<u8> {
        self.plain.clear();
        for e in events {
            self.plain.extend_from_slice(e);
            self.plain.push(b'\n');
        }
        match codec {
            Codec::Plain => self.plain.clone(),
            Codec::Zstd => {
                if self.compressor.is_none() {
                    self.compressor = zstd::bulk::Compressor::new(ZSTD_LEVEL).ok();
                }
                // Compressing an in-memory buffer fails only on allocation failure.
                match self.compressor.as_mut() {
                    Some(c) => c.compress(&self.plain).unwrap_or_default(),
                    None => zstd::bulk::compress(&self.plain, ZSTD_LEVEL).unwrap_or_default(),
                }
            }
        }
    }
}

/// One checked event of a batch: its JSON exactly as received (what is forwarded to Kafka: it
/// was just parsed and checked, so writing it again would only cost time) and what a record
/// needs beside it. The ids are slices of the JSON wherever it did not escape them: checking
/// an event copies none of its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Unpacked {
    pub json: Bytes,
    pub domain: Domain,
    pub schema_version: u16,
    pub agent_id: Bytes,
    pub source_id: Bytes,
    pub seq: u64,
    /// The record's key.
    pub entity_key: Bytes,
}

impl Unpacked {
    /// The checked `view` of `json`.
    fn new(view: &EventView<'_>, json: &Bytes) -> Unpacked {
        let text = |t: &std::borrow::Cow<'_, str>| match t {
            std::borrow::Cow::Borrowed(s) => json.slice_ref(s.as_bytes()),
            std::borrow::Cow::Owned(s) => Bytes::copy_from_slice(s.as_bytes()),
        };
        Unpacked {
            json: json.clone(),
            domain: view.domain(),
            schema_version: view.schema_version,
            agent_id: text(&view.agent_id),
            source_id: text(&view.source_id),
            seq: view.seq,
            entity_key: text(&view.entity_key),
        }
    }

    /// An event as a gateway unpacks it (for tests and tools), or why the gateway would refuse it.
    pub fn of(event: &Event) -> Result<Unpacked, EventError> {
        let json = Bytes::from(event.to_json());
        let view = EventView::parse(&json)?;
        Ok(Unpacked::new(&view, &json))
    }

    /// The whole typed event (a second parse: only where the event is processed, not forwarded).
    pub fn event(&self) -> Result<Event, EventError> {
        Event::from_json(&self.json)
    }
}

/// An event of a batch refused on its own (the rest of the batch is taken).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedEvent {
    /// Its position among the batch's events (0-based).
    pub index: u32,
    /// Its seq, when it could be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// Why, as a name to count by.
    #[serde(default)]
    pub kind: RefusalKind,
    pub reason: String,
}

/// Unpacks and checks a batch like [`unpack`], but refuses bad events one by one: the events
/// that pass every check are returned, in order, beside the refused ones with their reasons
/// (the gateway writes the good ones and declares the others holes). A fault of the batch as a
/// whole (it does not decompress, holds more events than it announced, or none) is an error.
/// An event longer than `max_event_bytes` is refused ([`RefusalKind::TooLarge`]).
pub fn unpack_each(
    batch: &Batch,
    agent_id: &str,
    tenant: &str,
    max_decompressed: usize,
    max_event_bytes: usize,
) -> Result<UnpackedBatch, BatchError> {
    let (lines, decompressed_bytes) = lines_of(batch, max_decompressed)?;
    if lines.is_empty() {
        return Err(BatchError::Empty);
    }
    if lines.len() > batch.count as usize {
        return Err(BatchError::CountMismatch { announced: batch.count, found: lines.len() });
    }
    let end = batch.first_seq + u64::from(batch.count);
    let mut expected_seq = batch.first_seq;
    let (mut good, mut refused) = (Vec::with_capacity(lines.len()), Vec::new());
    let seq_only = |line: &[u8]| {
        #[derive(serde::Deserialize)]
        struct SeqOnly {
            seq: u64,
        }
        serde_json::from_slice::<SeqOnly>(line).ok().map(|s| s.seq)
    };
    let refuse = |index: usize, seq: Option<u64>, e: BatchError| RefusedEvent {
        index: index as u32,
        seq,
        kind: e.refusal_kind(),
        reason: e.to_string(),
    };
    for (index, line) in lines.into_iter().enumerate() {
        if line.len() > max_event_bytes {
            let e = BatchError::EventTooLarge { index, len: line.len(), limit: max_event_bytes };
            refused.push(refuse(index, seq_only(&line), e));
            continue;
        }
        let event = match EventView::parse(&line) {
            Ok(event) => event,
            Err(source) => {
                refused.push(refuse(index, seq_only(&line), BatchError::Event { index, source }));
                continue;
            }
        };
        match identity_fault(&event, index, agent_id, tenant, &batch.source_id, expected_seq, end) {
            Some(e) => refused.push(refuse(index, Some(event.seq), e)),
            None => {
                expected_seq = event.seq + 1;
                good.push(Unpacked::new(&event, &line));
            }
        }
    }
    Ok(UnpackedBatch { events: good, refused, decompressed_bytes })
}

/// Why the event at `index` of a batch may not be taken from `agent_id` of `tenant`: another
/// agent, source or tenant, or a seq outside `expected_seq..end` (the batch's span, increasing).
fn identity_fault(
    event: &EventView<'_>,
    index: usize,
    agent_id: &str,
    tenant: &str,
    source_id: &str,
    expected_seq: u64,
    end: u64,
) -> Option<BatchError> {
    let in_span = event.seq >= expected_seq && event.seq < end;
    if event.agent_id != agent_id || event.source_id != source_id || !in_span {
        Some(BatchError::WrongIdentity {
            index,
            agent_id: event.agent_id.clone().into_owned(),
            source_id: event.source_id.clone().into_owned(),
            seq: event.seq,
            expected_agent: agent_id.to_owned(),
            expected_source: source_id.to_owned(),
            expected_seq,
        })
    } else if event.tenant != tenant {
        Some(BatchError::ForeignTenant { index, found: event.tenant.clone().into_owned(), expected: tenant.to_owned() })
    } else {
        None
    }
}

/// What [`unpack_each`] found in a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct UnpackedBatch {
    /// The events that passed every check, in order.
    pub events: Vec<Unpacked>,
    /// The others, with their reasons.
    pub refused: Vec<RefusedEvent>,
    /// The payload's size once decompressed (what a byte budget charges).
    pub decompressed_bytes: usize,
}

/// The event lines of a batch, decompressed within `max_decompressed` bytes, and their size.
fn lines_of(batch: &Batch, max_decompressed: usize) -> Result<(Vec<Bytes>, usize), BatchError> {
    let bytes = decompressed(batch, max_decompressed)?;
    Ok((lines(&bytes).collect(), bytes.len()))
}

/// The non-empty lines of `bytes` (split at `\n`), as slices of it. The ends are found by
/// memchr (SIMD), not byte by byte: this runs over every byte a gateway receives.
fn lines(bytes: &Bytes) -> impl Iterator<Item = Bytes> + '_ {
    let ends = memchr::memchr_iter(b'\n', bytes).chain(std::iter::once(bytes.len()));
    ends.scan(0, |start, end| {
        let line = *start..end;
        *start = end + 1;
        Some(line)
    })
    .filter(|line| !line.is_empty())
    .map(|line| bytes.slice(line))
}

/// What the zstd frames of `payload` (one or several, one after another) announce they hold
/// together; None if a frame states no size or does not parse (decompressing then bounds it).
fn announced_size(mut payload: &[u8]) -> Option<u64> {
    let mut total = 0u64;
    while !payload.is_empty() {
        let size = zstd::zstd_safe::get_frame_content_size(payload).ok().flatten()?;
        let len = zstd::zstd_safe::find_frame_compressed_size(payload).ok()?;
        total = total.checked_add(size)?;
        payload = payload.get(len.max(1)..)?;
    }
    Some(total)
}

/// A batch's payload as JSON lines, at most `max_decompressed` bytes.
fn decompressed(batch: &Batch, max_decompressed: usize) -> Result<Bytes, BatchError> {
    Ok(match batch.codec {
        Codec::Plain => {
            if batch.payload.len() > max_decompressed {
                return Err(BatchError::Decompress {
                    limit: max_decompressed,
                    reason: format!("plain payload of {} bytes", batch.payload.len()),
                });
            }
            batch.payload.clone()
        }
        Codec::Zstd => {
            // The frame headers state the size: a payload announcing more than the limit is
            // refused before any work (a 2 KB frame can expand to 60 MiB). A payload may be
            // several frames one after another (an agent's spooled blocks); their sizes add up.
            let announced = announced_size(&batch.payload);
            if let Some(size) = announced
                && size > max_decompressed as u64
            {
                return Err(BatchError::Decompress {
                    limit: max_decompressed,
                    reason: format!("its frames announce {size} bytes"),
                });
            }
            // Room for what the frames announce (an agent's always do), not for the limit: a
            // buffer of the limit's size per batch costs more than the decompression. A frame
            // that holds more than it announced fails here like one beyond the limit.
            let capacity = announced.map_or(max_decompressed, |size| size as usize);
            zstd::bulk::decompress(&batch.payload, capacity)
                .map_err(|e| BatchError::Decompress { limit: max_decompressed, reason: e.to_string() })?
                .into()
        }
    })
}

/// Unpacks and checks a batch received from `agent_id` of `tenant`: every event must parse,
/// belong to that agent, tenant and the batch's source, and carry increasing sequence numbers
/// inside the span the batch announced (holes are allowed, see [`Batch`]).
pub fn unpack(
    batch: &Batch,
    agent_id: &str,
    tenant: &str,
    max_decompressed: usize,
) -> Result<Vec<Unpacked>, BatchError> {
    let bytes = decompressed(batch, max_decompressed)?;
    let mut events = Vec::with_capacity(batch.count.min(100_000) as usize);
    let end = batch.first_seq + u64::from(batch.count);
    let mut expected_seq = batch.first_seq;
    for (index, line) in lines(&bytes).enumerate() {
        if index >= batch.count as usize {
            return Err(BatchError::CountMismatch { announced: batch.count, found: index + 1 });
        }
        let event = EventView::parse(&line).map_err(|source| BatchError::Event { index, source })?;
        if let Some(e) = identity_fault(&event, index, agent_id, tenant, &batch.source_id, expected_seq, end) {
            return Err(e);
        }
        expected_seq = event.seq + 1;
        events.push(Unpacked::new(&event, &line));
    }
    if events.is_empty() {
        return Err(BatchError::Empty);
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{BehaviorEvent, BehaviorKind, Payload};

    fn event(tenant: &str, seq: u64) -> Event {
        Event::new(
            tenant.into(),
            "a1".into(),
            "web".into(),
            seq,
            "2026-11-27T10:00:00Z".parse().unwrap(),
            Payload::Behavior(BehaviorEvent {
                visitor_id: format!("v{seq}"),
                kind: BehaviorKind::PageView,
                url: Some("/".into()),
                referrer: None,
            }),
        )
    }

    /// Bad events are refused one by one, each with its place, seq and reason; the others are
    /// taken in order. A fault of the batch as a whole is still an error.
    #[test]
    fn lines_are_split_at_each_newline_and_empty_ones_dropped() {
        let split = |text: &'static str| -> Vec<Bytes> { lines(&Bytes::from_static(text.as_bytes())).collect() };
        assert_eq!(split("a\n\nbc\n{\"d\":1}"), ["a", "bc", "{\"d\":1}"]);
        assert_eq!(split("a\n"), ["a"]);
        assert_eq!(split("\n\n"), Vec::<Bytes>::new());
        assert_eq!(split(""), Vec::<Bytes>::new());
        let long = "x".repeat(100);
        let text = format!("{long}\n{long}y\n\n{long}z");
        let got: Vec<Bytes> = lines(&Bytes::from(text.clone())).collect();
        assert_eq!(got, text.split('\n').filter(|l| !l.is_empty()).collect::<Vec<_>>());
    }

    #[test]
    fn unpack_each_refuses_bad_events_and_keeps_the_rest() {
        let mut events: Vec<Event> = (10..16).map(|s| event("acme", s)).collect();
        events[1].tenant = "other".into();
        let mut json: Vec<Vec<u8>> = events.iter().map(Event::to_json).collect();
        json[3] = br#"{"seq": 13, "not": "an event"}"#.to_vec();
        json[4] = b"{broken".to_vec();
        let batch = Batch {
            source_id: "web".into(),
            first_seq: 10,
            count: 6,
            codec: Codec::Zstd,
            payload: pack(json.iter().map(Vec::as_slice), Codec::Zstd).into(),
        };
        let UnpackedBatch { events: good, refused, decompressed_bytes } =
            unpack_each(&batch, "a1", "acme", 1 << 20, 1 << 20).unwrap();
        assert_eq!(decompressed_bytes, json.iter().map(|j| j.len() + 1).sum::<usize>());
        let seqs: Vec<u64> = good.iter().map(|u| u.seq).collect();
        assert_eq!(seqs, [10, 12, 15]);
        let places: Vec<(u32, Option<u64>)> = refused.iter().map(|r| (r.index, r.seq)).collect();
        assert_eq!(places, [(1, Some(11)), (3, Some(13)), (4, None)]);
        assert!(refused[0].reason.contains("claims tenant \"other\""), "{:?}", refused[0]);
        let kinds: Vec<RefusalKind> = refused.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RefusalKind::ForeignTenant, RefusalKind::InvalidEvent, RefusalKind::InvalidEvent]);
        // An event longer than the gateway delivers is refused as too large, with its seq.
        let long = events[2].to_json().len();
        let UnpackedBatch { events: good, refused, .. } = unpack_each(&batch, "a1", "acme", 1 << 20, long - 1).unwrap();
        assert!(good.is_empty(), "every event of the batch is as long");
        assert_eq!((refused[2].kind, refused[2].seq), (RefusalKind::TooLarge, Some(12)));
        assert!(refused[2].reason.contains(&format!("{long} bytes long")), "{:?}", refused[2]);
        // A kind a newer gateway adds reads as `other`; a refusal without one as invalid_event.
        let r: RefusedEvent = serde_json::from_str(r#"{"index":0,"kind":"new_reason","reason":"r"}"#).unwrap();
        assert_eq!(r.kind, RefusalKind::Other);
        let r: RefusedEvent = serde_json::from_str(r#"{"index":0,"reason":"r"}"#).unwrap();
        assert_eq!(r.kind, RefusalKind::InvalidEvent);
        assert!(RefusalKind::ALL.into_iter().all(|k| RefusalKind::parse(k.as_str()) == k));
        // The strict unpack refuses the whole batch at the first of them.
        assert!(matches!(unpack(&batch, "a1", "acme", 1 << 20), Err(BatchError::ForeignTenant { index: 1, .. })));
        let empty = Batch { payload: Bytes::new(), codec: Codec::Plain, ..batch.clone() };
        assert!(matches!(unpack_each(&empty, "a1", "acme", 1 << 20, 1 << 20), Err(BatchError::Empty)));
        let too_many = Batch { count: 2, ..batch };
        assert!(matches!(
            unpack_each(&too_many, "a1", "acme", 1 << 20, 1 << 20),
            Err(BatchError::CountMismatch { .. })
        ));
    }

    fn batch_of(events: &[Event], first_seq: u64, count: u32, codec: Codec) -> Batch {
        let json: Vec<Vec<u8>> = events.iter().map(Event::to_json).collect();
        Batch {
            source_id: "web".into(),
            first_seq,
            count,
            codec,
            payload: pack(json.iter().map(Vec::as_slice), codec).into(),
        }
    }

    #[test]
    fn round_trip_both_codecs() {
        let events: Vec<Event> = (10..20).map(|s| event("t", s)).collect();
        for codec in [Codec::Plain, Codec::Zstd] {
            let batch = batch_of(&events, 10, 10, codec);
            let unpacked = unpack(&batch, "a1", "t", 1 << 20).unwrap();
            assert_eq!(unpacked.iter().map(|u| u.event().unwrap()).collect::<Vec<_>>(), events);
            assert!(unpacked.iter().all(|u| u.json == u.event().unwrap().to_json()), "the JSON as received");
            for (u, e) in unpacked.iter().zip(&events) {
                assert_eq!((u.domain, u.seq, u.schema_version), (e.domain(), e.seq, e.schema_version));
                assert_eq!((&u.agent_id[..], &u.source_id[..]), (e.agent_id.as_bytes(), e.source_id.as_bytes()));
                assert_eq!(&u.entity_key[..], e.entity_key.as_bytes());
            }
        }
    }

    /// A payload of several zstd frames one after another (an agent's spooled blocks, sent as
    /// they are) reads as one, and their announced sizes add up against the limit.
    #[test]
    fn frames_one_after_another_read_as_one_payload() {
        let events: Vec<Event> = (10..20).map(|s| event("t", s)).collect();
        let json: Vec<Vec<u8>> = events.iter().map(Event::to_json).collect();
        let mut payload = pack(json[..3].iter().map(Vec::as_slice), Codec::Zstd);
        payload.extend(pack(json[3..].iter().map(Vec::as_slice), Codec::Zstd));
        let batch =
            Batch { source_id: "web".into(), first_seq: 10, count: 10, codec: Codec::Zstd, payload: payload.into() };
        let unpacked = unpack(&batch, "a1", "t", 1 << 20).unwrap();
        assert_eq!(unpacked.iter().map(|u| u.event().unwrap()).collect::<Vec<_>>(), events);
        let total: usize = json.iter().map(|j| j.len() + 1).sum();
        let err = unpack(&batch, "a1", "t", total - 1).unwrap_err();
        assert!(err.to_string().contains(&format!("its frames announce {total} bytes")), "{err}");
        assert!(unpack(&batch, "a1", "t", total).is_ok());
    }

    /// Ids the sender escaped are read as what they mean (they cannot be slices of the JSON).
    #[test]
    fn escaped_ids_are_unescaped() {
        let json = String::from_utf8(event("t", 3).to_json()).unwrap();
        let escaped = json
            .replace(r#""source_id":"web""#, r#""source_id":"w\u0065b""#)
            .replace(r#""entity_key":"v3""#, r#""entity_key":"\u00763""#);
        assert_ne!(escaped, json);
        let batch = Batch {
            source_id: "web".into(),
            first_seq: 3,
            count: 1,
            codec: Codec::Plain,
            payload: format!("{escaped}\n").into(),
        };
        let unpacked = unpack(&batch, "a1", "t", 1 << 20).unwrap();
        assert_eq!((&unpacked[0].source_id[..], &unpacked[0].entity_key[..]), (&b"web"[..], &b"v3"[..]));
        assert_eq!(unpacked[0].event().unwrap(), event("t", 3));
    }

    #[test]
    fn holes_inside_the_span_are_allowed_but_nothing_outside_or_backwards() {
        let events: Vec<Event> = [1, 2, 4].into_iter().map(|s| event("t", s)).collect();
        let unpacked = unpack(&batch_of(&events, 1, 4, Codec::Zstd), "a1", "t", 1 << 20).unwrap();
        assert_eq!(unpacked.into_iter().map(|u| u.event().unwrap()).collect::<Vec<_>>(), events);
        let err = unpack(&batch_of(&events, 1, 3, Codec::Zstd), "a1", "t", 1 << 20).unwrap_err();
        assert!(matches!(err, BatchError::WrongIdentity { index: 2, seq: 4, expected_seq: 3, .. }), "{err}");
        let backwards: Vec<Event> = [2, 1].into_iter().map(|s| event("t", s)).collect();
        let err = unpack(&batch_of(&backwards, 1, 4, Codec::Plain), "a1", "t", 1 << 20).unwrap_err();
        assert!(matches!(err, BatchError::WrongIdentity { index: 1, seq: 1, expected_seq: 3, .. }), "{err}");
        let err = unpack(&batch_of(&[], 1, 4, Codec::Plain), "a1", "t", 1 << 20).unwrap_err();
        assert!(matches!(err, BatchError::Empty), "{err}");
    }

    #[test]
    fn refuses_foreign_tenants_bombs_and_miscounts() {
        let events = vec![event("other", 0)];
        let err = unpack(&batch_of(&events, 0, 1, Codec::Plain), "a1", "t", 1 << 20).unwrap_err();
        assert!(err.to_string().contains("claims tenant \"other\""), "{err}");

        let events: Vec<Event> = (0..3).map(|s| event("t", s)).collect();
        let err = unpack(&batch_of(&events, 0, 2, Codec::Plain), "a1", "t", 1 << 20).unwrap_err();
        assert!(matches!(err, BatchError::CountMismatch { announced: 2, .. }), "{err}");

        let bomb = zstd::bulk::compress(&vec![b' '; 1 << 20], 3).unwrap();
        let batch = Batch { source_id: "web".into(), first_seq: 0, count: 1, codec: Codec::Zstd, payload: bomb.into() };
        let err = unpack(&batch, "a1", "t", 4096).unwrap_err();
        // Refused from the frame's header, before decompressing.
        assert!(err.to_string().contains("its frames announce 1048576 bytes"), "{err}");
        assert_eq!(err.refusal_kind(), RefusalKind::InvalidBatch);
        // A frame without a stated size is bounded while it decompresses.
        let mut streamed = Vec::new();
        let mut encoder = zstd::stream::Encoder::new(&mut streamed, 3).unwrap();
        std::io::Write::write_all(&mut encoder, &vec![b' '; 1 << 20]).unwrap();
        encoder.finish().unwrap();
        assert!(matches!(zstd::zstd_safe::get_frame_content_size(&streamed), Ok(None)));
        let batch = Batch { payload: streamed.into(), ..batch };
        assert!(matches!(unpack(&batch, "a1", "t", 4096), Err(BatchError::Decompress { limit: 4096, .. })));

        let garbage = Batch {
            source_id: "web".into(),
            first_seq: 0,
            count: 1,
            codec: Codec::Zstd,
            payload: vec![1, 2, 3].into(),
        };
        assert!(matches!(unpack(&garbage, "a1", "t", 4096), Err(BatchError::Decompress { .. })));
    }
}
