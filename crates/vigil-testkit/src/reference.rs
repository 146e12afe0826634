//! The naive reference model: the rules of `events.md` and `margin-model.md` written as plainly as possible.
//!
//! It keeps no cached figure, no index and no dependency list: after every event it recomputes every account and
//! every margin unit from scratch and advances every episode. Slow on purpose; it is the oracle the engine is
//! compared against, event by event.

use std::collections::BTreeMap;

use ethnum::I256;
use vigil_model::margin::{
    apply_fill, bankruptcy_price, collateral_value, credit_from_e16, entry_price, funding_credit, is_liquidatable,
    linear_figures, liquidation_price, option_figures,
};
use vigil_model::portfolio::RiskParams;
use vigil_model::{
    AccountView, Amount, Event, Fill, MarginMode, OptionTerms, PositionFigures, PositionView, Price, Qty, Rate, Reason,
    Rejection, Tiers, Trigger, TriggerKind, UnitFigures, reject,
};
use vigil_model::{GroupView, LiquidationRecord, MarginModel, Offset, OptionMargin, Right, Timestamp};

#[derive(Clone, Debug)]
enum Kind {
    Perp(Tiers),
    Future(Tiers),
    Option { underlying: String, right: Right, strike: Price, margin: OptionMargin },
}

#[derive(Clone, Debug)]
enum Named {
    Asset { haircut: Rate },
    Instrument { kind: Kind, settled: bool },
}

#[derive(Clone, Debug)]
struct Pos {
    qty: Qty,
    cost_e16: i128,
    mode: MarginMode,
    wallet: Amount,
}

#[derive(Clone, Debug, Default)]
struct Acct {
    /// Every asset ever touched, zeros included (the view filters them).
    balances: BTreeMap<String, Amount>,
    /// Open positions and pre-funded isolated wallets (qty 0).
    positions: BTreeMap<String, Pos>,
    portfolio: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ep {
    active: bool,
    bankrupt: bool,
}

/// The reference model's state.
#[derive(Clone, Debug)]
pub struct Reference {
    quote: String,
    names: BTreeMap<String, Named>,
    prices: BTreeMap<String, Price>,
    accounts: BTreeMap<String, Acct>,
    /// Episodes by (account, None = cross | Some(symbol) = isolated).
    episodes: BTreeMap<(String, Option<String>), Ep>,
    offset: Offset,
    /// Contract v2: each instrument's underlying (its portfolio group) and expiry, the clock, `risk` parameters.
    underlyings: BTreeMap<String, String>,
    expiries: BTreeMap<String, Timestamp>,
    clock: Option<Timestamp>,
    risk: BTreeMap<String, RiskParams>,
    /// Contract v2 (`liquidation.md`): the insurance fund, the liquidation fills, `max_liquidation_fee`, and the
    /// `deleverage` triggers of the event being applied.
    fund: RefFund,
    liquidations: Vec<LiquidationRecord>,
    max_fee: Rate,
    deleverage: Vec<Trigger>,
}

/// The insurance fund's figures, kept here on their own (not the model's type).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefFund {
    pub balance: Amount,
    pub fees: Amount,
    pub paid: Amount,
    pub uncovered: Amount,
}

fn r(reason: Reason, msg: &str) -> Rejection {
    reject(reason, msg)
}

impl Reference {
    pub fn new(quote: &str) -> Self {
        Self {
            quote: quote.to_owned(),
            names: BTreeMap::new(),
            prices: BTreeMap::new(),
            accounts: BTreeMap::new(),
            episodes: BTreeMap::new(),
            offset: Offset(0),
            underlyings: BTreeMap::new(),
            expiries: BTreeMap::new(),
            clock: None,
            risk: BTreeMap::new(),
            fund: RefFund::default(),
            liquidations: Vec::new(),
            max_fee: Rate(1_500_000),
            deleverage: Vec::new(),
        }
    }

    /// The insurance fund after the last event.
    pub fn fund(&self) -> RefFund {
        self.fund
    }

    /// Every liquidation fill so far, in offset order.
    pub fn liquidations(&self) -> &[LiquidationRecord] {
        &self.liquidations
    }

    pub fn offset(&self) -> Offset {
        self.offset
    }

    /// Applies the event at the next offset; returns the offset, the outcome and the triggers (sorted).
    pub fn apply(&mut self, event: &Event) -> (Offset, Result<(), Rejection>, Vec<Trigger>) {
        self.offset = Offset(self.offset.0 + 1);
        self.deleverage.clear();
        let result = self.apply_inner(event);
        let mut triggers = if result.is_ok() { self.detect() } else { Vec::new() };
        if !self.deleverage.is_empty() {
            triggers.append(&mut self.deleverage);
            triggers.sort();
        }
        (self.offset, result, triggers)
    }

    /// A line that failed to parse still takes an offset.
    pub fn skip(&mut self) -> Offset {
        self.offset = Offset(self.offset.0 + 1);
        self.offset
    }

    fn is_asset(&self, name: &str) -> bool {
        name == self.quote || matches!(self.names.get(name), Some(Named::Asset { .. }))
    }

    fn asset_name(&self, name: &str) -> Result<(), Rejection> {
        if self.is_asset(name) {
            Ok(())
        } else if self.names.contains_key(name) {
            Err(r(Reason::InvalidReference, "an instrument, not an asset"))
        } else {
            Err(r(Reason::UnknownAsset, "unknown asset"))
        }
    }

