//! Memory kept for bursts, given back in quiet spells.
//!
//! Under load each source, the shipper and the acker keep what makes the next round cheap: a
//! SQLite page cache and parsed statements, a compressor and its buffers, read buffers. Once
//! the load is gone they are dead weight in the idle agent's footprint (P7: RSS < 20 MiB), so
//! each owner notes its rounds here and, once per quiet spell of [`Quiet::AFTER`], gives them
//! back; the next round builds them again (a few hundred microseconds, once).

use std::time::{Duration, Instant};

/// A quiet spell's watch: whether an owner's rounds have had nothing to do for long enough.
#[derive(Debug, Default)]
pub struct Quiet {
    since: Option<Instant>,
    released: bool,
}

impl Quiet {
    /// How long nothing happens before memory is given back.
    pub const AFTER: Duration = Duration::from_secs(5);

    /// Notes a round at `now`, busy or not. True once per quiet spell (from the last busy
    /// round, or the first round), when it has lasted [`Quiet::AFTER`]: the moment to give
    /// memory back.
    pub fn settle(&mut self, busy: bool, now: Instant) -> bool {
        if busy {
            *self = Quiet { since: Some(now), released: false };
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if self.released || now.saturating_duration_since(since) < Self::AFTER {
            return false;
        }
        self.released = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn once_per_quiet_spell_after_it_has_lasted() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut q = Quiet::default();
        assert!(!q.settle(false, at(0)), "the first round starts a spell");
        assert!(q.settle(false, at(5_000)));
        assert!(!q.settle(true, at(6_000)), "busy");
        assert!(!q.settle(false, at(6_100)));
        assert!(!q.settle(false, at(10_999)), "not yet five seconds since the busy round");
        assert!(q.settle(false, at(11_000)));
        assert!(!q.settle(false, at(12_000)), "once per spell");
        assert!(!q.settle(false, at(60_000)));
        assert!(!q.settle(true, at(60_100)), "busy again");
        assert!(!q.settle(true, at(64_000)), "and again: the spell starts over");
        assert!(!q.settle(false, at(68_999)));
        assert!(q.settle(false, at(69_000)));
    }
}
