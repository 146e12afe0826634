//! Stress tests (`portfolio-margin.md`, "Stress tests"): the book revalued under market moves. Nothing changes:
//! each scenario is a shocked copy of the market, and every account is evaluated afresh against it under its own
//! margin model.
//!
//! A shard computes its [`Part`] of each scenario ([`Engine::stress`]) in one pass over its accounts, every
//! scenario for each account while its data is in cache; the parts of every shard, taken at one offset,
//! [`merge`] into the book's.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use vigil_model::margin::ValueMm;
use vigil_model::num::{Round, SCALE_I128, mul_div};
use vigil_model::portfolio::{black76, implied_vol, years_to_expiry};
use vigil_model::{Amount, Price, Reason};

use crate::account::{
    Account, Exposure, PortfolioTerms, Standing, Valuation, exposure, portfolio_standing, portfolio_standing_moved,
    portfolio_standing_pair, standard_exposure, standard_standing, standard_standing_moved, standard_standing_pair,
};
use crate::market::{Entry, InstrumentKind, Market, Slot};
use crate::{Engine, prefetch};

/// A relative change at 1e-8 (`-0.3` = −30%).
pub type Relative = i64;

/// One named scenario: relative index moves per asset and relative volatility shifts (`0.5` = σ × 1.5).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scenario {
    pub name: String,
    /// (asset, move), sorted by asset, each asset once.
    pub moves: Vec<(String, Relative)>,
    /// (asset, volatility shift), sorted by asset, each asset once.
    pub vol: Vec<(String, Relative)>,
}

/// A loss curve: one scenario per step, moving `underlying` from `from` to `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grid {
    pub underlying: String,
    pub from: Relative,
    pub to: Relative,
    pub steps: u32,
}

/// The most steps one grid may have.
pub const GRID_STEPS_MAX: u32 = 1001;
/// The most scenarios (named and grid steps together) one request may run.
pub const SCENARIOS_MAX: usize = 4096;
/// The longest `top` list.
pub const TOP_MAX: usize = 1000;

impl Grid {
    /// The move of step `i`: `from + (to − from) × i / (steps − 1)`, rounded to the nearest 1e-8.
    pub fn step(&self, i: u32) -> Relative {
        if self.steps <= 1 {
            return self.from;
        }
        let span = i128::from(self.to) - i128::from(self.from);
        let offset = mul_div(span, i128::from(i), i128::from(self.steps - 1), Round::Nearest)
            .expect("invariant: a span below 2^65 times a step below 2^32 fits, and steps - 1 > 0");
        // Between from and to, both i64.
        (i128::from(self.from) + offset) as Relative
    }

    /// The grid's scenarios, one per step, named `"{underlying} {move}"`.
    pub fn scenarios(&self) -> impl Iterator<Item = Scenario> + '_ {
        (0..self.steps).map(|i| {
            let m = self.step(i);
            Scenario {
                name: format!("{} {}", self.underlying, Price(m)),
                moves: vec![(self.underlying.clone(), m)],
                vol: Vec::new(),
            }
        })
    }
}

/// A stress request: named scenarios, grids, and how many accounts to list per scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub scenarios: Vec<Scenario>,
    pub grids: Vec<Grid>,
    pub top: usize,
}

impl Request {
    /// Every scenario the request runs: the named ones, then each grid's steps in order.
    pub fn expand(&self) -> Vec<Scenario> {
        let mut all = self.scenarios.clone();
        for g in &self.grids {
            all.extend(g.scenarios());
        }
        all
    }

    /// Checks the request's shape (not its names: those need the market, [`shock`]).
    pub fn validate(&self) -> Result<(), StressError> {
        if self.scenarios.is_empty() && self.grids.is_empty() {
            return Err(StressError::invalid("a stress request needs at least one scenario or grid"));
        }
        if self.top > TOP_MAX {
            return Err(StressError::invalid(format!("top is {}, at most {TOP_MAX}", self.top)));
        }
        let mut count = self.scenarios.len();
        for g in &self.grids {
            if g.steps == 0 || g.steps > GRID_STEPS_MAX {
                return Err(StressError::invalid(format!(
                    "grid on {}: steps is {}, must be 1 to {GRID_STEPS_MAX}",
                    g.underlying, g.steps
                )));
            }
            count += g.steps as usize;
        }
        if count > SCENARIOS_MAX {
            return Err(StressError::invalid(format!("{count} scenarios requested, at most {SCENARIOS_MAX}")));
        }
        for s in &self.scenarios {
            if s.moves.is_empty() && s.vol.is_empty() {
                return Err(StressError::invalid(format!("scenario {:?} moves nothing", s.name)));
            }
        }
        Ok(())
    }
}

