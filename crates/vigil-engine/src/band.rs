//! Safe price bands: the heart of price-indexed liquidation detection.
//!
//! After an exact evaluation, each account gets for every price slot it depends on a band `[lo, hi]` such that,
//! while **every** one of its prices stays inside its band, none of its margin units can change episode state.
//! A tick then re-evaluates exactly the accounts whose band it leaves, found through per-slot heaps of band edges
//! (`index`); everything else provably has nothing to report.
//!
//! Why it is exact. A unit's cushion `g = equity − MM` is a sum of per-slot terms (collateral, a perp's PnL and
//! MM, an option's value and MM split into its mark term and its underlying term), each monotone with a bounded
//! slope: a linear position's slope lies between `q(1 − mmr_max)` and `q(1 − mmr_min)` (longs) or is at most
//! `|q|(1 + mmr_max)` in magnitude (shorts), because MM is continuous and piecewise linear across tiers. The cushion
//! (less a slack covering per-figure rounding) is split evenly among the slots; a slot's band is how far its price
//! can move before its term could eat its share. So while all prices are in their bands, `g` stays ≥ 0 and the
//! unit stays out of liquidation.
//!
//! A unit already in an episode watches two other thresholds the same way: `equity ≥ 0` (until its `bankrupt`
//! trigger) and `IM − equity > 0` (the episode ends when equity reaches IM). IM is not continuous across tiers
//! (no maintenance-amount analogue), so for that watch a linear position's band also stops at its tier's lower
//! notional bound, where IM would jump down.

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

/// Rates at which a slot's price moving down / up can decrease a watched quantity, exact at 1e-16 per price unit.
#[derive(Clone, Copy, Debug, Default)]
struct Rates {
    down_e16: i128,
    up_e16: i128,
}

impl Rates {
    fn add(&mut self, down_e16: i128, up_e16: i128) {
        self.down_e16 += down_e16;
        self.up_e16 += up_e16;
    }
    fn is_zero(&self) -> bool {
        self.down_e16 == 0 && self.up_e16 == 0
    }
}

fn one_minus(r: Rate) -> i128 {
    SCALE_I128 - r.wide()
}

/// How far a price may move while the term loses at most `budget` (raw 1e-8): `floor(budget × 1e16 / rate)`.
fn reach(budget: i128, rate_e16: i128) -> Option<i64> {
    if rate_e16 <= 0 {
        return None; // this side never decreases the watched quantity
    }
    let d = mul_div(budget.max(0), SCALE_I128 * SCALE_I128, rate_e16, Round::Floor).unwrap_or(i128::MAX);
    Some(i64::try_from(d).unwrap_or(i64::MAX))
}

