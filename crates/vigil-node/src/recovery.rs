//! Durable state of a node: writing checkpoint deltas, and recovering shards from checkpoints plus the journal.
//!
//! Recovery: open the journal (a torn tail is truncated; corruption in the middle refuses), restore each shard
//! from its checkpoint (market, accounts, episodes, watermark), then replay the journal from the oldest watermark.
//! A shard ignores offsets at or below its own watermark, so no event is applied twice.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use vigil_engine::account::Account;
use vigil_engine::market::Market;
use vigil_engine::{Config, Delta, Engine, Sharded};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{LiquidationRecord, Offset, Trigger, TriggerKind, shard_of};
use vigil_store::checkpoint::{CheckpointStore, RecordKind, Records, SledStore, Tree};
use vigil_store::codec::{REJECTED_INPUT, Stamp, decode_event, decode_value, encode_value, split_stamp};
use vigil_store::journal::{Journal, JournalConfig, Recovered};
use vigil_store::layout;
use vigil_store::storage::{OsStorage, Storage};

use crate::persist::NodeValue;
use crate::producers::{LastBatch, Producers};

/// A trigger's identity `(offset, account, symbol-or-cross, kind)` as a store key: writing it twice keeps one.
pub fn trigger_key(t: &Trigger) -> Vec<u8> {
    let mut k = Vec::with_capacity(16 + t.account.len() + t.symbol.as_ref().map_or(0, |s| s.len()));
    k.extend_from_slice(&t.offset.0.to_be_bytes());
    // Names are at most 64 bytes (events.md); length prefixes keep any byte in them unambiguous.
    k.push(t.account.len() as u8);
    k.extend_from_slice(t.account.as_bytes());
    match &t.symbol {
        None => k.push(0),
        Some(s) => {
            k.push(s.len() as u8 + 1);
            k.extend_from_slice(s.as_bytes());
        }
    }
    k.push(t.kind as u8);
    k
}

