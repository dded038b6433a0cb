//! Exact money amounts.
//!
//! Amounts are fixed-point integers in ten-thousandths of the currency unit, so that sums over
//! billions of events stay exact (a float would drift). In JSON an amount is a plain number
//! (`129.99`) so that standard tools read it; strings (`"129.99"`) are accepted on input too, as
//! exports often quote numbers.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Number of fractional digits kept.
pub const SCALE_DIGITS: u32 = 4;
const SCALE: i64 = 10_i64.pow(SCALE_DIGITS);

/// An amount of money in ten-thousandths of its currency unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Money(pub i64);

/// Why a text is not an amount.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MoneyParseError {
    #[error("amount {text:?} is not a decimal number")]
    NotDecimal { text: String },
    #[error("amount {text:?} has more than {SCALE_DIGITS} decimal places")]
    TooPrecise { text: String },
    #[error("amount {text:?} is out of range")]
    OutOfRange { text: String },
}

impl Money {
    /// `units` whole units and no fraction.
    pub fn from_units(units: i64) -> Option<Money> {
        units.checked_mul(SCALE).map(Money)
    }

    /// The raw fixed-point value (ten-thousandths).
    pub fn raw(self) -> i64 {
        self.0
    }

    /// Parses a decimal text such as `-12.5` or `129.99` exactly.
    pub fn parse(text: &str) -> Result<Money, MoneyParseError> {
        let not_decimal = || MoneyParseError::NotDecimal { text: text.to_owned() };
        let t = text.trim();
        let (negative, digits) = match t.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (int_part, frac_part) = match digits.split_once('.') {
            Some((i, f)) => (i, f),
            None => (digits, ""),
        };
        if (int_part.is_empty() && frac_part.is_empty())
            || !int_part.bytes().all(|b| b.is_ascii_digit())
            || !frac_part.bytes().all(|b| b.is_ascii_digit())
        {
            return Err(not_decimal());
        }
        let frac_trimmed = frac_part.trim_end_matches('0');
        if frac_trimmed.len() > SCALE_DIGITS as usize {
            return Err(MoneyParseError::TooPrecise { text: text.to_owned() });
        }
        let out_of_range = || MoneyParseError::OutOfRange { text: text.to_owned() };
        let int_value: i64 = if int_part.is_empty() { 0 } else { int_part.parse().map_err(|_| out_of_range())? };
        let mut frac_value: i64 = 0;
        for (idx, b) in frac_trimmed.bytes().enumerate() {
            frac_value += i64::from(b - b'0') * 10_i64.pow(SCALE_DIGITS - 1 - idx as u32);
        }
        let magnitude =
            int_value.checked_mul(SCALE).and_then(|v| v.checked_add(frac_value)).ok_or_else(out_of_range)?;
        Ok(Money(if negative { -magnitude } else { magnitude }))
    }

    /// Converts a float, rounding to the nearest ten-thousandth. Used only for JSON numbers,
    /// which arrive as `f64`; any amount with at most 4 decimals below 10^11 converts exactly.
    pub fn from_f64(value: f64) -> Option<Money> {
        let scaled = (value * SCALE as f64).round();
        if scaled.is_finite() && scaled.abs() < 9.0e18 { Some(Money(scaled as i64)) } else { None }
    }

    /// The amount as a float, for display and JSON output.
    pub fn to_f64(self) -> f64 {
        self.0 as f64 / SCALE as f64
    }

    pub fn checked_add(self, other: Money) -> Option<Money> {
        self.0.checked_add(other.0).map(Money)
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let sign = if self.0 < 0 { "-" } else { "" };
        let abs = self.0.unsigned_abs();
        let scale = SCALE as u64;
        let frac = abs % scale;
        if frac == 0 {
            write!(f, "{sign}{}", abs / scale)
        } else {
            let frac_text = format!("{frac:04}");
            write!(f, "{sign}{}.{}", abs / scale, frac_text.trim_end_matches('0'))
        }
    }
}

