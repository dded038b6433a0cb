//! Central configuration: an agent whose file says `config_source = "cloud"` runs the sources
//! (and shipper settings) the cloud pushes for its `group`, over its authenticated session.
//!
//! - A push is validated by the agent with the same code as `edge-agent check` (and as the
//!   cloud's `config push` did before storing it), then applied through the reload path: the
//!   sources restart where the spool says they stopped, so no position is lost.
//! - A new configuration is on **trial** for `config_grace_secs`: if a source is still failing
//!   (or not started) when the grace period ends, or the agent stops on an error meanwhile, the
//!   agent rolls back by itself to the last good configuration (or its file's sources, when
//!   none was ever good), and reports the failed version with its error. A failed version is
//!   never applied again; the gateway does not push it again either.
//! - The local file still names the identity, the cloud, the spool and the data folder: a push
//!   cannot cut an agent off. Secrets are never pushed: a pushed source names an environment
//!   variable or a file on the host (`password_env`, `password_file`).
//! - What the agent runs survives restarts (`data_dir/cloud-config.json`, written atomically):
//!   an agent that starts without the cloud runs its last configuration.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use actidash_shared::wire::{ConfigPush, ConfigState};
use anyhow::Context as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::config::AgentConfig;
use crate::sources::SharedStatus;

/// File of the data folder holding the pushed configurations.
pub const STATE_FILE: &str = "cloud-config.json";
/// Pushes waiting for the reload loop (a push is small; the gateway sends one per version).
const PUSH_QUEUE: usize = 4;

/// What the reload loop and the shipper share: pushes in, the configuration's state out, and
/// the running sources' statuses (to judge a trial).
#[derive(Clone, Debug)]
pub struct Control {
    pushes: mpsc::Sender<ConfigPush>,
    state: Arc<Mutex<Option<ConfigState>>>,
    statuses: Arc<Mutex<Vec<SharedStatus>>>,
}

impl Control {
    pub fn new() -> (Control, mpsc::Receiver<ConfigPush>) {
        let (pushes, rx) = mpsc::channel(PUSH_QUEUE);
        (Control { pushes, state: Arc::default(), statuses: Arc::default() }, rx)
    }

    /// A control nobody listens to (an agent run without the reload loop).
    pub fn detached() -> Control {
        Control::new().0
    }

    /// The state reported in hellos and heartbeats (none: the agent keeps its local file).
    pub fn state(&self) -> Option<ConfigState> {
        lock(&self.state).clone()
    }

    pub fn set_state(&self, state: Option<ConfigState>) {
        *lock(&self.state) = state;
    }

    /// A push from the gateway, for the reload loop; dropped if the loop is far behind (the
    /// next session's hello says what the agent runs, and the gateway pushes again).
    pub fn offer(&self, push: ConfigPush) {
        if let Err(e) = self.pushes.try_send(push) {
            tracing::warn!(error = %e, "a pushed configuration is dropped: the agent is busy applying others");
        }
    }

    /// The statuses of the sources now running.
    pub fn set_statuses(&self, statuses: Vec<SharedStatus>) {
        *lock(&self.statuses) = statuses;
    }

