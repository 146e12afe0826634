//! The power-loss simulation (TigerBeetle's storage simulator is the model). The node's storage code — the
//! journal's group commit, the persister's checkpoint writes, barriers and trims, and recovery — runs over a
//! simulated disk (`vigil_store::sim`) that keeps, per file and per directory, what is synced and what is only
//! written. At a random moment the power is cut: every unsynced write and directory change is dropped or kept (a
//! random prefix, the first dropped write torn at a random byte), and the checkpoint store comes back at its last
//! barrier or any write after it. Then recovery runs and is checked:
//!
//! - every acknowledged event (a commit that returned) is in the journal, equal to what was sent, gapless;
//! - the recovered state equals the naive reference model's replay of exactly the recovered prefix, and the
//!   re-emitted triggers are the reference's beyond each checkpoint;
//! - the insurance fund and the liquidation fills (the stream carries fills, fund deposits and withdrawals) equal
//!   the reference's: the fund stored with the node state, continued over the fills the shards' checkpoints hold
//!   and the replay re-emits, is the fund of the recovered prefix;
//! - when the simulated disk loses synced data on purpose (a flipped bit, a lost segment), recovery refuses with a
//!   clear error, exactly when the history has a hole, and never starts half-loaded.
//!
//! Deterministic and in process: a seed gives the same run. `VIGIL_POWER_CUTS` sets how many seeds run (each
//! cuts the power several times).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vigil_engine::{Config, Sharded, merged_views};
use vigil_model::{Event, LiquidationRecord, Offset, Trigger, TriggerKind, parse_line, shard_of};
use vigil_node::persist::{NodeState, NodeValue, Persister};
use vigil_node::pipeline::ShardDelta;
use vigil_node::producers::LastBatch;
use vigil_node::recovery::{recover_with, replayable};
use vigil_store::checkpoint::CheckpointStore;
use vigil_store::codec::{Stamp, encode_event, encode_stamp};
use vigil_store::journal::{self, JournalConfig};
use vigil_store::sim::{SimCheckpointStore, SimStorage};
use vigil_testkit::{Reference, Rng, StreamConfig, generate};

const SHARDS: usize = 2;
const ROUNDS: usize = 4;
const PRODUCER: &str = "gateway-1";

fn journal_dir() -> PathBuf {
    PathBuf::from("/sim/data/journal")
}

/// What a seed did.
#[derive(Debug, Default)]
struct Stats {
    cuts: u64,
    acked_batches: u64,
    checkpoints: u64,
    checkpoint_failures: u64,
    trims: u64,
    refusals: u64,
    /// Liquidation fills in recovered histories (checked against the reference).
    fills: u64,
}

/// A fault put on the disk on purpose after a cut, and what recovery must then do.
#[derive(Debug)]
enum Damage {
    None,
    /// A bit flipped in a segment that is not the last: always refused as corruption.
    FlippedBit(PathBuf),
    /// The oldest segment lost: refused exactly when it held events after the oldest watermark.
    LostSegment {
        first_remaining: Offset,
    },
}