impl Serialize for Money {
    /// A JSON number where a float carries the amount exactly — raw / 10^4 is correctly rounded,
    /// so its shortest rendering is the decimal text itself (129.99, not 129.98999…) — and a
    /// decimal string otherwise: from about 10^11 units a float's 53 bits no longer hold four
    /// decimals (339651093651.6525 read back as …6526). Readers take both ([`Money`]'s
    /// `Deserialize`). The float's neighbours must read back to the amount too: serde_json
    /// parses floats to within one unit in the last place, not always to the nearest.
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let float = self.to_f64();
        let exact = |f: f64| Money::from_f64(f) == Some(*self);
        if exact(float) && exact(float.next_up()) && exact(float.next_down()) {
            serializer.serialize_f64(float)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for Money {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Money, D::Error> {
        struct MoneyVisitor;
        impl serde::de::Visitor<'_> for MoneyVisitor {
            type Value = Money;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a decimal amount (number or string)")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Money, E> {
                Money::from_units(v).ok_or_else(|| E::custom(format!("amount {v} is out of range")))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Money, E> {
                i64::try_from(v)
                    .ok()
                    .and_then(Money::from_units)
                    .ok_or_else(|| E::custom(format!("amount {v} is out of range")))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Money, E> {
                Money::from_f64(v).ok_or_else(|| E::custom(format!("amount {v} is out of range")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Money, E> {
                Money::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(MoneyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_decimal_text_exactly() {
        assert_eq!(Money::parse("129.99"), Ok(Money(1_299_900)));
        assert_eq!(Money::parse("-0.5"), Ok(Money(-5_000)));
        assert_eq!(Money::parse("7"), Ok(Money(70_000)));
        assert_eq!(Money::parse(".25"), Ok(Money(2_500)));
        assert_eq!(Money::parse("1.23400"), Ok(Money(12_340)));
        assert!(matches!(Money::parse("1.23456"), Err(MoneyParseError::TooPrecise { .. })));
        assert!(matches!(Money::parse("abc"), Err(MoneyParseError::NotDecimal { .. })));
        assert!(matches!(Money::parse("."), Err(MoneyParseError::NotDecimal { .. })));
        assert!(matches!(Money::parse("99999999999999999999"), Err(MoneyParseError::OutOfRange { .. })));
    }

    #[test]
    fn json_numbers_and_strings_are_accepted() {
        let from_number: Money = serde_json::from_str("129.99").unwrap();
        let from_string: Money = serde_json::from_str("\"129.99\"").unwrap();
        let from_int: Money = serde_json::from_str("12").unwrap();
        assert_eq!(from_number, Money(1_299_900));
        assert_eq!(from_string, Money(1_299_900));
        assert_eq!(from_int, Money(120_000));
        assert_eq!(serde_json::to_string(&Money(1_299_900)).unwrap(), "129.99");
        // Past what a float holds: a decimal string, read back exactly.
        let large = Money(3_396_510_936_516_525);
        assert_eq!(serde_json::to_string(&large).unwrap(), "\"339651093651.6525\"");
        assert_eq!(serde_json::from_str::<Money>("\"339651093651.6525\"").unwrap(), large);
        assert_eq!(Money::from_f64(339_651_093_651.652_5), Some(Money(3_396_510_936_516_526)), "a float is off by one");
        assert!(serde_json::from_str::<Money>("true").is_err());
    }

    proptest! {
        #[test]
        fn display_parse_round_trip(raw in -1_000_000_000_000_000i64..1_000_000_000_000_000) {
            let m = Money(raw);
            prop_assert_eq!(Money::parse(&m.to_string()), Ok(m));
        }

        #[test]
        fn json_round_trip_for_realistic_amounts(raw in -100_000_000_000_000i64..100_000_000_000_000) {
            let m = Money(raw);
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m);
        }

        /// Up to the bound events allow (10^12 units), where a float alone loses the last digit.
        #[test]
        fn json_round_trip_up_to_the_bound(raw in -10_000_000_000_000_000i64..=10_000_000_000_000_000) {
            let m = Money(raw);
            let json = serde_json::to_string(&m).unwrap();
            prop_assert_eq!(serde_json::from_str::<Money>(&json).unwrap(), m, "{}", json);
        }
    }
}
