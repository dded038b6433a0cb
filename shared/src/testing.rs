//! Test fixtures shared by the crates' tests (feature `testing`; never in release builds).

use crate::event::{Event, OrderStatus, Payload, SalesOrder};
use crate::money::Money;

/// A sales event: order `o{seq}` of `amount` on channel `web` in EUR, placed at
/// 2026-11-27T10:00:00Z, from source `orders`.
pub fn sale(tenant: &str, agent_id: &str, seq: u64, amount: &str) -> Event {
    sale_with(tenant, agent_id, seq, "2026-11-27T10:00:00Z", "web", amount, OrderStatus::Placed)
}

/// A sales event with every varying part given.
pub fn sale_with(
    tenant: &str,
    agent_id: &str,
    seq: u64,
    time: &str,
    channel: &str,
    amount: &str,
    status: OrderStatus,
) -> Event {
    Event::new(
        tenant.into(),
        agent_id.into(),
        "orders".into(),
        seq,
        time.parse().unwrap_or_default(),
        Payload::Sales(SalesOrder {
            order_id: format!("o{seq}"),
            customer_id: "c".into(),
            channel: channel.into(),
            site: "shop".into(),
            country: "FR".into(),
            currency: "EUR".into(),
            amount: Money::parse(amount).unwrap_or_default(),
            items: vec![],
            status,
        }),
    )
}

/// The first ` ```toml ` block of a module's `//!` documentation, as plain TOML: lets a test
/// parse the documented example so that it cannot drift from the code.
pub fn doc_toml(source: &str) -> Option<String> {
    let start = source.find("//! ```toml\n")? + "//! ```toml\n".len();
    let end = start + source[start..].find("//! ```\n")?;
    Some(
        source[start..end]
            .lines()
            .map(|l| format!("{}\n", l.trim_start_matches("//!").trim_start_matches(' ')))
            .collect(),
    )
}
