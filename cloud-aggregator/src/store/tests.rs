//! Store tests: de-duplication, offset fencing, the fleet view, and totals.

use super::*;

fn sale(agent: &str, seq: u64, amount: &str) -> Event {
    actidash_shared::testing::sale("acme", agent, seq, amount)
}

fn input(stream: &str, events: Vec<Event>) -> StreamInput {
    StreamInput { stream: stream.into(), events, offset: None }
}

fn totals(store: &mut Store) -> (i64, String) {
    let rows = store.sales_totals(Some("acme")).unwrap();
    (rows.iter().map(|r| r.orders).sum(), rows.first().map(|r| r.revenue.clone()).unwrap_or_default())
}

#[test]
fn resent_events_count_once_even_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("serving.db");
    let mut store = Store::open(&path).unwrap();
    let first: Vec<Event> = (0..3).map(|s| sale("a1", s, "10.25")).collect();
    let outcome = store.commit(CommitWork { inputs: vec![input("t/0", first.clone())], ..Default::default() }).unwrap();
    assert_eq!((outcome.n_applied, outcome.n_duplicates), (3, 0));
    drop(store);

    let mut store = Store::open(&path).unwrap();
    let mut again = first;
    again.push(sale("a1", 3, "1"));
    let outcome = store.commit(CommitWork { inputs: vec![input("t/0", again)], ..Default::default() }).unwrap();
    assert_eq!((outcome.n_applied, outcome.n_duplicates), (1, 3));
    assert_eq!(totals(&mut store), (4, "31.75".into()));
    // Another agent's seq 0 is not a duplicate of a1's.
    store.commit(CommitWork { inputs: vec![input("t/0", vec![sale("a2", 0, "1")])], ..Default::default() }).unwrap();
    assert_eq!(totals(&mut store).0, 5);
    let counters = store.counters().unwrap();
    assert_eq!(counters["events_applied"], 5);
    assert_eq!(counters["duplicates_dropped"], 3);
}

#[test]
fn a_zombie_commit_on_a_moved_partition_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let claim = |expected: Option<i64>, new| OffsetClaim {
        topic: "t".into(),
        partition: 0,
        expected_next: expected,
        first: expected.unwrap_or(0),
        new_next: new,
    };
    // Processor A and a zombie B both read offsets 0..2 from a fresh partition.
    let a = StreamInput { offset: Some(claim(None, 2)), ..input("t/0", vec![sale("a1", 0, "1"), sale("a1", 1, "1")]) };
    let zombie = a.clone();
    assert!(store.commit(CommitWork { inputs: vec![a], ..Default::default() }).unwrap().fenced.is_empty());
    let outcome = store.commit(CommitWork { inputs: vec![zombie], ..Default::default() }).unwrap();
    assert_eq!(outcome.fenced, [0]);
    assert_eq!(outcome.n_applied, 0);
    assert_eq!(store.stored_offset("t", 0).unwrap(), Some(2));
    assert_eq!(totals(&mut store).0, 2);
    // Continuing from the stored position works.
    let next = StreamInput { offset: Some(claim(Some(2), 3)), ..input("t/0", vec![sale("a1", 2, "1")]) };
    assert!(store.commit(CommitWork { inputs: vec![next], ..Default::default() }).unwrap().fenced.is_empty());
    assert_eq!(store.stored_offset("t", 0).unwrap(), Some(3));
}

