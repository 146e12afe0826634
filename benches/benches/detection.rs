//! Cost of one price tick, indexed vs rescan, at 100 000 and 1 000 000 accounts holding the instrument, 1% of
//! them near their threshold (equity 1.05 × MM), the others at 1/19 of it.
//!
//! Two price paths:
//! - `hold`: 100 → 99.5 → 100 …: the near accounts breach once and stay in their episode; later moves cross no
//!   threshold, so an indexed tick re-evaluates nobody (a rescan still evaluates everyone).
//! - `flip`: 99.5 → 105.5 → 99.5 …: every tick takes the near accounts out of their episode (equity ≥ IM) or back
//!   into one, so every tick re-evaluates (and triggers) 1% of the accounts: the indexed worst case at 1%.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_benches::Fixture;
use vigil_engine::Detection;
use vigil_model::{Event, Price};

fn tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("tick_1pct_near");
    group.sample_size(10);
    for accounts in [100_000usize, 1_000_000] {
        for (path, low, high) in
            [("hold", 9_950_000_000i64, 10_000_000_000i64), ("flip", 9_950_000_000, 10_550_000_000)]
        {
            for detection in [Detection::Indexed, Detection::Rescan] {
                let mut f = Fixture::holders(accounts, 1, detection);
                let mut up = false;
                let name = format!("{path}/{}", format!("{detection:?}").to_lowercase());
                let before = f.engine.evaluations();
                let mut ticks = 0u64;
                group.bench_function(BenchmarkId::new(name, accounts), |b| {
                    b.iter(|| {
                        up = !up;
                        ticks += 1;
                        let price = Price(if up { low } else { high });
                        f.apply(black_box(&Event::Price { symbol: "WIDE".into(), price }));
                    })
                });
                let per_tick = (f.engine.evaluations() - before) / ticks.max(1);
                eprintln!("{accounts} accounts, {path}, {detection:?}: {per_tick} exact evaluations per tick");
            }
        }
    }
    group.finish();
}

criterion_group!(benches, tick);
criterion_main!(benches);
