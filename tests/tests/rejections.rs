//! Rejections: one test per reason code of `events.md`, and a corpus of bad input after which the engine's state
//! is exactly what it was before.

use vigil_engine::{Config, Engine};
use vigil_model::{Offset, Reason, Trigger, parse_line};
use vigil_tests::replay_text;

const SETUP: &[&str] = &[
    r#"{"type":"asset","asset":"BTC","haircut":"0.1"}"#,
    r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"max_notional":"50000","imr":"0.02","mmr":"0.01"},{"imr":"0.1","mmr":"0.05"}]}"#,
    r#"{"type":"perp","symbol":"ETH-PERP","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
    r#"{"type":"perp","symbol":"SOL-PERP","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
    r#"{"type":"future","symbol":"BTC-FUT","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2027-03-26T08:00:00Z"}"#,
    r#"{"type":"future","symbol":"OLD-FUT","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2026-01-01T00:00:00Z"}"#,
    r#"{"type":"option","symbol":"BTC-C","underlying":"BTC","right":"call","strike":"70000","expiry":"2027-03-26T08:00:00Z"}"#,
    r#"{"type":"price","symbol":"BTC","price":"60000"}"#,
    r#"{"type":"price","symbol":"BTC-PERP","price":"60000"}"#,
    r#"{"type":"price","symbol":"ETH-PERP","price":"3000"}"#,
    r#"{"type":"price","symbol":"BTC-FUT","price":"60100"}"#,
    r#"{"type":"price","symbol":"BTC-C","price":"600"}"#,
    r#"{"type":"settle","symbol":"OLD-FUT","price":"1"}"#,
    r#"{"type":"deposit","account":"alice","asset":"USDC","amount":"10000"}"#,
    r#"{"type":"deposit","account":"alice","asset":"BTC","amount":"0.5"}"#,
    r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"1","price":"60000"}"#,
    r#"{"type":"deposit","account":"bob","asset":"USDC","amount":"1000"}"#,
    r#"{"type":"transfer","account":"bob","symbol":"ETH-PERP","amount":"500"}"#,
    r#"{"type":"trade","account":"bob","symbol":"ETH-PERP","side":"sell","qty":"1","price":"3000","margin_mode":"isolated"}"#,
    r#"{"type":"deposit","account":"dave","asset":"USDC","amount":"1000"}"#,
    r#"{"type":"trade","account":"dave","symbol":"ETH-PERP","side":"buy","qty":"0.2","price":"3000"}"#,
    // Contract v2: the clock, a perp whose underlying has no index yet, a portfolio account, and hank, whose long
    // BTC-PERP carries IM 6 000 under standard margin and 9 600 under portfolio margin (a 16% move), on 7 000.
    r#"{"type":"clock","time":"2026-12-01T00:00:00Z"}"#,
    r#"{"type":"asset","asset":"SOL"}"#,
    r#"{"type":"perp","symbol":"SOLX-PERP","underlying":"SOL","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
    r#"{"type":"price","symbol":"SOLX-PERP","price":"150"}"#,
    r#"{"type":"deposit","account":"erin","asset":"USDC","amount":"1000"}"#,
    r#"{"type":"account_config","account":"erin","margin":"portfolio"}"#,
    r#"{"type":"deposit","account":"frank","asset":"USDC","amount":"1000"}"#,
    r#"{"type":"trade","account":"frank","symbol":"SOLX-PERP","side":"buy","qty":"1","price":"150"}"#,
    r#"{"type":"deposit","account":"hank","asset":"USDC","amount":"7000"}"#,
    r#"{"type":"trade","account":"hank","symbol":"BTC-PERP","side":"buy","qty":"1","price":"60000"}"#,
];

