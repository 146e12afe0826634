//! Idempotent producers: a producer names itself and numbers its batches 1, 2, 3…; the node remembers, per producer,
//! the last batch it journaled and the offsets it took. A resend of that batch (its ack was lost to a crash, a
//! timeout, a dropped connection) is answered with the original offsets and appends nothing; a gap or a
//! regression is refused with a clear error. The table is rebuilt at recovery from its checkpointed copy plus the
//! stamps of the journal records after it (`vigil_store::codec::Stamp`), so it holds across restarts.
//!
//! Only a producer's **last** batch can be resent: a producer waits for each ack before reusing a connection's
//! place in the sequence, or resends its in-flight batches in order (each is then the last when it arrives).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use vigil_model::Offset;

/// Producers the node remembers at most; a new one beyond is refused (never silently forgotten: forgetting one
/// would let its resend be applied twice).
pub const PRODUCERS_MAX: usize = 65_536;
/// Longest producer id, in bytes.
pub const PRODUCER_BYTES_MAX: usize = 64;

/// The last batch a producer had journaled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastBatch {
    pub sequence: u64,
    pub first: Offset,
    pub last: Offset,
}

/// What to do with a stamped batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The next batch of the producer: sequence it.
    Fresh,
    /// The producer's last batch again: answer with its offsets, append nothing.
    Duplicate(LastBatch),
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SequenceError {
    #[error(
        "producer {producer:?}: sequence {got} where {expected} was expected: batches {expected} to {} never \
         reached this node; resend from {expected}",
        got - 1
    )]
    Gap { producer: String, expected: u64, got: u64 },
    #[error(
        "producer {producer:?}: sequence {got} is older than its last journaled batch {last}; only the last batch \
         can be resent"
    )]
    Regression { producer: String, last: u64, got: u64 },
    #[error("producer {producer:?} is new and this node already remembers {PRODUCERS_MAX} producers")]
    TooMany { producer: String },
    #[error("producer id must be 1 to {PRODUCER_BYTES_MAX} bytes of text without control characters")]
    BadId,
    #[error("sequence numbers start at 1")]
    ZeroSequence,
}

impl SequenceError {
    /// The error's code in the HTTP API.
    pub fn code(&self) -> &'static str {
        match self {
            SequenceError::Gap { .. } => "sequence_gap",
            SequenceError::Regression { .. } => "sequence_regression",
            SequenceError::TooMany { .. } => "too_many_producers",
            SequenceError::BadId => "invalid_producer",
            SequenceError::ZeroSequence => "invalid_sequence",
        }
    }
}

/// Whether `id` is a valid producer id.
pub fn valid_id(id: &str) -> bool {
    (1..=PRODUCER_BYTES_MAX).contains(&id.len()) && !id.chars().any(char::is_control)
}

/// Every producer's last batch. A `BTreeMap`, so its encoding is the same for the same contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Producers {
    last: BTreeMap<String, LastBatch>,
}

impl Producers {
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }

    pub fn get(&self, producer: &str) -> Option<LastBatch> {
        self.last.get(producer).copied()
    }

    /// Decides what a batch stamped `(producer, sequence)` is.
    pub fn check(&self, producer: &str, sequence: u64) -> Result<Verdict, SequenceError> {
        if !valid_id(producer) {
            return Err(SequenceError::BadId);
        }
        if sequence == 0 {
            return Err(SequenceError::ZeroSequence);
        }
        let Some(last) = self.last.get(producer) else {
            if self.last.len() >= PRODUCERS_MAX {
                return Err(SequenceError::TooMany { producer: producer.to_owned() });
            }
            return match sequence {
                1 => Ok(Verdict::Fresh),
                got => Err(SequenceError::Gap { producer: producer.to_owned(), expected: 1, got }),
            };
        };
        match sequence {
            s if s == last.sequence => Ok(Verdict::Duplicate(*last)),
            s if s == last.sequence + 1 => Ok(Verdict::Fresh),
            s if s > last.sequence => {
                Err(SequenceError::Gap { producer: producer.to_owned(), expected: last.sequence + 1, got: s })
            }
            s => Err(SequenceError::Regression { producer: producer.to_owned(), last: last.sequence, got: s }),
        }
    }

    /// Records a journaled batch (sequenced, or found in the journal at recovery).
    pub fn record(&mut self, producer: &str, batch: LastBatch) {
        if let Some(old) = self.last.get(producer) {
            debug_assert!(old.sequence < batch.sequence, "invariant: a producer's sequence increases");
        }
        self.last.insert(producer.to_owned(), batch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_are_fresh_duplicate_gap_or_regression() {
        // Proves the rules: a new producer starts at 1; the next number is fresh; the last is a duplicate
        // answered with its offsets; anything else is refused with the numbers in the message.
        let mut p = Producers::default();
        assert_eq!(p.check("gw-1", 1), Ok(Verdict::Fresh));
        let gap = p.check("gw-1", 3).unwrap_err();
        assert_eq!(gap.code(), "sequence_gap");
        assert!(gap.to_string().contains("sequence 3 where 1 was expected"), "{gap}");
        p.record("gw-1", LastBatch { sequence: 1, first: Offset(1), last: Offset(4) });
        let dup = LastBatch { sequence: 1, first: Offset(1), last: Offset(4) };
        assert_eq!(p.check("gw-1", 1), Ok(Verdict::Duplicate(dup)));
        assert_eq!(p.check("gw-1", 2), Ok(Verdict::Fresh));
        p.record("gw-1", LastBatch { sequence: 2, first: Offset(5), last: Offset(5) });
        let old = p.check("gw-1", 1).unwrap_err();
        assert!(old.to_string().contains("sequence 1 is older than its last journaled batch 2"), "{old}");
        assert_eq!(p.check("gw-1", 9).unwrap_err().code(), "sequence_gap");
        assert_eq!(p.check("", 1), Err(SequenceError::BadId));
        assert_eq!(p.check("x\n", 1), Err(SequenceError::BadId));
        assert_eq!(p.check("gw-2", 0), Err(SequenceError::ZeroSequence));
    }
}
