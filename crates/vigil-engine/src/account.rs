//! One account's state and its evaluation: positions, balances, cached figures, liquidation episodes.

use vigil_model::margin::{
    MM_E24_UNKNOWN, ScaledTiers, ValueMm, bankruptcy_price, collateral_value, entry_price, is_liquidatable,
    linear_figures, linear_value_mm, linear_value_mm_e24, linear_value_mm_e24_scaled, liquidation_price, mm_from_e24,
    option_figures, option_value_mm_e24, unrealized_pnl,
};
use vigil_model::num::{Round, SCALE_I128, SCALE2, checked_mul, div, e16_to_e8};
use vigil_model::portfolio::{
    GroupMargin, Leg, LinearTotals, RiskParams, group_margin, linear_group_margin_of, linear_group_mm_bound,
};
use vigil_model::{
    AccountView, Amount, GroupView, MarginMode, MarginModel, Offset, OptionTerms, PositionFigures, PositionView, Price,
    Qty, Rate, Tiers, Trigger, TriggerKind, UnitFigures,
};

use serde::{Deserialize, Serialize};

use crate::band::Band;
use crate::market::{InstrumentKind, Market, QUOTE, Slot, VectorCache};

/// A liquidation episode of one margin unit (`margin-model.md`, "Liquidation episodes and triggers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    pub active: bool,
    pub bankrupt: bool,
}

impl Episode {
    /// Advances the episode on fresh figures; returns the triggers this evaluation emits.
    pub fn step(&mut self, f: &UnitFigures, has_positions: bool) -> [Option<TriggerKind>; 2] {
        let mut out = [None, None];
        if self.active {
            if f.equity >= f.initial_margin || !has_positions {
                *self = Episode::default();
            } else if f.equity.is_negative() && !self.bankrupt {
                self.bankrupt = true;
                out[0] = Some(TriggerKind::Bankrupt);
            }
        } else if is_liquidatable(f.equity, f.maintenance_margin) {
            self.active = true;
            out[0] = Some(TriggerKind::Liquidate);
            if f.equity.is_negative() {
                self.bankrupt = true;
                out[1] = Some(TriggerKind::Bankrupt);
            }
        }
        out
    }
}

/// A position in one instrument, or a pre-funded isolated wallet (`qty == 0`, isolated).
///
/// Laid out for a pass over every account (a stress test), which reads a position's slot, mode, quantity, cost
/// and wallet: those first, in the position's first cache line, and the cached figures in the second. It is 128
/// bytes, so each position of a list starts a line when the list does: the allocator's blocks of 128, 256, 384…
/// bytes do (every list of the 1M-account peer book, checked). Not `align(64)`: the allocator then served a list
/// from its aligned path, 412 bytes a position instead of 301 (`cargo bench --bench memory`). Stored as
/// [`PositionRecord`]: the fields in the order the format has always had.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(from = "PositionRecord", into = "PositionRecord")]
#[repr(C)]
pub struct Position {
    pub slot: Slot,
    pub mode: MarginMode,
    /// The isolated unit's episode (unused for cross positions).
    pub episode: Episode,
    pub qty: Qty,
    /// Σ qty × price over the fills that opened it, exact at 1e-16.
    pub cost_e16: i128,
    /// The isolated wallet (zero for cross positions).
    pub wallet: Amount,
    /// Figures at the last evaluation (a cache: not persisted).
    pub figures: PositionFigures,
    /// To 128 bytes, so that every position in a list starts a cache line when the list does.
    _line: [u8; 16],
}

/// A [`Position`] as checkpoints and snapshots store it: its persistent fields in their stored order.
#[derive(Serialize, Deserialize)]
struct PositionRecord {
    slot: Slot,
    qty: Qty,
    cost_e16: i128,
    mode: MarginMode,
    wallet: Amount,
    episode: Episode,
}

impl From<PositionRecord> for Position {
    fn from(r: PositionRecord) -> Self {
        let PositionRecord { slot, qty, cost_e16, mode, wallet, episode } = r;
        Self { slot, mode, episode, qty, cost_e16, wallet, figures: PositionFigures::default(), _line: [0; 16] }
    }
}

impl From<Position> for PositionRecord {
    fn from(p: Position) -> Self {
        let Position { slot, mode, episode, qty, cost_e16, wallet, .. } = p;
        Self { slot, qty, cost_e16, mode, wallet, episode }
    }
}

impl Position {
    pub fn new(slot: Slot, mode: MarginMode) -> Self {
        Self {
            slot,
            qty: Qty::ZERO,
            cost_e16: 0,
            mode,
            wallet: Amount::ZERO,
            figures: PositionFigures::default(),
            episode: Episode::default(),
            _line: [0; 16],
        }
    }

    pub fn is_open(&self) -> bool {
        self.qty.0 != 0
    }

    /// The isolated unit's figures from the cached position figures.
    pub fn isolated_figures(&self) -> UnitFigures {
        UnitFigures {
            equity: self.wallet.saturating_add(self.figures.value),
            initial_margin: self.figures.initial_margin,
            maintenance_margin: self.figures.maintenance_margin,
        }
    }
}

/// A dependency of the account on a price slot, and where the account sits in that slot's dependents list.
#[derive(Clone, Copy, Debug)]
pub struct Dep {
    pub slot: Slot,
    pub refs: u32,
    pub index: u32,
    /// The safe band this account has in the slot's index (indexed detection only).
    pub band: Band,
    /// The stamp the band's edges carry in the slot's index (0: never banded).
    pub stamp: u32,
    /// In the slot's `always` list instead of its band indexes: a portfolio account with a group, re-evaluated on
    /// every change of the price (indexed detection only).
    pub always: bool,
}

/// One account: its persistent state (id, balances, positions, episodes) and caches rebuilt on restore.
///
/// Laid out for a pass over every account (a stress test), which reads its balances, positions and margin model:
/// those in one cache line (an account is 64-byte aligned, the cross figures and id before them), the caches of
/// detection after. The persistent fields keep their stored order (only skipped ones moved).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[repr(C, align(64))]
pub struct Account {
    /// Cross figures at the last evaluation (a cache).
    #[serde(skip)]
    pub cross: UnitFigures,
    pub id: Box<str>,
    /// Balances per asset slot; the quote is always entry 0, other entries only while non-zero.
    pub balances: Vec<(Slot, Amount)>,
    pub positions: Vec<Position>,
    pub episode: Episode,
    /// Standard or portfolio margin (`account_config`).
    pub margin: MarginModel,
    /// Changed since the last checkpoint delta.
    #[serde(skip)]
    pub dirty: bool,
    /// Price dependencies and their bands (derived: rebuilt on restore).
    #[serde(skip)]
    pub deps: Vec<Dep>,
    /// The rows this account has in the engine's group tables (indexed detection): underlying, row.
    #[serde(skip)]
    pub rows: Vec<(Slot, u32)>,
    /// A portfolio account's groups at its last evaluation (what the engine's group tables are built from).
    #[serde(skip)]
    pub groups: GroupCache,
}

/// A portfolio account's groups as its last evaluation formed and charged them: what indexed detection's group
/// tables (`groups.rs`) are built from. Rebuilt by every evaluation ([`evaluate`]); its margins are those of that
/// evaluation (a table row keeps the current one).
#[derive(Clone, Debug, Default)]
pub struct GroupCache {
    /// The market epoch of the evaluation that built it; `None` without groups.
    epoch: Option<u64>,
    groups: Vec<CachedGroup>,
    /// Every group's legs, group after group: slot, quantity, whether it is an option.
    legs: Vec<(Slot, Qty, bool)>,
}

#[derive(Clone, Debug)]
struct CachedGroup {
    underlying: Slot,
    margin: GroupMargin,
    /// A tick of the underlying's index moves this group's margin and no other figure of the account (no
    /// balance in the asset, no position charged on its own that depends on it).
    index_moves_only_this: bool,
    /// Its legs in [`GroupCache::legs`].
    legs: std::ops::Range<u32>,
}

/// A group an index tick can revalue on its own: see [`GroupCache::index_only`].
pub struct IndexOnlyGroup<'a> {
    pub underlying: Slot,
    pub epoch: u64,
    pub margin: GroupMargin,
    /// Its legs in position order: slot, quantity, whether it is an option.
    pub legs: &'a [(Slot, Qty, bool)],
}

impl GroupCache {
    /// The groups whose underlying's index moves nothing else of the account, as the last evaluation formed and
    /// charged them.
    pub fn index_only(&self) -> impl Iterator<Item = IndexOnlyGroup<'_>> {
        let epoch = self.epoch.unwrap_or_default();
        self.groups.iter().filter(|g| g.index_moves_only_this).map(move |g| IndexOnlyGroup {
            underlying: g.underlying,
            epoch,
            margin: g.margin,
            legs: &self.legs[g.legs.start as usize..g.legs.end as usize],
        })
    }
}

