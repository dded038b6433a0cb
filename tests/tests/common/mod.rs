//! Helpers shared by the end-to-end test files.

#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use actidash_tests::generator::{Generator, Line, expected_domain_counts, expected_totals};
use actidash_tests::harness::{Deployment, Process, append_lines, wait_until};
use actidash_tests::reference;
use chrono::Utc;

pub const TIMEOUT: Duration = Duration::from_secs(120);

/// The agent id the convergence checks give the lines (only inventory ties look at it).
const AGENT: &str = "agent";

/// What a process has logged so far.
pub fn log_of(p: &Process) -> String {
    std::fs::read_to_string(p.log_path()).unwrap_or_default()
}

/// A fresh folder for one test under cargo's target tmp dir: kept after a failure, so that the
/// processes' logs can be read (CI prints them).
pub fn test_root(name: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e").join(name);
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    root
}

/// A fresh folder for one test ([`test_root`]), its on-prem data folder, and a deployment
/// prepared in it (with Kafka at `kafka`, or embedded).
pub fn deployment(name: &str, kafka: Option<String>) -> (PathBuf, PathBuf, Deployment) {
    let root = test_root(name);
    let data = root.join("onprem");
    std::fs::create_dir_all(&data).unwrap();
    let d = Deployment::new(&root.join("deploy"), kafka).unwrap();
    (root, data, d)
}

/// Waits until the API shows exactly the expected totals and domain counts.
pub fn assert_converges(d: &Deployment, lines: &[Line], since: i64, procs: &mut [&mut Process]) {
    let expected = expected_totals(lines);
    let expected_domains = expected_domain_counts(lines);
    let result = wait_until(TIMEOUT, "the API totals to equal the input's", || {
        for p in procs.iter_mut() {
            anyhow::ensure!(p.is_running(), "{} exited; see {}", p.name, p.log_path().display());
        }
        Ok(d.totals()? == expected && d.domain_counts(since)? == expected_domains)
    });
    // Then every analytics figure, against the independent SQL reference of the same lines.
    if result.is_ok() {
        let reference = reference::compute(&reference::raw_lines(AGENT, lines)).unwrap();
        let to = Utc::now().timestamp() + 3600;
        let got = d.figures(since, to).unwrap();
        got.assert_matches(&reference);
    }
    if let Err(e) = result {
        let got = d.totals().ok();
        let domains = d.domain_counts(since).ok();
        let stats = d.get("/api/v1/stats").ok();
        panic!(
            "{e:#}\nexpected {expected:?}\n     got {got:?}\nexpected domains {expected_domains:?}\n     got {domains:?}\nstats {stats:?}\nlogs in {}",
            d.root.display()
        );
    }
}

pub fn generate(g: &mut Generator, n: usize) -> Vec<Line> {
    (0..n).map(|_| g.next_line(Utc::now())).collect()
}

/// Appends `lines` over about `spread`, in small slices, from a background thread.
pub fn write_slowly(dir: &Path, lines: Vec<Line>, spread: Duration) -> std::thread::JoinHandle<()> {
    let dir = dir.to_owned();
    std::thread::spawn(move || {
        let n_slices = 40;
        let per_slice = lines.len().div_ceil(n_slices).max(1);
        for chunk in lines.chunks(per_slice) {
            append_lines(&dir, chunk).expect("appending test data");
            std::thread::sleep(spread / n_slices as u32);
        }
    })
}

/// Appends `lines` to `data`, starts an agent of tenant `acme` over them and waits until every
/// valid one is applied; returns the agent.
pub fn feed_acme(d: &Deployment, data: &Path, name: &str, lines: &[Line]) -> Process {
    append_lines(data, lines).unwrap();
    let config = d.write_agent_config(name, "acme", data, &actidash_tests::generator::Feed::ALL).unwrap();
    let agent = d.start_agent(name, &config).unwrap();
    let n_valid = lines.iter().filter(|l| l.valid).count() as i64;
    wait_until(TIMEOUT, "every record to be applied", || {
        Ok(d.get("/api/v1/stats")?["events_applied"].as_i64().unwrap_or(0) >= n_valid)
    })
    .unwrap();
    agent
}
