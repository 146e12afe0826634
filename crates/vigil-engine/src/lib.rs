//! Vigil's state machine: it applies one sequenced event at a time to one shard's accounts.
//!
//! Sans-IO: no threads, files or clocks. Every event is validated completely before anything changes, so a
//! rejected event leaves the state exactly as it was. After an accepted event, the margin units it touched (and
//! only those) are re-evaluated and their liquidation episodes advanced; a price tick touches the accounts that
//! depend on that price, nothing else. Cached figures are therefore always current: an invariant the differential
//! test against the naive reference model guards.

pub mod account;
pub mod band;
pub mod groups;
mod index;
pub mod market;
mod prefetch;
pub mod sharded;
pub mod stress;

pub use sharded::{Sharded, merged_views};

use std::collections::HashMap;

use vigil_model::liquidation::{LiquidationFill, liquidation_outcome};
use vigil_model::margin::{apply_fill, credit_from_e16, funding_credit, pretrade_allowed};
use vigil_model::{
    AccountView, Amount, Event, Fill, LiquidationRecord, MarginMode, MarginModel, Offset, Qty, Reason, Rejection,
    Trigger, UnitFigures, reject,
};

use crate::account::{Account, Dep, Position, evaluate, evaluate_and_detect, view};
use crate::band::Band;
use crate::index::{Side, SlotIndex};
use crate::market::{Entry, InstrumentKind, Market, QUOTE, Slot};

/// How a price tick finds the accounts it may push over a threshold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Detection {
    /// Re-evaluate every account that depends on the price (the peers' method, and the baseline).
    Rescan,
    /// Re-evaluate only the accounts whose safe price band the tick leaves (see `band`).
    #[default]
    Indexed,
}

impl std::str::FromStr for Detection {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rescan" => Ok(Detection::Rescan),
            "indexed" => Ok(Detection::Indexed),
            other => Err(format!("unknown detection mode {other:?} (rescan or indexed)")),
        }
    }
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The settlement currency (price 1, no haircut).
    pub quote: String,
    pub detection: Detection,
}

impl Default for Config {
    fn default() -> Self {
        Self { quote: vigil_model::QUOTE_DEFAULT.to_owned(), detection: Detection::default() }
    }
}

/// The answer to a pre-trade check: the unit's figures before and after the hypothetical fill.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckOutcome {
    pub allowed: bool,
    /// Why the fill is refused; `None` when allowed.
    pub reason: Option<Rejection>,
    pub before: UnitFigures,
    pub after: UnitFigures,
}

/// Monitoring counts of one shard (`Engine::stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub accounts: u64,
    /// Open positions (isolated wallets without a position not counted).
    pub positions: u64,
    /// Accounts with a unit in a liquidation episode.
    pub liquidating: u64,
    /// Accounts with positions, by their worst unit's margin ratio (maintenance margin / equity): the bands of
    /// [`MARGIN_BANDS`].
    pub bands: [u64; 5],
}

/// Margin ratio bands (maintenance margin / equity), as Prometheus label values; the last is liquidatable.
pub const MARGIN_BANDS: [&str; 5] = ["0-25%", "25-50%", "50-75%", "75-100%", "100%+"];

/// The band of a unit with `mm > 0`: ratio `mm / equity` in quarters, 100%+ when `equity <= mm`.
fn margin_band(equity: i128, mm: i128) -> usize {
    if equity <= mm {
        return 4;
    }
    // equity > mm > 0: ratio < 1. Compare mm × 4 with equity × k without dividing.
    let q = mm.saturating_mul(4);
    for k in 0..3 {
        if q < equity.saturating_mul(k as i128 + 1) {
            return k;
        }
    }
    3
}

/// The cross unit and each isolated position of an account, with their episodes.
fn vec_units(a: &Account) -> impl Iterator<Item = (UnitFigures, account::Episode)> + '_ {
    std::iter::once((a.cross, a.episode))
        .chain(a.positions.iter().filter(|p| p.mode == MarginMode::Isolated).map(|p| (p.isolated_figures(), p.episode)))
}

/// One shard's state.
#[derive(Clone, Debug)]
pub struct Engine {
    market: Market,
    accounts: Vec<Account>,
    ids: HashMap<Box<str>, u32, foldhash::fast::RandomState>,
    /// Per price slot, the accounts whose figures depend on it.
    dependents: Vec<Vec<u32>>,
    /// Per price slot, the safe-band indexes (indexed detection).
    index: Vec<SlotIndex>,
    detection: Detection,
    offset: Offset,
    bands: Vec<Band>,
    popped: Vec<u32>,
    /// A tick's crossed band edges (scratch).
    crossed: Vec<(Side, index::Edge)>,
    /// Per underlying slot, the portfolio groups an index tick revalues on their own (indexed detection).
    groups: Vec<groups::GroupTable>,
    /// Exact account evaluations so far (the cost detection pays).
    evaluations: u64,
    /// Accounts changed since the last `take_delta`.
    dirty: Vec<u32>,
    /// The last liquidation fill applied, until taken ([`Engine::take_liquidation`]).
    liquidation: Option<LiquidationRecord>,
}

/// A checkpoint delta of one shard: the market (small, whole) and the accounts changed since the previous delta,
/// as of `offset`. Applying the deltas in order to an empty store gives the shard's state at the last offset.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Delta {
    pub offset: Offset,
    pub market: Market,
    pub accounts: Vec<Account>,
}

/// What a fill would do to one account, computed before anything changes.
struct FillPlan {
    slot: Slot,
    underlying: Option<Slot>,
    mode: MarginMode,
    qty: Qty,
    cost_e16: i128,
    /// The isolated wallet after the fill (before it returns to cross on close).
    wallet: Amount,
    /// The quote balance after the fill.
    quote: Amount,
}

/// Pushes growing the capacity by one: an account's lists hold a handful of entries, and the default doubling
/// (from 4) would triple the memory of a million one-position accounts.
fn push_exact<T>(v: &mut Vec<T>, item: T) {
    if v.len() == v.capacity() {
        v.reserve_exact(1);
    }
    v.push(item);
}

fn out_of_range(what: &str) -> Rejection {
    reject(Reason::InvalidNumber, format!("{what} would leave the representable range"))
}

fn add_dep(dependents: &mut [Vec<u32>], acc: &mut Account, a: u32, slot: Slot) {
    if let Some(d) = acc.deps.iter_mut().find(|d| d.slot == slot) {
        d.refs += 1;
        return;
    }
    let list = &mut dependents[slot as usize];
    let index = list.len() as u32;
    push_exact(&mut acc.deps, Dep { slot, refs: 1, index, band: Band::default(), stamp: 0, always: false });
    list.push(a);
}

/// Whether band edges stamped `stamp` on `slot` are still the account's (live, not stale).
fn holds_edge(acc: &Account, slot: Slot, stamp: u32) -> bool {
    acc.deps.iter().any(|d| d.slot == slot && d.stamp == stamp)
}

