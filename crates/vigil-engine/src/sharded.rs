//! Several engine states side by side, accounts partitioned by a stable hash: the sans-IO form of sharding.
//! Account events go to the owning shard; reference and market data go to every shard. The merged output is the
//! same for every shard count, which is what `vigil replay --shards N` relies on.

use vigil_model::{AccountView, Event, Offset, Rejection, Trigger, shard_of};

use crate::{Config, Engine};

#[derive(Clone, Debug)]
pub struct Sharded {
    shards: Vec<Engine>,
    offset: Offset,
}

impl Sharded {
    pub fn new(config: &Config, shards: usize) -> Self {
        let n = shards.max(1);
        Self { shards: (0..n).map(|_| Engine::new(config)).collect(), offset: Offset(0) }
    }

    /// Shards built elsewhere (restored from checkpoints), continuing after the highest offset any has applied.
    pub fn from_engines(shards: Vec<Engine>) -> Self {
        let offset = shards.iter().map(Engine::offset).max().unwrap_or_default();
        Self { shards, offset }
    }

    pub fn into_engines(self) -> Vec<Engine> {
        self.shards
    }

    pub fn shards_mut(&mut self) -> &mut [Engine] {
        &mut self.shards
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    pub fn shards(&self) -> &[Engine] {
        &self.shards
    }

    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// Assigns the next offset to an event and applies it where it belongs. Triggers are appended in the
    /// contract's order; the returned offset is the event's.
    pub fn apply(&mut self, event: &Event, triggers: &mut Vec<Trigger>) -> (Offset, Result<(), Rejection>) {
        let offset = self.next_offset();
        (offset, self.apply_at(offset, event, triggers))
    }

    /// Records a rejection decided before the engines (a line that is not an event) at the next offset.
    pub fn next_offset(&mut self) -> Offset {
        self.offset = Offset(self.offset.0 + 1);
        self.offset
    }

    /// Applies an event at an offset assigned elsewhere (a journal's): a shard ignores offsets it already has.
    pub fn apply_at(&mut self, offset: Offset, event: &Event, triggers: &mut Vec<Trigger>) -> Result<(), Rejection> {
        self.offset = self.offset.max(offset);
        match event.account() {
            Some(account) => {
                let shard = shard_of(account, self.shards.len());
                self.shards[shard].apply(offset, event, triggers)
            }
            None => {
                // Broadcast: every shard validates against identical reference and market data, so all agree on
                // acceptance; the triggers of each shard's accounts are merged and re-sorted.
                let start = triggers.len();
                let mut first: Option<Result<(), Rejection>> = None;
                for shard in &mut self.shards {
                    // A restored shard may already have this offset (its checkpoint is newer): it skips it.
                    let skipped = shard.offset() >= offset;
                    let r = shard.apply(offset, event, triggers);
                    if skipped {
                        continue;
                    }
                    debug_assert!(
                        first.as_ref().is_none_or(|f| f.is_ok() == r.is_ok()),
                        "invariant: shards that apply a broadcast event agree on it"
                    );
                    first.get_or_insert(r);
                }
                if self.shards.len() > 1 {
                    triggers[start..].sort_unstable();
                }
                first.unwrap_or(Ok(()))
            }
        }
    }

    /// Every account's view across shards, sorted by account id.
    pub fn views(&self) -> Vec<AccountView> {
        merged_views(&self.shards)
    }

    /// The shard that owns an account.
    pub fn shard_for(&self, account: &str) -> &Engine {
        &self.shards[shard_of(account, self.shards.len())]
    }
}

/// Every account's view across a set of shard engines, sorted by account id.
pub fn merged_views(shards: &[Engine]) -> Vec<AccountView> {
    let mut all: Vec<AccountView> = shards.iter().flat_map(Engine::views).collect();
    all.sort_by(|a, b| a.account.cmp(&b.account));
    all
}