/// Runs one seed; `Err` describes the first violated promise.
fn run_seed(seed: u64, disk: &SimStorage) -> Result<Stats, String> {
    let mut rng = Rng::new(seed);
    let events: Vec<Event> = generate(&StreamConfig {
        seed,
        events: 240,
        accounts: 6,
        bad_percent: 0,
        liquidation_percent: 15,
        ..StreamConfig::default()
    })
    .iter()
    .filter_map(|l| parse_line(l).ok())
    .collect();
    let store = SimCheckpointStore::new();
    let config = Config::default();
    let journal_config = JournalConfig {
        segment_bytes_max: 512 + rng.below(2048),
        preallocate: rng.chance(50),
        prepare_in_background: false,
        ..JournalConfig::default()
    };
    let mut stats = Stats::default();
    let mut acked = Offset(0);
    // The producer's last acknowledged batch number: every batch is stamped, as a gateway's would be.
    let mut acked_sequence = 0u64;
    for round in 0..ROUNDS {
        let damage = if round == 0 { Damage::None } else { damage(disk, &mut rng)? };
        let recovered = recover_with(
            &journal_dir(),
            Arc::new(disk.clone()),
            || Ok(Box::new(store.clone())),
            &config,
            SHARDS,
            journal_config.clone(),
        );
        let r = match (recovered, &damage) {
            (Err(e), Damage::FlippedBit(_)) => {
                let msg = format!("{e:#}");
                if !msg.contains("journal corrupt") {
                    return Err(format!("round {round}: a flipped bit was refused, but not as corruption: {msg}"));
                }
                stats.refusals += 1;
                return Ok(stats);
            }
            (Ok(_), Damage::FlippedBit(path)) => {
                return Err(format!("round {round}: recovery accepted a flipped bit in {}", path.display()));
            }
            (result, Damage::LostSegment { first_remaining }) => {
                let oldest = (0..SHARDS).map(|s| store.offset(s).unwrap_or(Offset(0))).min().unwrap_or(Offset(0));
                // The node state (producers table, fund) is the other thing the journal must cover from its offset
                // on; with none stored, from the start.
                let node = store.node().ok().flatten().map_or(Offset(0), |(o, _)| o);
                let hole = first_remaining.0 > oldest.min(node).0 + 1;
                match result {
                    Err(e) if hole => {
                        let msg = format!("{e:#}");
                        if !msg.contains(&format!("the journal starts at offset {}", first_remaining.0)) {
                            return Err(format!("round {round}: a hole was refused without naming it: {msg}"));
                        }
                        stats.refusals += 1;
                        return Ok(stats);
                    }
                    Err(e) => return Err(format!("round {round}: a harmless lost segment was refused: {e:#}")),
                    Ok(_) if hole => {
                        return Err(format!(
                            "round {round}: recovery accepted a journal starting at {} after watermark {}",
                            first_remaining.0, oldest.0
                        ));
                    }
                    Ok(r) => {
                        // What the lost segment held was behind every checkpoint: the history starts later now.
                        r
                    }
                }
            }
            (Err(e), Damage::None) => return Err(format!("round {round}: recovery failed after a power cut: {e:#}")),
            (Ok(r), Damage::None) => r,
        };
        let durable = r.journal.durable();
        if durable < acked {
            return Err(format!(
                "round {round}: acknowledged through {} but the journal ends at {}",
                acked.0, durable.0
            ));
        }
        if durable.0 as usize > events.len() {
            return Err(format!("round {round}: the journal holds {} events of {}", durable.0, events.len()));
        }
        check_journal(disk, &journal_config, &events, durable).map_err(|e| format!("round {round}: {e}"))?;
        // Batches are all or nothing: the journal ends where the producer's last batch ends, and that batch is
        // at least the last acknowledged one.
        let last_batch = r.producers.get(PRODUCER);
        let (sequence, batch_end) = last_batch.map_or((0, Offset(0)), |b| (b.sequence, b.last));
        if sequence < acked_sequence {
            return Err(format!("round {round}: batch {acked_sequence} was acknowledged, the table says {sequence}"));
        }
        if durable.0 > 0 && batch_end != durable {
            return Err(format!(
                "round {round}: the journal ends at {} but the last whole batch at {}: a torn batch was kept",
                durable.0, batch_end.0
            ));
        }
        acked_sequence = sequence;
        let mut producers = r.producers.clone();
        let recovered = Recovered {
            engines: &r.engines,
            watermarks: &r.watermarks,
            node_offset: r.node_offset,
            triggers: &r.triggers,
            fund: r.fund,
            liquidations: &r.liquidations,
        };
        stats.fills +=
            check_state(&events[..durable.0 as usize], &recovered).map_err(|e| format!("round {round}: {e}"))?;
        acked = durable;
        // Run on from the recovered state: batches, group commits, checkpoints (some failing), trims; then cut.
        let mut live = Sharded::from_engines(r.engines);
        live.restore_fund(r.fund, durable, Vec::new());
        // What the node hands the persister beside the shards' state: each shard's fills since its last delta, and
        // the merge's records since the last node state.
        let mut fills_by_shard: Vec<Vec<LiquidationRecord>> = vec![Vec::new(); SHARDS];
        let mut node_records: (Vec<Trigger>, Vec<LiquidationRecord>) = Default::default();
        let mut persister = Persister::new(r.store, r.watermarks, r.node_offset, u32::MAX);
        let mut journal = r.journal;
        let mut next = durable;
        let steps = 1 + rng.below(40);
        for _ in 0..steps {
            match rng.below(10) {
                0..=4 => {
                    let batch: Vec<&Event> =
                        events.iter().skip(next.0 as usize).take(1 + rng.below(8) as usize).collect();
                    if batch.is_empty() {
                        continue;
                    }
                    let sequence = producers.get(PRODUCER).map_or(1, |b| b.sequence + 1);
                    let first = next.next();
                    for (i, event) in batch.iter().enumerate() {
                        let offset = next.next();
                        let mut payload = Vec::new();
                        if i == 0 {
                            let stamp = Stamp { producer: PRODUCER, sequence, count: batch.len() as u32 };
                            encode_stamp(&stamp, &mut payload);
                        }
                        encode_event(event, &mut payload).map_err(|e| e.to_string())?;
                        journal.append(offset, &payload).map_err(|e| format!("append: {e}"))?;
                        let mut fired = Vec::new();
                        let _ = live.apply_at(offset, event, &mut fired);
                        node_records.0.extend(fired.into_iter().filter(|t| t.kind == TriggerKind::Deleverage));
                        if let Some(fill) = live.liquidations().last().filter(|l| l.offset == offset) {
                            fills_by_shard[shard_of(&fill.account, SHARDS)].push(fill.clone());
                            node_records.1.push(fill.clone());
                        }
                        next = offset;
                    }
                    producers.record(PRODUCER, LastBatch { sequence, first, last: next });
                }
                5..=7 => {
                    // The ack: only a commit that returned makes a promise.
                    acked = journal.commit().map_err(|e| format!("commit: {e}"))?;
                    acked_sequence = producers.get(PRODUCER).map_or(0, |b| b.sequence);
                    stats.acked_batches += 1;
                }
                _ => {
                    // A checkpoint of one shard, as the persistence thread writes it: only once the journal is
                    // durable through it (the node waits for that).
                    acked = journal.commit().map_err(|e| format!("commit: {e}"))?;
                    acked_sequence = producers.get(PRODUCER).map_or(0, |b| b.sequence);
                    if rng.chance(30) {
                        if rng.chance(20) {
                            store.fail_next_writes(1);
                        }
                        let (triggers, liquidations) = std::mem::take(&mut node_records);
                        let value = NodeValue { producers: producers.clone(), fund: *live.fund() };
                        match persister.persist_node(NodeState { offset: acked, value, triggers, liquidations }) {
                            Ok(w) => {
                                stats.checkpoints += 1;
                                if journal.delete_before(w.trim).map_err(|e| format!("trim: {e}"))? > 0 {
                                    stats.trims += 1;
                                }
                            }
                            Err(_) => stats.checkpoint_failures += 1,
                        }
                        continue;
                    }
                    let shard = rng.below(SHARDS as u64) as usize;
                    let mut delta = live.shards_mut()[shard].take_delta();
                    delta.offset = delta.offset.max(acked);
                    if rng.chance(20) {
                        if rng.chance(50) {
                            store.fail_next_writes(1);
                        } else {
                            store.fail_next_barriers(1);
                        }
                    }
                    let liquidations = std::mem::take(&mut fills_by_shard[shard]);
                    match persister.persist(ShardDelta { shard, delta, triggers: Vec::new(), liquidations }) {
                        Ok(w) => {
                            stats.checkpoints += 1;
                            if journal.delete_before(w.trim).map_err(|e| format!("trim: {e}"))? > 0 {
                                stats.trims += 1;
                            }
                        }
                        Err(_) => stats.checkpoint_failures += 1,
                    }
                }
            }
        }
        drop(journal);
        let cut = rng.next_u64();
        disk.power_cut(cut);
        store.power_cut(cut);
        stats.cuts += 1;
    }
    Ok(stats)
}

