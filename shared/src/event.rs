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
    event_time: DateTime<Utc>,
    domain: Domain,
    entity_key: String,
    data: Box<serde_json::value::RawValue>,
}

/// Serialization borrows straight from the event (no intermediate JSON value): this runs once
/// per event on the agent's hot path. The field order is the schema's.
impl Serialize for Event {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        #[serde(untagged)]
        enum Data<'a> {
            Sales(&'a SalesOrder),
            Marketing(&'a MarketingTouch),
            Behavior(&'a BehaviorEvent),
            Inventory(&'a InventoryLevel),
        }
        #[derive(Serialize)]
        struct EventRef<'a> {
            schema_version: u16,
            tenant: &'a str,
            agent_id: &'a str,
            source_id: &'a str,
            seq: u64,
            event_time: &'a DateTime<Utc>,
            domain: Domain,
            entity_key: &'a str,
            data: Data<'a>,
        }
        let data = match &self.payload {
            Payload::Sales(p) => Data::Sales(p),
            Payload::Marketing(p) => Data::Marketing(p),
            Payload::Behavior(p) => Data::Behavior(p),
            Payload::Inventory(p) => Data::Inventory(p),
        };
        EventRef {
            schema_version: self.schema_version,
            tenant: &self.tenant,
            agent_id: &self.agent_id,
            source_id: &self.source_id,
            seq: self.seq,
            event_time: &self.event_time,
            domain: self.payload.domain(),
            entity_key: &self.entity_key,
            data,
        }
        .serialize(serializer)
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
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    Sales(SalesOrder),
    Marketing(MarketingTouch),
    Behavior(BehaviorEvent),
    Inventory(InventoryLevel),
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
        match self {
            Payload::Sales(o) => o.order_id.clone(),
            Payload::Marketing(m) => m.user_id.clone(),
            Payload::Behavior(b) => b.visitor_id.clone(),
            Payload::Inventory(i) => format!("{}@{}", i.sku, i.warehouse),
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
            Payload::Sales(o) => o.order_id.len(),
            Payload::Marketing(m) => m.user_id.len(),
            Payload::Behavior(b) => b.visitor_id.len(),
            Payload::Inventory(i) => i.sku.len() + 1 + i.warehouse.len(),
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
        value.trim().is_empty().then_some(field)
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
pub struct SalesOrder {
    pub order_id: String,
    pub customer_id: String,
    /// Sales channel: `web`, `app`, `store`, `marketplace`...
    pub channel: String,
    /// The store or site that took the order.
    pub site: String,
    /// ISO 3166-1 alpha-2.
    pub country: String,
    /// ISO 4217.
    pub currency: String,
    /// Order total, in `currency`.
    pub amount: Money,
    #[serde(default)]
    pub items: Vec<LineItem>,
    pub status: OrderStatus,
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LineItem {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: Money,
}

/// A marketing touch: an ad click, an email open, an affiliate visit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MarketingTouch {
    pub user_id: String,
    pub channel: String,
    pub campaign: String,
    /// What the touch cost, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<Money>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub currency: Option<String>,
}

/// What a visitor did on a site or in an app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BehaviorEvent {
    /// The logged-in user or an anonymous visitor id.
    pub visitor_id: String,
    #[serde(rename = "type")]
    pub kind: BehaviorKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
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
pub struct InventoryLevel {
    pub sku: String,
    pub warehouse: String,
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
        let event: Event = serde_json::from_slice(bytes)?;
        event.check()?;
        Ok(event)
    }

    /// The checks every reader applies (the gateway to each event it receives, the agent to
    /// each event before it is spooled, so that what the gateway would refuse never enters the
    /// line): the schema version, a non-empty key of at most [`MAX_KEY_BYTES`], and an entity
    /// key that is the payload's.
    pub fn check(&self) -> Result<(), EventError> {
        let event = self;
        if event.schema_version != SCHEMA_VERSION {
            return Err(EventError::UnsupportedVersion { found: event.schema_version });
        }
        if let Some(field) = event.payload.empty_key_field() {
            return Err(EventError::EmptyKey { field });
        }
        if let Some((field, len)) = event.payload.long_key_field() {
            return Err(EventError::LongKey { field, len });
        }
        let expected = event.payload.entity_key();
        if event.entity_key != expected {
            return Err(EventError::EntityKeyMismatch { found: event.entity_key.clone(), expected });
        }
        event.payload.check_bounds()
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

    #[test]
    fn entity_keys_per_domain() {
        let inv = Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(inv.entity_key(), "S@W1");
        assert_eq!(inv.empty_key_field(), None);
        let blank = Payload::Inventory(InventoryLevel { sku: " ".into(), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(blank.empty_key_field(), Some("sku"));
        let long = Payload::Inventory(InventoryLevel { sku: "S".repeat(1020), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(long.long_key_field(), None, "1 023 bytes is within the limit");
        let longer = Payload::Inventory(InventoryLevel { sku: "S".repeat(1022), warehouse: "W1".into(), on_hand: 3 });
        assert_eq!(longer.long_key_field(), Some(("sku and warehouse", 1025)));
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
            Payload::Marketing(MarketingTouch {
                user_id: "u".into(),
                channel: "ads".into(),
                campaign: "c".into(),
                cost: Some(extreme),
                currency: None,
            })
            .check_bounds()
            .is_err()
        );
        let stock = |on_hand| Payload::Inventory(InventoryLevel { sku: "S".into(), warehouse: "W".into(), on_hand });
        assert!(stock(MAX_STOCK).check_bounds().is_ok());
        assert!(stock(i64::MIN).check_bounds().is_err());
    }
}
