//! Sessionization, as a pure function of a visitor's sessions and new hits.
//!
//! A session is a run of one visitor's behavior events (by event time) in which no two
//! consecutive events are more than `gap` apart; a gap of exactly `gap` continues the session.
//! A session is described by its first and last event times, its number of events, the set of
//! event types it holds, and the referrer of its first event (the host of the `referrer` URL,
//! `(direct)` without one; of two first events at the same instant, the smaller host).
//!
//! Adding events can only join sessions (an event inside a gap bridges the two sessions around
//! it), never split one; an event joins at most two sessions. [`apply`] returns which stored
//! sessions are replaced and by what, so that their roll-up contributions are retracted and
//! the new ones added in the same transaction.

use actidash_shared::event::BehaviorKind;

/// The behavior types in bit order of a session's type set.
pub const KINDS: [BehaviorKind; 6] = [
    BehaviorKind::PageView,
    BehaviorKind::ProductView,
    BehaviorKind::Search,
    BehaviorKind::AddToCart,
    BehaviorKind::Checkout,
    BehaviorKind::Purchase,
];

/// Every type set (6 bits) as decimal text, the `mask` dimension of [`crate::analytics::tables::SESSIONS`].
const MASK_TEXT: [&str; 64] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16", "17", "18", "19", "20",
    "21", "22", "23", "24", "25", "26", "27", "28", "29", "30", "31", "32", "33", "34", "35", "36", "37", "38", "39",
    "40", "41", "42", "43", "44", "45", "46", "47", "48", "49", "50", "51", "52", "53", "54", "55", "56", "57", "58",
    "59", "60", "61", "62", "63",
];

/// The wire name of a behavior type (`page_view`…).
pub fn kind_name(kind: BehaviorKind) -> &'static str {
    match kind {
        BehaviorKind::PageView => "page_view",
        BehaviorKind::ProductView => "product_view",
        BehaviorKind::Search => "search",
        BehaviorKind::AddToCart => "add_to_cart",
        BehaviorKind::Checkout => "checkout",
        BehaviorKind::Purchase => "purchase",
    }
}

/// A behavior type by its wire name.
pub fn kind_by_name(name: &str) -> Option<BehaviorKind> {
    KINDS.into_iter().find(|k| kind_name(*k) == name)
}

/// The bit of a type in a session's type set.
pub fn kind_bit(kind: BehaviorKind) -> u8 {
    1 << KINDS.iter().position(|k| *k == kind).unwrap_or(0)
}

/// The referrer dimension of an event: the host of its referrer URL, lower-cased, without
/// `www.`; `(direct)` when there is none.
pub fn referrer_host(referrer: Option<&str>) -> String {
    let Some(url) = referrer.map(str::trim).filter(|r| !r.is_empty()) else { return "(direct)".into() };
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = host.split(':').next().unwrap_or("").to_ascii_lowercase();
    let host = host.strip_prefix("www.").map(str::to_owned).unwrap_or(host);
    if host.is_empty() { "(direct)".into() } else { host }
}

/// One behavior event, as sessionization sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub time_ms: i64,
    pub kind: BehaviorKind,
    pub referrer: String,
}

/// One session of a visitor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Session {
    pub start_ms: i64,
    pub end_ms: i64,
    pub events: i64,
    /// Set of types ([`kind_bit`]).
    pub mask: u8,
    /// Referrer of the first event.
    pub referrer: String,
}

impl Session {
    fn of(hit: &Hit) -> Session {
        Session {
            start_ms: hit.time_ms,
            end_ms: hit.time_ms,
            events: 1,
            mask: kind_bit(hit.kind),
            referrer: hit.referrer.clone(),
        }
    }

    fn absorb(&mut self, other: Session) {
        if (other.start_ms, &other.referrer) < (self.start_ms, &self.referrer) {
            self.referrer = other.referrer;
        }
        self.start_ms = self.start_ms.min(other.start_ms);
        self.end_ms = self.end_ms.max(other.end_ms);
        self.events += other.events;
        self.mask |= other.mask;
    }

    /// One event, a page view.
    pub fn is_bounce(&self) -> bool {
        self.events == 1 && self.mask == kind_bit(BehaviorKind::PageView)
    }

    /// The session's row in [`crate::analytics::tables::SESSIONS`]: dims and metrics.
    pub fn rollup(&self) -> ([&str; 2], [i64; 4]) {
        (
            [&self.referrer, MASK_TEXT[usize::from(self.mask & 63)]],
            [1, i64::from(self.is_bounce()), self.end_ms - self.start_ms, self.events],
        )
    }
}

