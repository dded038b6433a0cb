//! The set of files a file source reads: found by glob, known by content, followed through
//! renames, rotations, truncations and compression.
//!
//! # Identity
//! A file is known by a *fingerprint*: a hash of its first `fingerprint_bytes` (1024) bytes,
//! decompressed for gzip files; a file shorter than that is known by all of its bytes so far,
//! and its fingerprint grows with it. An inode alone names nothing for long (inodes are reused),
//! and a path even less (rotation). So:
//! - a renamed file keeps its content, so its fingerprint, and is read on from its position;
//! - a new file at an old path has other content, so it is a new file, read from its start;
//! - a copy (`copytruncate`, or `gzip` of a rotated file) has the content of the original: while
//!   the original is being read, the copy is left alone; once the original is truncated, the
//!   copy carries its position on and is read to its end;
//! - a truncated file whose beginning changed is a new file; one whose beginning is unchanged
//!   but is now shorter than its position is read again from its start (and said so).
//!
//! A file shorter than `fingerprint_bytes` is known by bytes another file may begin with too
//! (two CSV exports with the same header): a file of another inode is taken for it only where
//! its bytes cannot be elsewhere ([`FileSet::naming`]). Limits: a file holding exactly the
//! bytes of a short file that is gone is taken for it (a move across file systems looks the
//! same), and a copy, or a file that is a prefix of a file being read, is not read while that
//! file holds its bytes (a header-only file beside a file with that header: no records lost).
//!
//! # Release
//! A file that left the glob (renamed out of it, or deleted) is read through its open handle to
//! its end, last unterminated line included, once nothing was written to it for
//! `release_after`; a gzip file when its stream ends. A file idle for `close_inactive` is closed
//! and reopened when it grows. Positions of files not seen for `forget_after` are forgotten.
//!
//! The set does blocking file I/O and takes the time from its caller (`now`, `wall`), so that
//! tests drive it in virtual time.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read as _, Seek as _, SeekFrom};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use super::tailer::{Encoding, FileTailer, GZIP_MAGIC, Progress, TailItem};

/// How the set finds and releases files.
#[derive(Debug, Clone)]
pub struct FileSetConfig {
    /// Glob patterns of files to read (absolute).
    pub include: Vec<String>,
    /// Glob patterns of files to leave alone: matched against the whole path, or against the
    /// file name for a pattern without `/`.
    pub exclude: Vec<String>,
    pub fingerprint_bytes: usize,
    pub release_after: Duration,
    pub close_inactive: Duration,
    pub forget_after: Duration,
    pub max_record_bytes: usize,
    pub encoding: Encoding,
}

/// What the set knows of one file; stored in the spool as part of the source's position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Stable id of this file within the source.
    pub id: u64,
    /// FNV-1a hash of the first `fp_len` (decompressed) bytes.
    pub fp: u64,
    pub fp_len: u32,
    pub dev: u64,
    pub ino: u64,
    /// Where it was last seen.
    pub path: String,
    pub offset: u64,
    pub line: u64,
    /// A gzip file read to its end.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub done: bool,
    /// When it was last seen, in Unix seconds.
    pub seen: u64,
}

/// A file source's stored position: every file it knows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetPosition {
    pub next_id: u64,
    pub files: Vec<Entry>,
}

/// Something worth a log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// A file is being read, from `offset` (0: from its start).
    Opened { id: u64, path: String, offset: u64 },
    /// A file was released (rotated away and read to its end, finished, or idle).
    Released { id: u64, path: String, offset: u64 },
    /// A file was truncated below its position.
    Truncated { id: u64, path: String, offset: u64, len: u64, restarted: bool },
    /// A file could not be read.
    Error { path: String, error: String },
}

/// One item of one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileItem {
    pub file: u64,
    pub item: TailItem,
}

