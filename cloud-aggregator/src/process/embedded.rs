//! The embedded processor: the gateway hands it batches in-process (no Kafka), and it answers
//! each batch only after the serving store committed it, so the gateway can acknowledge.
//!
//! Runs on a thread of its own (SQLite blocks); the request queue is bounded, so a slow store
//! slows the gateway, which slows the agents.

use std::path::Path;
use std::thread::JoinHandle;

use actidash_shared::event::Event;
use actidash_shared::kafka::FleetRecord;
use anyhow::Context as _;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info};

use crate::store::{CommitWork, Store, StreamInput};

/// The stream name of embedded input in the de-duplication marks.
pub const EMBEDDED_STREAM: &str = "embedded";

/// Most requests grouped into one store transaction.
const MAX_GROUP: usize = 64;

/// Work for the embedded processor.
#[derive(Debug)]
pub enum EmbeddedInput {
    /// One batch; the reply says whether it is durable.
    Batch {
        events: Vec<Event>,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Fleet(FleetRecord),
}

/// Starts the processor thread; it stops when every sender is dropped.
pub fn spawn(store_path: &Path, capacity: usize) -> anyhow::Result<(mpsc::Sender<EmbeddedInput>, JoinHandle<()>)> {
    let mut store = Store::open(store_path)?;
    let (tx, mut rx) = mpsc::channel::<EmbeddedInput>(capacity);
    let handle = std::thread::Builder::new()
        .name("embedded-processor".into())
        .spawn(move || {
            info!("embedded processor started");
            while let Some(first) = rx.blocking_recv() {
                let mut group = vec![first];
                while group.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(next) => group.push(next),
                        Err(_) => break,
                    }
                }
                process_group(&mut store, group);
            }
            info!("embedded processor stopped");
        })
        .context("spawning the embedded processor")?;
    Ok((tx, handle))
}

fn process_group(store: &mut Store, group: Vec<EmbeddedInput>) {
    let mut work = CommitWork::default();
    let mut replies = Vec::new();
    for input in group {
        match input {
            EmbeddedInput::Batch { events, reply } => {
                work.inputs.push(StreamInput { stream: EMBEDDED_STREAM.into(), events, offset: None, gap_check: true });
                replies.push(reply);
            }
            EmbeddedInput::Fleet(record) => work.fleet.push(record),
        }
    }
    match store.commit(work) {
        Ok(outcome) => {
            for (idx, reply) in replies.into_iter().enumerate() {
                let result = match outcome.gaps.iter().find(|(i, _)| *i == idx) {
                    Some((_, why)) => Err(why.clone()),
                    None => Ok(()),
                };
                let _ = reply.send(result);
            }
        }
        Err(e) => {
            error!(error = %e, "serving store commit failed; batches will be re-sent");
            for reply in replies {
                let _ = reply.send(Err(e.to_string()));
            }
        }
    }
}
