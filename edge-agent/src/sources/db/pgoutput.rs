//! A decoder of PostgreSQL's `pgoutput` logical replication messages (protocol version 1), as
//! `pg_logical_slot_peek_binary_changes` returns them: one message per row. Pure: bytes in,
//! messages out; every length is checked, so a malformed message is an error, never a panic.

use std::collections::HashMap;

use serde_json::{Map, Value};

/// A message that cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("pgoutput: {0}")]
pub struct DecodeError(String);

/// A table, as the stream describes it before its first change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    /// (name, type oid, part of the replica identity)
    pub columns: Vec<(String, u32, bool)>,
}

/// One column of a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value that did not change (not sent).
    Unchanged,
    Text(Vec<u8>),
}

/// One decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Begin {
        final_lsn: u64,
        xid: u32,
    },
    Commit {
        commit_lsn: u64,
        end_lsn: u64,
    },
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: Vec<Datum>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Origin, type and other messages this source does not use.
    Other(u8),
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError(format!("truncated: needs {n} more bytes, has {}", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self.buf.iter().position(|b| *b == 0).ok_or_else(|| DecodeError("unterminated string".into()))?;
        let s = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, DecodeError> {
        let n = self.u16()?;
        let mut out = Vec::with_capacity(usize::from(n).min(1600));
        for _ in 0..n {
            out.push(match self.u8()? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' | b'b' => {
                    let len = self.u32()? as usize;
                    Datum::Text(self.take(len)?.to_vec())
                }
                other => return Err(DecodeError(format!("unknown column kind {:?}", char::from(other)))),
            });
        }
        Ok(out)
    }
}

/// Decodes one message.
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader { buf: bytes };
    let tag = r.u8()?;
    let msg = match tag {
        b'B' => {
            let final_lsn = r.u64()?;
            let _commit_ts = r.u64()?;
            Message::Begin { final_lsn, xid: r.u32()? }
        }
        b'C' => {
            let _flags = r.u8()?;
            let commit_lsn = r.u64()?;
            let end_lsn = r.u64()?;
            let _ts = r.u64()?;
            Message::Commit { commit_lsn, end_lsn }
        }
        b'R' => {
            let oid = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let _replica_identity = r.u8()?;
            let n = r.u16()?;
            let mut columns = Vec::with_capacity(usize::from(n).min(1600));
            for _ in 0..n {
                let flags = r.u8()?;
                let col = r.string()?;
                let ty = r.u32()?;
                let _typmod = r.u32()?;
                columns.push((col, ty, flags & 1 == 1));
            }
            Message::Relation(Relation { oid, namespace, name, columns })
        }
        b'I' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'N' => Message::Insert { relation, new: r.tuple()? },
                other => return Err(DecodeError(format!("insert: expected 'N', found {:?}", char::from(other)))),
            }
        }
        b'U' => {
            let relation = r.u32()?;
            let mut kind = r.u8()?;
            if kind == b'K' || kind == b'O' {
                r.tuple()?; // the old key or row
                kind = r.u8()?;
            }
            match kind {
                b'N' => Message::Update { relation, new: r.tuple()? },
                other => return Err(DecodeError(format!("update: expected 'N', found {:?}", char::from(other)))),
            }
        }
        b'D' => {
            let relation = r.u32()?;
            match r.u8()? {
                b'K' | b'O' => Message::Delete { relation, old: r.tuple()? },
                other => {
                    return Err(DecodeError(format!("delete: expected 'K' or 'O', found {:?}", char::from(other))));
                }
            }
        }
        b'T' => {
            let n = r.u32()?;
            let _options = r.u8()?;
            let mut relations = Vec::new();
            for _ in 0..n {
                relations.push(r.u32()?);
            }
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    };
    Ok(msg)
}

/// A row as a JSON object: numbers, booleans and JSON columns typed, the rest as text; an
/// unchanged TOASTed column is left out.
pub fn row_json(relation: &Relation, datums: &[Datum]) -> Result<Map<String, Value>, DecodeError> {
    if datums.len() != relation.columns.len() {
        return Err(DecodeError(format!(
            "{}.{}: {} columns in the row, {} in the relation",
            relation.namespace,
            relation.name,
            datums.len(),
            relation.columns.len()
        )));
    }
    let mut out = Map::new();
    for ((name, ty, _), datum) in relation.columns.iter().zip(datums) {
        let value = match datum {
            Datum::Unchanged => continue,
            Datum::Null => Value::Null,
            Datum::Text(bytes) => typed(*ty, &String::from_utf8_lossy(bytes)),
        };
        out.insert(name.clone(), value);
    }
    Ok(out)
}

