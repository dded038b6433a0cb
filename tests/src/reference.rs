//! An independent reference of every analytics figure, computed differently from the product:
//! the raw on-prem lines are loaded into a scratch SQLite database and the metrics are plain
//! SQL over them — JSON functions to read the lines, window functions for sessions and for
//! ordering touches, floating point for attribution weights. No product code is used.
//!
//! [`Figures`] is what both sides are reduced to: [`compute`] fills it from the lines,
//! [`Figures::from_api`] from the API's JSON answers, and [`Figures::assert_matches`] compares
//! them (exactly, except attribution: within a cent of revenue and a millionth of an order per
//! model, channel and currency).

use std::collections::BTreeMap;

use anyhow::Context as _;
use rusqlite::Connection;
use rusqlite::functions::FunctionFlags;
use serde_json::Value;

use crate::generator::{Feed, Line};

/// One raw on-prem line and the identity the agent gives it.
#[derive(Debug, Clone)]
pub struct RawLine {
    pub agent: String,
    pub source: String,
    pub seq: u64,
    pub feed: Feed,
    pub line: String,
}

/// The valid lines of one agent's files as raw lines, numbered per source in file order (the
/// order of the agent's seqs).
pub fn raw_lines(agent: &str, lines: &[Line]) -> Vec<RawLine> {
    let mut seqs = std::collections::BTreeMap::new();
    lines
        .iter()
        .filter(|l| l.valid)
        .map(|l| {
            let seq = seqs.entry(l.feed).or_insert(0_u64);
            *seq += 1;
            RawLine {
                agent: agent.into(),
                source: l.feed.source_id().into(),
                seq: *seq,
                feed: l.feed,
                line: l.text.clone(),
            }
        })
        .collect()
}

/// The figures compared.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Figures {
    /// (channel, site, country, currency) → placed, gross cents, cancellations, cancelled
    /// cents, refunds, refunded cents, units.
    pub sales: BTreeMap<(String, String, String, String), [i64; 7]>,
    /// (hour, currency) → net orders, net cents.
    pub sales_hourly: BTreeMap<(i64, String), (i64, i64)>,
    /// (sku, currency) → units, cents.
    pub products: BTreeMap<(String, String), (i64, i64)>,
    /// referrer → sessions, bounces, events, total duration in ms.
    pub sessions: BTreeMap<String, (i64, i64, i64, i64)>,
    /// hour of the first event → sessions.
    pub sessions_hourly: BTreeMap<i64, i64>,
    /// page_view, add_to_cart, checkout, purchase.
    pub funnel: Vec<i64>,
    pub event_types: BTreeMap<String, i64>,
    /// (model, channel, currency) → credited orders, credited revenue (currency units).
    pub attribution: BTreeMap<(String, String, String), (f64, f64)>,
    /// (channel, currency) → cost in cents.
    pub cost: BTreeMap<(String, String), i64>,
    /// (sku, warehouse) → on hand.
    pub inventory: BTreeMap<(String, String), i64>,
}

pub const MODELS: [&str; 5] = ["last_touch", "first_touch", "linear", "time_decay", "position_based"];
pub const FUNNEL: [&str; 4] = ["page_view", "add_to_cart", "checkout", "purchase"];

const LOOKBACK_MS: i64 = 30 * 86_400_000;
const HALF_LIFE_MS: f64 = 7.0 * 86_400_000.0;
const GAP_MS: i64 = 30 * 60_000;

