//! The analytics engine: what each metric means, and how a commit's events change the
//! roll-ups and the state they need — in the caller's store transaction, so that results,
//! state and input positions are committed together (exactly once).
//!
//! # Definitions (per tenant, by event time, UTC)
//!
//! **Sales** ([`tables::SALES`], [`tables::PRODUCTS`]). Each sales event counts in the minute
//! of its own event time: `placed` adds an order (`placed_orders`), its amount
//! (`gross_revenue`) and its line items' quantities (`units`; per SKU with quantity × unit
//! price in the products roll-up); `cancelled` and `refunded` add a cancellation or refund and
//! its amount; `paid` and `shipped` change no figure. Served: `orders` = placed − cancelled −
//! refunded, `revenue` = gross − cancelled − refunded amounts, `average_order_value` = gross
//! revenue / placed orders (rounded to 1/10000, half away from zero).
//!
//! **Behavior** ([`tables::BEHAVIOR`], [`tables::SESSIONS`], [`sessions`]). Events per type.
//! Sessions per visitor with gaps of at most `session_gap_secs` (a gap of exactly that
//! continues the session), counted in the bucket of their first event, by the referrer host of
//! their first event: sessions, bounces (one event, a page view), duration (last − first
//! event), events. The funnel counts, per step, the sessions that hold every type of that step
//! and the steps before it (in any order within the session).
//!
//! **Attribution** ([`tables::ATTRIBUTION`], [`attribution`]): every placed order that has no
//! cancellation or refund, credited to its customer's touches by each model; ad cost per
//! channel, campaign and currency by touch time ([`tables::MARKETING`]).
//!
//! **Inventory**: the latest on-hand per SKU and warehouse by event time — an older update
//! never overwrites a newer one (equal times: the larger agent, source, seq wins).
//!
//! # Late data and the state horizon
//! Each tenant has a watermark `W`: the largest event time seen, but never more than
//! `max_future_skew_secs` past the processor's clock (a wrong clock on-prem cannot push it
//! into the future). An event older than `W − allowed_lateness_secs` is *beyond the horizon*:
//! it is still added to every additive figure (sales, products, events per type, ad cost,
//! inventory) and counted in `late_events_beyond_horizon`, but it does not change sessions and
//! attribution, whose state is kept only that far back:
//!
//! | state | kept while | cost |
//! |---|---|---|
//! | sessions | last event ≥ W − lateness − gap | the sessions of the last lateness + gap |
//! | orders | time ≥ W − max(lateness, order_retention) | one row per order of that span |
//! | touches | time > W − max(lateness, order_retention) − lookback | the touches of that span and the lookback before it |
//! | inventory | always | one row per SKU and warehouse |
//!
//! Within the horizon every figure is exactly what it would be had the events arrived in
//! event-time order: a late page view merges sessions, a late touch re-credits its customer's
//! orders, a late stock level is ordered by event time. A cancellation retracts its order's
//! credit as long as the order is kept (`order_retention_secs`, default the lookback).
//!
//! An order's credit is not stored: whenever an order changes or its customer gets a touch
//! that reaches it, its credit is derived twice — from the order and touches before the
//! commit, and after — and the difference added to the roll-up. That is why touches are kept
//! as long as the orders whose windows they fall in: the credit taken back is exactly the one
//! given.

pub mod attribution;
pub mod sessions;
pub mod tables;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use actidash_shared::event::{Event, OrderStatus, Payload};
use rustc_hash::FxHashMap;
use serde::Deserialize;

use crate::store::db::{Cols, DbError, Tx, Val};
use attribution::{Credit, Params, Touch};
use sessions::{Hit, Session};
use tables::Deltas;

/// The `[analytics]` section of the cloud configuration.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    /// Longest gap inside a session.
    pub session_gap_secs: u64,
    /// How late an event may arrive and still correct sessions and attribution.
    pub allowed_lateness_secs: u64,
    /// Touches up to this long before an order are credited.
    pub attribution_lookback_secs: u64,
    /// Half-life of the time-decay model.
    pub time_decay_half_life_secs: u64,
    /// How long an order is kept so that its cancellation retracts its credit (its customer's
    /// touches are kept for this plus the lookback).
    pub order_retention_secs: u64,
    /// Event times further than this past the processor's clock do not move the watermark.
    pub max_future_skew_secs: u64,
    /// On-hand below this is low stock (the API's default).
    pub low_stock_threshold: i64,
    /// The funnel's steps (the API's default), behavior types in order.
    pub funnel_steps: Vec<String>,
}

impl Default for AnalyticsConfig {
    fn default() -> AnalyticsConfig {
        AnalyticsConfig {
            session_gap_secs: 30 * 60,
            allowed_lateness_secs: 24 * 3600,
            attribution_lookback_secs: 30 * 86_400,
            time_decay_half_life_secs: 7 * 86_400,
            order_retention_secs: 30 * 86_400,
            max_future_skew_secs: 300,
            low_stock_threshold: 20,
            funnel_steps: ["page_view", "add_to_cart", "checkout", "purchase"].map(String::from).to_vec(),
        }
    }
}

