//! Durable state of a node: writing checkpoint deltas, and recovering shards from checkpoints plus the journal.
//!
//! Recovery: open the journal (a torn tail is truncated; corruption in the middle refuses), restore each shard
//! from its checkpoint (market, accounts, episodes, watermark), then replay the journal from the oldest watermark.
//! A shard ignores offsets at or below its own watermark, so no event is applied twice.

use std::path::Path;

use anyhow::Context;
use vigil_engine::account::Account;
use vigil_engine::market::Market;
use vigil_engine::{Config, Delta, Engine, Sharded};
use vigil_model::{Offset, Trigger, shard_of};
use vigil_store::checkpoint::{CheckpointStore, SledStore};
use vigil_store::codec::{decode_event, decode_value, encode_value};
use vigil_store::journal::{self, Journal, JournalConfig, Recovered, Syncer};
use vigil_store::layout;

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

fn encode_triggers(triggers: &[Trigger]) -> anyhow::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    triggers
        .iter()
        .map(|t| {
            let mut v = Vec::new();
            encode_value(t, &mut v).context("encoding a trigger")?;
            Ok((trigger_key(t), v))
        })
        .collect()
}

/// Every trigger stored for `shards` shards, in the contract's order.
pub fn load_triggers(store: &dyn CheckpointStore, shards: usize) -> anyhow::Result<Vec<Trigger>> {
    let mut out = Vec::new();
    for shard in 0..shards {
        for bytes in store.triggers(shard)? {
            out.push(decode_value::<Trigger>(&bytes).with_context(|| format!("decoding a trigger of shard {shard}"))?);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Writes one shard's delta: every changed account, the market, the watermark and the triggers emitted up to it,
/// atomically.
pub fn write_delta(
    store: &mut dyn CheckpointStore,
    shard: usize,
    delta: &Delta,
    triggers: &[Trigger],
) -> anyhow::Result<u64> {
    let mut market = Vec::new();
    encode_value(&delta.market, &mut market).context("encoding the market")?;
    let mut accounts = Vec::with_capacity(delta.accounts.len());
    for acc in &delta.accounts {
        let mut bytes = Vec::new();
        encode_value(acc, &mut bytes).context("encoding an account")?;
        accounts.push((&*acc.id, bytes));
    }
    Ok(store.write(shard, delta.offset, &market, &accounts, &encode_triggers(triggers)?)?)
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
    /// The open checkpoint store, for the node to keep writing to. (Reopening it would race sled's background
    /// threads for the file lock of the handle just dropped: "could not acquire lock", seen in CI.)
    pub store: SledStore,
}

/// Recovers `shards` shards from the data directory.
pub fn recover(
    data: &Path,
    config: &Config,
    shards: usize,
    journal_config: JournalConfig,
    syncer: Box<dyn Syncer>,
) -> anyhow::Result<Recovery> {
    let journal_dir = layout::journal(data);
    let (journal, journal_recovered) =
        Journal::open(&journal_dir, journal_config.clone(), syncer).context("opening the journal")?;
    let mut store = SledStore::open(&layout::checkpoints(data)).context("opening the checkpoint store")?;
    // Checkpoints are partitioned by shard_of(account, shards): another count would route accounts to shards
    // that do not hold them (or ignore the trees beyond the new count) and silently lose state.
    let stored = store.shards();
    if !stored.is_empty() && stored != (0..shards).collect::<Vec<_>>() {
        anyhow::bail!(
            "the data directory's checkpoints were written by a node with {} shard(s); start it with --shards {} \
             (changing the shard count of an existing data directory is not supported)",
            stored.len(),
            stored.len()
        );
    }
    let mut restored = Vec::with_capacity(shards);
    for shard in 0..shards {
        restored.push(load_shard(&store, shard, config)?);
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
    let mut engines = Sharded::from_engines(restored);
    let from = watermarks.iter().min().map_or(Offset(1), |w| Offset(w.0 + 1));
    let mut triggers = Vec::new();
    let mut replayed = 0u64;
    journal::read(&journal_dir, &journal_config, from, |offset, payload| {
        replayed += 1;
        // A record that does not decode was journaled by this code: it cannot happen short of a bug; the event
        // is rejected in replay exactly as it was when first applied (it never reached a shard either).
        let Ok(event) = decode_event(payload) else { return Ok(()) };
        // Offsets at or below a shard's watermark are skipped by the engine itself.
        let _ = engines.apply_at(offset, &event, &mut triggers);
        Ok(())
    })
    .context("replaying the journal")?;
    // The re-emitted triggers are durable (their events are journaled): store them, so the history no longer
    // depends on replaying beyond watermarks that later checkpoints move past.
    for shard in 0..shards {
        let mine: Vec<Trigger> = triggers.iter().filter(|t| shard_of(&t.account, shards) == shard).cloned().collect();
        store.put_triggers(shard, &encode_triggers(&mine)?).context("storing recovered triggers")?;
    }
    let history = load_triggers(&store, shards)?;
    Ok(Recovery {
        engines: engines.into_engines(),
        journal,
        journal_recovered,
        watermarks,
        replayed,
        triggers,
        history,
        store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_engine::merged_views;
    use vigil_model::parse_line;
    use vigil_store::codec::encode_event;
    use vigil_store::journal::OsSyncer;
    use vigil_testkit::{StreamConfig, generate};

    #[test]
    fn recovery_from_checkpoints_and_journal_equals_a_full_replay() {
        // Proves: journal every event, checkpoint shards at different offsets, recover: the state equals the
        // uninterrupted replay, and the triggers after the oldest watermark are re-emitted with the same identities.
        let lines = generate(&StreamConfig { seed: 11, events: 2000, accounts: 12, bad_percent: 2 });
        let config = Config::default();
        let shards = 3;
        let dir = tempfile::tempdir().unwrap();
        let mut reference = Sharded::new(&config, shards);
        let mut all_triggers = Vec::new();
        {
            let (mut j, _) =
                Journal::open(&layout::journal(dir.path()), JournalConfig::default(), Box::new(OsSyncer)).unwrap();
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
                            .cloned()
                            .collect();
                        write_delta(&mut store, s, &delta, &emitted).unwrap();
                    }
                }
            }
            j.commit().unwrap();
        }
        let r = recover(dir.path(), &config, shards, JournalConfig::default(), Box::new(OsSyncer)).unwrap();
        assert!(r.watermarks.iter().all(|w| w.0 > 0), "every shard checkpointed: {:?}", r.watermarks);
        assert!(r.replayed > 0 && r.replayed < lines.len() as u64);
        assert_eq!(merged_views(&r.engines), reference.views());
        // Each shard re-emits exactly the triggers beyond its own watermark, with the same identities.
        let mut expected: Vec<_> =
            all_triggers.iter().filter(|t| t.offset > r.watermarks[shard_of(&t.account, shards)]).cloned().collect();
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
        let again = recover(dir.path(), &config, shards, JournalConfig::default(), Box::new(OsSyncer)).unwrap();
        assert_eq!(again.history, everything, "recovering twice stores nothing twice");
        drop(again);
        let other = recover(dir.path(), &config, shards + 1, JournalConfig::default(), Box::new(OsSyncer));
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
        write_delta(&mut store, 0, &engine.take_delta(), &[]).unwrap();
        drop(store);
        let err = recover(dir.path(), &config, 1, JournalConfig::default(), Box::new(OsSyncer)).err().unwrap();
        let msg = format!("{err:#}");
        assert!(msg.contains("shard 0's checkpoint is at offset 7, beyond the journal's end at 0"), "{msg}");
    }
}
