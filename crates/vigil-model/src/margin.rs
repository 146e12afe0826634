//! The formulas of `margin-model.md`, as pure functions on fixed-point numbers.
//!
//! Every figure is rounded once, at 8 decimal places, in the direction the model names: requirements (IM, MM) up,
//! values (unrealized PnL, collateral, credits to an account) down, reported prices to nearest. Intermediates are
//! exact (`i128`, widening to 256 bits when a product would not fit), so the engine and the reference model agree
//! to the last unit whenever they feed these functions the same inputs.

use ethnum::I256;
use serde::{Deserialize, Serialize};

use crate::event::{OptionMargin, Right, TierSpec};
use crate::num::{Amount, Price, Qty, Rate, Round, SCALE_I128, SCALE2, checked_mul, div, e16_to_e8, mul_div};
use crate::reject::{Reason, Rejection, reject};

/// One validated tier with its derived maintenance amount.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    /// Upper notional bound (inclusive); `None` for the unbounded last tier.
    pub max_notional: Option<Price>,
    pub imr: Rate,
    pub mmr: Rate,
    /// Maintenance amount ("cum"), exact at 1e-16.
    pub cum_e16: i128,
}

/// A validated tier table: sorted, rates in bounds, maintenance amounts derived. (Deserialised only from
/// checkpoints this code wrote.)
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tiers(Vec<Tier>);

impl Tiers {
    /// Validates tiers as `events.md` requires and derives `cumₜ = cumₜ₋₁ + max_notionalₜ₋₁ × (mmrₜ − mmrₜ₋₁)`.
    pub fn new(specs: &[TierSpec]) -> Result<Self, Rejection> {
        let bad = |m: String| reject(Reason::InvalidReference, m);
        if specs.is_empty() {
            return Err(bad("an instrument needs at least one tier".into()));
        }
        let mut out: Vec<Tier> = Vec::with_capacity(specs.len());
        for (i, s) in specs.iter().enumerate() {
            if !(s.mmr.0 > 0 && s.mmr <= s.imr && s.imr <= Rate::ONE) {
                return Err(bad(format!("tier {i}: rates must satisfy 0 < mmr <= imr <= 1")));
            }
            if s.max_notional.is_none() && i + 1 != specs.len() {
                return Err(bad(format!("tier {i}: only the last tier may omit max_notional")));
            }
            let cum_e16 = match out.last() {
                None => 0,
                Some(prev) => {
                    if s.imr < prev.imr || s.mmr < prev.mmr {
                        return Err(bad(format!("tier {i}: rates must not decrease from tier to tier")));
                    }
                    // `prev` is not last, so it has a bound.
                    let prev_max = prev.max_notional.map_or(0, Price::wide);
                    if let Some(m) = s.max_notional
                        && m.wide() <= prev_max
                    {
                        return Err(bad(format!("tier {i}: tiers must be sorted by max_notional, ascending")));
                    }
                    prev.cum_e16 + prev_max * (s.mmr.wide() - prev.mmr.wide())
                }
            };
            out.push(Tier { max_notional: s.max_notional, imr: s.imr, mmr: s.mmr, cum_e16 });
        }
        Ok(Self(out))
    }

    pub fn tiers(&self) -> &[Tier] {
        &self.0
    }

    /// Index of the tier of a notional (exact, at 1e-16): the first whose bound is ≥ it.
    pub fn index_for(&self, notional_e16: i128) -> usize {
        self.0
            .iter()
            .position(|t| t.max_notional.is_none_or(|m| m.wide() * SCALE_I128 >= notional_e16))
            .unwrap_or(self.0.len().saturating_sub(1))
    }
}

/// Option contract terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OptionTerms {
    pub right: Right,
    pub strike: Price,
    pub margin: OptionMargin,
}

impl OptionTerms {
    /// Validates option margin parameters: `0 < mm ≤ im_min ≤ im_max ≤ 1`.
    pub fn validate(margin: &OptionMargin) -> Result<(), Rejection> {
        let m = margin;
        if m.mm.0 > 0 && m.mm <= m.im_min && m.im_min <= m.im_max && m.im_max <= Rate::ONE {
            Ok(())
        } else {
            Err(reject(Reason::InvalidReference, "option margin must satisfy 0 < mm <= im_min <= im_max <= 1"))
        }
    }

    /// Payoff per unit at an underlying price, at 1e-8.
    pub fn payoff(&self, underlying: Price) -> i128 {
        match self.right {
            Right::Call => (underlying.wide() - self.strike.wide()).max(0),
            Right::Put => (self.strike.wide() - underlying.wide()).max(0),
        }
    }
}