/// Why a stress request was refused (nothing was computed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StressError {
    /// `invalid_scenario`, `unknown_symbol` or `no_price`.
    pub code: &'static str,
    pub message: String,
}

impl StressError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { code: "invalid_scenario", message: message.into() }
    }
    fn reason(reason: Reason, message: String) -> Self {
        Self { code: reason.as_str(), message }
    }
}

impl std::fmt::Display for StressError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for StressError {}

/// `price × (1 + m)`, rounded to the nearest 1e-8.
fn moved(price: Price, m: Relative) -> Option<Price> {
    let p = mul_div(price.wide(), SCALE_I128 + i128::from(m), SCALE_I128, Round::Nearest)?;
    i64::try_from(p).ok().map(Price)
}

/// The asset slot a scenario names.
fn asset_slot(market: &Market, scenario: &Scenario, name: &str, what: &str) -> Result<Slot, StressError> {
    match market.slot(name).map(|s| (s, market.entry(s))) {
        Some((s, Some(Entry::Asset { .. }))) => Ok(s),
        Some((_, Some(Entry::Quote))) => Err(StressError::invalid(format!(
            "scenario {:?} {what} {name:?}, the quote asset: every figure is in it",
            scenario.name
        ))),
        Some(_) => Err(StressError::invalid(format!(
            "scenario {:?} {what} {name:?}, an instrument: name the asset it follows",
            scenario.name
        ))),
        None => Err(StressError::reason(
            Reason::UnknownAsset,
            format!("scenario {:?} {what} {name:?}, which is not a declared asset", scenario.name),
        )),
    }
}

/// A scenario's relative figures (moves or shifts) by asset slot; refused for a name that is not an asset, or a
/// figure of −1 or below (`refusal` says why, after the scenario's name).
fn by_slot(
    market: &Market,
    scenario: &Scenario,
    pairs: &[(String, Relative)],
    what: &str,
    refusal: impl Fn(&str, Relative) -> String,
) -> Result<Vec<Option<Relative>>, StressError> {
    let mut out = vec![None; market.slots()];
    for (name, x) in pairs {
        let slot = asset_slot(market, scenario, name, what)?;
        if *x <= -SCALE_I128 as i64 {
            return Err(StressError::invalid(format!("scenario {:?} {}", scenario.name, refusal(name, *x))));
        }
        out[slot as usize] = Some(*x);
    }
    Ok(out)
}

