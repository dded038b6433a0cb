//! The file source running on its thread against a real spool: formats, dead letters, restarts.

use std::io::Write as _;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actidash_shared::event::{Event, Payload};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::spool::Spool;

fn append(path: &Path, text: &str) {
    std::fs::OpenOptions::new().create(true).append(true).open(path).unwrap().write_all(text.as_bytes()).unwrap();
}

fn config(toml_text: &str) -> FileSourceConfig {
    toml::from_str(toml_text).unwrap()
}

/// Runs the source until the spool has `n` events for it (or 20 s), then stops it.
fn run_until(cfg: FileSourceConfig, spool_path: &Path, dead_letter: &Path, n: u64) {
    let shutdown = CancellationToken::new();
    let source = FileSource { config: cfg.clone(), ctx: test_context(spool_path, dead_letter, &shutdown) };
    let thread = std::thread::spawn(move || source.run());
    let probe = Spool::open(spool_path).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while probe.source_state(&cfg.id).unwrap().next_seq < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    shutdown.cancel();
    thread.join().unwrap().unwrap();
}

/// A source context over `spool_path` for tests.
pub(crate) fn test_context(spool_path: &Path, dead_letter: &Path, shutdown: &CancellationToken) -> SourceContext {
    SourceContext {
        event_limit: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(crate::sources::NO_EVENT_LIMIT)),
        tenant: "acme".into(),
        agent_id: "a1".into(),
        spool: Spool::open(spool_path).unwrap(),
        status: Arc::new(Mutex::new(Default::default())),
        spooled: Arc::new(tokio::sync::Notify::new()),
        shutdown: shutdown.clone(),
        dead_letter: dead_letter.to_owned(),
        newest_event_ms: std::sync::atomic::AtomicI64::new(i64::MIN),
        head: Default::default(),
    }
}

fn events(spool_path: &Path, source: &str) -> Vec<Event> {
    let mut spool = Spool::open(spool_path).unwrap();
    spool.read(source, 0, 10_000, usize::MAX).unwrap().iter().map(|r| Event::from_json(&r.body).unwrap()).collect()
}

fn dead_letters(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path).unwrap_or_default().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// A CSV stock export (`sku`, `wh`, `qty`, `at`) with `delimiter`, as inventory events.
fn stock_csv(file: &Path, delimiter: char) -> FileSourceConfig {
    config(&format!(
        r#"
id = "stock"
path = "{}"
format = "csv"
poll_interval_ms = 20
csv = {{ delimiter = "{delimiter}" }}
[mapping]
domain = "inventory"
event_time = {{ field = "at", format = "%Y-%m-%d %H:%M:%S" }}
fields = {{ sku = "sku", warehouse = "wh", on_hand = "qty" }}
"#,
        file.display()
    ))
}

#[test]
fn csv_with_header_survives_a_restart_mid_file_and_bad_rows_go_to_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stock.csv");
    let spool = dir.path().join("spool.db");
    let dead = dir.path().join("dead/stock.jsonl");
    let cfg = stock_csv(&file, ';');
    append(
        &file,
        "sku;wh;qty;at\nS1;W1;5;2026-11-27 10:00:00\nS2;W1;many;2026-11-27 10:00:01\nS3;W2;7;2026-11-27 10:00:02\n",
    );
    run_until(cfg.clone(), &spool, &dead, 2);

    // Restarted: the header is read again from the file's first line. An empty SKU column is a
    // bad record (no entity key), not an event keyed "@W2".
    // Stock beyond the plausible bound is refused here, by the gateway's own check.
    append(
        &file,
        "S4;W2;1;2026-11-27 10:00:03\nS5;W2\n;W2;9;2026-11-27 10:00:04\nS6;W2;2000000000000;2026-11-27 10:00:05\n",
    );
    run_until(cfg, &spool, &dead, 3);

    let got: Vec<(String, i64)> = events(&spool, "stock")
        .into_iter()
        .map(|e| match e.payload {
            Payload::Inventory(i) => (i.sku, i.on_hand),
            other => panic!("not inventory: {other:?}"),
        })
        .collect();
    assert_eq!(got, [("S1".into(), 5), ("S3".into(), 7), ("S4".into(), 1)]);

    let dl = dead_letters(&dead);
    assert_eq!(dl.len(), 4, "{dl:?}");
    assert_eq!(dl[0]["line"], 3);
    assert_eq!(dl[0]["record"], "S2;W1;many;2026-11-27 10:00:01");
    assert!(
        dl[0]["reason"].as_str().unwrap().contains("field `on_hand` (from `qty`) = \"many\": expected an integer"),
        "{dl:?}"
    );
    assert_eq!(dl[1]["line"], 6);
    assert_eq!(dl[1]["reason"], "CSV record has 2 fields; the header has 4");
    assert_eq!((dl[2]["line"].as_i64(), dl[2]["record"].as_str()), (Some(7), Some(";W2;9;2026-11-27 10:00:04")));
    assert!(dl[2]["reason"].as_str().unwrap().contains("field `sku` (from `sku`) is empty"), "{dl:?}");
    assert_eq!(dl[3]["line"], 8);
    assert!(
        dl[3]["reason"].as_str().unwrap().contains("on_hand is 2000000000000: beyond the plausible bound"),
        "{dl:?}"
    );
    assert_eq!(Spool::open(&spool).unwrap().source_state("stock").unwrap().n_errors, 4);
}

