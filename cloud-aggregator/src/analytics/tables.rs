//! The roll-up tables: what each one is keyed by and sums, and the additive deltas a commit
//! writes to them.
//!
//! Every roll-up table has the same shape: `(tenant, grain, bucket, dims…) → metrics…`, where
//! `grain` is 60, 3600 or 86400 seconds and `bucket` the unix second the bucket starts at (UTC).
//! A change is recorded once per event-time minute and written to all three grains in the same
//! transaction, so a series at any granularity and a total over any range read few rows.
//! Every metric is an integer sum; money is in ten-thousandths of the currency unit
//! ([`actidash_shared::Money`]), except where a table says otherwise.

use rustc_hash::FxHashMap;

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
    /// The finest grain kept, in seconds (one of [`GRAINS`]). Attribution and products are
    /// kept per hour: per minute they would be most of what a commit writes (every credited
    /// channel and campaign of every order, every SKU of every line item) for a resolution no
    /// report of theirs needs.
    pub finest: i64,
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
    finest: 60,
};
/// Line items of placed orders, per SKU (revenue: quantity × unit price).
pub const PRODUCTS: TableSpec =
    TableSpec { name: "product_rollup", dims: &["sku", "currency"], metrics: &["units", "revenue"], finest: 3600 };
/// Behavior events per type.
pub const BEHAVIOR: TableSpec =
    TableSpec { name: "behavior_rollup", dims: &["type"], metrics: &["events"], finest: 60 };
/// Sessions, in the bucket of their first event; `mask` is the set of event types the session
/// holds (bit i: [`crate::analytics::sessions::KINDS`]`[i]`), as decimal text.
pub const SESSIONS: TableSpec = TableSpec {
    name: "session_rollup",
    dims: &["referrer", "mask"],
    metrics: &["sessions", "bounces", "duration_ms", "events"],
    finest: 60,
};
/// Marketing touches and their cost, by touch time.
pub const MARKETING: TableSpec = TableSpec {
    name: "marketing_rollup",
    dims: &["channel", "campaign", "currency"],
    metrics: &["touches", "cost"],
    finest: 60,
};
/// Attributed credit, by order time. `orders_micro`: millionths of an order; `revenue_nano`:
/// hundred-millionths of the currency unit (finer than money, so that sums of per-order
/// credits stay within a cent of the exact value; see [`crate::analytics::attribution`]).
pub const ATTRIBUTION: TableSpec = TableSpec {
    name: "attribution_rollup",
    dims: &["model", "channel", "campaign", "currency"],
    metrics: &["orders_micro", "revenue_nano"],
    finest: 3600,
};
/// Events per domain.
pub const DOMAINS: TableSpec = TableSpec { name: "domain_rollup", dims: &["domain"], metrics: &["events"], finest: 60 };

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
        // Saturating, in SQL both engines speak: a sum that would leave the 64-bit range stays
        // at its bound instead of failing the commit (events are bounded, so only a flood of
        // outliers gets there).
        let sets: Vec<String> = self
            .metrics
            .iter()
            .map(|m| {
                let (old, add) = (format!("{}.{m}", self.name), format!("excluded.{m}"));
                format!(
                    "{m} = CASE WHEN {add} > 0 AND {old} > 9223372036854775807 - {add} THEN 9223372036854775807 \
                     WHEN {add} < 0 AND {old} < (-9223372036854775807 - 1) - {add} THEN (-9223372036854775807 - 1) \
                     ELSE {old} + {add} END"
                )
            })
            .collect();
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

/// Most metrics of any roll-up table.
pub const MAX_METRICS: usize = 7;

/// One row to add to a roll-up table at one grain (borrowed from [`Deltas`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrainRow<'a> {
    pub table: &'static TableSpec,
    pub tenant: &'a str,
    pub grain: i64,
    pub bucket: i64,
    pub dims: &'a [String],
    sums: [i64; MAX_METRICS],
}

