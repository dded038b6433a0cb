//! The `edge-agent` command line: `check`, `spool inspect`, `spool verify`.

use std::path::Path;
use std::process::Command;

use edge_agent::spool::Spool;

const AGENT: &str = env!("CARGO_BIN_EXE_edge-agent");

fn write_config(dir: &Path, extra: &str) -> std::path::PathBuf {
    let text = format!(
        r#"agent_id = "a1"
tenant = "acme"
data_dir = "state"
{extra}
[cloud]
address = "127.0.0.1:4433"
server_name = "localhost"
ca_file = "ca.pem"

[[sources]]
id = "inv"
type = "file"
path = "inv.jsonl"
[sources.mapping]
domain = "inventory"
event_time = {{ field = "at" }}
fields = {{ sku = "sku", warehouse = "wh", on_hand = "qty" }}
"#
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn run(args: &[&str]) -> (bool, String) {
    let out = Command::new(AGENT).args(args).env("ACTIDASH_LOG", "off").output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

#[test]
fn check_accepts_a_good_config_and_names_file_line_and_field_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(dir.path(), "");
    let (ok, out) = run(&["check", "--config", good.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("OK (1 sources)"), "{out}");

    let bad = write_config(dir.path(), "[spool]\nmax_bytes = 10\n");
    let (ok, out) = run(&["check", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("agent.toml:"), "{out}");
    assert!(out.contains("field `spool.max_bytes`: 10 is below the minimum of 1 MiB"), "{out}");

    let unknown = write_config(dir.path(), "[spool]\nmax_byte = 10\n");
    let (ok, out) = run(&["check", "--config", unknown.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("agent.toml:5:"), "{out}");
    assert!(out.contains("unknown field `max_byte`"), "{out}");

    // A user's error is its message, even where RUST_BACKTRACE is set (developer and CI hosts).
    let out = Command::new(AGENT)
        .args(["check", "--config", unknown.to_str().unwrap()])
        .env("ACTIDASH_LOG", "off")
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.starts_with("Error: ") && said.contains("unknown field `max_byte`"), "{said}");
    assert!(!said.contains("Stack backtrace") && said.lines().count() <= 3, "no trace: {said}");
}

#[test]
fn a_database_password_from_the_environment_is_checked_and_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    let with_db = std::fs::read_to_string(&config).unwrap()
        + "\n[[sources]]\nid = \"shop\"\ntype = \"postgres\"\nurl = \"postgres://reader@db:5432/shop\"\npassword_env = \"SHOP_DB_PASSWORD\"\ntable = \"orders\"\nincremental_column = \"id\"\n[sources.mapping]\ndomain = \"inventory\"\nevent_time = { field = \"at\" }\nfields = { sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }\n";
    std::fs::write(&config, with_db).unwrap();
    let check = |env: Option<&str>| {
        let mut cmd = Command::new(AGENT);
        cmd.args(["check", "--config", config.to_str().unwrap()])
            .env("ACTIDASH_LOG", "off")
            .env_remove("SHOP_DB_PASSWORD");
        if let Some(value) = env {
            cmd.env("SHOP_DB_PASSWORD", value);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };
    let (ok, out) = check(None);
    assert!(!ok);
    assert!(
        out.contains("source shop") && out.contains("environment variable SHOP_DB_PASSWORD (password_env)"),
        "{out}"
    );
    let (ok, out) = check(Some("hunter2-very-secret"));
    assert!(ok, "{out}");
    assert!(!out.contains("hunter2"), "the password is never printed: {out}");
}

#[test]
fn an_agent_that_is_not_enrolled_says_how_to_enroll() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    std::fs::write(dir.path().join("ca.pem"), "").unwrap();
    let (ok, out) = run(&["enroll", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("--token-file, ACTIDASH_ENROLL_TOKEN or --token"), "{out}");
    let (ok, out) = run(&["run", "--config", config.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("not enrolled") && out.contains("edge-agent enroll"), "{out}");
}

#[test]
fn spool_inspect_and_verify_report_depth_positions_and_damage() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "");
    std::fs::create_dir_all(dir.path().join("state")).unwrap();
    let spool_path = dir.path().join("state").join(edge_agent::SPOOL_FILE);
    {
        let mut spool = Spool::open(&spool_path).unwrap();
        spool.append("inv", &[b"{\"a\":1}".to_vec(), b"{\"a\":2}".to_vec()], "{\"offset\":99}", 3).unwrap();
    }
    let (ok, out) = run(&["spool", "inspect", "--config", config.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("events       2"), "{out}");
    assert!(out.contains("{\"offset\":99}"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("inv") && l.split_whitespace().nth(2) == Some("3")), "{out}");

    let (ok, out) = run(&["spool", "verify", "--config", config.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("OK (2 events checked)"), "{out}");

    rusqlite::Connection::open(&spool_path)
        .unwrap()
        .execute("UPDATE events SET body = X'00' WHERE seq = 0", [])
        .unwrap();
    let (ok, out) = run(&["spool", "verify", "--config", config.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("checksum mismatch: source inv seq 0"), "{out}");
    assert!(out.contains("DAMAGED"), "{out}");
}

/// `check --preview N` maps the first records of every source as the cloud would receive them,
/// names each record that fails with its place, exits 1 if any failed, and touches nothing of
/// the agent's state (no spool, no dead-letter file) — issue 10.
#[test]
fn check_preview_maps_the_first_records_of_every_source_without_touching_state() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("inv.jsonl"),
        concat!(
            "{\"sku\":\"S1\",\"wh\":\"W1\",\"qty\":5,\"at\":\"2026-11-27T10:00:00Z\"}\n",
            "{\"sku\":\"S2\",\"wh\":\"W1\",\"qty\":\"many\",\"at\":\"2026-11-27T10:00:01Z\"}\n",
            "{\"sku\":\"S3\",\"wh\":\"W2\",\"qty\":7,\"at\":\"2026-11-27T10:00:02Z\"}\n",
            "{\"sku\":\"S4\",\"wh\":\"W2\",\"qty\":8,\"at\":\"2026-11-27T10:00:03Z\"}\n",
        ),
    )
    .unwrap();
    let db = rusqlite::Connection::open(dir.path().join("shop.db")).unwrap();
    db.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, total_cents INTEGER, state TEXT, at TEXT);
         INSERT INTO orders VALUES (1, 1999, 'paid', '2026-11-27 10:00:00'), (2, 500, 'test', '2026-11-27 10:01:00'),
                                   (3, 250, 'void', '2026-11-27 10:02:00');",
    )
    .unwrap();
    let config = write_config(dir.path(), "");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(
        r#"
[[sources]]
id = "shop"
type = "sqlite"
path = "shop.db"
table = "orders"
incremental_column = "id"
[sources.mapping]
domain = "sales"
event_time = { field = "at", format = "%Y-%m-%d %H:%M:%S", timezone = "Europe/Paris" }
constants = { customer_id = "c", channel = "web", site = "shop", country = "FR", currency = "EUR" }
where = [{ field = "state", not_equals = "test", name = "test orders" }]
[sources.mapping.fields]
order_id = "id"
amount = { field = "total_cents", scale = "0.01" }
status = { field = "state", map = { paid = "placed", void = "cancelled" } }
"#,
    );
    std::fs::write(&config, text).unwrap();
    let (ok, out) = run(&["check", "--config", config.to_str().unwrap(), "--preview", "3"]);
    assert!(!ok, "a record failed: {out}");
    assert!(out.contains("source inv: 3 events, 1 bad, 0 skipped"), "{out}");
    assert!(out.contains("inv.jsonl:2: field `on_hand` (from `qty`) = \"many\": expected an integer"), "{out}");
    assert!(out.contains("source shop: 2 events, 0 bad, 1 skipped"), "{out}");
    assert!(out.contains("\"amount\":19.99") && out.contains("\"status\":\"cancelled\""), "{out}");
    assert!(out.contains("\"event_time\":\"2026-11-27T09:00:00Z\""), "Paris is UTC+1 in November: {out}");
    assert!(out.contains("skipped by test orders: 1"), "{out}");
    assert!(out.contains("1 previewed records did not map"), "{out}");
    assert!(!dir.path().join("state/spool.db").exists(), "the agent's spool is not touched");
    assert!(!dir.path().join("state/dead-letter").exists(), "nor its dead letters");

    // Fixed, the preview passes.
    std::fs::write(
        dir.path().join("inv.jsonl"),
        "{\"sku\":\"S1\",\"wh\":\"W1\",\"qty\":5,\"at\":\"2026-11-27T10:00:00Z\"}\n",
    )
    .unwrap();
    let (ok, out) = run(&["check", "--config", config.to_str().unwrap(), "--preview", "3"]);
    assert!(ok, "{out}");
}
