//! A realistic multi-source data set for the analytics checks: order exports from two ERP
//! sources, web analytics from two collectors (one visitor's events split between them),
//! marketing touches from a CRM, and stock levels from a WMS — joined the way real shops are
//! (touch `user` = order `customer.id`), with events that arrive late (written minutes after
//! they happened) and cancellations and refunds of earlier orders.
//!
//! Each record is kept twice: as the raw JSON line the on-prem system writes (what the agent
//! reads, and what [`crate::reference`] computes from) and as the typed event the agent would
//! ship (for tests that drive the processors directly).

use actidash_shared::Money;
use actidash_shared::event::{
    BehaviorEvent, BehaviorKind, Event, InventoryLevel, LineItem, MarketingTouch, OrderStatus, Payload, SalesOrder,
};
use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::json;

use crate::generator::Feed;

/// One record of one source.
#[derive(Debug, Clone)]
pub struct Record {
    pub agent: &'static str,
    pub source: &'static str,
    pub feed: Feed,
    /// The raw line, as the on-prem system writes it.
    pub line: String,
    /// The event the agent maps it to (seq is the record's index within its source).
    pub event: Event,
}

impl Record {
    /// The raw line with its identity, for [`crate::reference::compute`].
    pub fn raw(&self) -> crate::reference::RawLine {
        crate::reference::RawLine {
            agent: self.agent.into(),
            source: self.source.into(),
            seq: self.event.seq,
            feed: self.feed,
            line: self.line.clone(),
        }
    }
}

/// The sources of the data set: (agent, source, feed).
pub const SOURCES: [(&str, &str, Feed); 6] = [
    ("erp", "orders-eu", Feed::Orders),
    ("erp", "orders-world", Feed::Orders),
    ("web-a", "web", Feed::Web),
    ("web-b", "web", Feed::Web),
    ("crm", "marketing", Feed::Marketing),
    ("wms", "stock", Feed::Inventory),
];

const CHANNELS: [&str; 4] = ["web", "app", "store", "marketplace"];
const SITES: [(&str, &str, &str, usize); 4] = [
    ("shop-fr", "FR", "EUR", 0),
    ("shop-de", "DE", "EUR", 0),
    ("shop-uk", "GB", "GBP", 1),
    ("shop-us", "US", "USD", 1),
];
const TOUCH_CHANNELS: [&str; 5] = ["google", "facebook", "newsletter", "affiliate", "tiktok"];
const REFERRERS: [&str; 5] = [
    "",
    "https://www.google.com/search?q=shoes",
    "https://m.facebook.com/",
    "https://news.shop.example/nl/42",
    "https://www.google.com/",
];
const KINDS: [(&str, u32); 6] =
    [("page_view", 50), ("product_view", 20), ("search", 10), ("add_to_cart", 10), ("checkout", 6), ("purchase", 4)];

/// The tenant of the data set.
pub const TENANT: &str = "acme";