fn remove_dep(dependents: &mut [Vec<u32>], index: &mut [SlotIndex], accounts: &mut [Account], a: u32, slot: Slot) {
    let acc = &mut accounts[a as usize];
    let Some(i) = acc.deps.iter().position(|d| d.slot == slot) else {
        debug_assert!(false, "invariant: a dependency is removed only after it was added");
        return;
    };
    acc.deps[i].refs -= 1;
    if acc.deps[i].refs > 0 {
        return;
    }
    index[slot as usize].drop_band(acc.deps[i].band);
    if acc.deps[i].always {
        let always = &mut index[slot as usize].always;
        if let Some(k) = always.iter().position(|x| *x == a) {
            always.swap_remove(k);
        }
    }
    let index = acc.deps[i].index as usize;
    acc.deps.swap_remove(i);
    let list = &mut dependents[slot as usize];
    list.swap_remove(index);
    if let Some(&moved) = list.get(index)
        && let Some(d) = accounts[moved as usize].deps.iter_mut().find(|d| d.slot == slot)
    {
        d.index = index as u32;
    }
}

impl Engine {
    pub fn new(config: &Config) -> Self {
        Self {
            market: Market::new(&config.quote),
            accounts: Vec::new(),
            ids: HashMap::default(),
            dependents: vec![Vec::new()],
            index: vec![SlotIndex::default()],
            detection: config.detection,
            offset: Offset(0),
            bands: Vec::new(),
            popped: Vec::new(),
            crossed: Vec::new(),
            groups: Vec::new(),
            evaluations: 0,
            dirty: Vec::new(),
            liquidation: None,
        }
    }

    /// The record of the liquidation fill the last `apply` applied, if it was one (taken: the next call gives
    /// `None`). Its `uncovered` is zero: that part depends on the insurance fund, folded where every shard's
    /// records meet in offset order.
    pub fn take_liquidation(&mut self) -> Option<LiquidationRecord> {
        self.liquidation.take()
    }

    /// The accounts changed since the last call, with the market, as of the current offset.
    pub fn take_delta(&mut self) -> Delta {
        let mut accounts = Vec::with_capacity(self.dirty.len());
        for a in std::mem::take(&mut self.dirty) {
            let acc = &mut self.accounts[a as usize];
            acc.dirty = false;
            accounts.push(acc.clone());
        }
        Delta { offset: self.offset, market: self.market.clone(), accounts }
    }

    /// Rebuilds a shard from a checkpoint: the market and every account as of `offset`. Caches, dependency lists
    /// and band indexes are derived again; episodes come from the checkpoint, so no trigger is emitted twice.
    pub fn restore(
        config: &Config,
        offset: Offset,
        mut market: Market,
        accounts: impl IntoIterator<Item = Account>,
    ) -> Self {
        let mut e = Engine::new(config);
        market.reindex();
        let slots = market.slots();
        e.market = market;
        e.dependents = vec![Vec::new(); slots];
        e.index = vec![SlotIndex::default(); slots];
        for mut acc in accounts {
            acc.deps.clear();
            acc.dirty = false;
            let a = e.accounts.len() as u32;
            e.ids.insert(acc.id.clone(), a);
            e.accounts.push(acc);
            let acc = &mut e.accounts[a as usize];
            let assets: Vec<Slot> =
                acc.balances.iter().filter(|(s, x)| *s != QUOTE && x.0 != 0).map(|(s, _)| *s).collect();
            let held: Vec<Slot> = acc.positions.iter().map(|p| p.slot).collect();
            for s in assets {
                add_dep(&mut e.dependents, acc, a, s);
            }
            for s in held {
                add_dep(&mut e.dependents, acc, a, s);
                if let Some(u) = e.market.group_of(s) {
                    add_dep(&mut e.dependents, acc, a, u);
                }
            }
            evaluate(&e.market, acc);
            e.reband(a);
        }
        e.offset = offset;
        e
    }

    /// How many exact account evaluations the engine has done (each trade, transfer, popped band, rescan...).
    pub fn evaluations(&self) -> u64 {
        self.evaluations
    }

    pub fn detection(&self) -> Detection {
        self.detection
    }

    /// Exact re-evaluation of one account: figures, episodes, triggers, and (indexed) its bands.
    fn touch(&mut self, a: u32, offset: Offset, triggers: &mut Vec<Trigger>) {
        self.evaluations += 1;
        let acc = &mut self.accounts[a as usize];
        evaluate_and_detect(&self.market, acc, offset, triggers);
        if !acc.dirty {
            acc.dirty = true;
            self.dirty.push(a);
        }
        self.reband(a);
    }

    /// Recomputes an account's bands (indexed detection) from its fresh figures and updates the indexes.
    fn reband(&mut self, a: u32) {
        if self.detection != Detection::Indexed {
            return;
        }
        let acc = &mut self.accounts[a as usize];
        groups::GroupTable::sync(&mut self.groups, &self.market, acc, a);
        let portfolio = band::always_reevaluated(&self.market, acc);
        band::compute(&self.market, acc, &mut self.bands);
        let mut rebuild = false;
        for (d, new) in acc.deps.iter_mut().zip(&self.bands) {
            let idx = &mut self.index[d.slot as usize];
            if d.band != *new {
                d.stamp = idx.reband(a, d.band, *new);
                d.band = *new;
                rebuild |= idx.needs_rebuild();
            }
            // A slot whose ticks the account's group table row serves: neither banded nor always.
            let always = portfolio && !acc.rows.iter().any(|(u, _)| *u == d.slot);
            if d.always != always {
                if always {
                    idx.always.push(a);
                } else if let Some(k) = idx.always.iter().position(|x| *x == a) {
                    idx.always.swap_remove(k);
                }
                d.always = always;
            }
        }
        if rebuild {
            for i in 0..self.accounts[a as usize].deps.len() {
                let slot = self.accounts[a as usize].deps[i].slot;
                if self.index[slot as usize].needs_rebuild() {
                    self.rebuild_index(slot);
                }
            }
        }
    }

    /// Rebuilds a slot's band index from its dependents' bands (dropping the stale edges).
    fn rebuild_index(&mut self, slot: Slot) {
        let accounts = &self.accounts;
        let bands = self.dependents[slot as usize].iter().filter_map(|&a| {
            let d = accounts[a as usize].deps.iter().find(|d| d.slot == slot)?;
            Some((a, d.stamp, d.band))
        });
        self.index[slot as usize].rebuild(bands);
    }

    /// Brings an account's cached figures up to current prices (no episode change): with indexed detection they
    /// may date from its last exact evaluation.
    fn refresh(&mut self, a: u32) {
        if self.detection == Detection::Indexed {
            evaluate(&self.market, &mut self.accounts[a as usize]);
        }
    }

    /// Indexed tick: pops the accounts whose band `price` leaves, and the slot's `always` accounts, and
    /// re-evaluates exactly those.
    fn tick(&mut self, slot: Slot, price: i64, offset: Offset, triggers: &mut Vec<Trigger>) {
        let mut popped = std::mem::take(&mut self.popped);
        let mut crossed = std::mem::take(&mut self.crossed);
        popped.clear();
        crossed.clear();
        let accounts = &self.accounts;
        let idx = &mut self.index[slot as usize];
        idx.cross(price, |a, stamp| holds_edge(&accounts[a as usize], slot, stamp), &mut crossed);
        popped.extend(crossed.iter().map(|(_, e)| e.account));
        popped.extend_from_slice(&idx.always);
        // The groups a tick of this index revalues on their own; the accounts a row cannot serve join `popped`.
        if let Some(table) = self.groups.get_mut(slot as usize).filter(|t| t.live() > 0) {
            self.evaluations +=
                table.tick(&self.market, slot, &mut self.accounts, offset, triggers, &mut popped, &mut self.dirty);
        }
        popped.sort_unstable();
        popped.dedup();
        for &a in &popped {
            self.touch(a, offset, triggers);
        }
        // An account whose band on this slot came out unchanged keeps its edge (it is popped again next tick).
        for &(side, e) in &crossed {
            if holds_edge(&self.accounts[e.account as usize], slot, e.stamp) {
                self.index[slot as usize].restore(side, e);
            }
        }
        self.popped = popped;
        self.crossed = crossed;
    }

