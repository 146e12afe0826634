//! Indexed detection's table of portfolio groups, one per underlying: what a tick of the underlying's index
//! revalues, laid out so the tick streams through it.
//!
//! A portfolio account with a group is re-evaluated on every tick of a price it depends on (its figures are not
//! monotone in them: no band is sound). When the index is the only figure of the account a tick moves (no balance
//! in the asset, nothing charged on its own that follows it), the evaluation reduces to the group: the linear legs'
//! marks, the quantities and the parameters are those of the account's last evaluation, so only the options' sums
//! per scenario and the contingencies' index change. Such a group has a row here: the account, its option legs as
//! (column, weight), its [`GroupShape`] and its current margin. A tick refreshes each option's vector once into a
//! dense matrix (one column per option held), then goes down the rows: a few dot products against the matrix, the
//! margin from the shape ([`group_margin_from`], the same code and bits as a full evaluation), the account's cross
//! margins moved by the group's change and its episode stepped — one write to the account, no walk through its
//! positions, balances or caches. The row's account is then not re-evaluated (its dependency on the index is
//! neither banded nor in the slot's `always` list).
//!
//! Rows are derived state: rebuilt from each exact evaluation of the account ([`GroupTable::sync`]), never
//! persisted, identical after a restore. A row applies only at the market epoch it was built at (any reference
//! data, clock or parameter change since sends its account to a full evaluation, which rebuilds it), and only
//! while every figure fits the fast path's arithmetic; otherwise its account is re-evaluated in full, as it was
//! before the table existed.

use vigil_model::portfolio::{GroupMargin, GroupShape, group_margin_from, leg_weight};
use vigil_model::{Amount, Offset, Trigger};

use crate::account::{Account, IndexOnlyGroup, step_cross};
use crate::market::{Market, Slot};

/// The most option legs a row holds; a larger group stays with the full evaluation.
pub const ROW_LEGS: usize = 8;

/// Figures the fast path moves must stay below this (2^100 at 1e-8), so that adding a group's change to the
/// account's total gives exactly the sum a full evaluation computes (which saturates, and never gets near it).
const SUM_LIMIT: i128 = 1 << 100;

const FREE: u32 = u32::MAX;

/// The most columns (option slots) a table numbers.
const COLUMNS_MAX: usize = u16::MAX as usize + 1;
const NO_COLUMN: u32 = u32::MAX;

#[derive(Clone, Default)]
pub struct GroupTable {
    rows: Vec<Row>,
    free: Vec<u32>,
    live: u32,
    /// The columns of `matrix`: each an option slot and how many row legs refer to it.
    columns: Vec<Column>,
    /// Per option slot, its column ([`NO_COLUMN`] without one). A column no leg refers to keeps its slot until
    /// another slot takes it.
    column_of: Vec<u32>,
    /// Columns no leg refers to (each listed once), for reuse.
    free_columns: Vec<u16>,
    /// Each column's scenario vector as of the last tick, `n` floats per column; `valid` per column.
    matrix: Vec<f64>,
    valid: Vec<bool>,
    /// Sums for a grid of other than the default 27 scenarios.
    scratch: Vec<f64>,
}

impl std::fmt::Debug for GroupTable {
    /// Derived state that does not change what the engine computes: left out of the engine's debug form.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GroupTable")
    }
}

#[derive(Clone, Copy)]
struct Column {
    slot: Slot,
    refs: u32,
    /// In `free_columns`.
    listed_free: bool,
}

#[derive(Clone)]
struct Row {
    /// The account, or [`FREE`].
    account: u32,
    /// The market epoch the row was built at.
    epoch: u64,
    legs: u8,
    /// The option legs in position order: their column and weight ([`leg_weight`]).
    columns: [u16; ROW_LEGS],
    weights: [f64; ROW_LEGS],
    shape: GroupShape,
    /// The group's margin as the account's cross figures include it now.
    margin: GroupMargin,
}

/// What a row is built from: the account's group and what its legs reduce to.
struct Built {
    epoch: u64,
    legs: u8,
    options: [(Slot, f64); ROW_LEGS],
    shape: GroupShape,
    margin: GroupMargin,
}

impl GroupTable {
    /// Rows in use.
    pub fn live(&self) -> u32 {
        self.live
    }

    /// Rows allocated, in use or free.
    pub fn allocated(&self) -> usize {
        self.rows.len()
    }

