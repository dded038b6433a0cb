//! What the API reads: roll-ups over an event-time range, at a granularity or in total, grouped
//! and filtered by dimension; the reports built from them (sales, products, behavior, funnel,
//! attribution, inventory); the fleet and the counters.
//!
//! A total over a range reads the coarsest rows that tile it (days inside, hours and minutes
//! at the edges: [`cover`]); a series reads the rows of its granularity. Ranges are whole
//! minutes: `from` is rounded down and `to` up to a minute. Money is served as exact decimal
//! text, never as a JSON number.

use std::collections::BTreeMap;

use actidash_shared::Money;
use serde::Serialize;

use super::db::{Cols, DbError, Tx, Val};
use crate::analytics::attribution::{MICRO_PER_ORDER, Model, NANO_PER_RAW, NONE};
use crate::analytics::sessions::{self, KINDS};
use crate::analytics::tables::{self, GRAINS, TableSpec};

/// Which rows a report reads: a tenant (None: all), an event-time range `[from, to)` in unix
/// seconds, a granularity (None: one total over the range), group-by dimensions and filters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub tenant: Option<String>,
    pub from: i64,
    pub to: i64,
    pub granularity: Option<i64>,
    pub group_by: Vec<String>,
    /// Dimension = any of these values.
    pub filters: Vec<(String, Vec<String>)>,
}

impl Selection {
    /// Everything ever stored.
    pub fn all_time() -> Selection {
        Selection { tenant: None, from: 0, to: 253_402_300_800, granularity: None, group_by: vec![], filters: vec![] }
    }

    /// The range widened to whole buckets of `grain` (a table's finest grain): what a report
    /// of that table covers, and says it covers.
    pub fn widened(&self, grain: i64) -> Selection {
        Selection {
            from: self.from.div_euclid(grain) * grain,
            to: -(-self.to).div_euclid(grain) * grain,
            ..self.clone()
        }
    }
}

/// `[from, to)`, widened to whole buckets of `finest`, tiled by roll-up rows of grains of at
/// least `finest`: (grain, first bucket, end), coarsest inside.
pub fn cover(from: i64, to: i64, finest: i64) -> Vec<(i64, i64, i64)> {
    let floor = |t: i64, g: i64| t.div_euclid(g) * g;
    let ceil = |t: i64, g: i64| -(-t).div_euclid(g) * g;
    fn tile(
        from: i64,
        to: i64,
        grains: &[i64],
        out: &mut Vec<(i64, i64, i64)>,
        floor: &dyn Fn(i64, i64) -> i64,
        ceil: &dyn Fn(i64, i64) -> i64,
    ) {
        if from >= to {
            return;
        }
        let Some((&g, finer)) = grains.split_last() else { return };
        let (lo, hi) = (ceil(from, g), floor(to, g));
        if finer.is_empty() || lo >= hi {
            if finer.is_empty() {
                out.push((g, from, to));
            } else {
                tile(from, to, finer, out, floor, ceil);
            }
            return;
        }
        tile(from, lo, finer, out, floor, ceil);
        out.push((g, lo, hi));
        tile(hi, to, finer, out, floor, ceil);
    }
    let mut out = Vec::new();
    let grains: Vec<i64> = GRAINS.into_iter().filter(|g| *g >= finest).collect();
    let finest = grains.first().copied().unwrap_or(60);
    tile(floor(from, finest), ceil(to, finest), &grains, &mut out, &floor, &ceil);
    out
}

/// One grouped row of a roll-up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub tenant: String,
    /// Start of the bucket (series only).
    pub bucket: Option<i64>,
    /// Values of the selection's group-by dimensions, in its order.
    pub dims: Vec<String>,
    /// Sums, in the table's metric order.
    pub metrics: Vec<i64>,
}

/// Reads `spec`'s rows for `sel`. Group-by and filter names must be dimensions of `spec`
/// (checked by the caller; an unknown one here is an error).
/// An answer of more than [`MAX_ROWS`] rows is refused ([`TOO_MANY_ROWS`]).
pub fn rollup(tx: &mut dyn Tx, spec: &TableSpec, sel: &Selection) -> Result<Vec<Row>, DbError> {
    rollup_ordered(tx, spec, sel, None, MAX_ROWS)
}

