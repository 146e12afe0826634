//! Stress tests (issue 12): what one shard's part of a stress request costs on a book shaped like the peer's
//! (`stress_peer.py`: USDC deposits, a fifth with BTC collateral, one to three tiered perps per account, a tenth
//! writing a BTC put), and with a tenth of the accounts on portfolio margin. One request's cost is a fixed part
//! (laying the shard's book out and evaluating it at current prices) plus a pass per scenario: `one_scenario`
//! and `21_steps` measure both, so the fixed part is their difference over 20.

// The allocator the binary uses: figures comparable with the node's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_engine::stress::{Grid, Request, Scenario};
use vigil_engine::{Config, Engine};
use vigil_model::{Offset, parse_line};
use vigil_testkit::Rng;

/// One shard's share of a million-account book on two shards.
const ACCOUNTS: usize = 500_000;

const PERPS: [(&str, &str, i64); 3] =
    [("BTC-PERP", "BTC", 60_000), ("ETH-PERP", "ETH", 3_000), ("SOL-PERP", "SOL", 150)];

/// The peer's book, generated here (the project never reads `../shared`); `portfolio_every` > 0 switches every
/// n-th account to portfolio margin.
fn book(portfolio_every: usize) -> Engine {
    let tiers = r#"[{"max_notional":"50000","imr":"0.02","mmr":"0.01"},{"max_notional":"500000","imr":"0.05","mmr":"0.025"},{"imr":"0.1","mmr":"0.05"}]"#;
    let mut lines: Vec<String> =
        ["BTC", "ETH", "SOL"].iter().map(|a| format!(r#"{{"type":"asset","asset":"{a}","haircut":"0.05"}}"#)).collect();
    for (s, u, _) in PERPS {
        lines.push(format!(r#"{{"type":"perp","symbol":"{s}","underlying":"{u}","tiers":{tiers}}}"#));
    }
    lines.push(r#"{"type":"option","symbol":"BTC-P-55000","underlying":"BTC","right":"put","strike":"55000","expiry":"2027-03-26T08:00:00Z"}"#.into());
    lines.push(r#"{"type":"clock","time":"2026-12-02T08:00:00Z"}"#.into());
    for (s, u, p) in PERPS {
        lines.push(format!(r#"{{"type":"price","symbol":"{u}","price":"{p}"}}"#));
        lines.push(format!(r#"{{"type":"price","symbol":"{s}","price":"{p}"}}"#));
    }
    lines.push(r#"{"type":"price","symbol":"BTC-P-55000","price":"1800"}"#.into());
    let mut rng = Rng::new(7);
    for i in 0..ACCOUNTS {
        let a = format!("a{i:07}");
        let usd = *rng.pick(&[1000, 5000, 20000, 100_000]);
        lines.push(format!(r#"{{"type":"deposit","account":"{a}","asset":"USDC","amount":"{usd}"}}"#));
        if rng.chance(20) {
            lines.push(format!(r#"{{"type":"deposit","account":"{a}","asset":"BTC","amount":"0.5"}}"#));
        }
        if portfolio_every > 0 && i % portfolio_every == 0 {
            lines.push(format!(r#"{{"type":"account_config","account":"{a}","margin":"portfolio"}}"#));
        }
        let first = rng.below(3) as usize;
        for k in 0..=rng.below(3) as usize {
            let (s, _, p) = PERPS[(first + k) % 3];
            let q = (usd * rng.pick(&[1, 2, 5, 10])) as f64 / p as f64;
            let side = if rng.chance(50) { "buy" } else { "sell" };
            lines.push(format!(
                r#"{{"type":"trade","account":"{a}","symbol":"{s}","side":"{side}","qty":"{:.3}","price":"{p}"}}"#,
                q.max(0.001)
            ));
        }
        if rng.chance(10) {
            lines.push(format!(
                r#"{{"type":"trade","account":"{a}","symbol":"BTC-P-55000","side":"sell","qty":"0.1","price":"1800"}}"#
            ));
        }
    }
    let mut engine = Engine::new(&Config::default());
    let mut triggers = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let event = parse_line(line).expect("generated events parse");
        let _ = engine.apply(Offset(i as u64 + 1), &event, &mut triggers);
    }
    engine
}

fn crash() -> Scenario {
    Scenario {
        name: "crash".into(),
        moves: vec![("BTC".into(), -30_000_000), ("ETH".into(), -40_000_000), ("SOL".into(), -50_000_000)],
        vol: vec![("BTC".into(), 50_000_000)],
    }
}

fn stress(c: &mut Criterion) {
    let grid = Request {
        grids: vec![Grid { underlying: "BTC".into(), from: -50_000_000, to: 50_000_000, steps: 21 }],
        top: 10,
        ..Request::default()
    };
    for (name, every) in [("standard", 0), ("portfolio_10pct", 10)] {
        let engine = book(every);
        let mut g = c.benchmark_group(format!("stress/{name}"));
        g.sample_size(10);
        g.bench_function("one_scenario_500k_accounts", |b| {
            b.iter(|| engine.stress(black_box(&[crash()]), 10, &mut |_| {}).expect("valid"))
        });
        let steps = grid.expand();
        g.bench_function("21_steps_500k_accounts", |b| {
            b.iter(|| engine.stress(black_box(&steps), 10, &mut |_| {}).expect("valid"))
        });
        g.finish();
    }
}

criterion_group!(benches, stress);
criterion_main!(benches);
