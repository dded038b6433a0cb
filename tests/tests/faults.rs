//! Fault tests of store-and-forward: the link down while data keeps arriving, the gateway
//! SIGKILLed mid-batch, a full spool, UDP blocked. Each ends with the API's totals equal to the
//! input's, exactly.

mod common;

use std::time::Duration;

use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{append_lines, wait_until};
use chrono::Utc;
use common::{TIMEOUT, assert_converges, deployment, generate, log_of, write_slowly};

fn since() -> i64 {
    Utc::now().timestamp() - 120
}

/// The orders source's status in the (only) agent's last heartbeat, as the API serves it.
fn orders_source(d: &actidash_tests::harness::Deployment) -> anyhow::Result<serde_json::Value> {
    let agents = d.get("/api/v1/agents")?;
    let sources = agents[0]["heartbeat"]["sources"].as_array().cloned().unwrap_or_default();
    Ok(sources.into_iter().find(|s| s["source_id"] == "orders").unwrap_or_default())
}

/// One count of a source's status.
fn count(source: &serde_json::Value, name: &str) -> u64 {
    source[name].as_u64().unwrap_or(0)
}

#[test]
fn link_down_while_data_keeps_arriving_then_back() {
    let (_, data, d) = deployment("link-down", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(11, 0);
    let mut lines = generate(&mut g, 2_000);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    let since = since();
    assert_converges(&d, &lines, since, &mut [&mut cloud, &mut agent]);

    // The cloud goes away; the on-prem systems keep writing.
    cloud.kill();
    let more = generate(&mut g, 4_000);
    lines.extend(more.iter().cloned());
    write_slowly(&data, more, Duration::from_secs(3)).join().unwrap();
    wait_until(TIMEOUT, "the agent to notice the outage", || Ok(log_of(&agent).contains("shipping interrupted")))
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    cloud.restart().unwrap();
    assert_converges(&d, &lines, since, &mut [&mut cloud, &mut agent]);
}

#[test]
fn gateway_killed_mid_batch_with_kafka() {
    let Some(bootstrap) = actidash_tests::kafka_bootstrap("gateway_killed_mid_batch_with_kafka") else { return };
    let (_, data, d) = deployment("gateway-kill", Some(bootstrap));
    let mut gateway = d.start_cloud("gateway", &["gateway"]).unwrap();
    let mut rest = d.start_cloud("processor-api", &["process", "serve"]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    let mut g = Generator::new(12, 0);
    let lines = generate(&mut g, 8_000);
    let writer = write_slowly(&data, lines.clone(), Duration::from_secs(4));
    std::thread::sleep(Duration::from_millis(1_500));
    gateway.kill();
    std::thread::sleep(Duration::from_millis(700));
    gateway.restart().unwrap();
    writer.join().unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut gateway, &mut rest, &mut agent]);
}