    fn underlying(&self, name: &str) -> Result<(), Rejection> {
        self.asset_name(name)?;
        if name == self.quote {
            return Err(r(Reason::InvalidReference, "underlying is the quote"));
        }
        Ok(())
    }

    fn instrument(&self, name: &str) -> Result<(&Kind, bool), Rejection> {
        match self.names.get(name) {
            Some(Named::Instrument { kind, settled }) => Ok((kind, *settled)),
            Some(Named::Asset { .. }) => Err(r(Reason::InvalidReference, "an asset, not an instrument")),
            None if name == self.quote => Err(r(Reason::InvalidReference, "the quote, not an instrument")),
            None => Err(r(Reason::UnknownSymbol, "unknown symbol")),
        }
    }

    fn same_kind(a: &Kind, b: &Kind) -> bool {
        std::mem::discriminant(a) == std::mem::discriminant(b)
    }

    /// Existing-symbol checks for re-sent reference data.
    fn resend(&self, symbol: &str, kind: &Kind) -> Result<bool, Rejection> {
        if symbol == self.quote {
            return Err(r(Reason::InvalidReference, "collides with the quote"));
        }
        match self.names.get(symbol) {
            None => Ok(false),
            Some(Named::Asset { .. }) => Err(r(Reason::InvalidReference, "collides with an asset")),
            Some(Named::Instrument { kind: old, settled }) => {
                if !Self::same_kind(old, kind) {
                    Err(r(Reason::InvalidReference, "re-sent as another kind"))
                } else if *settled {
                    Err(r(Reason::InstrumentSettled, "settled"))
                } else {
                    Ok(true)
                }
            }
        }
    }

