//! The event envelope and the typed payload of each domain.
//!
//! # Schema, version 1
//!
//! Every event is one JSON object:
//!
//! | field | type | meaning |
//! |---|---|---|
//! | `schema_version` | integer | [`SCHEMA_VERSION`]; a reader rejects versions it does not know |
//! | `tenant` | string | the customer the data belongs to |
//! | `agent_id` | string | the agent that read it |
//! | `source_id` | string | the source inside that agent (a file, a table) |
//! | `seq` | integer | per-source sequence number, starting at 0, gap-free, never reused |
//! | `event_time` | RFC 3339 UTC | when it happened on-prem |
//! | `domain` | `sales` \| `marketing` \| `behavior` \| `inventory` | which payload follows |
//! | `entity_key` | string | the partitioning key: order id, user id, visitor id or `sku@warehouse` |
//! | `data` | object | the payload of the domain, below |
//!
//! (`agent_id`, `source_id`, `seq`) identifies an event uniquely and for ever: it is what the
//! cloud de-duplicates on.
//!
//! Payloads: [`SalesOrder`], [`MarketingTouch`], [`BehaviorEvent`], [`InventoryLevel`]. Unknown
//! fields are rejected, so a mapping mistake is caught at the edge, not in a dashboard.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::money::Money;

/// Version of the event schema described in this module.
pub const SCHEMA_VERSION: u16 = 1;

/// One domain event, as it travels from the agent to the processors.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "EventRepr")]
pub struct Event {
    pub schema_version: u16,
    pub tenant: String,
    pub agent_id: String,
    pub source_id: String,
    pub seq: u64,
    pub event_time: DateTime<Utc>,
    pub entity_key: String,
    pub payload: Payload,
}

/// The JSON layout of an [`Event`]: the domain is a top-level field and the payload sits under
/// `data`, with unknown fields rejected at both levels.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRepr {
    schema_version: u16,
    tenant: String,
    agent_id: String,
    source_id: String,
    seq: u64,
    #[serde(deserialize_with = "crate::time::utc::deserialize")]
    event_time: DateTime<Utc>,
    domain: Domain,
    entity_key: String,
    data: Box<serde_json::value::RawValue>,
}

/// Serialization borrows straight from the event (no intermediate JSON value): this runs once
/// per event on the agent's hot path. The field order is the schema's.
impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EventRef {
            schema_version: self.schema_version,
            tenant: &self.tenant,
            agent_id: &self.agent_id,
            source_id: &self.source_id,
            seq: self.seq,
            event_time: &self.event_time,
            domain: self.payload.domain(),
            entity_key: &self.entity_key,
            data: Data::of(&self.payload),
        }
        .serialize(serializer)
    }
}

/// An event's canonical JSON, from its parts however the payload holds its text: what
/// [`Event::to_json`] writes for `Event::new(…)` of the same parts, after the same checks
/// ([`Event::check`]). The agent writes each event this way, without building an [`Event`].
///
/// Written by hand rather than through serde (whose derived writer, [`Event`]'s `Serialize`,
/// stays the reference it is checked against byte for byte): 0.35 against 0.52 µs per order
/// event, checks included; serde's cost was mostly in telling, byte by byte, whether a string
/// needs escaping.
pub fn event_json<T: AsRef<str>>(
    tenant: &str,
    agent_id: &str,
    source_id: &str,
    seq: u64,
    event_time: &DateTime<Utc>,
    payload: &Payload<T>,
) -> Result<Vec<u8>, EventError> {
    let key = payload.entity_key_text();
    check(SCHEMA_VERSION, &key, payload)?;
    let mut w = JsonWriter(Vec::with_capacity(512));
    w.raw("{\"schema_version\":");
    w.int(i64::from(SCHEMA_VERSION));
    w.text("tenant", tenant);
    w.text("agent_id", agent_id);
    w.text("source_id", source_id);
    w.field("seq");
    w.raw(itoa::Buffer::new().format(seq));
    w.field("event_time");
    crate::time::utc::serialize(event_time, &mut serde_json::Serializer::new(&mut w.0))?;
    w.text("domain", payload.domain().as_str());
    w.text("entity_key", &key);
    w.field("data");
    match payload {
        Payload::Sales(o) => {
            w.raw("{\"order_id\":");
            w.str(o.order_id.as_ref());
            w.text("customer_id", o.customer_id.as_ref());
            w.text("channel", o.channel.as_ref());
            w.text("site", o.site.as_ref());
            w.text("country", o.country.as_ref());
            w.text("currency", o.currency.as_ref());
            w.value("amount", &o.amount)?;
            w.field("items");
            w.raw("[");
            for (i, item) in o.items.iter().enumerate() {
                w.raw(if i == 0 { "{\"sku\":" } else { ",{\"sku\":" });
                w.str(item.sku.as_ref());
                w.field("quantity");
                w.int(item.quantity);
                w.value("unit_price", &item.unit_price)?;
                w.raw("}");
            }
            w.raw("]");
            w.value("status", &o.status)?;
        }
        Payload::Marketing(m) => {
            w.raw("{\"user_id\":");
            w.str(m.user_id.as_ref());
            w.text("channel", m.channel.as_ref());
            w.text("campaign", m.campaign.as_ref());
            if let Some(cost) = &m.cost {
                w.value("cost", cost)?;
            }
            if let Some(currency) = &m.currency {
                w.text("currency", currency.as_ref());
            }
        }
        Payload::Behavior(b) => {
            w.raw("{\"visitor_id\":");
            w.str(b.visitor_id.as_ref());
            w.value("type", &b.kind)?;
            if let Some(url) = &b.url {
                w.text("url", url.as_ref());
            }
            if let Some(referrer) = &b.referrer {
                w.text("referrer", referrer.as_ref());
            }
        }
        Payload::Inventory(i) => {
            w.raw("{\"sku\":");
            w.str(i.sku.as_ref());
            w.text("warehouse", i.warehouse.as_ref());
            w.field("on_hand");
            w.int(i.on_hand);
        }
    }
    w.raw("}}");
    Ok(w.0)
}