fn setup() -> Engine {
    let mut engine = Engine::new(&Config::default());
    let mut triggers = Vec::new();
    for (i, line) in SETUP.iter().enumerate() {
        let event = parse_line(line).unwrap_or_else(|e| panic!("setup line {i}: {e}"));
        engine.apply(Offset(i as u64 + 1), &event, &mut triggers).unwrap_or_else(|e| panic!("setup line {i}: {e}"));
    }
    assert!(triggers.is_empty());
    engine
}

/// The engine's whole state, less the offset (which a rejected event still consumes).
fn state(engine: &Engine) -> String {
    let s = format!("{engine:?}");
    match s.find("offset: Offset(") {
        Some(i) => s[..i].to_owned(),
        None => s,
    }
}

/// Applies `line` on a fresh setup and asserts it is rejected with `reason` and changes nothing.
fn check(line: &str, reason: Reason) {
    let mut engine = setup();
    let before = state(&engine);
    let views = engine.views();
    let mut triggers: Vec<Trigger> = Vec::new();
    let got = match parse_line(line) {
        Err(r) => r,
        Ok(event) => match engine.apply(Offset(1000), &event, &mut triggers) {
            Ok(()) => panic!("accepted: {line}"),
            Err(r) => r,
        },
    };
    assert_eq!(got.reason, reason, "{line}: {}", got.message);
    assert!(!got.message.is_empty());
    assert!(triggers.is_empty(), "{line}");
    assert_eq!(engine.views(), views, "{line}");
    assert_eq!(state(&engine), before, "{line}");
}