/// The outcome of one [`FileSet::poll`].
#[derive(Debug, Default)]
pub struct Round {
    /// Files dropped before this round's items (truncated): their per-file state is stale.
    pub reset: Vec<u64>,
    pub items: Vec<FileItem>,
    /// Files finished after this round's items: their per-file state can go.
    pub released: Vec<u64>,
    pub notices: Vec<Notice>,
}

struct Active {
    id: u64,
    tailer: FileTailer,
    /// The first bytes of the file (up to `fingerprint_bytes`), to recognise partial copies.
    head: Vec<u8>,
    /// When the file was found to have left the glob.
    orphan_since: Option<Instant>,
    /// Since when polls have found nothing new.
    idle_since: Option<Instant>,
}

/// The files of one source.
pub struct FileSet {
    cfg: FileSetConfig,
    exclude: Vec<(glob::Pattern, bool)>,
    entries: BTreeMap<u64, Entry>,
    next_id: u64,
    active: Vec<Active>,
    /// Files known to hold nothing new: (dev, ino) -> (len, mtime) when last checked.
    settled: HashMap<(u64, u64), (u64, Option<SystemTime>)>,
    /// Files that could not be read, with the length they had: not retried until it changes.
    failed: HashMap<(u64, u64), u64>,
    /// Reset ids gathered by `scan` for the next round.
    reset: Vec<u64>,
    notices: Vec<Notice>,
}

impl std::fmt::Debug for FileSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSet").field("include", &self.cfg.include).field("active", &self.active.len()).finish()
    }
}

/// FNV-1a, 64 bits: stable across builds and platforms (the hash is stored).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

/// What a known entry is to a file not being read whose start matches its fingerprint.
enum Naming {
    /// The entry's file (renamed, a copy carrying it on, compressed).
    Same,
    /// A copy of the entry's file, which still holds the bytes: left alone for now.
    CopyOfPresent,
    /// Another file that begins with the same bytes.
    Other,
}

fn matches(entry: &Entry, head: &[u8]) -> bool {
    head.len() >= entry.fp_len as usize && fnv1a(&head[..entry.fp_len as usize]) == entry.fp
}

/// Up to `n` (decompressed) bytes from the start of `path`, and whether it is gzip.
pub fn read_head(path: &Path, n: usize) -> io::Result<(File, Vec<u8>, bool)> {
    // One open: the head read is the head of the very file handed back, even if the path is
    // renamed over meanwhile.
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    let got = read_up_to(&mut file, &mut magic)?;
    let gzip = got == 2 && magic == GZIP_MAGIC;
    file.seek(SeekFrom::Start(0))?;
    let mut head = Vec::with_capacity(n);
    if gzip {
        let mut decoder = flate2::read::MultiGzDecoder::new(io::BufReader::new(&file)).take(n as u64);
        // A gzip file still being written ends early: keep what decompressed.
        let mut buf = [0u8; 4096];
        loop {
            match decoder.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => head.extend_from_slice(&buf[..k]),
            }
        }
    } else {
        (&file).take(n as u64).read_to_end(&mut head)?;
    }
    Ok((file, head, gzip))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            k => filled += k,
        }
    }
    Ok(filled)
}

