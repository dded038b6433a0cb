//! A generator of realistic on-prem e-commerce data, as the systems themselves write it: order
//! exports, web analytics logs, marketing touch exports and stock snapshots, one JSON object
//! per line (about 400 bytes for an order), plus an independent reference of the totals the
//! dashboard must show for them.
//!
//! The reference deliberately shares no code with the product: it parses amounts as text and
//! applies the revenue rules written out in full, so a bug in the product's money or roll-up
//! code cannot hide behind the same bug here.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

/// The kinds of file a generator writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Feed {
    Orders,
    Web,
    Marketing,
    Inventory,
}

impl Feed {
    pub const ALL: [Feed; 4] = [Feed::Orders, Feed::Web, Feed::Marketing, Feed::Inventory];

    pub fn file_name(self) -> &'static str {
        match self {
            Feed::Orders => "orders.jsonl",
            Feed::Web => "web.jsonl",
            Feed::Marketing => "marketing.jsonl",
            Feed::Inventory => "inventory.jsonl",
        }
    }

    pub fn source_id(self) -> &'static str {
        match self {
            Feed::Orders => "orders",
            Feed::Web => "web",
            Feed::Marketing => "marketing",
            Feed::Inventory => "inventory",
        }
    }

    /// The domain the agent maps this feed to.
    pub fn domain(self) -> &'static str {
        match self {
            Feed::Orders => "sales",
            Feed::Web => "behavior",
            Feed::Marketing => "marketing",
            Feed::Inventory => "inventory",
        }
    }

    /// The agent configuration's `[[sources]]` entry for this feed in `dir`.
    pub fn source_toml(self, dir: &std::path::Path) -> String {
        let path = dir.join(self.file_name());
        let mapping = match self {
            Feed::Orders => {
                r#"domain = "sales"
event_time = { field = "created_at", format = "rfc3339" }
fields = { order_id = "id", customer_id = "customer.id", channel = "channel", site = "site", country = "country", currency = "currency", amount = "total", items = "lines", status = "status" }"#
            }
            Feed::Web => {
                r#"domain = "behavior"
event_time = { field = "ts", format = "unix_millis" }
fields = { visitor_id = "visitor", type = "event", url = "url", referrer = "referrer" }"#
            }
            Feed::Marketing => {
                r#"domain = "marketing"
event_time = { field = "time", format = "%Y-%m-%d %H:%M:%S" }
fields = { user_id = "user", channel = "utm_source", campaign = "utm_campaign", cost = "cost" }
constants = { currency = "EUR" }"#
            }
            Feed::Inventory => {
                r#"domain = "inventory"
event_time = { field = "at", format = "rfc3339" }
fields = { sku = "sku", warehouse = "warehouse", on_hand = "qty" }"#
            }
        };
        format!(
            "[[sources]]\nid = \"{}\"\ntype = \"file\"\npath = \"{}\"\npoll_interval_ms = 100\n[sources.mapping]\n{mapping}\n",
            self.source_id(),
            path.display()
        )
    }
}

/// One generated line.
#[derive(Debug, Clone)]
pub struct Line {
    pub feed: Feed,
    pub text: String,
    /// False for lines deliberately broken (the agent must refuse and count them).
    pub valid: bool,
}

/// A deterministic generator.
#[derive(Debug)]
pub struct Generator {
    rng: StdRng,
    next_order: u64,
    placed: Vec<(String, String, String, String)>,
    /// One line in `bad_every` is broken (0: none).
    bad_every: u32,
    n_lines: u64,
}

const CHANNELS: [&str; 4] = ["web", "app", "store", "marketplace"];
const SITES: [(&str, &str, &str); 4] =
    [("shop-fr", "FR", "EUR"), ("shop-de", "DE", "EUR"), ("shop-uk", "GB", "GBP"), ("shop-us", "US", "USD")];
const EVENTS: [&str; 6] = ["page_view", "product_view", "search", "add_to_cart", "checkout", "purchase"];
/// Customers who order and are touched by marketing, and visitors of the site.
const CUSTOMERS: u32 = 5_000;
const VISITORS: u32 = 3_000;
const SOURCES: [&str; 5] = ["google", "facebook", "newsletter", "affiliate", "tiktok"];

