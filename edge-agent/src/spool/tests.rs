//! Spool tests, including a model-based property test against a `VecDeque` per source with
//! close-and-reopen (a crash at a transaction boundary), a full spool and a full disk as actions.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;

fn body(n: u64) -> Vec<u8> {
    format!("{{\"n\":{n}}}").into_bytes()
}

/// An event of about `len` bytes that does not compress (the spool stores blocks compressed,
/// so tests that need pages filled use these).
fn noisy(n: u64, len: usize) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let pad: String = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b"0123456789abcdef"[(x % 16) as usize])
        })
        .collect();
    format!("{{\"n\":{n},\"pad\":\"{pad}\"}}").into_bytes()
}

fn seqs(rows: &[SpooledEvent]) -> Vec<u64> {
    rows.iter().map(|r| r.seq).collect()
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
    assert_eq!((state.next_seq, state.position.as_str(), state.n_errors), (4, "{\"offset\":40}", 1));
    assert_eq!(seqs(&spool.read("a", 1, 2, usize::MAX).unwrap()), [1, 2]);
    assert_eq!(spool.ack("a", 0, 2).unwrap(), 2);
    assert_eq!(spool.oldest_seq("a").unwrap(), Some(2));
    let stats = spool.stats().unwrap();
    assert_eq!((stats.n_events, stats.n_bytes), (2, (body(2).len() + body(3).len()) as u64));
    assert!(stats.oldest_spooled_at.is_some());
    // Byte limit: at least one row, then stop before exceeding it.
    assert_eq!(spool.read("a", 2, 10, 1).unwrap().len(), 1);
    assert_eq!(spool.source_ids().unwrap(), vec!["a".to_owned()]);
    assert!(spool.verify().unwrap().is_ok());
}

#[test]
fn large_appends_go_in_chunks_and_read_back_whole_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    // 64-row chunks plus a remainder, twice, for two sources.
    assert_eq!(spool.append("a", &(0..150).map(body).collect::<Vec<_>>(), "{}", 0).unwrap(), 0);
    assert_eq!(spool.append("b", &(0..3).map(body).collect::<Vec<_>>(), "{}", 0).unwrap(), 0);
    assert_eq!(spool.append("a", &(150..278).map(body).collect::<Vec<_>>(), "{}", 0).unwrap(), 150);
    let rows = spool.read("a", 0, 1_000, usize::MAX).unwrap();
    assert_eq!(seqs(&rows), (0..278).collect::<Vec<u64>>());
    assert!(rows.iter().enumerate().all(|(i, r)| r.body == body(i as u64)), "bodies in their seq's place");
    assert_eq!(seqs(&spool.read("b", 0, 10, usize::MAX).unwrap()), [0, 1, 2]);
    assert!(spool.verify().unwrap().is_ok(), "every checksum right");
}

#[test]
fn read_continues_past_a_hole_left_by_an_out_of_order_ack() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    spool.append("a", &(0..6).map(body).collect::<Vec<_>>(), "{}", 0).unwrap();
    spool.ack("a", 2, 2).unwrap();
    assert_eq!(seqs(&spool.read("a", 0, 10, usize::MAX).unwrap()), [0, 1, 4, 5]);
}

#[test]
fn pause_mode_refuses_what_does_not_fit_and_accepts_once_acked() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { max_bytes: 24, ..SpoolConfig::default() };
    let mut spool = Spool::open_with(&dir.path().join("s.db"), config).unwrap();
    spool.append("a", &[body(0), body(1), body(2)], "p1", 0).unwrap(); // 3 x 7 bytes
    let err = spool.append("a", &[body(3)], "p2", 0).unwrap_err();
    assert!(err.is_full(), "{err}");
    assert!(err.to_string().contains("21 of 24 bytes used, 7 more needed"), "{err}");
    assert_eq!(spool.source_state("a").unwrap().position, "p1", "the position did not move");
    spool.ack("a", 0, 1).unwrap();
    assert_eq!(spool.append("a", &[body(3)], "p2", 0).unwrap(), 3);
    // Only bad records (no events) still move the position.
    spool.append("a", &[], "p3", 2).unwrap();
    assert_eq!(spool.source_state("a").unwrap().n_errors, 2);
}