/// Puts damage on the disk on purpose, sometimes.
fn damage(disk: &SimStorage, rng: &mut Rng) -> Result<Damage, String> {
    let dir = journal_dir();
    let mut segments: Vec<String> = disk_names(disk, &dir).into_iter().filter(|n| n.ends_with(".log")).collect();
    segments.sort();
    if segments.len() < 2 || !rng.chance(10) {
        return Ok(Damage::None);
    }
    if rng.chance(50) {
        let path = dir.join(&segments[rng.below(segments.len() as u64 - 1) as usize]);
        let len = vigil_store::Storage::len(disk, &path).map_err(|e| e.to_string())?;
        let mut bytes = vec![0u8; len as usize];
        vigil_store::Storage::read_at(disk, &path, 0, &mut bytes).map_err(|e| e.to_string())?;
        let Some(end) = bytes.iter().rposition(|b| *b != 0) else { return Ok(Damage::None) };
        let at = rng.below(end as u64 + 1);
        disk.flip_bit(&path, at, rng.below(8) as u8).map_err(|e| e.to_string())?;
        Ok(Damage::FlippedBit(path))
    } else {
        disk.lose(&dir.join(&segments[0])).map_err(|e| e.to_string())?;
        let first: u64 = segments[1].trim_end_matches(".log").parse().map_err(|_| "segment name".to_owned())?;
        Ok(Damage::LostSegment { first_remaining: Offset(first) })
    }
}