/// JSON text written as serde_json writes it (compact, its escapes).
struct JsonWriter(Vec<u8>);

impl JsonWriter {
    fn raw(&mut self, text: &str) {
        self.0.extend_from_slice(text.as_bytes());
    }

    /// `,"name":` — every field but an object's first.
    fn field(&mut self, name: &str) {
        self.raw(",\"");
        self.raw(name);
        self.raw("\":");
    }

    /// `,"name":"value"`.
    fn text(&mut self, name: &str, value: &str) {
        self.field(name);
        self.str(value);
    }

    /// A string, quoted; through serde_json (its escapes) only where it needs escaping: the
    /// test runs over the whole string without stopping early, which the compiler vectorizes.
    fn str(&mut self, text: &str) {
        let escape = text.bytes().fold(false, |any, b| any | (b < 0x20) | (b == b'"') | (b == b'\\'));
        if escape {
            // Writing a string to a Vec cannot fail.
            let _ = serde_json::to_writer(&mut self.0, text);
        } else {
            self.0.reserve(text.len() + 2);
            self.0.push(b'"');
            self.raw(text);
            self.0.push(b'"');
        }
    }

    fn int(&mut self, n: i64) {
        self.raw(itoa::Buffer::new().format(n));
    }

    /// `,"name":` and a value through its serde form (money, the enums).
    fn value<V: Serialize + ?Sized>(&mut self, name: &str, value: &V) -> Result<(), serde_json::Error> {
        self.field(name);
        serde_json::to_writer(&mut self.0, value)
    }
}

/// The JSON layout of an event, borrowed from its parts. The field order is the schema's.
#[derive(Serialize)]
struct EventRef<'a, T> {
    schema_version: u16,
    tenant: &'a str,
    agent_id: &'a str,
    source_id: &'a str,
    seq: u64,
    #[serde(serialize_with = "crate::time::utc::serialize")]
    event_time: &'a DateTime<Utc>,
    domain: Domain,
    entity_key: &'a str,
    data: Data<'a, T>,
}

