//! Replays the saved fuzz corpus (`crates/vigil-node/fuzz/corpus`, minimised after each fuzzing campaign, plus
//! every crash found, kept as a regression) through the same functions the fuzz targets call. A corpus input that
//! panics here is a regression of a fixed bug or a new one.

use std::path::Path;

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("entry").path();
        let data = std::fs::read(&path).expect("readable");
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", path.display());
        n += 1;
    }
    n
}

#[test]
fn the_wire_corpus_replays_without_a_panic() {
    assert!(replay("wire", vigil_node::fuzzing::wire_stream) >= 6, "seeds and the OOM regression are there");
}

#[test]
fn the_json_corpus_replays_without_a_panic() {
    assert!(replay("json", vigil_node::fuzzing::json_body) >= 7);
}

#[test]
fn a_hostile_length_claim_is_refused_without_allocating_it() {
    // The fuzzer's first find: a string length prefix of 60 GB in a 40-byte frame aborted the process.
    let mut body = vec![1u8, 1, 0]; // version, one event, variant 0 (asset)
    body.extend_from_slice(&[0xFD, 0, 0, 0, 0, 0, 0, 0, 0x40]); // varint u64 string length 2^62 bytes
    let err = vigil_node::wire::decode_batch(&body).expect_err("refused");
    assert!(err.to_string().contains("malformed"), "{err}");
}