impl AnalyticsConfig {
    /// Checks the values; the error names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        for (field, v) in [
            ("session_gap_secs", self.session_gap_secs),
            ("attribution_lookback_secs", self.attribution_lookback_secs),
            ("time_decay_half_life_secs", self.time_decay_half_life_secs),
        ] {
            if v == 0 || v > 366 * 86_400 {
                return Err((format!("analytics.{field}"), "must be between 1 s and 366 days".into()));
            }
        }
        if self.allowed_lateness_secs > 366 * 86_400 || self.order_retention_secs > 3660 * 86_400 {
            return Err(("analytics.allowed_lateness_secs".into(), "must be at most 366 days".into()));
        }
        if self.funnel_steps.is_empty() {
            return Err(("analytics.funnel_steps".into(), "needs at least one step".into()));
        }
        for step in &self.funnel_steps {
            if sessions::kind_by_name(step).is_none() {
                return Err((
                    "analytics.funnel_steps".into(),
                    format!(
                        "{step:?} is not a behavior type (page_view, product_view, search, add_to_cart, checkout, purchase)"
                    ),
                ));
            }
        }
        Ok(())
    }

    fn ms(secs: u64) -> i64 {
        i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
    }

    fn params(&self) -> Params {
        Params {
            lookback_ms: Self::ms(self.attribution_lookback_secs),
            half_life_ms: Self::ms(self.time_decay_half_life_secs),
        }
    }
}

/// What [`apply`] did, for the counters.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Applied {
    pub late_beyond_horizon: u64,
    /// (tenant, dashboard) pairs whose figures changed: `sales`, `behavior`, `marketing`,
    /// `inventory`.
    pub changed: BTreeSet<(String, &'static str)>,
}

/// An order's facts as kept for attribution.
#[derive(Debug, Clone, PartialEq, Eq)]
struct OrderState {
    customer: String,
    time_ms: i64,
    amount: i64,
    currency: String,
    placed: bool,
    cancelled: bool,
    /// The credits versions before 2026-12-04 stored with the order (their text; empty since,
    /// when credits are derived): what the order is credited until it is credited again.
    legacy_credits: String,
}

impl OrderState {
    /// Whether the order is credited: placed and neither cancelled nor refunded.
    fn credited(&self) -> bool {
        self.placed && !self.cancelled
    }
}

/// What a commit changed that attribution depends on. Attribution is applied after every
/// other effect of the commit, once per customer, so that an order is credited once per commit.
#[derive(Default)]
struct AttributionChanges {
    /// (tenant, customer) -> the touches this commit stored, and the orders it changed that
    /// are or were the customer's.
    customers: BTreeMap<(String, String), CustomerChanges>,
    /// Tenant -> order id -> the order before this commit (None: not stored), and now.
    orders: ChangedOrders,
}

type ChangedOrders = HashMap<String, HashMap<String, (Option<OrderState>, OrderState)>>;

#[derive(Default)]
struct CustomerChanges {
    touches: Vec<Touch>,
    orders: BTreeSet<String>,
}

impl AttributionChanges {
    fn customer(&mut self, tenant: &str, customer: &str) -> &mut CustomerChanges {
        self.customers.entry((tenant.to_owned(), customer.to_owned())).or_default()
    }
}