/// [`rollup`], largest first by the metric of index `top.0` (ties in group order), at most
/// `top.1` rows; without `top`, more than `max_rows` rows is an error.
fn rollup_ordered(
    tx: &mut dyn Tx,
    spec: &TableSpec,
    sel: &Selection,
    top: Option<(usize, usize)>,
    max_rows: usize,
) -> Result<Vec<Row>, DbError> {
    let bad = |name: &str| DbError { message: format!("{} has no dimension {name:?}", spec.name), retryable: false };
    let mut params: Vec<Val> = Vec::new();
    let mut param = |v: Val| {
        params.push(v);
        format!("?{}", params.len())
    };
    // What every piece shares: the tenants and the dimension filters. The tenant leads every
    // key: without one, every tenant is named, so that each piece stays a key range.
    let tenants: Vec<String> = match &sel.tenant {
        Some(t) => vec![t.clone()],
        None => tx
            .query("SELECT DISTINCT tenant FROM watermarks ORDER BY tenant", &[])?
            .into_iter()
            .map(|r| r[0].text().to_owned())
            .collect(),
    };
    if tenants.is_empty() {
        return Ok(Vec::new());
    }
    let mut common: Vec<String> = Vec::new();
    let list: Vec<String> = tenants.into_iter().map(|t| param(t.into())).collect();
    common.push(format!("tenant IN ({})", list.join(", ")));
    for (dim, values) in &sel.filters {
        spec.dim(dim).ok_or_else(|| bad(dim))?;
        let list: Vec<String> = values.iter().map(|v| param(v.into())).collect();
        common.push(format!("{dim} IN ({})", list.join(", ")));
    }
    let mut group: Vec<String> = vec!["tenant".into()];
    if sel.granularity.is_some() {
        group.push("bucket".into());
    }
    for dim in &sel.group_by {
        spec.dim(dim).ok_or_else(|| bad(dim))?;
        group.push(dim.clone());
    }
    // One key range per piece of the range, each read through the key (tenant, grain,
    // bucket, …); their union is grouped. (SQLite does not use the key for an OR of ranges.)
    let pieces: Vec<(i64, i64, i64)> = match sel.granularity {
        Some(g) if g < spec.finest => {
            return Err(DbError {
                message: format!("{} is kept per {} s, not per {g} s", spec.name, spec.finest),
                retryable: false,
            });
        }
        Some(g) => vec![(g, sel.from.div_euclid(g) * g, sel.to)],
        None => cover(sel.from, sel.to, spec.finest),
    };
    if pieces.is_empty() {
        return Ok(Vec::new());
    }
    let columns: Vec<&str> =
        ["tenant", "bucket"].into_iter().chain(spec.dims.iter().copied()).chain(spec.metrics.iter().copied()).collect();
    let selects: Vec<String> = pieces
        .into_iter()
        .map(|(g, lo, hi)| {
            let mut wh = common.clone();
            wh.push(format!(
                "grain = {} AND bucket >= {} AND bucket < {}",
                param(g.into()),
                param(lo.into()),
                param(hi.into())
            ));
            format!("SELECT {} FROM {} WHERE {}", columns.join(", "), spec.name, wh.join(" AND "))
        })
        .collect();
    // Exact, and clamped rather than failing where a sum leaves the 64-bit range.
    let sums: Vec<String> = spec.metrics.iter().map(|m| tx.saturating_sum(m)).collect();
    let order = match top {
        Some((metric, limit)) => {
            format!("{} DESC, {} LIMIT {limit}", tx.saturating_sum(spec.metrics[metric]), group.join(", "))
        }
        // One row more than answered, to tell a complete answer from a cut one.
        None => format!("{} LIMIT {}", group.join(", "), max_rows + 1),
    };
    let sql = format!(
        "SELECT {g}, {s} FROM ({u}) AS pieces GROUP BY {g} ORDER BY {order}",
        g = group.join(", "),
        s = sums.join(", "),
        u = selects.join(" UNION ALL "),
    );
    let n_dims = sel.group_by.len();
    let with_bucket = sel.granularity.is_some();
    let rows = tx.query(&sql, &params)?;
    if rows.len() > max_rows {
        return Err(DbError {
            message: format!(
                "{TOO_MANY_ROWS}: more than {max_rows} in the answer; ask for a shorter range, a coarser granularity or fewer group_by dimensions"
            ),
            retryable: false,
        });
    }
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut c = Cols::new(r);
            let tenant = c.text();
            let bucket = if with_bucket { c.opt_int() } else { None };
            let dims = (0..n_dims).map(|_| c.text()).collect();
            Row { tenant, bucket, dims, metrics: c.rest_ints() }
        })
        .collect())
}

