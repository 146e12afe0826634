//! Cost of one price tick, indexed vs rescan, at 100 000 and 1 000 000 accounts holding the instrument, 1% of
//! them near their threshold. The tick alternates 100 → 99.5 → 100: the near accounts breach and stay in their
//! episode (they are re-evaluated on every move), the others never come close.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vigil_benches::Fixture;
use vigil_engine::Detection;
use vigil_model::{Event, Price};

fn tick(c: &mut Criterion) {
    let mut group = c.benchmark_group("tick_1pct_near");
    group.sample_size(10);
    for accounts in [100_000usize, 1_000_000] {
        for detection in [Detection::Indexed, Detection::Rescan] {
            let mut f = Fixture::holders(accounts, 1, detection);
            let mut up = false;
            let id = BenchmarkId::new(format!("{detection:?}").to_lowercase(), accounts);
            group.bench_function(id, |b| {
                b.iter(|| {
                    up = !up;
                    let price = if up { Price(9_950_000_000) } else { Price::units(100) };
                    f.apply(black_box(&Event::Price { symbol: "WIDE".into(), price }));
                })
            });
            eprintln!("{accounts} accounts, {detection:?}: {} exact evaluations so far", f.engine.evaluations());
        }
    }
    group.finish();
}

criterion_group!(benches, tick);
criterion_main!(benches);
