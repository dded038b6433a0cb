//! Value transforms of a mapping: where a payload field's value comes from (a source field, a
//! template of source fields) and what is done to it on the way (trimming, case, a value map,
//! an exact decimal scale), and the conditions that keep or skip a record.
//!
//! Everything here is a small closed set of operations on one value — no expression language:
//! each runs in bounded time without I/O, and each error names the field and the operation.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde_json::value::RawValue;

/// Where a payload field's value comes from, and its transforms.
///
/// In a configuration: a source field (`amount = "total"`, dotted paths reach into nested
/// objects), a template (`order_id = "{store}-{id}"`), or a table:
/// `status = { field = "state", map = { paid = "placed", void = "cancelled" } }`,
/// `amount = { field = "total_cents", scale = "0.01" }`,
/// `channel = { field = "src", trim = true, case = "lower", default = "web" }`.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldSpec {
    pub source: FieldSource,
    /// Surrounding white space removed from a text value.
    pub trim: bool,
    pub case: Option<Case>,
    /// Source value (as text) → the payload's value.
    pub map: Option<BTreeMap<String, toml::Value>>,
    /// With `map`: the value for one the map does not list (without it, such a value is a bad
    /// record).
    pub otherwise: Option<toml::Value>,
    /// An exact decimal factor for a number: `0.01` for cents, `0.000001` for micros.
    pub scale: Option<Decimal>,
    /// The value when the source field is missing or null (as the mapping's `defaults`).
    pub default: Option<toml::Value>,
    /// For line items from an array of objects whose keys differ from the payload's: payload
    /// key (`sku`, `quantity`, `unit_price`) = the element's key (dotted paths reach inside).
    pub item: Option<BTreeMap<String, String>>,
}

/// The source of a field's value.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldSource {
    /// A source field, by name or dotted path.
    Path(String),
    /// Text with `{path}` holes filled from source fields.
    Template(Template),
}

/// Letter case applied to a text value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Case {
    Lower,
    Upper,
}

impl FieldSpec {
    /// A plain source field, no transform.
    pub fn path(path: &str) -> FieldSpec {
        FieldSpec {
            source: FieldSource::Path(path.to_owned()),
            trim: false,
            case: None,
            map: None,
            otherwise: None,
            scale: None,
            default: None,
            item: None,
        }
    }

    /// How the source is named in errors: the field, or the template.
    pub fn describe(&self) -> String {
        match &self.source {
            FieldSource::Path(p) => p.clone(),
            FieldSource::Template(t) => t.text.clone(),
        }
    }

    /// Whether any transform applies to the value.
    pub fn transforms(&self) -> bool {
        self.trim || self.case.is_some() || self.map.is_some() || self.scale.is_some() || self.item.is_some()
    }
}

