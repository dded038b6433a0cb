//! `edge-agent`: the command line of the ActiDash edge agent.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_agent::config::AgentConfig;
use edge_agent::spool::Spool;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "edge-agent", version, about = "ActiDash on-prem agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the manual page (roff), for packages.
    #[command(hide = true)]
    Manual,
    /// Print the completion script of a shell (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Run the agent.
    Run {
        /// The configuration file.
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
        /// Also read every source from its start (read-only: no position moves, nothing is
        /// spooled) and print its first N events as the cloud would receive them, with each
        /// record met on the way that fails and its place; exits 1 if any failed.
        #[arg(long, value_name = "N")]
        preview: Option<usize>,
    },
    /// Enroll this agent: make its key here, have the fleet CA sign it with a single-use token,
    /// and store key and certificate (owner-only) for mutual TLS from then on.
    Enroll {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
        /// The gateway, `host:port` or `actidash://host:port` (default: `cloud.address`).
        #[arg(long)]
        url: Option<String>,
        /// The enrollment token (`cloud-aggregator token create`); better from a file or the
        /// environment than on the command line.
        #[arg(long, env = "ACTIDASH_ENROLL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A file holding the enrollment token.
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// What the agent is doing: sources with their rates and lag, the spool, the link to the
    /// cloud; refreshed every second until Ctrl-C (like `top`), or once.
    Status {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
        /// Print once and exit (exit status 1 if the agent is not running).
        #[arg(long)]
        once: bool,
        /// As JSON (with --once), for scripts.
        #[arg(long, requires = "once")]
        json: bool,
    },
    /// Look into the spool (works while the agent runs).
    Spool {
        #[command(subcommand)]
        command: SpoolCommand,
    },
}

#[derive(Subcommand, Debug)]
enum SpoolCommand {
    /// Depth, bytes, the oldest event's age and each source's position.
    Inspect {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
    },
    /// Check the spool's integrity and every event's checksum; exits 1 on damage.
    Verify {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
    },
    /// Events the gateway refused for good, kept aside with its reason.
    Refused {
        #[command(subcommand)]
        command: RefusedCommand,
    },
}

