//! Alerts: what needs a person's attention now, derived from the store's latest state each time
//! it is asked (nothing to acknowledge, nothing to go stale):
//! - `low_stock`: a SKU in a warehouse with on-hand below the low-stock threshold;
//! - `agent_offline`: no heartbeat from an agent for `[serve] agent_offline_after_secs` — the
//!   agent is down, or cut off from the cloud (the cloud cannot tell the two apart until it
//!   reports again);
//! - `source_error`: an agent's source is stopped on an error (its last error is the message);
//! - `spool_full`: an agent's source is paused because its spool is full (the link is down or
//!   too slow, and the agent stopped reading rather than lose data).
//!
//! Agent alerts need role `ops` (as the fleet does); revoked agents raise none. Each alert has
//! a stable `key`, so a client notifies once per alert however often it asks.

use std::collections::HashSet;

use serde::Serialize;

use crate::store::query::{AgentRow, StockRow};

/// How bad an alert is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Warning,
    Critical,
}

/// One alert.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct Alert {
    /// Stable while the condition lasts: `low_stock/<tenant>/<sku>/<warehouse>`,
    /// `agent_offline/<tenant>/<agent>`, `source_error/<tenant>/<agent>/<source>`…
    pub key: String,
    /// `low_stock`, `agent_offline`, `source_error` or `spool_full`.
    pub kind: String,
    pub severity: Severity,
    pub tenant: String,
    /// The SKU (and warehouse) or the agent (and source) it is about.
    pub subject: String,
    /// What is wrong, in a sentence.
    pub message: String,
    /// Since when it is known: the stock level's event time, the last heartbeat's arrival.
    pub since: String,
}

/// Every alert: critical first; then agents offline, sources stopped, full spools, low stock
/// (lowest first, as `low_stock` comes from the inventory report).
pub fn derive(
    low_stock: &[StockRow],
    threshold: i64,
    agents: Option<(&[AgentRow], &HashSet<String>)>,
    now: chrono::DateTime<chrono::Utc>,
    offline_after: chrono::Duration,
) -> Vec<Alert> {
    let mut out: Vec<Alert> = low_stock
        .iter()
        .map(|s| Alert {
            key: format!("low_stock/{}/{}/{}", s.tenant, s.sku, s.warehouse),
            kind: "low_stock".into(),
            severity: if s.on_hand <= 0 { Severity::Critical } else { Severity::Warning },
            tenant: s.tenant.clone(),
            subject: format!("{} in {}", s.sku, s.warehouse),
            message: if s.on_hand <= 0 {
                format!("{} is out of stock in {} (on hand {})", s.sku, s.warehouse, s.on_hand)
            } else {
                format!("{} is low on stock in {}: {} on hand (below {threshold})", s.sku, s.warehouse, s.on_hand)
            },
            since: s.as_of.clone(),
        })
        .collect();
    for a in agents.map(|(rows, revoked)| rows.iter().filter(|a| !revoked.contains(&a.agent_id))).into_iter().flatten()
    {
        let seen = chrono::DateTime::parse_from_rfc3339(&a.received_at).map(|t| t.with_timezone(&chrono::Utc));
        let silent = seen.map(|t| now - t).unwrap_or(chrono::Duration::MAX);
        if silent >= offline_after {
            out.push(Alert {
                key: format!("agent_offline/{}/{}", a.tenant, a.agent_id),
                kind: "agent_offline".into(),
                severity: Severity::Critical,
                tenant: a.tenant.clone(),
                subject: a.agent_id.clone(),
                message: format!(
                    "agent {} has sent no heartbeat for {}: it is down or cut off from the cloud (a cut-off agent keeps reading into its spool and ships when it is back)",
                    a.agent_id,
                    human(silent)
                ),
                since: a.received_at.clone(),
            });
            // Its sources' states are as old as its last heartbeat: the offline alert says it.
            continue;
        }
        let sources = a.heartbeat.get("sources").and_then(|s| s.as_array()).map(Vec::as_slice).unwrap_or_default();
        for s in sources {
            let text = |k: &str| s.get(k).and_then(|v| v.as_str()).unwrap_or("");
            let source = text("source_id");
            let (kind, severity, message) = match text("state") {
                "error" => (
                    "source_error",
                    Severity::Critical,
                    format!(
                        "source {source} of agent {} stopped on an error: {}",
                        a.agent_id,
                        if text("last_error").is_empty() { "(no message)" } else { text("last_error") }
                    ),
                ),
                "paused" => (
                    "spool_full",
                    Severity::Warning,
                    format!(
                        "source {source} of agent {} is paused: its spool is full (is the link to the cloud down or too slow?)",
                        a.agent_id
                    ),
                ),
                _ => continue,
            };
            out.push(Alert {
                key: format!("{kind}/{}/{}/{source}", a.tenant, a.agent_id),
                kind: kind.into(),
                severity,
                tenant: a.tenant.clone(),
                subject: format!("{} / {source}", a.agent_id),
                message,
                since: a.received_at.clone(),
            });
        }
    }
    // Stable: within a kind, the order found (stock lowest first, agents by tenant and id).
    let rank = |a: &Alert| {
        let kind = ["agent_offline", "source_error", "spool_full", "low_stock"].iter().position(|k| *k == a.kind);
        (a.severity != Severity::Critical, kind)
    };
    out.sort_by_key(rank);
    out
}

