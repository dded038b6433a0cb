//! Every analytics figure against an independent SQL reference, on 100k realistic events from
//! six sources of five agents, with late events, re-sent batches (duplicates) and sources
//! arriving far out of step with each other (touches long after the orders they are credited
//! to, one collector's page views after the other's) — in the embedded layout (one stream)
//! and in the Kafka layout (a topic per domain, partitions by entity key, each its own stream).

use std::collections::BTreeMap;

use actidash_shared::event::Event;
use actidash_tests::dataset::{self, Record};
use actidash_tests::reference::{self, Answers, Figures};
use cloud_aggregator::analytics::attribution::Model;
use cloud_aggregator::store::query::{self, Selection};
use cloud_aggregator::store::{CommitWork, Store, StreamInput};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

const N: usize = 100_000;

/// How the processors see the events.
#[derive(Debug, Clone, Copy)]
enum Layout {
    /// The embedded mode: one stream.
    Embedded,
    /// Kafka: a stream per domain topic and partition, partition by entity key.
    Partitioned(u32),
}

fn stream_of(layout: Layout, event: &Event) -> String {
    match layout {
        Layout::Embedded => "embedded".into(),
        Layout::Partitioned(n) => {
            let hash =
                event.entity_key.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
            format!("{}/{}", event.domain(), hash % n)
        }
    }
}

/// Feeds every source's events to the store in random chunks, sources interleaved at random
/// speeds (the CRM's touches start late and trail behind), with one chunk in eight re-sent
/// (after a lost acknowledgement: only events already delivered). Returns the re-sent count.
fn feed(store: &mut Store, records: &[Record], layout: Layout, seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut queues: Vec<Vec<&Event>> = vec![Vec::new(); dataset::SOURCES.len()];
    for r in records {
        let idx = dataset::SOURCES.iter().position(|(a, s, _)| *a == r.agent && *s == r.source).unwrap();
        queues[idx].push(&r.event);
    }
    let mut sent = vec![0_usize; queues.len()];
    // Relative speeds; the CRM (index 4) holds back for the first half.
    let speeds = [3, 3, 5, 2, 1, 1];
    let mut resent = 0;
    let mut round = 0;
    loop {
        round += 1;
        let open: Vec<usize> = (0..queues.len())
            .filter(|&i| sent[i] < queues[i].len() && !(i == 4 && round < 150 && sent.iter().sum::<usize>() < N / 2))
            .collect();
        if open.is_empty() {
            if sent.iter().zip(&queues).all(|(s, q)| *s == q.len()) {
                break;
            }
            round = 150;
            continue;
        }
        let total: u32 = open.iter().map(|&i| speeds[i]).sum();
        let mut pick = rng.random_range(0..total);
        let src = *open
            .iter()
            .find(|&&i| {
                if pick < speeds[i] {
                    true
                } else {
                    pick -= speeds[i];
                    false
                }
            })
            .unwrap();
        let mut chunk: Vec<Event> = Vec::new();
        if sent[src] > 0 && rng.random_range(0..8) == 0 {
            let from = rng.random_range(0..sent[src]);
            let to = (from + rng.random_range(1..300)).min(sent[src]);
            chunk.extend(queues[src][from..to].iter().map(|e| (*e).clone()));
            resent += (to - from) as u64;
        }
        let n = rng.random_range(1..600).min(queues[src].len() - sent[src]);
        chunk.extend(queues[src][sent[src]..sent[src] + n].iter().map(|e| (*e).clone()));
        sent[src] += n;
        let mut inputs: BTreeMap<String, Vec<Event>> = BTreeMap::new();
        for e in chunk {
            inputs.entry(stream_of(layout, &e)).or_default().push(e);
        }
        let work = CommitWork {
            inputs: inputs.into_iter().map(|(stream, events)| StreamInput { stream, events, offset: None }).collect(),
            ..CommitWork::default()
        };
        store.commit(work).unwrap();
    }
    resent
}

/// A report as JSON, as the API serializes it.
fn json<T: serde::Serialize>(v: &T) -> serde_json::Value {
    serde_json::to_value(v).unwrap()
}

/// The product's figures, read through the API's query functions and reduced like the API's
/// JSON answers.
fn product_figures(store: &mut Store, from: i64, to: i64) -> Figures {
    let sel = |granularity: Option<i64>, group_by: &[&str]| Selection {
        tenant: Some(dataset::TENANT.into()),
        from,
        to,
        granularity,
        group_by: group_by.iter().map(|s| (*s).to_owned()).collect(),
        filters: vec![],
    };
    let mut a = Answers::default();
    store
        .read(|tx| {
            a.sales = json(&query::sales(tx, &sel(None, &["channel", "site", "country", "currency"]))?);
            a.sales_hourly = json(&query::sales(tx, &sel(Some(3600), &["currency"]))?);
            a.products = json(&query::products(tx, &sel(None, &[]), false, 1000)?);
            a.behavior = json(&query::behavior(tx, &sel(None, &["referrer"]))?);
            a.behavior_hourly = json(&query::behavior(tx, &sel(Some(3600), &[]))?);
            let steps: Vec<String> = reference::FUNNEL.iter().map(|s| (*s).to_owned()).collect();
            a.funnel = json(&query::funnel(tx, &sel(None, &[]), &steps)?);
            for m in reference::MODELS {
                let model = Model::by_name(m).unwrap();
                a.attribution.insert(m.into(), json(&query::attribution(tx, &sel(None, &["channel"]), model)?));
            }
            a.inventory = json(&query::inventory(tx, Some(dataset::TENANT), &[], 20, to, 10_000)?);
            Ok(())
        })
        .unwrap();
    Figures::from_api(&a).unwrap()
}

fn check(layout: Layout, seed: u64) {
    let start = "2026-11-27T08:00:00Z".parse().unwrap();
    // 4 hours of data; one record in 20 written up to 10 minutes late.
    let records = dataset::generate(seed, N, start, 4 * 3_600_000, 20, 600_000);
    let t = std::time::Instant::now();
    let expected = reference::compute(&records).unwrap();
    eprintln!("{layout:?}: reference computed in {:?}", t.elapsed());
    assert!(expected.funnel[3] > 0 && expected.attribution.len() > 20, "the data set exercises every metric");

    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("serving.db")).unwrap();
    let t = std::time::Instant::now();
    let resent = feed(&mut store, &records, layout, seed + 1);
    eprintln!("{layout:?}: {N} events and {resent} re-sent ones processed in {:?}", t.elapsed());
    assert!(resent > 1000, "re-sends happened: {resent}");
    let counters = store.counters().unwrap();
    assert_eq!(counters["events_applied"], N as i64, "{layout:?}: every event once");
    assert_eq!(counters["duplicates_dropped"], resent as i64);
    assert_eq!(counters.get("late_events_beyond_horizon"), None, "nothing is beyond a 24 h horizon");

    let from = start.timestamp() - 3600;
    let got = product_figures(&mut store, from, from + 6 * 3600);
    got.assert_matches(&expected);
}

#[test]
fn embedded_layout_matches_the_reference() {
    check(Layout::Embedded, 11);
}

#[test]
fn partitioned_layout_matches_the_reference() {
    check(Layout::Partitioned(3), 23);
}