fn band_at(price: i64, budget: i128, rates: &Rates) -> Band {
    if budget < 0 {
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

/// The three quantities a unit may watch, each as per-slot rates.
struct Watches {
    /// `equity − MM` (out of an episode).
    cushion: Vec<Rates>,
    /// `equity` (in an episode, before bankruptcy).
    equity: Vec<Rates>,
    /// `IM − equity` (in an episode).
    im_gap: Vec<Rates>,
    /// Per slot, the price range in which each linear position stays in its tier (for `im_gap`).
    tier_clip: Vec<Band>,
    /// Whether the unit has a maintenance requirement that prices can move (else it can never be liquidated).
    mm_bearing: bool,
}

impl Watches {
    fn new(n: usize) -> Self {
        Self {
            cushion: vec![Rates::default(); n],
            equity: vec![Rates::default(); n],
            im_gap: vec![Rates::default(); n],
            tier_clip: vec![Band::default(); n],
            mm_bearing: false,
        }
    }

    /// A perp/future position of signed quantity `q` at `price` in slot index `i`.
    fn linear(&mut self, market: &Market, slot: Slot, i: usize, q: i128, price: Option<i64>) {
        let Some(tiers) = market.instrument(slot).and_then(|x| x.tiers.as_ref()) else { return };
        let t = tiers.tiers();
        let (Some(first), Some(last)) = (t.first(), t.last()) else { return };
        self.mm_bearing = true;
        let aq = q.abs();
        // Slopes of equity − MM: q(1 − mmr) for a long (≥ 0), −|q|(1 + mmr) for a short, mmr over all tiers.
        if q > 0 {
            self.cushion[i].add(q * one_minus(first.mmr), 0);
            self.equity[i].add(q * SCALE_I128, 0);
        } else {
            self.cushion[i].add(0, aq * (SCALE_I128 + last.mmr.wide()));
            self.equity[i].add(0, aq * SCALE_I128);
        }
        // IM − equity within the current tier: slope q(imr − 1); the band stops at the tier's lower bound.
        let Some(p) = price else { return };
        let k = tiers.index_for(aq * i128::from(p));
        let tier = t[k];
        if q > 0 {
            self.im_gap[i].add(0, q * one_minus(tier.imr));
        } else {
            self.im_gap[i].add(aq * (SCALE_I128 + tier.imr.wide()), 0);
        }
        if k > 0
            && let Some(bound) = t[k - 1].max_notional
        {
            // Lowest price still in tier k: notional strictly above the previous bound.
            let lowest = i64::try_from(bound.wide() * SCALE_I128 / aq + 1).unwrap_or(i64::MAX);
            self.tier_clip[i] = self.tier_clip[i].intersect(Band { lo: Some(lowest), hi: None });
        }
    }
}

/// Bands of one unit from its watches and figures, intersected into `out`.
fn unit_bands(
    market: &Market,
    acc: &Account,
    w: &Watches,
    figures: &vigil_model::UnitFigures,
    episode: &crate::account::Episode,
    terms: usize,
    out: &mut [Band],
) {
    let mut apply = |rates: &[Rates], gap: i128, clip: bool| {
        let k = rates.iter().filter(|r| !r.is_zero()).count() as i128;
        if k == 0 {
            return;
        }
        let budget = (gap - slack(terms)) / k;
        for (i, r) in rates.iter().enumerate() {
            if r.is_zero() {
                continue;
            }
            if let Some(price) = market.price(acc.deps[i].slot) {
                let mut b = band_at(price.raw(), budget, r);
                if clip {
                    b = b.intersect(w.tier_clip[i]);
                }
                out[i] = out[i].intersect(b);
            }
        }
    };
    if episode.active {
        if !episode.bankrupt {
            apply(&w.equity, figures.equity.0, false);
        }
        // Safe while IM − equity > 0, i.e. ≥ 1 raw unit.
        apply(&w.im_gap, figures.initial_margin.0.saturating_sub(figures.equity.0) - 1, true);
    } else if w.mm_bearing {
        apply(&w.cushion, figures.equity.0.saturating_sub(figures.maintenance_margin.0), false);
    }
}

/// Whether the account is re-evaluated on every change of any price it depends on rather than banded: a portfolio
/// account with a group. A group's figures are not monotone in its prices (a short straddle loses both ways) and
/// move with the implied volatilities its marks carry: no band as cheap as a re-evaluation is sound. Such an
/// account sits in its slots' `always` lists, not in their band indexes (which saves their churn on
/// every tick).
pub fn always_reevaluated(market: &Market, acc: &Account) -> bool {
    acc.margin == vigil_model::MarginModel::Portfolio
        && acc.positions.iter().any(|p| p.is_open() && p.mode == MarginMode::Cross && market.group_of(p.slot).is_some())
}

/// Computes the band of every slot in `acc.deps` (in that order) into `out`. The account's cached figures must be
/// fresh (this runs right after its exact evaluation).
pub fn compute(market: &Market, acc: &Account, out: &mut Vec<Band>) {
    out.clear();
    out.resize(acc.deps.len(), Band::default());
    let n = acc.deps.len();
    // A portfolio account with a group gets no band (see `always_reevaluated`).
    if always_reevaluated(market, acc) {
        return;
    }
    let slot_index = |slot: Slot| acc.deps.iter().position(|d| d.slot == slot);

    // Cross unit.
    let mut w = Watches::new(n);
    for p in acc.positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Cross) {
        let (Some(inst), Some(i)) = (market.instrument(p.slot), slot_index(p.slot)) else { continue };
        let q = p.qty.wide();
        match &inst.kind {
            InstrumentKind::Perp | InstrumentKind::Future => {
                w.linear(market, p.slot, i, q, market.price(p.slot).map(|x| x.raw()));
            }
            InstrumentKind::Option { underlying, terms } => {
                let aq = q.abs();
                if q > 0 {
                    // Value q × m: equity falls with m; IM − equity falls as m rises.
                    w.cushion[i].add(q * SCALE_I128, 0);
                    w.equity[i].add(q * SCALE_I128, 0);
                    w.im_gap[i].add(0, q * SCALE_I128);
                    continue;
                }
                // Short: value −|q| m, MM and IM +|q| m.
                w.mm_bearing = true;
                w.cushion[i].add(0, 2 * aq * SCALE_I128);
                w.equity[i].add(0, aq * SCALE_I128);
                w.im_gap[i].add(2 * aq * SCALE_I128, 0);
                if let Some(u) = slot_index(*underlying) {
                    let m = terms.margin;
                    // MM's |q| × mm × U rises with U.
                    w.cushion[u].add(0, aq * m.mm.wide());
                    // IM's |q| × max(im_max U − OTM, im_min U): slopes in [im_min, im_max + 1] for a call,
                    // [im_max − 1, im_max] for a put.
                    match terms.right {
                        vigil_model::Right::Call => w.im_gap[u].add(aq * (m.im_max.wide() + SCALE_I128), 0),
                        vigil_model::Right::Put => w.im_gap[u].add(aq * m.im_max.wide(), aq * one_minus(m.im_max)),
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
            let v = amount.0 * one_minus(*haircut);
            w.cushion[i].add(v, 0);
            w.equity[i].add(v, 0);
            w.im_gap[i].add(0, v);
        }
    }
    // Linear terms of one asset slot net out exactly in `equity − MM` (collateral against short options' MM).
    for r in &mut w.cushion {
        let net = r.down_e16 - r.up_e16;
        *r = if net >= 0 { Rates { down_e16: net, up_e16: 0 } } else { Rates { down_e16: 0, up_e16: -net } };
    }
    let terms = acc.positions.len() + acc.balances.len();
    unit_bands(market, acc, &w, &acc.cross, &acc.episode, terms, out);

    // Isolated units: one slot each.
    for p in acc.positions.iter().filter(|p| p.is_open() && p.mode == MarginMode::Isolated) {
        let Some(i) = slot_index(p.slot) else { continue };
        let mut wi = Watches::new(n);
        wi.linear(market, p.slot, i, p.qty.wide(), market.price(p.slot).map(|x| x.raw()));
        unit_bands(market, acc, &wi, &p.isolated_figures(), &p.episode, 2, out);
    }
}