/// The market as `scenario` moves it: each named asset's index × (1 + move); each perp's and future's mark × (1 +
/// its underlying's move); each option on a moved or vol-shifted underlying repriced by Black-76 at the moved index
/// with its implied volatility × (1 + shift). Everything else stays put. Refused with `no_price` when an option
/// must be repriced before any `clock` (its time to expiry is unknown).
pub fn shock(market: &Market, scenario: &Scenario) -> Result<Market, StressError> {
    let moves = by_slot(market, scenario, &scenario.moves, "moves", |name, m| {
        format!("moves {name:?} by {}: a move must be above -1 (prices stay positive)", Price(m))
    })?;
    let shifts = by_slot(market, scenario, &scenario.vol, "shifts the volatility of", |name, v| {
        format!("shifts {name:?}'s volatility by {}: a shift must be above -1", Price(v))
    })?;
    let n = market.slots();
    let out_of_range = |symbol: &str| {
        StressError::invalid(format!("scenario {:?} moves {symbol:?}'s price out of range", scenario.name))
    };
    let mut shocked = market.clone();
    for slot in 0..n as Slot {
        let Some(price) = market.price(slot) else { continue };
        let new = match market.entry(slot) {
            Some(Entry::Asset { .. }) => match moves[slot as usize] {
                Some(m) => moved(price, m).ok_or_else(|| out_of_range(market.name(slot)))?,
                None => continue,
            },
            Some(Entry::Instrument(inst)) if !inst.settled => {
                let Some(u) = inst.underlying else { continue };
                let m = moves[u as usize];
                match &inst.kind {
                    InstrumentKind::Perp | InstrumentKind::Future => match m {
                        Some(m) => moved(price, m).ok_or_else(|| out_of_range(market.name(slot)))?,
                        None => continue,
                    },
                    InstrumentKind::Option { terms, .. } => {
                        let shift = shifts[u as usize];
                        if m.is_none() && shift.is_none() {
                            continue;
                        }
                        let Some(index) = market.price(u) else { continue };
                        let Some(clock) = market.clock() else {
                            return Err(StressError::reason(
                                Reason::NoPrice,
                                format!(
                                    "scenario {:?} moves {:?}: repricing option {:?} needs its time to expiry, and no \
                                     clock event has set the time yet",
                                    scenario.name,
                                    market.name(u),
                                    market.name(slot)
                                ),
                            ));
                        };
                        let t = inst.expiry.map_or(0.0, |e| years_to_expiry(clock, e));
                        let (u0, k, mark) = (to_f64(index), to_f64(terms.strike), to_f64(price));
                        let sigma = implied_vol(terms.right, u0, k, t, mark);
                        let index_after = match m {
                            Some(m) => moved(index, m).ok_or_else(|| out_of_range(market.name(u)))?,
                            None => index,
                        };
                        let factor = 1.0 + shift.map_or(0.0, |v| v as f64 / SCALE_I128 as f64);
                        let value = black76(terms.right, to_f64(index_after), k, t, sigma * factor);
                        // A value is within [intrinsic, bound] (finite, non-negative): it converts.
                        Price((value * SCALE_I128 as f64).round().clamp(0.0, i64::MAX as f64) as i64)
                    }
                }
            }
            _ => continue,
        };
        shocked.set_price(slot, new);
    }
    Ok(shocked)
}

fn to_f64(p: Price) -> f64 {
    p.0 as f64 / SCALE_I128 as f64
}

/// Loss and gain on one moved asset (summed over accounts: positions on it and collateral in it).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AssetLoss {
    pub asset: String,
    /// Σ over accounts of what they lose on the asset (value before − after, where positive).
    pub loss: Amount,
    /// Σ over accounts of what they gain on it.
    pub gain: Amount,
}

/// One account among a scenario's largest losses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TopAccount {
    pub account: String,
    /// Equity before − equity after, summed over the account's units.
    pub loss: Amount,
    pub before: Exposure,
    pub after: Exposure,
}

/// A scenario's result over some accounts (one shard's, or the book's once merged).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Part {
    pub accounts: u64,
    pub liquidatable: u64,
    /// Liquidatable under the scenario, not at current prices.
    pub newly_liquidatable: u64,
    pub bankrupt: u64,
    pub shortfall: Amount,
    /// Per asset the scenario moves or shifts, in the scenario's order (moves, then shifts not moved).
    pub assets: Vec<AssetLoss>,
    /// Largest losses first; ties by account id.
    pub top: Vec<TopAccount>,
}

impl Part {
    /// Counts an account at current prices (the request's `now`).
    #[inline(always)]
    fn add(&mut self, standing: Standing) {
        self.accounts += 1;
        self.liquidatable += u64::from(standing.liquidatable);
        self.bankrupt += u64::from(standing.bankrupt);
        self.shortfall = self.shortfall.saturating_add(standing.shortfall);
    }
}

/// One shard's answer to a stress request: its accounts at current prices, and its part of each scenario.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShardStress {
    pub now: Part,
    pub scenarios: Vec<Part>,
}

/// Merges every shard's answer (taken at one offset) into the book's: `now`, then each scenario.
pub fn merge_shards(shards: Vec<ShardStress>, top: usize) -> ShardStress {
    let n = shards.first().map_or(0, |s| s.scenarios.len());
    let mut columns: Vec<Vec<Part>> = (0..n).map(|_| Vec::with_capacity(shards.len())).collect();
    let mut nows = Vec::with_capacity(shards.len());
    for s in shards {
        nows.push(s.now);
        for (column, part) in columns.iter_mut().zip(s.scenarios) {
            column.push(part);
        }
    }
    ShardStress { now: merge(nows, 0), scenarios: columns.into_iter().map(|c| merge(c, top)).collect() }
}

