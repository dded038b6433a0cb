//! Spool tests, including a model-based property test against a `VecDeque` with
//! close-and-reopen (a crash at a transaction boundary) as one of the actions.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;

fn body(n: u64) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}

#[test]
fn append_read_ack_and_position_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path).unwrap();
    assert_eq!(spool.source_state("a").unwrap(), SourceState::default());
    assert_eq!(spool.append("a", &[body(0), body(1), body(2)], "{\"offset\":30}", 1).unwrap(), 0);
    assert_eq!(spool.append("a", &[body(3)], "{\"offset\":40}", 0).unwrap(), 3);
    drop(spool);

    let mut spool = Spool::open(&path).unwrap();
    let state = spool.source_state("a").unwrap();
    assert_eq!(state, SourceState { next_seq: 4, position: "{\"offset\":40}".into(), n_errors: 1 });
    let rows = spool.read("a", 1, 2, usize::MAX).unwrap();
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(spool.ack("a", 0, 2).unwrap(), 2);
    assert_eq!(spool.oldest_seq("a").unwrap(), Some(2));
    assert_eq!(spool.stats().unwrap().n_events, 2);
    // Byte limit: at least one row, then stop before exceeding it.
    assert_eq!(spool.read("a", 2, 10, 1).unwrap().len(), 1);
    assert_eq!(spool.source_ids().unwrap(), vec!["a".to_owned()]);
}

#[test]
fn read_stops_at_a_hole_left_by_an_out_of_order_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    spool.append("a", &(0..6).map(body).collect::<Vec<_>>(), "{}", 0).unwrap();
    spool.ack("a", 2, 2).unwrap();
    let rows = spool.read("a", 0, 10, usize::MAX).unwrap();
    assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![0, 1]);
}

#[derive(Debug, Clone)]
enum Action {
    Append { source: u8, n: u8 },
    AckOldest { source: u8, n: u8 },
    Reopen,
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        4 => (0u8..3, 1u8..5).prop_map(|(source, n)| Action::Append { source, n }),
        3 => (0u8..3, 1u8..5).prop_map(|(source, n)| Action::AckOldest { source, n }),
        1 => Just(Action::Reopen),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_a_queue_per_source_across_reopens(actions in proptest::collection::vec(action(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        let mut spool = Spool::open(&path).unwrap();
        let mut model: BTreeMap<String, (u64, VecDeque<u64>)> = BTreeMap::new();
        for action in actions {
            match action {
                Action::Append { source, n } => {
                    let id = format!("s{source}");
                    let entry = model.entry(id.clone()).or_default();
                    let bodies: Vec<Vec<u8>> = (0..u64::from(n)).map(|i| body(entry.0 + i)).collect();
                    let first = spool.append(&id, &bodies, &format!("{}", entry.0 + u64::from(n)), 0).unwrap();
                    prop_assert_eq!(first, entry.0);
                    for i in 0..u64::from(n) {
                        entry.1.push_back(entry.0 + i);
                    }
                    entry.0 += u64::from(n);
                }
                Action::AckOldest { source, n } => {
                    let id = format!("s{source}");
                    let Some(entry) = model.get_mut(&id) else { continue };
                    let Some(&first) = entry.1.front() else { continue };
                    let count = (n as usize).min(entry.1.len());
                    spool.ack(&id, first, count as u32).unwrap();
                    entry.1.drain(..count);
                }
                Action::Reopen => {
                    drop(spool);
                    spool = Spool::open(&path).unwrap();
                }
            }
            for (id, (next_seq, queue)) in &model {
                let state = spool.source_state(id).unwrap();
                prop_assert_eq!(state.next_seq, *next_seq);
                prop_assert_eq!(state.position, next_seq.to_string());
                let rows = spool.read(id, 0, 1000, usize::MAX).unwrap();
                prop_assert_eq!(rows.iter().map(|r| r.seq).collect::<Vec<_>>(), queue.iter().copied().collect::<Vec<_>>());
                for r in &rows {
                    prop_assert_eq!(&r.body, &body(r.seq));
                }
            }
        }
    }
}
