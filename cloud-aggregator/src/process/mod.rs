//! Processors: turn events into roll-ups in the serving store, exactly once.
//!
//! Both modes end in the same [`crate::store::Store::commit`]: [`kafka`] reads the domain
//! topics as a consumer group and commits offsets with the roll-ups; [`embedded`] takes batches
//! straight from an in-process gateway. The metrics are computed by [`crate::analytics`] inside that commit.

pub mod embedded;
pub mod kafka;