#[test]
fn a_full_spool_pauses_the_sources_then_drains_without_loss() {
    let (_, data, d) = deployment("spool-full", None);
    // The agent starts while the cloud is unreachable, with a 1 MiB spool and ~2.4 MB of input.
    let config = d.write_agent_config_with("a1", "acme", &data, &Feed::ALL, "[spool]\nmax_bytes = 1048576\n").unwrap();
    let mut g = Generator::new(13, 0);
    let lines: Vec<Line> = generate(&mut g, 6_000);
    append_lines(&data, &lines).unwrap();
    // Enrolled while the cloud was up; then the cloud goes away.
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.enroll(&config).unwrap();
    assert!(cloud.terminate(Duration::from_secs(15)));
    let mut agent = d.start_agent("agent", &config).unwrap();
    wait_until(TIMEOUT, "a source to pause on the full spool", || {
        Ok(log_of(&agent).contains("spool full: source paused"))
    })
    .unwrap();
    assert!(agent.is_running(), "a full spool must not stop the agent");
    cloud.restart().unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    assert!(log_of(&agent).contains("spool has room again: source resumed"));
    let agents = d.get("/api/v1/agents").unwrap();
    let dropped: i64 = agents[0]["heartbeat"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["n_dropped"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(dropped, 0, "pause mode drops nothing");
}

#[test]
fn udp_blocked_the_agent_falls_back_to_tcp_by_itself() {
    let (_, data, mut d) = deployment("udp-blocked", None);
    // The gateway's TCP fallback listens on a port where nothing answers UDP: to the agent,
    // exactly what a network that drops UDP looks like.
    d.gateway_tcp_port = actidash_tests::harness::free_tcp_port();
    d.agent_port = d.gateway_tcp_port;
    d.write_cloud_config().unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(14, 0);
    let lines = generate(&mut g, 2_000);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    let log = log_of(&agent);
    assert!(log.contains("using the TCP fallback"), "{log}");
    wait_until(TIMEOUT, "the fleet view to show the TCP transport", || {
        let agents = d.get("/api/v1/agents")?;
        Ok(agents[0]["transport"] == "tcp" && agents[0]["heartbeat"]["transport"] == "tcp")
    })
    .unwrap();
}

#[test]
fn processors_joining_and_leaving_the_group_count_everything_once() {
    let Some(bootstrap) =
        actidash_tests::kafka_bootstrap("processors_joining_and_leaving_the_group_count_everything_once")
    else {
        return;
    };
    let (_, data, d) = deployment("rebalance", Some(bootstrap));
    let mut gateway = d.start_cloud("gateway", &["gateway"]).unwrap();
    let mut first = d.start_cloud("processor-1", &["process", "serve"]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    let mut g = Generator::new(15, 0);
    let lines = generate(&mut g, 9_000);
    let writer = write_slowly(&data, lines.clone(), Duration::from_secs(6));
    // A second processor joins the group mid-stream (a rebalance hands it partitions)...
    std::thread::sleep(Duration::from_millis(1_500));
    let mut second = d.start_cloud("processor-2", &["process"]).unwrap();
    wait_until(TIMEOUT, "the second processor to get partitions", || {
        Ok(std::fs::read_to_string(second.log_path())?.contains("partition assigned"))
    })
    .unwrap();
    // ...then the first one dies without a goodbye: its partitions move again.
    first.kill();
    writer.join().unwrap();
    let mut api = d.start_cloud("api", &["serve"]).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut gateway, &mut second, &mut api, &mut agent]);
}

#[test]
fn the_leader_of_a_partition_killed_during_ingest_on_a_three_broker_cluster() {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let Some((bootstrap, dir)) =
        actidash_tests::kafka_cluster("the_leader_of_a_partition_killed_during_ingest_on_a_three_broker_cluster")
    else {
        return;
    };
    let (_, data, mut d) = deployment("leader-kill", Some(bootstrap.clone()));
    d.kafka_extra = "replication_factor = 3\nmin_insync_replicas = 2\n".into();
    d.write_cloud_config().unwrap();
    let mut gateway = d.start_cloud("gateway", &["gateway"]).unwrap();
    let mut processor = d.start_cloud("processor", &["process"]).unwrap();
    let mut api = d.start_cloud("api", &["serve"]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    let mut g = Generator::new(17, 0);
    let lines = generate(&mut g, 9_000);
    let writer = write_slowly(&data, lines.clone(), Duration::from_secs(6));
    std::thread::sleep(Duration::from_millis(1_500));

    // The leader of the sales topic's partition 0, as the cluster reports it, is SIGKILLed.
    let consumer: BaseConsumer = rdkafka::ClientConfig::new().set("bootstrap.servers", &bootstrap).create().unwrap();
    let topic = format!("{}.sales", d.topic_prefix);
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)).unwrap();
    let partition = &metadata.topics()[0].partitions()[0];
    assert_eq!(partition.replicas().len(), 3, "created with replication factor 3");
    let leader = partition.leader();
    let pid = std::fs::read_to_string(dir.join(format!("broker-{leader}/pid"))).unwrap();
    let status = std::process::Command::new("kill").args(["-9", pid.trim()]).status().unwrap();
    assert!(status.success());
    drop(consumer);

    writer.join().unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut gateway, &mut processor, &mut api, &mut agent]);
    let log = std::fs::read_to_string(gateway.log_path()).unwrap();
    assert!(log.contains("replication_factor=3"), "the topics were created by the gateway with RF 3");
}

