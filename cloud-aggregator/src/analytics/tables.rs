//! The roll-up tables: what each one is keyed by and sums, and the additive deltas a commit
//! writes to them.
//!
//! Every roll-up table has the same shape: `(tenant, grain, bucket, dims…) → metrics…`, where
//! `grain` is 60, 3600 or 86400 seconds and `bucket` the unix second the bucket starts at (UTC).
//! A change is recorded once per event-time minute and written to all three grains in the same
//! transaction, so a series at any granularity and a total over any range read few rows.
//! Every metric is an integer sum; money is in ten-thousandths of the currency unit
//! ([`actidash_shared::Money`]), except where a table says otherwise.

use std::collections::HashMap;

/// The grains every roll-up is kept at, in seconds.
pub const GRAINS: [i64; 3] = [60, 3600, 86_400];

/// The layout of one roll-up table.
#[derive(Debug, PartialEq, Eq)]
pub struct TableSpec {
    pub name: &'static str,
    /// Text dimensions, in key order.
    pub dims: &'static [&'static str],
    /// Integer sums.
    pub metrics: &'static [&'static str],
}

/// Sales by event time of each sales event (a cancellation counts in its own minute).
pub const SALES: TableSpec = TableSpec {
    name: "sales_rollup",
    dims: &["channel", "site", "country", "currency"],
    metrics: &[
        "placed_orders",
        "gross_revenue",
        "cancellations",
        "cancelled_revenue",
        "refunds",
        "refunded_revenue",
        "units",
    ],
};
/// Line items of placed orders, per SKU (revenue: quantity × unit price).
pub const PRODUCTS: TableSpec =
    TableSpec { name: "product_rollup", dims: &["sku", "currency"], metrics: &["units", "revenue"] };
/// Behavior events per type.
pub const BEHAVIOR: TableSpec = TableSpec { name: "behavior_rollup", dims: &["type"], metrics: &["events"] };
/// Sessions, in the bucket of their first event; `mask` is the set of event types the session
/// holds (bit i: [`crate::analytics::sessions::KINDS`]`[i]`), as decimal text.
pub const SESSIONS: TableSpec = TableSpec {
    name: "session_rollup",
    dims: &["referrer", "mask"],
    metrics: &["sessions", "bounces", "duration_ms", "events"],
};
/// Marketing touches and their cost, by touch time.
pub const MARKETING: TableSpec =
    TableSpec { name: "marketing_rollup", dims: &["channel", "campaign", "currency"], metrics: &["touches", "cost"] };
/// Attributed credit, by order time. `orders_micro`: millionths of an order; `revenue_nano`:
/// hundred-millionths of the currency unit (finer than money, so that sums of per-order
/// credits stay within a cent of the exact value; see [`crate::analytics::attribution`]).
pub const ATTRIBUTION: TableSpec = TableSpec {
    name: "attribution_rollup",
    dims: &["model", "channel", "campaign", "currency"],
    metrics: &["orders_micro", "revenue_nano"],
};
/// Events per domain.
pub const DOMAINS: TableSpec = TableSpec { name: "domain_rollup", dims: &["domain"], metrics: &["events"] };

/// Every roll-up table.
pub const ALL: [&TableSpec; 7] = [&SALES, &PRODUCTS, &BEHAVIOR, &SESSIONS, &MARKETING, &ATTRIBUTION, &DOMAINS];

impl TableSpec {
    /// `CREATE TABLE` for this roll-up (portable SQL: SQLite and PostgreSQL; `suffix` ends the
    /// statement, `WITHOUT ROWID` on SQLite so that rows are stored in key order).
    pub fn ddl(&self, suffix: &str) -> String {
        let dims: String = self.dims.iter().map(|d| format!("    {d} TEXT NOT NULL,\n")).collect();
        let metrics: String = self.metrics.iter().map(|m| format!("    {m} BIGINT NOT NULL DEFAULT 0,\n")).collect();
        let key: Vec<&str> = ["tenant", "grain", "bucket"].into_iter().chain(self.dims.iter().copied()).collect();
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    tenant TEXT NOT NULL,\n    grain BIGINT NOT NULL,\n    bucket BIGINT NOT NULL,\n{dims}{metrics}    PRIMARY KEY ({})\n){suffix};\n",
            self.name,
            key.join(", ")
        )
    }

    /// The additive upsert of one row, with parameters `?1…` in the order tenant, grain,
    /// bucket, dims, metrics.
    pub fn upsert_sql(&self) -> String {
        let cols: Vec<&str> = ["tenant", "grain", "bucket"]
            .into_iter()
            .chain(self.dims.iter().copied())
            .chain(self.metrics.iter().copied())
            .collect();
        let params: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
        let key: Vec<&str> = cols[..3 + self.dims.len()].to_vec();
        let sets: Vec<String> =
            self.metrics.iter().map(|m| format!("{m} = {t}.{m} + excluded.{m}", t = self.name)).collect();
        format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
            self.name,
            cols.join(", "),
            params.join(", "),
            key.join(", "),
            sets.join(", ")
        )
    }

    /// Index of a dimension.
    pub fn dim(&self, name: &str) -> Option<usize> {
        self.dims.iter().position(|d| *d == name)
    }

    /// Index of a metric.
    pub fn metric(&self, name: &str) -> Option<usize> {
        self.metrics.iter().position(|m| *m == name)
    }
}

