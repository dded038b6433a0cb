//! Support for ActiDash's end-to-end tests and demo: a realistic data generator with an
//! independent reference of the expected metrics ([`generator`]), and a harness that runs the
//! real binaries as processes ([`harness`]).

pub mod dataset;
pub mod generator;
pub mod harness;
pub mod reference;

/// The Kafka bootstrap servers the test script started, if any.
///
/// Tests that need Kafka call this: without `ACTIDASH_KAFKA_BOOTSTRAP` they are skipped with a
/// message, unless `ACTIDASH_REQUIRE_SERVICES=1` (set by `scripts/test.sh`), where a missing
/// broker is an error: the suite never passes by skipping silently.
pub fn kafka_bootstrap(test: &str) -> Option<String> {
    match std::env::var("ACTIDASH_KAFKA_BOOTSTRAP") {
        Ok(b) if !b.is_empty() => Some(b),
        _ => {
            assert!(
                std::env::var("ACTIDASH_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "{test}: ACTIDASH_KAFKA_BOOTSTRAP is not set but ACTIDASH_REQUIRE_SERVICES=1; start Kafka with scripts/kafka.sh"
            );
            eprintln!("{test}: skipped: no Kafka (run scripts/test.sh, which starts one)");
            None
        }
    }
}
