//! Synthetic workloads for benches and demos (`vigil gen`): many accounts with Pareto-distributed sizes, perps
//! with real-looking tiers and some options, prices as geometric random walks, a configurable mix of ticks,
//! trades and funding, and a configurable share of accounts close to their maintenance margin. Seeded.
//!
//! Unlike `generate` (small adversarial streams for differential tests), this aims at realistic shape and scale.
//! Floats appear only in choosing numbers; every number is printed as an exact decimal string.

use std::io::{self, Write};

use crate::rng::Rng;

#[derive(Clone, Debug)]
pub struct Workload {
    pub seed: u64,
    pub accounts: usize,
    /// Perpetuals; options are added on top (`options`).
    pub instruments: usize,
    /// Options (calls and puts on the first underlyings).
    pub options: usize,
    /// Events after the setup (reference data, initial prices, deposits and opening trades).
    pub events: usize,
    /// Mix of the events after setup, in parts (normalised): ticks, trades, funding.
    pub ticks: u32,
    pub trades: u32,
    pub funding: u32,
    /// Percent of accounts opened close to their maintenance margin.
    pub near_percent: u32,
    /// Per-tick volatility of the geometric random walk (e.g. 0.0005 = 5 bp).
    pub volatility: f64,
}

impl Default for Workload {
    fn default() -> Self {
        Self {
            seed: 1,
            accounts: 10_000,
            instruments: 8,
            options: 4,
            events: 1_000_000,
            ticks: 80,
            trades: 20,
            funding: 0,
            near_percent: 1,
            volatility: 0.0005,
        }
    }
}

/// Real-looking tier tables (Binance-like brackets), scaled by the instrument's price level.
const TIERS: [&str; 3] = [
    r#"[{"max_notional":"50000","imr":"0.008","mmr":"0.004"},{"max_notional":"250000","imr":"0.01","mmr":"0.005"},{"max_notional":"1000000","imr":"0.02","mmr":"0.01"},{"max_notional":"10000000","imr":"0.05","mmr":"0.025"},{"imr":"0.1","mmr":"0.05"}]"#,
    r#"[{"max_notional":"10000","imr":"0.02","mmr":"0.01"},{"max_notional":"100000","imr":"0.04","mmr":"0.02"},{"max_notional":"1000000","imr":"0.1","mmr":"0.05"},{"imr":"0.2","mmr":"0.1"}]"#,
    r#"[{"max_notional":"5000","imr":"0.05","mmr":"0.025"},{"max_notional":"50000","imr":"0.1","mmr":"0.05"},{"imr":"0.25","mmr":"0.125"}]"#,
];
/// First-tier maintenance rate of each table above.
const MMR0: [f64; 3] = [0.004, 0.01, 0.025];

