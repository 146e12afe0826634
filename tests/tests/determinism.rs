//! The threaded pipeline against the naive reference model on long random streams: `vigil replay` with 1, 2, 4
//! and 8 shards, rescan and indexed detection, must print exactly the document the reference model produces.

use vigil_engine::{Config, Detection};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::view::{Document, fund_json, write_document};
use vigil_model::{Offset, RejectionRecord, Trigger, parse_line};
use vigil_node::pipeline::Wait;
use vigil_node::replay::{ReplayOptions, replay};
use vigil_testkit::{Reference, Rng, StreamConfig, generate};

/// The replay document of the reference model for `lines`.
fn reference_document(lines: &[String]) -> String {
    let mut reference = Reference::new(vigil_model::QUOTE_DEFAULT);
    let mut triggers: Vec<Trigger> = Vec::new();
    let mut rejections: Vec<RejectionRecord> = Vec::new();
    for line in lines {
        match parse_line(line) {
            Err(r) => {
                let offset = reference.skip();
                rejections.push(RejectionRecord { offset, reason: r.reason, message: r.message });
            }
            Ok(event) => {
                let (offset, result, fired) = reference.apply(&event);
                if let Err(r) = result {
                    rejections.push(RejectionRecord { offset, reason: r.reason, message: r.message });
                }
                triggers.extend(fired);
            }
        }
    }
    let mut out = Vec::new();
    let fund = reference.fund();
    let fund = InsuranceFund { balance: fund.balance, fees: fund.fees, paid: fund.paid, uncovered: fund.uncovered };
    write_document(
        &mut out,
        Document {
            offset: Offset(reference.offset().0),
            accounts: reference.views().iter().map(|v| Ok(v.to_json())),
            triggers: triggers.iter().map(|t| Ok(t.to_json())),
            // Messages are the engine's prose; the reference only names reasons, so compare without them.
            rejections: rejections
                .iter()
                .map(|r| Ok(RejectionRecord { message: String::new(), ..r.clone() }.to_json())),
            insurance_fund: fund_json(&fund),
            liquidations: reference.liquidations().iter().map(|l| Ok(l.to_json())),
        },
    )
    .expect("writing to memory");
    String::from_utf8(out).expect("UTF-8")
}

/// The engine's document with rejection messages blanked, to compare with the reference's.
fn without_messages(doc: &str) -> String {
    let mut v: serde_json::Value = serde_json::from_str(doc).expect("replay prints JSON");
    for r in v["rejections"].as_array_mut().into_iter().flatten() {
        r["message"] = serde_json::Value::String(String::new());
    }
    v.to_string()
}

/// Figures a portfolio group feeds (floating point inside, each side with its own code): compared within
/// `vigil_testkit::compare::TOLERANCE`. Everything else is compared exactly.
const FLOAT_FED: [&str; 6] =
    ["initial_margin", "maintenance_margin", "available", "scanning_risk", "liquidation_price", "bankruptcy_price"];

/// Whether the engine's document matches the reference's: equal, but for the float-fed figures within tolerance.
fn matches(path: &str, got: &serde_json::Value, want: &serde_json::Value) -> Result<(), String> {
    use serde_json::Value;
    match (got, want) {
        (Value::Object(g), Value::Object(w)) => {
            if g.len() != w.len() || g.keys().zip(w.keys()).any(|(a, b)| a != b) {
                return Err(format!(
                    "{path}: keys {:?} vs {:?}",
                    g.keys().collect::<Vec<_>>(),
                    w.keys().collect::<Vec<_>>()
                ));
            }
            for (k, v) in g {
                let p = format!("{path}.{k}");
                match (v, &w[k]) {
                    (Value::String(a), Value::String(b)) if FLOAT_FED.contains(&k.as_str()) && a != b => {
                        let raw = |s: &str| vigil_model::Amount::parse(s).map(|x| x.0);
                        match (raw(a), raw(b)) {
                            (Ok(x), Ok(y)) if (x - y).abs() <= vigil_testkit::compare::TOLERANCE => {}
                            _ => return Err(format!("{p}: {a} vs {b}")),
                        }
                    }
                    // The worst scenario of a group whose losses are all about zero is float noise (see
                    // `vigil_testkit::compare`): compared only from a scanning risk of 1e-3.
                    (Value::Object(_), _) if k == "worst" && near_zero(&g["scanning_risk"]) => {}
                    (a, b) => matches(&p, a, b)?,
                }
            }
            Ok(())
        }
        (Value::Array(g), Value::Array(w)) => {
            if g.len() != w.len() {
                return Err(format!("{path}: {} elements vs {}", g.len(), w.len()));
            }
            g.iter().zip(w).enumerate().try_for_each(|(i, (a, b))| matches(&format!("{path}[{i}]"), a, b))
        }
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: {a} vs {b}")),
    }
}