/// A processor whose consumer skipped a range (a failed seek after a fence, a reset) believes
/// the right stored offset but reads from further on: committing would move the offset past
/// events never applied. The part is refused, nothing of it applied, the offset unmoved.
#[test]
fn a_batch_that_does_not_start_at_the_stored_offset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let claim = |expected, first, new| OffsetClaim {
        topic: "t".into(),
        partition: 0,
        expected_next: expected,
        first,
        new_next: new,
    };
    // A fresh partition may start anywhere (retention may have removed its beginning).
    let start =
        StreamInput { offset: Some(claim(None, 40, 42)), ..input("t/0", vec![sale("a1", 0, "1"), sale("a1", 1, "1")]) };
    let outcome = store.commit(CommitWork { inputs: vec![start], ..Default::default() }).unwrap();
    assert!(outcome.fenced.is_empty() && outcome.discontinuous.is_empty());
    // Offsets 42..50 were skipped: the batch of 50..52 is refused; 42..44 is not.
    let skipped = StreamInput {
        offset: Some(claim(Some(42), 50, 52)),
        ..input("t/0", vec![sale("a1", 9, "1"), sale("a1", 10, "1")])
    };
    let behind = StreamInput {
        offset: Some(claim(Some(42), 41, 44)),
        ..input("t/0", vec![sale("a1", 1, "1"), sale("a1", 2, "1")])
    };
    for refused in [skipped, behind] {
        let outcome = store.commit(CommitWork { inputs: vec![refused], ..Default::default() }).unwrap();
        assert_eq!((outcome.discontinuous.as_slice(), outcome.n_applied), (&[0][..], 0));
        assert_eq!(store.stored_offset("t", 0).unwrap(), Some(42));
    }
    assert_eq!(totals(&mut store).0, 2);
    let next = StreamInput {
        offset: Some(claim(Some(42), 42, 44)),
        ..input("t/0", vec![sale("a1", 2, "1"), sale("a1", 3, "1")])
    };
    let outcome = store.commit(CommitWork { inputs: vec![next], ..Default::default() }).unwrap();
    assert_eq!((outcome.n_applied, outcome.discontinuous.len()), (2, 0));
    assert_eq!(store.stored_offset("t", 0).unwrap(), Some(44));
}

#[test]
fn fleet_rows_keep_the_newest_heartbeat_and_data_version_moves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let mut store = Store::open(&path).unwrap();
    let mut reader = Store::open_read_only(&path).unwrap();
    let v0 = reader.data_version().unwrap();
    let record = |at: &str, version: &str| FleetRecord {
        tenant: "acme".into(),
        agent_id: "a1".into(),
        received_at: at.parse().unwrap(),
        transport: "quic".into(),
        remote_addr: "127.0.0.1:1".into(),
        heartbeat: actidash_shared::wire::Heartbeat { agent_version: version.into(), ..Default::default() },
    };
    store
        .commit(CommitWork {
            fleet: vec![record("2026-11-27T10:00:05Z", "new"), record("2026-11-27T10:00:01Z", "old")],
            ..Default::default()
        })
        .unwrap();
    let agents = reader.agents(None).unwrap();
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].heartbeat["agent_version"], "new");
    assert_ne!(reader.data_version().unwrap(), v0);
}

fn at(time: &str, seq: u64, payload: actidash_shared::event::Payload) -> Event {
    Event::new("acme".into(), "a1".into(), "s".into(), seq, time.parse().unwrap(), payload)
}

fn page_view(visitor: &str) -> actidash_shared::event::Payload {
    actidash_shared::event::Payload::Behavior(actidash_shared::event::BehaviorEvent {
        visitor_id: visitor.into(),
        kind: actidash_shared::event::BehaviorKind::PageView,
        url: None,
        referrer: None,
    })
}

fn sessions(store: &mut Store) -> i64 {
    let sel = query::Selection { tenant: Some("acme".into()), ..query::Selection::all_time() };
    store.read(|tx| query::behavior(tx, &sel)).unwrap().sessions.iter().map(|r| r.sessions).sum()
}

