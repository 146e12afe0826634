//! Recovery time of a node's data directory: 1 000 000 accounts and 10 000 000 journaled events (a `vigil gen`
//! workload written straight into a journal), recovered with 2 shards: first from the journal alone (no
//! checkpoint: the worst case), then from checkpoints taken at the end (nothing left to replay).
//! `VIGIL_RECOVERY_EVENTS` and `VIGIL_RECOVERY_ACCOUNTS` scale it down.

use std::io::{self, Write};
use std::time::Instant;

use vigil_engine::Config;
use vigil_model::{Offset, parse_line};
use vigil_node::persist::NodeValue;
use vigil_node::recovery::{recover, write_delta};
use vigil_store::checkpoint::Records;
use vigil_store::codec::{encode_event, encode_value};
use vigil_store::journal::{Journal, JournalConfig};
use vigil_store::layout;
use vigil_store::storage::OsStorage;
use vigil_testkit::{Workload, write_workload};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Parses generated lines as they are written and appends them to the journal.
struct IntoJournal {
    journal: Journal,
    line: Vec<u8>,
    record: Vec<u8>,
}

impl Write for IntoJournal {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        for &b in buf {
            if b != b'\n' {
                self.line.push(b);
                continue;
            }
            let text = std::str::from_utf8(&self.line).map_err(io::Error::other)?;
            let event = parse_line(text).map_err(|e| io::Error::other(e.to_string()))?;
            self.record.clear();
            encode_event(&event, &mut self.record).map_err(|e| io::Error::other(e.to_string()))?;
            let next = Offset(self.journal.appended().0 + 1);
            self.journal.append(next, &self.record).map_err(io::Error::other)?;
            if next.0.is_multiple_of(10_000) {
                self.journal.commit().map_err(io::Error::other)?;
            }
            self.line.clear();
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.journal.commit().map(|_| ()).map_err(io::Error::other)
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if std::env::args().skip(1).any(|a| !a.starts_with('-') && !"recovery".contains(a.as_str())) {
        return;
    }
    let accounts = env("VIGIL_RECOVERY_ACCOUNTS", 1_000_000);
    let events = env("VIGIL_RECOVERY_EVENTS", 10_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let started = Instant::now();
    let (journal, _) =
        Journal::open(&layout::journal(dir.path()), JournalConfig::default(), std::sync::Arc::new(OsStorage))
            .expect("journal");
    let mut sink = IntoJournal { journal, line: Vec::new(), record: Vec::new() };
    // The setup (deposits and opening trades) adds about 3 events per account; the stream makes up the rest.
    let w = Workload { accounts, events: events.saturating_sub(3 * accounts), options: 0, ..Workload::default() };
    write_workload(&w, &mut sink).expect("journaling the workload");
    sink.flush().expect("commit");
    let journaled = sink.journal.durable();
    let bytes: u64 = sink.journal.segments().iter().map(|s| s.bytes).sum();
    drop(sink);
    println!(
        "recovery/setup: {} events journaled ({:.0} MiB) for {accounts} accounts in {:.1} s",
        journaled.0,
        bytes as f64 / 1048576.0,
        started.elapsed().as_secs_f64()
    );
    let config = Config::default();
    let t = Instant::now();
    let r = recover(dir.path(), &config, 2, JournalConfig::default()).expect("recover");
    let from_journal = t.elapsed();
    println!(
        "recovery/journal_only: {:.1} s to replay {} events into 2 shards ({:.0} events/s), {} accounts",
        from_journal.as_secs_f64(),
        r.replayed,
        r.replayed as f64 / from_journal.as_secs_f64(),
        r.engines.iter().map(|e| e.account_count()).sum::<usize>()
    );
    let mut engines = r.engines;
    drop(r.journal);
    let mut store = r.store;
    let t = Instant::now();
    for (shard, engine) in engines.iter_mut().enumerate() {
        write_delta(&mut *store, shard, &engine.take_delta(), &[], &[]).expect("checkpoint");
    }
    println!("recovery/checkpoint_write: {:.1} s for all accounts", t.elapsed().as_secs_f64());
    // The node's own state at the same offset, as a node checkpoints it: without it, recovery scans the whole
    // journal again for the producer stamps and fund movements (and counts every event it reads as replayed).
    let mut node = Vec::new();
    encode_value(&NodeValue { producers: r.producers, fund: r.fund }, &mut node).expect("encoding the node state");
    store.write_node(r.journal_recovered.durable, &node, &Records::default()).expect("node checkpoint");
    drop(store);
    drop(engines);
    let t = Instant::now();
    let r = recover(dir.path(), &config, 2, JournalConfig::default()).expect("recover");
    println!(
        "recovery/from_checkpoints: {:.1} s ({} events replayed after the watermarks, {} accounts restored)",
        t.elapsed().as_secs_f64(),
        r.replayed,
        r.engines.iter().map(|e| e.account_count()).sum::<usize>()
    );
}
