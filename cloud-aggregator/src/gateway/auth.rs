//! Who may write: agents with a certificate of the fleet CA, enrolled and not revoked, within
//! their per-agent limits.
//!
//! TLS (rustls, TLS 1.3 only) has already verified the client certificate's chain and validity
//! when a hello arrives; [`Admission::admit`] takes the identity from that certificate (CN: the
//! agent id, O: the tenant), checks it against the registry and the revoked set, and counts the
//! agent's connections. The revoked set is reloaded from the shared registry every half
//! heartbeat interval, so a revocation reaches every gateway instance within one interval.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::fleet::Fleet;

/// Why an agent was refused. Messages never contain secrets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no client certificate: enroll this agent first (edge-agent enroll)")]
    NoCertificate,
    #[error("unreadable client certificate: {0}")]
    BadCertificate(String),
    #[error("the hello names agent {hello:?} but the certificate is for {cert:?}")]
    Mismatch { hello: String, cert: String },
    #[error("agent {0:?} is revoked")]
    Revoked(String),
    #[error("agent {0:?} is not enrolled")]
    UnknownAgent(String),
    #[error("the certificate names tenant {cert:?} but agent {agent:?} was enrolled for {enrolled:?}")]
    TenantMismatch { agent: String, cert: String, enrolled: String },
    #[error("agent {0:?} has too many connections ({1})")]
    TooManyConnections(String, usize),
    #[error("registry unavailable: {0}")]
    Registry(String),
}

struct AgentState {
    connections: usize,
    /// Events the agent may send (one second of its rate at most).
    events: Bucket,
    /// Decompressed bytes the agent may send (one second of its rate at most).
    bytes: Bucket,
    /// When one of its heartbeats was last stored.
    heartbeat_stored: Option<Instant>,
    /// When its certificate was last renewed.
    renewed: Option<Instant>,
}

/// A token bucket: `rate` a second, at most one second of it in store.
struct Bucket {
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    fn full(rate: f64) -> Bucket {
        Bucket { tokens: rate, refilled: Instant::now() }
    }

    /// Takes `n`; returns how long to wait before the debt is paid (zero within the rate).
    fn take(&mut self, rate: f64, n: f64, now: Instant) -> Duration {
        let elapsed = now.duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate) - n;
        if self.tokens >= 0.0 { Duration::ZERO } else { Duration::from_secs_f64(-self.tokens / rate) }
    }
}

/// The per-agent limits ([`crate::config::GatewayConfig`]).
#[derive(Debug, Clone, Copy)]
pub struct AgentLimits {
    pub max_connections: usize,
    pub events_per_sec: u32,
    /// Decompressed batch bytes a second.
    pub bytes_per_sec: u64,
    /// Heartbeats closer together than this are answered but not stored.
    pub min_heartbeat_interval: Duration,
    /// Certificate renewals closer together than this are refused.
    pub min_renewal_interval: Duration,
}

/// Sends `value` to the watchers if it differs from what they have.
fn replace_if_changed<T: PartialEq>(tx: &watch::Sender<Arc<T>>, value: T) {
    tx.send_if_modified(|current| {
        let changed = **current != value;
        if changed {
            *current = Arc::new(value);
        }
        changed
    });
}

/// Admission control shared by a gateway's connections.
/// The active configuration version of each (tenant, group) ([`crate::central`]).
pub type ActiveConfigs = Arc<HashMap<(String, String), u64>>;

pub struct Admission {
    fleet: Arc<Fleet>,
    revoked: watch::Receiver<Arc<HashSet<String>>>,
    revoked_tx: watch::Sender<Arc<HashSet<String>>>,
    configs_tx: watch::Sender<ActiveConfigs>,
    agents: Mutex<HashMap<String, AgentState>>,
    limits: AgentLimits,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission").field("limits", &self.limits).finish()
    }
}

