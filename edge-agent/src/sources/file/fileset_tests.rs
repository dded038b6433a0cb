//! The file set against a real folder, in virtual time: rotations, copies, truncations,
//! compression, restarts; and a model-based property test of all of them at random.

use std::collections::BTreeMap;
use std::io::Write as _;

use flate2::{Compression, write::GzEncoder};
use proptest::prelude::*;

use super::*;

const RELEASE_AFTER: Duration = Duration::from_secs(5);

fn config(dir: &Path, fingerprint_bytes: usize) -> FileSetConfig {
    FileSetConfig {
        include: vec![format!("{}/app.log*", dir.display())],
        exclude: vec!["*.tmp".into()],
        fingerprint_bytes,
        release_after: RELEASE_AFTER,
        close_inactive: Duration::from_secs(60),
        forget_after: Duration::from_secs(3600),
        max_record_bytes: 4096,
        encoding: Encoding::Utf8,
    }
}

/// A file set driven in virtual time, with the position committed after every round (as the
/// spool does, in the same transaction as the records).
struct Harness {
    cfg: FileSetConfig,
    set: FileSet,
    committed: SetPosition,
    /// Where each round's lines and position are committed, as the file source does: a
    /// salvage of it must give back the position, and seqs that continue.
    spool: Option<(crate::spool::Spool, PathBuf)>,
    /// Records delivered, with the file id they came from.
    delivered: Vec<(u64, String)>,
    now: Instant,
    wall: u64,
}

impl Harness {
    fn new(cfg: FileSetConfig) -> Harness {
        let set = FileSet::new(cfg.clone(), SetPosition::default()).unwrap();
        Harness {
            cfg,
            set,
            committed: SetPosition::default(),
            spool: None,
            delivered: Vec::new(),
            now: Instant::now(),
            wall: 1_000,
        }
    }

    /// Commits each round to a spool at `path` from now on.
    fn with_spool(mut self, path: PathBuf) -> Harness {
        self.spool = Some((crate::spool::Spool::open(&path).unwrap(), path));
        self
    }

    /// A crash, a salvage of the spool, and a start from the position the salvage kept; the
    /// seqs continue where they were.
    fn salvage_and_restart(&mut self) {
        let Some((spool, path)) = self.spool.take() else { return self.restart() };
        let next_seq = spool.source_state("f").unwrap().next_seq;
        drop(spool);
        crate::spool::Spool::salvage(&path).unwrap();
        let spool = crate::spool::Spool::open(&path).unwrap();
        let state = spool.source_state("f").unwrap();
        assert_eq!(state.next_seq, next_seq, "the salvage keeps the next seq");
        assert_eq!(state.next_seq, self.delivered.len() as u64);
        let kept: SetPosition = if state.position.is_empty() {
            SetPosition::default()
        } else {
            serde_json::from_str(&state.position).unwrap()
        };
        assert_eq!(kept, self.committed, "the salvage keeps the position");
        self.spool = Some((spool, path));
        self.restart();
    }

