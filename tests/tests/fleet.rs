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

/// The codes of every change in an agent's history, oldest first.
fn history_codes(d: &actidash_tests::harness::Deployment, id: &str) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let history = d.get(&format!("/api/v1/fleet/history?tenant=acme&agent={id}"))?;
    Ok(history
        .as_array()
        .map(|changes| {
            changes
                .iter()
                .rev()
                .map(|c| {
                    let codes = c["reasons"]
                        .as_array()
                        .map(|r| r.iter().map(|x| x["code"].as_str().unwrap_or("").to_owned()).collect())
                        .unwrap_or_default();
                    (c["state"].as_str().unwrap_or("").to_owned(), codes)
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A spool that fills (the gateway takes this agent's events slowly, by its rate limit) pauses
/// the source and degrades the agent, with both reasons, while heartbeats keep flowing.
#[test]
fn a_filling_spool_degrades_its_agent_and_says_why() {
    let (_, data_dir, mut d) = deployment("fleet-spool-full", None);
    d.gateway_extra = "max_events_per_sec_per_agent = 20\n".into();
    d.write_cloud_config().unwrap();
    let _cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(31, 0);
    // About 4 MB of orders for a spool of 1 MiB.
    append_lines(&data_dir, &lines(&mut g, 8_000)).unwrap();
    let config = d
        .write_agent_config_with(
            "shop3",
            "acme",
            &data_dir,
            &[Feed::Orders],
            "[spool]\nmax_bytes = 1048576\n\n[shipper]\nmax_batch_events = 20\n",
        )
        .unwrap();
    let _agent = d.start_agent("shop3", &config).unwrap();
    wait_until(TIMEOUT, "the full spool to degrade the agent", || {
        let (state, codes) = state_and_codes(&agent(&d, "shop3")?);
        Ok(state == "degraded"
            && codes.contains(&"spool_filling".to_owned())
            && codes.contains(&"source_paused".to_owned()))
    })
    .unwrap();
    let a = agent(&d, "shop3").unwrap();
    let messages: Vec<&str> =
        a["health"]["reasons"].as_array().unwrap().iter().map(|r| r["message"].as_str().unwrap()).collect();
    assert!(messages.iter().any(|m| m.contains("source orders paused: the spool is full")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("spool ") && m.ends_with("% full")), "{messages:?}");
    assert_eq!(a["sources"][0]["state"], "paused", "{a:#}");
    // The newest spooled record's event time, and how far behind the end of its file the paused
    // source is: most of the 4 MB.
    let newest = a["sources"][0]["last_event_time_ms"].as_i64().expect("an event time");
    assert!((Utc::now().timestamp_millis() - newest).abs() < 3_600_000, "{a:#}");
    assert!(a["sources"][0]["bytes_behind"].as_u64().is_some_and(|b| b > 1 << 20), "{a:#}");
    assert!(
        history_codes(&d, "shop3").unwrap().iter().any(|(s, c)| s == "degraded" && c.contains(&"spool_filling".into())),
        "the change is in the history"
    );
}

/// A PostgreSQL source's replication slot retains the WAL written while its reader is stopped
/// (the agent is down): back, the agent reports it, degraded with `slot_wal`, until the slot
/// has moved on.
#[test]
fn a_replication_slot_retaining_too_much_wal_degrades_its_agent() {
    let Some(admin) = actidash_tests::postgres_admin("slot WAL health") else { return };
    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_fleet_slot").unwrap();
    let mut pg = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    pg.batch_execute(
        "CREATE TABLE stock (id serial PRIMARY KEY, sku text, wh text, qty int, at timestamptz DEFAULT now());
         CREATE TABLE filler (x int, pad text);
         INSERT INTO stock (sku, wh, qty) VALUES ('A-1', 'berlin', 5), ('B-2', 'paris', 7);",
    )
    .unwrap();
    let (_, data_dir, d) = deployment("fleet-slot-wal", None);
    let _cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let source = format!(
        "[[sources]]\nid = \"stock\"\ntype = \"postgres\"\nurl = \"{url}\"\ntable = \"public.stock\"\npoll_interval_ms = 200\n\
         logical = {{ create = true, max_retained_wal_mb = 1 }}\n[sources.mapping]\ndomain = \"inventory\"\n\
         event_time = {{ field = \"at\" }}\nfields = {{ sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }}\n"
    );
    let config = d.write_agent_config_with("shop4", "acme", &data_dir, &[], &source).unwrap();
    let mut shop = d.start_agent("shop4", &config).unwrap();
    wait_until(TIMEOUT, "the agent to be healthy with its slot read", || {
        let a = agent(&d, "shop4")?;
        Ok(state_and_codes(&a).0 == "healthy" && a["sources"][0]["retained_wal_bytes"].is_u64())
    })
    .unwrap();

    // The reader stops (the agent with it); the server writes on: 8 MB of WAL the slot keeps.
    shop.kill();
    pg.batch_execute("INSERT INTO filler SELECT g, repeat('x', 1000) FROM generate_series(1, 8000) g").unwrap();
    let retained: i64 = pg
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint FROM pg_replication_slots WHERE slot_name = 'actidash_stock'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(retained > 2 << 20, "the slot retains {retained} bytes");
    shop.restart().unwrap();
    wait_until(TIMEOUT, "the agent to report the retained WAL", || {
        let (state, codes) = state_and_codes(&agent(&d, "shop4")?);
        Ok(state == "degraded" && codes == ["slot_wal"])
    })
    .unwrap();
    let a = agent(&d, "shop4").unwrap();
    let message = a["health"]["reasons"][0]["message"].as_str().unwrap().to_owned();
    assert!(message.contains("replication slot retains") && message.contains("(allowed 1 MiB)"), "{message}");
    // Read on, the slot moves on and the agent is healthy again.
    wait_until(TIMEOUT, "the slot to move on", || Ok(state_and_codes(&agent(&d, "shop4")?).0 == "healthy")).unwrap();
    let changes = history_codes(&d, "shop4").unwrap();
    let at = changes.iter().position(|(s, c)| s == "degraded" && c == &["slot_wal"]).expect("slot_wal in the history");
    assert!(changes[at + 1..].iter().any(|(s, _)| s == "healthy"), "{changes:?}");
}
