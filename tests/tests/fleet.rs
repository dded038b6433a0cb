//! The fleet's health, reached for real with real processes: a broken source degrades its
//! agent (and mending it heals it), an agent that runs without the cloud reports the window
//! and what it buffered (cut off), a killed agent goes offline, a revoked one shows revoked;
//! each change is in the agent's history.

mod common;

use std::time::Duration;

use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{append_lines, bin, free_tcp_port, http_get, wait_until};
use chrono::Utc;
use common::{TIMEOUT, deployment, log_of};
use serde_json::Value;

/// The agent's entry in `/api/v1/fleet`.
fn agent(d: &actidash_tests::harness::Deployment, id: &str) -> anyhow::Result<Value> {
    let report = d.get("/api/v1/fleet?tenant=acme")?;
    report["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["agent_id"] == id).cloned())
        .ok_or_else(|| anyhow::anyhow!("{id} is not in the fleet: {report}"))
}

fn state_and_codes(a: &Value) -> (String, Vec<String>) {
    let health = &a["health"];
    let codes = health["reasons"]
        .as_array()
        .map(|r| r.iter().map(|x| x["code"].as_str().unwrap_or("").to_owned()).collect())
        .unwrap_or_default();
    (health["state"].as_str().unwrap_or("").to_owned(), codes)
}

fn lines(g: &mut Generator, n: usize) -> Vec<Line> {
    (0..n).map(|_| g.line_for(Feed::Orders, Utc::now())).collect()
}

#[test]
fn the_fleet_shows_each_agents_health_and_its_history_truthfully() {
    let (_, data_dir, mut d) = deployment("fleet-health", None);
    // Heartbeats every second (the harness's gateway setting); offline after three silent ones.
    d.serve_extra = "agent_offline_after_secs = 3\n".into();
    d.write_cloud_config().unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();

    // A source whose database is not there yet.
    let db = data_dir.join("shop.db");
    let metrics_port = free_tcp_port();
    let broken = format!(
        "[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n\n[[sources]]\nid = \"shop\"\ntype = \"sqlite\"\npath = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\n\
         [sources.mapping]\ndomain = \"inventory\"\nevent_time = {{ field = \"ts\" }}\n\
         fields = {{ sku = \"sku\", warehouse = \"warehouse\", on_hand = \"on_hand\" }}\n",
        db.display()
    );
    let mut g = Generator::new(7, 0);
    append_lines(&data_dir, &lines(&mut g, 20)).unwrap();
    let config = d.write_agent_config_with("shop1", "acme", &data_dir, &[Feed::Orders], &broken).unwrap();
    let mut shop = d.start_agent("shop1", &config).unwrap();

    wait_until(TIMEOUT, "the broken source to degrade its agent", || {
        let (state, codes) = state_and_codes(&agent(&d, "shop1")?);
        Ok(state == "degraded" && codes == ["source_error"])
    })
    .unwrap();
    let a = agent(&d, "shop1").unwrap();
    let reason = &a["health"]["reasons"][0];
    assert_eq!(reason["source"], "shop");
    assert!(reason["message"].as_str().unwrap().contains("shop.db"), "{reason}");

    // Mended: the database appears; the source reads it, and the agent is healthy again.
    let conn = rusqlite::Connection::open(&db).unwrap();
    conn.execute_batch(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, ts TEXT, sku TEXT, warehouse TEXT, on_hand INTEGER)",
    )
    .unwrap();
    drop(conn);
    wait_until(TIMEOUT, "the agent to be healthy once its source is mended", || {
        Ok(state_and_codes(&agent(&d, "shop1")?).0 == "healthy")
    })
    .unwrap();

    // Cut off: the cloud is gone for a while; the agent reads on into its spool (as its own
    // metrics show: the cloud cannot).
    cloud.kill();
    wait_until(TIMEOUT, "the agent to notice the cloud is gone", || Ok(log_of(&shop).contains("shipping interrupted")))
        .unwrap();
    let during = lines(&mut g, 30);
    append_lines(&data_dir, &during).unwrap();
    wait_until(TIMEOUT, "the agent to spool what was written meanwhile", || {
        let page = http_get(metrics_port, "/metrics")?;
        Ok(page.lines().any(|l| l == "actidash_agent_source_events_total{source=\"orders\"} 50"))
    })
    .unwrap();
    cloud.restart().unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    wait_until(TIMEOUT, "the agent to report its outage", || {
        Ok(agent(&d, "shop1")?["last_outage"]["buffered_events"].as_u64() == Some(during.len() as u64))
    })
    .unwrap();
    let history = d.get("/api/v1/fleet/history?tenant=acme&agent=shop1").unwrap();
    let changes: Vec<(String, Vec<String>)> = history
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .map(|c| {
            let codes =
                c["reasons"].as_array().unwrap().iter().map(|r| r["code"].as_str().unwrap().to_owned()).collect();
            (c["state"].as_str().unwrap().to_owned(), codes)
        })
        .collect();
    let expected: Vec<(String, Vec<String>)> =
        [("degraded", vec!["source_error"]), ("healthy", vec![]), ("cut_off", vec!["outage"]), ("healthy", vec![])]
            .into_iter()
            .map(|(s, c)| (s.to_owned(), c.into_iter().map(String::from).collect()))
            .collect();
    // The first heartbeat may already show the source broken, or show it starting (healthy).
    let start = usize::from(changes.first().is_some_and(|c| c.0 == "healthy"));
    assert_eq!(changes[start..], expected[..], "{history:#}");
    let outage = history.as_array().unwrap().iter().find(|c| c["state"] == "cut_off").unwrap();
    assert!(
        outage["reasons"][0]["message"].as_str().unwrap().contains(&format!("{} events buffered", during.len())),
        "{outage}"
    );

    // Killed: offline once it has been silent for three heartbeats.
    shop.kill();
    wait_until(TIMEOUT, "the killed agent to be offline", || {
        let (state, codes) = state_and_codes(&agent(&d, "shop1")?);
        Ok(state == "offline" && codes == ["no_heartbeat"])
    })
    .unwrap();

    // Revoked: shown as such, whatever its heartbeats said.
    let out = std::process::Command::new(bin("cloud-aggregator").unwrap())
        .args(["agent", "revoke", "shop1", "--config"])
        .arg(d.cloud_config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_until(TIMEOUT, "the revoked agent to show revoked", || {
        Ok(state_and_codes(&agent(&d, "shop1")?).0 == "revoked")
    })
    .unwrap();
    assert!(cloud.terminate(Duration::from_secs(15)), "cloud did not stop cleanly");
}

/// `edge-agent status`: the one-shot JSON for scripts and the live view in a terminal, while
/// the agent ships, while it is cut off, and once it has stopped.
#[test]
fn the_agents_status_view_shows_sources_the_spool_and_the_link() {
    let test = "the_agents_status_view_shows_sources_the_spool_and_the_link";
    let Some(tmux) = actidash_tests::tmux(test) else { return };
    let (_, data_dir, d) = deployment("agent-status", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(11, 0);
    append_lines(&data_dir, &lines(&mut g, 40)).unwrap();
    let config = d.write_agent_config("shop2", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let mut agent = d.start_agent("shop2", &config).unwrap();
    let status = || {
        let out = std::process::Command::new(bin("edge-agent").unwrap())
            .args(["status", "--once", "--json", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let view: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        (out.status.success(), view)
    };
    wait_until(TIMEOUT, "the status to show everything shipped", || {
        let (ok, v) = status();
        Ok(ok && v["connected"] == true && v["shipped_events"] == 40 && v["spool_events"] == 0)
    })
    .unwrap();
    let (_, v) = status();
    assert_eq!((v["running"].clone(), v["transport"].clone()), (Value::Bool(true), "quic".into()), "{v:#}");
    assert_eq!(v["sources"][0]["source"], "orders");
    assert_eq!(v["sources"][0]["events"], 40);

    // Cut off: the live view in a terminal says so, with the source and its rate column.
    cloud.kill();
    let session = format!("actidash-status-{}", std::process::id());
    let command = format!("{} status --config {}", bin("edge-agent").unwrap().display(), config.display());
    let started = std::process::Command::new(&tmux)
        .args(["new-session", "-d", "-s", &session, "-x", "160", "-y", "40", &command])
        .status()
        .unwrap();
    assert!(started.success());
    let screen = || {
        let out = std::process::Command::new(&tmux).args(["capture-pane", "-p", "-t", &session]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let seen = wait_until(TIMEOUT, "the live view to show the agent cut off", || {
        let s = screen();
        Ok(s.contains("CUT OFF") && s.contains("orders") && (s.contains("running") || s.contains("waiting")))
    });
    let last_screen = screen();
    let _ = std::process::Command::new(&tmux).args(["kill-session", "-t", &session]).status();
    seen.unwrap_or_else(|e| panic!("{e}; the screen:\n{last_screen}"));
    assert!(last_screen.contains("CUT OFF") && last_screen.contains("refreshed every second"), "{last_screen}");
    let (ok, v) = status();
    assert!(ok && v["connected"] == false, "{v:#}");

    // Stopped: the status file ages, and the one-shot view says so and fails.
    agent.kill();
    wait_until(TIMEOUT, "the status to say the agent is not running", || {
        let (ok, v) = status();
        Ok(!ok && v["running"] == false)
    })
    .unwrap();
    let out = std::process::Command::new(bin("edge-agent").unwrap())
        .args(["status", "--once", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("NOT RUNNING"), "{}", String::from_utf8_lossy(&out.stdout));
}