/// Applies `events` (already de-duplicated) to the roll-ups and the analytics state in `tx`.
/// `now_ms` is the processor's clock (it only caps the watermark). `writer` names the rows this
/// commit may update that others also update (watermarks): one of the input streams, which no
/// other processor commits at the same time, so concurrent processors never wait on each other
/// for them.
pub fn apply(
    tx: &mut dyn Tx,
    events: &[Event],
    writer: &str,
    cfg: &AnalyticsConfig,
    now_ms: i64,
) -> Result<Applied, DbError> {
    let mut applied = Applied::default();
    if events.is_empty() {
        return Ok(applied);
    }
    let lateness = AnalyticsConfig::ms(cfg.allowed_lateness_secs);
    let gap = AnalyticsConfig::ms(cfg.session_gap_secs);
    let params = cfg.params();

    // The watermarks before this commit decide what is beyond the horizon.
    let mut watermark: BTreeMap<String, Option<i64>> = BTreeMap::new();
    for e in events {
        if !watermark.contains_key(&e.tenant) {
            let w = tx.query(
                "SELECT CAST(max(max_event_ms) AS BIGINT) FROM watermarks WHERE tenant = ?1",
                &[Val::from(&e.tenant)],
            )?;
            watermark.insert(e.tenant.clone(), w.first().and_then(|r| r[0].int()));
        }
    }
    let horizon =
        |tenant: &str| watermark.get(tenant).copied().flatten().map_or(i64::MIN, |w| w.saturating_sub(lateness));

    let mut deltas = Deltas::default();
    let mut hits: BTreeMap<(String, String), Vec<Hit>> = BTreeMap::new();
    let mut attribution_changes = AttributionChanges::default();
    let mut newest: HashMap<String, i64> = HashMap::new();
    // (tenant, SKU, warehouse) -> the newest time of its stock levels, and those of that time
    // (event, on hand).
    type Newest<'e> = (i64, Vec<(&'e Event, i64)>);
    let mut stock: BTreeMap<(&str, &str, &str), Newest> = BTreeMap::new();
    for e in events {
        let t = e.event_time.timestamp_millis();
        let tenant = e.tenant.as_str();
        let late = t < horizon(tenant);
        if late {
            applied.late_beyond_horizon += 1;
        }
        let w = newest.entry(e.tenant.clone()).or_insert(i64::MIN);
        *w = (*w).max(t);
        deltas.add(&tables::DOMAINS, tenant, t, &[e.domain().as_str()], &[1]);
        match &e.payload {
            Payload::Sales(o) => {
                applied.changed.insert((e.tenant.clone(), "sales"));
                let dims = [o.channel.as_str(), &o.site, &o.country, &o.currency];
                let amount = o.amount.raw();
                match o.status {
                    OrderStatus::Placed => {
                        let units = o.items.iter().fold(0_i64, |n, i| n.saturating_add(i.quantity));
                        deltas.add(&tables::SALES, tenant, t, &dims, &[1, amount, 0, 0, 0, 0, units]);
                        for item in &o.items {
                            let revenue = item.unit_price.raw().saturating_mul(item.quantity);
                            deltas.add(
                                &tables::PRODUCTS,
                                tenant,
                                t,
                                &[&item.sku, &o.currency],
                                &[item.quantity, revenue],
                            );
                        }
                    }
                    OrderStatus::Cancelled => deltas.add(&tables::SALES, tenant, t, &dims, &[0, 0, 1, amount]),
                    OrderStatus::Refunded => deltas.add(&tables::SALES, tenant, t, &dims, &[0, 0, 0, 0, 1, amount]),
                    OrderStatus::Paid | OrderStatus::Shipped => {}
                }
                order_event(tx, e, t, late, &mut attribution_changes, &mut applied)?;
            }
            Payload::Marketing(m) => {
                applied.changed.insert((e.tenant.clone(), "marketing"));
                let cost = m.cost.map_or(0, |c| c.raw());
                let currency = m.currency.as_deref().unwrap_or_default();
                deltas.add(&tables::MARKETING, tenant, t, &[&m.channel, &m.campaign, currency], &[1, cost]);
                if !late {
                    let stored = tx.exec(
                        "INSERT INTO touches (tenant, user_id, time_ms, channel, campaign, agent_id, source_id, seq)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
                        &[
                            tenant.into(),
                            (&m.user_id).into(),
                            t.into(),
                            (&m.channel).into(),
                            (&m.campaign).into(),
                            (&e.agent_id).into(),
                            (&e.source_id).into(),
                            Val::Int(e.seq as i64),
                        ],
                    )?;
                    if stored > 0 {
                        let touch = Touch { time_ms: t, channel: m.channel.clone(), campaign: m.campaign.clone() };
                        attribution_changes.customer(tenant, &m.user_id).touches.push(touch);
                    }
                }
            }
            Payload::Behavior(b) => {
                applied.changed.insert((e.tenant.clone(), "behavior"));
                deltas.add(&tables::BEHAVIOR, tenant, t, &[sessions::kind_name(b.kind)], &[1]);
                if !late {
                    hits.entry((e.tenant.clone(), b.visitor_id.clone())).or_default().push(Hit {
                        time_ms: t,
                        kind: b.kind,
                        referrer: sessions::referrer_host(b.referrer.as_deref()),
                    });
                }
            }
            Payload::Inventory(i) => {
                applied.changed.insert((e.tenant.clone(), "inventory"));
                let newest = stock.entry((tenant, &i.sku, &i.warehouse)).or_insert((t, Vec::new()));
                if t > newest.0 {
                    *newest = (t, Vec::new());
                }
                if t == newest.0 {
                    newest.1.push((e, i.on_hand));
                }
            }
        }
    }

    // Of a SKU's stock levels in a warehouse, only the newest of the commit can win; those of
    // its newest time are all written, for the store to order by the rest of the key.
    for ((tenant, sku, warehouse), (t, newest)) in &stock {
        for (e, on_hand) in newest {
            tx.exec(
                "INSERT INTO inventory (tenant, sku, warehouse, on_hand, time_ms, agent_id, source_id, seq)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (tenant, sku, warehouse) DO UPDATE SET on_hand = excluded.on_hand,
                     time_ms = excluded.time_ms, agent_id = excluded.agent_id, source_id = excluded.source_id,
                     seq = excluded.seq
                 WHERE (excluded.time_ms, excluded.agent_id, excluded.source_id, excluded.seq)
                     > (inventory.time_ms, inventory.agent_id, inventory.source_id, inventory.seq)",
                &[
                    (*tenant).into(),
                    (*sku).into(),
                    (*warehouse).into(),
                    (*on_hand).into(),
                    (*t).into(),
                    (&e.agent_id).into(),
                    (&e.source_id).into(),
                    Val::Int(e.seq as i64),
                ],
            )?;
        }
    }
    for ((tenant, visitor), visitor_hits) in &hits {
        sessionize(tx, tenant, visitor, visitor_hits, gap, &mut deltas)?;
    }
    let mut credit_sums = CreditSums::default();
    for ((tenant, customer), changes) in &attribution_changes.customers {
        attribute(tx, tenant, customer, changes, &attribution_changes.orders, params, &mut credit_sums)?;
    }
    credit_sums.write(&mut deltas);
    write_deltas(tx, &deltas)?;

    // Move the watermarks on, then compact state that fell behind the horizon.
    let cap = now_ms.saturating_add(AnalyticsConfig::ms(cfg.max_future_skew_secs));
    for (tenant, batch_max) in newest {
        let old = watermark.get(&tenant).copied().flatten();
        let candidate = batch_max.min(cap);
        let w = match old {
            Some(old) if old >= candidate => continue,
            _ => candidate,
        };
        tx.exec(
            "INSERT INTO watermarks (tenant, writer, max_event_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (tenant, writer) DO UPDATE SET max_event_ms = excluded.max_event_ms
             WHERE excluded.max_event_ms > watermarks.max_event_ms",
            &[Val::from(&tenant), writer.into(), w.into()],
        )?;
        let h = w.saturating_sub(lateness);
        tx.exec(
            "DELETE FROM sessions WHERE tenant = ?1 AND end_ms < ?2",
            &[Val::from(&tenant), h.saturating_sub(gap).into()],
        )?;
        // Touches are kept as long as an order kept may have them in its window: an order's
        // credit is derived from them whenever it changes.
        let keep_orders = lateness.max(AnalyticsConfig::ms(cfg.order_retention_secs));
        tx.exec(
            "DELETE FROM touches WHERE tenant = ?1 AND time_ms <= ?2",
            &[Val::from(&tenant), w.saturating_sub(keep_orders).saturating_sub(params.lookback_ms).into()],
        )?;
        tx.exec(
            "DELETE FROM attr_orders WHERE tenant = ?1 AND time_ms < ?2",
            &[Val::from(&tenant), w.saturating_sub(keep_orders).into()],
        )?;
    }
    Ok(applied)
}