/// The assets whose losses a scenario reports, in order: moved ones, then those only vol-shifted.
fn reported_assets(s: &Scenario) -> Vec<String> {
    let mut names: Vec<String> = s.moves.iter().map(|(a, _)| a.clone()).collect();
    for (a, _) in &s.vol {
        if !names.contains(a) {
            names.push(a.clone());
        }
    }
    names
}

/// A candidate for the top list, ordered so that the heap's smallest is the first to drop: the smallest loss, and
/// among equal losses the largest account id (ids are unique).
struct Ranked<'a> {
    loss: Amount,
    id: Reverse<&'a str>,
    /// The account's shard (its [`Pass`] among those [`finish`] is given) and place in it.
    shard: usize,
    index: usize,
}

impl Ranked<'_> {
    fn key(&self) -> (Amount, &Reverse<&str>) {
        (self.loss, &self.id)
    }
}

impl PartialEq for Ranked<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Ranked<'_> {}

impl PartialOrd for Ranked<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked<'_> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(&other.key())
    }
}

/// What a scenario's pass needs beyond its moved market: the assets it reports, which of them each slot's value
/// follows (an asset itself, or an instrument's underlying), and which slots' figures it can change.
struct Plan {
    names: Vec<String>,
    follows: Vec<Option<usize>>,
    /// The slot's price or, for an instrument, its underlying's is not the same under the scenario: a figure of
    /// the slot (a balance's value; a position's value or margin) is recomputed only then.
    moves: Vec<bool>,
}

impl Plan {
    /// `deltas` emptied for an account: one change per reported asset, all zero.
    #[inline(always)]
    fn clear(&self, deltas: &mut Vec<i128>) {
        deltas.clear();
        deltas.resize(self.names.len(), 0);
    }

    /// Adds a term's value `change` on `slot` to the reported asset the slot follows, if any.
    #[inline(always)]
    fn count(&self, deltas: &mut [i128], slot: Slot, change: i128) {
        if let Some(x) = self.follows[slot as usize] {
            deltas[x] += change;
        }
    }

    fn new(market: &Market, after: &Market, scenario: &Scenario) -> Plan {
        let names = reported_assets(scenario);
        let mut follows: Vec<Option<usize>> = vec![None; market.slots()];
        for (k, name) in names.iter().enumerate() {
            if let Some(s) = market.slot(name) {
                follows[s as usize] = Some(k);
            }
        }
        for slot in 0..market.slots() as Slot {
            if let Some(u) = market.group_of(slot).filter(|u| *u != slot) {
                follows[slot as usize] = follows[u as usize];
            }
        }
        let differs = |slot: Slot| market.price(slot) != after.price(slot);
        let moves = (0..market.slots() as Slot)
            .map(|slot| differs(slot) || market.group_of(slot).is_some_and(differs))
            .collect();
        Plan { names, follows, moves }
    }
}

/// How many accounts ahead the pass prefetches accounts' records, and their balances and positions (`prefetch`).
const PREFETCH_FAR: usize = 16;
const PREFETCH_NEAR: usize = 8;

/// Accounts between two progress reports of [`Engine::stress`].
const PROGRESS_EVERY: usize = 1 << 14;

impl Engine {
    /// The market as each scenario moves it ([`shock`]): refused (before computing anything) if a scenario names
    /// an unknown asset or must reprice an option before any clock.
    pub fn shock_all(&self, scenarios: &[Scenario]) -> Result<Vec<Market>, StressError> {
        scenarios.iter().map(|s| shock(&self.market, s)).collect()
    }

