//! Reading complete lines of one open file, from a stored position.
//!
//! The tailer does blocking I/O and nothing else: no mapping, no spool, no idea of which file
//! it reads. It holds the file open (a renamed or deleted file is still read through its open
//! handle), hands out complete lines (a partial last line waits for its newline) with the
//! position just after them, so that the caller can store both in one transaction.
//!
//! Gzip files are read through a decoder; their positions count decompressed bytes. Which file
//! is which, rotation and truncation are the [`super::fileset`]'s business.

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde::{Deserialize, Serialize};

/// How far a file has been read: the start of the next line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Bytes consumed (decompressed bytes for a gzip file).
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
            // SIMD, not byte by byte: a line's end is looked for over every byte the agent reads.
            Encoding::Utf8 => memchr::memchr(b'\n', buf),
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

/// Reads complete lines of one open file.
#[derive(Debug)]
pub struct FileTailer {
    path: PathBuf,
    max_record_bytes: usize,
    reader: Reader,
    position: Progress,
    /// Bytes read after `position.offset` that do not yet end a line.
    pending: Vec<u8>,
    /// Skipping the rest of an oversized line that started at this (line, offset).
    skipping: Option<(u64, u64)>,
    /// Read buffer, allocated once (zeroing 256 KiB at every poll showed in profiles).
    chunk: Vec<u8>,
    encoding: Encoding,
    /// The last read found no more bytes.
    at_end: bool,
}

enum Reader {
    Plain(File),
    /// A gzip file; `None` once its stream ended.
    Gzip(Option<Box<MultiGzDecoder<BufReader<File>>>>),
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Reader::Plain(_) => "Plain",
            Reader::Gzip(_) => "Gzip",
        })
    }
}

const READ_CHUNK: usize = 256 * 1024;

/// The two bytes every gzip member starts with.
pub const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

