//! Each agent's health: one state with its reasons, and the history of its changes.
//!
//! - **healthy**: heartbeats arrive and nothing below holds;
//! - **degraded**: a source stopped on an error or paused (spool full), a source lagging more
//!   than [`LAG_DEGRADED`], the spool over [`SPOOL_FULL_RATIO`] of its limit, bad records
//!   (dead letters) in the last [`DEAD_LETTER_WINDOW`], a replication slot retaining more WAL
//!   than allowed, the certificate expiring within [`CERT_EXPIRY_WARNING`] (renewal, due at two
//!   thirds of its life, is failing), events held for a schema the gateway cannot read;
//! - **cut off**: the agent ran but could not reach the cloud. The cloud cannot see that while
//!   it lasts (the agent is silent, so **offline**); the agent reports the window and what it
//!   buffered once it is back, and the history shows that window as `cut_off`;
//! - **offline**: no heartbeat for `[serve] agent_offline_after_secs`; an agent that comes back
//!   after a restart (its uptime is shorter than its silence) leaves an `offline` window in the
//!   history;
//! - **revoked**: its certificate was revoked.
//!
//! Healthy and degraded are assessed from each heartbeat as the processor stores it
//! ([`record`], inside the store commit: exactly once, on either engine); offline and revoked
//! are added when read ([`current`]), since silence has no heartbeat to be assessed from.

use actidash_shared::kafka::FleetRecord;
use actidash_shared::wire::Heartbeat;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::store::db::{DbError, Tx, Val};

/// A source whose oldest unacknowledged event is older than this is lagging.
pub const LAG_DEGRADED: chrono::Duration = chrono::Duration::minutes(5);
/// A spool fuller than this share of its limit is filling.
pub const SPOOL_FULL_RATIO: f64 = 0.8;
/// Bad records in this window degrade an agent.
pub const DEAD_LETTER_WINDOW: chrono::Duration = chrono::Duration::minutes(15);
/// A certificate this close to its end is not being renewed.
pub const CERT_EXPIRY_WARNING: chrono::Duration = chrono::Duration::days(3);

/// An agent's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Healthy,
    Degraded,
    CutOff,
    Offline,
    Revoked,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::Degraded => "degraded",
            State::CutOff => "cut_off",
            State::Offline => "offline",
            State::Revoked => "revoked",
        }
    }

    fn parse(text: &str) -> Option<State> {
        [State::Healthy, State::Degraded, State::CutOff, State::Offline, State::Revoked]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// Why an agent is in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Reason {
    /// `source_error`, `source_paused`, `source_lagging`, `spool_filling`, `dead_letters`,
    /// `slot_wal`, `certificate_expiring`, `holding`, `config_failed`, `no_heartbeat`,
    /// `revoked`, `outage`, `restarted`.
    pub code: String,
    /// The source it is about, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// What is wrong, in a sentence.
    pub message: String,
}

impl Reason {
    fn new(code: &str, source: Option<&str>, message: String) -> Reason {
        Reason { code: code.into(), source: source.map(String::from), message }
    }
}

/// An agent's health now.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Health {
    pub state: State,
    pub reasons: Vec<Reason>,
    /// Since when (RFC 3339) it is in this state, as far as the history knows.
    pub since: Option<String>,
}

/// One change of an agent's state.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Change {
    /// When it began (RFC 3339).
    pub since: String,
    pub state: State,
    pub reasons: Vec<Reason>,
}

fn human(d: chrono::Duration) -> String {
    let s = d.num_seconds().max(0);
    match s {
        0..120 => format!("{s} s"),
        120..7_200 => format!("{} min", s / 60),
        7_200..172_800 => format!("{} h", s / 3_600),
        _ => format!("{} days", s / 86_400),
    }
}