/// A commit larger than the whole limit would stall its source for ever: it goes in alone.
#[test]
fn a_commit_larger_than_the_whole_spool_goes_in_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { max_bytes: 24, ..SpoolConfig::default() };
    let mut spool = Spool::open_with(&dir.path().join("s.db"), config).unwrap();
    let big: Vec<Vec<u8>> = (0..5).map(body).collect(); // 35 bytes
    spool.append("a", &[body(9)], "p0", 0).unwrap();
    assert!(spool.append("a", &big, "p1", 0).unwrap_err().is_full(), "not while others wait");
    spool.ack("a", 0, 1).unwrap();
    assert_eq!(spool.append("a", &big, "p1", 0).unwrap(), 1, "alone in an empty spool");
    assert!(spool.append("b", &[body(0)], "q1", 0).unwrap_err().is_full(), "and nothing beside it");
    assert!(spool.verify().unwrap().is_ok());

    let drop_dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { max_bytes: 24, when_full: WhenFull::DropOldest, ..SpoolConfig::default() };
    let mut spool = Spool::open_with(&drop_dir.path().join("s.db"), config).unwrap();
    spool.append("a", &[body(0), body(1)], "", 0).unwrap();
    spool.append("b", &big, "", 0).unwrap();
    assert_eq!(spool.source_state("a").unwrap().n_dropped, 2, "everything else dropped for it");
    assert_eq!(spool.stats().unwrap().n_bytes, 35);
}

#[test]
fn drop_oldest_makes_room_and_counts_every_dropped_event() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { max_bytes: 24, when_full: WhenFull::DropOldest, ..SpoolConfig::default() };
    let mut spool = Spool::open_with(&dir.path().join("s.db"), config).unwrap();
    spool.append("a", &[body(0), body(1)], "", 0).unwrap();
    spool.append("b", &[body(0)], "", 0).unwrap();
    spool.append("a", &[body(2), body(3)], "", 0).unwrap(); // needs 14, 3 free: drops the 2 oldest
    assert_eq!(seqs(&spool.read("a", 0, 10, usize::MAX).unwrap()), [2, 3]);
    assert_eq!(seqs(&spool.read("b", 0, 10, usize::MAX).unwrap()), [0]);
    assert_eq!(spool.source_state("a").unwrap().n_dropped, 2);
    assert_eq!(spool.stats().unwrap().n_bytes, 21);
    assert!(spool.verify().unwrap().is_ok());
}

#[test]
fn a_row_failing_its_checksum_is_quarantined_and_the_rest_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let mut spool = Spool::open(&path).unwrap();
    // Four commits: four rows (a row holds one commit's events, or a block of them).
    for i in 0..4 {
        spool.append("a", &[body(i)], "", 0).unwrap();
    }
    // A silent bit flip in one stored body.
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE events SET body = X'7B226E223A397D' WHERE seq = 1", []).unwrap();
    let report = spool.verify().unwrap();
    assert_eq!(report.bad_checksums, [("a".to_owned(), 1)]);
    assert_eq!(seqs(&spool.read("a", 0, 10, usize::MAX).unwrap()), [0, 2, 3]);
    assert_eq!(spool.source_state("a").unwrap().n_quarantined, 1);
    let quarantined: i64 = raw.query_row("SELECT count(*) FROM quarantine WHERE seq = 1", [], |r| r.get(0)).unwrap();
    assert_eq!(quarantined, 1);
    assert!(spool.verify().unwrap().is_ok(), "the spool is consistent again");
}

