//! Configuration reload: the agent checks its configuration file every second; a valid new
//! configuration restarts the sources and the shipper in-process, and an invalid one is refused
//! (with the file, line and field) while the running one carries on.
//!
//! Nothing is lost across a reload: every source's position is in the spool, written with its
//! events, so the restarted sources go on exactly where they stopped. The agent's identity
//! (`agent_id`, `tenant`) and its `data_dir` cannot change while it runs: such a change is
//! refused and needs a restart.
//!
//! With `config_source = "cloud"` the sources come from the cloud ([`crate::central`]): a push
//! is applied the same way, on trial, and rolled back here if its sources do not start.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::central::{CloudConfigs, Control};
use crate::config::{AgentConfig, ConfigSource};

/// How often the configuration file is looked at.
const CHECK_EVERY: Duration = Duration::from_secs(1);

/// What made the running agent stop, when it is to run again.
enum Next {
    /// The local file changed: run its new configuration.
    Local(Box<AgentConfig>),
    /// The cloud configuration changed (a push to try, or a rollback).
    Cloud,
}

/// Runs the agent from the configuration at `path`, reloading it when it changes (or, with
/// `config_source = "cloud"`, when the cloud pushes another), until `shutdown`.
pub async fn run_with_reload(path: PathBuf, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut local = AgentConfig::parse(&text, &path)?;
    let (control, mut pushes) = Control::new();
    let mut cloud = cloud_configs(&local)?;
    loop {
        let config = cloud.as_ref().map_or_else(|| local.clone(), |c| c.effective(&local, &path));
        control.set_state(cloud.as_ref().map(CloudConfigs::state));
        let grace = Duration::from_secs(local.config_grace_secs);
        let mut trial_until = cloud.as_ref().filter(|c| c.trial).map(|_| tokio::time::Instant::now() + grace);
        let generation = shutdown.child_token();
        let mut runner = tokio::spawn(crate::run_with(config.clone(), generation.clone(), control.clone()));
        let mut tick = tokio::time::interval(CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let next = loop {
            tokio::select! {
                // The agent stopped by itself: shutdown, or a failure to report — unless it ran
                // a configuration on trial, which is then rolled back.
                result = &mut runner => {
                    let result = result.context("the agent task panicked")?;
                    match (&mut cloud, &result) {
                        (Some(c), Err(e)) if c.trial && !shutdown.is_cancelled() => {
                            roll_back(c, format!("{e:#}"))?;
                            runner = tokio::spawn(std::future::ready(Ok(())));
                            break Next::Cloud;
                        }
                        _ => return result,
                    }
                }
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
                        Ok(new) => break Next::Local(Box::new(new)),
                        Err(e) => error!(path = %path.display(), error = %e, "new configuration refused; keeping the running one"),
                    }
                }
                Some(push) = pushes.recv() => {
                    let Some(c) = &mut cloud else { continue };
                    if push.group != c.group || c.knows(push.version) {
                        continue;
                    }
                    let (version, name) = (push.version, crate::central::pushed_name(&path, push.version));
                    match local.with_pushed(&push.text, &name) {
                        Ok(_) => {
                            info!(group = %c.group, version, "configuration pushed by the cloud: applying it on trial");
                            c.try_new(push)?;
                            break Next::Cloud;
                        }
                        Err(e) => {
                            warn!(group = %c.group, version, error = %e, "configuration pushed by the cloud refused; keeping the running one");
                            c.refuse(version, e.to_string())?;
                            control.set_state(Some(c.state()));
                        }
                    }
                }
                () = sleep_until_some(trial_until) => {
                    trial_until = None;
                    let Some(c) = &mut cloud else { continue };
                    match control.failing() {
                        None => {
                            c.commit()?;
                            control.set_state(Some(c.state()));
                            info!(group = %c.group, version = c.current.as_ref().map(|p| p.version), "pushed configuration passed its trial");
                        }
                        Some(why) => {
                            roll_back(c, format!("{why} within the grace period of {} s", grace.as_secs()))?;
                            break Next::Cloud;
                        }
                    }
                }
            }
        };
        info!(path = %path.display(), "configuration changed: restarting the sources and the shipper");
        generation.cancel();
        runner.await.context("the agent task panicked")??;
        if let Next::Local(new) = next {
            local = *new;
            if cloud.as_ref().map(|c| c.group.as_str()) != Some(local.group.as_str())
                || local.config_source != ConfigSource::Cloud
            {
                cloud = cloud_configs(&local)?;
            }
        }
    }
}

/// The pushed configurations kept for `local`'s group, if it takes them from the cloud.
fn cloud_configs(local: &AgentConfig) -> anyhow::Result<Option<CloudConfigs>> {
    if local.config_source != ConfigSource::Cloud {
        return Ok(None);
    }
    crate::private::dir(&local.data_dir)
        .with_context(|| format!("creating data folder {}", local.data_dir.display()))?;
    CloudConfigs::load(&local.data_dir, &local.group).map(Some)
}

fn roll_back(c: &mut CloudConfigs, why: String) -> anyhow::Result<()> {
    error!(group = %c.group, version = c.current.as_ref().map(|p| p.version), back_to = c.last_good.as_ref().map(|p| p.version), error = %why, "pushed configuration failed: rolling back to the last good one");
    c.roll_back(why)
}

/// Sleeps until `at`, or for ever without one.
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
