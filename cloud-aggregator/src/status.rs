//! `cloud-aggregator status`: what the cloud side is doing, for an operator at a terminal (a
//! live view refreshed every second, like `vector top`) or a script (`--once --json`).
//!
//! Two sources, both read-only: the running process's Prometheus endpoint (`[metrics] listen`,
//! or `--metrics-url`) for rates, connections, Kafka lag and latencies; and the serving store
//! with the fleet registry for every agent's health (as `/api/v1/fleet` derives it). Either may
//! be unreachable; the view says so rather than failing.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

use crate::health::State;
use crate::telemetry as t;

/// Samples of one scrape: each metric's value summed over its label sets.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    /// Reads the Prometheus text format; lines it cannot read are skipped.
    pub fn parse(text: &str) -> Scrape {
        let mut sums = BTreeMap::new();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
            // `name{labels} value [timestamp]`; label values may hold spaces.
            let (series, rest) = match line.rfind('}') {
                Some(end) => (&line[..=end], &line[end + 1..]),
                None => line.split_once(' ').unwrap_or((line, "")),
            };
            let name = series.split('{').next().unwrap_or(series).trim();
            let Some(value) = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()) else { continue };
            if value.is_finite() {
                *sums.entry(name.to_owned()).or_insert(0.0) += value;
            }
        }
        Scrape(sums)
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        self.0.get(name).copied()
    }

    /// The mean of a histogram (`_sum / _count`), in milliseconds for a histogram of seconds.
    fn mean_ms(&self, histogram: &str) -> Option<f64> {
        let (sum, count) = (self.get(&format!("{histogram}_sum"))?, self.get(&format!("{histogram}_count"))?);
        (count > 0.0).then(|| 1000.0 * sum / count)
    }
}

/// Fetches `url` (`http://host:port/path`); the body.
pub fn fetch(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let rest = url.strip_prefix("http://").with_context(|| format!("{url}: only http:// is read"))?;
    let (host, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let addr = std::net::ToSocketAddrs::to_socket_addrs(host)
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host}: no address"))?;
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).with_context(|| format!("connecting to {url}"))?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.take(64 * 1024 * 1024).read_to_end(&mut response).with_context(|| format!("reading {url}"))?;
    let response = String::from_utf8_lossy(&response);
    let (head, body) = response.split_once("\r\n\r\n").with_context(|| format!("{url}: not an HTTP response"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("");
    anyhow::ensure!(status == "200", "{url}: HTTP {status}");
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    Ok(if chunked { dechunk(body) } else { body.to_owned() })
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16) else { break };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

/// The fleet in a line: agents by state, and those that need a look.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FleetSummary {
    pub agents: usize,
    pub by_state: BTreeMap<String, usize>,
    /// Agents not healthy (at most [`MAX_ATTENTION`]), with their first reason.
    pub attention: Vec<Attention>,
}

/// Most agents listed as needing a look.
pub const MAX_ATTENTION: usize = 10;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Attention {
    pub tenant: String,
    pub agent_id: String,
    pub state: State,
    pub reason: String,
}

/// Where the fleet is read from: the registry (revocations) and the serving store.
pub struct FleetSource {
    fleet: crate::fleet::Fleet,
    store: crate::store::Store,
    offline_after: chrono::Duration,
}

impl FleetSource {
    pub fn open(config: &crate::config::CloudConfig) -> anyhow::Result<FleetSource> {
        Ok(FleetSource {
            fleet: crate::fleet::Fleet::open(&config.data_dir, &config.fleet)?,
            store: config.store_location()?.open_reader()?,
            offline_after: chrono::Duration::seconds(
                config.serve.as_ref().map_or(60, |s| i64::try_from(s.agent_offline_after_secs).unwrap_or(i64::MAX)),
            ),
        })
    }
}

/// Reads every agent's health from the store and the registry.
pub fn fleet(source: &mut FleetSource) -> anyhow::Result<FleetSummary> {
    let revoked = source.fleet.revoked()?;
    let rows = source.store.read(|tx| crate::store::query::fleet(tx, None))?;
    let offline_after = source.offline_after;
    let now = chrono::Utc::now();
    let mut summary = FleetSummary { agents: rows.len(), ..FleetSummary::default() };
    for row in rows {
        let (a, _, health) = crate::health::of_row(row, &revoked, now, offline_after);
        *summary.by_state.entry(health.state.as_str().to_owned()).or_insert(0) += 1;
        if health.state != State::Healthy && summary.attention.len() < MAX_ATTENTION {
            summary.attention.push(Attention {
                tenant: a.tenant,
                agent_id: a.agent_id,
                state: health.state,
                reason: health.reasons.first().map(|r| r.message.clone()).unwrap_or_default(),
            });
        }
    }
    Ok(summary)
}

/// The whole view: `--once --json` prints it as it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct View {
    pub metrics_url: Option<String>,
    /// Why the metrics could not be read, if they could not.
    pub metrics_error: Option<String>,
    pub gateway_connections: Option<f64>,
    pub gateway_events: Option<f64>,
    pub gateway_events_per_sec: Option<f64>,
    pub gateway_auth_failures: Option<f64>,
    pub gateway_refused_events: Option<f64>,
    pub produce_ms_mean: Option<f64>,
    pub processed_events: Option<f64>,
    pub processed_per_sec: Option<f64>,
    pub duplicates: Option<f64>,
    pub bad_records: Option<f64>,
    /// Messages behind, summed over the partitions this process consumes (Kafka mode).
    pub consumer_lag: Option<f64>,
    pub processing_latency_ms_mean: Option<f64>,
    pub store_commit_ms_mean: Option<f64>,
    pub api_request_ms_mean: Option<f64>,
    pub fleet: Option<FleetSummary>,
    /// Why the fleet could not be read, if it could not.
    pub fleet_error: Option<String>,
}

