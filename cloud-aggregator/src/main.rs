//! `cloud-aggregator`: the command line of the ActiDash cloud side.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_aggregator::Role;
use cloud_aggregator::config::CloudConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// jemalloc, not glibc's malloc: allocation was 17 % of the processor's CPU, and P4 gains ~6 %
/// (docs/BENCHMARKS.md); mimalloc gained alike there but cost the gateway 0.1–0.2 µs per event.
/// The agent keeps glibc's, for its idle footprint (P7).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(name = "cloud-aggregator", version, about = "ActiDash cloud side: gateway, processors, API")]
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
    /// Run one or more roles (all of them by default).
    Run {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        /// Roles to run; repeat the flag for several. Default: gateway, process and serve.
        #[arg(long = "role", value_enum)]
        roles: Vec<Role>,
        /// Address of the Prometheus scrape endpoint, instead of `[metrics] listen` (for
        /// several roles on one host).
        #[arg(long)]
        metrics_listen: Option<std::net::SocketAddr>,
    },
    /// What the cloud side is doing: connections, rates, Kafka lag, latencies and the fleet's
    /// health, refreshed every second (`--once` for one look, `--json` for scripts).
    Status {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        /// The Prometheus endpoint to read (default: `[metrics] listen` of the configuration).
        #[arg(long)]
        metrics_url: Option<String>,
        /// Print once and exit (exit status 1 if the metrics or the fleet cannot be read).
        #[arg(long)]
        once: bool,
        /// As JSON (with --once), for scripts.
        #[arg(long, requires = "once")]
        json: bool,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
    },
    /// Write a development CA and gateway certificate (for demos and tests).
    DevCerts {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Names the gateway certificate is valid for.
        #[arg(long = "name", default_values_t = vec!["localhost".to_owned()])]
        names: Vec<String>,
    },
    /// Enrollment tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Enrolled agents.
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
    /// Tokens of the HTTP API.
    ApiToken {
        #[command(subcommand)]
        command: ApiTokenCommand,
    },
    /// Central configuration of agents (those whose file says `config_source = "cloud"`).
    #[command(name = "config")]
    CentralConfig {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Validate an agent configuration's `[[sources]]` and `[shipper]` (as `edge-agent check`
    /// does) and make it the group's next version; its agents apply it within a heartbeat.
    Push {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        group: String,
        /// The TOML file to push.
        file: PathBuf,
    },
    /// Which version each group has active, and which each agent runs.
    Status {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        group: Option<String>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Make an earlier version active again (by default the one active before the current).
    Rollback {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        group: String,
        #[arg(long)]
        to: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
enum ApiTokenCommand {
    /// Create an API token; prints it once (only its hash is kept) and its id on stderr.
    Create {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        /// The tenant it reads.
        #[arg(long, required_unless_present = "all_tenants", conflicts_with = "all_tenants")]
        tenant: Option<String>,
        /// Every tenant (the service's own operators).
        #[arg(long)]
        all_tenants: bool,
        #[arg(long, value_enum, default_value = "viewer")]
        role: cloud_aggregator::api_tokens::Role,
        /// How long it stays valid: `30m`, `24h`, `90d`, seconds, or `never`.
        #[arg(long, default_value = "90d")]
        expires: String,
    },
    /// List API tokens (ids, never the tokens).
    List {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
    },
    /// Revoke an API token by id; refused within seconds on every API server of the registry.
    Revoke {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        id: String,
    },
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a single-use enrollment token for a tenant; prints it (only its hash is kept).
    Create {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        #[arg(long)]
        tenant: String,
        /// How long the token stays valid: `30m`, `24h`, `7d` or seconds.
        #[arg(long, default_value = "24h")]
        expires: String,
    },
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Revoke an agent: its connections close and it cannot reconnect, on every gateway,
    /// within one heartbeat interval.
    Revoke {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
        id: String,
    },
    /// List enrolled agents.
    List {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG", default_value = "/etc/actidash/cloud.toml")]
        config: PathBuf,
    },
}

use cloud_aggregator::api_tokens::parse_duration;

fn api_token(command: ApiTokenCommand) -> anyhow::Result<()> {
    use cloud_aggregator::api_tokens::ApiTokens;
    let open = |config: &std::path::Path| -> anyhow::Result<ApiTokens> {
        let config = CloudConfig::load(config)?;
        ApiTokens::open(&config.data_dir, &config.fleet)
    };
    let now = chrono::Utc::now().timestamp();
    let when = |t: Option<i64>| {
        t.and_then(|t| chrono::DateTime::from_timestamp(t, 0)).map_or("-".to_owned(), |t| t.to_rfc3339())
    };
    match command {
        ApiTokenCommand::Create { config, tenant, all_tenants: _, role, expires } => {
            let ttl = if expires == "never" { None } else { Some(parse_duration(&expires)?) };
            let (id, token) = open(&config)?.create(tenant.as_deref(), role, ttl, now)?;
            eprintln!(
                "API token {id}: tenant {}, role {}, expires {}. It is shown only now.",
                tenant.as_deref().unwrap_or("(every tenant)"),
                role.name(),
                when(ttl.map(|d| now + d.as_secs() as i64))
            );
            println!("{token}");
        }
        ApiTokenCommand::List { config } => {
            println!("id\ttenant\trole\tcreated\texpires\tstate");
            for t in open(&config)?.list()? {
                let state = t.state(now);
                println!(
                    "{}\t{}\t{}\t{}\t{}\t{state}",
                    t.id,
                    t.tenant.as_deref().unwrap_or("*"),
                    t.role.name(),
                    when(Some(t.created_at)),
                    when(t.expires_at)
                );
            }
        }
        ApiTokenCommand::Revoke { config, id } => {
            anyhow::ensure!(open(&config)?.revoke(&id, now)?, "no API token {id:?}");
            println!("revoked {id}");
        }
    }
    Ok(())
}

fn status(config: &std::path::Path, metrics_url: Option<String>, once: bool, json: bool) -> anyhow::Result<()> {
    use cloud_aggregator::status::{self, Scrape, View};
    let cfg = CloudConfig::load(config)?;
    let url = metrics_url.or_else(|| {
        cfg.metrics.map(|m| {
            let mut addr = m.listen;
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{addr}/metrics")
        })
    });
    let mut fleet = status::FleetSource::open(&cfg);
    let mut look = |before: Option<(&Scrape, f64)>| -> (View, Option<Scrape>) {
        let (mut view, scrape) = match &url {
            None => (View::default(), None),
            Some(u) => match status::fetch(u, std::time::Duration::from_secs(2)) {
                Ok(body) => {
                    let scrape = Scrape::parse(&body);
                    (status::view(&scrape, before), Some(scrape))
                }
                Err(e) => (View { metrics_error: Some(format!("{e:#}")), ..View::default() }, None),
            },
        };
        view.metrics_url = url.clone();
        match fleet.as_mut().map_err(|e| format!("{e:#}")).and_then(|f| status::fleet(f).map_err(|e| format!("{e:#}")))
        {
            Ok(f) => view.fleet = Some(f),
            Err(e) => view.fleet_error = Some(e),
        }
        (view, scrape)
    };
    if once {
        let (view, _) = look(None);
        if json {
            println!("{}", serde_json::to_string_pretty(&view)?);
        } else {
            print!("{}", status::render(&view));
        }
        anyhow::ensure!(view.metrics_error.is_none(), "the metrics cannot be read");
        anyhow::ensure!(view.fleet_error.is_none(), "the fleet cannot be read");
        return Ok(());
    }
    let mut before: Option<(Scrape, std::time::Instant)> = None;
    loop {
        let (view, scrape) = look(before.as_ref().map(|(s, at)| (s, at.elapsed().as_secs_f64())));
        print!("\x1b[2J\x1b[H{}\n(refreshed every second; Ctrl-C to quit)\n", status::render(&view));
        std::io::Write::flush(&mut std::io::stdout())?;
        before = scrape.map(|s| (s, std::time::Instant::now()));
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

fn central_config(command: ConfigCommand) -> anyhow::Result<()> {
    use cloud_aggregator::central;
    let now = chrono::Utc::now().timestamp();
    match command {
        ConfigCommand::Push { config, tenant, group, file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let fleet = open_fleet(&config)?;
            let version = central::push(fleet.registry(), &tenant, &group, &text, &file, now)?;
            println!("{tenant}/{group}: version {version} is active");
        }
        ConfigCommand::Status { config, tenant, group, json } => {
            let fleet = open_fleet(&config)?;
            let groups = central::status(fleet.registry(), &tenant, group.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&groups)?);
                return Ok(());
            }
            let v = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
            for g in &groups {
                println!("group {}: active version {}, latest {}", g.group, v(g.active), v(g.latest));
                for a in &g.agents {
                    let failed = match (&a.failed_version, &a.error) {
                        (Some(f), Some(e)) => format!("\tfailed v{f}: {e}"),
                        _ => String::new(),
                    };
                    println!("  {}\tv{}\t{}{failed}", a.agent_id, v(a.version), a.state);
                }
            }
        }
        ConfigCommand::Rollback { config, tenant, group, to } => {
            let fleet = open_fleet(&config)?;
            let (from, to) = central::rollback(fleet.registry(), &tenant, &group, to, now)?;
            println!("{tenant}/{group}: version {to} is active again (was {from})");
        }
    }
    Ok(())
}

fn open_fleet(config: &std::path::Path) -> anyhow::Result<cloud_aggregator::fleet::Fleet> {
    let cfg = CloudConfig::load(config)?;
    cloud_aggregator::fleet::Fleet::open(&cfg.data_dir, &cfg.fleet)
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
    match Cli::parse().command {
        Command::Manual => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "cloud-aggregator", &mut std::io::stdout());
            Ok(())
        }
        Command::Check { config } => {
            CloudConfig::load(&config)?;
            println!("{}: OK", config.display());
            Ok(())
        }
        Command::DevCerts { out, names } => {
            cloud_aggregator::certs::write_dev_certs(&out, &names)?;
            println!("wrote {}/ca.pem, gateway.pem, gateway.key", out.display());
            Ok(())
        }
        Command::Token { command: TokenCommand::Create { config, tenant, expires } } => {
            let ttl = parse_duration(&expires)?;
            let token = open_fleet(&config)?.create_token(&tenant, ttl, chrono::Utc::now().timestamp())?;
            println!("{token}");
            Ok(())
        }
        Command::Agent { command: AgentCommand::Revoke { config, id } } => {
            anyhow::ensure!(
                open_fleet(&config)?.revoke(&id, chrono::Utc::now().timestamp())?,
                "no enrolled agent {id:?}"
            );
            println!("revoked {id}");
            Ok(())
        }
        Command::Agent { command: AgentCommand::List { config } } => {
            for a in open_fleet(&config)?.agents()? {
                let state = if a.revoked_at.is_some() { "revoked" } else { "active" };
                println!("{}\t{}\t{state}", a.agent_id, a.tenant);
            }
            Ok(())
        }
        Command::ApiToken { command } => api_token(command),
        Command::CentralConfig { command } => central_config(command),
        Command::Status { config, metrics_url, once, json } => status(&config, metrics_url, once, json),
        Command::Run { config, roles, metrics_listen } => {
            let mut cfg = CloudConfig::load(&config)?;
            if let Some(listen) = metrics_listen {
                cfg.metrics = Some(cloud_aggregator::telemetry::MetricsConfig { listen });
            }
            let roles: BTreeSet<Role> = if roles.is_empty() {
                [Role::Gateway, Role::Process, Role::Serve].into_iter().collect()
            } else {
                roles.into_iter().collect()
            };
            let runtime =
                tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting the runtime")?;
            runtime.block_on(async move {
                let shutdown = CancellationToken::new();
                let signals = shutdown.clone();
                tokio::spawn(async move {
                    wait_for_signal().await;
                    info!("shutdown requested");
                    signals.cancel();
                });
                cloud_aggregator::run(cfg, roles, shutdown).await
            })
        }
    }
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
