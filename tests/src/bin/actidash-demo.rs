//! `actidash-demo`: the cloud side embedded, an agent tailing a live generated e-commerce data
//! set, progress on the terminal and the dashboard's URL. Ctrl-C stops everything cleanly.
//!
//! Run it through `scripts/demo.sh`, which builds the binaries first.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actidash_tests::generator::{Feed, Generator};
use actidash_tests::harness::{Deployment, append_lines, wait_until};
use anyhow::Context as _;
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "ActiDash demo: embedded cloud, one agent, live generated data")]
struct Args {
    /// Folder for the demo's files (recreated at each start).
    #[arg(long, default_value = ".demo")]
    dir: PathBuf,
    /// Port of the dashboard (a free one is chosen if it is taken).
    #[arg(long, env = "ACTIDASH_DEMO_PORT", default_value_t = 8080)]
    port: u16,
    /// Records written per second to the on-prem files.
    #[arg(long, default_value_t = 200)]
    rate: u32,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst)).context("installing the Ctrl-C handler")?;
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    std::fs::create_dir_all(&args.dir)?;
    let root = std::fs::canonicalize(&args.dir)?;
    let onprem = root.join("onprem");
    std::fs::create_dir_all(&onprem)?;

    println!("ActiDash demo: setting up in {}", root.display());
    let mut deployment = Deployment::new(&root.join("cloud"), None)?;
    if std::net::TcpListener::bind(("127.0.0.1", args.port)).is_ok() {
        deployment.api_port = args.port;
        deployment.write_cloud_config()?;
    }
    let mut cloud = deployment.start_cloud("cloud", &[])?;
    deployment.wait_ready(Duration::from_secs(30))?;

    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, onprem, rate) = (stop.clone(), written.clone(), onprem.clone(), args.rate.max(1));
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut g = Generator::new(rand_seed(), 0);
            let tick = Duration::from_millis(100);
            let per_tick = (rate / 10).max(1) as usize;
            while !stop.load(Ordering::SeqCst) {
                let lines: Vec<_> = (0..per_tick).map(|_| g.next_line(chrono::Utc::now())).collect();
                append_lines(&onprem, &lines)?;
                written.fetch_add(lines.len() as u64, Ordering::Relaxed);
                std::thread::sleep(tick);
            }
            Ok(())
        })
    };
    let agent_config = deployment.write_agent_config("demo-agent", "demo-shop", &onprem, &Feed::ALL)?;
    let mut agent = deployment.start_agent("agent", &agent_config)?;
    wait_until(Duration::from_secs(30), "the first events to arrive", || {
        Ok(deployment.get("/api/v1/stats")?["events_applied"].as_i64().unwrap_or(0) > 0)
    })?;

    // The demo's manager: the tenant's dashboards and its fleet.
    let token = deployment.make_api_token(&["--tenant", "demo-shop", "--role", "ops", "--expires", "7d"])?;
    println!();
    println!("  Dashboard:  http://127.0.0.1:{}/?token={token}", deployment.api_port);
    println!(
        "  API:        curl -H 'Authorization: Bearer {token}' http://127.0.0.1:{}/api/v1/sales/totals",
        deployment.api_port
    );
    println!("  On-prem files the agent tails: {}", onprem.display());
    println!("  Logs: {}", deployment.root.display());
    println!("  Press Ctrl-C to stop.");
    println!();

    let started = Instant::now();
    let mut last_report = Instant::now();
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(100));
        if last_report.elapsed() < Duration::from_secs(2) {
            continue;
        }
        last_report = Instant::now();
        if !cloud.is_running() || !agent.is_running() {
            eprintln!("a demo process exited; see the logs in {}", deployment.root.display());
            break;
        }
        let applied = deployment.get("/api/v1/stats").ok().and_then(|s| s["events_applied"].as_i64()).unwrap_or(0);
        let totals = deployment.totals().unwrap_or_default();
        let orders: i64 = totals.values().map(|v| v.0).sum();
        println!(
            "  {:>5}s  records written {:>8}  events processed {:>8}  orders {:>6}",
            started.elapsed().as_secs(),
            written.load(Ordering::Relaxed),
            applied,
            orders
        );
    }
    println!("stopping…");
    stop.store(true, Ordering::SeqCst);
    let _ = writer.join();
    agent.terminate(Duration::from_secs(10));
    cloud.terminate(Duration::from_secs(10));
    println!("stopped.");
    Ok(())
}

fn rand_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}