impl FileSet {
    /// A set resuming from a stored position.
    pub fn new(cfg: FileSetConfig, position: SetPosition) -> Result<FileSet, String> {
        for p in &cfg.include {
            glob::Pattern::new(p).map_err(|e| format!("include pattern {p:?}: {e}"))?;
        }
        let exclude = cfg
            .exclude
            .iter()
            .map(|p| {
                glob::Pattern::new(p)
                    .map(|pat| (pat, !p.contains('/')))
                    .map_err(|e| format!("exclude pattern {p:?}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let entries = position.files.into_iter().map(|e| (e.id, e)).collect::<BTreeMap<_, _>>();
        let next_id = position.next_id.max(entries.keys().next_back().map_or(0, |k| k + 1));
        Ok(FileSet {
            cfg,
            exclude,
            entries,
            next_id,
            active: Vec::new(),
            settled: HashMap::new(),
            failed: HashMap::new(),
            reset: Vec::new(),
            notices: Vec::new(),
        })
    }

    /// The position to store with the items returned so far; `pending` gives, for a file, the
    /// start of a record not complete yet (multiline), where the stored position must stay.
    pub fn position(&self, pending: impl Fn(u64) -> Option<Progress>) -> SetPosition {
        let files = self
            .entries
            .values()
            .map(|e| {
                let mut e = e.clone();
                if let Some(p) = pending(e.id) {
                    e.offset = p.offset;
                    e.line = p.line;
                }
                e
            })
            .collect();
        SetPosition { next_id: self.next_id, files }
    }

    /// Where a file was last seen.
    pub fn path(&self, id: u64) -> Option<&str> {
        self.entries.get(&id).map(|e| e.path.as_str())
    }

    /// The number of files being read now.
    pub fn n_active(&self) -> usize {
        self.active.len()
    }

    /// The bytes of the open plain files past what was read and committed: how far behind their
    /// ends the source is.
    pub fn bytes_behind(&self) -> u64 {
        self.active
            .iter()
            .filter(|a| !a.tailer.is_gzip())
            .filter_map(|a| {
                let len = std::fs::metadata(a.tailer.path()).ok()?.len();
                Some(len.saturating_sub(a.tailer.position().offset))
            })
            .sum()
    }

    /// Gives back the open files' read buffers, for a quiet spell.
    pub fn release_buffers(&mut self) {
        for a in &mut self.active {
            a.tailer.release_buffers();
        }
    }

    /// For the status: the files being read and how far (the first few).
    pub fn summary(&self) -> String {
        let mut parts: Vec<String> = self
            .active
            .iter()
            .take(3)
            .map(|a| format!("{}:{}", a.tailer.path().display(), a.tailer.position().offset))
            .collect();
        if self.active.len() > 3 {
            parts.push(format!("and {} more", self.active.len() - 3));
        }
        if parts.is_empty() { "no file open".to_owned() } else { parts.join(", ") }
    }

    /// Every file matching the include patterns and no exclude pattern, in path order.
    fn list(&self) -> Vec<(PathBuf, std::fs::Metadata)> {
        let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
        let mut found = BTreeMap::new();
        for pattern in &self.cfg.include {
            let Ok(paths) = glob::glob_with(pattern, options) else { continue };
            for path in paths.flatten() {
                if self.excluded(&path) {
                    continue;
                }
                if let Ok(meta) = std::fs::metadata(&path)
                    && meta.is_file()
                {
                    found.insert(path, meta);
                }
            }
        }
        found.into_iter().collect()
    }

    fn excluded(&self, path: &Path) -> bool {
        let options = glob::MatchOptions { require_literal_separator: true, ..Default::default() };
        self.exclude.iter().any(|(pattern, name_only)| {
            if *name_only {
                path.file_name().is_some_and(|n| pattern.matches_with(&n.to_string_lossy(), options))
            } else {
                pattern.matches_path_with(path, options)
            }
        })
    }

    /// Looks for files: new ones, renamed ones, copies, truncations, files gone.
    pub fn scan(&mut self, now: Instant, wall: u64) {
        self.check_active(wall);
        let listed = self.list();
        let by_inode: HashMap<(u64, u64), PathBuf> =
            listed.iter().map(|(path, meta)| ((meta.dev(), meta.ino()), path.clone())).collect();
        let mut present = HashSet::new();
        for (path, meta) in listed {
            let key = (meta.dev(), meta.ino());
            present.insert(key);
            if let Some(a) = self.active.iter_mut().find(|a| {
                let e = &self.entries[&a.id];
                (e.dev, e.ino) == key
            }) {
                a.orphan_since = None;
                a.tailer.set_path(path.clone());
                if let Some(e) = self.entries.get_mut(&a.id) {
                    e.path = path.to_string_lossy().into_owned();
                    e.seen = wall;
                }
                continue;
            }
            if meta.len() == 0 || self.failed.get(&key) == Some(&meta.len()) {
                continue;
            }
            if self.settled.get(&key) == Some(&(meta.len(), meta.modified().ok())) {
                if let Some(e) = self.entries.values_mut().find(|e| (e.dev, e.ino) == key) {
                    e.seen = wall;
                }
                continue;
            }
            self.consider(path, &meta, &by_inode, now, wall);
        }
        for a in &mut self.active {
            let e = &self.entries[&a.id];
            if !present.contains(&(e.dev, e.ino)) && a.orphan_since.is_none() {
                a.orphan_since = Some(now);
            }
        }
        self.forget(wall);
    }

    /// Truncated or rewritten open files, and fingerprints that can grow.
    fn check_active(&mut self, wall: u64) {
        let k = self.cfg.fingerprint_bytes;
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            let id = a.id;
            let entry = self.entries.get_mut(&id).expect("active files have entries");
            let (head, len) = match a.tailer.read_head(k) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    i += 1; // gzip: written once
                    continue;
                }
                Err(e) => {
                    self.notices.push(Notice::Error { path: entry.path.clone(), error: e.to_string() });
                    i += 1;
                    continue;
                }
            };
            let same_start = matches(entry, &head);
            if len < a.tailer.read_to() || !same_start {
                let offset = a.tailer.position().offset;
                self.notices.push(Notice::Truncated {
                    id,
                    path: entry.path.clone(),
                    offset,
                    len,
                    restarted: same_start,
                });
                self.reset.push(id);
                if same_start {
                    // The same beginning, shorter: read it again from its start.
                    entry.offset = 0;
                    entry.line = 0;
                    entry.seen = wall;
                } else {
                    // Other content now: this entry lives on only in a copy, if one appears
                    // (copytruncate); the file itself is looked at again as a new one.
                    entry.dev = 0;
                    entry.ino = 0;
                }
                self.active.swap_remove(i);
                continue;
            }
            if (entry.fp_len as usize) < k && head.len() > entry.fp_len as usize {
                entry.fp = fnv1a(&head);
                entry.fp_len = head.len() as u32;
                a.head = head;
            }
            i += 1;
        }
    }

    /// A file not being read: a known one (renamed, a copy taking over, grown), a copy of one
    /// being read, or a new one.
    fn consider(
        &mut self,
        path: PathBuf,
        meta: &std::fs::Metadata,
        by_inode: &HashMap<(u64, u64), PathBuf>,
        now: Instant,
        wall: u64,
    ) {
        let key = (meta.dev(), meta.ino());
        let k = self.cfg.fingerprint_bytes;
        let path_text = path.to_string_lossy().into_owned();
        let (file, head, gzip) = match read_head(&path, k) {
            Ok(x) => x,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                self.failed.insert(key, meta.len());
                self.notices.push(Notice::Error { path: path_text, error: e.to_string() });
                return;
            }
        };
        if head.is_empty() {
            return;
        }
        // A copy of a file being read (copytruncate's copy, a gzip of it, one being written).
        let is_copy = self.active.iter().any(|a| {
            let e = &self.entries[&a.id];
            (matches(e, &head) && (e.fp_len as usize == k || gzip)) || (head.len() < k && a.head.starts_with(&head))
        });
        if is_copy {
            return;
        }
        let active_ids: HashSet<u64> = self.active.iter().map(|a| a.id).collect();
        let mut copy_of_present = false;
        let known = self
            .entries
            .values()
            .filter(|e| !active_ids.contains(&e.id) && matches(e, &head))
            .filter(|e| match self.naming(e, key, &head, gzip, by_inode) {
                Naming::Same => true,
                Naming::CopyOfPresent => {
                    copy_of_present = true;
                    false
                }
                Naming::Other => false,
            })
            .max_by_key(|e| ((e.dev, e.ino) == key, e.path == path_text, e.fp_len, e.seen))
            .map(|e| e.id);
        if known.is_none() && copy_of_present {
            // A copy of a known file that still holds its bytes: a copytruncate half done, or
            // a duplicate; looked at again at the next scan.
            return;
        }
        let id = match known {
            Some(id) => {
                let e = self.entries.get_mut(&id).expect("found above");
                if e.done {
                    e.seen = wall;
                    self.settled.insert(key, (meta.len(), meta.modified().ok()));
                    return;
                }
                if !gzip && meta.len() < e.offset {
                    self.notices.push(Notice::Truncated {
                        id,
                        path: path_text.clone(),
                        offset: e.offset,
                        len: meta.len(),
                        restarted: true,
                    });
                    e.offset = 0;
                    e.line = 0;
                }
                if !gzip && meta.len() == e.offset {
                    // Nothing new: not worth an open file.
                    (e.dev, e.ino, e.path, e.seen) = (key.0, key.1, path_text, wall);
                    self.settled.insert(key, (meta.len(), meta.modified().ok()));
                    return;
                }
                (e.dev, e.ino, e.path, e.seen) = (key.0, key.1, path_text.clone(), wall);
                if (e.fp_len as usize) < head.len() {
                    e.fp = fnv1a(&head);
                    e.fp_len = head.len() as u32;
                }
                id
            }
            None => {
                let id = self.next_id;
                self.next_id += 1;
                let entry = Entry {
                    id,
                    fp: fnv1a(&head),
                    fp_len: head.len() as u32,
                    dev: key.0,
                    ino: key.1,
                    path: path_text.clone(),
                    offset: 0,
                    line: 0,
                    done: false,
                    seen: wall,
                };
                self.entries.insert(id, entry);
                id
            }
        };
        let e = &self.entries[&id];
        let at = Progress { offset: e.offset, line: e.line };
        match FileTailer::open(path, file, gzip, at, self.cfg.max_record_bytes, self.cfg.encoding) {
            Ok(tailer) => {
                self.settled.remove(&key);
                self.notices.push(Notice::Opened { id, path: path_text, offset: at.offset });
                self.active.push(Active { id, tailer, head, orphan_since: None, idle_since: Some(now) });
            }
            Err(e) => {
                self.failed.insert(key, meta.len());
                self.notices.push(Notice::Error { path: path_text, error: e.to_string() });
            }
        }
    }

