//! Safe price bands: the heart of price-indexed liquidation detection.
//!
//! After an exact evaluation, each account gets for every price slot it depends on a band `[lo, hi]` such that,
//! while **every** one of its prices stays inside its band, none of its margin units can change episode state.
//! A tick then re-evaluates exactly the accounts whose band it leaves, found through ordered indexes; everything
//! else provably has nothing to report.
//!
//! Why it is exact. A unit's cushion `g = equity − MM` is a sum of per-slot terms (collateral, a perp's PnL and
//! MM, an option's value and MM split into its mark term and its underlying term), each monotone with a bounded
//! slope: a linear position's slope lies between `q(1 − mmr_max)` and `q(1 − mmr_min)` (longs) or is at most
//! `|q|(1 + mmr_max)` in magnitude (shorts), because MM is continuous and piecewise linear across tiers. The cushion
//! (less a slack covering per-figure rounding) is split evenly among the slots; a slot's band is how far its price
//! can move before its term could eat its share. So while all prices are in their bands, `g` stays ≥ 0 and the
//! unit stays out of liquidation. Units already in an episode (whose exit at IM and bankruptcy must be seen too)
//! get degenerate bands `[p, p]`: any move re-evaluates them. Their number is the number of accounts in trouble.

use vigil_model::num::{Round, SCALE_I128, mul_div};
use vigil_model::{MarginMode, Rate};

use crate::account::Account;
use crate::market::{Entry, InstrumentKind, Market, QUOTE, Slot};

/// A band: `None` on a side means the price can move without bound that way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Band {
    pub lo: Option<i64>,
    pub hi: Option<i64>,
}

impl Band {
    fn intersect(self, o: Band) -> Band {
        let lo = match (self.lo, o.lo) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        let hi = match (self.hi, o.hi) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        Band { lo, hi }
    }
}

/// Rates at which a slot's price moving down / up can decrease a unit's cushion, exact at 1e-16 per price unit.
#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    down_e16: i128,
    up_e16: i128,
    /// Net linear slope for asset slots (collateral minus short options' MM), folded into down/up at the end.
    net_e16: i128,
}

fn one_minus(r: Rate) -> i128 {
    SCALE_I128 - r.wide()
}

/// Rates of a perp/future position: longs lose when the price falls, shorts when it rises.
fn linear_rates(market: &Market, slot: Slot, q: i64) -> Rates {
    let Some(tiers) = market.instrument(slot).and_then(|i| i.tiers.as_ref()) else { return Rates::default() };
    let t = tiers.tiers();
    let (Some(first), Some(last)) = (t.first(), t.last()) else { return Rates::default() };
    let q = i128::from(q);
    if q > 0 {
        Rates { down_e16: q * one_minus(first.mmr), ..Rates::default() }
    } else {
        Rates { up_e16: -q * (SCALE_I128 + last.mmr.wide()), ..Rates::default() }
    }
}

/// How far a price may move while the term loses at most `budget` (raw 1e-8): `floor(budget × 1e16 / rate)`.
fn reach(budget: i128, rate_e16: i128) -> Option<i64> {
    if rate_e16 <= 0 {
        return None; // this side never decreases the cushion
    }
    let d = mul_div(budget.max(0), SCALE_I128 * SCALE_I128, rate_e16, Round::Floor).unwrap_or(i128::MAX);
    Some(i64::try_from(d).unwrap_or(i64::MAX))
}

fn band_at(price: i64, budget: i128, rates: &Rates, hot: bool) -> Band {
    if hot || budget < 0 {
        return Band { lo: Some(price), hi: Some(price) };
    }
    let lo = reach(budget, rates.down_e16).map(|d| price.saturating_sub(d)).filter(|lo| *lo > 0);
    let hi = reach(budget, rates.up_e16).map(|d| price.saturating_add(d));
    Band { lo, hi }
}

/// Rounding slack in raw units: every rounded term of a unit can be off by less than one unit at each of the two
/// evaluations compared.
fn slack(terms: usize) -> i128 {
    4 * terms as i128 + 4
}

/// Computes the band of every slot in `acc.deps` (in that order) into `out`. The account's cached figures must be
/// fresh (this runs right after its exact evaluation).
pub fn compute(market: &Market, acc: &Account, out: &mut Vec<Band>) {
    out.clear();
    out.resize(acc.deps.len(), Band::default());
    let slot_index = |slot: Slot| acc.deps.iter().position(|d| d.slot == slot);

    // Cross unit.
    let mut rates: Vec<Rates> = vec![Rates::default(); acc.deps.len()];
    let mut mm_bearing = false;
    for p in acc.positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Cross) {
        let Some(inst) = market.instrument(p.slot) else { continue };
        match &inst.kind {
            InstrumentKind::Perp | InstrumentKind::Future => {
                mm_bearing = true;
                if let Some(i) = slot_index(p.slot) {
                    let r = linear_rates(market, p.slot, p.qty.raw());
                    rates[i].down_e16 += r.down_e16;
                    rates[i].up_e16 += r.up_e16;
                }
            }
            InstrumentKind::Option { underlying, terms } => {
                let q = p.qty.wide();
                if let Some(i) = slot_index(p.slot) {
                    if q > 0 {
                        rates[i].down_e16 += q * SCALE_I128; // value q × m
                    } else {
                        rates[i].up_e16 += -2 * q * SCALE_I128; // value q × m and MM |q| × m
                    }
                }
                if q < 0 {
                    mm_bearing = true;
                    if let Some(i) = slot_index(*underlying) {
                        rates[i].net_e16 -= -q * terms.margin.mm.wide(); // MM |q| × mm × U
                    }
                }
            }
        }
    }
    for (asset, amount) in &acc.balances {
        if *asset == QUOTE || amount.0 <= 0 {
            continue;
        }
        if let (Some(i), Some(Entry::Asset { haircut })) = (slot_index(*asset), market.entry(*asset)) {
            rates[i].net_e16 += amount.0 * one_minus(*haircut);
        }
    }
    if acc.episode.active {
        // In an episode: every price the account depends on re-evaluates it.
        for (i, d) in acc.deps.iter().enumerate() {
            if let Some(price) = market.price(d.slot) {
                out[i] = Band { lo: Some(price.raw()), hi: Some(price.raw()) };
            }
        }
        return;
    }
    if mm_bearing {
        let mut k = 0i128;
        for r in &mut rates {
            if r.net_e16 > 0 {
                r.down_e16 += r.net_e16;
            } else {
                r.up_e16 += -r.net_e16;
            }
            if r.down_e16 > 0 || r.up_e16 > 0 {
                k += 1;
            }
        }
        let cushion = acc.cross.equity.0.saturating_sub(acc.cross.maintenance_margin.0);
        let budget = if k == 0 { 0 } else { (cushion - slack(acc.positions.len() + acc.balances.len())) / k };
        for (i, r) in rates.iter().enumerate() {
            if r.down_e16 == 0 && r.up_e16 == 0 {
                continue;
            }
            if let Some(price) = market.price(acc.deps[i].slot) {
                out[i] = out[i].intersect(band_at(price.raw(), budget, r, false));
            }
        }
    }

    // Isolated units: one slot each, the whole cushion.
    for p in acc.positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Isolated) {
        let (Some(i), Some(price)) = (slot_index(p.slot), market.price(p.slot)) else { continue };
        let f = p.isolated_figures();
        let cushion = f.equity.0.saturating_sub(f.maintenance_margin.0) - slack(2);
        let r = linear_rates(market, p.slot, p.qty.raw());
        out[i] = out[i].intersect(band_at(price.raw(), cushion, &r, p.episode.active));
    }
}