    /// Counts for monitoring, from the cached figures (with indexed detection, those of each unit's last exact
    /// evaluation: its bands guarantee no episode changed since). One pass over the accounts; no allocation.
    pub fn stats(&self) -> ShardStats {
        let mut s = ShardStats::default();
        for a in &self.accounts {
            s.accounts += 1;
            s.positions += a.positions.iter().filter(|p| p.qty.0 != 0).count() as u64;
            if vec_units(a).any(|(f, e)| e.active || f.maintenance_margin.0 > 0 && f.equity.0 <= 0) {
                s.liquidating += 1;
            }
            // The account's band is its worst unit's maintenance margin over equity.
            let mut worst: Option<usize> = None;
            for (f, _) in vec_units(a) {
                if f.maintenance_margin.0 <= 0 {
                    continue;
                }
                let band = margin_band(f.equity.0, f.maintenance_margin.0);
                worst = Some(worst.map_or(band, |w| w.max(band)));
            }
            if let Some(b) = worst {
                s.bands[b] += 1;
            }
        }
        s
    }

    /// The offset of the last event applied (or skipped as rejected).
    pub fn offset(&self) -> Offset {
        self.offset
    }

    pub fn market(&self) -> &Market {
        &self.market
    }

    pub fn account_count(&self) -> usize {
        self.accounts.len()
    }

    /// Applies one event at `offset`. Triggers it causes are appended to `triggers`, sorted by the contract's
    /// order within the offset. On `Err` nothing changed. Offsets must increase; an event at an offset already
    /// applied is ignored, so a replayed prefix is harmless.
    pub fn apply(&mut self, offset: Offset, event: &Event, triggers: &mut Vec<Trigger>) -> Result<(), Rejection> {
        if offset <= self.offset {
            return Ok(());
        }
        self.offset = offset;
        let start = triggers.len();
        let result = self.apply_inner(offset, event, triggers);
        debug_assert!(result.is_ok() || triggers.len() == start, "invariant: a rejected event emits no trigger");
        triggers[start..].sort_unstable();
        result
    }

    fn apply_inner(&mut self, offset: Offset, event: &Event, triggers: &mut Vec<Trigger>) -> Result<(), Rejection> {
        match event {
            Event::Asset { .. } | Event::Perp { .. } | Event::Future { .. } | Event::Option { .. } => {
                let declared = self.market.declare(event)?;
                if declared.created {
                    self.dependents.push(Vec::new());
                    self.index.push(SlotIndex::default());
                    debug_assert_eq!(self.dependents.len(), self.market.slots(), "invariant: one list per slot");
                } else {
                    self.reevaluate(declared.slot, offset, triggers);
                }
                Ok(())
            }
            Event::Price { symbol, price } => {
                let slot = self.market.price_slot(symbol)?;
                let first = self.market.price(slot).is_none();
                self.market.set_price(slot, *price);
                if self.detection == Detection::Rescan || first {
                    // A first price gives unpriced collateral a value and a slope: everyone re-bands.
                    self.reevaluate(slot, offset, triggers);
                } else {
                    self.tick(slot, price.raw(), offset, triggers);
                }
                Ok(())
            }
            Event::Funding { symbol, rate } => {
                let slot = self.market.slot(symbol).ok_or_else(|| unknown_symbol(symbol))?;
                match self.market.entry(slot) {
                    Some(Entry::Instrument(i)) if matches!(i.kind, InstrumentKind::Perp) => {}
                    _ => return Err(reject(Reason::InvalidReference, format!("funding on {symbol:?}, not a perp"))),
                }
                let mark = self.market.price(slot).ok_or_else(|| no_price(symbol))?;
                let holders = std::mem::take(&mut self.popped);
                let mut holders = holders;
                holders.clear();
                holders.extend_from_slice(&self.dependents[slot as usize]);
                for &a in &holders {
                    let acc = &mut self.accounts[a as usize];
                    if let Some(i) = acc.position_index(slot)
                        && acc.positions[i].is_open()
                    {
                        let credit = funding_credit(acc.positions[i].qty, mark, *rate);
                        if acc.positions[i].mode == MarginMode::Isolated {
                            acc.positions[i].wallet = acc.positions[i].wallet.saturating_add(credit);
                        } else {
                            acc.balances[0].1 = acc.balances[0].1.saturating_add(credit);
                        }
                    }
                    self.touch(a, offset, triggers);
                }
                self.popped = holders;
                Ok(())
            }
            Event::Settle { symbol, price } => self.settle(offset, symbol, *price, triggers),
            Event::Deposit { account, asset, amount } => {
                let asset = self.market.asset(asset)?;
                let a = self.ids.get(account.as_str()).copied();
                let before = a.map_or(Amount::ZERO, |a| self.accounts[a as usize].balance(asset));
                let after = before.checked_add(*amount).ok_or_else(|| out_of_range("the balance"))?;
                let a = a.unwrap_or_else(|| self.create_account(account));
                self.set_balance(a, asset, after);
                self.touch(a, offset, triggers);
                Ok(())
            }
            Event::Withdraw { account, asset, amount } => {
                let a = self.existing_account(account)?;
                let asset = self.market.asset(asset)?;
                self.refresh(a);
                let acc = &self.accounts[a as usize];
                let before = acc.balance(asset);
                let after = before.checked_sub(*amount).ok_or_else(|| out_of_range("the balance"))?;
                if after.is_negative() {
                    return Err(reject(Reason::InsufficientBalance, format!("balance {before} < withdrawal {amount}")));
                }
                let mut balances = acc.balances.clone();
                set_amount(&mut balances, asset, after);
                let equity = account::collateral(&self.market, &balances).saturating_add(cross_position_value(acc));
                if equity < acc.cross.initial_margin {
                    return Err(reject(
                        Reason::InsufficientMargin,
                        format!("equity after {equity} < initial margin {}", acc.cross.initial_margin),
                    ));
                }
                self.set_balance(a, asset, after);
                self.touch(a, offset, triggers);
                Ok(())
            }
            Event::Transfer { account, symbol, amount } => self.transfer(offset, account, symbol, *amount, triggers),
            Event::Trade(fill) => {
                let a = self.ids.get(fill.account.as_str()).copied();
                let plan = self.plan_fill(a.map(|a| &self.accounts[a as usize]), fill)?;
                let a = a.unwrap_or_else(|| self.create_account(&fill.account));
                self.commit_fill(a, &plan);
                self.touch(a, offset, triggers);
                Ok(())
            }
            Event::Clock { time } => {
                self.market.check_clock(*time)?;
                self.market.set_clock(*time);
                // Time moves every option's time to expiry: portfolio accounts holding options are revalued.
                for a in 0..self.accounts.len() as u32 {
                    let acc = &self.accounts[a as usize];
                    let holds_option = acc.positions.iter().any(|p| {
                        p.is_open()
                            && matches!(
                                self.market.instrument(p.slot).map(|i| &i.kind),
                                Some(InstrumentKind::Option { .. })
                            )
                    });
                    if acc.margin == MarginModel::Portfolio && holds_option {
                        self.touch(a, offset, triggers);
                    }
                }
                Ok(())
            }
            Event::Risk { underlying, params } => {
                let slot = self.market.check_risk(underlying, params)?;
                self.market.set_risk(slot, *params);
                // Every position grouped under the underlying depends on its index slot.
                self.reevaluate(slot, offset, triggers);
                Ok(())
            }
            Event::AccountConfig { account, margin } => {
                let a = self.existing_account(account)?;
                let acc = &self.accounts[a as usize];
                if acc.margin == *margin {
                    return Ok(());
                }
                let mut copy = acc.clone();
                copy.margin = *margin;
                if *margin == MarginModel::Portfolio {
                    self.check_portfolio_prices(&copy.positions)?;
                }
                evaluate(&self.market, &mut copy);
                if copy.cross.equity < copy.cross.initial_margin {
                    return Err(reject(
                        Reason::InsufficientMargin,
                        format!(
                            "equity {} < initial margin {} under {} margin",
                            copy.cross.equity,
                            copy.cross.initial_margin,
                            margin.as_str()
                        ),
                    ));
                }
                self.accounts[a as usize].margin = *margin;
                self.touch(a, offset, triggers);
                Ok(())
            }
            Event::Liquidation(fill) => self.liquidate(offset, fill, triggers),
            // The fund is not a shard's state: its movements are folded in offset order where the shards' outputs
            // meet (`Sharded`, the node's merge), which never route this event to an engine.
            Event::Insurance { .. } => Ok(()),
            Event::LiquidationParams { max_liquidation_fee } => {
                self.market.set_max_liquidation_fee(*max_liquidation_fee);
                Ok(())
            }
        }
    }

