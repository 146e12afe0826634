//! What replay prints: account views, triggers and rejections, and their JSON form (`events.md`, "What replay
//! prints"). Both the engine and the reference model produce these types, so they compare with `==`.

use std::fmt::Write as _;
use std::io::{self, Write};

use serde::{Deserialize, Serialize};

use crate::event::{MarginMode, MarginModel};
use crate::num::{Amount, Price, Qty, Rate, write_fixed};
use crate::portfolio::VolCase;
use crate::reject::Reason;

/// A sequencer offset: the first event is 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Offset(pub u64);

impl Offset {
    /// The offset after this one.
    pub fn next(self) -> Offset {
        Offset(self.0 + 1)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PositionView {
    pub symbol: String,
    pub qty: Qty,
    pub entry_price: Option<Price>,
    pub mark_price: Option<Price>,
    pub unrealized_pnl: Amount,
    /// `None` for a position in a portfolio group (the group carries the margin).
    pub initial_margin: Option<Amount>,
    pub maintenance_margin: Option<Amount>,
    pub margin_mode: MarginMode,
    pub isolated_wallet: Option<Amount>,
    pub liquidation_price: Option<Price>,
    pub bankruptcy_price: Option<Price>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    pub account: String,
    pub equity: Amount,
    pub initial_margin: Amount,
    pub maintenance_margin: Amount,
    pub available: Amount,
    pub liquidatable: bool,
    /// Sorted by asset name: the quote always, other assets while non-zero.
    pub balances: Vec<(String, Amount)>,
    /// Open positions, sorted by symbol.
    pub positions: Vec<PositionView>,
    pub margin: MarginModel,
    /// A portfolio account's groups, sorted by underlying (empty for a standard account).
    pub groups: Vec<GroupView>,
}

/// A portfolio group's figures (`portfolio-margin.md`, "What the document shows").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupView {
    pub underlying: String,
    pub scanning_risk: Amount,
    pub contingency: Amount,
    pub initial_margin: Amount,
    pub maintenance_margin: Amount,
    /// The scenario of the scanning risk: its relative price move and volatility case.
    pub worst_move: Rate,
    pub worst_vol: VolCase,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TriggerKind {
    Liquidate,
    Bankrupt,
    /// A liquidation's deficit the insurance fund did not hold (contract v2, `liquidation.md`).
    Deleverage,
}

impl TriggerKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            TriggerKind::Liquidate => "liquidate",
            TriggerKind::Bankrupt => "bankrupt",
            TriggerKind::Deleverage => "deleverage",
        }
    }
}

/// A liquidation trigger. Field order is the contract's sort order: offset, account, symbol (cross first), kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Trigger {
    pub offset: Offset,
    pub account: String,
    /// `None` for the cross account; the symbol of an isolated position.
    pub symbol: Option<String>,
    pub kind: TriggerKind,
    pub equity: Amount,
    pub maintenance_margin: Amount,
    /// A `deleverage` trigger's uncovered loss; `None` for the other kinds.
    pub uncovered: Option<Amount>,
}

/// A liquidation fill as the document reports it (`liquidation.md`, "What the document shows").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiquidationRecord {
    pub offset: Offset,
    pub account: String,
    pub symbol: String,
    /// The part closed, signed like the position.
    pub qty: Qty,
    pub price: Price,
    pub bankruptcy_price: Option<Price>,
    pub fee: Amount,
    /// The deficit the fund paid (`|D|` rounded up; the fund may go below zero).
    pub fund_paid: Amount,
    /// The part of the deficit the fund did not hold (decided where fund movements are folded in offset order).
    pub uncovered: Amount,
    /// The unit's figures after the fill and the fund transfer (for an isolated position closed whole, the cross
    /// account's): what a `deleverage` trigger reports.
    pub equity: Amount,
    pub maintenance_margin: Amount,
}
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectionRecord {
    pub offset: Offset,
    pub reason: Reason,
    pub message: String,
}

fn fixed(s: &mut String, raw: i128) {
    s.push('"');
    // Writing to a String cannot fail.
    let _ = write_fixed(s, raw);
    s.push('"');
}

fn opt_price(s: &mut String, p: Option<Price>) {
    match p {
        Some(p) => fixed(s, p.wide()),
        None => s.push_str("null"),
    }
}

fn opt_amount(s: &mut String, a: Option<Amount>) {
    match a {
        Some(a) => fixed(s, a.0),
        None => s.push_str("null"),
    }
}

