//! Prometheus metrics, for real: the gateway, the processor and the API as three processes on
//! Kafka, and an agent, each serving `/metrics`; what they say is checked against what was
//! sent, and every page passes `promtool check metrics`. The alert rules pass `promtool check
//! rules` and their unit tests (`promtool test rules`).

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use actidash_tests::generator::{Feed, Generator};
use actidash_tests::harness::{append_lines, bin, free_tcp_port, http_get, wait_until};
use common::{TIMEOUT, assert_converges, deployment, generate};
use serde_json::Value;

/// One sample of a scraped page: its name and labels.
#[derive(Debug, PartialEq)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// The samples of a page in the Prometheus text format (comments skipped).
fn samples(page: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in page.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let (series, value) = line.rsplit_once(' ').expect("a sample line is `series value`");
        let (name, labels) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once("=\"").expect("label=\"value\"");
                (k.to_owned(), v.trim_end_matches('"').to_owned())
            })
            .collect();
        out.push(Sample { name: name.to_owned(), labels, value: value.parse().expect("a number") });
    }
    out
}

/// The sum of the samples named `name` whose labels include `with`.
fn sum(page: &str, name: &str, with: &[(&str, &str)]) -> f64 {
    samples(page)
        .iter()
        .filter(|s| s.name == name && with.iter().all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v)))
        .map(|s| s.value)
        .sum()
}