    fn apply_inner(&mut self, event: &Event) -> Result<(), Rejection> {
        match event {
            Event::Asset { asset, haircut } => {
                if haircut.0 < 0 || haircut.0 >= Rate::ONE.0 {
                    return Err(r(Reason::InvalidReference, "haircut out of bounds"));
                }
                if *asset == self.quote {
                    return Err(r(Reason::InvalidReference, "the quote"));
                }
                if let Some(Named::Instrument { .. }) = self.names.get(asset) {
                    return Err(r(Reason::InvalidReference, "an instrument"));
                }
                self.names.insert(asset.clone(), Named::Asset { haircut: *haircut });
                Ok(())
            }
            Event::Perp { symbol, underlying, tiers } | Event::Future { symbol, underlying, tiers, .. } => {
                let t = Tiers::new(tiers)?;
                if let Some(u) = underlying {
                    self.underlying(u)?;
                }
                let kind = if matches!(event, Event::Perp { .. }) { Kind::Perp(t) } else { Kind::Future(t) };
                let resent = self.resend(symbol, &kind)?;
                if resent
                    && let Some(u) = underlying
                    && self.underlyings.get(symbol) != Some(u)
                {
                    return Err(r(Reason::InvalidReference, "the underlying is fixed at the first declaration"));
                }
                self.names.insert(symbol.clone(), Named::Instrument { kind, settled: false });
                if let Some(u) = underlying {
                    self.underlyings.insert(symbol.clone(), u.clone());
                }
                if let Event::Future { expiry, .. } = event
                    && let Some(t) = Timestamp::parse(expiry)
                {
                    self.expiries.insert(symbol.clone(), t);
                }
                Ok(())
            }
            Event::Option { symbol, underlying, right, strike, margin, .. } => {
                OptionTerms::validate(margin)?;
                self.underlying(underlying)?;
                let kind =
                    Kind::Option { underlying: underlying.clone(), right: *right, strike: *strike, margin: *margin };
                if self.resend(symbol, &kind)?
                    && let Some(Named::Instrument {
                        kind: Kind::Option { underlying: u, right: rt, strike: k, .. },
                        ..
                    }) = self.names.get(symbol)
                    && (u != underlying || rt != right || k != strike)
                {
                    return Err(r(Reason::InvalidReference, "option terms changed"));
                }
                self.names.insert(symbol.clone(), Named::Instrument { kind, settled: false });
                self.underlyings.insert(symbol.clone(), underlying.clone());
                if let Event::Option { expiry, .. } = event
                    && let Some(t) = Timestamp::parse(expiry)
                {
                    self.expiries.insert(symbol.clone(), t);
                }
                Ok(())
            }
            Event::Price { symbol, price } => {
                if *symbol == self.quote {
                    return Err(r(Reason::InvalidReference, "quote price is fixed"));
                }
                match self.names.get(symbol) {
                    None => return Err(r(Reason::UnknownSymbol, "unknown")),
                    Some(Named::Instrument { settled: true, .. }) => {
                        return Err(r(Reason::InstrumentSettled, "settled"));
                    }
                    _ => {}
                }
                self.prices.insert(symbol.clone(), *price);
                Ok(())
            }
            Event::Funding { symbol, rate } => {
                match self.names.get(symbol) {
                    None if *symbol != self.quote => return Err(r(Reason::UnknownSymbol, "unknown")),
                    Some(Named::Instrument { kind: Kind::Perp(_), .. }) => {}
                    _ => return Err(r(Reason::InvalidReference, "not a perp")),
                }
                let Some(mark) = self.prices.get(symbol).copied() else {
                    return Err(r(Reason::NoPrice, "no mark"));
                };
                for acct in self.accounts.values_mut() {
                    let quote = acct.balances.entry(self.quote.clone()).or_default();
                    if let Some(p) = acct.positions.get_mut(symbol)
                        && p.qty.0 != 0
                    {
                        let c = funding_credit(p.qty, mark, *rate);
                        if p.mode == MarginMode::Isolated {
                            p.wallet = p.wallet.saturating_add(c);
                        } else {
                            *quote = quote.saturating_add(c);
                        }
                    }
                }
                Ok(())
            }
            Event::Settle { symbol, price } => {
                let kind = match self.names.get(symbol) {
                    None if *symbol != self.quote => return Err(r(Reason::UnknownSymbol, "unknown")),
                    Some(Named::Instrument { settled: true, .. }) => return Err(r(Reason::InstrumentSettled, "again")),
                    Some(Named::Instrument { kind: Kind::Perp(_), .. }) => {
                        return Err(r(Reason::InvalidReference, "perp"));
                    }
                    Some(Named::Instrument { kind, .. }) => kind.clone(),
                    _ => return Err(r(Reason::InvalidReference, "asset")),
                };
                for acct in self.accounts.values_mut() {
                    if let Some(p) = acct.positions.remove(symbol) {
                        let realized = match &kind {
                            Kind::Option { right, strike, .. } => {
                                let payoff = match right {
                                    Right::Call => (price.wide() - strike.wide()).max(0),
                                    Right::Put => (strike.wide() - price.wide()).max(0),
                                };
                                p.qty.wide() * payoff
                            }
                            _ => p.qty.wide() * price.wide() - p.cost_e16,
                        };
                        let mut back = credit_from_e16(realized);
                        if p.mode == MarginMode::Isolated {
                            back = back.saturating_add(p.wallet);
                        }
                        let q = acct.balances.entry(self.quote.clone()).or_default();
                        *q = q.saturating_add(back);
                    }
                }
                self.prices.insert(symbol.clone(), *price);
                if let Some(Named::Instrument { settled, .. }) = self.names.get_mut(symbol) {
                    *settled = true;
                }
                Ok(())
            }
            Event::Deposit { account, asset, amount } => {
                self.asset_name(asset)?;
                let before =
                    self.accounts.get(account).and_then(|a| a.balances.get(asset)).copied().unwrap_or_default();
                let after = before.checked_add(*amount).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
                let acct = self.account_entry(account);
                acct.balances.insert(asset.clone(), after);
                Ok(())
            }
            Event::Withdraw { account, asset, amount } => {
                let Some(acct) = self.accounts.get(account) else {
                    return Err(r(Reason::UnknownAccount, "unknown account"));
                };
                self.asset_name(asset)?;
                let before = acct.balances.get(asset).copied().unwrap_or_default();
                let after = before.checked_sub(*amount).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
                if after.is_negative() {
                    return Err(r(Reason::InsufficientBalance, "balance"));
                }
                let mut trial = acct.clone();
                trial.balances.insert(asset.clone(), after);
                let f = self.cross(&trial);
                if f.equity < f.initial_margin {
                    return Err(r(Reason::InsufficientMargin, "margin"));
                }
                self.accounts.insert(account.clone(), trial);
                Ok(())
            }
            Event::Transfer { account, symbol, amount } => {
                let Some(acct) = self.accounts.get(account) else {
                    return Err(r(Reason::UnknownAccount, "unknown account"));
                };
                let (kind, settled) = self.instrument(symbol)?;
                if matches!(kind, Kind::Option { .. }) {
                    return Err(r(Reason::InvalidReference, "transfer on an option"));
                }
                if settled {
                    return Err(r(Reason::InstrumentSettled, "settled"));
                }
                let pos = acct.positions.get(symbol);
                if pos.is_some_and(|p| p.mode == MarginMode::Cross) {
                    return Err(r(Reason::ModeMismatch, "cross position"));
                }
                let mut trial = acct.clone();
                let quote = trial.balances.get(&self.quote).copied().unwrap_or_default();
                let wallet = pos.map_or(Amount::ZERO, |p| p.wallet);
                let wallet_after = wallet.checked_add(*amount).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
                let quote_after = quote.checked_sub(*amount).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
                if amount.0 > 0 {
                    if quote_after.is_negative() {
                        return Err(r(Reason::InsufficientBalance, "balance"));
                    }
                } else if wallet_after.is_negative() {
                    return Err(r(Reason::InsufficientBalance, "wallet"));
                }
                trial.balances.insert(self.quote.clone(), quote_after);
                let p = trial.positions.entry(symbol.clone()).or_insert(Pos {
                    qty: Qty::ZERO,
                    cost_e16: 0,
                    mode: MarginMode::Isolated,
                    wallet: Amount::ZERO,
                });
                p.wallet = wallet_after;
                let open = p.qty.0 != 0;
                if amount.0 > 0 {
                    let f = self.cross(&trial);
                    if f.equity < f.initial_margin {
                        return Err(r(Reason::InsufficientMargin, "cross margin"));
                    }
                } else if open {
                    let f = self.isolated(symbol, &trial.positions[symbol]);
                    if f.equity < f.initial_margin {
                        return Err(r(Reason::InsufficientMargin, "isolated margin"));
                    }
                }
                if !open && wallet_after.0 == 0 {
                    trial.positions.remove(symbol);
                }
                self.accounts.insert(account.clone(), trial);
                Ok(())
            }
            Event::Trade(fill) => {
                let acct = self.accounts.get(&fill.account).cloned().unwrap_or_default();
                let after = self.fill_into(acct, fill)?;
                self.accounts.insert(fill.account.clone(), after);
                Ok(())
            }
            Event::Liquidation(fill) => self.liquidate(fill),
            Event::Insurance { amount } => {
                // A withdrawal takes at most the positive balance.
                if amount.0 < 0 && -amount.0 > self.fund.balance.0.max(0) {
                    return Err(r(Reason::InsufficientBalance, "beyond the fund's balance"));
                }
                self.fund.balance =
                    self.fund.balance.checked_add(*amount).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
                Ok(())
            }
            Event::LiquidationParams { max_liquidation_fee } => {
                self.max_fee = *max_liquidation_fee;
                Ok(())
            }
            Event::Clock { time } => {
                if self.clock.is_some_and(|now| *time < now) {
                    return Err(r(Reason::ClockRegression, "earlier than the clock"));
                }
                self.clock = Some(*time);
                Ok(())
            }
            Event::Risk { underlying, params } => {
                self.underlying(underlying)?;
                params.check().map_err(|e| r(Reason::InvalidReference, &e))?;
                self.risk.insert(underlying.clone(), *params);
                Ok(())
            }
            Event::AccountConfig { account, margin } => {
                let Some(acct) = self.accounts.get(account) else {
                    return Err(r(Reason::UnknownAccount, "unknown account"));
                };
                let portfolio = *margin == MarginModel::Portfolio;
                if acct.portfolio == portfolio {
                    return Ok(());
                }
                let mut trial = acct.clone();
                trial.portfolio = portfolio;
                if portfolio {
                    for (symbol, p) in &trial.positions {
                        if p.mode == MarginMode::Cross && p.qty.0 != 0 {
                            self.group_prices(symbol)?;
                        }
                    }
                }
                let f = self.cross(&trial);
                if f.equity < f.initial_margin {
                    return Err(r(Reason::InsufficientMargin, "margin under the new model"));
                }
                self.accounts.insert(account.clone(), trial);
                Ok(())
            }
        }
    }

