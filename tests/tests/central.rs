//! Central configuration with real processes: a configuration pushed from the command line
//! reaches the agents of its group over their sessions and runs; a bad one is refused by the
//! cloud with the file and line; one whose source cannot start is rolled back by the agent
//! itself, reported with its error, and never pushed to it again; rollback in the cloud; and
//! through it all, every record is counted once (positions survive each change).

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{Deployment, bin, wait_until};
use chrono::Utc;
use common::{TIMEOUT, assert_converges, deployment, log_of, write_slowly};
use serde_json::Value;

fn config_cli(d: &Deployment, args: &[&str]) -> Output {
    std::process::Command::new(bin("cloud-aggregator").unwrap())
        .arg("config")
        .args(args)
        .arg("--config")
        .arg(d.cloud_config_path())
        .env("ACTIDASH_LOG", "warn")
        .output()
        .unwrap()
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The group's status as `config status --json` gives it.
fn group_status(d: &Deployment) -> anyhow::Result<Value> {
    let out = config_cli(d, &["status", "--tenant", "acme", "--group", "stores", "--json"]);
    anyhow::ensure!(out.status.success(), "config status: {}", text(&out));
    let groups: Value = serde_json::from_slice(&out.stdout)?;
    Ok(groups[0].clone())
}

fn agent_report(d: &Deployment, id: &str) -> anyhow::Result<Value> {
    let g = group_status(d)?;
    g["agents"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["agent_id"] == id).cloned())
        .ok_or_else(|| anyhow::anyhow!("{id} has not reported: {g}"))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn pushed_configurations_are_applied_reported_refused_and_rolled_back_without_losing_a_record() {
    let (root, data_dir, d) = deployment("central-config", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();

    // An agent that takes its sources from the cloud: its file has none.
    let config = d.write_agent_config("store1", "acme", &data_dir, &[]).unwrap();
    let local = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("config_source = \"cloud\"\ngroup = \"stores\"\nconfig_grace_secs = 3\n{local}"))
        .unwrap();
    let mut agent = d.start_agent("store1", &config).unwrap();
    wait_until(TIMEOUT, "the agent to report it runs its local file", || {
        Ok(agent_report(&d, "store1")?["state"] == "local")
    })
    .unwrap();

    // Records are written all along, before the first push and across every change.
    let since = Utc::now().timestamp() - 60;
    let mut g = Generator::new(23, 0);
    let lines: Vec<Line> = (0..1_500).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    let writer = write_slowly(&data_dir, lines.clone(), Duration::from_secs(20));

    // Version 1: the orders file.
    let v1 = write(&root, "v1.toml", &Feed::Orders.source_toml(&data_dir));
    let out = config_cli(&d, &["push", "--tenant", "acme", "--group", "stores", v1.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("version 1 is active"), "{}", text(&out));
    wait_until(TIMEOUT, "the agent to run version 1 after its trial", || {
        let r = agent_report(&d, "store1")?;
        Ok(r["version"] == 1 && r["state"] == "applied")
    })
    .unwrap();

    // Refused by the cloud before any agent sees it: a mistake named with file and line, and a
    // secret.
    let bad = write(&root, "bad.toml", &Feed::Orders.source_toml(&data_dir).replace("poll_interval_ms", "poll_every"));
    let out = config_cli(&d, &["push", "--tenant", "acme", "--group", "stores", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains(&format!("{}:5:", bad.display())) && err.contains("poll_every"), "{err}");
    let secret = write(
        &root,
        "secret.toml",
        "[[sources]]\nid = \"db\"\ntype = \"postgres\"\nurl = \"postgres://reader:hunter2@db/shop\"\ntable = \"orders\"\nincremental_column = \"id\"\n[sources.mapping]\ndomain = \"sales\"\nevent_time = { field = \"ts\" }\nfields = { order_id = \"id\", customer_id = \"customer\", channel = \"channel\", site = \"site\", country = \"country\", currency = \"currency\", amount = \"total\", status = \"status\" }\n",
    );
    let out = config_cli(&d, &["push", "--tenant", "acme", "--group", "stores", secret.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = text(&out);
    assert!(err.contains("secrets are never pushed") && err.contains("sources[0].url"), "{err}");
    assert_eq!(group_status(&d).unwrap()["active"], 1, "nothing refused was stored");

    // Version 2 validates but cannot run on this host: its database is not there. The agent
    // tries it, and rolls back to version 1 by itself when the grace period ends.
    let broken = format!(
        "{}\n[[sources]]\nid = \"shop\"\ntype = \"sqlite\"\npath = \"{}\"\ntable = \"orders\"\nincremental_column = \"id\"\n\
         [sources.mapping]\ndomain = \"inventory\"\nevent_time = {{ field = \"ts\" }}\n\
         fields = {{ sku = \"sku\", warehouse = \"warehouse\", on_hand = \"on_hand\" }}\n",
        Feed::Orders.source_toml(&data_dir),
        data_dir.join("missing.db").display()
    );
    let v2 = write(&root, "v2.toml", &broken);
    let out = config_cli(&d, &["push", "--tenant", "acme", "--group", "stores", v2.to_str().unwrap()]);
    assert!(text(&out).contains("version 2 is active"), "{}", text(&out));
    wait_until(TIMEOUT, "the agent to roll version 2 back to version 1", || {
        let r = agent_report(&d, "store1")?;
        Ok(r["version"] == 1 && r["state"] == "rolled_back" && r["failed_version"] == 2)
    })
    .unwrap();
    let r = agent_report(&d, "store1").unwrap();
    let error = r["error"].as_str().unwrap();
    assert!(error.contains("source shop") && error.contains("missing.db"), "{r}");
    let log = log_of(&agent);
    assert!(log.contains("pushed configuration failed: rolling back"), "{log}");
    // The fleet view shows it too: degraded, with the failed version and its error.
    wait_until(TIMEOUT, "the fleet to show the failed configuration", || {
        let fleet = d.get("/api/v1/fleet?tenant=acme")?;
        let a = &fleet["agents"][0];
        let reasons = a["health"]["reasons"].as_array().cloned().unwrap_or_default();
        Ok(a["config"]["failed_version"] == 2
            && reasons.iter().any(|r| {
                r["code"] == "config_failed" && r["message"].as_str().is_some_and(|m| m.contains("missing.db"))
            }))
    })
    .unwrap();

    // The failed version is not pushed again (the agent keeps version 1 across heartbeats).
    std::thread::sleep(Duration::from_secs(3));
    let pushes = log_of(&cloud).matches("pushing the group's configuration").count();
    assert_eq!(pushes, 2, "version 1 once and version 2 once:\n{}", log_of(&cloud));
    assert_eq!(agent_report(&d, "store1").unwrap()["version"], 1);

    // Rolled back in the cloud too: version 1 is active again, which the agent already runs.
    let out = config_cli(&d, &["rollback", "--tenant", "acme", "--group", "stores"]);
    assert!(text(&out).contains("version 1 is active again (was 2)"), "{}", text(&out));
    assert_eq!(group_status(&d).unwrap()["active"], 1);

    // A restarted agent runs its last good configuration before it reaches the cloud.
    agent.kill();
    cloud.kill();
    let before = log_of(&agent).len();
    agent.restart().unwrap();
    wait_until(TIMEOUT, "the restarted agent to run version 1's source without the cloud", || {
        let new = log_of(&agent)[before..].to_owned();
        Ok(new.lines().any(|l| l.contains("agent started") && l.contains("n_sources=1")))
    })
    .unwrap();
    cloud.restart().unwrap();
    d.wait_ready(TIMEOUT).unwrap();

    writer.join().unwrap();
    assert_converges(&d, &lines, since, &mut [&mut cloud, &mut agent]);
    assert!(cloud.terminate(Duration::from_secs(15)), "cloud did not stop cleanly");
}
