//! Mapping a source record (a JSON object) to a typed domain event.
//!
//! A mapping names the domain, where the event time is and how it is written, and for each
//! field of the domain's payload where its value comes from: a source field (`fields`, dotted
//! paths reach into nested objects), a constant (`constants`), or a fallback when the source
//! field is absent or null (`defaults`). Ids given as numbers become strings and counts given as
//! strings become integers; anything else that does not fit the payload's type is an error that
//! names the field.

use std::collections::BTreeMap;

use actidash_shared::event::{Domain, Payload};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;

use serde_json::Value;
use serde_json::value::RawValue;

/// How a source's records become events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// The domain of the events this source produces.
    pub domain: Domain,
    /// Where the event time is.
    pub event_time: EventTimeConfig,
    /// Payload field = source field (dotted path).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Payload field = constant value.
    #[serde(default)]
    pub constants: BTreeMap<String, toml::Value>,
    /// Payload field = value used when the mapped source field is missing or null.
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
}

/// Where and how the event time is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Source field (dotted path).
    pub field: String,
    /// `rfc3339`, `unix_seconds`, `unix_millis`, or a strftime pattern such as
    /// `%d/%b/%Y:%H:%M:%S %z` (a pattern without a zone is read as UTC).
    #[serde(default = "default_time_format")]
    pub format: String,
}

fn default_time_format() -> String {
    "rfc3339".into()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    /// Money, enums, arrays: passed through to the payload's own parser.
    AsIs,
}

/// The payload fields of a domain: (name, kind, required).
fn schema(domain: Domain) -> &'static [(&'static str, Kind, bool)] {
    use Kind::*;
    match domain {
        Domain::Sales => &[
            ("order_id", Str, true),
            ("customer_id", Str, true),
            ("channel", Str, true),
            ("site", Str, true),
            ("country", Str, true),
            ("currency", Str, true),
            ("amount", AsIs, true),
            ("items", AsIs, false),
            ("status", AsIs, true),
        ],
        Domain::Marketing => &[
            ("user_id", Str, true),
            ("channel", Str, true),
            ("campaign", Str, true),
            ("cost", AsIs, false),
            ("currency", Str, false),
        ],
        Domain::Behavior => {
            &[("visitor_id", Str, true), ("type", AsIs, true), ("url", Str, false), ("referrer", Str, false)]
        }
        Domain::Inventory => &[("sku", Str, true), ("warehouse", Str, true), ("on_hand", Int, true)],
    }
}

