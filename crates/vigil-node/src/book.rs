//! The book at one offset, for the offline tools (`vigil stress`, `vigil export`): from a replayed JSON Lines file,
//! or from a node's data directory (checkpoints + journal) read without changing it.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use vigil_engine::{Config, Engine, Sharded};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{Offset, parse_line};
use vigil_store::checkpoint::{CheckpointStore, SledStore};
use vigil_store::journal::{self, JournalConfig};
use vigil_store::layout;

use crate::inspect::copy_tree;
use crate::recovery::{StoredNode, load_shard, replayable};

/// Every shard's state at `offset` (each shard has applied every event of its accounts and every broadcast event
/// up to it).
pub struct Book {
    pub engines: Vec<Engine>,
    pub offset: Offset,
    /// The insurance fund at `offset`.
    pub fund: InsuranceFund,
}

/// Lines between two progress reports on a terminal.
const PROGRESS_EVERY: u64 = 1 << 20;

/// Replays `input` (JSON Lines; a line that is not an event takes its offset and changes nothing) into `shards`
/// shards. With `progress`, the count of lines read is shown on standard error as it goes.
pub fn replay(input: impl BufRead, config: &Config, shards: usize, progress: bool) -> anyhow::Result<Book> {
    let mut sharded = Sharded::new(config, shards.max(1));
    let mut triggers = Vec::new();
    let started = Instant::now();
    let mut lines = 0u64;
    for line in input.lines() {
        let line = line.context("reading the input")?;
        if line.trim().is_empty() {
            continue;
        }
        triggers.clear();
        match parse_line(&line) {
            Ok(event) => {
                let _ = sharded.apply(&event, &mut triggers);
            }
            Err(_) => {
                sharded.next_offset();
            }
        }
        lines += 1;
        if progress && lines.is_multiple_of(PROGRESS_EVERY) {
            let rate = lines as f64 / started.elapsed().as_secs_f64().max(1e-9);
            eprint!("\rreplaying: {lines} events ({rate:.0}/s)   ");
            let _ = std::io::stderr().flush();
        }
    }
    if progress && lines >= PROGRESS_EVERY {
        eprintln!("\rreplayed {lines} events in {:.1} s          ", started.elapsed().as_secs_f64());
    }
    let offset = sharded.offset();
    let fund = *sharded.fund();
    Ok(Book { engines: sharded.into_engines(), offset, fund })
}

/// Replays a file (`-` for standard input).
pub fn replay_path(path: &Path, config: &Config, shards: usize) -> anyhow::Result<Book> {
    let progress = std::io::stderr().is_terminal();
    if path.as_os_str() == "-" {
        replay(std::io::stdin().lock(), config, shards, progress)
    } else {
        let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        replay(std::io::BufReader::with_capacity(1 << 16, f), config, shards, progress)
    }
}

/// The book a node's data directory holds: each shard's checkpoint, then the journal after it, at the journal's
/// last record. Read-only: the journal is only read, and the checkpoint store is opened from a copy (sled 0.34 has
/// no read-only mode; opening it in place would take a running node's lock or write to its files). The shard count
/// is the one the directory was written with. A journal whose tail a crash tore is refused (start the node once
/// to recover it): this reads, it repairs nothing.
pub fn from_data(data: &Path, config: &Config) -> anyhow::Result<Book> {
    let checkpoint_dir = layout::checkpoints(data);
    let journal_dir = layout::journal(data);
    if !checkpoint_dir.is_dir() && !journal_dir.is_dir() {
        anyhow::bail!("{} holds no node data (no checkpoints and no journal)", data.display());
    }
    let mut engines = Vec::new();
    // The fund as recovery continues it: stored with the node state, then the movements after its offset.
    let mut stored = None;
    if checkpoint_dir.is_dir() {
        let copy = tempfile::tempdir().context("creating a directory for a copy of the checkpoint store")?;
        copy_tree(&checkpoint_dir, copy.path())
            .with_context(|| format!("copying {} to read it", checkpoint_dir.display()))?;
        let store = SledStore::open(copy.path()).context("opening (a copy of) the checkpoint store")?;
        let shards = match store.shard_count()? {
            Some(n) => n,
            None => store.shards()?.len().max(1),
        };
        for shard in 0..shards {
            engines.push(load_shard(&store, shard, config)?);
        }
        stored = Some(StoredNode::load(&store, shards)?);
    } else {
        engines.push(Engine::new(config));
    }
    let node_offset = stored.as_ref().and_then(|s| s.at).unwrap_or(Offset(0));
    let oldest = engines.iter().map(Engine::offset).min().unwrap_or(Offset(0)).min(node_offset);
    let mut sharded = Sharded::from_engines(engines);
    if let Some(stored) = &stored {
        stored.continue_fund(&mut sharded);
    }
    let mut triggers = Vec::new();
    let mut last = sharded.offset();
    if journal_dir.is_dir() {
        let end = journal::read(&journal_dir, &JournalConfig::default(), oldest.next(), |offset, payload| {
            triggers.clear();
            if let Some(event) = replayable(payload)? {
                // Offsets at or below a shard's watermark are skipped by the engine itself.
                let _ = sharded.apply_at(offset, &event, &mut triggers);
            }
            Ok(())
        })
        .with_context(|| format!("reading the journal in {}", journal_dir.display()))?;
        last = last.max(end);
    }
    sharded.settle_stored(last, &mut triggers);
    let fund = *sharded.fund();
    let engines = sharded.into_engines();
    let offset = engines.iter().map(Engine::offset).max().unwrap_or(Offset(0)).max(last);
    Ok(Book { engines, offset, fund })
}
