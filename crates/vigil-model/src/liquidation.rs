//! Liquidation fills and the insurance fund (contract v2, `liquidation.md`): the bankruptcy price of a partial
//! close (the unit's equity shared among its positions by maintenance margin, dYdX's formula), the liquidation
//! surplus and its capped fee, the deficit the fund pays, and what the fund could not cover.
//!
//! Pure functions on exact integers: the bankruptcy price and the fund delta are exact fractions (256-bit
//! intermediates), rounded once each, in the house's favour (the fee down, a deficit up).

use ethnum::I256;

use crate::num::{Amount, Price, Qty, Rate, Round, SCALE_I128, div_wide};

/// The default `max_liquidation_fee`: 1.5% of the closed notional (dYdX v4).
pub const MAX_LIQUIDATION_FEE: Rate = Rate(1_500_000);

/// What the rule needs from the position's margin unit (the cross account or the isolated position), taken before
/// the fill, and the fill.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiquidationFill {
    /// The unit's equity `E`.
    pub equity: Amount,
    /// The unit's standard maintenance margin `MM_u` (the sum of its positions' standard MM, options included).
    pub unit_mm: Amount,
    /// The position's standard maintenance margin `MM_p`.
    pub position_mm: Amount,
    /// The position `q` (signed) and its mark `p`.
    pub qty: Qty,
    pub mark: Price,
    /// The part closed `Δ` (same sign as `q`, `|Δ| ≤ |q|`) and the fill's price `f`.
    pub closed: Qty,
    pub price: Price,
    /// `max_liquidation_fee` in force.
    pub max_fee: Rate,
}

/// What a liquidation fill moves: exactly one of `fee` (the unit pays the fund) and `deficit` (the fund pays the
/// unit) is non-zero, unless the fill lands exactly on the bankruptcy price.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LiquidationOutcome {
    /// `b` rounded to nearest; `None` when it is not a positive representable price.
    pub bankruptcy_price: Option<Price>,
    /// `min(D, max_fee × |Δ| × f)` rounded down, when `D ≥ 0`.
    pub fee: Amount,
    /// `|D|` rounded up, when `D < 0`.
    pub deficit: Amount,
}

/// Why a fill cannot be a liquidation of the position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiquidationError {
    /// The fill does not reduce the position: no position, the other side, or more than it holds.
    NotReducing,
    /// A figure does not fit (beyond the model's range).
    OutOfRange,
}

