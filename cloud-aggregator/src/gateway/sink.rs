//! Where the gateway writes events: Kafka, or the embedded processor.
//!
//! [`Sink::submit`] enqueues a batch *in order* before it returns (Kafka's produce queue or the
//! processor's channel) and gives back a future that resolves once every event is durable.
//! Enqueueing in order matters: the processors' de-duplication relies on each source's events
//! reaching any one partition in seq order (see ARCHITECTURE.md). To keep that true the Kafka
//! producer is idempotent, never times a message out (`message.timeout.ms = 0`), and stops on
//! any error that could leave a gap (`enable.gapless.guarantee`).

use std::time::Duration;

use actidash_shared::batch::Unpacked;
use actidash_shared::kafka::{self, FleetRecord};
use anyhow::Context as _;
use futures::future::BoxFuture;
use rdkafka::ClientConfig;
use rdkafka::ClientContext;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::config::KafkaConfig;
use crate::process::embedded::EmbeddedInput;

/// A batch could not be made durable.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("Kafka refused an event for {topic}: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("Kafka did not confirm an event: {0}")]
    Delivery(KafkaError),
    #[error("the processor refused the batch: {0}")]
    Processor(String),
    #[error("the sink is shutting down")]
    Closed,
    #[error("the Kafka producer hit a fatal error: {0}")]
    Fatal(String),
}

/// Resolves when a submitted batch is durable.
pub type Pending = BoxFuture<'static, Result<(), SinkError>>;

/// The gateway's output.
#[derive(Clone)]
pub enum Sink {
    Kafka(KafkaSink),
    Embedded(mpsc::Sender<EmbeddedInput>),
}

/// An idempotent Kafka producer, the topics' prefix and pinned partition count, and the
/// largest event it can deliver.
#[derive(Clone)]
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<BatchDeliveries>>,
    prefix: String,
    /// Each domain's topic, by `Domain as usize` (named once, not per record).
    topics: [String; 4],
    partitions: i32,
    max_event_bytes: u32,
    /// Whether records carry the event's identity as headers (`[kafka] record_headers`).
    record_headers: bool,
}

impl KafkaSink {
    /// The producer's fatal error, if it had one.
    fn fatal_reason(&self) -> Option<String> {
        self.producer
            .context()
            .fatal
            .get()
            .or_else(|| self.producer.client().fatal_error().map(|(code, reason)| format!("{code}: {reason}")))
    }
}

/// The producer's largest message (librdkafka's `message.max.bytes`; Kafka's default).
const MESSAGE_MAX_BYTES: u32 = 1_000_000;
/// Room left in a Kafka message beside an event's JSON: its key (at most
/// [`actidash_shared::event::MAX_KEY_BYTES`]), headers and the record's framing.
const RECORD_ROOM: u32 = 2_048;

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Kafka(k) => write!(f, "Sink::Kafka({}, {} partitions)", k.prefix, k.partitions),
            Sink::Embedded(_) => f.write_str("Sink::Embedded"),
        }
    }
}

impl Sink {
    /// A Kafka sink with an idempotent, gap-free producer; creates the topics if configured.
    pub async fn kafka(config: &KafkaConfig) -> anyhow::Result<Sink> {
        let producer: ThreadedProducer<BatchDeliveries> = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("enable.gapless.guarantee", "true")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .set("message.max.bytes", MESSAGE_MAX_BYTES.to_string())
            .create_with_context(BatchDeliveries::default())
            .context("creating the Kafka producer")?;
        if config.create_topics {
            create_topics(config).await?;
        }
        let topic_max = check_topics(config).await?;
        let max_event_bytes = MESSAGE_MAX_BYTES.min(topic_max).saturating_sub(RECORD_ROOM);
        info!(partitions = config.partitions, max_event_bytes, "Kafka topics checked");
        Ok(Sink::Kafka(KafkaSink {
            producer: Arc::new(producer),
            prefix: config.topic_prefix.clone(),
            topics: actidash_shared::Domain::ALL.map(|d| kafka::domain_topic(&config.topic_prefix, d)),
            partitions: config.partitions,
            max_event_bytes,
            record_headers: config.record_headers,
        }))
    }

    /// Resolves (with librdkafka's reason) when the producer hit a fatal error; never for the
    /// embedded sink. An idempotent producer's fatal error (with `enable.gapless.guarantee`,
    /// any error that could leave a gap) makes every later send fail: the gateway must stop,
    /// so that supervision starts a fresh one, and the agents re-send what was not
    /// acknowledged.
    pub async fn fatal(&self) -> String {
        let Sink::Kafka(k) = self else { return std::future::pending().await };
        loop {
            if let Some(reason) = k.fatal_reason() {
                return reason;
            }
            // librdkafka records the fatal error in the client before (or without) the error
            // event reaching the callback: look at both.
            let _ = tokio::time::timeout(Duration::from_millis(500), k.producer.context().fatal.wait()).await;
        }
    }

