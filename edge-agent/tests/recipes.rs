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

/// The TOML blocks of the `## Recipes` section (up to the next top-level heading), with the
/// heading above each.
fn recipes() -> Vec<(String, String)> {
    let start = DOC.find("## Recipes").expect("a Recipes section");
    let mut out = Vec::new();
    let mut heading = String::new();
    let mut lines = DOC[start..].lines();
    while let Some(line) = lines.next() {
        if line.starts_with("# ") {
            break;
        }
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

/// The admin URL of a database server the test script started; None (skipped, saying so) when
/// there is none and the suite does not require services.
fn server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(std::env::var("ACTIDASH_REQUIRE_SERVICES").as_deref() != Ok("1"), "{var} is not set");
            eprintln!("skipped: {var} not set (scripts/test.sh starts the servers)");
            None
        }
    }
}

/// The recipe under `heading`, pointed at `url` with the password in `password_file`.
fn db_recipe(heading: &str, url: &str, password_file: &Path) -> String {
    let (_, block) = recipes().into_iter().find(|(h, _)| h == heading).expect("the recipe");
    let lines: Vec<String> = block
        .lines()
        .map(|l| {
            if l.starts_with("url = ") {
                format!("url = \"{url}\"")
            } else if l.starts_with("password_env = ") || l.starts_with("password_file = ") {
                format!("password_file = \"{}\"", password_file.display())
            } else {
                l.to_owned()
            }
        })
        .collect();
    format!("{HEADER}{}\n", lines.join("\n"))
}

fn previewed(text: &str, dir: &Path) -> (usize, Vec<(String, String)>, u64, Option<String>) {
    let config = AgentConfig::parse(text, &dir.join("agent.toml")).unwrap();
    let p = edge_agent::preview::preview(&config, 100, Duration::from_secs(30)).unwrap().remove(0);
    (p.events.len(), p.bad, p.skipped.values().sum(), p.note)
}

#[test]
fn the_database_recipes_map_orders_with_line_items_on_real_servers() {
    let dir = tempfile::tempdir().unwrap();
    let n = std::process::id();
    if let Some(admin) = server("ACTIDASH_PG_URL") {
        let name = format!("recipe_pg_{n}");
        let mut c = postgres::Client::connect(&admin, postgres::NoTls).unwrap();
        for sql in [
            format!("DROP DATABASE IF EXISTS {name}"),
            format!("CREATE DATABASE {name}"),
            format!("DROP ROLE IF EXISTS {name}"),
            format!("CREATE ROLE {name} LOGIN PASSWORD 'pw-{name}'"),
        ] {
            c.batch_execute(&sql).unwrap();
        }
        let db_admin = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
        let mut c = postgres::Client::connect(&db_admin, postgres::NoTls).unwrap();
        c.batch_execute(&format!(
            "CREATE TABLE orders (id bigserial PRIMARY KEY, customer_id text, channel text, total numeric(12,2),
                                  currency text, status text, created_at timestamptz);
             CREATE TABLE order_items (order_id bigint, sku text, quantity int, unit_price numeric(12,2));
             INSERT INTO orders (customer_id, channel, total, currency, status, created_at) VALUES
                 ('c-1', 'web', 59.90, 'EUR', 'placed', '2026-11-27 10:00:00+01'),
                 ('c-2', 'app', 15.00, 'EUR', 'cancelled', '2026-11-27 10:05:00+01');
             INSERT INTO order_items VALUES (1, 'sku-1', 2, 29.95), (2, 'sku-2', 1, 15.00);
             GRANT SELECT ON orders, order_items TO {name};"
        ))
        .unwrap();
        let password = dir.path().join("pg.password");
        std::fs::write(&password, format!("pw-{name}\n")).unwrap();
        let url = db_admin.replacen("postgres@", &format!("{name}@"), 1);
        let text = db_recipe("PostgreSQL: orders with line items", &url, &password);
        assert_eq!(previewed(&text, dir.path()), (2, vec![], 0, None));
    }
    if let Some(admin) = server("ACTIDASH_MYSQL_URL") {
        use mysql::prelude::Queryable as _;
        let name = format!("recipe_my_{n}");
        let pool = mysql::Pool::new(admin.as_str()).unwrap();
        let mut c = pool.get_conn().unwrap();
        c.query_drop(format!("DROP DATABASE IF EXISTS {name}")).unwrap();
        c.query_drop(format!("CREATE DATABASE {name}")).unwrap();
        c.query_drop(format!(
            "CREATE TABLE {name}.wp_wc_orders (id BIGINT PRIMARY KEY, customer_id BIGINT NULL, status VARCHAR(20),
                 currency CHAR(3), total_amount DECIMAL(12,2), date_created_gmt DATETIME, type VARCHAR(20))"
        ))
        .unwrap();
        c.query_drop(format!(
            "CREATE TABLE {name}.wc_order_lines (order_id BIGINT, sku VARCHAR(40), qty INT, price DECIMAL(12,2))"
        ))
        .unwrap();
        c.query_drop(format!(
            "INSERT INTO {name}.wp_wc_orders VALUES (1, 7, 'wc-completed', 'EUR', 59.90, '2026-11-27 09:00:00', 'shop_order'),
                 (2, NULL, 'wc-processing', 'EUR', 15.00, '2026-11-27 09:05:00', 'shop_order'),
                 (3, 7, 'wc-completed', 'EUR', 1.00, '2026-11-27 09:06:00', 'shop_order_refund')"
        ))
        .unwrap();
        c.query_drop(format!(
            "INSERT INTO {name}.wc_order_lines VALUES (1, 'sku-1', 2, 29.95), (2, 'sku-2', 1, 15.00)"
        ))
        .unwrap();
        c.query_drop(format!("DROP USER IF EXISTS '{name}'@'127.0.0.1'")).unwrap();
        c.query_drop(format!("CREATE USER '{name}'@'127.0.0.1' IDENTIFIED BY 'pw-{name}'")).unwrap();
        c.query_drop(format!("GRANT SELECT ON {name}.* TO '{name}'@'127.0.0.1'")).unwrap();
        let password = dir.path().join("my.password");
        std::fs::write(&password, format!("pw-{name}\n")).unwrap();
        let host = admin.split_once('@').map_or("", |(_, h)| h);
        let host = host.rsplit_once('/').map_or(host, |(h, _)| h);
        let url = format!("mysql://{name}@{host}/{name}");
        let text = db_recipe("MySQL or MariaDB: a WooCommerce-style order table", &url, &password);
        assert_eq!(previewed(&text, dir.path()), (2, vec![], 0, None), "the refund row is not an order");
    }
}
