//! `vigil inspect --data DIR`: what is on disk: the journal's segments, each shard's checkpoint watermark, and with
//! `--verify` a check of every record (CRC, offset, payload decodes) and of the watermarks against the journal's
//! range. Read-only: the journal is only read, and the checkpoint store is opened from a copy (sled 0.34 has no
//! read-only mode, and opening it would take the running node's lock or write to its files).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use vigil_model::Offset;
use vigil_store::checkpoint::{CheckpointStore, SledStore};
use vigil_store::journal::{self, JournalConfig};
use vigil_store::layout;

use crate::recovery::replayable;

/// Copies a directory tree (files and subdirectories).
pub fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// Writes the report to `out`; with `verify`, reads every record (an error names the segment and byte) and checks
/// that the journal holds everything after the oldest watermark and nothing a watermark is ahead of.
pub fn inspect(data: &Path, verify: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let journal_dir = layout::journal(data);
    writeln!(out, "data: {}", data.display())?;
    let mut range = None::<(Offset, Offset)>;
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
            let mut first = None;
            let last = journal::read(&journal_dir, &JournalConfig::default(), Offset(1), |offset, payload| {
                records += 1;
                first.get_or_insert(offset);
                replayable(payload).map(|_| ())
            })
            .context("verifying the journal")?;
            let first = first.unwrap_or(last.next());
            range = Some((first, last));
            writeln!(
                out,
                "journal verified: {records} records (offsets {} to {}), every CRC, offset and payload correct",
                first.0, last.0
            )?;
        } else {
            writeln!(out, "journal: run with --verify to check every record")?;
        }
    } else {
        writeln!(out, "journal: none")?;
    }
    let checkpoint_dir = layout::checkpoints(data);
    if checkpoint_dir.is_dir() {
        let copy = tempfile::tempdir().context("creating a directory for a copy of the checkpoint store")?;
        copy_tree(&checkpoint_dir, copy.path())
            .with_context(|| format!("copying {} to read it", checkpoint_dir.display()))?;
        let store = SledStore::open(copy.path()).context("opening (a copy of) the checkpoint store")?;
        let shards = store.shards()?;
        writeln!(out, "checkpoints: {} shard(s), {} bytes on disk", shards.len(), store.size_on_disk()?)?;
        let mut watermarks = Vec::new();
        for shard in shards {
            let w = store.offset(shard)?;
            writeln!(out, "  shard {shard}: offset {}", w.0)?;
            watermarks.push((shard, w));
        }
        if let Some((first, last)) = range {
            for (shard, w) in &watermarks {
                anyhow::ensure!(
                    *w <= last,
                    "shard {shard}'s checkpoint is at offset {}, beyond the journal's end at {}: recovery would refuse",
                    w.0,
                    last.0
                );
            }
            if let Some((shard, oldest)) = watermarks.iter().min_by_key(|(_, w)| *w) {
                anyhow::ensure!(
                    first <= oldest.next(),
                    "the journal starts at offset {}, but shard {shard}'s checkpoint is at offset {}: events {} to {} \
                     are missing; recovery would refuse",
                    first.0,
                    oldest.0,
                    oldest.0 + 1,
                    first.0 - 1
                );
            }
            writeln!(out, "watermarks verified: the journal holds every event after each checkpoint")?;
        }
    } else {
        writeln!(out, "checkpoints: none")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use vigil_store::journal::Journal;
    use vigil_store::storage::OsStorage;

    fn deposit(i: u64) -> Vec<u8> {
        let line = format!(r#"{{"type":"deposit","account":"a{i}","asset":"USDC","amount":"1"}}"#);
        let mut payload = Vec::new();
        vigil_store::codec::encode_event(&vigil_model::parse_line(&line).unwrap(), &mut payload).unwrap();
        payload
    }

    /// Every file under `dir` with its bytes.
    fn snapshot(dir: &Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn reports_segments_checkpoints_and_verifies() {
        // Proves inspect lists what is on disk, verifies a sound journal and its watermarks without changing a
        // byte of the checkpoint store, and names a corrupt record, an undecodable payload, a watermark beyond
        // the journal and a journal that starts after a watermark.
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig { segment_bytes_max: 1024, ..JournalConfig::default() };
        let (mut j, _) = Journal::open(&layout::journal(dir.path()), config, Arc::new(OsStorage)).unwrap();
        for i in 1..=50 {
            j.append(Offset(i), &deposit(i)).unwrap();
        }
        j.commit().unwrap();
        let segments = j.segments().to_vec();
        drop(j);
        {
            let mut s = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
            s.write(0, Offset(10), b"m", &[("a", b"x".to_vec())], &Default::default()).unwrap();
        }
        let before = snapshot(&layout::checkpoints(dir.path()));
        let mut out = Vec::new();
        inspect(dir.path(), true, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.contains(&format!("journal: {} segment(s)", segments.len())), "{text}");
        assert!(text.contains("50 records (offsets 1 to 50)"), "{text}");
        assert!(text.contains("shard 0: offset 10"), "{text}");
        assert!(text.contains("watermarks verified"), "{text}");
        assert_eq!(snapshot(&layout::checkpoints(dir.path())), before, "inspect wrote to the checkpoint store");

        // A journal that starts after the watermark + 1: the first segment removed.
        assert!(segments.len() > 1 && segments[1].first.0 > 11, "the test needs a segment boundary after 11");
        let saved = std::fs::read(&segments[0].path).unwrap();
        std::fs::remove_file(&segments[0].path).unwrap();
        let err = format!("{:#}", inspect(dir.path(), true, &mut Vec::new()).unwrap_err());
        assert!(err.contains(&format!("the journal starts at offset {}", segments[1].first.0)), "{err}");
        assert!(err.contains("checkpoint is at offset 10"), "{err}");
        std::fs::write(&segments[0].path, saved).unwrap();

        // A watermark beyond the journal's end.
        {
            let mut s = SledStore::open(&layout::checkpoints(dir.path())).unwrap();
            s.write(0, Offset(99), b"m", &[], &Default::default()).unwrap();
        }
        let err = format!("{:#}", inspect(dir.path(), true, &mut Vec::new()).unwrap_err());
        assert!(err.contains("checkpoint is at offset 99, beyond the journal's end at 50"), "{err}");

        // A payload with a valid CRC that does not decode.
        let (mut j, _) = Journal::open(&layout::journal(dir.path()), config_small(), Arc::new(OsStorage)).unwrap();
        j.append(Offset(51), b"not an event").unwrap();
        j.commit().unwrap();
        drop(j);
        let err = format!("{:#}", inspect(dir.path(), true, &mut Vec::new()).unwrap_err());
        assert!(err.contains("journal record 51 in") && err.contains("does not decode"), "{err}");

        // A flipped bit.
        let path = &segments[0].path;
        let mut bytes = std::fs::read(path).unwrap();
        bytes[40] ^= 1;
        std::fs::write(path, bytes).unwrap();
        let err = inspect(dir.path(), true, &mut Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("00000000000000000001.log"), "{err:#}");
    }

    fn config_small() -> JournalConfig {
        JournalConfig { segment_bytes_max: 1024, ..JournalConfig::default() }
    }
}