/// Records a sales event's effect on its order's attribution state.
fn order_event(
    tx: &mut dyn Tx,
    e: &Event,
    t: i64,
    late: bool,
    changes: &mut AttributionChanges,
    applied: &mut Applied,
) -> Result<(), DbError> {
    let Payload::Sales(o) = &e.payload else { return Ok(()) };
    let cancels = matches!(o.status, OrderStatus::Cancelled | OrderStatus::Refunded);
    if o.status != OrderStatus::Placed && !cancels {
        return Ok(());
    }
    if late && !cancels {
        // Its touches may have been compacted: an order beyond the horizon is not attributed.
        return Ok(());
    }
    // The order's credit may be re-computed at this moment by the processor of a touch of its
    // customer: read and change it only under the customer's lock (the one `attribute` holds).
    tx.lock_key(&customer_lock(&e.tenant, &o.customer_id))?;
    // As this commit left it (its customers are locked already), else as stored.
    let stored = match changes.orders.get(&e.tenant).and_then(|of_tenant| of_tenant.get(&o.order_id)) {
        Some((_, now)) => Some(now.clone()),
        None => {
            let mut stored = load_order(tx, &e.tenant, &o.order_id)?;
            if let Some(s) = &stored
                && s.customer != o.customer_id
            {
                // Placed for another customer than this event names: that one's lock, and read
                // again.
                tx.lock_key(&customer_lock(&e.tenant, &s.customer))?;
                stored = load_order(tx, &e.tenant, &o.order_id)?;
            }
            stored
        }
    };
    let mut state = match &stored {
        Some(s) => s.clone(),
        None if late => return Ok(()),
        None => OrderState {
            customer: o.customer_id.clone(),
            time_ms: t,
            amount: o.amount.raw(),
            currency: o.currency.clone(),
            placed: false,
            cancelled: false,
            legacy_credits: String::new(),
        },
    };
    if cancels {
        if state.credited() {
            applied.changed.insert((e.tenant.clone(), "marketing"));
        }
        state.cancelled = true;
    } else if !state.placed || t < state.time_ms {
        // The earliest placement defines the order (a cancellation seen first only holds the
        // order's place): it is credited at its new time.
        state.placed = true;
        state.customer = o.customer_id.clone();
        state.time_ms = t;
        state.amount = o.amount.raw();
        state.currency = o.currency.clone();
    }
    if stored.as_ref() == Some(&state) {
        return Ok(());
    }
    // Its credit is derived from now on (`attribute` takes back the stored one).
    state.legacy_credits.clear();
    tx.exec(
        "INSERT INTO attr_orders (tenant, order_id, customer_id, time_ms, amount, currency, placed, cancelled, legacy_credits)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, '')
         ON CONFLICT (tenant, order_id) DO UPDATE SET customer_id = excluded.customer_id, time_ms = excluded.time_ms,
             amount = excluded.amount, currency = excluded.currency, placed = excluded.placed,
             cancelled = excluded.cancelled, legacy_credits = excluded.legacy_credits",
        &[
            (&e.tenant).into(),
            (&o.order_id).into(),
            (&state.customer).into(),
            state.time_ms.into(),
            state.amount.into(),
            (&state.currency).into(),
            i64::from(state.placed).into(),
            i64::from(state.cancelled).into(),
        ],
    )?;
    if let Some(before) = &stored
        && before.customer != state.customer
    {
        changes.customer(&e.tenant, &before.customer).orders.insert(o.order_id.clone());
    }
    changes.customer(&e.tenant, &state.customer).orders.insert(o.order_id.clone());
    match changes.orders.entry(e.tenant.clone()).or_default().entry(o.order_id.clone()) {
        Entry::Occupied(mut changed) => changed.get_mut().1 = state,
        Entry::Vacant(first) => {
            first.insert((stored, state));
        }
    }
    Ok(())
}

