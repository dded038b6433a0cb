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
use cloud_aggregator::store::{CommitWork, Location, Store, StreamInput};
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

/// Splits every source's events into commits, in random chunks, sources interleaved at random
/// speeds (the CRM's touches start late and trail behind), with one chunk in eight re-sent
/// (after a lost acknowledgement: only events already delivered); hands each commit to
/// `commit`. Returns the re-sent count.
fn feed(records: &[Record], layout: Layout, seed: u64, mut commit: impl FnMut(CommitWork)) -> u64 {
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
    loop {
        let delivered: usize = sent.iter().sum();
        let open: Vec<usize> =
            (0..queues.len()).filter(|&i| sent[i] < queues[i].len() && !(i == 4 && delivered < N / 2)).collect();
        let open =
            if open.is_empty() { (0..queues.len()).filter(|&i| sent[i] < queues[i].len()).collect() } else { open };
        if open.is_empty() {
            break;
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
        commit(CommitWork {
            inputs: inputs.into_iter().map(|(stream, events)| StreamInput { stream, events, offset: None }).collect(),
            ..CommitWork::default()
        });
    }
    resent
}

/// Commits on `writers` processors at once, each owning a share of the streams (as Kafka's
/// group would assign partitions), each with its own connection to the store.
fn feed_concurrently(location: &Location, records: &[Record], layout: Layout, seed: u64, writers: usize) -> u64 {
    std::thread::scope(|scope| {
        let mut senders = Vec::new();
        for _ in 0..writers {
            let (tx, rx) = std::sync::mpsc::sync_channel::<CommitWork>(16);
            let mut store = location.open().unwrap();
            senders.push(tx);
            scope.spawn(move || {
                for work in rx {
                    store.commit(work).unwrap();
                }
            });
        }
        let resent = feed(records, layout, seed, |work| {
            let mut parts: Vec<CommitWork> = vec![CommitWork::default(); writers];
            for input in work.inputs {
                let owner = input.stream.bytes().fold(0_usize, |h, b| h.wrapping_mul(31).wrapping_add(usize::from(b)));
                parts[owner % writers].inputs.push(input);
            }
            for (tx, part) in senders.iter().zip(parts) {
                if !part.inputs.is_empty() {
                    tx.send(part).unwrap();
                }
            }
        });
        drop(senders);
        resent
    })
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

fn check(location: &Location, layout: Layout, writers: usize, seed: u64) {
    let start = "2026-11-27T08:00:00Z".parse().unwrap();
    // 4 hours of data; one record in 20 written up to 10 minutes late.
    let records = dataset::generate(seed, N, start, 4 * 3_600_000, 20, 600_000);
    let t = std::time::Instant::now();
    let raw: Vec<reference::RawLine> = records.iter().map(Record::raw).collect();
    let expected = reference::compute(&raw).unwrap();
    eprintln!("{layout:?}: reference computed in {:?}", t.elapsed());
    assert!(expected.funnel[3] > 0 && expected.attribution.len() > 20, "the data set exercises every metric");

    let t = std::time::Instant::now();
    let resent = feed_concurrently(location, &records, layout, seed + 1, writers);
    eprintln!(
        "{location:?} {layout:?}: {N} events and {resent} re-sent ones processed by {writers} in {:?}",
        t.elapsed()
    );
    assert!(resent > 1000, "re-sends happened: {resent}");
    let mut store = location.open().unwrap();
    let counters = store.counters().unwrap();
    assert_eq!(counters["events_applied"], N as i64, "{layout:?}: every event once");
    assert_eq!(counters["duplicates_dropped"], resent as i64);
    assert_eq!(counters.get("late_events_beyond_horizon"), None, "nothing is beyond a 24 h horizon");

    let from = start.timestamp() - 3600;
    let got = product_figures(&mut store, from, from + 6 * 3600);
    got.assert_matches(&expected);
}

fn sqlite() -> (tempfile::TempDir, Location) {
    let dir = tempfile::tempdir().unwrap();
    let location = Location::Sqlite(dir.path().join("serving.db"));
    (dir, location)
}

#[test]
fn embedded_layout_matches_the_reference_on_sqlite() {
    let (_dir, location) = sqlite();
    check(&location, Layout::Embedded, 1, 11);
}

#[test]
fn partitioned_layout_matches_the_reference_on_sqlite() {
    let (_dir, location) = sqlite();
    check(&location, Layout::Partitioned(3), 1, 23);
}

/// The sums behind every figure on PostgreSQL: the reads' (`sum` clamped inline) and `sat_sum`
/// (kept for older processes; a store made by an older version, whose transition function was
/// SQL, gets PostgreSQL's own `int8_sum` when opened) stay exact beyond 64 bits and are clamped
/// only at the end.
#[test]
fn postgres_sums_use_a_builtin_step_and_stay_exact_and_clamped() {
    let Some(admin) = actidash_tests::postgres_admin("sat_sum on postgres") else { return };
    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_sat_sum_test").unwrap();
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION actidash_sat_acc(s numeric, v bigint) RETURNS numeric
                LANGUAGE sql IMMUTABLE STRICT AS 'SELECT s + v';
             CREATE FUNCTION actidash_sat_final(s numeric) RETURNS bigint
                LANGUAGE sql IMMUTABLE AS 'SELECT LEAST(GREATEST(s, -9223372036854775808), 9223372036854775807)::bigint';
             CREATE AGGREGATE sat_sum(bigint) (
                SFUNC = actidash_sat_acc, STYPE = numeric, INITCOND = '0', FINALFUNC = actidash_sat_final);",
        )
        .unwrap();
    drop(Location::Postgres { url, password: None }.open().unwrap());
    let step: String = client
        .query_one("SELECT aggtransfn::text FROM pg_aggregate WHERE aggfnoid = 'sat_sum'::regproc", &[])
        .unwrap()
        .get(0);
    assert_eq!(step, "int8_sum");
    let read_sum = cloud_aggregator::store::postgres::saturating_sum("v");
    for sum_sql in ["sat_sum(v)", read_sum.as_str()] {
        let mut sum = |rows: &str| -> i64 {
            let sql = format!("SELECT {sum_sql} FROM (VALUES {rows}) AS t(v)");
            client.query_one(&sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
        };
        let max = i64::MAX;
        assert_eq!(sum(&format!("({max}::bigint), (5), (-6)")), max - 1, "{sum_sql}: exact past the 64-bit range");
        assert_eq!(sum(&format!("({max}::bigint), ({max}), (-1)")), max, "{sum_sql}: clamped at the end");
        assert_eq!(sum(&format!("('{}'::bigint), (-2)", i64::MIN)), i64::MIN, "{sum_sql}: clamped below too");
        assert_eq!(sum("(NULL::bigint), (7)"), 7, "{sum_sql}: no value, nothing added");
    }
    assert_eq!(
        client.query_one("SELECT sat_sum(v) FROM (VALUES (NULL::bigint)) AS t(v)", &[]).unwrap().get::<_, i64>(0),
        0,
        "sat_sum of nothing: zero"
    );
}

/// A PostgreSQL store of a version that stored orders' credits keeps them (as `legacy_credits`)
/// when opened, and statements of that version fail on it from then on.
#[test]
fn postgres_stores_keep_the_credits_older_versions_stored() {
    let Some(admin) = actidash_tests::postgres_admin("legacy credits on postgres") else { return };
    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_legacy_credits_test").unwrap();
    let store = Location::Postgres { url: url.clone(), password: None };
    drop(store.open().unwrap());
    let mut client = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    // As the older version's schema had it.
    client
        .batch_execute(
            "ALTER TABLE attr_orders RENAME COLUMN legacy_credits TO credits;
             INSERT INTO attr_orders (tenant, order_id, customer_id, time_ms, amount, currency, placed, cancelled, credits)
             VALUES ('acme', 'o', 'c', 0, 100000, 'EUR', 1, 0, '6:google1:x0,1000000,1000000000;\n')",
        )
        .unwrap();
    drop(store.open().unwrap());
    drop(store.open().unwrap());
    let kept: String = client.query_one("SELECT legacy_credits FROM attr_orders", &[]).unwrap().get(0);
    assert_eq!(kept, "6:google1:x0,1000000,1000000000;\n");
    assert!(client.query("SELECT credits FROM attr_orders", &[]).is_err(), "the older version's statements fail");
}

/// Two processors on one PostgreSQL store at once: partitions split between them, customers
/// (attribution) and tenants (watermarks) shared.
#[test]
fn partitioned_layout_with_two_processors_matches_the_reference_on_postgres() {
    let Some(admin) = actidash_tests::postgres_admin("analytics on postgres") else { return };
    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_analytics_test").unwrap();
    check(&Location::Postgres { url, password: None }, Layout::Partitioned(4), 2, 37);
}