impl<'de> Deserialize<'de> for FieldSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<FieldSpec, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = FieldSpec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a source field, a template such as \"{store}-{id}\", or a table such as { field = \"total_cents\", scale = \"0.01\" }")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FieldSpec, E> {
                FieldSpec::from_text(v).map_err(E::custom)
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<FieldSpec, A::Error> {
                let table = FieldTable::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                table.into_spec().map_err(serde::de::Error::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl FieldSpec {
    fn from_text(text: &str) -> Result<FieldSpec, String> {
        if text.contains('{') {
            Ok(FieldSpec { source: FieldSource::Template(Template::parse(text)?), ..FieldSpec::path("") })
        } else {
            Ok(FieldSpec::path(text))
        }
    }
}

/// A field given as a table, as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FieldTable {
    #[serde(default)]
    field: Option<String>,
    #[serde(default)]
    template: Option<String>,
    #[serde(default)]
    trim: bool,
    #[serde(default)]
    case: Option<Case>,
    #[serde(default)]
    map: Option<BTreeMap<String, toml::Value>>,
    #[serde(default)]
    otherwise: Option<toml::Value>,
    #[serde(default)]
    scale: Option<toml::Value>,
    #[serde(default)]
    default: Option<toml::Value>,
    #[serde(default)]
    item: Option<BTreeMap<String, String>>,
}

impl FieldTable {
    fn into_spec(self) -> Result<FieldSpec, String> {
        let source = match (self.field, self.template) {
            (Some(f), None) if !f.is_empty() => FieldSource::Path(f),
            (None, Some(t)) => FieldSource::Template(Template::parse(&t)?),
            (Some(_), Some(_)) => return Err("give `field` or `template`, not both".into()),
            _ => return Err("a field table needs `field` (a source field) or `template`".into()),
        };
        if self.otherwise.is_some() && self.map.is_none() {
            return Err("`otherwise` goes with `map`".into());
        }
        let scale = match self.scale {
            None => None,
            Some(toml::Value::String(s)) => Some(Decimal::parse(&s).map_err(|e| format!("scale: {e}"))?),
            Some(toml::Value::Integer(i)) => Some(Decimal { mantissa: i128::from(i), exponent: 0 }),
            Some(other) => {
                return Err(format!("scale = {other}: write it as text (\"0.01\"), so that it stays exact"));
            }
        };
        if self.item.is_some() && (self.trim || self.case.is_some() || self.map.is_some() || scale.is_some()) {
            return Err("`item` renames the keys of an array's objects; it goes alone".into());
        }
        Ok(FieldSpec {
            source,
            trim: self.trim,
            case: self.case,
            map: self.map,
            otherwise: self.otherwise,
            scale,
            default: self.default,
            item: self.item,
        })
    }
}

/// Text with `{path}` holes (`{{` and `}}` are literal braces).
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    pub text: String,
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Literal(String),
    Field(String),
}

impl Template {
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(format!("template {text:?}: `{{` without its `}}`")),
                        }
                    }
                    let name = name.trim().to_owned();
                    if name.is_empty() {
                        return Err(format!("template {text:?}: an empty `{{}}`"));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Literal(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name));
                }
                '}' => return Err(format!("template {text:?}: `}}` without its `{{` (write `}}}}` for a brace)")),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        if !parts.iter().any(|p| matches!(p, Part::Field(_))) {
            return Err(format!("template {text:?} names no field"));
        }
        Ok(Template { text: text.to_owned(), parts })
    }

    /// The filled text; Err names a field that is missing or null, or not a scalar.
    pub fn render<'a>(&self, lookup: impl Fn(&str) -> Option<&'a RawValue>) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Field(f) => {
                    let raw =
                        lookup(f).filter(|v| v.get() != "null").ok_or_else(|| format!("field `{f}` is missing"))?;
                    out.push_str(
                        &scalar_text(raw.get()).ok_or_else(|| format!("field `{f}` is not a text or a number"))?,
                    );
                }
            }
        }
        Ok(out)
    }
}

/// A JSON scalar as text: a string's content, a number's or a boolean's text.
pub fn scalar_text(raw: &str) -> Option<String> {
    match raw.as_bytes().first()? {
        b'"' => serde_json::from_str::<String>(raw).ok(),
        b'{' | b'[' | b'n' => None,
        _ => Some(raw.to_owned()),
    }
}

/// An exact decimal number: `mantissa · 10^-exponent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    pub mantissa: i128,
    pub exponent: u32,
}

/// Most fractional digits a decimal keeps (a scale of 10^-12 on a value with 12 decimals fits).
const MAX_EXPONENT: u32 = 24;