/// The outcome of a liquidation fill (`liquidation.md`, "The rule for a liquidation fill").
///
/// With `MM_Δ = MM_p × |Δ| / |q|`, the bankruptcy price is `b = p − (E × MM_Δ / MM_u) / Δ`, which simplifies to
/// `p − sign(q) × E × MM_p / (|q| × MM_u)` (the closed part's share of the equity per unit is the same for any
/// `Δ`); when `MM_u = 0`, `b = p − E / Δ`. The fund delta is `D = (f − b) × Δ`: at 1e-8,
/// `D = ((f − p) × Δ × |q| × MM_u + |Δ| × E × MM_p × 1e8) / (1e8 × |q| × MM_u)`, or `(f − p) × Δ / 1e8 + E`.
pub fn liquidation_outcome(fill: &LiquidationFill) -> Result<LiquidationOutcome, LiquidationError> {
    let (q, delta) = (fill.qty.wide(), fill.closed.wide());
    if q == 0 || delta == 0 || (q > 0) != (delta > 0) || delta.abs() > q.abs() {
        return Err(LiquidationError::NotReducing);
    }
    let wide = |x: i128| I256::from(x);
    let scale = wide(SCALE_I128);
    let (e, mm_u, mm_p) = (wide(fill.equity.raw()), wide(fill.unit_mm.raw()), wide(fill.position_mm.raw()));
    let (p, f) = (wide(fill.mark.wide()), wide(fill.price.wide()));
    let sign = if q > 0 { I256::ONE } else { -I256::ONE };
    // b and D as fractions over positive denominators (prices and amounts at 1e-8).
    let (b_num, b_den, d_num, d_den) = if fill.unit_mm.raw() == 0 {
        // b = p − E × 1e8 / Δ; D = (f − p) × Δ / 1e8 + E.
        let (num, den) = (p * wide(delta) - e * scale, wide(delta));
        let (b_num, b_den) = if den < I256::ZERO { (-num, -den) } else { (num, den) };
        (b_num, b_den, (f - p) * wide(delta) + e * scale, scale)
    } else {
        if mm_u < I256::ZERO {
            return Err(LiquidationError::OutOfRange);
        }
        let den = wide(q.abs()) * mm_u;
        let b_num = p * den - sign * e * mm_p * scale;
        let d_num = (f - p) * wide(delta) * den + wide(delta.abs()) * e * mm_p * scale;
        (b_num, den, d_num, scale * den)
    };
    let bankruptcy_price =
        div_wide(b_num, b_den, Round::Nearest).and_then(|b| i64::try_from(b).ok()).filter(|b| *b > 0).map(Price);
    let d_floor = div_wide(d_num, d_den, Round::Floor).ok_or(LiquidationError::OutOfRange)?;
    if d_num >= I256::ZERO {
        // The cap, max_fee × |Δ| × f, at 1e-24 → 1e-8, down; floor(min(D, cap)) = min(floor D, floor cap).
        let cap = div_wide(wide(i128::from(fill.max_fee.raw())) * wide(delta.abs()) * f, scale * scale, Round::Floor)
            .ok_or(LiquidationError::OutOfRange)?;
        Ok(LiquidationOutcome { bankruptcy_price, fee: Amount(d_floor.min(cap)), deficit: Amount::ZERO })
    } else {
        // |D| rounded up is −floor(D).
        Ok(LiquidationOutcome { bankruptcy_price, fee: Amount::ZERO, deficit: Amount(-d_floor) })
    }
}

/// The insurance fund: one quote balance, and the totals the document reports. Its balance is a fold over the
/// stream's fund movements in offset order (`insurance` events, liquidation fees and deficits), so it is the same
/// whatever the shard count; an account's state never depends on it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct InsuranceFund {
    pub balance: Amount,
    /// Σ fees received from liquidation surpluses.
    pub fees: Amount,
    /// Σ deficits paid.
    pub paid: Amount,
    /// Σ of the parts of deficits the fund did not hold.
    pub uncovered: Amount,
}

/// Why an `insurance` event is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FundError {
    /// A withdrawal beyond the fund's positive balance.
    InsufficientBalance,
    /// The balance would leave the model's range.
    OutOfRange,
}

impl InsuranceFund {
    /// An `insurance` event: `amount` in (positive) or out (negative). A withdrawal may take at most the positive
    /// balance; nothing changes on a refusal.
    pub fn transfer(&mut self, amount: Amount) -> Result<(), FundError> {
        if amount.is_negative() && amount.raw().checked_neg().is_none_or(|out| out > self.balance.raw().max(0)) {
            return Err(FundError::InsufficientBalance);
        }
        self.balance = self.balance.checked_add(amount).ok_or(FundError::OutOfRange)?;
        Ok(())
    }

    /// A liquidation fill's movement: the fee in, or the deficit out. Returns the part of the deficit the fund
    /// did not hold (`|D| − min(|D|, max(0, balance before))`): positive means deleveraging. The balance may go
    /// negative (later `insurance` deposits refill it); it saturates at the model's range rather than refuse, so
    /// that a fill applied on a shard is never refused here.
    pub fn settle(&mut self, fee: Amount, deficit: Amount) -> Amount {
        let before = self.balance;
        self.fees = self.fees.saturating_add(fee);
        self.paid = self.paid.saturating_add(deficit);
        self.balance = self.balance.saturating_add(fee).saturating_sub(deficit);
        let covered = deficit.raw().min(before.raw().max(0));
        let uncovered = Amount(deficit.raw() - covered);
        self.uncovered = self.uncovered.saturating_add(uncovered);
        uncovered
    }
}