/// Key of a delta row: table, tenant, event-time minute, dimension values.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeltaKey {
    pub table: &'static str,
    pub tenant: String,
    /// Unix seconds of the minute.
    pub minute: i64,
    pub dims: Vec<String>,
}

/// One row to add to a roll-up table at one grain.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct GrainRow {
    pub table: &'static str,
    pub tenant: String,
    pub grain: i64,
    pub bucket: i64,
    pub dims: Vec<String>,
    pub metrics: Vec<i64>,
}

/// Additive changes to the roll-ups, gathered over a commit and written once per row and grain.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Deltas {
    rows: HashMap<DeltaKey, Vec<i64>>,
}

impl Deltas {
    /// Adds `metrics` (in the table's metric order; shorter means the rest are zero) to the row
    /// of `table` for `tenant`, the minute of `time_ms`, and `dims`. Sums saturate.
    pub fn add(&mut self, table: &'static TableSpec, tenant: &str, time_ms: i64, dims: Vec<String>, metrics: &[i64]) {
        debug_assert_eq!(dims.len(), table.dims.len(), "{}", table.name);
        let minute = time_ms.div_euclid(60_000) * 60;
        let row = self
            .rows
            .entry(DeltaKey { table: table.name, tenant: tenant.to_owned(), minute, dims })
            .or_insert_with(|| vec![0; table.metrics.len()]);
        for (sum, m) in row.iter_mut().zip(metrics) {
            *sum = sum.saturating_add(*m);
        }
    }

    /// Adds `metrics` with the opposite sign (a retraction).
    pub fn sub(&mut self, table: &'static TableSpec, tenant: &str, time_ms: i64, dims: Vec<String>, metrics: &[i64]) {
        let negated: Vec<i64> = metrics.iter().map(|m| m.saturating_neg()).collect();
        self.add(table, tenant, time_ms, dims, &negated);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows to write: every delta row at every grain, merged per bucket, without rows whose
    /// metrics are all zero (a change that cancelled out). Sorted, so that concurrent writers
    /// lock rows in one order.
    pub fn by_grain(&self) -> Vec<GrainRow> {
        type Key<'a> = (&'static str, &'a str, i64, i64, &'a [String]);
        let mut merged: HashMap<Key<'_>, Vec<i64>> = HashMap::new();
        for (k, v) in &self.rows {
            for grain in GRAINS {
                let bucket = k.minute.div_euclid(grain) * grain;
                let row =
                    merged.entry((k.table, &k.tenant, grain, bucket, &k.dims)).or_insert_with(|| vec![0; v.len()]);
                for (sum, m) in row.iter_mut().zip(v) {
                    *sum = sum.saturating_add(*m);
                }
            }
        }
        let mut out: Vec<_> = merged
            .into_iter()
            .filter(|(_, v)| v.iter().any(|m| *m != 0))
            .map(|((table, tenant, grain, bucket, dims), metrics)| GrainRow {
                table,
                tenant: tenant.to_owned(),
                grain,
                bucket,
                dims: dims.to_vec(),
                metrics,
            })
            .collect();
        out.sort();
        out
    }

    /// The table specs by name.
    pub fn spec(name: &str) -> Option<&'static TableSpec> {
        ALL.into_iter().find(|t| t.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_expand_to_every_grain_and_cancel_out() {
        let mut d = Deltas::default();
        // 10:00:30 and 10:59:59 on one day: two minutes, one hour, one day.
        let t0 = 1_764_237_630_000;
        d.add(&BEHAVIOR, "t", t0, vec!["page_view".into()], &[1]);
        d.add(&BEHAVIOR, "t", t0 + 3_569_000, vec!["page_view".into()], &[2]);
        d.add(&DOMAINS, "t", t0, vec!["sales".into()], &[1]);
        d.sub(&DOMAINS, "t", t0, vec!["sales".into()], &[1]);
        let rows = d.by_grain();
        let grains: Vec<(i64, i64)> = rows.iter().map(|r| (r.grain, r.metrics[0])).collect();
        assert_eq!(grains, [(60, 1), (60, 2), (3600, 3), (86_400, 3)]);
        assert!(rows.iter().all(|r| r.table == "behavior_rollup"), "the cancelled-out domain row is not written");
    }

    #[test]
    fn sql_is_generated_from_the_spec() {
        let sql = MARKETING.upsert_sql();
        assert!(sql.contains("(tenant, grain, bucket, channel, campaign, currency, touches, cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"), "{sql}");
        assert!(sql.contains("cost = marketing_rollup.cost + excluded.cost"), "{sql}");
        assert!(SESSIONS.ddl("").contains("PRIMARY KEY (tenant, grain, bucket, referrer, mask)\n);"));
        assert!(SESSIONS.ddl(" WITHOUT ROWID").ends_with(") WITHOUT ROWID;\n"));
    }
}
