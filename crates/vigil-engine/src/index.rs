//! A price slot's index of safe bands (indexed detection): which accounts a tick to a given price pushes out of
//! their band.
//!
//! Lower edges sit in a max-heap and upper edges in a min-heap, so a tick pops exactly the edges its price crossed
//! (`lo > price`, `hi < price`: a band `[lo, hi]` is inclusive). The heaps are lazy: re-banding an account pushes
//! its new edges under a fresh stamp, which its [`Dep`](crate::account::Dep) keeps, and leaves the old edges where
//! they are; an edge whose stamp is no longer its account's is stale and is dropped when it surfaces. A re-band is
//! then two heap pushes (amortised O(1)) instead of four ordered-set updates, and a tick still finds the same
//! accounts an ordered set would. When the heaps hold more than twice the live edges (plus a constant), the engine
//! rebuilds them from the slot's dependents, which bounds their size and the work stale edges cost to amortised
//! O(1) per re-band.
//!
//! Why it stays exact: a live edge is always in its heap (pushed when its band was set, put back by the tick that
//! popped it if the re-evaluation left the band as it was), so no account a tick should find is missed; a stale
//! edge taken for live could only re-evaluate its account once more, which changes nothing. Stamps are per slot;
//! one comes back only after 2^32 re-bands on the slot, and rebuilds (which keep only live edges) come far more
//! often than that whenever edges are pushed.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::band::Band;

/// Stale edges tolerated beyond the live ones before a rebuild. Debug builds (every test) rebuild far more often,
/// so the engine's tests run through rebuilds, and the live counts are checked against the bands at each one.
const SLACK: usize = if cfg!(debug_assertions) { 8 } else { 1024 };

/// One edge of one account's band on this slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Edge {
    pub price: i64,
    pub account: u32,
    pub stamp: u32,
}

/// Which side of its band an edge is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Lo,
    Hi,
}

#[derive(Clone, Debug, Default)]
pub(crate) struct SlotIndex {
    lo: BinaryHeap<Edge>,
    hi: BinaryHeap<Reverse<Edge>>,
    /// Accounts with a lower / upper edge on this slot (the live entries of each heap).
    lo_live: usize,
    hi_live: usize,
    /// The last stamp given out on this slot (0: none; a `Dep` without edges carries 0).
    stamp: u32,
    /// Accounts re-evaluated on every change of this price instead (`band::always_reevaluated`).
    pub always: Vec<u32>,
}

impl SlotIndex {
    /// Moves account `a`'s band on this slot from `old` to `new` (which differ); returns the stamp its new edges
    /// carry, for its `Dep`.
    pub fn reband(&mut self, a: u32, old: Band, new: Band) -> u32 {
        self.drop_band(old);
        self.stamp = self.stamp.wrapping_add(1).max(1);
        if let Some(price) = new.lo {
            self.lo.push(Edge { price, account: a, stamp: self.stamp });
            self.lo_live += 1;
        }
        if let Some(price) = new.hi {
            self.hi.push(Reverse(Edge { price, account: a, stamp: self.stamp }));
            self.hi_live += 1;
        }
        self.stamp
    }

    /// An account's band leaves the slot (its edges become stale).
    pub fn drop_band(&mut self, old: Band) {
        self.lo_live -= usize::from(old.lo.is_some());
        self.hi_live -= usize::from(old.hi.is_some());
    }

    /// Pops every edge `price` crosses; the live ones (`live(account, stamp)`) go to `out` with their side.
    pub fn cross(&mut self, price: i64, live: impl Fn(u32, u32) -> bool, out: &mut Vec<(Side, Edge)>) {
        while let Some(&e) = self.lo.peek().filter(|e| e.price > price) {
            self.lo.pop();
            if live(e.account, e.stamp) {
                out.push((Side::Lo, e));
            }
        }
        while let Some(&Reverse(e)) = self.hi.peek().filter(|e| e.0.price < price) {
            self.hi.pop();
            if live(e.account, e.stamp) {
                out.push((Side::Hi, e));
            }
        }
    }

