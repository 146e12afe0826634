//! Durable ingest over TCP: `vigil serve` (in this process, 2 shards, data in a temp dir) fed by 4 client
//! connections sending batches of 1 000 events of a `vigil gen` workload; each batch is acknowledged only once
//! journaled and fdatasynced. In the same run, the journal's raw group-commit ceiling on the same disk (1 000
//! records per fdatasync, records of the same events). Prints both and their ratio.

use std::sync::mpsc;
use std::time::{Duration, Instant};

use vigil_model::{Event, Offset, parse_line};
use vigil_node::serve::{ServeConfig, serve};
use vigil_node::wire::Client;
use vigil_store::codec::encode_event;
use vigil_store::journal::{Journal, JournalConfig};
use vigil_store::storage::OsStorage;
use vigil_testkit::{Workload, write_workload};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const BATCH: usize = 1000;
const CONNECTIONS: usize = 4;

fn events() -> Vec<Event> {
    let w = Workload { accounts: 10_000, events: 1_000_000, options: 0, ..Workload::default() };
    let mut text = Vec::new();
    write_workload(&w, &mut text).expect("in memory");
    String::from_utf8(text).expect("UTF-8").lines().map(|l| parse_line(l).expect("valid")).collect()
}

fn ceiling(events: &[Event]) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut j, _) =
        Journal::open(dir.path(), JournalConfig::default(), std::sync::Arc::new(OsStorage)).expect("journal");
    let records: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut r = Vec::new();
            encode_event(e, &mut r).expect("encodable");
            r
        })
        .collect();
    let start = Instant::now();
    for chunk in records.chunks(BATCH) {
        for r in chunk {
            j.append(Offset(j.appended().0 + 1), r).expect("append");
        }
        j.commit().expect("commit");
    }
    records.len() as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"ingest".contains(a.as_str())) {
        return;
    }
    let events = events();
    let raw = ceiling(&events);
    let dir = tempfile::tempdir().expect("temp dir");
    let mut config = ServeConfig::new(dir.path().to_owned());
    config.ingest = "127.0.0.1:0".parse().expect("address");
    config.http = "127.0.0.1:0".parse().expect("address");
    config.checkpoint_events = 1_000_000;
    let (tx, rx) = mpsc::channel();
    let node = std::thread::spawn(move || serve(config, move |addr| tx.send(addr.ingest).expect("bench waits")));
    let addr = rx.recv_timeout(Duration::from_secs(60)).expect("node ready").to_string();
    // Setup (reference data, deposits, opening trades) on one connection, then the stream on two.
    let setup_len = events.len() - 1_000_000;
    let mut c = Client::connect(&addr).expect("connect");
    for chunk in events[..setup_len].chunks(BATCH) {
        c.send(chunk).expect("ack");
    }
    let stream = &events[setup_len..];
    let start = Instant::now();
    std::thread::scope(|s| {
        for half in stream.chunks(stream.len() / CONNECTIONS + 1) {
            let addr = addr.clone();
            s.spawn(move || {
                let mut c = Client::connect(&addr).expect("connect");
                for chunk in half.chunks(BATCH) {
                    c.send(chunk).expect("ack");
                }
            });
        }
    });
    let rate = stream.len() as f64 / start.elapsed().as_secs_f64();
    println!("ingest/raw_group_commit_ceiling: {:.0} records/s (1000 records per fdatasync)", raw);
    println!(
        "ingest/durable_tcp_2_shards: {rate:.0} events/s acknowledged ({CONNECTIONS} connections, batches of {BATCH})"
    );
    println!("ingest/ratio: {:.0}% of the ceiling", 100.0 * rate / raw);
    let _ = std::process::Command::new("kill").args(["-TERM", &std::process::id().to_string()]).status();
    let _ = node.join();
}
