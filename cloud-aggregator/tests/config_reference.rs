//! The configuration reference in `docs/configuration.md` checked against the configuration
//! types of the agent and of the cloud, so that it cannot drift from them.
//!
//! Each table of the reference (marked `<!-- ref: KEY -->`) describes one TOML table of one
//! configuration type. For each, this test builds whole configuration files around the table
//! (the table's surroundings come from the `required` rows of the tables that hold it) and
//! checks with the real deserializers that:
//! - the table lists exactly the fields its type accepts (as the type's own "unknown field"
//!   error names them: every type denies unknown fields);
//! - every example parses, and a `required` field is refused when missing;
//! - every written default parses to the same configuration as leaving the field out.

use std::collections::BTreeSet;
use std::fmt::Debug;

const REFERENCE: &str = include_str!("../../docs/configuration.md");

/// One row of a reference table.
#[derive(Debug)]
struct Row {
    name: String,
    default: Default,
    example: String,
}

#[derive(Debug, PartialEq)]
enum Default {
    Required,
    /// Leaving it out has an effect the text describes (an `Option`).
    None,
    /// A TOML value.
    Value(String),
}

/// Where a reference table sits in a configuration file.
struct Place {
    key: &'static str,
    /// The table that holds it, and the field of that table it is.
    parent: Option<(&'static str, &'static str)>,
    /// Its headers, one file per header (the types a `[[sources]]` table takes).
    headers: &'static [&'static str],
    /// Lines the table needs besides its required fields, each left out when the row under
    /// test is one of the names given with it.
    base: &'static [(&'static [&'static str], &'static str)],
    /// Lines a row's example needs beside it.
    companions: &'static [(&'static str, &'static str)],
}

