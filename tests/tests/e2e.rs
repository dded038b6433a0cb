//! End-to-end: real agent and cloud processes, real QUIC on 127.0.0.1, real Apache Kafka (when
//! the test script started one), checking the API's numbers against an independent reference.

mod common;

use std::path::Path;
use std::time::Duration;

use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{Deployment, Process, append_lines, wait_until};
use chrono::Utc;
use common::{TIMEOUT, assert_converges, deployment, generate, log_of, write_slowly};

/// The scenario shared by both modes: a first load, then a SIGKILLed agent in the middle of a
/// stream (and, when `kill_processor` names one, a SIGKILLed processor too), restarted; the
/// totals must be exact after each step.
fn scenario(d: &Deployment, data_dir: &Path, cloud: &mut [Process], kill_processor: Option<usize>) {
    let since = Utc::now().timestamp() - 120;
    let mut g = Generator::new(42, 97);
    let agent_config = d.write_agent_config("agent-1", "acme", data_dir, &Feed::ALL).unwrap();
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

    assert_no_secrets_in_logs(d);
}

/// No log of any process holds a secret: an enrollment token, a private key.
fn assert_no_secrets_in_logs(d: &Deployment) {
    let mut n_logs = 0;
    for entry in std::fs::read_dir(&d.root).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "log") {
            let log = std::fs::read_to_string(&path).unwrap();
            n_logs += 1;
            assert!(!log.contains("adt_"), "{} contains an enrollment token", path.display());
            assert!(!log.contains("PRIVATE KEY"), "{} contains a private key", path.display());
        }
    }
    assert!(n_logs > 0, "no logs were checked");
}

#[test]
fn embedded_mode_exact_totals_through_agent_sigkill() {
    let (_, data_dir, d) = deployment("embedded", None);
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
    let (_, data_dir, d) = deployment("kafka", Some(bootstrap));
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
fn enrollment_by_token_then_revocation_closes_the_agent_out_and_others_keep_working() {
    let (root, data_dir, d) = deployment("an", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(3, 0);
    let lines: Vec<Line> = (0..200).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    append_lines(&data_dir, &lines).unwrap();

    // An agent that never enrolled does not start, and says what to do.
    let stranger = d.write_agent_config("stranger", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let mut stranger = d.start_agent_unenrolled("stranger", &stranger).unwrap();
    wait_until(TIMEOUT, "the unenrolled agent to stop", || Ok(!stranger.is_running())).unwrap();
    assert!(log_of(&stranger).contains("edge-agent enroll"), "{}", log_of(&stranger));

    // Enrollment: the token works once; replayed by another agent, it is refused.
    let token = d.create_token("acme", "1h").unwrap();
    let good_config = d.write_agent_config("good", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let out = d.run_enroll(&good_config, &token).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = std::fs::read_dir(root.join("deploy/agent-good/identity"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions()) & 0o777, 0o600);
    let replay_config = d.write_agent_config("replay", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let out = d.run_enroll(&replay_config, &token).unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already used"), "{err}");
    assert!(!err.contains(&token), "the token is never echoed: {err}");

    let mut good = d.start_agent("good", &good_config).unwrap();
    assert_converges(&d, &lines, Utc::now().timestamp() - 120, &mut [&mut cloud, &mut good]);

    // Revoked: its connection closes within about a heartbeat interval (1 s here) and every
    // reconnection is refused.
    let out = std::process::Command::new(actidash_tests::harness::bin("cloud-aggregator").unwrap())
        .args(["agent", "revoke", "good", "--config"])
        .arg(d.cloud_config_path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let revoked_at = std::time::Instant::now();
    wait_until(TIMEOUT, "the revoked agent to be closed out", || Ok(log_of(&good).contains("was revoked"))).unwrap();
    assert!(revoked_at.elapsed() < Duration::from_secs(5), "revocation took {:?}", revoked_at.elapsed());
    wait_until(TIMEOUT, "its reconnection to be refused", || Ok(log_of(&good).contains("is revoked"))).unwrap();
    let before = d.totals().unwrap();
    append_lines(&data_dir, &(0..50).map(|_| g.line_for(Feed::Orders, Utc::now())).collect::<Vec<_>>()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(d.totals().unwrap(), before, "nothing from a revoked agent counts");
    good.kill();
    assert_no_secrets_in_logs(&d);
}

#[test]
fn certificates_are_renewed_before_they_expire_without_losing_data() {
    let (_, data_dir, mut d) = deployment("renew", None);
    // Certificates live 12 s: the agent renews at about 8 s, over its live session.
    d.cloud_extra = "\n[fleet]\ncert_validity_secs = 12\n".into();
    d.write_cloud_config().unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(5, 0);
    let config = d.write_agent_config("a1", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let mut lines: Vec<Line> = (0..300).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    append_lines(&data_dir, &lines).unwrap();
    let mut agent = d.start_agent("a1", &config).unwrap();
    let more: Vec<Line> = (0..600).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    lines.extend(more.iter().cloned());
    let writer = write_slowly(&data_dir, more, Duration::from_secs(18));
    // Twice over one live session: each renewed certificate is renewed in its turn.
    wait_until(Duration::from_secs(45), "the agent to renew its certificate twice", || {
        Ok(log_of(&agent).matches("certificate renewed").count() >= 2)
    })
    .unwrap();
    // Past the first certificates' end, the gateway restarts: the agent reconnects with the
    // newest certificate (the older ones would be refused as expired).
    cloud.kill();
    cloud.restart().unwrap();
    writer.join().unwrap();
    assert_converges(&d, &lines, Utc::now().timestamp() - 300, &mut [&mut cloud, &mut agent]);
    let cloud_log = std::fs::read_to_string(cloud.log_path()).unwrap();
    assert!(cloud_log.contains("certificate renewed"), "the gateway renewed it");
    assert_no_secrets_in_logs(&d);
}

#[test]
fn configuration_reload_adds_a_source_refuses_a_bad_file_and_loses_nothing() {
    let (_, data_dir, d) = deployment("reload", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let since = Utc::now().timestamp() - 120;
    let mut g = Generator::new(21, 0);
    let orders: Vec<Line> = (0..1_000).map(|_| g.line_for(Feed::Orders, Utc::now())).collect();
    let web: Vec<Line> = (0..1_000).map(|_| g.line_for(Feed::Web, Utc::now())).collect();
    append_lines(&data_dir, &orders).unwrap();
    append_lines(&data_dir, &web).unwrap();

    // At first the agent reads orders only.
    let config = d.write_agent_config("agent-1", "acme", &data_dir, &[Feed::Orders]).unwrap();
    let mut agent = d.start_agent("agent-1", &config).unwrap();
    assert_converges(&d, &orders, since, &mut [&mut cloud, &mut agent]);

    // A new source is added while the agent runs: the web feed arrives, orders are not re-read.
    d.write_agent_config("agent-1", "acme", &data_dir, &[Feed::Orders, Feed::Web]).unwrap();
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
