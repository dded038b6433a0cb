//! The embedded processor: the gateway hands it batches in-process (no Kafka), and it answers
//! each batch only after the serving store committed it, so the gateway can acknowledge.
//!
//! Runs on a thread of its own (SQLite blocks); the request queue is bounded, so a slow store
//! slows the gateway, which slows the agents.
//!
//! Ordering: de-duplication keeps the highest seq applied per source, so a batch must never be
//! applied after a later batch of its source was. When a commit fails, the batches of that
//! commit fail, and so does every later batch of the same connections that is already queued
//! (the connection is *poisoned*): the agent reconnects and re-sends all of them in order.

use std::collections::HashSet;
use std::thread::JoinHandle;

use actidash_shared::event::Event;
use actidash_shared::kafka::FleetRecord;
use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::analytics::AnalyticsConfig;
use crate::store::{CommitWork, Location, Store, StreamInput};

/// The stream name of embedded input in the de-duplication marks.
pub const EMBEDDED_STREAM: &str = "embedded";

/// Most requests grouped into one store transaction.
const MAX_GROUP: usize = 64;

/// Work for the embedded processor.
#[derive(Debug)]
pub enum EmbeddedInput {
    /// One batch of a gateway connection; the reply says whether it is durable.
    Batch { connection: u64, events: Vec<Event>, reply: oneshot::Sender<Result<(), String>> },
    /// A heartbeat to store (boxed: far larger than the other variants).
    Fleet(Box<FleetRecord>),
    /// The connection ended: forget it.
    Closed { connection: u64 },
}

/// Starts the processor thread; it stops when every sender is dropped.
pub fn spawn(
    store: Location,
    analytics: AnalyticsConfig,
    capacity: usize,
) -> anyhow::Result<(mpsc::Sender<EmbeddedInput>, JoinHandle<()>)> {
    let store = store.open()?.with_analytics(analytics);
    let (tx, mut rx) = mpsc::channel::<EmbeddedInput>(capacity);
    let handle = std::thread::Builder::new()
        .name("embedded-processor".into())
        .spawn(move || {
            info!("embedded processor started");
            let mut processor = Processor { store, poisoned: HashSet::new() };
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                processor.process_group(group);
            }
            info!("embedded processor stopped");
        })
        .context("spawning the embedded processor")?;
    Ok((tx, handle))
}

struct Processor {
    store: Store,
    /// Connections with a failed batch: their later batches fail too.
    poisoned: HashSet<u64>,
}

impl Processor {
    fn process_group(&mut self, group: Vec<EmbeddedInput>) {
        let mut work = CommitWork::default();
        let mut replies = Vec::new();
        for input in group {
            match input {
                EmbeddedInput::Batch { connection, events, reply } => {
                    if self.poisoned.contains(&connection) {
                        let _ = reply
                            .send(Err("an earlier batch of this connection failed; re-send after reconnecting".into()));
                        continue;
                    }
                    work.inputs.push(StreamInput { stream: EMBEDDED_STREAM.into(), events, offset: None });
                    replies.push((connection, reply));
                }
                EmbeddedInput::Fleet(record) => work.fleet.push(*record),
                EmbeddedInput::Closed { connection } => {
                    self.poisoned.remove(&connection);
                }
            }
        }
        if work.inputs.is_empty() && work.fleet.is_empty() {
            return;
        }
        match self.store.commit(work) {
            Ok(_) => {
                for (_, reply) in replies {
                    let _ = reply.send(Ok(()));
                }
            }
            Err(e) => {
                error!(error = %e, "serving store commit failed; the batches will be re-sent");
                for (connection, reply) in replies {
                    self.poisoned.insert(connection);
                    let _ = reply.send(Err(e.to_string()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(connection: u64, seq: u64) -> (EmbeddedInput, oneshot::Receiver<Result<(), String>>) {
        let event = actidash_shared::testing::sale("t", "a", seq, "1");
        let (reply, rx) = oneshot::channel();
        (EmbeddedInput::Batch { connection, events: vec![event], reply }, rx)
    }

    #[test]
    fn a_failed_commit_poisons_the_connection_until_it_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let mut p = Processor { store: Store::open(&path).unwrap(), poisoned: HashSet::new() };
        let (b0, r0) = batch(1, 0);
        let (other, r_other) = batch(2, 0);
        p.store.fail_writes();
        p.process_group(vec![b0]);
        assert!(r0.blocking_recv().unwrap().is_err());

        // The store works again, but connection 1's queued later batch must not be applied.
        p.store = Store::open(&path).unwrap();
        let (b1, r1) = batch(1, 1);
        p.process_group(vec![b1, other]);
        let err = r1.blocking_recv().unwrap().unwrap_err();
        assert!(err.contains("earlier batch of this connection failed"), "{err}");
        assert!(r_other.blocking_recv().unwrap().is_ok(), "other connections are unaffected");

        // After the reconnection (a new connection id), the re-sent batches apply in order.
        p.process_group(vec![EmbeddedInput::Closed { connection: 1 }]);
        assert!(p.poisoned.is_empty());
        let (b0, r0) = batch(3, 0);
        let (b1, r1) = batch(3, 1);
        p.process_group(vec![b0, b1]);
        assert!(r0.blocking_recv().unwrap().is_ok() && r1.blocking_recv().unwrap().is_ok());
        let totals = p.store.sales_totals(None).unwrap();
        assert_eq!(totals[0].orders, 2, "seq 0 of agent a once (conn 2), then seq 1 — 0 again is a duplicate");
    }
}
