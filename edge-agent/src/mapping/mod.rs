//! Mapping a source record (a JSON object) to a typed domain event.
//!
//! A mapping names the domain, where the event time is and how it is written, and for each
//! field of the domain's payload where its value comes from: a source field (`fields`, dotted
//! paths reach into nested objects, templates such as `"{store}-{id}"` join several, and a
//! table adds transforms — see [`transform::FieldSpec`]), a constant (`constants`), or a
//! fallback when the source field is absent or null (`defaults`). Ids given as numbers become
//! strings and counts given as strings become integers; anything else that does not fit the
//! payload's type is an error that names the field. Conditions (`where`) skip records, counted
//! by condition, instead of mapping them.

pub mod transform;

use std::collections::BTreeMap;

use actidash_shared::event::{Domain, Payload, Text};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde::Deserialize;

use self::transform::{Condition, Decimal, FieldSource, FieldSpec};

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
    /// Payload field = source field (dotted path), template, or a table with transforms.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldSpec>,
    /// Payload field = constant value.
    #[serde(default)]
    pub constants: BTreeMap<String, toml::Value>,
    /// Payload field = value used when the mapped source field is missing or null.
    #[serde(default)]
    pub defaults: BTreeMap<String, toml::Value>,
    /// Conditions every record must meet to become an event; one that fails skips the record
    /// (counted by condition in the source's status, not a dead letter).
    #[serde(default, rename = "where")]
    pub conditions: Vec<Condition>,
}

/// Where and how the event time is written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventTimeConfig {
    /// Source field (dotted path).
    pub field: String,
    /// `rfc3339`, `unix_seconds`, `unix_millis`, `unix_micros`, or a strftime pattern such as
    /// `%d/%b/%Y:%H:%M:%S %z` (a pattern without a zone is read in `timezone`).
    #[serde(default = "default_time_format")]
    pub format: String,
    /// The IANA time zone (`Europe/Berlin`) of times written without one; UTC by default. A
    /// local time that does not exist (skipped by a daylight-saving change) is a bad record; one
    /// that exists twice is read as the first.
    #[serde(default)]
    pub timezone: Option<String>,
}

