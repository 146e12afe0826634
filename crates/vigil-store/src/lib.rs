//! Durable storage for the node: the append-only event journal and the codec of what it stores.

pub mod checkpoint;
pub mod codec;
pub mod journal;
pub mod sim;
pub mod storage;

pub use journal::{Journal, JournalConfig, JournalError, Recovered};
pub use storage::{OsStorage, Storage};

/// Where a node keeps its data under its `--data` directory.
pub mod layout {
    use std::path::{Path, PathBuf};

    pub fn journal(data: &Path) -> PathBuf {
        data.join("journal")
    }

    pub fn checkpoints(data: &Path) -> PathBuf {
        data.join("checkpoints")
    }

    /// The running node's advisory lock (holds its pid).
    pub fn lock(data: &Path) -> PathBuf {
        data.join("LOCK")
    }
}

/// Takes the data directory's advisory lock (`flock`), so that one node at a time uses it: a second node would
/// truncate the first one's in-flight journal tail as "torn". Held until the returned file is dropped (or the
/// process dies: the kernel releases it). The error names the holder's pid.
pub fn lock_data_dir(data: &std::path::Path) -> Result<std::fs::File, String> {
    use std::io::Write;
    std::fs::create_dir_all(data).map_err(|e| format!("creating {}: {e}", data.display()))?;
    let path = layout::lock(data);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {
            file.set_len(0)
                .and_then(|()| writeln!(file, "{}", std::process::id()))
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("writing {}: {e}", path.display()))?;
            Ok(file)
        }
        Err(std::fs::TryLockError::WouldBlock) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(format!(
                "the data directory {} is in use by another vigil node (pid {}, holding {}); one node per data \
                 directory",
                data.display(),
                holder.trim(),
                path.display()
            ))
        }
        Err(std::fs::TryLockError::Error(e)) => Err(format!("locking {}: {e}", path.display())),
    }
}
