//! Durable storage for the node: the append-only event journal and the codec of what it stores.

pub mod checkpoint;
pub mod codec;
pub mod journal;

pub use journal::{Journal, JournalConfig, JournalError, Recovered};