/// A record that does not map to an event.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MappingError {
    #[error("not JSON: {0}")]
    NotJson(String),
    #[error("record is not a JSON object")]
    NotAnObject,
    #[error("event time field `{field}` is missing")]
    MissingTime { field: String },
    #[error("event time field `{field}` = {value}: not a {format} time")]
    BadTime { field: String, value: String, format: String },
    #[error("field `{target}` (from `{source_field}`) = {value}: expected {expected}")]
    BadValue { target: String, source_field: String, value: String, expected: &'static str },
    #[error("{domain} event does not fit its schema: {message}")]
    Schema { domain: Domain, message: String },
    #[error(
        "field `{target}` (from `{source_field}`) is empty: every {domain} event needs it (it is the entity's key)"
    )]
    EmptyKey { domain: Domain, target: &'static str, source_field: String },
    #[error("{domain} event's {target} is {len} bytes long: an entity key is at most {max} bytes", max = actidash_shared::event::MAX_KEY_BYTES)]
    LongKey { domain: Domain, target: &'static str, len: usize },
}

impl MappingConfig {
    /// Checks the mapping against the domain's schema: returns (field, message) on error.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let schema = schema(self.domain);
        for (group, names) in [
            ("fields", self.fields.keys().collect::<Vec<_>>()),
            ("constants", self.constants.keys().collect()),
            ("defaults", self.defaults.keys().collect()),
        ] {
            for name in names {
                if !schema.iter().any(|(n, _, _)| n == name) {
                    let known: Vec<&str> = schema.iter().map(|(n, _, _)| *n).collect();
                    return Err((
                        format!("{group}.{name}"),
                        format!("{} events have no field `{name}` (known: {})", self.domain, known.join(", ")),
                    ));
                }
            }
        }
        for (name, _, required) in schema {
            let covered = self.fields.contains_key(*name)
                || self.constants.contains_key(*name)
                || self.defaults.contains_key(*name);
            if *required && !covered {
                return Err((
                    "fields".into(),
                    format!("required field `{name}` of {} events is not mapped", self.domain),
                ));
            }
        }
        if self.event_time.field.is_empty() {
            return Err(("event_time.field".into(), "must name a source field".into()));
        }
        Ok(())
    }

    /// Maps one record given as a JSON value.
    pub fn apply(&self, record: &Value) -> Result<(DateTime<Utc>, Payload), MappingError> {
        self.apply_str(&record.to_string())
    }

    /// Maps one record given as JSON text. The record is never built into a tree: its top level
    /// is split into raw JSON values, and the payload's JSON is assembled from the mapped ones
    /// (this runs once per record on the agent's hot path).
    pub fn apply_str(&self, text: &str) -> Result<(DateTime<Utc>, Payload), MappingError> {
        let record = RawRecord::parse(text)?;
        let event_time = self.event_time(&record)?;
        let mut data = String::with_capacity(text.len());
        data.push('{');
        for (name, kind, _) in schema(self.domain) {
            let constant;
            let (raw, source_field): (&str, &str) = if let Some(c) = self.constants.get(*name) {
                constant = toml_json_text(c);
                (&constant, "constant")
            } else {
                let source_field = self.fields.get(*name).map(String::as_str).unwrap_or("");
                let from_record = record.lookup(source_field).filter(|v| v.get() != "null");
                match (from_record, self.defaults.get(*name)) {
                    (Some(v), _) => (v.get(), source_field),
                    (None, Some(d)) => {
                        constant = toml_json_text(d);
                        (&constant, "default")
                    }
                    (None, None) => continue,
                }
            };
            if data.len() > 1 {
                data.push(',');
            }
            data.push('"');
            data.push_str(name);
            data.push_str("\":");
            coerce(name, source_field, *kind, raw, &mut data)?;
        }
        data.push('}');
        let payload = Payload::from_json_str(self.domain, &data)
            .map_err(|e| MappingError::Schema { domain: self.domain, message: e.to_string() })?;
        if let Some(target) = payload.empty_key_field() {
            let source_field = match (self.constants.contains_key(target), self.fields.get(target)) {
                (true, _) => "constant".to_owned(),
                (false, Some(f)) => f.clone(),
                (false, None) => "default".to_owned(),
            };
            return Err(MappingError::EmptyKey { domain: self.domain, target, source_field });
        }
        if let Some((target, len)) = payload.long_key_field() {
            return Err(MappingError::LongKey { domain: self.domain, target, len });
        }
        Ok((event_time, payload))
    }

    fn event_time(&self, record: &RawRecord<'_>) -> Result<DateTime<Utc>, MappingError> {
        let field = &self.event_time.field;
        let format = &self.event_time.format;
        let raw = record.lookup(field).ok_or_else(|| MappingError::MissingTime { field: field.clone() })?;
        let bad =
            || MappingError::BadTime { field: field.clone(), value: raw.get().to_owned(), format: format.clone() };
        let text = || serde_json::from_str::<String>(raw.get()).ok();
        match format.as_str() {
            "rfc3339" => text().and_then(|s| DateTime::parse_from_rfc3339(&s).ok()).map(|t| t.to_utc()).ok_or_else(bad),
            "unix_seconds" => number(raw.get()).and_then(|s| Utc.timestamp_opt(s, 0).single()).ok_or_else(bad),
            "unix_millis" => number(raw.get()).and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or_else(bad),
            pattern => {
                let s = text().ok_or_else(bad)?;
                DateTime::parse_from_str(&s, pattern)
                    .map(|t| t.to_utc())
                    .or_else(|_| NaiveDateTime::parse_from_str(&s, pattern).map(|t| t.and_utc()))
                    .map_err(|_| bad())
            }
        }
    }
}

/// A record's top level: each key with its value as raw JSON text, both borrowed from the
/// record where they can be (a key with escapes is unescaped). A short list searched in order
/// costs less than a hash map for the ten-odd fields of a record (it showed in profiles).
struct RawRecord<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