#[test]
fn beyond_the_horizon_an_event_counts_in_additive_figures_only_and_state_is_compacted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::analytics::AnalyticsConfig { allowed_lateness_secs: 3600, ..Default::default() };
    let mut store = Store::open(&dir.path().join("s.db")).unwrap().with_analytics(cfg);
    let commit = |store: &mut Store, events: Vec<Event>| {
        store.commit(CommitWork { inputs: vec![input("embedded", events)], ..Default::default() }).unwrap()
    };
    // Two sessions of one visitor an hour apart, then the watermark moves 3 hours on.
    commit(
        &mut store,
        vec![at("2026-11-27T10:00:00Z", 0, page_view("v")), at("2026-11-27T11:00:00Z", 1, page_view("v"))],
    );
    assert_eq!(sessions(&mut store), 2);
    commit(&mut store, vec![at("2026-11-27T14:00:00Z", 2, page_view("w"))]);
    let state = store.read(query::state_sizes).unwrap();
    assert_eq!(state["sessions"], 1, "sessions that ended before the horizon are compacted: {state:?}");
    // A page view at 10:30 would bridge the two old sessions, but it is beyond the horizon
    // (14:00 - 1 h): counted as a page view and as late, and no session changes.
    let outcome = commit(&mut store, vec![at("2026-11-27T10:30:00Z", 3, page_view("v"))]);
    assert_eq!(outcome.n_late_beyond_horizon, 1);
    assert_eq!(sessions(&mut store), 3);
    let sel = query::Selection { tenant: Some("acme".into()), ..query::Selection::all_time() };
    assert_eq!(store.read(|tx| query::behavior(tx, &sel)).unwrap().page_views, 4);
    assert_eq!(store.counters().unwrap()["late_events_beyond_horizon"], 1);
    // Within the horizon a late event still merges: 13:30 bridges nothing, 13:45 joins 14:00.
    commit(&mut store, vec![at("2026-11-27T13:45:00Z", 4, page_view("w"))]);
    assert_eq!(sessions(&mut store), 3, "joined w's session");
}

