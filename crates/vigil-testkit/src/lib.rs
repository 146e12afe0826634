//! Test oracles and workloads: a deliberately naive reference model, seeded generators of adversarial event
//! streams, and the synthetic workload behind `vigil gen`.
//!
//! It depends on `vigil-model` only: an oracle that shared the engine's code would share its bugs.

pub mod compare;
pub mod generate;
pub mod reference;
pub mod rng;
pub mod workload;

pub use generate::{StreamConfig, generate};
pub use reference::Reference;
pub use rng::Rng;
pub use workload::{Workload, write_workload};