/// A duration as a person says it: "45 s", "12 min", "3 h", "2 days".
fn human(d: chrono::Duration) -> String {
    match d.num_seconds() {
        s if s < 120 => format!("{s} s"),
        s if s < 7_200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3_600),
        s => format!("{} days", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stock(sku: &str, on_hand: i64) -> StockRow {
        StockRow {
            tenant: "acme".into(),
            sku: sku.into(),
            warehouse: "berlin".into(),
            on_hand,
            as_of: "2026-12-01T10:00:00Z".into(),
        }
    }

    fn agent(id: &str, at: &str, sources: serde_json::Value) -> AgentRow {
        AgentRow {
            tenant: "acme".into(),
            agent_id: id.into(),
            received_at: at.into(),
            transport: "quic".into(),
            remote_addr: "127.0.0.1:1".into(),
            heartbeat: serde_json::json!({ "sources": sources }),
        }
    }

    #[test]
    fn alerts_come_from_stock_heartbeats_and_their_age() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z").unwrap().to_utc();
        let agents = vec![
            agent("quiet", "2026-12-01T11:58:59Z", serde_json::json!([])),
            agent("ok", "2026-12-01T11:59:59Z", serde_json::json!([{ "source_id": "orders", "state": "running" }])),
            agent(
                "broken",
                "2026-12-01T11:59:59Z",
                serde_json::json!([
                    { "source_id": "orders", "state": "error", "last_error": "permission denied" },
                    { "source_id": "web", "state": "paused" }
                ]),
            ),
            agent("gone", "2026-12-01T09:00:00Z", serde_json::json!([])),
            agent("bad-time", "yesterday", serde_json::json!([])),
        ];
        let revoked: HashSet<String> = ["gone".to_owned()].into();
        let alerts = derive(
            &[stock("cap", 0), stock("mug", 3)],
            20,
            Some((&agents, &revoked)),
            now,
            chrono::Duration::seconds(60),
        );
        let keys: Vec<&str> = alerts.iter().map(|a| a.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "agent_offline/acme/quiet",
                "agent_offline/acme/bad-time",
                "source_error/acme/broken/orders",
                "low_stock/acme/cap/berlin",
                "spool_full/acme/broken/web",
                "low_stock/acme/mug/berlin",
            ]
        );
        assert!(alerts[0].message.contains("61 s"), "{}", alerts[0].message);
        assert!(alerts[3].message.contains("out of stock"));
        assert!(alerts[2].message.ends_with("permission denied"));
        assert!(alerts[5].message.contains("3 on hand (below 20)"));
        // Without the fleet (a viewer's token): stock only.
        let viewer = derive(&[stock("mug", 3)], 20, None, now, chrono::Duration::seconds(60));
        assert_eq!(viewer.len(), 1);
    }
}
