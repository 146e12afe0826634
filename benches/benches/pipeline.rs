//! In-process throughput, sequencer → shard threads, for 1 and 2 shards, on a `vigil gen` mix of 80% ticks and
//! 20% trades (10 000 accounts, 8 perps, 1% near maintenance margin). Events are parsed before timing: this
//! measures sequencing, routing over the rings, the shards' work and the output merge.

// The allocator the `vigil` binary uses (events cross threads: see docs/performance.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vigil_engine::{Config, Detection};
use vigil_model::{Event, parse_line};
use vigil_node::pipeline::{Pipeline, PipelineConfig, Wait};
use vigil_testkit::{Workload, write_workload};

const STREAM_EVENTS: usize = 500_000;

fn events() -> (Vec<Event>, Vec<Event>) {
    let w = Workload { accounts: 10_000, events: STREAM_EVENTS, options: 0, ..Workload::default() };
    let mut text = Vec::new();
    write_workload(&w, &mut text).expect("writing to memory");
    let text = String::from_utf8(text).expect("UTF-8");
    let all: Vec<Event> = text.lines().map(|l| parse_line(l).expect("generated events are valid")).collect();
    let split = all.len() - STREAM_EVENTS;
    let (setup, stream) = all.split_at(split);
    (setup.to_vec(), stream.to_vec())
}

fn throughput(c: &mut Criterion) {
    let (setup, stream) = events();
    let mut group = c.benchmark_group("pipeline_80_20");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20))
        .throughput(Throughput::Elements(stream.len() as u64));
    for (shards, pin) in [(1usize, true), (2, true), (1, false), (2, false)] {
        let config = PipelineConfig {
            engine: Config { detection: Detection::Indexed, ..Config::default() },
            shards,
            wait: Wait::Park,
            pin,
            ..PipelineConfig::default()
        };
        let name = format!("{shards}_shards{}", if pin { "" } else { "_unpinned" });
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut p = Pipeline::start(&config).expect("threads");
                    let mut released = 0u64;
                    for e in setup.iter().cloned() {
                        p.submit(e);
                    }
                    p.flush(&mut |_| released += 1);
                    let batch = stream.clone();
                    let start = Instant::now();
                    for e in batch {
                        p.submit(e);
                    }
                    p.flush(&mut |_| released += 1);
                    total += start.elapsed();
                    p.finish(&mut |_| released += 1);
                    std::hint::black_box(released);
                }
                total
            })
        });
    }
    // The same stream on one engine in the calling thread: the shard's own work, without rings or threads.
    group.bench_function("engine_only", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut engines = vigil_engine::Sharded::new(&Config::default(), 1);
                let mut triggers = Vec::new();
                for e in &setup {
                    let _ = engines.apply(e, &mut triggers);
                }
                let start = Instant::now();
                for e in &stream {
                    triggers.clear();
                    let _ = engines.apply(e, &mut triggers);
                }
                total += start.elapsed();
                std::hint::black_box(&engines);
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
