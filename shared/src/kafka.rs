//! How an event is laid out as a Kafka record, so that standard tools can read the topics.
//!
//! * topic: `{prefix}.{domain}`, e.g. `actidash.sales`;
//! * key: the event's entity key (all events of one order or visitor share a partition);
//! * value: the event's canonical JSON ([`Event::to_json`]);
//! * headers: [`HEADER_AGENT_ID`], [`HEADER_SOURCE_ID`], [`HEADER_SEQ`] (decimal text) and
//!   [`HEADER_SCHEMA_VERSION`] (decimal text), so that a consumer can route or de-duplicate
//!   without parsing the value.
//!
//! Agent heartbeats go to `{prefix}.fleet`, keyed by agent id, as [`FleetRecord`] JSON.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::event::{Domain, Event};
use crate::wire::Heartbeat;

pub const HEADER_AGENT_ID: &str = "actidash-agent-id";
pub const HEADER_SOURCE_ID: &str = "actidash-source-id";
pub const HEADER_SEQ: &str = "actidash-seq";
pub const HEADER_SCHEMA_VERSION: &str = "actidash-schema-version";

/// The topic of a domain's events.
pub fn domain_topic(prefix: &str, domain: Domain) -> String {
    format!("{prefix}.{domain}")
}

/// The topic of agent heartbeats.
pub fn fleet_topic(prefix: &str) -> String {
    format!("{prefix}.fleet")
}

/// The headers of an event's record, in order (the ids borrowed from the event).
pub fn headers(event: &Event) -> [(&'static str, Cow<'_, str>); 4] {
    [
        (HEADER_AGENT_ID, Cow::Borrowed(event.agent_id.as_str())),
        (HEADER_SOURCE_ID, Cow::Borrowed(event.source_id.as_str())),
        (HEADER_SEQ, Cow::Owned(event.seq.to_string())),
        (HEADER_SCHEMA_VERSION, Cow::Owned(event.schema_version.to_string())),
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
