//! The gateway's Kafka sink against a real broker: each event goes to the partition of its key
//! (Kafka's murmur2 over the pinned partition count, whatever librdkafka would choose), a
//! topic with another partition count stops the gateway at start, and the largest event it
//! states follows the topics' `max.message.bytes`; records carry headers only when asked.

use std::time::Duration;

use actidash_shared::batch::Unpacked;
use actidash_shared::event::OrderStatus;
use actidash_shared::kafka::{HEADER_AGENT_ID, HEADER_SCHEMA_VERSION, HEADER_SEQ, HEADER_SOURCE_ID, partition_for};
use actidash_shared::testing::sale_with;
use cloud_aggregator::config::KafkaConfig;
use cloud_aggregator::gateway::sink::Sink;
use rdkafka::ClientConfig;
use rdkafka::Message as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::Headers as _;

fn config(bootstrap: &str, prefix: &str, partitions: i32) -> KafkaConfig {
    toml::from_str(&format!(
        "bootstrap_servers = \"{bootstrap}\"\ntopic_prefix = \"{prefix}\"\npartitions = {partitions}\n"
    ))
    .unwrap()
}

fn fresh_prefix(name: &str) -> String {
    format!("sinktest-{name}-{}", rand::random::<u32>())
}

/// A consumer of the sales topic of `prefix`, from its start.
fn sales_reader(bootstrap: &str, prefix: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("{prefix}-check"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&format!("{prefix}.sales")]).unwrap();
    consumer
}

#[tokio::test(flavor = "multi_thread")]
async fn events_go_to_their_keys_partition_and_the_partition_count_is_pinned() {
    let Some(bootstrap) = actidash_tests::kafka_bootstrap("events_go_to_their_keys_partition") else { return };
    let prefix = fresh_prefix("pin");
    let sink = Sink::kafka(&config(&bootstrap, &prefix, 4)).await.unwrap();
    assert_eq!(sink.max_event_bytes(), Some(1_000_000 - 2_048), "the producer's limit, below the broker's default");

    // Orders with many different ids, and one an empty id would have scattered.
    let events: Vec<Unpacked> = (0..200)
        .map(|seq| {
            let mut e = sale_with("acme", "a1", seq, "2026-11-27T10:00:00Z", "web", "1", OrderStatus::Placed);
            if let actidash_shared::event::Payload::Sales(o) = &mut e.payload {
                o.order_id = format!("order-{seq}-{}", seq * 7919);
            }
            e.entity_key = e.payload.entity_key();
            Unpacked::of(&e).unwrap()
        })
        .collect();
    let keys: Vec<String> = events.iter().map(|u| String::from_utf8(u.entity_key.to_vec()).unwrap()).collect();
    let sent: std::collections::HashMap<String, Unpacked> = keys.iter().cloned().zip(events.iter().cloned()).collect();
    sink.submit(1, events).await.unwrap().await.unwrap();

    let consumer = sales_reader(&bootstrap, &prefix);
    let mut seen = 0;
    let mut partitions = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen < keys.len() && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message.unwrap();
        let key = std::str::from_utf8(message.key().unwrap()).unwrap();
        assert_eq!(message.partition(), partition_for(key.as_bytes(), 4), "the partition of {key}");
        // The JSON as received, and no headers unless asked for (the next test).
        let event = &sent[key];
        assert_eq!(message.payload(), Some(&event.json[..]));
        assert!(message.headers().is_none(), "the record of {key} has headers by default");
        partitions.insert(message.partition());
        seen += 1;
    }
    assert_eq!(seen, keys.len(), "every event was read back");
    assert_eq!(partitions.len(), 4, "200 keys spread over every partition");

    // The same topics with another pinned count: the gateway refuses to start.
    let refused = Sink::kafka(&config(&bootstrap, &prefix, 6)).await.expect_err("a partition count that differs");
    let said = format!("{refused:#}");
    assert!(said.contains(&format!("topic {prefix}.sales has 4 partitions, but [kafka] partitions = 6")), "{said}");
}

/// `[kafka] record_headers = true`: each record carries its event's identity as headers, for
/// consumers that route or de-duplicate without reading the JSON.
#[tokio::test(flavor = "multi_thread")]
async fn records_carry_the_events_identity_as_headers_when_asked() {
    let Some(bootstrap) = actidash_tests::kafka_bootstrap("records_carry_the_events_identity") else { return };
    let prefix = fresh_prefix("headers");
    let mut cfg = config(&bootstrap, &prefix, 2);
    cfg.record_headers = true;
    let sink = Sink::kafka(&cfg).await.unwrap();
    let events: Vec<Unpacked> = (0..5)
        .map(|seq| {
            Unpacked::of(&sale_with("acme", "a1", seq, "2026-11-27T10:00:00Z", "web", "1", OrderStatus::Placed))
                .unwrap()
        })
        .collect();
    sink.submit(1, events).await.unwrap().await.unwrap();

    let consumer = sales_reader(&bootstrap, &prefix);
    let mut seqs = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seqs.len() < 5 && std::time::Instant::now() < deadline {
        let Some(message) = consumer.poll(Duration::from_millis(500)) else { continue };
        let message = message.unwrap();
        let event = actidash_shared::Event::from_json(message.payload().unwrap()).unwrap();
        let headers: Vec<(String, String)> = message
            .headers()
            .expect("headers")
            .iter()
            .map(|h| (h.key.to_owned(), String::from_utf8(h.value.unwrap().to_vec()).unwrap()))
            .collect();
        let expected = [
            (HEADER_AGENT_ID, "a1".to_owned()),
            (HEADER_SOURCE_ID, "orders".to_owned()),
            (HEADER_SEQ, event.seq.to_string()),
            (HEADER_SCHEMA_VERSION, "1".to_owned()),
        ];
        assert_eq!(headers, expected.map(|(k, v)| (k.to_owned(), v)), "the headers of event {}", event.seq);
        seqs.insert(event.seq);
    }
    assert_eq!(seqs.len(), 5, "every event was read back");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_largest_event_follows_the_topics_message_limit() {
    let Some(bootstrap) = actidash_tests::kafka_bootstrap("the_largest_event_follows") else { return };
    let prefix = fresh_prefix("limit");
    // One topic made by hand with a smaller message limit.
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let topic = format!("{prefix}.inventory");
    let small = NewTopic::new(&topic, 2, TopicReplication::Fixed(1)).set("max.message.bytes", "300000");
    admin.create_topics(&[small], &AdminOptions::new()).await.unwrap()[0].as_ref().unwrap();
    let sink = Sink::kafka(&config(&bootstrap, &prefix, 2)).await.unwrap();
    assert_eq!(sink.max_event_bytes(), Some(300_000 - 2_048));
    // Missing topics that may not be created: refused at start, naming one.
    let mut missing = config(&bootstrap, &fresh_prefix("missing"), 2);
    missing.create_topics = false;
    let said = format!("{:#}", Sink::kafka(&missing).await.expect_err("topics missing"));
    assert!(said.contains("create_topics"), "{said}");
}
