//! Comparing the engine with the reference model where floating point is involved.
//!
//! Everything the engine computes is exact and must equal the reference to the last unit, with one exception: a
//! portfolio group's option repricing (Black-76, implied volatility) is floating point, computed by each side
//! with its own code, so the figures that come out of a group may differ in the last units. They are compared
//! within [`TOLERANCE`]: 1e-6 (100 units of 1e-8), far below anything a trader or a trigger could notice and far
//! above the float differences seen (a few units at most). Every other figure, and every figure of a standard
//! account, is compared exactly.

use vigil_model::{
    AccountView, Amount, GroupView, LiquidationRecord, MarginModel, PositionView, Price, Trigger, UnitFigures,
};

/// The tolerance for figures out of a portfolio group, in raw 1e-8 units.
pub const TOLERANCE: i128 = 100;

fn close(a: Amount, b: Amount) -> bool {
    (a.0 - b.0).abs() <= TOLERANCE
}

fn close_price(a: Option<Price>, b: Option<Price>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => (x.wide() - y.wide()).abs() <= TOLERANCE,
        (x, y) => x == y,
    }
}

fn same_position(a: &PositionView, b: &PositionView) -> bool {
    a.symbol == b.symbol
        && a.qty == b.qty
        && a.entry_price == b.entry_price
        && a.mark_price == b.mark_price
        && a.unrealized_pnl == b.unrealized_pnl
        && a.initial_margin == b.initial_margin
        && a.maintenance_margin == b.maintenance_margin
        && a.margin_mode == b.margin_mode
        && a.isolated_wallet == b.isolated_wallet
        // A cross position's prices depend on the account's maintenance margin, a group's included.
        && close_price(a.liquidation_price, b.liquidation_price)
        && close_price(a.bankruptcy_price, b.bankruptcy_price)
}

/// Below this scanning risk (1e-3) the worst scenario is not compared: a hedged group's scenario losses are then
/// all about zero, and which of two scenarios a unit apart is "worst" is float noise (seen: a long call against a
/// short perp, worst loss 1e-8 under "same" on one side and under "down" on the other).
const WORST_COMPARED_FROM: i128 = 100_000;

fn same_group(a: &GroupView, b: &GroupView) -> bool {
    a.underlying == b.underlying
        && close(a.scanning_risk, b.scanning_risk)
        && a.contingency == b.contingency
        && close(a.initial_margin, b.initial_margin)
        && close(a.maintenance_margin, b.maintenance_margin)
        && (a.scanning_risk.0 < WORST_COMPARED_FROM || (a.worst_move == b.worst_move && a.worst_vol == b.worst_vol))
}

/// Whether two views of an account agree: exactly, or for a portfolio account within [`TOLERANCE`] on the
/// figures a group feeds.
pub fn same_view(a: &AccountView, b: &AccountView) -> bool {
    if a.margin != MarginModel::Portfolio || b.margin != MarginModel::Portfolio {
        return a == b;
    }
    a.account == b.account
        && a.equity == b.equity
        && close(a.initial_margin, b.initial_margin)
        && close(a.maintenance_margin, b.maintenance_margin)
        && close(a.available, b.available)
        && a.liquidatable == b.liquidatable
        && a.balances == b.balances
        && a.positions.len() == b.positions.len()
        && a.positions.iter().zip(&b.positions).all(|(x, y)| same_position(x, y))
        && a.groups.len() == b.groups.len()
        && a.groups.iter().zip(&b.groups).all(|(x, y)| same_group(x, y))
}

/// The first pair of views that disagree, if any (by position in the lists; the lists must be as long).
pub fn first_difference<'a>(
    a: &'a [AccountView],
    b: &'a [AccountView],
) -> Option<(Option<&'a AccountView>, Option<&'a AccountView>)> {
    if a.len() != b.len() {
        return Some((a.first(), b.first()));
    }
    a.iter().zip(b).find(|(x, y)| !same_view(x, y)).map(|(x, y)| (Some(x), Some(y)))
}

/// Whether two trigger lists agree: the same triggers, with the maintenance margin within [`TOLERANCE`].
pub fn same_triggers(a: &[Trigger], b: &[Trigger]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.offset == y.offset
                && x.account == y.account
                && x.symbol == y.symbol
                && x.kind == y.kind
                && x.equity == y.equity
                && close(x.maintenance_margin, y.maintenance_margin)
                && x.uncovered == y.uncovered
        })
}

/// Whether two lists of liquidation records agree: every figure exactly (the rule's arithmetic is exact), but the
/// unit's maintenance margin after the fill within [`TOLERANCE`] (a portfolio group's, floating point inside).
pub fn same_liquidations(a: &[LiquidationRecord], b: &[LiquidationRecord]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            LiquidationRecord { maintenance_margin: y.maintenance_margin, ..x.clone() } == *y
                && close(x.maintenance_margin, y.maintenance_margin)
        })
}

/// Whether two units' figures agree within [`TOLERANCE`] on margin (equity exactly).
pub fn same_figures(a: &UnitFigures, b: &UnitFigures) -> bool {
    a.equity == b.equity
        && close(a.initial_margin, b.initial_margin)
        && close(a.maintenance_margin, b.maintenance_margin)
}