/// A position's auto-deleveraging score (`liquidation.md`, "Deleveraging"; Binance's ranking):
/// `pnl_ratio = unrealized_pnl / (|q| × entry)` and `leverage = |q| × mark / unit equity`; the score is
/// `pnl_ratio × leverage` when `pnl_ratio ≥ 0`, else `pnl_ratio / leverage`. `None` (left out of the queue) when the
/// unit's equity is not positive, or the position has no quantity, cost or mark.
///
/// With `|q| × entry = |cost|`, the score is `upnl × |q| × mark / (|cost| × E)` or `upnl × E / (|cost| × |q| ×
/// mark)`. A ranking, not money: computed in doubles (the same operations, hence the same bits, on every shard and
/// machine), each input converted once; equal scores are ordered by account id ([`adl_order`]).
pub fn adl_score(unrealized_pnl: Amount, qty: Qty, cost_e16: i128, mark: Price, unit_equity: Amount) -> Option<f64> {
    if unit_equity.raw() <= 0 || qty.0 == 0 || cost_e16 == 0 || mark.0 <= 0 {
        return None;
    }
    // Units cancel in the ranking: amounts at 1e-8, the cost at 1e-16, quantities and prices at 1e-8.
    let upnl = unrealized_pnl.raw() as f64 / 1e8;
    let notional = (cost_e16 as f64 / 1e16).abs();
    let q = (qty.0 as f64 / 1e8).abs();
    let mark = mark.0 as f64 / 1e8;
    let equity = unit_equity.raw() as f64 / 1e8;
    let pnl_ratio = upnl / notional;
    let leverage = q * mark / equity;
    let score = if pnl_ratio >= 0.0 { pnl_ratio * leverage } else { pnl_ratio / leverage };
    score.is_finite().then_some(score)
}

/// The ADL queue's order: highest score first, equal scores by account id.
pub fn adl_order(a: (f64, &str), b: (f64, &str)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then_with(|| a.1.cmp(b.1))
}