impl Account {
    pub fn new(id: &str) -> Self {
        Self {
            id: Box::from(id),
            balances: vec![(QUOTE, Amount::ZERO)],
            positions: Vec::new(),
            deps: Vec::new(),
            cross: UnitFigures::default(),
            episode: Episode::default(),
            margin: MarginModel::Standard,
            dirty: false,
            groups: GroupCache::default(),
            rows: Vec::new(),
        }
    }

    pub fn balance(&self, asset: Slot) -> Amount {
        self.balances.iter().find(|(s, _)| *s == asset).map_or(Amount::ZERO, |(_, a)| *a)
    }

    pub fn position(&self, slot: Slot) -> Option<&Position> {
        self.positions.iter().find(|p| p.slot == slot)
    }

    pub fn position_index(&self, slot: Slot) -> Option<usize> {
        self.positions.iter().position(|p| p.slot == slot)
    }

    pub fn has_cross_positions(&self) -> bool {
        self.positions.iter().any(|p| p.is_open() && p.mode == MarginMode::Cross)
    }
}

/// The figures of one position at current prices.
pub fn position_figures(market: &Market, p: &Position) -> PositionFigures {
    figures_at(market, p.slot, p.qty, p.cost_e16)
}

/// The figures of `qty` of instrument `slot` opened at `cost_e16`, at `market`'s prices.
pub fn figures_at(market: &Market, slot: Slot, qty: Qty, cost_e16: i128) -> PositionFigures {
    let (Some(inst), Some(mark)) = (market.instrument(slot), market.price(slot)) else {
        return PositionFigures::default();
    };
    match &inst.kind {
        InstrumentKind::Perp | InstrumentKind::Future => match &inst.tiers {
            Some(t) => linear_figures(qty, cost_e16, mark, t),
            None => PositionFigures::default(),
        },
        InstrumentKind::Option { underlying, terms } => match market.price(*underlying) {
            Some(u) => option_figures(qty, cost_e16, mark, u, terms),
            None => PositionFigures::default(),
        },
    }
}

/// How one market values each slot for a standard-margin [`Exposure`]: a balance in it (the asset's index price
/// and haircut) and a position in it (a perp's or future's mark and tiers, an option's mark, terms and underlying
/// index). Read from the market once, so a stress pass reads one small entry per balance or position instead of
/// the market's entries; the figures are those of [`balance_value`] and [`figures_at`], bit for bit.
pub struct Valuation<'a> {
    slots: Vec<SlotValue<'a>>,
}

struct SlotValue<'a> {
    /// A balance's index price (`None`: it counts nothing) and haircut.
    price: Option<Price>,
    haircut: Rate,
    /// `price × (1 − haircut)` at 1e-16: a positive balance's value is `⌊balance × it / 1e16⌋`.
    discounted_e16: Option<i128>,
    position: PositionRule<'a>,
    /// An instrument's portfolio group: its underlying ([`Market::group_of`]).
    underlying: Option<Slot>,
    /// As an underlying: its index (a group without one is not formed) and its portfolio parameters.
    group: (Option<Price>, RiskParams),
}

/// How a position in the slot is valued and margined.
enum PositionRule<'a> {
    /// No figures: not an instrument, or a figure it needs (mark, tiers, underlying index) is missing.
    Nothing,
    Linear {
        mark: Price,
        tiers: &'a Tiers,
        /// The same tiers scaled once (`None` if they do not scale within `i128`: then `tiers` values).
        scaled: Option<ScaledTiers>,
    },
    Option {
        mark: Price,
        underlying: Price,
        terms: &'a OptionTerms,
    },
}

impl<'a> Valuation<'a> {
    pub fn new(market: &'a Market) -> Self {
        let slots = (0..market.slots() as Slot)
            .map(|slot| {
                let position = match (market.instrument(slot), market.price(slot)) {
                    (Some(inst), Some(mark)) => match &inst.kind {
                        InstrumentKind::Perp | InstrumentKind::Future => match &inst.tiers {
                            Some(tiers) => PositionRule::Linear { mark, tiers, scaled: ScaledTiers::new(tiers) },
                            None => PositionRule::Nothing,
                        },
                        InstrumentKind::Option { underlying, terms } => match market.price(*underlying) {
                            Some(underlying) => PositionRule::Option { mark, underlying, terms },
                            None => PositionRule::Nothing,
                        },
                    },
                    _ => PositionRule::Nothing,
                };
                let (price, haircut) = (market.price(slot), market.haircut(slot));
                // Both below 2^63: the product fits.
                let discounted_e16 = price.map(|p| p.wide() * (SCALE_I128 - haircut.wide()));
                let group = (price, market.risk_params(slot));
                SlotValue { price, haircut, discounted_e16, position, underlying: market.group_of(slot), group }
            })
            .collect();
        Self { slots }
    }

    /// A balance's collateral value: [`balance_value`].
    #[inline]
    fn balance(&self, slot: Slot, amount: Amount) -> Amount {
        if slot == QUOTE {
            return amount;
        }
        match self.slots.get(slot as usize) {
            Some(SlotValue { price: Some(p), haircut, discounted_e16, .. }) => {
                // `collateral_value`'s product for a positive balance, formed once per slot instead of per balance.
                match discounted_e16.filter(|_| amount.0 >= 0).and_then(|d| checked_mul(amount.0, d)) {
                    Some(x) => Amount(
                        div(x, SCALE2, Round::Floor).expect("invariant: a division by 1e16 always has a quotient"),
                    ),
                    None => collateral_value(amount, *p, *haircut),
                }
            }
            _ => Amount::ZERO,
        }
    }

    /// A position's value and maintenance margin: those of [`figures_at`].
    #[inline]
    fn position(&self, p: &Position) -> (Amount, Amount) {
        let f = match self.slots.get(p.slot as usize).map(|s| &s.position) {
            Some(PositionRule::Linear { mark, tiers, .. }) => linear_value_mm(p.qty, p.cost_e16, *mark, tiers),
            Some(PositionRule::Option { mark, underlying, terms }) => {
                option_figures(p.qty, p.cost_e16, *mark, *underlying, terms)
            }
            Some(PositionRule::Nothing) | None => PositionFigures::default(),
        };
        (f.value, f.maintenance_margin)
    }

    /// A position's value: [`Valuation::position_unrounded`]'s, without its margin.
    #[inline]
    fn position_value(&self, p: &Position) -> Amount {
        match self.slots.get(p.slot as usize).map(|s| &s.position) {
            Some(PositionRule::Linear { mark, .. }) => unrealized_pnl(p.qty, p.cost_e16, *mark),
            Some(PositionRule::Option { mark, .. }) => Amount(e16_to_e8(p.qty.wide() * mark.wide(), Round::Floor)),
            Some(PositionRule::Nothing) | None => Amount::ZERO,
        }
    }

    /// The group an open cross position of a portfolio account is in: its instrument's underlying.
    #[inline]
    fn group_of(&self, p: &Position) -> Option<Slot> {
        self.slots
            .get(p.slot as usize)
            .and_then(|s| s.underlying)
            .filter(|_| p.is_open() && p.mode == MarginMode::Cross)
    }

    /// Adds a grouped position to its group's sums: a perp's or future's quantity at its mark; anything else (an
    /// option, or a figure missing) leaves the group to [`group_margin_at`].
    #[inline]
    fn add_leg(&self, p: &Position, sums: &mut GroupSums) {
        match self.slots.get(p.slot as usize).map(|s| &s.position) {
            Some(PositionRule::Linear { mark, .. }) => {
                if let Some(t) = &mut sums.linear
                    && t.add(p.qty, *mark).is_none()
                {
                    sums.linear = None;
                }
            }
            _ => sums.general = true,
        }
    }

    /// What the group of underlying `u` whose legs are all perps and futures, added up in `linear` (`None`: the
    /// exposure did not fit), charges: bounds on its margin ([`linear_group_mm_bound`]) or, where they are not
    /// formed, its margin ([`group_margin_at`]'s, bit for bit). `None` when the group is not formed.
    #[inline]
    fn linear_group(&self, u: Slot, linear: Option<LinearTotals>) -> Option<Charge> {
        let (index, params) = &self.slots.get(u as usize)?.group;
        let (index, linear) = ((*index)?, linear?);
        match linear_group_mm_bound(params, index, &linear) {
            Some((lower_e24, width)) => Some(Charge::Bound { lower_e24, width }),
            None => linear_group_margin_of(params, index, &linear).map(|m| Charge::Whole(m.maintenance_margin)),
        }
    }