/// Most rows a report answers with.
pub const MAX_ROWS: usize = 100_000;

#[cfg(test)]
pub(crate) fn rollup_at_most(
    tx: &mut dyn Tx,
    spec: &TableSpec,
    sel: &Selection,
    max_rows: usize,
) -> Result<Vec<Row>, DbError> {
    rollup_ordered(tx, spec, sel, None, max_rows)
}
/// How an answer over [`MAX_ROWS`] is refused (the API makes it a 400, not a 503).
pub const TOO_MANY_ROWS: &str = "too many rows";

/// RFC 3339 text of a unix second.
pub fn time_text(unix: i64) -> String {
    chrono::DateTime::from_timestamp(unix, 0)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_default()
}

/// Exact decimal text of a money amount (raw ten-thousandths).
pub fn money(raw: i64) -> String {
    Money(raw).to_string()
}

/// `a / b` rounded half away from zero (None when `b` is 0).
pub fn div_round(a: i128, b: i128) -> Option<i128> {
    if b == 0 {
        return None;
    }
    let (q, r) = (a / b, a % b);
    Some(if 2 * r.abs() >= b.abs() { q + if (a < 0) != (b < 0) { -1 } else { 1 } } else { q })
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Decimal text of a count in millionths.
pub fn micro_text(micro: i64) -> String {
    let sign = if micro < 0 { "-" } else { "" };
    let m = micro.unsigned_abs();
    let (int, frac) = (m / MICRO_PER_ORDER as u64, m % MICRO_PER_ORDER as u64);
    if frac == 0 {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{}", format!("{frac:06}").trim_end_matches('0'))
    }
}

/// The dimensions of a row, by name.
fn dims_map(sel: &Selection, row: &Row) -> BTreeMap<String, String> {
    sel.group_by.iter().cloned().zip(row.dims.iter().cloned()).collect()
}

/// A sales row: a bucket (series) and the group-by dimensions, then the figures.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SalesRow {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub dims: BTreeMap<String, String>,
    /// Placed − cancelled − refunded.
    pub orders: i64,
    /// Gross − cancelled − refunded amounts.
    pub revenue: String,
    pub placed_orders: i64,
    pub gross_revenue: String,
    pub cancellations: i64,
    pub cancelled_revenue: String,
    pub refunds: i64,
    pub refunded_revenue: String,
    pub units: i64,
    /// Gross revenue / placed orders.
    pub average_order_value: Option<String>,
}

pub fn sales(tx: &mut dyn Tx, sel: &Selection) -> Result<Vec<SalesRow>, DbError> {
    Ok(rollup(tx, &tables::SALES, sel)?
        .into_iter()
        .map(|r| {
            let m = &r.metrics;
            let (placed, gross, cancels, cancelled, refunds, refunded, units) =
                (m[0], m[1], m[2], m[3], m[4], m[5], m[6]);
            let net = i128::from(gross) - i128::from(cancelled) - i128::from(refunded);
            SalesRow {
                tenant: r.tenant.clone(),
                bucket: r.bucket.map(time_text),
                dims: dims_map(sel, &r),
                orders: placed - cancels - refunds,
                revenue: money(clamp(net)),
                placed_orders: placed,
                gross_revenue: money(gross),
                cancellations: cancels,
                cancelled_revenue: money(cancelled),
                refunds,
                refunded_revenue: money(refunded),
                units,
                average_order_value: div_round(i128::from(gross), i128::from(placed)).map(|v| money(clamp(v))),
            }
        })
        .collect())
}

