//! Per-event cost on a shard holding 100 000 accounts: a trade, and a price tick (with ~1 000 holders of the
//! instrument, and with every account holding it); and one engine's rate on the stream the cluster figures use
//! (`vigil gen --accounts 100000`: 1M events after setup, 80% ticks, 20% trades), indexed detection.

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use std::time::{Duration, Instant};
use vigil_benches::{Fixture, fill};
use vigil_engine::{Config, Detection, Sharded};
use vigil_model::{Event, Price, parse_line};
use vigil_testkit::{Workload, write_workload};

const ACCOUNTS: usize = 100_000;

fn trade(c: &mut Criterion) {
    let mut f = Fixture::new(ACCOUNTS, 100, false);
    // Pre-built fills on pseudo-random accounts, buys and sells alternating so positions stay bounded.
    let events: Vec<Event> = (0..4096u64)
        .map(|i| {
            let a = (i.wrapping_mul(2_654_435_761) % ACCOUNTS as u64) as usize;
            Event::Trade(fill(&format!("acct-{a:07}"), &f.instruments[a % 100].clone(), i % 2 == 0, 1))
        })
        .collect();
    let mut i = 0;
    c.bench_function("trade/100k_accounts", |b| {
        b.iter(|| {
            f.apply(black_box(&events[i % events.len()]));
            i += 1;
        })
    });
}

fn tick(c: &mut Criterion) {
    let mut f = Fixture::new(ACCOUNTS, 100, true);
    let mut group = c.benchmark_group("tick");
    let mut up = false;
    group.bench_function("100k_accounts/1k_holders", |b| {
        b.iter(|| {
            up = !up;
            let price = Price::units(if up { 101 } else { 100 });
            f.apply(black_box(&Event::Price { symbol: "P7".into(), price }));
        })
    });
    group.sample_size(20);
    group.bench_function("100k_accounts/100k_holders", |b| {
        b.iter_batched(
            || (),
            |()| {
                up = !up;
                let price = Price::units(if up { 101 } else { 100 });
                f.apply(black_box(&Event::Price { symbol: "WIDE".into(), price }));
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn parse(c: &mut Criterion) {
    let line = r#"{"type":"trade","account":"acct-0000042","symbol":"P7","side":"buy","qty":"1.5","price":"100.25","fee":"0.01"}"#;
    c.bench_function("parse/trade_line", |b| b.iter(|| vigil_model::parse_line(black_box(line))));
}

fn stream(c: &mut Criterion) {
    let w = Workload { accounts: ACCOUNTS, ..Workload::default() };
    let mut text = Vec::new();
    write_workload(&w, &mut text).expect("writing to memory");
    let text = String::from_utf8(text).expect("UTF-8");
    let all: Vec<Event> = text.lines().map(|l| parse_line(l).expect("generated events are valid")).collect();
    let (setup, stream) = all.split_at(all.len() - w.events);
    let config = Config { detection: Detection::Indexed, ..Config::default() };
    let mut group = c.benchmark_group("stream");
    group.sample_size(10).measurement_time(Duration::from_secs(20)).throughput(Throughput::Elements(w.events as u64));
    let mut evaluations = 0;
    group.bench_function("gen_100k_accounts", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut engine = Sharded::new(&config, 1);
                let mut triggers = Vec::new();
                for e in setup {
                    let _ = engine.apply(e, &mut triggers);
                }
                let before = engine.shards()[0].evaluations();
                let start = Instant::now();
                for e in stream {
                    triggers.clear();
                    let _ = engine.apply(e, &mut triggers);
                }
                total += start.elapsed();
                evaluations = engine.shards()[0].evaluations() - before;
                black_box(&engine);
            }
            total
        })
    });
    group.finish();
    eprintln!("stream: {evaluations} exact evaluations for {} events", stream.len());
}

criterion_group!(benches, trade, tick, parse, stream);
criterion_main!(benches);