/// The figures of `records` (each counted once), by SQL.
pub fn compute(records: &[RawLine]) -> anyhow::Result<Figures> {
    let db = Connection::open_in_memory()?;
    db.create_scalar_function("pow2", 1, FunctionFlags::SQLITE_DETERMINISTIC, |ctx| Ok(ctx.get::<f64>(0)?.exp2()))?;
    db.execute_batch("CREATE TABLE raw (agent TEXT, source TEXT, seq INTEGER, feed TEXT, line TEXT);")?;
    {
        let mut insert = db.prepare("INSERT INTO raw VALUES (?1, ?2, ?3, ?4, ?5)")?;
        for r in records {
            let feed = format!("{:?}", r.feed).to_lowercase();
            insert.execute(rusqlite::params![r.agent, r.source, r.seq as i64, feed, r.line])?;
        }
    }
    db.execute_batch(&format!(
        "
        CREATE TEMP TABLE orders AS SELECT agent, source, seq, line,
            json_extract(line, '$.id') AS id, json_extract(line, '$.customer.id') AS customer,
            json_extract(line, '$.channel') AS channel, json_extract(line, '$.site') AS site,
            json_extract(line, '$.country') AS country, json_extract(line, '$.currency') AS currency,
            CAST(round(json_extract(line, '$.total') * 100) AS INTEGER) AS cents,
            json_extract(line, '$.status') AS status,
            CAST(round(unixepoch(json_extract(line, '$.created_at'), 'subsec') * 1000) AS INTEGER) AS ts
        FROM raw WHERE feed = 'orders';
        CREATE TEMP VIEW web_raw AS SELECT json_extract(line, '$.visitor') AS visitor, json_extract(line, '$.ts') AS ts,
            json_extract(line, '$.event') AS type, lower(coalesce(json_extract(line, '$.referrer'), '')) AS r
        FROM raw WHERE feed = 'web';
        CREATE TEMP VIEW web_host AS SELECT visitor, ts, type, r,
            CASE WHEN instr(substr(r, instr(r, '://') + 3), '/') > 0
                THEN substr(substr(r, instr(r, '://') + 3), 1, instr(substr(r, instr(r, '://') + 3), '/') - 1)
                ELSE substr(r, instr(r, '://') + 3) END AS host
        FROM web_raw;
        CREATE TEMP TABLE web AS SELECT visitor, ts, type,
            CASE WHEN r = '' THEN '(direct)' WHEN host LIKE 'www.%' THEN substr(host, 5) ELSE host END AS ref
        FROM web_host;
        CREATE TEMP TABLE touch AS SELECT json_extract(line, '$.user') AS user,
            CAST(unixepoch(json_extract(line, '$.time')) * 1000 AS INTEGER) AS ts,
            json_extract(line, '$.utm_source') AS channel, json_extract(line, '$.utm_campaign') AS campaign,
            CAST(round(json_extract(line, '$.cost') * 100) AS INTEGER) AS cost
        FROM raw WHERE feed = 'marketing';
        CREATE INDEX touch_by_user ON touch (user, ts);
        CREATE INDEX orders_by_id ON orders (id);
        CREATE INDEX web_by_visitor ON web (visitor, ts);
        CREATE TEMP TABLE sess AS
        WITH marked AS (
            SELECT *, CASE WHEN ts - lag(ts) OVER (PARTITION BY visitor ORDER BY ts) <= {GAP_MS} THEN 0 ELSE 1 END AS new_session
            FROM web),
        numbered AS (
            SELECT *, sum(new_session) OVER (PARTITION BY visitor ORDER BY ts ROWS UNBOUNDED PRECEDING) AS sid
            FROM marked),
        firsts AS (
            SELECT *, first_value(ref) OVER (PARTITION BY visitor, sid ORDER BY ts, ref) AS first_ref FROM numbered)
        SELECT visitor, sid, min(ts) AS start, max(ts) AS finish, count(*) AS n, min(first_ref) AS ref,
            max(type = 'page_view') AS pv, max(type = 'add_to_cart') AS cart, max(type = 'checkout') AS co,
            max(type = 'purchase') AS buy, sum(type = 'page_view') AS pvs
        FROM firsts GROUP BY visitor, sid;
        "
    ))?;
    let mut f = Figures::default();
    let mut q = db.prepare(
        "SELECT channel, site, country, currency,
            sum(status = 'placed'), sum(CASE WHEN status = 'placed' THEN cents ELSE 0 END),
            sum(status = 'cancelled'), sum(CASE WHEN status = 'cancelled' THEN cents ELSE 0 END),
            sum(status = 'refunded'), sum(CASE WHEN status = 'refunded' THEN cents ELSE 0 END),
            sum(CASE WHEN status = 'placed' THEN (SELECT coalesce(sum(json_extract(value, '$.quantity')), 0) FROM json_each(line, '$.lines')) ELSE 0 END)
         FROM orders GROUP BY 1, 2, 3, 4",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        let mut v = [0_i64; 7];
        for (i, x) in v.iter_mut().enumerate() {
            *x = r.get(4 + i)?;
        }
        f.sales.insert((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?), v);
    }
    let mut q = db.prepare(
        "SELECT (ts / 3600000) * 3600, currency,
            sum(CASE status WHEN 'placed' THEN 1 WHEN 'cancelled' THEN -1 WHEN 'refunded' THEN -1 ELSE 0 END),
            sum(CASE status WHEN 'placed' THEN cents WHEN 'cancelled' THEN -cents WHEN 'refunded' THEN -cents ELSE 0 END)
         FROM orders GROUP BY 1, 2",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.sales_hourly.insert((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?));
    }
    let mut q = db.prepare(
        "SELECT json_extract(j.value, '$.sku'), o.currency, sum(json_extract(j.value, '$.quantity')),
            sum(json_extract(j.value, '$.quantity') * CAST(round(json_extract(j.value, '$.unit_price') * 100) AS INTEGER))
         FROM orders o, json_each(o.line, '$.lines') j WHERE o.status = 'placed' GROUP BY 1, 2",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.products.insert((r.get(0)?, r.get(1)?), (r.get(2)?, r.get(3)?));
    }
    let mut q =
        db.prepare("SELECT ref, count(*), sum(n = 1 AND pvs = 1), sum(n), sum(finish - start) FROM sess GROUP BY ref")?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.sessions.insert(r.get(0)?, (r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?));
    }
    let mut q = db.prepare("SELECT (start / 3600000) * 3600, count(*) FROM sess GROUP BY 1")?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.sessions_hourly.insert(r.get(0)?, r.get(1)?);
    }
    f.funnel = db.query_row(
        "SELECT coalesce(sum(pv), 0), coalesce(sum(pv AND cart), 0), coalesce(sum(pv AND cart AND co), 0),
            coalesce(sum(pv AND cart AND co AND buy), 0) FROM sess",
        [],
        |r| Ok(vec![r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?]),
    )?;
    let mut q = db.prepare("SELECT type, count(*) FROM web GROUP BY type")?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.event_types.insert(r.get(0)?, r.get(1)?);
    }
    let mut q = db.prepare(&format!(
        "WITH ok AS (
            SELECT id, customer, ts, cents, currency FROM orders
            WHERE status = 'placed' AND id NOT IN (SELECT id FROM orders WHERE status IN ('cancelled', 'refunded'))),
        j AS (
            SELECT o.id, o.cents, o.currency, t.channel,
                row_number() OVER (PARTITION BY o.id ORDER BY t.ts, t.channel, t.campaign) AS rn,
                count(*) OVER (PARTITION BY o.id) AS n,
                pow2(-(o.ts - t.ts) / {HALF_LIFE_MS:.1}) AS dw
            FROM ok o JOIN touch t ON t.user = o.customer AND t.ts > o.ts - {LOOKBACK_MS} AND t.ts <= o.ts),
        w AS (SELECT *, dw / sum(dw) OVER (PARTITION BY id) AS td FROM j),
        credit AS (
            SELECT 'last_touch' AS model, channel, currency, cents, CASE WHEN rn = n THEN 1.0 ELSE 0.0 END AS weight FROM w
            UNION ALL SELECT 'first_touch', channel, currency, cents, CASE WHEN rn = 1 THEN 1.0 ELSE 0.0 END FROM w
            UNION ALL SELECT 'linear', channel, currency, cents, 1.0 / n FROM w
            UNION ALL SELECT 'time_decay', channel, currency, cents, td FROM w
            UNION ALL SELECT 'position_based', channel, currency, cents,
                CASE WHEN n = 1 THEN 1.0 WHEN n = 2 THEN 0.5 WHEN rn = 1 OR rn = n THEN 0.4 ELSE 0.2 / (n - 2) END FROM w
            UNION ALL SELECT m.model, '(none)', o.currency, o.cents, 1.0
            FROM ok o CROSS JOIN (SELECT 'last_touch' AS model UNION ALL SELECT 'first_touch' UNION ALL SELECT 'linear'
                UNION ALL SELECT 'time_decay' UNION ALL SELECT 'position_based') m
            WHERE NOT EXISTS (SELECT 1 FROM touch t WHERE t.user = o.customer AND t.ts > o.ts - {LOOKBACK_MS} AND t.ts <= o.ts))
        SELECT model, channel, currency, sum(weight), sum(weight * cents) / 100.0 FROM credit
        GROUP BY 1, 2, 3 HAVING sum(weight) > 0"
    ))?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.attribution.insert((r.get(0)?, r.get(1)?, r.get(2)?), (r.get(3)?, r.get(4)?));
    }
    let mut q = db.prepare("SELECT channel, 'EUR', sum(cost) FROM touch GROUP BY 1")?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.cost.insert((r.get(0)?, r.get(1)?), r.get(2)?);
    }
    let mut q = db.prepare(
        "SELECT sku, warehouse, qty FROM (
            SELECT json_extract(line, '$.sku') AS sku, json_extract(line, '$.warehouse') AS warehouse,
                json_extract(line, '$.qty') AS qty,
                row_number() OVER (PARTITION BY json_extract(line, '$.sku'), json_extract(line, '$.warehouse')
                    ORDER BY unixepoch(json_extract(line, '$.at'), 'subsec') DESC, agent DESC, source DESC, seq DESC) AS latest
            FROM raw WHERE feed = 'inventory') WHERE latest = 1",
    )?;
    let mut rows = q.query([])?;
    while let Some(r) = rows.next()? {
        f.inventory.insert((r.get(0)?, r.get(1)?), r.get(2)?);
    }
    Ok(f)
}