/// All-time sales per tenant, channel and currency.
pub fn sales_totals(tx: &mut dyn Tx, tenant: Option<&str>) -> Result<Vec<SalesRow>, DbError> {
    let sel = Selection {
        tenant: tenant.map(str::to_owned),
        group_by: vec!["channel".into(), "currency".into()],
        ..Selection::all_time()
    };
    sales(tx, &sel)
}

/// A product's units and revenue over a range.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct ProductRow {
    pub tenant: String,
    pub sku: String,
    pub currency: String,
    pub units: i64,
    pub revenue: String,
}

/// The top `limit` products by `by` (`revenue` or `units`), ties by SKU.
pub fn products(tx: &mut dyn Tx, sel: &Selection, by_units: bool, limit: usize) -> Result<Vec<ProductRow>, DbError> {
    let sel = Selection { granularity: None, group_by: vec!["sku".into(), "currency".into()], ..sel.clone() };
    let rows = rollup_ordered(tx, &tables::PRODUCTS, &sel, Some((if by_units { 0 } else { 1 }, limit)), MAX_ROWS)?;
    Ok(rows
        .into_iter()
        .map(|r| ProductRow {
            tenant: r.tenant,
            sku: r.dims[0].clone(),
            currency: r.dims[1].clone(),
            units: r.metrics[0],
            revenue: money(r.metrics[1]),
        })
        .collect())
}

/// Session figures of a bucket and referrer group.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct SessionRow {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub referrer: Option<String>,
    pub sessions: i64,
    pub bounces: i64,
    /// Bounces / sessions, 0 to 1.
    pub bounce_rate: Option<f64>,
    /// Mean of (last event − first event), in seconds.
    pub average_session_duration_secs: Option<f64>,
    pub events_in_sessions: i64,
}

/// Events of one type.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct EventTypeRow {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub events: i64,
}

/// The behavior report: sessions (grouped by `referrer` if asked) and events per type.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Behavior {
    pub sessions: Vec<SessionRow>,
    pub events: Vec<EventTypeRow>,
    /// Page views in the range (all tenants selected).
    pub page_views: i64,
}

pub fn behavior(tx: &mut dyn Tx, sel: &Selection) -> Result<Behavior, DbError> {
    let by_referrer = sel.group_by.iter().any(|g| g == "referrer");
    let session_sel = Selection { group_by: if by_referrer { vec!["referrer".into()] } else { vec![] }, ..sel.clone() };
    let sessions = rollup(tx, &tables::SESSIONS, &session_sel)?
        .into_iter()
        .map(|r| {
            let (n, bounces, duration, events) = (r.metrics[0], r.metrics[1], r.metrics[2], r.metrics[3]);
            SessionRow {
                tenant: r.tenant,
                bucket: r.bucket.map(time_text),
                referrer: by_referrer.then(|| r.dims[0].clone()),
                sessions: n,
                bounces,
                bounce_rate: (n > 0).then(|| bounces as f64 / n as f64),
                average_session_duration_secs: (n > 0).then(|| duration as f64 / n as f64 / 1000.0),
                events_in_sessions: events,
            }
        })
        .collect();
    // Events per type have no referrer: the referrer filter does not apply to them.
    let event_sel = Selection {
        group_by: vec!["type".into()],
        filters: sel.filters.iter().filter(|(d, _)| d == "type").cloned().collect(),
        ..sel.clone()
    };
    let events: Vec<EventTypeRow> = rollup(tx, &tables::BEHAVIOR, &event_sel)?
        .into_iter()
        .map(|r| EventTypeRow {
            tenant: r.tenant,
            bucket: r.bucket.map(time_text),
            kind: r.dims[0].clone(),
            events: r.metrics[0],
        })
        .collect();
    let page_views = events.iter().filter(|e| e.kind == "page_view").map(|e| e.events).sum();
    Ok(Behavior { sessions, events, page_views })
}

/// One funnel step.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct FunnelStep {
    pub step: String,
    /// Sessions holding this step's type and every earlier step's.
    pub sessions: i64,
    /// Of the previous step's sessions (the first step: of all sessions).
    pub step_conversion: Option<f64>,
    /// Of the first step's sessions.
    pub overall_conversion: Option<f64>,
}

/// The funnel of `steps` over the sessions that started in the range.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Funnel {
    pub sessions: i64,
    pub steps: Vec<FunnelStep>,
}