    /// The row a group gets from its account's evaluation; `None` (no row: the account stays with the full
    /// evaluation for this underlying) past [`ROW_LEGS`] options, or without a shape.
    fn build(market: &Market, group: &IndexOnlyGroup<'_>) -> Option<Built> {
        let options = group.legs.iter().filter(|(_, _, option)| *option).count();
        if options > ROW_LEGS {
            return None;
        }
        let params = market.risk_params(group.underlying);
        // A perp or future without a mark has no row (its account stays with the full evaluation); past this
        // check every linear leg has one, so `None` below marks the options alone.
        if group.legs.iter().any(|&(slot, _, option)| !option && market.price(slot).is_none()) {
            return None;
        }
        let legs = group.legs.iter().map(|&(slot, qty, option)| (qty, market.price(slot).filter(|_| !option)));
        let shape = GroupShape::of_quantities(&params, legs)?;
        let mut built =
            Built { epoch: group.epoch, legs: 0, options: [(0, 0.0); ROW_LEGS], shape, margin: group.margin };
        for &(slot, qty, _) in group.legs.iter().filter(|(_, _, option)| *option) {
            built.options[built.legs as usize] = (slot, leg_weight(qty));
            built.legs += 1;
        }
        Some(built)
    }

    /// Whether `built`'s options all have, or can get, a column: one per option slot held, numbered in 16 bits.
    /// (Conservative: a free column that could be reused is not counted.)
    fn has_columns_for(&self, built: &Built) -> bool {
        let new = built.options[..built.legs as usize]
            .iter()
            .filter(|(slot, _)| self.column_of.get(*slot as usize).is_none_or(|c| *c == NO_COLUMN))
            .count();
        self.columns.len() + new <= COLUMNS_MAX
    }

    /// Option `slot`'s column, taking a reference to it: its own if it has one, else a column no row refers to
    /// any more, else a new one.
    fn column(&mut self, slot: Slot) -> u16 {
        let s = slot as usize;
        if let Some(&c) = self.column_of.get(s).filter(|c| **c != NO_COLUMN) {
            self.columns[c as usize].refs += 1;
            return c as u16;
        }
        if self.column_of.len() <= s {
            self.column_of.resize(s + 1, NO_COLUMN);
        }
        while let Some(c) = self.free_columns.pop() {
            let column = &mut self.columns[c as usize];
            column.listed_free = false;
            if column.refs == 0 {
                self.column_of[column.slot as usize] = NO_COLUMN;
                *column = Column { slot, refs: 1, listed_free: false };
                self.column_of[s] = u32::from(c);
                return c;
            }
        }
        self.columns.push(Column { slot, refs: 1, listed_free: false });
        let c = (self.columns.len() - 1) as u16;
        self.column_of[s] = u32::from(c);
        c
    }

    fn release(&mut self, r: u32) {
        let row = &self.rows[r as usize];
        for &c in &row.columns[..row.legs as usize] {
            let column = &mut self.columns[c as usize];
            column.refs -= 1;
            if column.refs == 0 && !column.listed_free {
                column.listed_free = true;
                self.free_columns.push(c);
            }
        }
    }

    fn put(&mut self, r: Option<u32>, account: u32, built: &Built) -> u32 {
        if let Some(r) = r {
            self.release(r);
        }
        let mut columns = [0u16; ROW_LEGS];
        let mut weights = [0.0f64; ROW_LEGS];
        for (i, &(slot, weight)) in built.options[..built.legs as usize].iter().enumerate() {
            columns[i] = self.column(slot);
            weights[i] = weight;
        }
        let row = Row {
            account,
            epoch: built.epoch,
            legs: built.legs,
            columns,
            weights,
            shape: built.shape,
            margin: built.margin,
        };
        match r.or_else(|| self.free.pop()) {
            Some(r) => {
                if self.rows[r as usize].account == FREE {
                    self.live += 1;
                }
                self.rows[r as usize] = row;
                r
            }
            None => {
                self.live += 1;
                self.rows.push(row);
                (self.rows.len() - 1) as u32
            }
        }
    }

    fn remove(&mut self, r: u32) {
        self.release(r);
        self.rows[r as usize].account = FREE;
        self.rows[r as usize].legs = 0;
        self.free.push(r);
        self.live -= 1;
    }

