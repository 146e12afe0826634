//! Engine behaviour on small hand-written streams: settlement, isolated wallets, funding, episodes, checks.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use vigil_engine::{Config, Engine};
use vigil_model::{Amount, Fill, MarginMode, Offset, Price, Qty, Side, Trigger, TriggerKind, parse_line};

struct T {
    engine: Engine,
    offset: u64,
    triggers: Vec<Trigger>,
}

impl T {
    fn new(lines: &[&str]) -> Self {
        let mut t = T { engine: Engine::new(&Config::default()), offset: 0, triggers: Vec::new() };
        for l in lines {
            t.ok(l);
        }
        t
    }
    fn ok(&mut self, line: &str) -> Vec<Trigger> {
        self.offset += 1;
        let start = self.triggers.len();
        let e = parse_line(line).unwrap_or_else(|r| panic!("{line}: {r}"));
        self.engine.apply(Offset(self.offset), &e, &mut self.triggers).unwrap_or_else(|r| panic!("{line}: {r}"));
        self.triggers[start..].to_vec()
    }
    fn usdc(&self, account: &str) -> String {
        let v = self.engine.account_view(account).unwrap();
        v.balances.iter().find(|(a, _)| a == "USDC").unwrap().1.to_string()
    }
    fn price(&mut self, symbol: &str, p: &str) -> Vec<Trigger> {
        self.ok(&format!(r#"{{"type":"price","symbol":"{symbol}","price":"{p}"}}"#))
    }
}

const OPTIONS: &[&str] = &[
    r#"{"type":"asset","asset":"BTC"}"#,
    r#"{"type":"option","symbol":"C","underlying":"BTC","right":"call","strike":"70000","expiry":"2027-01-01T00:00:00Z"}"#,
    r#"{"type":"option","symbol":"P","underlying":"BTC","right":"put","strike":"50000","expiry":"2027-01-01T00:00:00Z"}"#,
    r#"{"type":"price","symbol":"BTC","price":"60000"}"#,
    r#"{"type":"price","symbol":"C","price":"600"}"#,
    r#"{"type":"price","symbol":"P","price":"300"}"#,
    r#"{"type":"deposit","account":"w","asset":"USDC","amount":"100000"}"#,
    r#"{"type":"deposit","account":"h","asset":"USDC","amount":"100000"}"#,
];

#[test]
fn option_premium_and_settlement_of_a_call_and_a_put() {
    // Proves premiums move at the trade and settlement pays q × payoff: call ITM, put OTM.
    let mut t = T::new(OPTIONS);
    t.ok(r#"{"type":"trade","account":"w","symbol":"C","side":"sell","qty":"2","price":"600"}"#);
    t.ok(r#"{"type":"trade","account":"h","symbol":"C","side":"buy","qty":"2","price":"600","fee":"1"}"#);
    t.ok(r#"{"type":"trade","account":"w","symbol":"P","side":"sell","qty":"1","price":"300"}"#);
    assert_eq!(t.usdc("w"), "101500.00000000");
    assert_eq!(t.usdc("h"), "98799.00000000");
    // The writer's short call: IM = 2 × (max(9000 − 10000, 6000) + 600).
    let w = t.engine.account_view("w").unwrap();
    assert_eq!(w.positions[0].initial_margin.map(|m| m.to_string()).as_deref(), Some("13200.00000000"));
    assert_eq!(w.positions[0].liquidation_price, None);
    t.ok(r#"{"type":"settle","symbol":"C","price":"75000"}"#);
    t.ok(r#"{"type":"settle","symbol":"P","price":"75000"}"#);
    // Call ITM by 5 000: writer pays 10 000, holder receives 10 000; the put expires worthless.
    assert_eq!(t.usdc("w"), "91500.00000000");
    assert_eq!(t.usdc("h"), "108799.00000000");
    assert!(t.engine.account_view("w").unwrap().positions.is_empty());
}

#[test]
fn put_in_the_money_settles_against_the_writer() {
    // Proves a put settles at max(K − price, 0).
    let mut t = T::new(OPTIONS);
    t.ok(r#"{"type":"trade","account":"w","symbol":"P","side":"sell","qty":"3","price":"300"}"#);
    t.ok(r#"{"type":"settle","symbol":"P","price":"48000"}"#);
    assert_eq!(t.usdc("w"), (100_000 + 900 - 3 * 2000).to_string() + ".00000000");
}

const PERP: &[&str] = &[
    r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
    r#"{"type":"price","symbol":"ETH","price":"3000"}"#,
    r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1000"}"#,
];

#[test]
fn isolated_wallet_takes_pnl_and_returns_on_close() {
    // Proves realized PnL, fees and funding go to the isolated wallet, which returns to cross on close.
    let mut t = T::new(PERP);
    t.ok(r#"{"type":"transfer","account":"a","symbol":"ETH","amount":"400"}"#);
    assert_eq!(t.usdc("a"), "600.00000000");
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"1","price":"3000","fee":"1.5","margin_mode":"isolated"}"#);
    t.ok(r#"{"type":"funding","symbol":"ETH","rate":"0.001"}"#);
    let p = &t.engine.account_view("a").unwrap().positions[0];
    assert_eq!(p.isolated_wallet.map(|w| w.to_string()), Some("395.50000000".into()));
    assert_eq!(p.margin_mode, MarginMode::Isolated);
    // The cross account is untouched by the isolated position.
    assert_eq!(t.engine.account_view("a").unwrap().initial_margin, Amount::ZERO);
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"sell","qty":"1","price":"3100","margin_mode":"isolated"}"#);
    assert!(t.engine.account_view("a").unwrap().positions.is_empty());
    assert_eq!(t.usdc("a"), "1095.50000000");
}

#[test]
fn episode_fires_once_then_bankrupt_once_then_ends_at_initial_margin() {
    // Proves one `liquidate` on entry, one `bankrupt` below zero, silence in between, and a new episode only
    // after equity is back at initial margin.
    let mut t = T::new(PERP);
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#);
    // Equity 1000 + 3(p − 3000); MM 0.15p: breach below 2 807.02.
    assert!(t.price("ETH", "2810").is_empty());
    let fired = t.price("ETH", "2800");
    assert_eq!(fired.iter().map(|x| x.kind).collect::<Vec<_>>(), vec![TriggerKind::Liquidate]);
    assert_eq!(fired[0].symbol, None);
    assert!(t.price("ETH", "2790").is_empty());
    let b = t.price("ETH", "2600");
    assert_eq!(b.iter().map(|x| x.kind).collect::<Vec<_>>(), vec![TriggerKind::Bankrupt]);
    assert!(t.price("ETH", "2500").is_empty());
    // Back above MM but below IM (0.3p): still the same episode.
    assert!(t.price("ETH", "2850").is_empty());
    assert!(t.price("ETH", "2800").is_empty());
    // Back at IM: 1000 + 3(p − 3000) ≥ 0.3p ⇔ p ≥ 2 962.97; the episode ends, and a new breach fires again.
    assert!(t.price("ETH", "2970").is_empty());
    assert_eq!(t.price("ETH", "2800").len(), 1);
}

#[test]
fn liquidation_and_bankruptcy_in_one_tick() {
    // Proves a gap through both thresholds emits `liquidate` then `bankrupt` at the same offset.
    let mut t = T::new(PERP);
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"sell","qty":"3","price":"3000"}"#);
    let fired = t.price("ETH", "4000");
    assert_eq!(fired.iter().map(|x| x.kind).collect::<Vec<_>>(), vec![TriggerKind::Liquidate, TriggerKind::Bankrupt]);
    assert!(fired[1].equity.is_negative());
}

#[test]
fn isolated_trigger_names_its_symbol_and_cross_is_unaffected() {
    // Proves an isolated position is liquidated on its own, with its symbol on the trigger.
    let mut t = T::new(PERP);
    t.ok(r#"{"type":"transfer","account":"a","symbol":"ETH","amount":"200"}"#);
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"1","price":"3000","margin_mode":"isolated"}"#);
    let fired = t.price("ETH", "2900");
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].symbol.as_deref(), Some("ETH"));
    assert!(!t.engine.account_view("a").unwrap().liquidatable);
}

#[test]
fn pretrade_check_reports_figures_after_the_fill() {
    // Proves the check allows within IM, refuses beyond it with a reason, and changes nothing.
    let t = T::new(PERP);
    let fill = |qty: &str| Fill {
        account: "a".into(),
        symbol: "ETH".into(),
        side: Side::Buy,
        qty: Qty::parse(qty).unwrap(),
        price: Price::units(3000),
        fee: Amount::ZERO,
        margin_mode: MarginMode::Cross,
    };
    let ok = t.engine.check("a", &fill("3")).unwrap();
    assert!(ok.allowed && ok.reason.is_none());
    assert_eq!(ok.after.initial_margin.to_string(), "900.00000000");
    let no = t.engine.check("a", &fill("3.4")).unwrap();
    assert!(!no.allowed);
    assert_eq!(no.reason.map(|r| r.reason), Some(vigil_model::Reason::InsufficientMargin));
    assert_eq!(t.engine.account_view("a").unwrap().positions.len(), 0);
    // A new account can be checked too (it has no equity: refused), and an unknown symbol is an error.
    assert!(!t.engine.check("new", &Fill { account: "new".into(), ..fill("1") }).unwrap().allowed);
    assert!(t.engine.check("a", &Fill { symbol: "NOPE".into(), ..fill("1") }).is_err());
}

#[test]
fn reducing_an_undercollateralised_position_is_allowed() {
    // Proves dYdX's exception: a fill that reduces risk passes even below initial margin.
    let mut t = T::new(PERP);
    t.ok(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#);
    t.price("ETH", "2800");
    let reduce = Fill {
        account: "a".into(),
        symbol: "ETH".into(),
        side: Side::Sell,
        qty: Qty::units(1),
        price: Price::units(2800),
        fee: Amount::ZERO,
        margin_mode: MarginMode::Cross,
    };
    let c = t.engine.check("a", &reduce).unwrap();
    assert!(c.after.equity < c.after.initial_margin && c.allowed);
    let add = Fill { side: Side::Buy, ..reduce };
    assert!(!t.engine.check("a", &add).unwrap().allowed);
}

#[test]
fn indexed_ticks_evaluate_only_accounts_near_their_threshold() {
    // Proves a tick re-evaluates only accounts whose band it leaves (indexed), against every holder (rescan),
    // with the same triggers.
    use vigil_engine::Detection;
    let mut results = Vec::new();
    for detection in [Detection::Rescan, Detection::Indexed] {
        let mut t =
            T { engine: Engine::new(&Config { detection, ..Config::default() }), offset: 0, triggers: Vec::new() };
        t.ok(PERP[0]);
        t.ok(PERP[1]);
        // 200 safe accounts (1.5× leverage) and 10 at ~9.5× leverage (MM at 5%: breach below 2 825.26).
        for i in 0..210 {
            let (deposit, qty) = if i < 200 { ("2000", "1") } else { ("316", "1") };
            t.ok(&format!(r#"{{"type":"deposit","account":"a{i}","asset":"USDC","amount":"{deposit}"}}"#));
            t.ok(&format!(
                r#"{{"type":"trade","account":"a{i}","symbol":"ETH","side":"buy","qty":"{qty}","price":"3000"}}"#
            ));
        }
        let before = t.engine.evaluations();
        let mut fired = Vec::new();
        for p in ["2995", "2990", "2980", "2900", "2840", "2820"] {
            fired.extend(t.price("ETH", p));
        }
        results.push((t.engine.evaluations() - before, fired));
    }
    let (rescan, indexed) = (&results[0], &results[1]);
    assert_eq!(rescan.1, indexed.1, "same triggers");
    assert_eq!(rescan.1.len(), 10, "the 10 leveraged accounts breach");
    assert_eq!(rescan.0, 6 * 210);
    assert!(indexed.0 <= 6 * 10 + 20, "indexed evaluated {} accounts", indexed.0);
}

#[test]
fn indexed_sees_an_episode_end_when_im_drops_at_a_tier_boundary() {
    // Proves the IM watch of a unit in liquidation stops at its tier's lower bound: IM jumps down there, the
    // episode ends, and the next breach fires a new trigger, exactly as a rescan finds.
    use vigil_engine::Detection;
    let mut fired = Vec::new();
    for detection in [Detection::Rescan, Detection::Indexed] {
        let mut t =
            T { engine: Engine::new(&Config { detection, ..Config::default() }), offset: 0, triggers: Vec::new() };
        t.ok(r#"{"type":"perp","symbol":"X","tiers":[{"max_notional":"10000","imr":"0.02","mmr":"0.01"},{"imr":"0.5","mmr":"0.25"}]}"#);
        t.ok(r#"{"type":"price","symbol":"X","price":"12000"}"#);
        t.ok(r#"{"type":"deposit","account":"s","asset":"USDC","amount":"500"}"#);
        // Short 1 at 12 000: equity 500 < MM 600 → liquidate at the trade.
        let mut all = t.ok(r#"{"type":"trade","account":"s","symbol":"X","side":"sell","qty":"1","price":"12000"}"#);
        all.extend(t.price("X", "11000")); // equity 1 500 < IM 5 500: still in the episode
        all.extend(t.price("X", "9999")); // tier 1: IM 199.98 ≤ equity 2 501: the episode ends
        all.extend(t.price("X", "12100")); // equity 400 < MM 625: a new episode
        fired.push(all);
    }
    assert_eq!(fired[0].len(), 2, "{:?}", fired[0]);
    assert_eq!(fired[0], fired[1]);
}