/// A payload written as its domain's object (the domain is the envelope's field).
#[derive(Serialize)]
#[serde(untagged)]
enum Data<'a, T> {
    Sales(&'a SalesOrder<T>),
    Marketing(&'a MarketingTouch<T>),
    Behavior(&'a BehaviorEvent<T>),
    Inventory(&'a InventoryLevel<T>),
}

impl<'a, T> Data<'a, T> {
    fn of(payload: &'a Payload<T>) -> Data<'a, T> {
        match payload {
            Payload::Sales(p) => Data::Sales(p),
            Payload::Marketing(p) => Data::Marketing(p),
            Payload::Behavior(p) => Data::Behavior(p),
            Payload::Inventory(p) => Data::Inventory(p),
        }
    }
}

impl TryFrom<EventRepr> for Event {
    type Error = serde_json::Error;
    fn try_from(r: EventRepr) -> Result<Event, serde_json::Error> {
        let payload = Payload::from_json_str(r.domain, r.data.get())?;
        Ok(Event {
            schema_version: r.schema_version,
            tenant: r.tenant,
            agent_id: r.agent_id,
            source_id: r.source_id,
            seq: r.seq,
            event_time: r.event_time,
            entity_key: r.entity_key,
            payload,
        })
    }
}

/// The four domains; each has its own Kafka topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Domain {
    Sales,
    Marketing,
    Behavior,
    Inventory,
}

impl Domain {
    /// Every domain, in declaration order: `Domain::ALL[d as usize] == d` (tables indexed by
    /// domain rely on it).
    pub const ALL: [Domain; 4] = [Domain::Sales, Domain::Marketing, Domain::Behavior, Domain::Inventory];

    pub fn as_str(self) -> &'static str {
        match self {
            Domain::Sales => "sales",
            Domain::Marketing => "marketing",
            Domain::Behavior => "behavior",
            Domain::Inventory => "inventory",
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the four domains.
#[derive(Debug, thiserror::Error)]
#[error("unknown domain {0:?} (expected sales, marketing, behavior or inventory)")]
pub struct UnknownDomain(pub String);

impl FromStr for Domain {
    type Err = UnknownDomain;
    fn from_str(s: &str) -> Result<Domain, UnknownDomain> {
        Domain::ALL.into_iter().find(|d| d.as_str() == s).ok_or_else(|| UnknownDomain(s.to_owned()))
    }
}

/// The typed body of an event, one variant per domain.
///
/// Generic over its text: `String` (the default, what everything but the gateway handles) or
/// [`Text`], which borrows from the JSON it was read from (the gateway checks every event it
/// receives without copying its strings; see [`EventView`]).
#[derive(Clone, Debug, PartialEq)]
pub enum Payload<S = String> {
    Sales(SalesOrder<S>),
    Marketing(MarketingTouch<S>),
    Behavior(BehaviorEvent<S>),
    Inventory(InventoryLevel<S>),
}

impl Payload {
    /// Reads the `data` object of an event of `domain`.
    pub fn from_data(domain: Domain, data: serde_json::Value) -> Result<Payload, serde_json::Error> {
        Ok(match domain {
            Domain::Sales => Payload::Sales(serde_json::from_value(data)?),
            Domain::Marketing => Payload::Marketing(serde_json::from_value(data)?),
            Domain::Behavior => Payload::Behavior(serde_json::from_value(data)?),
            Domain::Inventory => Payload::Inventory(serde_json::from_value(data)?),
        })
    }

    /// Reads the `data` object of an event of `domain` from its JSON text.
    pub fn from_json_str(domain: Domain, data: &str) -> Result<Payload, serde_json::Error> {
        Ok(match domain {
            Domain::Sales => Payload::Sales(serde_json::from_str(data)?),
            Domain::Marketing => Payload::Marketing(serde_json::from_str(data)?),
            Domain::Behavior => Payload::Behavior(serde_json::from_str(data)?),
            Domain::Inventory => Payload::Inventory(serde_json::from_str(data)?),
        })
    }
}

impl<S: AsRef<str>> Payload<S> {
    pub fn domain(&self) -> Domain {
        match self {
            Payload::Sales(_) => Domain::Sales,
            Payload::Marketing(_) => Domain::Marketing,
            Payload::Behavior(_) => Domain::Behavior,
            Payload::Inventory(_) => Domain::Inventory,
        }
    }

    /// The key that orders events of one entity: all events of an order (or a user, a visitor,
    /// a stock item) land in the same Kafka partition.
    pub fn entity_key(&self) -> String {
        self.entity_key_text().into_owned()
    }

    /// [`entity_key`](Payload::entity_key), borrowed where it is one field.
    pub fn entity_key_text(&self) -> Cow<'_, str> {
        match self {
            Payload::Sales(o) => Cow::Borrowed(o.order_id.as_ref()),
            Payload::Marketing(m) => Cow::Borrowed(m.user_id.as_ref()),
            Payload::Behavior(b) => Cow::Borrowed(b.visitor_id.as_ref()),
            Payload::Inventory(i) => Cow::Owned(format!("{}@{}", i.sku.as_ref(), i.warehouse.as_ref())),
        }
    }

    /// Whether `key` is this payload's [`entity_key`](Payload::entity_key), without building it.
    pub fn has_entity_key(&self, key: &str) -> bool {
        match self {
            Payload::Sales(o) => key == o.order_id.as_ref(),
            Payload::Marketing(m) => key == m.user_id.as_ref(),
            Payload::Behavior(b) => key == b.visitor_id.as_ref(),
            Payload::Inventory(i) => key
                .strip_prefix(i.sku.as_ref())
                .and_then(|rest| rest.strip_prefix('@'))
                .is_some_and(|warehouse| warehouse == i.warehouse.as_ref()),
        }
    }

    /// Every amount within [`MAX_AMOUNT_UNITS`] (a line's total too), every quantity within
    /// [`MAX_QUANTITY`], stock within [`MAX_STOCK`].
    pub fn check_bounds(&self) -> Result<(), EventError> {
        let amount = |field, m: Money| {
            let bound = MAX_AMOUNT_UNITS;
            match Money::from_units(bound) {
                Some(max) if m.raw().checked_abs().is_some_and(|a| a <= max.raw()) => Ok(()),
                _ => Err(EventError::OutOfBounds { field, value: m.to_string(), bound }),
            }
        };
        let count = |field, n: i64, bound: i64| {
            if n.checked_abs().is_some_and(|a| a <= bound) {
                Ok(())
            } else {
                Err(EventError::OutOfBounds { field, value: n.to_string(), bound })
            }
        };
        match self {
            Payload::Sales(o) => {
                amount("amount", o.amount)?;
                for item in &o.items {
                    count("quantity", item.quantity, MAX_QUANTITY)?;
                    amount("unit_price", item.unit_price)?;
                    // Both bounded: the product fits an i64 (10^9 · 10^16 does not; checked).
                    let line = item.unit_price.raw().checked_mul(item.quantity).map(Money);
                    match line {
                        Some(line) => amount("line total (quantity × unit_price)", line)?,
                        None => {
                            return Err(EventError::OutOfBounds {
                                field: "line total (quantity × unit_price)",
                                value: format!("{} × {}", item.quantity, item.unit_price),
                                bound: MAX_AMOUNT_UNITS,
                            });
                        }
                    }
                }
                Ok(())
            }
            Payload::Marketing(m) => m.cost.map_or(Ok(()), |c| amount("cost", c)),
            Payload::Behavior(_) => Ok(()),
            Payload::Inventory(i) => count("on_hand", i.on_hand, MAX_STOCK),
        }
    }

    /// The field of the entity's key when it is longer than [`MAX_KEY_BYTES`].
    pub fn long_key_field(&self) -> Option<(&'static str, usize)> {
        let len = self.entity_key_len();
        let field = match self {
            Payload::Sales(_) => "order_id",
            Payload::Marketing(_) => "user_id",
            Payload::Behavior(_) => "visitor_id",
            Payload::Inventory(_) => "sku and warehouse",
        };
        (len > MAX_KEY_BYTES).then_some((field, len))
    }

    fn entity_key_len(&self) -> usize {
        match self {
            Payload::Sales(o) => o.order_id.as_ref().len(),
            Payload::Marketing(m) => m.user_id.as_ref().len(),
            Payload::Behavior(b) => b.visitor_id.as_ref().len(),
            Payload::Inventory(i) => i.sku.as_ref().len() + 1 + i.warehouse.as_ref().len(),
        }
    }

    /// The field of the entity's key when it is empty (or only blanks): such an event has no
    /// entity to order it by, and an empty Kafka key would go to a random partition, where a
    /// re-send could land beside another mark and be counted twice.
    pub fn empty_key_field(&self) -> Option<&'static str> {
        let (field, value) = match self {
            Payload::Sales(o) => ("order_id", &o.order_id),
            Payload::Marketing(m) => ("user_id", &m.user_id),
            Payload::Behavior(b) => ("visitor_id", &b.visitor_id),
            Payload::Inventory(i) => ("sku", &i.sku),
        };
        value.as_ref().trim().is_empty().then_some(field)
    }
}

/// Lifecycle state of an order. Revenue is recognised once, on `placed`, and taken back on
/// `cancelled` or `refunded`; `paid` and `shipped` are updates that do not change revenue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Placed,
    Paid,
    Shipped,
    Cancelled,
    Refunded,
}

impl OrderStatus {
    /// +1 when the event adds an order to the revenue figures, -1 when it takes one back.
    pub fn revenue_sign(self) -> i64 {
        match self {
            OrderStatus::Placed => 1,
            OrderStatus::Cancelled | OrderStatus::Refunded => -1,
            OrderStatus::Paid | OrderStatus::Shipped => 0,
        }
    }
}

/// A sales order (or a change of its state).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesOrder<S = String> {
    pub order_id: S,
    pub customer_id: S,
    /// Sales channel: `web`, `app`, `store`, `marketplace`...
    pub channel: S,
    /// The store or site that took the order.
    pub site: S,
    /// ISO 3166-1 alpha-2.
    pub country: S,
    /// ISO 4217.
    pub currency: S,
    /// Order total, in `currency`.
    pub amount: Money,
    #[serde(default = "Vec::new")]
    pub items: Vec<LineItem<S>>,
    pub status: OrderStatus,
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItem<S = String> {
    pub sku: S,
    pub quantity: i64,
    pub unit_price: Money,
}

/// A marketing touch: an ad click, an email open, an affiliate visit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketingTouch<S = String> {
    pub user_id: S,
    pub channel: S,
    pub campaign: S,
    /// What the touch cost, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub currency: Option<S>,
}

/// What a visitor did on a site or in an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BehaviorEvent<S = String> {
    /// The logged-in user or an anonymous visitor id.
    pub visitor_id: S,
    #[serde(rename = "type")]
    pub kind: BehaviorKind,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub url: Option<S>,
    #[serde(default = "none", skip_serializing_if = "Option::is_none")]
    pub referrer: Option<S>,
}