#[test]
fn a_future_clock_does_not_move_the_watermark() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let now = chrono::Utc::now();
    let time = |d: chrono::Duration| (now + d).to_rfc3339();
    store
        .commit(CommitWork {
            inputs: vec![input(
                "embedded",
                vec![
                    at(&time(chrono::Duration::days(400)), 0, page_view("v")),
                    at(&time(chrono::Duration::hours(-2)), 1, page_view("v")),
                ],
            )],
            ..Default::default()
        })
        .unwrap();
    // Were the watermark a year ahead, an event of an hour ago would be beyond the horizon.
    let outcome = store
        .commit(CommitWork {
            inputs: vec![input("embedded", vec![at(&time(chrono::Duration::hours(-1)), 2, page_view("v"))])],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(outcome.n_late_beyond_horizon, 0);
    // The cap is the processor's clock: 25 hours ago is beyond the default 24 h horizon.
    let outcome = store
        .commit(CommitWork {
            inputs: vec![input("embedded", vec![at(&time(chrono::Duration::hours(-25)), 3, page_view("v"))])],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(outcome.n_late_beyond_horizon, 1);
}

#[test]
fn version_2_stores_lose_the_minute_rows_of_tables_kept_per_hour() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("../../migrations/0001_init.sql")).unwrap();
        conn.execute_batch(&super::migration_2()).unwrap();
        for grain in [60, 3600] {
            conn.execute(
                "INSERT INTO product_rollup (tenant, grain, bucket, sku, currency, units, revenue) VALUES ('acme', ?1, 0, 'S', 'EUR', 2, 10)",
                [grain],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO sales_rollup (tenant, grain, bucket, channel, site, country, currency, placed_orders) VALUES ('acme', ?1, 0, 'web', '', '', 'EUR', 1)",
                [grain],
            )
            .unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    let grains = |store: &mut Store, table: &'static str| {
        store
            .read(move |tx| tx.query(&format!("SELECT grain FROM {table} ORDER BY grain"), &[]))
            .unwrap()
            .into_iter()
            .map(|r| r[0].int_or_zero())
            .collect::<Vec<i64>>()
    };
    assert_eq!(grains(&mut store, "product_rollup"), [3600]);
    assert_eq!(grains(&mut store, "sales_rollup"), [60, 3600], "tables kept per minute keep their minutes");
}

#[test]
fn version_1_stores_are_migrated_with_their_figures() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(include_str!("../../migrations/0001_init.sql")).unwrap();
        conn.execute_batch(
            "INSERT INTO sales_minute VALUES ('acme', 1764237600, 'web', 'EUR', 2, 150000);
             INSERT INTO sales_minute VALUES ('acme', 1764237660, 'web', 'EUR', 1, 50000);
             INSERT INTO domain_minute VALUES ('acme', 1764237600, 'sales', 3);
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    assert_eq!(totals(&mut store), (3, "20".into()));
    // Reads for every tenant find the migrated one too.
    let all = store.read(|tx| query::sales(tx, &query::Selection::all_time())).unwrap();
    assert_eq!(all.iter().map(|r| r.orders).sum::<i64>(), 3);
    let sel = query::Selection { tenant: Some("acme".into()), granularity: Some(3600), ..query::Selection::all_time() };
    let rows = store.read(|tx| query::rollup(tx, &crate::analytics::tables::DOMAINS, &sel)).unwrap();
    assert_eq!(rows.iter().map(|r| r.metrics[0]).sum::<i64>(), 3);
}

#[test]
fn an_earlier_placement_of_an_order_moves_its_credit_and_a_cancellation_retracts_it() {
    use actidash_shared::event::{MarketingTouch, OrderStatus, Payload};
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let touch = at(
        "2026-11-27T09:00:00Z",
        0,
        Payload::Marketing(MarketingTouch {
            user_id: "c".into(),
            channel: "google".into(),
            campaign: "x".into(),
            cost: None,
            currency: None,
        }),
    );
    let order = |time: &str, seq: u64, status: OrderStatus| {
        let mut e = actidash_shared::testing::sale_with("acme", "a1", seq, time, "web", "10", status);
        e.source_id = "orders".into();
        if let Payload::Sales(o) = &mut e.payload {
            o.order_id = "o".into();
        }
        e.entity_key = e.payload.entity_key();
        e
    };
    let mut commit = |events: Vec<Event>| {
        store.commit(CommitWork { inputs: vec![input("embedded", events)], ..Default::default() }).unwrap();
    };
    commit(vec![touch, order("2026-11-27T10:05:00Z", 0, OrderStatus::Placed)]);
    commit(vec![order("2026-11-27T09:02:00Z", 1, OrderStatus::Placed)]);
    // Attribution is kept per hour: one hour each.
    let hour_sel = |from: &str| query::Selection {
        tenant: Some("acme".into()),
        from: from.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp(),
        to: from.parse::<chrono::DateTime<chrono::Utc>>().unwrap().timestamp() + 3600,
        ..query::Selection::all_time()
    };
    let credited = |store: &mut Store, from: &str| {
        store
            .read(|tx| query::attribution(tx, &hour_sel(from), crate::analytics::attribution::Model::LastTouch))
            .unwrap()
            .orders
    };
    assert_eq!(credited(&mut store, "2026-11-27T10:00:00Z"), "0", "moved away from the later placement");
    assert_eq!(credited(&mut store, "2026-11-27T09:00:00Z"), "1");
    store
        .commit(CommitWork {
            inputs: vec![input("embedded", vec![order("2026-11-27T11:00:00Z", 2, OrderStatus::Cancelled)])],
            ..Default::default()
        })
        .unwrap();
    assert_eq!(credited(&mut store, "2026-11-27T09:00:00Z"), "0", "a cancelled order is not credited");
}

/// An order's events in one commit credit it as the same events in commits of their own:
/// placed, placed earlier, cancelled, moved to another customer, with touches arriving before
/// and after the orders they are credited to.
#[test]
fn an_orders_events_in_one_commit_credit_as_in_commits_of_their_own() {
    use crate::analytics::attribution::Model;
    use actidash_shared::event::OrderStatus;
    let (touch, order) = (touch_at, order_at);
    let events = vec![
        touch("2026-11-27T09:00:00Z", 0, "c", "google"),
        order("2026-11-27T10:05:00Z", 1, "o1", "c", OrderStatus::Placed),
        touch("2026-11-27T09:40:00Z", 2, "c", "email"),
        order("2026-11-27T09:30:00Z", 3, "o1", "c", OrderStatus::Placed),
        order("2026-11-27T09:45:00Z", 4, "o2", "c", OrderStatus::Placed),
        order("2026-11-27T11:00:00Z", 5, "o2", "c", OrderStatus::Cancelled),
        order("2026-11-27T10:10:00Z", 6, "o3", "c", OrderStatus::Placed),
        touch("2026-11-27T09:50:00Z", 7, "d", "bing"),
        order("2026-11-27T10:00:00Z", 8, "o3", "d", OrderStatus::Placed),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (mut together, mut apart) = committed_together_and_apart(dir.path(), events);
    let sel = query::Selection {
        tenant: Some("acme".into()),
        group_by: vec!["channel".into(), "campaign".into()],
        ..query::Selection::all_time()
    };
    // Credited figures per channel (a credit given and taken back leaves a row of zeros).
    let credited = |store: &mut Store, model: Model| {
        let report = store.read(|tx| query::attribution(tx, &sel, model)).unwrap();
        let rows: Vec<(String, String, String)> = report
            .rows
            .iter()
            .filter(|r| r.attributed_orders != "0" || r.attributed_revenue != "0")
            .map(|r| (r.dims["channel"].clone(), r.attributed_orders.clone(), r.attributed_revenue.clone()))
            .collect();
        (rows, report.orders, report.unattributed_orders)
    };
    for model in Model::ALL {
        let once = credited(&mut together, model);
        assert_eq!(once, credited(&mut apart, model), "{model:?}");
        assert_eq!(once.1, "2", "o1 and o3; o2 is cancelled");
    }
    let last = credited(&mut together, Model::LastTouch).0;
    let row = |channel: &str| (channel.to_owned(), "1".to_owned(), "10".to_owned());
    assert_eq!(last, [row("bing"), row("google")], "o3 moved to d (bing); o1 placed at 09:30, before the email");
}

/// Two stores given the same events: in one commit, and in one commit per event.
fn committed_together_and_apart(dir: &Path, events: Vec<Event>) -> (Store, Store) {
    let mut together = Store::open(&dir.join("together.db")).unwrap();
    let mut apart = Store::open(&dir.join("apart.db")).unwrap();
    together.commit(CommitWork { inputs: vec![input("embedded", events.clone())], ..Default::default() }).unwrap();
    for e in events {
        apart.commit(CommitWork { inputs: vec![input("embedded", vec![e])], ..Default::default() }).unwrap();
    }
    (together, apart)
}

/// Attribution test events: a touch of customer `user` and an order of 10.00.
fn touch_at(time: &str, seq: u64, user: &str, channel: &str) -> Event {
    let touch = actidash_shared::event::MarketingTouch {
        user_id: user.into(),
        channel: channel.into(),
        campaign: "x".into(),
        cost: None,
        currency: None,
    };
    at(time, seq, actidash_shared::event::Payload::Marketing(touch))
}

fn order_at(time: &str, seq: u64, id: &str, customer: &str, status: actidash_shared::event::OrderStatus) -> Event {
    let mut e = actidash_shared::testing::sale_with("acme", "a1", seq, time, "web", "10", status);
    if let actidash_shared::event::Payload::Sales(o) = &mut e.payload {
        o.order_id = id.into();
        o.customer_id = customer.into();
    }
    e.entity_key = e.payload.entity_key();
    e
}

/// Orders credited per channel (non-zero) under `model`, over all time.
fn credited_orders(store: &mut Store, model: crate::analytics::attribution::Model) -> Vec<(String, String)> {
    let sel = query::Selection {
        tenant: Some("acme".into()),
        group_by: vec!["channel".into()],
        ..query::Selection::all_time()
    };
    let report = store.read(|tx| query::attribution(tx, &sel, model)).unwrap();
    report
        .rows
        .iter()
        .filter(|r| r.attributed_orders != "0")
        .map(|r| (r.dims["channel"].clone(), r.attributed_orders.clone()))
        .collect()
}

/// A cancellation beyond the horizon retracts its order's credit exactly as long as the order
/// is kept: the credit is derived from the touches, so they are kept as long (here the touch is
/// past lateness + lookback, where it was compacted before 2026-12-04).
#[test]
fn a_late_cancellation_retracts_the_credit_of_an_order_kept() {
    use crate::analytics::attribution::Model;
    use actidash_shared::event::OrderStatus;
    let dir = tempfile::tempdir().unwrap();
    let cfg = crate::analytics::AnalyticsConfig {
        allowed_lateness_secs: 3600,
        attribution_lookback_secs: 86_400,
        order_retention_secs: 10 * 86_400,
        ..Default::default()
    };
    let mut store = Store::open(&dir.path().join("s.db")).unwrap().with_analytics(cfg);
    let commit = |store: &mut Store, events: Vec<Event>| {
        store.commit(CommitWork { inputs: vec![input("embedded", events)], ..Default::default() }).unwrap()
    };
    commit(
        &mut store,
        vec![
            touch_at("2026-11-20T09:00:00Z", 0, "c", "google"),
            order_at("2026-11-20T10:00:00Z", 1, "o", "c", OrderStatus::Placed),
        ],
    );
    assert_eq!(credited_orders(&mut store, Model::Linear), [("google".to_owned(), "1".to_owned())]);
    // Three days on: the touch is 3 days old, beyond lateness + lookback (1 h + 1 day).
    commit(&mut store, vec![at("2026-11-23T10:00:00Z", 2, page_view("v"))]);
    let state = store.read(query::state_sizes).unwrap();
    assert_eq!((state["touches"], state["attr_orders"]), (1, 1), "kept with the order: {state:?}");
    let outcome = commit(&mut store, vec![order_at("2026-11-20T11:00:00Z", 3, "o", "c", OrderStatus::Cancelled)]);
    assert_eq!(outcome.n_late_beyond_horizon, 1);
    for model in Model::ALL {
        assert_eq!(credited_orders(&mut store, model), [], "{model:?}: taken back whole, nothing to (none)");
    }
    // Past the order's retention both go.
    commit(&mut store, vec![at("2026-12-01T10:00:01Z", 4, page_view("v"))]);
    let state = store.read(query::state_sizes).unwrap();
    assert_eq!((state["touches"], state["attr_orders"]), (0, 0), "{state:?}");
}

/// Orders stored by a version before 2026-12-04 hold their credit as text: that credit is what
/// a change takes back (their touches may be gone), and the text is cleared once the order is
/// credited again. Statements of those versions fail on the migrated store (they name
/// `credits`): an old processor sharing it cannot credit an order twice.
#[test]
fn an_order_stored_with_its_credit_by_version_4_has_that_credit_taken_back() {
    use crate::analytics::attribution::Model;
    use actidash_shared::event::OrderStatus;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let commit = |store: &mut Store, events: Vec<Event>| {
        store.commit(CommitWork { inputs: vec![input("embedded", events)], ..Default::default() }).unwrap();
    };
    let mut store = Store::open(&path).unwrap();
    commit(
        &mut store,
        vec![
            touch_at("2026-11-27T09:00:00Z", 0, "c", "google"),
            order_at("2026-11-27T10:00:00Z", 1, "o1", "c", OrderStatus::Placed),
            order_at("2026-11-27T12:00:00Z", 2, "o2", "c", OrderStatus::Placed),
        ],
    );
    drop(store);
    // As version 4 left them: each order's credit (google, whole, in every model) as text, and
    // o1's touch compacted.
    let text: String = (0..5).map(|m| format!("{m},1000000,1000000000;")).collect();
    let text = format!("6:google1:x{text}\n");
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("ALTER TABLE attr_orders RENAME COLUMN legacy_credits TO credits; DELETE FROM touches")
            .unwrap();
        conn.execute("UPDATE attr_orders SET credits = ?1", [&text]).unwrap();
        conn.pragma_update(None, "user_version", 4).unwrap();
    }
    let mut store = Store::open(&path).unwrap();
    let credits_of = |store: &mut Store, id: &str| {
        let rows = store
            .read(|tx| tx.query("SELECT legacy_credits FROM attr_orders WHERE order_id = ?1", &[Val::from(id)]))
            .unwrap();
        rows[0][0].text().to_owned()
    };
    assert_eq!(credits_of(&mut store, "o1"), text, "kept through the migration");
    let old_statement = store.read(|tx| tx.query("SELECT credits FROM attr_orders", &[]));
    assert!(old_statement.is_err(), "a version 4 statement fails");
    // o1 cancelled: its stored credit is taken back (derived from the touches left, it would be
    // (none)'s).
    commit(&mut store, vec![order_at("2026-11-27T13:00:00Z", 3, "o1", "c", OrderStatus::Cancelled)]);
    assert_eq!(credited_orders(&mut store, Model::Linear), [("google".to_owned(), "1".to_owned())], "o2's");
    // A touch before o2 credits it again: its stored credit out, the derived one in.
    commit(&mut store, vec![touch_at("2026-11-27T11:00:00Z", 4, "c", "email")]);
    assert_eq!(credited_orders(&mut store, Model::LastTouch), [("email".to_owned(), "1".to_owned())]);
    assert_eq!(credited_orders(&mut store, Model::Linear), [("email".to_owned(), "1".to_owned())]);
    assert_eq!(credits_of(&mut store, "o2"), "", "derived from now on");
}

/// A commit's stock levels give the latest per SKU and warehouse as the same events in commits
/// of their own: an older level after a newer one, and levels of the same instant from two
/// sources (the larger agent, source, seq wins).
#[test]
fn a_commits_stock_levels_count_as_in_commits_of_their_own() {
    use actidash_shared::event::{InventoryLevel, Payload};
    let level = |time: &str, agent: &str, seq: u64, sku: &str, on_hand: i64| {
        let payload = Payload::Inventory(InventoryLevel { sku: sku.into(), warehouse: "w".into(), on_hand });
        Event::new("acme".into(), agent.into(), "stock".into(), seq, time.parse().unwrap(), payload)
    };
    let events = vec![
        level("2026-11-27T10:00:00Z", "a1", 0, "A", 5),
        level("2026-11-27T12:00:00Z", "a1", 1, "A", 7),
        level("2026-11-27T11:00:00Z", "a1", 2, "A", 6),
        level("2026-11-27T10:00:00Z", "a1", 3, "B", 2),
        level("2026-11-27T10:00:00Z", "b2", 0, "B", 1),
        level("2026-11-27T10:00:00Z", "a1", 4, "B", 4),
        level("2026-11-27T09:00:00Z", "a1", 5, "B", 3),
    ];
    let dir = tempfile::tempdir().unwrap();
    let (mut together, mut apart) = committed_together_and_apart(dir.path(), events);
    let stock = |store: &mut Store| {
        let rows = store.read(|tx| tx.query("SELECT sku, on_hand, agent_id FROM inventory ORDER BY sku", &[])).unwrap();
        rows.iter().map(|r| (r[0].text().to_owned(), r[1].int_or_zero(), r[2].text().to_owned())).collect::<Vec<_>>()
    };
    let expected = [("A".to_owned(), 7, "a1".to_owned()), ("B".to_owned(), 1, "b2".to_owned())];
    assert_eq!(stock(&mut together), expected);
    assert_eq!(stock(&mut apart), expected);
}

/// Sums that leave the 64-bit range are clamped, in the roll-up rows and in the reads, instead
/// of failing the commit or the API (issue 17: three orders of 4·10^14 made the totals answer
/// "integer overflow"; such orders are now refused, but a flood of orders at the bound, 10^12
/// each, must not break a tenant's dashboards either).
#[test]
fn sums_beyond_the_64_bit_range_are_clamped_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let max = actidash_shared::event::MAX_AMOUNT_UNITS.to_string();
    // 1 000 orders at the bound: 10^15 units, 10^19 ten-thousandths, over i64::MAX (9.2·10^18).
    for batch in 0..2 {
        let events: Vec<Event> = (batch * 500..(batch + 1) * 500).map(|s| sale("a1", s, &max)).collect();
        assert!(events.iter().all(|e| e.check().is_ok()), "every order within the bound");
        store.commit(CommitWork { inputs: vec![input("t/0", events)], ..Default::default() }).unwrap();
    }
    let (orders, revenue) = totals(&mut store);
    assert_eq!(orders, 1_000);
    assert_eq!(revenue, actidash_shared::Money(i64::MAX).to_string(), "clamped at the largest amount");
    // The sum over rows that each fit, clamped in the read.
    let sel = query::Selection { tenant: Some("acme".into()), ..query::Selection::all_time() };
    let rows = store.read(|tx| query::sales(tx, &sel)).unwrap();
    assert_eq!(rows[0].gross_revenue, actidash_shared::Money(i64::MAX).to_string());
}