fn string(s: &mut String, v: &str) {
    // Serializing a &str cannot fail.
    s.push_str(&serde_json::to_string(v).unwrap_or_default());
}

impl AccountView {
    /// The account's JSON object, compact, keys in the contract's order.
    pub fn to_json(&self) -> String {
        self.to_json_with(|_| None)
    }

    /// [`AccountView::to_json`], each position gaining `"adl_bucket"` (1–5, or `null`) from `adl(position index)`
    /// (the node's account object).
    pub fn to_json_with_adl(&self, adl: impl Fn(usize) -> Option<u8>) -> String {
        self.to_json_with(|i| Some(adl(i)))
    }

    fn to_json_with(&self, adl: impl Fn(usize) -> Option<Option<u8>>) -> String {
        let mut s = String::with_capacity(256 + 320 * self.positions.len());
        s.push_str("{\"account\":");
        string(&mut s, &self.account);
        s.push_str(",\"equity\":");
        fixed(&mut s, self.equity.0);
        s.push_str(",\"initial_margin\":");
        fixed(&mut s, self.initial_margin.0);
        s.push_str(",\"maintenance_margin\":");
        fixed(&mut s, self.maintenance_margin.0);
        s.push_str(",\"available\":");
        fixed(&mut s, self.available.0);
        let _ = write!(s, ",\"liquidatable\":{},\"margin\":\"{}\"", self.liquidatable, self.margin.as_str());
        s.push_str(",\"balances\":{");
        for (i, (asset, amount)) in self.balances.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            string(&mut s, asset);
            s.push(':');
            fixed(&mut s, amount.0);
        }
        s.push_str("},\"positions\":[");
        for (i, p) in self.positions.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str("{\"symbol\":");
            string(&mut s, &p.symbol);
            s.push_str(",\"qty\":");
            fixed(&mut s, p.qty.wide());
            s.push_str(",\"entry_price\":");
            opt_price(&mut s, p.entry_price);
            s.push_str(",\"mark_price\":");
            opt_price(&mut s, p.mark_price);
            s.push_str(",\"unrealized_pnl\":");
            fixed(&mut s, p.unrealized_pnl.0);
            s.push_str(",\"initial_margin\":");
            opt_amount(&mut s, p.initial_margin);
            s.push_str(",\"maintenance_margin\":");
            opt_amount(&mut s, p.maintenance_margin);
            let _ = write!(s, ",\"margin_mode\":\"{}\"", p.margin_mode.as_str());
            s.push_str(",\"isolated_wallet\":");
            match p.isolated_wallet {
                Some(w) => fixed(&mut s, w.0),
                None => s.push_str("null"),
            }
            s.push_str(",\"liquidation_price\":");
            opt_price(&mut s, p.liquidation_price);
            s.push_str(",\"bankruptcy_price\":");
            opt_price(&mut s, p.bankruptcy_price);
            match adl(i) {
                None => {}
                Some(Some(b)) => {
                    let _ = write!(s, ",\"adl_bucket\":{b}");
                }
                Some(None) => s.push_str(",\"adl_bucket\":null"),
            }
            s.push('}');
        }
        s.push(']');
        if self.margin == MarginModel::Portfolio {
            s.push_str(",\"groups\":[");
            for (i, g) in self.groups.iter().enumerate() {
                if i > 0 {
                    s.push(',');
                }
                s.push_str("{\"underlying\":");
                string(&mut s, &g.underlying);
                s.push_str(",\"scanning_risk\":");
                fixed(&mut s, g.scanning_risk.0);
                s.push_str(",\"contingency\":");
                fixed(&mut s, g.contingency.0);
                s.push_str(",\"initial_margin\":");
                fixed(&mut s, g.initial_margin.0);
                s.push_str(",\"maintenance_margin\":");
                fixed(&mut s, g.maintenance_margin.0);
                s.push_str(",\"worst\":{\"move\":");
                fixed(&mut s, g.worst_move.wide());
                let _ = write!(s, ",\"vol\":\"{}\"}}}}", g.worst_vol.as_str());
            }
            s.push(']');
        }
        s.push('}');
        s
    }
}