    /// What a position of a portfolio account needs: its underlying's index, and the clock for an option.
    /// A liquidation fill, as `liquidation.md` states it (no simplification): `MM_Δ = MM_p × |Δ| / |q|`,
    /// `b = p − (E × MM_Δ / MM_u) / Δ` (or `p − E / Δ` without MM), `D = (f − b) × Δ`, each an exact fraction.
    fn liquidate(&mut self, fill: &Fill) -> Result<(), Rejection> {
        let (kind, _) = self.instrument(&fill.symbol)?;
        if matches!(kind, Kind::Option { .. }) {
            return Err(r(Reason::InvalidReference, "liquidation of an option"));
        }
        let acct = self.accounts.get(&fill.account).ok_or_else(|| r(Reason::InvalidReference, "no position"))?;
        let p = acct
            .positions
            .get(&fill.symbol)
            .filter(|p| p.qty.0 != 0)
            .cloned()
            .ok_or_else(|| r(Reason::InvalidReference, "no position"))?;
        let delta = -fill.signed_qty().wide();
        let q = p.qty.wide();
        if delta.signum() != q.signum() || delta.abs() > q.abs() {
            return Err(r(Reason::InvalidReference, "does not reduce"));
        }
        let mm_p = self.figures(&fill.symbol, &p).maintenance_margin.0;
        let (e, mm_u) = match p.mode {
            MarginMode::Isolated => (self.isolated(&fill.symbol, &p).equity.0, mm_p),
            MarginMode::Cross => {
                let mm = acct
                    .positions
                    .iter()
                    .filter(|(_, x)| x.mode == MarginMode::Cross && x.qty.0 != 0)
                    .map(|(sym, x)| self.figures(sym, x).maintenance_margin.0)
                    .sum::<i128>();
                (self.cross(acct).equity.0, mm)
            }
        };
        let mark = self.prices.get(&fill.symbol).copied().ok_or_else(|| r(Reason::NoPrice, "no mark"))?;
        let mut after = self.fill_into(acct.clone(), fill)?;
        let w = I256::from;
        let s8 = w(100_000_000);
        // b as a fraction at 1e-8: share = E × MM_p × |Δ| / (|q| × MM_u) (1e-8); b = p − share × 1e8 / Δ.
        let (b_num, b_den) = if mm_u == 0 {
            (w(mark.wide()) * w(delta) - w(e) * s8, w(delta))
        } else {
            let share_num = w(e) * w(mm_p) * w(delta.abs());
            let share_den = w(q.abs()) * w(mm_u);
            (w(mark.wide()) * share_den * w(delta) - share_num * s8, share_den * w(delta))
        };
        // D = (f − b) × Δ / 1e8 at 1e-8.
        let d_num = (w(fill.price.wide()) * b_den - b_num) * w(delta);
        let d_den = b_den * s8;
        let (d_num, d_den) = if d_den < I256::ZERO { (-d_num, -d_den) } else { (d_num, d_den) };
        let floor = |n: I256, d: I256| -> I256 { n.div_euclid(d) };
        let (fee, paid) = if d_num >= I256::ZERO {
            // The fee: min(D, max_fee × |Δ| × f), down.
            let cap_num = w(i128::from(self.max_fee.0)) * w(delta.abs()) * w(fill.price.wide());
            let cap = floor(cap_num, s8 * s8);
            (floor(d_num, d_den).min(cap), I256::ZERO)
        } else {
            // The deficit, up.
            (I256::ZERO, -floor(d_num, d_den))
        };
        let to_amount = |x: I256| i128::try_from(x).map(Amount).map_err(|_| r(Reason::InvalidNumber, "overflow"));
        let (fee, paid) = (to_amount(fee)?, to_amount(paid)?);
        let credit = paid.0 - fee.0;
        let isolated_open = p.mode == MarginMode::Isolated && after.positions.contains_key(&fill.symbol);
        if isolated_open {
            let x = after.positions.get_mut(&fill.symbol).ok_or_else(|| r(Reason::InvalidReference, "gone"))?;
            x.wallet = Amount(x.wallet.0.checked_add(credit).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?);
        } else {
            let quote = after.balances.entry(self.quote.clone()).or_default();
            *quote = Amount(quote.0.checked_add(credit).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?);
        }
        let bankruptcy = {
            let (n, d) = if b_den < I256::ZERO { (-b_num, -b_den) } else { (b_num, b_den) };
            let nearest = (n * 2 + d).div_euclid(d * 2);
            i64::try_from(nearest).ok().filter(|b| *b > 0).map(Price)
        };
        let unit = match after.positions.get(&fill.symbol) {
            Some(x) if isolated_open => self.isolated(&fill.symbol, x),
            _ => self.cross(&after),
        };
        self.accounts.insert(fill.account.clone(), after);
        // The fund, in offset order.
        let before = self.fund.balance.0;
        self.fund.balance = Amount(self.fund.balance.0 + fee.0 - paid.0);
        self.fund.fees = Amount(self.fund.fees.0 + fee.0);
        self.fund.paid = Amount(self.fund.paid.0 + paid.0);
        let uncovered = Amount(paid.0 - paid.0.min(before.max(0)));
        self.fund.uncovered = Amount(self.fund.uncovered.0 + uncovered.0);
        let offset = Offset(self.offset.0);
        if uncovered.0 > 0 {
            self.deleverage.push(Trigger {
                offset,
                account: fill.account.clone(),
                symbol: Some(fill.symbol.clone()),
                kind: TriggerKind::Deleverage,
                equity: unit.equity,
                maintenance_margin: unit.maintenance_margin,
                uncovered: Some(uncovered),
            });
        }
        self.liquidations.push(LiquidationRecord {
            offset,
            account: fill.account.clone(),
            symbol: fill.symbol.clone(),
            qty: Qty(delta as i64),
            price: fill.price,
            bankruptcy_price: bankruptcy,
            fee,
            fund_paid: paid,
            uncovered,
            equity: unit.equity,
            maintenance_margin: unit.maintenance_margin,
        });
        Ok(())
    }

