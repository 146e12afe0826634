//! The durability seam under the journal: the few file-system operations it uses, behind a trait, so that the
//! same journal code runs on the real disk ([`OsStorage`]) and on a simulated one that loses what was not synced
//! when the power is cut ([`crate::sim::SimStorage`]), or fails on demand.
//!
//! What the journal assumes of an implementation (and `OsStorage` assumes of the disk): after `sync_data` returns,
//! the file's bytes and length written so far survive a power cut; after `sync_dir` returns, the directory's entries
//! (files created, renamed, removed in it) survive a power cut; nothing else is promised. A write may be torn at any
//! byte by a power cut before its sync.

use std::fmt::Debug;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// How [`Storage::open`] opens a file for writing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Open {
    /// The file must exist.
    Existing,
    /// The file must not exist; it is created empty.
    CreateNew,
    /// Created if missing, emptied if present.
    Truncate,
}

/// A file open for writing.
pub trait StorageFile: Send {
    /// Writes all of `buf` at byte `pos` (growing the file if needed).
    fn write_at(&mut self, buf: &[u8], pos: u64) -> io::Result<()>;
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// `fdatasync`: the bytes and length written so far are durable.
    fn sync_data(&mut self) -> io::Result<()>;
}

/// The file-system operations the journal needs.
pub trait Storage: Send + Sync + Debug {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries of `dir`, in any order.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Reads into `buf` from byte `pos` until it is full or the file ends; returns the bytes read.
    fn read_at(&self, path: &Path, pos: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// The length of the file at `path` (an error if there is none).
    fn len(&self, path: &Path) -> io::Result<u64>;
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn StorageFile>>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of the directory: its entries are durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
}

/// The real disk: `pwrite`, `fdatasync`, and `fsync` of the directory.
#[derive(Clone, Copy, Debug, Default)]
pub struct OsStorage;

struct OsFile(File);

impl StorageFile for OsFile {
    fn write_at(&mut self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.0.write_all_at(buf, pos)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Storage for OsStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(dir)? {
            // A name that is not UTF-8 is nothing the journal wrote.
            if let Ok(name) = entry?.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }
    fn read_at(&self, path: &Path, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let file = File::open(path)?;
        let mut n = 0;
        while n < buf.len() {
            match file.read_at(&mut buf[n..], pos + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        Ok(fs::metadata(path)?.len())
    }
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn StorageFile>> {
        let mut o = OpenOptions::new();
        o.write(true);
        match how {
            Open::Existing => {}
            Open::CreateNew => {
                o.create_new(true);
            }
            Open::Truncate => {
                o.create(true).truncate(true);
            }
        }
        Ok(Box::new(OsFile(o.open(path)?)))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
}