impl Generator {
    pub fn new(seed: u64, bad_every: u32) -> Generator {
        Generator { rng: StdRng::seed_from_u64(seed), next_order: 1, placed: Vec::new(), bad_every, n_lines: 0 }
    }

    /// The next line, with the feed chosen by the mix of a real shop (web logs dominate).
    pub fn next_line(&mut self, now: DateTime<Utc>) -> Line {
        let feed = match self.rng.random_range(0..100) {
            0..30 => Feed::Orders,
            30..80 => Feed::Web,
            80..90 => Feed::Marketing,
            _ => Feed::Inventory,
        };
        self.line_for(feed, now)
    }

    pub fn line_for(&mut self, feed: Feed, now: DateTime<Utc>) -> Line {
        self.n_lines += 1;
        if self.bad_every > 0 && self.n_lines.is_multiple_of(u64::from(self.bad_every)) {
            return self.bad_line(feed);
        }
        let value = match feed {
            Feed::Orders => self.order(now),
            Feed::Web => self.web(now),
            Feed::Marketing => self.marketing(now),
            Feed::Inventory => self.inventory(now),
        };
        Line { feed, text: value.to_string(), valid: true }
    }

    fn bad_line(&mut self, feed: Feed) -> Line {
        let text = match self.rng.random_range(0..3) {
            0 => "{\"truncated\": ".to_owned(),
            1 => "{\"id\": \"X\", \"note\": \"a record without the mapped fields\"}".to_owned(),
            _ => "not json at all".to_owned(),
        };
        Line { feed, text, valid: false }
    }

    fn order(&mut self, now: DateTime<Utc>) -> Value {
        // One order in ten is a cancellation of an earlier one.
        if !self.placed.is_empty() && self.rng.random_range(0..10) == 0 {
            let idx = self.rng.random_range(0..self.placed.len());
            let (id, channel, site, total) = self.placed.swap_remove(idx);
            let (_, country, currency) = SITES.iter().find(|s| s.0 == site).copied().unwrap_or(SITES[0]);
            return json!({
                "id": id, "created_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true), "customer": {"id": "C-0"}, "channel": channel,
                "site": site, "country": country, "currency": currency, "total": total, "status": "cancelled",
                "lines": [], "reason": "customer request"
            });
        }
        let id = format!("ORD-{:08}", self.next_order);
        self.next_order += 1;
        let channel = CHANNELS[self.rng.random_range(0..CHANNELS.len())];
        let (site, country, currency) = SITES[self.rng.random_range(0..SITES.len())];
        let n_lines = self.rng.random_range(1..4);
        let mut lines = Vec::new();
        let mut total_cents: i64 = 0;
        for _ in 0..n_lines {
            let quantity: i64 = self.rng.random_range(1..4);
            let cents: i64 = self.rng.random_range(199..25_000);
            total_cents += quantity * cents;
            lines.push(json!({
                "sku": format!("SKU-{:05}", self.rng.random_range(0..5000)),
                "quantity": quantity,
                "unit_price": format!("{}.{:02}", cents / 100, cents % 100),
            }));
        }
        let total = format!("{}.{:02}", total_cents / 100, total_cents % 100);
        if self.placed.len() < 1000 {
            self.placed.push((id.clone(), channel.to_owned(), site.to_owned(), total.clone()));
        }
        json!({
            "id": id,
            "created_at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "customer": {"id": format!("C-{:06}", self.rng.random_range(0..CUSTOMERS)), "segment": "returning"},
            "channel": channel, "site": site, "country": country, "currency": currency,
            "total": total, "status": "placed", "lines": lines,
            "payment": {"method": "card", "psp": "adyen"}, "shipping": {"method": "standard"}
        })
    }

    fn web(&mut self, now: DateTime<Utc>) -> Value {
        let event = EVENTS[self.rng.random_range(0..EVENTS.len())];
        json!({
            "ts": now.timestamp_millis(),
            "visitor": format!("V-{:06}", self.rng.random_range(0..VISITORS)),
            "event": event,
            "url": format!("https://shop.example.com/p/SKU-{:05}?ref=home", self.rng.random_range(0..5000)),
            "referrer": "https://www.google.com/",
            "ua": "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120 Safari/537.36",
            "ip": format!("203.0.113.{}", self.rng.random_range(1..255)),
        })
    }