    /// This shard's part of every scenario, at its current state; `progress` is told how many accounts are done
    /// as it goes. Changes nothing. Refused as [`Engine::shock_all`].
    pub fn stress(
        &self,
        scenarios: &[Scenario],
        top: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<ShardStress, StressError> {
        let shocked = self.shock_all(scenarios)?;
        let pass = Pass::new(0, self, scenarios, &shocked);
        let markets = Markets { now: &self.market, shocked: &shocked };
        let mut tally = Tally::new(&pass, top);
        let n = self.accounts.len();
        let mut start = 0;
        while start < n {
            let end = (start + PROGRESS_EVERY).min(n);
            pass.run(markets, start..end, &mut tally);
            progress(end);
            start = end;
        }
        progress(n);
        Ok(finish(std::slice::from_ref(&pass), &[markets], vec![tally], top))
    }
}

/// A stress request over one shard's accounts, ready to run: what each scenario reports and which slots' figures
/// it changes, and the valuations at current and moved prices. Read-only, so any number of threads may
/// [`Pass::run`] it over disjoint ranges of accounts at once, each with its own copy of the shard's [`Markets`].
///
/// One pass over the accounts, every scenario for each: an account's data is fetched from memory once,
/// evaluated at current prices, then at each scenario's prices while it is in cache. An account is evaluated as
/// terms (balances, positions; a portfolio account's groups too); a scenario recomputes only the terms and groups
/// whose prices it moves. A request of one scenario evaluates an account before and after in one pass over its
/// terms, keeping none ([`standard_standing_pair`], [`portfolio_standing_pair`]: a grouped position's own margin
/// is then not computed, its group's charges it).
pub struct Pass<'a> {
    /// Its place among the passes [`finish`] is given.
    shard: usize,
    accounts: &'a [Account],
    plans: Vec<Plan>,
    valuation: Valuation<'a>,
    valuations: Vec<Valuation<'a>>,
}

impl<'a> Pass<'a> {
    /// `shocked`: the market under each of `scenarios` ([`Engine::shock_all`]), in order; `shard`: the pass's
    /// place among those [`finish`] will be given.
    pub fn new(shard: usize, engine: &'a Engine, scenarios: &[Scenario], shocked: &'a [Market]) -> Self {
        let market = &engine.market;
        let plans = scenarios.iter().zip(shocked).map(|(s, after)| Plan::new(market, after, s)).collect();
        Pass {
            shard,
            accounts: &engine.accounts,
            plans,
            valuation: Valuation::new(market),
            valuations: shocked.iter().map(Valuation::new).collect(),
        }
    }

    /// The shard's accounts: [`Pass::run`] takes ranges of `0..accounts()`.
    pub fn accounts(&self) -> usize {
        self.accounts.len()
    }