    /// A liquidation fill (`liquidation.md`): validated like any fill, and it must reduce an open perp or future
    /// position without flipping it. The fill is applied as a trade; then the fee moves from the position's unit
    /// to the fund, or the fund's payment of the deficit to the unit (the quote balance, or the isolated wallet
    /// while the position stays open), both at this offset. The weights are the unit's standard figures before
    /// the fill.
    fn liquidate(&mut self, offset: Offset, fill: &Fill, triggers: &mut Vec<Trigger>) -> Result<(), Rejection> {
        let not_reducing = |why: &str| reject(Reason::InvalidReference, format!("a liquidation fill {why}"));
        let (slot, inst) = self.market.instrument_slot(&fill.symbol)?;
        if matches!(inst.kind, InstrumentKind::Option { .. }) {
            return Err(not_reducing("must close a perp or future, not an option"));
        }
        let Some(&a) = self.ids.get(fill.account.as_str()) else {
            return Err(not_reducing(&format!("needs an open position: {:?} has none", fill.account)));
        };
        let Some(p) = self.accounts[a as usize].position(slot).filter(|p| p.is_open()) else {
            return Err(not_reducing(&format!("needs an open position in {:?}", fill.symbol)));
        };
        let closed = Qty(-fill.signed_qty().0);
        if (closed.0 > 0) != (p.qty.0 > 0) || closed.0.unsigned_abs() > p.qty.0.unsigned_abs() {
            return Err(not_reducing(&format!("must reduce the position ({}) without flipping it", p.qty)));
        }
        // The unit's figures at current prices (indexed detection may hold older ones).
        self.refresh(a);
        let acc = &self.accounts[a as usize];
        let Some(p) = acc.position(slot) else {
            return Err(not_reducing(&format!("needs an open position in {:?}", fill.symbol)));
        };
        let mut plan = self.plan_fill(Some(acc), fill)?;
        let mark = self.market.price(slot).ok_or_else(|| no_price(&fill.symbol))?;
        let position_mm = account::position_figures(&self.market, p).maintenance_margin;
        let (equity, unit_mm) = match p.mode {
            MarginMode::Isolated => (p.isolated_figures().equity, position_mm),
            MarginMode::Cross => {
                let mm = acc
                    .positions
                    .iter()
                    .filter(|q| q.is_open() && q.mode == MarginMode::Cross)
                    .fold(Amount::ZERO, |sum, q| {
                        sum.saturating_add(account::position_figures(&self.market, q).maintenance_margin)
                    });
                (acc.cross.equity, mm)
            }
        };
        let outcome = liquidation_outcome(&LiquidationFill {
            equity,
            unit_mm,
            position_mm,
            qty: p.qty,
            mark,
            closed,
            price: fill.price,
            max_fee: self.market.max_liquidation_fee(),
        })
        .map_err(|_| out_of_range("the liquidation's figures"))?;
        // The unit's side of the fund transfer, where its money is after the fill.
        let credit = outcome.deficit.checked_sub(outcome.fee).ok_or_else(|| out_of_range("the fund transfer"))?;
        let isolated_open = plan.mode == MarginMode::Isolated && plan.qty.0 != 0;
        if isolated_open {
            plan.wallet = plan.wallet.checked_add(credit).ok_or_else(|| out_of_range("the isolated wallet"))?;
        } else {
            plan.quote = plan.quote.checked_add(credit).ok_or_else(|| out_of_range("the balance"))?;
        }
        self.commit_fill(a, &plan);
        self.touch(a, offset, triggers);
        let acc = &self.accounts[a as usize];
        let after = match acc.position(slot) {
            Some(p) if isolated_open => p.isolated_figures(),
            _ => acc.cross,
        };
        self.liquidation = Some(LiquidationRecord {
            offset,
            account: fill.account.clone(),
            symbol: fill.symbol.clone(),
            qty: closed,
            price: fill.price,
            bankruptcy_price: outcome.bankruptcy_price,
            fee: outcome.fee,
            fund_paid: outcome.deficit,
            uncovered: Amount::ZERO,
            equity: after.equity,
            maintenance_margin: after.maintenance_margin,
        });
        Ok(())
    }

