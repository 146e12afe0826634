//! Writes a random stream from the test generator: `cargo run -p vigil-testkit --example gen -- SEED EVENTS ACCOUNTS`.
//! (The load generator with realistic distributions is `vigil gen`, a later issue.)

use std::io::{BufWriter, Write};

fn main() -> std::io::Result<()> {
    let arg = |i: usize, default: u64| std::env::args().nth(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let config = vigil_testkit::StreamConfig {
        seed: arg(1, 1),
        events: arg(2, 300) as usize,
        accounts: arg(3, 6) as usize,
        bad_percent: 2,
        ..vigil_testkit::StreamConfig::default()
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    for line in vigil_testkit::generate(&config) {
        writeln!(out, "{line}")?;
    }
    out.flush()
}
