//! Marketing attribution, as a pure function of an order and its customer's touches.
//!
//! The touches of an order are its customer's touches (`customer_id` = touch `user_id`, same
//! tenant) with `order_time - lookback < touch_time <= order_time`, ordered by time, then
//! channel, then campaign. Each model splits the order (one order, its whole amount) over them:
//!
//! | model | weights over touches 1..n |
//! |---|---|
//! | `last_touch` | all to n |
//! | `first_touch` | all to 1 |
//! | `linear` | 1/n each |
//! | `time_decay` | 2^(-age/half_life), age = order time − touch time, normalised to 1 |
//! | `position_based` | n = 1: 1; n = 2: 1/2 each; n ≥ 3: 40 % to 1 and to n, 20 % shared by the rest |
//!
//! An order without touches is credited whole to channel and campaign `(none)` in every model.
//!
//! # Rounding
//! Credit is split per order, in integers: revenue in hundred-millionths of the currency unit
//! (`revenue_nano`, 10⁴ finer than money) and orders in millionths (`orders_micro`), over the
//! order's channels and campaigns (each weighing the sum of its touches' weights) by the
//! largest-remainder method (ties to the first in channel, then campaign order), so that one
//! order's credits add up exactly to its amount and to one order. The rational models are split
//! exactly; time-decay weights are irrational and are first turned into integers (53 significant
//! bits; fewer when the sum of an order's weights would pass 2^64). A sum of
//! credits is then within 10⁻⁸ of the exact value per order it holds — within a cent for any
//! sum of up to a million orders — and is rounded to ten-thousandths (half away from zero)
//! only when served.

use serde::{Deserialize, Serialize};

/// The channel and campaign of orders without touches.
pub const NONE: &str = "(none)";

/// An attribution model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Model {
    LastTouch,
    FirstTouch,
    Linear,
    TimeDecay,
    PositionBased,
}

impl Model {
    pub const ALL: [Model; 5] =
        [Model::LastTouch, Model::FirstTouch, Model::Linear, Model::TimeDecay, Model::PositionBased];

    pub fn name(self) -> &'static str {
        match self {
            Model::LastTouch => "last_touch",
            Model::FirstTouch => "first_touch",
            Model::Linear => "linear",
            Model::TimeDecay => "time_decay",
            Model::PositionBased => "position_based",
        }
    }

    pub fn by_name(name: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// A marketing touch of a customer.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Touch {
    pub time_ms: i64,
    pub channel: String,
    pub campaign: String,
}

/// The attribution settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub lookback_ms: i64,
    pub half_life_ms: i64,
}

/// The credit one order gives one channel and campaign under one model.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Credit {
    pub model: Model,
    pub channel: String,
    pub campaign: String,
    pub orders_micro: i64,
    pub revenue_nano: i64,
}

/// Revenue credit units per unit of [`actidash_shared::Money`]'s raw value.
pub const NANO_PER_RAW: i64 = 10_000;
/// Order credit units per order.
pub const MICRO_PER_ORDER: i64 = 1_000_000;

/// Reads the credits an order row holds from versions before 2026-12-04, which stored every
/// order's credits with it (`attr_orders.credits`; since then they are derived from the order and
/// its customer's touches, and the column is empty): per channel and campaign,
/// `{len}:{channel}{len}:{campaign}` (lengths in bytes), then `{model},{orders},{revenue};` per
/// model (`model` its index in [`Model::ALL`]), then a line end — or, before that, a JSON list.
/// Sorted by model, channel, campaign. The error says where the text stops making sense.
pub fn decode_credits(text: &str) -> Result<Vec<Credit>, String> {
    if text.starts_with('[') {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    fn take<'a>(rest: &mut &'a str, until: char) -> Result<&'a str, String> {
        let (head, tail) = rest.split_once(until).ok_or_else(|| format!("no {until:?} in {rest:?}"))?;
        *rest = tail;
        Ok(head)
    }
    fn sized<'a>(rest: &mut &'a str) -> Result<&'a str, String> {
        let len: usize = take(rest, ':')?.parse().map_err(|e| format!("bad length: {e}"))?;
        let s = rest.get(..len).ok_or_else(|| format!("{len} bytes do not fit in {rest:?}"))?;
        *rest = &rest[len..];
        Ok(s)
    }
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let channel = sized(&mut rest)?;
        let campaign = sized(&mut rest)?;
        let mut line = take(&mut rest, '\n')?;
        while !line.is_empty() {
            let model = take(&mut line, ',')?;
            let model = model
                .parse::<usize>()
                .ok()
                .and_then(|i| Model::ALL.get(i).copied())
                .ok_or_else(|| format!("bad model {model:?}"))?;
            let orders_micro = take(&mut line, ',')?.parse().map_err(|e| format!("bad orders: {e}"))?;
            let revenue_nano = take(&mut line, ';')?.parse().map_err(|e| format!("bad revenue: {e}"))?;
            out.push(Credit { model, channel: channel.into(), campaign: campaign.into(), orders_micro, revenue_nano });
        }
    }
    out.sort();
    Ok(out)
}

