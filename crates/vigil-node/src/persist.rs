//! Writing checkpoint deltas so that no state is ever lost: the logic of the persistence thread, free of threads so
//! the power-loss simulation runs exactly this code.
//!
//! Rules (docs/durability.md):
//! - A delta whose write (or barrier) fails is **kept**: the next delta of that shard is merged into it (the newer
//!   version of each account wins, the market and watermark are the newer ones, triggers accumulate) and the merge
//!   is written. Taking a delta clears the engine's dirty marks, so dropping a failed one would lose those accounts
//!   at the next restart.
//! - A shard's watermark advances only after its delta is written **and** a barrier made it survive a power cut;
//!   the journal is trimmed only behind the oldest such watermark.
//! - Failures in a row are counted; past the limit the caller stops the node (a full disk does not heal by itself,
//!   and the journal, which holds everything, keeps growing meanwhile).

use std::collections::BTreeMap;

use vigil_engine::account::Account;
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{LiquidationRecord, Offset, Trigger};
use vigil_store::checkpoint::CheckpointStore;

use crate::producers::Producers;
use crate::recovery::{records, write_delta};

/// A shard's checkpoint delta, sent off the shard thread for persistence.
pub struct ShardDelta {
    pub shard: usize,
    pub delta: vigil_engine::Delta,
    /// The triggers the shard emitted since its previous delta (all at or below the delta's offset): persisted
    /// with it, so the trigger history survives restarts (the replay beyond the watermark re-emits the rest).
    pub triggers: Vec<Trigger>,
    /// The liquidation fills the shard applied since its previous delta, unsettled (the fund settles them where
    /// outputs merge): recovery settles those beyond the node state's offset again, since the replay skips them.
    pub liquidations: Vec<LiquidationRecord>,
}

/// The node's own value, stored in the node tree: what no shard owns.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeValue {
    /// Every producer's last batch (resends are recognised across restarts).
    pub producers: Producers,
    /// The insurance fund.
    pub fund: InsuranceFund,
}

/// The node's state as of a checkpoint's offset, with the records decided where outputs merge since the previous
/// one: the `deleverage` triggers and the settled liquidation fills at or below `offset`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeState {
    pub offset: Offset,
    pub value: NodeValue,
    pub triggers: Vec<Trigger>,
    pub liquidations: Vec<LiquidationRecord>,
}

/// What a successful write did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Written {
    pub shard: usize,
    pub offset: Offset,
    pub bytes: u64,
    pub accounts: usize,
    /// The oldest watermark over all shards and the node state: the journal may delete what is wholly before it.
    pub trim: Offset,
}

/// What the persistence thread is handed: a shard's delta, or the node's own state as of the sequenced offset of a
/// checkpoint.
pub enum Persist {
    Shard(Box<ShardDelta>),
    Node(Box<NodeState>),
}

/// A failed write: the delta is kept for the next attempt.
#[derive(Debug)]
pub struct Failed {
    pub shard: usize,
    pub error: anyhow::Error,
    /// Consecutive failures, this one included.
    pub in_a_row: u32,
    /// Whether the caller must stop: `in_a_row` reached the limit.
    pub fatal: bool,
}

pub struct Persister {
    store: Box<dyn CheckpointStore>,
    watermarks: Vec<Offset>,
    /// Per shard, the delta whose write failed (merged with any that failed after it).
    kept: Vec<Option<ShardDelta>>,
    /// The offset of the node state in the store (the journal after it holds every producer stamp since).
    node_offset: Offset,
    /// A node state whose write failed (a later one replaces its value; the records accumulate).
    kept_node: Option<NodeState>,
    in_a_row: u32,
    failures_max: u32,
}

/// `newer` written over `older`: what writing both in order would leave in the store.
pub fn merge(older: ShardDelta, newer: ShardDelta) -> ShardDelta {
    debug_assert_eq!(older.shard, newer.shard, "invariant: deltas merge within one shard");
    debug_assert!(older.delta.offset <= newer.delta.offset, "invariant: a shard's deltas come in offset order");
    let mut accounts: BTreeMap<Box<str>, Account> =
        older.delta.accounts.into_iter().map(|a| (a.id.clone(), a)).collect();
    for a in newer.delta.accounts {
        accounts.insert(a.id.clone(), a);
    }
    let mut triggers = older.triggers;
    triggers.extend(newer.triggers);
    let mut liquidations = older.liquidations;
    liquidations.extend(newer.liquidations);
    ShardDelta {
        shard: newer.shard,
        delta: vigil_engine::Delta {
            offset: newer.delta.offset,
            market: newer.delta.market,
            accounts: accounts.into_values().collect(),
        },
        triggers,
        liquidations,
    }
}