fn default_time_format() -> String {
    "rfc3339".into()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    /// Money, enums: passed through to the payload's own parser.
    AsIs,
    /// An array, or JSON text holding one (a database's JSON aggregate read as text).
    Array,
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
            ("items", Array, false),
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
    #[error("field `{target}` (from `{source_field}`): {operation}: {message}")]
    Transform { target: String, source_field: String, operation: &'static str, message: String },
    /// Not an error: the record fails condition `condition` and is skipped.
    #[error("skipped by condition {condition}")]
    Skipped { condition: String },
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
        if let Some(tz) = &self.event_time.timezone {
            tz.parse::<chrono_tz::Tz>().map_err(|_| {
                ("event_time.timezone".to_owned(), format!("{tz:?} is not an IANA time zone such as \"Europe/Berlin\""))
            })?;
        }
        for (name, spec) in &self.fields {
            if spec.scale.is_some() && !matches!(name.as_str(), "amount" | "cost" | "on_hand") {
                return Err((
                    format!("fields.{name}.scale"),
                    "scale applies to amounts (amount, cost) and stock (on_hand)".into(),
                ));
            }
        }
        for (idx, c) in self.conditions.iter().enumerate() {
            c.validate().map_err(|msg| (format!("where[{idx}]"), msg))?;
        }
        Ok(())
    }

    /// The name a record skipped by condition `idx` is counted under.
    fn condition_name(&self, idx: usize) -> String {
        self.conditions[idx].name.clone().unwrap_or_else(|| format!("where[{idx}]"))
    }

    /// Maps one record given as a JSON value.
    pub fn apply(&self, record: &Value) -> Result<(DateTime<Utc>, Payload), MappingError> {
        self.apply_str(&record.to_string())
    }

    /// Maps one record given as JSON text. The record is never built into a tree: its top level
    /// is split into raw JSON values, and the payload's JSON is assembled from the mapped ones
    /// (this runs once per record on the agent's hot path).
    pub fn apply_str(&self, text: &str) -> Result<(DateTime<Utc>, Payload), MappingError> {
        let mut data = String::with_capacity(text.len());
        let event_time = self.map_data(text, &mut data)?;
        let payload = Payload::from_json_str(self.domain, &data)
            .map_err(|e| MappingError::Schema { domain: self.domain, message: e.to_string() })?;
        self.check_key(&payload)?;
        Ok((event_time, payload))
    }

    /// [`apply_str`](MappingConfig::apply_str) with a payload that borrows its text from `data`
    /// (cleared, then filled with the payload's JSON): the agent's hot path, where the payload
    /// is only checked and written.
    pub fn apply_view<'d>(
        &self,
        text: &str,
        data: &'d mut String,
    ) -> Result<(DateTime<Utc>, Payload<Text<'d>>), MappingError> {
        data.clear();
        let event_time = self.map_data(text, data)?;
        let payload = Payload::view_json_str(self.domain, data)
            .map_err(|e| MappingError::Schema { domain: self.domain, message: e.to_string() })?;
        self.check_key(&payload)?;
        Ok((event_time, payload))
    }

    /// The payload's key is not empty and not too long.
    fn check_key<S: AsRef<str>>(&self, payload: &Payload<S>) -> Result<(), MappingError> {
        if let Some(target) = payload.empty_key_field() {
            let source_field = match (self.constants.contains_key(target), self.fields.get(target)) {
                (true, _) => "constant".to_owned(),
                (false, Some(f)) => f.describe(),
                (false, None) => "default".to_owned(),
            };
            return Err(MappingError::EmptyKey { domain: self.domain, target, source_field });
        }
        if let Some((target, len)) = payload.long_key_field() {
            return Err(MappingError::LongKey { domain: self.domain, target, len });
        }
        Ok(())
    }

    /// Writes the payload's JSON of record `text` to `data`; the event's time.
    fn map_data(&self, text: &str, data: &mut String) -> Result<DateTime<Utc>, MappingError> {
        let record = RawRecord::parse(text)?;
        for (idx, condition) in self.conditions.iter().enumerate() {
            let value = record.lookup(&condition.field).filter(|v| v.get() != "null");
            if !condition.holds(value) {
                return Err(MappingError::Skipped { condition: self.condition_name(idx) });
            }
        }
        let event_time = self.event_time(&record)?;
        data.push('{');
        for (name, kind, _) in schema(self.domain) {
            let owned;
            let spec = self.fields.get(*name);
            let (raw, source_field): (&str, &str) = if let Some(c) = self.constants.get(*name) {
                owned = toml_json_text(c);
                (&owned, "constant")
            } else {
                let from_record = match spec.map(|s| &s.source) {
                    Some(FieldSource::Path(path)) => record.lookup(path).filter(|v| v.get() != "null").map(|v| v.get()),
                    Some(FieldSource::Template(t)) => match t.render(|f| record.lookup(f)) {
                        Ok(text) => {
                            owned = serde_json::Value::String(text).to_string();
                            Some(owned.as_str())
                        }
                        Err(_) if spec.is_some_and(|s| s.default.is_some()) || self.defaults.contains_key(*name) => {
                            None
                        }
                        Err(message) => {
                            return Err(MappingError::Transform {
                                target: (*name).to_owned(),
                                source_field: t.text.clone(),
                                operation: "template",
                                message,
                            });
                        }
                    },
                    None => None,
                };
                let source_field = match spec.map(|s| &s.source) {
                    Some(FieldSource::Path(p)) => p.as_str(),
                    Some(FieldSource::Template(t)) => t.text.as_str(),
                    None => "",
                };
                let default = spec.and_then(|s| s.default.as_ref()).or_else(|| self.defaults.get(*name));
                match (from_record, default) {
                    (Some(v), _) => match spec.filter(|s| s.transforms()) {
                        Some(spec) => {
                            let transformed = transform_value(name, *kind, spec, v)?;
                            push_key(data, name);
                            coerce(name, source_field, *kind, &transformed, data)?;
                            continue;
                        }
                        None => (v, source_field),
                    },
                    (None, Some(d)) => {
                        push_key(data, name);
                        coerce(name, "default", *kind, &toml_json_text(d), data)?;
                        continue;
                    }
                    (None, None) => continue,
                }
            };
            push_key(data, name);
            coerce(name, source_field, *kind, raw, data)?;
        }
        data.push('}');
        Ok(event_time)
    }

    fn event_time(&self, record: &RawRecord<'_>) -> Result<DateTime<Utc>, MappingError> {
        let field = &self.event_time.field;
        let format = &self.event_time.format;
        let raw = record.lookup(field).ok_or_else(|| MappingError::MissingTime { field: field.clone() })?;
        let bad =
            || MappingError::BadTime { field: field.clone(), value: raw.get().to_owned(), format: format.clone() };
        let text = || serde_json::from_str::<Text<'_>>(raw.get()).ok();
        match format.as_str() {
            "rfc3339" => text().and_then(|s| actidash_shared::time::parse_rfc3339(s.as_ref()).ok()).ok_or_else(bad),
            "unix_seconds" => number(raw.get()).and_then(|s| Utc.timestamp_opt(s, 0).single()).ok_or_else(bad),
            "unix_millis" => number(raw.get()).and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or_else(bad),
            "unix_micros" => number(raw.get()).and_then(|us| Utc.timestamp_micros(us).single()).ok_or_else(bad),
            pattern => {
                let s = text().ok_or_else(bad)?;
                if let Ok(t) = DateTime::parse_from_str(s.as_ref(), pattern) {
                    return Ok(t.to_utc());
                }
                let local = NaiveDateTime::parse_from_str(s.as_ref(), pattern).map_err(|_| bad())?;
                match self.event_time.timezone.as_deref().map(str::parse::<chrono_tz::Tz>) {
                    None => Ok(local.and_utc()),
                    // Validated with the configuration.
                    Some(Err(_)) => Err(bad()),
                    Some(Ok(tz)) => tz.from_local_datetime(&local).earliest().map(|t| t.to_utc()).ok_or_else(|| {
                        MappingError::BadTime {
                            field: field.clone(),
                            value: raw.get().to_owned(),
                            format: format!("{pattern} (a local time that does not exist in {tz})"),
                        }
                    }),
                }
            }
        }
    }
}