    fn group_prices(&self, symbol: &str) -> Result<(), Rejection> {
        let Some(u) = self.underlyings.get(symbol) else { return Ok(()) };
        if !self.prices.contains_key(u) {
            return Err(r(Reason::NoPrice, "no index for the group"));
        }
        let is_option = matches!(self.names.get(symbol), Some(Named::Instrument { kind: Kind::Option { .. }, .. }));
        if is_option && self.clock.is_none() {
            return Err(r(Reason::NoPrice, "no clock"));
        }
        Ok(())
    }

    fn account_entry(&mut self, id: &str) -> &mut Acct {
        let quote = self.quote.clone();
        self.accounts.entry(id.to_owned()).or_insert_with(|| {
            let mut a = Acct::default();
            a.balances.insert(quote, Amount::ZERO);
            a
        })
    }

    /// The account after a fill, or why the fill is invalid.
    fn fill_into(&self, mut acct: Acct, fill: &Fill) -> Result<Acct, Rejection> {
        let (kind, settled) = self.instrument(&fill.symbol)?;
        let is_option = matches!(kind, Kind::Option { .. });
        if is_option && fill.margin_mode == MarginMode::Isolated {
            return Err(r(Reason::InvalidEvent, "isolated option"));
        }
        if settled {
            return Err(r(Reason::InstrumentSettled, "settled"));
        }
        if !self.prices.contains_key(&fill.symbol) {
            return Err(r(Reason::NoPrice, "no mark"));
        }
        if let Kind::Option { underlying, .. } = kind
            && !self.prices.contains_key(underlying)
        {
            return Err(r(Reason::NoPrice, "no underlying price"));
        }
        if acct.portfolio && fill.margin_mode == MarginMode::Cross {
            self.group_prices(&fill.symbol)?;
        }
        let existing = acct.positions.get(&fill.symbol).cloned();
        if let Some(p) = &existing
            && p.mode != fill.margin_mode
        {
            return Err(r(Reason::ModeMismatch, "mode"));
        }
        let p = existing.unwrap_or(Pos { qty: Qty::ZERO, cost_e16: 0, mode: fill.margin_mode, wallet: Amount::ZERO });
        let dq = fill.signed_qty();
        let out = apply_fill(p.qty, p.cost_e16, dq, fill.price).ok_or_else(|| r(Reason::InvalidNumber, "size"))?;
        let gross = if is_option {
            credit_from_e16(-(dq.wide() * fill.price.wide()))
        } else {
            credit_from_e16(out.realized_e16)
        };
        let cash = gross.checked_sub(fill.fee).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
        let mut quote = acct.balances.get(&self.quote).copied().unwrap_or_default();
        let mut wallet = p.wallet;
        if fill.margin_mode == MarginMode::Isolated {
            wallet = wallet.checked_add(cash).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
            if out.qty.0 == 0 {
                quote = quote.checked_add(wallet).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
            }
        } else {
            quote = quote.checked_add(cash).ok_or_else(|| r(Reason::InvalidNumber, "overflow"))?;
        }
        acct.balances.insert(self.quote.clone(), quote);
        if out.qty.0 == 0 {
            acct.positions.remove(&fill.symbol);
        } else {
            acct.positions.insert(
                fill.symbol.clone(),
                Pos { qty: out.qty, cost_e16: out.cost_e16, mode: fill.margin_mode, wallet },
            );
        }
        Ok(acct)
    }

