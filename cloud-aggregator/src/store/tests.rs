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
    let claim = |expected, new| OffsetClaim { topic: "t".into(), partition: 0, expected_next: expected, new_next: new };
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