/// The view of a scrape (rates against `before`, taken `secs` earlier).
pub fn view(now: &Scrape, before: Option<(&Scrape, f64)>) -> View {
    let rate = |name: &str| {
        let (then, secs) = before?;
        let d = now.get(name)? - then.get(name).unwrap_or(0.0);
        (secs > 0.0 && d >= 0.0).then(|| d / secs)
    };
    View {
        gateway_connections: now.get(t::GATEWAY_CONNECTIONS),
        gateway_events: now.get(t::GATEWAY_EVENTS),
        gateway_events_per_sec: rate(t::GATEWAY_EVENTS),
        gateway_auth_failures: now.get("actidash_gateway_auth_failures_total"),
        gateway_refused_events: now.get("actidash_gateway_refused_events_total"),
        produce_ms_mean: now.mean_ms(t::PRODUCE_SECONDS),
        processed_events: now.get(t::PROCESSOR_EVENTS),
        processed_per_sec: rate(t::PROCESSOR_EVENTS),
        duplicates: now.get(t::PROCESSOR_DUPLICATES),
        bad_records: now.get(t::PROCESSOR_BAD_RECORDS),
        consumer_lag: now.get(t::CONSUMER_LAG),
        processing_latency_ms_mean: now.mean_ms(t::PROCESSOR_LATENCY_SECONDS),
        store_commit_ms_mean: now.mean_ms(t::STORE_COMMIT_SECONDS),
        api_request_ms_mean: now.mean_ms(t::API_REQUEST_SECONDS),
        ..View::default()
    }
}

fn num(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}"))
}

fn per_sec(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.0}/s"))
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} ms"))
}

/// The view as text for a terminal.
pub fn render(v: &View) -> String {
    let mut out = String::new();
    match (&v.metrics_url, &v.metrics_error) {
        (None, _) => out.push_str("metrics   none: set [metrics] listen, or give --metrics-url\n"),
        (Some(url), Some(e)) => out.push_str(&format!("metrics   UNREACHABLE at {url}: {e}\n")),
        (Some(url), None) => out.push_str(&format!("metrics   {url}\n")),
    }
    if v.metrics_url.is_some() && v.metrics_error.is_none() {
        out.push_str(&format!(
            "gateway   {} connections, {} events, {}, {} refused events, {} failed hellos, produce {}\n",
            num(v.gateway_connections),
            num(v.gateway_events),
            per_sec(v.gateway_events_per_sec),
            num(v.gateway_refused_events),
            num(v.gateway_auth_failures),
            ms(v.produce_ms_mean)
        ));
        out.push_str(&format!(
            "process   {} events, {}, {} duplicates, {} bad records, lag {} messages, latency {}, commit {}\n",
            num(v.processed_events),
            per_sec(v.processed_per_sec),
            num(v.duplicates),
            num(v.bad_records),
            num(v.consumer_lag),
            ms(v.processing_latency_ms_mean),
            ms(v.store_commit_ms_mean)
        ));
        out.push_str(&format!("api       requests {}\n", ms(v.api_request_ms_mean)));
    }
    match (&v.fleet, &v.fleet_error) {
        (Some(f), _) => {
            let states: Vec<String> = f.by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
            out.push_str(&format!("fleet     {} agents: {}\n", f.agents, states.join(", ")));
            for a in &f.attention {
                out.push_str(&format!("  {:<24} {:<10} {:<9} {}\n", a.agent_id, a.tenant, a.state.as_str(), a.reason));
            }
        }
        (None, Some(e)) => out.push_str(&format!("fleet     UNREADABLE: {e}\n")),
        (None, None) => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP actidash_gateway_events_total Events.\n# TYPE actidash_gateway_events_total counter\n\
        actidash_gateway_events_total{tenant=\"acme\"} 100\nactidash_gateway_events_total{tenant=\"a b}c\"} 50\n\
        actidash_gateway_connections 3\nactidash_store_commit_seconds_sum 0.5\nactidash_store_commit_seconds_count 100\n\
        actidash_kafka_consumer_lag_messages{partition=\"0\"} 7\nactidash_kafka_consumer_lag_messages{partition=\"1\"} 5\n\
        garbage line\nactidash_processor_events_total NaN\n";

    #[test]
    fn a_scrape_sums_label_sets_and_rates_come_from_two() {
        let now = Scrape::parse(PAGE);
        assert_eq!(now.get("actidash_gateway_events_total"), Some(150.0), "label values may hold braces and spaces");
        assert_eq!(now.get("actidash_kafka_consumer_lag_messages"), Some(12.0));
        assert_eq!(now.get("garbage"), None);
        assert_eq!(now.get("actidash_processor_events_total"), None, "not a number: left out");
        let before = Scrape::parse(&PAGE.replace("} 100", "} 80"));
        let v = view(&now, Some((&before, 2.0)));
        assert_eq!(v.gateway_events_per_sec, Some(10.0));
        assert_eq!(v.store_commit_ms_mean, Some(5.0));
        assert_eq!(view(&now, None).gateway_events_per_sec, None, "one scrape: no rate");
        let text = render(&View { metrics_url: Some("http://x/metrics".into()), ..v });
        assert!(text.contains("3 connections, 150 events, 10/s") && text.contains("lag 12 messages"), "{text}");
    }

    #[test]
    fn chunked_bodies_are_joined() {
        assert_eq!(dechunk("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"), "hello world");
    }
}