/// Adds `hits` to a visitor's stored `sessions`; returns the stored sessions that are replaced
/// (to delete and retract) and the sessions that replace them (to insert and add).
pub fn apply(sessions: &[Session], hits: &[Hit], gap_ms: i64) -> (Vec<Session>, Vec<Session>) {
    let mut all: Vec<Session> = sessions.iter().cloned().chain(hits.iter().map(Session::of)).collect();
    all.sort_by_key(|s| (s.start_ms, s.end_ms));
    let mut merged: Vec<Session> = Vec::with_capacity(all.len());
    for s in all {
        match merged.last_mut() {
            Some(cur) if s.start_ms <= cur.end_ms.saturating_add(gap_ms) => cur.absorb(s),
            _ => merged.push(s),
        }
    }
    let removed: Vec<Session> = sessions.iter().filter(|s| !merged.contains(s)).cloned().collect();
    let added: Vec<Session> = merged.into_iter().filter(|s| !sessions.contains(s)).collect();
    (removed, added)
}

#[cfg(test)]
mod tests {
    use super::*;
    use BehaviorKind::*;

    const MIN: i64 = 60_000;

    fn hit(min: i64, kind: BehaviorKind) -> Hit {
        Hit { time_ms: min * MIN, kind, referrer: "(direct)".into() }
    }

    /// Sessions from scratch, hit by hit in the given order, as the store would apply them.
    fn replay(hits: &[Hit]) -> Vec<Session> {
        let mut stored: Vec<Session> = Vec::new();
        for h in hits {
            let (removed, added) = apply(&stored, std::slice::from_ref(h), 30 * MIN);
            stored.retain(|s| !removed.contains(s));
            stored.extend(added);
        }
        stored.sort();
        stored
    }

    #[test]
    fn a_gap_of_exactly_the_limit_continues_and_one_more_millisecond_splits() {
        let s = replay(&[hit(0, PageView), hit(30, AddToCart)]);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].events, s[0].end_ms - s[0].start_ms), (2, 30 * MIN));
        let mut late = hit(60, Checkout);
        late.time_ms += 1;
        let s = replay(&[hit(0, PageView), hit(30, AddToCart), late]);
        assert_eq!(s.len(), 2);
    }

    #[test]
    fn a_late_event_merges_two_sessions_and_order_does_not_matter() {
        let hits = [hit(0, PageView), hit(50, Search), hit(25, AddToCart), hit(51, Purchase)];
        let s = replay(&hits);
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].events, 4);
        assert_eq!(s[0].mask, kind_bit(PageView) | kind_bit(Search) | kind_bit(AddToCart) | kind_bit(Purchase));
        let mut reversed = hits.to_vec();
        reversed.reverse();
        assert_eq!(replay(&reversed), s);
        // Without the bridge: two sessions.
        assert_eq!(replay(&[hit(0, PageView), hit(50, Search), hit(51, Purchase)]).len(), 2);
    }

    #[test]
    fn bounce_and_first_referrer() {
        let s = replay(&[hit(0, PageView)]);
        assert!(s[0].is_bounce());
        assert!(!replay(&[hit(0, Search)])[0].is_bounce(), "one event, but not a page view");
        assert!(!replay(&[hit(0, PageView), hit(1, PageView)])[0].is_bounce());
        let a = Hit { time_ms: 5 * MIN, kind: PageView, referrer: "google.com".into() };
        let b = Hit { time_ms: 2 * MIN, kind: PageView, referrer: "bing.com".into() };
        let c = Hit { time_ms: 2 * MIN, kind: Search, referrer: "ask.com".into() };
        assert_eq!(replay(&[a.clone(), b.clone()])[0].referrer, "bing.com", "the earlier event's referrer");
        assert_eq!(replay(&[a, b, c])[0].referrer, "ask.com", "same instant: the smaller host");
    }

    #[test]
    fn referrer_hosts() {
        assert_eq!(referrer_host(Some("https://www.Google.com/search?q=x")), "google.com");
        assert_eq!(referrer_host(Some("http://user@news.example.org:8080/a")), "news.example.org");
        assert_eq!(referrer_host(Some("android-app://com.shop")), "com.shop");
        assert_eq!(referrer_host(Some("")), "(direct)");
        assert_eq!(referrer_host(None), "(direct)");
    }
}