/// Exact cents of a decimal text with at most two decimals.
pub fn cents(text: &str) -> anyhow::Result<i64> {
    let negative = text.starts_with('-');
    let t = text.trim_start_matches('-');
    let (units, frac) = t.split_once('.').unwrap_or((t, ""));
    anyhow::ensure!(frac.len() <= 2, "{text} has more than two decimals");
    let v = units.parse::<i64>()? * 100 + format!("{frac:0<2}").parse::<i64>()?;
    Ok(if negative { -v } else { v })
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_owned()
}

fn int(v: &Value, k: &str) -> anyhow::Result<i64> {
    v[k].as_i64().with_context(|| format!("{k} is not an integer in {v}"))
}

fn num(v: &Value, k: &str) -> anyhow::Result<f64> {
    v[k].as_str().with_context(|| format!("{k} is not decimal text in {v}"))?.parse::<f64>().map_err(Into::into)
}

/// The API's answers to reduce.
#[derive(Debug, Default)]
pub struct Answers {
    /// `/sales?group_by=channel,site,country,currency` rows.
    pub sales: Value,
    /// `/sales?granularity=hour&group_by=currency` rows.
    pub sales_hourly: Value,
    /// `/sales/products?limit=1000` rows.
    pub products: Value,
    /// `/behavior?group_by=referrer`.
    pub behavior: Value,
    /// `/behavior?granularity=hour`.
    pub behavior_hourly: Value,
    /// `/behavior/funnel`.
    pub funnel: Value,
    /// `/marketing/attribution?model=…&group_by=channel`, per model.
    pub attribution: BTreeMap<String, Value>,
    /// `/inventory?limit=10000`.
    pub inventory: Value,
}

