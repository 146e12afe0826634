//! Random event streams for differential and property tests: reference data, deposits, trades, price walks with
//! jumps (so accounts do cross their thresholds), funding, transfers, settlements, and a share of bad events.
//! Streams are JSON Lines text, so the whole path from parsing on is exercised.

use vigil_model::num::format_fixed;

use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct StreamConfig {
    pub seed: u64,
    pub events: usize,
    pub accounts: usize,
    /// Share of deliberately bad events, in percent.
    pub bad_percent: u64,
    /// Share of contract v2 events (`clock` steps, `risk` changes, `account_config` switches), in percent; with
    /// any, the stream starts with a clock and the future follows BTC (a portfolio group with the perp and call).
    /// 0 leaves the stream exactly what it was before v2.
    pub portfolio_percent: u64,
    /// Share of liquidation events (contract v2, `liquidation.md`: `trade` with `liquidation: true` at prices around
    /// the mark, often through the bankruptcy price; `insurance` in and out; `liquidation_params`), in percent. 0
    /// leaves the stream exactly what it was before.
    pub liquidation_percent: u64,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self { seed: 1, events: 300, accounts: 6, bad_percent: 5, portfolio_percent: 0, liquidation_percent: 0 }
    }
}

struct Sym {
    name: &'static str,
    /// Index price the mark follows (the underlying for options).
    base: usize,
    kind: SymKind,
}

#[derive(Clone, Copy, PartialEq)]
enum SymKind {
    Perp,
    Future,
    Call(i64),
    Put(i64),
}

const ASSETS: [&str; 2] = ["BTC", "ETH"];

fn num(raw: i64) -> String {
    format_fixed(i128::from(raw))
}

/// A decimal as a JSON string, or now and then as a plain JSON number (both are accepted).
fn dec(rng: &mut Rng, raw: i64) -> String {
    let s = num(raw);
    if rng.chance(10) { s } else { format!("\"{s}\"") }
}

fn tiers(rng: &mut Rng) -> String {
    match rng.below(3) {
        0 => r#"[{"imr":"0.1","mmr":"0.05"}]"#.to_owned(),
        1 => r#"[{"max_notional":"20000","imr":"0.02","mmr":"0.01"},{"max_notional":"100000","imr":"0.05","mmr":"0.025"},{"imr":"0.1","mmr":"0.05"}]"#.to_owned(),
        _ => r#"[{"max_notional":"5000","imr":"0.04","mmr":"0.02"},{"imr":"0.2","mmr":"0.1"}]"#.to_owned(),
    }
}