#[test]
fn a_damaged_page_is_salvaged_keeping_positions_and_readable_events() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let n = 3000u64;
    {
        let mut spool = Spool::open(&path).unwrap();
        // Blocks of 5 events (~1.7 KB): hundreds of rows over many leaf pages, so that the
        // damaged page in the middle of the file holds rows, not the tree's root.
        spool.set_block_limits(5, u64::MAX);
        let big: Vec<Vec<u8>> = (0..n).map(|i| noisy(i, 300)).collect();
        for chunk in big.chunks(500) {
            let pos = format!("{{\"offset\":{}}}", chunk.len());
            spool.append("orders", chunk, &pos, 0).unwrap();
        }
        spool.ack("orders", 0, 100).unwrap();
    } // closing checkpoints the WAL into the main file
    let len = std::fs::metadata(&path).unwrap().len();
    let page = 16_384; // the spool's page size
    let victim = (len / page / 2) * page;
    let mut bytes = std::fs::read(&path).unwrap();
    for b in &mut bytes[victim as usize..(victim + page) as usize] {
        *b = 0xA5;
    }
    std::fs::write(&path, bytes).unwrap();

    let spool = Spool::open(&path).unwrap();
    assert!(!spool.quick_check().unwrap(), "the damage is detected");
    drop(spool);
    let report = Spool::salvage(&path).unwrap();
    assert!(report.damaged_copy.exists());
    assert!(report.n_lost > 0, "{report:?}");
    assert_eq!(report.n_saved + report.n_lost, n - 100, "{report:?}");

    let mut spool = Spool::open(&path).unwrap();
    assert!(spool.quick_check().unwrap());
    assert!(spool.verify().unwrap().is_ok());
    let state = spool.source_state("orders").unwrap();
    assert_eq!(state.next_seq, n);
    assert_eq!(state.n_quarantined, report.n_lost);
    assert_eq!(spool.read("orders", 0, 10_000, usize::MAX).unwrap().len() as u64, report.n_saved);
}

/// Overwrites page `page` (1-based) of the database file at `path` with garbage.
fn damage_page(path: &Path, page: u64) {
    let size = 16_384; // the spool's page size
    let mut bytes = std::fs::read(path).unwrap();
    let at = ((page - 1) * size) as usize;
    for b in &mut bytes[at..at + size as usize] {
        *b = 0xA5;
    }
    std::fs::write(path, bytes).unwrap();
}

/// The sources table unreadable: no source's next seq can be established. The salvage fails
/// with an error that says to re-enroll, and changes nothing — above all, it does not leave an
/// empty healthy spool at the path whose seqs would restart at 0. It fails again at the next
/// start.
#[test]
fn a_salvage_that_cannot_recover_the_next_seqs_changes_nothing_and_says_to_re_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path).unwrap();
        spool.append("orders", &(0..100).map(body).collect::<Vec<_>>(), "{\"offset\":100}", 0).unwrap();
    }
    let root: i64 = Connection::open(&path)
        .unwrap()
        .query_row("SELECT rootpage FROM sqlite_master WHERE name = 'sources'", [], |r| r.get(0))
        .unwrap();
    damage_page(&path, root as u64);
    let damaged = std::fs::read(&path).unwrap();
    for _ in 0..2 {
        let err = Spool::salvage(&path).unwrap_err().to_string();
        assert!(err.contains("the sources table cannot be read") && err.contains("re-enroll"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), damaged, "the damaged spool stays as it was");
        assert!(!path.with_extension("db.salvage").exists());
    }
}

