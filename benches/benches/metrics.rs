//! The cost of metrics on the hot path: the pipeline (2 shards, sequencer → rings → shards → merge) on a
//! `vigil gen` stream of 200 000 events (80% ticks, 20% trades), first with no recorder installed (every handle
//! a no-op, as in `vigil replay`), then with the node's Prometheus recorder installed (each shard counts every
//! event it applies by type: one atomic add on a cached handle).

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vigil_model::{Event, parse_line};
use vigil_node::pipeline::{Pipeline, PipelineConfig};
use vigil_testkit::{Workload, write_workload};

const EVENTS: usize = 200_000;

fn run(config: &PipelineConfig, setup: &[Event], stream: &[Event], iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut p = Pipeline::start(config).expect("threads");
        for e in setup.iter().cloned() {
            p.submit(e);
        }
        p.flush(&mut |_| {});
        let batch = stream.to_vec();
        let start = Instant::now();
        for e in batch {
            p.submit(e);
        }
        p.flush(&mut |_| {});
        total += start.elapsed();
        p.finish(&mut |_| {});
    }
    total
}

fn recorder_cost(c: &mut Criterion) {
    let w = Workload { accounts: 10_000, events: EVENTS, options: 0, ..Workload::default() };
    let mut text = Vec::new();
    write_workload(&w, &mut text).expect("in memory");
    let all: Vec<Event> =
        String::from_utf8(text).expect("UTF-8").lines().map(|l| parse_line(l).expect("valid")).collect();
    let (setup, stream) = all.split_at(all.len() - EVENTS);
    let config = PipelineConfig { shards: 2, pin: false, ..PipelineConfig::default() };
    let mut group = c.benchmark_group("metrics_recorder");
    group.sample_size(10).measurement_time(Duration::from_secs(15)).throughput(Throughput::Elements(EVENTS as u64));
    group.bench_function("2_shards_without", |b| b.iter_custom(|n| run(&config, setup, stream, n)));
    assert!(vigil_node::metrics::install().is_some(), "the recorder installs");
    group.bench_function("2_shards_with", |b| b.iter_custom(|n| run(&config, setup, stream, n)));
    group.finish();
}

criterion_group!(benches, recorder_cost);
criterion_main!(benches);