    /// Why the running sources are not all up, if they are not: a source in error (with its
    /// error) or one that has not started.
    pub fn failing(&self) -> Option<String> {
        lock(&self.statuses).iter().find_map(|s| {
            let s = lock(s);
            match s.state.as_str() {
                "error" => Some(format!(
                    "source {}: {}",
                    s.source_id,
                    s.last_error.as_deref().unwrap_or("failing, without a message")
                )),
                "starting" => Some(format!("source {} did not start", s.source_id)),
                _ => None,
            }
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pushed configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pushed {
    pub version: u64,
    pub text: String,
}

/// A version that failed on this agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failed {
    pub version: u64,
    pub error: String,
    /// It ran and was rolled back (else it was refused before running).
    pub rolled_back: bool,
}

/// The agent's pushed configurations, as kept in [`STATE_FILE`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudConfigs {
    pub group: String,
    /// What runs (or is on trial).
    pub current: Option<Pushed>,
    /// The last configuration that passed its trial.
    pub last_good: Option<Pushed>,
    pub failed: Option<Failed>,
    /// `current` is on trial.
    pub trial: bool,
    #[serde(skip)]
    path: PathBuf,
}

impl CloudConfigs {
    /// The configurations kept in `data_dir` for `group` (a group change starts afresh).
    pub fn load(data_dir: &Path, group: &str) -> anyhow::Result<CloudConfigs> {
        let path = data_dir.join(STATE_FILE);
        let mut configs = match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice::<CloudConfigs>(&bytes).with_context(|| format!("reading {}", path.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => CloudConfigs::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        if configs.group != group {
            configs = CloudConfigs { group: group.to_owned(), ..CloudConfigs::default() };
        }
        configs.path = path;
        Ok(configs)
    }

    fn save(&self) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        crate::private::write_atomic(&self.path, &json).with_context(|| format!("writing {}", self.path.display()))
    }

    /// The state hellos and heartbeats report.
    pub fn state(&self) -> ConfigState {
        let version = self.current.as_ref().map(|c| c.version);
        let state = match (&self.failed, self.trial, version) {
            (_, true, _) => "trial",
            (Some(f), _, _) if Some(f.version) > version && f.rolled_back => "rolled_back",
            (Some(f), _, _) if Some(f.version) > version => "refused",
            (_, _, Some(_)) => "applied",
            (_, _, None) => "local",
        };
        ConfigState {
            group: self.group.clone(),
            version,
            state: state.into(),
            failed_version: self.failed.as_ref().map(|f| f.version),
            error: self.failed.as_ref().map(|f| f.error.clone()),
        }
    }

    /// Whether `version` was seen already (it runs, or it failed here).
    pub fn knows(&self, version: u64) -> bool {
        self.current.as_ref().is_some_and(|c| c.version == version)
            || self.failed.as_ref().is_some_and(|f| f.version == version)
    }

    /// The configuration to run: `local` with the current push (or, should that no longer
    /// validate against the local file, the last good one, or the file alone).
    pub fn effective(&self, local: &AgentConfig, local_path: &Path) -> AgentConfig {
        for pushed in [&self.current, &self.last_good].into_iter().flatten() {
            match local.with_pushed(&pushed.text, &pushed_name(local_path, pushed.version)) {
                Ok(config) => return config,
                Err(e) => {
                    tracing::error!(version = pushed.version, error = %e, "a kept cloud configuration no longer applies to the local file")
                }
            }
        }
        local.clone()
    }

    /// A validated push to try.
    pub fn try_new(&mut self, push: ConfigPush) -> anyhow::Result<()> {
        self.current = Some(Pushed { version: push.version, text: push.text });
        self.trial = true;
        self.save()
    }

    /// A push that did not validate here: kept running what runs.
    pub fn refuse(&mut self, version: u64, error: String) -> anyhow::Result<()> {
        self.failed = Some(Failed { version, error, rolled_back: false });
        self.save()
    }

    /// The trial passed.
    pub fn commit(&mut self) -> anyhow::Result<()> {
        self.trial = false;
        self.last_good = self.current.clone();
        if self.failed.as_ref().is_some_and(|f| Some(f.version) < self.current.as_ref().map(|c| c.version)) {
            self.failed = None;
        }
        self.save()
    }

    /// The trial failed: back to the last good configuration.
    pub fn roll_back(&mut self, error: String) -> anyhow::Result<()> {
        if let Some(current) = self.current.take() {
            self.failed = Some(Failed { version: current.version, error, rolled_back: true });
        }
        self.current = self.last_good.clone();
        self.trial = false;
        self.save()
    }
}

/// How a pushed configuration is named in errors: `<agent.toml's folder>/cloud v<N>.toml`.
pub fn pushed_name(local_path: &Path, version: u64) -> PathBuf {
    local_path.parent().unwrap_or(Path::new(".")).join(format!("cloud-v{version}.toml"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOCAL: &str = "config_source = \"cloud\"\ngroup = \"stores\"\nagent_id = \"a1\"\ntenant = \"acme\"\ndata_dir = \"data\"\n\
        [cloud]\naddress = \"gw:4433\"\nserver_name = \"gw\"\nca_file = \"ca.pem\"\n";

    fn source(id: &str) -> String {
        format!(
            "[[sources]]\nid = \"{id}\"\ntype = \"file\"\npath = \"/data/{id}.jsonl\"\n[sources.mapping]\ndomain = \"inventory\"\n\
             event_time = {{ field = \"at\" }}\nfields = {{ sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }}\n"
        )
    }

    fn push(version: u64, text: &str) -> ConfigPush {
        ConfigPush { group: "stores".into(), version, text: text.into() }
    }

    #[test]
    fn a_push_replaces_the_sources_only_and_never_carries_a_secret_or_the_link() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.toml");
        let local = AgentConfig::parse(LOCAL, &path).unwrap();
        let name = pushed_name(&path, 4);
        let merged =
            local.with_pushed(&format!("{}\n[shipper]\nmax_batch_events = 50\n", source("stock")), &name).unwrap();
        assert_eq!(merged.sources.len(), 1);
        assert_eq!((merged.agent_id.as_str(), merged.shipper.max_batch_events), ("a1", 50));
        assert_eq!(merged.cloud.address, "gw:4433", "the link stays the file's");

        let err = local.with_pushed("[cloud]\naddress = \"evil:1\"\n", &name).unwrap_err().to_string();
        assert!(err.contains("cloud-v4.toml:1") && err.contains("unknown field `cloud`"), "{err}");
        let inline = "[[sources]]\nid = \"db\"\ntype = \"mysql\"\nurl = \"mysql://r@db/shop\"\npassword = \"hunter2\"\ntable = \"orders\"\nincremental_column = \"id\"\n[sources.mapping]\ndomain = \"inventory\"\nevent_time = { field = \"at\" }\nfields = { sku = \"sku\", warehouse = \"wh\", on_hand = \"qty\" }\n";
        let err = local.with_pushed(inline, &name).unwrap_err().to_string();
        assert!(err.contains(":5: field `sources[0].password`: secrets are never pushed"), "{err}");
        assert!(!err.contains("hunter2"));
        let from_env = inline.replace("password = \"hunter2\"", "password_env = \"SHOP_DB_PASSWORD\"");
        assert!(local.with_pushed(&from_env, &name).is_ok(), "a secret named on the host is fine");
        assert!(AgentConfig::check_pushed(&source("stock"), &name, "acme").is_ok());
    }

    #[test]
    fn trials_commit_or_roll_back_and_what_failed_is_never_taken_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = CloudConfigs::load(dir.path(), "stores").unwrap();
        assert_eq!(c.state().state, "local");
        c.try_new(push(1, &source("a"))).unwrap();
        assert_eq!((c.state().state.as_str(), c.state().version), ("trial", Some(1)));
        c.commit().unwrap();
        assert_eq!(c.state().state, "applied");

        c.try_new(push(2, &source("b"))).unwrap();
        c.roll_back("source b: unable to open".into()).unwrap();
        let s = c.state();
        assert_eq!((s.state.as_str(), s.version, s.failed_version), ("rolled_back", Some(1), Some(2)));
        assert_eq!(s.error.as_deref(), Some("source b: unable to open"));
        assert!(c.knows(2) && c.knows(1) && !c.knows(3));

        c.refuse(3, "bad field".into()).unwrap();
        assert_eq!((c.state().state.as_str(), c.state().version), ("refused", Some(1)));

        // Kept across restarts; another group starts afresh.
        let again = CloudConfigs::load(dir.path(), "stores").unwrap();
        assert_eq!(again.state(), c.state());
        assert_eq!(again.last_good.as_ref().map(|p| p.version), Some(1));
        assert_eq!(CloudConfigs::load(dir.path(), "other").unwrap().state().state, "local");

        // A newer version that passes clears the failure.
        c.try_new(push(4, &source("c"))).unwrap();
        c.commit().unwrap();
        assert_eq!((c.state().state.as_str(), c.state().failed_version), ("applied", None));
    }
}
