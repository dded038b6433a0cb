//! End-to-end: real agent and cloud processes, real QUIC on 127.0.0.1, real Apache Kafka (when
//! the test script started one), checking the API's numbers against an independent reference.

mod common;

use std::path::Path;
use std::time::Duration;

use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{Deployment, Process, append_lines, wait_until};
use chrono::Utc;
use common::{TIMEOUT, assert_converges, generate, test_root, write_slowly};

/// The scenario shared by both modes: a first load, then a SIGKILLed agent in the middle of a
/// stream (and, when `kill_processor` names one, a SIGKILLed processor too), restarted; the
/// totals must be exact after each step.
fn scenario(d: &Deployment, data_dir: &Path, cloud: &mut [Process], kill_processor: Option<usize>) {
    let since = Utc::now().timestamp() - 120;
    let mut g = Generator::new(42, 97);
    let agent_config = d.write_agent_config("agent-1", "acme", "secret-1", data_dir, &Feed::ALL).unwrap();
    let mut lines = generate(&mut g, 3_000);
    append_lines(data_dir, &lines).unwrap();
    let mut agent = d.start_agent("agent-1", &agent_config).unwrap();
    {
        let mut procs: Vec<&mut Process> = cloud.iter_mut().collect();
        procs.push(&mut agent);
        assert_converges(d, &lines, since, &mut procs);
    }

    // The agent is SIGKILLed in the middle of a stream, then restarted.
    let more = generate(&mut g, 6_000);
    lines.extend(more.iter().cloned());
    let writer = write_slowly(data_dir, more, Duration::from_secs(4));
    std::thread::sleep(Duration::from_millis(1_500));
    agent.kill();
    if let Some(idx) = kill_processor {
        cloud[idx].kill();
    }
    std::thread::sleep(Duration::from_millis(500));
    agent.restart().unwrap();
    if let Some(idx) = kill_processor {
        cloud[idx].restart().unwrap();
    }
    writer.join().unwrap();
    let mut procs: Vec<&mut Process> = cloud.iter_mut().collect();
    procs.push(&mut agent);
    assert_converges(d, &lines, since, &mut procs);

    // The fleet view has the agent's heartbeat with its sources and their bad-record counts.
    let agents = d.get("/api/v1/agents").unwrap();
    let agent_row = &agents[0];
    assert_eq!(agent_row["agent_id"], "agent-1");
    assert_eq!(agent_row["tenant"], "acme");
    let n_bad_expected = lines.iter().filter(|l| !l.valid).count() as i64;
    wait_until(TIMEOUT, "the heartbeat to report every bad record", || {
        let agents = d.get("/api/v1/agents")?;
        let sources = agents[0]["heartbeat"]["sources"].as_array().cloned().unwrap_or_default();
        let n_bad: i64 = sources.iter().map(|s| s["n_errors"].as_i64().unwrap_or(0)).sum();
        Ok(sources.len() == Feed::ALL.len() && n_bad == n_bad_expected)
    })
    .unwrap();
    assert!(agent.terminate(Duration::from_secs(10)), "agent did not stop cleanly on SIGTERM");

    // No log of any process holds the agent's credential.
    for entry in std::fs::read_dir(&d.root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&path).unwrap();
            assert!(!log.contains("secret-1"), "{} contains the credential", path.display());
        }
    }
}

#[test]
fn embedded_mode_exact_totals_through_agent_sigkill() {
    let root = test_root("embedded");
    let data_dir = root.join("onprem");
    std::fs::create_dir_all(&data_dir).unwrap();
    let d = Deployment::new(&root.join("deploy"), None, &[("agent-1", "acme", "secret-1")]).unwrap();
    let mut cloud = vec![d.start_cloud("cloud", &[]).unwrap()];
    d.wait_ready(TIMEOUT).unwrap();
    scenario(&d, &data_dir, &mut cloud, None);
    assert!(cloud[0].terminate(Duration::from_secs(15)), "cloud did not stop cleanly on SIGTERM");
}

