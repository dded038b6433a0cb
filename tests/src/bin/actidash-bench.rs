//! `actidash-bench`: the benchmarks of `../shared/TARGETS.md` (P1, P2, P3, P7, P8), each
//! measured beside its baseline in the same run. Prints a Markdown report; `scripts/bench.sh`
//! runs it with a Kafka broker and writes docs/BENCHMARKS.md.
//!
//! Events are realistic e-commerce JSON of about 400 bytes (orders and web events from the
//! generator). These are measurements, not tests: nothing here asserts a figure.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use actidash_shared::event::Event;
use actidash_tests::generator::{Feed, Generator, Line};
use actidash_tests::harness::{Deployment, Process, append_lines, wait_until};
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_agent::mapping::MappingConfig;
use edge_agent::sources::file::fileset::{FileSet, FileSetConfig, SetPosition};
use edge_agent::sources::file::tailer::{Encoding, TailItem};
use edge_agent::spool::{Durability, Spool, SpoolConfig};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message as _};

#[derive(Parser, Debug)]
#[command(about = "ActiDash benchmarks (see ../shared/TARGETS.md)")]
struct Args {
    /// Working folder.
    #[arg(long, default_value = "target/bench")]
    dir: PathBuf,
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// P1 and P3: file tail -> map -> SQLite spool, beside the same path into a memory queue.
    Spool {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
    },
    /// The cost per event of each in-process hop of P2 (map, pack, unpack and check, decode),
    /// one thread, best of seven spells: where the time goes, steadier than an end-to-end rate.
    Hops {
        #[arg(long, default_value_t = 2_000)]
        events: usize,
    },
    /// P2 (and P8's drain rate): file -> spool -> QUIC -> gateway -> Kafka, beside raw
    /// librdkafka produce of the same events. Needs ACTIDASH_KAFKA_BOOTSTRAP.
    Pipeline {
        #[arg(long, default_value_t = 300_000)]
        events: usize,
        /// Rounds of each path (agent, raw produce, rsyslog), interleaved; the report gives the
        /// median and the spread.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// P8: a backlog spooled during an outage, drained when the gateway returns. Needs
    /// ACTIDASH_KAFKA_BOOTSTRAP.
    Backlog {
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
    },
    /// P7: the agent's RSS and CPU, idle and at a steady rate.
    Footprint {
        #[arg(long, default_value_t = 10_000)]
        rate: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// P4: the processor (Kafka -> decode -> sessions, attribution, roll-ups -> serving store)
    /// beside a consumer that only decodes, on the same topics. Needs ACTIDASH_KAFKA_BOOTSTRAP.
    Processor {
        #[arg(long, default_value_t = 200_000)]
        events: usize,
    },
    /// P5: freshness, a record appended on-prem -> visible through the API, under load (embedded).
    Freshness {
        /// Background load, records per second (about half the processor's sustained rate, P4).
        #[arg(long, default_value_t = 15_000)]
        rate: usize,
        #[arg(long, default_value_t = 60)]
        probes: usize,
    },
    /// P6: dashboard queries at 20/s during ingest over 30 days of roll-ups, on SQLite and, with
    /// ACTIDASH_PG_URL, on PostgreSQL.
    Api {
        /// Events spread over the 30 days loaded first.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
    },
    /// P8: time from the gateway's return to the agent's reconnection.
    Reconnect {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let dir = std::fs::canonicalize(&args.dir)?;
    match args.bench {
        Bench::Spool { events } => bench_spool(&dir.join("spool"), events),
        Bench::Hops { events } => bench_hops(events),
        Bench::Pipeline { events, rounds } => bench_pipeline(&dir.join("pipeline"), events, rounds),
        Bench::Backlog { events } => bench_backlog(&dir.join("backlog"), events),
        Bench::Footprint { rate, seconds, rounds } => bench_footprint(&dir.join("footprint"), rate, seconds, rounds),
        Bench::Reconnect { rounds } => bench_reconnect(&dir.join("reconnect"), rounds),
        Bench::Processor { events } => bench_processor(&dir.join("processor"), events),
        Bench::Freshness { rate, probes } => bench_freshness(&dir.join("freshness"), rate, probes),
        Bench::Api { events, seconds } => {
            bench_api(&dir.join("api-sqlite"), None, events, seconds)?;
            match std::env::var("ACTIDASH_PG_URL") {
                Ok(admin) => {
                    let url = actidash_tests::fresh_postgres_database(&admin, "actidash_bench_api")?;
                    bench_api(&dir.join("api-postgres"), Some(url), events, seconds)
                }
                Err(_) => {
                    println!("(PostgreSQL not measured: ACTIDASH_PG_URL is not set)\n");
                    Ok(())
                }
            }
        }
    }
}

fn fresh(dir: &Path) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    Ok(())
}

/// ~400-byte events: the order feed (orders are the heaviest and the ones that matter).
fn order_lines(n: usize, seed: u64) -> Vec<Line> {
    let mut g = Generator::new(seed, 0);
    let now = chrono::Utc::now();
    (0..n).map(|_| g.line_for(Feed::Orders, now)).collect()
}

fn mean_len(lines: &[Line]) -> usize {
    lines.iter().map(|l| l.text.len()).sum::<usize>() / lines.len().max(1)
}

fn order_mapping() -> anyhow::Result<MappingConfig> {
    let text = Feed::Orders.source_toml(Path::new("/unused"));
    let table: toml::Table = toml::from_str(&text)?;
    let mapping = table["sources"][0]["mapping"].clone();
    Ok(mapping.try_into()?)
}

enum Sink {
    Memory(VecDeque<Vec<u8>>),
    Spool(Box<Spool>),
}

/// Tails `file` to its end through the agent's real file set, tailer and mapping into `sink`;
/// events/s.
fn tail_into(file: &Path, mapping: &MappingConfig, mut sink: Sink) -> anyhow::Result<(usize, f64)> {
    let cfg = FileSetConfig {
        include: vec![file.display().to_string()],
        exclude: Vec::new(),
        fingerprint_bytes: 1024,
        release_after: Duration::from_secs(5),
        close_inactive: Duration::from_secs(300),
        forget_after: Duration::from_secs(86_400),
        max_record_bytes: 1 << 20,
        encoding: Encoding::Utf8,
    };
    let mut files = FileSet::new(cfg, SetPosition::default()).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    files.scan(started, 0);
    let mut seq = 0u64;
    loop {
        let round = files.poll(Instant::now(), 5_000);
        if round.items.is_empty() {
            break;
        }
        let mut bodies = Vec::with_capacity(round.items.len());
        for item in round.items.into_iter().map(|fi| fi.item) {
            if let TailItem::Line { bytes, .. } = item {
                let (time, payload) = mapping.apply_str(std::str::from_utf8(&bytes)?)?;
                bodies.push(Event::new("t".into(), "a".into(), "orders".into(), seq, time, payload).to_json());
                seq += 1;
            }
        }
        match &mut sink {
            Sink::Memory(q) => {
                q.extend(bodies);
                // A bounded queue drained by a shipper: keep it from growing without limit.
                while q.len() > 100_000 {
                    q.pop_front();
                }
            }
            Sink::Spool(s) => {
                let position = serde_json::to_string(&files.position(|_| None))?;
                s.append("orders", &bodies, &position, 0)?;
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    Ok((seq as usize, seq as f64 / secs))
}

fn bench_spool(dir: &Path, n: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let lines = order_lines(n, 1);
    let file = dir.join("orders.jsonl");
    append_lines(dir, &lines)?;
    let mapping = order_mapping()?;
    let big = SpoolConfig { max_bytes: 1 << 40, ..SpoolConfig::default() };

    // Three rounds, the paths interleaved, medians reported: this machine is noisy.
    let power_cfg = SpoolConfig { durability: Durability::Power, ..big };
    let (mut memory, mut process, mut power) = (Vec::new(), Vec::new(), Vec::new());
    let mut count = 0;
    for round in 0..3 {
        memory.push(tail_into(&file, &mapping, Sink::Memory(VecDeque::new()))?.1);
        let spool = Spool::open_with(&dir.join(format!("process-{round}.db")), big)?;
        process.push(tail_into(&file, &mapping, Sink::Spool(Box::new(spool)))?.1);
        let spool = Spool::open_with(&dir.join(format!("power-{round}.db")), power_cfg)?;
        let (n, rate) = tail_into(&file, &mapping, Sink::Spool(Box::new(spool)))?;
        power.push(rate);
        count = n;
    }
    let (memory, process, power) = (median(memory), median(process), median(power));

    // Append-and-acknowledge: the spool's full cycle, in batches of 1 000.
    let mut spool = Spool::open_with(&dir.join("cycle.db"), big)?;
    let bodies: Vec<Vec<u8>> = lines.iter().take(1_000).map(|l| l.text.clone().into_bytes()).collect();
    let started = Instant::now();
    let rounds = (n / 1_000).max(1);
    for _ in 0..rounds {
        let first = spool.append("s", &bodies, "{}", 0)?;
        let rows = spool.read("s", first, 1_000, usize::MAX)?;
        spool.ack("s", first, rows.len() as u32)?;
    }
    let cycle = (rounds * 1_000) as f64 / started.elapsed().as_secs_f64();

    println!(
        "### P1, P3: file tail -> map -> spool, one thread ({count} events of {} bytes on average; median of 3 interleaved rounds)\n",
        mean_len(&lines)
    );
    println!("| path | events/s | vs memory queue |");
    println!("|---|---:|---:|");
    println!("| memory queue (baseline) | {memory:.0} | 100 % |");
    println!("| SQLite spool, WAL, durability = process | {process:.0} | {:.0} % |", 100.0 * process / memory);
    println!(
        "| SQLite spool, WAL, durability = power (fsync per commit) | {power:.0} | {:.0} % |",
        100.0 * power / memory
    );
    println!("\nSpool append + read + acknowledge cycle, batches of 1 000: **{cycle:.0} events/s**.\n");
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn kafka_bootstrap() -> anyhow::Result<String> {
    std::env::var("ACTIDASH_KAFKA_BOOTSTRAP").context("set ACTIDASH_KAFKA_BOOTSTRAP (scripts/bench.sh starts Kafka)")
}

/// Sum of the high watermarks of `topics` (3 partitions each).
fn produced(consumer: &BaseConsumer, topics: &[String]) -> anyhow::Result<i64> {
    let mut total = 0;
    for topic in topics {
        total += high_watermarks(consumer, topic, &partitions(consumer, topic)?)?;
    }
    Ok(total)
}

/// The partitions of `topic`; an error while it does not exist. (The broker answers for a
/// topic it does not have with an error inside the metadata, not a failed request: read as
/// no partitions, the waits for a gateway to create its topics returned at once and the
/// processor bench could produce before they existed.)
fn partitions(consumer: &BaseConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(5))?;
    let t = metadata.topics().iter().find(|t| t.name() == topic);
    let t = t.ok_or_else(|| anyhow::anyhow!("no metadata for {topic}"))?;
    if let Some(e) = t.error() {
        anyhow::bail!("{topic}: {e:?}");
    }
    anyhow::ensure!(!t.partitions().is_empty(), "{topic} has no partitions yet");
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// The events in `partitions` of `topic`: the sum of their high watermarks.
fn high_watermarks(consumer: &BaseConsumer, topic: &str, partitions: &[i32]) -> anyhow::Result<i64> {
    let mut total = 0;
    for &p in partitions {
        total += consumer.fetch_watermarks(topic, p, Duration::from_secs(5))?.1;
    }
    Ok(total)
}

/// The median and the spread (lowest, highest) of `v`, as "median (low–high)".
fn spread(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.0} ({lo:.0}–{hi:.0})", median(v.to_vec()))
}

/// The hops of P2 that run in one thread of one process, each timed on the same `n` order
/// events (batches of `n`, as the agent packs them).
fn bench_hops(n: usize) -> anyhow::Result<()> {
    use actidash_shared::batch;
    use actidash_shared::event::{EventView, event_json};
    use actidash_shared::wire::{Batch, Codec};
    let mapping = order_mapping()?;
    let lines = order_lines(n, 2);
    let mut data = String::new();
    let mut jsons = Vec::with_capacity(n);
    for (seq, line) in lines.iter().enumerate() {
        let (time, payload) = mapping.apply_view(&line.text, &mut data)?;
        jsons.push(event_json("acme", "bench", "orders", seq as u64, &time, &payload)?);
    }
    let payload = batch::pack(jsons.iter().map(Vec::as_slice), Codec::Zstd);
    let packed = Batch {
        source_id: "orders".into(),
        first_seq: 0,
        count: n as u32,
        codec: Codec::Zstd,
        payload: payload.clone().into(),
    };
    // Nanoseconds per event of `f` over all `n` events: the best of seven spells (the fastest
    // is the one the machine disturbed least).
    let time = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<f64> {
        f()?;
        let mut best = f64::MAX;
        for _ in 0..7 {
            let started = Instant::now();
            for _ in 0..20 {
                f()?;
            }
            best = best.min(started.elapsed().as_nanos() as f64 / (20 * n) as f64);
        }
        Ok(best)
    };
    let mut rows: Vec<(&str, f64)> = Vec::new();
    rows.push((
        "agent: map a record (read its JSON, assemble and check the payload, write the event)",
        time(&mut || {
            for (seq, line) in lines.iter().enumerate() {
                let (time, payload) = mapping.apply_view(&line.text, &mut data)?;
                std::hint::black_box(event_json("acme", "bench", "orders", seq as u64, &time, &payload)?);
            }
            Ok(())
        })?,
    ));
    rows.push((
        "agent: pack a batch (zstd level 1)",
        time(&mut || {
            std::hint::black_box(batch::pack(jsons.iter().map(Vec::as_slice), Codec::Zstd));
            Ok(())
        })?,
    ));
    rows.push((
        "gateway: unpack a batch (decompress, check every event, borrowing)",
        time(&mut || {
            let unpacked = batch::unpack_each(&packed, "bench", "acme", 64 << 20, 1 << 20)?;
            anyhow::ensure!(unpacked.events.len() == n, "{} events unpacked of {n}", unpacked.events.len());
            Ok(())
        })?,
    ));
    rows.push((
        "gateway: check an event alone (EventView::parse)",
        time(&mut || {
            for json in &jsons {
                std::hint::black_box(EventView::parse(json)?);
            }
            Ok(())
        })?,
    ));
    rows.push((
        "processor: decode an event whole (Event::from_json, owned)",
        time(&mut || {
            for json in &jsons {
                std::hint::black_box(Event::from_json(json)?);
            }
            Ok(())
        })?,
    ));
    println!(
        "### Hops of P2 in one thread ({n} order events of {} bytes, {} as JSON events; best of 7 spells)\n",
        mean_len(&lines),
        jsons.iter().map(Vec::len).sum::<usize>() / n.max(1)
    );
    println!("| hop | ns/event |");
    println!("|---|---:|");
    for (hop, ns) in rows {
        println!("| {hop} | {ns:.0} |");
    }
    println!(
        "\nzstd: {} bytes of events packed into {} ({:.1}x).\n",
        jsons.iter().map(|j| j.len() + 1).sum::<usize>(),
        payload.len(),
        jsons.iter().map(|j| j.len() + 1).sum::<usize>() as f64 / payload.len() as f64
    );
    Ok(())
}

/// [`spread`] to a tenth.
fn spread1(v: &[f64]) -> String {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{:.1} ({lo:.1}–{hi:.1})", median(v.to_vec()))
}

/// A drain, from the first count above zero to the count that reached what was wanted.
struct Drain {
    first_at: Instant,
    first: i64,
    done_at: Instant,
}

impl Drain {
    /// Events/s over the drain, for `want` events in all.
    fn rate(&self, want: i64) -> f64 {
        (want - self.first) as f64 / (self.done_at - self.first_at).as_secs_f64()
    }
}

/// Times a drain of `want` events: `count` is asked every 5 ms (None: no count this time, asked
/// again; an error ends the wait), and `at` is called at the first count above zero and at the
/// one that reaches `want` (for CPU readings). A path drains in one or two seconds, and counting
/// every 200 ms, as `wait_until` does, put its rate on steps of 10–15 % (the last events seen up
/// to 200 ms late).
fn time_drain(
    what: &str,
    want: i64,
    timeout: Duration,
    mut count: impl FnMut() -> anyhow::Result<Option<i64>>,
    mut at: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Drain> {
    let deadline = Instant::now() + timeout;
    let mut first: Option<(Instant, i64)> = None;
    loop {
        let counted = count()?;
        let now = Instant::now();
        if let Some(n) = counted {
            if n > 0 && first.is_none() {
                first = Some((now, n));
                at()?;
            }
            if n >= want {
                at()?;
                let (first_at, first) = first.context("nothing was counted")?;
                anyhow::ensure!(first < want, "all {want} of {what} came between two counts");
                return Ok(Drain { first_at, first, done_at: now });
            }
        }
        anyhow::ensure!(now < deadline, "timed out waiting for {want} of {what} (last count: {counted:?})");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `want` more events than `base` are in `topic`; events/s from the first event
/// there to the last (so start-up and handshakes do not count).
fn timed_arrival(
    consumer: &BaseConsumer,
    topic: &str,
    base: i64,
    want: i64,
    alive: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    // The partitions once: a count is then one watermark request per partition.
    let mut partitions: Vec<i32> = Vec::new();
    let mut count = || -> anyhow::Result<i64> {
        if partitions.is_empty() {
            partitions = self::partitions(consumer, topic)?;
        }
        Ok(high_watermarks(consumer, topic, &partitions)? - base)
    };
    let mut progress = (Instant::now(), 0);
    let counted = || -> anyhow::Result<Option<i64>> {
        alive()?;
        // A failed count (a broker busy electing a leader, say) is tried again.
        let counted = count();
        if let Ok(n) = counted
            && n > progress.1
        {
            progress = (Instant::now(), n);
        }
        anyhow::ensure!(
            progress.0.elapsed() < Duration::from_secs(60),
            "stalled at {} of {want} events in {topic} (last count: {counted:?})",
            progress.1
        );
        Ok(counted.ok())
    };
    let drain = time_drain(&format!("the events in {topic}"), want, Duration::from_secs(900), counted, || Ok(()))?;
    Ok(drain.rate(want))
}

/// rsyslog (Debian's rsyslogd with rsyslog-kafka): `imfile` reading `file` from its start,
/// `omkafka` writing each line to `topic` with the raw producer's settings. None when rsyslogd
/// or its Kafka module is not installed.
fn start_rsyslog(dir: &Path, file: &Path, bootstrap: &str, topic: &str) -> anyhow::Result<Option<Process>> {
    let (Ok(rsyslogd), true) = (which("rsyslogd"), Path::new("/usr/lib/x86_64-linux-gnu/rsyslog/omkafka.so").exists())
    else {
        return Ok(None);
    };
    fresh(dir)?;
    std::fs::create_dir_all(dir.join("work"))?;
    let conf = dir.join("rsyslog.conf");
    std::fs::write(
        &conf,
        format!(
            r#"global(workDirectory="{work}" maxMessageSize="64k")
module(load="imfile" mode="inotify")
module(load="omkafka")
template(name="line" type="string" string="%msg%")
ruleset(name="to_kafka") {{
  action(type="omkafka" broker=["{bootstrap}"] topic="{topic}" template="line" partitions.auto="on"
         resubmitOnFailure="on" action.resumeRetryCount="-1"
         confParam=["enable.idempotence=true", "acks=all", "compression.codec=lz4", "linger.ms=5",
                    "queue.buffering.max.messages=1000000"])
}}
input(type="imfile" file="{file}" tag="orders" ruleset="to_kafka" freshStartTail="off" readMode="0")
"#,
            work = dir.join("work").display(),
            file = file.display(),
        ),
    )?;
    let pid_file = dir.join("rsyslogd.pid");
    let args = ["-n", "-f", conf.to_str().context("path")?, "-i", pid_file.to_str().context("path")?];
    Ok(Some(Process::start("rsyslogd", &rsyslogd, &args, &dir.join("rsyslogd.log"))?))
}

fn which(program: &str) -> anyhow::Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| format!("{program} not found"))
}

/// The gateway of `d` on Kafka, a consumer to count what reaches its topics, and its sales
/// topic, once the gateway has created it.
fn start_gateway(d: &Deployment, bootstrap: &str) -> anyhow::Result<(Process, BaseConsumer, String)> {
    let gateway = d.start_cloud("gateway", &["gateway"])?;
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", bootstrap).set("group.id", "bench-probe").create()?;
    let topic = format!("{}.sales", d.topic_prefix);
    wait_until(Duration::from_secs(60), "the gateway to create its topics", || {
        Ok(produced(&consumer, std::slice::from_ref(&topic)).is_ok())
    })?;
    Ok((gateway, consumer, topic))
}

fn bench_pipeline(dir: &Path, n: usize, rounds: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let bootstrap = kafka_bootstrap()?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    let lines = order_lines(n, 2);
    append_lines(&data, &lines)?;
    let d = Deployment::new(&dir.join("deploy"), Some(bootstrap.clone()))?;
    let (mut gateway, consumer, topic) = start_gateway(&d, &bootstrap)?;

    // The same events, as the raw producer sends them.
    let mapping = order_mapping()?;
    let events: Vec<Event> = lines
        .iter()
        .enumerate()
        .map(|(seq, l)| {
            let (time, payload) = mapping.apply_str(&l.text)?;
            Ok(Event::new("acme".into(), "bench".into(), "orders".into(), seq as u64, time, payload))
        })
        .collect::<anyhow::Result<_>>()?;
    // The same topic the gateway writes to (it exists, with its partitions), the same settings.
    let producer = raw_producer(&bootstrap, &[("message.timeout.ms", "0")])?;
    // Warm the broker up (a fresh JVM is slow for its first seconds), untimed.
    raw_produce(&producer, &topic, &events[..events.len() / 2])?;

    // Rounds, each path once per round in turn, so that a slow spell of the machine falls on
    // all of them.
    let (mut ours, mut raw, mut peer) = (Vec::new(), Vec::new(), Vec::new());
    // CPU time per event (µs, every thread of the process): steadier than a rate on a shared
    // machine, and what each hop costs.
    let (mut agent_cpu, mut gateway_cpu, mut raw_cpu, mut peer_cpu) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let per_event = |seconds: f64| seconds * 1e6 / n as f64;
    let me = std::process::id();
    // rsyslog's topic, like the gateway's: 3 partitions.
    let rsyslog_topic = format!("{}.rsyslog", d.topic_prefix);
    let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).create()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let created = runtime.block_on(admin.create_topics(
        &[rdkafka::admin::NewTopic::new(&rsyslog_topic, 3, rdkafka::admin::TopicReplication::Fixed(1))],
        &rdkafka::admin::AdminOptions::new(),
    ))?;
    for r in created {
        r.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    let mut peer_note = String::new();
    for round in 0..rounds {
        let base = produced(&consumer, std::slice::from_ref(&topic))?;
        let config = d.write_agent_config(&format!("bench{round}"), "acme", &data, &[Feed::Orders])?;
        let gateway0 = proc_usage(gateway.pid())?.1;
        let mut agent = d.start_agent(&format!("agent{round}"), &config)?;
        let rate = timed_arrival(&consumer, &topic, base, n as i64, &mut || {
            anyhow::ensure!(agent.is_running() && gateway.is_running(), "a process died; see {}", d.root.display());
            Ok(())
        })?;
        agent_cpu.push(per_event(proc_usage(agent.pid())?.1));
        gateway_cpu.push(per_event(proc_usage(gateway.pid())?.1 - gateway0));
        agent.terminate(Duration::from_secs(10));
        eprintln!("round {round}: agent -> gateway -> Kafka {rate:.0} events/s");
        ours.push(rate);

        let started = Instant::now();
        let cpu0 = proc_usage(me)?.1;
        raw_produce(&producer, &topic, &events)?;
        raw.push(n as f64 / started.elapsed().as_secs_f64());
        raw_cpu.push(per_event(proc_usage(me)?.1 - cpu0));
        eprintln!("round {round}: raw produce {:.0} events/s", raw[raw.len() - 1]);

        let base = produced(&consumer, std::slice::from_ref(&rsyslog_topic)).unwrap_or(0);
        match start_rsyslog(&dir.join("rsyslog"), &data.join("orders.jsonl"), &bootstrap, &rsyslog_topic)? {
            Some(mut rsyslogd) => {
                let rate = timed_arrival(&consumer, &rsyslog_topic, base, n as i64, &mut || {
                    anyhow::ensure!(rsyslogd.is_running(), "rsyslogd died; see {}", dir.join("rsyslog").display());
                    Ok(())
                })?;
                peer_cpu.push(per_event(proc_usage(rsyslogd.pid())?.1));
                rsyslogd.terminate(Duration::from_secs(10));
                eprintln!("round {round}: rsyslog {rate:.0} events/s");
                peer.push(rate);
            }
            None => peer_note = "rsyslog not measured: Debian's rsyslog and rsyslog-kafka are not installed".into(),
        }
    }
    gateway.terminate(Duration::from_secs(10));

    let ratio: Vec<f64> = ours.iter().zip(&raw).map(|(o, r)| 100.0 * o / r).collect();
    println!(
        "### P2: file -> spool -> QUIC -> gateway -> Kafka ({n} events of {} bytes: a backlog drained, timed from the first event in Kafka to the last; {rounds} rounds, median (lowest–highest))\n",
        mean_len(&lines)
    );
    println!("| path | events/s | vs raw produce (per round) |");
    println!("|---|---:|---:|");
    println!(
        "| raw librdkafka produce, one process (baseline; idempotent, acks=all, lz4, linger 5 ms) | {} | 100 % |",
        spread(&raw)
    );
    println!("| agent -> gateway -> Kafka, end to end | {} | {} % |", spread(&ours), spread(&ratio));
    if peer.is_empty() {
        println!("\n{peer_note}\n");
    } else {
        let ratio: Vec<f64> = peer.iter().zip(&raw).map(|(o, r)| 100.0 * o / r).collect();
        println!(
            "| rsyslog: imfile -> omkafka (the raw lines, no key, no durable queue; idempotent, acks=all, lz4, linger 5 ms) | {} | {} % |\n",
            spread(&peer),
            spread(&ratio)
        );
    }
    let sum: Vec<f64> = agent_cpu.iter().zip(&gateway_cpu).map(|(a, g)| a + g).collect();
    println!(
        "CPU time per event, every thread of the process (the broker's not counted), µs, median (lowest–highest):\n"
    );
    println!("| process | µs/event |");
    println!("|---|---:|");
    println!("| raw produce (the bench process: JSON, key, librdkafka) | {} |", spread1(&raw_cpu));
    println!("| edge-agent: tail, map, spool, read, compress, QUIC | {} |", spread1(&agent_cpu));
    println!("| cloud-aggregator gateway: QUIC, decompress, check, produce | {} |", spread1(&gateway_cpu));
    println!("| agent + gateway | {} |", spread1(&sum));
    if !peer_cpu.is_empty() {
        println!("| rsyslogd: imfile, omkafka | {} |", spread1(&peer_cpu));
    }
    println!();
    Ok(())
}

/// P8: a backlog of `n` events spooled while the gateway is down, drained when it returns.
fn bench_backlog(dir: &Path, n: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let bootstrap = kafka_bootstrap()?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    for chunk in order_lines(n, 5).chunks(100_000) {
        append_lines(&data, chunk)?;
    }
    let d = Deployment::new(&dir.join("deploy"), Some(bootstrap.clone()))?;
    // Enrolled while the gateway is up, then the outage: the agent spools the whole export.
    let (mut gateway, consumer, topic) = start_gateway(&d, &bootstrap)?;
    let config =
        d.write_agent_config_with("backlog", "acme", &data, &[Feed::Orders], "[spool]\nmax_bytes = 4294967296\n")?;
    let cfg = edge_agent::config::AgentConfig::load(&config)?;
    d.enroll(&config)?;
    gateway.kill();
    let spooling = Instant::now();
    let mut agent = d.start_agent_unenrolled("agent", &config)?;
    // The spool's own running count, read every 5 ms (the agent's status file, rewritten every
    // 2 s, put this figure on 2-second steps).
    let spool = cfg.data_dir.join(edge_agent::SPOOL_FILE);
    let mut in_spool = DbCount::new(&spool, "SELECT n_events FROM totals WHERE id = 1");
    let drain = time_drain(
        "the events spooled",
        n as i64,
        Duration::from_secs(900),
        || {
            anyhow::ensure!(agent.is_running(), "the agent died; see {}", d.root.display());
            Ok(Some(in_spool.count()))
        },
        || Ok(()),
    )?;
    let spooled = n as f64 / (drain.done_at - spooling).as_secs_f64();
    drop(in_spool);
    wait_until(Duration::from_secs(10), "the agent's status to show the spool", || {
        Ok(edge_agent::status::read(&cfg.data_dir).is_ok_and(|s| s.heartbeat.spool_events >= n as u64))
    })?;
    let spool_bytes = edge_agent::status::read(&cfg.data_dir)?.heartbeat.spool_bytes;

    let base = produced(&consumer, std::slice::from_ref(&topic))?;
    let returned = Instant::now();
    gateway.restart()?;
    let mut first_seen = None;
    let rate = timed_arrival(&consumer, &topic, base, n as i64, &mut || {
        anyhow::ensure!(agent.is_running() && gateway.is_running(), "a process died; see {}", d.root.display());
        if first_seen.is_none() && produced(&consumer, std::slice::from_ref(&topic))? > base {
            first_seen = Some(returned.elapsed());
        }
        Ok(())
    })?;
    let whole = returned.elapsed();
    agent.terminate(Duration::from_secs(10));
    gateway.terminate(Duration::from_secs(10));
    println!("### P8: a backlog of {n} events spooled during an outage, drained when the gateway returns\n");
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| spooled while cut off | {spooled:.0} events/s ({:.0} MiB in the spool) |",
        spool_bytes as f64 / 1048576.0
    );
    println!("| gateway start -> first event in Kafka | {:.1} s |", first_seen.unwrap_or_default().as_secs_f64());
    println!("| drain, first event in Kafka -> last | {rate:.0} events/s |");
    println!("| gateway start -> whole backlog in Kafka | {:.1} s |\n", whole.as_secs_f64());
    Ok(())
}

/// A count read from a SQLite database (`sql`, one integer) through one read-only connection,
/// opened once the database exists; 0 before that.
struct DbCount<'a> {
    db: &'a Path,
    sql: &'static str,
    conn: Option<rusqlite::Connection>,
}

impl<'a> DbCount<'a> {
    fn new(db: &'a Path, sql: &'static str) -> DbCount<'a> {
        DbCount { db, sql, conn: None }
    }

    fn count(&mut self) -> i64 {
        if self.conn.is_none() {
            self.conn = rusqlite::Connection::open_with_flags(self.db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).ok();
        }
        let Some(conn) = &self.conn else { return 0 };
        conn.query_row(self.sql, [], |r| r.get(0)).unwrap_or(0)
    }
}

fn bench_processor(dir: &Path, n: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let bootstrap = kafka_bootstrap()?;
    let d = Deployment::new(&dir.join("deploy"), Some(bootstrap.clone()))?;
    // The gateway creates the topics (3 partitions each), then leaves.
    let mut gateway = d.start_cloud("gateway", &["gateway"])?;
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", &bootstrap).set("group.id", "bench-probe").create()?;
    let topics: Vec<String> =
        actidash_shared::Domain::ALL.iter().map(|dm| format!("{}.{dm}", d.topic_prefix)).collect();
    wait_until(Duration::from_secs(60), "the gateway to create its topics", || {
        Ok(produced(&consumer, &topics).is_ok())
    })?;
    gateway.terminate(Duration::from_secs(10));

    // Realistic, joined events of six sources (orders, page views, touches, stock), produced
    // as the gateway writes them.
    let start = chrono::Utc::now() - chrono::Duration::hours(6);
    let records = actidash_tests::dataset::generate(3, n, start, 6 * 3_600_000, 20, 600_000);
    let mean = records.iter().map(|r| r.event.to_json().len()).sum::<usize>() / n.max(1);
    let producer = raw_producer(&bootstrap, &[])?;
    for topic in &topics {
        let of_topic: Vec<Event> =
            records.iter().filter(|r| topic.ends_with(r.event.domain().as_str())).map(|r| r.event.clone()).collect();
        raw_produce(&producer, topic, &of_topic)?;
    }

    let in_kafka = produced(&consumer, &topics)?;
    anyhow::ensure!(in_kafka >= n as i64, "only {in_kafka} of {n} events are in Kafka");
    // Baseline: a consumer of the same topics that decodes every event and does nothing else.
    let noop: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .set("group.id", format!("{}-noop", d.topic_prefix))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    noop.subscribe(&topics.iter().map(String::as_str).collect::<Vec<_>>())?;
    // This process does nothing else meanwhile: its CPU time over the span is the consumer's
    // (its thread and librdkafka's).
    let (mut decoded, mut first) = (0_usize, None);
    let deadline = Instant::now() + Duration::from_secs(600);
    let me = std::process::id();
    let mut noop_cpu0 = 0.0;
    while decoded < n {
        // `poll` also returns None after serving a rebalance: only the deadline ends the wait.
        anyhow::ensure!(Instant::now() < deadline, "the no-op consumer read {decoded} of {n} events");
        if let Some(m) = noop.poll(Duration::from_millis(500)) {
            let m = m?;
            if first.is_none() {
                first = Some(Instant::now());
                noop_cpu0 = proc_usage(me)?.1;
            }
            Event::from_json(m.payload().unwrap_or_default())?;
            decoded += 1;
        }
    }
    let noop_rate = n as f64 / first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    let noop_per_core = n as f64 / (proc_usage(me)?.1 - noop_cpu0).max(1e-9);
    drop(noop);

    // The processor, alone in its process: from its first commit to the last event applied,
    // with the CPU it used over that span.
    let store = d.root.join("cloud-data").join("serving.db");
    let processor = d.start_cloud("processor", &["process"])?;
    // 200 000 events take ~1.5 s: counted every 5 ms, through one read-only connection.
    // Events applied by the processors: the serving store's counters (0 before the first commit).
    let mut applied =
        DbCount::new(&store, "SELECT coalesce(sum(value), 0) FROM stat_counters WHERE name = 'events_applied'");
    let mut cpu_at: Vec<f64> = Vec::new();
    let drain = time_drain(
        "the events applied",
        n as i64,
        Duration::from_secs(1800),
        || Ok(Some(applied.count())),
        || {
            cpu_at.push(proc_usage(processor.pid())?.1);
            Ok(())
        },
    )?;
    let cpu = cpu_at[1] - cpu_at[0];
    let rate = drain.rate(n as i64);
    let per_core = (n as i64 - drain.first) as f64 / cpu.max(1e-9);
    drop(processor);

    // The peer: Kafka Streams counting the same sessions (30-minute gap) with exactly_once_v2,
    // on the behavior topic (scripts/kafka-streams, built by scripts/bench.sh).
    let behavior_topic = format!("{}.behavior", d.topic_prefix);
    let n_behavior = records.iter().filter(|r| r.event.domain() == actidash_shared::Domain::Behavior).count();
    let streams = match std::env::var("ACTIDASH_KSTREAMS_CP") {
        Ok(cp) => {
            let out = std::process::Command::new("java")
                .args(["-Xmx1g", "-cp", &cp, "dev.actidash.bench.SessionCount", &bootstrap, &behavior_topic])
                .arg(n_behavior.to_string())
                .arg(format!("{}-streams", d.topic_prefix))
                .arg(dir.join("streams-state"))
                .output()?;
            let text = String::from_utf8_lossy(&out.stdout);
            let rate: f64 =
                text.lines().find_map(|l| l.strip_prefix("RATE ")).and_then(|r| r.trim().parse().ok()).with_context(
                    || format!("Kafka Streams gave no rate: {text} {}", String::from_utf8_lossy(&out.stderr)),
                )?;
            Some(rate)
        }
        Err(_) => None,
    };

    println!("### P4: processor, Kafka -> decode -> sessions, attribution, roll-ups -> SQLite serving store ({n} events of {mean} bytes from 6 sources, 4 topics of 3 partitions, one processor)
");
    println!("| path | events/s | per core (CPU s) | vs no-op |");
    println!("|---|---:|---:|---:|");
    println!("| no-op consumer: poll + decode, one thread (baseline) | {noop_rate:.0} | {noop_per_core:.0} | 100 % |");
    println!("| processor, every metric on | {rate:.0} | {per_core:.0} | {:.1} % |", 100.0 * rate / noop_rate);
    match streams {
        Some(s) => println!(
            "| Kafka Streams, sessions only (30-min session windows, exactly_once_v2), behavior topic only ({n_behavior} events) | {s:.0} | | {:.1} % |\n\nActiDash's processor / Kafka Streams: {:.2}x.\n",
            100.0 * s / noop_rate,
            rate / s
        ),
        None => {
            println!("\n(Kafka Streams not measured: ACTIDASH_KSTREAMS_CP is not set; scripts/bench.sh builds it.)\n")
        }
    }
    Ok(())
}

/// Writes generator records at `rate` per second to the on-prem files until `stop`.
fn background_load(
    data: PathBuf,
    rate: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut g = Generator::new(99, 0);
        let per_tick = (rate / 20).max(1);
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let tick = Instant::now();
            let lines: Vec<Line> = (0..per_tick).map(|_| g.next_line(chrono::Utc::now())).collect();
            if append_lines(&data, &lines).is_ok() {
                n += lines.len();
            }
            std::thread::sleep(Duration::from_millis(50).saturating_sub(tick.elapsed()));
        }
        n
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// GET, timed in milliseconds.
fn timed_get(d: &Deployment, path: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    actidash_tests::harness::http_get_auth(d.api_port, path, Some(&d.api_token()?))?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

fn bench_freshness(dir: &Path, rate: usize, probes: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    let mut d = Deployment::new(&dir.join("deploy"), None)?;
    // The probes ask every 2 ms: above the API's default rate per token.
    d.serve_extra = "requests_per_sec_per_token = 100000\n".into();
    d.write_cloud_config()?;
    let _cloud = d.start_cloud("cloud", &[])?;
    d.wait_ready(Duration::from_secs(30))?;
    let config = d.write_agent_config("fresh", "acme", &data, &Feed::ALL)?;
    let _agent = d.start_agent("agent", &config)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = background_load(data.clone(), rate, stop.clone());
    std::thread::sleep(Duration::from_secs(3));
    // Each probe: one marketing touch of its own campaign, appended; then the API is asked for
    // that campaign until it shows.
    let mut latencies = Vec::new();
    let from = chrono::Utc::now().timestamp() - 3600;
    for i in 0..probes {
        let campaign = format!("probe-{i}");
        let line = serde_json::json!({
            "time": chrono::Utc::now().format("%Y-%m-%d %H:%M:%S").to_string(),
            "user": "C-probe", "utm_source": "probe", "utm_campaign": campaign, "cost": "0.01"
        });
        let t = Instant::now();
        append_lines(&data, &[Line { feed: Feed::Marketing, text: line.to_string(), valid: true }])?;
        let path = format!("/api/v1/marketing/attribution?from={from}&campaign={campaign}&group_by=campaign");
        // Asked every 2 ms (the harness's wait_until sleeps 200 ms between checks).
        loop {
            anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "probe {i} did not show within 30 s");
            let answer = d.get(&path)?;
            if answer["rows"].as_array().is_some_and(|r| r.iter().any(|r| r["touches"].as_i64() == Some(1))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = load.join().unwrap_or(0);
    latencies.sort_by(f64::total_cmp);
    println!(
        "### P5: freshness, record appended on-prem -> visible through the API (embedded, {probes} probes, background load {rate} records/s, {written} written)\n"
    );
    println!("| p50 | p99 | max |");
    println!("|---:|---:|---:|");
    println!(
        "| {:.0} ms | {:.0} ms | {:.0} ms |\n",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    Ok(())
}

fn bench_api(dir: &Path, postgres: Option<String>, n: usize, seconds: u64) -> anyhow::Result<()> {
    fresh(dir)?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    let mut d = Deployment::new(&dir.join("deploy"), None)?;
    // A history import: the files are read side by side, so one source runs weeks ahead of
    // another; the lateness allowed covers the whole history, so every figure (sessions and
    // attribution too) is computed for it, as an operator importing history would set it.
    d.cloud_extra = "\n[analytics]\nallowed_lateness_secs = 2764800\n".into();
    let store = match &postgres {
        Some(url) => {
            d.cloud_extra += &format!("\n[store]\nurl = \"{url}\"\n");
            "PostgreSQL"
        }
        None => "SQLite",
    };
    d.write_cloud_config()?;
    // 30 days of history, as an agent reads it from the on-prem files.
    let now = chrono::Utc::now();
    let records =
        actidash_tests::dataset::generate(5, n, now - chrono::Duration::days(30), 30 * 86_400_000, 20, 600_000);
    let lines: Vec<Line> = records.iter().map(|r| Line { feed: r.feed, text: r.line.clone(), valid: true }).collect();
    append_lines(&data, &lines)?;
    let _cloud = d.start_cloud("cloud", &[])?;
    d.wait_ready(Duration::from_secs(30))?;
    let config = d.write_agent_config("api", "acme", &data, &Feed::ALL)?;
    let _agent = d.start_agent("agent", &config)?;
    let loaded = Instant::now();
    wait_until(Duration::from_secs(3600), "the history to be processed", || {
        Ok(d.get("/api/v1/stats")?["events_applied"].as_i64().unwrap_or(0) >= n as i64)
    })?;
    let load_secs = loaded.elapsed().as_secs_f64();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = background_load(data.clone(), 1_000, stop.clone());
    let (t, day, week, month) = (now.timestamp() + 60, 86_400, 7 * 86_400, 30 * 86_400);
    let queries = [
        format!("/api/v1/sales?from={}&to={t}&granularity=day&group_by=channel", t - month),
        format!("/api/v1/sales?from={}&to={t}&granularity=hour&group_by=currency", t - day),
        format!("/api/v1/sales?from={}&to={t}&group_by=channel,site,country,currency", t - month),
        format!("/api/v1/sales/products?from={}&to={t}&limit=20", t - month),
        format!("/api/v1/behavior?from={}&to={t}&granularity=day&group_by=referrer", t - week),
        format!("/api/v1/behavior/funnel?from={}&to={t}", t - month),
        format!("/api/v1/marketing/attribution?from={}&to={t}&model=time_decay&group_by=channel,campaign", t - month),
        format!("/api/v1/marketing/attribution?from={}&to={t}&model=linear&group_by=channel", t - week),
        "/api/v1/inventory?limit=50".to_owned(),
    ];
    let mut latencies = Vec::new();
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < Duration::from_secs(seconds) {
        let tick = Instant::now();
        latencies.push(timed_get(&d, &queries[i % queries.len()])?);
        i += 1;
        std::thread::sleep(Duration::from_millis(50).saturating_sub(tick.elapsed()));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = load.join().unwrap_or(0);
    latencies.sort_by(f64::total_cmp);
    let late = d.get("/api/v1/stats")?["late_events_beyond_horizon"].as_i64().unwrap_or(0);
    let ui = if postgres.is_none() { bench_ui(&d)? } else { None };
    println!(
        "### P6: dashboard queries at 20/s during ingest ({store} store, 30 days of history: {n} events loaded in {load_secs:.0} s, {late} beyond the horizon; {written} more written during the {seconds} s)\n"
    );
    println!("| queries | p50 | p99 | max |");
    println!("|---:|---:|---:|---:|");
    println!(
        "| {} | {:.1} ms | {:.1} ms | {:.1} ms |\n",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(0.0)
    );
    if let Some(ui) = ui {
        println!("{ui}");
    }
    Ok(())
}

/// P9: the dashboards over the deployment's data, in Debian's chromium
/// (`desktop/ui/tests/timing.mjs`); None (and a note) without a browser or a built app.
fn bench_ui(d: &Deployment) -> anyhow::Result<Option<String>> {
    let ui = Path::new(env!("CARGO_MANIFEST_DIR")).join("../desktop/ui");
    let chromium = std::env::var("ACTIDASH_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if actidash_tests::harness::ui_dir().is_none() || !Path::new(&chromium).exists() {
        eprintln!(
            "P9 not measured: build the dashboards (scripts/ui.sh build) and install chromium (scripts/ui.sh chromium)"
        );
        return Ok(None);
    }
    let token = d.make_api_token(&["--tenant", "acme", "--role", "ops"])?;
    let out = std::process::Command::new("node")
        .arg(ui.join("tests/timing.mjs"))
        .env("ACTIDASH_URL", format!("http://127.0.0.1:{}", d.api_port))
        .env("ACTIDASH_TOKEN", &token)
        .env("ACTIDASH_CHROMIUM", &chromium)
        .output()?;
    anyhow::ensure!(out.status.success(), "timing.mjs: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let stats = |values: &serde_json::Value| {
        let mut ms: Vec<f64> = values.as_array().into_iter().flatten().filter_map(|x| x.as_f64()).collect();
        ms.sort_by(f64::total_cmp);
        (percentile(&ms, 0.5), ms.last().copied().unwrap_or(0.0), ms.len())
    };
    let mut text = String::from(
        "### P9: the dashboards over the same 30 days, in Debian's chromium (localhost; last 30 days, per day)\n\n| page | opened → numbers shown, median | max | opens |\n|---|---:|---:|---:|\n",
    );
    for page in ["overview", "sales", "marketing", "behavior", "inventory", "fleet"] {
        let (p50, max, n) = stats(&v["open"][page]);
        text += &format!("| {page} | {p50:.0} ms | {max:.0} ms | {n} |\n");
    }
    let (p50, max, n) = stats(&v["range_change"]);
    text += &format!(
        "\nRange change on Sales (30 → 7 → 1 → 30 days) to redrawn: median {p50:.0} ms, max {max:.0} ms over {n} changes.\n"
    );
    Ok(Some(text))
}

/// A producer with the gateway's settings (idempotent, acks=all, lz4, 5 ms linger), and `extra`.
fn raw_producer(bootstrap: &str, extra: &[(&str, &str)]) -> anyhow::Result<ThreadedProducer<CountFailures>> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("compression.type", "lz4");
    for (k, v) in extra {
        config.set(*k, *v);
    }
    Ok(config.create_with_context(CountFailures::default())?)
}

/// Produces `events` as the gateway does by default (key and JSON value, no headers) and waits
/// for every delivery.
fn raw_produce(producer: &ThreadedProducer<CountFailures>, topic: &str, events: &[Event]) -> anyhow::Result<()> {
    for event in events {
        let value = event.to_json();
        let mut record = BaseRecord::to(topic).key(&event.entity_key).payload(&value);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    let failed = producer.context().failed.load(std::sync::atomic::Ordering::Relaxed);
    anyhow::ensure!(failed == 0, "{failed} raw produce deliveries failed: the baseline is invalid");
    Ok(())
}

/// (RSS in KiB, CPU seconds) of a process, from /proc.
fn proc_usage(pid: u32) -> anyhow::Result<(u64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status_kib(&status, "VmRSS:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Ok((rss, ticks / 100.0))
}

/// A process's resident memory from `/proc/<pid>/status`, in KiB: anonymous (heap, stacks,
/// relocated data) and file-backed (the binary's and libraries' pages).
fn proc_rss_split(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok((status_kib(&status, "RssAnon:"), status_kib(&status, "RssFile:") + status_kib(&status, "RssShmem:")))
}

/// A `/proc/<pid>/status` field in KiB (0 if absent).
fn status_kib(status: &str, name: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn bench_footprint(dir: &Path, rate: usize, seconds: u64, rounds: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    let d = Deployment::new(&dir.join("deploy"), None)?;
    let mut cloud = d.start_cloud("cloud", &[])?;
    d.wait_ready(Duration::from_secs(30))?;
    let config = d.write_agent_config("fp", "acme", &data, &Feed::ALL)?;
    let agent = d.start_agent("agent", &config)?;
    let pid = agent.pid();
    std::thread::sleep(Duration::from_secs(3)); // start-up done

    // Rounds of an idle spell then a loaded one, in the same process.
    let mut g = Generator::new(3, 0);
    let (mut idle_cpu, mut loaded_cpu, mut max_rss, mut achieved) = (Vec::new(), Vec::new(), 0u64, Vec::new());
    // RSS at the end of each idle spell, (total, anonymous, file-backed): the first before any
    // load, the others after one (what a load leaves behind).
    let mut idle_rss: Vec<(u64, u64, u64)> = Vec::new();
    for _ in 0..rounds {
        let (_, cpu0) = proc_usage(pid)?;
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(seconds));
        let (_, cpu1) = proc_usage(pid)?;
        idle_cpu.push((cpu1 - cpu0) / t0.elapsed().as_secs_f64());
        // One read: the total is their sum (VmRSS = RssAnon + RssFile + RssShmem).
        let (anon, file) = proc_rss_split(pid)?;
        idle_rss.push((anon + file, anon, file));

        let (_, cpu2) = proc_usage(pid)?;
        let t1 = Instant::now();
        let per_tick = rate / 10;
        let mut n_written = 0;
        while t1.elapsed() < Duration::from_secs(seconds) {
            let tick = Instant::now();
            let lines: Vec<Line> = (0..per_tick).map(|_| g.next_line(chrono::Utc::now())).collect();
            append_lines(&data, &lines)?;
            n_written += lines.len();
            max_rss = max_rss.max(proc_usage(pid)?.0);
            std::thread::sleep(Duration::from_millis(100).saturating_sub(tick.elapsed()));
        }
        let (_, cpu3) = proc_usage(pid)?;
        loaded_cpu.push((cpu3 - cpu2) / t1.elapsed().as_secs_f64());
        achieved.push(n_written as f64 / t1.elapsed().as_secs_f64());
    }
    drop(agent);
    cloud.terminate(Duration::from_secs(10));

    let thousandths = |v: &[f64]| -> String {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.4} ({lo:.4}–{hi:.4})", median(v.to_vec()))
    };
    let unit_env: Vec<String> =
        actidash_tests::harness::agent_unit_environment().iter().map(|(k, v)| format!("`{k}={v}`")).collect();
    println!(
        "### P7: agent footprint (4 file sources polling every 100 ms, the default being 250 ms, shipping over QUIC; the agent in its systemd unit's environment, {}; {rounds} rounds of {seconds} s idle then {seconds} s loaded, median (lowest–highest))\n",
        unit_env.join(" ")
    );
    let mib = |kib: u64| kib as f64 / 1024.0;
    let rss_of = |spells: &[(u64, u64, u64)]| -> String {
        match spells.iter().max() {
            Some((rss, anon, file)) => {
                format!("{:.1} MiB (anonymous {:.1}, file-backed {:.1})", mib(*rss), mib(*anon), mib(*file))
            }
            None => "-".to_owned(),
        }
    };
    println!("| state | CPU (cores) | RSS |");
    println!("|---|---:|---:|");
    println!("| idle | {} | before any load: {} |", thousandths(&idle_cpu), rss_of(&idle_rss[..1.min(idle_rss.len())]));
    if idle_rss.len() > 1 {
        println!("| idle after a load | | {} (max) |", rss_of(&idle_rss[1..]));
    }
    println!("| {:.0} events/s | {} | {:.1} MiB (max) |\n", median(achieved), thousandths(&loaded_cpu), mib(max_rss));
    Ok(())
}

fn timestamp_of(log: &str, needle: &str, after: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|t| *t > after)
        .find_map(|t| t.parse().ok())
}

fn bench_reconnect(dir: &Path, rounds: usize) -> anyhow::Result<()> {
    fresh(dir)?;
    let data = dir.join("onprem");
    std::fs::create_dir_all(&data)?;
    let d = Deployment::new(&dir.join("deploy"), None)?;
    let mut cloud: Process = d.start_cloud("cloud", &[])?;
    d.wait_ready(Duration::from_secs(30))?;
    let config = d.write_agent_config("rc", "acme", &data, &[Feed::Orders])?;
    let _agent = d.start_agent("agent", &config)?;
    let log_path = d.root.join("cloud.log");
    wait_until(Duration::from_secs(30), "the first connection", || {
        Ok(std::fs::read_to_string(&log_path)?.contains("agent connected"))
    })?;
    let mut delays = Vec::new();
    for _ in 0..rounds {
        cloud.kill();
        std::thread::sleep(Duration::from_secs(8)); // the agent backs off to its cap
        let mark = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        cloud.restart()?;
        wait_until(Duration::from_secs(60), "the reconnection", || {
            let log = std::fs::read_to_string(&log_path)?;
            Ok(timestamp_of(&log, "agent connected", &mark).is_some())
        })?;
        let log = std::fs::read_to_string(&log_path)?;
        let listening = timestamp_of(&log, "gateway listening", &mark).context("no listening line")?;
        let connected = timestamp_of(&log, "agent connected", &mark).context("no connected line")?;
        delays.push((connected - listening).num_milliseconds());
    }
    cloud.terminate(Duration::from_secs(10));
    delays.sort_unstable();
    println!("### P8: reconnection after the gateway returns ({rounds} rounds, gateway down 8 s each)\n");
    println!("| measure | ms |");
    println!("|---|---:|");
    println!("| fastest | {} |", delays.first().copied().unwrap_or(0));
    println!("| median | {} |", delays.get(delays.len() / 2).copied().unwrap_or(0));
    println!("| slowest | {} |\n", delays.last().copied().unwrap_or(0));
    Ok(())
}

/// Counts failed deliveries, so that a broken baseline is never reported.
#[derive(Default)]
struct CountFailures {
    failed: std::sync::atomic::AtomicU64,
}

impl ClientContext for CountFailures {}

impl ProducerContext for CountFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, m)) = result {
            eprintln!("delivery to {} failed: {e}", m.topic());
            self.failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}