/// A report's rows are bounded: one row more than allowed is a clear refusal, not a huge answer.
#[test]
fn an_answer_over_the_row_limit_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let events: Vec<Event> = (0..4)
        .map(|s| {
            let time = format!("2026-11-27T10:0{s}:00Z");
            actidash_shared::testing::sale_with(
                "acme",
                "a1",
                s,
                &time,
                "web",
                "1",
                actidash_shared::event::OrderStatus::Placed,
            )
        })
        .collect();
    store.commit(CommitWork { inputs: vec![input("t/0", events)], ..Default::default() }).unwrap();
    let sel = query::Selection {
        tenant: Some("acme".into()),
        granularity: Some(60),
        from: 1_795_773_600,
        to: 1_795_773_600 + 3_600,
        ..query::Selection::all_time()
    };
    let rows = store.read(|tx| query::rollup_at_most(tx, &crate::analytics::tables::SALES, &sel, 4)).unwrap();
    assert_eq!(rows.len(), 4, "four minutes");
    let err = store.read(|tx| query::rollup_at_most(tx, &crate::analytics::tables::SALES, &sel, 3)).unwrap_err();
    assert!(err.message().starts_with("too many rows: more than 3 in the answer"), "{err}");
}

/// The health history: a change is recorded when the state or its reasons change, an outage
/// the agent reports becomes a `cut_off` window, a restart after a silence an `offline` one,
/// and a heartbeat delivered again (older than the stored one) changes nothing.
#[test]
fn health_changes_are_recorded_once_with_outages_and_restarts() {
    use actidash_shared::wire::{Heartbeat, Outage, SourceStatus};

    use crate::health::State;

    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(&dir.path().join("s.db")).unwrap();
    let record = |at: &str, uptime_secs: u64, state: &str, outage: Option<Outage>| FleetRecord {
        tenant: "acme".into(),
        agent_id: "a1".into(),
        received_at: at.parse().unwrap(),
        transport: "quic".into(),
        remote_addr: "127.0.0.1:1".into(),
        heartbeat: Heartbeat {
            uptime_secs,
            sources: vec![SourceStatus {
                source_id: "orders".into(),
                state: state.into(),
                last_error: (state == "error").then(|| "orders.db: no such file".into()),
                ..Default::default()
            }],
            last_outage: outage,
            ..Default::default()
        },
    };
    let mut commit = |r: FleetRecord| store.commit(CommitWork { fleet: vec![r], ..Default::default() }).unwrap();
    commit(record("2026-12-03T10:00:00Z", 10, "running", None));
    commit(record("2026-12-03T10:00:05Z", 15, "waiting", None)); // still healthy: no change
    commit(record("2026-12-03T10:00:10Z", 20, "error", None));
    commit(record("2026-12-03T10:00:15Z", 25, "error", None)); // the same reason: no change
    commit(record("2026-12-03T10:00:20Z", 30, "running", None));
    // Cut off from 10:00:25 to 10:02:00, 40 events buffered; reported in every heartbeat after.
    let outage = Outage { from_ms: 1_796_292_025_000, to_ms: 1_796_292_120_000, buffered_events: 40 };
    commit(record("2026-12-03T10:02:01Z", 151, "running", Some(outage.clone())));
    commit(record("2026-12-03T10:02:06Z", 156, "running", Some(outage.clone())));
    // Delivered again: older than what is stored.
    commit(record("2026-12-03T10:00:12Z", 22, "error", None));
    // Stopped after 10:02:06, started again at 10:09:00.
    commit(record("2026-12-03T10:09:05Z", 5, "running", Some(outage)));

    let mut history = store.read(|tx| crate::store::query::health_history(tx, "acme", "a1", 100)).unwrap();
    history.reverse();
    let got: Vec<(&str, State, Vec<&str>)> = history
        .iter()
        .map(|c| (&c.since[11..19], c.state, c.reasons.iter().map(|r| r.code.as_str()).collect()))
        .collect();
    assert_eq!(
        got,
        [
            ("10:00:00", State::Healthy, vec![]),
            ("10:00:10", State::Degraded, vec!["source_error"]),
            ("10:00:20", State::Healthy, vec![]),
            ("10:00:25", State::CutOff, vec!["outage"]),
            ("10:02:01", State::Healthy, vec![]),
            ("10:02:06", State::Offline, vec!["restarted"]),
            ("10:09:05", State::Healthy, vec![]),
        ]
    );
    assert!(history[1].reasons[0].message.contains("no such file"), "{:?}", history[1]);
    assert!(history[3].reasons[0].message.contains("40 events buffered"), "{:?}", history[3]);
    assert!(history[5].reasons[0].message.contains("6 min"), "{:?}", history[5]);
}