    /// A position's value and its maintenance margin unrounded (see [`ValueMm`]).
    #[inline(always)]
    fn position_unrounded(&self, p: &Position) -> ValueMm {
        match self.slots.get(p.slot as usize).map(|s| &s.position) {
            Some(PositionRule::Linear { mark, scaled: Some(scaled), .. }) => {
                linear_value_mm_e24_scaled(p.qty, p.cost_e16, *mark, scaled)
            }
            Some(PositionRule::Linear { mark, tiers, scaled: None }) => {
                linear_value_mm_e24(p.qty, p.cost_e16, *mark, tiers)
            }
            Some(PositionRule::Option { mark, underlying, terms }) => {
                option_value_mm_e24(p.qty, *mark, *underlying, terms)
            }
            Some(PositionRule::Nothing) | None => ValueMm { value: Amount::ZERO, mm_e24: 0 },
        }
    }
}

/// A standard-margin account's [`Exposure`] at `valuation`'s prices: the cross unit (balances and cross positions)
/// and each isolated position's unit.
pub fn standard_exposure(valuation: &Valuation, acc: &Account) -> Exposure {
    let mut out = Exposure::default();
    let mut equity =
        acc.balances.iter().fold(Amount::ZERO, |e, (slot, amount)| e.saturating_add(valuation.balance(*slot, *amount)));
    let mut mm = Amount::ZERO;
    for p in &acc.positions {
        let (value, margin) = valuation.position(p);
        match p.mode {
            MarginMode::Cross => {
                equity = equity.saturating_add(value);
                mm = mm.saturating_add(margin);
            }
            MarginMode::Isolated => out.add_unit(p.wallet.saturating_add(value), margin),
        }
    }
    out.add_unit(equity, mm);
    out
}

/// What a stress test counts of an account at some prices: an [`Exposure`] without its maintenance margin, which
/// only the top list shows ([`exposure`] computes it for the accounts listed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Standing {
    pub equity: Amount,
    pub liquidatable: bool,
    pub bankrupt: bool,
    pub shortfall: Amount,
}

impl Standing {
    /// Adds a unit the way [`Exposure::add_unit`] does.
    fn add_unit(&mut self, equity: Amount, liquidatable: bool) {
        self.equity = self.equity.saturating_add(equity);
        self.liquidatable |= liquidatable;
        if equity.is_negative() {
            self.bankrupt = true;
            self.shortfall = self.shortfall.saturating_sub(equity);
        }
    }
}

impl From<Exposure> for Standing {
    fn from(e: Exposure) -> Self {
        Self { equity: e.equity, liquidatable: e.liquidatable, bankrupt: e.bankrupt, shortfall: e.shortfall }
    }
}

/// Whether a unit with `equity`, whose positions' unrounded margins sum to `mm_e24` with `n` of them not whole
/// (not multiples of 1e16), is liquidatable (MM > 0 and equity below it), when the bound tells: its MM, the sum
/// of each position's margin rounded up, lies in `[S / 1e16, S / 1e16 + n)` for `S = mm_e24`. `None` when the
/// equity lies within that range, or below an `S` that is not positive (MM may then be zero), or a product does
/// not fit: only the rounded margins can tell. (`n` may over-count: a wider range is still a bound. A portfolio
/// group's [`Charge::Bound`] adds its lower bound to `S` and its width to `n`.)
fn liquidatable_by_bound(equity: Amount, mm_e24: i128, n: u32) -> Option<bool> {
    if n == 0 {
        // Every margin is whole: MM = S / 1e16 exactly.
        return Some(is_liquidatable(equity, Amount(mm_e24 / SCALE2)));
    }
    let e = checked_mul(equity.0, SCALE2)?;
    if mm_e24 > 0 && e < mm_e24 {
        // equity < S / 1e16 ≤ MM, and MM > 0.
        return Some(true);
    }
    // equity ≥ S / 1e16 + n > MM.
    (e >= mm_e24.checked_add(i128::from(n) * SCALE2)?).then_some(false)
}

/// Adds the account's balances to `units` at `valuation`'s prices, appending each as a term (its margin zero).
#[inline(always)]
fn balance_terms(valuation: &Valuation, acc: &Account, terms: &mut Vec<ValueMm>, units: &mut Units) {
    for (slot, amount) in &acc.balances {
        let value = valuation.balance(*slot, *amount);
        terms.push(ValueMm { value, mm_e24: 0 });
        units.balance(value);
    }
}

/// Adds the account's balances to `units` at `valuation`'s prices, given their terms at other prices (`before`):
/// a balance `moved` names is revalued and `changed` told its slot and its value's change, the others taken as
/// they are.
#[inline(always)]
fn balances_moved(
    valuation: &Valuation,
    acc: &Account,
    before: &[ValueMm],
    moved: impl Fn(Slot) -> bool,
    changed: &mut impl FnMut(Slot, i128),
    units: &mut Units,
) {
    for ((slot, amount), before) in acc.balances.iter().zip(before) {
        units.balance(balance_moved(valuation, (*slot, *amount), before.value, moved(*slot), changed));
    }
}

/// A balance's value at `valuation`'s prices, given its value at other prices: revalued (and `changed` told its
/// slot and the change) if `moved`, else as it was.
#[inline(always)]
fn balance_moved(
    valuation: &Valuation,
    (slot, amount): (Slot, Amount),
    before: Amount,
    moved: bool,
    changed: &mut impl FnMut(Slot, i128),
) -> Amount {
    if !moved {
        return before;
    }
    let value = valuation.balance(slot, amount);
    changed(slot, value.0 - before.0);
    value
}

/// A position's term at `valuation`'s prices, given its term at other prices: revalued (and `changed` told its
/// slot and its value's change) if `moved`, else as it was.
#[inline(always)]
fn position_moved(
    valuation: &Valuation,
    p: &Position,
    before: ValueMm,
    moved: bool,
    changed: &mut impl FnMut(Slot, i128),
) -> ValueMm {
    if !moved {
        return before;
    }
    let t = valuation.position_unrounded(p);
    changed(p.slot, t.value.0 - before.value.0);
    t
}

/// A standard-margin account's [`Standing`] at `valuation`'s prices, from its terms' unrounded margins (no
/// division per position); each term is appended to `terms` (balances, then positions: a balance's margin is
/// zero). `None` when a unit's margin must be rounded to tell whether it is liquidatable (its equity is within a
/// few 1e-8 of it): then [`standard_exposure`] says, and `terms` is complete all the same.
pub fn standard_standing(valuation: &Valuation, acc: &Account, terms: &mut Vec<ValueMm>) -> Option<Standing> {
    let mut units = Units::default();
    balance_terms(valuation, acc, terms, &mut units);
    for p in &acc.positions {
        let t = valuation.position_unrounded(p);
        terms.push(t);
        units.position(p, t);
    }
    units.finish()
}

/// The same account's [`Standing`] at `valuation`'s prices, given its `terms` at other prices (from
/// [`standard_standing`]): a term of a slot `moves` names is recomputed, and `changed` told its slot and its
/// value's change; the others are taken as they are. `None` as [`standard_standing`].
pub fn standard_standing_moved(
    valuation: &Valuation,
    acc: &Account,
    terms: &[ValueMm],
    moves: &[bool],
    mut changed: impl FnMut(Slot, i128),
) -> Option<Standing> {
    let moved = |slot: Slot| moves.get(slot as usize).copied().unwrap_or(false);
    let (balances, positions) = terms.split_at(acc.balances.len().min(terms.len()));
    let mut units = Units::default();
    balances_moved(valuation, acc, balances, moved, &mut changed, &mut units);
    for (p, before) in acc.positions.iter().zip(positions) {
        units.position(p, position_moved(valuation, p, *before, moved(p.slot), &mut changed));
    }
    units.finish()
}

/// Units at `before`'s prices and at `after`'s holding the account's balances: a balance `moved` names revalued
/// at `after` (and `changed` told its slot and its value's change), the others counted the same at both.
#[inline(always)]
fn balances_pair(
    before: &Valuation,
    after: &Valuation,
    acc: &Account,
    moved: impl Fn(Slot) -> bool,
    changed: &mut impl FnMut(Slot, i128),
) -> (Units, Units) {
    let (mut now, mut then) = (Units::default(), Units::default());
    for (slot, amount) in &acc.balances {
        let value = before.balance(*slot, *amount);
        now.balance(value);
        then.balance(balance_moved(after, (*slot, *amount), value, moved(*slot), changed));
    }
    (now, then)
}

/// Adds a position to units at `before`'s prices and at `after`'s with its own figures: revalued at `after` if
/// `moved` (and `changed` told), else the same at both.
#[inline(always)]
fn position_pair(
    before: &Valuation,
    after: &Valuation,
    p: &Position,
    moved: bool,
    changed: &mut impl FnMut(Slot, i128),
    (now, then): (&mut Units, &mut Units),
) {
    let t = before.position_unrounded(p);
    now.position(p, t);
    then.position(p, position_moved(after, p, t, moved, changed));
}