    /// `no_price` unless every figure a portfolio account's groups need is there: each grouped position's
    /// underlying index (a mark is there: the position was opened at one), and the clock once it holds an option.
    fn check_portfolio_prices(&self, positions: &[Position]) -> Result<(), Rejection> {
        for p in positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Cross) {
            self.check_group_prices(p.slot)?;
        }
        Ok(())
    }

    /// The figures a position in `slot` needs in a portfolio group (see `check_portfolio_prices`).
    fn check_group_prices(&self, slot: Slot) -> Result<(), Rejection> {
        let Some(u) = self.market.group_of(slot) else { return Ok(()) };
        let symbol = self.market.name(slot);
        if self.market.price(u).is_none() {
            return Err(reject(
                Reason::NoPrice,
                format!("the underlying {:?} of {symbol:?} has no index price yet", self.market.name(u)),
            ));
        }
        let is_option = matches!(self.market.instrument(slot).map(|i| &i.kind), Some(InstrumentKind::Option { .. }));
        if is_option && self.market.clock().is_none() {
            return Err(reject(
                Reason::NoPrice,
                format!("{symbol:?} is an option: its time to expiry needs a clock event first"),
            ));
        }
        Ok(())
    }

    /// Re-evaluates every account that depends on `slot` (rescan ticks, funding, re-sent reference data).
    fn reevaluate(&mut self, slot: Slot, offset: Offset, triggers: &mut Vec<Trigger>) {
        let mut all = std::mem::take(&mut self.popped);
        all.clear();
        all.extend_from_slice(&self.dependents[slot as usize]);
        for &a in &all {
            self.touch(a, offset, triggers);
        }
        self.popped = all;
    }

    fn existing_account(&self, id: &str) -> Result<u32, Rejection> {
        self.ids.get(id).copied().ok_or_else(|| reject(Reason::UnknownAccount, format!("unknown account {id:?}")))
    }

    /// A new account (the caller found none with this id).
    fn create_account(&mut self, id: &str) -> u32 {
        debug_assert!(!self.ids.contains_key(id), "invariant: one account per id");
        let a = self.accounts.len() as u32;
        self.accounts.push(Account::new(id));
        self.ids.insert(Box::from(id), a);
        a
    }

    /// Sets a balance, keeping non-quote entries only while non-zero and their price dependency with them.
    fn set_balance(&mut self, a: u32, asset: Slot, amount: Amount) {
        let acc = &mut self.accounts[a as usize];
        match acc.balances.iter().position(|(s, _)| *s == asset) {
            Some(i) if asset != QUOTE && amount.0 == 0 => {
                acc.balances.remove(i);
                remove_dep(&mut self.dependents, &mut self.index, &mut self.accounts, a, asset);
            }
            Some(i) => acc.balances[i].1 = amount,
            None if amount.0 == 0 => {}
            None => {
                push_exact(&mut acc.balances, (asset, amount));
                add_dep(&mut self.dependents, acc, a, asset);
            }
        }
    }

    fn add_position(&mut self, a: u32, slot: Slot, mode: MarginMode) -> usize {
        let acc = &mut self.accounts[a as usize];
        push_exact(&mut acc.positions, Position::new(slot, mode));
        add_dep(&mut self.dependents, acc, a, slot);
        if let Some(u) = self.market.group_of(slot) {
            add_dep(&mut self.dependents, acc, a, u);
        }
        acc.positions.len() - 1
    }

    fn remove_position(&mut self, a: u32, index: usize) {
        let slot = self.accounts[a as usize].positions.swap_remove(index).slot;
        remove_dep(&mut self.dependents, &mut self.index, &mut self.accounts, a, slot);
        if let Some(u) = self.market.group_of(slot) {
            remove_dep(&mut self.dependents, &mut self.index, &mut self.accounts, a, u);
        }
    }

    fn settle(
        &mut self,
        offset: Offset,
        symbol: &str,
        price: vigil_model::Price,
        triggers: &mut Vec<Trigger>,
    ) -> Result<(), Rejection> {
        let slot = self.market.slot(symbol).ok_or_else(|| unknown_symbol(symbol))?;
        let payoff = match self.market.entry(slot) {
            Some(Entry::Instrument(i)) => {
                if i.settled {
                    return Err(reject(Reason::InstrumentSettled, format!("{symbol:?} is already settled")));
                }
                match &i.kind {
                    InstrumentKind::Perp => {
                        return Err(reject(
                            Reason::InvalidReference,
                            format!("{symbol:?} is a perp: perps never settle"),
                        ));
                    }
                    InstrumentKind::Future => None,
                    InstrumentKind::Option { terms, .. } => Some(terms.payoff(price)),
                }
            }
            _ => return Err(reject(Reason::InvalidReference, format!("{symbol:?} is an asset, not an instrument"))),
        };
        let holders = self.dependents[slot as usize].clone();
        for &a in &holders {
            let acc = &mut self.accounts[a as usize];
            let Some(i) = acc.position_index(slot) else { continue };
            let p = &acc.positions[i];
            let realized_e16 = match payoff {
                None => p.qty.wide() * price.wide() - p.cost_e16,
                Some(per_unit) => p.qty.wide() * per_unit,
            };
            let credit = credit_from_e16(realized_e16);
            // An isolated wallet (pre-funded or not) returns to the cross balance with the position.
            let back = if p.mode == MarginMode::Isolated { p.wallet.saturating_add(credit) } else { credit };
            acc.balances[0].1 = acc.balances[0].1.saturating_add(back);
            self.remove_position(a, i);
        }
        debug_assert!(self.dependents[slot as usize].is_empty(), "invariant: a settled instrument has no holders");
        self.market.mark_settled(slot, price);
        for &a in &holders {
            self.touch(a, offset, triggers);
        }
        Ok(())
    }

    fn transfer(
        &mut self,
        offset: Offset,
        account: &str,
        symbol: &str,
        amount: Amount,
        triggers: &mut Vec<Trigger>,
    ) -> Result<(), Rejection> {
        let a = self.existing_account(account)?;
        let (slot, inst) = self.market.instrument_slot(symbol)?;
        if matches!(inst.kind, InstrumentKind::Option { .. }) {
            return Err(reject(Reason::InvalidReference, format!("{symbol:?} is an option: options are cross only")));
        }
        if inst.settled {
            return Err(reject(Reason::InstrumentSettled, format!("{symbol:?} is settled")));
        }
        self.refresh(a);
        let acc = &self.accounts[a as usize];
        let index = acc.position_index(slot);
        let pos = index.map(|i| &acc.positions[i]);
        if pos.is_some_and(|p| p.mode == MarginMode::Cross) {
            return Err(reject(Reason::ModeMismatch, format!("the account holds a cross position in {symbol:?}")));
        }
        let wallet = pos.map_or(Amount::ZERO, |p| p.wallet);
        let quote = acc.balances[0].1;
        let wallet_after = wallet.checked_add(amount).ok_or_else(|| out_of_range("the isolated wallet"))?;
        let quote_after = quote.checked_sub(amount).ok_or_else(|| out_of_range("the balance"))?;
        if amount.0 > 0 {
            if quote_after.is_negative() {
                return Err(reject(Reason::InsufficientBalance, format!("balance {quote} < transfer {amount}")));
            }
            let equity = acc.cross.equity.saturating_sub(amount);
            if equity < acc.cross.initial_margin {
                return Err(reject(
                    Reason::InsufficientMargin,
                    format!("cross equity after {equity} < initial margin {}", acc.cross.initial_margin),
                ));
            }
        } else {
            if wallet_after.is_negative() {
                return Err(reject(Reason::InsufficientBalance, format!("isolated wallet {wallet} < {}", -amount.0)));
            }
            if let Some(p) = pos.filter(|p| p.is_open()) {
                let f = p.isolated_figures();
                let equity = f.equity.saturating_add(amount);
                if equity < f.initial_margin {
                    return Err(reject(
                        Reason::InsufficientMargin,
                        format!("isolated equity after {equity} < initial margin {}", f.initial_margin),
                    ));
                }
            }
        }
        let i = match index {
            Some(i) => i,
            None => self.add_position(a, slot, MarginMode::Isolated),
        };
        let acc = &mut self.accounts[a as usize];
        acc.balances[0].1 = quote_after;
        acc.positions[i].wallet = wallet_after;
        if wallet_after.0 == 0 && !acc.positions[i].is_open() {
            self.remove_position(a, i);
        }
        self.touch(a, offset, triggers);
        Ok(())
    }

    /// Validates a fill against the account (or a new one) and computes its effect, changing nothing.
    fn plan_fill(&self, acc: Option<&Account>, fill: &Fill) -> Result<FillPlan, Rejection> {
        let (slot, inst) = self.market.instrument_slot(&fill.symbol)?;
        let underlying = match inst.kind {
            InstrumentKind::Option { underlying, .. } => Some(underlying),
            _ => None,
        };
        if underlying.is_some() && fill.margin_mode == MarginMode::Isolated {
            return Err(reject(
                Reason::InvalidEvent,
                "options are cross-margined only: an isolated option fill is invalid",
            ));
        }
        if inst.settled {
            return Err(reject(Reason::InstrumentSettled, format!("{:?} is settled", fill.symbol)));
        }
        if self.market.price(slot).is_none() {
            return Err(no_price(&fill.symbol));
        }
        if let Some(u) = underlying
            && self.market.price(u).is_none()
        {
            return Err(reject(
                Reason::NoPrice,
                format!("the underlying {:?} of {:?} has no index price yet", self.market.name(u), fill.symbol),
            ));
        }
        if acc.is_some_and(|a| a.margin == MarginModel::Portfolio) && fill.margin_mode == MarginMode::Cross {
            self.check_group_prices(slot)?;
        }
        let pos = acc.and_then(|a| a.position(slot));
        if let Some(p) = pos
            && p.mode != fill.margin_mode
        {
            let what = if p.is_open() { "open position" } else { "pre-funded isolated wallet" };
            return Err(reject(
                Reason::ModeMismatch,
                format!("a {} fill on a {} {what}", fill.margin_mode.as_str(), p.mode.as_str()),
            ));
        }
        let (q0, c0, wallet0) = pos.map_or((Qty::ZERO, 0, Amount::ZERO), |p| (p.qty, p.cost_e16, p.wallet));
        let dq = fill.signed_qty();
        let out = apply_fill(q0, c0, dq, fill.price).ok_or_else(|| out_of_range("the position size"))?;
        let gross = match underlying {
            // The premium moves through the quote balance at the trade.
            Some(_) => credit_from_e16(-(dq.wide() * fill.price.wide())),
            None => credit_from_e16(out.realized_e16),
        };
        let credit = gross.checked_sub(fill.fee).ok_or_else(|| out_of_range("the fill's cash flow"))?;
        let quote0 = acc.map_or(Amount::ZERO, |a| a.balances[0].1);
        let (wallet, quote) = match fill.margin_mode {
            MarginMode::Isolated => {
                let w = wallet0.checked_add(credit).ok_or_else(|| out_of_range("the isolated wallet"))?;
                let q = if out.qty.0 == 0 {
                    quote0.checked_add(w).ok_or_else(|| out_of_range("the balance"))?
                } else {
                    quote0
                };
                (w, q)
            }
            MarginMode::Cross => (Amount::ZERO, quote0.checked_add(credit).ok_or_else(|| out_of_range("the balance"))?),
        };
        Ok(FillPlan { slot, underlying, mode: fill.margin_mode, qty: out.qty, cost_e16: out.cost_e16, wallet, quote })
    }

    fn commit_fill(&mut self, a: u32, plan: &FillPlan) {
        let i = match self.accounts[a as usize].position_index(plan.slot) {
            Some(i) => i,
            None => self.add_position(a, plan.slot, plan.mode),
        };
        let acc = &mut self.accounts[a as usize];
        acc.balances[0].1 = plan.quote;
        let p = &mut acc.positions[i];
        p.qty = plan.qty;
        p.cost_e16 = plan.cost_e16;
        p.wallet = plan.wallet;
        if !p.is_open() {
            // Closed: an isolated wallet went back to the cross balance in the plan.
            p.episode = Default::default();
            self.remove_position(a, i);
        }
        debug_assert!(plan.underlying.is_none() || plan.mode == MarginMode::Cross);
    }

    /// The pre-trade check: the figures of the unit the fill trades (the cross account, or the isolated position),
    /// before and after it, on a copy of the account at current marks. `Err` if the fill is not valid at all.
    pub fn check(&self, account: &str, fill: &Fill) -> Result<CheckOutcome, Rejection> {
        let existing = self.ids.get(account).map(|&a| &self.accounts[a as usize]);
        let plan = self.plan_fill(existing, fill)?;
        let mut copy = existing.cloned().unwrap_or_else(|| Account::new(account));
        evaluate(&self.market, &mut copy);
        let (before, after) = match plan.mode {
            MarginMode::Cross => {
                let before = copy.cross;
                apply_plan_to_copy(&mut copy, &plan);
                evaluate(&self.market, &mut copy);
                (before, copy.cross)
            }
            MarginMode::Isolated => {
                let before = copy.position(plan.slot).map_or(UnitFigures::default(), |p| p.isolated_figures());
                apply_plan_to_copy(&mut copy, &plan);
                evaluate(&self.market, &mut copy);
                let after = copy
                    .position(plan.slot)
                    .map_or(UnitFigures { equity: plan.wallet, ..UnitFigures::default() }, |p| p.isolated_figures());
                (before, after)
            }
        };
        let allowed = pretrade_allowed(&before, &after);
        let reason = (!allowed).then(|| {
            reject(
                Reason::InsufficientMargin,
                format!(
                    "equity after {} < initial margin {} and the fill adds risk",
                    after.equity, after.initial_margin
                ),
            )
        });
        Ok(CheckOutcome { allowed, reason, before, after })
    }

    /// This shard's part of the ADL queue of `symbol` (every perpetual and future with `None`): each open position
    /// scored, unordered. Refuses a symbol that is not a perpetual or future.
    pub fn adl_entries(&self, symbol: Option<&str>) -> Result<Vec<account::AdlEntry>, Rejection> {
        let only = match symbol {
            None => None,
            Some(name) => {
                let slot = self.market.slot(name).filter(|s| self.market.instrument(*s).is_some());
                let Some(slot) = slot else {
                    return Err(reject(Reason::UnknownSymbol, format!("no instrument {name:?}")));
                };
                if self.market.instrument(slot).is_some_and(|i| matches!(i.kind, InstrumentKind::Option { .. })) {
                    return Err(reject(
                        Reason::InvalidReference,
                        format!("{name:?} is an option: the ADL queue ranks perpetual and future positions"),
                    ));
                }
                Some(slot)
            }
        };
        let mut out = Vec::new();
        for acc in &self.accounts {
            account::adl_entries(&self.market, acc, only, &mut out);
        }
        Ok(out)
    }

    /// The ADL scores of one account's positions, with their symbols (see [`Engine::adl_entries`]).
    pub fn account_adl(&self, id: &str) -> Vec<(String, account::AdlEntry)> {
        let mut out = Vec::new();
        if let Some(&a) = self.ids.get(id) {
            account::adl_entries(&self.market, &self.accounts[a as usize], None, &mut out);
        }
        out.into_iter().map(|e| (self.market.name(e.slot).to_owned(), e)).collect()
    }

    /// The replay view of one account.
    pub fn account_view(&self, id: &str) -> Option<AccountView> {
        self.ids.get(id).map(|&a| view(&self.market, &self.accounts[a as usize]))
    }

    /// Every account's view, sorted by account id.
    pub fn views(&self) -> Vec<AccountView> {
        let mut ids: Vec<&str> = self.accounts.iter().map(|a| &*a.id).collect();
        ids.sort_unstable();
        ids.into_iter().filter_map(|id| self.account_view(id)).collect()
    }

    /// Account ids in this shard, unsorted.
    pub fn account_ids(&self) -> impl Iterator<Item = &str> {
        self.accounts.iter().map(|a| &*a.id)
    }
}