pub fn funnel(tx: &mut dyn Tx, sel: &Selection, steps: &[String]) -> Result<Funnel, DbError> {
    let sel = Selection { granularity: None, group_by: vec!["mask".into()], ..sel.clone() };
    let masks: Vec<(u8, i64)> = rollup(tx, &tables::SESSIONS, &sel)?
        .into_iter()
        .map(|r| (r.dims[0].parse().unwrap_or(0), r.metrics[0]))
        .collect();
    let total: i64 = masks.iter().map(|m| m.1).sum();
    let mut need = 0_u8;
    let mut out = Vec::new();
    let mut previous = total;
    let mut first = None;
    for step in steps {
        need |= sessions::kind_by_name(step).map_or(0, sessions::kind_bit);
        let n: i64 = masks.iter().filter(|(m, _)| m & need == need).map(|m| m.1).sum();
        let first_n = *first.get_or_insert(n);
        out.push(FunnelStep {
            step: step.clone(),
            sessions: n,
            step_conversion: (previous > 0).then(|| n as f64 / previous as f64),
            overall_conversion: (first_n > 0).then(|| n as f64 / first_n as f64),
        });
        previous = n;
    }
    Ok(Funnel { sessions: total, steps: out })
}

/// Attributed figures of a channel (and campaign) under one model, with the ad cost.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct AttributionRow {
    pub tenant: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    pub dims: BTreeMap<String, String>,
    pub currency: String,
    /// Credited orders (fractions of orders).
    pub attributed_orders: String,
    pub attributed_revenue: String,
    pub touches: i64,
    /// Ad cost in this currency over the range (touch time), where known.
    pub cost: String,
    /// Attributed revenue / cost, where cost > 0.
    pub roas: Option<String>,
}

/// The attribution report of a model.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Attribution {
    pub model: &'static str,
    pub rows: Vec<AttributionRow>,
    /// Orders in the range (by order time) that are credited.
    pub orders: String,
    /// Orders with no touch (credited to `(none)`), and their share of all orders.
    pub unattributed_orders: String,
    pub unattributed_share: Option<f64>,
}

/// Attribution under `model`, grouped by `channel` and/or `campaign` (and always currency).
pub fn attribution(tx: &mut dyn Tx, sel: &Selection, model: Model) -> Result<Attribution, DbError> {
    // Credit is kept per hour: ad cost is read over the same whole hours.
    let sel = &sel.widened(tables::ATTRIBUTION.finest);
    let mut group: Vec<String> = sel.group_by.iter().filter(|g| *g == "channel" || *g == "campaign").cloned().collect();
    group.push("currency".into());
    let mut filters = sel.filters.clone();
    filters.push(("model".into(), vec![model.name().into()]));
    let credit_sel = Selection { group_by: group.clone(), filters, ..sel.clone() };
    let cost_sel = Selection { group_by: group.clone(), filters: sel.filters.clone(), ..sel.clone() };
    let credits = rollup(tx, &tables::ATTRIBUTION, &credit_sel)?;
    let costs = rollup(tx, &tables::MARKETING, &cost_sel)?;
    type Key = (String, Option<i64>, Vec<String>);
    let mut merged: BTreeMap<Key, (i64, i64, i64, i64)> = BTreeMap::new();
    for r in credits {
        let e = merged.entry((r.tenant, r.bucket, r.dims)).or_default();
        e.0 = e.0.saturating_add(r.metrics[0]);
        e.1 = e.1.saturating_add(r.metrics[1]);
    }
    for r in costs {
        let e = merged.entry((r.tenant, r.bucket, r.dims)).or_default();
        e.2 = e.2.saturating_add(r.metrics[0]);
        e.3 = e.3.saturating_add(r.metrics[1]);
    }
    let (mut orders, mut unattributed) = (0_i64, 0_i64);
    let n = group.len();
    let rows = merged
        .into_iter()
        .map(|((tenant, bucket, dims), (orders_micro, revenue_nano, touches, cost))| {
            orders = orders.saturating_add(orders_micro);
            let is_none = group.iter().zip(&dims).any(|(g, v)| g != "currency" && v == NONE);
            if is_none {
                unattributed = unattributed.saturating_add(orders_micro);
            }
            let revenue_raw = div_round(i128::from(revenue_nano), i128::from(NANO_PER_RAW)).unwrap_or(0);
            AttributionRow {
                tenant,
                bucket: bucket.map(time_text),
                dims: group[..n - 1].iter().cloned().zip(dims[..n - 1].iter().cloned()).collect(),
                currency: dims[n - 1].clone(),
                attributed_orders: micro_text(orders_micro),
                attributed_revenue: money(clamp(revenue_raw)),
                touches,
                cost: money(cost),
                // revenue / cost in ten-thousandths: revenue_nano / cost_raw.
                roas: (cost > 0)
                    .then(|| money(clamp(div_round(i128::from(revenue_nano), i128::from(cost)).unwrap_or(0)))),
            }
        })
        .collect();
    Ok(Attribution {
        model: model.name(),
        rows,
        orders: micro_text(orders),
        unattributed_orders: micro_text(unattributed),
        unattributed_share: (orders > 0).then(|| unattributed as f64 / orders as f64),
    })
}

