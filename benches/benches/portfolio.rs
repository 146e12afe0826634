//! Portfolio margin (issue 12): what an option's scenario vector costs, what a group costs once its vectors are
//! current, and what a tick of an underlying costs per portfolio account holding it.

// The allocator the binary uses: figures comparable with the node's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_benches::Fixture;
use vigil_model::portfolio::{Leg, OptionVector, RiskParams, group_margin, option_vector};
use vigil_model::{Offset, Price, Qty, Right, parse_line};

fn p(s: &str) -> Price {
    Price::parse(s).expect("constant")
}

/// Strikes around 60 000, calls and puts alternating.
fn strike(i: usize) -> (Right, Price) {
    let right = if i.is_multiple_of(2) { Right::Call } else { Right::Put };
    (right, Price::units(50_000 + 1_000 * (i as i64 % 20)))
}

fn model(c: &mut Criterion) {
    let params = RiskParams::default();
    let t = 45.0 / 365.0;
    c.bench_function("portfolio/option_vector", |b| {
        b.iter(|| option_vector(&params, Right::Call, p("62000"), black_box(t), p("60000"), p("2100")))
    });
    let vectors: Vec<OptionVector> = (0..20)
        .map(|i| {
            let (right, k) = strike(i);
            option_vector(&params, right, k, t, p("60000"), p("2500"))
        })
        .collect();
    let legs: Vec<Leg<'_>> = vectors
        .iter()
        .enumerate()
        .map(|(i, vector)| Leg::Option { qty: Qty::units(if i % 3 == 0 { -2 } else { 1 }), vector })
        .collect();
    let index = p("60000");
    c.bench_function("portfolio/group/20_option_legs", |b| b.iter(|| group_margin(&params, index, black_box(&legs))));
    // The tick bench's group: a short perp and five options.
    let mut six = vec![Leg::Linear { qty: Qty(-50_000_000), mark: index }];
    six.extend(legs[..5].iter().copied());
    c.bench_function("portfolio/group/a_perp_and_5_options", |b| {
        b.iter(|| group_margin(&params, index, black_box(&six)))
    });
}

const ACCOUNTS: usize = 100_000;
/// One account in ten is a portfolio account: a BTC perp and five BTC options out of forty listed.
const PORTFOLIO_EVERY: usize = 10;
const OPTIONS: usize = 40;

/// 100 000 accounts with a perp each (indexed detection, the default); every tenth also portfolio.
fn book() -> Fixture {
    let mut f = Fixture::new(ACCOUNTS, 100, false);
    let lines: Vec<String> = [
        r#"{"type":"clock","time":"2026-12-01T00:00:00Z"}"#.to_owned(),
        r#"{"type":"asset","asset":"BTC"}"#.to_owned(),
        r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#.to_owned(),
        r#"{"type":"price","symbol":"BTC","price":"60000"}"#.to_owned(),
        r#"{"type":"price","symbol":"BTC-PERP","price":"60000"}"#.to_owned(),
    ]
    .into_iter()
    .chain((0..OPTIONS).flat_map(|i| {
        let (right, k) = strike(i);
        let right = if right == Right::Call { "call" } else { "put" };
        let expiry = if i < OPTIONS / 2 { "2026-12-25T08:00:00Z" } else { "2027-03-26T08:00:00Z" };
        [
            format!(
                r#"{{"type":"option","symbol":"O{i}","underlying":"BTC","right":"{right}","strike":"{k}","expiry":"{expiry}"}}"#
            ),
            format!(r#"{{"type":"price","symbol":"O{i}","price":"{}"}}"#, 1500 + 50 * i),
        ]
    }))
    .collect();
    for l in &lines {
        f.apply(&parse_line(l).expect("bench line"));
    }
    for a in (0..ACCOUNTS).step_by(PORTFOLIO_EVERY) {
        let account = format!("acct-{a:07}");
        let mut account_lines = vec![
            format!(r#"{{"type":"deposit","account":"{account}","asset":"USDC","amount":"100000"}}"#),
            format!(r#"{{"type":"account_config","account":"{account}","margin":"portfolio"}}"#),
            format!(
                r#"{{"type":"trade","account":"{account}","symbol":"BTC-PERP","side":"sell","qty":"0.5","price":"60000"}}"#
            ),
        ];
        for leg in 0..5 {
            let o = (a / PORTFOLIO_EVERY * 7 + leg * 3) % OPTIONS;
            let side = if leg % 2 == 0 { "buy" } else { "sell" };
            account_lines.push(format!(
                r#"{{"type":"trade","account":"{account}","symbol":"O{o}","side":"{side}","qty":"1","price":"{}"}}"#,
                1500 + 50 * o
            ));
        }
        for l in &account_lines {
            f.apply(&parse_line(l).expect("bench line"));
        }
    }
    f
}

fn tick(c: &mut Criterion) {
    let mut f = book();
    let holders = ACCOUNTS / PORTFOLIO_EVERY;
    let mut group = c.benchmark_group("portfolio/tick");
    group.sample_size(20);
    let mut up = false;
    // Every tick moves the index: each option's vector is recomputed once (40), then each of the 10 000 portfolio
    // accounts is revalued from the shared vectors. Divide by 10 000 for the cost per account holding it.
    group.bench_function(format!("index/{holders}_portfolio_accounts_of_{ACCOUNTS}"), |b| {
        b.iter_batched(
            || (),
            |()| {
                up = !up;
                let price = if up { p("60100") } else { p("60000") };
                f.apply(black_box(&vigil_model::Event::Price { symbol: "BTC".into(), price }));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
    black_box(f.engine.offset() > Offset(0));
}

criterion_group!(benches, model, tick);
criterion_main!(benches);
