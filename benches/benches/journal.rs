//! The journal's group-commit ceiling on this disk: batches of N records of an encoded trade (about 80 bytes),
//! each batch written and `fdatasync`ed once. Also one sync per record, the floor group commit avoids. Each with
//! preallocated segments (the default) and with plain appends, which make every `fdatasync` flush metadata too.
//! Runs in a temporary directory on the same filesystem as the build (TMPDIR to change it).

use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vigil_model::{Offset, parse_line};
use vigil_store::codec::encode_event;
use vigil_store::journal::{Journal, JournalConfig};
use vigil_store::storage::OsStorage;

fn payload() -> Vec<u8> {
    let e = parse_line(r#"{"type":"trade","account":"acct-0000042","symbol":"P7-PERP","side":"buy","qty":"1.5","price":"100.25","fee":"0.01"}"#)
        .expect("valid");
    let mut out = Vec::new();
    encode_event(&e, &mut out).expect("encodable");
    out
}

fn group_commit(c: &mut Criterion) {
    let payload = payload();
    let mut group = c.benchmark_group("journal_group_commit");
    group.sample_size(10).measurement_time(Duration::from_secs(5));
    for (batch, preallocate) in [(1u64, true), (1, false), (100, true), (100, false), (1000, true), (1000, false)] {
        group.throughput(Throughput::Elements(batch));
        let mode = if preallocate { "preallocated" } else { "appending" };
        let id = format!("{batch}_records_{}_bytes_{mode}", payload.len());
        group.bench_function(BenchmarkId::from_parameter(id), |b| {
            let dir = tempfile::tempdir_in(std::env::temp_dir()).expect("temp dir");
            let config = JournalConfig { preallocate, ..JournalConfig::default() };
            let (mut j, _) = Journal::open(dir.path(), config, std::sync::Arc::new(OsStorage)).expect("open");
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..batch {
                        let next = Offset(j.appended().0 + 1);
                        j.append(next, &payload).expect("append");
                    }
                    j.commit().expect("commit");
                }
                start.elapsed()
            });
        });
    }
    group.finish();
}

criterion_group!(benches, group_commit);
criterion_main!(benches);