/// The figures one position contributes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PositionFigures {
    /// What the position adds to equity: unrealized PnL for perps/futures, `q × m` for options.
    pub value: Amount,
    /// `q × p − cost`, rounded down.
    pub unrealized_pnl: Amount,
    pub initial_margin: Amount,
    pub maintenance_margin: Amount,
}

/// `(a × b + c) / d` exactly, rounded once; saturates (conservatively for the caller) only past `i128`.
#[inline]
fn mul_add_div(a: i128, b: i128, c: i128, d: i128, round: Round) -> i128 {
    if let Some(x) = checked_mul(a, b).and_then(|p| p.checked_add(c)) {
        // d > 0 (callers pass a positive scale): a division that cannot fail.
        return div(x, d, round).expect("invariant: x / d with d > 0 and x an i128 is an i128");
    }
    let x = I256::from(a) * I256::from(b) + I256::from(c);
    let q = match round {
        Round::Ceil => -((-x).div_euclid(I256::from(d))),
        _ => x.div_euclid(I256::from(d)),
    };
    i128::try_from(q).unwrap_or(if q > I256::ZERO { i128::MAX } else { i128::MIN })
}

/// `a × b × c / d` exactly, rounded once (`d > 0`).
#[inline]
fn mul3_div(a: i128, b: i128, c: i128, d: i128, round: Round) -> i128 {
    if let Some(p) = checked_mul(a, b).and_then(|p| checked_mul(p, c)) {
        return div(p, d, round).expect("invariant: p / d with d > 0 and p an i128 is an i128");
    }
    let x = I256::from(a) * I256::from(b) * I256::from(c);
    let q = match round {
        Round::Ceil => -((-x).div_euclid(I256::from(d))),
        _ => x.div_euclid(I256::from(d)),
    };
    i128::try_from(q).unwrap_or(if q > I256::ZERO { i128::MAX } else { i128::MIN })
}

/// Unrealized PnL `q × p − cost`, rounded down, at 1e-8.
#[inline]
pub fn unrealized_pnl(q: Qty, cost_e16: i128, mark: Price) -> Amount {
    Amount(e16_to_e8(q.wide() * mark.wide() - cost_e16, Round::Floor))
}

/// Figures of a perp or future position: `IM = N × imrₜ`, `MM = N × mmrₜ − cumₜ`, tier by notional `N = |q| × p`.
/// What a position adds to equity and its unrealized PnL, without its margin (a position in a portfolio group is
/// margined by its group): the `value` and `unrealized_pnl` of [`linear_figures`] or [`option_figures`].
pub fn position_value(q: Qty, cost_e16: i128, mark: Price, is_option: bool) -> PositionFigures {
    let upnl = unrealized_pnl(q, cost_e16, mark);
    let value = if is_option { Amount(e16_to_e8(q.wide() * mark.wide(), Round::Floor)) } else { upnl };
    PositionFigures { value, unrealized_pnl: upnl, ..Default::default() }
}

pub fn linear_figures(q: Qty, cost_e16: i128, mark: Price, tiers: &Tiers) -> PositionFigures {
    linear::<true>(q, cost_e16, mark, tiers)
}

/// [`linear_figures`] without the initial margin (left at zero): what a stress test needs, one division less.
#[inline]
pub fn linear_value_mm(q: Qty, cost_e16: i128, mark: Price, tiers: &Tiers) -> PositionFigures {
    linear::<false>(q, cost_e16, mark, tiers)
}

#[inline]
fn linear<const IM: bool>(q: Qty, cost_e16: i128, mark: Price, tiers: &Tiers) -> PositionFigures {
    let upnl = unrealized_pnl(q, cost_e16, mark);
    if q.0 == 0 {
        return PositionFigures { value: upnl, unrealized_pnl: upnl, ..Default::default() };
    }
    let notional_e16 = q.wide().abs() * mark.wide();
    let t = tiers.0[tiers.index_for(notional_e16)];
    let im = if IM { mul_div(notional_e16, t.imr.wide(), SCALE2, Round::Ceil).unwrap_or(i128::MAX) } else { 0 };
    let mm = mul_add_div(notional_e16, t.mmr.wide(), -(t.cum_e16 * SCALE_I128), SCALE2, Round::Ceil);
    PositionFigures { value: upnl, unrealized_pnl: upnl, initial_margin: Amount(im), maintenance_margin: Amount(mm) }
}

/// A position's value and its maintenance margin before the margin's one rounding: `MM = ⌈mm_e24 / 1e16⌉` (see
/// [`mm_from_e24`]). Summing the unrounded figures of a unit's positions bounds its MM without dividing each
/// (`Σ ⌈yᵢ / 1e16⌉` lies in `[Σ yᵢ / 1e16, Σ yᵢ / 1e16 + n)`): a stress test decides most units' liquidation that
/// way and rounds only where the bound cannot tell.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValueMm {
    pub value: Amount,
    /// [`MM_E24_UNKNOWN`] when the unrounded margin does not fit `i128` (the exact figure then comes from
    /// [`linear_value_mm`] or [`option_figures`]).
    pub mm_e24: i128,
}