/// One model's credit of one order to the channel and campaign `key` of a [`Credited`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyCredit {
    pub model: Model,
    pub key: usize,
    pub orders_micro: i64,
    pub revenue_nano: i64,
}

/// The credits of many orders of one customer, by channel and campaign borrowed from the
/// touches (no text copied per credit: a processor computes them for every order a new touch
/// or an order change reaches, twice — as before and as after the change).
#[derive(Debug)]
pub struct Credited<'t> {
    /// The touches' channels and campaigns, sorted; index `keys.len()` is `(none)`.
    keys: Vec<(&'t str, &'t str)>,
    /// Per order (in the order given): its credits, by model, then key.
    pub of_orders: Vec<Vec<KeyCredit>>,
}

impl<'t> Credited<'t> {
    /// Credits `orders` ((time, amount)). The touches are sorted and keyed once, and a window
    /// slides over them in order time, so that an order costs its customer's channels and
    /// campaigns (and, for time decay, its touches), not a scan and sort of every touch.
    pub fn new(orders: &[(i64, i64)], touches: &'t [Touch], params: Params) -> Credited<'t> {
        let mut sorted: Vec<&Touch> = touches.iter().collect();
        if !sorted.is_sorted() {
            sorted.sort();
        }
        // The channels and campaigns, in order, and each touch's among them.
        let mut keys: Vec<(&str, &str)> = sorted.iter().map(|t| (t.channel.as_str(), t.campaign.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        let key_of: Vec<usize> = sorted
            .iter()
            .map(|t| keys.binary_search(&(t.channel.as_str(), t.campaign.as_str())).unwrap_or(0))
            .collect();
        let mut by_time: Vec<usize> = (0..orders.len()).collect();
        by_time.sort_by_key(|i| orders[*i].0);
        let mut out: Vec<Vec<KeyCredit>> = vec![Vec::new(); orders.len()];
        // The window [lo, hi): touches with order time - lookback < time <= order time, and the
        // number of them per key.
        let (mut lo, mut hi) = (0, 0);
        let mut counts = vec![0_u128; keys.len()];
        let mut per_key = vec![0_u128; keys.len()];
        for i in by_time {
            let (order_ms, amount_raw) = orders[i];
            while hi < sorted.len() && sorted[hi].time_ms <= order_ms {
                counts[key_of[hi]] += 1;
                hi += 1;
            }
            let start = order_ms.saturating_sub(params.lookback_ms);
            while lo < hi && sorted[lo].time_ms <= start {
                counts[key_of[lo]] -= 1;
                lo += 1;
            }
            let revenue = i128::from(amount_raw) * i128::from(NANO_PER_RAW);
            let n = hi - lo;
            let credits = &mut out[i];
            if n == 0 {
                credits.extend(Model::ALL.into_iter().map(|model| KeyCredit {
                    model,
                    key: keys.len(),
                    orders_micro: MICRO_PER_ORDER,
                    revenue_nano: clamp(revenue),
                }));
                continue;
            }
            let (first, last) = (key_of[lo], key_of[hi - 1]);
            for model in Model::ALL {
                per_key.iter_mut().for_each(|w| *w = 0);
                match model {
                    Model::LastTouch => per_key[last] = 1,
                    Model::FirstTouch => per_key[first] = 1,
                    Model::Linear => per_key.copy_from_slice(&counts),
                    Model::PositionBased if n <= 2 => {
                        per_key[first] += 1;
                        if n == 2 {
                            per_key[last] += 1;
                        }
                    }
                    Model::PositionBased => {
                        // 40 % = 2(n-2) / 5(n-2) to each end, and 1 / 5(n-2) to each middle touch.
                        per_key.copy_from_slice(&counts);
                        let ends = 2 * (n as u128 - 2);
                        per_key[first] += ends - 1;
                        per_key[last] += ends - 1;
                    }
                    Model::TimeDecay => {
                        let window: Vec<i64> = sorted[lo..hi].iter().map(|t| t.time_ms).collect();
                        for (w, k) in
                            decay_weights(&window, order_ms, params.half_life_ms).into_iter().zip(&key_of[lo..hi])
                        {
                            per_key[*k] += w;
                        }
                    }
                }
                split(model, &per_key, revenue, credits);
            }
        }
        Credited { keys, of_orders: out }
    }

    /// The number of keys: the touches' channels and campaigns, and `(none)`.
    pub fn n_keys(&self) -> usize {
        self.keys.len() + 1
    }

    /// The channel and campaign of a credit's key.
    pub fn key(&self, key: usize) -> (&'t str, &'t str) {
        self.keys.get(key).copied().unwrap_or((NONE, NONE))
    }
}

/// One model's credit of an order: one order and `revenue` split over the keys by their
/// weights `per_key`; keys without weight get nothing.
fn split(model: Model, per_key: &[u128], revenue: i128, out: &mut Vec<KeyCredit>) {
    let mut weighted = per_key.iter().enumerate().filter(|(_, w)| **w != 0);
    if let (Some((key, _)), None) = (weighted.next(), weighted.next()) {
        // One key (first and last touch always): the whole of it, as `allocate` would give.
        out.push(KeyCredit { model, key, orders_micro: MICRO_PER_ORDER, revenue_nano: clamp(revenue) });
        return;
    }
    let orders = allocate(i128::from(MICRO_PER_ORDER), per_key);
    let revenues = allocate(revenue, per_key);
    for (key, w) in per_key.iter().enumerate() {
        if *w == 0 {
            continue;
        }
        out.push(KeyCredit { model, key, orders_micro: clamp(orders[key]), revenue_nano: clamp(revenues[key]) });
    }
}

/// Time-decay weights of touches at `times` for an order at `order_ms`, as integers: 2^53 for
/// the newest, the others in proportion (every significant bit of an f64 weight).
fn decay_weights(times: &[i64], order_ms: i64, half_life_ms: i64) -> Vec<u128> {
    let half_life = half_life_ms.max(1) as f64;
    let raw: Vec<f64> = times.iter().map(|t| (-((order_ms - t) as f64) / half_life).exp2()).collect();
    let max = raw.iter().copied().fold(f64::MIN_POSITIVE, f64::max);
    raw.iter().map(|w| ((w / max) * 9_007_199_254_740_992.0).round() as u128).collect()
}

/// Splits `total` in proportion to `weights` by the largest-remainder method: the parts add up
/// to `total` exactly; ties go to the earlier part. Weights that sum past 2^64 are scaled down
/// (their low bits dropped) first.
pub fn allocate(total: i128, weights: &[u128]) -> Vec<i128> {
    let denominator = weights.iter().fold(0_u128, |sum, w| sum.saturating_add(*w));
    if denominator == 0 {
        return vec![0; weights.len()];
    }
    if denominator >> 64 != 0 {
        let shift = 64 - denominator.leading_zeros();
        let scaled: Vec<u128> = weights.iter().map(|w| w >> shift).collect();
        return allocate(total, &scaled);
    }
    let negative = total < 0;
    let magnitude = total.unsigned_abs();
    // weights <= denominator < 2^64 and r1 < denominator: r1 * w < 2^128. Split to avoid
    // overflow of magnitude * w.
    let (q1, r1) = (magnitude / denominator, magnitude % denominator);
    let mut parts: Vec<u128> = Vec::with_capacity(weights.len());
    let mut remainders: Vec<(u128, usize)> = Vec::new();
    for (i, w) in weights.iter().enumerate() {
        if *w == 0 {
            parts.push(0);
            continue;
        }
        let scaled = r1 * w;
        let q2 = scaled / denominator;
        parts.push(q1 * w + q2);
        remainders.push((scaled - q2 * denominator, i));
    }
    let mut left = magnitude - parts.iter().sum::<u128>();
    if left > 0 {
        // The largest remainders get one more unit each (ties: the earlier part); `left` is
        // less than the number of parts with a weight.
        remainders.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        for (_, i) in remainders {
            if left == 0 {
                break;
            }
            parts[i] += 1;
            left -= 1;
        }
    }
    parts.into_iter().map(|p| if negative { -(p as i128) } else { p as i128 }).collect()
}

fn clamp(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The credits of an order of `amount_raw` (money's raw units) placed at `order_ms`, given its
    /// customer's touches in any order (those outside the lookback window are ignored). Sorted by
    /// model, channel, campaign.
    fn credit_order(order_ms: i64, amount_raw: i64, touches: &[Touch], params: Params) -> Vec<Credit> {
        credit_orders(&[(order_ms, amount_raw)], touches, params).pop().unwrap_or_default()
    }

    /// [`credit_order`] for many orders of one customer, through [`Credited`]: `orders` are
    /// (time, amount), the result is in their order.
    fn credit_orders(orders: &[(i64, i64)], touches: &[Touch], params: Params) -> Vec<Vec<Credit>> {
        let credited = Credited::new(orders, touches, params);
        credited
            .of_orders
            .iter()
            .map(|of_order| {
                of_order
                    .iter()
                    .map(|c| {
                        let (channel, campaign) = credited.key(c.key);
                        Credit {
                            model: c.model,
                            channel: channel.to_owned(),
                            campaign: campaign.to_owned(),
                            orders_micro: c.orders_micro,
                            revenue_nano: c.revenue_nano,
                        }
                    })
                    .collect()
            })
            .collect()
    }

    /// The text [`decode_credits`] reads, as versions before 2026-12-04 wrote it.
    fn encode_credits(credits: &[Credit]) -> String {
        let mut groups: std::collections::BTreeMap<(&str, &str), Vec<&Credit>> = std::collections::BTreeMap::new();
        for c in credits {
            groups.entry((&c.channel, &c.campaign)).or_default().push(c);
        }
        let mut out = String::new();
        for ((channel, campaign), of_group) in groups {
            out += &format!("{}:{channel}{}:{campaign}", channel.len(), campaign.len());
            for c in of_group {
                let model = Model::ALL.iter().position(|m| *m == c.model).unwrap_or(0);
                out += &format!("{model},{},{};", c.orders_micro, c.revenue_nano);
            }
            out.push('\n');
        }
        out
    }

    /// The credits of one order, computed directly from the definition: the oracle of
    /// [`credit_orders`].
    fn credit_order_direct(order_ms: i64, amount_raw: i64, touches: &[Touch], params: Params) -> Vec<Credit> {
        let mut eligible: Vec<&Touch> = touches
            .iter()
            .filter(|t| t.time_ms <= order_ms && t.time_ms > order_ms.saturating_sub(params.lookback_ms))
            .collect();
        if !eligible.is_sorted() {
            eligible.sort();
        }
        let revenue = i128::from(amount_raw) * i128::from(NANO_PER_RAW);
        if eligible.is_empty() {
            return Model::ALL
                .into_iter()
                .map(|model| Credit {
                    model,
                    channel: NONE.into(),
                    campaign: NONE.into(),
                    orders_micro: MICRO_PER_ORDER,
                    revenue_nano: clamp(revenue),
                })
                .collect();
        }
        // The channels and campaigns, in order, and each touch's among them.
        let mut keys: Vec<(&str, &str)> = eligible.iter().map(|t| (t.channel.as_str(), t.campaign.as_str())).collect();
        keys.sort_unstable();
        keys.dedup();
        let key_of: Vec<usize> = eligible
            .iter()
            .map(|t| keys.binary_search(&(t.channel.as_str(), t.campaign.as_str())).unwrap_or(0))
            .collect();
        let mut out = Vec::new();
        let mut per_key = vec![0_u128; keys.len()];
        for model in Model::ALL {
            per_key.iter_mut().for_each(|w| *w = 0);
            for (w, k) in weights(model, &eligible, order_ms, params.half_life_ms).into_iter().zip(&key_of) {
                per_key[*k] += w;
            }
            // Split by `allocate` alone (the product's `split` takes shortcuts).
            let orders = allocate(i128::from(MICRO_PER_ORDER), &per_key);
            let revenues = allocate(revenue, &per_key);
            for (k, (channel, campaign)) in keys.iter().enumerate().filter(|(k, _)| per_key[*k] != 0) {
                out.push(Credit {
                    model,
                    channel: (*channel).into(),
                    campaign: (*campaign).into(),
                    orders_micro: clamp(orders[k]),
                    revenue_nano: clamp(revenues[k]),
                });
            }
        }
        out
    }

    /// Integer weights of the touches (sorted) under `model`.
    fn weights(model: Model, touches: &[&Touch], order_ms: i64, half_life_ms: i64) -> Vec<u128> {
        let n = touches.len();
        match model {
            Model::LastTouch => (0..n).map(|i| u128::from(i == n - 1)).collect(),
            Model::FirstTouch => (0..n).map(|i| u128::from(i == 0)).collect(),
            Model::Linear => vec![1; n],
            Model::PositionBased => match n {
                1 => vec![1],
                2 => vec![1, 1],
                _ => {
                    // 40 % = 2(n-2) / 5(n-2), and 20 % / (n-2) = 1 / 5(n-2) for each middle touch.
                    let ends = 2 * (n as u128 - 2);
                    (0..n).map(|i| if i == 0 || i == n - 1 { ends } else { 1 }).collect()
                }
            },
            Model::TimeDecay => {
                decay_weights(&touches.iter().map(|t| t.time_ms).collect::<Vec<_>>(), order_ms, half_life_ms)
            }
        }
    }

    /// A small deterministic generator: each call, a number below `m`.
    fn xorshift(mut seed: u64) -> impl FnMut(u64) -> u64 {
        move |m| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % m
        }
    }

    #[test]
    fn many_orders_at_once_are_credited_as_each_alone() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d_u64);
        let params = Params { lookback_ms: 10 * DAY, half_life_ms: 3 * DAY };
        for _ in 0..300 {
            let touches: Vec<Touch> = (0..next(40))
                .map(|_| Touch {
                    time_ms: next(30) as i64 * DAY / 2 + next(3) as i64,
                    channel: ["email", "google", "meta"][next(3) as usize].into(),
                    campaign: ["a", "b"][next(2) as usize].into(),
                })
                .collect();
            let orders: Vec<(i64, i64)> =
                (0..1 + next(20)).map(|_| (next(40) as i64 * DAY / 2, 1 + next(1_000_000) as i64)).collect();
            let got = credit_orders(&orders, &touches, params);
            for (o, credits) in orders.iter().zip(&got) {
                assert_eq!(credits, &credit_order_direct(o.0, o.1, &touches, params), "{o:?} {touches:?}");
            }
        }
    }

    const DAY: i64 = 86_400_000;

    #[test]
    fn credits_text_is_the_format_older_stores_hold() {
        let c = |model, channel: &str, campaign: &str, orders_micro, revenue_nano| Credit {
            model,
            channel: channel.into(),
            campaign: campaign.into(),
            orders_micro,
            revenue_nano,
        };
        let credits = [
            c(Model::LastTouch, "email", "c", 1, 2),
            c(Model::Linear, "email", "c", 500_000, -7),
            c(Model::FirstTouch, "", "spring sale", 1_000_000, 123_456_789_012),
        ];
        // Byte for byte what those versions stored.
        assert_eq!(encode_credits(&credits), "0:11:spring sale1,1000000,123456789012;\n5:email1:c0,1,2;2,500000,-7;\n");
    }

    #[test]
    fn credits_round_trip_through_their_stored_text() {
        let touches = [touch(1, "email"), touch(2, "se:o\n3:x"), touch(3, "email"), touch(4, "")];
        let credits = credit_order(5 * DAY, 12_345_678, &touches, PARAMS);
        assert!(credits.len() >= 10, "{credits:?}");
        let text = encode_credits(&credits);
        assert_eq!(decode_credits(&text).as_deref(), Ok(&credits[..]));
        // What stores wrote before: JSON.
        assert_eq!(decode_credits(&serde_json::to_string(&credits).unwrap()).as_deref(), Ok(&credits[..]));
        assert_eq!(decode_credits(""), Ok(vec![]));
        assert!(decode_credits("5:email1:c0,1,2").is_err(), "cut short");
        assert!(decode_credits("9:email").is_err());
        assert!(decode_credits("5:email1:c9,1,2;\n").is_err(), "no model 9");
    }

    const PARAMS: Params = Params { lookback_ms: 30 * DAY, half_life_ms: 7 * DAY };

    fn touch(day: i64, channel: &str) -> Touch {
        Touch { time_ms: day * DAY, channel: channel.into(), campaign: "c".into() }
    }

    /// (channel, revenue in raw money units) of one model's credits for an order of 100.00.
    fn credits(model: Model, touches: &[Touch], order_day: i64) -> Vec<(String, i64)> {
        credit_order(order_day * DAY, 1_000_000, touches, PARAMS)
            .into_iter()
            .filter(|c| c.model == model)
            .map(|c| (c.channel, c.revenue_nano / NANO_PER_RAW))
            .collect()
    }

    #[test]
    fn rational_models_split_exactly() {
        let t = [touch(1, "a"), touch(2, "b"), touch(3, "c"), touch(4, "d"), touch(5, "e")];
        let v = |pairs: &[(&str, i64)]| pairs.iter().map(|(c, r)| ((*c).to_owned(), *r)).collect::<Vec<_>>();
        assert_eq!(credits(Model::LastTouch, &t, 10), v(&[("e", 1_000_000)]));
        assert_eq!(credits(Model::FirstTouch, &t, 10), v(&[("a", 1_000_000)]));
        assert_eq!(
            credits(Model::Linear, &t, 10),
            v(&[("a", 200_000), ("b", 200_000), ("c", 200_000), ("d", 200_000), ("e", 200_000)])
        );
        // 40 / 20 / 40: the three middle touches share 20 %.
        let pb = credit_order(10 * DAY, 1_000_000, &t, PARAMS);
        let pb: Vec<(String, i64)> =
            pb.into_iter().filter(|c| c.model == Model::PositionBased).map(|c| (c.channel, c.revenue_nano)).collect();
        let third = 200_000 * NANO_PER_RAW / 3;
        assert_eq!(pb.iter().map(|p| p.1).sum::<i64>(), 1_000_000 * NANO_PER_RAW);
        assert_eq!(pb[0].1, 400_000 * NANO_PER_RAW);
        assert!((pb[1].1 - third).abs() <= 1 && (pb[2].1 - third).abs() <= 1);
        assert_eq!(credits(Model::PositionBased, &t[..2], 10), v(&[("a", 500_000), ("b", 500_000)]));
        assert_eq!(credits(Model::PositionBased, &t[..1], 10), v(&[("a", 1_000_000)]));
    }

    #[test]
    fn time_decay_halves_per_half_life_and_sums_exactly() {
        // Ages 7 and 0 days: weights 1/2 and 1, so 1/3 and 2/3.
        let c = credit_order(10 * DAY, 999_999, &[touch(3, "old"), touch(10, "new")], PARAMS);
        let td: Vec<&Credit> = c.iter().filter(|c| c.model == Model::TimeDecay).collect();
        assert_eq!(td.iter().map(|c| c.revenue_nano).sum::<i64>(), 999_999 * NANO_PER_RAW);
        assert_eq!(td.iter().map(|c| c.orders_micro).sum::<i64>(), MICRO_PER_ORDER);
        let new = td.iter().find(|c| c.channel == "new").unwrap();
        assert!((new.revenue_nano - 666_666 * NANO_PER_RAW).abs() <= 1, "{}", new.revenue_nano);
    }

    #[test]
    fn window_bounds_ties_and_no_touch() {
        // Exactly `lookback` before: outside; at the order's instant: inside.
        let t = [touch(0, "edge"), touch(30, "same-instant")];
        assert_eq!(credits(Model::FirstTouch, &t, 30), vec![("same-instant".to_owned(), 1_000_000)]);
        // Same instant: ordered by channel, then campaign.
        let t = [touch(5, "z"), touch(5, "a")];
        assert_eq!(credits(Model::FirstTouch, &t, 6)[0].0, "a");
        assert_eq!(credits(Model::LastTouch, &t, 6)[0].0, "z");
        // Touches after the order do not count; none left: (none).
        let none = credits(Model::Linear, &[touch(7, "late")], 6);
        assert_eq!(none, vec![(NONE.to_owned(), 1_000_000)]);
    }

    #[test]
    fn allocation_is_exact_and_fair() {
        assert_eq!(allocate(10, &[1, 1, 1]), vec![4, 3, 3]);
        assert_eq!(allocate(-10, &[1, 1, 1]), vec![-4, -3, -3]);
        assert_eq!(allocate(7, &[0, 1]), vec![0, 7]);
        assert_eq!(allocate(5, &[0, 0]), vec![0, 0]);
        let big = i128::from(i64::MAX) * 10_000;
        assert_eq!(allocate(big, &[3, 5, 1 << 53]).iter().sum::<i128>(), big);
        // Weights past 2^64 in sum (time decay over thousands of touches of one key) are
        // scaled, not overflowed.
        let huge = [u128::MAX / 3, u128::MAX / 3, 1 << 70];
        let parts = allocate(big, &huge);
        assert_eq!(parts.iter().sum::<i128>(), big);
        assert!((parts[0] - parts[1]).abs() <= 1 && parts[2] < parts[0] / 1_000_000, "{parts:?}");
        // Against the definition, by rational arithmetic: each part is the floor of its exact
        // share or one more, the ones more go to the largest remainders (ties: the earlier
        // part), and the parts add up.
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15_u64);
        for _ in 0..2_000 {
            let n = 1 + next(12) as usize;
            let weights: Vec<u128> = (0..n).map(|_| if next(4) == 0 { 0 } else { u128::from(next(1 << 20)) }).collect();
            let total = i128::from(next(1 << 40)) * if next(2) == 0 { 1 } else { -1 };
            let parts = allocate(total, &weights);
            let d: u128 = weights.iter().sum();
            if d == 0 {
                assert!(parts.iter().all(|p| *p == 0));
                continue;
            }
            assert_eq!(parts.iter().sum::<i128>(), total, "{weights:?} {total}");
            let m = total.unsigned_abs();
            let mut extra: Vec<(u128, usize)> = Vec::new();
            for (i, w) in weights.iter().enumerate() {
                let (floor, rem) = ((m * w) / d, (m * w) % d);
                let got = parts[i].unsigned_abs();
                assert!(got == floor || got == floor + 1, "part {i} of {weights:?} {total}");
                if got == floor + 1 {
                    extra.push((rem, i));
                }
                assert!(*w > 0 || got == 0);
            }
            // No part left at its floor has a larger remainder (or an equal one, earlier) than
            // a part that got one more.
            for (i, w) in weights.iter().enumerate() {
                let (floor, rem) = ((m * w) / d, (m * w) % d);
                if *w > 0 && parts[i].unsigned_abs() == floor {
                    assert!(extra.iter().all(|(r, j)| *r > rem || (*r == rem && *j < i)), "{weights:?} {total}");
                }
            }
        }
    }
}