    /// Brings account `a`'s rows in line with its evaluation that just ran: a row for each group its
    /// `GroupCache` marks as moved alone by its index (and that fits a row), none for any other. `tables` is
    /// indexed by underlying slot and grows as needed. Returns, through `acc.rows`, the underlyings the account
    /// now has rows for.
    pub fn sync(tables: &mut Vec<GroupTable>, market: &Market, acc: &mut Account, a: u32) {
        let mut rows = std::mem::take(&mut acc.rows);
        let mut wanted: Vec<(Slot, Built)> = Vec::new();
        for group in acc.groups.index_only() {
            if let Some(built) = GroupTable::build(market, &group) {
                wanted.push((group.underlying, built));
            }
        }
        rows.retain(|&(u, r)| {
            let keep = wanted.iter().any(|(w, _)| *w == u);
            if !keep {
                tables[u as usize].remove(r);
            }
            keep
        });
        for (u, built) in &wanted {
            if tables.len() <= *u as usize {
                tables.resize_with(*u as usize + 1, GroupTable::default);
            }
            let table = &mut tables[*u as usize];
            let existing = rows.iter().find(|(x, _)| x == u).map(|(_, r)| *r);
            if !table.has_columns_for(built) {
                // Columns are numbered in 16 bits: past that many options held on one underlying, a group that
                // needs a new column stays with the full evaluation.
                if let Some(r) = existing {
                    table.remove(r);
                    rows.retain(|(x, _)| x != u);
                }
                continue;
            }
            let r = table.put(existing, a, built);
            if existing.is_none() {
                rows.push((*u, r));
            }
        }
        acc.rows = rows;
    }

    /// Refreshes every column's vector into the matrix for the current prices; `n` scenarios each.
    fn refresh(&mut self, market: &Market, n: usize) {
        self.matrix.resize(self.columns.len() * n, 0.0);
        self.valid.resize(self.columns.len(), false);
        let mut cache = market.vectors.borrow_mut();
        for (c, &Column { slot, refs, .. }) in self.columns.iter().enumerate() {
            self.valid[c] = false;
            if refs == 0 || cache.refresh(market, slot).is_none() {
                continue;
            }
            if let Some(v) = cache.get(slot).filter(|v| v.deltas.len() == n) {
                self.matrix[c * n..(c + 1) * n].copy_from_slice(&v.deltas);
                self.valid[c] = true;
            }
        }
    }

    /// A tick of this table's underlying `u` (its index now at the market's price): revalues every row's group
    /// and updates its account, appending the accounts a row cannot serve (built at another epoch, an option
    /// without a vector, a figure out of the fast path's range) to `full` for a full evaluation. Marks accounts
    /// whose episode changed in `dirty`. Returns the number of accounts revalued.
    #[allow(clippy::too_many_arguments)]
    pub fn tick(
        &mut self,
        market: &Market,
        u: Slot,
        accounts: &mut [Account],
        offset: Offset,
        triggers: &mut Vec<Trigger>,
        full: &mut Vec<u32>,
        dirty: &mut Vec<u32>,
    ) -> u64 {
        let live = self.rows.iter().filter(|r| r.account != FREE).map(|r| r.account);
        let Some(index) = market.price(u) else {
            full.extend(live);
            return 0;
        };
        let params = market.risk_params(u);
        let n = params.scenario_count();
        self.refresh(market, n);
        let epoch = market.epoch();
        let mut revalued = 0;
        let mut scratch = std::mem::take(&mut self.scratch);
        for row in &mut self.rows {
            if row.account == FREE {
                continue;
            }
            let legs = &row.columns[..row.legs as usize];
            if row.epoch != epoch || !legs.iter().all(|&c| self.valid.get(c as usize) == Some(&true)) {
                full.push(row.account);
                continue;
            }
            let margin = if n == DEFAULT_SCENARIOS {
                option_sums::<DEFAULT_SCENARIOS>(row, &self.matrix)
                    .and_then(|sums| group_margin_from(&params, index, &row.shape, &sums))
            } else {
                scratch.clear();
                scratch.resize(n, 0.0);
                let mut complete = true;
                for (&c, &q) in legs.iter().zip(&row.weights) {
                    let Some(column) = self.matrix.get(c as usize * n..(c as usize + 1) * n) else {
                        complete = false;
                        break;
                    };
                    for (s, d) in scratch.iter_mut().zip(column) {
                        *s += q * d;
                    }
                }
                if complete { group_margin_from(&params, index, &row.shape, &scratch) } else { None }
            };
            let Some(acc) = accounts.get_mut(row.account as usize) else {
                debug_assert!(false, "invariant: a row's account exists");
                continue;
            };
            let Some(margin) = margin.filter(|m| in_range(m.initial_margin) && in_range(m.maintenance_margin)) else {
                full.push(row.account);
                continue;
            };
            let cross = acc.cross;
            if ![
                cross.initial_margin,
                cross.maintenance_margin,
                row.margin.initial_margin,
                row.margin.maintenance_margin,
            ]
            .into_iter()
            .all(in_range)
            {
                full.push(row.account);
                continue;
            }
            // Exact: every term of the full evaluation's sum is below 2^100, so it never saturated.
            acc.cross.initial_margin =
                Amount(cross.initial_margin.0 - row.margin.initial_margin.0 + margin.initial_margin.0);
            acc.cross.maintenance_margin =
                Amount(cross.maintenance_margin.0 - row.margin.maintenance_margin.0 + margin.maintenance_margin.0);
            row.margin = margin;
            let episode = acc.episode;
            // A group has an open cross position; the isolated units' figures did not move.
            step_cross(acc, true, offset, triggers);
            if acc.episode != episode && !acc.dirty {
                acc.dirty = true;
                dirty.push(row.account);
            }
            revalued += 1;
        }
        self.scratch = scratch;
        revalued
    }
}

