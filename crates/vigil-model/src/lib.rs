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
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in account.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % shards.max(1) as u64) as usize
}
