//! Per-line cost of the event parser on the load generator's stream (trades, price ticks, funding, deposits, as
//! `vigil load` and `vigil publish` read them): `parse_line` (flat lines read in place) against the full reading
//! through serde_json's `Value`, on the same lines in one run.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_model::{parse_line, parse_line_full};
use vigil_testkit::workload::{Workload, write_workload};

// The node's allocator (`vigil` uses it).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn lines() -> Vec<String> {
    let mut text = Vec::new();
    let w = Workload { accounts: 10_000, events: 20_000, ..Workload::default() };
    write_workload(&w, &mut text).expect("in memory");
    String::from_utf8(text).expect("UTF-8").lines().map(str::to_owned).collect()
}

fn parse(c: &mut Criterion) {
    let lines = lines();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(lines.len() as u64));
    group.bench_function("in_place", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(parse_line(black_box(l)).is_ok());
            }
        })
    });
    group.bench_function("serde_json_value", |b| {
        b.iter(|| {
            for l in &lines {
                black_box(parse_line_full(black_box(l)).is_ok());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