    /// The pre-trade check, naively: the unit's figures before and after the fill on a copy of the account, and
    /// whether the rule of `margin-model.md` allows it. `Err` if the fill is not valid at all.
    pub fn check(&self, fill: &Fill) -> Result<(bool, UnitFigures, UnitFigures), Rejection> {
        let acct = self.accounts.get(&fill.account).cloned().unwrap_or_else(|| {
            let mut a = Acct::default();
            a.balances.insert(self.quote.clone(), Amount::ZERO);
            a
        });
        let after = self.fill_into(acct.clone(), fill)?;
        let unit = |a: &Acct| match fill.margin_mode {
            MarginMode::Cross => self.cross(a),
            MarginMode::Isolated => match a.positions.get(&fill.symbol) {
                Some(p) => self.isolated(&fill.symbol, p),
                None => UnitFigures::default(),
            },
        };
        let before = unit(&acct);
        let mut after_f = unit(&after);
        if fill.margin_mode == MarginMode::Isolated && !after.positions.contains_key(&fill.symbol) {
            // Closed: the unit is its last wallet, which went back to the cross balance.
            let q0 = acct.balances.get(&self.quote).copied().unwrap_or_default();
            let q1 = after.balances.get(&self.quote).copied().unwrap_or_default();
            after_f = UnitFigures { equity: q1.saturating_sub(q0), ..UnitFigures::default() };
        }
        let product = |a: Amount, b: Amount| a.0.checked_mul(b.0).expect("reference: figures beyond the test range");
        let allowed = after_f.equity >= after_f.initial_margin
            || (after_f.maintenance_margin <= before.maintenance_margin
                && product(after_f.equity, before.maintenance_margin)
                    >= product(before.equity, after_f.maintenance_margin));
        Ok((allowed, before, after_f))
    }

    fn figures(&self, symbol: &str, p: &Pos) -> PositionFigures {
        let Some(mark) = self.prices.get(symbol).copied() else { return PositionFigures::default() };
        match self.names.get(symbol) {
            Some(Named::Instrument { kind: Kind::Perp(t) | Kind::Future(t), .. }) => {
                linear_figures(p.qty, p.cost_e16, mark, t)
            }
            Some(Named::Instrument { kind: Kind::Option { underlying, right, strike, margin }, .. }) => {
                match self.prices.get(underlying) {
                    Some(u) => option_figures(
                        p.qty,
                        p.cost_e16,
                        mark,
                        *u,
                        &OptionTerms { right: *right, strike: *strike, margin: *margin },
                    ),
                    None => PositionFigures::default(),
                }
            }
            _ => PositionFigures::default(),
        }
    }

    fn cross(&self, acct: &Acct) -> UnitFigures {
        let mut f = UnitFigures::default();
        for (asset, amount) in &acct.balances {
            let v = if *asset == self.quote {
                *amount
            } else {
                let haircut = match self.names.get(asset) {
                    Some(Named::Asset { haircut }) => *haircut,
                    _ => Rate::ZERO,
                };
                match self.prices.get(asset) {
                    Some(p) => collateral_value(*amount, *p, haircut),
                    None => Amount::ZERO,
                }
            };
            f.equity = f.equity.saturating_add(v);
        }
        let groups = self.groups(acct);
        for (symbol, p) in &acct.positions {
            if p.mode == MarginMode::Cross {
                let pf = self.figures(symbol, p);
                f.equity = f.equity.saturating_add(pf.value);
                if !self.grouped(&groups, symbol, p) {
                    f.initial_margin = f.initial_margin.saturating_add(pf.initial_margin);
                    f.maintenance_margin = f.maintenance_margin.saturating_add(pf.maintenance_margin);
                }
            }
        }
        for g in &groups {
            f.initial_margin = f.initial_margin.saturating_add(g.initial_margin);
            f.maintenance_margin = f.maintenance_margin.saturating_add(g.maintenance_margin);
        }
        f
    }

    fn grouped(&self, groups: &[GroupView], symbol: &str, p: &Pos) -> bool {
        p.mode == MarginMode::Cross
            && p.qty.0 != 0
            && self.underlyings.get(symbol).is_some_and(|u| groups.iter().any(|g| g.underlying == *u))
    }

    /// A portfolio account's groups, revalued naively: every scenario, every position, from the formulas.
    fn groups(&self, acct: &Acct) -> Vec<GroupView> {
        if !acct.portfolio {
            return Vec::new();
        }
        let mut by: BTreeMap<&str, Vec<(&str, &Pos)>> = BTreeMap::new();
        for (symbol, p) in &acct.positions {
            if p.mode == MarginMode::Cross
                && p.qty.0 != 0
                && let Some(u) = self.underlyings.get(symbol)
            {
                by.entry(u.as_str()).or_default().push((symbol.as_str(), p));
            }
        }
        by.into_iter().filter_map(|(u, members)| self.group(u, &members)).collect()
    }