/// An unrounded margin that does not fit `i128`: `i128::MIN`, which no margin that fits can be (its magnitude
/// would be 2^127).
pub const MM_E24_UNKNOWN: i128 = i128::MIN;

/// The maintenance margin of unrounded figure `mm_e24`: rounded up, as every margin.
pub fn mm_from_e24(mm_e24: i128) -> Amount {
    Amount(div(mm_e24, SCALE2, Round::Ceil).expect("invariant: a division by 1e16 always has a quotient"))
}

/// [`linear_value_mm`]'s value, and its MM unrounded: `N × mmrₜ − cumₜ` at 1e-24.
pub fn linear_value_mm_e24(q: Qty, cost_e16: i128, mark: Price, tiers: &Tiers) -> ValueMm {
    let value = unrealized_pnl(q, cost_e16, mark);
    if q.0 == 0 {
        return ValueMm { value, mm_e24: 0 };
    }
    let notional_e16 = q.wide().abs() * mark.wide();
    let t = tiers.0[tiers.index_for(notional_e16)];
    // The same figure `linear` divides, formed the same way.
    let mm_e24 = checked_mul(notional_e16, t.mmr.wide()).and_then(|p| p.checked_add(-(t.cum_e16 * SCALE_I128)));
    ValueMm { value, mm_e24: mm_e24.filter(|y| *y != MM_E24_UNKNOWN).unwrap_or(MM_E24_UNKNOWN) }
}

/// A tier table scaled once for valuing many positions of one instrument (a stress pass): each tier's bound at
/// 1e-16 (the last one unbounded, as [`Tiers::index_for`] treats it) and its maintenance amount at 1e-24, so that
/// [`linear_value_mm_e24_scaled`] scales nothing per position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaledTiers(Box<[ScaledTier]>);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ScaledTier {
    /// `max_notional × 1e8`; `i128::MAX` for the last tier.
    bound_e16: i128,
    mmr: i128,
    /// `−cumₜ × 1e8`.
    neg_cum_e24: i128,
}

impl ScaledTiers {
    /// `None` if a maintenance amount at 1e-24 does not fit `i128` (then value with [`linear_value_mm_e24`]).
    pub fn new(tiers: &Tiers) -> Option<Self> {
        let last = tiers.0.len().checked_sub(1)?;
        tiers
            .0
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let bound_e16 = match t.max_notional {
                    Some(m) if i < last => m.wide() * SCALE_I128,
                    _ => i128::MAX,
                };
                let neg_cum_e24 = checked_mul(t.cum_e16, SCALE_I128)?.checked_neg()?;
                Some(ScaledTier { bound_e16, mmr: t.mmr.wide(), neg_cum_e24 })
            })
            .collect::<Option<Box<[_]>>>()
            .map(Self)
    }
}

/// [`linear_value_mm_e24`] with the tiers scaled once: the same figures, bit for bit.
#[inline]
pub fn linear_value_mm_e24_scaled(q: Qty, cost_e16: i128, mark: Price, tiers: &ScaledTiers) -> ValueMm {
    let value = unrealized_pnl(q, cost_e16, mark);
    if q.0 == 0 {
        return ValueMm { value, mm_e24: 0 };
    }
    let notional_e16 = q.wide().abs() * mark.wide();
    // The last tier's bound is i128::MAX: the search always stops.
    let t = tiers.0.iter().find(|t| t.bound_e16 >= notional_e16).unwrap_or(&tiers.0[tiers.0.len() - 1]);
    // A rate is at most 1 (1e8 < 2^27): a notional below 2^100 keeps the product below 2^127.
    let product = if notional_e16 >> 100 == 0 { Some(notional_e16 * t.mmr) } else { checked_mul(notional_e16, t.mmr) };
    let mm_e24 = product.and_then(|p| p.checked_add(t.neg_cum_e24));
    ValueMm { value, mm_e24: mm_e24.filter(|y| *y != MM_E24_UNKNOWN).unwrap_or(MM_E24_UNKNOWN) }
}

/// [`option_figures`]' value, and its MM unrounded: `|q| × (mm × U + m)` at 1e-24 for a short, zero for a long.
pub fn option_value_mm_e24(q: Qty, mark: Price, underlying: Price, terms: &OptionTerms) -> ValueMm {
    let value = Amount(e16_to_e8(q.wide() * mark.wide(), Round::Floor));
    if q.0 >= 0 {
        return ValueMm { value, mm_e24: 0 };
    }
    let mm_inner_e16 = terms.margin.mm.wide() * underlying.wide() + mark.wide() * SCALE_I128;
    let mm_e24 = checked_mul(q.wide().abs(), mm_inner_e16);
    ValueMm { value, mm_e24: mm_e24.filter(|y| *y != MM_E24_UNKNOWN).unwrap_or(MM_E24_UNKNOWN) }
}

