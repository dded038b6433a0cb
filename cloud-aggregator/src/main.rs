//! `cloud-aggregator`: the command line of the ActiDash cloud side.

use std::collections::BTreeSet;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use cloud_aggregator::Role;
use cloud_aggregator::config::CloudConfig;
use tokio_util::sync::CancellationToken;
use tracing::info;

#[derive(Parser, Debug)]
#[command(name = "cloud-aggregator", version, about = "ActiDash cloud side: gateway, processors, API")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run one or more roles (all of them by default).
    Run {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG")]
        config: PathBuf,
        /// Roles to run; repeat the flag for several. Default: gateway, process and serve.
        #[arg(long = "role", value_enum)]
        roles: Vec<Role>,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, env = "ACTIDASH_CLOUD_CONFIG")]
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
    /// Print the SHA-256 of an agent credential read from standard input, for `[[gateway.agents]]`.
    HashCredential,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ACTIDASH_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
        Command::HashCredential => {
            let mut credential = String::new();
            std::io::stdin().read_line(&mut credential).context("reading the credential from stdin")?;
            println!("{}", cloud_aggregator::gateway::auth::credential_sha256(credential.trim()));
            Ok(())
        }
        Command::Run { config, roles } => {
            let cfg = CloudConfig::load(&config)?;
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
