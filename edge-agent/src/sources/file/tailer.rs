//! Reading complete lines from a growing file, from a stored position.
//!
//! The tailer does blocking I/O and nothing else: no mapping, no spool. It hands out complete
//! lines (a partial last line waits for its newline) together with the position just after
//! them, so that the caller can store both in one transaction.
//!
//! A position names the file by (device, inode) and a byte offset. When the path names another
//! file than the stored one (replaced), or the file is shorter than the offset (truncated), the
//! tailer starts again from the beginning, and says so.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Where a file source stands; stored in the spool as JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    pub dev: u64,
    pub ino: u64,
    /// Bytes consumed (the start of the next line).
    pub offset: u64,
    /// Lines consumed.
    pub line: u64,
}

/// How a file's text is encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub enum Encoding {
    #[default]
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "utf-16le")]
    Utf16Le,
}

impl Encoding {
    /// Byte length of a newline.
    fn newline_len(self) -> usize {
        match self {
            Encoding::Utf8 => 1,
            Encoding::Utf16Le => 2,
        }
    }

    /// Index of the first newline in `buf` (for UTF-16LE, of an aligned `0A 00` code unit).
    fn find_newline(self, buf: &[u8]) -> Option<usize> {
        match self {
            Encoding::Utf8 => buf.iter().position(|b| *b == b'\n'),
            Encoding::Utf16Le => buf.chunks_exact(2).position(|u| u == [0x0A, 0x00]).map(|i| i * 2),
        }
    }

    fn bom(self) -> &'static [u8] {
        match self {
            Encoding::Utf8 => &[0xEF, 0xBB, 0xBF],
            Encoding::Utf16Le => &[0xFF, 0xFE],
        }
    }

    /// A line's bytes (without its newline) as UTF-8, or why not.
    fn decode(self, mut raw: &[u8]) -> Result<Vec<u8>, String> {
        match self {
            Encoding::Utf8 => {
                if raw.last() == Some(&b'\r') {
                    raw = &raw[..raw.len() - 1];
                }
                Ok(raw.to_vec())
            }
            Encoding::Utf16Le => {
                if raw.ends_with(&[0x0D, 0x00]) {
                    raw = &raw[..raw.len() - 2];
                }
                if !raw.len().is_multiple_of(2) {
                    return Err(format!("not UTF-16LE: {} bytes (an odd number)", raw.len()));
                }
                let units: Vec<u16> = raw.chunks_exact(2).map(|u| u16::from_le_bytes([u[0], u[1]])).collect();
                String::from_utf16(&units).map(String::into_bytes).map_err(|e| format!("not UTF-16LE: {e}"))
            }
        }
    }
}

/// What the tailer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailItem {
    /// A complete line (without its `\n` or `\r\n`), with its 1-based number and start offset.
    Line { bytes: Vec<u8>, line: u64, offset: u64 },
    /// A line longer than the limit, skipped whole.
    Oversized { line: u64, offset: u64, len: u64 },
    /// A line that is not valid text in the file's encoding.
    Undecodable { line: u64, offset: u64, reason: String },
}

/// Something the caller should report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TailNotice {
    /// The path now names a new file: reading it from its start.
    Replaced,
    /// The file shrank below the position: reading it again from its start.
    Truncated { offset: u64, len: u64 },
}

/// Reads complete lines of one file.
#[derive(Debug)]
pub struct FileTailer {
    path: PathBuf,
    max_record_bytes: usize,
    file: Option<File>,
    position: FilePosition,
    /// Bytes read after `position.offset` that do not yet end a line.
    pending: Vec<u8>,
    /// Skipping the rest of an oversized line that started at this (line, offset).
    skipping: Option<(u64, u64)>,
    notices: Vec<TailNotice>,
    /// Read buffer, allocated once (zeroing 256 KiB at every poll showed in profiles).
    chunk: Vec<u8>,
    encoding: Encoding,
}

const READ_CHUNK: usize = 256 * 1024;

impl FileTailer {
    pub fn new(path: PathBuf, position: FilePosition, max_record_bytes: usize) -> FileTailer {
        FileTailer {
            path,
            max_record_bytes,
            file: None,
            position,
            pending: Vec::new(),
            skipping: None,
            notices: Vec::new(),
            chunk: vec![0u8; READ_CHUNK],
            encoding: Encoding::Utf8,
        }
    }