/// A JSON object key, borrowed unless it had escapes.
struct Key<'a>(std::borrow::Cow<'a, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// The fields of a JSON object, in order.
struct Fields<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for Fields<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Fields<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Fields<'de>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(16));
                while let Some((Key(k), v)) = map.next_entry::<Key<'de>, &'de RawValue>()? {
                    out.push((k, v));
                }
                Ok(Fields(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'a> RawRecord<'a> {
    fn parse(text: &'a str) -> Result<RawRecord<'a>, MappingError> {
        match serde_json::from_str::<Fields<'a>>(text) {
            Ok(Fields(fields)) => Ok(RawRecord(fields)),
            Err(e) => match serde_json::from_str::<serde::de::IgnoredAny>(text) {
                Ok(_) => Err(MappingError::NotAnObject),
                Err(_) => Err(MappingError::NotJson(e.to_string())),
            },
        }
    }

    /// The last value of `key` (as a JSON parser keeping the last duplicate would).
    fn get(fields: &[(std::borrow::Cow<'a, str>, &'a RawValue)], key: &str) -> Option<&'a RawValue> {
        fields.iter().rev().find(|(k, _)| k == key).map(|(_, v)| *v)
    }

    /// The value at a field name, or at a dotted path into nested objects.
    fn lookup(&self, path: &str) -> Option<&'a RawValue> {
        if path.is_empty() {
            return None;
        }
        if let Some(v) = Self::get(&self.0, path) {
            return Some(v);
        }
        let mut parts = path.split('.');
        let mut current: &'a RawValue = Self::get(&self.0, parts.next()?)?;
        for part in parts {
            let Fields(nested) = serde_json::from_str(current.get()).ok()?;
            current = Self::get(&nested, part)?;
        }
        Some(current)
    }
}

/// An integer from a JSON number (whole or not) or a numeric string.
fn number(raw: &str) -> Option<i64> {
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw).ok()?.trim().parse().ok(),
        _ => raw.parse::<i64>().ok().or_else(|| raw.parse::<f64>().ok().map(|f| f as i64)),
    }
}

