//! The `vigil` binary's library: the commands, so that tests drive exactly the code the binary runs.

pub mod config;
pub mod fuzzing;
pub mod handoff;
pub mod http;
pub mod inspect;
pub mod load;
pub mod metrics;
pub mod persist;
pub mod pipeline;
pub mod producers;
pub mod recovery;
pub mod replay;
pub mod serve;
pub mod sync;
pub mod wire;