/// The lock that serializes the changes of one customer's attribution.
fn customer_lock(tenant: &str, customer: &str) -> String {
    format!("customer/{tenant}/{customer}")
}

fn load_order(tx: &mut dyn Tx, tenant: &str, order_id: &str) -> Result<Option<OrderState>, DbError> {
    let rows = tx.query(
        "SELECT customer_id, time_ms, amount, currency, placed, cancelled, legacy_credits FROM attr_orders
         WHERE tenant = ?1 AND order_id = ?2",
        &[tenant.into(), order_id.into()],
    )?;
    let Some(row) = rows.into_iter().next() else { return Ok(None) };
    let mut c = Cols::new(row);
    Ok(Some(OrderState {
        customer: c.text(),
        time_ms: c.int(),
        amount: c.int(),
        currency: c.text(),
        placed: c.int() != 0,
        cancelled: c.int() != 0,
        legacy_credits: c.text(),
    }))
}

/// An order's credits as stored by a version before 2026-12-04. Unreadable text (the store's
/// own, so never expected) is an error that stops the commit: retracting nothing would leave
/// the credit counted for ever.
fn parse_credits(text: &str, tenant: &str, order_id: &str) -> Result<Vec<Credit>, DbError> {
    attribution::decode_credits(text).map_err(|e| DbError {
        message: format!("the stored credits of order {order_id:?} of tenant {tenant:?}: {e}"),
        retryable: false,
    })
}

/// Changes of orders' credits summed per tenant, bucket of the attribution roll-up's finest
/// grain, model, channel, campaign and currency before they become roll-up deltas: a commit
/// credits thousands of orders over a few dozen such keys. Texts are interned, so that adding a
/// credit hashes integers only.
#[derive(Default)]
struct CreditSums {
    ids: FxHashMap<Box<str>, u32>,
    texts: Vec<Box<str>>,
    /// (tenant, bucket, model, channel, campaign, currency) -> (orders, revenue).
    sums: FxHashMap<CreditKey, [i64; 2]>,
}

/// (tenant, bucket, model, channel, campaign, currency), texts by their [`CreditSums::id`].
type CreditKey = (u32, i64, attribution::Model, u32, u32, u32);

impl CreditSums {
    /// The id of a text.
    fn id(&mut self, text: &str) -> u32 {
        if let Some(id) = self.ids.get(text) {
            return *id;
        }
        let id = u32::try_from(self.texts.len()).unwrap_or(u32::MAX);
        self.texts.push(text.into());
        self.ids.insert(text.into(), id);
        id
    }

    /// The bucket of the roll-up's finest grain an order at `time_ms` counts in.
    fn bucket(time_ms: i64) -> i64 {
        let grain_ms = tables::ATTRIBUTION.finest * 1000;
        time_ms.div_euclid(grain_ms) * grain_ms
    }

    fn add_one(&mut self, key: CreditKey, orders: i64, revenue: i64, sign: i64) {
        let sum = self.sums.entry(key).or_default();
        sum[0] = sum[0].saturating_add(orders.saturating_mul(sign));
        sum[1] = sum[1].saturating_add(revenue.saturating_mul(sign));
    }