    fn marketing(&mut self, now: DateTime<Utc>) -> Value {
        json!({
            "time": now.format("%Y-%m-%d %H:%M:%S").to_string(),
            // Touches name the shop's customers, so orders can be attributed to them.
            "user": format!("C-{:06}", self.rng.random_range(0..CUSTOMERS)),
            "utm_source": SOURCES[self.rng.random_range(0..SOURCES.len())],
            "utm_campaign": format!("black-friday-{}", self.rng.random_range(1..6)),
            "cost": format!("0.{:02}", self.rng.random_range(1..99)),
        })
    }

    fn inventory(&mut self, now: DateTime<Utc>) -> Value {
        json!({
            "at": now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "sku": format!("SKU-{:05}", self.rng.random_range(0..5000)),
            "warehouse": format!("WH-{}", self.rng.random_range(1..4)),
            "qty": self.rng.random_range(0..500),
        })
    }
}

/// Totals per (channel, currency): (orders, revenue in cents).
pub type ExpectedTotals = BTreeMap<(String, String), (i64, i64)>;

/// What the dashboard must show for `lines`, computed independently of the product.
pub fn expected_totals<'a>(lines: impl IntoIterator<Item = &'a Line>) -> ExpectedTotals {
    let mut totals = ExpectedTotals::new();
    for line in lines {
        if !line.valid || line.feed != Feed::Orders {
            continue;
        }
        let Ok(v) = serde_json::from_str::<Value>(&line.text) else { continue };
        let sign = match v["status"].as_str() {
            Some("placed") => 1,
            Some("cancelled") | Some("refunded") => -1,
            _ => 0,
        };
        let cents = cents_of(v["total"].as_str().unwrap_or("0"));
        let key = (v["channel"].as_str().unwrap_or("").to_owned(), v["currency"].as_str().unwrap_or("").to_owned());
        let entry = totals.entry(key).or_default();
        entry.0 += sign;
        entry.1 += sign * cents;
    }
    totals.retain(|_, v| *v != (0, 0));
    totals
}

/// Valid events per domain in `lines`.
pub fn expected_domain_counts<'a>(lines: impl IntoIterator<Item = &'a Line>) -> BTreeMap<String, i64> {
    let mut counts = BTreeMap::new();
    for line in lines.into_iter().filter(|l| l.valid) {
        *counts.entry(line.feed.domain().to_owned()).or_default() += 1;
    }
    counts
}

/// "129.90" -> 12990.
fn cents_of(text: &str) -> i64 {
    let (units, cents) = text.split_once('.').unwrap_or((text, "0"));
    let cents = format!("{cents:0<2}");
    units.parse::<i64>().unwrap_or(0) * 100 + cents[..2].parse::<i64>().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_are_about_400_bytes_and_totals_follow_the_rules() {
        let mut g = Generator::new(7, 0);
        let now = Utc::now();
        let lines: Vec<Line> = (0..2000).map(|_| g.line_for(Feed::Orders, now)).collect();
        let placed: Vec<&Line> = lines.iter().filter(|l| l.text.contains("\"placed\"")).collect();
        let mean = placed.iter().map(|l| l.text.len()).sum::<usize>() / placed.len();
        assert!((300..600).contains(&mean), "mean order line is {mean} bytes");
        let totals = expected_totals(&lines);
        let n_placed = placed.len() as i64;
        let n_cancelled = lines.len() as i64 - n_placed;
        assert!(n_cancelled > 0);
        assert_eq!(totals.values().map(|v| v.0).sum::<i64>(), n_placed - n_cancelled);
        assert_eq!(cents_of("129.9"), 12990);
        assert_eq!(cents_of("3"), 300);
    }

    #[test]
    fn bad_lines_are_marked() {
        let mut g = Generator::new(1, 10);
        let lines: Vec<Line> = (0..100).map(|_| g.next_line(Utc::now())).collect();
        assert_eq!(lines.iter().filter(|l| !l.valid).count(), 10);
    }
}
