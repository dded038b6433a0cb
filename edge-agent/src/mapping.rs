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
use serde_json::{Map, Value};

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

    /// Maps one record.
    pub fn apply(&self, record: &Value) -> Result<(DateTime<Utc>, Payload), MappingError> {
        let object = record.as_object().ok_or(MappingError::NotAnObject)?;
        let event_time = self.event_time(object)?;
        let mut data = Map::new();
        for (name, kind, _) in schema(self.domain) {
            let (value, source_field) = if let Some(c) = self.constants.get(*name) {
                (toml_to_json(c), "constant")
            } else {
                let source_field = self.fields.get(*name).map(String::as_str).unwrap_or("");
                let from_record = lookup(object, source_field).filter(|v| !v.is_null()).cloned();
                match (from_record, self.defaults.get(*name)) {
                    (Some(v), _) => (v, source_field),
                    (None, Some(d)) => (toml_to_json(d), "default"),
                    (None, None) => continue,
                }
            };
            data.insert((*name).to_owned(), coerce(name, source_field, *kind, value)?);
        }
        let payload = Payload::from_data(self.domain, Value::Object(data))
            .map_err(|e| MappingError::Schema { domain: self.domain, message: e.to_string() })?;
        Ok((event_time, payload))
    }

    fn event_time(&self, object: &Map<String, Value>) -> Result<DateTime<Utc>, MappingError> {
        let field = &self.event_time.field;
        let format = &self.event_time.format;
        let value = lookup(object, field).ok_or_else(|| MappingError::MissingTime { field: field.clone() })?;
        let bad = || MappingError::BadTime { field: field.clone(), value: value.to_string(), format: format.clone() };
        match format.as_str() {
            "rfc3339" => {
                value.as_str().and_then(|s| DateTime::parse_from_rfc3339(s).ok()).map(|t| t.to_utc()).ok_or_else(bad)
            }
            "unix_seconds" => number(value).and_then(|s| Utc.timestamp_opt(s, 0).single()).ok_or_else(bad),
            "unix_millis" => number(value).and_then(|ms| Utc.timestamp_millis_opt(ms).single()).ok_or_else(bad),
            pattern => {
                let s = value.as_str().ok_or_else(bad)?;
                DateTime::parse_from_str(s, pattern)
                    .map(|t| t.to_utc())
                    .or_else(|_| NaiveDateTime::parse_from_str(s, pattern).map(|t| t.and_utc()))
                    .map_err(|_| bad())
            }
        }
    }
}

fn number(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn lookup<'a>(object: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    if path.is_empty() {
        return None;
    }
    if let Some(v) = object.get(path) {
        return Some(v);
    }
    let mut parts = path.split('.');
    let mut current = object.get(parts.next()?)?;
    for part in parts {
        current = current.as_object()?.get(part)?;
    }
    Some(current)
}

fn coerce(target: &str, source_field: &str, kind: Kind, value: Value) -> Result<Value, MappingError> {
    let bad = |v: &Value, expected| MappingError::BadValue {
        target: target.to_owned(),
        source_field: source_field.to_owned(),
        value: truncate(&v.to_string()),
        expected,
    };
    match (kind, value) {
        (Kind::Str, Value::String(s)) => Ok(Value::String(s)),
        (Kind::Str, Value::Number(n)) => Ok(Value::String(n.to_string())),
        (Kind::Str, v) => Err(bad(&v, "a string")),
        (Kind::Int, Value::Number(n)) if n.is_i64() => Ok(Value::Number(n)),
        (Kind::Int, v) => match &v {
            Value::String(s) => s.trim().parse::<i64>().map(Value::from).map_err(|_| bad(&v, "an integer")),
            _ => Err(bad(&v, "an integer")),
        },
        (Kind::AsIs, v) => Ok(v),
    }
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