/// Healthy or degraded, from a heartbeat received at `at`; `errors_rising_at` is when its
/// count of bad records last grew.
pub fn assess(hb: &Heartbeat, errors_rising_at: Option<DateTime<Utc>>, at: DateTime<Utc>) -> (State, Vec<Reason>) {
    let mut reasons = Vec::new();
    for s in &hb.sources {
        let id = Some(s.source_id.as_str());
        match s.state.as_str() {
            "error" => reasons.push(Reason::new(
                "source_error",
                id,
                format!("source {}: {}", s.source_id, s.last_error.as_deref().unwrap_or("stopped on an error")),
            )),
            "paused" => reasons.push(Reason::new(
                "source_paused",
                id,
                format!("source {} paused: the spool is full", s.source_id),
            )),
            _ => {}
        }
        let lag = chrono::Duration::milliseconds(i64::try_from(s.lag_ms).unwrap_or(i64::MAX));
        if lag > LAG_DEGRADED {
            reasons.push(Reason::new(
                "source_lagging",
                id,
                format!("source {}: its oldest unshipped event is {} old", s.source_id, human(lag)),
            ));
        }
        if let (Some(retained), Some(max)) = (s.retained_wal_bytes, s.max_retained_wal_bytes)
            && retained > max
        {
            reasons.push(Reason::new(
                "slot_wal",
                id,
                format!(
                    "source {}: its replication slot retains {} MiB of WAL (allowed {} MiB)",
                    s.source_id,
                    retained >> 20,
                    max >> 20
                ),
            ));
        }
    }
    if hb.spool_max_bytes > 0 && hb.spool_bytes as f64 > SPOOL_FULL_RATIO * hb.spool_max_bytes as f64 {
        reasons.push(Reason::new(
            "spool_filling",
            None,
            format!("spool {} % full", hb.spool_bytes.saturating_mul(100) / hb.spool_max_bytes),
        ));
    }
    if let Some(t) = errors_rising_at
        && at - t < DEAD_LETTER_WINDOW
    {
        let n: u64 = hb.sources.iter().map(|s| s.n_errors).sum();
        reasons.push(Reason::new(
            "dead_letters",
            None,
            format!("bad records in the last {} ({n} in all, in the dead-letter files)", human(DEAD_LETTER_WINDOW)),
        ));
    }
    if let Some(end) = hb.cert_not_after.and_then(|s| DateTime::from_timestamp(s, 0))
        && end - at < CERT_EXPIRY_WARNING
    {
        reasons.push(Reason::new(
            "certificate_expiring",
            None,
            format!("the certificate expires in {} and has not been renewed", human(end - at)),
        ));
    }
    if let Some(why) = &hb.holding {
        reasons.push(Reason::new("holding", None, why.clone()));
    }
    if let Some(c) = hb.config.as_ref().filter(|c| c.state == "rolled_back" || c.state == "refused") {
        let version = c.failed_version.map_or("?".to_owned(), |v| v.to_string());
        let how = if c.state == "rolled_back" { "rolled back" } else { "refused" };
        let runs = c.version.map_or("its local file".to_owned(), |v| format!("version {v}"));
        reasons.push(Reason::new(
            "config_failed",
            None,
            format!(
                "configuration version {version} of group {} {how} by the agent (it runs {runs}): {}",
                c.group,
                c.error.as_deref().unwrap_or("no error given")
            ),
        ));
    }
    (if reasons.is_empty() { State::Healthy } else { State::Degraded }, reasons)
}

/// What makes two assessments the same change: each reason's code and source (not its message,
/// whose figures move from heartbeat to heartbeat).
fn keys(reasons: &[Reason]) -> Vec<String> {
    reasons.iter().map(|r| format!("{}/{}", r.code, r.source.as_deref().unwrap_or(""))).collect()
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text).ok().map(|t| t.with_timezone(&Utc))
}

fn change(
    tx: &mut dyn Tx,
    r: &FleetRecord,
    since: DateTime<Utc>,
    state: State,
    reasons: &[Reason],
) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO agent_health (tenant, agent_id, since, state, reasons) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (tenant, agent_id, since) DO UPDATE SET state = excluded.state, reasons = excluded.reasons",
        &[
            (&r.tenant).into(),
            (&r.agent_id).into(),
            rfc3339(since).into(),
            state.as_str().into(),
            serde_json::to_string(reasons).unwrap_or_default().into(),
        ],
    )?;
    Ok(())
}