    /// Whether entry `e`, whose fingerprint the start of a file not being read (`key`, `head`)
    /// matches, is that file.
    ///
    /// A full fingerprint names a file, and so does the same inode. A short one (a file shorter
    /// than `fingerprint_bytes` when last read) is all of the entry's bytes, which another file
    /// may begin with too: two CSV files with the same header, a header-only export and the
    /// next. So another inode is the entry's file only when the bytes cannot be elsewhere: its
    /// original was truncated or rewritten (copytruncate: they live on only in the copy, seen
    /// or not yet seen), or it is gone and this is a compressed copy of it or holds exactly its
    /// bytes (a move across file systems). A file whose original still holds the bytes is a
    /// copy of it when the original begins with all of it, and another file otherwise.
    fn naming(
        &self,
        e: &Entry,
        key: (u64, u64),
        head: &[u8],
        gzip: bool,
        by_inode: &HashMap<(u64, u64), PathBuf>,
    ) -> Naming {
        if e.fp_len as usize >= self.cfg.fingerprint_bytes || (e.dev, e.ino) == key || (e.dev, e.ino) == (0, 0) {
            return Naming::Same;
        }
        let Some(original) = by_inode.get(&(e.dev, e.ino)) else {
            // Gone (deleted, or moved out of the globs).
            let exact = head.len() == e.fp_len as usize;
            return if exact || (gzip && !e.done) { Naming::Same } else { Naming::Other };
        };
        match read_head(original, self.cfg.fingerprint_bytes) {
            Ok((_, now_head, _)) if matches(e, &now_head) => {
                if now_head.starts_with(head) {
                    Naming::CopyOfPresent
                } else {
                    Naming::Other
                }
            }
            // Truncated or rewritten since it was read (or gone since the listing).
            _ => Naming::Same,
        }
    }

