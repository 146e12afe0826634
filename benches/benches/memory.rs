//! Memory per account and per position at 1 000 000 accounts: resident set size before and after, read from
//! /proc (Linux). Not a criterion timing: it prints the figures.

use vigil_benches::{Fixture, fill};
use vigil_engine::Detection;
use vigil_model::{Event, Price, Rate, TierSpec};

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn main() {
    // `cargo bench` passes flags such as `--bench`; a filter that excludes "memory" skips the measurement.
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"memory".contains(a.as_str())) {
        return;
    }
    const N: usize = 1_000_000;
    let Some(base) = rss_bytes() else {
        eprintln!("memory: /proc/self/statm unavailable; nothing measured");
        return;
    };
    let mut f = Fixture::holders(N, 1, Detection::Indexed);
    let one = rss_bytes().unwrap_or(base);
    let tiers = vec![TierSpec { max_notional: None, imr: Rate(10_000_000), mmr: Rate(5_000_000) }];
    f.apply(&Event::Perp { symbol: "WIDE2".into(), underlying: None, tiers });
    f.apply(&Event::Price { symbol: "WIDE2".into(), price: Price::units(100) });
    for a in 0..N {
        f.apply(&Event::Trade(fill(&format!("acct-{a:07}"), "WIDE2", a % 2 == 0, 1)));
    }
    let two = rss_bytes().unwrap_or(one);
    let per_account = (one - base) as f64 / N as f64;
    let per_position = (two - one) as f64 / N as f64;
    println!("memory/accounts: {N} accounts with one position each: {:.0} MiB", (one - base) as f64 / 1048576.0);
    println!("memory/per_account_with_one_position: {per_account:.0} bytes");
    println!("memory/per_additional_position: {per_position:.0} bytes");
    println!("memory/per_account_without_position (estimate): {:.0} bytes", per_account - per_position);
}