/// The default grid's scenario count (4 buckets: 9 price steps × 3 volatility cases).
const DEFAULT_SCENARIOS: usize = 27;

/// A row's options summed for every scenario, as [`vigil_model::portfolio::add_options`] sums a group's legs:
/// from zero, legs in order, `weight × delta` added per scenario; the grid's size known, so the sums stay in
/// registers.
fn option_sums<const N: usize>(row: &Row, matrix: &[f64]) -> Option<[f64; N]> {
    let mut sums = [0.0f64; N];
    for (&c, &q) in row.columns[..row.legs as usize].iter().zip(&row.weights) {
        let column = matrix.get(c as usize * N..(c as usize + 1) * N)?;
        for (s, d) in sums.iter_mut().zip(column) {
            *s += q * d;
        }
    }
    Some(sums)
}

fn in_range(x: Amount) -> bool {
    (0..SUM_LIMIT).contains(&x.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::Qty;
    use vigil_model::portfolio::RiskParams;

    fn built(slots: &[Slot]) -> Built {
        let shape = GroupShape::of_quantities(&RiskParams::default(), slots.iter().map(|_| (Qty::units(1), None)))
            .expect("a shape");
        let mut b = Built { epoch: 0, legs: 0, options: [(0, 0.0); ROW_LEGS], shape, margin: no_margin() };
        for &s in slots {
            b.options[b.legs as usize] = (s, 1.0);
            b.legs += 1;
        }
        b
    }

    fn no_margin() -> GroupMargin {
        GroupMargin {
            scanning_risk: Amount::ZERO,
            contingency: Amount::ZERO,
            initial_margin: Amount::ZERO,
            maintenance_margin: Amount::ZERO,
            worst: RiskParams::default().scenario(0),
        }
    }

    /// Every live row's legs point at columns of their own slots, and each column's count is its legs.
    fn consistent(t: &GroupTable) {
        let mut refs = vec![0u32; t.columns.len()];
        for row in t.rows.iter().filter(|r| r.account != FREE) {
            for &c in &row.columns[..row.legs as usize] {
                refs[c as usize] += 1;
                assert_eq!(t.column_of[t.columns[c as usize].slot as usize], u32::from(c));
            }
        }
        assert_eq!(refs, t.columns.iter().map(|c| c.refs).collect::<Vec<_>>());
    }

    #[test]
    fn columns_are_shared_released_and_reused() {
        // Proves a column belongs to one option slot at a time: shared by the rows holding the slot, free once no
        // row does, taken back by its slot or reused by another, and never handed out while a row refers to it.
        let mut t = GroupTable::default();
        let a = t.put(None, 0, &built(&[10, 11]));
        let b = t.put(None, 1, &built(&[11]));
        assert_eq!(t.columns.len(), 2);
        consistent(&t);
        t.remove(a);
        consistent(&t);
        // Slot 10's column is free; slot 12 takes it, slot 10 then needs a new one.
        t.put(None, 2, &built(&[12]));
        assert_eq!(t.columns.len(), 2);
        t.put(None, 3, &built(&[10]));
        assert_eq!(t.columns.len(), 3);
        consistent(&t);
        // Row b's group changes: slot 11's column is released (free), then taken back by the same slot in the same
        // rebuild; its stale free entry is skipped when slot 13 needs a column.
        t.put(Some(b), 1, &built(&[11, 12]));
        t.put(None, 4, &built(&[13]));
        assert_eq!(t.columns.len(), 4);
        consistent(&t);
        assert_eq!(t.live(), 4);
    }

    #[test]
    fn an_underlying_with_more_options_held_than_columns_keeps_the_rest_out_of_the_table() {
        // Proves the 16-bit column numbers never wrap: past 65 536 option slots held, a group needing a new
        // column is refused a row, while one on slots that have columns still gets one.
        let mut t = GroupTable::default();
        for s in 0..COLUMNS_MAX as Slot {
            let b = built(&[s]);
            assert!(t.has_columns_for(&b));
            t.put(None, s, &b);
        }
        assert!(!t.has_columns_for(&built(&[COLUMNS_MAX as Slot])));
        assert!(t.has_columns_for(&built(&[0, 65_535])));
        consistent(&t);
    }
}