    /// Reads the file as `encoding` (UTF-8 by default).
    pub fn with_encoding(mut self, encoding: Encoding) -> FileTailer {
        self.encoding = encoding;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The position after every item returned so far.
    pub fn position(&self) -> &FilePosition {
        &self.position
    }

    /// Notices gathered since the last call.
    pub fn take_notices(&mut self) -> Vec<TailNotice> {
        std::mem::take(&mut self.notices)
    }

    /// Returns up to `max_items` items that are complete in the file now; an empty vector when
    /// there is nothing new (or the file does not exist yet).
    pub fn poll(&mut self, max_items: usize) -> io::Result<Vec<TailItem>> {
        if !self.ensure_open()? {
            return Ok(Vec::new());
        }
        let mut items = Vec::new();
        loop {
            self.drain_lines(&mut items, max_items);
            if items.len() >= max_items {
                break;
            }
            let Some(file) = self.file.as_mut() else { break };
            let n = file.read(&mut self.chunk)?;
            if n == 0 {
                // At the end of this file: if the path names a new file now (rotation), switch
                // once this one is read to its end.
                if self.path_names_other_file() && self.pending.is_empty() {
                    self.file = None;
                    if self.ensure_open()? {
                        continue;
                    }
                }
                break;
            }
            self.pending.extend_from_slice(&self.chunk[..n]);
        }
        Ok(items)
    }

    /// Opens the file if needed and positions it; false if it does not exist.
    fn ensure_open(&mut self) -> io::Result<bool> {
        if let Some(file) = &self.file {
            let len = file.metadata()?.len();
            let read_to = self.position.offset + self.pending.len() as u64;
            if len < read_to {
                self.notices.push(TailNotice::Truncated { offset: read_to, len });
                self.restart_at_zero()?;
            }
            return Ok(true);
        }
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        let same_file = meta.dev() == self.position.dev && meta.ino() == self.position.ino;
        self.file = Some(file);
        self.pending.clear();
        self.skipping = None;
        if !same_file {
            if self.position.ino != 0 {
                self.notices.push(TailNotice::Replaced);
            }
            self.position = FilePosition { dev: meta.dev(), ino: meta.ino(), offset: 0, line: 0 };
        } else if meta.len() < self.position.offset {
            self.notices.push(TailNotice::Truncated { offset: self.position.offset, len: meta.len() });
            self.restart_at_zero()?;
        } else if let Some(f) = self.file.as_mut() {
            f.seek(SeekFrom::Start(self.position.offset))?;
        }
        Ok(true)
    }

    fn restart_at_zero(&mut self) -> io::Result<()> {
        self.pending.clear();
        self.skipping = None;
        self.position.offset = 0;
        self.position.line = 0;
        if let Some(f) = self.file.as_mut() {
            f.seek(SeekFrom::Start(0))?;
        }
        Ok(())
    }

    fn path_names_other_file(&self) -> bool {
        match std::fs::metadata(&self.path) {
            Ok(meta) => meta.dev() != self.position.dev || meta.ino() != self.position.ino,
            Err(_) => false,
        }
    }

    /// Moves complete lines from `pending` to `items`.
    fn drain_lines(&mut self, items: &mut Vec<TailItem>, max_items: usize) {
        // A byte-order mark at the very start of a file is not part of its first line.
        if self.position.offset == 0 && self.position.line == 0 {
            let bom = self.encoding.bom();
            if self.pending.len() < bom.len() && bom.starts_with(&self.pending) {
                return; // wait for enough bytes to tell
            }
            if self.pending.starts_with(bom) {
                self.pending.drain(..bom.len());
                self.position.offset = bom.len() as u64;
            }
        }
        let nl_len = self.encoding.newline_len();
        let mut start = 0;
        while items.len() < max_items {
            let Some(nl) = self.encoding.find_newline(&self.pending[start..]) else { break };
            let end = start + nl;
            let offset = self.position.offset;
            let consumed = (end + nl_len - start) as u64;
            self.position.offset += consumed;
            self.position.line += 1;
            if let Some((line, first_offset)) = self.skipping.take() {
                items.push(TailItem::Oversized {
                    line,
                    offset: first_offset,
                    len: self.position.offset - first_offset - nl_len as u64,
                });
            } else if end - start > self.max_record_bytes {
                items.push(TailItem::Oversized { line: self.position.line, offset, len: consumed - nl_len as u64 });
            } else {
                match self.encoding.decode(&self.pending[start..end]) {
                    Ok(bytes) => items.push(TailItem::Line { bytes, line: self.position.line, offset }),
                    Err(reason) => items.push(TailItem::Undecodable { line: self.position.line, offset, reason }),
                }
            }
            start = end + nl_len;
        }
        self.pending.drain(..start);
        // A line already longer than the limit, still without its end: drop what we have and
        // skip the rest when it comes, so memory stays bounded.
        if self.skipping.is_none() && self.pending.len() > self.max_record_bytes {
            self.skipping = Some((self.position.line + 1, self.position.offset));
        }
        if self.skipping.is_some() && self.encoding.find_newline(&self.pending).is_none() {
            // Keep whole code units so the newline search stays aligned.
            let keep = self.pending.len() % nl_len;
            let drop = self.pending.len() - keep;
            self.position.offset += drop as u64;
            self.pending.drain(..drop);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn lines(items: &[TailItem]) -> Vec<String> {
        items
            .iter()
            .map(|i| match i {
                TailItem::Line { bytes, .. } => String::from_utf8_lossy(bytes).into_owned(),
                TailItem::Oversized { line, .. } => format!("<oversized line {line}>"),
                TailItem::Undecodable { line, reason, .. } => format!("<line {line}: {reason}>"),
            })
            .collect()
    }

    fn append(path: &Path, text: &str) {
        std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn waits_for_complete_lines_and_resumes_from_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        let mut t = FileTailer::new(path.clone(), FilePosition::default(), 100);
        assert!(t.poll(10).unwrap().is_empty(), "missing file is not an error");
        append(&path, "one\r\ntwo\nthr");
        assert_eq!(lines(&t.poll(10).unwrap()), ["one", "two"]);
        assert_eq!(t.position().offset, 9);
        append(&path, "ee\n");
        assert_eq!(lines(&t.poll(10).unwrap()), ["three"]);
        let pos = t.position().clone();
        assert_eq!(pos.line, 3);

        append(&path, "four\n");
        let mut resumed = FileTailer::new(path.clone(), pos, 100);
        let items = resumed.poll(10).unwrap();
        assert_eq!(items, [TailItem::Line { bytes: b"four".to_vec(), line: 4, offset: 15 }]);
        assert!(resumed.take_notices().is_empty());
    }

    #[test]
    fn utf16le_lines_bom_and_bad_code_units() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        let utf16 = |s: &str| s.encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>();
        let mut bytes = vec![0xFF, 0xFE];
        bytes.extend(utf16("héllo\r\nwörld\n"));
        bytes.extend([0x00, 0xD8, 0x41, 0x00]); // a lone surrogate, then 'A'
        bytes.extend(utf16("\nlast"));
        std::fs::write(&path, &bytes).unwrap();
        let mut t = FileTailer::new(path.clone(), FilePosition::default(), 100).with_encoding(Encoding::Utf16Le);
        let items = t.poll(10).unwrap();
        assert_eq!(lines(&items[..2]), ["héllo", "wörld"]);
        assert!(
            matches!(&items[2], TailItem::Undecodable { line: 3, reason, .. } if reason.starts_with("not UTF-16LE"))
        );
        assert_eq!(items.len(), 3, "'last' waits for its newline");
        assert_eq!(t.position().offset, bytes.len() as u64 - 8);
        // Resuming from the stored position reads on in step with the code units.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&utf16("\n")).unwrap();
        let mut resumed = FileTailer::new(path, t.position().clone(), 100).with_encoding(Encoding::Utf16Le);
        assert_eq!(lines(&resumed.poll(10).unwrap()), ["last"]);
    }

    #[test]
    fn a_utf8_bom_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        std::fs::write(&path, b"\xEF\xBB\xBF{\"a\":1}\n").unwrap();
        let mut t = FileTailer::new(path, FilePosition::default(), 100);
        assert_eq!(lines(&t.poll(10).unwrap()), ["{\"a\":1}"]);
        assert_eq!(t.position().offset, 11);
    }

    #[test]
    fn max_items_limits_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "a\nb\nc\n");
        let mut t = FileTailer::new(path, FilePosition::default(), 100);
        assert_eq!(lines(&t.poll(2).unwrap()), ["a", "b"]);
        assert_eq!(lines(&t.poll(2).unwrap()), ["c"]);
    }

    #[test]
    fn oversized_lines_are_reported_and_skipped_with_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "ok\n");
        append(&path, &"x".repeat(300_000));
        let mut t = FileTailer::new(path.clone(), FilePosition::default(), 10);
        assert_eq!(lines(&t.poll(10).unwrap()), ["ok"]);
        assert!(t.pending.len() <= READ_CHUNK, "partial oversized line not buffered whole");
        append(&path, "yyy\nfine\n");
        let items = t.poll(10).unwrap();
        assert_eq!(items[0], TailItem::Oversized { line: 2, offset: 3, len: 300_003 });
        assert_eq!(lines(&items[1..]), ["fine"]);
    }

    #[test]
    fn truncation_and_replacement_restart_from_the_beginning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "first\nsecond\n");
        let mut t = FileTailer::new(path.clone(), FilePosition::default(), 100);
        assert_eq!(t.poll(10).unwrap().len(), 2);
        std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        append(&path, "new\n");
        assert_eq!(lines(&t.poll(10).unwrap()), ["new"]);
        assert_eq!(t.take_notices(), [TailNotice::Truncated { offset: 13, len: 4 }]);

        // Rotation by rename: the old file is read to its end, then the new one from its start.
        append(&path, "tail-of-old\n");
        std::fs::rename(&path, dir.path().join("f.log.1")).unwrap();
        append(&path, "in-new\n");
        assert_eq!(lines(&t.poll(10).unwrap()), ["tail-of-old", "in-new"]);
        assert_eq!(t.take_notices(), [TailNotice::Replaced]);
    }
}