/// A missing optional field (`#[serde(default)]` would ask the text type for a `Default`).
fn none<S>() -> Option<S> {
    None
}

/// The kinds of behavior event the funnels are built from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BehaviorKind {
    PageView,
    ProductView,
    Search,
    AddToCart,
    Checkout,
    Purchase,
}

/// Stock on hand of one SKU in one warehouse, at `event_time`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryLevel<S = String> {
    pub sku: S,
    pub warehouse: S,
    pub on_hand: i64,
}

/// The longest entity key: a key is an id, and the gateway's per-event limit
/// ([`crate::wire::Welcome::max_event_bytes`]) leaves this much room for it beside the event.
pub const MAX_KEY_BYTES: usize = 1024;

/// The largest amount of money one event may carry, in whole units of its currency, either
/// sign: a trillion, above any real order, line or ad cost even in currencies of small units.
/// Checked by [`Event::check`], so alike at the edge (before spooling) and at the gateway. It
/// keeps an event's amounts far inside the 64-bit range (10^16 of the 10^19 fixed-point
/// ten-thousandths); sums are clamped by the store.
pub const MAX_AMOUNT_UNITS: i64 = 1_000_000_000_000;

/// The largest quantity of a line item, and stock on hand, either sign (a billion; stock a
/// trillion).
pub const MAX_QUANTITY: i64 = 1_000_000_000;
pub const MAX_STOCK: i64 = 1_000_000_000_000;

