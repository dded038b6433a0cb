//! The dead-letter file of a source: every refused record, as one JSON line with its reason, its
//! location (file, line and offset; or table and position) and the record itself (truncated).
//! Written before the spool commit, so a crash may write an entry twice but never loses one.

use std::io::Write as _;
use std::path::Path;

/// Largest dead-letter file before it is rotated to `.1`.
const MAX_BYTES: u64 = 64 * 1024 * 1024;
/// Longest raw record kept in an entry.
const MAX_RECORD: usize = 64 * 1024;

/// One entry: `location` is a JSON object merged into it.
pub(crate) fn entry(source: &str, location: serde_json::Value, reason: &str, record: &[u8]) -> String {
    let text = String::from_utf8_lossy(&record[..record.len().min(MAX_RECORD)]);
    let mut value = serde_json::json!({
        "at": chrono::Utc::now().to_rfc3339(),
        "source": source,
        "reason": reason,
        "record": text,
        "truncated": record.len() > MAX_RECORD,
    });
    if let (Some(v), serde_json::Value::Object(loc)) = (value.as_object_mut(), location) {
        v.extend(loc);
    }
    value.to_string()
}

/// Appends entries, rotating the file to `.1` past its size limit.
pub(crate) fn append(file: &Path, entries: &[String]) -> std::io::Result<()> {
    if let Some(dir) = file.parent() {
        crate::private::dir(dir)?;
    }
    if std::fs::metadata(file).map(|m| m.len() > MAX_BYTES).unwrap_or(false) {
        std::fs::rename(file, file.with_extension("jsonl.1"))?;
    }
    crate::private::file(file)?;
    let mut out = std::io::BufWriter::new(std::fs::OpenOptions::new().append(true).open(file)?);
    for entry in entries {
        out.write_all(entry.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()
}