/// A standard-margin account's [`Standing`] at `before`'s prices and at `after`'s, in one pass over its balances
/// and positions: what [`standard_standing`] and then [`standard_standing_moved`] give, without keeping the terms
/// between them (a request of one scenario needs them once). A term of a slot `moves` names is revalued at `after`
/// and `changed` told its slot and its value's change; the others count the same at both. Each `None` as
/// [`standard_standing`]'s.
pub fn standard_standing_pair(
    before: &Valuation,
    after: &Valuation,
    acc: &Account,
    moves: &[bool],
    mut changed: impl FnMut(Slot, i128),
) -> (Option<Standing>, Option<Standing>) {
    let moved = |slot: Slot| moves.get(slot as usize).copied().unwrap_or(false);
    let (mut now, mut then) = balances_pair(before, after, acc, moved, &mut changed);
    for p in &acc.positions {
        position_pair(before, after, p, moved(p.slot), &mut changed, (&mut now, &mut then));
    }
    (now.finish(), then.finish())
}

/// A portfolio account's terms at a stress pass's current prices ([`portfolio_standing`]), kept for its scenarios
/// ([`portfolio_standing_moved`]): every balance's and position's own figures, the groups its cross positions
/// form and their margins; or, for [`portfolio_standing_pair`], its groups now and under the scenario. Reused from
/// account to account.
#[derive(Default)]
pub struct PortfolioTerms {
    /// Balances, then positions: each position's own value and unrounded margin, whether or not a group charges it.
    terms: Vec<ValueMm>,
    /// Per position, its group's place in `underlyings`, or [`NO_GROUP`] (not an open cross position of an
    /// underlying).
    group: Vec<u32>,
    /// The groups' underlyings, in the order the positions name them.
    underlyings: Vec<Slot>,
    /// What each group charges at current prices (`None`: not formed, its positions keep their own figures), and
    /// under a scenario.
    now: Vec<Option<Charge>>,
    after: Vec<Option<Charge>>,
    /// Each group's legs added up at the prices being evaluated (and at a scenario's, for
    /// [`portfolio_standing_pair`]).
    sums: Vec<GroupSums>,
    sums_after: Vec<GroupSums>,
    /// Whether a scenario moves one of the group's positions ([`portfolio_standing_pair`]).
    revalue: Vec<bool>,
}

const NO_GROUP: u32 = u32::MAX;

/// A group's legs added up as they are met: its perps and futures at their marks (`None` once the exposure does
/// not fit); `general` once a leg is anything else, which leaves the group to [`group_margin_at`].
#[derive(Clone, Copy, Default)]
struct GroupSums {
    linear: Option<LinearTotals>,
    general: bool,
}

impl GroupSums {
    const EMPTY: Self = Self { linear: Some(LinearTotals::ZERO), general: false };
}

/// What a group charges a stress pass's cross unit: its maintenance margin, or bounds on it (the exact figure is
/// needed only when the unit's equity falls within them: then the pass takes the account's exact figures).
#[derive(Clone, Copy, Debug)]
pub enum Charge {
    Whole(Amount),
    /// `lower / 1e16 ≤ MM < lower / 1e16 + width` (MM in 1e-8 units, `lower_e24` at 1e-24).
    Bound {
        lower_e24: i128,
        width: u32,
    },
}

/// What the groups of `underlyings` (those `revalue` names, all if `None`) charge at `valuation`'s prices (those
/// of `market`), their legs added up in `sums`: a group of perps and futures from its sums; any other its margin
/// through [`group_margin_at`].
fn group_charges(
    valuation: &Valuation,
    market: &Market,
    positions: &[Position],
    underlyings: &[Slot],
    sums: &[GroupSums],
    charges: &mut [Option<Charge>],
    revalue: Option<&[bool]>,
) {
    let mut cache = None;
    for (g, ((u, s), charge)) in underlyings.iter().zip(sums).zip(charges.iter_mut()).enumerate() {
        if revalue.is_some_and(|r| !r.get(g).copied().unwrap_or(false)) {
            continue;
        }
        *charge = if s.general {
            let cache = cache.get_or_insert_with(|| market.vectors.borrow_mut());
            group_margin_at(market, cache, positions, *u).map(|m| Charge::Whole(m.maintenance_margin))
        } else {
            valuation.linear_group(*u, s.linear)
        };
    }
}

/// The margin of underlying `u`'s group among `positions` at `market`'s prices: its open cross positions in the
/// underlying, in order, revalued under `u`'s grid (`None`: not formed, as [`portfolio_groups`] leaves it out).
fn group_margin_at(market: &Market, cache: &mut VectorCache, positions: &[Position], u: Slot) -> Option<GroupMargin> {
    let members = positions
        .iter()
        .filter(|p| p.is_open() && p.mode == MarginMode::Cross && market.group_of(p.slot) == Some(u))
        .map(|p| group_member(market, p));
    member_group_margin(market, cache, u, members)
}

/// A portfolio account's [`Standing`] at `valuation`'s prices (those of `market`), from its terms' unrounded
/// margins and its groups' charges (a margin, or bounds on it); the terms and groups are kept in `kept` for
/// [`portfolio_standing_moved`].
/// `None` when a unit's margin must be rounded to tell whether it is liquidatable: then [`portfolio_exposure`]
/// says, and `kept` is complete all the same. The figures are [`portfolio_exposure`]'s, bit for bit.
pub fn portfolio_standing(
    valuation: &Valuation,
    market: &Market,
    acc: &Account,
    kept: &mut PortfolioTerms,
) -> Option<Standing> {
    let PortfolioTerms { terms, group, underlyings, now, sums, .. } = kept;
    terms.clear();
    group.clear();
    underlyings.clear();
    now.clear();
    sums.clear();
    for p in &acc.positions {
        let g = valuation.group_of(p).map_or(NO_GROUP, |u| {
            let g = underlyings.iter().position(|s| *s == u).unwrap_or_else(|| {
                underlyings.push(u);
                now.push(None);
                sums.push(GroupSums::EMPTY);
                underlyings.len() - 1
            });
            valuation.add_leg(p, &mut sums[g]);
            g as u32
        });
        group.push(g);
    }
    if !underlyings.is_empty() {
        group_charges(valuation, market, &acc.positions, underlyings, sums, now, None);
    }
    let mut units = Units::default();
    balance_terms(valuation, acc, terms, &mut units);
    for (p, g) in acc.positions.iter().zip(group.iter()) {
        let t = valuation.position_unrounded(p);
        terms.push(t);
        units.charged(p, t, now.get(*g as usize));
    }
    for charge in now.iter().flatten() {
        units.group(*charge);
    }
    units.finish()
}

/// The same account's [`Standing`] at `valuation`'s prices (those of `market`), given what
/// [`portfolio_standing`] kept at other prices: a term of a slot `moves` names is recomputed, and `changed` told
/// its slot and its value's change, the others taken as they are; a group is revalued when `moves` names one of
/// its positions' slots (a position's covers its underlying's index too), else keeps its margin. `None` as
/// [`portfolio_standing`]; the figures are [`portfolio_exposure`]'s at `market`, bit for bit.
pub fn portfolio_standing_moved(
    valuation: &Valuation,
    market: &Market,
    acc: &Account,
    kept: &mut PortfolioTerms,
    moves: &[bool],
    mut changed: impl FnMut(Slot, i128),
) -> Option<Standing> {
    let moved = |slot: Slot| moves.get(slot as usize).copied().unwrap_or(false);
    let PortfolioTerms { terms, group, underlyings, now, after, sums, .. } = kept;
    after.clear();
    after.extend_from_slice(now);
    if !underlyings.is_empty() {
        let mut revalue = [false; GROUPS_INLINE];
        let mut spilled = Vec::new();
        let revalue: &mut [bool] = if underlyings.len() <= GROUPS_INLINE {
            &mut revalue[..underlyings.len()]
        } else {
            spilled.resize(underlyings.len(), false);
            &mut spilled
        };
        for (p, g) in acc.positions.iter().zip(group.iter()) {
            if let Some(r) = revalue.get_mut(*g as usize) {
                *r |= moved(p.slot);
            }
        }
        if revalue.iter().any(|r| *r) {
            sums.iter_mut().for_each(|s| *s = GroupSums::EMPTY);
            for (p, g) in acc.positions.iter().zip(group.iter()) {
                if let Some(s) = sums.get_mut(*g as usize) {
                    valuation.add_leg(p, s);
                }
            }
            group_charges(valuation, market, &acc.positions, underlyings, sums, after, Some(revalue));
        }
    }
    let (balances, positions) = terms.split_at(acc.balances.len().min(terms.len()));
    let mut units = Units::default();
    balances_moved(valuation, acc, balances, moved, &mut changed, &mut units);
    for ((p, before), g) in acc.positions.iter().zip(positions).zip(group.iter()) {
        let t = position_moved(valuation, p, *before, moved(p.slot), &mut changed);
        units.charged(p, t, after.get(*g as usize));
    }
    for charge in after.iter().flatten() {
        units.group(*charge);
    }
    units.finish()
}

