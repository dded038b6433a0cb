//! An event's time as JSON text: RFC 3339 in UTC, exactly as chrono's serde writes and reads
//! a `DateTime<Utc>`, with a short path for the form every event carries.
//!
//! Every event's time is written once on the agent and read on the gateway and by every
//! processor; chrono's general formatter and parser cost 0.14 and 0.10 µs there (`fmt` machinery,
//! a format-item interpreter) against 0.02 µs by hand. The form chrono writes for a time between
//! the years 0 and 9999 without a leap second, `YYYY-MM-DDTHH:MM:SS[.fff|.ffffff|.fffffffff]Z`,
//! is written and read here by hand; anything else goes through chrono, so the text written and
//! the times read are chrono's in every case (checked against chrono by the property tests
//! below).

use chrono::{DateTime, Datelike, NaiveDate, Timelike, Utc};
use serde::{Deserializer, Serializer};

/// The longest text of the short path: `YYYY-MM-DDTHH:MM:SS.fffffffffZ`.
const MAX_LEN: usize = 30;

/// `time` as chrono's serde writes it (RFC 3339, `Z`, the fraction in 0, 3, 6 or 9 digits) into
/// `buf`, for the years 0–9999 without a leap second; the length written.
fn short_form(time: &DateTime<Utc>, buf: &mut [u8; MAX_LEN]) -> Option<usize> {
    let year = time.year();
    let nanos = time.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return None;
    }
    fn digits(buf: &mut [u8], mut value: u32) {
        for b in buf.iter_mut().rev() {
            *b = b'0' + (value % 10) as u8;
            value /= 10;
        }
    }
    digits(&mut buf[0..4], year as u32);
    buf[4] = b'-';
    digits(&mut buf[5..7], time.month());
    buf[7] = b'-';
    digits(&mut buf[8..10], time.day());
    buf[10] = b'T';
    digits(&mut buf[11..13], time.hour());
    buf[13] = b':';
    digits(&mut buf[14..16], time.minute());
    buf[16] = b':';
    digits(&mut buf[17..19], time.second());
    let mut len = 19;
    let fraction = match nanos {
        0 => None,
        n if n % 1_000_000 == 0 => Some((n / 1_000_000, 3)),
        n if n % 1_000 == 0 => Some((n / 1_000, 6)),
        n => Some((n, 9)),
    };
    if let Some((value, width)) = fraction {
        buf[len] = b'.';
        digits(&mut buf[len + 1..len + 1 + width], value);
        len += 1 + width;
    }
    buf[len] = b'Z';
    Some(len + 1)
}

/// Reads `text` as chrono's serde reads a `DateTime<Utc>` (any RFC 3339 offset, converted to
/// UTC), with chrono's error for text it refuses.
pub fn parse_utc(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse_short_form(text) {
        Some(time) => Ok(time),
        None => text.parse::<DateTime<chrono::FixedOffset>>().map(|t| t.with_timezone(&Utc)),
    }
}

/// Reads `text` as chrono's `DateTime::parse_from_rfc3339` does (strict RFC 3339; the agent's
/// reading of a record's time), in UTC.
pub fn parse_rfc3339(text: &str) -> Result<DateTime<Utc>, chrono::ParseError> {
    match parse_short_form(text) {
        Some(time) => Ok(time),
        None => DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)),
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z` with a valid date and time (no leap second): a subset of
/// what chrono reads, read to the same instant.
fn parse_short_form(text: &str) -> Option<DateTime<Utc>> {
    let b = text.as_bytes();
    if b.len() < 20 || b.len() > MAX_LEN || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    if b[16] != b':' || b[b.len() - 1] != b'Z' {
        return None;
    }
    fn number(digits: &[u8]) -> Option<u32> {
        digits.iter().try_fold(0_u32, |n, d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    }
    let nanos = match &b[19..b.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if !fraction.is_empty() => number(fraction)? * 10_u32.pow(9 - fraction.len() as u32),
        _ => return None,
    };
    let date = NaiveDate::from_ymd_opt(number(&b[0..4])? as i32, number(&b[5..7])?, number(&b[8..10])?)?;
    // Refuses `:60` (a leap second is chrono's to read); nine digits stay below one second.
    let time = date.and_hms_nano_opt(number(&b[11..13])?, number(&b[14..16])?, number(&b[17..19])?, nanos)?;
    Some(time.and_utc())
}

/// `#[serde(with = "crate::time::utc")]` for a `DateTime<Utc>`: chrono's serde format, through
/// a short path for the usual form and [`parse_utc`].
pub mod utc {
    use super::*;

