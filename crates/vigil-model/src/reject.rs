//! Rejection reasons: the machine-readable codes of `events.md`, and a human message.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Why an event was rejected. The `as_str` names are the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Reason {
    InvalidEvent,
    InvalidNumber,
    InvalidReference,
    UnknownSymbol,
    UnknownAsset,
    UnknownAccount,
    NoPrice,
    ModeMismatch,
    InstrumentSettled,
    InsufficientBalance,
    InsufficientMargin,
    /// Contract v2: a `clock` earlier than the current time.
    ClockRegression,
}

impl Reason {
    pub const ALL: [Reason; 12] = [
        Reason::InvalidEvent,
        Reason::InvalidNumber,
        Reason::InvalidReference,
        Reason::UnknownSymbol,
        Reason::UnknownAsset,
        Reason::UnknownAccount,
        Reason::NoPrice,
        Reason::ModeMismatch,
        Reason::InstrumentSettled,
        Reason::InsufficientBalance,
        Reason::InsufficientMargin,
        Reason::ClockRegression,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidEvent => "invalid_event",
            Reason::InvalidNumber => "invalid_number",
            Reason::InvalidReference => "invalid_reference",
            Reason::UnknownSymbol => "unknown_symbol",
            Reason::UnknownAsset => "unknown_asset",
            Reason::UnknownAccount => "unknown_account",
            Reason::NoPrice => "no_price",
            Reason::ModeMismatch => "mode_mismatch",
            Reason::InstrumentSettled => "instrument_settled",
            Reason::InsufficientBalance => "insufficient_balance",
            Reason::InsufficientMargin => "insufficient_margin",
            Reason::ClockRegression => "clock_regression",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A rejected event's reason and message (the offset is attached by whoever knows it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: Reason,
    pub message: String,
}

impl Rejection {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self { reason, message: message.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.message)
    }
}

/// Shorthand constructors, so validation code reads as the rule it checks.
pub fn reject(reason: Reason, message: impl Into<String>) -> Rejection {
    Rejection::new(reason, message)
}
