//! Conformance of `tweet_text` with twitter-text's official test vectors.
//!
//! `tests/fixtures/twitter-text-validate.yml` is twitter-text's
//! `conformance/validate.yml`. The section checked here,
//! `WeightedTweetsWithDiscountedEmojiCounterTest`, is the one for
//! configuration v3 (the counting X uses today). Every case runs and all
//! mismatches are reported together, so one failure doesn't hide another.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use messaging_domain::tweet_text::{is_valid_tweet, weighted_length};
use serde::Deserialize;

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/twitter-text-validate.yml"
);

#[derive(Deserialize)]
struct Fixture {
    tests: Sections,
}

#[derive(Deserialize)]
struct Sections {
    #[serde(rename = "WeightedTweetsWithDiscountedEmojiCounterTest")]
    weighted_with_discounted_emoji: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    description: String,
    text: String,
    expected: Expected,
}

// Only what the module promises is compared: the display/valid index ranges
// and the permillage are UI helpers the module doesn't provide.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Expected {
    weighted_length: usize,
    valid: bool,
}

#[test]
fn weighted_tweets_with_discounted_emoji() {
    let yaml = std::fs::read_to_string(FIXTURE)
        .unwrap_or_else(|error| panic!("cannot read {FIXTURE}: {error}"));
    let fixture: Fixture = serde_yaml::from_str(&yaml)
        .unwrap_or_else(|error| panic!("cannot parse {FIXTURE}: {error}"));
    let cases = fixture.tests.weighted_with_discounted_emoji;
    assert!(!cases.is_empty(), "no case found in {FIXTURE}");

    let mut mismatches = Vec::new();
    for case in &cases {
        let length = weighted_length(&case.text);
        let valid = is_valid_tweet(&case.text);
        if length != case.expected.weighted_length || valid != case.expected.valid {
            mismatches.push(format!(
                "{:?}: weighted length {length} (expected {}), valid {valid} (expected {})",
                case.description, case.expected.weighted_length, case.expected.valid
            ));
        }
    }

    let passed = cases.len() - mismatches.len();
    println!(
        "twitter-text conformance: {passed}/{} cases pass",
        cases.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} cases fail:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
}