/// Records to store: triggers by identity, liquidation fills by offset (one per offset).
pub fn records(triggers: &[Trigger], liquidations: &[LiquidationRecord]) -> anyhow::Result<Records> {
    let triggers = triggers
        .iter()
        .map(|t| {
            let mut v = Vec::new();
            encode_value(t, &mut v).context("encoding a trigger")?;
            Ok((trigger_key(t), v))
        })
        .collect::<anyhow::Result<_>>()?;
    let liquidations = liquidations
        .iter()
        .map(|l| {
            let mut v = Vec::new();
            encode_value(l, &mut v).context("encoding a liquidation fill")?;
            Ok((l.offset.0.to_be_bytes().to_vec(), v))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Records { triggers, liquidations })
}

fn trees(shards: usize) -> impl Iterator<Item = Tree> {
    (0..shards).map(Tree::Shard).chain([Tree::Node])
}

/// Every trigger stored for `shards` shards and by the node (`deleverage`), in the contract's order.
pub fn load_triggers(store: &dyn CheckpointStore, shards: usize) -> anyhow::Result<Vec<Trigger>> {
    let mut out = Vec::new();
    for tree in trees(shards) {
        for bytes in store.records(tree, RecordKind::Triggers)? {
            out.push(decode_value::<Trigger>(&bytes).with_context(|| format!("decoding a trigger of {tree:?}"))?);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// The liquidation fills stored in one tree, in offset order: settled in the node's tree, unsettled in a shard's.
pub fn load_liquidations(store: &dyn CheckpointStore, tree: Tree) -> anyhow::Result<Vec<LiquidationRecord>> {
    store
        .records(tree, RecordKind::Liquidations)?
        .iter()
        .map(|bytes| {
            decode_value::<LiquidationRecord>(bytes).with_context(|| format!("decoding a liquidation fill of {tree:?}"))
        })
        .collect()
}

/// The node state as stored, with what the fund continues over: its offset (`None` before the first was written),
/// its value, and the liquidation fills the store holds (the node tree's, settled; the shard trees', unsettled).
pub struct StoredNode {
    pub at: Option<Offset>,
    pub value: NodeValue,
    pub node_fills: Vec<LiquidationRecord>,
    pub shard_fills: Vec<LiquidationRecord>,
}

impl StoredNode {
    /// Reads the node state and every stored fill of a store written by `shards` shards.
    pub fn load(store: &dyn CheckpointStore, shards: usize) -> anyhow::Result<Self> {
        let (at, value) = match store.node()? {
            Some((offset, bytes)) => {
                (Some(offset), decode_value::<NodeValue>(&bytes).context("decoding the stored node state")?)
            }
            None => (None, NodeValue::default()),
        };
        let node_fills = load_liquidations(store, Tree::Node)?;
        let mut shard_fills = Vec::new();
        for shard in 0..shards {
            shard_fills.extend(load_liquidations(store, Tree::Shard(shard))?);
        }
        Ok(Self { at, value, node_fills, shard_fills })
    }

    /// Continues the stored fund in `engines` over a replay from the node state's offset: the fills beyond it that
    /// a shard applied before its checkpoint (its tree) or an earlier recovery re-emitted (the node's tree) are
    /// settled as the replay reaches them, the rest as the shards re-emit them (`Sharded::restore_fund`).
    pub fn continue_fund(&self, engines: &mut Sharded) {
        let fills = self.node_fills.iter().chain(&self.shard_fills).cloned().collect();
        engines.restore_fund(self.value.fund, self.at.unwrap_or(Offset(0)), fills);
    }
}

/// Writes one shard's delta: every changed account, the market, the watermark and the records emitted up to it,
/// atomically.
pub fn write_delta(
    store: &mut dyn CheckpointStore,
    shard: usize,
    delta: &Delta,
    triggers: &[Trigger],
    liquidations: &[LiquidationRecord],
) -> anyhow::Result<u64> {
    let mut market = Vec::new();
    encode_value(&delta.market, &mut market).context("encoding the market")?;
    let mut accounts = Vec::with_capacity(delta.accounts.len());
    for acc in &delta.accounts {
        let mut bytes = Vec::new();
        encode_value(acc, &mut bytes).context("encoding an account")?;
        accounts.push((&*acc.id, bytes));
    }
    Ok(store.write(shard, delta.offset, &market, &accounts, &records(triggers, liquidations)?)?)
}

/// Restores one shard from its checkpoint (an empty shard if it has none).
pub fn load_shard(store: &dyn CheckpointStore, shard: usize, config: &Config) -> anyhow::Result<Engine> {
    let loaded = store.load(shard)?;
    let Some(market_bytes) = loaded.market else { return Ok(Engine::new(config)) };
    let market: Market = decode_value(&market_bytes).with_context(|| format!("decoding shard {shard}'s market"))?;
    let mut accounts = Vec::with_capacity(loaded.accounts.len());
    for bytes in &loaded.accounts {
        let acc: Account = decode_value(bytes).with_context(|| format!("decoding an account of shard {shard}"))?;
        accounts.push(acc);
    }
    Ok(Engine::restore(config, loaded.offset, market, accounts))
}

/// What recovery found and did.
pub struct Recovery {
    pub engines: Vec<Engine>,
    pub journal: Journal,
    pub journal_recovered: Recovered,
    /// Each shard's checkpoint watermark.
    pub watermarks: Vec<Offset>,
    /// Events replayed from the journal.
    pub replayed: u64,
    /// Triggers re-emitted by the replay (same identities as before the crash).
    pub triggers: Vec<Trigger>,
    /// Every trigger the node has released, in the contract's order: those stored with checkpoints and those the
    /// replay re-emitted (which are stored now, with their shard's trees).
    pub history: Vec<Trigger>,
    /// Every producer's last journaled batch: the stored table plus the stamps in the journal after it.
    pub producers: Producers,
    /// The insurance fund at the journal's end: the stored one, then the fund movements after its offset.
    pub fund: InsuranceFund,
    /// Every liquidation fill, settled, in offset order: those stored with the node state and those settled again.
    pub liquidations: Vec<LiquidationRecord>,
    /// The offset of the stored producers table (the journal is kept after it).
    pub node_offset: Offset,
    /// The open checkpoint store, for the node to keep writing to. (Reopening it would race sled's background
    /// threads for the file lock of the handle just dropped: "could not acquire lock", seen in CI.)
    pub store: Box<dyn CheckpointStore>,
}

/// Recovers `shards` shards from the data directory on the real disk (sled checkpoints).
pub fn recover(data: &Path, config: &Config, shards: usize, journal_config: JournalConfig) -> anyhow::Result<Recovery> {
    let open_store = || -> anyhow::Result<Box<dyn CheckpointStore>> {
        let store = SledStore::open(&layout::checkpoints(data)).context("opening the checkpoint store")?;
        Ok(Box::new(store))
    };
    recover_with(&layout::journal(data), Arc::new(OsStorage), open_store, config, shards, journal_config)
}

/// Decodes a journaled payload for replay: `None` for input rejected before it became an event (it holds its
/// offset; no shard ever saw it), an error for anything that does not decode (this build wrote it: a bug, or
/// damage the CRC could not see; recovery stops rather than skip an event).
/// A producer's stamp, if the record carries one, is set aside.
pub fn replayable(payload: &[u8]) -> Result<Option<vigil_model::Event>, String> {
    let (_, payload) = split_stamp(payload).map_err(|e| e.to_string())?;
    if payload.first() == Some(&REJECTED_INPUT) {
        return Ok(None);
    }
    decode_event(payload).map(Some).map_err(|e| e.to_string())
}

/// The producer's stamp of a journaled record, if it carries one.
pub fn stamp_of(payload: &[u8]) -> Result<Option<Stamp<'_>>, String> {
    split_stamp(payload).map(|(stamp, _)| stamp).map_err(|e| e.to_string())
}

/// Checkpoints are partitioned by shard_of(account, shards): another count would route accounts to shards that do
/// not hold them (or ignore the trees beyond the new count) and silently lose state.
fn check_shard_count(store: &mut dyn CheckpointStore, shards: usize) -> anyhow::Result<()> {
    let refuse = |written: usize| {
        anyhow::anyhow!(
            "the data directory's checkpoints were written by a node with {written} shard(s); start it with --shards \
             {written} (changing the shard count of an existing data directory is not supported)"
        )
    };
    match store.shard_count()? {
        Some(written) if written != shards => return Err(refuse(written)),
        Some(_) => {}
        None => {
            // A store from before the count was recorded: its trees tell (all of them were written at once).
            let stored = store.shards()?;
            if !stored.is_empty() && stored != (0..shards).collect::<Vec<_>>() {
                return Err(refuse(stored.len()));
            }
            store.set_shard_count(shards).context("recording the shard count")?;
        }
    }
    Ok(())
}

/// What a cluster node restores from its data directory: the shards and the node state. The events after them come
/// from the stream (`cluster::source`), from `start` on.
pub struct StreamRecovery {
    pub engines: Vec<Engine>,
    /// Each shard's checkpoint watermark.
    pub watermarks: Vec<Offset>,
    /// The offset the stream is read after: the oldest of the watermarks and the node state's offset.
    pub start: Offset,
    /// The fund as of `node_offset`.
    pub fund: InsuranceFund,
    pub node_offset: Offset,
    /// Fills the shards settled into checkpoints beyond `node_offset`: the merge settles them again, in order.
    pub to_settle: Vec<LiquidationRecord>,
    /// Every fill settled up to `node_offset`.
    pub liquidations: Vec<LiquidationRecord>,
    /// Every trigger stored with a checkpoint.
    pub history: Vec<Trigger>,
    pub store: Box<dyn CheckpointStore>,
}

/// Restores a cluster node's shards and node state from its checkpoint store (no journal: the stream is the
/// journal).
pub fn recover_checkpoints(data: &Path, config: &Config, shards: usize) -> anyhow::Result<StreamRecovery> {
    let mut store: Box<dyn CheckpointStore> =
        Box::new(SledStore::open(&layout::checkpoints(data)).context("opening the checkpoint store")?);
    check_shard_count(&mut *store, shards)?;
    let mut engines = Vec::with_capacity(shards);
    for shard in 0..shards {
        engines.push(load_shard(&*store, shard, config)?);
    }
    let watermarks: Vec<Offset> = engines.iter().map(Engine::offset).collect();
    let stored = StoredNode::load(&*store, shards)?;
    let node_offset = stored.at.unwrap_or(Offset(0));
    let oldest = watermarks.iter().copied().min().unwrap_or(Offset(0));
    let mut to_settle: std::collections::BTreeMap<Offset, LiquidationRecord> = std::collections::BTreeMap::new();
    for fill in stored.shard_fills {
        if fill.offset > node_offset {
            to_settle.insert(fill.offset, fill);
        }
    }
    let history = load_triggers(&*store, shards)?;
    Ok(StreamRecovery {
        engines,
        watermarks,
        start: oldest.min(node_offset),
        fund: stored.value.fund,
        node_offset,
        to_settle: to_settle.into_values().collect(),
        liquidations: stored.node_fills.into_iter().filter(|l| l.offset <= node_offset).collect(),
        history,
        store,
    })
}

/// Recovers `shards` shards from the journal in `journal_dir` (on `storage`) and the checkpoints in the store
/// `open_store` opens. The journal is opened (its segments read and checked) on a helper thread while the store
/// opens: the two are independent, and together they are most of a restart.
pub fn recover_with(
    journal_dir: &Path,
    storage: Arc<dyn Storage>,
    open_store: impl FnOnce() -> anyhow::Result<Box<dyn CheckpointStore>>,
    config: &Config,
    shards: usize,
    journal_config: JournalConfig,
) -> anyhow::Result<Recovery> {
    let (opened, store) = std::thread::scope(|scope| {
        let journal = scope.spawn(|| Journal::open(journal_dir, journal_config.clone(), Arc::clone(&storage)));
        let store = open_store();
        (journal.join(), store)
    });
    let (mut journal, journal_recovered) = opened
        .map_err(|_| anyhow::anyhow!("the thread opening the journal panicked"))?
        .context("opening the journal")?;
    let mut store = store?;
    check_shard_count(&mut *store, shards)?;
    let mut restored = Vec::with_capacity(shards);
    for shard in 0..shards {
        restored.push(load_shard(&*store, shard, config)?);
    }
    let watermarks: Vec<Offset> = restored.iter().map(Engine::offset).collect();
    let end = journal_recovered.durable;
    if let Some((shard, w)) = watermarks.iter().enumerate().find(|(_, w)| **w > end) {
        anyhow::bail!(
            "shard {shard}'s checkpoint is at offset {}, beyond the journal's end at {}: the journal lost events \
             the checkpoint holds (a power cut under sled's non-barrier flush, or a removed journal); refusing to \
             start rather than reuse their offsets",
            w.0,
            end.0
        );
    }
    // The journal must hold every event after the oldest watermark. Segments are deleted only behind a watermark
    // made durable by a barrier, so a journal that starts later means the disk lost what it had synced (or
    // someone removed segments): the events between are nowhere. Refuse rather than start with a hole.
    let (oldest_shard, oldest) =
        watermarks.iter().copied().enumerate().min_by_key(|(_, w)| *w).unwrap_or((0, Offset(0)));
    // The node's state (producers table, insurance fund) as of its offset. With none stored, the journal was never
    // trimmed (trims wait for it), so it must hold every event from offset 1: both are folded over all of it.
    let stored = StoredNode::load(&*store, shards)?;
    let mut producers = stored.value.producers.clone();
    let node_offset = stored.at.unwrap_or(Offset(0));
    let scan_from = node_offset;
    if journal_recovered.first.0 > scan_from.0 + 1 {
        anyhow::bail!(
            "the journal starts at offset {}, but the node state (producers table, insurance fund) is stored at \
             offset {}: the producer stamps and fund movements between are lost; refusing to start rather than \
             accept a resend twice or misstate the fund",
            journal_recovered.first.0,
            node_offset.0
        );
    }
    if journal_recovered.first.0 > oldest.0 + 1 {
        anyhow::bail!(
            "the journal starts at offset {}, but shard {oldest_shard}'s checkpoint is at offset {}: events {} to \
             {} are in neither the journal nor the checkpoints (segments deleted ahead of a checkpoint the disk \
             did not keep, or removed by hand); refusing to start with a hole in the history",
            journal_recovered.first.0,
            oldest.0,
            oldest.0 + 1,
            journal_recovered.first.0 - 1
        );
    }
    let mut engines = Sharded::from_engines(restored);
    // The fund continues from its stored offset; every fill after it is settled once, in offset order.
    stored.continue_fund(&mut engines);
    let from = oldest.min(scan_from).next();
    let end = journal_recovered.durable;
    let mut triggers = Vec::new();
    let mut replayed = 0u64;
    // A producer's batch whose tail a crash lost (written, never synced, never acknowledged) is dropped whole:
    // applying its head would make the producer's resend apply it twice.
    let mut incomplete: Option<Offset> = None;
    journal
        .replay(from, |offset, payload| {
            if incomplete.is_some() {
                return Ok(());
            }
            if let Some(stamp) = stamp_of(payload)? {
                let last = Offset(offset.0 + u64::from(stamp.count.max(1)) - 1);
                if last > end {
                    incomplete = Some(offset);
                    return Ok(());
                }
                if offset > scan_from {
                    producers.record(stamp.producer, LastBatch { sequence: stamp.sequence, first: offset, last });
                }
            }
            replayed += 1;
            if let Some(event) = replayable(payload)? {
                // Offsets at or below a shard's watermark are skipped by the engine itself.
                let _ = engines.apply_at(offset, &event, &mut triggers);
            }
            Ok(())
        })
        .context("replaying the journal")?;
    engines.settle_stored(end, &mut triggers);
    if let Some(first) = incomplete {
        if let Some((shard, w)) = watermarks.iter().enumerate().find(|(_, w)| **w >= first) {
            anyhow::bail!(
                "shard {shard}'s checkpoint is at offset {}, inside a batch starting at {} that was never wholly \
                 written; refusing to start",
                w.0,
                first.0
            );
        }
        let cut = journal.truncate_after(Offset(first.0 - 1)).context("dropping an incomplete batch")?;
        tracing::warn!(from = first.0, records = cut, "dropped a producer's batch whose tail was never written");
    }
    // The re-emitted triggers and the fills settled again are durable (their events are journaled): store them, so
    // the history no longer depends on replaying beyond watermarks that later checkpoints move past.
    for shard in 0..shards {
        let mine: Vec<Trigger> = triggers
            .iter()
            .filter(|t| t.kind != TriggerKind::Deleverage && shard_of(&t.account, shards) == shard)
            .cloned()
            .collect();
        store.put_records(Tree::Shard(shard), &records(&mine, &[])?).context("storing recovered triggers")?;
    }
    let deleverage: Vec<Trigger> = triggers.iter().filter(|t| t.kind == TriggerKind::Deleverage).cloned().collect();
    let settled = engines.liquidations().to_vec();
    store.put_records(Tree::Node, &records(&deleverage, &settled)?).context("storing recovered liquidation fills")?;
    let history = load_triggers(&*store, shards)?;
    // Every fill: the node tree's as read, with those settled now (the same fill, settled again, by offset).
    let mut by_offset: std::collections::BTreeMap<Offset, LiquidationRecord> =
        stored.node_fills.into_iter().map(|l| (l.offset, l)).collect();
    by_offset.extend(settled.into_iter().map(|l| (l.offset, l)));
    let liquidations = by_offset.into_values().collect();
    let fund = *engines.fund();
    Ok(Recovery {
        engines: engines.into_engines(),
        journal,
        journal_recovered,
        watermarks,
        replayed,
        triggers,
        history,
        producers,
        fund,
        liquidations,
        node_offset,
        store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_engine::merged_views;
    use vigil_model::parse_line;
    use vigil_store::codec::encode_event;
    use vigil_testkit::{StreamConfig, generate};

    #[test]
    fn recovery_from_checkpoints_and_journal_equals_a_full_replay() {
        // Proves: journal every event, checkpoint shards at different offsets, recover: the state equals the
        // uninterrupted replay, and the triggers after the oldest watermark are re-emitted with the same identities.
        let lines = generate(&StreamConfig {
            seed: 11,
            events: 2000,
            accounts: 12,
            bad_percent: 2,
            liquidation_percent: 6,
            ..StreamConfig::default()
        });
        let config = Config::default();
        let shards = 3;
        let dir = tempfile::tempdir().unwrap();
        let mut reference = Sharded::new(&config, shards);
        let mut all_triggers = Vec::new();
        {
            let (mut j, _) =
                Journal::open(&layout::journal(dir.path()), JournalConfig::default(), Arc::new(OsStorage)).unwrap();
            let mut store = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
            let mut live = Sharded::new(&config, shards);
            for (i, line) in lines.iter().enumerate() {
                let Ok(event) = parse_line(line) else { continue };
                let offset = Offset(j.appended().0 + 1);
                let mut payload = Vec::new();
                encode_event(&event, &mut payload).unwrap();
                j.append(offset, &payload).unwrap();
                let (o, _) = reference.apply(&event, &mut all_triggers);
                // The reference numbers only parsed events here, like the journal.
                assert_eq!(o, offset);
                let _ = live.apply_at(offset, &event, &mut Vec::new());
                // Shards checkpoint at different moments.
                for (s, engine) in live.shards_mut().iter_mut().enumerate() {
                    if (i + 1) % (300 + 170 * s) == 0 && i < 1000 {
                        let delta = engine.take_delta();
                        let emitted: Vec<Trigger> = all_triggers
                            .iter()
                            .filter(|t| shard_of(&t.account, shards) == s && t.offset <= delta.offset)
                            // As the node does: a `deleverage` trigger is the merge's, stored with the node state.
                            .filter(|t| t.kind != TriggerKind::Deleverage)
                            .cloned()
                            .collect();
                        let fills: Vec<LiquidationRecord> = reference
                            .liquidations()
                            .iter()
                            .filter(|l| shard_of(&l.account, shards) == s && l.offset <= delta.offset)
                            .cloned()
                            .collect();
                        write_delta(&mut store, s, &delta, &emitted, &fills).unwrap();
                    }
                }
            }
            j.commit().unwrap();
        }
        let r = recover(dir.path(), &config, shards, JournalConfig::default()).unwrap();
        assert!(r.watermarks.iter().all(|w| w.0 > 0), "every shard checkpointed: {:?}", r.watermarks);
        assert!(r.replayed > 0 && r.replayed < lines.len() as u64);
        assert_eq!(merged_views(&r.engines), reference.views());
        // The fund (no node state was stored: it folds from zero) and every fill are the uninterrupted replay's,
        // though the shards' checkpoints hold fills the replay skipped.
        assert_eq!(r.fund, *reference.fund());
        assert_eq!(r.liquidations, reference.liquidations());
        let skipped =
            reference.liquidations().iter().filter(|l| l.offset <= r.watermarks[shard_of(&l.account, shards)]);
        assert!(skipped.count() > 0, "some fills are only in the checkpoints");
        // Each shard re-emits exactly the triggers beyond its own watermark, with the same identities; the
        // `deleverage` triggers beyond the node state's offset (none stored: all of them).
        let mut expected: Vec<_> = all_triggers
            .iter()
            .filter(|t| t.kind == TriggerKind::Deleverage || t.offset > r.watermarks[shard_of(&t.account, shards)])
            .cloned()
            .collect();
        let mut got = r.triggers.clone();
        expected.sort();
        got.sort();
        assert!(!expected.is_empty());
        assert_eq!(got, expected);
        // The history is every trigger, once: those stored with checkpoints and those re-emitted.
        let mut everything = all_triggers.clone();
        everything.sort();
        assert_eq!(r.history, everything);
        drop(r);
        let again = recover(dir.path(), &config, shards, JournalConfig::default()).unwrap();
        assert_eq!(again.history, everything, "recovering twice stores nothing twice");
        drop(again);
        let other = recover(dir.path(), &config, shards + 1, JournalConfig::default());
        let refused = other.err().map(|e| format!("{e:#}")).unwrap_or_default();
        assert!(refused.contains("--shards 3"), "another shard count is refused: {refused}");
    }

    #[test]
    fn a_checkpoint_ahead_of_the_journal_refuses_to_start() {
        // Proves recovery never trusts state the journal cannot account for: it names the shard and both offsets.
        let dir = tempfile::tempdir().unwrap();
        let config = Config::default();
        let mut engine = Engine::new(&config);
        let deposit = parse_line(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"5"}"#).unwrap();
        engine.apply(Offset(7), &deposit, &mut Vec::new()).unwrap();
        let mut store = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
        write_delta(&mut store, 0, &engine.take_delta(), &[], &[]).unwrap();
        drop(store);
        let err = recover(dir.path(), &config, 1, JournalConfig::default()).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("shard 0's checkpoint is at offset 7, beyond the journal's end at 0"), "{msg}");
    }

    #[test]
    fn a_journal_that_starts_after_the_oldest_watermark_or_holds_an_undecodable_event_refuses() {
        // Proves recovery refuses a hole between the checkpoints and the journal (naming both offsets) and a
        // journaled payload that does not decode (naming the segment and byte), instead of skipping either.
        let dir = tempfile::tempdir().unwrap();
        let config = Config::default();
        let small = JournalConfig { segment_bytes_max: 1024, ..JournalConfig::default() };
        let (mut j, _) = Journal::open(&layout::journal(dir.path()), small.clone(), Arc::new(OsStorage)).unwrap();
        let mut engine = Engine::new(&config);
        for i in 1..=60u64 {
            let line = format!(r#"{{"type":"deposit","account":"a{i}","asset":"USDC","amount":"1"}}"#);
            let event = parse_line(&line).unwrap();
            let mut payload = Vec::new();
            encode_event(&event, &mut payload).unwrap();
            j.append(Offset(i), &payload).unwrap();
            if i <= 5 {
                engine.apply(Offset(i), &event, &mut Vec::new()).unwrap();
            }
        }
        j.commit().unwrap();
        let first_segment = j.segments()[0].clone();
        drop(j);
        let mut store = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
        write_delta(&mut store, 0, &engine.take_delta(), &[], &[]).unwrap();
        drop(store);
        assert!(recover(dir.path(), &config, 1, small.clone()).is_ok());
        let saved = std::fs::read(&first_segment.path).unwrap();
        std::fs::remove_file(&first_segment.path).unwrap();
        let next = first_segment.last.0 + 1;
        // No node state stored: the journal must hold everything from offset 1 (the fund folds over all of it).
        let msg = format!("{:#}", recover(dir.path(), &config, 1, small.clone()).err().unwrap());
        assert!(msg.contains(&format!("the journal starts at offset {next}, but the node state")), "{msg}");
        assert!(msg.contains("is stored at offset 0"), "{msg}");
        let mut store = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
        let mut value = Vec::new();
        encode_value(&NodeValue::default(), &mut value).unwrap();
        store.write_node(Offset(next - 1), &value, &Records::default()).unwrap();
        drop(store);
        let msg = format!("{:#}", recover(dir.path(), &config, 1, small.clone()).err().unwrap());
        assert!(msg.contains(&format!("the journal starts at offset {next}, but shard 0's checkpoint is at offset 5")));
        assert!(msg.contains(&format!("events 6 to {}", next - 1)), "{msg}");
        std::fs::write(&first_segment.path, saved).unwrap();
        let (mut j, _) = Journal::open(&layout::journal(dir.path()), small.clone(), Arc::new(OsStorage)).unwrap();
        j.append(Offset(61), &[1, 0xFF, 0xFF]).unwrap();
        j.commit().unwrap();
        drop(j);
        let msg = format!("{:#}", recover(dir.path(), &config, 1, small).err().unwrap());
        assert!(msg.contains("journal record 61 in") && msg.contains("at byte"), "{msg}");
        assert!(msg.contains("does not decode"), "{msg}");
    }

    #[test]
    fn golden_bytes_of_a_checkpoint_value() {
        // Proves the checkpoint encoding does not change silently: an account value and the producers table,
        // byte for byte, and both decode back to what was encoded.
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        let mut engine = Engine::new(&Config::default());
        let deposit = parse_line(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1.5"}"#).unwrap();
        engine.apply(Offset(1), &deposit, &mut Vec::new()).unwrap();
        let delta = engine.take_delta();
        let mut account = Vec::new();
        encode_value(&delta.accounts[0], &mut account).unwrap();
        assert_eq!(hex(&account), GOLDEN_ACCOUNT);
        let back: Account = decode_value(&account).unwrap();
        let mut again = Vec::new();
        encode_value(&back, &mut again).unwrap();
        assert_eq!(again, account, "what is decoded re-encodes to the same bytes");
        let mut producers = Producers::default();
        producers.record("gw", LastBatch { sequence: 3, first: Offset(5), last: Offset(6) });
        let mut fund = InsuranceFund::default();
        fund.transfer(vigil_model::Amount(150_000_000)).unwrap();
        let uncovered = fund.settle(vigil_model::Amount::ZERO, vigil_model::Amount(200_000_000));
        assert_eq!(uncovered, vigil_model::Amount(50_000_000));
        let node = NodeValue { producers, fund };
        let mut table = Vec::new();
        encode_value(&node, &mut table).unwrap();
        assert_eq!(hex(&table), GOLDEN_NODE);
        assert_eq!(decode_value::<NodeValue>(&table).unwrap(), node);
        // The market with contract v2's state: an underlying and expiry on a future, the clock, risk parameters.
        let mut engine = Engine::new(&Config::default());
        for (i, line) in [
            r#"{"type":"asset","asset":"ETH"}"#,
            r#"{"type":"future","symbol":"F","underlying":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}],"expiry":"2024-01-10T08:00:00Z"}"#,
            r#"{"type":"clock","time":"2023-12-21T08:00:00Z"}"#,
            r#"{"type":"risk","underlying":"ETH","price_range":"0.15","buckets":2}"#,
        ]
        .iter()
        .enumerate()
        {
            engine.apply(Offset(i as u64 + 1), &parse_line(line).unwrap(), &mut Vec::new()).unwrap();
        }
        let mut market = Vec::new();
        encode_value(&engine.take_delta().market, &mut market).unwrap();
        assert_eq!(hex(&market), GOLDEN_MARKET);
        // A value of an earlier format (its golden bytes kept here) is refused, saying what to do.
        for (old, version) in [(GOLDEN_ACCOUNT_V1, 1), (GOLDEN_ACCOUNT_V2, 2), (GOLDEN_ACCOUNT_V3, 3)] {
            let old: Vec<u8> =
                (0..old.len() / 2).map(|i| u8::from_str_radix(&old[2 * i..2 * i + 2], 16).unwrap()).collect();
            let err = decode_value::<Account>(&old).unwrap_err().to_string();
            assert!(err.contains(&format!("format version {version}, this build reads version 4")), "{err}");
        }
    }

    // Value format 1 (before contract v2): the same account, without a margin model.
    const GOLDEN_ACCOUNT_V1: &str = "0101610100fc00a3e111000000";

    // Value format 2 (contract v2): an account ends with its margin model (0 = standard).
    const GOLDEN_ACCOUNT_V2: &str = "0201610100fc00a3e11100000000";

    // Value format 3 (liquidations): the market gains `max_liquidation_fee`, a trigger `uncovered`; an account's
    // bytes are format 2's.
    const GOLDEN_ACCOUNT_V3: &str = "0301610100fc00a3e11100000000";

    // Value format 4 (the node's value holds the insurance fund); accounts and markets are format 3's.
    const GOLDEN_ACCOUNT: &str = "0401610100fc00a3e11100000000";
    const GOLDEN_NODE: &str = "0401026777030506fcffe0f50500fc0084d717fc00e1f505";
    const GOLDEN_MARKET: &str = "040304555344430003455448010001460201010100fc002d3101fc809698000000010101fd0000e24503db512f0301\
                                 fc00c2eb0b000001fd00008a91cc93452f0101fc80c3c90102fc00e1f505fc80f0fa02fc00e1f505fc00879303fc80ba8c01fc80\
                                 841e00fc80841e00fc00688909fcc0c62d00";
}