/// A record's top level: each key with its value as raw JSON text, both borrowed from the
/// record where they can be (a key with escapes is unescaped). A short list searched in order
/// costs less than a hash map for the ten-odd fields of a record (it showed in profiles).
struct RawRecord<'a>(Vec<(std::borrow::Cow<'a, str>, &'a RawValue)>);

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
                while let Some((Text(k), v)) = map.next_entry::<Text<'de>, &'de RawValue>()? {
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

/// Appends `"name":` to an object being written (after a comma unless it is the first key).
fn push_key(data: &mut String, name: &str) {
    if data.len() > 1 {
        data.push(',');
    }
    data.push('"');
    data.push_str(name);
    data.push_str("\":");
}

/// A source value (JSON text) through a field's transforms: trim and case on its text, then the
/// value map, then the decimal scale; the result as JSON text for [`coerce`].
fn transform_value(target: &str, kind: Kind, spec: &FieldSpec, raw: &str) -> Result<String, MappingError> {
    let err = |operation: &'static str, message: String| MappingError::Transform {
        target: target.to_owned(),
        source_field: spec.describe(),
        operation,
        message,
    };
    if let Some(keys) = &spec.item {
        return rename_items(raw, keys).map_err(|message| err("item", message));
    }
    let mut text = transform::scalar_text(raw)
        .ok_or_else(|| err("value", format!("{} is not a text or a number", truncate(raw))))?;
    let is_string = raw.starts_with('"');
    if spec.trim {
        text = text.trim().to_owned();
    }
    match spec.case {
        Some(transform::Case::Lower) => text = text.to_lowercase(),
        Some(transform::Case::Upper) => text = text.to_uppercase(),
        None => {}
    }
    let mut json = if is_string || spec.trim || spec.case.is_some() {
        serde_json::Value::String(text.clone()).to_string()
    } else {
        raw.to_owned()
    };
    if let Some(map) = &spec.map {
        let to = map.get(&text).or(spec.otherwise.as_ref()).ok_or_else(|| {
            let known: Vec<&str> = map.keys().map(String::as_str).take(10).collect();
            err("map", format!("{} is not in the map (it has: {})", truncate(&text), known.join(", ")))
        })?;
        text = transform::toml_text(to);
        json = toml_json_text(to);
    }
    if let Some(scale) = spec.scale {
        let value = Decimal::parse(&text).map_err(|e| err("scale", e))?;
        let product = value.times(scale).ok_or_else(|| err("scale", format!("{text} × {scale} is too large")))?;
        json = match kind {
            Kind::Int => {
                let whole = product
                    .whole()
                    .and_then(|w| i64::try_from(w).ok())
                    .ok_or_else(|| err("scale", format!("{text} × {scale} = {product} is not a whole number")))?;
                whole.to_string()
            }
            // Money keeps ten-thousandths: rounded half away from zero, written as exact text.
            _ => format!("\"{}\"", product.round(actidash_shared::money::SCALE_DIGITS)),
        };
    }
    Ok(json)
}