#[test]
fn the_combined_access_log_preset_becomes_behavior_events() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("access.log");
    let spool = dir.path().join("spool.db");
    let dead = dir.path().join("dead/web.jsonl");
    let cfg = config(&format!(
        r#"
id = "web"
path = "{}"
format = "regex"
poll_interval_ms = 20
regex = {{ preset = "combined" }}
[mapping]
domain = "behavior"
event_time = {{ field = "time", format = "%d/%b/%Y:%H:%M:%S %z" }}
fields = {{ visitor_id = "remote", url = "path", referrer = "referrer" }}
constants = {{ type = "page_view" }}
"#,
        file.display()
    ));
    append(
        &file,
        concat!(
            "203.0.113.9 - - [27/Nov/2026:10:00:00 +0100] \"GET /p/SKU-1 HTTP/1.1\" 200 512 \"https://www.google.com/\" \"Mozilla/5.0\"\n",
            "this is not an access log line\n",
            "198.51.100.7 - - [27/Nov/2026:10:00:05 +0100] \"GET /cart HTTP/2.0\" 200 128 \"-\" \"curl/8\"\n",
        ),
    );
    run_until(cfg, &spool, &dead, 2);
    let got = events(&spool, "web");
    assert_eq!(got.len(), 2);
    let Payload::Behavior(first) = &got[0].payload else { panic!("not behavior") };
    assert_eq!((first.visitor_id.as_str(), first.url.as_deref()), ("203.0.113.9", Some("/p/SKU-1")));
    assert_eq!(got[0].event_time.to_rfc3339(), "2026-11-27T09:00:00+00:00");
    assert_eq!(got[1].seq, 1, "the bad line took no seq");
    let dl = dead_letters(&dead);
    assert_eq!(
        (dl.len(), dl[0]["line"].as_i64(), dl[0]["reason"].as_str()),
        (1, Some(2), Some("line does not match the pattern"))
    );
}

#[test]
fn multiline_records_are_joined_and_a_restart_mid_record_reads_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("orders.json");
    let spool = dir.path().join("spool.db");
    let dead = dir.path().join("dead/o.jsonl");
    let cfg = config(&format!(
        r#"
id = "o"
path = "{}"
poll_interval_ms = 20
multiline = {{ start = '^\{{', flush_ms = 1000 }}
[mapping]
domain = "inventory"
event_time = {{ field = "at" }}
fields = {{ sku = "sku", warehouse = "wh", on_hand = "qty" }}
"#,
        file.display()
    ));
    append(
        &file,
        "{\"sku\": \"S1\",\n  \"wh\": \"W\", \"qty\": 1,\n  \"at\": \"2026-11-27T10:00:00Z\"}\n{\"sku\": \"S2\",\n",
    );
    // The first record completes when the second starts; the second is still open when the
    // source stops, so its start is where the position stays.
    run_until(cfg.clone(), &spool, &dead, 1);
    assert_eq!(events(&spool, "o").len(), 1);

    append(&file, "  \"wh\": \"W\", \"qty\": 2, \"at\": \"2026-11-27T10:00:01Z\"}\n");
    // No third record starts: the second completes by the flush timeout.
    run_until(cfg, &spool, &dead, 2);
    let got: Vec<String> = events(&spool, "o")
        .into_iter()
        .map(|e| match e.payload {
            Payload::Inventory(i) => format!("{}={}", i.sku, i.on_hand),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["S1=1", "S2=2"]);
    assert!(dead_letters(&dead).is_empty());
}

