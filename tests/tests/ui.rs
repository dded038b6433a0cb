//! The dashboards in a real browser: Debian's chromium driven by playwright-core
//! (`desktop/ui/tests/browser.mjs`) against a real deployment (embedded cloud, one agent tailing
//! generated records). The script compares every page's numbers with the API's, changes the
//! range and granularity, watches a number change live after records are appended on-prem, and
//! sees the stale state when the cloud stops; it writes every page's screenshot to
//! `docs/screenshots/`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use actidash_tests::generator::Generator;
use actidash_tests::harness::{append_lines, ui_dir};
use common::{deployment, feed_acme, generate};

#[test]
fn every_page_shows_the_apis_numbers_live_and_marks_stale_data() {
    let Some(chromium) = actidash_tests::chromium("every_page_shows_the_apis_numbers_live_and_marks_stale_data") else {
        return;
    };
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../desktop/ui");
    assert!(
        ui_dir().is_some() && ui.join("node_modules/playwright-core").is_dir(),
        "the dashboards are not built: run `npm ci && npm run build` in desktop/ui (scripts/test.sh does)"
    );
    let (_, data, d) = deployment("ui", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(Duration::from_secs(30)).unwrap();
    let from = chrono::Utc::now().timestamp() - 3600;

    // Spread over the last 30 minutes, so that a series per minute and one per hour differ.
    let mut g = Generator::new(7, 0);
    let start = chrono::Utc::now() - chrono::Duration::minutes(30);
    let lines: Vec<_> = (0..2_000).map(|i| g.next_line(start + chrono::Duration::milliseconds(i * 900))).collect();
    let _agent = feed_acme(&d, &data, "agent-ui", &lines);

    let shots = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/screenshots");
    // What a manager of the tenant (with the Fleet page: ops) would be given.
    let token = d.make_api_token(&["--tenant", "acme", "--role", "ops"]).unwrap();
    let mut browser = Command::new("node")
        .arg(ui.join("tests/browser.mjs"))
        .env("ACTIDASH_URL", format!("http://127.0.0.1:{}", d.api_port))
        .env("ACTIDASH_CHROMIUM", &chromium)
        .env("ACTIDASH_TOKEN", &token)
        .env("ACTIDASH_SCREENSHOTS", &shots)
        .env("ACTIDASH_FROM", from.to_string())
        .env("ACTIDASH_TO", (chrono::Utc::now().timestamp() + 3600).to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting node");
    let mut to_script = browser.stdin.take().unwrap();
    let mut done = None;
    for line in BufReader::new(browser.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        match line.trim() {
            "APPEND" => {
                let more = generate(&mut g, 300);
                append_lines(&data, &more).unwrap();
                writeln!(to_script, "OK").unwrap();
            }
            "STOP" => {
                assert!(cloud.terminate(Duration::from_secs(10)), "the cloud did not stop");
                writeln!(to_script, "OK").unwrap();
            }
            other if other.starts_with("DONE") => {
                done = Some(other.to_owned());
                break;
            }
            other => eprintln!("browser: {other}"),
        }
    }
    drop(to_script);
    let status = browser.wait().unwrap();
    assert!(status.success(), "the browser test failed ({status}); its error is above");
    let done = done.expect("the browser test ended without DONE");
    let checks: usize = done.split_whitespace().nth(1).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(checks >= 20, "only {checks} figures were compared: {done}");
    for page in ["overview", "sales", "marketing", "behavior", "inventory", "fleet", "stale"] {
        assert!(shots.join(format!("{page}.png")).is_file(), "no screenshot of {page}");
    }
}
