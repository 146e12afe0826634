//! The pre-trade check's round trip inside the node, without HTTP: `Checker::check` → the owning shard's query
//! channel and wake-up → `Engine::check` → the oneshot answer, on a pipeline of 2 shards holding a `vigil gen`
//! book (10 000 accounts, 8 perps). Parked shards (`Wait::Park`, the node's default) are woken by each query, as
//! in a node that is not ingesting. Compare with the HTTP figures of `vigil load` (docs/performance.md): the
//! difference is the network stack, HTTP and the scheduler. Also the monitoring pass a shard makes every 5 s for
//! the metrics (accounts, positions, liquidating, margin bands), over its ~5 000 accounts.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vigil_model::{Amount, Event, Fill, MarginMode, Offset, Price, Qty, Side, parse_line};
use vigil_node::pipeline::{Answer, Pipeline, PipelineConfig, Wait};
use vigil_testkit::{Workload, write_workload};

fn round_trip(c: &mut Criterion) {
    let w = Workload { accounts: 10_000, events: 0, options: 0, ..Workload::default() };
    let mut text = Vec::new();
    write_workload(&w, &mut text).expect("in memory");
    let events: Vec<Event> =
        String::from_utf8(text).expect("UTF-8").lines().map(|l| parse_line(l).expect("valid")).collect();
    let accounts: Vec<String> = events
        .iter()
        .filter_map(|e| match e {
            Event::Deposit { account, .. } => Some(account.clone()),
            _ => None,
        })
        .collect();
    let (symbol, price) = events
        .iter()
        .find_map(|e| match e {
            Event::Price { symbol, price } if symbol.starts_with('P') => Some((symbol.clone(), *price)),
            _ => None,
        })
        .unwrap_or(("P0".into(), Price::units(100)));
    let mut group = c.benchmark_group("check_round_trip");
    group.sample_size(50).measurement_time(Duration::from_secs(10));
    for wait in [Wait::Park, Wait::SpinYield] {
        let config = PipelineConfig { shards: 2, wait, pin: false, ..PipelineConfig::default() };
        let mut p = Pipeline::start(&config).expect("threads");
        for e in events.iter().cloned() {
            p.submit(e);
        }
        p.flush(&mut |_| {});
        let checker = p.checker();
        let mut i = 0usize;
        group.bench_function(format!("2_shards_{wait:?}").to_lowercase(), |b| {
            b.iter(|| {
                i = i.wrapping_add(7919);
                let fill = Fill {
                    account: accounts[i % accounts.len()].clone(),
                    symbol: symbol.clone(),
                    side: Side::Buy,
                    qty: Qty::units(1),
                    price,
                    fee: Amount::ZERO,
                    margin_mode: MarginMode::Cross,
                };
                match checker.check(fill, Offset(0)).blocking_recv() {
                    Ok(Answer::Check(r)) => r.is_ok(),
                    _ => false,
                }
            })
        });
        if wait == Wait::Park {
            // The monitoring pass (`Engine::stats`, asked every 5 s by the node): one shard's accounts, counted.
            group.bench_function("stats_pass_one_shard_of_2", |b| {
                b.iter(|| matches!(checker.stats(0).blocking_recv(), Ok(Answer::Stats(s)) if s.accounts > 0))
            });
        }
        p.finish(&mut |_| {});
    }
    group.finish();
}

criterion_group!(benches, round_trip);
criterion_main!(benches);
