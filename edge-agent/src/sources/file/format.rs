//! Record formats of a file: each turns one line into a JSON object (text) for the mapping.
//!
//! * `json_lines`: the line is the object.
//! * `csv`: the first line of a file is its header; each later line is a record whose fields are
//!   named by it (configurable delimiter and quote).
//! * `regex`: named captures become fields; presets cover the common and combined web access
//!   log formats.

use regex::Regex;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Record formats of a file.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    /// One JSON object per line.
    #[default]
    JsonLines,
    /// Comma- (or otherwise) separated values with a header line.
    Csv,
    /// A regular expression with named captures.
    Regex,
}

/// `[sources.csv]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CsvConfig {
    /// One ASCII character.
    pub delimiter: char,
    /// One ASCII character.
    pub quote: char,
}

impl Default for CsvConfig {
    fn default() -> CsvConfig {
        CsvConfig { delimiter: ',', quote: '"' }
    }
}

/// `[sources.regex]`: a pattern, or a preset.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexConfig {
    /// A regular expression whose named captures become fields.
    #[serde(default)]
    pub pattern: Option<String>,
    /// `common` or `combined` (Apache/nginx access logs). Fields: `remote`, `ident`, `user`,
    /// `time` (format `%d/%b/%Y:%H:%M:%S %z`), `method`, `path`, `protocol`, `status`, `bytes`,
    /// and for `combined` also `referrer` and `user_agent`.
    #[serde(default)]
    pub preset: Option<String>,
}

const COMMON: &str = r#"^(?P<remote>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] "(?P<method>[A-Z]+) (?P<path>\S+)(?: (?P<protocol>[^"]*))?" (?P<status>\d{3}) (?P<bytes>\d+|-)"#;
const COMBINED_TAIL: &str = r#" "(?P<referrer>[^"]*)" "(?P<user_agent>[^"]*)""#;

/// Turns lines into JSON objects.
#[derive(Debug)]
pub enum RecordParser {
    JsonLines,
    Csv { delimiter: u8, quote: u8, header: Option<Vec<String>> },
    Regex(Regex),
}

impl RecordParser {
    /// Builds the parser; the error names the offending setting.
    pub fn new(
        format: FileFormat,
        csv: Option<&CsvConfig>,
        regex: Option<&RegexConfig>,
    ) -> Result<RecordParser, (String, String)> {
        match format {
            FileFormat::JsonLines => Ok(RecordParser::JsonLines),
            FileFormat::Csv => {
                let c = csv.cloned().unwrap_or_default();
                let byte = |field: &str, ch: char| {
                    u8::try_from(ch)
                        .ok()
                        .filter(u8::is_ascii)
                        .ok_or_else(|| (format!("csv.{field}"), format!("{ch:?} is not one ASCII character")))
                };
                Ok(RecordParser::Csv {
                    delimiter: byte("delimiter", c.delimiter)?,
                    quote: byte("quote", c.quote)?,
                    header: None,
                })
            }
            FileFormat::Regex => {
                let r = regex.ok_or_else(|| {
                    (
                        "regex".to_owned(),
                        "format = \"regex\" needs [sources.regex] with a pattern or a preset".to_owned(),
                    )
                })?;
                let pattern = match (&r.pattern, r.preset.as_deref()) {
                    (Some(p), None) => p.clone(),
                    (None, Some("common")) => format!("{COMMON}$"),
                    (None, Some("combined")) => format!("{COMMON}{COMBINED_TAIL}"),
                    (None, Some(other)) => {
                        return Err((
                            "regex.preset".into(),
                            format!("unknown preset {other:?} (known: common, combined)"),
                        ));
                    }
                    (Some(_), Some(_)) => return Err(("regex".into(), "set pattern or preset, not both".into())),
                    (None, None) => return Err(("regex".into(), "set pattern or preset".into())),
                };
                let regex = Regex::new(&pattern).map_err(|e| ("regex.pattern".to_owned(), e.to_string()))?;
                if regex.capture_names().flatten().next().is_none() {
                    return Err((
                        "regex.pattern".into(),
                        "the pattern has no named capture: no field would be read".into(),
                    ));
                }
                Ok(RecordParser::Regex(regex))
            }
        }
    }

    /// Whether the parser needs the file's first line (a CSV header) before it can read others.
    pub fn needs_header(&self) -> bool {
        matches!(self, RecordParser::Csv { header: None, .. })
    }

    /// Forgets the header (a new file is being read).
    pub fn reset(&mut self) {
        if let RecordParser::Csv { header, .. } = self {
            *header = None;
        }
    }

    /// Reads a header line.
    pub fn set_header(&mut self, line: &str) -> Result<(), String> {
        if let RecordParser::Csv { delimiter, quote, header } = self {
            let fields = split_csv(line, *delimiter, *quote)?;
            if fields.iter().any(String::is_empty) {
                return Err(format!("CSV header {line:?} has an empty column name"));
            }
            *header = Some(fields);
        }
        Ok(())
    }

