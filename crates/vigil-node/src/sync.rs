//! The synchronisation primitives the handoff protocol uses: std's, or loom's under `--cfg vigil_loom` so the
//! protocol can be model-checked (tokio's `crate::sync` pattern).

#[cfg(not(vigil_loom))]
pub use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
#[cfg(not(vigil_loom))]
pub use std::thread;

#[cfg(vigil_loom)]
pub use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering, fence};
#[cfg(vigil_loom)]
pub use loom::thread;