    /// Adds `sign` × the credits (model, channel, campaign, orders, revenue) of an order of
    /// `tenant` at `time_ms`.
    fn add<'c>(
        &mut self,
        tenant: &str,
        time_ms: i64,
        currency: &str,
        credits: impl Iterator<Item = (attribution::Model, &'c str, &'c str, i64, i64)>,
        sign: i64,
    ) {
        let (tenant, bucket, currency) = (self.id(tenant), Self::bucket(time_ms), self.id(currency));
        for (model, channel, campaign, orders, revenue) in credits {
            let key = (tenant, bucket, model, self.id(channel), self.id(campaign), currency);
            self.add_one(key, orders, revenue, sign);
        }
    }

    /// Adds `sign` × the credits of the orders `of` of `tenant` (in the order `credited` was
    /// given them).
    fn add_credited(&mut self, tenant: &str, of: &[&OrderState], credited: &attribution::Credited<'_>, sign: i64) {
        let tenant = self.id(tenant);
        let keys: Vec<(u32, u32)> = (0..credited.n_keys())
            .map(|k| {
                let (channel, campaign) = credited.key(k);
                (self.id(channel), self.id(campaign))
            })
            .collect();
        for (order, credits) in of.iter().zip(&credited.of_orders) {
            let (bucket, currency) = (Self::bucket(order.time_ms), self.id(&order.currency));
            for c in credits {
                let (channel, campaign) = keys[c.key];
                self.add_one(
                    (tenant, bucket, c.model, channel, campaign, currency),
                    c.orders_micro,
                    c.revenue_nano,
                    sign,
                );
            }
        }
    }

    /// The sums, as deltas of the attribution roll-up (sums that cancelled out give none).
    fn write(&self, deltas: &mut Deltas) {
        for ((tenant, bucket, model, channel, campaign, currency), [orders, revenue]) in &self.sums {
            if *orders != 0 || *revenue != 0 {
                let text = |id: &u32| &*self.texts[*id as usize];
                deltas.add(
                    &tables::ATTRIBUTION,
                    text(tenant),
                    *bucket,
                    &[model.name(), text(channel), text(campaign), text(currency)],
                    &[*orders, *revenue],
                );
            }
        }
    }
}

/// Applies a commit's changes to a customer's attribution: for every order whose credit they
/// may change — the orders they changed, and the others from the earliest new touch on — the
/// credit before (the order and touches before the commit) is taken back and the credit after
/// given, as one delta per hour, model, channel, campaign and currency.
///
/// An order's credit is not stored: it is derived, the same way every time, from the order and
/// its customer's touches, which are kept as long as the order (see [`apply`]). An order
/// stored by a version before 2026-12-04 holds its credit as text; that is taken back instead,
/// and the text cleared.
fn attribute(
    tx: &mut dyn Tx,
    tenant: &str,
    customer: &str,
    changes: &CustomerChanges,
    orders: &ChangedOrders,
    params: Params,
    sums: &mut CreditSums,
) -> Result<(), DbError> {
    tx.lock_key(&customer_lock(tenant, customer))?;
    // The changed orders, before (with their ids) and after.
    let (mut before, mut after): (Vec<(&str, &OrderState)>, Vec<&OrderState>) = (Vec::new(), Vec::new());
    for id in &changes.orders {
        let Some((was, now)) = orders.get(tenant).and_then(|of_tenant| of_tenant.get(id)) else { continue };
        if let Some(was) = was
            && was.customer == customer
            && was.credited()
        {
            before.push((id, was));
        }
        if now.customer == customer && now.credited() {
            after.push(now);
        }
    }
    // The others a new touch reaches: credited, at or after the earliest new touch.
    let mut unchanged: Vec<(String, OrderState)> = Vec::new();
    if let Some(first) = changes.touches.iter().map(|t| t.time_ms).min() {
        for row in tx.query(
            "SELECT order_id, time_ms, amount, currency, legacy_credits FROM attr_orders
             WHERE tenant = ?1 AND customer_id = ?2 AND placed = 1 AND cancelled = 0 AND time_ms >= ?3",
            &[tenant.into(), customer.into(), first.into()],
        )? {
            let mut c = Cols::new(row);
            let id = c.text();
            if changes.orders.contains(&id) {
                continue;
            }
            let (time_ms, amount, currency, legacy_credits) = (c.int(), c.int(), c.text(), c.text());
            let order = OrderState {
                customer: String::new(),
                time_ms,
                amount,
                currency,
                placed: true,
                cancelled: false,
                legacy_credits,
            };
            unchanged.push((id, order));
        }
    }
    for (id, order) in &unchanged {
        before.push((id, order));
        after.push(order);
    }
    let order_times = || before.iter().map(|(_, o)| o.time_ms).chain(after.iter().map(|o| o.time_ms));
    let (Some(first), Some(last)) = (order_times().min(), order_times().max()) else { return Ok(()) };
    // In key order (time first), sorted here by time, channel and campaign: SQL would sort
    // through a temporary B-tree.
    let mut touches_after: Vec<Touch> = tx
        .query(
            "SELECT time_ms, channel, campaign FROM touches
             WHERE tenant = ?1 AND user_id = ?2 AND time_ms > ?3 AND time_ms <= ?4",
            &[tenant.into(), customer.into(), first.saturating_sub(params.lookback_ms).into(), last.into()],
        )?
        .into_iter()
        .map(|r| {
            let mut c = Cols::new(r);
            Touch { time_ms: c.int(), channel: c.text(), campaign: c.text() }
        })
        .collect();
    touches_after.sort_unstable();
    let touches_before = without(&touches_after, &changes.touches);
    // Orders stored with their credit take that back; the others, the credit derived.
    let (mut derived, mut legacy): (Vec<&OrderState>, Vec<(&OrderState, Vec<Credit>)>) = (Vec::new(), Vec::new());
    for (id, order) in before {
        if order.legacy_credits.is_empty() {
            derived.push(order);
        } else {
            legacy.push((order, parse_credits(&order.legacy_credits, tenant, id)?));
        }
    }
    let times_and_amounts = |of: &[&OrderState]| of.iter().map(|o| (o.time_ms, o.amount)).collect::<Vec<_>>();
    let credited_before = attribution::Credited::new(&times_and_amounts(&derived), &touches_before, params);
    let credited_after = attribution::Credited::new(&times_and_amounts(&after), &touches_after, params);
    sums.add_credited(tenant, &derived, &credited_before, -1);
    for (order, credits) in &legacy {
        let credits = credits.iter().map(|c| (c.model, &*c.channel, &*c.campaign, c.orders_micro, c.revenue_nano));
        sums.add(tenant, order.time_ms, &order.currency, credits, -1);
    }
    sums.add_credited(tenant, &after, &credited_after, 1);
    for (id, order) in &unchanged {
        if !order.legacy_credits.is_empty() {
            tx.exec(
                "UPDATE attr_orders SET legacy_credits = '' WHERE tenant = ?1 AND order_id = ?2",
                &[tenant.into(), id.into()],
            )?;
        }
    }
    Ok(())
}