/// An array of objects (JSON text) with each object's keys renamed: payload key = element key
/// (dotted paths reach inside an element); numeric strings stay as they are (amounts accept
/// them; a quantity as text is turned into a number).
fn rename_items(raw: &str, keys: &BTreeMap<String, String>) -> Result<String, String> {
    let elements: Vec<&RawValue> =
        serde_json::from_str(raw).map_err(|_| format!("{} is not an array", truncate(raw)))?;
    let mut out = Vec::with_capacity(elements.len());
    for (idx, element) in elements.into_iter().enumerate() {
        let record = RawRecord::parse(element.get()).map_err(|_| format!("element {idx} is not an object"))?;
        let mut item = serde_json::Map::new();
        for (target, source) in keys {
            let value =
                record.lookup(source).ok_or_else(|| format!("element {idx} has no `{source}` (for `{target}`)"))?;
            let mut value: serde_json::Value = serde_json::from_str(value.get()).map_err(|e| e.to_string())?;
            if target == "quantity"
                && let serde_json::Value::String(s) = &value
            {
                value = s
                    .trim()
                    .parse::<i64>()
                    .map(Into::into)
                    .map_err(|_| format!("element {idx}'s `{source}` = {s:?}: expected a whole quantity"))?;
            }
            item.insert(target.clone(), value);
        }
        out.push(serde_json::Value::Object(item));
    }
    Ok(serde_json::Value::Array(out).to_string())
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
        Kind::Array if first == b'"' => {
            let text: String = serde_json::from_str(raw).map_err(|_| bad("an array"))?;
            let _checked: Vec<&RawValue> =
                serde_json::from_str(&text).map_err(|_| bad("an array (or JSON text of one)"))?;
            out.push_str(&text);
        }
        Kind::Array => out.push_str(raw),
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

    /// The agent's hot path (a borrowed payload written at once) writes the JSON the owned
    /// path's event would, and refuses with the same words.
    #[test]
    fn the_borrowed_path_writes_what_the_owned_path_writes() {
        let m = sales_mapping();
        let records = [
            r#"{"id": 1001, "customer": {"id": "c-7"}, "channel": "web", "country": null, "currency": "EUR", "total": "19.90", "status": "placed", "created_at": "2026-11-27T10:00:00+01:00", "lines": [ {"sku": "S\u00e91", "quantity": 2, "unit_price": 9.950} ]}"#,
            r#"{"i\u0064": "o\"9\"", "customer": {"id": 5}, "channel": "w\u00e9b\n", "currency": "EUR", "total": 1e2, "status": "refunded", "created_at": "2026-11-27T10:00:00Z"}"#,
            r#"{"id": "o1", "customer": {"id": "c"}, "channel": "web", "currency": "EUR", "total": 1, "status": "lost", "created_at": "2026-11-27T10:00:00Z"}"#,
            r#"{"id": "  ", "customer": {"id": "c"}, "channel": "web", "currency": "EUR", "total": 1, "status": "placed", "created_at": "2026-11-27T10:00:00Z"}"#,
            r#"{"id": "o1", "customer": {"id": "c"}, "channel": "web", "currency": "EUR", "total": 1e20, "status": "placed", "created_at": "2026-11-27T10:00:00Z"}"#,
        ];
        let mut data = String::new();
        let mut written = 0;
        for text in records {
            let owned = m.apply_str(text).map_err(|e| e.to_string()).and_then(|(time, payload)| {
                let event = actidash_shared::Event::new("t".into(), "a".into(), "s".into(), 4, time, payload);
                event.check().map(|()| event.to_json()).map_err(|e| e.to_string())
            });
            let borrowed = m.apply_view(text, &mut data).map_err(|e| e.to_string()).and_then(|(time, payload)| {
                actidash_shared::event::event_json("t", "a", "s", 4, &time, &payload).map_err(|e| e.to_string())
            });
            assert_eq!(borrowed, owned, "{text}");
            written += usize::from(owned.is_ok());
        }
        assert_eq!(written, 2, "two records map, three are refused");
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

    /// Issue 10's retailer: amounts in cents, statuses `paid`/`void`, order ids made of a store
    /// and a number, channels in any case, ad costs in micros — all mapped without SQL.
    #[test]
    fn transforms_map_scale_template_trim_case_and_default() {
        let m: MappingConfig = toml::from_str(
            r#"
domain = "sales"
event_time = { field = "ts", format = "%Y-%m-%d %H:%M:%S", timezone = "Europe/Berlin" }
constants = { site = "shop", country = "DE", currency = "EUR" }
[fields]
order_id = "{store}-{id}"
customer_id = "customer"
channel = { field = "src", trim = true, case = "lower", default = "web" }
amount = { field = "total_cents", scale = "0.01" }
status = { field = "state", map = { paid = "placed", void = "cancelled" } }
"#,
        )
        .unwrap();
        m.validate().unwrap();
        let record = json!({"store": "B1", "id": 1042, "customer": "c-1", "src": "  App ", "total_cents": 1999,
            "state": "paid", "ts": "2026-11-27 10:00:00"});
        let (time, payload) = m.apply(&record).unwrap();
        assert_eq!(time.to_rfc3339(), "2026-11-27T09:00:00+00:00", "Berlin is UTC+1 in November");
        let Payload::Sales(o) = payload else { panic!() };
        assert_eq!((o.order_id.as_str(), o.channel.as_str()), ("B1-1042", "app"));
        assert_eq!(o.amount, Money::parse("19.99").unwrap());
        assert_eq!(o.status, OrderStatus::Placed);

        let mut r = record.clone();
        r["src"] = json!(null);
        r["state"] = json!("void");
        let (_, payload) = m.apply(&r).unwrap();
        assert!(matches!(payload, Payload::Sales(o) if o.channel == "web" && o.status == OrderStatus::Cancelled));

        r["state"] = json!("refunded_partially");
        let err = m.apply(&r).unwrap_err().to_string();
        assert_eq!(
            err,
            "field `status` (from `state`): map: refunded_partially is not in the map (it has: paid, void)"
        );
        r["state"] = json!("paid");
        r.as_object_mut().unwrap().remove("store");
        let err = m.apply(&r).unwrap_err().to_string();
        assert_eq!(err, "field `order_id` (from `{store}-{id}`): template: field `store` is missing");
        r["store"] = json!("B1");
        r["total_cents"] = json!("12x");
        let err = m.apply(&r).unwrap_err().to_string();
        assert!(
            err.starts_with("field `amount` (from `total_cents`): scale: \"12x\" is not a decimal number"),
            "{err}"
        );
        // A local time skipped by the spring change does not exist in Berlin.
        r["total_cents"] = json!(1);
        r["ts"] = json!("2026-03-29 02:30:00");
        let err = m.apply(&r).unwrap_err().to_string();
        assert!(err.contains("a local time that does not exist in Europe/Berlin"), "{err}");
    }

    #[test]
    fn costs_in_micros_round_to_ten_thousandths_and_stock_must_stay_whole() {
        let m: MappingConfig = toml::from_str(
            r#"
domain = "marketing"
event_time = { field = "t", format = "unix_micros" }
fields = { user_id = "u", channel = "c", campaign = "k", cost = { field = "cost_micros", scale = "0.000001" } }
"#,
        )
        .unwrap();
        m.validate().unwrap();
        let (t, payload) = m
            .apply(&json!({"t": 1_795_773_600_123_456_i64, "u": "u1", "c": "ads", "k": "bf", "cost_micros": 1_234_567}))
            .unwrap();
        assert_eq!(t.timestamp_micros(), 1_795_773_600_123_456);
        let Payload::Marketing(touch) = payload else { panic!() };
        assert_eq!(touch.cost, Some(Money::parse("1.2346").unwrap()), "1.234567 rounded half away from zero");

        let stock: MappingConfig = toml::from_str(
            "domain = \"inventory\"\nevent_time = { field = \"t\", format = \"unix_seconds\" }\nfields = { sku = \"s\", warehouse = \"w\", on_hand = { field = \"dozens\", scale = \"12\" } }",
        )
        .unwrap();
        let (_, p) = stock.apply(&json!({"t": 1, "s": "S", "w": "W", "dozens": "2.5"})).unwrap();
        assert!(matches!(p, Payload::Inventory(i) if i.on_hand == 30));
        let err = stock.apply(&json!({"t": 1, "s": "S", "w": "W", "dozens": "0.01"})).unwrap_err().to_string();
        assert!(err.ends_with("scale: 0.01 × 12 = 0.12 is not a whole number"), "{err}");

        let bad: Result<MappingConfig, _> = toml::from_str(
            "domain = \"inventory\"\nevent_time = { field = \"t\" }\nfields = { sku = { field = \"s\", scale = 0.5 } }",
        );
        assert!(bad.unwrap_err().to_string().contains("write it as text"), "floats are refused as scales");
        let mut wrong = stock.clone();
        wrong.fields.insert(
            "sku".into(),
            toml::from_str::<BTreeMap<String, FieldSpec>>("x = { field = \"s\", scale = \"2\" }").unwrap()["x"].clone(),
        );
        assert_eq!(wrong.validate().unwrap_err().0, "fields.sku.scale");
    }

    #[test]
    fn conditions_skip_records_by_name() {
        let m: MappingConfig = toml::from_str(
            r#"
domain = "behavior"
event_time = { field = "t", format = "unix_seconds" }
fields = { visitor_id = "v", type = { field = "event", map = { view_item = "product_view", page = "page_view" } } }
where = [
    { field = "env", not_equals = "test", name = "test traffic" },
    { field = "event", in = ["view_item", "page"] },
    { field = "ua", not_matches = "(?i)bot" },
]
"#,
        )
        .unwrap();
        m.validate().unwrap();
        let ok = json!({"t": 1, "v": "v1", "event": "view_item", "ua": "Mozilla"});
        assert!(
            matches!(m.apply(&ok).unwrap().1, Payload::Behavior(b) if b.kind == actidash_shared::event::BehaviorKind::ProductView)
        );
        let skipped = |r: serde_json::Value| match m.apply(&r) {
            Err(MappingError::Skipped { condition }) => condition,
            other => panic!("{other:?}"),
        };
        assert_eq!(skipped(json!({"t": 1, "v": "v1", "event": "page", "env": "test"})), "test traffic");
        assert_eq!(skipped(json!({"t": 1, "v": "v1", "event": "click"})), "where[1]");
        assert_eq!(skipped(json!({"t": 1, "v": "v1", "event": "page", "ua": "Googlebot"})), "where[2]");

        let none: MappingConfig =
            toml::from_str("domain = \"behavior\"\nevent_time = { field = \"t\" }\nfields = { visitor_id = \"v\", type = \"e\" }\nwhere = [{ field = \"x\" }]").unwrap();
        assert_eq!(none.validate().unwrap_err().0, "where[0]");
    }

    /// Line items from an array whose objects name things otherwise.
    #[test]
    fn items_from_an_array_with_other_keys() {
        let m: MappingConfig = toml::from_str(
            r#"
domain = "sales"
event_time = { field = "ts", format = "unix_millis" }
constants = { site = "app", country = "DE", channel = "app", status = "placed" }
[fields]
order_id = "order.id"
customer_id = "user"
currency = "order.currency"
amount = "order.total"
items = { field = "order.lines", item = { sku = "sku", quantity = "qty", unit_price = "price.amount" } }
"#,
        )
        .unwrap();
        m.validate().unwrap();
        let r = json!({"ts": 1, "user": "u", "order": {"id": "A-1", "currency": "EUR", "total": "59.90",
            "lines": [{"sku": "s1", "qty": "2", "price": {"amount": "29.95"}}]}});
        let (_, p) = m.apply(&r).unwrap();
        let Payload::Sales(o) = p else { panic!() };
        assert_eq!((o.items[0].sku.as_str(), o.items[0].quantity), ("s1", 2));
        assert_eq!(o.items[0].unit_price, Money::parse("29.95").unwrap());
        let mut r = r;
        r["order"]["lines"][0].as_object_mut().unwrap().remove("qty");
        let err = m.apply(&r).unwrap_err().to_string();
        assert_eq!(err, "field `items` (from `order.lines`): item: element 0 has no `qty` (for `quantity`)");
    }
}