/// An overlapping rollout: a second agent started on the first one's data folder refuses to
/// start, naming the first's pid, and the totals stay exact (nothing read twice).
#[test]
fn a_second_agent_on_the_same_data_folder_refuses_to_start() {
    let (_, data, d) = deployment("two-agents", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(15, 0);
    let lines = generate(&mut g, 1_000);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut first = d.start_agent("agent", &config).unwrap();
    wait_until(TIMEOUT, "the first agent to start", || Ok(log_of(&first).contains("agent started"))).unwrap();
    let mut second = d.start_agent_unenrolled("agent-again", &config).unwrap();
    wait_until(TIMEOUT, "the second agent to stop", || Ok(!second.is_running())).unwrap();
    let said = log_of(&second);
    assert!(said.contains(&format!("is in use by another agent (pid {})", first.pid())), "{said}");
    assert!(first.is_running());
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut first]);
}

/// An order too big for the gateway to deliver (here: a batch limit of 64 KiB; with Kafka,
/// its message limit). Spooled while the agent did not know the limit (started while the cloud
/// was down), it is quarantined by the shipper once the gateway states it; read after, it is a
/// bad record. Either way it is counted, never sent again for ever, and everything else
/// arrives exactly.
#[test]
fn an_event_bigger_than_the_gateway_can_deliver_is_refused_not_resent_for_ever() {
    let (_, data, mut d) = deployment("too-big", None);
    d.gateway_extra = "max_batch_bytes = 65536\n".into();
    d.write_cloud_config().unwrap();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let big = |id: &str| {
        let items: Vec<serde_json::Value> = (0..1_500)
            .map(|i| serde_json::json!({ "sku": format!("SKU-{i:05}"), "quantity": 1, "unit_price": "1.00" }))
            .collect();
        let order = serde_json::json!({
            "id": id, "created_at": Utc::now().to_rfc3339(), "customer": { "id": "C-1" }, "channel": "web",
            "site": "shop-de", "country": "DE", "currency": "EUR", "total": "1500.00", "status": "placed", "lines": items,
        });
        Line { feed: Feed::Orders, text: order.to_string(), valid: false }
    };
    let mut g = Generator::new(16, 0);
    let mut lines = generate(&mut g, 300);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);

    // The cloud down, the agent restarted: it has no limit to go by and spools the big order.
    cloud.kill();
    agent.kill();
    let mut more = generate(&mut g, 200);
    more.insert(50, big("BIG-1"));
    append_lines(&data, &more).unwrap();
    lines.extend(more);
    agent.restart().unwrap();
    let n_orders = lines.iter().filter(|l| l.feed == Feed::Orders).count() as u64;
    wait_until(TIMEOUT, "the big order to be spooled", || {
        let out = std::process::Command::new(actidash_tests::harness::bin("edge-agent")?)
            .args(["spool", "inspect", "--config"])
            .arg(&config)
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let next_seq = text
            .lines()
            .find(|l| l.starts_with("orders "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(next_seq == n_orders)
    })
    .unwrap();
    cloud.restart().unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    let refused = |d: &actidash_tests::harness::Deployment| -> anyhow::Result<(u64, u64)> {
        let orders = orders_source(d)?;
        Ok((count(&orders, "n_errors"), count(&orders, "n_quarantined")))
    };
    wait_until(TIMEOUT, "the spooled big order to be quarantined", || Ok(refused(&d)? == (0, 1))).unwrap();

    // Connected, the limit is known: the next one is a bad record.
    let mut more = generate(&mut g, 200);
    more.insert(50, big("BIG-2"));
    append_lines(&data, &more).unwrap();
    lines.extend(more);
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    wait_until(TIMEOUT, "the read big order to be a bad record", || Ok(refused(&d)? == (1, 1))).unwrap();
    let said = log_of(&agent);
    assert!(said.contains("spooled event quarantined"), "{said}");
    assert!(said.contains("bad record skipped") && said.contains("larger than the gateway can deliver"), "{said}");
}

/// A configuration copied from another site names another tenant than the agent's
/// certificate: refused at reload (the running configuration goes on, and so does delivery)
/// and at start, each time saying which identity the certificate holds.
#[test]
fn a_configuration_naming_another_tenant_is_refused_at_start_and_at_reload() {
    let (_, data, d) = deployment("wrong-tenant", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(17, 0);
    let mut lines = generate(&mut g, 300);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "retailer", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);

    let says = r#"the configuration says tenant = "other", but this agent's certificate"#;
    d.write_agent_config("a1", "other", &data, &Feed::ALL).unwrap();
    wait_until(TIMEOUT, "the reload to be refused", || Ok(log_of(&agent).contains(says))).unwrap();
    assert!(log_of(&agent).contains(r#"was issued to agent "a1" of tenant "retailer""#), "{}", log_of(&agent));
    let more = generate(&mut g, 200);
    append_lines(&data, &more).unwrap();
    lines.extend(more);
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);

    agent.kill();
    agent.restart().unwrap();
    wait_until(TIMEOUT, "the agent to refuse to start", || Ok(!agent.is_running())).unwrap();
    let said = log_of(&agent);
    assert_eq!(said.matches(says).count(), 2, "refused at start too: {said}");
}

/// A poison event in the spool, ahead of good ones (spooled under another tenant, as a
/// copy-pasted configuration did before the agent checked it): the gateway refuses its batch
/// for good, the agent moves it aside with the reason and goes on — the good events arrive
/// exactly, without a reconnection loop — and the operator exports, then purges it.
#[test]
fn a_refused_batch_is_moved_aside_and_the_next_events_go_on() {
    let (_, data, d) = deployment("poison", None);
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(18, 0);
    let mut lines = generate(&mut g, 300);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);

    // Stopped; a poison event spooled for the orders source, next in line.
    agent.kill();
    {
        let mut spool = edge_agent::spool::Spool::open(&d.root.join("agent-a1/spool.db")).unwrap();
        let state = spool.source_state("orders").unwrap();
        use actidash_shared::event::{Event, OrderStatus, Payload, SalesOrder};
        let poison = Event::new(
            "other".into(),
            "a1".into(),
            "orders".into(),
            state.next_seq,
            Utc::now(),
            Payload::Sales(SalesOrder {
                order_id: "POISON-1".into(),
                customer_id: "C-1".into(),
                channel: "web".into(),
                site: "shop-de".into(),
                country: "DE".into(),
                currency: "EUR".into(),
                amount: actidash_shared::Money::parse("99").unwrap(),
                items: vec![],
                status: OrderStatus::Placed,
            }),
        );
        spool.append("orders", &[poison.to_json()], &state.position, 0).unwrap();
    }
    let more = generate(&mut g, 300);
    append_lines(&data, &more).unwrap();
    lines.extend(more);
    agent.restart().unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    let refused =
        |d: &actidash_tests::harness::Deployment| -> anyhow::Result<u64> { Ok(count(&orders_source(d)?, "n_refused")) };
    wait_until(TIMEOUT, "the heartbeat to count the refused event", || Ok(refused(&d)? == 1)).unwrap();
    let by_reason = orders_source(&d).unwrap()["refused_by_reason"].clone();
    assert_eq!(by_reason, serde_json::json!({ "foreign_tenant": 1 }), "counted by reason in the heartbeat");
    let said = log_of(&agent);
    assert_eq!(said.matches("events refused by the gateway for good").count(), 1, "{said}");
    assert_eq!(said.matches("connected to the gateway").count(), 2, "one connection per start, no loop: {said}");

    // The operator's view: inspect, export, purge.
    let cli = |args: &[&str]| -> String {
        let out = std::process::Command::new(actidash_tests::harness::bin("edge-agent").unwrap())
            .args(args)
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let inspect = cli(&["spool", "inspect"]);
    assert!(inspect.contains("[foreign_tenant]: event ") && inspect.contains("claims tenant \"other\""), "{inspect}");
    assert!(inspect.contains("refused by reason: foreign_tenant 1"), "{inspect}");
    let exported = cli(&["spool", "refused", "export"]);
    let rows: Vec<serde_json::Value> = exported.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 1, "{exported}");
    assert_eq!((rows[0]["source_id"].as_str(), rows[0]["event"]["tenant"].as_str()), (Some("orders"), Some("other")));
    assert!(rows[0]["reason"].as_str().unwrap().contains("this agent belongs to \"acme\""), "{exported}");
    assert_eq!(rows[0]["kind"], "foreign_tenant", "{exported}");
    assert_eq!(cli(&["spool", "refused", "purge"]).trim(), "purged 1 refused events");
    assert_eq!(cli(&["spool", "refused", "export"]), "");
}

/// Version skew: a gateway that reads only an older event schema (the test override of an
/// older release) and an agent writing the current one. The agent holds its events — nothing
/// is refused or lost — and reports why in its heartbeat; once a gateway that reads them is
/// back, it delivers them exactly.
#[test]
fn an_agent_holds_what_the_gateway_cannot_read_then_delivers_it_to_one_that_can() {
    let (_, data, d) = deployment("schema-skew", None);
    let cloud_bin = actidash_tests::harness::bin("cloud-aggregator").unwrap();
    let config_path = d.cloud_config_path();
    let older = actidash_tests::harness::Process::start(
        "cloud-older",
        std::path::Path::new("/usr/bin/env"),
        &[
            "ACTIDASH_TEST_SCHEMA_VERSIONS=0",
            cloud_bin.to_str().unwrap(),
            "run",
            "--config",
            config_path.to_str().unwrap(),
        ],
        &d.root.join("cloud-older.log"),
    );
    let mut older = older.unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let mut g = Generator::new(19, 0);
    let lines = generate(&mut g, 500);
    append_lines(&data, &lines).unwrap();
    let config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    let holding = |d: &actidash_tests::harness::Deployment| -> anyhow::Result<String> {
        let agents = d.get("/api/v1/agents")?;
        Ok(agents[0]["heartbeat"]["holding"].as_str().unwrap_or("").to_owned())
    };
    wait_until(TIMEOUT, "the agent to report that it holds its events", || {
        Ok(holding(&d)?.contains("waiting for the cloud to support event schema v1"))
    })
    .unwrap();
    assert_eq!(d.get("/api/v1/stats").unwrap()["events_applied"].as_i64().unwrap_or(0), 0, "nothing sent");

    // The current gateway is back: everything arrives, exactly; nothing was refused.
    older.kill();
    let mut cloud = d.start_cloud("cloud", &[]).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
    wait_until(TIMEOUT, "the hold to be over", || Ok(holding(&d)?.is_empty())).unwrap();
    let said = log_of(&agent);
    assert!(said.contains("holding events") && !said.contains("refused by the gateway"), "{said}");
}

/// Out of descriptors (issue 17, high 2): a gateway under a descriptor limit of 256 with the
/// default `max_connections` of 10 000 lowers it at start (and says so), keeps descriptors in
/// reserve, and under a flood of 600 held connections refuses the excess without flooding its
/// log, while its API and registry keep working; once the flood ends an agent delivers exactly.
#[test]
fn a_flood_of_connections_under_a_low_descriptor_limit_leaves_the_gateway_working() {
    let (_, data, mut d) = deployment("descriptors", None);
    // The flood comes from one address: lift that address's budget to reach the global limit.
    d.gateway_extra = "max_unauthenticated_per_address = 100000\n".into();
    d.write_cloud_config().unwrap();
    let cloud_bin = actidash_tests::harness::bin("cloud-aggregator").unwrap();
    let config = d.cloud_config_path();
    let mut cloud = actidash_tests::harness::Process::start(
        "cloud",
        std::path::Path::new("/bin/sh"),
        &[
            "-c",
            "ulimit -n 256 && exec \"$0\" run --config \"$1\"",
            cloud_bin.to_str().unwrap(),
            config.to_str().unwrap(),
        ],
        &d.root.join("cloud.log"),
    )
    .unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let said = log_of(&cloud);
    assert!(said.contains("max_connections lowered to stay below the descriptor limit"), "{said}");
    assert!(said.contains("lowered_to=176"), "256 less a reserve of 80: {said}");

    // 600 connections held open (TCP, no TLS): the first 176 take every slot, the rest are refused.
    let started = std::time::Instant::now();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], d.gateway_tcp_port));
    let flood: Vec<std::net::TcpStream> =
        (0..600).filter_map(|_| std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()).collect();
    assert!(flood.len() > 176, "connections are accepted and refused, not left waiting: {}", flood.len());
    // The API (its own descriptors) answers during the flood, and the registry keeps being read
    // (revocations spread): two refreshes of the revoked set (every half heartbeat, 500 ms).
    wait_until(TIMEOUT, "the API to answer during the flood", || Ok(d.get("/api/v1/stats").is_ok())).unwrap();
    std::thread::sleep(Duration::from_millis(1_200));
    let said = log_of(&cloud);
    assert!(!said.contains("cannot read the revoked agents"), "{said}");
    assert!(!said.contains("accepting a TCP connection failed"), "never out of descriptors: {said}");
    let warnings = said.matches("connection refused: too many connections").count() as u64;
    let seconds = started.elapsed().as_secs() + 1;
    assert!((1..=seconds).contains(&warnings), "refusals warned at most once a second: {warnings} in {seconds} s");
    drop(flood);

    let mut g = Generator::new(23, 0);
    let lines = generate(&mut g, 300);
    append_lines(&data, &lines).unwrap();
    let agent_config = d.write_agent_config("a1", "acme", &data, &Feed::ALL).unwrap();
    let mut agent = d.start_agent("agent", &agent_config).unwrap();
    assert_converges(&d, &lines, since(), &mut [&mut cloud, &mut agent]);
}