    /// Puts back a popped edge that is still its account's (its band did not change when re-evaluated).
    pub fn restore(&mut self, side: Side, e: Edge) {
        match side {
            Side::Lo => self.lo.push(e),
            Side::Hi => self.hi.push(Reverse(e)),
        }
    }

    /// Whether stale edges have grown past the bound a rebuild restores.
    pub fn needs_rebuild(&self) -> bool {
        self.lo.len() > 2 * self.lo_live + SLACK || self.hi.len() > 2 * self.hi_live + SLACK
    }

    /// Rebuilds both heaps from the live bands: `(account, stamp, band)` of every account banded on this slot.
    pub fn rebuild(&mut self, bands: impl Iterator<Item = (u32, u32, Band)>) {
        let mut lo = std::mem::take(&mut self.lo).into_vec();
        let mut hi = std::mem::take(&mut self.hi).into_vec();
        lo.clear();
        hi.clear();
        for (account, stamp, band) in bands {
            if let Some(price) = band.lo {
                lo.push(Edge { price, account, stamp });
            }
            if let Some(price) = band.hi {
                hi.push(Reverse(Edge { price, account, stamp }));
            }
        }
        debug_assert_eq!((lo.len(), hi.len()), (self.lo_live, self.hi_live), "invariant: live counts match the bands");
        self.lo = BinaryHeap::from(lo);
        self.hi = BinaryHeap::from(hi);
    }

    #[cfg(test)]
    fn len(&self) -> (usize, usize) {
        (self.lo.len(), self.hi.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{BTreeMap, BTreeSet};

    fn band(lo: Option<i64>, hi: Option<i64>) -> Band {
        Band { lo, hi }
    }

    /// The index against ordered sets of the live bands, under random re-bands, drops, ticks and rebuilds: a tick
    /// finds exactly the accounts whose live band its price leaves, and the heaps stay bounded.
    #[test]
    fn a_tick_finds_exactly_the_accounts_whose_live_band_it_leaves() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let mut idx = SlotIndex::default();
        // account -> (stamp, band), as the accounts' `Dep`s would hold them.
        let mut bands: BTreeMap<u32, (u32, Band)> = BTreeMap::new();
        let mut out = Vec::new();
        for step in 0..50_000 {
            let a = next(500) as u32;
            match next(10) {
                0..=5 => {
                    let p = next(1000) as i64;
                    let new =
                        band((next(4) > 0).then(|| p - next(50) as i64), (next(4) > 0).then(|| p + next(50) as i64));
                    let old = bands.get(&a).map_or(Band::default(), |b| b.1);
                    if old != new {
                        let stamp = idx.reband(a, old, new);
                        bands.insert(a, (stamp, new));
                    }
                }
                6 => {
                    if let Some((_, old)) = bands.remove(&a) {
                        idx.drop_band(old);
                    }
                }
                _ => {
                    let price = next(1000) as i64;
                    let expected: BTreeSet<u32> = bands
                        .iter()
                        .filter(|(_, (_, b))| b.lo.is_some_and(|lo| lo > price) || b.hi.is_some_and(|hi| hi < price))
                        .map(|(a, _)| *a)
                        .collect();
                    out.clear();
                    idx.cross(price, |a, s| bands.get(&a).is_some_and(|b| b.0 == s), &mut out);
                    let found: BTreeSet<u32> = out.iter().map(|(_, e)| e.account).collect();
                    assert_eq!(found, expected, "step {step}, price {price}");
                    // Popped accounts keep their band half the time (re-evaluated, unchanged): those edges return.
                    for &(side, e) in &out {
                        if e.account % 2 == 0 {
                            idx.restore(side, e);
                        } else {
                            let old = bands[&e.account].1;
                            let new = band(Some(price - 60), Some(price + 60));
                            let stamp = idx.reband(e.account, old, new);
                            bands.insert(e.account, (stamp, new));
                        }
                    }
                }
            }
            if idx.needs_rebuild() {
                idx.rebuild(bands.iter().map(|(a, (s, b))| (*a, *s, *b)));
            }
            let (lo, hi) = idx.len();
            assert!(lo <= 2 * 500 + SLACK + 2 && hi <= 2 * 500 + SLACK + 2, "step {step}: {lo} / {hi} edges");
        }
    }
}