/// A portfolio account's [`Standing`] at `before`'s prices (those of `markets.0`) and at `after`'s (those of
/// `markets.1`), in one pass over its balances and positions: what [`portfolio_standing`] and then
/// [`portfolio_standing_moved`] give, without keeping the terms between them (a request of one scenario needs them
/// once). A term of a slot `moves` names is revalued at `after` and `changed` told its slot and its value's change;
/// a group is revalued when `moves` names one of its positions' slots. Each `None` as [`portfolio_standing`]'s.
///
/// A grouped position's value counts as it is met, its own margin is not computed: the group's margin charges it,
/// known once every leg is met. A group that is not formed (rare: its index missing, or its exposure beyond
/// `i128`) has its positions' margins computed then and charged after every position's, in another order than
/// [`portfolio_standing`]'s: an overflow in either order makes the figure unknown (`None`), and without one the
/// sums are the same.
pub fn portfolio_standing_pair(
    (before, after): (&Valuation, &Valuation),
    markets: (&Market, &Market),
    acc: &Account,
    kept: &mut PortfolioTerms,
    moves: &[bool],
    mut changed: impl FnMut(Slot, i128),
) -> (Option<Standing>, Option<Standing>) {
    let moved = |slot: Slot| moves.get(slot as usize).copied().unwrap_or(false);
    let PortfolioTerms { underlyings, now: charges_now, after: charges_after, sums, sums_after, revalue, .. } = kept;
    underlyings.clear();
    sums.clear();
    sums_after.clear();
    revalue.clear();
    let (mut now, mut then) = balances_pair(before, after, acc, moved, &mut changed);
    for p in &acc.positions {
        let m = moved(p.slot);
        let Some(u) = before.group_of(p) else {
            position_pair(before, after, p, m, &mut changed, (&mut now, &mut then));
            continue;
        };
        let g = underlyings.iter().position(|s| *s == u).unwrap_or_else(|| {
            underlyings.push(u);
            sums.push(GroupSums::EMPTY);
            sums_after.push(GroupSums::EMPTY);
            revalue.push(false);
            underlyings.len() - 1
        });
        // Its value counts now; its margin is its group's, charged below.
        let value = before.position_value(p);
        now.balance(value);
        then.balance(if m {
            let moved = after.position_value(p);
            changed(p.slot, moved.0 - value.0);
            moved
        } else {
            value
        });
        before.add_leg(p, &mut sums[g]);
        after.add_leg(p, &mut sums_after[g]);
        revalue[g] |= m;
    }
    if !underlyings.is_empty() {
        charges_now.clear();
        charges_now.resize(underlyings.len(), None);
        group_charges(before, markets.0, &acc.positions, underlyings, sums, charges_now, None);
        charges_after.clear();
        charges_after.extend_from_slice(charges_now);
        if revalue.iter().any(|r| *r) {
            group_charges(after, markets.1, &acc.positions, underlyings, sums_after, charges_after, Some(revalue));
        }
        for ((u, c_now), c_after) in underlyings.iter().zip(charges_now.iter()).zip(charges_after.iter()) {
            now.group_or_own(c_now.as_ref(), || own_margins(before, &acc.positions, *u));
            then.group_or_own(c_after.as_ref(), || own_margins(after, &acc.positions, *u));
        }
    }
    (now.finish(), then.finish())
}

/// The margins of underlying `u`'s group's positions among `positions` at `valuation`'s prices: a cross unit of
/// them alone, as [`Units::position`] adds them (what the unit is charged when the group is not formed).
fn own_margins(valuation: &Valuation, positions: &[Position], u: Slot) -> Units {
    let mut own = Units::default();
    for p in positions.iter().filter(|p| valuation.group_of(p) == Some(u)) {
        own.position(p, valuation.position_unrounded(p));
    }
    own
}

/// A standard-margin account's units added up term by term from unrounded margins: the isolated ones as they come
/// (one position each: its margin rounded is the unit's), the cross unit at the end.
#[derive(Default)]
struct Units {
    out: Standing,
    /// The cross unit's equity and the sum of its unrounded margins.
    equity: Amount,
    mm_e24: i128,
    /// A margin or their sum did not fit `i128`.
    unknown: bool,
    /// How many of the cross unit's margins are not zero (each may be rounded up by up to 1e-8), plus the widths
    /// of its groups' bounds: how far above `mm_e24 / 1e16` the unit's MM may lie, in 1e-8 units.
    fractional: u32,
}

impl Units {
    #[inline(always)]
    fn balance(&mut self, value: Amount) {
        self.equity = self.equity.saturating_add(value);
    }

    #[inline(always)]
    fn position(&mut self, p: &Position, t: ValueMm) {
        self.unknown |= t.mm_e24 == MM_E24_UNKNOWN;
        match p.mode {
            MarginMode::Cross => {
                self.equity = self.equity.saturating_add(t.value);
                let (sum, overflow) = self.mm_e24.overflowing_add(t.mm_e24);
                self.mm_e24 = sum;
                self.unknown |= overflow;
                // Counted as not whole unless zero: telling which are whole would take the divisions the bound
                // saves.
                self.fractional += u32::from(t.mm_e24 != 0);
            }
            MarginMode::Isolated => {
                let equity = p.wallet.saturating_add(t.value);
                self.out.add_unit(equity, is_liquidatable(equity, mm_from_e24(t.mm_e24)));
            }
        }
    }

    /// A position of a portfolio account, whose `group`'s margin (if the group is formed) charges it instead of
    /// its own: then only its value counts.
    #[inline(always)]
    fn charged(&mut self, p: &Position, t: ValueMm, group: Option<&Option<Charge>>) {
        match group {
            Some(Some(_)) => self.equity = self.equity.saturating_add(t.value),
            _ => self.position(p, t),
        }
    }

    /// A portfolio group's charge to the cross unit: a whole margin (rounded already) widens no bound; bounds on
    /// it widen it by their width.
    #[inline(always)]
    fn group(&mut self, charge: Charge) {
        let (mm_e24, width) = match charge {
            Charge::Whole(mm) => (mm.0.checked_mul(SCALE2), 0),
            Charge::Bound { lower_e24, width } => (Some(lower_e24), width),
        };
        match (mm_e24.and_then(|m| self.mm_e24.checked_add(m)), self.fractional.checked_add(width)) {
            (Some(sum), Some(fractional)) => (self.mm_e24, self.fractional) = (sum, fractional),
            _ => self.unknown = true,
        }
    }

    /// A group's charge to the cross unit if it is formed, else its positions' `own` margins (a cross unit of
    /// them alone: [`own_margins`]).
    #[inline(always)]
    fn group_or_own(&mut self, charge: Option<&Charge>, own: impl FnOnce() -> Units) {
        match charge {
            Some(charge) => self.group(*charge),
            None => {
                let own = own();
                let (sum, overflow) = self.mm_e24.overflowing_add(own.mm_e24);
                self.mm_e24 = sum;
                self.unknown |= overflow | own.unknown;
                self.fractional += own.fractional;
            }
        }
    }

    #[inline(always)]
    fn finish(mut self) -> Option<Standing> {
        if self.unknown {
            return None;
        }
        self.out.add_unit(self.equity, liquidatable_by_bound(self.equity, self.mm_e24, self.fractional)?);
        Some(self.out)
    }
}

/// Value of the account's collateral: the quote as is, other assets at index price with haircut (an asset with
/// no price yet counts nothing).
pub fn collateral(market: &Market, balances: &[(Slot, Amount)]) -> Amount {
    balances
        .iter()
        .fold(Amount::ZERO, |total, (slot, amount)| total.saturating_add(balance_value(market, *slot, *amount)))
}

/// What one balance counts as collateral: the quote as is, another asset at its index with its haircut (nothing
/// without an index).
fn balance_value(market: &Market, slot: Slot, amount: Amount) -> Amount {
    if slot == QUOTE {
        return amount;
    }
    match market.price(slot) {
        Some(p) => collateral_value(amount, p, market.haircut(slot)),
        None => Amount::ZERO,
    }
}

/// Re-evaluates every position of the account and its cross figures (no episode change). A portfolio account's
/// grouped cross positions are charged their groups' margins instead of their own.
pub fn evaluate(market: &Market, acc: &mut Account) {
    evaluate_groups(market, acc);
}