fn disk_names(disk: &SimStorage, dir: &Path) -> Vec<String> {
    vigil_store::Storage::list(disk, dir).unwrap_or_default()
}

/// The journal reads cleanly, gapless, and each record is the event sent at its offset.
fn check_journal(disk: &SimStorage, config: &JournalConfig, events: &[Event], durable: Offset) -> Result<(), String> {
    let mut expected_next = None::<u64>;
    let end = journal::read_in(disk, &journal_dir(), config, Offset(1), |offset, payload| {
        if expected_next.is_some_and(|n| n != offset.0) {
            return Err(format!("offset {} after {:?}", offset.0, expected_next));
        }
        expected_next = Some(offset.0 + 1);
        let event = replayable(payload)?.ok_or("a rejected-input record the test never wrote")?;
        if Some(&event) != events.get(offset.0 as usize - 1) {
            return Err(format!("journal record {} differs from the event sent", offset.0));
        }
        Ok(())
    })
    .map_err(|e| format!("the recovered journal does not read back: {e}"))?;
    if end != durable {
        return Err(format!("the journal reads to {} but recovery said {}", end.0, durable.0));
    }
    Ok(())
}

/// What recovery returned that the checks read.
struct Recovered<'a> {
    engines: &'a [vigil_engine::Engine],
    watermarks: &'a [Offset],
    node_offset: Offset,
    triggers: &'a [Trigger],
    fund: vigil_model::liquidation::InsuranceFund,
    liquidations: &'a [LiquidationRecord],
}