/// Applies a plan to a detached copy of an account (no dependency bookkeeping).
fn apply_plan_to_copy(acc: &mut Account, plan: &FillPlan) {
    acc.balances[0].1 = plan.quote;
    let i = match acc.position_index(plan.slot) {
        Some(i) => i,
        None => {
            acc.positions.push(Position::new(plan.slot, plan.mode));
            acc.positions.len() - 1
        }
    };
    let p = &mut acc.positions[i];
    p.qty = plan.qty;
    p.cost_e16 = plan.cost_e16;
    p.wallet = plan.wallet;
    if !p.is_open() {
        acc.positions.swap_remove(i);
    }
}

fn set_amount(balances: &mut Vec<(Slot, Amount)>, asset: Slot, amount: Amount) {
    match balances.iter().position(|(s, _)| *s == asset) {
        Some(i) => balances[i].1 = amount,
        None => balances.push((asset, amount)),
    }
}

fn cross_position_value(acc: &Account) -> Amount {
    acc.positions
        .iter()
        .filter(|p| p.mode == MarginMode::Cross)
        .fold(Amount::ZERO, |s, p| s.saturating_add(p.figures.value))
}

fn unknown_symbol(symbol: &str) -> Rejection {
    reject(Reason::UnknownSymbol, format!("unknown symbol {symbol:?}"))
}

