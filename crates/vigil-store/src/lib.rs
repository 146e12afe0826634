//! Durable storage for the node: the append-only event journal and the codec of what it stores.

pub mod checkpoint;
pub mod codec;
pub mod journal;

pub use journal::{Journal, JournalConfig, JournalError, Recovered};

/// Where a node keeps its data under its `--data` directory.
pub mod layout {
    use std::path::{Path, PathBuf};

    pub fn journal(data: &Path) -> PathBuf {
        data.join("journal")
    }

    pub fn checkpoints(data: &Path) -> PathBuf {
        data.join("checkpoints")
    }
}