/// [`evaluate`], returning the groups it charged (for the view, which prints them).
fn evaluate_groups(market: &Market, acc: &mut Account) -> Vec<(Slot, GroupMargin)> {
    let groups = portfolio_groups(market, &acc.positions, acc.margin);
    let mut cross = UnitFigures { equity: collateral(market, &acc.balances), ..UnitFigures::default() };
    for p in &mut acc.positions {
        let grouped = in_group(market, &groups, p);
        p.figures = charged_figures(market, p, grouped);
        if p.mode == MarginMode::Cross {
            cross.equity = cross.equity.saturating_add(p.figures.value);
            if !grouped {
                cross.initial_margin = cross.initial_margin.saturating_add(p.figures.initial_margin);
                cross.maintenance_margin = cross.maintenance_margin.saturating_add(p.figures.maintenance_margin);
            }
        }
    }
    for (_, g) in &groups {
        cross.initial_margin = cross.initial_margin.saturating_add(g.initial_margin);
        cross.maintenance_margin = cross.maintenance_margin.saturating_add(g.maintenance_margin);
    }
    acc.cross = cross;
    cache_groups(market, acc, &groups);
    groups
}

/// Rebuilds the account's [`GroupCache`] from the evaluation that just charged `groups`.
fn cache_groups(market: &Market, acc: &mut Account, groups: &[(Slot, GroupMargin)]) {
    let cache = &mut acc.groups;
    cache.groups.clear();
    cache.legs.clear();
    if groups.is_empty() {
        cache.epoch = None;
        return;
    }
    cache.epoch = Some(market.epoch());
    for &(u, margin) in groups {
        let start = cache.legs.len() as u32;
        // The members in position order: the legs `portfolio_groups` formed the group from.
        for p in acc.positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Cross) {
            if market.group_of(p.slot) == Some(u) {
                cache.legs.extend(group_member(market, p));
            }
        }
        let index_moves_only_this = acc.balances.iter().all(|(asset, _)| *asset != u)
            && acc
                .positions
                .iter()
                .all(|p| p.slot != u && (in_group(market, groups, p) || market.group_of(p.slot) != Some(u)));
        cache.groups.push(CachedGroup {
            underlying: u,
            margin,
            index_moves_only_this,
            legs: start..cache.legs.len() as u32,
        });
    }
}

/// A position's figures as the account is charged: a grouped position's own margin is never used (its group's
/// is), so only its value and PnL are computed.
fn charged_figures(market: &Market, p: &Position, grouped: bool) -> PositionFigures {
    match market.price(p.slot) {
        Some(mark) if grouped => {
            let is_option = matches!(market.instrument(p.slot).map(|i| &i.kind), Some(InstrumentKind::Option { .. }));
            vigil_model::margin::position_value(p.qty, p.cost_e16, mark, is_option)
        }
        _ => position_figures(market, p),
    }
}

/// An account's state at `market`'s prices, summed over its units (the cross unit and each isolated position):
/// what a stress test compares before and after a move.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Exposure {
    pub equity: Amount,
    pub maintenance_margin: Amount,
    /// A unit has `MM > 0` and equity below it.
    pub liquidatable: bool,
    /// A unit's equity is below zero.
    pub bankrupt: bool,
    /// Σ over units of `max(0, −equity)`.
    pub shortfall: Amount,
}

impl Exposure {
    fn add_unit(&mut self, equity: Amount, maintenance_margin: Amount) {
        self.equity = self.equity.saturating_add(equity);
        self.maintenance_margin = self.maintenance_margin.saturating_add(maintenance_margin);
        self.liquidatable |= is_liquidatable(equity, maintenance_margin);
        if equity.is_negative() {
            self.bankrupt = true;
            self.shortfall = self.shortfall.saturating_sub(equity);
        }
    }
}

/// The account's [`Exposure`] at `market`'s prices (`valuation` is the market's), computed afresh like
/// [`evaluate`] but changing nothing (no cached figure is read or written).
pub fn exposure(valuation: &Valuation, market: &Market, acc: &Account) -> Exposure {
    if acc.margin == MarginModel::Standard {
        return standard_exposure(valuation, acc);
    }
    portfolio_exposure(market, acc, &portfolio_groups(market, &acc.positions, acc.margin))
}

/// A portfolio account's [`Exposure`] at `market`'s prices, given its groups' margins at those prices.
pub fn portfolio_exposure(market: &Market, acc: &Account, groups: &[(Slot, GroupMargin)]) -> Exposure {
    let mut out = Exposure::default();
    let mut equity = Amount::ZERO;
    for (slot, amount) in &acc.balances {
        equity = equity.saturating_add(balance_value(market, *slot, *amount));
    }
    let mut cross = UnitFigures { equity, ..UnitFigures::default() };
    for p in &acc.positions {
        let grouped = in_group(market, groups, p);
        let f = charged_figures(market, p, grouped);
        match p.mode {
            MarginMode::Cross => {
                cross.equity = cross.equity.saturating_add(f.value);
                if !grouped {
                    cross.maintenance_margin = cross.maintenance_margin.saturating_add(f.maintenance_margin);
                }
            }
            MarginMode::Isolated => out.add_unit(p.wallet.saturating_add(f.value), f.maintenance_margin),
        }
    }
    for (_, g) in groups {
        cross.maintenance_margin = cross.maintenance_margin.saturating_add(g.maintenance_margin);
    }
    out.add_unit(cross.equity, cross.maintenance_margin);
    out
}

/// Whether a position is charged through one of `groups`.
fn in_group(market: &Market, groups: &[(Slot, GroupMargin)], p: &Position) -> bool {
    !groups.is_empty()
        && p.mode == MarginMode::Cross
        && p.is_open()
        && market.group_of(p.slot).is_some_and(|u| groups.iter().any(|(g, _)| *g == u))
}

/// The groups of a portfolio account's cross positions, by underlying slot (in slot order): each group revalued
/// under its underlying's grid. A group is left out (its positions keep their standard figures) only when a
/// figure it needs is missing (an index, a mark, or the clock for an option), which the events that open
/// positions and switch models refuse to let happen.
pub fn portfolio_groups(market: &Market, positions: &[Position], model: MarginModel) -> Vec<(Slot, GroupMargin)> {
    let mut out = Vec::new();
    if model != MarginModel::Portfolio {
        return out;
    }
    let grouped = |p: &&Position| p.is_open() && p.mode == MarginMode::Cross;
    // The groups' underlyings in slot order, without allocating for the usual handful.
    let mut inline = [0 as Slot; GROUPS_INLINE];
    let mut count = 0;
    let mut spilled: Vec<Slot> = Vec::new();
    for u in positions.iter().filter(grouped).filter_map(|p| market.group_of(p.slot)) {
        if inline[..count].contains(&u) || spilled.contains(&u) {
            continue;
        }
        if count < GROUPS_INLINE {
            inline[count] = u;
            count += 1;
        } else {
            spilled.push(u);
        }
    }
    let mut underlyings: Vec<Slot>;
    let underlyings: &mut [Slot] = if spilled.is_empty() {
        &mut inline[..count]
    } else {
        underlyings = inline[..count].to_vec();
        underlyings.append(&mut spilled);
        &mut underlyings
    };
    underlyings.sort_unstable();
    let mut cache = market.vectors.borrow_mut();
    for &u in underlyings.iter() {
        if let Some(g) = group_margin_at(market, &mut cache, positions, u) {
            out.push((u, g));
        }
    }
    out
}

/// A grouped position as its group's leg needs it: slot, quantity, whether it is an option; `None` without an
/// instrument.
fn group_member(market: &Market, p: &Position) -> Option<(Slot, Qty, bool)> {
    let option = matches!(market.instrument(p.slot)?.kind, InstrumentKind::Option { .. });
    Some((p.slot, p.qty, option))
}

/// The margin of underlying `u`'s group of `members` (in position order, `None` for one without an instrument):
/// the options' vectors brought up to date in `cache`, then the legs (on the stack for the usual handful) revalued
/// under `u`'s grid. `None`, the group not formed, when a figure it needs is missing or a figure does not fit.
fn member_group_margin(
    market: &Market,
    cache: &mut VectorCache,
    u: Slot,
    members: impl Iterator<Item = Option<(Slot, Qty, bool)>> + Clone,
) -> Option<GroupMargin> {
    let index = market.price(u)?;
    // First bring the options' vectors up to date (a mutable use of the cache), then borrow them as legs.
    let mut n = 0;
    for member in members.clone() {
        let (s, _, option) = member?;
        market.price(s)?;
        if option {
            cache.refresh(market, s)?;
        }
        n += 1;
    }
    let cache = &*cache;
    let leg = |member: Option<(Slot, Qty, bool)>| -> Option<Leg<'_>> {
        let (s, qty, option) = member?;
        if option {
            cache.get(s).map(|vector| Leg::Option { qty, vector })
        } else {
            market.price(s).map(|mark| Leg::Linear { qty, mark })
        }
    };
    let mut inline_legs = [NO_LEG; LEGS_INLINE];
    let heap_legs: Vec<Leg<'_>>;
    let legs: &[Leg<'_>] = if n <= LEGS_INLINE {
        for (slot, member) in inline_legs.iter_mut().zip(members) {
            *slot = leg(member)?;
        }
        &inline_legs[..n]
    } else {
        heap_legs = members.map(leg).collect::<Option<Vec<_>>>()?;
        &heap_legs
    };
    group_margin(&market.risk_params(u), index, legs)
}