const fn place(key: &'static str, parent: (&'static str, &'static str), header: &'static [&'static str]) -> Place {
    Place { key, parent: Some(parent), headers: header, base: &[], companions: &[] }
}

const PLACES: &[Place] = &[
    Place { key: "agent", parent: None, headers: &[""], base: &[], companions: &[] },
    place("agent.cloud", ("agent", "cloud"), &["[cloud]"]),
    place("agent.shipper", ("agent", "shipper"), &["[shipper]"]),
    place("agent.spool", ("agent", "spool"), &["[spool]"]),
    place("agent.metrics", ("agent", "metrics"), &["[metrics]"]),
    place("agent.file", ("agent", "sources"), &["[[sources]]\ntype = \"file\""]),
    place("agent.file.csv", ("agent.file", "csv"), &["[sources.csv]"]),
    place("agent.file.regex", ("agent.file", "regex"), &["[sources.regex]"]),
    place("agent.file.multiline", ("agent.file", "multiline"), &["[sources.multiline]"]),
    place("agent.sqlite", ("agent", "sources"), &["[[sources]]\ntype = \"sqlite\""]),
    place("agent.db", ("agent", "sources"), &["[[sources]]\ntype = \"postgres\"", "[[sources]]\ntype = \"mysql\""]),
    place("agent.db.tls", ("agent.db", "tls"), &["[sources.tls]"]),
    place("agent.db.logical", ("agent.db", "logical"), &["[sources.logical]"]),
    place("agent.mapping", ("agent.file", "mapping"), &["[sources.mapping]"]),
    place("agent.mapping.event_time", ("agent.mapping", "event_time"), &["[sources.mapping.event_time]"]),
    Place {
        key: "agent.mapping.field",
        parent: Some(("agent.mapping", "fields")),
        headers: &["[sources.mapping.fields.amount]"],
        // A field table names its source field or a template.
        base: &[(&["field", "template"], "field = \"total\"")],
        companions: &[("otherwise", "map = { paid = \"placed\" }")],
    },
    place("agent.mapping.where", ("agent.mapping", "where"), &["[[sources.mapping.where]]"]),
    Place { key: "cloud", parent: None, headers: &[""], base: &[], companions: &[] },
    place("cloud.kafka", ("cloud", "kafka"), &["[kafka]"]),
    place("cloud.gateway", ("cloud", "gateway"), &["[gateway]"]),
    place("cloud.serve", ("cloud", "serve"), &["[serve]"]),
    place("cloud.fleet", ("cloud", "fleet"), &["[fleet]"]),
    place("cloud.analytics", ("cloud", "analytics"), &["[analytics]"]),
    place("cloud.store", ("cloud", "store"), &["[store]"]),
    place("cloud.metrics", ("cloud", "metrics"), &["[metrics]"]),
];

/// The reference's tables by key, in the order written.
fn tables() -> Vec<(String, Vec<Row>)> {
    let mut out: Vec<(String, Vec<Row>)> = Vec::new();
    let mut in_table = false;
    for (idx, line) in REFERENCE.lines().enumerate() {
        if let Some(key) = line.strip_prefix("<!-- ref: ").and_then(|l| l.strip_suffix(" -->")) {
            out.push((key.to_owned(), Vec::new()));
            in_table = true;
            continue;
        }
        if !in_table {
            continue;
        }
        if !line.starts_with('|') {
            in_table = false;
            continue;
        }
        if line.starts_with("| Field") || line.starts_with("|---") {
            continue;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let at = format!("docs/configuration.md:{}", idx + 1);
        assert_eq!(cells.len(), 7, "{at}: a row has five cells");
        let code = |cell: &str| {
            cell.strip_prefix('`')
                .and_then(|c| c.strip_suffix('`'))
                .unwrap_or_else(|| panic!("{at}: {cell:?} should be in backticks"))
                .to_owned()
        };
        let default = match cells[3] {
            "required" => Default::Required,
            "none" => Default::None,
            value => Default::Value(code(value)),
        };
        let row = Row { name: code(cells[1]), default, example: code(cells[4]) };
        out.last_mut().expect("a table follows its marker").1.push(row);
    }
    out
}

struct Reference {
    tables: Vec<(String, Vec<Row>)>,
}

impl Reference {
    fn rows(&self, key: &str) -> &[Row] {
        &self.tables.iter().find(|(k, _)| k == key).unwrap_or_else(|| panic!("no table {key} in the reference")).1
    }

    fn place(key: &str) -> &'static Place {
        PLACES.iter().find(|p| p.key == key).unwrap_or_else(|| panic!("no place for table {key}"))
    }

    /// The lines a table needs for itself: its required rows (but `except`) and its base lines.
    fn needed(&self, key: &str, except: &str) -> String {
        let place = Self::place(key);
        let mut lines = String::new();
        for row in self.rows(key) {
            if row.default == Default::Required && row.name != except {
                lines.push_str(&format!("{} = {}\n", row.name, row.example));
            }
        }
        for (unless, line) in place.base {
            if !unless.contains(&except) {
                lines.push_str(line);
                lines.push('\n');
            }
        }
        lines
    }

    /// A whole file with `body` as the content of table `key` under header number `header`.
    fn file(&self, key: &str, header: usize, body: &str) -> String {
        let place = Self::place(key);
        let own = format!("{}\n{}", place.headers[header], body);
        match place.parent {
            None => own,
            Some((parent, field)) => {
                let parent_body = format!("{}\n{own}", self.needed(parent, field));
                self.file(parent, 0, &parent_body)
            }
        }
    }
}

/// Parses a whole file as the configuration type of the table's side; the `Debug` form of what
/// it read, or the deserializer's message.
fn parse(key: &str, text: &str) -> Result<String, String> {
    fn read<T: serde::de::DeserializeOwned + Debug>(text: &str) -> Result<String, String> {
        toml::from_str::<T>(text).map(|c| format!("{c:?}")).map_err(|e| e.message().to_owned())
    }
    if key.starts_with("agent") {
        read::<edge_agent::config::AgentConfig>(text)
    } else {
        read::<cloud_aggregator::config::CloudConfig>(text)
    }
}

/// The field names a type's "unknown field" error lists as expected.
fn expected_fields(message: &str) -> BTreeSet<String> {
    let Some((_, expected)) = message.split_once("expected") else {
        panic!("not an unknown-field error: {message}");
    };
    expected.split('`').skip(1).step_by(2).map(str::to_owned).collect()
}

#[test]
fn every_table_of_the_reference_has_a_place_and_every_place_a_table() {
    let documented: BTreeSet<String> = tables().into_iter().map(|(k, _)| k).collect();
    let placed: BTreeSet<String> = PLACES.iter().map(|p| p.key.to_owned()).collect();
    assert_eq!(documented, placed);
}

#[test]
fn each_table_lists_exactly_the_fields_its_type_accepts() {
    let reference = Reference { tables: tables() };
    for place in PLACES {
        let documented: BTreeSet<String> = reference.rows(place.key).iter().map(|r| r.name.clone()).collect();
        for header in 0..place.headers.len() {
            let body = format!("{}zzz_not_a_field = 1\n", reference.needed(place.key, ""));
            let text = reference.file(place.key, header, &body);
            let message = parse(place.key, &text).expect_err("an unknown field is refused");
            assert!(message.contains("unknown field `zzz_not_a_field`"), "{}: {message}\n{text}", place.key);
            assert_eq!(
                expected_fields(&message),
                documented,
                "{} ({}): the reference's fields differ from the type's",
                place.key,
                place.headers[header]
            );
        }
    }
}

#[test]
fn examples_parse_required_fields_are_required_and_defaults_are_the_defaults() {
    let reference = Reference { tables: tables() };
    for place in PLACES {
        for header in 0..place.headers.len() {
            let plain = reference.file(place.key, header, &reference.needed(place.key, ""));
            let without = parse(place.key, &plain)
                .unwrap_or_else(|e| panic!("{}: the table with its required fields: {e}\n{plain}", place.key));
            for row in reference.rows(place.key) {
                let with = |value: &str| {
                    let mut body = reference.needed(place.key, &row.name);
                    for (name, line) in place.companions {
                        if *name == row.name {
                            body.push_str(line);
                            body.push('\n');
                        }
                    }
                    body.push_str(&format!("{} = {value}\n", row.name));
                    reference.file(place.key, header, &body)
                };
                let at = format!("{} field {}", place.key, row.name);
                let text = with(&row.example);
                parse(place.key, &text).unwrap_or_else(|e| panic!("{at}: the example does not parse: {e}\n{text}"));
                match &row.default {
                    Default::Required => {
                        let text = reference.file(place.key, header, &reference.needed(place.key, &row.name));
                        let message = parse(place.key, &text).expect_err(&format!("{at} is required"));
                        assert!(message.contains(&format!("missing field `{}`", row.name)), "{at}: {message}");
                    }
                    Default::None => {}
                    Default::Value(value) => {
                        let text = with(value);
                        let given = parse(place.key, &text)
                            .unwrap_or_else(|e| panic!("{at}: the default does not parse: {e}\n{text}"));
                        assert_eq!(given, without, "{at}: `{value}` is not what leaving it out gives");
                    }
                }
            }
        }
    }
}

#[test]
fn a_wrong_default_or_a_missing_field_would_be_caught() {
    // The checks above can fail: a default the code does not have differs, and a field the
    // reference leaves out is named by the type.
    let reference = Reference { tables: tables() };
    let with = |body: &str| parse("agent.shipper", &reference.file("agent.shipper", 0, body)).unwrap();
    assert_ne!(with("max_batch_events = 1999\n"), with(""));
    let message = parse("agent.shipper", &reference.file("agent.shipper", 0, "zzz_not_a_field = 1\n")).unwrap_err();
    let fields = expected_fields(&message);
    assert!(fields.contains("max_backoff_ms") && fields.len() == 3, "{fields:?}");
}