#[derive(Subcommand, Debug)]
enum RefusedCommand {
    /// Write them out as JSON lines (source, seq, reason, when, and the event itself).
    Export {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
        /// A file to write (default: standard output).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Delete them (of one source, or all), once dealt with; prints how many.
    Purge {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG", default_value = "/etc/actidash/agent.toml")]
        config: PathBuf,
        #[arg(long)]
        source: Option<String>,
    },
}

/// A failure here is the user's to act on (a configuration, an argument, a refused
/// enrollment): its message chain is printed, without the stack trace `RUST_BACKTRACE` would
/// add to it (traces are for panics, which are bugs).
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ACTIDASH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Manual => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "edge-agent", &mut std::io::stdout());
            Ok(())
        }
        Command::Enroll { config, url, token, token_file } => {
            let cfg = AgentConfig::load(&config)?;
            let token = match (token, token_file) {
                (Some(t), None) => t,
                (None, Some(f)) => std::fs::read_to_string(&f)
                    .with_context(|| format!("reading the token file {}", f.display()))?
                    .trim()
                    .to_owned(),
                (None, None) => {
                    anyhow::bail!("give the enrollment token with --token-file, ACTIDASH_ENROLL_TOKEN or --token")
                }
                (Some(_), Some(_)) => anyhow::bail!("give the enrollment token once: --token or --token-file"),
            };
            let address =
                url.as_deref().map_or(cfg.cloud.address.as_str(), |u| u.split_once("://").map_or(u, |(_, rest)| rest));
            let store = edge_agent::identity::IdentityStore::new(cfg.identity_dir());
            anyhow::ensure!(
                !store.is_enrolled(),
                "this agent is already enrolled ({}); remove that folder to enroll again",
                store.dir().display()
            );
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let enrolled = runtime.block_on(edge_agent::identity::enroll(
                address,
                &cfg.cloud.server_name,
                &cfg.cloud.ca_file,
                &cfg.agent_id,
                &token,
                &store,
            ))?;
            anyhow::ensure!(
                enrolled.tenant == cfg.tenant,
                "enrolled for tenant {:?}, but the configuration says {:?}: fix `tenant`",
                enrolled.tenant,
                cfg.tenant
            );
            // Run by root (`sudo edge-agent enroll`) for a service that runs as the data folder's
            // owner: the identity is handed to that owner.
            edge_agent::identity::give_to_owner_of(store.dir(), &cfg.data_dir)?;
            println!(
                "enrolled {} for tenant {}; key and certificate in {}",
                enrolled.agent_id,
                enrolled.tenant,
                store.dir().display()
            );
            Ok(())
        }
        Command::Check { config, preview } => {
            let cfg = AgentConfig::load(&config)?;
            // Secrets must be loadable (files readable, variables set); they are never printed.
            cfg.check_secrets()?;
            println!("{}: OK ({} sources)", config.display(), cfg.sources.len());
            let Some(n) = preview else { return Ok(()) };
            let mut n_bad = 0;
            for p in edge_agent::preview::preview(&cfg, n.max(1), std::time::Duration::from_secs(30))? {
                println!();
                println!(
                    "source {}: {} events, {} bad, {} skipped",
                    p.source_id,
                    p.events.len(),
                    p.bad.len(),
                    p.skipped.values().sum::<u64>()
                );
                for event in &p.events {
                    println!("  event {event}");
                }
                for (place, reason) in &p.bad {
                    println!("  BAD   {place}: {reason}");
                }
                for (condition, count) in &p.skipped {
                    println!("  skipped by {condition}: {count}");
                }
                if let Some(note) = &p.note {
                    println!("  NOTE  {note}");
                }
                n_bad += p.bad.len();
            }
            anyhow::ensure!(n_bad == 0, "{n_bad} previewed records did not map (see BAD above)");
            Ok(())
        }
        Command::Status { config, once, json } => {
            let cfg = AgentConfig::load(&config)?;
            let now = || chrono::Utc::now().timestamp_millis();
            if once {
                let v = edge_agent::status::view(now(), &edge_agent::status::read(&cfg.data_dir)?, None);
                if json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{}", edge_agent::status::render(&v));
                }
                anyhow::ensure!(v.running, "the agent is not running");
                return Ok(());
            }
            // The two newest different statuses: the rates are between them.
            let (mut latest, mut previous): (Option<edge_agent::status::Status>, _) = (None, None);
            loop {
                let current = edge_agent::status::read(&cfg.data_dir)?;
                if latest.as_ref().is_none_or(|l| l.written_at_ms != current.written_at_ms) {
                    previous = latest.replace(current.clone());
                }
                let v = edge_agent::status::view(now(), &current, previous.as_ref());
                // Clear the screen and go home, then the view: a live view without a
                // terminal-UI library.
                print!("\x1b[2J\x1b[H{}\n(refreshed every second; Ctrl-C to quit)\n", edge_agent::status::render(&v));
                std::io::Write::flush(&mut std::io::stdout())?;
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
        Command::Spool { command: SpoolCommand::Inspect { config } } => {
            let cfg = AgentConfig::load(&config)?;
            let spool = Spool::open_with(&cfg.data_dir.join(edge_agent::SPOOL_FILE), cfg.spool)?;
            let stats = spool.stats()?;
            let now = chrono::Utc::now().timestamp_millis();
            println!("spool        {}", spool.path().display());
            println!("events       {}", stats.n_events);
            println!(
                "bytes        {} of {} ({:.1} %), file {}",
                stats.n_bytes,
                cfg.spool.max_bytes,
                100.0 * stats.n_bytes as f64 / cfg.spool.max_bytes as f64,
                stats.file_bytes
            );
            match stats.oldest_spooled_at {
                Some(at) => println!("oldest event {:.1} s old", (now - at) as f64 / 1000.0),
                None => println!("oldest event -"),
            }
            println!();
            println!(
                "{:<20} {:>12} {:>10} {:>10} {:>12} {:>10}  position",
                "source", "next_seq", "errors", "dropped", "quarantined", "refused"
            );
            for id in spool.source_ids()? {
                let s = spool.source_state(&id)?;
                println!(
                    "{:<20} {:>12} {:>10} {:>10} {:>12} {:>10}  {}",
                    id, s.next_seq, s.n_errors, s.n_dropped, s.n_quarantined, s.n_refused, s.position
                );
                if let Some(reason) = &s.blocked {
                    println!("{:<20} STOPPED: {reason}", "");
                }
                let kinds = spool.refused_counts(&id)?;
                if !kinds.is_empty() {
                    let text: Vec<String> = kinds.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
                    println!("{:<20} refused by reason: {}", "", text.join(", "));
                }
            }
            let refused = spool.refused()?;
            if !refused.is_empty() {
                println!();
                println!("refused by the gateway (edge-agent spool refused export, then purge):");
                for r in refused.iter().take(20) {
                    println!("  {} seq {} [{}]: {}", r.source_id, r.seq, r.kind, r.reason);
                }
                if refused.len() > 20 {
                    println!("  … and {} more", refused.len() - 20);
                }
            }
            Ok(())
        }
        Command::Spool { command: SpoolCommand::Refused { command } } => {
            let open = |config: &std::path::Path| -> anyhow::Result<Spool> {
                let cfg = AgentConfig::load(config)?;
                Ok(Spool::open_with(&cfg.data_dir.join(edge_agent::SPOOL_FILE), cfg.spool)?)
            };
            match command {
                RefusedCommand::Export { config, out } => {
                    let refused = open(&config)?.refused()?;
                    let mut text = String::new();
                    for r in &refused {
                        let event = serde_json::from_slice::<serde_json::Value>(&r.body)
                            .unwrap_or_else(|_| String::from_utf8_lossy(&r.body).into_owned().into());
                        let at =
                            chrono::DateTime::from_timestamp_millis(r.at).map(|t| t.to_rfc3339()).unwrap_or_default();
                        let line = serde_json::json!({ "source_id": r.source_id, "seq": r.seq, "kind": r.kind, "reason": r.reason, "refused_at": at, "event": event });
                        text.push_str(&line.to_string());
                        text.push('\n');
                    }
                    match out {
                        Some(path) => {
                            std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
                            eprintln!("{} refused events written to {}", refused.len(), path.display());
                        }
                        None => print!("{text}"),
                    }
                }
                RefusedCommand::Purge { config, source } => {
                    let n = open(&config)?.purge_refused(source.as_deref())?;
                    println!("purged {n} refused events");
                }
            }
            Ok(())
        }
        Command::Spool { command: SpoolCommand::Verify { config } } => {
            let cfg = AgentConfig::load(&config)?;
            let spool = Spool::open_with(&cfg.data_dir.join(edge_agent::SPOOL_FILE), cfg.spool)?;
            let report = spool.verify()?;
            for line in &report.integrity_errors {
                println!("integrity: {line}");
            }
            for (source, seq) in &report.bad_checksums {
                println!("checksum mismatch: source {source} seq {seq}");
            }
            if report.totals_mismatch {
                println!("the running totals disagree with the stored events");
            }
            if report.is_ok() {
                println!("{}: OK ({} events checked)", spool.path().display(), report.n_checked);
                Ok(())
            } else {
                println!("{}: DAMAGED (the agent salvages it at its next start)", spool.path().display());
                std::process::exit(1);
            }
        }
        Command::Run { config } => {
            // Validate before starting anything: a bad file fails the start with its error.
            AgentConfig::load(&config)?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the runtime")?;
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    info!("shutdown requested");
                    signals.cancel();
                });
                edge_agent::reload::run_with_reload(config, shutdown).await
            })
        }
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