fn promtool_check_metrics(promtool: &str, what: &str, page: &str) {
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), page.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics on the {what}'s page: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_role_and_the_agent_serve_metrics_that_count_what_happened() {
    let test = "every_role_and_the_agent_serve_metrics_that_count_what_happened";
    let (Some(bootstrap), Some(promtool)) = (actidash_tests::kafka_bootstrap(test), actidash_tests::promtool(test))
    else {
        return;
    };
    let (_, data_dir, d) = deployment("metrics", Some(bootstrap));
    let ports: BTreeMap<&str, u16> = ["gateway", "processor", "api", "agent"].map(|r| (r, free_tcp_port())).into();
    let listen = |role: &str| format!("127.0.0.1:{}", ports[role]);
    let mut gateway = d.start_cloud_with("gateway", &["gateway"], &["--metrics-listen", &listen("gateway")]).unwrap();
    let mut processor =
        d.start_cloud_with("processor", &["process"], &["--metrics-listen", &listen("processor")]).unwrap();
    let mut api = d.start_cloud_with("api", &["serve"], &["--metrics-listen", &listen("api")]).unwrap();
    d.wait_ready(TIMEOUT).unwrap();

    let since = chrono::Utc::now().timestamp() - 3600;
    let lines = generate(&mut Generator::new(41, 50), 3_000);
    append_lines(&data_dir, &lines).unwrap();
    let config = d
        .write_agent_config_with(
            "shop",
            "acme",
            &data_dir,
            &Feed::ALL,
            &format!("[metrics]\nlisten = \"{}\"\n", listen("agent")),
        )
        .unwrap();
    let mut agent = d.start_agent("agent", &config).unwrap();
    assert_converges(&d, &lines, since, &mut [&mut gateway, &mut processor, &mut api, &mut agent]);

    let n_valid = lines.iter().filter(|l| l.valid).count() as f64;
    let n_bad = lines.len() as f64 - n_valid;
    let page = |role: &str| http_get(ports[role], "/metrics");

    // The agent: every valid record spooled and acknowledged, every bad one counted, the
    // spool empty, connected; its figures are refreshed every two seconds.
    wait_until(TIMEOUT, "the agent's metrics to show everything shipped", || {
        let p = page("agent")?;
        Ok(sum(&p, "actidash_agent_shipped_events_total", &[]) == n_valid
            && sum(&p, "actidash_agent_source_events_total", &[]) == n_valid
            && sum(&p, "actidash_agent_spool_events", &[]) == 0.0)
    })
    .unwrap();
    let agent_page = page("agent").unwrap();
    assert_eq!(sum(&agent_page, "actidash_agent_source_bad_records_total", &[]), n_bad, "{agent_page}");
    for feed in Feed::ALL {
        let source = feed.source_id();
        let expected = lines.iter().filter(|l| l.valid && l.feed == feed).count() as f64;
        assert_eq!(sum(&agent_page, "actidash_agent_source_events_total", &[("source", source)]), expected);
        assert_eq!(sum(&agent_page, "actidash_agent_source_lag_seconds", &[("source", source)]), 0.0);
        assert_eq!(sum(&agent_page, "actidash_agent_source_state", &[("source", source)]), 1.0, "one state per source");
    }
    assert_eq!(sum(&agent_page, "actidash_agent_connected", &[]), 1.0);
    assert_eq!(sum(&agent_page, "actidash_agent_sessions_total", &[("transport", "quic")]), 1.0);
    assert!(sum(&agent_page, "actidash_agent_batch_events_count", &[]) >= 1.0);
    assert_eq!(
        sum(&agent_page, "actidash_agent_batch_events_sum", &[]),
        n_valid,
        "batch sizes add up to the events sent"
    );
    assert!(sum(&agent_page, "actidash_agent_certificate_expiry_timestamp_seconds", &[]) > since as f64);

    // The gateway: every event received for the tenant, produced to Kafka with its latency.
    let gateway_page = page("gateway").unwrap();
    assert_eq!(sum(&gateway_page, "actidash_gateway_events_total", &[("tenant", "acme")]), n_valid);
    assert_eq!(sum(&gateway_page, "actidash_gateway_batch_events_sum", &[]), n_valid);
    let batches = sum(&gateway_page, "actidash_gateway_produce_seconds_count", &[("sink", "kafka")]);
    assert_eq!(batches, sum(&gateway_page, "actidash_gateway_batch_events_count", &[]), "{gateway_page}");
    wait_until(TIMEOUT, "the gateway's counters to be copied", || {
        let p = page("gateway")?;
        Ok(sum(&p, "actidash_gateway_batches_acked_total", &[]) == batches
            && sum(&p, "actidash_gateway_connections", &[]) == 1.0)
    })
    .unwrap();

    // The processor: every event applied once, the consumer's lag per partition (librdkafka's
    // statistics, every five seconds) reported for every topic it reads, and down to zero on the
    // domain topics. The fleet topic takes a heartbeat a second while the agent is connected, so
    // its lag is whatever was in flight when the statistics were taken (0 or 1 here): only that
    // it is reported is checked.
    let fleet_topic = actidash_shared::kafka::fleet_topic(&d.topic_prefix);
    wait_until(TIMEOUT, "the processor's consumer lag to be reported, and zero on the domain topics", || {
        let p = page("processor")?;
        let lags: Vec<Sample> =
            samples(&p).into_iter().filter(|s| s.name == "actidash_kafka_consumer_lag_messages").collect();
        let (fleet, domains): (Vec<Sample>, Vec<Sample>) =
            lags.into_iter().partition(|s| s.labels["topic"] == fleet_topic);
        Ok(!fleet.is_empty() && !domains.is_empty() && domains.iter().all(|s| s.value == 0.0))
    })
    .unwrap();
    let processor_page = page("processor").unwrap();
    assert_eq!(sum(&processor_page, "actidash_processor_events_total", &[]), n_valid);
    assert_eq!(sum(&processor_page, "actidash_processor_duplicate_events_total", &[]), 0.0);
    assert!(sum(&processor_page, "actidash_store_commit_seconds_count", &[]) >= 1.0);
    assert!(sum(&processor_page, "actidash_processor_latency_seconds_count", &[]) >= 1.0);

    // The API: its requests by route, and the fleet's last heartbeats.
    wait_until(TIMEOUT, "the API's metrics to show the fleet", || {
        let p = page("api")?;
        Ok(sum(&p, "actidash_fleet_agent_last_heartbeat_timestamp_seconds", &[("tenant", "acme"), ("agent", "shop")])
            > since as f64)
    })
    .unwrap();
    let api_page = page("api").unwrap();
    assert!(
        sum(&api_page, "actidash_api_request_seconds_count", &[("route", "/api/v1/sales/totals"), ("status", "200")])
            >= 1.0,
        "{api_page}"
    );

    for (what, p) in
        [("agent", &agent_page), ("gateway", &gateway_page), ("processor", &processor_page), ("API", &api_page)]
    {
        promtool_check_metrics(&promtool, what, p);
    }

    // `cloud-aggregator status`: the one-shot JSON of each role, then the live view in a terminal.
    let status = |role: &str| -> Value {
        let out = Command::new(bin("cloud-aggregator").unwrap())
            .args(["status", "--once", "--json", "--metrics-url", &format!("http://{}/metrics", listen(role))])
            .arg("--config")
            .arg(d.cloud_config_path())
            .env("ACTIDASH_LOG", "warn")
            .output()
            .unwrap();
        assert!(out.status.success(), "status of the {role}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let g = status("gateway");
    assert_eq!(g["gateway_events"].as_f64(), Some(n_valid), "{g:#}");
    assert_eq!(g["gateway_connections"].as_f64(), Some(1.0), "{g:#}");
    // The data set holds bad records: the agent is degraded for a while, and named with why.
    assert_eq!(
        (g["fleet"]["agents"].as_u64(), g["fleet"]["by_state"]["degraded"].as_u64()),
        (Some(1), Some(1)),
        "{g:#}"
    );
    assert_eq!(g["fleet"]["attention"][0]["agent_id"], "shop", "{g:#}");
    assert!(g["fleet"]["attention"][0]["reason"].as_str().unwrap().contains("bad records"), "{g:#}");
    let p = status("processor");
    // Its lag sums every partition, the fleet topic's heartbeat in flight included (the status's
    // sum is checked by its unit test): here only that it is read.
    assert_eq!(p["processed_events"].as_f64(), Some(n_valid), "{p:#}");
    assert!(p["consumer_lag"].as_f64().is_some(), "{p:#}");
    assert!(p["store_commit_ms_mean"].as_f64().is_some_and(|ms| ms > 0.0), "{p:#}");
    let unreachable = Command::new(bin("cloud-aggregator").unwrap())
        .args(["status", "--once", "--metrics-url", &format!("http://127.0.0.1:{}/metrics", free_tcp_port())])
        .arg("--config")
        .arg(d.cloud_config_path())
        .output()
        .unwrap();
    assert!(!unreachable.status.success(), "a status without its metrics fails for scripts");
    assert!(String::from_utf8_lossy(&unreachable.stdout).contains("UNREACHABLE"));
    if let Some(tmux) = actidash_tests::tmux(test) {
        let session = format!("actidash-cloud-status-{}", std::process::id());
        let command = format!(
            "{} status --config {} --metrics-url http://{}/metrics",
            bin("cloud-aggregator").unwrap().display(),
            d.cloud_config_path().display(),
            listen("processor")
        );
        let started = Command::new(&tmux)
            .args(["new-session", "-d", "-s", &session, "-x", "180", "-y", "40", &command])
            .status()
            .unwrap();
        assert!(started.success());
        let screen = || {
            let out = Command::new(&tmux).args(["capture-pane", "-p", "-t", &session]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let expected = format!("process   {n_valid} events, 0/s");
        let seen = wait_until(TIMEOUT, "the live view to show the processor and the fleet", || {
            let s = screen();
            Ok(s.contains(&expected)
                && s.contains("lag 0 messages")
                && s.contains("1 agents: 1 degraded")
                && s.contains("bad records"))
        });
        let last = screen();
        let _ = Command::new(&tmux).args(["kill-session", "-t", &session]).status();
        seen.unwrap_or_else(|e| panic!("{e}; the screen:\n{last}"));
    }

    for p in [&mut agent, &mut gateway, &mut processor, &mut api] {
        assert!(p.terminate(Duration::from_secs(15)), "{} did not stop cleanly", p.name);
    }
}

#[test]
fn the_alert_rules_are_valid_and_their_unit_tests_pass() {
    let test = "the_alert_rules_are_valid_and_their_unit_tests_pass";
    let Some(promtool) = actidash_tests::promtool(test) else { return };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ops/prometheus");
    for args in [["check", "rules", "actidash-alerts.yml"], ["test", "rules", "actidash-alerts.test.yml"]] {
        let out = Command::new(&promtool).args(args).current_dir(&dir).output().unwrap();
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