impl GrainRow<'_> {
    /// The sums, in the table's metric order.
    pub fn metrics(&self) -> &[i64] {
        &self.sums[..self.table.metrics.len()]
    }
}

/// A distinct (table, tenant, dims) of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Series {
    table: &'static TableSpec,
    tenant: String,
    dims: Vec<String>,
}

/// Additive changes to the roll-ups, gathered over a commit and written once per row and grain.
///
/// A commit adds to few distinct rows many times, so the (table, tenant, dims) of a row is
/// interned once: adding to a known row costs a hash of its parts and no allocation.
#[derive(Debug, Default, Clone)]
pub struct Deltas {
    /// Encoded (table, tenant, dims) -> index into `series`.
    ids: FxHashMap<Box<[u8]>, u32>,
    series: Vec<Series>,
    /// (series, minute) -> sums.
    rows: FxHashMap<(u32, i64), [i64; MAX_METRICS]>,
    /// Scratch for encoding keys.
    buf: Vec<u8>,
}

impl Deltas {
    /// Adds `metrics` (in the table's metric order; shorter means the rest are zero) to the row
    /// of `table` for `tenant`, the minute of `time_ms`, and `dims`. Sums saturate.
    pub fn add(&mut self, table: &'static TableSpec, tenant: &str, time_ms: i64, dims: &[&str], metrics: &[i64]) {
        self.add_signed(table, tenant, time_ms, dims, metrics, 1);
    }

    /// Adds `metrics` with the opposite sign (a retraction).
    pub fn sub(&mut self, table: &'static TableSpec, tenant: &str, time_ms: i64, dims: &[&str], metrics: &[i64]) {
        self.add_signed(table, tenant, time_ms, dims, metrics, -1);
    }

    /// Adds `sign` × `metrics`.
    pub fn add_signed(
        &mut self,
        table: &'static TableSpec,
        tenant: &str,
        time_ms: i64,
        dims: &[&str],
        metrics: &[i64],
        sign: i64,
    ) {
        debug_assert_eq!(dims.len(), table.dims.len(), "{}", table.name);
        let id = self.intern(table, tenant, dims);
        let minute = time_ms.div_euclid(60_000) * 60;
        let row = self.rows.entry((id, minute)).or_insert([0; MAX_METRICS]);
        for (sum, m) in row.iter_mut().zip(metrics) {
            *sum = sum.saturating_add(m.saturating_mul(sign));
        }
    }