    /// `kafka` or `embedded`, for the metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Sink::Kafka(_) => "kafka",
            Sink::Embedded(_) => "embedded",
        }
    }

    /// The largest event (its JSON) this sink can deliver, if it has a limit.
    pub fn max_event_bytes(&self) -> Option<u32> {
        match self {
            Sink::Kafka(k) => Some(k.max_event_bytes),
            Sink::Embedded(_) => None,
        }
    }

    /// Enqueues every event of a batch, in order; the returned future resolves when all are
    /// durable. Waits (backpressure) while Kafka's local queue is full.
    /// `connection` identifies the gateway connection the batch came on (see
    /// [`crate::process::embedded`] for why it matters).
    pub async fn submit(&self, connection: u64, events: Vec<Unpacked>) -> Result<Pending, SinkError> {
        match self {
            Sink::Embedded(tx) => {
                // The embedded processor works on typed events: read them whole (a second parse;
                // with Kafka the JSON is forwarded as received).
                let events = events
                    .iter()
                    .map(Unpacked::event)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| SinkError::Processor(format!("a checked event no longer reads: {e}")))?;
                let (reply, done) = oneshot::channel();
                tx.send(EmbeddedInput::Batch { connection, events, reply }).await.map_err(|_| SinkError::Closed)?;
                Ok(Box::pin(async move {
                    match done.await {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(why)) => Err(SinkError::Processor(why)),
                        Err(_) => Err(SinkError::Closed),
                    }
                }))
            }
            Sink::Kafka(kafka_sink) => {
                if let Some(reason) = kafka_sink.fatal_reason() {
                    return Err(SinkError::Fatal(reason));
                }
                let KafkaSink { producer, topics, partitions, record_headers, .. } = kafka_sink;
                if events.is_empty() {
                    return Ok(Box::pin(async { Ok(()) }));
                }
                let (done, confirmed) = oneshot::channel();
                let batch = Arc::new(BatchDelivery {
                    remaining: AtomicUsize::new(events.len()),
                    failure: Mutex::new(None),
                    done: Mutex::new(Some(done)),
                });
                for event in &events {
                    let topic = &topics[event.domain as usize];
                    // The partition is the key's, computed here: never librdkafka's choice,
                    // which could differ for an empty key or under stale metadata.
                    let mut record = BaseRecord::with_opaque_to(topic, batch.clone())
                        .partition(kafka::partition_for(&event.entity_key, *partitions))
                        .key(&event.entity_key[..])
                        .payload(&event.json[..]);
                    if *record_headers {
                        let mut text = kafka::HeaderText::default();
                        let mut headers = OwnedHeaders::new_with_capacity(4);
                        for (key, value) in kafka::headers(
                            &event.agent_id,
                            &event.source_id,
                            event.seq,
                            event.schema_version,
                            &mut text,
                        ) {
                            headers = headers.insert(Header { key, value: Some(value) });
                        }
                        record = record.headers(headers);
                    }
                    loop {
                        match producer.send(record) {
                            Ok(()) => break,
                            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                                // Backpressure: Kafka's local queue is full.
                                record = returned;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err((source, _)) => {
                                // Events already enqueued will still report; this batch fails.
                                return Err(SinkError::Produce { topic: topic.clone(), source });
                            }
                        }
                    }
                }
                Ok(Box::pin(async move { confirmed.await.unwrap_or(Err(SinkError::Closed)) }))
            }
        }
    }

    /// Records an agent's heartbeat (best effort: a lost heartbeat is replaced by the next).
    pub async fn heartbeat(&self, record: FleetRecord) {
        match self {
            Sink::Embedded(tx) => {
                let _ = tx.send(EmbeddedInput::Fleet(Box::new(record))).await;
            }
            Sink::Kafka(KafkaSink { producer, prefix, partitions, .. }) => {
                let topic = kafka::fleet_topic(prefix);
                let value = serde_json::to_vec(&record).unwrap_or_default();
                let untracked = Arc::new(BatchDelivery::untracked());
                let produced = producer.send(
                    BaseRecord::with_opaque_to(&topic, untracked)
                        .partition(kafka::partition_for(record.agent_id.as_bytes(), *partitions))
                        .key(&record.agent_id)
                        .payload(&value),
                );
                if let Err((e, _)) = produced {
                    warn!(agent_id = %record.agent_id, error = %e, "heartbeat not written to Kafka");
                }
            }
        }
    }

    /// A gateway connection ended.
    pub async fn connection_closed(&self, connection: u64) {
        if let Sink::Embedded(tx) = self {
            let _ = tx.send(EmbeddedInput::Closed { connection }).await;
        }
    }

    /// Waits for queued Kafka messages to be delivered (at shutdown).
    pub fn flush(&self, timeout: Duration) {
        if let Sink::Kafka(KafkaSink { producer, .. }) = self
            && let Err(e) = producer.flush(timeout)
        {
            warn!(error = %e, "Kafka producer flush incomplete at shutdown");
        }
    }
}

