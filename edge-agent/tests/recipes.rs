//! The recipes of `docs/configuration.md`: every one parses as the agent's configuration, and
//! the file and SQLite ones, previewed against the sample data in `tests/samples/`, map every
//! record they keep with none failing.

use std::path::Path;
use std::time::Duration;

use edge_agent::config::AgentConfig;
use edge_agent::sources::SourceConfig;

const DOC: &str = include_str!("../../docs/configuration.md");

const HEADER: &str = r#"agent_id = "a1"
tenant = "acme"
data_dir = "state"

[cloud]
address = "127.0.0.1:4433"
server_name = "localhost"
ca_file = "ca.pem"

"#;

/// The TOML blocks after the `## Recipes` heading, with the heading above each.
fn recipes() -> Vec<(String, String)> {
    let start = DOC.find("## Recipes").expect("a Recipes section");
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut lines = DOC[start..].lines();
    while let Some(line) = lines.next() {
        if let Some(h) = line.strip_prefix("### ") {
            heading = h.to_owned();
        }
        if line == "```toml" {
            let block: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            out.push((heading.clone(), block.join("\n") + "\n"));
        }
    }
    out
}

fn samples_in(dir: &Path) {
    let samples = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    std::fs::create_dir_all(dir.join("samples")).unwrap();
    for name in ["access.log", "app.jsonl", "ad_clicks.csv"] {
        std::fs::copy(samples.join(name), dir.join("samples").join(name)).unwrap();
    }
    let db = rusqlite::Connection::open(dir.join("samples/shop.db")).unwrap();
    db.execute_batch(&std::fs::read_to_string(samples.join("shop.sql")).unwrap()).unwrap();
}

#[test]
fn every_recipe_parses_and_the_local_ones_map_their_samples() {
    let recipes = recipes();
    assert!(recipes.len() >= 7, "{} recipes", recipes.len());
    let dir = tempfile::tempdir().unwrap();
    samples_in(dir.path());
    let mut previewed = Vec::new();
    for (heading, block) in &recipes {
        let path = dir.path().join("agent.toml");
        let text = format!("{HEADER}{block}");
        let config = AgentConfig::parse(&text, &path).unwrap_or_else(|e| panic!("recipe {heading:?}: {e}"));
        let local = config.sources.iter().all(|s| matches!(s, SourceConfig::File(_) | SourceConfig::Sqlite(_)));
        if !local {
            continue;
        }
        for p in edge_agent::preview::preview(&config, 100, Duration::from_secs(30)).unwrap() {
            assert!(p.note.is_none(), "recipe {heading:?}, source {}: {:?}", p.source_id, p.note);
            assert!(p.bad.is_empty(), "recipe {heading:?}, source {}: {:?}", p.source_id, p.bad);
            previewed.push((p.source_id, p.events.len(), p.skipped.values().sum::<u64>()));
        }
    }
    previewed.sort();
    let expected: Vec<(String, usize, u64)> = vec![
        ("ads".into(), 2, 0),
        ("app-events".into(), 3, 2),
        ("app-orders".into(), 1, 4),
        ("shop".into(), 2, 1),
        ("web".into(), 2, 2),
    ];
    assert_eq!(previewed, expected, "(source, events, skipped) per previewed source");
}
