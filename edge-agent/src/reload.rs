//! Configuration reload: the agent checks its configuration file every second; a valid new
//! configuration restarts the sources and the shipper in-process, and an invalid one is refused
//! (with the file, line and field) while the running one carries on.
//!
//! Nothing is lost across a reload: every source's position is in the spool, written with its
//! events, so the restarted sources go on exactly where they stopped. The agent's identity
//! (`agent_id`, `tenant`) and its `data_dir` cannot change while it runs: such a change is
//! refused and needs a restart.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::AgentConfig;

/// How often the configuration file is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// Runs the agent from the configuration at `path`, reloading it when it changes, until
/// `shutdown`.
pub async fn run_with_reload(path: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut config = AgentConfig::parse(&text, &path)?;
    loop {
        let generation = shutdown.child_token();
        let mut runner = tokio::spawn(crate::run(config.clone(), generation.clone()));
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let next = loop {
            tokio::select! {
                // The agent stopped by itself: shutdown, or a failure to report.
                result = &mut runner => return result.context("the agent task panicked")?,
                _ = tick.tick() => {
                    let Ok(new_text) = std::fs::read_to_string(&path) else { continue };
                    if new_text == text {
                        continue;
                    }
                    text = new_text;
                    match AgentConfig::parse(&text, &path) {
                        Ok(new) if new.agent_id != config.agent_id || new.tenant != config.tenant || new.data_dir != config.data_dir => {
                            match crate::identity::IdentityStore::new(new.identity_dir()).check_matches(&new.agent_id, &new.tenant) {
                                Err(e) => error!(path = %path.display(), error = %e, "new configuration refused; keeping the running one"),
                                Ok(()) => error!(path = %path.display(), "new configuration refused: agent_id, tenant and data_dir cannot change while the agent runs; restart it; keeping the running configuration"),
                            }
                        }
                        Ok(new) => break new,
                        Err(e) => error!(path = %path.display(), error = %e, "new configuration refused; keeping the running one"),
                    }
                }
            }
        };
        info!(path = %path.display(), n_sources = next.sources.len(), "configuration changed: restarting the sources and the shipper");
        generation.cancel();
        runner.await.context("the agent task panicked")??;
        config = next;
    }
}
