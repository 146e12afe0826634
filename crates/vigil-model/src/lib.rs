//! Vigil's pure core: fixed-point numbers, the events of the stream, instruments and the formulas of the margin
//! model. No state machine lives here: the engine and the reference model both build on these pieces.

pub mod event;
pub mod liquidation;
pub mod margin;
pub mod num;
pub mod portfolio;
pub mod reject;
pub mod view;

pub use event::{
    Event, Fill, MarginMode, MarginModel, Name, OptionMargin, Right, Side, TierSpec, Timestamp, parse_flat_trade,
    parse_line, parse_line_full, parse_value, validate,
};
pub use margin::{OptionTerms, PositionFigures, Tier, Tiers, UnitFigures};
pub use num::{Amount, Price, Qty, Rate, Round};
pub use reject::{Reason, Rejection, reject};
pub use view::{
    AccountView, GroupView, LiquidationRecord, Offset, PositionView, RejectionRecord, Trigger, TriggerKind,
};

/// The quote currency's name by default (config `quote`).
pub const QUOTE_DEFAULT: &str = "USDC";

/// The shard an account belongs to among `shards`: FNV-1a of the id, so it never changes between builds or runs.
pub fn shard_of(account: &str, shards: usize) -> usize {
    (fnv1a(account.as_bytes()) % shards.max(1) as u64) as usize
}

/// FNV-1a (64-bit) of `bytes`.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// An account's mixed hash: FNV-1a of its UTF-8 bytes, then MurmurHash3's 64-bit finalizer (`fmix64`). Stable
/// across builds and runs; its bits are independent of [`shard_of`]'s choice (FNV-1a's own high bits are not mixed
/// enough for short, similar names: `a0`…`a1999` split 85/15 on them).
pub fn account_hash(account: &str) -> u64 {
    let mut h = fnv1a(account.as_bytes());
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}