    pub fn serialize<S: Serializer>(time: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0_u8; MAX_LEN];
        match short_form(time, &mut buf) {
            // Digits and punctuation only: valid UTF-8.
            Some(len) => serializer.serialize_str(std::str::from_utf8(&buf[..len]).unwrap_or_default()),
            None => serde::Serialize::serialize(time, serializer),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = DateTime<Utc>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // chrono's words, so that errors read as before.
                f.write_str("an RFC 3339 formatted date and time string")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<DateTime<Utc>, E> {
                parse_utc(text).map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn chrono_text(time: &DateTime<Utc>) -> String {
        serde_json::to_string(time).unwrap()
    }

    fn our_text(time: &DateTime<Utc>) -> String {
        serde_json::to_string(&Wrapped(*time)).unwrap()
    }

    /// What chrono's serde reads of `text` (as [`parse_utc`] must), or its error's text.
    fn chrono_reads(text: &str) -> Result<DateTime<Utc>, String> {
        text.parse::<DateTime<chrono::FixedOffset>>().map(|t| t.to_utc()).map_err(|e| e.to_string())
    }

    #[test]
    fn the_short_path_and_chrono_agree_at_the_edges() {
        for text in [
            "2026-12-04T01:26:37.564Z",
            "2026-12-04T01:26:37Z",
            "2026-12-04T01:26:37.000564Z",
            "2026-12-04T01:26:37.000000564Z",
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "2024-02-29T12:00:00.5Z",
        ] {
            let time = parse_utc(text).unwrap();
            assert_eq!(Some(time), text.parse::<DateTime<Utc>>().ok(), "{text}");
            assert_eq!(our_text(&time), chrono_text(&time), "{text}");
        }
        // Left to chrono: a leap second, other offsets, lower case, a long fraction, far years.
        for text in [
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-12-04T02:26:37+01:00",
            "2026-12-04t01:26:37z",
            "2026-12-04T01:26:37.1234567891Z",
            "+12026-12-04T01:26:37Z",
        ] {
            let ours = parse_utc(text).map_err(|e| e.to_string());
            assert_eq!(ours, chrono_reads(text), "{text}");
        }
        // Refused as chrono refuses, with its message.
        for text in ["2026-02-30T00:00:00Z", "2026-12-04T24:00:00Z", "2026-12-04T01:26:37.Z", "2026-12-04 01:26:37"] {
            let ours = parse_utc(text).map_err(|e| e.to_string());
            assert_eq!(ours, chrono_reads(text), "{text}");
            assert!(ours.is_err(), "{text}");
        }
        let leap = parse_utc("2016-12-31T23:59:60.25Z").unwrap();
        assert_eq!(our_text(&leap), chrono_text(&leap));
    }

    #[test]
    fn serde_errors_read_as_chronos() {
        #[derive(serde::Deserialize, Debug)]
        struct Ours(
            #[serde(with = "utc")]
            #[allow(dead_code)]
            DateTime<Utc>,
        );
        #[derive(serde::Deserialize, Debug)]
        struct Chronos(#[allow(dead_code)] DateTime<Utc>);
        for json in ["\"2026-13-01T00:00:00Z\"", "17", "\"\"", "null"] {
            let ours = serde_json::from_str::<Ours>(json).unwrap_err().to_string();
            let chronos = serde_json::from_str::<Chronos>(json).unwrap_err().to_string();
            assert_eq!(ours, chronos, "{json}");
        }
    }

    proptest! {
        /// Any time chrono can hold is written as chrono writes it, and read back to itself.
        #[test]
        fn writes_and_reads_as_chrono(secs in -62_167_219_200_i64..253_402_300_800, nanos in 0_u32..1_000_000_000, trim in 0_u32..4) {
            // Whole milli- and microseconds as often as odd nanoseconds.
            let nanos = match trim { 0 => 0, 1 => nanos / 1_000_000 * 1_000_000, 2 => nanos / 1_000 * 1_000, _ => nanos };
            let time = DateTime::from_timestamp(secs, nanos).unwrap();
            let json = our_text(&time);
            prop_assert_eq!(&json, &chrono_text(&time));
            prop_assert_eq!(parse_utc(json.trim_matches('"')), Ok(time));
        }

        /// Text close to the short form is read exactly as chrono reads it, or refused as
        /// chrono refuses it.
        #[test]
        fn reads_as_chrono(
            y in 0_u32..10_000, mo in 0_u32..14, d in 0_u32..33, h in 0_u32..26, mi in 0_u32..62, s in 0_u32..62,
            fraction in "(\\.[0-9]{0,11})?", end in "[Zz]|\\+00:00|-01:30|",
        ) {
            let text = format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}{fraction}{end}");
            let ours = parse_utc(&text).map_err(|e| e.to_string());
            prop_assert_eq!(ours, chrono_reads(&text), "{}", text);
            let strict = parse_rfc3339(&text).map_err(|e| e.to_string());
            let chrono = DateTime::parse_from_rfc3339(&text).map(|t| t.to_utc()).map_err(|e| e.to_string());
            prop_assert_eq!(strict, chrono, "{}", text);
        }
    }

    #[derive(serde::Serialize)]
    struct Wrapped(#[serde(with = "utc")] DateTime<Utc>);
}