/// Figures of an option position: longs need no margin; a short needs
/// `IM = |q| × (max(im_max × U − OTM, im_min × U) + m)` and `MM = |q| × (mm × U + m)`.
pub fn option_figures(q: Qty, cost_e16: i128, mark: Price, underlying: Price, terms: &OptionTerms) -> PositionFigures {
    let value = Amount(e16_to_e8(q.wide() * mark.wide(), Round::Floor));
    let upnl = unrealized_pnl(q, cost_e16, mark);
    if q.0 >= 0 {
        return PositionFigures { value, unrealized_pnl: upnl, ..Default::default() };
    }
    let u = underlying.wide();
    let otm = match terms.right {
        Right::Call => (terms.strike.wide() - u).max(0),
        Right::Put => (u - terms.strike.wide()).max(0),
    };
    let m = terms.margin;
    let im_inner_e16 = (m.im_max.wide() * u - otm * SCALE_I128).max(m.im_min.wide() * u) + mark.wide() * SCALE_I128;
    let mm_inner_e16 = m.mm.wide() * u + mark.wide() * SCALE_I128;
    let aq = q.wide().abs();
    let im = mul_div(aq, im_inner_e16, SCALE2, Round::Ceil).unwrap_or(i128::MAX);
    let mm = mul_div(aq, mm_inner_e16, SCALE2, Round::Ceil).unwrap_or(i128::MAX);
    PositionFigures { value, unrealized_pnl: upnl, initial_margin: Amount(im), maintenance_margin: Amount(mm) }
}

/// Value of a non-quote collateral balance: `x × P × (1 − h)` if positive, `x × P` if negative, rounded down.
pub fn collateral_value(balance: Amount, price: Price, haircut: Rate) -> Amount {
    if balance.0 >= 0 {
        Amount(mul3_div(balance.0, price.wide(), SCALE_I128 - haircut.wide(), SCALE2, Round::Floor))
    } else {
        Amount(mul_add_div(balance.0, price.wide(), 0, SCALE_I128, Round::Floor))
    }
}

/// Funding credit to a position's holder: `−q × p × rate`, rounded down.
pub fn funding_credit(q: Qty, mark: Price, rate: Rate) -> Amount {
    Amount(mul3_div(-q.wide(), mark.wide(), rate.wide(), SCALE2, Round::Floor))
}

/// A credit at 1e-16 (realized PnL, premium, settlement) rounded down to 1e-8.
pub fn credit_from_e16(x_e16: i128) -> Amount {
    Amount(e16_to_e8(x_e16, Round::Floor))
}

/// A position after a fill under average-entry accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FillOutcome {
    pub qty: Qty,
    pub cost_e16: i128,
    /// `closed_qty × price − released cost`, exact at 1e-16 (zero when the fill only adds).
    pub realized_e16: i128,
}

/// Applies a signed fill to a position `(q, cost)`: adding accumulates cost; reducing releases the same fraction
/// of the cost and realizes the difference; a flip closes the position whole and opens the rest at the fill price.
/// `None` if the new quantity leaves the representable range.
pub fn apply_fill(q: Qty, cost_e16: i128, dq: Qty, price: Price) -> Option<FillOutcome> {
    let new_q = q.0.checked_add(dq.0).filter(|v| *v != i64::MIN)?;
    if q.0 == 0 || (q.0 > 0) == (dq.0 > 0) {
        let cost = cost_e16.checked_add(dq.wide() * price.wide())?;
        return Some(FillOutcome { qty: Qty(new_q), cost_e16: cost, realized_e16: 0 });
    }
    let closed = dq.wide().abs().min(q.wide().abs());
    // The fraction of the cost released by closing `closed` of `|q|`; exact when the whole position closes.
    let released = mul_div(cost_e16, closed, q.wide().abs(), Round::Nearest)?;
    let closed_signed = if q.0 > 0 { closed } else { -closed };
    let realized = closed_signed * price.wide() - released;
    let cost = if (new_q > 0) == (q.0 > 0) && new_q != 0 {
        cost_e16 - released
    } else {
        // Closed whole; a remainder opens at the fill price.
        i128::from(new_q) * price.wide()
    };
    Some(FillOutcome { qty: Qty(new_q), cost_e16: cost, realized_e16: realized })
}