/// `newer` written over `older`: the newer value, the records of both.
pub fn merge_node(older: NodeState, newer: NodeState) -> NodeState {
    debug_assert!(older.offset <= newer.offset, "invariant: node states come in offset order");
    let mut triggers = older.triggers;
    triggers.extend(newer.triggers);
    let mut liquidations = older.liquidations;
    liquidations.extend(newer.liquidations);
    NodeState { offset: newer.offset, value: newer.value, triggers, liquidations }
}

impl Persister {
    /// `watermarks`: each shard's checkpoint as recovered, `node_offset` the node state's (both durable: found on
    /// disk by recovery).
    pub fn new(
        store: Box<dyn CheckpointStore>,
        watermarks: Vec<Offset>,
        node_offset: Offset,
        failures_max: u32,
    ) -> Self {
        let kept = watermarks.iter().map(|_| None).collect();
        Self { store, watermarks, kept, node_offset, kept_node: None, in_a_row: 0, failures_max: failures_max.max(1) }
    }

    /// Where the journal may be trimmed: behind every shard's watermark and the node state's offset.
    fn trim(&self) -> Offset {
        self.watermarks.iter().copied().min().map_or(self.node_offset, |w| w.min(self.node_offset))
    }

    fn failed(&mut self, shard: usize, error: anyhow::Error) -> Failed {
        self.in_a_row += 1;
        Failed { shard, error, in_a_row: self.in_a_row, fatal: self.in_a_row >= self.failures_max }
    }

    /// Handles one message of the persistence thread.
    pub fn handle(&mut self, message: Persist) -> Result<Written, Failed> {
        match message {
            Persist::Shard(delta) => self.persist(*delta),
            Persist::Node(state) => self.persist_node(*state),
        }
    }

    /// Writes the node state (merged into any kept failure) with its records, then a barrier. `shard` in the
    /// result is the shard count (no shard's).
    pub fn persist_node(&mut self, state: NodeState) -> Result<Written, Failed> {
        let state = match self.kept_node.take() {
            Some(older) => merge_node(older, state),
            None => state,
        };
        let mut value = Vec::new();
        let written = vigil_store::codec::encode_value(&state.value, &mut value)
            .map_err(anyhow::Error::from)
            .and_then(|()| records(&state.triggers, &state.liquidations))
            .and_then(|records| self.store.write_node(state.offset, &value, &records).map_err(anyhow::Error::from))
            .and_then(|()| self.store.barrier().map_err(anyhow::Error::from));
        let shard = self.watermarks.len();
        match written {
            Ok(()) => {
                self.in_a_row = 0;
                self.node_offset = self.node_offset.max(state.offset);
                Ok(Written { shard, offset: state.offset, bytes: value.len() as u64, accounts: 0, trim: self.trim() })
            }
            Err(error) => {
                self.kept_node = Some(state);
                Err(self.failed(shard, error))
            }
        }
    }

    pub fn watermarks(&self) -> &[Offset] {
        &self.watermarks
    }

    pub fn store(&self) -> &dyn CheckpointStore {
        &*self.store
    }

    /// Whether a failed delta is waiting to be written again.
    pub fn has_kept(&self) -> bool {
        self.kept.iter().any(Option::is_some) || self.kept_node.is_some()
    }

    /// Writes `delta` (merged into any kept failure of its shard), then a barrier; advances the watermark only
    /// when both succeed. The caller must have waited until the journal is durable through `delta.delta.offset`.
    pub fn persist(&mut self, delta: ShardDelta) -> Result<Written, Failed> {
        let shard = delta.shard;
        assert!(shard < self.kept.len(), "invariant: a delta from shard {shard} of {} shards", self.kept.len());
        let delta = match self.kept[shard].take() {
            Some(older) => merge(older, delta),
            None => delta,
        };
        let written = write_delta(&mut *self.store, shard, &delta.delta, &delta.triggers, &delta.liquidations)
            .and_then(|bytes| self.store.barrier().map(|()| bytes).map_err(anyhow::Error::from));
        match written {
            Ok(bytes) => {
                self.in_a_row = 0;
                let offset = delta.delta.offset;
                self.watermarks[shard] = offset;
                Ok(Written { shard, offset, bytes, accounts: delta.delta.accounts.len(), trim: self.trim() })
            }
            Err(error) => {
                self.kept[shard] = Some(delta);
                Err(self.failed(shard, error))
            }
        }
    }