fn normal(rng: &mut Rng) -> f64 {
    // Box–Muller.
    let u1 = rng.unit().max(1e-12);
    let u2 = rng.unit();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A decimal with `places` places, exact text (never an exponent).
fn dec(x: f64, places: usize) -> String {
    format!("{:.*}", places, x.max(0.0))
}

struct Perp {
    symbol: String,
    price: f64,
    table: usize,
}

struct Opt {
    symbol: String,
    underlying: usize,
    call: bool,
    strike: f64,
}

/// Writes the workload as JSON Lines; returns the number of lines written.
pub fn write_workload(w: &Workload, out: &mut impl Write) -> io::Result<u64> {
    let mut rng = Rng::new(w.seed);
    let mut lines = 0u64;
    let mut emit = |out: &mut dyn Write, s: String| -> io::Result<()> {
        lines += 1;
        out.write_all(s.as_bytes())?;
        out.write_all(b"\n")
    };
    let n_perps = w.instruments.max(1);
    let mut perps: Vec<Perp> = (0..n_perps)
        .map(|i| {
            // Price levels from ~0.5 to ~60 000, log-uniform.
            let price = (10f64).powf(-0.3 + 5.1 * rng.unit());
            Perp { symbol: format!("P{i}-PERP"), price, table: i % TIERS.len() }
        })
        .collect();
    // Underlying assets: one per perp, index = the perp's price; the perp's mark tracks it.
    for (i, p) in perps.iter().enumerate() {
        let haircut = [0.0, 0.02, 0.05, 0.1][i % 4];
        emit(out, format!(r#"{{"type":"asset","asset":"U{i}","haircut":"{haircut}"}}"#))?;
        emit(
            out,
            format!(r#"{{"type":"perp","symbol":"{}","underlying":"U{i}","tiers":{}}}"#, p.symbol, TIERS[p.table]),
        )?;
    }
    let opts: Vec<Opt> = (0..w.options)
        .map(|i| {
            let underlying = i % n_perps;
            let call = i % 2 == 0;
            let strike = perps[underlying].price * if call { 1.1 } else { 0.9 };
            Opt { symbol: format!("O{i}-{}", if call { "C" } else { "P" }), underlying, call, strike }
        })
        .collect();
    for o in &opts {
        emit(
            out,
            format!(
                r#"{{"type":"option","symbol":"{}","underlying":"U{}","right":"{}","strike":"{}","expiry":"2027-06-25T08:00:00Z"}}"#,
                o.symbol,
                o.underlying,
                if o.call { "call" } else { "put" },
                dec(o.strike, 4)
            ),
        )?;
    }
    let option_mark = |o: &Opt, u: f64| {
        let intrinsic = if o.call { (u - o.strike).max(0.0) } else { (o.strike - u).max(0.0) };
        intrinsic + 0.03 * u
    };
    for (i, p) in perps.iter().enumerate() {
        emit(out, format!(r#"{{"type":"price","symbol":"U{i}","price":"{}"}}"#, dec(p.price, 4)))?;
        emit(out, format!(r#"{{"type":"price","symbol":"{}","price":"{}"}}"#, p.symbol, dec(p.price, 4)))?;
    }
    for o in &opts {
        let m = option_mark(o, perps[o.underlying].price);
        emit(out, format!(r#"{{"type":"price","symbol":"{}","price":"{}"}}"#, o.symbol, dec(m, 4)))?;
    }
    // Accounts: Pareto(α = 1.5, x_min = 1 000) deposits; each opens 1–3 perp positions (and maybe an option).
    let mut holdings: Vec<Vec<usize>> = Vec::with_capacity(w.accounts);
    for a in 0..w.accounts {
        let deposit = (1000.0 * rng.unit().max(1e-9).powf(-1.0 / 1.5)).min(5_000_000.0);
        emit(out, format!(r#"{{"type":"deposit","account":"a{a}","asset":"USDC","amount":"{}"}}"#, dec(deposit, 2)))?;
        let near = rng.below(100) < u64::from(w.near_percent);
        let k = if near { 1 } else { 1 + rng.below(3) as usize };
        let mut held = Vec::with_capacity(k);
        for _ in 0..k {
            let i = rng.below(n_perps as u64) as usize;
            if held.contains(&i) {
                continue;
            }
            held.push(i);
            let p = &perps[i];
            // Near accounts: equity ≈ 1.02 × MM at the first tier; others: leverage 0.5–3 split over k positions.
            let notional = if near {
                deposit / (MMR0[p.table] * 1.02 + 0.0001)
            } else {
                deposit * (0.5 + 2.5 * rng.unit()) / k as f64
            };
            // Near accounts stay within the first tier so their MM is the one assumed.
            let notional = if near { notional.min(40_000.0) } else { notional };
            let deposit_needed = if near { notional * MMR0[p.table] * 1.02 } else { 0.0 };
            if near && deposit_needed < deposit {
                // Withdraw the excess so the account really sits near MM.
                emit(
                    out,
                    format!(
                        r#"{{"type":"withdraw","account":"a{a}","asset":"USDC","amount":"{}"}}"#,
                        dec(deposit - deposit_needed, 2)
                    ),
                )?;
            }
            let qty = (notional / p.price).max(0.0001);
            let side = if rng.chance(50) { "buy" } else { "sell" };
            emit(
                out,
                format!(
                    r#"{{"type":"trade","account":"a{a}","symbol":"{}","side":"{side}","qty":"{}","price":"{}"}}"#,
                    p.symbol,
                    dec(qty, 4),
                    dec(p.price, 4)
                ),
            )?;
        }
        if !opts.is_empty() && !near && rng.chance(10) {
            let o = &opts[rng.below(opts.len() as u64) as usize];
            let m = option_mark(o, perps[o.underlying].price);
            emit(
                out,
                format!(
                    r#"{{"type":"trade","account":"a{a}","symbol":"{}","side":"buy","qty":"{}","price":"{}"}}"#,
                    o.symbol,
                    dec((deposit * 0.05 / m).max(0.0001), 4),
                    dec(m, 4)
                ),
            )?;
        }
        holdings.push(held);
    }
    // The stream: ticks (geometric random walk of an underlying, then its perp's mark), trades, funding.
    let total = (w.ticks + w.trades + w.funding).max(1);
    let mut written = 0usize;
    while written < w.events {
        let roll = rng.below(u64::from(total)) as u32;
        if roll < w.ticks {
            let i = rng.below(n_perps as u64) as usize;
            let p = &mut perps[i];
            p.price *= (w.volatility * normal(&mut rng)).exp();
            let price = p.price.max(0.0001);
            let line = if rng.chance(50) {
                format!(r#"{{"type":"price","symbol":"{}","price":"{}"}}"#, p.symbol, dec(price, 4))
            } else {
                format!(r#"{{"type":"price","symbol":"U{i}","price":"{}"}}"#, dec(price, 4))
            };
            emit(out, line)?;
        } else if roll < w.ticks + w.trades {
            let a = rng.below(w.accounts.max(1) as u64) as usize;
            let Some(&i) = holdings.get(a).and_then(|h| h.first()) else { continue };
            let p = &perps[i];
            let price = p.price * (1.0 + 0.0005 * normal(&mut rng));
            let qty = (1000.0 * rng.unit() / p.price).max(0.0001);
            let side = if rng.chance(50) { "buy" } else { "sell" };
            emit(
                out,
                format!(
                    r#"{{"type":"trade","account":"a{a}","symbol":"{}","side":"{side}","qty":"{}","price":"{}","fee":"{}"}}"#,
                    p.symbol,
                    dec(qty, 4),
                    dec(price.max(0.0001), 4),
                    dec(qty * price * 0.0002, 6)
                ),
            )?;
        } else {
            let i = rng.below(n_perps as u64) as usize;
            let rate = 0.0001 * normal(&mut rng);
            let text = if rate < 0.0 { format!("-{}", dec(-rate, 8)) } else { dec(rate, 8) };
            emit(out, format!(r#"{{"type":"funding","symbol":"{}","rate":"{text}"}}"#, perps[i].symbol))?;
        }
        written += 1;
    }
    Ok(lines)
}