/// Average entry price `cost / q`, to nearest; `None` for a flat position.
pub fn entry_price(q: Qty, cost_e16: i128) -> Option<Price> {
    if q.0 == 0 {
        return None;
    }
    mul_div(cost_e16, 1, q.wide(), Round::Nearest).and_then(|v| i64::try_from(v).ok()).map(Price)
}

/// dYdX's `MMR > NC`: liquidatable when there is a maintenance requirement and equity is below it.
pub fn is_liquidatable(equity: Amount, maintenance_margin: Amount) -> bool {
    maintenance_margin.0 > 0 && equity < maintenance_margin
}

/// The mark at which the equity of the position's margin unit equals its maintenance margin, every other price
/// fixed, using the tier that applies there: `p* = (E₀ − q p₀ − MM_others + cumₜ) / (|q| mmrₜ − q)`.
/// `equity` is the unit's equity today at `mark`; `mm_others` the maintenance margin of everything else in it.
pub fn liquidation_price(equity: Amount, q: Qty, mark: Price, mm_others: Amount, tiers: &Tiers) -> Option<Price> {
    if q.0 == 0 {
        return None;
    }
    let qa = I256::from(q.wide().abs());
    let scale = I256::from(SCALE_I128);
    let base = (I256::from(equity.0) - I256::from(mm_others.0)) * scale - I256::from(q.wide() * mark.wide());
    let mut lower: Option<I256> = Some(I256::ZERO);
    for t in &tiers.0 {
        let upper = t.max_notional.map(|m| I256::from(m.wide()));
        let num = base + I256::from(t.cum_e16);
        let den = qa * I256::from(t.mmr.wide()) - I256::from(q.wide()) * scale;
        if den != I256::ZERO {
            // Normalise to a positive denominator, then p* = num / den must be > 0 and its notional
            // N = |q| × p* (at 1e-8: |q|_e8 × num / den) must lie in (lower, upper].
            let (num, den) = if den < I256::ZERO { (-num, -den) } else { (num, den) };
            let n_times_den = qa * num;
            let above = lower.is_none_or(|l| n_times_den > l * den);
            let below = upper.is_none_or(|u| n_times_den <= u * den);
            if num > I256::ZERO && above && below {
                let p = div_nearest_i256(num * scale, den);
                return i64::try_from(p).ok().filter(|v| *v > 0).map(Price);
            }
        }
        lower = upper;
    }
    None
}

fn div_nearest_i256(n: I256, d: I256) -> I256 {
    // n, d > 0 here.
    (n * 2 + d).div_euclid(d * 2)
}

/// The mark at which the unit's equity is zero: `p_b = p₀ − E₀ / q`; `None` if `p_b ≤ 0`.
pub fn bankruptcy_price(equity: Amount, q: Qty, mark: Price) -> Option<Price> {
    if q.0 == 0 {
        return None;
    }
    let n = I256::from(mark.wide()) * I256::from(q.wide()) - I256::from(equity.0) * I256::from(SCALE_I128);
    let d = I256::from(q.wide());
    let (n, d) = if d < I256::ZERO { (-n, -d) } else { (n, d) };
    if n <= I256::ZERO {
        return None;
    }
    i64::try_from(div_nearest_i256(n, d)).ok().filter(|v| *v > 0).map(Price)
}

/// Margin figures of one unit (the cross account or an isolated position) for the pre-trade rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnitFigures {
    pub equity: Amount,
    pub initial_margin: Amount,
    pub maintenance_margin: Amount,
}

impl UnitFigures {
    pub fn available(&self) -> Amount {
        self.equity.saturating_sub(self.initial_margin)
    }
}

