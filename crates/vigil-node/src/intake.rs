//! What the node's listeners (TCP and HTTP) hand the sequencer, and what they get back: the types both sides
//! share, in a module of their own so that neither listener depends on the other or on the sequencer's module.

use tokio::sync::oneshot;
use vigil_model::{Event, Offset, Rejection, RejectionRecord};

use crate::producers::SequenceError;

/// The answer to a durable batch: its offsets, and whether it was a producer's resend of a batch already journaled
/// (then nothing was appended and the offsets are the original ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub first: Offset,
    pub last: Offset,
    pub duplicate: bool,
}

/// Why a batch got no ack.
#[derive(Debug)]
pub enum Refusal {
    /// The journal failed: nothing is acknowledged any more and the node exits.
    Journal(String),
    /// The producer's sequence number does not follow its last batch.
    Sequence(SequenceError),
    /// The node takes no events of its own: it consumes a partition of a stream (cluster mode).
    Source(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Journal(e) => write!(f, "journal failure, nothing acknowledged: {e}"),
            Refusal::Sequence(e) => write!(f, "{e}"),
            Refusal::Source(e) => write!(f, "{e}"),
        }
    }
}

pub type AckReply = oneshot::Sender<Result<Ack, Refusal>>;

/// One sequenced input: an event, or input rejected before it became one (it takes an offset all the same).
pub enum Item {
    Event(Event),
    Invalid(Rejection),
}

/// A batch from a client: items with their encoded journal records.
pub struct IngestBatch {
    pub items: Vec<(Item, Vec<u8>)>,
    /// The producer's id and this batch's sequence number, for idempotent resends (`producers.rs`).
    pub producer: Option<(String, u64)>,
    /// The offset range, once durable.
    pub reply: AckReply,
    /// The batch's rejections, once every shard has applied it (HTTP answers with them; TCP does not ask).
    pub report: Option<oneshot::Sender<Vec<RejectionRecord>>>,
}