fn near_zero(v: &serde_json::Value) -> bool {
    v.as_str().and_then(|s| vigil_model::Amount::parse(s).ok()).is_some_and(|a| a.0 < 100_000)
}

fn replay_threaded(input: &str, shards: usize, detection: Detection) -> String {
    let options = ReplayOptions { shards, config: Config { detection, ..Config::default() }, wait: Wait::Park };
    let mut out = Vec::new();
    replay(input.as_bytes(), &mut out, &options, None).expect("replay");
    String::from_utf8(out).expect("UTF-8")
}

#[test]
fn threaded_replay_equals_reference_for_every_shard_count_and_detection() {
    // Proves byte-identical output for 1/2/4/8 shards × rescan/indexed, equal to the reference model's document.
    let streams: u64 = std::env::var("VIGIL_DETERMINISM_STREAMS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let mut triggers = 0usize;
    let mut liquidations = 0usize;
    for seed in 0..streams {
        let mut rng = Rng::new(seed ^ 0xdead_beef);
        let config = StreamConfig {
            seed: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            events: 10_000,
            accounts: 8 + rng.below(24) as usize,
            bad_percent: 1 + rng.below(4),
            // Half the streams carry contract v2 events (portfolio accounts, clocks, risk changes).
            portfolio_percent: if seed % 2 == 1 { 2 + rng.below(4) } else { 0 },
            // A third carry liquidation fills (at, above and below bankruptcy) and fund events.
            liquidation_percent: if seed % 3 == 2 { 1 + rng.below(4) } else { 0 },
        };
        let lines = generate(&config);
        let input = lines.join("\n");
        let expected = reference_document(&lines);
        let expected_json: serde_json::Value = serde_json::from_str(&expected).expect("reference JSON");
        triggers += expected_json["triggers"].as_array().map_or(0, Vec::len);
        liquidations += expected_json["liquidations"].as_array().map_or(0, Vec::len);
        let mut first: Option<String> = None;
        for detection in [Detection::Rescan, Detection::Indexed] {
            for shards in [1, 2, 4, 8] {
                let doc = replay_threaded(&input, shards, detection);
                match &first {
                    None => {
                        let got: serde_json::Value = serde_json::from_str(&without_messages(&doc)).expect("JSON");
                        if let Err(e) = matches("", &got, &expected_json) {
                            panic!("seed {seed}: {shards} shards {detection:?} differs from the reference: {e}");
                        }
                        first = Some(doc);
                    }
                    Some(f) => assert!(f == &doc, "seed {seed}: {shards} shards {detection:?} is not byte-identical"),
                }
            }
        }
    }
    assert!(triggers as u64 >= streams, "the streams fired only {triggers} triggers");
    assert!(liquidations as u64 >= streams / 10, "the streams held only {liquidations} liquidation fills");
}

#[test]
fn liquidation_cases_equal_the_reference_for_every_shard_count_and_detection() {
    // Proves the liquidation cases (fills at, above and below the bankruptcy price, a fund paying, running dry and
    // refusing a withdrawal) print, with 1/3 shards × rescan/indexed, the reference model's document (which states
    // the rule without simplifying it).
    for case in ["liq_dydx_fund_pays", "liq_dydx_empty_fund", "liq_eth_partial_close"] {
        let input = std::fs::read_to_string(vigil_tests::data_dir().join("cases").join(format!("{case}.jsonl")))
            .expect("case stream");
        let lines: Vec<String> = input.lines().map(str::to_owned).collect();
        let expected: serde_json::Value = serde_json::from_str(&reference_document(&lines)).expect("reference JSON");
        assert!(!expected["liquidations"].as_array().expect("liquidations").is_empty(), "{case}");
        for detection in [Detection::Rescan, Detection::Indexed] {
            for shards in [1, 3] {
                let doc = replay_threaded(&input, shards, detection);
                let got: serde_json::Value = serde_json::from_str(&without_messages(&doc)).expect("JSON");
                if let Err(e) = matches("", &got, &expected) {
                    panic!("{case}: {shards} shards {detection:?} differs from the reference: {e}");
                }
            }
        }
    }
}
