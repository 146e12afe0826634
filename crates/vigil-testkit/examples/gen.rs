fn main() {
    let seed: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let events: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(300);
    for l in vigil_testkit::generate(&vigil_testkit::StreamConfig { seed, events, accounts: 6, bad_percent: 5 }) {
        println!("{l}");
    }
}