#[test]
fn globs_pick_up_new_files_and_rotations_while_running_with_nothing_lost_or_twice() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let spool = dir.path().join("spool.db");
    let dead = dir.path().join("dead/s.jsonl");
    let cfg = config(&format!(
        r#"
id = "s"
include = ["{0}/*.log", "{0}/*.log.1"]
exclude = ["skip-*"]
poll_interval_ms = 20
scan_interval_ms = 50
release_after_ms = 200
[mapping]
domain = "inventory"
event_time = {{ field = "at" }}
fields = {{ sku = "sku", warehouse = "wh", on_hand = "qty" }}
"#,
        logs.display()
    ));
    let line = |sku: &str| format!("{{\"sku\":\"{sku}\",\"wh\":\"W\",\"qty\":1,\"at\":\"2026-11-27T10:00:00Z\"}}\n");
    append(&logs.join("a.log"), &line("a1"));
    append(&logs.join("skip-me.log"), &line("never"));

    let shutdown = CancellationToken::new();
    let source = FileSource { config: cfg.clone(), ctx: test_context(&spool, &dead, &shutdown) };
    let thread = std::thread::spawn(move || source.run());
    let wait_for = |n: u64| {
        let probe = Spool::open(&spool).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while probe.source_state("s").unwrap().next_seq < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for(1);
    // A new file appears; the first is rotated by rename (still matched as *.log.1) with a
    // last line written after the rename; then one rotated by copytruncate.
    append(&logs.join("b.log"), &line("b1"));
    append(&logs.join("a.log"), &line("a2"));
    std::fs::rename(logs.join("a.log"), logs.join("a.log.1")).unwrap();
    append(&logs.join("a.log.1"), &line("a3"));
    append(&logs.join("a.log"), &line("c1"));
    wait_for(5);
    append(&logs.join("b.log"), &line("b2"));
    std::fs::copy(logs.join("b.log"), logs.join("b.log.1")).unwrap();
    std::fs::OpenOptions::new().write(true).truncate(true).open(logs.join("b.log")).unwrap();
    append(&logs.join("b.log"), &line("d1"));
    wait_for(7);
    std::thread::sleep(Duration::from_millis(300)); // anything read twice would show up now
    shutdown.cancel();
    thread.join().unwrap().unwrap();

    let mut skus: Vec<String> = events(&spool, "s")
        .into_iter()
        .map(|e| match e.payload {
            Payload::Inventory(i) => i.sku,
            other => panic!("{other:?}"),
        })
        .collect();
    skus.sort();
    assert_eq!(skus, ["a1", "a2", "a3", "b1", "b2", "c1", "d1"]);
}

#[test]
fn invalid_patterns_and_a_missing_path_are_named() {
    let base = "id = \"s\"\n[mapping]\ndomain = \"inventory\"\nevent_time = { field = \"at\" }\nfields = { sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }\n";
    let (field, msg) = config(base).validate().unwrap_err();
    assert_eq!(field, "path");
    assert!(msg.contains("include"), "{msg}");
    let bad = config(&base.replace("id = \"s\"\n", "id = \"s\"\ninclude = [\"/x/[a\"]\n"));
    let (field, msg) = bad.validate().unwrap_err();
    assert_eq!(field, "include");
    assert!(msg.contains("/x/[a"), "{msg}");
}