    fn group(&self, u: &str, members: &[(&str, &Pos)]) -> Option<GroupView> {
        let index = self.prices.get(u).copied()?;
        let params = self.risk.get(u).copied().unwrap_or_default();
        let f = |raw: i64| raw as f64 / 1e8;
        let uf = f(index.0);
        let b = params.buckets as i32;
        // Each option's time to expiry and implied vol, computed here with this model's own Black-76.
        let mut legs = Vec::new();
        for (symbol, p) in members {
            let mark = self.prices.get(*symbol).copied()?;
            let option = match self.names.get(*symbol) {
                Some(Named::Instrument { kind: Kind::Option { right, strike, .. }, .. }) => {
                    let t = ((self.expiries.get(*symbol)?.0 - self.clock?.0).max(0) as f64) / (365.0 * 86_400.0 * 1e9);
                    let k = f(strike.0);
                    let sigma = ref_implied_vol(*right, uf, k, t, f(mark.0));
                    Some((*right, k, t, sigma))
                }
                _ => None,
            };
            legs.push((p.qty, mark, option));
        }
        let mut worst: Option<(i128, i32, usize)> = None;
        for k in -b..=b {
            for (vi, case) in ["same", "up", "down"].iter().enumerate() {
                // Linear legs exactly: q × P × price_range × k / buckets, floored at 1e-8.
                let mut linear: i128 = 0;
                let mut options = 0.0f64;
                for (qty, mark, option) in &legs {
                    match option {
                        None => linear += qty.wide() * mark.wide(),
                        Some((right, strike, t, sigma)) => {
                            let dte = (t * 365.0).max(1.0);
                            let power = if dte < 30.0 { params.short_vega_power } else { params.long_vega_power };
                            let shock = (30.0 / dte).powf(f(power.0));
                            let s2 = match *case {
                                "up" => (sigma * (1.0 + f(params.vol_up.0) * shock)).max(f(params.min_vol_up.0)),
                                "down" => (sigma * (1.0 - f(params.vol_down.0) * shock)).max(0.001),
                                _ => *sigma,
                            };
                            let moved = uf * (1.0 + f(params.price_range.0) * f64::from(k) / f64::from(b));
                            options += f(qty.0) * (ref_black76(*right, moved, *strike, *t, s2) - f(mark.0));
                        }
                    }
                }
                let num = linear * i128::from(params.price_range.0) * i128::from(k);
                let den = 10i128.pow(16) * i128::from(b);
                let linear_e8 = num.div_euclid(den);
                let pnl = linear_e8 + (options * 1e8).floor() as i128;
                if worst.is_none_or(|(w, _, _)| pnl < w) {
                    worst = Some((pnl, k, vi));
                }
            }
        }
        let (worst_pnl, wk, wv) = worst?;
        let scanning = (-worst_pnl).max(0);
        let ceil = |n: i128, d: i128| -(-n).div_euclid(d);
        let mut short_options = 0i128;
        let (mut long, mut short) = (0i128, 0i128);
        for (qty, _, option) in &legs {
            match option {
                Some(_) => short_options += (-qty.wide()).max(0),
                None if qty.0 > 0 => long += qty.wide(),
                None => short -= qty.wide(),
            }
        }
        let e16 = 10i128.pow(16);
        let contingency = ceil(params.option_contingency.wide() * index.wide() * short_options, e16)
            + ceil(params.future_contingency.wide() * index.wide() * long.min(short), e16);
        let im = scanning + contingency;
        let mm = ceil(im * params.mm_factor.wide(), 100_000_000);
        Some(GroupView {
            underlying: u.to_owned(),
            scanning_risk: Amount(scanning),
            contingency: Amount(contingency),
            initial_margin: Amount(im),
            maintenance_margin: Amount(mm),
            worst_move: Rate((i128::from(params.price_range.0) * i128::from(wk) / i128::from(b)) as i64),
            worst_vol: [
                vigil_model::portfolio::VolCase::Same,
                vigil_model::portfolio::VolCase::Up,
                vigil_model::portfolio::VolCase::Down,
            ][wv],
        })
    }

    fn isolated(&self, symbol: &str, p: &Pos) -> UnitFigures {
        let pf = self.figures(symbol, p);
        UnitFigures {
            equity: p.wallet.saturating_add(pf.value),
            initial_margin: pf.initial_margin,
            maintenance_margin: pf.maintenance_margin,
        }
    }

    fn step(ep: &mut Ep, f: &UnitFigures, has_positions: bool) -> Vec<TriggerKind> {
        let mut out = Vec::new();
        if !ep.active {
            if f.maintenance_margin.0 > 0 && f.equity < f.maintenance_margin {
                ep.active = true;
                out.push(TriggerKind::Liquidate);
                if f.equity.0 < 0 {
                    ep.bankrupt = true;
                    out.push(TriggerKind::Bankrupt);
                }
            }
        } else if f.equity >= f.initial_margin || !has_positions {
            *ep = Ep::default();
        } else if f.equity.0 < 0 && !ep.bankrupt {
            ep.bankrupt = true;
            out.push(TriggerKind::Bankrupt);
        }
        out
    }