#[test]
fn invalid_event() {
    // Proves shape errors, including an isolated option fill, are `invalid_event`.
    check(r#"{"type":"teleport"}"#, Reason::InvalidEvent);
    check(
        r#"{"type":"trade","account":"alice","symbol":"BTC-C","side":"sell","qty":"1","price":"600","margin_mode":"isolated"}"#,
        Reason::InvalidEvent,
    );
}

#[test]
fn contract_v2_refusals() {
    // Proves each refusal of the v2 events (`portfolio-margin.md`): shapes, references, names and state, in that
    // order, each leaving the state as it was.
    check(r#"{"type":"clock","time":"2026-11-30T23:59:59.999Z"}"#, Reason::ClockRegression);
    for shape in [
        r#"{"type":"clock","time":"2026-02-30T00:00:00Z"}"#,
        r#"{"type":"clock","time":"2026-12-02 00:00:00"}"#,
        r#"{"type":"risk","underlying":"BTC","buckets":"4"}"#,
        r#"{"type":"risk","underlying":"BTC","buckets":0}"#,
        r#"{"type":"risk","underlying":"BTC","buckets":21}"#,
        r#"{"type":"risk","underlying":"BTC","buckets":2.5}"#,
        r#"{"type":"risk","underlying":"BTC","spread":"0.1"}"#,
        r#"{"type":"account_config","account":"alice","margin":"spicy"}"#,
        r#"{"type":"option","symbol":"Z","underlying":"BTC","right":"put","strike":"1","expiry":"2027-03-26"}"#,
    ] {
        check(shape, Reason::InvalidEvent);
    }
    check(r#"{"type":"risk","underlying":"BTC","price_range":"0.1.5"}"#, Reason::InvalidNumber);
    for reference in [
        r#"{"type":"risk","underlying":"BTC","mm_factor":"0"}"#,
        r#"{"type":"risk","underlying":"BTC","vol_up":"10.1"}"#,
        r#"{"type":"risk","underlying":"BTC","price_range":"-0.1"}"#,
        r#"{"type":"risk","underlying":"BTC-PERP"}"#,
        r#"{"type":"risk","underlying":"USDC"}"#,
        // A perp's underlying is fixed at its first declaration.
        r#"{"type":"perp","symbol":"ETH-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
        r#"{"type":"perp","symbol":"SOLX-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
    ] {
        check(reference, Reason::InvalidReference);
    }
    check(r#"{"type":"risk","underlying":"DOGE"}"#, Reason::UnknownAsset);
    check(r#"{"type":"account_config","account":"nobody","margin":"portfolio"}"#, Reason::UnknownAccount);
    // SOL has no index price: frank cannot switch, erin (portfolio) cannot trade SOLX-PERP.
    check(r#"{"type":"account_config","account":"frank","margin":"portfolio"}"#, Reason::NoPrice);
    check(
        r#"{"type":"trade","account":"erin","symbol":"SOLX-PERP","side":"buy","qty":"1","price":"150"}"#,
        Reason::NoPrice,
    );
    check(r#"{"type":"account_config","account":"hank","margin":"portfolio"}"#, Reason::InsufficientMargin);
}

#[test]
fn liquidation_refusals() {
    // Proves each refusal of the liquidation events (`liquidation.md`): a liquidation fill must reduce an open perp
    // or future position without flipping it (`invalid_reference`, options too), names and modes as any fill; the
    // fund's events' numbers; each leaving the state as it was.
    for not_reducing in [
        r#"{"type":"trade","account":"alice","symbol":"BTC-C","side":"sell","qty":"1","price":"600","liquidation":true}"#,
        r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"1","price":"60000","liquidation":true}"#,
        r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"sell","qty":"1.5","price":"60000","liquidation":true}"#,
        r#"{"type":"trade","account":"dave","symbol":"BTC-PERP","side":"sell","qty":"1","price":"60000","liquidation":true}"#,
        r#"{"type":"trade","account":"nobody","symbol":"BTC-PERP","side":"sell","qty":"1","price":"60000","liquidation":true}"#,
    ] {
        check(not_reducing, Reason::InvalidReference);
    }
    check(
        r#"{"type":"trade","account":"alice","symbol":"DOGE-PERP","side":"sell","qty":"1","price":"1","liquidation":true}"#,
        Reason::UnknownSymbol,
    );
    check(
        r#"{"type":"trade","account":"bob","symbol":"ETH-PERP","side":"buy","qty":"1","price":"3000","liquidation":true}"#,
        Reason::ModeMismatch,
    );
    for shape in [
        r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"sell","qty":"1","price":"60000","liquidation":"yes"}"#,
        r#"{"type":"insurance"}"#,
        r#"{"type":"insurance","amount":"1","account":"alice"}"#,
        r#"{"type":"liquidation_params","max_fee":"0.01"}"#,
    ] {
        check(shape, Reason::InvalidEvent);
    }
    for number in [
        r#"{"type":"insurance","amount":"0"}"#,
        r#"{"type":"liquidation_params","max_liquidation_fee":"1.5"}"#,
        r#"{"type":"liquidation_params","max_liquidation_fee":"-0.01"}"#,
    ] {
        check(number, Reason::InvalidNumber);
    }
    // The fund is the merge's: a withdrawal beyond its positive balance is refused at its offset, in any shard
    // count, and changes nothing.
    let lines = [
        r#"{"type":"insurance","amount":"10"}"#,
        r#"{"type":"insurance","amount":"-10.00000001"}"#,
        r#"{"type":"insurance","amount":"-10"}"#,
        r#"{"type":"insurance","amount":"-0.00000001"}"#,
    ];
    for shards in [1, 3] {
        let doc: serde_json::Value = serde_json::from_str(&replay_text(&lines.join("\n"), shards)).unwrap();
        let offsets: Vec<_> = doc["rejections"].as_array().unwrap().iter().map(|r| r["offset"].clone()).collect();
        assert_eq!(offsets, [2, 4], "{doc}");
        assert!(doc["rejections"].as_array().unwrap().iter().all(|r| r["reason"] == "insufficient_balance"));
        assert_eq!(doc["insurance_fund"]["balance"], "0.00000000");
    }
}

#[test]
fn a_portfolio_option_needs_the_clock() {
    // Proves an option in a portfolio account needs a `clock` (its time to expiry), as `no_price`.
    let lines = [
        r#"{"type":"asset","asset":"BTC"}"#,
        r#"{"type":"option","symbol":"C","underlying":"BTC","right":"call","strike":"70000","expiry":"2027-03-26T08:00:00Z"}"#,
        r#"{"type":"price","symbol":"BTC","price":"60000"}"#,
        r#"{"type":"price","symbol":"C","price":"600"}"#,
        r#"{"type":"deposit","account":"a","asset":"USDC","amount":"10000"}"#,
        r#"{"type":"account_config","account":"a","margin":"portfolio"}"#,
        r#"{"type":"trade","account":"a","symbol":"C","side":"buy","qty":"1","price":"600"}"#,
    ];
    let doc: serde_json::Value = serde_json::from_str(&replay_text(&lines.join("\n"), 2)).unwrap();
    let rejections = doc["rejections"].as_array().unwrap();
    assert_eq!(rejections.len(), 1, "{doc}");
    assert_eq!(rejections[0]["offset"], 7);
    assert_eq!(rejections[0]["reason"], "no_price");
}

#[test]
fn invalid_number() {
    // Proves bad decimals and out-of-range values are `invalid_number`.
    check(r#"{"type":"deposit","account":"alice","asset":"USDC","amount":"0.000000001"}"#, Reason::InvalidNumber);
    check(r#"{"type":"funding","symbol":"BTC-PERP","rate":"2"}"#, Reason::InvalidNumber);
    // The balance would leave the representable range.
    let mut engine = setup();
    let mut t = Vec::new();
    let big =
        r#"{"type":"trade","account":"carol","symbol":"ETH-PERP","side":"buy","qty":"92233720368","price":"3000"}"#;
    engine.apply(Offset(100), &parse_line(big).unwrap(), &mut t).unwrap();
    let more = r#"{"type":"trade","account":"carol","symbol":"ETH-PERP","side":"buy","qty":"1","price":"3000"}"#;
    assert_eq!(
        engine.apply(Offset(101), &parse_line(more).unwrap(), &mut t).unwrap_err().reason,
        Reason::InvalidNumber
    );
}

#[test]
fn invalid_reference() {
    // Proves each reference rule: tiers, kind changes, collisions, funding/settle/transfer on the wrong kind.
    for line in [
        r#"{"type":"perp","symbol":"X","tiers":[{"max_notional":"100","imr":"0.1","mmr":"0.05"},{"max_notional":"50","imr":"0.2","mmr":"0.1"}]}"#,
        r#"{"type":"perp","symbol":"X","tiers":[{"imr":"0.05","mmr":"0.1"}]}"#,
        r#"{"type":"future","symbol":"BTC-PERP","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2027-01-01T00:00:00Z"}"#,
        r#"{"type":"option","symbol":"BTC-C","underlying":"BTC","right":"put","strike":"70000","expiry":"2027-03-26T08:00:00Z"}"#,
        r#"{"type":"option","symbol":"Y","underlying":"BTC","right":"put","strike":"1","expiry":"2027-03-26T08:00:00Z","margin":{"mm":"0.5"}}"#,
        r#"{"type":"asset","asset":"BTC-PERP"}"#,
        r#"{"type":"asset","asset":"USDC"}"#,
        r#"{"type":"asset","asset":"ETH","haircut":"1"}"#,
        r#"{"type":"perp","symbol":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
        r#"{"type":"funding","symbol":"BTC-FUT","rate":"0.001"}"#,
        r#"{"type":"settle","symbol":"BTC-PERP","price":"1"}"#,
        r#"{"type":"transfer","account":"alice","symbol":"BTC-C","amount":"1"}"#,
        r#"{"type":"price","symbol":"USDC","price":"1"}"#,
    ] {
        check(line, Reason::InvalidReference);
    }
}

#[test]
fn unknown_names() {
    // Proves undeclared symbols, assets and accounts get their own reasons.
    check(
        r#"{"type":"trade","account":"alice","symbol":"NOPE","side":"buy","qty":"1","price":"1"}"#,
        Reason::UnknownSymbol,
    );
    check(r#"{"type":"price","symbol":"NOPE","price":"1"}"#, Reason::UnknownSymbol);
    check(r#"{"type":"deposit","account":"alice","asset":"DOGE","amount":"1"}"#, Reason::UnknownAsset);
    check(
        r#"{"type":"perp","symbol":"Z","underlying":"DOGE","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
        Reason::UnknownAsset,
    );
    check(r#"{"type":"withdraw","account":"nobody","asset":"USDC","amount":"1"}"#, Reason::UnknownAccount);
    check(r#"{"type":"transfer","account":"nobody","symbol":"BTC-PERP","amount":"1"}"#, Reason::UnknownAccount);
}

#[test]
fn no_price() {
    // Proves fills and funding need a mark (and an option fill its underlying's index).
    check(
        r#"{"type":"trade","account":"alice","symbol":"SOL-PERP","side":"buy","qty":"1","price":"1"}"#,
        Reason::NoPrice,
    );
    check(r#"{"type":"funding","symbol":"SOL-PERP","rate":"0.001"}"#, Reason::NoPrice);
}

#[test]
fn mode_mismatch() {
    // Proves fills in the other mode and transfers against a cross position are refused.
    check(
        r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"1","price":"60000","margin_mode":"isolated"}"#,
        Reason::ModeMismatch,
    );
    check(
        r#"{"type":"trade","account":"bob","symbol":"ETH-PERP","side":"buy","qty":"1","price":"3000"}"#,
        Reason::ModeMismatch,
    );
    check(r#"{"type":"transfer","account":"alice","symbol":"BTC-PERP","amount":"1"}"#, Reason::ModeMismatch);
}

#[test]
fn instrument_settled() {
    // Proves any event on a settled instrument is refused.
    check(
        r#"{"type":"trade","account":"alice","symbol":"OLD-FUT","side":"buy","qty":"1","price":"1"}"#,
        Reason::InstrumentSettled,
    );
    check(r#"{"type":"price","symbol":"OLD-FUT","price":"2"}"#, Reason::InstrumentSettled);
    check(r#"{"type":"settle","symbol":"OLD-FUT","price":"2"}"#, Reason::InstrumentSettled);
}

#[test]
fn insufficient_balance_and_margin() {
    // Proves withdrawals and transfers check the balance first, then initial margin.
    check(
        r#"{"type":"withdraw","account":"alice","asset":"USDC","amount":"10000.00000001"}"#,
        Reason::InsufficientBalance,
    );
    check(r#"{"type":"withdraw","account":"alice","asset":"BTC","amount":"0.6"}"#, Reason::InsufficientBalance);
    check(r#"{"type":"transfer","account":"bob","symbol":"ETH-PERP","amount":"-500.01"}"#, Reason::InsufficientBalance);
    // dave: IM 60 on 0.2 ETH at 3 000; equity 1 000.
    check(r#"{"type":"withdraw","account":"dave","asset":"USDC","amount":"950"}"#, Reason::InsufficientMargin);
    check(r#"{"type":"transfer","account":"dave","symbol":"SOL-PERP","amount":"941"}"#, Reason::InsufficientMargin);
    // bob's isolated short: IM 300, wallet 500.
    check(r#"{"type":"transfer","account":"bob","symbol":"ETH-PERP","amount":"-201"}"#, Reason::InsufficientMargin);
    check(r#"{"type":"transfer","account":"bob","symbol":"BTC-PERP","amount":"501"}"#, Reason::InsufficientBalance);
}

#[test]
fn every_reason_is_covered() {
    // Proves this file exercises every reason code of the contract (it fails if a reason is added untested).
    let src = include_str!("rejections.rs");
    for r in Reason::ALL {
        let name = format!("{r:?}");
        assert!(src.contains(&format!("Reason::{name})")), "no test for {}", r.as_str());
    }
}

#[test]
fn bad_input_corpus_changes_nothing() {
    // Proves malformed JSON, NaN, 1e400, 9 places, non-positive quantities, unknown fields and types are rejected
    // with the right reason and leave the state exactly as it was.
    let corpus: &[(&str, Reason)] = &[
        ("", Reason::InvalidEvent),
        ("{", Reason::InvalidEvent),
        ("null", Reason::InvalidEvent),
        ("\"trade\"", Reason::InvalidEvent),
        ("[]", Reason::InvalidEvent),
        ("{}", Reason::InvalidEvent),
        (r#"{"type":null}"#, Reason::InvalidEvent),
        (r#"{"type":"trade"}"#, Reason::InvalidEvent),
        (r#"{"type":"price","symbol":"BTC","price":"1","price2":"1"}"#, Reason::InvalidEvent),
        (r#"{"type":"price","symbol":["BTC"],"price":"1"}"#, Reason::InvalidEvent),
        (r#"{"type":"price","symbol":"BTC","price":{"v":1}}"#, Reason::InvalidEvent),
        (
            r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"BUY","qty":"1","price":"1"}"#,
            Reason::InvalidEvent,
        ),
        (
            r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"1","price":"1","margin_mode":"portfolio"}"#,
            Reason::InvalidEvent,
        ),
        (r#"{"type":"deposit","account":7,"asset":"USDC","amount":"1"}"#, Reason::InvalidEvent),
        (r#"{"type":"price","symbol":"BTC","price":"NaN"}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":"Infinity"}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":1e400}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":"1e400"}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":"60000.123456789"}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":"-1"}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":""}"#, Reason::InvalidNumber),
        (r#"{"type":"price","symbol":"BTC","price":"1,5"}"#, Reason::InvalidNumber),
        (
            r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"-1","price":"1"}"#,
            Reason::InvalidNumber,
        ),
        (
            r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"0","price":"1"}"#,
            Reason::InvalidNumber,
        ),
        (
            r#"{"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":0.0,"price":"1"}"#,
            Reason::InvalidNumber,
        ),
        (r#"{"type":"deposit","account":"alice","asset":"USDC","amount":"-0"}"#, Reason::InvalidNumber),
        (r#"{"type":"deposit","account":"alice","asset":"USDC","amount":"100000000000"}"#, Reason::InvalidNumber),
    ];
    for (line, reason) in corpus {
        check(line, *reason);
    }
}

#[test]
fn replay_reports_unreadable_lines_and_continues() {
    // Proves invalid UTF-8 and an over-long line become rejections at their offsets, and later events still apply.
    let mut input = Vec::new();
    input.extend_from_slice(b"{\"type\":\"deposit\",\"account\":\"a\",\"asset\":\"USDC\",\"amount\":\"1\"}\n");
    input.extend_from_slice(b"\xff\xfe\n");
    input.extend_from_slice(&vec![b'x'; vigil_node::replay::LINE_BYTES_MAX + 10]);
    input.extend_from_slice(b"\n\n{\"type\":\"deposit\",\"account\":\"a\",\"asset\":\"USDC\",\"amount\":\"2\"}");
    let mut out = Vec::new();
    vigil_node::replay::replay(&input[..], &mut out, &Default::default(), None).unwrap();
    let doc: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(doc["offset"], 4);
    assert_eq!(doc["accounts"][0]["balances"]["USDC"], "3.00000000");
    let rej: Vec<(u64, &str)> = doc["rejections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap(), r["reason"].as_str().unwrap()))
        .collect();
    assert_eq!(rej, vec![(2, "invalid_event"), (3, "invalid_event")]);
    // The same through the text path, with the shard count changed.
    let text = "{\"type\":\"x\"}\n{\"type\":\"deposit\",\"account\":\"a\",\"asset\":\"USDC\",\"amount\":\"2\"}\n";
    assert_eq!(replay_text(text, 1), replay_text(text, 5));
}
