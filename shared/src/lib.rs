//! The ActiDash event model and the agent-gateway wire protocol.
//!
//! This crate is *sans-IO*: it does no networking, no file or database access and reads no
//! clock. Callers pass bytes in (`handle_*`, `decode`) and take bytes and decisions out
//! (`poll_*`, `encode`); time, where it matters, is an argument.
//!
//! * [`event`]: the versioned event envelope and the typed payload of each domain
//!   (schema version [`event::SCHEMA_VERSION`]).
//! * [`wire`]: frames of the agent-gateway protocol ([`wire::PROTOCOL_VERSION`]) and their codec.
//! * [`batch`]: how a batch's events are packed (JSON lines, optionally zstd-compressed).
//! * [`session`]: the protocol's state machines, one for each side of a connection.
//! * [`kafka`]: how an event is laid out as a Kafka record (topic, key, headers, value).
//! * [`time`]: an event's time as JSON text (chrono's format, with a short path for its usual form).

pub mod batch;
pub mod event;
pub mod kafka;
pub mod money;
pub mod session;
#[cfg(feature = "testing")]
pub mod testing;
pub mod time;
pub mod wire;

pub use event::{Domain, Event, Payload};
pub use money::Money;
