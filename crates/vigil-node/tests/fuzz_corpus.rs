//! Replays the saved fuzz corpus through the same functions the fuzz targets call. A corpus input that panics
//! here is a regression of a fixed bug or a new one.
//!
//! The corpus is kept as one pack per target (`fuzz/<target>.corpus`: `u32 LE length | bytes`, repeated), the
//! minimised corpus of the last campaign plus the seeds and every crash found, rather than thousands of files.
//! Between campaigns (from `crates/vigil-node`):
//!
//! ```sh
//! cargo test --test fuzz_corpus -- --ignored --exact unpack         # packs → fuzz/corpus/<target>/ (gitignored)
//! cargo +nightly fuzz run -O -a wire fuzz/corpus/wire -- -max_total_time=900
//! cargo +nightly fuzz cmin -O -a wire fuzz/corpus/wire
//! cargo test --test fuzz_corpus -- --ignored --exact pack         # fuzz/corpus/<target>/ → packs
//! ```

use std::path::{Path, PathBuf};

const TARGETS: [&str; 2] = ["wire", "json"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn read_pack(target: &str) -> Vec<Vec<u8>> {
    let path = fuzz_dir().join(format!("{target}.corpus"));
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut rest = &bytes[..];
    let mut out = Vec::new();
    while rest.len() >= 4 {
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert!(rest.len() >= 4 + len, "truncated pack {}", path.display());
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes in {}", path.display());
    out
}

fn replay(target: &str, run: fn(&[u8])) -> usize {
    let inputs = read_pack(target);
    for (i, data) in inputs.iter().enumerate() {
        let outcome = std::panic::catch_unwind(|| run(data));
        assert!(outcome.is_ok(), "input {i} of {target}.corpus panicked");
    }
    inputs.len()
}

#[test]
#[ignore = "maintenance: writes the packs from fuzz/corpus/<target>/"]
fn pack() {
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        let mut files: Vec<PathBuf> =
            std::fs::read_dir(&dir).expect("corpus dir").map(|e| e.expect("entry").path()).collect();
        files.sort();
        let mut pack = Vec::new();
        for f in files {
            let data = std::fs::read(&f).expect("readable");
            pack.extend_from_slice(&(data.len() as u32).to_le_bytes());
            pack.extend_from_slice(&data);
        }
        std::fs::write(fuzz_dir().join(format!("{target}.corpus")), pack).expect("write pack");
    }
}

#[test]
#[ignore = "maintenance: writes fuzz/corpus/<target>/ from the packs"]
fn unpack() {
    for target in TARGETS {
        let dir = fuzz_dir().join("corpus").join(target);
        std::fs::create_dir_all(&dir).expect("corpus dir");
        for (i, data) in read_pack(target).iter().enumerate() {
            std::fs::write(dir.join(format!("pack-{i:05}")), data).expect("write input");
        }
    }
}

#[test]
fn the_wire_corpus_replays_without_a_panic() {
    assert!(replay("wire", vigil_node::fuzzing::wire_stream) >= 100, "the campaign's corpus is there");
}

#[test]
fn the_json_corpus_replays_without_a_panic() {
    assert!(replay("json", vigil_node::fuzzing::json_body) >= 100);
}

#[test]
fn a_hostile_length_claim_is_refused_without_allocating_it() {
    // The fuzzer's first find: a string length prefix of 60 GB in a 40-byte frame aborted the process.
    let mut body = vec![1u8, 1, 0]; // version, one event, variant 0 (asset)
    body.extend_from_slice(&[0xFD, 0, 0, 0, 0, 0, 0, 0, 0x40]); // varint u64 string length 2^62 bytes
    let err = vigil_node::wire::decode_batch(&body).expect_err("refused");
    assert!(err.to_string().contains("malformed"), "{err}");
}