impl Decimal {
    /// Parses `-12.5`, `0.000001`, `1e-6`, `3E2` exactly.
    pub fn parse(text: &str) -> Result<Decimal, String> {
        let t = text.trim();
        let bad = || format!("{text:?} is not a decimal number");
        let (number, exp) = match t.find(['e', 'E']) {
            Some(i) => (&t[..i], t[i + 1..].parse::<i32>().map_err(|_| bad())?),
            None => (t, 0),
        };
        let (negative, digits) = match number.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, number.strip_prefix('+').unwrap_or(number)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if (int.is_empty() && frac.is_empty())
            || !int.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(bad());
        }
        let all: String = format!("{int}{frac}");
        let all = all.trim_start_matches('0');
        if all.len() > 36 {
            return Err(format!("{text:?} has too many digits"));
        }
        let mut mantissa: i128 = if all.is_empty() { 0 } else { all.parse().map_err(|_| bad())? };
        let mut exponent = frac.len() as i64 - i64::from(exp);
        while exponent < 0 {
            mantissa = mantissa.checked_mul(10).ok_or_else(|| format!("{text:?} is too large"))?;
            exponent += 1;
        }
        if exponent > i64::from(MAX_EXPONENT) {
            return Err(format!("{text:?} has more than {MAX_EXPONENT} decimal places"));
        }
        Ok(Decimal { mantissa: if negative { -mantissa } else { mantissa }, exponent: exponent as u32 })
    }

    /// The exact product, or None beyond 36 digits.
    pub fn times(self, other: Decimal) -> Option<Decimal> {
        let exponent = self.exponent + other.exponent;
        let mantissa = self.mantissa.checked_mul(other.mantissa)?;
        // Each factor has at most MAX_EXPONENT decimals, so the product's are bounded too.
        (mantissa.unsigned_abs() < 10u128.pow(36)).then_some(Decimal { mantissa, exponent })
    }

    /// Rounded to `places` decimals, half away from zero.
    pub fn round(self, places: u32) -> Decimal {
        if self.exponent <= places {
            return self;
        }
        let divisor = 10i128.pow(self.exponent - places);
        let (q, r) = (self.mantissa / divisor, self.mantissa % divisor);
        let q = if r.unsigned_abs() * 2 >= divisor.unsigned_abs() { q + self.mantissa.signum() } else { q };
        Decimal { mantissa: q, exponent: places }
    }

    /// The integer it is, if it is whole.
    pub fn whole(self) -> Option<i128> {
        let d = 10i128.pow(self.exponent);
        (self.mantissa % d == 0).then_some(self.mantissa / d)
    }
}

impl fmt::Display for Decimal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let digits = self.mantissa.unsigned_abs().to_string();
        let e = self.exponent as usize;
        if e == 0 {
            return write!(f, "{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = e + 1);
        let (int, frac) = padded.split_at(padded.len() - e);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() { write!(f, "{sign}{int}") } else { write!(f, "{sign}{int}.{frac}") }
    }
}

/// A condition on a record (`where` of a mapping): all of a mapping's conditions must hold for
/// the record to become an event; a record that fails one is skipped and counted under the
/// condition's name, not dead-lettered.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The source field (dotted path) tested.
    pub field: String,
    /// Holds when the value (as text) is this.
    #[serde(default)]
    pub equals: Option<toml::Value>,
    /// Holds when the value is not this (a missing field is not it).
    #[serde(default)]
    pub not_equals: Option<toml::Value>,
    /// Holds when the value is one of these.
    #[serde(default, rename = "in")]
    pub one_of: Option<Vec<toml::Value>>,
    /// Holds when the value is none of these (a missing field is none of them).
    #[serde(default)]
    pub not_in: Option<Vec<toml::Value>>,
    /// Holds when the field is present and not null (`true`), or absent or null (`false`).
    #[serde(default)]
    pub exists: Option<bool>,
    /// Holds when the value's text matches this regular expression (RE2 syntax, linear time).
    #[serde(default, deserialize_with = "regex_de")]
    pub matches: Option<Regex>,
    /// Holds when it does not match (a missing field does not match).
    #[serde(default, deserialize_with = "regex_de")]
    pub not_matches: Option<Regex>,
    /// The name skipped records are counted under (default: `where[N]`).
    #[serde(default)]
    pub name: Option<String>,
}

/// A compiled regular expression that compares by its text.
#[derive(Debug, Clone)]
pub struct Regex(pub regex::Regex);