/// Generates one stream of JSON Lines (without trailing newlines).
pub fn generate(config: &StreamConfig) -> Vec<String> {
    let mut rng = Rng::new(config.seed);
    let mut out = Vec::with_capacity(config.events + 16);
    let syms = [
        Sym { name: "BTC-PERP", base: 0, kind: SymKind::Perp },
        Sym { name: "ETH-PERP", base: 1, kind: SymKind::Perp },
        Sym { name: "BTC-FUT", base: 0, kind: SymKind::Future },
        Sym { name: "BTC-C", base: 0, kind: SymKind::Call(600) },
        Sym { name: "ETH-P", base: 1, kind: SymKind::Put(28) },
    ];
    // Index prices in raw 1e-8 (BTC ~ 600, ETH ~ 30: small, so quantities of a few units matter).
    let mut index: [i64; 2] = [60_000_000_000, 3_000_000_000];
    let mut settled = [false; 5];
    let accounts: Vec<String> = (0..config.accounts.max(1)).map(|i| format!("acct-{i}")).collect();

    let v2 = config.portfolio_percent > 0;
    // The venue's clock, in seconds since the epoch (2026-12-01T00:00:00Z; the options expire 2027-03-26).
    let mut clock: i64 = 1_796_083_200;
    // Reference data, shuffled a little so some events meet undeclared names.
    let mut setup = vec![
        format!(r#"{{"type":"asset","asset":"BTC","haircut":"0.1"}}"#),
        format!(r#"{{"type":"asset","asset":"ETH"}}"#),
    ];
    if v2 {
        setup.push(format!(r#"{{"type":"clock","time":"{}"}}"#, rfc3339(clock)));
    }
    for s in &syms {
        setup.push(match s.kind {
            SymKind::Perp => {
                format!(r#"{{"type":"perp","symbol":"{}","underlying":"{}","tiers":{}}}"#, s.name, ASSETS[s.base], tiers(&mut rng))
            }
            SymKind::Future if v2 => format!(
                r#"{{"type":"future","symbol":"{}","underlying":"BTC","tiers":{},"expiry":"2027-03-26T08:00:00Z"}}"#,
                s.name,
                tiers(&mut rng)
            ),
            SymKind::Future => format!(
                r#"{{"type":"future","symbol":"{}","tiers":{},"expiry":"2027-03-26T08:00:00Z"}}"#,
                s.name,
                tiers(&mut rng)
            ),
            SymKind::Call(k) | SymKind::Put(k) => format!(
                r#"{{"type":"option","symbol":"{}","underlying":"{}","right":"{}","strike":"{k}","expiry":"2027-03-26T08:00:00Z"}}"#,
                s.name,
                ASSETS[s.base],
                if matches!(s.kind, SymKind::Call(_)) { "call" } else { "put" }
            ),
        });
    }
    for i in (1..setup.len()).rev() {
        if rng.chance(20) {
            let j = rng.below(i as u64 + 1) as usize;
            setup.swap(i, j);
        }
    }
    out.extend(setup);

    let mark_of = |s: &Sym, index: &[i64; 2], rng: &mut Rng| -> i64 {
        let u = index[s.base];
        let m = match s.kind {
            SymKind::Perp | SymKind::Future => u + u / 1000 * (rng.range(-5, 5)),
            SymKind::Call(k) => (u - k * 100_000_000).max(0) + u / 50,
            SymKind::Put(k) => (k * 100_000_000 - u).max(0) + u / 50,
        };
        m.max(1_000_000)
    };

    while out.len() < config.events {
        let roll = rng.below(100);
        let account = rng.pick(&accounts).clone();
        let si = rng.below(syms.len() as u64) as usize;
        let s = &syms[si];
        let liquidation = config.liquidation_percent > 0 && rng.below(100) < config.liquidation_percent;
        let line = if liquidation {
            let m = mark_of(s, &index, &mut rng);
            liquidation_event(&mut rng, &account, s, m)
        } else if v2 && rng.below(100) < config.portfolio_percent {
            v2_event(&mut rng, &account, &mut clock)
        } else if roll < config.bad_percent {
            bad_event(&mut rng, &account)
        } else if roll < 35 {
            // Price: an index or a mark; mostly small steps, sometimes a jump.
            if rng.chance(40) {
                let a = rng.below(2) as usize;
                let step = if rng.chance(8) { rng.range(-25, 25) } else { rng.range(-3, 3) };
                index[a] = (index[a] + index[a] / 100 * step).max(10_000_000);
                format!(r#"{{"type":"price","symbol":"{}","price":{}}}"#, ASSETS[a], dec(&mut rng, index[a]))
            } else {
                let m = mark_of(s, &index, &mut rng);
                format!(r#"{{"type":"price","symbol":"{}","price":{}}}"#, s.name, dec(&mut rng, m))
            }
        } else if roll < 65 {
            let m = mark_of(s, &index, &mut rng);
            let price = (m + m / 1000 * rng.range(-5, 5)).max(1);
            let qty = rng.range(1, 400) * 1_000_000 * if s.base == 1 { 10 } else { 1 };
            let side = if rng.chance(50) { "buy" } else { "sell" };
            let mut extra = String::new();
            if rng.chance(30) {
                let fee = rng.range(-2, 10) * 1_000_000;
                extra.push_str(&format!(r#","fee":{}"#, dec(&mut rng, fee)));
            }
            if matches!(s.kind, SymKind::Perp | SymKind::Future) && rng.chance(25) {
                extra.push_str(r#","margin_mode":"isolated""#);
            } else if rng.chance(10) {
                extra.push_str(r#","margin_mode":"cross""#);
            }
            format!(
                r#"{{"type":"trade","account":"{account}","symbol":"{}","side":"{side}","qty":{},"price":{}{extra}}}"#,
                s.name,
                dec(&mut rng, qty),
                dec(&mut rng, price)
            )
        } else if roll < 75 {
            let (asset, amount) = if rng.chance(75) {
                ("USDC", rng.range(10, 3000) * 100_000_000)
            } else {
                let a = rng.below(2) as usize;
                (ASSETS[a], rng.range(1, 300) * 1_000_000)
            };
            format!(
                r#"{{"type":"deposit","account":"{account}","asset":"{asset}","amount":{}}}"#,
                dec(&mut rng, amount)
            )
        } else if roll < 80 {
            let (asset, amount) = if rng.chance(75) {
                ("USDC", rng.range(10, 2000) * 100_000_000)
            } else {
                (ASSETS[rng.below(2) as usize], rng.range(1, 300) * 1_000_000)
            };
            format!(
                r#"{{"type":"withdraw","account":"{account}","asset":"{asset}","amount":{}}}"#,
                dec(&mut rng, amount)
            )
        } else if roll < 88 {
            let amount = rng.range(-1500, 2000) * 100_000_000;
            let amount = if amount == 0 { 100_000_000 } else { amount };
            let symbol = if rng.chance(90) { syms[rng.below(3) as usize].name } else { s.name };
            format!(
                r#"{{"type":"transfer","account":"{account}","symbol":"{symbol}","amount":{}}}"#,
                dec(&mut rng, amount)
            )
        } else if roll < 94 {
            let rate = rng.range(-300, 300) * 100_000; // ±0.3%
            format!(
                r#"{{"type":"funding","symbol":"{}","rate":{}}}"#,
                syms[rng.below(2) as usize].name,
                dec(&mut rng, rate)
            )
        } else if roll < 96 {
            // Re-sent reference data: new tiers or a new haircut.
            if rng.chance(50) {
                format!(
                    r#"{{"type":"perp","symbol":"{}","tiers":{}}}"#,
                    syms[rng.below(2) as usize].name,
                    tiers(&mut rng)
                )
            } else {
                let h = rng.range(0, 50) * 1_000_000;
                format!(r#"{{"type":"asset","asset":"BTC","haircut":{}}}"#, dec(&mut rng, h))
            }
        } else if roll < 97 && out.len() > config.events / 2 {
            // Settle a future or an option, late in the stream.
            let i = 2 + rng.below(3) as usize;
            let sym = &syms[i];
            settled[i] = true;
            let p = mark_of(sym, &index, &mut rng).max(index[sym.base]);
            format!(r#"{{"type":"settle","symbol":"{}","price":{}}}"#, sym.name, dec(&mut rng, p))
        } else {
            let m = mark_of(s, &index, &mut rng);
            format!(r#"{{"type":"price","symbol":"{}","price":{}}}"#, s.name, dec(&mut rng, m))
        };
        out.push(line);
    }
    let _ = settled;
    out
}

/// A liquidation-side event: mostly a liquidation fill of `s` near its mark `m` (the side and mode at random, so
/// some do not reduce a position and are refused; the price up to 8% against the closing side, so fills land
/// above and below bankruptcy prices), else the fund's events, now and then out of bounds.
fn liquidation_event(rng: &mut Rng, account: &str, s: &Sym, m: i64) -> String {
    let roll = rng.below(100);
    if roll < 70 {
        let sell = rng.chance(50);
        // Closing a long sells: worse is lower; closing a short buys: worse is higher.
        let adverse = m / 1000 * rng.range(-30, 80);
        let price = if sell { m - adverse } else { m + adverse }.max(1);
        let qty = rng.range(1, 60) * 1_000_000 * if s.base == 1 { 10 } else { 1 };
        let mode = if matches!(s.kind, SymKind::Perp | SymKind::Future) && rng.chance(25) {
            r#","margin_mode":"isolated""#
        } else {
            ""
        };
        format!(
            r#"{{"type":"trade","account":"{account}","symbol":"{}","side":"{}","qty":{},"price":{},"liquidation":true{mode}}}"#,
            s.name,
            if sell { "sell" } else { "buy" },
            dec(rng, qty),
            dec(rng, price)
        )
    } else if roll < 88 {
        // In more often than out; a withdrawal beyond the balance is refused.
        let amount = rng.range(-40, 60) * 100_000_000;
        let amount = if amount == 0 { 100_000_000 } else { amount };
        format!(r#"{{"type":"insurance","amount":{}}}"#, dec(rng, amount))
    } else if roll < 97 {
        let fee = rng.range(0, 50) * 100_000; // 0 to 5%
        format!(r#"{{"type":"liquidation_params","max_liquidation_fee":{}}}"#, dec(rng, fee))
    } else if rng.chance(50) {
        r#"{"type":"insurance","amount":"0"}"#.to_owned()
    } else {
        r#"{"type":"liquidation_params","max_liquidation_fee":"1.5"}"#.to_owned()
    }
}

/// A timestamp (seconds since the epoch) as RFC 3339, sometimes with a fraction or a zone offset.
fn rfc3339(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem / 60 % 60, rem % 60)
}

/// A contract v2 event: the clock moves on (now and then past the options' expiry, rarely backwards), an
/// underlying's `risk` parameters change (sometimes out of bounds), or an account switches margin model.
fn v2_event(rng: &mut Rng, account: &str, clock: &mut i64) -> String {
    match rng.below(10) {
        0..=3 => {
            let step = if rng.chance(5) { -3_600 } else { rng.range(60, 20 * 86_400) };
            let t = *clock + step;
            if step > 0 {
                *clock = t;
            }
            format!(r#"{{"type":"clock","time":"{}"}}"#, rfc3339(t))
        }
        4..=5 => {
            let underlying = if rng.chance(50) { "BTC" } else { "ETH" };
            let mut fields = String::new();
            if rng.chance(70) {
                let range = if rng.chance(5) { 120 } else { rng.range(2, 40) };
                fields.push_str(&format!(r#","price_range":"0.{range:02}""#));
            }
            if rng.chance(50) {
                fields.push_str(&format!(r#","buckets":{}"#, rng.range(1, 6)));
            }
            if rng.chance(40) {
                fields.push_str(&format!(r#","vol_up":"{}.{}""#, rng.range(0, 2), rng.range(0, 9)));
            }
            if rng.chance(30) {
                fields.push_str(&format!(r#","vol_down":"0.{}""#, rng.range(0, 9)));
            }
            if rng.chance(30) {
                fields.push_str(&format!(r#","option_contingency":"0.0{}""#, rng.range(0, 9)));
            }
            if rng.chance(30) {
                fields.push_str(&format!(r#","future_contingency":"0.0{}""#, rng.range(0, 9)));
            }
            if rng.chance(30) {
                fields.push_str(&format!(r#","mm_factor":"0.{}""#, rng.range(1, 9)));
            }
            format!(r#"{{"type":"risk","underlying":"{underlying}"{}}}"#, fields.replace("\"0.120\"", "\"1.20\""))
        }
        _ => {
            let margin = if rng.chance(75) { "portfolio" } else { "standard" };
            format!(r#"{{"type":"account_config","account":"{account}","margin":"{margin}"}}"#)
        }
    }
}

fn bad_event(rng: &mut Rng, account: &str) -> String {
    match rng.below(16) {
        0 => "{not json".to_owned(),
        1 => "[1,2,3]".to_owned(),
        2 => r#"{"type":"teleport","account":"x"}"#.to_owned(),
        3 => format!(r#"{{"type":"deposit","account":"{account}","asset":"USDC","amount":"NaN"}}"#),
        4 => format!(r#"{{"type":"deposit","account":"{account}","asset":"USDC","amount":1e400}}"#),
        5 => format!(r#"{{"type":"deposit","account":"{account}","asset":"USDC","amount":"0.123456789"}}"#),
        6 => format!(
            r#"{{"type":"trade","account":"{account}","symbol":"BTC-PERP","side":"buy","qty":"-1","price":"1"}}"#
        ),
        7 => format!(
            r#"{{"type":"trade","account":"{account}","symbol":"BTC-PERP","side":"buy","qty":"0","price":"1"}}"#
        ),
        8 => format!(r#"{{"type":"deposit","account":"{account}","asset":"USDC","amount":"5","memo":"x"}}"#),
        9 => format!(r#"{{"type":"deposit","account":"{account}","asset":"DOGE","amount":"5"}}"#),
        10 => format!(r#"{{"type":"trade","account":"{account}","symbol":"NOPE","side":"buy","qty":"1","price":"1"}}"#),
        11 => r#"{"type":"withdraw","account":"nobody","asset":"USDC","amount":"1"}"#.to_owned(),
        12 => format!(
            r#"{{"type":"trade","account":"{account}","symbol":"BTC-C","side":"sell","qty":"1","price":"1","margin_mode":"isolated"}}"#
        ),
        13 => r#"{"type":"funding","symbol":"BTC-FUT","rate":"0.001"}"#.to_owned(),
        14 => format!(r#"{{"type":"transfer","account":"{account}","symbol":"BTC-C","amount":"5"}}"#),
        _ => {
            let v = rng.range(1, 9);
            format!(r#"{{"type":"perp","symbol":"BTC-PERP","tiers":[{{"imr":"0.0{v}","mmr":"0.5"}}]}}"#)
        }
    }
}