/// Log forging without authentication (issue 17, medium 5): an agent id holding a newline and
/// a convincing log line, in a hello or an enrollment from a client without a certificate, is
/// logged escaped on one line: the forged line never starts a line of the gateway's log.
#[test]
fn identifiers_with_newlines_cannot_forge_log_lines() {
    use actidash_shared::wire::{Enroll, Frame, Hello, PROTOCOL_VERSION};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (_, _data, d) = deployment("forging", None);
    let cloud = d.start_cloud("cloud", &[]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();
    let forged_line =
        "2026-12-02T00:00:00.000000Z  INFO cloud_aggregator::gateway: agent enrolled agent_id=forged tenant=acme";
    let forged = format!("x\n{forged_line}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], d.gateway_tcp_port));
    let tls = edge_agent::identity::client_tls(&d.root.join("certs/ca.pem"), None).unwrap();
    let frames = [
        Frame::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_id: forged.clone(),
            agent_version: "test".into(),
            refusals: false,
            config: None,
        }),
        Frame::Enroll(Enroll {
            protocol_version: PROTOCOL_VERSION,
            agent_id: forged.clone(),
            token: "adt_x".into(),
            csr_pem: "-".into(),
        }),
    ];
    for frame in frames {
        rt.block_on(async {
            let mut stream = edge_agent::transport::quic::connect_tcp(addr, "localhost", tls.clone()).await.unwrap();
            let mut bytes = bytes::BytesMut::new();
            frame.encode(&mut bytes);
            stream.write_all(&bytes).await.unwrap();
            // The gateway answers with an error and closes.
            let mut answer = Vec::new();
            let _ = tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer)).await;
        });
    }
    wait_until(TIMEOUT, "both refusals to be logged", || {
        let said = log_of(&cloud);
        Ok(said.contains("agent refused") && said.contains("enrollment refused"))
    })
    .unwrap();
    let said = log_of(&cloud);
    assert!(!said.lines().any(|l| l.starts_with("2026-12-02T00:00:00.000000Z")), "a forged line: {said}");
    let escaped = format!("x\\n{}", &forged_line[..20]);
    assert_eq!(said.matches(&escaped).count(), 2, "both logged escaped on their own line: {said}");
}