    /// Adds the accounts of `range` (places in the shard) to `tally`; `markets` are the shard's (a portfolio
    /// account is evaluated against them).
    pub fn run(&self, markets: Markets, range: std::ops::Range<usize>, tally: &mut Tally<'a>) {
        let market = markets.now;
        let accounts = self.accounts;
        let (valuation, plans, top) = (&self.valuation, &self.plans, tally.top);
        let shard = self.shard;
        let Tally { now, parts, heaps, scratch, .. } = tally;
        let Scratch { terms, deltas, portfolio } = scratch;
        let end = range.end.min(accounts.len());
        for i in range.start..end {
            let acc = &accounts[i];
            // The record of an account FAR places ahead, then the balances and positions of one NEAR places ahead
            // (its record is in cache by then): their loads overlap instead of waiting on each other.
            // (A record's balances, positions and margin model share one line; a position's fields the first of its
            // two.)
            if let Some(far) = accounts.get(i + PREFETCH_FAR) {
                prefetch::value(&far.balances);
            }
            if let Some(near) = accounts.get(i + PREFETCH_NEAR) {
                prefetch::slice(&near.balances);
                prefetch::heads(&near.positions);
            }
            let standard = acc.margin == vigil_model::MarginModel::Standard;
            if let [plan] = plans.as_slice() {
                // One scenario: the account's terms now and under it in one pass, none kept between the two (a
                // portfolio account's groups' charges once each).
                plan.clear(deltas);
                let (after_valuation, after_market) = (&self.valuations[0], &markets.shocked[0]);
                let count = |slot, change| plan.count(deltas, slot, change);
                let (b, a) = if standard {
                    let (b, a) = standard_standing_pair(valuation, after_valuation, acc, &plan.moves, count);
                    let b = b.unwrap_or_else(|| standard_exposure(valuation, acc).into());
                    (b, a.unwrap_or_else(|| standard_exposure(after_valuation, acc).into()))
                } else {
                    let valuations = (valuation, after_valuation);
                    let pair =
                        portfolio_standing_pair(valuations, (market, after_market), acc, portfolio, &plan.moves, count);
                    let b = pair.0.unwrap_or_else(|| exposure(valuation, market, acc).into());
                    (b, pair.1.unwrap_or_else(|| exposure(after_valuation, after_market, acc).into()))
                };
                now.add(b);
                record(&mut parts[0], &mut heaps[0], top, deltas, (b, a), (&acc.id, shard, i));
                continue;
            }
            let b: Standing = if standard {
                terms.clear();
                standard_standing(valuation, acc, terms).unwrap_or_else(|| standard_exposure(valuation, acc).into())
            } else {
                portfolio_standing(valuation, market, acc, portfolio)
                    .unwrap_or_else(|| exposure(valuation, market, acc).into())
            };
            now.add(b);
            for (k, ((plan, after_market), after_valuation)) in
                plans.iter().zip(markets.shocked).zip(&self.valuations).enumerate()
            {
                plan.clear(deltas);
                let a: Standing = if standard {
                    // Only the terms whose prices the scenario moves are recomputed; the rest are as they are now.
                    standard_standing_moved(after_valuation, acc, terms, &plan.moves, |slot, change| {
                        plan.count(deltas, slot, change)
                    })
                    .unwrap_or_else(|| standard_exposure(after_valuation, acc).into())
                } else {
                    portfolio_standing_moved(
                        after_valuation,
                        after_market,
                        acc,
                        portfolio,
                        &plan.moves,
                        |slot, change| plan.count(deltas, slot, change),
                    )
                    .unwrap_or_else(|| exposure(after_valuation, after_market, acc).into())
                };
                record(&mut parts[k], &mut heaps[k], top, deltas, (b, a), (&acc.id, shard, i));
            }
        }
    }
}

/// Counts an account in a scenario's part: its standing `before` (at current prices) and `after` the scenario,
/// `deltas` its changes by reported asset; and offers it (`id`, its shard and place there) as a candidate for
/// the scenario's `top` largest losses.
#[inline(always)]
fn record<'a>(
    part: &mut Part,
    heap: &mut BinaryHeap<Reverse<Ranked<'a>>>,
    top: usize,
    deltas: &[i128],
    (before, after): (Standing, Standing),
    (id, shard, index): (&'a str, usize, usize),
) {
    part.accounts += 1;
    part.liquidatable += u64::from(after.liquidatable);
    part.newly_liquidatable += u64::from(after.liquidatable && !before.liquidatable);
    part.bankrupt += u64::from(after.bankrupt);
    part.shortfall = part.shortfall.saturating_add(after.shortfall);
    for (loss, d) in part.assets.iter_mut().zip(deltas) {
        if *d < 0 {
            loss.loss = loss.loss.saturating_sub(Amount(*d));
        } else if *d > 0 {
            loss.gain = loss.gain.saturating_add(Amount(*d));
        }
    }
    if top > 0 {
        let loss = before.equity.saturating_sub(after.equity);
        // Cheap test first: only a loss at least the smallest kept can enter.
        if heap.len() >= top && heap.peek().is_some_and(|Reverse(r)| loss < r.loss) {
            return;
        }
        heap.push(Reverse(Ranked { loss, id: Reverse(id), shard, index }));
        if heap.len() > top {
            heap.pop();
        }
    }
}

/// A shard's market and the market under each scenario, for a portfolio account's groups (a market caches the
/// option vectors it computes, so each thread evaluates against its own copy) and the listed accounts' figures.
#[derive(Clone, Copy)]
pub struct Markets<'m> {
    pub now: &'m Market,
    pub shocked: &'m [Market],
}