fn regex_de<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Regex>, D::Error> {
    let text = String::deserialize(d)?;
    regex::RegexBuilder::new(&text)
        .size_limit(1 << 20)
        .build()
        .map(|r| Some(Regex(r)))
        .map_err(|e| serde::de::Error::custom(format!("not a regular expression: {e}")))
}

impl Condition {
    /// Checks that exactly one test is given.
    pub fn validate(&self) -> Result<(), String> {
        let n = [
            self.equals.is_some(),
            self.not_equals.is_some(),
            self.one_of.is_some(),
            self.not_in.is_some(),
            self.exists.is_some(),
            self.matches.is_some(),
            self.not_matches.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        match n {
            1 => Ok(()),
            0 => {
                Err("a condition needs one test: equals, not_equals, in, not_in, exists, matches or not_matches".into())
            }
            _ => Err("a condition has one test; give several conditions for several".into()),
        }
    }

    /// Whether the condition holds for `value` (the field's raw JSON; None when missing or null).
    pub fn holds(&self, value: Option<&RawValue>) -> bool {
        let text = value.and_then(|v| scalar_text(v.get()));
        let is = |expected: &toml::Value| text.as_deref().is_some_and(|t| t == toml_text(expected));
        if let Some(e) = &self.equals {
            return is(e);
        }
        if let Some(e) = &self.not_equals {
            return !is(e);
        }
        if let Some(list) = &self.one_of {
            return list.iter().any(is);
        }
        if let Some(list) = &self.not_in {
            return !list.iter().any(is);
        }
        if let Some(exists) = self.exists {
            return value.is_some() == exists;
        }
        if let Some(Regex(r)) = &self.matches {
            return text.as_deref().is_some_and(|t| r.is_match(t));
        }
        if let Some(Regex(r)) = &self.not_matches {
            return !text.as_deref().is_some_and(|t| r.is_match(t));
        }
        true
    }
}

/// A configured scalar as the text a source value is compared with.
pub fn toml_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_parse_multiply_round_and_print_exactly() {
        let d = |t: &str| Decimal::parse(t).unwrap();
        assert_eq!(d("0.01").to_string(), "0.01");
        assert_eq!(d("-12.50").to_string(), "-12.5");
        assert_eq!(d("1e-6"), d("0.000001"));
        assert_eq!(d("3E2").to_string(), "300");
        assert_eq!(d("1999").times(d("0.01")).unwrap().to_string(), "19.99");
        assert_eq!(d("1234567").times(d("0.000001")).unwrap().round(4).to_string(), "1.2346");
        assert_eq!(d("-0.00005").round(4).to_string(), "-0.0001", "half away from zero");
        assert_eq!(d("0.00004").round(4).to_string(), "0");
        assert_eq!(d("2.5").times(d("12")).unwrap().whole(), Some(30));
        assert_eq!(d("0.5").whole(), None);
        for bad in ["", ".", "1.2.3", "abc", "--1", "1e"] {
            assert!(Decimal::parse(bad).is_err(), "{bad:?}");
        }
        assert!(Decimal::parse(&"9".repeat(40)).is_err());
        assert!(d(&"9".repeat(30)).times(d(&"9".repeat(30))).is_none(), "too large, not wrapped");
    }

    #[test]
    fn templates_fill_fields_and_refuse_broken_braces() {
        let t = Template::parse("{store}-{ id }-{{x}}").unwrap();
        let record: BTreeMap<&str, Box<RawValue>> = [
            ("store", RawValue::from_string("\"B1\"".into()).unwrap()),
            ("id", RawValue::from_string("42".into()).unwrap()),
        ]
        .into();
        assert_eq!(t.render(|f| record.get(f).map(|v| &**v)).unwrap(), "B1-42-{x}");
        assert!(Template::parse("{open").is_err());
        assert!(Template::parse("close}").is_err());
        assert!(Template::parse("{}").is_err());
        assert!(Template::parse("no fields {{}}").is_err());
    }
}
