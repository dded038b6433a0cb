//! The Kafka processor: a member of the processors' consumer group over the domain topics and
//! the fleet topic.
//!
//! Offsets live in the serving store, committed in the same transaction as the roll-ups they
//! produced ([`Store::commit`]). On assignment, each partition starts from its stored offset
//! (set in the rebalance callback, before the fetcher starts). Offsets are also committed to
//! Kafka afterwards, asynchronously, only so that standard lag tools see the group's progress.
//!
//! A batch spans at most one assignment generation: if a rebalance happens while messages are
//! being gathered, they are dropped and read again from the stored offsets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actidash_shared::event::{Domain, Event};
use actidash_shared::kafka::{FleetRecord, domain_topic, fleet_topic};
use anyhow::Context as _;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message as _;
use rdkafka::{ClientConfig, ClientContext, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use crate::analytics::AnalyticsConfig;
use crate::config::KafkaConfig;
use crate::store::{CommitWork, Location, OffsetClaim, Store, StreamInput};

/// Most messages in one store transaction.
const MAX_BATCH: usize = 20_000;
/// Longest wait to fill a batch.
const MAX_BATCH_WAIT: Duration = Duration::from_millis(100);

/// The believed stored offset of each assigned partition.
type Assigned = HashMap<(String, i32), Option<i64>>;

struct ProcessorContext {
    store: Mutex<Store>,
    assigned: Mutex<Assigned>,
    generation: AtomicU64,
    fatal: AtomicBool,
}

impl ClientContext for ProcessorContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        crate::telemetry::record_consumer_lag(&statistics);
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let mut assigned = self.assigned.lock().unwrap_or_else(|p| p.into_inner());
        match rebalance {
            Rebalance::Assign(tpl) => {
                let mut store = self.store.lock().unwrap_or_else(|p| p.into_inner());
                for mut elem in tpl.elements() {
                    let (topic, partition) = (elem.topic().to_owned(), elem.partition());
                    match store.stored_offset(&topic, partition) {
                        Ok(stored) => {
                            let offset = stored.map(Offset::Offset).unwrap_or(Offset::Beginning);
                            if let Err(e) = elem.set_offset(offset) {
                                error!(topic = %topic, partition, error = %e, "cannot set the start offset");
                                self.fatal.store(true, Ordering::SeqCst);
                            }
                            info!(topic = %topic, partition, offset = ?stored, "partition assigned");
                            assigned.insert((topic, partition), stored);
                        }
                        Err(e) => {
                            error!(topic = %topic, partition, error = %e, "cannot read the stored offset");
                            self.fatal.store(true, Ordering::SeqCst);
                        }
                    }
                }
            }
            Rebalance::Revoke(tpl) => {
                for elem in tpl.elements() {
                    info!(topic = elem.topic(), partition = elem.partition(), "partition revoked");
                    assigned.remove(&(elem.topic().to_owned(), elem.partition()));
                }
            }
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// Partitions whose consumer must go back to the stored offset and could not yet: they are
/// unassigned (their messages ignored, nothing of them committed) until a seek succeeds.
#[derive(Debug, Default)]
struct Reseek {
    /// Partition → (its stored offset, the assignment generation it was found in).
    pending: HashMap<(String, i32), (Option<i64>, u64)>,
}

impl Reseek {
    /// Sends a partition's consumer back to `stored` (after a fence or a discontinuity): when
    /// the seek fails, the partition is unassigned and the seek retried later.
    fn send_back(
        &mut self,
        key: (String, i32),
        stored: Option<i64>,
        generation: u64,
        assigned: &mut Assigned,
        mut seek: impl FnMut(&str, i32, Option<i64>) -> bool,
    ) {
        if seek(&key.0, key.1, stored) {
            assigned.insert(key, stored);
        } else {
            assigned.remove(&key);
            self.pending.insert(key, (stored, generation));
        }
    }

    /// Retries the pending seeks; a partition whose seek succeeds is assigned again (unless a
    /// rebalance happened meanwhile, which set every assigned partition's start from the store
    /// anew and makes the pending seeks moot).
    fn retry(
        &mut self,
        generation: u64,
        assigned: &Mutex<Assigned>,
        current_generation: impl Fn() -> u64,
        mut seek: impl FnMut(&str, i32, Option<i64>) -> bool,
    ) {
        self.pending.retain(|_, (_, at)| *at == generation);
        let keys: Vec<(String, i32)> = self.pending.keys().cloned().collect();
        for key in keys {
            let Some(&(stored, _)) = self.pending.get(&key) else { continue };
            if seek(&key.0, key.1, stored) {
                self.pending.remove(&key);
                let mut assigned = assigned.lock().unwrap_or_else(|p| p.into_inner());
                if current_generation() == generation {
                    assigned.insert(key, stored);
                }
            }
        }
    }
}

/// Moves the consumer of a partition to its stored offset (the beginning when none); false,
/// logged, when it cannot.
fn seek_to_stored(consumer: &BaseConsumer<ProcessorContext>, topic: &str, partition: i32, stored: Option<i64>) -> bool {
    let offset = stored.map(Offset::Offset).unwrap_or(Offset::Beginning);
    match consumer.seek(topic, partition, offset, Duration::from_secs(5)) {
        Ok(()) => true,
        Err(e) => {
            warn!(topic, partition, error = %e, "seek failed; the partition's messages are ignored until a retry succeeds");
            false
        }
    }
}

/// A Kafka processor, ready to run.
#[derive(Debug)]
pub struct KafkaProcessor {
    pub config: KafkaConfig,
    pub store: Location,
    pub analytics: AnalyticsConfig,
    pub shutdown: CancellationToken,
}

impl KafkaProcessor {
    /// Runs until shutdown. Blocking: call it on a thread of its own.
    pub fn run(self) -> anyhow::Result<()> {
        let context = ProcessorContext {
            store: Mutex::new(self.store.open()?),
            assigned: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(0),
            fatal: AtomicBool::new(false),
        };
        let consumer: BaseConsumer<ProcessorContext> = ClientConfig::new()
            .set("bootstrap.servers", &self.config.bootstrap_servers)
            .set("group.id", &self.config.group_id)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            // Eager protocols: an assignment is whole, so offsets can be set in the callback.
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("session.timeout.ms", "10000")
            .set("heartbeat.interval.ms", "1000")
            // The consumer's lag per partition, for the metrics.
            .set("statistics.interval.ms", "5000")
            .create_with_context(context)
            .context("creating the Kafka consumer")?;
        let fleet = fleet_topic(&self.config.topic_prefix);
        let mut topics: Vec<String> = Domain::ALL.iter().map(|d| domain_topic(&self.config.topic_prefix, *d)).collect();
        topics.push(fleet.clone());
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&topic_refs).context("subscribing to the topics")?;
        let mut store = self.store.open()?.with_analytics(self.analytics.clone());
        info!(group = %self.config.group_id, topics = ?topics, "Kafka processor started");
        // Partitions whose consumer must go back to the stored offset, and has not yet: they
        // are unassigned (their messages ignored) until the seek succeeds.
        let mut reseek = Reseek::default();

        while !self.shutdown.is_cancelled() {
            if consumer.context().fatal.load(Ordering::SeqCst) {
                anyhow::bail!("the processor cannot read its stored offsets; stopping");
            }
            let generation = consumer.context().generation.load(Ordering::SeqCst);
            reseek.retry(
                generation,
                &consumer.context().assigned,
                || consumer.context().generation.load(Ordering::SeqCst),
                |topic, partition, stored| seek_to_stored(&consumer, topic, partition, stored),
            );
            let mut n_messages = 0;
            let mut n_bad = 0;
            // Per partition: its events, its first message's offset, the offset after its last.
            let mut by_partition: HashMap<(String, i32), (Vec<Event>, i64, i64)> = HashMap::new();
            let mut fleet_records = Vec::new();
            let started = Instant::now();
            // When the batch's oldest record was appended to Kafka (Unix ms), for the latency.
            let mut oldest_append: Option<i64> = None;
            while n_messages < MAX_BATCH {
                let Some(wait) = MAX_BATCH_WAIT.checked_sub(started.elapsed()) else { break };
                let message = match consumer.poll(wait) {
                    None => break,
                    Some(Ok(m)) => m,
                    Some(Err(e)) => {
                        warn!(error = %e, "Kafka consumer error");
                        break;
                    }
                };
                n_messages += 1;
                if let Some(at) = message.timestamp().to_millis() {
                    oldest_append = Some(oldest_append.map_or(at, |o| o.min(at)));
                }
                let key = (message.topic().to_owned(), message.partition());
                let entry = by_partition.entry(key).or_insert_with(|| (Vec::new(), message.offset(), 0));
                entry.2 = message.offset() + 1;
                let payload = message.payload().unwrap_or_default();
                if message.topic() == fleet {
                    match serde_json::from_slice::<FleetRecord>(payload) {
                        Ok(r) => fleet_records.push(r),
                        Err(e) => {
                            n_bad += 1;
                            warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %e, "bad fleet record skipped");
                        }
                    }
                    continue;
                }
                match Event::from_json(payload) {
                    Ok(event) => entry.0.push(event),
                    Err(e) => {
                        n_bad += 1;
                        warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(), error = %e, "bad event record skipped");
                    }
                }
            }
            if by_partition.is_empty() {
                continue;
            }
            if consumer.context().generation.load(Ordering::SeqCst) != generation {
                debug!(n_messages, "assignment changed while gathering a batch; reading again from stored offsets");
                continue;
            }
            let assigned = consumer.context().assigned.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut work = CommitWork { fleet: fleet_records, n_bad_records: n_bad, ..CommitWork::default() };
            for ((topic, partition), (events, first, new_next)) in by_partition {
                let Some(expected) = assigned.get(&(topic.clone(), partition)) else { continue };
                work.inputs.push(StreamInput {
                    stream: format!("{topic}/{partition}"),
                    events,
                    offset: Some(OffsetClaim { topic, partition, expected_next: *expected, first, new_next }),
                });
            }
            let claims: Vec<OffsetClaim> = work.inputs.iter().filter_map(|i| i.offset.clone()).collect();
            let outcome = store.commit(work)?;
            if let Some(at) = oldest_append {
                let age_ms = chrono::Utc::now().timestamp_millis().saturating_sub(at).max(0);
                metrics::histogram!(crate::telemetry::PROCESSOR_LATENCY_SECONDS).record(age_ms as f64 / 1000.0);
            }
            let mut positions = TopicPartitionList::new();
            {
                let mut assigned = consumer.context().assigned.lock().unwrap_or_else(|p| p.into_inner());
                for (idx, claim) in claims.into_iter().enumerate() {
                    let key = (claim.topic.clone(), claim.partition);
                    let fenced = outcome.fenced.contains(&idx);
                    if fenced || outcome.discontinuous.contains(&idx) {
                        let stored = store.stored_offset(&claim.topic, claim.partition)?;
                        if fenced {
                            warn!(topic = %claim.topic, partition = claim.partition, ?stored, "partition moved by another processor; seeking to its stored offset");
                        } else {
                            error!(topic = %claim.topic, partition = claim.partition, ?stored, first = claim.first, "the batch does not start at the stored offset (the consumer skipped or repeated a range); not committed, seeking back to the stored offset");
                        }
                        reseek.send_back(key, stored, generation, &mut assigned, |topic, partition, stored| {
                            seek_to_stored(&consumer, topic, partition, stored)
                        });
                    } else {
                        let _ = positions.add_partition_offset(
                            &claim.topic,
                            claim.partition,
                            Offset::Offset(claim.new_next),
                        );
                        assigned.insert(key, Some(claim.new_next));
                    }
                }
            }
            debug!(n_messages, applied = outcome.n_applied, duplicates = outcome.n_duplicates, "batch committed");
            if positions.count() > 0
                && let Err(e) = consumer.commit(&positions, CommitMode::Async)
            {
                debug!(error = %e, "informational offset commit to Kafka failed");
            }
        }
        info!("Kafka processor stopped");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failed seek leaves the partition unassigned (so no batch of it is committed from the
    /// wrong place) until a retry succeeds; a rebalance meanwhile drops the pending seek.
    #[test]
    fn a_failed_seek_unassigns_the_partition_until_a_retry_succeeds() {
        let assigned = Mutex::new(Assigned::from([(("t".to_owned(), 0), Some(40)), (("t".to_owned(), 1), Some(7))]));
        let mut reseek = Reseek::default();
        let key = ("t".to_owned(), 0);
        reseek.send_back(key.clone(), Some(42), 3, &mut assigned.lock().unwrap(), |_, _, _| false);
        assert!(!assigned.lock().unwrap().contains_key(&key), "unassigned while the consumer is elsewhere");
        // Still failing: still unassigned.
        reseek.retry(3, &assigned, || 3, |_, _, _| false);
        assert!(!assigned.lock().unwrap().contains_key(&key));
        // The seek goes through: assigned again, at the stored offset.
        let mut asked = Vec::new();
        reseek.retry(
            3,
            &assigned,
            || 3,
            |t, p, o| {
                asked.push((t.to_owned(), p, o));
                true
            },
        );
        assert_eq!(asked, [("t".to_owned(), 0, Some(42))]);
        assert_eq!(assigned.lock().unwrap().get(&key), Some(&Some(42)));
        assert_eq!(assigned.lock().unwrap().get(&("t".to_owned(), 1)), Some(&Some(7)), "other partitions untouched");

        // A seek that succeeds at once keeps the partition, at the stored offset.
        reseek.send_back(key.clone(), Some(50), 3, &mut assigned.lock().unwrap(), |_, _, _| true);
        assert_eq!(assigned.lock().unwrap().get(&key), Some(&Some(50)));

        // Failed, then a rebalance (generation 4): the old pending seek is dropped.
        reseek.send_back(key.clone(), Some(60), 3, &mut assigned.lock().unwrap(), |_, _, _| false);
        let mut asked = 0;
        reseek.retry(
            4,
            &assigned,
            || 4,
            |_, _, _| {
                asked += 1;
                true
            },
        );
        assert_eq!(asked, 0, "the rebalance set the partition's start from the store anew");
    }
}