/// An admin client of the cluster, and the names of the topics ActiDash uses.
fn admin_and_topics(config: &KafkaConfig) -> anyhow::Result<(AdminClient<DefaultClientContext>, Vec<String>)> {
    let admin = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .create()
        .context("creating the Kafka admin client")?;
    let mut names: Vec<String> =
        actidash_shared::Domain::ALL.iter().map(|d| kafka::domain_topic(&config.topic_prefix, *d)).collect();
    names.push(kafka::fleet_topic(&config.topic_prefix));
    Ok((admin, names))
}

/// Creates the domain and fleet topics if they do not exist.
async fn create_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let (admin, names) = admin_and_topics(config)?;
    let min_isr = config.min_insync().to_string();
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            NewTopic::new(n, config.partitions, TopicReplication::Fixed(config.replication_factor))
                .set("min.insync.replicas", &min_isr)
        })
        .collect();
    let results = admin
        .create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
        .await
        .context("creating Kafka topics")?;
    for result in results {
        match result {
            Ok(name) => info!(
                topic = %name,
                partitions = config.partitions,
                replication_factor = config.replication_factor,
                min_insync_replicas = %min_isr,
                "topic created"
            ),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => info!(topic = %name, "topic exists"),
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}

/// How long the topics may take to appear in the cluster's metadata (a topic just created is
/// known to the controller first, to the other brokers a moment later).
const TOPICS_SETTLE: Duration = Duration::from_secs(30);

/// Why the topics do not pass the check.
enum TopicCheck {
    /// Not (yet) visible: missing, or created a moment ago.
    NotYet(anyhow::Error),
    /// Present but wrong (another partition count): never retried.
    Wrong(anyhow::Error),
}

/// Checks that every topic exists with the pinned partition count, and returns the smallest
/// `max.message.bytes` among them. Topics just created (`create_topics`) and not yet in the
/// metadata are waited for up to [`TOPICS_SETTLE`]; otherwise they must be there at once.
async fn check_topics(config: &KafkaConfig) -> anyhow::Result<u32> {
    let (admin, names) = admin_and_topics(config)?;
    let settle = if config.create_topics { TOPICS_SETTLE } else { Duration::ZERO };
    let deadline = tokio::time::Instant::now() + settle;
    loop {
        match check_topics_once(config, &admin, &names).await {
            Ok(limit) => return Ok(limit),
            Err(TopicCheck::Wrong(e)) => return Err(e),
            Err(TopicCheck::NotYet(e)) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(TopicCheck::NotYet(e)) => {
                tracing::debug!(error = format!("{e:#}"), "topics not ready yet");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

async fn check_topics_once(
    config: &KafkaConfig,
    admin: &AdminClient<DefaultClientContext>,
    names: &[String],
) -> Result<u32, TopicCheck> {
    let not_yet = |e: anyhow::Error| TopicCheck::NotYet(e);
    for name in names {
        let metadata = admin
            .inner()
            .fetch_metadata(Some(name), Duration::from_secs(10))
            .with_context(|| format!("reading the metadata of topic {name}"))
            .map_err(not_yet)?;
        let topic = metadata.topics().first().with_context(|| format!("topic {name}: no metadata")).map_err(not_yet)?;
        if let Some(e) = topic.error() {
            return Err(not_yet(anyhow::anyhow!(
                "topic {name}: {:?} (create it, or set [kafka] create_topics = true)",
                RDKafkaErrorCode::from(e)
            )));
        }
        let found = topic.partitions().len() as i32;
        if found == 0 {
            return Err(not_yet(anyhow::anyhow!("topic {name}: no partitions in its metadata yet")));
        }
        if found != config.partitions {
            return Err(TopicCheck::Wrong(anyhow::anyhow!(
                "topic {name} has {found} partitions, but [kafka] partitions = {}: an event's partition is a function of its key and this count, so they must agree (to grow a topic, follow docs/operations.md)",
                config.partitions
            )));
        }
    }
    let specifiers: Vec<ResourceSpecifier<'_>> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
    let described = admin
        .describe_configs(&specifiers, &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))))
        .await
        .context("reading the topics' configuration")
        .map_err(not_yet)?;
    let mut smallest = u32::MAX;
    for (name, result) in names.iter().zip(described) {
        let resource = result
            .map_err(|code| anyhow::anyhow!("reading the configuration of topic {name}: {code}"))
            .map_err(not_yet)?;
        let limit = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<u32>().ok())
            .with_context(|| format!("topic {name}: no max.message.bytes in its configuration"))
            .map_err(not_yet)?;
        smallest = smallest.min(limit);
    }
    Ok(smallest)
}

/// The delivery state of one batch: the last delivery report resolves it.
struct BatchDelivery {
    remaining: AtomicUsize,
    failure: Mutex<Option<KafkaError>>,
    done: Mutex<Option<oneshot::Sender<Result<(), SinkError>>>>,
}

impl BatchDelivery {
    /// For records nobody waits for (heartbeats).
    fn untracked() -> BatchDelivery {
        BatchDelivery { remaining: AtomicUsize::new(usize::MAX), failure: Mutex::new(None), done: Mutex::new(None) }
    }
}

/// The producer's context: counts a batch's delivery reports down (one shared state per batch,
/// not a channel per message) and resolves the batch when the last one arrives; notes a fatal
/// error.
#[derive(Default)]
struct BatchDeliveries {
    fatal: FatalFlag,
}

/// Set once, by the client's error callback, when librdkafka reports a fatal error.
#[derive(Default)]
struct FatalFlag {
    reason: Mutex<Option<String>>,
    notify: tokio::sync::Notify,
}

impl FatalFlag {
    fn set(&self, reason: String) {
        let mut r = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if r.is_none() {
            *r = Some(reason);
        }
        self.notify.notify_waiters();
    }

    fn get(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn wait(&self) -> String {
        loop {
            let notified = self.notify.notified();
            if let Some(reason) = self.get() {
                return reason;
            }
            notified.await;
        }
    }
}

impl ClientContext for BatchDeliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(error = %error, reason, "the Kafka producer hit a fatal error");
            self.fatal.set(reason.to_owned());
        } else {
            warn!(error = %error, reason, "Kafka client error");
        }
    }
}

