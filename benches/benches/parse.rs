//! Per-line cost of the event parser on the load generator's stream (trades, price ticks, funding, deposits, as
//! `vigil load` and `vigil publish` read them): `parse_line` (flat lines read in place) against the full reading
//! through serde_json's `Value`, on the same lines in one run; and the same for pre-trade check bodies.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_model::{parse_line, parse_line_full};
use vigil_node::http::{check_fill, check_fill_full, check_fills, check_fills_full};
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

/// A pre-trade check's body (`POST /v1/accounts/{id}/check`) and a batch of 100 (`POST /v1/checks`), read in place
/// against through serde_json's `Value`.
fn checks(c: &mut Criterion) {
    let body = br#"{"symbol":"P3-PERP","side":"buy","qty":"0.001","price":"8050.5437"}"#;
    let batch = format!(
        "[{}]",
        (0..100)
            .map(|i| format!(
                r#"{{"account":"a{i}","symbol":"P3-PERP","side":"buy","qty":"0.001","price":"8050.5437"}}"#
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut group = c.benchmark_group("check_body");
    group.bench_function("one/in_place", |b| b.iter(|| check_fill(black_box("a68031"), black_box(body)).is_ok()));
    group.bench_function("one/serde_json_value", |b| {
        b.iter(|| check_fill_full(black_box("a68031"), black_box(body)).is_ok())
    });
    group.throughput(Throughput::Elements(100));
    group
        .bench_function("batch_of_100/in_place", |b| b.iter(|| check_fills(black_box(batch.as_bytes()), 1000).is_ok()));
    group.bench_function("batch_of_100/serde_json_value", |b| {
        b.iter(|| check_fills_full(black_box(batch.as_bytes()), 1000).is_ok())
    });
    group.finish();
}

criterion_group!(benches, parse, checks);
criterion_main!(benches);