/// Stock of a SKU in a warehouse.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct StockRow {
    pub tenant: String,
    pub sku: String,
    pub warehouse: String,
    pub on_hand: i64,
    /// Event time of the level.
    pub as_of: String,
}

/// Days of cover of a SKU: its on-hand over all warehouses / its mean daily units sold over
/// the 7 days before `as_of`.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct CoverRow {
    pub tenant: String,
    pub sku: String,
    pub on_hand: i64,
    pub units_sold_7d: i64,
    /// None where nothing was sold.
    pub days_of_cover: Option<f64>,
}

/// The inventory report.
#[derive(Debug, Clone, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Inventory {
    pub total_on_hand: i64,
    pub skus: i64,
    pub threshold: i64,
    /// On-hand below the threshold, lowest first.
    pub low_stock: Vec<StockRow>,
    /// Every level, by SKU and warehouse (at most `limit`).
    pub levels: Vec<StockRow>,
    /// Days of cover, shortest first (at most `limit`).
    pub cover: Vec<CoverRow>,
}

pub fn inventory(
    tx: &mut dyn Tx,
    tenant: Option<&str>,
    filters: &[(String, Vec<String>)],
    threshold: i64,
    as_of: i64,
    limit: usize,
) -> Result<Inventory, DbError> {
    let mut params: Vec<Val> = Vec::new();
    let mut wh: Vec<String> = vec!["1 = 1".into()];
    if let Some(t) = tenant {
        params.push(t.into());
        wh.push(format!("tenant = ?{}", params.len()));
    }
    for (dim, values) in filters {
        let list: Vec<String> = values
            .iter()
            .map(|v| {
                params.push(v.into());
                format!("?{}", params.len())
            })
            .collect();
        wh.push(format!("{dim} IN ({})", list.join(", ")));
    }
    let rows = tx.query(
        &format!(
            "SELECT tenant, sku, warehouse, on_hand, time_ms FROM inventory WHERE {} ORDER BY tenant, sku, warehouse",
            wh.join(" AND ")
        ),
        &params,
    )?;
    let levels: Vec<StockRow> = rows
        .into_iter()
        .map(|r| {
            let mut c = Cols::new(r);
            StockRow {
                tenant: c.text(),
                sku: c.text(),
                warehouse: c.text(),
                on_hand: c.int(),
                as_of: chrono::DateTime::from_timestamp_millis(c.int())
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .unwrap_or_default(),
            }
        })
        .collect();
    let total_on_hand = levels.iter().fold(0_i64, |s, l| s.saturating_add(l.on_hand));
    let mut low_stock: Vec<StockRow> = levels.iter().filter(|l| l.on_hand < threshold).cloned().collect();
    low_stock
        .sort_by(|a, b| a.on_hand.cmp(&b.on_hand).then_with(|| (&a.sku, &a.warehouse).cmp(&(&b.sku, &b.warehouse))));
    low_stock.truncate(limit);
    let mut per_sku: BTreeMap<(String, String), i64> = BTreeMap::new();
    for l in &levels {
        let e = per_sku.entry((l.tenant.clone(), l.sku.clone())).or_default();
        *e = e.saturating_add(l.on_hand);
    }
    let sold_sel = Selection {
        tenant: tenant.map(str::to_owned),
        from: as_of - 7 * 86_400,
        to: as_of,
        granularity: None,
        group_by: vec!["sku".into()],
        filters: filters.iter().filter(|(d, _)| d == "sku").cloned().collect(),
    };
    let sold: BTreeMap<(String, String), i64> = rollup(tx, &tables::PRODUCTS, &sold_sel)?
        .into_iter()
        .map(|r| ((r.tenant, r.dims[0].clone()), r.metrics[0]))
        .collect();
    let mut cover: Vec<CoverRow> = per_sku
        .iter()
        .map(|((tenant, sku), on_hand)| {
            let units = sold.get(&(tenant.clone(), sku.clone())).copied().unwrap_or(0);
            CoverRow {
                tenant: tenant.clone(),
                sku: sku.clone(),
                on_hand: *on_hand,
                units_sold_7d: units,
                days_of_cover: (units > 0).then(|| *on_hand as f64 / (units as f64 / 7.0)),
            }
        })
        .collect();
    cover.sort_by(|a, b| {
        let key = |c: &CoverRow| c.days_of_cover.unwrap_or(f64::INFINITY);
        key(a).total_cmp(&key(b)).then_with(|| a.sku.cmp(&b.sku))
    });
    cover.truncate(limit);
    let skus = per_sku.len() as i64;
    let mut levels = levels;
    levels.truncate(limit);
    Ok(Inventory { total_on_hand, skus, threshold, low_stock, levels, cover })
}