    /// The id of a (table, tenant, dims), each part prefixed by its length (8 bytes, not
    /// formatted: this runs for every delta) so that no two differ only in where one part ends.
    fn intern(&mut self, table: &'static TableSpec, tenant: &str, dims: &[&str]) -> u32 {
        self.buf.clear();
        for part in [table.name, tenant].iter().chain(dims) {
            self.buf.extend_from_slice(&(part.len() as u64).to_le_bytes());
            self.buf.extend_from_slice(part.as_bytes());
        }
        if let Some(id) = self.ids.get(self.buf.as_slice()) {
            return *id;
        }
        let id = u32::try_from(self.series.len()).unwrap_or(u32::MAX);
        self.series.push(Series {
            table,
            tenant: tenant.to_owned(),
            dims: dims.iter().map(|d| (*d).to_owned()).collect(),
        });
        self.ids.insert(self.buf.as_slice().into(), id);
        id
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The rows to write: every delta row at every grain, merged per bucket, without rows whose
    /// metrics are all zero (a change that cancelled out). In one order that depends only on the
    /// rows' keys, so that concurrent writers lock rows in the same order.
    pub fn by_grain(&self) -> Vec<GrainRow<'_>> {
        // Series in key order.
        let mut order: Vec<u32> = (0..self.series.len() as u32).collect();
        order.sort_by(|a, b| {
            let (a, b) = (&self.series[*a as usize], &self.series[*b as usize]);
            (a.table.name, &a.tenant, &a.dims).cmp(&(b.table.name, &b.tenant, &b.dims))
        });
        let mut rank = vec![0_u32; order.len()];
        for (r, id) in order.iter().enumerate() {
            rank[*id as usize] = r as u32;
        }
        let mut merged: FxHashMap<(u32, i64, i64), [i64; MAX_METRICS]> = FxHashMap::default();
        merged.reserve(self.rows.len() * 2);
        for ((id, minute), v) in &self.rows {
            let finest = self.series[*id as usize].table.finest;
            for grain in GRAINS.into_iter().filter(|g| *g >= finest) {
                let bucket = minute.div_euclid(grain) * grain;
                let row = merged.entry((rank[*id as usize], grain, bucket)).or_insert([0; MAX_METRICS]);
                for (sum, m) in row.iter_mut().zip(v) {
                    *sum = sum.saturating_add(*m);
                }
            }
        }
        let mut keys: Vec<((u32, i64, i64), [i64; MAX_METRICS])> =
            merged.into_iter().filter(|(_, v)| v.iter().any(|m| *m != 0)).collect();
        keys.sort_unstable_by_key(|(k, _)| *k);
        keys.into_iter()
            .map(|((rank, grain, bucket), sums)| {
                let s = &self.series[order[rank as usize] as usize];
                GrainRow { table: s.table, tenant: &s.tenant, grain, bucket, dims: &s.dims, sums }
            })
            .collect()
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
        d.add(&BEHAVIOR, "t", t0, &["page_view"], &[1]);
        d.add(&BEHAVIOR, "t", t0 + 3_569_000, &["page_view"], &[2]);
        d.add(&DOMAINS, "t", t0, &["sales"], &[1]);
        d.sub(&DOMAINS, "t", t0, &["sales"], &[1]);
        // Parts that only differ in where one ends are different rows.
        d.add(&SALES, "t", t0, &["ab", "c", "", "EUR"], &[1]);
        d.add(&SALES, "t", t0, &["a", "bc", "", "EUR"], &[1, 5]);
        let rows = d.by_grain();
        let grains: Vec<(&str, i64, i64)> = rows.iter().map(|r| (r.table.name, r.grain, r.metrics()[0])).collect();
        assert_eq!(
            grains,
            [
                ("behavior_rollup", 60, 1),
                ("behavior_rollup", 60, 2),
                ("behavior_rollup", 3600, 3),
                ("behavior_rollup", 86_400, 3),
                ("sales_rollup", 60, 1),
                ("sales_rollup", 3600, 1),
                ("sales_rollup", 86_400, 1),
                ("sales_rollup", 60, 1),
                ("sales_rollup", 3600, 1),
                ("sales_rollup", 86_400, 1),
            ],
            "the cancelled-out domain row is not written"
        );
        assert_eq!(rows[4].dims, ["a", "bc", "", "EUR"]);
        assert_eq!(rows[4].metrics(), [1, 5, 0, 0, 0, 0, 0]);
        assert_eq!(rows[7].dims, ["ab", "c", "", "EUR"]);
    }

    #[test]
    fn sql_is_generated_from_the_spec() {
        let sql = MARKETING.upsert_sql();
        assert!(sql.contains("(tenant, grain, bucket, channel, campaign, currency, touches, cost) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"), "{sql}");
        assert!(sql.contains("ELSE marketing_rollup.cost + excluded.cost END"), "{sql}");
        assert!(sql.contains("THEN 9223372036854775807 WHEN excluded.cost < 0"), "saturating: {sql}");
        assert!(SESSIONS.ddl("").contains("PRIMARY KEY (tenant, grain, bucket, referrer, mask)\n);"));
        assert!(SESSIONS.ddl(" WITHOUT ROWID").ends_with(") WITHOUT ROWID;\n"));
    }
}