/// A source the salvage blocked (its next seq unknown) stops with the reason instead of
/// appending events whose seqs may have been used.
#[test]
fn a_blocked_source_stops_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("stock.csv");
    let spool_path = dir.path().join("spool.db");
    let cfg = stock_csv(&file, ',');
    append(&file, "sku,wh,qty,at\nS1,W1,5,2026-11-27 10:00:00\n");
    {
        let mut spool = Spool::open(&spool_path).unwrap();
        spool.append("stock", &[b"{}".to_vec()], "", 0).unwrap();
        let conn = rusqlite::Connection::open(&spool_path).unwrap();
        conn.execute("UPDATE sources SET blocked = 'its next seq is unknown: re-enroll' WHERE source_id = 'stock'", [])
            .unwrap();
    }
    let shutdown = CancellationToken::new();
    let ctx = test_context(&spool_path, &dir.path().join("dead.jsonl"), &shutdown);
    let status = ctx.status.clone();
    let source = FileSource { config: cfg, ctx };
    let thread = std::thread::spawn(move || source.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !thread.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(thread.is_finished(), "the source stops by itself");
    shutdown.cancel();
    thread.join().unwrap().unwrap();
    let status = status.lock().unwrap().clone();
    assert_eq!(status.state, "error");
    assert!(status.last_error.unwrap_or_default().contains("source stock is stopped: its next seq is unknown"));
    assert_eq!(Spool::open(&spool_path).unwrap().source_state("stock").unwrap().next_seq, 1, "nothing appended");
}

/// One access log, two domains: a source keeps only purchase lines (sales), the records its
/// conditions skip are counted by condition in its status, never dead-lettered (issue 10).
#[test]
fn records_skipped_by_conditions_are_counted_not_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.jsonl");
    let spool = dir.path().join("spool.db");
    let dead = dir.path().join("dead/app.jsonl");
    let cfg = config(&format!(
        r#"
id = "purchases"
path = "{}"
format = "json_lines"
poll_interval_ms = 20
[mapping]
domain = "sales"
event_time = {{ field = "ts", format = "unix_millis" }}
constants = {{ site = "app", country = "DE", currency = "EUR", status = "placed", channel = "app" }}
fields = {{ order_id = "order", customer_id = "user", amount = {{ field = "cents", scale = "0.01" }} }}
where = [
    {{ field = "event", equals = "purchase", name = "not a purchase" }},
    {{ field = "user", not_matches = "^test-", name = "test orders" }},
]
"#,
        file.display()
    ));
    append(
        &file,
        concat!(
            "{\"event\":\"view\",\"user\":\"u1\",\"ts\":1}\n",
            "{\"event\":\"purchase\",\"user\":\"u1\",\"order\":\"o1\",\"cents\":1250,\"ts\":2}\n",
            "{\"event\":\"purchase\",\"user\":\"test-9\",\"order\":\"o2\",\"cents\":1,\"ts\":3}\n",
            "{\"event\":\"view\",\"user\":\"u2\",\"ts\":4}\n",
            "{\"event\":\"purchase\",\"user\":\"u2\",\"order\":\"o3\",\"cents\":\"x\",\"ts\":5}\n",
        ),
    );
    let shutdown = CancellationToken::new();
    let ctx = test_context(&spool, &dead, &shutdown);
    let status = ctx.status.clone();
    let source = FileSource { config: cfg.clone(), ctx };
    let thread = std::thread::spawn(move || source.run());
    let deadline = Instant::now() + Duration::from_secs(20);
    while status.lock().unwrap().n_errors < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    shutdown.cancel();
    thread.join().unwrap().unwrap();
    let got: Vec<String> = events(&spool, "purchases")
        .into_iter()
        .map(|e| match e.payload {
            Payload::Sales(o) => format!("{} {}", o.order_id, o.amount),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["o1 12.5"]);
    let status = status.lock().unwrap().clone();
    let expected = std::collections::BTreeMap::from([("not a purchase".to_owned(), 2), ("test orders".to_owned(), 1)]);
    assert_eq!(status.skipped, expected);
    let dl = dead_letters(&dead);
    assert_eq!(dl.len(), 1, "only the bad amount is a dead letter: {dl:?}");
    assert!(dl[0]["reason"].as_str().unwrap().contains("field `amount` (from `cents`): scale"), "{dl:?}");
}