/// A placeholder for the stack's legs.
const NO_LEG: Leg<'static> = Leg::Linear { qty: Qty::ZERO, mark: vigil_model::Price::ZERO };

/// Groups and legs kept on the stack by [`portfolio_groups`]; more spill to the heap.
const GROUPS_INLINE: usize = 8;
const LEGS_INLINE: usize = 16;

/// Advances the cross unit's episode on its cached figures, appending any triggers.
pub(crate) fn step_cross(acc: &mut Account, has_positions: bool, offset: Offset, triggers: &mut Vec<Trigger>) {
    let cross = acc.cross;
    for kind in acc.episode.step(&cross, has_positions).into_iter().flatten() {
        triggers.push(Trigger {
            offset,
            account: acc.id.to_string(),
            symbol: None,
            kind,
            equity: cross.equity,
            maintenance_margin: cross.maintenance_margin,
            uncovered: None,
        });
    }
}

/// Re-evaluates the account and advances the episodes of its units, appending any triggers.
pub fn evaluate_and_detect(market: &Market, acc: &mut Account, offset: Offset, triggers: &mut Vec<Trigger>) {
    evaluate(market, acc);
    let has = acc.has_cross_positions();
    step_cross(acc, has, offset, triggers);
    for p in &mut acc.positions {
        if p.mode != MarginMode::Isolated || !p.is_open() {
            continue;
        }
        let f = p.isolated_figures();
        for kind in p.episode.step(&f, true).into_iter().flatten() {
            triggers.push(Trigger {
                offset,
                account: acc.id.to_string(),
                symbol: Some(market.name(p.slot).to_owned()),
                kind,
                equity: f.equity,
                maintenance_margin: f.maintenance_margin,
                uncovered: None,
            });
        }
    }
}

/// The replay view of an account, from figures computed afresh (with indexed detection an account's cached figures
/// are those of its last exact evaluation, which a tick inside its bands does not redo).
/// A position's place in its instrument's auto-deleveraging queue (`liquidation.md`, "Deleveraging"): the score
/// and the figures behind it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdlEntry {
    pub account: Box<str>,
    pub slot: Slot,
    pub score: f64,
    /// Signed like the position: the queue of longs or of shorts.
    pub qty: Qty,
    pub unrealized_pnl: Amount,
    /// The equity of the position's unit: the isolated wallet's, or the cross account's.
    pub unit_equity: Amount,
    pub mode: MarginMode,
}

/// The scored perpetual and future positions of `acc` (of instrument `only`, if given), from figures evaluated
/// afresh as a view's are. A position whose unit has no positive equity is left out of the queue.
pub fn adl_entries(market: &Market, acc: &Account, only: Option<Slot>, out: &mut Vec<AdlEntry>) {
    let queued = |p: &Position| {
        p.is_open()
            && only.is_none_or(|s| s == p.slot)
            && market.instrument(p.slot).is_some_and(|i| !i.settled && !matches!(i.kind, InstrumentKind::Option { .. }))
    };
    if !acc.positions.iter().any(queued) {
        return;
    }
    let mut fresh = acc.clone();
    evaluate(market, &mut fresh);
    for p in fresh.positions.iter().filter(|p| queued(p)) {
        let Some(mark) = market.price(p.slot) else { continue };
        let unit_equity = match p.mode {
            MarginMode::Isolated => p.isolated_figures().equity,
            MarginMode::Cross => fresh.cross.equity,
        };
        let upnl = p.figures.unrealized_pnl;
        if let Some(score) = vigil_model::liquidation::adl_score(upnl, p.qty, p.cost_e16, mark, unit_equity) {
            out.push(AdlEntry {
                account: acc.id.clone(),
                slot: p.slot,
                score,
                qty: p.qty,
                unrealized_pnl: upnl,
                unit_equity,
                mode: p.mode,
            });
        }
    }
}