    fn round(&mut self) -> usize {
        self.set.scan(self.now, self.wall);
        let round = self.set.poll(self.now, 7);
        for n in &round.notices {
            assert!(!matches!(n, Notice::Error { .. }), "{n:?}");
        }
        let n = round.items.len();
        let mut bodies = Vec::new();
        for fi in round.items {
            match fi.item {
                TailItem::Line { bytes, .. } => {
                    bodies.push(bytes.clone());
                    self.delivered.push((fi.file, String::from_utf8(bytes).unwrap()));
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        self.committed = self.set.position(|_| None);
        if let Some((spool, _)) = &mut self.spool {
            spool.append("f", &bodies, &serde_json::to_string(&self.committed).unwrap(), 0).unwrap();
        }
        self.now += Duration::from_millis(100);
        self.wall += 1;
        n
    }

    /// Rounds until everything is read and files rotated away are released.
    fn sync(&mut self) {
        let mut quiet = 0;
        while quiet < 3 {
            quiet = if self.round() == 0 { quiet + 1 } else { 0 };
        }
        self.now += RELEASE_AFTER * 2;
        let mut quiet = 0;
        while quiet < 3 {
            quiet = if self.round() == 0 { quiet + 1 } else { 0 };
        }
    }

    /// A crash and a start from the committed position.
    fn restart(&mut self) {
        self.set = FileSet::new(self.cfg.clone(), self.committed.clone()).unwrap();
    }

    fn lines(&self) -> Vec<&str> {
        self.delivered.iter().map(|(_, l)| l.as_str()).collect()
    }
}

fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

fn gzip(from: &Path, to: &Path) {
    let mut enc = GzEncoder::new(File::create(to).unwrap(), Compression::fast());
    enc.write_all(&std::fs::read(from).unwrap()).unwrap();
    enc.finish().unwrap();
    std::fs::remove_file(from).unwrap();
}

#[test]
fn rename_rotation_is_followed_and_the_new_file_read_from_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut h = Harness::new(config(dir.path(), 1024));
    append(&log, "a1\na2\n");
    h.sync();
    append(&log, "a3\n");
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    append(&log, "b1\n");
    append(&dir.path().join("app.log.1"), "a4\n");
    h.sync();
    assert_eq!(h.lines(), ["a1", "a2", "a3", "a4", "b1"]);
    let (a, b) = (h.delivered[0].0, h.delivered[4].0);
    assert_ne!(a, b);
    assert!(h.delivered[..4].iter().all(|(f, _)| *f == a), "the renamed file keeps its id");
    assert_eq!(h.set.path(a).unwrap(), dir.path().join("app.log.1").to_str().unwrap());
}

#[test]
fn copytruncate_hands_the_rest_of_the_file_to_its_copy() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut h = Harness::new(config(dir.path(), 1024));
    append(&log, "a1\n");
    h.sync();
    append(&log, "a2\na3\n"); // not read yet when the copy is made
    std::fs::copy(&log, dir.path().join("app.log.1")).unwrap();
    h.round(); // the copy is seen while the original is intact: left alone
    std::fs::OpenOptions::new().write(true).truncate(true).open(&log).unwrap();
    append(&log, "b1\n");
    h.sync();
    let mut lines = h.lines();
    lines.sort_unstable();
    assert_eq!(lines, ["a1", "a2", "a3", "b1"], "nothing lost, nothing twice");
}

#[test]
fn a_file_rotated_out_of_the_globs_is_read_to_its_end_then_released() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let away = dir.path().join("archive.old");
    let mut h = Harness::new(config(dir.path(), 1024));
    append(&log, "a1\n");
    h.round();
    std::fs::rename(&log, &away).unwrap();
    append(&away, "a2\nlast-without-newline");
    h.round();
    h.round();
    assert_eq!(h.lines(), ["a1", "a2"], "still open, waiting for more");
    assert_eq!(h.set.n_active(), 1);
    h.now += RELEASE_AFTER;
    h.round();
    assert_eq!(h.lines(), ["a1", "a2", "last-without-newline"]);
    assert_eq!(h.set.n_active(), 0, "released");
}

#[test]
fn a_new_file_at_an_old_path_is_read_from_its_start_and_excluded_files_are_not_read() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut h = Harness::new(config(dir.path(), 1024));
    append(&log, "first-content-1\nfirst-content-2\n");
    append(&dir.path().join("app.log.tmp"), "excluded\n");
    h.sync();
    std::fs::remove_file(&log).unwrap();
    append(&log, "x\n"); // shorter than the old position, maybe the same inode
    h.sync();
    h.restart();
    h.sync();
    assert_eq!(h.lines(), ["first-content-1", "first-content-2", "x"]);
}

#[test]
fn exports_that_share_a_header_shorter_than_the_fingerprint_are_each_read_whole() {
    // Daily CSV exports: one with its header alone, compressed; another plain one with the
    // same bytes, deleted later (a copy of the first while that holds them: not read, no
    // record lost); then exports with rows, each its own file, read whole, header included.
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(config(dir.path(), 1024));
    let header = "order_id,amount\n";
    let bare = dir.path().join("app.log-1");
    append(&bare, header);
    gzip(&bare, &dir.path().join("app.log-1.gz"));
    h.sync();
    let deleted = dir.path().join("app.log-2");
    append(&deleted, header);
    h.sync();
    std::fs::remove_file(&deleted).unwrap();
    h.sync();
    append(&dir.path().join("app.log-3"), &format!("{header}o-1,10.00\n"));
    append(&dir.path().join("app.log-4"), &format!("{header}o-2,20.00\n"));
    h.sync();
    h.restart();
    h.sync();
    let lines = h.lines();
    assert_eq!(lines.iter().filter(|l| **l == "order_id,amount").count(), 3, "{lines:?}");
    assert!(lines.contains(&"o-1,10.00") && lines.contains(&"o-2,20.00"), "{lines:?}");
    assert_eq!(lines.len(), 5, "{lines:?}");
}

#[test]
fn a_compressed_rotated_file_is_not_read_twice_and_an_unread_one_is_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut h = Harness::new(config(dir.path(), 16));
    append(&log, "a1-----------------\na2\n");
    h.sync();
    std::fs::rename(&log, dir.path().join("app.log.1")).unwrap();
    h.sync();
    gzip(&dir.path().join("app.log.1"), &dir.path().join("app.log.1.gz"));
    h.sync();
    h.restart();
    h.sync();
    assert_eq!(h.lines(), ["a1-----------------", "a2"]);
    // A compressed file the agent never saw: read whole, once.
    let other = dir.path().join("app.log.2");
    append(&other, "c1\nc2\n");
    gzip(&other, &dir.path().join("app.log.2.gz"));
    h.sync();
    h.restart();
    h.sync();
    assert_eq!(h.lines()[2..], ["c1", "c2"]);
}