/// The touches of `all` (sorted) that are not in `added` (any order), as multisets: the
/// touches before a commit, from those after it and those it added.
fn without(all: &[Touch], added: &[Touch]) -> Vec<Touch> {
    if added.is_empty() {
        return all.to_vec();
    }
    let mut added: Vec<&Touch> = added.iter().collect();
    added.sort();
    let mut next = added.into_iter().peekable();
    let mut out = Vec::with_capacity(all.len());
    for t in all {
        while next.next_if(|a| *a < t).is_some() {}
        if next.next_if(|a| *a == t).is_none() {
            out.push(t.clone());
        }
    }
    out
}

/// Adds a visitor's hits to its sessions.
fn sessionize(
    tx: &mut dyn Tx,
    tenant: &str,
    visitor: &str,
    hits: &[Hit],
    gap: i64,
    deltas: &mut Deltas,
) -> Result<(), DbError> {
    let stored: Vec<Session> = tx
        .query(
            "SELECT start_ms, end_ms, events, mask, referrer FROM sessions WHERE tenant = ?1 AND visitor_id = ?2",
            &[tenant.into(), visitor.into()],
        )?
        .into_iter()
        .map(|r| {
            let mut c = Cols::new(r);
            Session { start_ms: c.int(), end_ms: c.int(), events: c.int(), mask: c.int() as u8, referrer: c.text() }
        })
        .collect();
    let (removed, added) = sessions::apply(&stored, hits, gap);
    for s in &removed {
        let (dims, metrics) = s.rollup();
        deltas.sub(&tables::SESSIONS, tenant, s.start_ms, &dims, &metrics);
        tx.exec(
            "DELETE FROM sessions WHERE tenant = ?1 AND visitor_id = ?2 AND start_ms = ?3",
            &[tenant.into(), visitor.into(), s.start_ms.into()],
        )?;
    }
    for s in &added {
        let (dims, metrics) = s.rollup();
        deltas.add(&tables::SESSIONS, tenant, s.start_ms, &dims, &metrics);
        tx.exec(
            "INSERT INTO sessions (tenant, visitor_id, start_ms, end_ms, events, mask, referrer)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            &[
                tenant.into(),
                visitor.into(),
                s.start_ms.into(),
                s.end_ms.into(),
                s.events.into(),
                i64::from(s.mask).into(),
                (&s.referrer).into(),
            ],
        )?;
    }
    Ok(())
}

/// Writes the roll-up deltas, at every grain.
fn write_deltas(tx: &mut dyn Tx, deltas: &Deltas) -> Result<(), DbError> {
    // The upsert of each roll-up table, built once.
    static UPSERTS: std::sync::LazyLock<HashMap<&'static str, String>> =
        std::sync::LazyLock::new(|| tables::ALL.iter().map(|t| (t.name, t.upsert_sql())).collect());
    for row in deltas.by_grain() {
        let Some(sql) = UPSERTS.get(row.table.name) else { continue };
        let params: Vec<Val> = [Val::from(row.tenant), Val::Int(row.grain), Val::Int(row.bucket)]
            .into_iter()
            .chain(row.dims.iter().map(Val::from))
            .chain(row.metrics().iter().map(|m| Val::Int(*m)))
            .collect();
        tx.exec(sql, &params)?;
    }
    Ok(())
}