/// The recovered state equals the reference model's replay of the prefix; the re-emitted triggers are the
/// reference's beyond each shard's watermark (a `deleverage` trigger: beyond the node state's offset, where the
/// fund continues from); the fund and every liquidation fill are the reference's. Returns the fills checked.
fn check_state(prefix: &[Event], r: &Recovered) -> Result<u64, String> {
    let mut reference = Reference::new(vigil_model::QUOTE_DEFAULT);
    let mut expected = Vec::new();
    for e in prefix {
        let (_, _, fired) = reference.apply(e);
        expected.extend(fired);
    }
    if merged_views(r.engines) != reference.views() {
        return Err(format!("recovered state differs from the reference after {} events", prefix.len()));
    }
    let beyond_checkpoint = |t: &Trigger| match t.kind {
        TriggerKind::Deleverage => t.offset > r.node_offset,
        _ => t.offset > r.watermarks[shard_of(&t.account, SHARDS)],
    };
    let mut beyond: Vec<Trigger> = expected.into_iter().filter(beyond_checkpoint).collect();
    let mut got = r.triggers.to_vec();
    beyond.sort();
    got.sort();
    if got != beyond {
        return Err(format!(
            "re-emitted triggers differ from the reference's beyond the checkpoints:\n got {got:?}\n want {beyond:?}"
        ));
    }
    let want = reference.fund();
    let fund = r.fund;
    if (fund.balance, fund.fees, fund.paid, fund.uncovered) != (want.balance, want.fees, want.paid, want.uncovered) {
        return Err(format!(
            "recovered fund {fund:?}, the reference's {want:?} after {} events (node state at {}, watermarks {:?})",
            prefix.len(),
            r.node_offset.0,
            r.watermarks
        ));
    }
    if !vigil_testkit::compare::same_liquidations(r.liquidations, reference.liquidations()) {
        return Err(format!(
            "recovered liquidation fills differ:\n got {:?}\n want {:?}",
            r.liquidations,
            reference.liquidations()
        ));
    }
    Ok(r.liquidations.len() as u64)
}

fn seeds() -> u64 {
    std::env::var("VIGIL_POWER_CUTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1500)
}

#[test]
fn power_cuts_lose_nothing_acknowledged_and_damage_is_refused() {
    // Proves the durability contract under simulated power loss, over many seeds and several cuts each.
    let mut total = Stats::default();
    let seeds = seeds();
    // VIGIL_POWER_SEED replays one seed (a failure names it).
    let only: Option<u64> = std::env::var("VIGIL_POWER_SEED").ok().and_then(|v| v.parse().ok());
    for seed in only.map_or(0..seeds, |s| s..s + 1) {
        let disk = SimStorage::new();
        let s = run_seed(seed, &disk).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        total.cuts += s.cuts;
        total.acked_batches += s.acked_batches;
        total.checkpoints += s.checkpoints;
        total.checkpoint_failures += s.checkpoint_failures;
        total.trims += s.trims;
        total.refusals += s.refusals;
        total.fills += s.fills;
    }
    eprintln!("{seeds} seeds: {total:?}");
    // The run must have exercised what it claims to prove.
    if only.is_some() {
        return;
    }
    assert!(total.cuts >= seeds * 2, "{total:?}");
    assert!(total.trims > 0 && total.checkpoint_failures > 0 && total.refusals > 0, "{total:?}");
    assert!(total.fills >= seeds / 2, "the streams must carry liquidation fills through recoveries: {total:?}");
}

/// Runs seeds until one breaks a promise; `None` if none did.
fn first_violation(seeds: u64, lie: impl Fn(&SimStorage)) -> Option<String> {
    (0..seeds).find_map(|seed| {
        let disk = SimStorage::new();
        lie(&disk);
        run_seed(seed, &disk).err().map(|e| format!("seed {seed}: {e}"))
    })
}

#[test]
fn the_simulation_catches_a_missing_fdatasync() {
    // Proves the checks can fail: a disk whose fdatasync does nothing (what removing the sync before an ack
    // does) loses acknowledged events, and the simulation sees it.
    let found = first_violation(200, |d| d.ignore_syncs(true, false));
    let found = found.expect("a lying fdatasync went unnoticed over 200 seeds");
    eprintln!("caught: {found}");
}

#[test]
fn the_simulation_catches_a_missing_directory_fsync() {
    // Proves a segment whose name was never made durable (no directory fsync after creating it) is lost with
    // its acknowledged records, and the simulation sees it.
    let found = first_violation(200, |d| d.ignore_syncs(false, true));
    assert!(found.is_some(), "a lying directory fsync went unnoticed over 200 seeds");
}