impl Admission {
    pub fn new(fleet: Arc<Fleet>, limits: AgentLimits) -> anyhow::Result<Admission> {
        let (revoked_tx, revoked) = watch::channel(Arc::new(fleet.revoked()?));
        let (configs_tx, _) = watch::channel(Arc::new(crate::central::active_versions(fleet.registry())?));
        Ok(Admission { fleet, revoked, revoked_tx, configs_tx, agents: Mutex::new(HashMap::new()), limits })
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Reloads the revoked set and the active configurations every `every` until shutdown.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = tokio::time::sleep(every) => {}
                    () = shutdown.cancelled() => return,
                }
                let fleet = me.fleet.clone();
                match tokio::task::spawn_blocking(move || fleet.revoked()).await {
                    Ok(Ok(set)) => replace_if_changed(&me.revoked_tx, set),
                    Ok(Err(e)) => {
                        warn!(error = format!("{e:#}"), "cannot read the revoked agents; keeping the last list")
                    }
                    Err(e) => warn!(error = %e, "revocation refresh failed"),
                }
                let fleet = me.fleet.clone();
                match tokio::task::spawn_blocking(move || crate::central::active_versions(fleet.registry())).await {
                    Ok(Ok(active)) => replace_if_changed(&me.configs_tx, active),
                    Ok(Err(e)) => {
                        warn!(error = format!("{e:#}"), "cannot read the active configurations; keeping the last ones")
                    }
                    Err(e) => warn!(error = %e, "configuration refresh failed"),
                }
            }
        });
    }

    /// Changes of the active configurations.
    pub fn subscribe_configs(&self) -> watch::Receiver<ActiveConfigs> {
        self.configs_tx.subscribe()
    }

    /// Changes of the revoked set.
    pub fn subscribe(&self) -> watch::Receiver<Arc<HashSet<String>>> {
        self.revoked.clone()
    }

    pub fn is_revoked(&self, agent_id: &str) -> bool {
        self.revoked.borrow().contains(agent_id)
    }

    /// Admits the agent of a verified certificate; returns (agent id, tenant). Every admitted
    /// connection is [`Admission::release`]d when it ends.
    pub fn admit(&self, hello_agent: &str, peer: Option<&(String, String)>) -> Result<(String, String), AuthError> {
        let (agent, tenant) = peer.ok_or(AuthError::NoCertificate)?;
        if hello_agent != agent {
            return Err(AuthError::Mismatch { hello: hello_agent.to_owned(), cert: agent.clone() });
        }
        if self.is_revoked(agent) {
            return Err(AuthError::Revoked(agent.clone()));
        }
        let record = self
            .fleet
            .agent(agent)
            .map_err(|e| AuthError::Registry(format!("{e:#}")))?
            .ok_or_else(|| AuthError::UnknownAgent(agent.clone()))?;
        if record.revoked_at.is_some() {
            return Err(AuthError::Revoked(agent.clone()));
        }
        if record.tenant != *tenant {
            return Err(AuthError::TenantMismatch {
                agent: agent.clone(),
                cert: tenant.clone(),
                enrolled: record.tenant,
            });
        }
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        let state = agents.entry(agent.clone()).or_insert_with(|| AgentState {
            connections: 0,
            events: Bucket::full(f64::from(self.limits.events_per_sec)),
            bytes: Bucket::full(self.limits.bytes_per_sec as f64),
            heartbeat_stored: None,
            renewed: None,
        });
        if state.connections >= self.limits.max_connections {
            return Err(AuthError::TooManyConnections(agent.clone(), state.connections));
        }
        state.connections += 1;
        Ok((agent.clone(), tenant.clone()))
    }

    /// An admitted connection ended.
    pub fn release(&self, agent_id: &str) {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(state) = agents.get_mut(agent_id) {
            state.connections = state.connections.saturating_sub(1);
        }
    }

    /// How long to wait before taking `n` events of the agent, by its token bucket (one
    /// second of events of burst, over all its connections). Zero when within the rate.
    pub fn throttle(&self, agent_id: &str, n: u32) -> Duration {
        let rate = f64::from(self.limits.events_per_sec);
        self.with_agent(agent_id, Duration::ZERO, |s, now| s.events.take(rate, f64::from(n), now))
    }

    /// How long to wait after the agent sent `n` decompressed bytes (charged once they are
    /// known, so the debt delays its next batch). Zero when within the rate.
    pub fn throttle_bytes(&self, agent_id: &str, n: usize) -> Duration {
        let rate = self.limits.bytes_per_sec as f64;
        self.with_agent(agent_id, Duration::ZERO, |s, now| s.bytes.take(rate, n as f64, now))
    }

    /// Whether a heartbeat of the agent arriving now is stored: at most one per
    /// `min_heartbeat_interval` over all its connections (an agent sends one per interval; a
    /// flood is answered but not written).
    pub fn heartbeat_due(&self, agent_id: &str) -> bool {
        let every = self.limits.min_heartbeat_interval;
        self.with_agent(agent_id, false, |s, now| {
            let due = s.heartbeat_stored.is_none_or(|at| now.duration_since(at) >= every);
            if due {
                s.heartbeat_stored = Some(now);
            }
            due
        })
    }

    /// Whether the agent may renew its certificate now; Err with how long until it may.
    pub fn renewal_allowed(&self, agent_id: &str) -> Result<(), Duration> {
        let every = self.limits.min_renewal_interval;
        self.with_agent(agent_id, Ok(()), |s, now| match s.renewed {
            Some(at) if now.duration_since(at) < every => Err(every - now.duration_since(at)),
            _ => {
                s.renewed = Some(now);
                Ok(())
            }
        })
    }

    fn with_agent<T>(&self, agent_id: &str, absent: T, f: impl FnOnce(&mut AgentState, Instant) -> T) -> T {
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        match agents.get_mut(agent_id) {
            Some(state) => f(state, Instant::now()),
            None => absent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::FleetConfig;

    #[test]
    fn identity_comes_from_the_certificate_and_the_registry_and_limits_apply() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = Arc::new(Fleet::open(dir.path(), &FleetConfig::default()).unwrap());
        let token = fleet.create_token("acme", Duration::from_secs(60), 0).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let csr = rcgen::CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap();
        fleet.enroll(&token, "a1", &csr, 1).unwrap();
        let limits = AgentLimits {
            max_connections: 1,
            events_per_sec: 100,
            bytes_per_sec: 1_000,
            min_heartbeat_interval: Duration::from_secs(60),
            min_renewal_interval: Duration::from_secs(60),
        };
        let admission = Admission::new(fleet.clone(), limits).unwrap();
        let peer = ("a1".to_owned(), "acme".to_owned());

        assert_eq!(admission.admit("a1", None), Err(AuthError::NoCertificate));
        assert_eq!(
            admission.admit("a2", Some(&peer)),
            Err(AuthError::Mismatch { hello: "a2".into(), cert: "a1".into() })
        );
        let foreign = ("a1".to_owned(), "other".to_owned());
        assert!(matches!(admission.admit("a1", Some(&foreign)), Err(AuthError::TenantMismatch { .. })));
        let stranger = ("ghost".to_owned(), "acme".to_owned());
        assert_eq!(admission.admit("ghost", Some(&stranger)), Err(AuthError::UnknownAgent("ghost".into())));

        assert_eq!(admission.admit("a1", Some(&peer)), Ok(peer.clone()));
        assert_eq!(admission.admit("a1", Some(&peer)), Err(AuthError::TooManyConnections("a1".into(), 1)));
        admission.release("a1");
        assert!(admission.admit("a1", Some(&peer)).is_ok());

        // A second of burst, then waits in proportion.
        assert_eq!(admission.throttle("a1", 100), Duration::ZERO);
        let wait = admission.throttle("a1", 50);
        assert!(wait > Duration::from_millis(400) && wait <= Duration::from_millis(500), "{wait:?}");
        // Decompressed bytes have their own budget.
        assert_eq!(admission.throttle_bytes("a1", 1_000), Duration::ZERO);
        let wait = admission.throttle_bytes("a1", 2_000);
        assert!(wait > Duration::from_millis(1_900) && wait <= Duration::from_secs(2), "{wait:?}");
        // One heartbeat stored per interval, one renewal per interval.
        assert!(admission.heartbeat_due("a1"));
        assert!(!admission.heartbeat_due("a1"));
        assert_eq!(admission.renewal_allowed("a1"), Ok(()));
        assert!(admission.renewal_allowed("a1").is_err_and(|wait| wait > Duration::from_secs(59)));

        fleet.revoke("a1", 2).unwrap();
        assert_eq!(
            admission.admit("a1", Some(&peer)),
            Err(AuthError::Revoked("a1".into())),
            "from the registry at once"
        );
    }
}