impl FileTailer {
    /// A tailer of the open `file` (found at `path`), positioned at `position`. A gzip file is
    /// decompressed, and its first `position.offset` decompressed bytes skipped.
    pub fn open(
        path: PathBuf,
        mut file: File,
        gzip: bool,
        position: Progress,
        max_record_bytes: usize,
        encoding: Encoding,
    ) -> io::Result<FileTailer> {
        let reader = if gzip {
            file.seek(SeekFrom::Start(0))?;
            let mut decoder = Box::new(MultiGzDecoder::new(BufReader::new(file)));
            let skipped = io::copy(&mut (&mut decoder).take(position.offset), &mut io::sink())?;
            if skipped < position.offset {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("decompresses to {skipped} bytes, fewer than the stored position {}", position.offset),
                ));
            }
            Reader::Gzip(Some(decoder))
        } else {
            file.seek(SeekFrom::Start(position.offset))?;
            Reader::Plain(file)
        };
        Ok(FileTailer {
            path,
            max_record_bytes,
            reader,
            position,
            pending: Vec::new(),
            skipping: None,
            chunk: vec![0u8; READ_CHUNK],
            encoding,
            at_end: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the file is found now (it was renamed).
    pub fn set_path(&mut self, path: PathBuf) {
        self.path = path;
    }

    /// The position after every item returned so far.
    pub fn position(&self) -> Progress {
        self.position
    }

    pub fn is_gzip(&self) -> bool {
        matches!(self.reader, Reader::Gzip(_))
    }

    /// The last poll read everything there was (for gzip: the stream ended).
    pub fn at_end(&self) -> bool {
        self.at_end
    }

    /// A gzip file read to the end of its stream.
    pub fn gzip_finished(&self) -> bool {
        matches!(self.reader, Reader::Gzip(None))
    }

    /// Bytes read from the file so far, complete lines or not.
    pub fn read_to(&self) -> u64 {
        self.position.offset + self.pending.len() as u64
    }

    /// Up to `n` bytes from the start of the open file (plain files only), with its length.
    pub fn read_head(&self, n: usize) -> io::Result<Option<(Vec<u8>, u64)>> {
        let Reader::Plain(file) = &self.reader else { return Ok(None) };
        let len = file.metadata()?.len();
        let mut buf = vec![0u8; n.min(len as usize)];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], filled as u64)? {
                0 => break,
                k => filled += k,
            }
        }
        buf.truncate(filled);
        Ok(Some((buf, len)))
    }

    /// Returns up to `max_items` items that are complete in the file now; an empty vector when
    /// there is nothing new.
    pub fn poll(&mut self, max_items: usize) -> io::Result<Vec<TailItem>> {
        let mut items = Vec::new();
        self.at_end = false;
        loop {
            self.drain_lines(&mut items, max_items);
            if items.len() >= max_items {
                break;
            }
            if self.chunk.is_empty() {
                // Given back in a quiet spell (`FileTailer::release_buffers`); calloc'd again,
                // so only the pages reads fill count.
                self.chunk = vec![0u8; READ_CHUNK];
            }
            let n = match &mut self.reader {
                Reader::Plain(file) => file.read(&mut self.chunk)?,
                Reader::Gzip(Some(decoder)) => decoder.read(&mut self.chunk)?,
                Reader::Gzip(None) => 0,
            };
            if n == 0 {
                if let Reader::Gzip(decoder) = &mut self.reader {
                    *decoder = None;
                }
                self.at_end = true;
                break;
            }
            self.pending.extend_from_slice(&self.chunk[..n]);
        }
        Ok(items)
    }

    /// Gives back the read buffer and a partial line's spare room, for a quiet spell; the next
    /// poll allocates the buffer again.
    pub fn release_buffers(&mut self) {
        self.chunk = Vec::new();
        self.pending.shrink_to_fit();
    }

    /// The file is done (rotated away and read to its end, or a finished gzip file): its last
    /// line, if it has no newline, is a record too.
    pub fn finish(&mut self, items: &mut Vec<TailItem>) {
        if self.pending.is_empty() && self.skipping.is_none() {
            return;
        }
        let newline: &[u8] = match self.encoding {
            Encoding::Utf8 => b"\n",
            Encoding::Utf16Le => &[0x0A, 0x00],
        };
        self.pending.extend_from_slice(newline);
        self.drain_lines(items, usize::MAX);
        // The newline was not in the file: it is not consumed.
        self.position.offset -= newline.len() as u64;
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

    fn open(path: &Path, at: Progress, max: usize, encoding: Encoding) -> FileTailer {
        FileTailer::open(path.to_owned(), File::open(path).unwrap(), false, at, max, encoding).unwrap()
    }

    #[test]
    fn waits_for_complete_lines_and_resumes_from_position() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "");
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf8);
        assert!(t.poll(10).unwrap().is_empty());
        assert!(t.at_end());
        append(&path, "one\r\ntwo\nthr");
        assert_eq!(lines(&t.poll(10).unwrap()), ["one", "two"]);
        assert_eq!(t.position().offset, 9);
        // A quiet spell gives the buffers back: the partial line is kept, and the next poll
        // reads on.
        t.release_buffers();
        assert!(t.chunk.is_empty());
        append(&path, "ee\n");
        assert_eq!(lines(&t.poll(10).unwrap()), ["three"]);
        let pos = t.position();
        assert_eq!(pos.line, 3);

        append(&path, "four\n");
        let mut resumed = open(&path, pos, 100, Encoding::Utf8);
        let items = resumed.poll(10).unwrap();
        assert_eq!(items, [TailItem::Line { bytes: b"four".to_vec(), line: 4, offset: 15 }]);
    }

    #[test]
    fn a_finished_file_gives_its_last_line_without_a_newline() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "a\nlast");
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf8);
        assert_eq!(lines(&t.poll(10).unwrap()), ["a"]);
        let mut items = Vec::new();
        t.finish(&mut items);
        assert_eq!(items, [TailItem::Line { bytes: b"last".to_vec(), line: 2, offset: 2 }]);
        assert_eq!(t.position(), Progress { offset: 6, line: 2 });
    }

    #[test]
    fn gzip_files_are_read_decompressed_from_a_decompressed_offset() {
        use flate2::{Compression, write::GzEncoder};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log.gz");
        let mut enc = GzEncoder::new(File::create(&path).unwrap(), Compression::default());
        enc.write_all(b"one\ntwo\nthree\n").unwrap();
        enc.finish().unwrap();
        let gz = |at| FileTailer::open(path.clone(), File::open(&path).unwrap(), true, at, 100, Encoding::Utf8);
        let mut t = gz(Progress::default()).unwrap();
        assert_eq!(lines(&t.poll(10).unwrap()), ["one", "two", "three"]);
        assert!(t.gzip_finished() && t.at_end());
        let mut resumed = gz(Progress { offset: 4, line: 1 }).unwrap();
        assert_eq!(lines(&resumed.poll(10).unwrap()), ["two", "three"]);
        // A position beyond the decompressed end is an error, not a silent skip.
        assert_eq!(gz(Progress { offset: 99, line: 9 }).unwrap_err().kind(), io::ErrorKind::UnexpectedEof);
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
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf16Le);
        let items = t.poll(10).unwrap();
        assert_eq!(lines(&items[..2]), ["héllo", "wörld"]);
        assert!(
            matches!(&items[2], TailItem::Undecodable { line: 3, reason, .. } if reason.starts_with("not UTF-16LE"))
        );
        assert_eq!(items.len(), 3, "'last' waits for its newline");
        assert_eq!(t.position().offset, bytes.len() as u64 - 8);
        // Resuming from the stored position reads on in step with the code units.
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(&utf16("\n")).unwrap();
        let mut resumed = open(&path, t.position(), 100, Encoding::Utf16Le);
        assert_eq!(lines(&resumed.poll(10).unwrap()), ["last"]);
    }

    #[test]
    fn a_utf8_bom_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        std::fs::write(&path, b"\xEF\xBB\xBF{\"a\":1}\n").unwrap();
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf8);
        assert_eq!(lines(&t.poll(10).unwrap()), ["{\"a\":1}"]);
        assert_eq!(t.position().offset, 11);
    }

    #[test]
    fn max_items_limits_a_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "a\nb\nc\n");
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf8);
        assert_eq!(lines(&t.poll(2).unwrap()), ["a", "b"]);
        assert_eq!(lines(&t.poll(2).unwrap()), ["c"]);
    }

    #[test]
    fn oversized_lines_are_reported_and_skipped_with_bounded_memory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "ok\n");
        append(&path, &"x".repeat(300_000));
        let mut t = open(&path, Progress::default(), 10, Encoding::Utf8);
        assert_eq!(lines(&t.poll(10).unwrap()), ["ok"]);
        assert!(t.pending.len() <= READ_CHUNK, "partial oversized line not buffered whole");
        append(&path, "yyy\nfine\n");
        let items = t.poll(10).unwrap();
        assert_eq!(items[0], TailItem::Oversized { line: 2, offset: 3, len: 300_003 });
        assert_eq!(lines(&items[1..]), ["fine"]);
    }

    #[test]
    fn truncation_is_detected_through_the_open_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.log");
        append(&path, "first\nsecond\n");
        let mut t = open(&path, Progress::default(), 100, Encoding::Utf8);
        assert_eq!(t.poll(10).unwrap().len(), 2);
        assert_eq!(t.read_head(100).unwrap().unwrap().1, t.read_to());
        std::fs::OpenOptions::new().write(true).truncate(true).open(&path).unwrap();
        append(&path, "new\n");
        assert_eq!(t.read_head(100).unwrap(), Some((b"new\n".to_vec(), 4)));
        assert!(t.read_to() > 4);
    }
}