    /// One line as a JSON object (text), or why not.
    pub fn parse(&self, line: &str) -> Result<std::borrow::Cow<'_, str>, String> {
        match self {
            RecordParser::JsonLines => Ok(std::borrow::Cow::Owned(line.to_owned())),
            RecordParser::Csv { delimiter, quote, header } => {
                let header = header.as_ref().ok_or("CSV record before the header")?;
                let fields = split_csv(line, *delimiter, *quote)?;
                if fields.len() != header.len() {
                    return Err(format!("CSV record has {} fields; the header has {}", fields.len(), header.len()));
                }
                let object: Map<String, Value> =
                    header.iter().cloned().zip(fields.into_iter().map(Value::String)).collect();
                Ok(std::borrow::Cow::Owned(Value::Object(object).to_string()))
            }
            RecordParser::Regex(regex) => {
                let caps = regex.captures(line).ok_or("line does not match the pattern")?;
                let mut object = Map::new();
                for name in regex.capture_names().flatten() {
                    if let Some(m) = caps.name(name) {
                        object.insert(name.to_owned(), Value::String(m.as_str().to_owned()));
                    }
                }
                Ok(std::borrow::Cow::Owned(Value::Object(object).to_string()))
            }
        }
    }
}

/// One CSV line into fields, with RFC 4180 quoting.
fn split_csv(line: &str, delimiter: u8, quote: u8) -> Result<Vec<String>, String> {
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .delimiter(delimiter)
        .quote(quote)
        .flexible(true)
        .from_reader(line.as_bytes());
    let mut record = csv::StringRecord::new();
    match reader.read_record(&mut record) {
        Ok(true) => Ok(record.iter().map(str::to_owned).collect()),
        Ok(false) => Ok(Vec::new()),
        Err(e) => Err(format!("not CSV: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_with_header_quotes_and_other_delimiters() {
        let mut p = RecordParser::new(FileFormat::Csv, Some(&CsvConfig { delimiter: ';', quote: '"' }), None).unwrap();
        assert!(p.needs_header());
        assert!(p.parse("1;2").is_err(), "no record before the header");
        p.set_header("id;name;total").unwrap();
        let json: Value = serde_json::from_str(&p.parse(r#"7;"Smith; John";"12.50""#).unwrap()).unwrap();
        assert_eq!(json, serde_json::json!({"id": "7", "name": "Smith; John", "total": "12.50"}));
        let err = p.parse("1;2").unwrap_err();
        assert_eq!(err, "CSV record has 2 fields; the header has 3");
        p.reset();
        assert!(p.needs_header());
        assert!(RecordParser::new(FileFormat::Csv, Some(&CsvConfig { delimiter: '€', quote: '"' }), None).is_err());
    }

    #[test]
    fn combined_access_log_preset() {
        let cfg = RegexConfig { pattern: None, preset: Some("combined".into()) };
        let p = RecordParser::new(FileFormat::Regex, None, Some(&cfg)).unwrap();
        let line = r#"203.0.113.9 - - [27/Nov/2026:10:00:00 +0100] "GET /p/SKU-1?x=1 HTTP/1.1" 200 5120 "https://www.google.com/" "Mozilla/5.0 (X11)""#;
        let json: Value = serde_json::from_str(&p.parse(line).unwrap()).unwrap();
        assert_eq!(json["remote"], "203.0.113.9");
        assert_eq!(json["time"], "27/Nov/2026:10:00:00 +0100");
        assert_eq!(json["path"], "/p/SKU-1?x=1");
        assert_eq!(json["status"], "200");
        assert_eq!(json["referrer"], "https://www.google.com/");
        assert_eq!(json["user_agent"], "Mozilla/5.0 (X11)");
        assert_eq!(p.parse("garbage").unwrap_err(), "line does not match the pattern");

        let common = RecordParser::new(
            FileFormat::Regex,
            None,
            Some(&RegexConfig { pattern: None, preset: Some("common".into()) }),
        )
        .unwrap();
        let json: Value = serde_json::from_str(
            &common.parse(r#"10.0.0.1 - bob [27/Nov/2026:10:00:00 +0000] "POST /cart HTTP/1.1" 302 -"#).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (json["user"].as_str(), json["method"].as_str(), json["bytes"].as_str()),
            (Some("bob"), Some("POST"), Some("-"))
        );
    }

    #[test]
    fn regex_configuration_errors_name_the_setting() {
        let bad = |cfg: RegexConfig| RecordParser::new(FileFormat::Regex, None, Some(&cfg)).unwrap_err();
        assert_eq!(bad(RegexConfig { pattern: None, preset: Some("iis".into()) }).0, "regex.preset");
        assert_eq!(bad(RegexConfig { pattern: Some("(".into()), preset: None }).0, "regex.pattern");
        assert_eq!(bad(RegexConfig { pattern: Some("a+".into()), preset: None }).0, "regex.pattern");
        assert_eq!(RecordParser::new(FileFormat::Regex, None, None).unwrap_err().0, "regex");
    }
}

/// `[sources.multiline]`: records that span lines (stack traces, pretty-printed JSON).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultilineConfig {
    /// A regular expression matching the first line of a record; other lines continue it.
    pub start: String,
    /// A record with no continuation for this long is complete, in milliseconds.
    #[serde(default = "default_flush_ms")]
    pub flush_ms: u64,
}

fn default_flush_ms() -> u64 {
    1_000
}

/// Joins continuation lines to the line that starts their record.
///
/// A record is complete when the next start line arrives (or on [`Assembler::flush`]). Until
/// then its start is where the source's stored position must stay, so that a restart reads the
/// whole record again: [`Assembler::pending_start`].
#[derive(Debug)]
pub struct Assembler {
    start: Regex,
    max_bytes: usize,
    pending: Option<Pending>,
}

#[derive(Debug)]
struct Pending {
    bytes: Vec<u8>,
    line: u64,
    offset: u64,
    len: u64,
}

impl Assembler {
    pub fn new(config: &MultilineConfig, max_bytes: usize) -> Result<Assembler, (String, String)> {
        let start = Regex::new(&config.start).map_err(|e| ("multiline.start".to_owned(), e.to_string()))?;
        Ok(Assembler { start, max_bytes, pending: None })
    }

    /// Takes one line; complete records go to `out`.
    pub fn push(&mut self, item: super::tailer::TailItem, out: &mut Vec<super::tailer::TailItem>) {
        use super::tailer::TailItem;
        match item {
            TailItem::Oversized { .. } | TailItem::Undecodable { .. } => {
                self.flush(out);
                out.push(item);
            }
            TailItem::Line { bytes, line, offset } => {
                let starts = self.start.is_match(&String::from_utf8_lossy(&bytes));
                match &mut self.pending {
                    Some(p) if !starts => {
                        p.len += 1 + bytes.len() as u64;
                        if p.len as usize <= self.max_bytes {
                            p.bytes.push(b'\n');
                            p.bytes.extend_from_slice(&bytes);
                        } else {
                            p.bytes = Vec::new(); // over the limit: only its size is kept
                        }
                    }
                    _ => {
                        self.flush(out);
                        self.pending = Some(Pending { len: bytes.len() as u64, bytes, line, offset });
                    }
                }
            }
        }
    }

    /// Completes the pending record, if any.
    pub fn flush(&mut self, out: &mut Vec<super::tailer::TailItem>) {
        use super::tailer::TailItem;
        if let Some(p) = self.pending.take() {
            if p.len as usize > self.max_bytes {
                out.push(TailItem::Oversized { line: p.line, offset: p.offset, len: p.len });
            } else {
                out.push(TailItem::Line { bytes: p.bytes, line: p.line, offset: p.offset });
            }
        }
    }

    /// (line, offset) where the incomplete record starts.
    pub fn pending_start(&self) -> Option<(u64, u64)> {
        self.pending.as_ref().map(|p| (p.line, p.offset))
    }
}

#[cfg(test)]
mod multiline_tests {
    use super::super::tailer::TailItem;
    use super::*;

    fn line(text: &str, line: u64, offset: u64) -> TailItem {
        TailItem::Line { bytes: text.as_bytes().to_vec(), line, offset }
    }

    #[test]
    fn continuation_lines_join_their_record_and_the_start_is_remembered() {
        let cfg = MultilineConfig { start: r"^\{".into(), flush_ms: 10 };
        let mut a = Assembler::new(&cfg, 30).unwrap();
        let mut out = Vec::new();
        a.push(line("{\"a\":", 1, 0), &mut out);
        a.push(line("  1}", 2, 6), &mut out);
        assert!(out.is_empty());
        assert_eq!(a.pending_start(), Some((1, 0)));
        a.push(line("{\"b\":2}", 3, 11), &mut out);
        assert_eq!(out, [line("{\"a\":\n  1}", 1, 0)]);
        assert_eq!(a.pending_start(), Some((3, 11)));
        // A record over the size limit is reported whole, with its size.
        a.push(line(&"x".repeat(40), 4, 19), &mut out);
        a.flush(&mut out);
        assert_eq!(out[1], TailItem::Oversized { line: 3, offset: 11, len: 48 });
        assert_eq!(a.pending_start(), None);
        assert!(Assembler::new(&MultilineConfig { start: "(".into(), flush_ms: 1 }, 10).is_err());
    }
}