/// Stores a heartbeat and the changes of health it shows: an outage the agent reports (cut
/// off), a restart after a silence (offline), then the state it is in now if that differs from
/// the last one recorded. A heartbeat older than the stored one changes nothing (Kafka may
/// deliver one again).
pub fn record(tx: &mut dyn Tx, r: &FleetRecord) -> Result<(), DbError> {
    tx.lock_key(&format!("agent/{}/{}", r.tenant, r.agent_id))?;
    let previous = tx.query(
        "SELECT received_at, heartbeat, errors_rising_at FROM agents WHERE tenant = ?1 AND agent_id = ?2",
        &[(&r.tenant).into(), (&r.agent_id).into()],
    )?;
    let previous = previous.into_iter().next().map(|row| {
        let mut row = row.into_iter();
        let received = row.next().map(Val::into_text).unwrap_or_default();
        let heartbeat: Option<Heartbeat> = row.next().and_then(|v| serde_json::from_str(&v.into_text()).ok());
        let rising = row.next().and_then(|v| parse_time(v.text()));
        (parse_time(&received), heartbeat, rising)
    });
    let at = r.received_at;
    if let Some((Some(prev_at), _, _)) = &previous
        && *prev_at > at
    {
        return Ok(());
    }
    let errors = |hb: &Heartbeat| hb.sources.iter().map(|s| s.n_errors).sum::<u64>();
    let mut rising = previous.as_ref().and_then(|p| p.2);
    let prev_hb = previous.as_ref().and_then(|p| p.1.as_ref());
    if errors(&r.heartbeat) > prev_hb.map_or(0, errors) {
        rising = Some(at);
    }
    tx.exec(
        "INSERT INTO agents (tenant, agent_id, received_at, transport, remote_addr, heartbeat, errors_rising_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (tenant, agent_id) DO UPDATE SET received_at = excluded.received_at,
             transport = excluded.transport, remote_addr = excluded.remote_addr, heartbeat = excluded.heartbeat,
             errors_rising_at = excluded.errors_rising_at",
        &[
            (&r.tenant).into(),
            (&r.agent_id).into(),
            rfc3339(at).into(),
            (&r.transport).into(),
            (&r.remote_addr).into(),
            serde_json::to_string(&r.heartbeat).unwrap_or_default().into(),
            rising.map_or(Val::Null, |t| rfc3339(t).into()),
        ],
    )?;

    let last = tx.query(
        "SELECT state, reasons FROM agent_health WHERE tenant = ?1 AND agent_id = ?2 ORDER BY since DESC LIMIT 1",
        &[(&r.tenant).into(), (&r.agent_id).into()],
    )?;
    let mut last: Option<(State, Vec<String>)> = last.into_iter().next().and_then(|row| {
        let mut row = row.into_iter();
        let state = State::parse(row.next()?.text())?;
        let reasons: Vec<Reason> = serde_json::from_str(row.next()?.text()).unwrap_or_default();
        Some((state, keys(&reasons)))
    });
    // Not running for part of its silence: stopped, then started again.
    if let Some((Some(prev_at), _, _)) = &previous {
        let started = at - chrono::Duration::seconds(i64::try_from(r.heartbeat.uptime_secs).unwrap_or(i64::MAX));
        if started - *prev_at > chrono::Duration::seconds(30) {
            let reason = Reason::new(
                "restarted",
                None,
                format!("not running for {} (started again {})", human(started - *prev_at), rfc3339(started)),
            );
            change(tx, r, *prev_at, State::Offline, &[reason])?;
            last = Some((State::Offline, Vec::new()));
        }
    }
    // A window the agent spent without the cloud, reported once it is back (in every heartbeat
    // of the sessions after it: recorded once, by its start).
    let prev_outage = prev_hb.and_then(|h| h.last_outage.clone());
    if let Some(o) = &r.heartbeat.last_outage
        && prev_outage.as_ref() != Some(o)
        && let (Some(from), Some(to)) =
            (DateTime::from_timestamp_millis(o.from_ms), DateTime::from_timestamp_millis(o.to_ms))
    {
        let reason = Reason::new(
            "outage",
            None,
            format!(
                "running but unable to reach the cloud for {}; {} events buffered meanwhile",
                human(to - from),
                o.buffered_events
            ),
        );
        change(tx, r, from, State::CutOff, &[reason])?;
        last = Some((State::CutOff, Vec::new()));
    }
    let (state, reasons) = assess(&r.heartbeat, rising, at);
    if last.as_ref() != Some(&(state, keys(&reasons))) {
        change(tx, r, at, state, &reasons)?;
    }
    Ok(())
}

/// An agent's stored row read back: the row (its heartbeat taken out), that heartbeat, and the
/// agent's health at `now` (what `/api/v1/fleet` and `cloud-aggregator status` show).
pub fn of_row(
    row: crate::store::query::FleetRow,
    revoked: &std::collections::HashSet<String>,
    now: DateTime<Utc>,
    offline_after: chrono::Duration,
) -> (crate::store::query::AgentRow, Heartbeat, Health) {
    let mut agent = row.agent;
    let hb: Heartbeat = serde_json::from_value(std::mem::take(&mut agent.heartbeat)).unwrap_or_default();
    let health = current(
        &agent.received_at,
        &hb,
        row.errors_rising_at.as_deref(),
        row.last_change.as_deref(),
        revoked.contains(&agent.agent_id),
        now,
        offline_after,
    );
    (agent, hb, health)
}