/// Fleet health row, as served.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct AgentRow {
    pub tenant: String,
    pub agent_id: String,
    pub received_at: String,
    pub transport: String,
    pub remote_addr: String,
    #[schema(value_type = Object)]
    pub heartbeat: serde_json::Value,
}

impl AgentRow {
    /// From the columns tenant, agent_id, received_at, transport, remote_addr, heartbeat.
    fn read(c: &mut Cols) -> AgentRow {
        AgentRow {
            tenant: c.text(),
            agent_id: c.text(),
            received_at: c.text(),
            transport: c.text(),
            remote_addr: c.text(),
            heartbeat: serde_json::from_str(&c.text()).unwrap_or(serde_json::Value::Null),
        }
    }
}

/// An agent's last heartbeat with what its health is derived from.
#[derive(Debug, Clone)]
pub struct FleetRow {
    pub agent: AgentRow,
    /// When its count of bad records last grew.
    pub errors_rising_at: Option<String>,
    /// When its health last changed.
    pub last_change: Option<String>,
}

/// Every agent (of `tenant`), with [`FleetRow`]'s extras.
pub fn fleet(tx: &mut dyn Tx, tenant: Option<&str>) -> Result<Vec<FleetRow>, DbError> {
    let sql = "SELECT a.tenant, a.agent_id, a.received_at, a.transport, a.remote_addr, a.heartbeat, a.errors_rising_at,
            (SELECT max(h.since) FROM agent_health h WHERE h.tenant = a.tenant AND h.agent_id = a.agent_id)
        FROM agents a WHERE (?1 = '' OR a.tenant = ?1) ORDER BY a.tenant, a.agent_id";
    Ok(tx
        .query(sql, &[tenant.unwrap_or("").into()])?
        .into_iter()
        .map(|r| {
            let mut c = Cols::new(r);
            let agent = AgentRow::read(&mut c);
            let errors_rising_at = Some(c.text()).filter(|t| !t.is_empty());
            let last_change = Some(c.text()).filter(|t| !t.is_empty());
            FleetRow { agent, errors_rising_at, last_change }
        })
        .collect())
}

/// The changes of an agent's health, newest first, at most `limit`.
pub fn health_history(
    tx: &mut dyn Tx,
    tenant: &str,
    agent_id: &str,
    limit: i64,
) -> Result<Vec<crate::health::Change>, DbError> {
    Ok(tx
        .query(
            "SELECT since, state, reasons FROM agent_health WHERE tenant = ?1 AND agent_id = ?2 ORDER BY since DESC LIMIT ?3",
            &[tenant.into(), agent_id.into(), limit.into()],
        )?
        .into_iter()
        .filter_map(|r| {
            let mut c = Cols::new(r);
            let since = c.text();
            let state = serde_json::from_value(serde_json::Value::String(c.text())).ok()?;
            let reasons = serde_json::from_str(&c.text()).unwrap_or_default();
            Some(crate::health::Change { since, state, reasons })
        })
        .collect())
}