/// What passes over some accounts have counted so far: at current prices, and each scenario's part with its
/// largest losses still as candidates. One per thread; [`finish`] adds them up. Every figure is a count or a sum
/// of non-negative amounts, so the totals do not depend on how the accounts were split or in which order.
pub struct Tally<'a> {
    top: usize,
    now: Part,
    parts: Vec<Part>,
    heaps: Vec<BinaryHeap<Reverse<Ranked<'a>>>>,
    scratch: Scratch,
}

/// Buffers a pass reuses from account to account.
#[derive(Default)]
struct Scratch {
    /// A standard account's terms at current prices.
    terms: Vec<ValueMm>,
    /// A scenario's changes by reported asset.
    deltas: Vec<i128>,
    /// A portfolio account's terms and groups at current prices (or its groups now and under a lone scenario).
    portfolio: PortfolioTerms,
}

impl<'a> Tally<'a> {
    /// An empty tally for `pass`'s scenarios (any pass of the same request: they report the same assets).
    pub fn new(pass: &Pass, top: usize) -> Self {
        Tally {
            top,
            now: Part::default(),
            parts: pass
                .plans
                .iter()
                .map(|p| Part {
                    assets: p.names.iter().map(|a| AssetLoss { asset: a.clone(), ..AssetLoss::default() }).collect(),
                    ..Part::default()
                })
                .collect(),
            heaps: (0..pass.plans.len()).map(|_| BinaryHeap::with_capacity(top + 1)).collect(),
            scratch: Scratch::default(),
        }
    }
}

/// The request's answer over every account `tallies` counted, from `passes` (one per shard, in the order their
/// tallies' candidates name them; a tally may hold accounts of several) and their shards' `markets` (in the same
/// order): the counts and sums added up, and the `top` largest losses, each account then evaluated afresh, before
/// and after, to list its margins (the pass counted without them).
pub fn finish(passes: &[Pass], markets: &[Markets], tallies: Vec<Tally>, top: usize) -> ShardStress {
    let n = passes.first().map_or(0, |p| p.plans.len());
    let mut now = Part::default();
    let mut parts: Vec<Part> = Vec::with_capacity(n);
    let mut candidates: Vec<Vec<Ranked>> = (0..n).map(|_| Vec::new()).collect();
    for t in tallies {
        now = merge([now, t.now], 0);
        if parts.is_empty() {
            parts = t.parts;
        } else {
            for (p, q) in parts.iter_mut().zip(t.parts) {
                *p = merge([std::mem::take(p), q], 0);
            }
        }
        for (c, heap) in candidates.iter_mut().zip(t.heaps) {
            c.extend(heap.into_iter().map(|Reverse(r)| r));
        }
    }
    for (k, (part, mut ranked)) in parts.iter_mut().zip(candidates).enumerate() {
        ranked.sort_unstable_by(|x, y| y.cmp(x));
        ranked.truncate(top);
        part.top = ranked
            .into_iter()
            .filter_map(|r| {
                let (pass, markets) = (passes.get(r.shard)?, markets.get(r.shard)?);
                let acc = pass.accounts.get(r.index)?;
                Some(TopAccount {
                    account: r.id.0.into(),
                    loss: r.loss,
                    before: exposure(&pass.valuation, markets.now, acc),
                    after: exposure(pass.valuations.get(k)?, markets.shocked.get(k)?, acc),
                })
            })
            .collect();
    }
    ShardStress { now, scenarios: parts }
}

/// Merges the shards' parts of one scenario (in any order) into the book's.
pub fn merge(parts: impl IntoIterator<Item = Part>, top: usize) -> Part {
    let mut out = Part::default();
    for p in parts {
        out.accounts += p.accounts;
        out.liquidatable += p.liquidatable;
        out.newly_liquidatable += p.newly_liquidatable;
        out.bankrupt += p.bankrupt;
        out.shortfall = out.shortfall.saturating_add(p.shortfall);
        if out.assets.is_empty() {
            out.assets = p.assets;
        } else {
            for (o, a) in out.assets.iter_mut().zip(p.assets) {
                o.loss = o.loss.saturating_add(a.loss);
                o.gain = o.gain.saturating_add(a.gain);
            }
        }
        out.top.extend(p.top);
    }
    out.top.sort_by(|x, y| y.loss.cmp(&x.loss).then_with(|| x.account.cmp(&y.account)));
    out.top.truncate(top);
    out
}