pub fn view(market: &Market, acc: &Account) -> AccountView {
    let mut fresh = acc.clone();
    let groups = evaluate_groups(market, &mut fresh);
    let acc = &fresh;
    let mut balances: Vec<(String, Amount)> = acc
        .balances
        .iter()
        .filter(|(s, a)| *s == QUOTE || a.0 != 0)
        .map(|(s, a)| (market.name(*s).to_owned(), *a))
        .collect();
    balances.sort();
    let mut positions: Vec<PositionView> = acc
        .positions
        .iter()
        .filter(|p| p.is_open())
        .map(|p| {
            let mark = market.price(p.slot);
            let grouped = in_group(market, &groups, p);
            let tiers = market.instrument(p.slot).and_then(|i| i.tiers.as_ref()).filter(|_| !grouped);
            let (liq, bankrupt) = match (tiers, mark) {
                (Some(t), Some(m)) => {
                    let (equity, others) = match p.mode {
                        MarginMode::Isolated => (p.isolated_figures().equity, Amount::ZERO),
                        MarginMode::Cross => (
                            acc.cross.equity,
                            acc.cross.maintenance_margin.saturating_sub(p.figures.maintenance_margin),
                        ),
                    };
                    (liquidation_price(equity, p.qty, m, others, t), bankruptcy_price(equity, p.qty, m))
                }
                _ => (None, None),
            };
            PositionView {
                symbol: market.name(p.slot).to_owned(),
                qty: p.qty,
                entry_price: entry_price(p.qty, p.cost_e16),
                mark_price: mark,
                unrealized_pnl: p.figures.unrealized_pnl,
                initial_margin: (!grouped).then_some(p.figures.initial_margin),
                maintenance_margin: (!grouped).then_some(p.figures.maintenance_margin),
                margin_mode: p.mode,
                isolated_wallet: (p.mode == MarginMode::Isolated).then_some(p.wallet),
                liquidation_price: liq,
                bankruptcy_price: bankrupt,
            }
        })
        .collect();
    positions.sort_by(|a, b| a.symbol.cmp(&b.symbol));
    AccountView {
        account: acc.id.to_string(),
        equity: acc.cross.equity,
        initial_margin: acc.cross.initial_margin,
        maintenance_margin: acc.cross.maintenance_margin,
        available: acc.cross.available(),
        liquidatable: is_liquidatable(acc.cross.equity, acc.cross.maintenance_margin),
        balances,
        positions,
        margin: acc.margin,
        groups: {
            let mut views: Vec<GroupView> = groups
                .iter()
                .map(|(u, g)| {
                    let params = market.risk_params(*u);
                    GroupView {
                        underlying: market.name(*u).to_owned(),
                        scanning_risk: g.scanning_risk,
                        contingency: g.contingency,
                        initial_margin: g.initial_margin,
                        maintenance_margin: g.maintenance_margin,
                        worst_move: g.worst.price_move(&params),
                        worst_vol: g.worst.vol,
                    }
                })
                .collect();
            views.sort_by(|a, b| a.underlying.cmp(&b.underlying));
            views
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound decides a unit only as rounding each margin would, and leaves undecided only equities within the
    /// bound's width of the sum, or below a sum that is not positive (every combination of a few margins, whole
    /// and not, around every equity near their rounded total).
    #[test]
    fn the_margin_bound_agrees_with_rounding_each_margin() {
        let d = SCALE2;
        let ys = [0, 1, d - 1, d, d + 1, 3 * d, 5 * d / 2, 7 * d + 12_345, -d / 2];
        let mut undecided = 0;
        for a in ys {
            for b in ys {
                for c in ys {
                    let margins = [a, b, c];
                    let exact: i128 = margins.iter().map(|y| mm_from_e24(*y).0).sum();
                    let sum: i128 = margins.iter().sum();
                    let fractional = margins.iter().filter(|y| **y != 0).count() as u32;
                    for equity in (exact - 6)..=(exact + 6) {
                        let equity = Amount(equity);
                        let truth = is_liquidatable(equity, Amount(exact));
                        match liquidatable_by_bound(equity, sum, fractional) {
                            Some(told) => assert_eq!(told, truth, "{margins:?} at equity {equity:?}"),
                            None => {
                                undecided += 1;
                                // Within the band, or below a sum that is not positive (MM may then be zero).
                                let below = equity.0 * d < sum + i128::from(fractional) * d;
                                assert!(below && (equity.0 * d >= sum || sum <= 0), "{margins:?} at {equity:?}");
                            }
                        }
                    }
                }
            }
        }
        assert!(undecided > 0, "the grid reaches the undecided band");
        // Past i128: left to the exact figures.
        assert_eq!(liquidatable_by_bound(Amount(i128::MAX / 2), 5 * d, 1), None);
    }

    /// What a stress pass reads of an account (balances, positions, margin model) shares one cache line (an
    /// account is 64-byte aligned), and so does what it reads of a position (slot, mode, quantity, cost, wallet:
    /// its first 64 bytes of 128).
    #[test]
    fn a_stress_pass_reads_one_line_of_an_account_and_of_a_position() {
        use std::mem::{align_of, offset_of, size_of};
        let line = |start: usize, end: usize| (start / 64, (end - 1) / 64);
        assert_eq!(align_of::<Account>(), 64);
        let account = (offset_of!(Account, balances), offset_of!(Account, margin) + size_of::<MarginModel>());
        assert!(offset_of!(Account, positions) > account.0 && offset_of!(Account, positions) < account.1);
        let (first, last) = line(account.0, account.1);
        assert_eq!(first, last, "an account's balances to margin model: bytes {account:?}");
        assert_eq!(size_of::<Position>(), 128);
        let (first, last) = line(0, offset_of!(Position, wallet) + size_of::<Amount>());
        assert_eq!((first, last), (0, 0));
        let read = [offset_of!(Position, slot), offset_of!(Position, mode), offset_of!(Position, qty)];
        for field in read.into_iter().chain([offset_of!(Position, cost_e16)]) {
            assert!(field < offset_of!(Position, wallet));
        }
    }

    /// A portfolio account whose equity under a scenario is within a few 1e-8 of its group's margin is told
    /// liquidatable or not as the exact margin says, though its group of perps charged only bounds on its margin
    /// (the bound cannot tell there: the exact figures do), in one pass and through the kept terms alike.
    #[test]
    fn an_equity_at_a_groups_margin_is_told_by_the_exact_margin() {
        let mut market = Market::new("USDC");
        for line in [
            r#"{"type":"asset","asset":"BTC","haircut":"0.1"}"#,
            r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
        ] {
            market.declare(&vigil_model::parse_line(line).expect("a declaration")).expect("declared");
        }
        let (btc, perp) = (market.slot("BTC").expect("declared"), market.slot("BTC-PERP").expect("declared"));
        market.set_price(btc, Price(10_000_000_033));
        market.set_price(perp, Price(10_000_000_033));
        let mut after = market.clone();
        after.set_price(btc, Price(9_000_000_017));
        after.set_price(perp, Price(9_000_000_017));
        let mut moves = vec![false; market.slots()];
        (moves[btc as usize], moves[perp as usize]) = (true, true);
        let mut acc = Account::new("pm");
        acc.margin = MarginModel::Portfolio;
        let mut p = Position::new(perp, MarginMode::Cross);
        p.qty = Qty(3_333_333_337);
        p.cost_e16 = p.qty.wide() * 10_000_000_033;
        acc.positions.push(p);
        let (now, then) = (Valuation::new(&market), Valuation::new(&after));
        for v in [&now, &then] {
            let mut sums = GroupSums::EMPTY;
            v.add_leg(&acc.positions[0], &mut sums);
            assert!(matches!(v.linear_group(btc, sums.linear), Some(Charge::Bound { .. })), "the group charges bounds");
        }
        let mut kept = PortfolioTerms::default();
        // Equity after the move at the group's exact margin, and a few 1e-8 either side.
        acc.balances[0].1 = Amount::ZERO;
        let base = exposure(&then, &after, &acc);
        let (mut liquidatable, mut told, mut undecided) = (0, 0, 0);
        for k in -5..=5 {
            acc.balances[0].1 = Amount(base.maintenance_margin.0 - base.equity.0 + k);
            let exact = (Standing::from(exposure(&now, &market, &acc)), Standing::from(exposure(&then, &after, &acc)));
            assert_eq!(exact.1.equity.0 - base.maintenance_margin.0, k);
            let pair = portfolio_standing_pair((&now, &then), (&market, &after), &acc, &mut kept, &moves, |_, _| {});
            let kept_now = portfolio_standing(&now, &market, &acc, &mut kept);
            let kept_after = portfolio_standing_moved(&then, &after, &acc, &mut kept, &moves, |_, _| {});
            for (got, want) in [(pair.0, exact.0), (pair.1, exact.1), (kept_now, exact.0), (kept_after, exact.1)] {
                // Undecided (`None`: the pass takes the exact figures) or the exact answer.
                if let Some(got) = got {
                    assert_eq!(got, want, "equity {k} from the margin");
                    told += 1;
                }
            }
            assert_eq!(pair.1.is_none(), kept_after.is_none(), "both ways bound alike at {k}");
            undecided += u32::from(pair.1.is_none());
            liquidatable += u32::from(exact.1.liquidatable);
        }
        assert_eq!(liquidatable, 5, "below the margin: liquidatable; at it or above: not");
        // Now (far from the margin) always told; after, told 5 from it either way, left to the exact figures nearer.
        assert!((1..=9).contains(&undecided), "{undecided} of 11 left to the exact figures");
        assert_eq!(told, 22 + 2 * (11 - undecided));
    }

    /// A portfolio account's two standings in one pass are those of its exposure, now and after, also when a group
    /// is not formed (here BTC's, its index missing: the engine refuses a portfolio fill that would need it, so
    /// only a market built by hand reaches this) and its positions are charged their own margins next to a group
    /// that is (ETH's).
    #[test]
    fn a_portfolio_pair_charges_a_group_not_formed_its_positions_own_margins() {
        let mut market = Market::new("USDC");
        for line in [
            r#"{"type":"asset","asset":"BTC","haircut":"0.1"}"#,
            r#"{"type":"asset","asset":"ETH","haircut":"0.1"}"#,
            r#"{"type":"perp","symbol":"BTC-PERP","underlying":"BTC","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
            r#"{"type":"perp","symbol":"ETH-PERP","underlying":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#,
        ] {
            let event = vigil_model::parse_line(line).expect("a declaration");
            market.declare(&event).expect("declared");
        }
        let slot = |name: &str| market.slot(name).expect("declared");
        let (eth, btc_perp, eth_perp) = (slot("ETH"), slot("BTC-PERP"), slot("ETH-PERP"));
        market.set_price(btc_perp, Price::units(100));
        market.set_price(eth, Price::units(100));
        market.set_price(eth_perp, Price::units(100));
        let mut acc = Account::new("pm");
        acc.margin = MarginModel::Portfolio;
        acc.balances[0].1 = Amount(110 * SCALE_I128);
        for (slot, qty) in [(btc_perp, 10), (eth_perp, -1)] {
            let mut p = Position::new(slot, MarginMode::Cross);
            p.qty = Qty::units(qty);
            p.cost_e16 = i128::from(qty) * 100 * SCALE2;
            acc.positions.push(p);
        }
        let mut kept = PortfolioTerms::default();
        // BTC −6% moves BTC-PERP to 94: equity 110 − 60 = 50 against MM 10 × 94 × 0.05 = 47 for BTC's position
        // plus ETH's group's (above 3): liquidatable by BTC's own margin. Then −90% (10): 110 − 900 = −790.
        // Now: equity 110, MM 50 plus ETH's group's (below 60): not liquidatable.
        for mark in [94, 10] {
            let mut after = market.clone();
            after.set_price(btc_perp, Price::units(mark));
            let mut moves = vec![false; market.slots()];
            moves[btc_perp as usize] = true;
            let (now, then) = (Valuation::new(&market), Valuation::new(&after));
            let mut changes = Vec::new();
            let pair = portfolio_standing_pair((&now, &then), (&market, &after), &acc, &mut kept, &moves, |s, c| {
                changes.push((s, c))
            });
            let exposures = (exposure(&now, &market, &acc), exposure(&then, &after, &acc));
            assert_eq!(pair, (Some(exposures.0.into()), Some(exposures.1.into())), "BTC-PERP at {mark}");
            assert_eq!(changes, [(btc_perp, i128::from(mark - 100) * 10 * SCALE_I128)]);
            // The figures themselves: BTC's position charged its own margin, ETH's group its own.
            let eth_group = portfolio_groups(&after, &acc.positions, MarginModel::Portfolio);
            assert!(eth_group.iter().all(|(u, _)| *u == eth) && eth_group.len() == 1, "only ETH's group is formed");
            let own = Amount(i128::from(mark) * 5 * SCALE_I128 / 10);
            assert_eq!(exposures.1.maintenance_margin, own.saturating_add(eth_group[0].1.maintenance_margin));
            assert!(!exposures.0.liquidatable && exposures.1.liquidatable, "BTC-PERP at {mark}");
            assert!(exposures.1.equity.0 < own.0 + eth_group[0].1.maintenance_margin.0, "BTC-PERP at {mark}");
            assert_eq!(exposures.1.bankrupt, mark == 10, "BTC-PERP at {mark}");
        }
    }
}