/// An agent's health as read now: its last assessment, unless it is revoked or silent.
pub fn current(
    received_at: &str,
    heartbeat: &Heartbeat,
    errors_rising_at: Option<&str>,
    last_change: Option<&str>,
    revoked: bool,
    now: DateTime<Utc>,
    offline_after: chrono::Duration,
) -> Health {
    let seen = parse_time(received_at);
    if revoked {
        return Health {
            state: State::Revoked,
            reasons: vec![Reason::new("revoked", None, "its certificate was revoked".into())],
            since: None,
        };
    }
    let silent = seen.map_or(chrono::Duration::MAX, |t| now - t);
    if silent >= offline_after {
        return Health {
            state: State::Offline,
            reasons: vec![Reason::new(
                "no_heartbeat",
                None,
                format!(
                    "no heartbeat for {}: the agent is down or cannot reach the cloud (it reports which when it is back)",
                    human(silent)
                ),
            )],
            since: seen.map(rfc3339),
        };
    }
    let (state, reasons) = assess(heartbeat, errors_rising_at.and_then(parse_time), now);
    Health { state, reasons, since: last_change.map(String::from) }
}

#[cfg(test)]
mod tests {
    use actidash_shared::wire::SourceStatus;

    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn source(id: &str, state: &str) -> SourceStatus {
        SourceStatus { source_id: id.into(), state: state.into(), ..Default::default() }
    }

    #[test]
    fn each_reason_degrades_and_none_is_healthy() {
        let at = t("2026-12-03T10:00:00Z");
        let fine = Heartbeat {
            sources: vec![source("orders", "running")],
            spool_bytes: 10,
            spool_max_bytes: 100,
            cert_not_after: Some((at + chrono::Duration::days(20)).timestamp()),
            ..Default::default()
        };
        assert_eq!(assess(&fine, None, at), (State::Healthy, vec![]));
        let code = |hb: &Heartbeat, rising: Option<DateTime<Utc>>| {
            let (state, reasons) = assess(hb, rising, at);
            assert_eq!(state, State::Degraded);
            reasons.into_iter().map(|r| r.code).collect::<Vec<_>>()
        };
        let mut hb = fine.clone();
        hb.sources[0].state = "error".into();
        hb.sources[0].last_error = Some("db: password authentication failed".into());
        assert_eq!(code(&hb, None), ["source_error"]);
        assert!(assess(&hb, None, at).1[0].message.contains("password authentication failed"));
        hb.sources[0].state = "paused".into();
        assert_eq!(code(&hb, None), ["source_paused"]);
        let mut hb = fine.clone();
        hb.sources[0].lag_ms = 5 * 60_000 + 1;
        assert_eq!(code(&hb, None), ["source_lagging"]);
        hb.sources[0].lag_ms = 5 * 60_000;
        assert_eq!(assess(&hb, None, at).0, State::Healthy, "five minutes is not over five");
        let mut hb = fine.clone();
        hb.spool_bytes = 81;
        assert_eq!(code(&hb, None), ["spool_filling"]);
        assert_eq!(code(&fine, Some(at - chrono::Duration::minutes(14))), ["dead_letters"]);
        assert_eq!(assess(&fine, Some(at - chrono::Duration::minutes(15)), at).0, State::Healthy);
        let mut hb = fine.clone();
        hb.sources[0].retained_wal_bytes = Some(2 << 30);
        hb.sources[0].max_retained_wal_bytes = Some(1 << 30);
        assert_eq!(code(&hb, None), ["slot_wal"]);
        let mut hb = fine.clone();
        hb.cert_not_after = Some((at + chrono::Duration::days(2)).timestamp());
        assert_eq!(code(&hb, None), ["certificate_expiring"]);
        let mut hb = fine.clone();
        hb.holding = Some("waiting for schema v3".into());
        assert_eq!(code(&hb, None), ["holding"]);
        let mut hb = fine.clone();
        let state = |s: &str| actidash_shared::wire::ConfigState {
            group: "stores".into(),
            version: Some(1),
            state: s.into(),
            failed_version: Some(2),
            error: Some("source shop: unable to open database file".into()),
        };
        hb.config = Some(state("applied"));
        assert_eq!(assess(&hb, None, at).0, State::Healthy, "a push that ran well is no reason");
        hb.config = Some(state("rolled_back"));
        assert_eq!(code(&hb, None), ["config_failed"]);
    }

    #[test]
    fn silence_is_offline_and_revocation_wins() {
        let now = t("2026-12-03T10:00:00Z");
        let hb = Heartbeat::default();
        let minute = chrono::Duration::minutes(1);
        let h = current("2026-12-03T09:59:30.000000Z", &hb, None, Some("x"), false, now, minute);
        assert_eq!((h.state, h.since.as_deref()), (State::Healthy, Some("x")));
        let h = current("2026-12-03T09:59:00.000000Z", &hb, None, None, false, now, minute);
        assert_eq!(h.state, State::Offline);
        assert!(h.reasons[0].message.contains("60 s"), "{:?}", h.reasons);
        assert_eq!(current("2026-12-03T09:59:59Z", &hb, None, None, true, now, minute).state, State::Revoked);
    }
}