/// Writes `raw` (JSON text) converted to the payload field's kind into `out`.
fn coerce(target: &str, source_field: &str, kind: Kind, raw: &str, out: &mut String) -> Result<(), MappingError> {
    let bad = |expected| MappingError::BadValue {
        target: target.to_owned(),
        source_field: source_field.to_owned(),
        value: truncate(raw),
        expected,
    };
    let first = raw.as_bytes().first().copied().unwrap_or(b' ');
    let is_number = first == b'-' || first.is_ascii_digit();
    match kind {
        Kind::Str if first == b'"' => out.push_str(raw),
        // A number used as an id: its text, quoted (number text needs no escaping).
        Kind::Str if is_number => {
            out.push('"');
            out.push_str(raw);
            out.push('"');
        }
        Kind::Str => return Err(bad("a string")),
        Kind::Int if is_number && raw.parse::<i64>().is_ok() => out.push_str(raw),
        Kind::Int if first == b'"' => {
            let n = serde_json::from_str::<String>(raw)
                .ok()
                .and_then(|s| s.trim().parse::<i64>().ok())
                .ok_or_else(|| bad("an integer"))?;
            out.push_str(&n.to_string());
        }
        Kind::Int => return Err(bad("an integer")),
        Kind::AsIs => out.push_str(raw),
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    if s.len() <= 80 {
        s.to_owned()
    } else {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    }
}

/// A configured constant or default as JSON text.
fn toml_json_text(v: &toml::Value) -> String {
    toml_to_json(v).to_string()
}

fn toml_to_json(v: &toml::Value) -> Value {
    match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(t.iter().map(|(k, v)| (k.clone(), toml_to_json(v))).collect()),
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn raw_records_find_escaped_keys_nested_paths_and_the_last_duplicate() {
        let text = r#"{"a\u0062": 1, "o": {"p": {"q": "x"}}, "dup": 1, "dup": 2}"#;
        let record = RawRecord::parse(text).unwrap();
        assert_eq!(record.lookup("ab").unwrap().get(), "1");
        assert_eq!(record.lookup("o.p.q").unwrap().get(), "\"x\"");
        assert_eq!(record.lookup("dup").unwrap().get(), "2");
        assert!(record.lookup("o.p.missing").is_none() && record.lookup("").is_none());
        assert!(matches!(RawRecord::parse("[1]"), Err(MappingError::NotAnObject)));
        assert!(matches!(RawRecord::parse("{nope"), Err(MappingError::NotJson(_))));
    }

    use super::*;
    use actidash_shared::Money;
    use actidash_shared::event::OrderStatus;
    use serde_json::json;

    fn sales_mapping() -> MappingConfig {
        toml::from_str(
            r#"
domain = "sales"
event_time = { field = "created_at" }
fields = { order_id = "id", customer_id = "customer.id", channel = "channel", country = "country",
           currency = "currency", amount = "total", items = "lines", status = "status" }
constants = { site = "shop-fr" }
defaults = { country = "FR" }
"#,
        )
        .unwrap()
    }

    #[test]
    fn maps_nested_fields_constants_defaults_and_numeric_ids() {
        let m = sales_mapping();
        m.validate().unwrap();
        let record = json!({"id": 1001, "customer": {"id": "c-7"}, "channel": "web", "country": null,
            "currency": "EUR", "total": "19.90", "status": "placed", "created_at": "2026-11-27T10:00:00+01:00",
            "lines": [{"sku": "S1", "quantity": 1, "unit_price": 19.9}]});
        let (time, payload) = m.apply(&record).unwrap();
        assert_eq!(time.to_rfc3339(), "2026-11-27T09:00:00+00:00");
        let Payload::Sales(order) = payload else { panic!("not a sales payload") };
        assert_eq!(order.order_id, "1001");
        assert_eq!(order.country, "FR");
        assert_eq!(order.site, "shop-fr");
        assert_eq!(order.amount, Money::parse("19.90").unwrap());
        assert_eq!(order.status, OrderStatus::Placed);
        assert_eq!(order.items.len(), 1);
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let m = sales_mapping();
        let base = json!({"id": "o1", "customer": {"id": "c"}, "channel": "web", "currency": "EUR",
            "total": 1, "status": "placed", "created_at": "2026-11-27T10:00:00Z"});

        let mut r = base.clone();
        r["channel"] = json!({"x": 1});
        let err = m.apply(&r).unwrap_err().to_string();
        assert_eq!(err, "field `channel` (from `channel`) = {\"x\":1}: expected a string");

        // An empty key (a CSV's empty column) is a bad record, never an event keyed "".
        for blank in [json!(""), json!("   ")] {
            let mut r = base.clone();
            r["id"] = blank;
            let err = m.apply(&r).unwrap_err().to_string();
            assert_eq!(
                err,
                "field `order_id` (from `id`) is empty: every sales event needs it (it is the entity's key)"
            );
        }

        let mut r = base.clone();
        r["status"] = json!("lost");
        let err = m.apply(&r).unwrap_err().to_string();
        assert!(err.starts_with("sales event does not fit its schema: unknown variant `lost`"), "{err}");

        let mut r = base.clone();
        r["created_at"] = json!("yesterday");
        let err = m.apply(&r).unwrap_err().to_string();
        assert_eq!(err, "event time field `created_at` = \"yesterday\": not a rfc3339 time");

        let mut r = base;
        r.as_object_mut().unwrap().remove("total");
        let err = m.apply(&r).unwrap_err().to_string();
        assert!(err.contains("missing field `amount`"), "{err}");
        assert_eq!(m.apply(&json!([1])).unwrap_err(), MappingError::NotAnObject);
        let err = m.apply_str("{\"id\": ").unwrap_err().to_string();
        assert!(err.starts_with("not JSON: EOF while parsing"), "{err}");
        // Escaped keys and nested paths through the raw record.
        let escaped = r#"{"i\u0064": "o9", "customer": {"id": 5}, "channel": "web", "currency": "EUR", "total": 1, "status": "placed", "created_at": "2026-11-27T10:00:00Z"}"#;
        let (_, payload) = m.apply_str(escaped).unwrap();
        assert!(matches!(payload, Payload::Sales(o) if o.order_id == "o9" && o.customer_id == "5"));
    }

    #[test]
    fn time_formats() {
        let mut m: MappingConfig = toml::from_str(
            "domain = \"inventory\"\nevent_time = { field = \"t\", format = \"unix_millis\" }\nfields = { sku = \"s\", warehouse = \"w\", on_hand = \"q\" }",
        )
        .unwrap();
        let (t, p) = m.apply(&json!({"t": 1_764_237_600_000_i64, "s": "S", "w": "W", "q": "12"})).unwrap();
        assert_eq!(t.timestamp(), 1_764_237_600);
        assert_eq!(p.entity_key(), "S@W");
        m.event_time.format = "%d/%b/%Y:%H:%M:%S %z".into();
        let (t, _) = m.apply(&json!({"t": "27/Nov/2026:10:00:00 +0100", "s": "S", "w": "W", "q": 1})).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-27T09:00:00+00:00");
        m.event_time.format = "%Y-%m-%d %H:%M:%S".into();
        let (t, _) = m.apply(&json!({"t": "2026-11-27 10:00:00", "s": "S", "w": "W", "q": 1})).unwrap();
        assert_eq!(t.to_rfc3339(), "2026-11-27T10:00:00+00:00");
    }

    #[test]
    fn validation_catches_unknown_and_unmapped_fields() {
        let mut m = sales_mapping();
        m.fields.remove("amount");
        assert_eq!(m.validate().unwrap_err().0, "fields");
        let mut m = sales_mapping();
        m.constants.insert("discount".into(), toml::Value::Integer(1));
        assert_eq!(m.validate().unwrap_err().0, "constants.discount");
    }
}