#[test]
fn kafka_mode_exact_totals_through_agent_and_processor_sigkill() {
    let Some(bootstrap) =
        actidash_tests::kafka_bootstrap("kafka_mode_exact_totals_through_agent_and_processor_sigkill")
    else {
        return;
    };
    let root = test_root("kafka");
    let data_dir = root.join("onprem");
    std::fs::create_dir_all(&data_dir).unwrap();
    let d = Deployment::new(&root.join("deploy"), Some(bootstrap), &[("agent-1", "acme", "secret-1")]).unwrap();
    // Gateway, processor and API as three processes: the roles scale independently.
    let gateway = d.start_cloud("gateway", &["gateway"]).unwrap();
    let processor = d.start_cloud("processor", &["process"]).unwrap();
    let api = d.start_cloud("api", &["serve"]).unwrap();
    let mut cloud = vec![gateway, processor, api];
    d.wait_ready(TIMEOUT).unwrap();
    scenario(&d, &data_dir, &mut cloud, Some(1));
    for p in &mut cloud {
        assert!(p.terminate(Duration::from_secs(15)), "{} did not stop cleanly on SIGTERM", p.name);
    }
}

#[test]
fn an_agent_with_a_wrong_credential_is_refused_and_others_keep_working() {
    let root = test_root("an");
    let data_dir = root.join("onprem");
    std::fs::create_dir_all(&data_dir).unwrap();
    let d = Deployment::new(&root.join("deploy"), None, &[("good", "acme", "right")]).unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(3, 0);
    let lines: Vec<Line> = (0..200).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    append_lines(&data_dir, &lines).unwrap();
    let bad_config = d.write_agent_config("good", "acme", "wrong", &data_dir, &[Feed::Orders]).unwrap();
    let bad_config_renamed = d.root.join("intruder.toml");
    std::fs::rename(&bad_config, &bad_config_renamed).unwrap();
    let mut intruder = d.start_agent("intruder", &bad_config_renamed).unwrap();
    wait_until(TIMEOUT, "the gateway to refuse the wrong credential", || {
        Ok(std::fs::read_to_string(d.root.join("cloud.log"))?.contains("wrong credential for agent"))
    })
    .unwrap();
    let agent_log = std::fs::read_to_string(intruder.log_path()).unwrap();
    assert!(agent_log.contains("Unauthenticated"), "agent log should name the refusal: {agent_log}");
    assert!(!agent_log.contains("wrong\""), "the credential must not be logged");
    assert_eq!(d.totals().unwrap(), Default::default(), "nothing from the refused agent may count");
    intruder.kill();

    let good_config = d.write_agent_config("good", "acme", "right", &data_dir, &[Feed::Orders]).unwrap();
    let mut good = d.start_agent("good", &good_config).unwrap();
    assert_converges(&d, &lines, Utc::now().timestamp() - 120, &mut [&mut cloud, &mut good]);
}

#[test]
fn configuration_reload_adds_a_source_refuses_a_bad_file_and_loses_nothing() {
    let root = test_root("reload");
    let data_dir = root.join("onprem");
    std::fs::create_dir_all(&data_dir).unwrap();
    let d = Deployment::new(&root.join("deploy"), None, &[("agent-1", "acme", "secret-1")]).unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let since = Utc::now().timestamp() - 120;
    let mut g = Generator::new(21, 0);
    let orders: Vec<Line> = (0..1_000).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    let web: Vec<Line> = (0..1_000).map(|_| g.line_for(Feed::Web, Utc::now())).collect();
    append_lines(&data_dir, &orders).unwrap();
    append_lines(&data_dir, &web).unwrap();

    // At first the agent reads orders only.
    let config = d.write_agent_config("agent-1", "acme", "secret-1", &data_dir, &[Feed::Orders]).unwrap();
    let mut agent = d.start_agent("agent-1", &config).unwrap();
    assert_converges(&d, &orders, since, &mut [&mut cloud, &mut agent]);

    // A new source is added while the agent runs: the web feed arrives, orders are not re-read.
    d.write_agent_config("agent-1", "acme", "secret-1", &data_dir, &[Feed::Orders, Feed::Web]).unwrap();
    let mut all = orders.clone();
    all.extend(web.iter().cloned());
    assert_converges(&d, &all, since, &mut [&mut cloud, &mut agent]);

    // A broken file is refused; the running configuration keeps reading.
    std::fs::write(&config, std::fs::read_to_string(&config).unwrap().replace("[cloud]", "[cloud]\nport = 1")).unwrap();
    wait_until(TIMEOUT, "the bad configuration to be refused", || {
        Ok(std::fs::read_to_string(agent.log_path())?.contains("new configuration refused"))
    })
    .unwrap();
    let log = std::fs::read_to_string(agent.log_path()).unwrap();
    assert!(log.contains("unknown field `port`"), "the refusal names the field");
    let more: Vec<Line> = (0..500).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    append_lines(&data_dir, &more).unwrap();
    all.extend(more);
    assert_converges(&d, &all, since, &mut [&mut cloud, &mut agent]);
    assert!(agent.terminate(Duration::from_secs(10)));
}