    /// Forgets files not seen for `forget_after`.
    fn forget(&mut self, wall: u64) {
        let horizon = wall.saturating_sub(self.cfg.forget_after.as_secs());
        let active: HashSet<u64> = self.active.iter().map(|a| a.id).collect();
        self.entries.retain(|id, e| active.contains(id) || e.seen >= horizon);
        const MAX_ENTRIES: usize = 10_000;
        if self.entries.len() > MAX_ENTRIES {
            let mut by_age: Vec<(u64, u64)> =
                self.entries.values().filter(|e| !active.contains(&e.id)).map(|e| (e.seen, e.id)).collect();
            by_age.sort_unstable();
            for (_, id) in by_age.into_iter().take(self.entries.len() - MAX_ENTRIES) {
                self.entries.remove(&id);
            }
        }
    }

    /// Reads up to `max_items` items across the open files (a fair share each), and releases
    /// files that are done.
    pub fn poll(&mut self, now: Instant, max_items: usize) -> Round {
        let mut round = Round { reset: std::mem::take(&mut self.reset), ..Round::default() };
        let share = (max_items / self.active.len().max(1)).max(1);
        let mut i = 0;
        while i < self.active.len() {
            let a = &mut self.active[i];
            let before = round.items.len();
            match a.tailer.poll(share) {
                Ok(items) => round.items.extend(items.into_iter().map(|item| FileItem { file: a.id, item })),
                Err(e) => {
                    // A gzip file still being written, or damaged: looked at again when it changes.
                    let entry = &self.entries[&a.id];
                    round.notices.push(Notice::Error { path: entry.path.clone(), error: e.to_string() });
                    if let Ok(meta) = std::fs::metadata(&entry.path) {
                        self.failed.insert((meta.dev(), meta.ino()), meta.len());
                    }
                    let a = self.active.swap_remove(i);
                    self.sync(a.id, a.tailer.position());
                    round.released.push(a.id);
                    continue;
                }
            }
            if round.items.len() > before {
                a.idle_since = None;
            } else if a.idle_since.is_none() {
                a.idle_since = Some(now);
            }
            let idle_for = a.idle_since.map_or(Duration::ZERO, |t| now.saturating_duration_since(t));
            let finished = a.tailer.gzip_finished()
                || (a.tailer.at_end()
                    && a.orphan_since.is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.release_after)
                    && idle_for >= self.cfg.release_after);
            let inactive = a.tailer.at_end() && a.orphan_since.is_none() && idle_for >= self.cfg.close_inactive;
            let (id, position) = (a.id, a.tailer.position());
            self.sync(id, position);
            if finished || inactive {
                let mut a = self.active.swap_remove(i);
                if finished {
                    let mut last = Vec::new();
                    a.tailer.finish(&mut last);
                    round.items.extend(last.into_iter().map(|item| FileItem { file: id, item }));
                }
                let position = a.tailer.position();
                self.sync(id, position);
                let e = self.entries.get_mut(&id).expect("active files have entries");
                e.done = a.tailer.gzip_finished();
                if let Ok(meta) = std::fs::metadata(&e.path)
                    && (meta.dev(), meta.ino()) == (e.dev, e.ino)
                {
                    self.settled.insert((e.dev, e.ino), (meta.len(), meta.modified().ok()));
                }
                round.notices.push(Notice::Released { id, path: e.path.clone(), offset: position.offset });
                round.released.push(id);
                continue;
            }
            i += 1;
        }
        round.notices.append(&mut self.notices);
        round
    }

    fn sync(&mut self, id: u64, position: Progress) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.offset = position.offset;
            e.line = position.line;
        }
    }
}

#[cfg(test)]
#[path = "fileset_tests.rs"]
mod tests;