    /// Writes every kept delta again (at shutdown, say). Stops at the first failure.
    pub fn retry_kept(&mut self) -> Result<Vec<Written>, Failed> {
        let mut out = Vec::new();
        for shard in 0..self.kept.len() {
            if let Some(delta) = self.kept[shard].take() {
                out.push(self.persist(delta)?);
            }
        }
        if let Some(state) = self.kept_node.take() {
            out.push(self.persist_node(state)?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_engine::{Config, Engine, merged_views};
    use vigil_model::parse_line;
    use vigil_store::sim::SimCheckpointStore;

    fn engine_with(lines: &[&str]) -> Engine {
        let mut e = Engine::new(&Config::default());
        for (i, l) in lines.iter().enumerate() {
            e.apply(Offset(i as u64 + 1), &parse_line(l).unwrap(), &mut Vec::new()).unwrap();
        }
        e
    }

    #[test]
    fn a_failed_checkpoint_is_kept_and_merged_so_nothing_is_lost() {
        // Proves: a write that fails keeps its delta; the next delta merges into it; the watermark never passes
        // state that is not stored; a shard restored from the store equals the live one.
        let store = SimCheckpointStore::new();
        let mut p = Persister::new(Box::new(store.clone()), vec![Offset(0)], Offset(u64::MAX), 3);
        let mut e = engine_with(&[
            r#"{"type":"deposit","account":"a","asset":"USDC","amount":"5"}"#,
            r#"{"type":"deposit","account":"b","asset":"USDC","amount":"7"}"#,
        ]);
        store.fail_next_writes(1);
        let failed = p
            .persist(ShardDelta { shard: 0, delta: e.take_delta(), triggers: Vec::new(), liquidations: Vec::new() })
            .unwrap_err();
        assert_eq!((failed.in_a_row, failed.fatal), (1, false));
        assert_eq!(p.watermarks(), &[Offset(0)], "a failed write moves no watermark");
        assert!(p.has_kept());
        // Only "c" changes next: without the merge, "a" and "b" would never reach the store.
        let c = parse_line(r#"{"type":"deposit","account":"c","asset":"USDC","amount":"1"}"#).unwrap();
        e.apply(Offset(3), &c, &mut Vec::new()).unwrap();
        let w = p
            .persist(ShardDelta { shard: 0, delta: e.take_delta(), triggers: Vec::new(), liquidations: Vec::new() })
            .unwrap();
        assert_eq!((w.offset, w.accounts, w.trim), (Offset(3), 3, Offset(3)));
        assert!(!p.has_kept());
        let restored = crate::recovery::load_shard(&store, 0, &Config::default()).unwrap();
        assert_eq!(merged_views(&[restored]), merged_views(&[e]));
    }

    #[test]
    fn a_failed_barrier_keeps_the_delta_and_failures_in_a_row_become_fatal() {
        // Proves a write whose barrier fails does not advance the watermark (nor trim), the limit of failures in
        // a row makes it fatal, and the kept delta is written by a later retry.
        let store = SimCheckpointStore::new();
        let mut p = Persister::new(Box::new(store.clone()), vec![Offset(0), Offset(0)], Offset(u64::MAX), 2);
        let mut e = engine_with(&[r#"{"type":"deposit","account":"a","asset":"USDC","amount":"5"}"#]);
        store.fail_next_barriers(1);
        let first = p
            .persist(ShardDelta { shard: 0, delta: e.take_delta(), triggers: Vec::new(), liquidations: Vec::new() })
            .unwrap_err();
        assert!(!first.fatal);
        assert!(format!("{:#}", first.error).contains("barrier failed"), "{:#}", first.error);
        store.fail_next_writes(1);
        let second = p
            .persist(ShardDelta { shard: 0, delta: e.take_delta(), triggers: Vec::new(), liquidations: Vec::new() })
            .unwrap_err();
        assert!(second.fatal && second.in_a_row == 2, "{second:?}");
        assert_eq!(p.watermarks(), &[Offset(0), Offset(0)]);
        let written = p.retry_kept().unwrap();
        assert_eq!(written.len(), 1);
        assert_eq!((written[0].offset, written[0].accounts), (Offset(1), 1));
        assert_eq!(p.watermarks()[0], Offset(1));
        assert_eq!(written[0].trim, Offset(0), "the other shard's watermark still holds the journal");
    }
}