impl Trigger {
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(160);
        let _ = write!(s, "{{\"offset\":{},\"account\":", self.offset.0);
        string(&mut s, &self.account);
        let _ = write!(s, ",\"kind\":\"{}\",\"symbol\":", self.kind.as_str());
        match &self.symbol {
            Some(sym) => string(&mut s, sym),
            None => s.push_str("null"),
        }
        s.push_str(",\"equity\":");
        fixed(&mut s, self.equity.0);
        s.push_str(",\"maintenance_margin\":");
        fixed(&mut s, self.maintenance_margin.0);
        if let Some(u) = self.uncovered {
            s.push_str(",\"uncovered\":");
            fixed(&mut s, u.0);
        }
        s.push('}');
        s
    }
}

impl LiquidationRecord {
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(256);
        let _ = write!(s, "{{\"offset\":{},\"account\":", self.offset.0);
        string(&mut s, &self.account);
        s.push_str(",\"symbol\":");
        string(&mut s, &self.symbol);
        s.push_str(",\"qty\":");
        fixed(&mut s, self.qty.wide());
        s.push_str(",\"price\":");
        fixed(&mut s, self.price.wide());
        s.push_str(",\"bankruptcy_price\":");
        match self.bankruptcy_price {
            Some(b) => fixed(&mut s, b.wide()),
            None => s.push_str("null"),
        }
        s.push_str(",\"fee\":");
        fixed(&mut s, self.fee.0);
        s.push_str(",\"fund_paid\":");
        fixed(&mut s, self.fund_paid.0);
        s.push_str(",\"uncovered\":");
        fixed(&mut s, self.uncovered.0);
        s.push('}');
        s
    }
}

/// The insurance fund's line in the document: `{"balance", "fees", "paid", "uncovered"}`.
pub fn fund_json(fund: &crate::liquidation::InsuranceFund) -> String {
    let mut s = String::with_capacity(128);
    s.push_str("{\"balance\":");
    fixed(&mut s, fund.balance.0);
    s.push_str(",\"fees\":");
    fixed(&mut s, fund.fees.0);
    s.push_str(",\"paid\":");
    fixed(&mut s, fund.paid.0);
    s.push_str(",\"uncovered\":");
    fixed(&mut s, fund.uncovered.0);
    s.push('}');
    s
}

impl RejectionRecord {
    pub fn to_json(&self) -> String {
        let mut s = String::with_capacity(96 + self.message.len());
        let _ = write!(s, "{{\"offset\":{},\"reason\":\"{}\",\"message\":", self.offset.0, self.reason.as_str());
        string(&mut s, &self.message);
        s.push('}');
        s
    }
}

/// The parts of a replay document: the lists as iterators of already-rendered JSON objects, so a caller can
/// stream them (from a spool file, say, hence the `io::Result` items).
pub struct Document<A, T, R, L> {
    pub offset: Offset,
    pub accounts: A,
    pub triggers: T,
    pub rejections: R,
    /// The insurance fund, rendered ([`fund_json`]).
    pub insurance_fund: String,
    pub liquidations: L,
}

/// Writes a replay document: `offset`, then `accounts`, `triggers`, `rejections`, `insurance_fund` and
/// `liquidations`, one element per line.
pub fn write_document<W, A, T, R, L>(out: &mut W, doc: Document<A, T, R, L>) -> io::Result<()>
where
    W: Write,
    A: IntoIterator<Item = io::Result<String>>,
    T: IntoIterator<Item = io::Result<String>>,
    R: IntoIterator<Item = io::Result<String>>,
    L: IntoIterator<Item = io::Result<String>>,
{
    writeln!(out, "{{\n\"offset\": {},", doc.offset.0)?;
    write_list(out, "accounts", doc.accounts)?;
    out.write_all(b",\n")?;
    write_list(out, "triggers", doc.triggers)?;
    out.write_all(b",\n")?;
    write_list(out, "rejections", doc.rejections)?;
    write!(out, ",\n\"insurance_fund\": {}", doc.insurance_fund)?;
    out.write_all(b",\n")?;
    write_list(out, "liquidations", doc.liquidations)?;
    out.write_all(b"\n}\n")
}

fn write_list<W: Write>(out: &mut W, key: &str, items: impl IntoIterator<Item = io::Result<String>>) -> io::Result<()> {
    write!(out, "\"{key}\": [")?;
    let mut first = true;
    for item in items {
        let item = item?;
        out.write_all(if first { b"\n  " } else { b",\n  " })?;
        out.write_all(item.as_bytes())?;
        first = false;
    }
    if !first {
        out.write_all(b"\n")?;
    }
    out.write_all(b"]")
}