/// The rank bucket venues show as lights, 1 to 5: 5 for the first fifth of a queue of `len` (deleveraged first),
/// 1 for the last. `rank` counts from 0.
pub fn adl_bucket(rank: usize, len: usize) -> u8 {
    if len == 0 || rank >= len {
        return 1;
    }
    5 - (5 * rank / len) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Amount {
        Amount::parse(s).unwrap()
    }
    fn p(s: &str) -> Price {
        Price::parse(s).unwrap()
    }
    fn q(s: &str) -> Qty {
        Qty::parse(s).unwrap()
    }

    /// The ETH check: USDC −27 500, long 10 ETH, MMF 3%, mark 2 800 (equity 500 < MM 840).
    fn eth(closed: &str, price: &str) -> LiquidationOutcome {
        liquidation_outcome(&LiquidationFill {
            equity: a("500"),
            unit_mm: a("840"),
            position_mm: a("840"),
            qty: q("10"),
            mark: p("2800"),
            closed: q(closed),
            price: p(price),
            max_fee: MAX_LIQUIDATION_FEE,
        })
        .unwrap()
    }

    #[test]
    fn the_published_partial_close_checks() {
        // liquidation.md: bankruptcy price 2 750; at 2 780 the fee is 30.00; at 2 795 it is capped at 41.925
        // (1.5% of 2 795); at 2 745 the fund pays 5.00.
        let at_2780 = eth("1", "2780");
        assert_eq!(at_2780, LiquidationOutcome { bankruptcy_price: Some(p("2750")), fee: a("30"), deficit: a("0") });
        assert_eq!(eth("1", "2795").fee, a("41.925"));
        let at_2745 = eth("1", "2745");
        assert_eq!((at_2745.fee, at_2745.deficit), (a("0"), a("5")));
        // The bankruptcy price does not depend on how much is closed; closing all of it is v1's price.
        assert_eq!(eth("10", "2750").bankruptcy_price, Some(p("2750")));
        assert_eq!(
            crate::margin::bankruptcy_price(a("500"), q("10"), p("2800")),
            Some(p("2750")),
            "a unit of one position closed whole: v1's bankruptcy price"
        );
        // Exactly at the bankruptcy price: nothing moves.
        let at_b = eth("3", "2750");
        assert_eq!((at_b.fee, at_b.deficit), (a("0"), a("0")));
    }

    #[test]
    fn the_dydx_contract_loss_check() {
        // deposit 100, long 500 at 1.00, MMF 3%; mark 0.801 (equity 0.50 < MM 12.015); the whole position
        // liquidated at 0.77: bankruptcy price 0.80, the fund pays 15.00.
        let outcome = liquidation_outcome(&LiquidationFill {
            equity: a("0.5"),
            unit_mm: a("12.015"),
            position_mm: a("12.015"),
            qty: q("500"),
            mark: p("0.801"),
            closed: q("500"),
            price: p("0.77"),
            max_fee: MAX_LIQUIDATION_FEE,
        })
        .unwrap();
        assert_eq!(outcome, LiquidationOutcome { bankruptcy_price: Some(p("0.8")), fee: a("0"), deficit: a("15") });
        // With 1 000 in the fund: 985 left, nothing uncovered. With an empty fund: 15 uncovered.
        let mut fund = InsuranceFund::default();
        fund.transfer(a("1000")).unwrap();
        assert_eq!(fund.settle(outcome.fee, outcome.deficit), a("0"));
        assert_eq!(fund, InsuranceFund { balance: a("985"), fees: a("0"), paid: a("15"), uncovered: a("0") });
        let mut empty = InsuranceFund::default();
        assert_eq!(empty.settle(outcome.fee, outcome.deficit), a("15"));
        assert_eq!(empty, InsuranceFund { balance: a("-15"), fees: a("0"), paid: a("15"), uncovered: a("15") });
    }

    #[test]
    fn a_short_and_a_unit_of_several_positions_share_the_equity_by_maintenance_margin() {
        // A short of 4 at mark 100 in a unit with equity 30 and MM 60, of which the position's 20: its share of
        // the equity is 10, 2.5 per unit short, so b = 102.5; closing 2 (a buy) at 101 leaves a surplus of 3.
        let fill = LiquidationFill {
            equity: a("30"),
            unit_mm: a("60"),
            position_mm: a("20"),
            qty: q("-4"),
            mark: p("100"),
            closed: q("-2"),
            price: p("101"),
            max_fee: Rate(10_000_000),
        };
        let out = liquidation_outcome(&fill).unwrap();
        assert_eq!(out, LiquidationOutcome { bankruptcy_price: Some(p("102.5")), fee: a("3"), deficit: a("0") });
        // Capped: 10% of 2 × 101 is 20.2 > 3; at 1% the cap is 2.02.
        assert_eq!(liquidation_outcome(&LiquidationFill { max_fee: Rate(1_000_000), ..fill }).unwrap().fee, a("2.02"));
        // Above b: the fund pays (105 − 102.5) × 2 = 5.
        assert_eq!(liquidation_outcome(&LiquidationFill { price: p("105"), ..fill }).unwrap().deficit, a("5"));
    }

    /// One of a long 3 at mark 10 closed at `price`, in a unit of equity 1 whose MM (1) is all the position's.
    fn one_of_three(price: &str) -> LiquidationFill {
        LiquidationFill {
            equity: a("1"),
            unit_mm: a("1"),
            position_mm: a("1"),
            qty: q("3"),
            mark: p("10"),
            closed: q("1"),
            price: p(price),
            max_fee: MAX_LIQUIDATION_FEE,
        }
    }

    #[test]
    fn rounding_favours_the_house_and_no_maintenance_margin_uses_the_equity() {
        // E × MM_p / (|q| × MM_u) = 1 × 1 / (3 × 1) per unit: b = 10 − 1/3, D = (f − b) × Δ.
        let fill = one_of_three("9.5");
        let below = liquidation_outcome(&fill).unwrap();
        // D = (9.5 − 9.6666…) = −0.1666…: the deficit rounds up.
        assert_eq!((below.bankruptcy_price, below.deficit), (Some(p("9.66666667")), a("0.16666667")));
        let above =
            liquidation_outcome(&LiquidationFill { price: p("9.7"), max_fee: Rate(100_000_000), ..fill }).unwrap();
        // D = 0.0333…: the fee rounds down.
        assert_eq!(above.fee, a("0.03333333"));
        // MM_u = 0: b = p − E / Δ = 10 − 1 / 2 = 9.5 and D = (f − p) × Δ + E.
        let bare = LiquidationFill { unit_mm: a("0"), position_mm: a("0"), closed: q("2"), price: p("9"), ..fill };
        let out = liquidation_outcome(&bare).unwrap();
        assert_eq!((out.bankruptcy_price, out.deficit), (Some(p("9.5")), a("1")));
    }

    #[test]
    fn a_fill_that_does_not_reduce_the_position_is_refused() {
        let base = one_of_three("9");
        for closed in ["-1", "4", "0"] {
            assert_eq!(
                liquidation_outcome(&LiquidationFill { closed: q(closed), ..base }),
                Err(LiquidationError::NotReducing),
                "{closed}"
            );
        }
        assert_eq!(
            liquidation_outcome(&LiquidationFill { qty: Qty::ZERO, ..base }),
            Err(LiquidationError::NotReducing)
        );
    }

    #[test]
    fn the_fund_refuses_withdrawals_beyond_its_positive_balance() {
        let mut fund = InsuranceFund::default();
        assert_eq!(fund.transfer(a("-1")), Err(FundError::InsufficientBalance));
        fund.transfer(a("10")).unwrap();
        assert_eq!(fund.transfer(a("-10.00000001")), Err(FundError::InsufficientBalance));
        fund.transfer(a("-10")).unwrap();
        assert_eq!(fund.balance, a("0"));
        // A fund below zero after a deficit takes deposits, and no withdrawal.
        fund.settle(a("0"), a("4"));
        assert_eq!(fund.transfer(a("-1")), Err(FundError::InsufficientBalance));
        fund.transfer(a("5")).unwrap();
        assert_eq!(fund.balance, a("1"));
        // A deficit larger than the balance: the part beyond it is uncovered.
        assert_eq!(fund.settle(a("0"), a("3")), a("2"));
        assert_eq!((fund.paid, fund.uncovered), (a("7"), a("6")));
    }

    #[test]
    fn the_adl_queue_ranks_profit_times_leverage_and_losses_last() {
        // Long 1 at entry 100, mark 150 (upnl 50): pnl_ratio 0.5. With equity 75, leverage 2: score 1.0; with
        // equity 150, leverage 1: score 0.5. A loser (mark 80, upnl −20, equity 40, leverage 2): −0.2 / 2 = −0.1.
        let score = |upnl: &str, mark: &str, equity: &str| {
            adl_score(a(upnl), q("1"), 100 * 100_000_000 * 100_000_000, p(mark), a(equity))
        };
        assert_eq!(score("50", "150", "75"), Some(1.0));
        assert_eq!(score("50", "150", "150"), Some(0.5));
        assert_eq!(score("-20", "80", "40"), Some(-0.1));
        // A short's cost is negative: the ratio uses its magnitude.
        assert_eq!(adl_score(a("50"), q("-1"), -100 * 100_000_000 * 100_000_000, p("50"), a("50")), Some(0.5));
        // Left out: no positive equity.
        assert_eq!(score("50", "150", "0"), None);
        assert_eq!(score("50", "150", "-1"), None);
        let mut queue = [(0.5, "b"), (1.0, "z"), (-0.1, "a"), (0.5, "a")];
        queue.sort_by(|x, y| adl_order(*x, *y));
        assert_eq!(queue, [(1.0, "z"), (0.5, "a"), (0.5, "b"), (-0.1, "a")]);
        // Lights: five buckets, the first fifth is 5.
        let lights: Vec<u8> = (0..10).map(|r| adl_bucket(r, 10)).collect();
        assert_eq!(lights, [5, 5, 4, 4, 3, 3, 2, 2, 1, 1]);
        assert_eq!((adl_bucket(0, 1), adl_bucket(2, 3)), (5, 2));
    }
}