/// The roll-ups and state tables (portable SQL). Rows that several processors update (watermarks,
/// change versions, counters) are kept per writer and summed when read.
pub fn state_ddl(sqlite: bool) -> String {
    // SQLite stores these tables in key order (no rowid): the reads are key ranges.
    let suffix = if sqlite { " WITHOUT ROWID" } else { "" };
    let mut ddl: String = tables::ALL.iter().map(|t| t.ddl(suffix)).collect();
    let state = "
CREATE TABLE IF NOT EXISTS watermarks (
    tenant TEXT NOT NULL,
    writer TEXT NOT NULL,
    max_event_ms BIGINT NOT NULL,
    PRIMARY KEY (tenant, writer)
);
CREATE TABLE IF NOT EXISTS sessions (
    tenant TEXT NOT NULL,
    visitor_id TEXT NOT NULL,
    start_ms BIGINT NOT NULL,
    end_ms BIGINT NOT NULL,
    events BIGINT NOT NULL,
    mask BIGINT NOT NULL,
    referrer TEXT NOT NULL,
    PRIMARY KEY (tenant, visitor_id, start_ms)
);
CREATE INDEX IF NOT EXISTS sessions_by_end ON sessions (tenant, end_ms);
CREATE TABLE IF NOT EXISTS touches (
    tenant TEXT NOT NULL,
    user_id TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    channel TEXT NOT NULL,
    campaign TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (tenant, user_id, time_ms, agent_id, source_id, seq)
);
CREATE INDEX IF NOT EXISTS touches_by_time ON touches (tenant, time_ms);
CREATE TABLE IF NOT EXISTS attr_orders (
    tenant TEXT NOT NULL,
    order_id TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    time_ms BIGINT NOT NULL,
    amount BIGINT NOT NULL,
    currency TEXT NOT NULL,
    placed BIGINT NOT NULL,
    cancelled BIGINT NOT NULL,
    -- Renamed legacy_credits by the store's version 5.
    credits TEXT NOT NULL,
    PRIMARY KEY (tenant, order_id)
);
CREATE INDEX IF NOT EXISTS attr_orders_by_customer ON attr_orders (tenant, customer_id, time_ms);
CREATE INDEX IF NOT EXISTS attr_orders_by_time ON attr_orders (tenant, time_ms);
CREATE TABLE IF NOT EXISTS inventory (
    tenant TEXT NOT NULL,
    sku TEXT NOT NULL,
    warehouse TEXT NOT NULL,
    on_hand BIGINT NOT NULL,
    time_ms BIGINT NOT NULL,
    agent_id TEXT NOT NULL,
    source_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    PRIMARY KEY (tenant, sku, warehouse)
);
CREATE TABLE IF NOT EXISTS changes (
    tenant TEXT NOT NULL,
    dashboard TEXT NOT NULL,
    writer TEXT NOT NULL,
    version BIGINT NOT NULL,
    PRIMARY KEY (tenant, dashboard, writer)
);
CREATE TABLE IF NOT EXISTS stat_counters (
    name TEXT NOT NULL,
    writer TEXT NOT NULL,
    value BIGINT NOT NULL,
    PRIMARY KEY (name, writer)
);
";
    // Table definitions end with ");" on a line of their own; index definitions do not.
    ddl += &state.replace("\n);\n", &format!("\n){suffix};\n"));
    ddl
}

#[cfg(test)]
mod tests {
    use super::*;
    use attribution::Model;

    fn c(model: Model, channel: &str, orders_micro: i64) -> (Model, &str, &str, i64, i64) {
        (model, channel, "x", orders_micro, orders_micro * 10)
    }

    #[test]
    fn credit_changes_are_summed_per_hour_and_key_before_they_are_deltas() {
        const HOUR: i64 = 3_600_000;
        let a = [c(Model::Linear, "a", 4)];
        let b = [c(Model::Linear, "a", 6), c(Model::Linear, "b", 1)];
        let mut sums = CreditSums::default();
        // An order credited a, then b (a taken back); another credited a; one credited b and
        // taken back.
        sums.add("t", 10 * HOUR + 5, "EUR", a.into_iter(), 1);
        sums.add("t", 10 * HOUR + 59 * 60_000, "EUR", a.into_iter(), -1);
        sums.add("t", 10 * HOUR + 59 * 60_000, "EUR", b.into_iter(), 1);
        sums.add("t", 11 * HOUR, "EUR", a.into_iter(), 1);
        sums.add("t", 10 * HOUR + 1, "USD", b.into_iter(), -1);
        sums.add("t", 10 * HOUR + 2, "USD", b.into_iter(), 1);
        let mut deltas = Deltas::default();
        sums.write(&mut deltas);
        let rows: Vec<(i64, String, String, i64, i64)> = deltas
            .by_grain()
            .into_iter()
            .filter(|r| r.grain == 3600)
            .map(|r| (r.bucket, r.dims[1].clone(), r.dims[3].clone(), r.metrics()[0], r.metrics()[1]))
            .collect();
        let row = |hour: i64, ch: &str, cur: &str, o: i64| (hour * 3600, ch.to_owned(), cur.to_owned(), o, o * 10);
        assert_eq!(
            rows,
            [row(10, "a", "EUR", 6), row(11, "a", "EUR", 4), row(10, "b", "EUR", 1)],
            "one row per hour and key; changes that cancel out (USD) give none"
        );
    }
}
