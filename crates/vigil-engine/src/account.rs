//! One account's state and its evaluation: positions, balances, cached figures, liquidation episodes.

use vigil_model::margin::{
    bankruptcy_price, collateral_value, entry_price, is_liquidatable, linear_figures, linear_value_mm,
    liquidation_price, option_figures,
};
use vigil_model::portfolio::{GroupMargin, Leg, group_margin};
use vigil_model::{
    AccountView, Amount, GroupView, MarginMode, MarginModel, Offset, PositionFigures, PositionView, Qty, Trigger,
    TriggerKind, UnitFigures,
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
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Position {
    pub slot: Slot,
    pub qty: Qty,
    /// Σ qty × price over the fills that opened it, exact at 1e-16.
    pub cost_e16: i128,
    pub mode: MarginMode,
    /// The isolated wallet (zero for cross positions).
    pub wallet: Amount,
    /// Figures at the last evaluation (a cache: not persisted).
    #[serde(skip)]
    pub figures: PositionFigures,
    /// The isolated unit's episode (unused for cross positions).
    pub episode: Episode,
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
    /// The safe band this account has in the slot's ordered indexes (indexed detection only).
    pub band: Band,
    /// In the slot's `always` list instead of its band indexes: a portfolio account with a group, re-evaluated on
    /// every change of the price (indexed detection only).
    pub always: bool,
}

/// One account: its persistent state (id, balances, positions, episodes) and caches rebuilt on restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Account {
    pub id: Box<str>,
    /// Balances per asset slot; the quote is always entry 0, other entries only while non-zero.
    pub balances: Vec<(Slot, Amount)>,
    pub positions: Vec<Position>,
    /// Price dependencies and their bands (derived: rebuilt on restore).
    #[serde(skip)]
    pub deps: Vec<Dep>,
    /// Cross figures at the last evaluation (a cache).
    #[serde(skip)]
    pub cross: UnitFigures,
    pub episode: Episode,
    /// Standard or portfolio margin (`account_config`).
    pub margin: MarginModel,
    /// Changed since the last checkpoint delta.
    #[serde(skip)]
    pub dirty: bool,
    /// A portfolio account's groups at its last evaluation (what the engine's group tables are built from).
    #[serde(skip)]
    pub groups: GroupCache,
    /// The rows this account has in the engine's group tables (indexed detection): underlying, row.
    #[serde(skip)]
    pub rows: Vec<(Slot, u32)>,
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
    figures::<true>(market, slot, qty, cost_e16)
}

/// [`figures_at`], with the initial margin of a perp or future left out (zero) when `IM` is false.
fn figures<const IM: bool>(market: &Market, slot: Slot, qty: Qty, cost_e16: i128) -> PositionFigures {
    let (Some(inst), Some(mark)) = (market.instrument(slot), market.price(slot)) else {
        return PositionFigures::default();
    };
    match &inst.kind {
        InstrumentKind::Perp | InstrumentKind::Future => match &inst.tiers {
            Some(t) if IM => linear_figures(qty, cost_e16, mark, t),
            Some(t) => linear_value_mm(qty, cost_e16, mark, t),
            None => PositionFigures::default(),
        },
        InstrumentKind::Option { underlying, terms } => match market.price(*underlying) {
            Some(u) => option_figures(qty, cost_e16, mark, u, terms),
            None => PositionFigures::default(),
        },
    }
}

/// One term of a standard-margin account's [`Exposure`] at some prices: a balance's collateral value, or a
/// position's value and maintenance margin. A stress test keeps an account's terms at current prices and, under a
/// scenario, recomputes only the terms whose prices it moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Term {
    pub value: Amount,
    pub maintenance_margin: Amount,
    /// A balance's amount, or a position's cost (Σ qty × price over its fills, at 1e-16).
    amount: i128,
    /// An isolated position's wallet (zero otherwise).
    wallet: Amount,
    qty: Qty,
    pub slot: Slot,
    unit: Unit,
}

/// Where a term counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unit {
    /// A balance: the cross unit's collateral.
    Balance,
    Cross,
    /// An isolated position: its own unit, with its wallet.
    Isolated,
}