#[test]
fn truncation_to_the_same_beginning_reads_the_file_again_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    let mut h = Harness::new(config(dir.path(), 4));
    append(&log, "head\nold-1\nold-2\n");
    h.sync();
    std::fs::write(&log, "head\nnew\n").unwrap();
    h.set.scan(h.now, h.wall);
    let round = h.set.poll(h.now, 10);
    assert!(
        round.notices.iter().any(|n| matches!(n, Notice::Truncated { restarted: true, len: 9, offset: 17, .. })),
        "{:?}",
        round.notices
    );
    assert_eq!(round.reset.len(), 1);
    let texts: Vec<_> = round
        .items
        .iter()
        .map(|fi| match &fi.item {
            TailItem::Line { bytes, .. } => String::from_utf8_lossy(bytes).into_owned(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, ["head", "new"]);
}

#[test]
fn a_stored_position_that_is_not_a_file_set_is_refused_by_serde() {
    assert!(serde_json::from_str::<SetPosition>(r#"{"dev":1,"ino":2,"offset":3,"line":1}"#).is_err());
}

// ---- the model-based property test ----

#[derive(Debug, Clone)]
enum Op {
    Write(u8),
    RotateRename,
    CopyTruncate,
    /// Truncation in place (after the agent caught up: otherwise the lines are simply gone).
    Truncate,
    /// The oldest plain rotated file compressed, the plain one removed.
    Compress,
    /// Renamed out of the globs: read to its end through the open handle.
    RotateAway,
    Restart,
    /// A restart after the spool was salvaged (a damaged spool at start).
    SalvageRestart,
    Poll(u8),
    /// A separate file appears whole, as an export does: lines of its own logical file (none:
    /// a header alone, with a shared header), compressed or not.
    Export {
        lines: u8,
        gz: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u8..6).prop_map(Op::Write),
        2 => Just(Op::RotateRename),
        2 => Just(Op::CopyTruncate),
        1 => Just(Op::Truncate),
        1 => Just(Op::Compress),
        1 => Just(Op::RotateAway),
        2 => Just(Op::Restart),
        1 => Just(Op::SalvageRestart),
        4 => (1u8..4).prop_map(Op::Poll),
        1 => (0u8..3, any::<bool>()).prop_map(|(lines, gz)| Op::Export { lines, gz }),
    ]
}

/// The files in the folder as the writer (an application and logrotate) sees them.
struct World {
    dir: PathBuf,
    /// Logical file written to through app.log now.
    current: u32,
    next_logical: u32,
    /// Lines written per logical file.
    written: BTreeMap<u32, u32>,
    away: u32,
    away_since_sync: bool,
    /// Every file starts with the same header line (`H`), as CSV files of one kind do.
    header: bool,
    /// Header lines written.
    headers: u32,
    /// Of them, those of files holding only their header.
    bare_headers: u32,
    exports: u32,
}

impl World {
    fn log(&self) -> PathBuf {
        self.dir.join("app.log")
    }

    fn rotated(&self, k: u32, gz: bool) -> PathBuf {
        self.dir.join(if gz { format!("app.log.{k}.gz") } else { format!("app.log.{k}") })
    }

    fn n_rotated(&self) -> u32 {
        (1..).take_while(|k| self.rotated(*k, false).exists() || self.rotated(*k, true).exists()).count() as u32
    }

    /// app.log.k -> app.log.k+1, oldest first, like logrotate.
    fn shift(&self) {
        for k in (1..=self.n_rotated()).rev() {
            for gz in [false, true] {
                if self.rotated(k, gz).exists() {
                    std::fs::rename(self.rotated(k, gz), self.rotated(k + 1, gz)).unwrap();
                }
            }
        }
    }

    fn new_logical(&mut self) {
        self.current = self.next_logical;
        self.next_logical += 1;
    }

    fn write(&mut self, n: u8) {
        let mut text = String::new();
        if self.header && std::fs::metadata(self.log()).map_or(true, |m| m.len() == 0) {
            text.push_str("H\n");
            self.headers += 1;
        }
        let k = self.written.entry(self.current).or_insert(0);
        for _ in 0..n {
            text.push_str(&format!("L{}-{}\n", self.current, k));
            *k += 1;
        }
        append(&self.log(), &text);
    }

    /// A whole new file beside the log, made in one step (written under a name outside the
    /// globs, then renamed into them).
    fn export(&mut self, lines: u8, gz: bool) {
        let logical = self.next_logical;
        self.next_logical += 1;
        self.written.insert(logical, u32::from(lines));
        let mut text = String::new();
        if self.header {
            text.push_str("H\n");
            self.headers += 1;
            self.bare_headers += u32::from(lines == 0);
        }
        for k in 0..lines {
            text.push_str(&format!("L{logical}-{k}\n"));
        }
        if text.is_empty() {
            return;
        }
        self.exports += 1;
        let tmp = self.dir.join("export.tmp");
        let name = format!("app.log-export{}", self.exports);
        if gz {
            let mut enc = GzEncoder::new(File::create(&tmp).unwrap(), Compression::fast());
            enc.write_all(text.as_bytes()).unwrap();
            enc.finish().unwrap();
            std::fs::rename(&tmp, self.dir.join(format!("{name}.gz"))).unwrap();
        } else {
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, self.dir.join(name)).unwrap();
        }
    }
}

fn check_model(ops: Vec<Op>, fingerprint_bytes: usize, header: bool) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let mut h = Harness::new(config(dir.path(), fingerprint_bytes)).with_spool(dir.path().join("spool.db"));
    let mut w = World {
        dir: dir.path().to_owned(),
        current: 0,
        next_logical: 1,
        written: BTreeMap::new(),
        away: 0,
        away_since_sync: false,
        header,
        headers: 0,
        bare_headers: 0,
        exports: 0,
    };
    for op in ops {
        match op {
            Op::Write(n) => w.write(n),
            Op::RotateRename if w.log().exists() => {
                w.shift();
                std::fs::rename(w.log(), w.rotated(1, false)).unwrap();
                w.new_logical();
            }
            Op::CopyTruncate if w.log().exists() => {
                w.shift();
                std::fs::copy(w.log(), w.rotated(1, false)).unwrap();
                std::fs::OpenOptions::new().write(true).truncate(true).open(w.log()).unwrap();
                w.new_logical();
            }
            Op::Truncate if w.log().exists() => {
                h.sync();
                w.away_since_sync = false;
                std::fs::OpenOptions::new().write(true).truncate(true).open(w.log()).unwrap();
                w.new_logical();
            }
            Op::Compress => {
                let n = w.n_rotated();
                if n >= 2 && w.rotated(n, false).exists() {
                    gzip(&w.rotated(n, false), &w.rotated(n, true));
                }
            }
            Op::RotateAway if w.log().exists() => {
                // A file that leaves the globs before the agent ever saw it cannot be read: the
                // model lets the agent look once first.
                h.set.scan(h.now, h.wall);
                w.away += 1;
                std::fs::rename(w.log(), w.dir.join(format!("away-{}", w.away))).unwrap();
                w.new_logical();
                w.away_since_sync = true;
            }
            Op::Restart => {
                // A file renamed out of the globs is read through its open handle: after a
                // restart it cannot be found, so the model lets that finish first.
                if w.away_since_sync {
                    h.sync();
                    w.away_since_sync = false;
                }
                h.restart();
            }
            Op::SalvageRestart => {
                if w.away_since_sync {
                    h.sync();
                    w.away_since_sync = false;
                }
                h.salvage_and_restart();
            }
            Op::Poll(n) => {
                for _ in 0..n {
                    h.round();
                }
            }
            Op::Export { lines, gz } => w.export(lines, gz),
            _ => {}
        }
    }
    h.sync();
    h.restart();
    h.sync();
    // Every line exactly once, in order per logical file; every header once, but that of a
    // file holding only a header identical to the start of another file may be taken for a
    // copy of it (it holds no record).
    let headers = h.delivered.iter().filter(|(_, line)| line == "H").count() as u32;
    prop_assert!(
        (w.headers - w.bare_headers..=w.headers).contains(&headers),
        "{} header lines delivered, {} written ({} alone in their files)",
        headers,
        w.headers,
        w.bare_headers
    );
    let mut got: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for (_, line) in h.delivered.iter().filter(|(_, line)| line != "H") {
        let (file, k) = line[1..].split_once('-').unwrap();
        got.entry(file.parse().unwrap()).or_default().push(k.parse().unwrap());
    }
    for (file, n) in &w.written {
        let expected: Vec<u32> = (0..*n).collect();
        prop_assert_eq!(got.remove(file).unwrap_or_default(), expected, "logical file {}", file);
    }
    prop_assert!(got.is_empty(), "lines of files never written: {:?}", got);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn every_line_is_read_once_and_in_order_whatever_the_files_do(ops in proptest::collection::vec(op(), 1..40)) {
        check_model(ops, 1024, false)?;
    }

    #[test]
    fn the_same_with_fingerprints_shorter_than_the_files(ops in proptest::collection::vec(op(), 1..40)) {
        check_model(ops, 16, false)?;
    }

    #[test]
    fn the_same_with_files_that_share_a_header_shorter_than_the_fingerprint(ops in proptest::collection::vec(op(), 1..40)) {
        check_model(ops, 1024, true)?;
    }
}
