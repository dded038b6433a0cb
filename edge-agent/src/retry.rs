//! Retry timing shared by the shipper and the database sources.

use std::time::Duration;

use rand::Rng as _;

/// Exponential backoff from `base` after `n_failures` failures, capped at `max`, with full
/// jitter in [50 %, 100 %] so that many agents retrying do not move in step.
pub fn backoff(base: Duration, n_failures: u32, max: Duration) -> Duration {
    let exp = base.saturating_mul(1u32 << n_failures.min(16)).min(max);
    exp.mul_f64(rand::rng().random_range(0.5..=1.0))
}