fn no_price(symbol: &str) -> Rejection {
    reject(Reason::NoPrice, format!("{symbol:?} has no mark price yet"))
}

#[cfg(test)]
mod stats_tests {
    use super::*;
    use vigil_model::parse_line;

    #[test]
    fn stats_count_accounts_positions_episodes_and_bands() {
        // Proves the monitoring counts on a known book: a ratio of MM/equity 450/1000 is the 25–50% band; after the
        // price falls to 2800 the account is liquidating and in the 100%+ band; an account with no position is
        // counted but has no band.
        assert_eq!((margin_band(1000, 100), margin_band(1000, 450), margin_band(1000, 600)), (0, 1, 2));
        assert_eq!((margin_band(1000, 999), margin_band(1000, 1000), margin_band(-5, 1)), (3, 4, 4));
        let mut e = Engine::new(&Config::default());
        let mut t = Vec::new();
        let lines = [
            r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"price","symbol":"ETH","price":"3000"}"#,
            r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1000"}"#,
            r#"{"type":"deposit","account":"b","asset":"USDC","amount":"1000"}"#,
            r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#,
        ];
        for (i, l) in lines.iter().enumerate() {
            e.apply(Offset(i as u64 + 1), &parse_line(l).unwrap(), &mut t).unwrap();
        }
        let s = e.stats();
        assert_eq!((s.accounts, s.positions, s.liquidating), (2, 1, 0));
        assert_eq!(s.bands, [0, 1, 0, 0, 0]);
        e.apply(Offset(6), &parse_line(r#"{"type":"price","symbol":"ETH","price":"2800"}"#).unwrap(), &mut t).unwrap();
        let s = e.stats();
        assert_eq!((s.liquidating, s.bands), (1, [0, 0, 0, 0, 1]));
    }
}

#[cfg(test)]
mod group_tick_tests {
    use super::*;
    use vigil_model::{TriggerKind, parse_line};

    fn engine(detection: Detection) -> (Engine, Vec<Trigger>) {
        let mut e = Engine::new(&Config { detection, ..Config::default() });
        let mut t = Vec::new();
        let lines = [
            r#"{"type":"clock","time":"2026-12-01T00:00:00Z"}"#,
            r#"{"type":"asset","asset":"BTC","haircut":"0.1"}"#,
            r#"{"type":"asset","asset":"ETH"}"#,
            r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"perp","symbol":"ETH-PERP","underlying":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"option","symbol":"C","underlying":"BTC","right":"call","strike":"62000","expiry":"2026-12-25T08:00:00Z"}"#,
            r#"{"type":"option","symbol":"P","underlying":"BTC","right":"put","strike":"58000","expiry":"2027-03-26T08:00:00Z"}"#,
            r#"{"type":"price","symbol":"BTC","price":"60000"}"#,
            r#"{"type":"price","symbol":"ETH","price":"3000"}"#,
            r#"{"type":"price","symbol":"BTC-PERP","price":"60000"}"#,
            r#"{"type":"price","symbol":"ETH-PERP","price":"3000"}"#,
            r#"{"type":"price","symbol":"C","price":"1500"}"#,
            r#"{"type":"price","symbol":"P","price":"2500"}"#,
            // Only groups move with BTC's index: a BTC group and an ETH group.
            r#"{"type":"deposit","account":"groups","asset":"USDC","amount":"9000"}"#,
            r#"{"type":"account_config","account":"groups","margin":"portfolio"}"#,
            r#"{"type":"trade","account":"groups","symbol":"C","side":"sell","qty":"2","price":"1500"}"#,
            r#"{"type":"trade","account":"groups","symbol":"P","side":"sell","qty":"1","price":"2500"}"#,
            r#"{"type":"trade","account":"groups","symbol":"BTC-PERP","side":"buy","qty":"0.1","price":"60000"}"#,
            r#"{"type":"trade","account":"groups","symbol":"ETH-PERP","side":"sell","qty":"1","price":"3000"}"#,
            // Its collateral moves with BTC's index too: the group's fast path must not apply.
            r#"{"type":"deposit","account":"collateral","asset":"USDC","amount":"1000"}"#,
            r#"{"type":"deposit","account":"collateral","asset":"BTC","amount":"0.1"}"#,
            r#"{"type":"account_config","account":"collateral","margin":"portfolio"}"#,
            r#"{"type":"trade","account":"collateral","symbol":"P","side":"sell","qty":"2","price":"2500"}"#,
            // An isolated perp on BTC: its own margin does not move with the index, but the rule is conservative.
            r#"{"type":"deposit","account":"isolated","asset":"USDC","amount":"10000"}"#,
            r#"{"type":"account_config","account":"isolated","margin":"portfolio"}"#,
            r#"{"type":"trade","account":"isolated","symbol":"C","side":"sell","qty":"1","price":"1500"}"#,
            r#"{"type":"transfer","account":"isolated","symbol":"BTC-PERP","amount":"1000"}"#,
            r#"{"type":"trade","account":"isolated","symbol":"BTC-PERP","side":"buy","qty":"0.1","price":"60000","margin_mode":"isolated"}"#,
        ];
        for (i, l) in lines.iter().enumerate() {
            e.apply(Offset(i as u64 + 1), &parse_line(l).unwrap(), &mut t).unwrap_or_else(|r| panic!("{l}: {r:?}"));
        }
        (e, t)
    }

    /// Whether account `id` has a row in `slot`'s group table.
    fn in_table(e: &Engine, id: &str, slot: Slot) -> bool {
        e.accounts[e.ids[id] as usize].rows.iter().any(|(u, _)| *u == slot)
    }

    /// Every account of `fast` (indexed) has the cached cross figures a fresh evaluation gives, and the figures
    /// and episodes of the same account in `full` (rescan).
    fn assert_as_rescan(fast: &Engine, full: &Engine, when: &str) {
        for acc in &fast.accounts {
            let mut fresh = acc.clone();
            evaluate(&fast.market, &mut fresh);
            assert_eq!(acc.cross, fresh.cross, "{} {when}", acc.id);
            let other = &full.accounts[full.ids[&*acc.id] as usize];
            assert_eq!((acc.cross, acc.episode), (other.cross, other.episode), "{} {when}", acc.id);
        }
    }