/// One source's events unreadable (the last page of the file, where its newest rows are): that
/// source's next seq cannot be established, so it is kept but blocked — appending to it is
/// refused with a reason that says to re-enroll — while the other source is salvaged and goes
/// on.
#[test]
fn a_source_whose_next_seq_is_unknown_is_blocked_and_the_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path).unwrap();
        spool.append("a", &(0..10).map(body).collect::<Vec<_>>(), "{\"offset\":10}", 0).unwrap();
        let big: Vec<Vec<u8>> = (0..2000).map(|i| noisy(i, 300)).collect();
        for chunk in big.chunks(500) {
            spool.append("b", chunk, "{\"offset\":1}", 0).unwrap();
        }
    }
    let pages = std::fs::metadata(&path).unwrap().len() / 16_384;
    damage_page(&path, pages);
    let report = Spool::salvage(&path).unwrap();
    assert_eq!(report.blocked, ["b"], "{report:?}");
    let mut spool = Spool::open(&path).unwrap();
    let a = spool.source_state("a").unwrap();
    assert_eq!((a.next_seq, a.blocked.as_deref()), (10, None));
    assert_eq!(spool.append("a", &[body(10)], "{\"offset\":11}", 0).unwrap(), 10);
    let b = spool.source_state("b").unwrap();
    assert_eq!(b.next_seq, 2000, "the stored next seq is kept, never lowered");
    assert!(b.blocked.as_deref().unwrap_or("").contains("re-enroll"), "{b:?}");
    let refused = spool.append("b", &[body(1)], "{\"offset\":2}", 0).unwrap_err();
    assert!(matches!(refused, SpoolError::Blocked { .. }), "{refused}");
    assert!(refused.to_string().contains("source b is stopped"), "{refused}");
}

/// A stale sources row beside newer events (a damaged header, a lost update): the next seq
/// follows the highest spooled seq, never reuses one.
#[test]
fn a_salvage_takes_the_next_seq_past_every_spooled_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    {
        let mut spool = Spool::open(&path).unwrap();
        spool.append("orders", &(0..50).map(body).collect::<Vec<_>>(), "{\"offset\":50}", 0).unwrap();
        spool.append("web", &(0..5).map(body).collect::<Vec<_>>(), "{\"offset\":5}", 0).unwrap();
    }
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE sources SET next_seq = 10 WHERE source_id = 'orders'", [])
        .unwrap();
    let report = Spool::salvage(&path).unwrap();
    assert_eq!((report.n_saved, report.n_lost), (55, 0));
    let mut spool = Spool::open(&path).unwrap();
    assert_eq!(spool.source_state("orders").unwrap().next_seq, 50);
    assert_eq!(spool.source_state("web").unwrap().next_seq, 5);
    assert_eq!(spool.append("orders", &[body(50)], "{\"offset\":51}", 0).unwrap(), 50, "no seq used twice");
    assert_eq!(spool.read("orders", 0, 100, usize::MAX).unwrap().len(), 51);
}

/// What is only in the WAL (not yet checkpointed) is salvaged too: the copy's WAL is named as
/// SQLite reads it.
#[test]
fn a_salvage_reads_the_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path).unwrap();
    // Another connection open, so that closing the spool does not checkpoint the WAL.
    let holder = Connection::open(&path).unwrap();
    holder.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    holder.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get::<_, i64>(0)).unwrap();
    spool.conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
    spool.append("orders", &(0..30).map(body).collect::<Vec<_>>(), "{\"offset\":30}", 0).unwrap();
    drop(spool);
    let mut wal = path.as_os_str().to_owned();
    wal.push("-wal");
    assert!(std::fs::metadata(&wal).unwrap().len() > 0, "the events are in the WAL");
    let report = Spool::salvage(&path).unwrap();
    drop(holder);
    assert_eq!(report.n_saved, 30);
    let spool = Spool::open(&path).unwrap();
    assert_eq!(spool.source_state("orders").unwrap().next_seq, 30);
    assert_eq!(spool.source_state("orders").unwrap().position, "{\"offset\":30}");
}

#[test]
fn a_full_disk_fails_the_append_without_changing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    spool.append("a", &[body(0)], "p0", 0).unwrap();
    spool.limit_pages_for_test(spool.page_count_for_test());
    let big: Vec<Vec<u8>> = (0..200).map(|i| noisy(i, 1000)).collect();
    let err = spool.append("a", &big, "p1", 0).unwrap_err();
    assert!(matches!(err, SpoolError::DiskFull { .. }), "{err}");
    assert!(err.is_full());
    assert_eq!(spool.source_state("a").unwrap().position, "p0");
    spool.limit_pages_for_test(1 << 30);
    assert_eq!(spool.append("a", &big, "p1", 0).unwrap(), 1);
}

