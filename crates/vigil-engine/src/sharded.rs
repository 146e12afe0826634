//! Several engine states side by side, accounts partitioned by a stable hash: the sans-IO form of sharding.
//! Account events go to the owning shard; reference and market data go to every shard. The merged output is the
//! same for every shard count, which is what `vigil replay --shards N` relies on.

use vigil_model::liquidation::{FundError, InsuranceFund};
use vigil_model::{
    AccountView, Amount, Event, LiquidationRecord, Offset, Reason, Rejection, Trigger, TriggerKind, reject, shard_of,
};

use crate::{Config, Engine};

#[derive(Clone, Debug)]
pub struct Sharded {
    shards: Vec<Engine>,
    offset: Offset,
    /// The insurance fund, folded over `insurance` events and the shards' liquidation records in offset order.
    fund: InsuranceFund,
    /// Every liquidation fill, in offset order, with its uncovered part.
    liquidations: Vec<LiquidationRecord>,
    /// Recovery: the offset the fund was restored at (its `insurance` events and fills are in it already).
    fund_at: Offset,
    /// Recovery: fills beyond `fund_at` that a shard applied before its checkpoint (so the replay skips them),
    /// unsettled, in offset order: each is settled when the replay reaches its offset.
    stored: std::collections::VecDeque<LiquidationRecord>,
    /// Recovery: the offset of the last stored fill settled (a shard that re-applies that offset emits it again).
    stored_through: Offset,
}

impl Sharded {
    pub fn new(config: &Config, shards: usize) -> Self {
        let n = shards.max(1);
        Self {
            shards: (0..n).map(|_| Engine::new(config)).collect(),
            offset: Offset(0),
            fund: InsuranceFund::default(),
            liquidations: Vec::new(),
            fund_at: Offset(0),
            stored: Default::default(),
            stored_through: Offset(0),
        }
    }

    /// Shards built elsewhere (restored from checkpoints), continuing after the highest offset any has applied.
    pub fn from_engines(shards: Vec<Engine>) -> Self {
        let offset = shards.iter().map(Engine::offset).max().unwrap_or_default();
        Self {
            shards,
            offset,
            fund: InsuranceFund::default(),
            liquidations: Vec::new(),
            fund_at: Offset(0),
            stored: Default::default(),
            stored_through: Offset(0),
        }
    }

    /// Recovery: continues the fund stored as of `at` while the journal is replayed over restored shards. Replayed
    /// `insurance` events and fills at or below `at` are already in it and are not folded again; `stored` are the
    /// fills stored beside checkpoints (any order, settled or not): those beyond `at` are settled in offset order
    /// as the replay reaches them, once each (a shard that re-applies one of those offsets emits the same fill).
    pub fn restore_fund(&mut self, fund: InsuranceFund, at: Offset, mut stored: Vec<LiquidationRecord>) {
        stored.retain(|r| r.offset > at);
        stored.sort_by_key(|r| r.offset);
        stored.dedup_by_key(|r| r.offset);
        self.fund = fund;
        self.fund_at = at;
        self.stored = stored.into();
    }

    /// Settles the stored fills at or below `through` (recovery; see [`Sharded::restore_fund`]).
    pub fn settle_stored(&mut self, through: Offset, triggers: &mut Vec<Trigger>) {
        while let Some(record) = self.stored.pop_front_if(|r| r.offset <= through) {
            self.stored_through = record.offset;
            let record = settle_liquidation(&mut self.fund, record, triggers);
            self.liquidations.push(record);
        }
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
        if !self.stored.is_empty() {
            self.settle_stored(offset, triggers);
        }
        if let Event::Insurance { amount } = event {
            if offset <= self.fund_at {
                return Ok(()); // in the restored fund already
            }
            return self.fund.transfer(*amount).map_err(fund_rejection);
        }
        match event.account() {
            Some(account) => {
                let shard = shard_of(account, self.shards.len());
                let start = triggers.len();
                let result = self.shards[shard].apply(offset, event, triggers);
                if let Some(record) = self.shards[shard].take_liquidation()
                    && record.offset > self.fund_at
                    && record.offset != self.stored_through
                {
                    let record = settle_liquidation(&mut self.fund, record, triggers);
                    triggers[start..].sort_unstable();
                    self.liquidations.push(record);
                }
                result
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

    /// The insurance fund as of the last offset applied.
    pub fn fund(&self) -> &InsuranceFund {
        &self.fund
    }

    /// Every liquidation fill so far, in offset order.
    pub fn liquidations(&self) -> &[LiquidationRecord] {
        &self.liquidations
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

/// An `insurance` event the fund refuses, as the contract's rejection.
pub fn fund_rejection(e: FundError) -> Rejection {
    match e {
        FundError::InsufficientBalance => {
            reject(Reason::InsufficientBalance, "a withdrawal beyond the insurance fund's positive balance")
        }
        FundError::OutOfRange => reject(Reason::InvalidNumber, "the insurance fund's balance would leave the range"),
    }
}

/// Folds one liquidation record into the fund (in offset order: the caller's job) and appends the `deleverage`
/// trigger when the fund did not hold all of the deficit. Returns the record with its uncovered part.
pub fn settle_liquidation(
    fund: &mut InsuranceFund,
    mut record: LiquidationRecord,
    triggers: &mut Vec<Trigger>,
) -> LiquidationRecord {
    let uncovered = fund.settle(record.fee, record.fund_paid);
    record.uncovered = uncovered;
    if uncovered > Amount::ZERO {
        triggers.push(Trigger {
            offset: record.offset,
            account: record.account.clone(),
            symbol: Some(record.symbol.clone()),
            kind: TriggerKind::Deleverage,
            equity: record.equity,
            maintenance_margin: record.maintenance_margin,
            uncovered: Some(uncovered),
        });
    }
    record
}

/// Every account's view across a set of shard engines, sorted by account id.
pub fn merged_views(shards: &[Engine]) -> Vec<AccountView> {
    let mut all: Vec<AccountView> = shards.iter().flat_map(Engine::views).collect();
    all.sort_by(|a, b| a.account.cmp(&b.account));
    all
}