    #[test]
    fn an_index_tick_revalues_only_the_groups_it_moves_and_equals_a_full_evaluation() {
        // Proves the fast path of an index tick (one group revalued from the cached legs) gives exactly the figures
        // and triggers of a full evaluation: after every tick of a falling then recovering BTC index, each
        // account's cached cross figures equal a fresh evaluation's, and the triggers equal those of rescan
        // detection (which always evaluates in full). The fast path applies to an account whose only BTC
        // dependence is its group, not to one holding BTC as collateral or an isolated BTC position.
        let (mut fast, mut t_fast) = engine(Detection::Indexed);
        let (mut full, mut t_full) = engine(Detection::Rescan);
        let btc = fast.market.slot("BTC").unwrap();
        assert!(in_table(&fast, "groups", btc));
        assert!(!in_table(&fast, "collateral", btc));
        assert!(!in_table(&fast, "isolated", btc));
        let prices = ["59000", "57000", "52000", "45000", "40000", "47000", "61000", "64000", "30000", "60000"];
        let evaluations = fast.evaluations();
        for (i, price) in prices.iter().enumerate() {
            let line = format!(r#"{{"type":"price","symbol":"BTC","price":"{price}"}}"#);
            let event = parse_line(&line).unwrap();
            let offset = Offset(100 + i as u64);
            fast.apply(offset, &event, &mut t_fast).unwrap();
            full.apply(offset, &event, &mut t_full).unwrap();
            assert_as_rescan(&fast, &full, &format!("at {price}"));
        }
        assert_eq!(t_fast, t_full);
        assert!(t_fast.iter().any(|t| t.kind == TriggerKind::Liquidate), "the ticks must breach someone: {t_fast:?}");
        assert_eq!(fast.evaluations() - evaluations, 3 * prices.len() as u64);
    }

    #[test]
    fn the_group_table_follows_every_change_of_the_accounts_and_the_market() {
        // Proves the table's rows stay exactly what a full evaluation would charge while accounts and the market
        // change between index ticks: a group growing past a row's legs (out of the table) and shrinking back (in
        // again), a group closed (its row freed, the freed row reused by another account), a `risk` change (a new
        // grid of 5 × 2 + 1 steps: the rows of the old epoch go to a full evaluation and the table then sums 33
        // scenarios) and a clock move. After every event each account's cached figures equal a fresh
        // evaluation's, and figures, episodes and triggers equal rescan detection's.
        let (mut fast, mut t_fast) = engine(Detection::Indexed);
        let (mut full, mut t_full) = engine(Detection::Rescan);
        let btc = fast.market.slot("BTC").unwrap();
        let mut lines: Vec<String> = Vec::new();
        for i in 0..10 {
            let strike = 50_000 + 2_000 * i;
            lines.push(format!(
                r#"{{"type":"option","symbol":"W{i}","underlying":"BTC","right":"put","strike":"{strike}","expiry":"2027-03-26T08:00:00Z"}}"#
            ));
            lines.push(format!(r#"{{"type":"price","symbol":"W{i}","price":"{}"}}"#, 900 + 300 * i));
        }
        lines.push(r#"{"type":"deposit","account":"wide","asset":"USDC","amount":"40000"}"#.into());
        lines.push(r#"{"type":"account_config","account":"wide","margin":"portfolio"}"#.into());
        let step =
            |fast: &mut Engine, t_fast: &mut Vec<Trigger>, full: &mut Engine, t_full: &mut Vec<Trigger>, l: &str| {
                let event = parse_line(l).unwrap();
                let offset = Offset(fast.offset().0 + 1);
                let a = fast.apply(offset, &event, t_fast);
                let b = full.apply(offset, &event, t_full);
                assert_eq!(a, b, "{l}");
                assert_as_rescan(fast, full, &format!("after {l}"));
                assert_eq!(t_fast, t_full, "after {l}");
            };
        let tick = |price: usize| format!(r#"{{"type":"price","symbol":"BTC","price":"{price}"}}"#);
        for l in &lines {
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, l);
        }
        // Grows one leg at a time to 10 options (past ROW_LEGS = 8), a tick after each.
        for i in 0..10 {
            let side = if i % 2 == 0 { "sell" } else { "buy" };
            let l = format!(
                r#"{{"type":"trade","account":"wide","symbol":"W{i}","side":"{side}","qty":"1","price":"{}"}}"#,
                900 + 300 * i
            );
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, &l);
            assert_eq!(in_table(&fast, "wide", btc), i < groups::ROW_LEGS, "{i} legs");
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, &tick(60_000 - 700 * i));
        }
        // Back under the limit: closing two legs puts the group in the table again.
        for i in [9, 8] {
            let side = if i % 2 == 0 { "buy" } else { "sell" };
            let l = format!(
                r#"{{"type":"trade","account":"wide","symbol":"W{i}","side":"{side}","qty":"1","price":"{}"}}"#,
                900 + 300 * i
            );
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, &l);
        }
        assert!(in_table(&fast, "wide", btc));
        // Closing the "groups" account's BTC options and perp frees its row; a new account takes it.
        let rows_before = fast.groups[btc as usize].allocated();
        for l in [
            r#"{"type":"trade","account":"groups","symbol":"C","side":"buy","qty":"2","price":"1500"}"#,
            r#"{"type":"trade","account":"groups","symbol":"P","side":"buy","qty":"1","price":"2500"}"#,
            r#"{"type":"trade","account":"groups","symbol":"BTC-PERP","side":"sell","qty":"0.1","price":"60000"}"#,
        ] {
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, l);
        }
        assert!(!in_table(&fast, "groups", btc));
        for l in [
            r#"{"type":"deposit","account":"late","asset":"USDC","amount":"3000"}"#,
            r#"{"type":"account_config","account":"late","margin":"portfolio"}"#,
            r#"{"type":"trade","account":"late","symbol":"W3","side":"sell","qty":"2","price":"1800"}"#,
        ] {
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, l);
        }
        assert!(in_table(&fast, "late", btc));
        assert_eq!(fast.groups[btc as usize].allocated(), rows_before, "the freed row is reused");
        // A new grid and a later clock between ticks down through every account's margin and back.
        let changes = [
            r#"{"type":"risk","underlying":"BTC","price_range":"0.2","buckets":5}"#,
            r#"{"type":"clock","time":"2026-12-20T00:00:00Z"}"#,
            r#"{"type":"risk","underlying":"BTC","buckets":4,"vol_up":"0.6"}"#,
        ];
        let evaluations = fast.evaluations();
        let mut ticks = 0;
        for change in changes {
            step(&mut fast, &mut t_fast, &mut full, &mut t_full, change);
            for price in [52_000, 47_000, 41_000, 36_000, 44_000, 58_000, 66_000] {
                step(&mut fast, &mut t_fast, &mut full, &mut t_full, &tick(price));
                ticks += 1;
            }
        }
        assert!(t_fast.iter().any(|t| t.kind == TriggerKind::Liquidate), "the ticks must breach someone: {t_fast:?}");
        assert!(fast.evaluations() > evaluations + ticks, "ticks revalued the table's accounts");
    }
}