#[derive(Debug, Clone)]
enum Action {
    Append {
        source: u8,
        n: u8,
    },
    AckOldest {
        source: u8,
        n: u8,
    },
    Reopen,
    DiskFull,
    DiskFreed,
    /// A salvage of the (healthy) spool: nothing may change.
    Salvage,
    /// A quiet spell's release of caches and buffers: nothing may change.
    ReleaseMemory,
    /// A source's row falls behind (set `back` seqs lower), then a salvage: while its newest
    /// event is still spooled, its next seq is recovered from it.
    StaleRowThenSalvage {
        source: u8,
        back: u8,
    },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        5 => (0u8..3, 1u8..6).prop_map(|(source, n)| Action::Append { source, n }),
        3 => (0u8..3, 1u8..5).prop_map(|(source, n)| Action::AckOldest { source, n }),
        1 => Just(Action::Reopen),
        1 => Just(Action::DiskFull),
        1 => Just(Action::DiskFreed),
        1 => Just(Action::Salvage),
        1 => Just(Action::ReleaseMemory),
        1 => (0u8..3, 1u8..5).prop_map(|(source, back)| Action::StaleRowThenSalvage { source, back }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn behaves_like_a_bounded_queue_per_source_across_reopens_and_full_disks(
        actions in proptest::collection::vec(action(), 1..40)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool.db");
        // Room for ~40 bodies of 7-8 bytes: the limit is hit in longer runs.
        let config = SpoolConfig { max_bytes: 320, ..SpoolConfig::default() };
        let mut spool = Spool::open_with(&path, config).unwrap();
        let mut model: BTreeMap<String, (u64, VecDeque<u64>)> = BTreeMap::new();
        let mut disk_full = false;
        for action in actions {
            match action {
                Action::Append { source, n } => {
                    let id = format!("s{source}");
                    let entry = model.entry(id.clone()).or_default();
                    let bodies: Vec<Vec<u8>> = (0..u64::from(n)).map(|i| body(entry.0 + i)).collect();
                    let needed: u64 = bodies.iter().map(|b| b.len() as u64).sum();
                    let used = spool.stats().unwrap().n_bytes;
                    match spool.append(&id, &bodies, &format!("{}", entry.0 + u64::from(n)), 0) {
                        Ok(first) => {
                            prop_assert!(used + needed <= 320, "append beyond the limit");
                            prop_assert_eq!(first, entry.0);
                            for i in 0..u64::from(n) {
                                entry.1.push_back(entry.0 + i);
                            }
                            entry.0 += u64::from(n);
                        }
                        Err(e) => {
                            prop_assert!(e.is_full(), "unexpected error {}", e);
                            prop_assert!(disk_full || used + needed > 320, "refused with room: {}", e);
                        }
                    }
                }
                Action::AckOldest { source, n } => {
                    let id = format!("s{source}");
                    let Some(entry) = model.get_mut(&id) else { continue };
                    let Some(&first) = entry.1.front() else { continue };
                    let count = (n as usize).min(entry.1.len());
                    match spool.ack(&id, first, count as u32) {
                        Ok(_) => {
                            entry.1.drain(..count);
                        }
                        Err(e) => prop_assert!(disk_full && e.is_full(), "unexpected error {}", e),
                    }
                }
                Action::Reopen => {
                    drop(spool);
                    spool = Spool::open_with(&path, config).unwrap();
                    disk_full = false;
                }
                Action::DiskFull => {
                    spool.limit_pages_for_test(spool.page_count_for_test());
                    disk_full = true;
                }
                Action::DiskFreed => {
                    spool.limit_pages_for_test(1 << 30);
                    disk_full = false;
                }
                Action::Salvage => {
                    drop(spool);
                    Spool::salvage(&path).unwrap();
                    spool = Spool::open_with(&path, config).unwrap();
                    disk_full = false;
                }
                Action::ReleaseMemory => spool.release_memory().unwrap(),
                Action::StaleRowThenSalvage { source, back } => {
                    let id = format!("s{source}");
                    // Only while the newest event is spooled (the queue ends at next_seq - 1):
                    // once acknowledged and deleted, the row is the only record of the seq.
                    let Some((next, queue)) = model.get(&id) else { continue };
                    if queue.back().is_none_or(|last| last + 1 != *next) {
                        continue;
                    }
                    drop(spool);
                    let stale = next.saturating_sub(u64::from(back)) as i64;
                    Connection::open(&path)
                        .unwrap()
                        .execute("UPDATE sources SET next_seq = ?1 WHERE source_id = ?2", params![stale, id])
                        .unwrap();
                    Spool::salvage(&path).unwrap();
                    spool = Spool::open_with(&path, config).unwrap();
                    disk_full = false;
                }
            }
            for (id, (next_seq, queue)) in &model {
                let state = spool.source_state(id).unwrap();
                if !queue.is_empty() || state.next_seq > 0 {
                    prop_assert_eq!(state.next_seq, *next_seq);
                    prop_assert_eq!(state.position, next_seq.to_string());
                }
                let rows = spool.read(id, 0, 1000, usize::MAX).unwrap();
                prop_assert_eq!(seqs(&rows), queue.iter().copied().collect::<Vec<_>>());
                for r in &rows {
                    prop_assert_eq!(&r.body, &body(r.seq));
                }
            }
            let expected_bytes: u64 = model.values().flat_map(|(_, q)| q.iter().map(|s| body(*s).len() as u64)).sum();
            prop_assert_eq!(spool.stats().unwrap().n_bytes, expected_bytes);
        }
    }
}

/// Refused events leave the line with their kind and reason; counts by kind stay after a
/// purge; a whole span (a batch refused whole) moves every event it holds, holes included.
#[test]
fn refused_events_move_aside_and_are_counted_by_kind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    let mut spool = Spool::open(&path).unwrap();
    spool.append("a", &(0..8).map(body).collect::<Vec<_>>(), "{}", 0).unwrap();
    assert_eq!(spool.ack("a", 3, 1).unwrap(), 1, "a hole at 3");
    assert_eq!(spool.refuse_span("a", 1, 1, RefusalKind::ForeignTenant, "claims tenant \"x\"").unwrap(), 1);
    assert_eq!(spool.refuse_span("a", 2, 4, RefusalKind::InvalidBatch, "does not decompress").unwrap(), 3);
    assert_eq!(spool.refuse_span("a", 9, 1, RefusalKind::TooLarge, "gone already").unwrap(), 0);
    assert_eq!(seqs(&spool.read("a", 0, 100, usize::MAX).unwrap()), [0, 6, 7], "the others stay in line");
    let refused = spool.refused().unwrap();
    let listed: Vec<(u64, &str)> = refused.iter().map(|r| (r.seq, r.kind.as_str())).collect();
    assert_eq!(listed, [(1, "foreign_tenant"), (2, "invalid_batch"), (4, "invalid_batch"), (5, "invalid_batch")]);
    assert_eq!(refused[1].body, body(2));
    let expected = BTreeMap::from([("foreign_tenant".to_owned(), 1), ("invalid_batch".to_owned(), 3)]);
    assert_eq!(spool.refused_counts("a").unwrap(), expected);
    assert_eq!(spool.source_state("a").unwrap().n_refused, 4);
    assert_eq!(spool.stats().unwrap().n_events, 3);
    assert_eq!(spool.purge_refused(None).unwrap(), 4);
    drop(spool);
    let spool = Spool::open(&path).unwrap();
    assert!(spool.refused().unwrap().is_empty());
    assert_eq!(spool.refused_counts("a").unwrap(), expected, "how many were ever refused");
}