impl Term {
    fn balance(market: &Market, slot: Slot, amount: Amount) -> Term {
        Term {
            value: balance_value(market, slot, amount),
            maintenance_margin: Amount::ZERO,
            amount: amount.0,
            wallet: Amount::ZERO,
            qty: Qty::ZERO,
            slot,
            unit: Unit::Balance,
        }
    }

    fn position(market: &Market, slot: Slot, qty: Qty, cost_e16: i128, wallet: Amount, unit: Unit) -> Term {
        // An exposure has no use for initial margin.
        let f = figures::<false>(market, slot, qty, cost_e16);
        Term { value: f.value, maintenance_margin: f.maintenance_margin, amount: cost_e16, wallet, qty, slot, unit }
    }

    /// The same term at `market`'s prices.
    pub fn at(&self, market: &Market) -> Term {
        match self.unit {
            Unit::Balance => Term::balance(market, self.slot, Amount(self.amount)),
            unit => Term::position(market, self.slot, self.qty, self.amount, self.wallet, unit),
        }
    }
}

/// A standard-margin account's terms at `market`'s prices: its balances, then its positions, in their order.
pub fn standard_terms<'a>(
    market: &'a Market,
    balances: &'a [(Slot, Amount)],
    positions: &'a [Position],
) -> impl Iterator<Item = Term> + 'a {
    let balances = balances.iter().map(|(slot, amount)| Term::balance(market, *slot, *amount));
    balances.chain(positions.iter().map(|p| match p.mode {
        MarginMode::Cross => Term::position(market, p.slot, p.qty, p.cost_e16, Amount::ZERO, Unit::Cross),
        MarginMode::Isolated => Term::position(market, p.slot, p.qty, p.cost_e16, p.wallet, Unit::Isolated),
    }))
}

/// The [`Exposure`] the terms of a standard-margin account add up to: the cross unit (balances and cross
/// positions) and each isolated position's unit.
pub fn terms_exposure(terms: impl IntoIterator<Item = Term>) -> Exposure {
    let mut out = Exposure::default();
    let (mut equity, mut mm) = (Amount::ZERO, Amount::ZERO);
    for t in terms {
        if t.unit == Unit::Isolated {
            out.add_unit(t.wallet.saturating_add(t.value), t.maintenance_margin);
        } else {
            equity = equity.saturating_add(t.value);
            mm = mm.saturating_add(t.maintenance_margin);
        }
    }
    out.add_unit(equity, mm);
    out
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

/// The account's [`Exposure`] at `market`'s prices, computed afresh like [`evaluate`] but changing nothing (no
/// cached figure is read or written).
pub fn exposure(market: &Market, acc: &Account) -> Exposure {
    if acc.margin == MarginModel::Standard {
        return terms_exposure(standard_terms(market, &acc.balances, &acc.positions));
    }
    portfolio_exposure(market, acc, &portfolio_groups(market, &acc.positions, acc.margin))
}

/// A portfolio account's [`Exposure`] at `market`'s prices, given its groups' margins at those prices.
pub fn portfolio_exposure(market: &Market, acc: &Account, groups: &[(Slot, GroupMargin)]) -> Exposure {
    let mut out = Exposure::default();
    let mut cross = UnitFigures { equity: collateral(market, &acc.balances), ..UnitFigures::default() };
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
    portfolio_groups_reusing(market, positions, model, |_| None)
}

/// [`portfolio_groups`], taking the group of underlying `u` as `reuse(u)` says when it says `Some` (the margin of
/// the same group computed at prices that agree with `market`'s on everything the group depends on; `Some(None)`
/// for a group that could not be formed there) instead of revaluing it.
pub fn portfolio_groups_reusing(
    market: &Market,
    positions: &[Position],
    model: MarginModel,
    reuse: impl Fn(Slot) -> Option<Option<GroupMargin>>,
) -> Vec<(Slot, GroupMargin)> {
    if model != MarginModel::Portfolio {
        return Vec::new();
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
    let mut out = Vec::new();
    let mut cache = market.vectors.borrow_mut();
    for &u in underlyings.iter() {
        if let Some(kept) = reuse(u) {
            out.extend(kept.map(|g| (u, g)));
            continue;
        }
        let members = positions
            .iter()
            .filter(grouped)
            .filter(|p| market.group_of(p.slot) == Some(u))
            .map(|p| group_member(market, p));
        if let Some(g) = member_group_margin(market, &mut cache, u, members) {
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
