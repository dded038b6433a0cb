//! The metrics, as pure functions of events: revenue, orders and average order value per
//! minute per channel (and currency), and event counts per domain per minute.
//!
//! Revenue semantics: a sales event with status `placed` adds one order and its amount; a
//! `cancelled` or `refunded` one takes them back (in the minute of the cancellation); `paid` and
//! `shipped` change nothing. Amounts are exact fixed-point sums ([`actidash_shared::Money`]).

use std::collections::BTreeMap;

use actidash_shared::event::{Event, Payload};

/// Key of a sales roll-up row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SalesKey {
    pub tenant: String,
    /// Unix seconds of the minute's start.
    pub minute: i64,
    pub channel: String,
    pub currency: String,
}

/// Value of a sales roll-up row.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SalesValue {
    pub orders: i64,
    /// Ten-thousandths of the currency unit.
    pub revenue: i64,
}

/// Key of a domain count row.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DomainKey {
    pub tenant: String,
    pub minute: i64,
    pub domain: &'static str,
}

/// Changes to the roll-ups caused by a set of events, to be added to the stored rows.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RollupDelta {
    pub sales: BTreeMap<SalesKey, SalesValue>,
    pub domains: BTreeMap<DomainKey, i64>,
}

impl RollupDelta {
    pub fn is_empty(&self) -> bool {
        self.sales.is_empty() && self.domains.is_empty()
    }

    /// Adds one event's contribution.
    pub fn add(&mut self, event: &Event) {
        let minute = event.event_time.timestamp().div_euclid(60) * 60;
        *self
            .domains
            .entry(DomainKey { tenant: event.tenant.clone(), minute, domain: event.domain().as_str() })
            .or_default() += 1;
        if let Payload::Sales(order) = &event.payload {
            let sign = order.status.revenue_sign();
            if sign != 0 {
                let value = self
                    .sales
                    .entry(SalesKey {
                        tenant: event.tenant.clone(),
                        minute,
                        channel: order.channel.clone(),
                        currency: order.currency.clone(),
                    })
                    .or_default();
                value.orders += sign;
                value.revenue = value.revenue.saturating_add(sign.saturating_mul(order.amount.raw()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actidash_shared::Money;
    use actidash_shared::event::{BehaviorEvent, BehaviorKind, OrderStatus};

    fn sale(time: &str, channel: &str, amount: &str, status: OrderStatus) -> Event {
        actidash_shared::testing::sale_with("t", "a", 0, time, channel, amount, status)
    }

    /// Data-driven check: events in, expected (minute offset, channel, orders, revenue) out.
    fn check(events: &[Event], expected: &[(i64, &str, i64, &str)]) {
        let mut delta = RollupDelta::default();
        for e in events {
            delta.add(e);
        }
        let base = "2026-11-27T10:00:00Z".parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp();
        let got: Vec<(i64, String, i64, i64)> =
            delta.sales.iter().map(|(k, v)| ((k.minute - base) / 60, k.channel.clone(), v.orders, v.revenue)).collect();
        let want: Vec<(i64, String, i64, i64)> =
            expected.iter().map(|(m, c, o, r)| (*m, (*c).to_owned(), *o, Money::parse(r).unwrap().raw())).collect();
        assert_eq!(got, want);
    }

    #[test]
    fn revenue_per_minute_and_channel() {
        use OrderStatus::*;
        check(
            &[
                sale("2026-11-27T10:00:05Z", "web", "10.50", Placed),
                sale("2026-11-27T10:00:59Z", "web", "4.50", Placed),
                sale("2026-11-27T10:00:30Z", "app", "100", Placed),
                sale("2026-11-27T10:01:00Z", "web", "7", Placed),
            ],
            &[(0, "app", 1, "100"), (0, "web", 2, "15"), (1, "web", 1, "7")],
        );
    }

    #[test]
    fn cancellations_take_back_and_updates_do_not_count() {
        use OrderStatus::*;
        check(
            &[
                sale("2026-11-27T10:00:05Z", "web", "20", Placed),
                sale("2026-11-27T10:00:10Z", "web", "20", Paid),
                sale("2026-11-27T10:00:20Z", "web", "20", Shipped),
                sale("2026-11-27T10:02:00Z", "web", "20", Refunded),
            ],
            &[(0, "web", 1, "20"), (2, "web", -1, "-20")],
        );
    }

    #[test]
    fn every_domain_is_counted() {
        let mut delta = RollupDelta::default();
        delta.add(&sale("2026-11-27T10:00:05Z", "web", "1", OrderStatus::Paid));
        delta.add(&Event::new(
            "t".into(),
            "a".into(),
            "w".into(),
            0,
            "2026-11-27T10:00:06Z".parse().unwrap(),
            Payload::Behavior(BehaviorEvent {
                visitor_id: "v".into(),
                kind: BehaviorKind::PageView,
                url: None,
                referrer: None,
            }),
        ));
        let counts: Vec<(&str, i64)> = delta.domains.iter().map(|(k, v)| (k.domain, *v)).collect();
        assert_eq!(counts, [("behavior", 1), ("sales", 1)]);
        assert!(delta.sales.is_empty(), "a paid update adds no revenue");
    }
}