/// A version 2 spool (refusals counted without kinds) opens with its count as `invalid_event`.
#[test]
fn refusals_counted_before_kinds_keep_their_count() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..2] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 2).unwrap();
        conn.execute(
            "INSERT INTO sources (source_id, source_no, next_seq, position, n_errors, n_dropped, n_quarantined, n_refused)
             VALUES ('a', 1, 5, '{}', 0, 0, 0, 2)",
            [],
        )
        .unwrap();
    }
    let spool = Spool::open(&path).unwrap();
    assert_eq!(spool.refused_counts("a").unwrap(), BTreeMap::from([("invalid_event".to_owned(), 2)]));
}

/// A commit goes in as blocks within the block limits; `read_blocks` returns whole blocks
/// while they fit the batch limits (at least one); a block's payload is the batch payload of
/// its events.
#[test]
fn commits_are_spooled_as_blocks_within_the_limits_and_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    spool.set_block_limits(4, 1_000);
    let bodies: Vec<Vec<u8>> = (0..10).map(body).collect();
    spool.append("a", &bodies, "{}", 0).unwrap();
    let rows: i64 = spool.conn.query_row("SELECT count(*) FROM events", [], |r| r.get(0)).unwrap();
    assert_eq!(rows, 3, "4 + 4 + 2 events");
    let blocks = spool.read_blocks("a", 0, 8, usize::MAX).unwrap();
    assert_eq!(blocks.iter().map(|b| (b.first_seq, b.n)).collect::<Vec<_>>(), [(0, 4), (4, 4)]);
    let blocks = spool.read_blocks("a", 0, 7, usize::MAX).unwrap();
    assert_eq!(blocks.iter().map(|b| (b.first_seq, b.n)).collect::<Vec<_>>(), [(0, 4)], "only whole blocks");
    assert_eq!(spool.read_blocks("a", 0, 1, 1).unwrap().len(), 1, "at least one");
    // From a seq inside a block: that block.
    let blocks = spool.read_blocks("a", 9, 100, usize::MAX).unwrap();
    assert_eq!(blocks.iter().map(|b| (b.first_seq, b.n)).collect::<Vec<_>>(), [(8, 2)]);
    let block = &blocks[0];
    assert_eq!((block.raw_bytes, block.max_len), (14, 7));
    let plain = zstd::bulk::decompress(block.payload().unwrap(), 1 << 10).unwrap();
    assert_eq!(plain, [body(8), b"\n".to_vec(), body(9), b"\n".to_vec()].concat());
    assert_eq!(block.events().unwrap(), [(8, body(8)), (9, body(9))]);

    // The byte limit of a block counts the events' JSON (7 bytes each here).
    spool.set_block_limits(100, 20);
    spool.append("b", &(0..5).map(body).collect::<Vec<_>>(), "{}", 0).unwrap();
    let blocks = spool.read_blocks("b", 0, 100, usize::MAX).unwrap();
    assert_eq!(blocks.iter().map(|b| b.n).collect::<Vec<_>>(), [2, 2, 1]);
    assert!(spool.verify().unwrap().is_ok());
}