impl ProducerContext for BatchDeliveries {
    type DeliveryOpaque = Arc<BatchDelivery>;

    fn delivery(&self, result: &DeliveryResult<'_>, batch: Arc<BatchDelivery>) {
        if let Err((e, _)) = result {
            let mut failure = batch.failure.lock().unwrap_or_else(|p| p.into_inner());
            failure.get_or_insert_with(|| e.clone());
        }
        if batch.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let failure = batch.failure.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(done) = batch.done.lock().unwrap_or_else(|p| p.into_inner()).take() {
                let _ = done.send(match failure {
                    None => Ok(()),
                    Some(e) => Err(SinkError::Delivery(e)),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actidash_shared::event::OrderStatus;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    fn events(first: u64, n: u64) -> Vec<Unpacked> {
        (first..first + n)
            .map(|seq| {
                let e = actidash_shared::testing::sale_with(
                    "acme",
                    "a1",
                    seq,
                    "2026-11-27T10:00:00Z",
                    "web",
                    "1",
                    OrderStatus::Placed,
                );
                Unpacked::of(&e).unwrap()
            })
            .collect()
    }

    /// The producer's fatal path, forced through librdkafka's mock cluster: a produce request
    /// answered with an out-of-order sequence number is a possible gap, which the gapless
    /// idempotent producer makes fatal. The pending batch fails (its agent re-sends it), later
    /// submits are refused at once, and `fatal()` resolves so that the gateway exits.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_fatal_producer_error_fails_the_batches_and_is_reported() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t.sales", 1, 1).unwrap();
        let producer: ThreadedProducer<BatchDeliveries> = ClientConfig::new()
            .set("bootstrap.servers", cluster.bootstrap_servers())
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("enable.gapless.guarantee", "true")
            .set("linger.ms", "5")
            .create_with_context(BatchDeliveries::default())
            .unwrap();
        let sink = Sink::Kafka(KafkaSink {
            producer: Arc::new(producer),
            prefix: "t".into(),
            topics: actidash_shared::Domain::ALL.map(|d| kafka::domain_topic("t", d)),
            partitions: 1,
            max_event_bytes: 100_000,
            record_headers: true,
        });
        sink.submit(1, events(0, 5)).await.unwrap().await.expect("delivered while the broker is well");
        cluster.request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER; 5],
        );
        let pending = sink.submit(1, events(5, 5)).await.unwrap();
        let outcome = tokio::time::timeout(Duration::from_secs(30), pending).await.expect("the batch is resolved");
        assert!(outcome.is_err(), "a batch caught by the fatal error fails: {outcome:?}");

        let reason =
            tokio::time::timeout(Duration::from_secs(30), sink.fatal()).await.expect("the fatal error is reported");
        assert!(!reason.is_empty());
        match sink.submit(1, events(10, 1)).await {
            Err(SinkError::Fatal(r)) => assert_eq!(r, reason),
            other => panic!("a later batch must be refused at once: {:?}", other.map(|_| ())),
        }
    }
}