/// The pre-trade rule: allowed if the unit meets initial margin afterwards, or if the fill does not add risk
/// (`MM_after ≤ MM_before` and `equity_after × MM_before ≥ equity_before × MM_after`).
pub fn pretrade_allowed(before: &UnitFigures, after: &UnitFigures) -> bool {
    if after.equity >= after.initial_margin {
        return true;
    }
    let mm_b = before.maintenance_margin.0;
    let mm_a = after.maintenance_margin.0;
    mm_a <= mm_b && I256::from(after.equity.0) * I256::from(mm_b) >= I256::from(before.equity.0) * I256::from(mm_a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn px(s: &str) -> Price {
        Price::parse(s).unwrap()
    }
    fn rate(s: &str) -> Rate {
        Rate::parse(s).unwrap()
    }
    fn amt(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }
    fn qty(s: &str) -> Qty {
        Qty::parse(s).unwrap()
    }
    fn tiers(rows: &[(Option<&str>, &str, &str)]) -> Tiers {
        let specs: Vec<TierSpec> =
            rows.iter().map(|(m, i, mm)| TierSpec { max_notional: m.map(px), imr: rate(i), mmr: rate(mm) }).collect();
        Tiers::new(&specs).unwrap()
    }
    fn binance() -> Tiers {
        tiers(&[
            (Some("50000"), "0.008", "0.004"),
            (Some("250000"), "0.01", "0.005"),
            (Some("1000000"), "0.02", "0.01"),
            (Some("10000000"), "0.05", "0.025"),
            (None, "0.1", "0.05"),
        ])
    }
    fn cost(q: &str, p: &str) -> i128 {
        qty(q).wide() * px(p).wide()
    }

    #[test]
    fn maintenance_amounts_match_binance() {
        // Proves the derived cum of Binance's BTCUSDT brackets: 0, 50, 1 300, 16 300.
        let cums: Vec<i128> = binance().tiers().iter().map(|t| t.cum_e16 / SCALE2).collect();
        assert_eq!(cums, vec![0, 50, 1300, 16300, 16300 + 10_000_000 * 25 / 1000]);
    }

    #[test]
    fn tier_boundaries_are_inclusive_and_mm_continuous() {
        // Proves a notional equal to a bound stays in that tier, and MM is continuous across the bound.
        let t = binance();
        let at = linear_figures(qty("1"), cost("1", "50000"), px("50000"), &t);
        assert_eq!(at.maintenance_margin, amt("200"));
        assert_eq!(at.initial_margin, amt("400"));
        let above = linear_figures(qty("1"), cost("1", "50000"), px("50000.00000001"), &t);
        assert_eq!(above.initial_margin, amt("500.00000001"));
        // 50000.00000001 × 0.005 − 50 = 200.00000000005 → rounds up.
        assert_eq!(above.maintenance_margin, amt("200.00000001"));
        let big = linear_figures(qty("10"), cost("10", "50000"), px("50000"), &t);
        assert_eq!(big.maintenance_margin, amt("3700"));
    }

    #[test]
    fn tiers_are_validated() {
        // Proves unsorted tiers, out-of-bounds or decreasing rates and a bound-less middle tier are refused.
        let bad: [&[(Option<&str>, &str, &str)]; 5] = [
            &[(Some("100"), "0.1", "0.05"), (Some("50"), "0.2", "0.1")],
            &[(None, "0.1", "0.2")],
            &[(None, "1.1", "0.5")],
            &[(Some("100"), "0.2", "0.1"), (None, "0.1", "0.1")],
            &[(None, "0.1", "0.05"), (Some("100"), "0.2", "0.1")],
        ];
        for rows in bad {
            let specs: Vec<TierSpec> = rows
                .iter()
                .map(|(m, i, mm)| TierSpec { max_notional: m.map(px), imr: rate(i), mmr: rate(mm) })
                .collect();
            assert_eq!(Tiers::new(&specs).map_err(|r| r.reason), Err(Reason::InvalidReference), "{rows:?}");
        }
    }

    #[test]
    fn option_standard_margin_deribit_check() {
        // Proves the worked check: U = 60 000, short 1 call K = 70 000, m = 600 → IM 6 600, MM 5 100.
        let terms = OptionTerms { right: Right::Call, strike: px("70000"), margin: OptionMargin::default() };
        let f = option_figures(qty("-1"), cost("-1", "600"), px("600"), px("60000"), &terms);
        assert_eq!(f.initial_margin, amt("6600"));
        assert_eq!(f.maintenance_margin, amt("5100"));
        assert_eq!(f.value, amt("-600"));
        // In the money (U = 80 000): OTM 0, IM = 0.15 × 80 000 + m.
        let itm = option_figures(qty("-1"), cost("-1", "600"), px("10500"), px("80000"), &terms);
        assert_eq!(itm.initial_margin, amt("22500"));
        assert_eq!(itm.maintenance_margin, amt("16500"));
        // A put out of the money at U = 60 000, K = 50 000: max(9000 − 10000, 6000) + 100.
        let put = OptionTerms { right: Right::Put, strike: px("50000"), margin: OptionMargin::default() };
        let p = option_figures(qty("-2"), cost("-2", "100"), px("100"), px("60000"), &put);
        assert_eq!(p.initial_margin, amt("12200"));
        // A long needs nothing and counts its mark value.
        let long = option_figures(qty("2"), cost("2", "100"), px("150"), px("60000"), &put);
        assert_eq!(
            (long.initial_margin, long.maintenance_margin, long.value),
            (Amount::ZERO, Amount::ZERO, amt("300"))
        );
        assert_eq!(long.unrealized_pnl, amt("100"));
    }

    #[test]
    fn haircuts_apply_to_positive_balances_only() {
        // Proves BIT's example (3.136088934 BTC → 115 241.3204; at our 8 places 3.13608893 → 115 241.32024123).
        let v = collateral_value(amt("3.13608893"), px("37496.76318"), rate("0.02"));
        assert_eq!(v, amt("115241.32024123"));
        assert_eq!(collateral_value(amt("-2"), px("100.5"), rate("0.5")), amt("-201"));
        // Rounded down on both signs.
        assert_eq!(collateral_value(amt("0.00000001"), px("0.5"), Rate::ZERO), Amount::ZERO);
        assert_eq!(collateral_value(amt("-0.00000001"), px("0.5"), Rate::ZERO), amt("-0.00000001"));
    }

    #[test]
    fn average_entry_and_flip() {
        // Proves adding averages the entry, reducing realizes against it, and a flip reopens at the fill price.
        let f1 = apply_fill(Qty::ZERO, 0, qty("2"), px("100")).unwrap();
        let f2 = apply_fill(f1.qty, f1.cost_e16, qty("2"), px("110")).unwrap();
        assert_eq!(entry_price(f2.qty, f2.cost_e16), Some(px("105")));
        let f3 = apply_fill(f2.qty, f2.cost_e16, qty("-1"), px("120")).unwrap();
        assert_eq!(credit_from_e16(f3.realized_e16), amt("15"));
        assert_eq!(entry_price(f3.qty, f3.cost_e16), Some(px("105")));
        let flip = apply_fill(f3.qty, f3.cost_e16, qty("-5"), px("90")).unwrap();
        assert_eq!(flip.qty, qty("-2"));
        assert_eq!(credit_from_e16(flip.realized_e16), amt("-45"));
        assert_eq!(entry_price(flip.qty, flip.cost_e16), Some(px("90")));
        let close = apply_fill(flip.qty, flip.cost_e16, qty("2"), px("80")).unwrap();
        assert_eq!((close.qty, close.cost_e16), (Qty::ZERO, 0));
        assert_eq!(credit_from_e16(close.realized_e16), amt("20"));
    }

    #[test]
    fn liquidation_prices_of_published_cases() {
        // Proves dYdX's isolated short (3 174.60), Drift's long (23.6842) and BitMEX's Karen (505.05 / 500).
        let one = |imr: &str, mmr: &str| tiers(&[(None, imr, mmr)]);
        let t = one("0.1", "0.05");
        assert_eq!(liquidation_price(amt("1000"), qty("-3"), px("3000"), Amount::ZERO, &t), Some(px("3174.6031746")));
        assert_eq!(bankruptcy_price(amt("1000"), qty("-3"), px("3000")), Some(px("3333.33333333")));
        assert_eq!(liquidation_price(amt("500"), qty("200"), px("25"), Amount::ZERO, &t), Some(px("23.68421053")));
        let k = one("0.02", "0.01");
        assert_eq!(liquidation_price(amt("10000"), qty("20"), px("1000"), Amount::ZERO, &k), Some(px("505.05050505")));
        assert_eq!(bankruptcy_price(amt("10000"), qty("20"), px("1000")), Some(px("500")));
        // A long that cannot be liquidated above zero: no price.
        assert_eq!(liquidation_price(amt("1000"), qty("1"), px("500"), Amount::ZERO, &t), None);
        assert_eq!(bankruptcy_price(amt("1000"), qty("1"), px("500")), None);
    }

    #[test]
    fn liquidation_price_is_tier_aware() {
        // Proves the tier at p* is used: a 10 BTC long whose liquidation notional lands in the 1M bracket.
        let t = binance();
        let q = qty("10");
        let f = linear_figures(q, cost("10", "50000"), px("50000"), &t);
        let e = amt("30000");
        let p = liquidation_price(e, q, px("50000"), Amount::ZERO, &t).unwrap();
        // At p*, equity = MM (within rounding): 30000 + 10 × (p − 50000) = 10 × p × 0.005 − 50.
        let eq = e.0 + q.wide() * (p.wide() - px("50000").wide()) / SCALE_I128;
        let mm = linear_figures(q, cost("10", "50000"), p, &t).maintenance_margin.0;
        assert!((eq - mm).abs() < 20, "eq {eq} mm {mm} at {p}");
        assert!(p.wide() * 10 > px("250000").wide() && p.wide() * 10 <= px("1000000").wide());
        assert_eq!(p, px("47343.43434343"));
        assert!(f.maintenance_margin > Amount::ZERO);
    }

    #[test]
    fn pretrade_rule() {
        // Proves the IM rule and dYdX's reduce-risk exception.
        let u = |e: &str, i: &str, m: &str| UnitFigures {
            equity: amt(e),
            initial_margin: amt(i),
            maintenance_margin: amt(m),
        };
        assert!(pretrade_allowed(&u("100", "0", "0"), &u("100", "100", "50")));
        assert!(!pretrade_allowed(&u("100", "0", "0"), &u("99", "100", "50")));
        // Undercollateralised, the fill halves the position: MM halves, equity ratio holds.
        assert!(pretrade_allowed(&u("40", "100", "50"), &u("40", "50", "25")));
        // Undercollateralised and adding: refused.
        assert!(!pretrade_allowed(&u("40", "100", "50"), &u("39", "150", "75")));
    }

    #[test]
    fn funding_direction() {
        // Proves longs pay and shorts receive when the rate is positive, rounded toward the house.
        assert_eq!(funding_credit(qty("2"), px("100"), rate("0.001")), amt("-0.2"));
        assert_eq!(funding_credit(qty("-2"), px("100"), rate("0.001")), amt("0.2"));
        assert_eq!(funding_credit(qty("1"), px("0.00000003"), rate("0.5")), amt("-0.00000002"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// The unrounded margin, rounded up, is the margin the exact functions compute; and a unit's margins sum
        /// within the bound stress tests rely on. (Quantities to 44 000 units, prices to 2.8 million: every
        /// product fits; past `i128` see the test below.)
        #[test]
        fn unrounded_margin_rounds_to_the_exact_one(
            q in -(1i64 << 42)..(1i64 << 42),
            entry in 1i64..(1i64 << 48),
            mark in 1i64..(1i64 << 48),
            index in 1i64..(1i64 << 48),
            strike in 1i64..(1i64 << 48),
            call in proptest::bool::ANY,
        ) {
            let (q, mark) = (Qty(q), Price(mark));
            let cost = q.wide() * i128::from(entry);
            let lin = linear_value_mm_e24(q, cost, mark, &binance());
            let exact = linear_value_mm(q, cost, mark, &binance());
            proptest::prop_assert_eq!(lin.value, exact.value);
            proptest::prop_assert_eq!(mm_from_e24(lin.mm_e24), exact.maintenance_margin);
            let terms = OptionTerms {
                right: if call { Right::Call } else { Right::Put },
                strike: Price(strike),
                margin: OptionMargin::default(),
            };
            let opt = option_value_mm_e24(q, mark, Price(index), &terms);
            let exact_opt = option_figures(q, cost, mark, Price(index), &terms);
            proptest::prop_assert_eq!(opt.value, exact_opt.value);
            proptest::prop_assert_eq!(mm_from_e24(opt.mm_e24), exact_opt.maintenance_margin);
            let (y1, y2) = (lin.mm_e24, opt.mm_e24);
            let sum = exact.maintenance_margin.0 + exact_opt.maintenance_margin.0;
            let (ys, scaled) = (y1.checked_add(y2), sum.checked_mul(SCALE2));
            if let (Some(ys), Some(scaled)) = (ys, scaled) {
                proptest::prop_assert!(scaled >= ys && scaled - ys < 2 * SCALE2, "{scaled} against {ys}");
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(4096))]

        /// Tiers scaled once give the figures of the tiers as they are, bit for bit: every tier, notionals past
        /// `i128` at 1e-24, a last tier with a bound and without one.
        #[test]
        fn scaled_tiers_value_as_the_tiers(
            q in proptest::prop_oneof![-(1i64 << 42)..(1i64 << 42), proptest::num::i64::ANY],
            entry in 1i64..(1i64 << 48),
            mark in proptest::prop_oneof![1i64..(1i64 << 48), 1i64..i64::MAX],
            bounded_last in proptest::bool::ANY,
        ) {
            let table = if bounded_last {
                tiers(&[(Some("50000"), "0.01", "0.005"), (Some("250000"), "1", "1")])
            } else {
                binance()
            };
            let scaled = ScaledTiers::new(&table).ok_or_else(|| proptest::test_runner::TestCaseError::fail("scaled"))?;
            let (q, mark) = (Qty(q), Price(mark));
            let cost = q.wide().saturating_mul(i128::from(entry));
            proptest::prop_assert_eq!(
                linear_value_mm_e24_scaled(q, cost, mark, &scaled),
                linear_value_mm_e24(q, cost, mark, &table)
            );
        }
    }

    #[test]
    fn unrounded_margin_is_none_past_i128() {
        let huge = Qty(i64::MAX);
        let lin = linear_value_mm_e24(huge, 0, Price(i64::MAX), &binance());
        assert_eq!(lin.mm_e24, MM_E24_UNKNOWN);
        let terms = OptionTerms { right: Right::Put, strike: Price(1), margin: OptionMargin::default() };
        assert_eq!(
            option_value_mm_e24(Qty(-i64::MAX), Price(i64::MAX), Price(i64::MAX), &terms).mm_e24,
            MM_E24_UNKNOWN
        );
    }
}
