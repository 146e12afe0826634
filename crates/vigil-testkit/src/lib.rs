//! Test oracles: a deliberately naive reference model and seeded generators of event streams.
//!
//! It depends on `vigil-model` only: an oracle that shared the engine's code would share its bugs.

pub mod generate;
pub mod reference;
pub mod rng;

pub use generate::{StreamConfig, generate};
pub use reference::Reference;
pub use rng::Rng;