    /// Evaluates every unit of every account and advances its episode.
    fn detect(&mut self) -> Vec<Trigger> {
        let mut triggers = Vec::new();
        let mut live: BTreeMap<(String, Option<String>), (UnitFigures, bool)> = BTreeMap::new();
        for (id, acct) in &self.accounts {
            let has = acct.positions.values().any(|p| p.mode == MarginMode::Cross && p.qty.0 != 0);
            live.insert((id.clone(), None), (self.cross(acct), has));
            for (symbol, p) in &acct.positions {
                if p.mode == MarginMode::Isolated && p.qty.0 != 0 {
                    live.insert((id.clone(), Some(symbol.clone())), (self.isolated(symbol, p), true));
                }
            }
        }
        // Units that no longer exist end their episodes.
        self.episodes.retain(|k, _| live.contains_key(k));
        for (key, (f, has)) in live {
            let ep = self.episodes.entry(key.clone()).or_default();
            for kind in Self::step(ep, &f, has) {
                triggers.push(Trigger {
                    offset: self.offset,
                    account: key.0.clone(),
                    symbol: key.1.clone(),
                    kind,
                    equity: f.equity,
                    maintenance_margin: f.maintenance_margin,
                    uncovered: None,
                });
            }
        }
        triggers.sort();
        triggers
    }

    /// Every account's view, sorted by id.
    pub fn views(&self) -> Vec<AccountView> {
        self.accounts.iter().map(|(id, a)| self.view(id, a)).collect()
    }

    fn view(&self, id: &str, acct: &Acct) -> AccountView {
        let cross = self.cross(acct);
        let groups = self.groups(acct);
        let mut positions = Vec::new();
        for (symbol, p) in &acct.positions {
            if p.qty.0 == 0 {
                continue;
            }
            let pf = self.figures(symbol, p);
            let mark = self.prices.get(symbol).copied();
            let grouped = self.grouped(&groups, symbol, p);
            let tiers = match self.names.get(symbol) {
                Some(Named::Instrument { kind: Kind::Perp(t) | Kind::Future(t), .. }) if !grouped => Some(t),
                _ => None,
            };
            let (liq, bank) = match (tiers, mark) {
                (Some(t), Some(m)) => {
                    let (e, others) = if p.mode == MarginMode::Isolated {
                        (p.wallet.saturating_add(pf.value), Amount::ZERO)
                    } else {
                        (cross.equity, cross.maintenance_margin.saturating_sub(pf.maintenance_margin))
                    };
                    (liquidation_price(e, p.qty, m, others, t), bankruptcy_price(e, p.qty, m))
                }
                _ => (None, None),
            };
            positions.push(PositionView {
                symbol: symbol.clone(),
                qty: p.qty,
                entry_price: entry_price(p.qty, p.cost_e16),
                mark_price: mark,
                unrealized_pnl: pf.unrealized_pnl,
                initial_margin: (!grouped).then_some(pf.initial_margin),
                maintenance_margin: (!grouped).then_some(pf.maintenance_margin),
                margin_mode: p.mode,
                isolated_wallet: (p.mode == MarginMode::Isolated).then_some(p.wallet),
                liquidation_price: liq,
                bankruptcy_price: bank,
            });
        }
        AccountView {
            account: id.to_owned(),
            equity: cross.equity,
            initial_margin: cross.initial_margin,
            maintenance_margin: cross.maintenance_margin,
            available: cross.equity.saturating_sub(cross.initial_margin),
            liquidatable: is_liquidatable(cross.equity, cross.maintenance_margin),
            balances: acct
                .balances
                .iter()
                .filter(|(a, v)| **a == self.quote || v.0 != 0)
                .map(|(a, v)| (a.clone(), *v))
                .collect(),
            positions,
            margin: if acct.portfolio { MarginModel::Portfolio } else { MarginModel::Standard },
            groups,
        }
    }
}

/// The standard normal distribution function, from the complementary error function.
fn ref_norm(x: f64) -> f64 {
    0.5 * libm::erfc(-x / 2f64.sqrt())
}

/// Black-76 without discounting, written out again from `portfolio-margin.md` (independent of the model crate).
pub fn ref_black76(right: Right, u: f64, k: f64, t: f64, sigma: f64) -> f64 {
    let intrinsic = match right {
        Right::Call => (u - k).max(0.0),
        Right::Put => (k - u).max(0.0),
    };
    if t <= 0.0 || sigma <= 0.0 || u <= 0.0 {
        return intrinsic;
    }
    let v = sigma * t.sqrt();
    let d1 = ((u / k).ln() + v * v / 2.0) / v;
    let d2 = d1 - v;
    let value = match right {
        Right::Call => u * ref_norm(d1) - k * ref_norm(d2),
        Right::Put => k * ref_norm(-d2) - u * ref_norm(-d1),
    };
    let cap = if right == Right::Call { u } else { k };
    value.max(intrinsic).min(cap)
}

/// The implied volatility in [0.001, 10] by plain bisection (100 halvings: far below the contract's 1e-10).
pub fn ref_implied_vol(right: Right, u: f64, k: f64, t: f64, mark: f64) -> f64 {
    if t <= 0.0 || u <= 0.0 || mark <= ref_black76(right, u, k, t, 0.001) {
        return 0.001;
    }
    if mark >= ref_black76(right, u, k, t, 10.0) {
        return 10.0;
    }
    let (mut lo, mut hi) = (0.001f64, 10.0f64);
    for _ in 0..100 {
        let mid = (lo + hi) / 2.0;
        if ref_black76(right, u, k, t, mid) < mark {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}
