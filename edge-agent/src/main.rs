//! `edge-agent`: the command line of the ActiDash edge agent.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edge_agent::config::AgentConfig;
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
    /// Run the agent.
    Run {
        /// The configuration file.
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG")]
        config: PathBuf,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, env = "ACTIDASH_AGENT_CONFIG")]
        config: PathBuf,
    },
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
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let cfg = AgentConfig::load(&config)?;
            println!("{}: OK ({} sources)", config.display(), cfg.sources.len());
            Ok(())
        }
        Command::Run { config } => {
            let cfg = AgentConfig::load(&config)?;
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
                edge_agent::run(cfg, shutdown).await
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