/// Generates `n` records whose event times run from `start` over `span_ms`; one in
/// `late_every` is written up to `max_late_ms` after it happened (0: none late).
pub fn generate(
    seed: u64,
    n: usize,
    start: DateTime<Utc>,
    span_ms: i64,
    late_every: u32,
    max_late_ms: i64,
) -> Vec<Record> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seqs = [0_u64; SOURCES.len()];
    let mut placed: Vec<(String, String, &'static str, usize, String)> = Vec::new();
    let mut next_order = 1;
    let mut out = Vec::with_capacity(n);
    let t0 = start.timestamp_millis();
    for i in 0..n {
        let now = t0 + span_ms * i as i64 / n.max(1) as i64;
        let late = late_every > 0 && rng.random_range(0..late_every) == 0;
        let t = if late { now - rng.random_range(0..=max_late_ms) } else { now };
        let roll = rng.random_range(0..100);
        let (src, payload, line) = if roll < 25 {
            // Orders: one in ten cancels an earlier order, one in fifty refunds one.
            let action = rng.random_range(0..50);
            let customer = format!("C-{:05}", skewed(&mut rng, 3000));
            if action < 6 && !placed.is_empty() {
                let idx = rng.random_range(0..placed.len());
                let (id, customer, site, src, total) = placed.swap_remove(idx);
                let (_, country, currency, _) = SITES.iter().find(|s| s.0 == site).copied().unwrap_or(SITES[0]);
                let status = if action == 0 { "refunded" } else { "cancelled" };
                let channel = CHANNELS[rng.random_range(0..CHANNELS.len())];
                let line = json!({
                    "id": id, "created_at": rfc3339(t), "customer": {"id": customer}, "channel": channel,
                    "site": site, "country": country, "currency": currency, "total": total, "status": status, "lines": []
                });
                let status = if action == 0 { OrderStatus::Refunded } else { OrderStatus::Cancelled };
                let payload = sales(id, customer, channel, (site, country, currency), &total, vec![], status);
                (src, payload, line)
            } else {
                let id = format!("ORD-{next_order:07}");
                next_order += 1;
                let (site, country, currency, src) = SITES[rng.random_range(0..SITES.len())];
                let channel = CHANNELS[rng.random_range(0..CHANNELS.len())];
                let mut items = Vec::new();
                let mut lines = Vec::new();
                let mut cents_total = 0;
                for _ in 0..rng.random_range(1..4) {
                    let qty: i64 = rng.random_range(1..4);
                    let cents: i64 = rng.random_range(199..25_000);
                    let sku = format!("SKU-{:04}", skewed(&mut rng, 300));
                    let price = format!("{}.{:02}", cents / 100, cents % 100);
                    cents_total += qty * cents;
                    lines.push(json!({"sku": sku, "quantity": qty, "unit_price": price}));
                    items.push(LineItem { sku, quantity: qty, unit_price: Money::parse(&price).unwrap_or_default() });
                }
                let total = format!("{}.{:02}", cents_total / 100, cents_total % 100);
                placed.push((id.clone(), customer.clone(), site, src, total.clone()));
                let line = json!({
                    "id": id, "created_at": rfc3339(t), "customer": {"id": customer, "segment": "returning"},
                    "channel": channel, "site": site, "country": country, "currency": currency, "total": total,
                    "status": "placed", "lines": lines, "payment": {"method": "card"}
                });
                let payload =
                    sales(id, customer, channel, (site, country, currency), &total, items, OrderStatus::Placed);
                (src, payload, line)
            }
        } else if roll < 80 {
            let visitor = format!("V-{:05}", rng.random_range(0..2000));
            let src = 2 + rng.random_range(0..2);
            let mut pick = rng.random_range(0..100);
            let kind = KINDS
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .map_or("page_view", |k| k.0);
            let referrer = REFERRERS[rng.random_range(0..REFERRERS.len())];
            let mut line = json!({
                "ts": t, "visitor": visitor, "event": kind,
                "url": format!("https://shop.example.com/p/SKU-{:04}", rng.random_range(0..300)),
                "ua": "Mozilla/5.0 (X11; Linux x86_64)"
            });
            if !referrer.is_empty() {
                line["referrer"] = referrer.into();
            }
            let payload = Payload::Behavior(BehaviorEvent {
                visitor_id: visitor,
                kind: serde_json::from_value::<BehaviorKind>(kind.into()).unwrap_or(BehaviorKind::PageView),
                url: line["url"].as_str().map(str::to_owned),
                referrer: (!referrer.is_empty()).then(|| referrer.to_owned()),
            });
            (src, payload, line)
        } else if roll < 92 {
            // Whole seconds: the CRM export has no fraction.
            let t_s = t.div_euclid(1000) * 1000;
            let user = format!("C-{:05}", skewed(&mut rng, 3000));
            let channel = TOUCH_CHANNELS[rng.random_range(0..TOUCH_CHANNELS.len())];
            let campaign = format!("{channel}-{}", rng.random_range(1..4));
            let cost = format!("0.{:02}", rng.random_range(1..99));
            let line = json!({
                "time": DateTime::from_timestamp_millis(t_s).unwrap_or_default().format("%Y-%m-%d %H:%M:%S").to_string(),
                "user": user, "utm_source": channel, "utm_campaign": campaign, "cost": cost
            });
            let payload = Payload::Marketing(MarketingTouch {
                user_id: user,
                channel: channel.into(),
                campaign,
                cost: Money::parse(&cost).ok(),
                currency: Some("EUR".into()),
            });
            let event_time = DateTime::from_timestamp_millis(t_s).unwrap_or_default();
            out.push(record(4, &mut seqs, line, payload, event_time));
            continue;
        } else {
            let sku = format!("SKU-{:04}", skewed(&mut rng, 300));
            let warehouse = format!("WH-{}", rng.random_range(1..4));
            let qty = rng.random_range(0..100);
            let line = json!({"at": rfc3339(t), "sku": sku, "warehouse": warehouse, "qty": qty});
            (5, Payload::Inventory(InventoryLevel { sku, warehouse, on_hand: qty }), line)
        };
        let event_time = DateTime::from_timestamp_millis(t).unwrap_or_default();
        out.push(record(src, &mut seqs, line, payload, event_time));
    }
    out
}

/// A sales payload; `place` is (site, country, currency).
fn sales(
    id: String,
    customer: String,
    channel: &str,
    place: (&str, &str, &str),
    total: &str,
    items: Vec<LineItem>,
    status: OrderStatus,
) -> Payload {
    Payload::Sales(SalesOrder {
        order_id: id,
        customer_id: customer,
        channel: channel.into(),
        site: place.0.into(),
        country: place.1.into(),
        currency: place.2.into(),
        amount: Money::parse(total).unwrap_or_default(),
        items,
        status,
    })
}

fn record(src: usize, seqs: &mut [u64], line: serde_json::Value, payload: Payload, time: DateTime<Utc>) -> Record {
    let (agent, source, feed) = SOURCES[src];
    let seq = seqs[src];
    seqs[src] += 1;
    Record {
        agent,
        source,
        feed,
        line: line.to_string(),
        event: Event::new(TENANT.into(), agent.into(), source.into(), seq, time, payload),
    }
}

/// A number below `n`, small ones more often (a few customers and SKUs are most of the data).
fn skewed(rng: &mut StdRng, n: u32) -> u32 {
    let x: f64 = rng.random();
    ((x * x) * f64::from(n)) as u32 % n
}

fn rfc3339(ms: i64) -> String {
    DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}
