//! How an event is laid out as a Kafka record, so that standard tools can read the topics.
//!
//! * topic: `{prefix}.{domain}`, e.g. `actidash.sales`;
//! * key: the event's entity key (all events of one order or visitor share a partition);
//! * partition: [`partition_for`] of the key over the topic's pinned partition count — the
//!   same as Kafka's Java clients' default partitioner (murmur2), so other tools co-partition,
//!   and a pure function of the key: a re-sent event lands where it landed the first time;
//! * value: the event's canonical JSON ([`Event::to_json`](crate::event::Event::to_json));
//! * headers: [`HEADER_AGENT_ID`], [`HEADER_SOURCE_ID`], [`HEADER_SEQ`] (decimal text) and
//!   [`HEADER_SCHEMA_VERSION`] (decimal text), so that a consumer can route or de-duplicate
//!   without parsing the value.
//!
//! Agent heartbeats go to `{prefix}.fleet`, keyed by agent id, as [`FleetRecord`] JSON.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::Domain;
use crate::wire::Heartbeat;

pub const HEADER_AGENT_ID: &str = "actidash-agent-id";
pub const HEADER_SOURCE_ID: &str = "actidash-source-id";
pub const HEADER_SEQ: &str = "actidash-seq";
pub const HEADER_SCHEMA_VERSION: &str = "actidash-schema-version";

/// Kafka's murmur2 hash (`org.apache.kafka.common.utils.Utils.murmur2`), as the Java clients'
/// default partitioner computes it.
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = 0x9747_b28c ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        for (i, b) in rest.iter().enumerate().rev() {
            h ^= u32::from(*b) << (8 * i);
        }
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition of a key among `partitions` (at least 1): Kafka's default partitioner,
/// `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(key: &[u8], partitions: i32) -> i32 {
    (murmur2(key) & 0x7fff_ffff) % partitions.max(1)
}

/// The topic of a domain's events.
pub fn domain_topic(prefix: &str, domain: Domain) -> String {
    format!("{prefix}.{domain}")
}

/// The topic of agent heartbeats.
pub fn fleet_topic(prefix: &str) -> String {
    format!("{prefix}.fleet")
}

/// Room for the decimal text of a record's numeric headers (no allocation per record).
#[derive(Default)]
pub struct HeaderText {
    seq: itoa::Buffer,
    schema_version: itoa::Buffer,
}

/// The headers of an event's record, in order: its ids as given, its numbers as decimal text
/// written into `text`.
pub fn headers<'a>(
    agent_id: &'a [u8],
    source_id: &'a [u8],
    seq: u64,
    schema_version: u16,
    text: &'a mut HeaderText,
) -> [(&'static str, &'a [u8]); 4] {
    [
        (HEADER_AGENT_ID, agent_id),
        (HEADER_SOURCE_ID, source_id),
        (HEADER_SEQ, text.seq.format(seq).as_bytes()),
        (HEADER_SCHEMA_VERSION, text.schema_version.format(schema_version).as_bytes()),
    ]
}

/// A heartbeat as the gateway received it, with the identity it authenticated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetRecord {
    pub tenant: String,
    pub agent_id: String,
    /// When the gateway received it (the gateway's clock).
    pub received_at: DateTime<Utc>,
    /// The transport the agent used: `quic` or `tcp`.
    pub transport: String,
    pub remote_addr: String,
    pub heartbeat: Heartbeat,
}

#[cfg(test)]
mod partition_tests {
    use super::*;

    /// Apache Kafka's `UtilsTest.testMurmur2`: the same partition as the Java clients.
    #[test]
    fn murmur2_is_kafkas() {
        let cases: [(&[u8], i32); 6] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
            (b"a-little-bit-longer-string", -1_486_304_829),
            (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58_897_971),
            (b"abc", 479_470_107),
        ];
        for (key, hash) in cases {
            assert_eq!(murmur2(key), hash, "{}", String::from_utf8_lossy(key));
        }
        // toPositive(-790332482) = 1357151166; % 50 = 16.
        assert_eq!(partition_for(b"foobar", 50), 16);
        assert_eq!(partition_for(b"anything", 1), 0);
        assert_eq!(partition_for(b"anything", 0), 0, "never a division by zero");
    }
}