impl Figures {
    /// The figures in the API's answers.
    pub fn from_api(a: &Answers) -> anyhow::Result<Figures> {
        let mut f = Figures::default();
        for r in a.sales.as_array().context("sales rows")? {
            let key = (s(r, "channel"), s(r, "site"), s(r, "country"), s(r, "currency"));
            let v = [
                int(r, "placed_orders")?,
                cents(&s(r, "gross_revenue"))?,
                int(r, "cancellations")?,
                cents(&s(r, "cancelled_revenue"))?,
                int(r, "refunds")?,
                cents(&s(r, "refunded_revenue"))?,
                int(r, "units")?,
            ];
            f.sales.insert(key, v);
        }
        for r in a.sales_hourly.as_array().context("hourly sales rows")? {
            let hour = chrono::DateTime::parse_from_rfc3339(&s(r, "bucket"))?.timestamp();
            f.sales_hourly.insert((hour, s(r, "currency")), (int(r, "orders")?, cents(&s(r, "revenue"))?));
        }
        for r in a.products.as_array().context("product rows")? {
            f.products.insert((s(r, "sku"), s(r, "currency")), (int(r, "units")?, cents(&s(r, "revenue"))?));
        }
        for r in a.behavior["sessions"].as_array().context("session rows")? {
            let n = int(r, "sessions")?;
            let mean = r["average_session_duration_secs"].as_f64().unwrap_or(0.0);
            let total_ms = (mean * 1000.0 * n as f64).round() as i64;
            f.sessions.insert(s(r, "referrer"), (n, int(r, "bounces")?, int(r, "events_in_sessions")?, total_ms));
        }
        for r in a.behavior_hourly["sessions"].as_array().context("hourly session rows")? {
            let hour = chrono::DateTime::parse_from_rfc3339(&s(r, "bucket"))?.timestamp();
            f.sessions_hourly.insert(hour, int(r, "sessions")?);
        }
        for r in a.behavior["events"].as_array().context("event rows")? {
            *f.event_types.entry(s(r, "type")).or_default() += int(r, "events")?;
        }
        f.funnel = a.funnel["steps"]
            .as_array()
            .context("funnel steps")?
            .iter()
            .map(|st| int(st, "sessions"))
            .collect::<Result<_, _>>()?;
        for (model, answer) in &a.attribution {
            for r in answer["rows"].as_array().context("attribution rows")? {
                let (orders, revenue) = (num(r, "attributed_orders")?, num(r, "attributed_revenue")?);
                if orders != 0.0 || revenue != 0.0 {
                    f.attribution.insert((model.clone(), s(r, "channel"), s(r, "currency")), (orders, revenue));
                }
                let cost = cents(&s(r, "cost"))?;
                if model == MODELS[0] && cost != 0 {
                    f.cost.insert((s(r, "channel"), s(r, "currency")), cost);
                }
            }
        }
        for r in a.inventory["levels"].as_array().context("inventory levels")? {
            f.inventory.insert((s(r, "sku"), s(r, "warehouse")), int(r, "on_hand")?);
        }
        Ok(f)
    }

