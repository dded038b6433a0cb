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
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer as _};
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
}

/// Resolves when a submitted batch is durable.
pub type Pending = BoxFuture<'static, Result<(), SinkError>>;

/// The gateway's output.
#[derive(Clone)]
pub enum Sink {
    Kafka { producer: FutureProducer, prefix: String },
    Embedded(mpsc::Sender<EmbeddedInput>),
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sink::Kafka { prefix, .. } => write!(f, "Sink::Kafka({prefix})"),
            Sink::Embedded(_) => f.write_str("Sink::Embedded"),
        }
    }
}

impl Sink {
    /// A Kafka sink with an idempotent, gap-free producer; creates the topics if configured.
    pub async fn kafka(config: &KafkaConfig) -> anyhow::Result<Sink> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &config.bootstrap_servers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", "0")
            .set("enable.gapless.guarantee", "true")
            .set("linger.ms", "5")
            .set("compression.type", "lz4")
            .create()
            .context("creating the Kafka producer")?;
        if config.create_topics {
            create_topics(config).await?;
        }
        Ok(Sink::Kafka { producer, prefix: config.topic_prefix.clone() })
    }

    /// Enqueues every event of a batch, in order; the returned future resolves when all are
    /// durable. Waits (backpressure) while Kafka's local queue is full.
    /// `connection` identifies the gateway connection the batch came on (see
    /// [`crate::process::embedded`] for why it matters).
    pub async fn submit(&self, connection: u64, events: Vec<Unpacked>) -> Result<Pending, SinkError> {
        match self {
            Sink::Embedded(tx) => {
                let events = events.into_iter().map(|u| u.event).collect();
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
            Sink::Kafka { producer, prefix } => {
                let mut deliveries = Vec::with_capacity(events.len());
                for Unpacked { event, json: value } in &events {
                    let topic = kafka::domain_topic(prefix, event.domain());
                    let mut headers = OwnedHeaders::new_with_capacity(4);
                    for (key, v) in kafka::headers(event) {
                        headers = headers.insert(Header { key, value: Some(v.as_bytes()) });
                    }
                    loop {
                        let record = FutureRecord::to(&topic)
                            .key(&event.entity_key)
                            .payload(value.as_ref())
                            .headers(headers.clone());
                        match producer.send_result(record) {
                            Ok(delivery) => {
                                deliveries.push(delivery);
                                break;
                            }
                            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err((source, _)) => return Err(SinkError::Produce { topic, source }),
                        }
                    }
                }
                Ok(Box::pin(async move {
                    for delivery in deliveries {
                        match delivery.await {
                            Ok(Ok(_)) => {}
                            Ok(Err((e, _))) => return Err(SinkError::Delivery(e)),
                            Err(_) => return Err(SinkError::Closed),
                        }
                    }
                    Ok(())
                }))
            }
        }
    }

    /// Records an agent's heartbeat (best effort: a lost heartbeat is replaced by the next).
    pub async fn heartbeat(&self, record: FleetRecord) {
        match self {
            Sink::Embedded(tx) => {
                let _ = tx.send(EmbeddedInput::Fleet(record)).await;
            }
            Sink::Kafka { producer, prefix } => {
                let topic = kafka::fleet_topic(prefix);
                let value = serde_json::to_vec(&record).unwrap_or_default();
                let produced = producer.send_result(FutureRecord::to(&topic).key(&record.agent_id).payload(&value));
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
        if let Sink::Kafka { producer, .. } = self
            && let Err(e) = producer.flush(timeout)
        {
            warn!(error = %e, "Kafka producer flush incomplete at shutdown");
        }
    }
}

/// Creates the domain and fleet topics if they do not exist.
async fn create_topics(config: &KafkaConfig) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.bootstrap_servers)
        .create()
        .context("creating the Kafka admin client")?;
    let mut names: Vec<String> =
        actidash_shared::Domain::ALL.iter().map(|d| kafka::domain_topic(&config.topic_prefix, *d)).collect();
    names.push(kafka::fleet_topic(&config.topic_prefix));
    let min_isr = if config.replication_factor >= 3 { "2" } else { "1" };
    let topics: Vec<NewTopic<'_>> = names
        .iter()
        .map(|n| {
            NewTopic::new(n, config.partitions, TopicReplication::Fixed(config.replication_factor))
                .set("min.insync.replicas", min_isr)
        })
        .collect();
    let results = admin
        .create_topics(&topics, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
        .await
        .context("creating Kafka topics")?;
    for result in results {
        match result {
            Ok(name) => info!(topic = %name, partitions = config.partitions, "topic created"),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => info!(topic = %name, "topic exists"),
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
