//! `vigil inspect --data DIR`: what is on disk: the journal's durable offset and segments, each shard's checkpoint
//! watermark, and with `--verify` a check of every record's CRC and offset.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use vigil_model::Offset;
use vigil_store::checkpoint::{CheckpointStore, SledStore};
use vigil_store::journal::{self, JournalConfig};
use vigil_store::layout;

/// Writes the report to `out`; with `verify`, reads every record (an error names the segment and byte).
pub fn inspect(data: &Path, verify: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let journal_dir = layout::journal(data);
    writeln!(out, "data: {}", data.display())?;
    if journal_dir.is_dir() {
        let mut segments: Vec<(String, u64)> = std::fs::read_dir(&journal_dir)
            .with_context(|| format!("listing {}", journal_dir.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
            .collect();
        segments.sort();
        writeln!(out, "journal: {} segment(s)", segments.len())?;
        for (name, bytes) in &segments {
            writeln!(out, "  {name}  {bytes} bytes")?;
        }
        if verify {
            let mut records = 0u64;
            let last = journal::read(&journal_dir, &JournalConfig::default(), Offset(1), |_, _| {
                records += 1;
                Ok(())
            })
            .context("verifying the journal")?;
            writeln!(
                out,
                "journal verified: {records} records, every CRC and offset correct, durable offset {}",
                last.0
            )?;
        } else {
            writeln!(out, "journal: run with --verify to check every record")?;
        }
    } else {
        writeln!(out, "journal: none")?;
    }
    let checkpoint_dir = layout::checkpoints(data);
    if checkpoint_dir.is_dir() {
        let store = SledStore::open(&checkpoint_dir).context("opening the checkpoint store")?;
        let shards = store.shards();
        writeln!(out, "checkpoints: {} shard(s), {} bytes on disk", shards.len(), store.size_on_disk()?)?;
        for shard in shards {
            writeln!(out, "  shard {shard}: offset {}", store.offset(shard)?.0)?;
        }
    } else {
        writeln!(out, "checkpoints: none")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_store::journal::{Journal, OsSyncer};

    #[test]
    fn reports_segments_checkpoints_and_verifies() {
        // Proves inspect lists what is on disk, verifies a sound journal, and names a corrupt one.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) =
            Journal::open(&layout::journal(dir.path()), JournalConfig::default(), Box::new(OsSyncer)).unwrap();
        for i in 1..=50 {
            j.append(Offset(i), format!("payload {i}").as_bytes()).unwrap();
        }
        j.commit().unwrap();
        let segment = j.segments()[0].path.clone();
        drop(j);
        {
            let mut s = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
            s.write(0, Offset(42), b"m", &[("a", b"x".to_vec())], &[]).unwrap();
        }
        let mut out = Vec::new();
        inspect(dir.path(), true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains("journal: 1 segment(s)"), "{text}");
        assert!(text.contains("50 records"), "{text}");
        assert!(text.contains("shard 0: offset 42"), "{text}");
        let mut bytes = std::fs::read(&segment).unwrap();
        bytes[40] ^= 1;
        std::fs::write(&segment, bytes).unwrap();
        let err = inspect(dir.path(), true, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("00000000000000000001.log"), "{err:#}");
    }
}
