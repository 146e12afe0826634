//! Stress tests (`portfolio-margin.md`, "Stress tests"): a worked example with every figure by hand, the refusals,
//! and random books checked three ways: the answer is the same for every shard count; it equals what the naive
//! reference model says after the scenario's moved prices are replayed into it as price events; and every account's
//! figures in the pass are those of a fresh evaluation (the pass's shortcuts change nothing).

use vigil_engine::stress::{Grid, Part, Request, Scenario, merge_shards, shock};
use vigil_engine::{Config, Sharded};
use vigil_model::{Amount, MarginMode, Offset, Price, parse_line};
use vigil_node::stress::{parse_request, run};
use vigil_testkit::{Reference, StreamConfig, generate};

fn book(lines: &[String], shards: usize) -> Sharded {
    let mut sharded = Sharded::new(&Config::default(), shards);
    let mut triggers = Vec::new();
    for line in lines {
        match parse_line(line) {
            Ok(event) => {
                let _ = sharded.apply(&event, &mut triggers);
            }
            Err(_) => {
                sharded.next_offset();
            }
        }
    }
    sharded
}

fn stress(lines: &[String], shards: usize, request: &Request) -> vigil_node::stress::Report {
    let mut sharded = book(lines, shards);
    let offset = sharded.offset();
    run(sharded.shards_mut(), offset, request, false).expect("the scenario is valid")
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

fn amount(s: &str) -> Amount {
    Amount::parse(s).expect("a decimal")
}

const WORKED: &str = r#"
    {"type":"asset","asset":"BTC","haircut":"0.1"}
    {"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}
    {"type":"price","symbol":"BTC","price":"100"}
    {"type":"price","symbol":"BTC-PERP","price":"100"}
    {"type":"deposit","account":"alice","asset":"USDC","amount":"100"}
    {"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"10","price":"100"}
    {"type":"deposit","account":"bob","asset":"USDC","amount":"1000"}
    {"type":"trade","account":"bob","symbol":"BTC-PERP","side":"sell","qty":"10","price":"100"}
    {"type":"deposit","account":"carol","asset":"BTC","amount":"10"}
    {"type":"deposit","account":"dave","asset":"USDC","amount":"30"}
    {"type":"transfer","account":"dave","symbol":"BTC-PERP","amount":"15"}
    {"type":"trade","account":"dave","symbol":"BTC-PERP","side":"buy","qty":"1","price":"100","margin_mode":"isolated"}
"#;

#[test]
fn a_crash_by_hand() {
    // Proves every figure of a scenario on a book small enough to compute by hand, for 1 and 3 shards:
    // BTC −20% takes the index and the perp's mark to 80.
    // - alice (long 10, equity 100): 100 + 10 × (80 − 100) = −100; MM 10 × 80 × 0.05 = 40: liquidatable, bankrupt.
    // - bob (short 10, 1 000): 1 200, MM 40: fine, gains 200.
    // - carol (10 BTC collateral, haircut 0.1): 900 → 720, a loss of 180, no position.
    // - dave: an isolated long of 1 with a wallet of 15: 15 − 20 = −5 (MM 4): liquidatable, bankrupt; his cross
    //   unit (15 left) is fine.
    // Shortfall 100 + 5; loss on BTC 200 + 180 + 20, gain 200; top: alice 200, carol 180, dave 20.
    let request = parse_request(br#"{"scenarios":[{"name":"crash","moves":{"BTC":"-0.2"}}],"top":3}"#).unwrap();
    for shards in [1, 3] {
        let report = stress(&lines(WORKED), shards, &request);
        assert_eq!(report.offset, Offset(12));
        let now = &report.result.now;
        assert_eq!((now.accounts, now.liquidatable, now.bankrupt, now.shortfall), (4, 0, 0, Amount::ZERO));
        let p = &report.result.scenarios[0];
        assert_eq!((p.liquidatable, p.newly_liquidatable, p.bankrupt), (2, 2, 2), "{shards} shards");
        assert_eq!(p.shortfall, amount("105"));
        assert_eq!(p.assets.len(), 1);
        assert_eq!(
            (p.assets[0].asset.as_str(), p.assets[0].loss, p.assets[0].gain),
            ("BTC", amount("400"), amount("200"))
        );
        let top: Vec<(&str, Amount)> = p.top.iter().map(|t| (t.account.as_str(), t.loss)).collect();
        assert_eq!(top, [("alice", amount("200")), ("carol", amount("180")), ("dave", amount("20"))]);
        assert_eq!(p.top[0].after.equity, amount("-100"));
        assert_eq!(p.top[0].after.maintenance_margin, amount("40"));
        assert_eq!(p.top[0].before.maintenance_margin, amount("50"));
        let json = report.to_json();
        assert_eq!(json["scenarios"][0]["shortfall"], "105.00000000");
        assert_eq!(json["scenarios"][0]["moves"]["BTC"], "-0.20000000");
        assert!(json["insurance_fund"].is_null());
    }
}

#[test]
fn an_equity_at_the_margin_is_told_by_the_rounded_margins() {
    // Proves the pass's margin bound (it sums unrounded margins instead of rounding each) hands a unit it cannot
    // tell to the exact figures, on both sides. BTC and ETH −10% take both perps from 100 to 90; each position of
    // 0.33333339 loses 3.3333339 and its MM is 0.33333339 × 90 × 0.01 = 0.300000051, rounded up to 0.30000006.
    // - even: one position, equity 3.63333396 − 3.3333339 = 0.30000006 = MM: not liquidatable (the bound's band
    //   is [0.300000051, 1.300000051): it cannot tell).
    // - under: two positions, equity 7.26666791 − 6.6666678 = 0.60000011 against MM 2 × 0.30000006 = 0.60000012:
    //   liquidatable, though the unrounded sum 0.600000102 is below the equity.
    let book = r#"
        {"type":"asset","asset":"BTC","haircut":"0.1"}
        {"type":"asset","asset":"ETH","haircut":"0.1"}
        {"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.02","mmr":"0.01"}]}
        {"type":"perp","symbol":"ETH-PERP","underlying":"ETH","tiers":[{"imr":"0.02","mmr":"0.01"}]}
        {"type":"price","symbol":"BTC","price":"100"}
        {"type":"price","symbol":"ETH","price":"100"}
        {"type":"price","symbol":"BTC-PERP","price":"100"}
        {"type":"price","symbol":"ETH-PERP","price":"100"}
        {"type":"deposit","account":"even","asset":"USDC","amount":"3.63333396"}
        {"type":"trade","account":"even","symbol":"BTC-PERP","side":"buy","qty":"0.33333339","price":"100"}
        {"type":"deposit","account":"under","asset":"USDC","amount":"7.26666791"}
        {"type":"trade","account":"under","symbol":"BTC-PERP","side":"buy","qty":"0.33333339","price":"100"}
        {"type":"trade","account":"under","symbol":"ETH-PERP","side":"buy","qty":"0.33333339","price":"100"}
    "#;
    let request =
        parse_request(br#"{"scenarios":[{"name":"dip","moves":{"BTC":"-0.1","ETH":"-0.1"}}],"top":2}"#).unwrap();
    for shards in [1, 2] {
        let report = stress(&lines(book), shards, &request);
        assert_eq!(report.result.now.liquidatable, 0);
        let p = &report.result.scenarios[0];
        assert_eq!((p.liquidatable, p.newly_liquidatable, p.bankrupt), (1, 1, 0), "{shards} shards");
        let after: Vec<(&str, Amount, Amount)> =
            p.top.iter().map(|t| (t.account.as_str(), t.after.equity, t.after.maintenance_margin)).collect();
        assert_eq!(
            after,
            [
                ("under", amount("0.60000011"), amount("0.60000012")),
                ("even", amount("0.30000006"), amount("0.30000006"))
            ],
            "{shards} shards"
        );
    }
}

#[test]
fn an_assets_loss_is_the_change_in_its_rounded_values_under_either_margin_model() {
    // Proves `loss_by_asset` sums each term's value after less its value now, both rounded as values are, for a
    // portfolio account as for a standard one. A long 0.5 BTC-PERP bought at 100, marked at 100.00000003: its value
    // is 0.000000015 → 0.00000001 (rounded down). BTC −20% moves the mark to 80.000000024 → 80.00000002, where the
    // value is −9.99999999 exactly: a loss of 10.00000000. (The move alone, 0.5 × −20.00000001 = −10.000000005,
    // rounds to −10.00000001: the figure a portfolio account reported before, a unit of 1e-8 apart.)
    let book = |model: &str| {
        let mut text = String::from(
            r#"
            {"type":"asset","asset":"BTC","haircut":"0.1"}
            {"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}
            {"type":"price","symbol":"BTC","price":"100"}
            {"type":"price","symbol":"BTC-PERP","price":"100"}
            {"type":"deposit","account":"alice","asset":"USDC","amount":"100"}
        "#,
        );
        if model == "portfolio" {
            text.push_str(r#"{"type":"account_config","account":"alice","margin":"portfolio"}"#);
            text.push('\n');
        }
        text.push_str(
            r#"
            {"type":"trade","account":"alice","symbol":"BTC-PERP","side":"buy","qty":"0.5","price":"100"}
            {"type":"price","symbol":"BTC-PERP","price":"100.00000003"}
        "#,
        );
        lines(&text)
    };
    let request = parse_request(br#"{"scenarios":[{"moves":{"BTC":"-0.2"}}],"top":1}"#).unwrap();
    for model in ["standard", "portfolio"] {
        for shards in [1, 2] {
            let report = stress(&book(model), shards, &request);
            let p = &report.result.scenarios[0];
            assert_eq!(
                (p.assets[0].asset.as_str(), p.assets[0].loss, p.assets[0].gain),
                ("BTC", amount("10"), Amount::ZERO),
                "{model}, {shards} shards"
            );
            assert_eq!(p.top[0].loss, amount("10"), "{model}, {shards} shards");
        }
    }
}

#[test]
fn a_grid_gives_the_loss_curve() {
    // Proves a grid runs one scenario per step (from, to and the steps between, exactly), and that the curve's
    // shortfall grows as BTC falls: at +0.2 nobody is short, at −0.4 alice and dave are deeper under water.
    let request =
        parse_request(br#"{"grids":[{"underlying":"BTC","from":"-0.4","to":"0.2","steps":4}],"top":0}"#).unwrap();
    let report = stress(&lines(WORKED), 2, &request);
    let json = report.to_json();
    let curve = json["grids"][0]["curve"].as_array().unwrap();
    let moves: Vec<&str> = curve.iter().map(|p| p["move"].as_str().unwrap()).collect();
    assert_eq!(moves, ["-0.40000000", "-0.20000000", "0.00000000", "0.20000000"]);
    let shortfall: Vec<&str> = curve.iter().map(|p| p["shortfall"].as_str().unwrap()).collect();
    // −0.4: alice 100 − 400 = −300, dave 15 − 40 = −25.
    assert_eq!(shortfall, ["325.00000000", "105.00000000", "0.00000000", "0.00000000"]);
    // +0.2: bob, short 10, 1 000 − 200 = 800 ≥ MM 60: not liquidatable.
    assert_eq!(curve[3]["liquidatable"], 0);
    assert!(json["scenarios"].as_array().unwrap().is_empty());
}

#[test]
fn refusals_name_the_problem_and_compute_nothing() {
    // Proves each refusal: an unknown asset, the quote, an instrument, a move of −100% or below, an empty request,
    // a malformed number, an unknown field, a grid with no steps, and an option repriced before any clock.
    let book_lines = lines(WORKED);
    let refused = |body: &str| {
        let request = match parse_request(body.as_bytes()) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let mut sharded = book(&book_lines, 2);
        let offset = sharded.offset();
        match run(sharded.shards_mut(), offset, &request, false) {
            Ok(_) => panic!("{body} was not refused"),
            Err(e) => e,
        }
    };
    let cases = [
        (r#"{"scenarios":[{"moves":{"DOGE":"-0.1"}}]}"#, "unknown_asset", "DOGE"),
        (r#"{"scenarios":[{"moves":{"USDC":"-0.1"}}]}"#, "invalid_scenario", "quote"),
        (r#"{"scenarios":[{"moves":{"BTC-PERP":"-0.1"}}]}"#, "invalid_scenario", "instrument"),
        (r#"{"scenarios":[{"moves":{"BTC":"-1"}}]}"#, "invalid_scenario", "above -1"),
        (r#"{"scenarios":[]}"#, "invalid_scenario", "at least one"),
        (r#"{"scenarios":[{"moves":{"BTC":"-0.1x"}}]}"#, "invalid_scenario", "not a decimal"),
        (r#"{"scenarios":[{"moves":{"BTC":"-0.1"}}],"extra":1}"#, "invalid_scenario", "unknown field"),
        (r#"{"grids":[{"underlying":"BTC","from":"-0.1","to":"0.1","steps":0}]}"#, "invalid_scenario", "steps"),
        (r#"{"scenarios":[{"moves":{"BTC":"0.1"}}],"top":100000}"#, "invalid_scenario", "top"),
    ];
    for (body, code, words) in cases {
        let e = refused(body);
        assert_eq!(e.code, code, "{body}: {e}");
        assert!(e.message.contains(words), "{body}: {e}");
    }
    // An option on BTC without a clock: moving BTC needs its time to expiry.
    let mut with_option = book_lines.clone();
    with_option.push(
        r#"{"type":"option","symbol":"BTC-C","underlying":"BTC","right":"call","strike":"120","expiry":"2027-03-26T08:00:00Z"}"#
            .into(),
    );
    with_option.push(r#"{"type":"price","symbol":"BTC-C","price":"5"}"#.into());
    let request = parse_request(br#"{"scenarios":[{"moves":{"BTC":"-0.1"}}]}"#).unwrap();
    let mut sharded = book(&with_option, 1);
    let e = run(sharded.shards_mut(), Offset(0), &request, false).err().expect("refused");
    assert_eq!(e.code, "no_price", "{e}");
    assert!(e.message.contains("BTC-C") && e.message.contains("clock"), "{e}");
    // With a clock, the same scenario runs.
    with_option.push(r#"{"type":"clock","time":"2026-12-02T08:00:00Z"}"#.into());
    let mut sharded = book(&with_option, 1);
    assert!(run(sharded.shards_mut(), Offset(0), &request, false).is_ok());
}

/// Per account, the units' (equity, MM) the reference model shows: the cross unit, and each open isolated
/// position (wallet + value).
fn reference_units(lines: &[String]) -> Vec<Units> {
    let mut reference = Reference::new(vigil_model::QUOTE_DEFAULT);
    for line in lines {
        match parse_line(line) {
            Ok(event) => {
                let _ = reference.apply(&event);
            }
            Err(_) => {
                reference.skip();
            }
        }
    }
    let market = book(lines, 1);
    let market = market.shards()[0].market();
    reference
        .views()
        .into_iter()
        .map(|v| {
            let mut units = vec![(v.equity, v.maintenance_margin)];
            for p in v.positions.iter().filter(|p| p.margin_mode == MarginMode::Isolated) {
                let is_option = market
                    .slot(&p.symbol)
                    .and_then(|s| market.instrument(s))
                    .is_some_and(|i| matches!(i.kind, vigil_engine::market::InstrumentKind::Option { .. }));
                let value = if is_option {
                    let mark = p.mark_price.unwrap_or(Price::ZERO);
                    Amount((i128::from(p.qty.0) * i128::from(mark.0)).div_euclid(100_000_000))
                } else {
                    p.unrealized_pnl
                };
                let wallet = p.isolated_wallet.unwrap_or(Amount::ZERO);
                units.push((wallet.saturating_add(value), p.maintenance_margin.unwrap_or(Amount::ZERO)));
            }
            Units { account: v.account, grouped: !v.groups.is_empty(), units }
        })
        .collect()
}

/// One account's units in the reference model, and whether a portfolio group's figures (floating point) are in them.
struct Units {
    account: String,
    grouped: bool,
    units: Vec<(Amount, Amount)>,
}

/// `p × (1 + m)` to the nearest 1e-8, written out again.
fn times(p: i64, m: i64) -> i64 {
    let x = i128::from(p) * (100_000_000 + i128::from(m));
    ((x + x.signum() * 50_000_000) / 100_000_000) as i64
}

/// The prices a scenario moves, computed independently of `vigil_engine::stress` (the option repricing with the
/// reference model's own Black-76 and implied volatility): (slot, (price, is an option)).
fn moved_prices(market: &vigil_engine::market::Market, scenario: &Scenario) -> Vec<(u32, (Price, bool))> {
    use vigil_engine::market::{Entry, InstrumentKind};
    let find = |list: &[(String, i64)], slot: u32| list.iter().find(|(a, _)| a == market.name(slot)).map(|(_, m)| *m);
    let mut out = Vec::new();
    for slot in 0..market.slots() as u32 {
        let Some(price) = market.price(slot) else { continue };
        match market.entry(slot) {
            Some(Entry::Asset { .. }) => {
                if let Some(m) = find(&scenario.moves, slot) {
                    out.push((slot, (Price(times(price.0, m)), false)));
                }
            }
            Some(Entry::Instrument(inst)) if !inst.settled => {
                let Some(u) = inst.underlying else { continue };
                let (m, v) = (find(&scenario.moves, u), find(&scenario.vol, u));
                match &inst.kind {
                    InstrumentKind::Option { terms, .. } if m.is_some() || v.is_some() => {
                        let index = market.price(u).expect("an option's underlying has an index in these streams");
                        let clock = market.clock().expect("these streams start with a clock");
                        let expiry = inst.expiry.expect("an option has an expiry");
                        let t = (expiry.0 - clock.0).max(0) as f64 / (365.0 * 86_400.0 * 1e9);
                        let f = |raw: i64| raw as f64 / 1e8;
                        let k = f(terms.strike.0);
                        let sigma =
                            vigil_testkit::reference::ref_implied_vol(terms.right, f(index.0), k, t, f(price.0));
                        let u1 = f(times(index.0, m.unwrap_or(0)));
                        let sigma = sigma * (1.0 + f(v.unwrap_or(0)));
                        let value = vigil_testkit::reference::ref_black76(terms.right, u1, k, t, sigma);
                        out.push((slot, (Price((value * 1e8).round() as i64), true)));
                    }
                    InstrumentKind::Perp | InstrumentKind::Future => {
                        if let Some(m) = m {
                            out.push((slot, (Price(times(price.0, m)), false)));
                        }
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
    out
}

/// The scenario's counts and shortfall from per-account units.
fn tally(units: &[Units]) -> (u64, u64, i128) {
    let (mut liquidatable, mut bankrupt, mut shortfall) = (0, 0, 0i128);
    for Units { units: us, .. } in units {
        liquidatable += u64::from(us.iter().any(|(e, mm)| mm.0 > 0 && e < mm));
        bankrupt += u64::from(us.iter().any(|(e, _)| e.0 < 0));
        shortfall += us.iter().map(|(e, _)| (-e.0).max(0)).sum::<i128>();
    }
    (liquidatable, bankrupt, shortfall)
}

#[test]
fn random_books_agree_across_shards_and_with_the_reference_at_moved_prices() {
    // Proves, on random books (standard and portfolio accounts, options with expiries, isolated positions,
    // collateral), for several scenarios each: the answer is identical for 1, 2 and 5 shards, and each scenario
    // asked alone gives its part of it; and its counts,
    // shortfall and every account's equity and MM under the scenario (the top list holds them all) equal the
    // reference model's after the scenario's moved prices are appended to the stream as price events (the
    // reference has its own margin code; portfolio figures within the float tolerance). The moved prices are
    // checked against an independent computation first. A tremor of 1e-8 leaves most option marks as they were
    // (the repricing rounds back to them) while their underlying moves: a short option's margin must follow the
    // underlying even then.
    let scenarios = [
        Scenario { name: "down".into(), moves: vec![("BTC".into(), -25_000_000)], vol: vec![] },
        Scenario {
            name: "crash".into(),
            moves: vec![("BTC".into(), -40_000_000), ("ETH".into(), -50_000_000)],
            vol: vec![("BTC".into(), 50_000_000)],
        },
        Scenario {
            name: "squeeze".into(),
            moves: vec![("ETH".into(), 60_000_000)],
            vol: vec![("ETH".into(), -30_000_000)],
        },
        Scenario { name: "tremor".into(), moves: vec![("BTC".into(), -1), ("ETH".into(), 1)], vol: vec![] },
    ];
    let request = Request { scenarios: scenarios.to_vec(), grids: vec![], top: 1000 };
    let mut checked_units = 0;
    let mut liquidatable_seen = 0;
    for seed in 1..=12u64 {
        let config = StreamConfig {
            seed,
            events: 1500,
            accounts: 24,
            bad_percent: 2,
            // Any v2 share starts the stream with a clock (options on a moved underlying need one).
            portfolio_percent: if seed % 2 == 1 { 4 } else { 1 },
            liquidation_percent: 0,
        };
        let stream = generate(&config);
        let one = stress(&stream, 1, &request);
        for shards in [2, 5] {
            let many = stress(&stream, shards, &request);
            assert_eq!(many.result, one.result, "seed {seed}: {shards} shards differ from 1");
        }
        // A request of one scenario takes its own path (both evaluations in one pass over a standard account):
        // each scenario asked alone gives its part of the request of four, on one shard and on two.
        for (k, scenario) in scenarios.iter().enumerate() {
            let alone = Request { scenarios: vec![scenario.clone()], grids: vec![], top: 1000 };
            for shards in [1, 2] {
                let answer = stress(&stream, shards, &alone);
                assert_eq!(answer.result.now, one.result.now, "seed {seed} {} alone", scenario.name);
                assert_eq!(answer.result.scenarios, [one.result.scenarios[k].clone()], "seed {seed} {}", scenario.name);
            }
        }
        let sharded = book(&stream, 1);
        let market = sharded.shards()[0].market();
        let before = reference_units(&stream);
        for (scenario, part) in scenarios.iter().zip(&one.result.scenarios) {
            let shocked = match shock(market, scenario) {
                Ok(m) => m,
                Err(e) => panic!("seed {seed}: {e}"),
            };
            let mut moved = stream.clone();
            for (slot, want) in moved_prices(market, scenario) {
                let got = shocked.price(slot).expect("a moved price");
                // Linear moves are exact; an option's repricing goes through each side's own Black-76 and bisection.
                let tolerance = if want.1 { 10 + want.0.0 / 1_000_000 } else { 0 };
                assert!(
                    (got.0 - want.0.0).abs() <= tolerance,
                    "seed {seed} {}: {} moved to {got}, expected {}",
                    scenario.name,
                    market.name(slot),
                    want.0
                );
                if got.0 > 0 {
                    moved.push(format!(r#"{{"type":"price","symbol":"{}","price":"{}"}}"#, market.name(slot), got));
                }
            }
            let units = reference_units(&moved);
            assert_eq!(part.top.len(), units.len(), "seed {seed}: every account is in the top list");
            for u in &units {
                let Some(t) = part.top.iter().find(|t| t.account == u.account) else {
                    panic!("seed {seed}: {} is missing from the top list", u.account)
                };
                // The loss (equity now − under the scenario) and the MM under it, over the account's units.
                let equity = |units: &[(Amount, Amount)]| units.iter().map(|(e, _)| e.0).sum::<i128>();
                let now = before.iter().find(|b| b.account == u.account).map_or(0, |b| equity(&b.units));
                let loss = now - equity(&u.units);
                let mm: i128 = u.units.iter().map(|(_, m)| m.0).sum();
                let tolerance = if u.grouped { 2 * vigil_testkit::compare::TOLERANCE } else { 0 };
                assert!(
                    (t.loss.0 - loss).abs() <= tolerance && (t.after.maintenance_margin.0 - mm).abs() <= tolerance,
                    "seed {seed} {} {}: loss {} and MM {} under the scenario, the reference says {} and {}",
                    scenario.name,
                    u.account,
                    t.loss,
                    t.after.maintenance_margin,
                    Amount(loss),
                    Amount(mm)
                );
            }
            checked_units += units.len();
            let (liquidatable, bankrupt, shortfall) = tally(&units);
            liquidatable_seen += liquidatable;
            assert_eq!((part.liquidatable, part.bankrupt), (liquidatable, bankrupt), "seed {seed} {}", scenario.name);
            let tolerance = vigil_testkit::compare::TOLERANCE * units.len() as i128 * 4;
            assert!(
                (part.shortfall.0 - shortfall).abs() <= tolerance,
                "seed {seed} {}: shortfall {} vs the reference's {}",
                scenario.name,
                part.shortfall,
                Amount(shortfall)
            );
        }
    }
    assert!(
        checked_units > 200 && liquidatable_seen > 20,
        "vacuous: {checked_units} units, {liquidatable_seen} liquidatable"
    );
}

#[test]
fn a_short_option_margin_follows_its_underlying_when_the_mark_rounds_back() {
    // Proves a scenario recomputes a position whose own price does not change when its underlying's does: a
    // deep out-of-the-money put reprices to the same mark under a move of 1e-8, but its margin,
    // |q| × (0.075 × U + mark), follows the index (10 × 0.075 × 60 000 × 1e-8 = 0.00045 less).
    let book_lines = lines(
        r#"
        {"type":"asset","asset":"BTC","haircut":"0.1"}
        {"type":"option","symbol":"BTC-P-1000","underlying":"BTC","right":"put","strike":"1000","expiry":"2027-03-26T08:00:00Z"}
        {"type":"clock","time":"2026-12-02T08:00:00Z"}
        {"type":"price","symbol":"BTC","price":"60000"}
        {"type":"price","symbol":"BTC-P-1000","price":"0.01"}
        {"type":"deposit","account":"erin","asset":"USDC","amount":"50000"}
        {"type":"trade","account":"erin","symbol":"BTC-P-1000","side":"sell","qty":"10","price":"0.01"}
    "#,
    );
    let request = parse_request(br#"{"scenarios":[{"name":"tremor","moves":{"BTC":"-0.00000001"}}],"top":1}"#).unwrap();
    let sharded = book(&book_lines, 1);
    let market = sharded.shards()[0].market();
    let shocked = shock(market, &request.scenarios[0]).expect("a valid scenario");
    let put = market.slot("BTC-P-1000").expect("listed");
    assert_eq!(shocked.price(put), market.price(put), "the put's mark rounds back (else this test proves nothing)");
    assert_eq!(shocked.price(market.slot("BTC").expect("listed")), Some(Price(5_999_999_940_000)));
    let report = stress(&book_lines, 1, &request);
    let erin = &report.result.scenarios[0].top[0];
    assert_eq!(erin.before.maintenance_margin, amount("45000.1"));
    assert_eq!(erin.after.maintenance_margin, amount("45000.09955"));
}

#[test]
fn merging_is_independent_of_how_accounts_are_split() {
    // Proves the merge: the top list keeps the largest losses across parts, ties broken by account id.
    let part = |accounts: &[(&str, i64)]| Part {
        accounts: accounts.len() as u64,
        top: accounts
            .iter()
            .map(|(a, l)| vigil_engine::stress::TopAccount {
                account: (*a).into(),
                loss: Amount::units(*l),
                before: Default::default(),
                after: Default::default(),
            })
            .collect(),
        ..Part::default()
    };
    let shard = |p: Part| vigil_engine::stress::ShardStress { now: Part::default(), scenarios: vec![p] };
    let merged = merge_shards(vec![shard(part(&[("b", 5), ("d", 1)])), shard(part(&[("a", 5), ("c", 3)]))], 3);
    let top: Vec<&str> = merged.scenarios[0].top.iter().map(|t| t.account.as_str()).collect();
    assert_eq!(top, ["a", "b", "c"]);
    assert_eq!(merged.scenarios[0].accounts, 4);
    // Grid steps are exact: −0.5 to 0.5 in 21 steps moves by 0.05.
    let g = Grid { underlying: "BTC".into(), from: -50_000_000, to: 50_000_000, steps: 21 };
    assert_eq!((g.step(0), g.step(1), g.step(10), g.step(20)), (-50_000_000, -45_000_000, 0, 50_000_000));
}

#[test]
fn a_book_cut_into_pieces_that_threads_take_in_turn_gives_each_shards_own_answer() {
    // Proves the offline runner's division of work: with two pieces or more of `CHUNK` accounts per shard, taken by
    // the threads in whatever order they come, the report equals each shard's own pass (`Engine::stress`, one
    // thread over its accounts in order) merged: counts, shortfall, losses by asset and the top lists, for
    // standard and portfolio accounts.
    let accounts = 5 * vigil_node::stress::CHUNK;
    let config = StreamConfig {
        seed: 7,
        events: 4 * accounts,
        accounts,
        bad_percent: 0,
        portfolio_percent: 3,
        liquidation_percent: 0,
    };
    let stream = generate(&config);
    let request = Request {
        scenarios: vec![Scenario {
            name: "crash".into(),
            moves: vec![("BTC".into(), -40_000_000), ("ETH".into(), -50_000_000)],
            vol: vec![("BTC".into(), 50_000_000)],
        }],
        grids: vec![Grid { underlying: "BTC".into(), from: -50_000_000, to: 50_000_000, steps: 5 }],
        top: 50,
    };
    let mut sharded = book(&stream, 2);
    assert!(
        sharded.shards().iter().all(|s| s.account_count() > vigil_node::stress::CHUNK),
        "vacuous: a shard in one piece: {:?}",
        sharded.shards().iter().map(|s| s.account_count()).collect::<Vec<_>>()
    );
    let scenarios = request.expand();
    let own = merge_shards(
        sharded.shards().iter().map(|s| s.stress(&scenarios, request.top, &mut |_| {}).expect("valid")).collect(),
        request.top,
    );
    let offset = sharded.offset();
    let report = run(sharded.shards_mut(), offset, &request, false).expect("valid");
    assert_eq!(report.result, own);
    assert!(own.scenarios.iter().all(|p| p.top.len() == 50 && p.liquidatable > 0), "vacuous: {own:?}");
}

#[test]
fn every_accounts_figures_in_the_pass_are_those_of_a_fresh_evaluation() {
    // Proves the pass's shortcuts exact (terms recomputed only where a scenario moves them, margins bounded before
    // they are rounded, groups of perps and futures margined from their sums, groups nothing moves kept): on random
    // books with every account listed, each account's loss is its equity now less under the scenario as evaluated
    // afresh (`exposure`, which lists the accounts), and the counts and shortfall, now and under each scenario, add
    // up those fresh figures, for standard and portfolio accounts alike.
    let scenarios = vec![
        Scenario {
            name: "crash".into(),
            moves: vec![("BTC".into(), -40_000_000), ("ETH".into(), -50_000_000)],
            vol: vec![("BTC".into(), 50_000_000)],
        },
        Scenario { name: "rally".into(), moves: vec![("ETH".into(), 30_000_000)], vol: vec![] },
        Scenario { name: "vol".into(), moves: vec![], vol: vec![("BTC".into(), -40_000_000)] },
        Scenario { name: "tremor".into(), moves: vec![("BTC".into(), -1)], vol: vec![] },
    ];
    let request = Request { scenarios, grids: vec![], top: 1000 };
    let (mut grouped, mut liquidatable) = (0, 0);
    for seed in 1..=10u64 {
        let config = StreamConfig {
            seed,
            events: 3000,
            accounts: 60,
            bad_percent: 2,
            portfolio_percent: 8,
            liquidation_percent: 0,
        };
        let stream = generate(&config);
        let sharded = book(&stream, 2);
        grouped += sharded.shards().iter().flat_map(|s| s.views()).filter(|v| !v.groups.is_empty()).count();
        let report = stress(&stream, 2, &request).result;
        let count = |part: &Part, f: &dyn Fn(&vigil_engine::stress::TopAccount) -> bool| {
            part.top.iter().filter(|t| f(t)).count() as u64
        };
        for (scenario, part) in request.scenarios.iter().zip(&report.scenarios) {
            let name = &scenario.name;
            assert_eq!(part.top.len() as u64, part.accounts, "seed {seed} {name}: every account is listed");
            for t in &part.top {
                assert_eq!(
                    t.loss,
                    t.before.equity.saturating_sub(t.after.equity),
                    "seed {seed} {name} {}: the pass's loss is not the fresh equities' difference",
                    t.account
                );
            }
            assert_eq!(part.liquidatable, count(part, &|t| t.after.liquidatable), "seed {seed} {name}");
            assert_eq!(part.bankrupt, count(part, &|t| t.after.bankrupt), "seed {seed} {name}");
            assert_eq!(
                part.newly_liquidatable,
                count(part, &|t| t.after.liquidatable && !t.before.liquidatable),
                "seed {seed} {name}"
            );
            let shortfall = part.top.iter().fold(Amount::ZERO, |s, t| s.saturating_add(t.after.shortfall));
            assert_eq!(part.shortfall, shortfall, "seed {seed} {name}");
            assert_eq!(report.now.liquidatable, count(part, &|t| t.before.liquidatable), "seed {seed} {name} now");
            assert_eq!(report.now.bankrupt, count(part, &|t| t.before.bankrupt), "seed {seed} {name} now");
            let shortfall = part.top.iter().fold(Amount::ZERO, |s, t| s.saturating_add(t.before.shortfall));
            assert_eq!(report.now.shortfall, shortfall, "seed {seed} {name} now");
            liquidatable += part.liquidatable;
        }
    }
    assert!(grouped > 50 && liquidatable > 50, "vacuous: {grouped} accounts with groups, {liquidatable} liquidatable");
}