    /// Panics with the first difference: additive figures exactly; durations within a
    /// millisecond per session (the API serves a mean); attribution within a cent and a
    /// millionth of an order per key.
    pub fn assert_matches(&self, reference: &Figures) {
        assert_eq!(self.sales, reference.sales, "sales by channel, site, country, currency");
        assert_eq!(self.sales_hourly, reference.sales_hourly, "net sales per hour and currency");
        assert_eq!(self.products, reference.products, "products");
        assert_eq!(
            self.sessions.keys().collect::<Vec<_>>(),
            reference.sessions.keys().collect::<Vec<_>>(),
            "session referrers"
        );
        for (k, got) in &self.sessions {
            let want = reference.sessions[k];
            assert_eq!((got.0, got.1, got.2), (want.0, want.1, want.2), "sessions, bounces, events of referrer {k}");
            assert!((got.3 - want.3).abs() <= got.0, "duration of referrer {k}: {} ms, reference {} ms", got.3, want.3);
        }
        assert_eq!(self.sessions_hourly, reference.sessions_hourly, "sessions per hour of their start");
        assert_eq!(self.funnel, reference.funnel, "funnel steps");
        assert_eq!(self.event_types, reference.event_types, "events per type");
        assert_eq!(self.cost, reference.cost, "ad cost per channel");
        assert_eq!(
            self.attribution.keys().collect::<Vec<_>>(),
            reference.attribution.keys().collect::<Vec<_>>(),
            "attribution keys"
        );
        for (k, got) in &self.attribution {
            let want = reference.attribution[k];
            assert!(
                (got.0 - want.0).abs() <= 1e-6 * want.0.abs().max(1.0),
                "orders credited to {k:?}: {} vs reference {}",
                got.0,
                want.0
            );
            assert!((got.1 - want.1).abs() <= 0.01, "revenue credited to {k:?}: {} vs reference {}", got.1, want.1);
        }
        assert_eq!(self.inventory, reference.inventory, "latest stock per SKU and warehouse");
    }
}