/// The replica-identity columns of a deleted row, for the report.
pub fn key_json(relation: &Relation, datums: &[Datum]) -> Value {
    let mut out = Map::new();
    for ((name, ty, key), datum) in relation.columns.iter().zip(datums) {
        if let (true, Datum::Text(bytes)) = (key, datum) {
            out.insert(name.clone(), typed(*ty, &String::from_utf8_lossy(bytes)));
        }
    }
    Value::Object(out)
}

fn typed(ty: u32, text: &str) -> Value {
    const BOOL: u32 = 16;
    const INTS: [u32; 4] = [20, 21, 23, 26];
    const FLOATS: [u32; 3] = [700, 701, 1700];
    const JSONS: [u32; 2] = [114, 3802];
    const TIMESTAMP: u32 = 1114;
    const TIMESTAMPTZ: u32 = 1184;
    match ty {
        // Timestamps in RFC 3339, as the mapping expects (a zone-less one is taken as UTC).
        TIMESTAMPTZ => chrono::DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map_or_else(|_| Value::String(text.to_owned()), |t| Value::String(t.to_rfc3339())),
        TIMESTAMP => chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f")
            .map_or_else(|_| Value::String(text.to_owned()), |t| Value::String(t.and_utc().to_rfc3339())),
        BOOL => Value::Bool(text == "t"),
        t if INTS.contains(&t) => text.parse::<i64>().map_or_else(|_| Value::String(text.to_owned()), Value::from),
        // numeric keeps its digits as text when f64 would round them (money stays exact).
        t if FLOATS.contains(&t) => match text.parse::<f64>() {
            Ok(f) if f.is_finite() && (t != 1700 || f.to_string() == text) => Value::from(f),
            _ => Value::String(text.to_owned()),
        },
        t if JSONS.contains(&t) => serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_owned())),
        _ => Value::String(text.to_owned()),
    }
}

/// Relations seen in a stream, by oid.
pub type Relations = HashMap<u32, Relation>;

/// `16/B374D848` -> its 64-bit value.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.split_once('/')?;
    Some((u64::from_str_radix(hi, 16).ok()? << 32) | u64::from_str_radix(lo, 16).ok()?)
}

/// A 64-bit LSN in PostgreSQL's text form.
pub fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tag in proptest::sample::select(b"BCRIUDTYO".to_vec()), body in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = vec![tag];
            bytes.extend(body);
            if let Ok(Message::Insert { new, .. }) = decode(&bytes) {
                let rel = Relation { oid: 1, namespace: "p".into(), name: "t".into(), columns: vec![("a".into(), 1700, false); new.len()] };
                let _ = row_json(&rel, &new);
            }
        }
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    #[test]
    fn decodes_a_relation_and_its_rows() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(string("public"));
        rel.extend(string("orders"));
        rel.push(b'd');
        rel.extend(3u16.to_be_bytes());
        for (flags, name, ty) in [(1u8, "id", 20u32), (0, "total", 1700), (0, "paid", 16)] {
            rel.push(flags);
            rel.extend(string(name));
            rel.extend(ty.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation(relation) = decode(&rel).unwrap() else { panic!() };
        assert_eq!(relation.name, "orders");

        let mut ins = vec![b'I'];
        ins.extend(16384u32.to_be_bytes());
        ins.push(b'N');
        ins.extend(3u16.to_be_bytes());
        for v in ["42", "19.99"] {
            ins.push(b't');
            ins.extend((v.len() as u32).to_be_bytes());
            ins.extend(v.as_bytes());
        }
        ins.push(b'n');
        let Message::Insert { relation: 16384, new } = decode(&ins).unwrap() else { panic!() };
        let row = row_json(&relation, &new).unwrap();
        assert_eq!(Value::Object(row), serde_json::json!({"id": 42, "total": 19.99, "paid": null}));
        assert_eq!(typed(1700, "12345678901234567.01"), Value::String("12345678901234567.01".into()));
        assert_eq!(typed(1184, "2026-11-27 10:00:00.5+00"), Value::String("2026-11-27T10:00:00.500+00:00".into()));
        assert_eq!(typed(1184, "2026-11-27 10:00:00+05:30"), Value::String("2026-11-27T10:00:00+05:30".into()));
        assert_eq!(typed(1114, "2026-11-27 10:00:00"), Value::String("2026-11-27T10:00:00+00:00".into()));

        // Every truncation of a valid message is an error, never a panic.
        for n in 0..ins.len() {
            assert!(decode(&ins[..n]).is_err(), "prefix of {n} bytes");
        }
        for n in 0..rel.len() {
            assert!(decode(&rel[..n]).is_err(), "prefix of {n} bytes");
        }
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
    }
}