pub fn agents(tx: &mut dyn Tx, tenant: Option<&str>) -> Result<Vec<AgentRow>, DbError> {
    let (sql, params): (&str, Vec<Val>) = match tenant {
        Some(t) => (
            "SELECT tenant, agent_id, received_at, transport, remote_addr, heartbeat FROM agents WHERE tenant = ?1 ORDER BY tenant, agent_id",
            vec![t.into()],
        ),
        None => (
            "SELECT tenant, agent_id, received_at, transport, remote_addr, heartbeat FROM agents ORDER BY tenant, agent_id",
            vec![],
        ),
    };
    Ok(tx.query(sql, &params)?.into_iter().map(|r| AgentRow::read(&mut Cols::new(r))).collect())
}

pub fn counters(tx: &mut dyn Tx) -> Result<BTreeMap<String, i64>, DbError> {
    Ok(tx
        .query("SELECT name, CAST(sum(value) AS BIGINT) FROM stat_counters GROUP BY name ORDER BY name", &[])?
        .into_iter()
        .map(|r| (r[0].text().to_owned(), r[1].int_or_zero()))
        .collect())
}

/// Rows of analytics state, per table: what the state horizon keeps.
pub fn state_sizes(tx: &mut dyn Tx) -> Result<BTreeMap<String, i64>, DbError> {
    let mut out = BTreeMap::new();
    for table in ["sessions", "touches", "attr_orders", "inventory"] {
        let n = tx.query(&format!("SELECT count(*) FROM {table}"), &[])?;
        out.insert(table.to_owned(), n.first().map_or(0, |r| r[0].int_or_zero()));
    }
    Ok(out)
}

/// Change versions per (tenant, dashboard): a dashboard whose version moved has new figures.
pub fn changes(tx: &mut dyn Tx) -> Result<BTreeMap<(String, String), i64>, DbError> {
    Ok(tx
        .query("SELECT tenant, dashboard, CAST(sum(version) AS BIGINT) FROM changes GROUP BY tenant, dashboard", &[])?
        .into_iter()
        .map(|r| ((r[0].text().to_owned(), r[1].text().to_owned()), r[2].int_or_zero()))
        .collect())
}

/// The behavior types, by name, for parameter checks.
pub fn kind_names() -> Vec<&'static str> {
    KINDS.iter().map(|k| sessions::kind_name(*k)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_tiled_by_the_coarsest_rows() {
        let d = 86_400;
        // 23:30 on day 0 to 01:10 on day 3.
        let from = d - 1800;
        let to = 3 * d + 3600 + 600;
        assert_eq!(
            cover(from, to, 60),
            vec![(60, from, d), (86_400, d, 3 * d), (3600, 3 * d, 3 * d + 3600), (60, 3 * d + 3600, to)]
        );
        // Rounded to whole minutes; an empty range reads nothing.
        assert_eq!(cover(61, 119, 60), vec![(60, 60, 120)]);
        assert!(cover(120, 120, 60).is_empty());
        assert_eq!(cover(0, d, 60), vec![(86_400, 0, d)]);
        // A table kept per hour: widened to whole hours, never read per minute.
        assert_eq!(cover(from, to, 3600), vec![(3600, d - 3600, d), (86_400, d, 3 * d), (3600, 3 * d, 3 * d + 7200)]);
        assert_eq!(cover(61, 119, 3600), vec![(3600, 0, 3600)]);
    }

    #[test]
    fn rounding_and_decimal_text() {
        assert_eq!(div_round(5, 2), Some(3));
        assert_eq!(div_round(-5, 2), Some(-3));
        assert_eq!(div_round(4, 3), Some(1));
        assert_eq!(div_round(1, 0), None);
        assert_eq!(micro_text(1_500_000), "1.5");
        assert_eq!(micro_text(-333_333), "-0.333333");
        assert_eq!(micro_text(2_000_000), "2");
        assert_eq!(money(1_299_900), "129.99");
    }
}