/// Why an event was refused.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event is not valid JSON for schema {SCHEMA_VERSION}: {0}")]
    Json(#[from] serde_json::Error),
    #[error("event has schema version {found}; this build reads version {SCHEMA_VERSION}")]
    UnsupportedVersion { found: u16 },
    #[error("event entity_key {found:?} does not match its payload's key {expected:?}")]
    EntityKeyMismatch { found: String, expected: String },
    #[error("event has an empty {field}: every event needs its entity's key")]
    EmptyKey { field: &'static str },
    #[error("event's {field} is {len} bytes long: an entity key is at most {MAX_KEY_BYTES}")]
    LongKey { field: &'static str, len: usize },
    #[error("event's {field} is {value}: beyond the plausible bound of ±{bound}")]
    OutOfBounds { field: &'static str, value: String, bound: i64 },
}

impl Event {
    /// Builds an event of the current schema; the entity key is derived from the payload.
    pub fn new(
        tenant: String,
        agent_id: String,
        source_id: String,
        seq: u64,
        event_time: DateTime<Utc>,
        payload: Payload,
    ) -> Event {
        Event {
            schema_version: SCHEMA_VERSION,
            entity_key: payload.entity_key(),
            tenant,
            agent_id,
            source_id,
            seq,
            event_time,
            payload,
        }
    }

    pub fn domain(&self) -> Domain {
        self.payload.domain()
    }

    /// Serializes to the canonical JSON form (what is spooled, shipped and written to Kafka).
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data to a Vec cannot fail: every map key is a string.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses and checks one event ([`Event::check`]).
    pub fn from_json(bytes: &[u8]) -> Result<Event, EventError> {
        let event: Event = from_bytes(bytes)?;
        event.check()?;
        Ok(event)
    }

    /// The checks every reader applies (the gateway to each event it receives, the agent to
    /// each event before it is spooled, so that what the gateway would refuse never enters the
    /// line): the schema version, a non-empty key of at most [`MAX_KEY_BYTES`], and an entity
    /// key that is the payload's.
    pub fn check(&self) -> Result<(), EventError> {
        check(self.schema_version, &self.entity_key, &self.payload)
    }
}

/// `bytes` read as JSON, their UTF-8 checked once up front rather than string by string (the
/// envelope's reading 11 % faster); the error of text that is not UTF-8 is serde_json's.
fn from_bytes<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, serde_json::Error> {
    match std::str::from_utf8(bytes) {
        Ok(text) => serde_json::from_str(text),
        Err(_) => serde_json::from_slice(bytes),
    }
}

/// [`Event::check`], on the parts of an event however they are held.
fn check<S: AsRef<str>>(schema_version: u16, entity_key: &str, payload: &Payload<S>) -> Result<(), EventError> {
    if schema_version != SCHEMA_VERSION {
        return Err(EventError::UnsupportedVersion { found: schema_version });
    }
    if let Some(field) = payload.empty_key_field() {
        return Err(EventError::EmptyKey { field });
    }
    if let Some((field, len)) = payload.long_key_field() {
        return Err(EventError::LongKey { field, len });
    }
    if !payload.has_entity_key(entity_key) {
        return Err(EventError::EntityKeyMismatch { found: entity_key.to_owned(), expected: payload.entity_key() });
    }
    payload.check_bounds()
}

/// Text borrowed from the JSON it was read from, or owned where the JSON escaped it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Text<'a>(pub Cow<'a, str>);

impl<'a> Payload<Text<'a>> {
    /// Reads the `data` object of an event of `domain` from its JSON text, borrowing from it.
    pub fn view_json_str(domain: Domain, data: &'a str) -> Result<Payload<Text<'a>>, serde_json::Error> {
        Ok(match domain {
            Domain::Sales => Payload::Sales(serde_json::from_str(data)?),
            Domain::Marketing => Payload::Marketing(serde_json::from_str(data)?),
            Domain::Behavior => Payload::Behavior(serde_json::from_str(data)?),
            Domain::Inventory => Payload::Inventory(serde_json::from_str(data)?),
        })
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl AsRef<str> for Text<'_> {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    /// Borrowed when the input allows, as `#[serde(borrow)] Cow<str>` reads.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text<'a>, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Cow<'de, str>, E> {
                Ok(Cow::Owned(v))
            }
        }
        deserializer.deserialize_str(Visitor).map(Text)
    }
}

/// An event read and checked without copying its text: what the gateway needs to vouch for
/// an event it forwards as received (its identity, its key, a payload that passes every check
/// [`Event::from_json`] applies). [`EventView::parse`] accepts exactly what
/// [`Event::from_json`] accepts.
#[derive(Debug)]
pub struct EventView<'a> {
    pub schema_version: u16,
    pub tenant: Cow<'a, str>,
    pub agent_id: Cow<'a, str>,
    pub source_id: Cow<'a, str>,
    pub seq: u64,
    pub event_time: DateTime<Utc>,
    pub entity_key: Cow<'a, str>,
    pub payload: Payload<Text<'a>>,
}

impl<'a> EventView<'a> {
    /// Parses and checks one event, as [`Event::from_json`] does.
    pub fn parse(bytes: &'a [u8]) -> Result<EventView<'a>, EventError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Repr<'a> {
            schema_version: u16,
            #[serde(borrow)]
            tenant: Cow<'a, str>,
            #[serde(borrow)]
            agent_id: Cow<'a, str>,
            #[serde(borrow)]
            source_id: Cow<'a, str>,
            seq: u64,
            #[serde(deserialize_with = "crate::time::utc::deserialize")]
            event_time: DateTime<Utc>,
            domain: Domain,
            #[serde(borrow)]
            entity_key: Cow<'a, str>,
            #[serde(borrow)]
            data: &'a serde_json::value::RawValue,
        }
        let r: Repr<'a> = from_bytes(bytes)?;
        let payload = Payload::view_json_str(r.domain, r.data.get())?;
        check(r.schema_version, &r.entity_key, &payload)?;
        Ok(EventView {
            schema_version: r.schema_version,
            tenant: r.tenant,
            agent_id: r.agent_id,
            source_id: r.source_id,
            seq: r.seq,
            event_time: r.event_time,
            entity_key: r.entity_key,
            payload,
        })
    }

    pub fn domain(&self) -> Domain {
        self.payload.domain()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order() -> Event {
        Event::new(
            "acme".into(),
            "agent-1".into(),
            "orders".into(),
            7,
            "2026-11-27T10:00:00Z".parse().unwrap(),
            Payload::Sales(SalesOrder {
                order_id: "o-1".into(),
                customer_id: "c-9".into(),
                channel: "web".into(),
                site: "shop-fr".into(),
                country: "FR".into(),
                currency: "EUR".into(),
                amount: Money::parse("59.90").unwrap(),
                items: vec![LineItem { sku: "SKU-1".into(), quantity: 2, unit_price: Money::parse("29.95").unwrap() }],
                status: OrderStatus::Placed,
            }),
        )
    }

    #[test]
    fn json_shape_is_flat_and_readable() {
        let json: serde_json::Value = serde_json::from_slice(&order().to_json()).unwrap();
        assert_eq!(json["domain"], "sales");
        assert_eq!(json["entity_key"], "o-1");
        assert_eq!(json["data"]["amount"], 59.9);
        assert_eq!(json["event_time"], "2026-11-27T10:00:00Z");
        assert_eq!(Event::from_json(&order().to_json()).unwrap(), order());
    }

    #[test]
    fn rejects_unknown_version_fields_and_forged_keys() {
        let mut json: serde_json::Value = serde_json::from_slice(&order().to_json()).unwrap();
        json["schema_version"] = 2.into();
        let err = Event::from_json(json.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("schema version 2"), "{err}");

        let mut json: serde_json::Value = serde_json::from_slice(&order().to_json()).unwrap();
        json["entity_key"] = "o-2".into();
        let err = Event::from_json(json.to_string().as_bytes()).unwrap_err();
        assert!(matches!(err, EventError::EntityKeyMismatch { .. }), "{err}");

        // An empty (or blank) key is refused however the sender dressed it up.
        for blank in ["", "  "] {
            let mut json: serde_json::Value = serde_json::from_slice(&order().to_json()).unwrap();
            json["data"]["order_id"] = blank.into();
            json["entity_key"] = blank.into();
            let err = Event::from_json(json.to_string().as_bytes()).unwrap_err();
            assert!(matches!(err, EventError::EmptyKey { field: "order_id" }), "{err}");
        }

        let mut json: serde_json::Value = serde_json::from_slice(&order().to_json()).unwrap();
        json["data"]["coupon"] = "X".into();
        let err = Event::from_json(json.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("coupon"), "{err}");
    }

    /// The agent's hand-written [`event_json`] writes what serde writes for the same event
    /// ([`Event::to_json`]), byte for byte, and refuses what [`Event::check`] refuses: on
    /// events of every domain with strings that need escaping, money that is written as a
    /// number or as a string, optional fields present or not, and times of every precision.
    mod written_by_hand {
        use super::*;
        use proptest::prelude::*;

        fn text() -> impl Strategy<Value = String> {
            prop_oneof![
                3 => "[a-zA-Z0-9@._-]{1,12}",
                1 => "[a-z \"\\\\/\u{1}\u{1f}\u{7f}é€😀]{0,12}",
            ]
        }

        fn money() -> impl Strategy<Value = Money> {
            prop_oneof![
                (-10_000_000_i64..10_000_000).prop_map(|cents| Money(cents * 100)),
                any::<i64>().prop_map(|raw| Money(raw % 20_000_000_000_000_000)),
            ]
        }

        fn payload() -> impl Strategy<Value = Payload> {
            let item = (text(), -5_i64..1_000, money()).prop_map(|(sku, quantity, unit_price)| LineItem {
                sku,
                quantity,
                unit_price,
            });
            let status = prop_oneof![
                Just(OrderStatus::Placed),
                Just(OrderStatus::Paid),
                Just(OrderStatus::Shipped),
                Just(OrderStatus::Cancelled),
                Just(OrderStatus::Refunded),
            ];
            let kind = prop_oneof![
                Just(BehaviorKind::PageView),
                Just(BehaviorKind::ProductView),
                Just(BehaviorKind::Search),
                Just(BehaviorKind::AddToCart),
                Just(BehaviorKind::Checkout),
                Just(BehaviorKind::Purchase),
            ];
            prop_oneof![
                ((text(), text(), text(), text(), text(), text()), money(), prop::collection::vec(item, 0..4), status)
                    .prop_map(|((order_id, customer_id, channel, site, country, currency), amount, items, status)| {
                        Payload::Sales(SalesOrder {
                            order_id,
                            customer_id,
                            channel,
                            site,
                            country,
                            currency,
                            amount,
                            items,
                            status,
                        })
                    }),
                (text(), text(), text(), prop::option::of(money()), prop::option::of(text())).prop_map(
                    |(user_id, channel, campaign, cost, currency)| {
                        Payload::Marketing(MarketingTouch { user_id, channel, campaign, cost, currency })
                    }
                ),
                (text(), kind, prop::option::of(text()), prop::option::of(text())).prop_map(
                    |(visitor_id, kind, url, referrer)| Payload::Behavior(BehaviorEvent {
                        visitor_id,
                        kind,
                        url,
                        referrer
                    })
                ),
                (text(), text(), any::<i64>()).prop_map(|(sku, warehouse, on_hand)| {
                    Payload::Inventory(InventoryLevel { sku, warehouse, on_hand: on_hand % 2_000_000_000_000 })
                }),
            ]
        }

        proptest! {
            #[test]
            fn as_serde_writes_it(
                ids in (text(), text(), text()), seq in any::<u64>(), secs in -62_167_219_200_i64..253_402_300_800,
                nanos in prop_oneof![Just(0_u32), 0_u32..1_000_000_000], payload in payload(),
            ) {
                let (tenant, agent_id, source_id) = ids;
                let time = DateTime::from_timestamp(secs, nanos).unwrap();
                let event = Event::new(tenant.clone(), agent_id.clone(), source_id.clone(), seq, time, payload);
                match (event_json(&tenant, &agent_id, &source_id, seq, &time, &event.payload), event.check()) {
                    (Ok(written), Ok(())) => {
                        prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(event.to_json()).unwrap());
                    }
                    (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                    (a, b) => prop_assert!(false, "event_json {:?}, check {:?}", a.map(|_| ()), b),
                }
            }
        }
    }

    /// The gateway's borrowing reader ([`EventView::parse`]) accepts exactly what
    /// [`Event::from_json`] accepts, reads the same, and refuses for the same reasons: checked
    /// on events of every domain with one field replaced by an awkward value, removed, or an
    /// unknown one added, at the top level or in `data`.
    mod view_agrees {
        use super::*;
        use proptest::prelude::*;

        fn base(which: usize) -> Event {
            let payload = match which % 4 {
                0 => order().payload,
                1 => Payload::Marketing(MarketingTouch {
                    user_id: "u-1".into(),
                    channel: "ads".into(),
                    campaign: "black-friday".into(),
                    cost: Some(Money::parse("0.35").unwrap()),
                    currency: Some("EUR".into()),
                }),
                2 => Payload::Behavior(BehaviorEvent {
                    visitor_id: "v-1".into(),
                    kind: BehaviorKind::AddToCart,
                    url: Some("/p/1?a=\"b\"".into()),
                    referrer: None,
                }),
                _ => Payload::Inventory(InventoryLevel { sku: "S-1".into(), warehouse: "W@2".into(), on_hand: 12 }),
            };
            Event::new(
                "acme".into(),
                "agent-1".into(),
                "orders".into(),
                7,
                "2026-11-27T10:00:00Z".parse().unwrap(),
                payload,
            )
        }

        fn awkward() -> impl Strategy<Value = serde_json::Value> {
            prop_oneof![
                Just(serde_json::json!("")),
                Just(serde_json::json!("  ")),
                Just(serde_json::json!("o-1")),
                Just(serde_json::json!("S-1@W@2")),
                Just(serde_json::json!("é\u{1}\"\\")),
                Just(serde_json::json!("x".repeat(1100))),
                Just(serde_json::json!(1)),
                Just(serde_json::json!(-1)),
                Just(serde_json::json!(2)),
                Just(serde_json::json!(1e30)),
                Just(serde_json::json!(12.345678)),
                Just(serde_json::json!("12.34")),
                Just(serde_json::json!(null)),
                Just(serde_json::json!(true)),
                Just(serde_json::json!([])),
                Just(serde_json::json!({})),
                Just(serde_json::json!("sales")),
                Just(serde_json::json!("inventory")),
                Just(serde_json::json!("placed")),
                Just(serde_json::json!("2026-11-27T10:00:00+02:00")),
                Just(serde_json::json!([{"sku": "", "quantity": 1, "unit_price": 1}])),
                Just(serde_json::json!([{"sku": "A", "quantity": 1000000, "unit_price": 2000000}])),
            ]
        }

        proptest! {
            #[test]
            fn on_mutated_events(which in 0usize..4, in_data in any::<bool>(), field in 0usize..12, how in 0u8..3, value in awkward()) {
                let mut json: serde_json::Value = serde_json::from_slice(&base(which).to_json()).unwrap();
                let object = if in_data { json["data"].as_object_mut().unwrap() } else { json.as_object_mut().unwrap() };
                let keys: Vec<String> = object.keys().cloned().collect();
                let key = keys[field % keys.len()].clone();
                match how {
                    0 => { object.insert(key, value); }
                    1 => { object.remove(&key); }
                    _ => { object.insert("extra".into(), value); }
                }
                let bytes = json.to_string().into_bytes();
                match (Event::from_json(&bytes), EventView::parse(&bytes)) {
                    (Ok(e), Ok(v)) => {
                        prop_assert_eq!((&*v.tenant, &*v.agent_id, &*v.source_id), (&*e.tenant, &*e.agent_id, &*e.source_id));
                        prop_assert_eq!((v.seq, v.event_time, &*v.entity_key, v.schema_version), (e.seq, e.event_time, &*e.entity_key, e.schema_version));
                        prop_assert_eq!(v.domain(), e.domain());
                        prop_assert_eq!(v.payload.entity_key(), e.payload.entity_key());
                        // Written from the borrowed parts, the event is the owned one's JSON.
                        let written = event_json(&v.tenant, &v.agent_id, &v.source_id, v.seq, &v.event_time, &v.payload).unwrap();
                        prop_assert_eq!(String::from_utf8(written).unwrap(), String::from_utf8(e.to_json()).unwrap());
                    }
                    (Err(EventError::Json(_)), Err(EventError::Json(_))) => {}
                    (Err(a), Err(b)) => prop_assert_eq!(a.to_string(), b.to_string()),
                    (a, b) => prop_assert!(false, "from_json {:?} but the view {:?} on {}", a.map(|_| ()), b.map(|_| ()), json),
                }
            }
        }
    }

    #[test]
    fn entity_keys_per_domain() {
        let inv: Payload = Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(inv.entity_key(), "S@W1");
        assert_eq!(inv.empty_key_field(), None);
        let blank: Payload = Payload::Inventory(InventoryLevel { sku: " ".into(), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(blank.empty_key_field(), Some("sku"));
        let long: Payload =
            Payload::Inventory(InventoryLevel { sku: "S".repeat(1020), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(long.long_key_field(), None, "1 023 bytes is within the limit");
        let longer: Payload =
            Payload::Inventory(InventoryLevel { sku: "S".repeat(1022), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(longer.long_key_field(), Some(("sku and warehouse", 1025)));
        assert!(Domain::ALL.iter().enumerate().all(|(i, d)| *d as usize == i));
        assert_eq!("behavior".parse::<Domain>().unwrap(), Domain::Behavior);
        assert!("orders".parse::<Domain>().is_err());
    }

    /// Amounts, quantities and stock beyond their bounds are refused (issue 17: three orders
    /// of 4·10^14 each overflowed a tenant's sums); the bounds themselves pass.
    #[test]
    fn amounts_quantities_and_stock_are_bounded() {
        let with = |amount: &str, quantity: i64, unit_price: &str| {
            let mut e = order();
            let Payload::Sales(o) = &mut e.payload else { unreachable!() };
            o.amount = Money::parse(amount).unwrap();
            o.items[0].quantity = quantity;
            o.items[0].unit_price = Money::parse(unit_price).unwrap();
            e.check()
        };
        assert!(with("1000000000000", 1, "1000000000000").is_ok());
        assert!(with("-1000000000000", -1, "-1000000000000").is_ok(), "refunds are negative");
        let err = with("400000000000000", 1, "1").unwrap_err();
        assert_eq!(err.to_string(), "event's amount is 400000000000000: beyond the plausible bound of ±1000000000000");
        let err = with("1", 1_000_000_001, "1").unwrap_err();
        assert!(matches!(err, EventError::OutOfBounds { field: "quantity", .. }), "{err}");
        let err = with("1", 1_000_000, "2000000").unwrap_err();
        assert!(matches!(err, EventError::OutOfBounds { field: "line total (quantity × unit_price)", .. }), "{err}");
        let err = with("1", 1, "-1000000000000.0001").unwrap_err();
        assert!(matches!(err, EventError::OutOfBounds { field: "unit_price", .. }), "{err}");
        let extreme = Money(i64::MIN);
        assert!(
            Payload::<String>::Marketing(MarketingTouch {
                user_id: "u".into(),
                channel: "ads".into(),
                campaign: "c".into(),
                cost: Some(extreme),
                currency: None,
            })
            .check_bounds()
            .is_err()
        );
        let stock = |on_hand| -> Payload {
            Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W".into(), on_hand })
        };
        assert!(stock(MAX_STOCK).check_bounds().is_ok());
        assert!(stock(i64::MIN).check_bounds().is_err());
    }
}
