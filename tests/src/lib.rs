//! Helpers shared by the integration tests.

use vigil_node::replay::{ReplayOptions, replay};

/// Runs the replay command's code path on a stream and returns the document it prints.
pub fn replay_text(input: &str, shards: usize) -> String {
    let mut out = Vec::new();
    let options = ReplayOptions { shards, ..ReplayOptions::default() };
    replay(input.as_bytes(), &mut out, &options, None).expect("replay of an in-memory stream cannot fail");
    String::from_utf8(out).expect("replay prints UTF-8")
}

/// The directory of bundled test data.
pub fn data_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data")
}