/// Rows of a version 3 spool (one event each, not packed) are read, shipped, acknowledged and
/// counted like blocks after the upgrade.
#[test]
fn events_spooled_before_blocks_are_read_after_the_upgrade() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spool.db");
    {
        let conn = Connection::open(&path).unwrap();
        for sql in &MIGRATIONS[..3] {
            conn.execute_batch(sql).unwrap();
        }
        conn.pragma_update(None, "user_version", 3).unwrap();
        conn.execute("INSERT INTO sources (source_id, source_no, next_seq, position) VALUES ('a', 1, 3, '{}')", [])
            .unwrap();
        for seq in 0..3u64 {
            let b = body(seq);
            conn.execute(
                "INSERT INTO events (key, body, crc, spooled_at) VALUES (?1, ?2, ?3, 0)",
                params![event_key(1, seq), b, crc32fast::hash(&b)],
            )
            .unwrap();
        }
        conn.execute("UPDATE totals SET n_events = 3, n_bytes = 21", []).unwrap();
    }
    let mut spool = Spool::open(&path).unwrap();
    assert!(spool.verify().unwrap().is_ok());
    let blocks = spool.read_blocks("a", 0, 100, usize::MAX).unwrap();
    assert_eq!(blocks.len(), 3);
    assert!(blocks.iter().all(|b| b.payload().is_none() && b.n == 1 && b.raw_bytes == 7));
    assert_eq!(blocks[1].events().unwrap(), [(1, body(1))]);
    assert_eq!(spool.append("a", &[body(3), body(4)], "{}", 0).unwrap(), 3);
    assert_eq!(seqs(&spool.read("a", 0, 100, usize::MAX).unwrap()), [0, 1, 2, 3, 4]);
    assert_eq!(spool.ack("a", 0, 4).unwrap(), 4, "old rows and part of a new block");
    assert_eq!(seqs(&spool.read("a", 0, 100, usize::MAX).unwrap()), [4]);
    assert_eq!(spool.stats().unwrap().n_bytes, 7);
    assert!(spool.verify().unwrap().is_ok());
}

/// Refusals naming single events of a block move exactly those; the block's other events stay
/// in line, in order, and the totals follow.
#[test]
fn events_refused_one_by_one_leave_the_rest_of_their_block() {
    let dir = tempfile::tempdir().unwrap();
    let mut spool = Spool::open(&dir.path().join("s.db")).unwrap();
    spool.append("a", &(0..10).map(body).collect::<Vec<_>>(), "{}", 0).unwrap();
    let named =
        [(2, RefusalKind::ForeignTenant, "x"), (3, RefusalKind::ForeignTenant, "x"), (7, RefusalKind::TooLarge, "y")];
    assert_eq!(spool.refuse_events("a", &named).unwrap(), 3);
    assert_eq!(seqs(&spool.read("a", 0, 100, usize::MAX).unwrap()), [0, 1, 4, 5, 6, 8, 9]);
    assert!(spool.read("a", 0, 100, usize::MAX).unwrap().iter().all(|r| r.body == body(r.seq)));
    let listed: Vec<(u64, String)> = spool.refused().unwrap().into_iter().map(|r| (r.seq, r.kind)).collect();
    assert_eq!(listed, [(2, "foreign_tenant".into()), (3, "foreign_tenant".into()), (7, "too_large".into())]);
    assert_eq!(spool.stats().unwrap().n_events, 7);
    assert!(spool.verify().unwrap().is_ok());
}

/// `drop_oldest` drops only as many of a block's first events as make room.
#[test]
fn drop_oldest_takes_only_what_it_needs_from_a_block() {
    let dir = tempfile::tempdir().unwrap();
    let config = SpoolConfig { max_bytes: 70, when_full: WhenFull::DropOldest, ..SpoolConfig::default() };
    let mut spool = Spool::open_with(&dir.path().join("s.db"), config).unwrap();
    spool.append("a", &(0..10).map(body).collect::<Vec<_>>(), "", 0).unwrap(); // 70 bytes, one block
    spool.append("b", &[body(0), body(1)], "", 0).unwrap(); // 14 more: the 2 oldest go
    assert_eq!(seqs(&spool.read("a", 0, 100, usize::MAX).unwrap()), (2..10).collect::<Vec<_>>());
    assert_eq!(spool.source_state("a").unwrap().n_dropped, 2);
    assert_eq!(spool.stats().unwrap().n_bytes, 70);
    assert!(spool.verify().unwrap().is_ok());
}

/// A read at once sees one moment of the spool: an append by another connection in the
/// middle of it shows only in the next read.
#[test]
fn a_read_at_once_sees_one_moment() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.db");
    let reader = Spool::open(&path).unwrap();
    let mut writer = Spool::open(&path).unwrap();
    writer.append("a", &[body(0)], "", 0).unwrap();
    let (before, during) = reader
        .read_at_once(|spool| {
            let before = spool.totals()?;
            writer.append("a", &[body(1), body(2)], "", 0).unwrap();
            Ok((before, (spool.totals()?, spool.source_state("a")?.next_seq)))
        })
        .unwrap();
    assert_eq!(before, (1, 7));
    assert_eq!(during, ((1, 7), 1), "the append is not seen inside the read");
    assert_eq!((reader.totals().unwrap(), reader.source_state("a").unwrap().next_seq), ((3, 21), 3));
}
