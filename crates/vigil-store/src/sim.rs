//! A simulated file system for power-loss testing (TigerBeetle's storage simulator is the model): it keeps, per
//! file and per directory, what is durable and what is only written, and a [`SimStorage::power_cut`] drops what
//! was not synced.
//!
//! - A file's writes and length changes since its last `sync_data` are *pending*. A power cut keeps a random
//!   prefix of them, in order, and may tear the first one it drops at a random byte (a sector-less disk: the
//!   harshest tear the journal must survive).
//! - A directory's entry changes (create, rename, remove) since its last `sync_dir` are pending too; a power cut
//!   keeps a random prefix of them. A file whose name did not survive is gone, synced contents and all: that is
//!   what a missing directory fsync after creating a segment costs.
//! - Faults on purpose, for recovery's refusals: [`SimStorage::flip_bit`] (bit rot in synced data) and
//!   [`SimStorage::lose`] (a synced file gone).
//! - A lying disk, for proving the checks can fail: [`SimStorage::ignore_syncs`] makes `sync_data` or `sync_dir`
//!   return success without making anything durable (what a missing `fdatasync` or directory fsync looks like).
//!
//! Deterministic: every choice comes from the seed given to `power_cut`. Directories are created durable (the
//! node's data directory exists before it starts).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::storage::{Open, Storage, StorageFile};

type Inode = u64;

#[derive(Clone, Debug)]
enum FileOp {
    Write { pos: u64, bytes: Vec<u8> },
    SetLen(u64),
}

fn apply(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write { pos, bytes } => {
            let end = *pos as usize + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[*pos as usize..end].copy_from_slice(bytes);
        }
        FileOp::SetLen(len) => data.resize(*len as usize, 0),
    }
}

#[derive(Clone, Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    /// Operations since the last sync, oldest first.
    pending: Vec<FileOp>,
    current: Vec<u8>,
}

#[derive(Clone, Debug)]
enum DirOp {
    Link(String, Inode),
    Unlink(String),
    /// Atomic: a power cut keeps both halves or neither.
    Rename(String, String, Inode),
}

fn apply_dir(entries: &mut BTreeMap<String, Inode>, op: &DirOp) {
    match op {
        DirOp::Link(name, inode) => {
            entries.insert(name.clone(), *inode);
        }
        DirOp::Unlink(name) => {
            entries.remove(name);
        }
        DirOp::Rename(from, to, inode) => {
            entries.remove(from);
            entries.insert(to.clone(), *inode);
        }
    }
}

#[derive(Clone, Debug, Default)]
struct DirState {
    durable: BTreeMap<String, Inode>,
    pending: Vec<DirOp>,
    current: BTreeMap<String, Inode>,
}

impl DirState {
    fn change(&mut self, op: DirOp) {
        apply_dir(&mut self.current, &op);
        self.pending.push(op);
    }
}

#[derive(Debug, Default)]
struct State {
    dirs: BTreeMap<PathBuf, DirState>,
    files: BTreeMap<Inode, FileState>,
    next_inode: Inode,
    ignore_data_syncs: bool,
    ignore_dir_syncs: bool,
}

/// A small deterministic generator (SplitMix64): the simulator must not depend on the test kit.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// A number in `0..=n`.
    fn upto(&mut self, n: usize) -> usize {
        (self.next() % (n as u64 + 1)) as usize
    }
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, format!("{}: no such file (simulated)", path.display()))
}

fn split(path: &Path) -> io::Result<(PathBuf, String)> {
    let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: no file name", path.display())))?;
    Ok((dir, name.to_owned()))
}

/// The simulated disk; clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimStorage {
    state: Arc<Mutex<State>>,
}

impl SimStorage {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug in a test; the state is still consistent enough to read.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn inode_of(state: &State, path: &Path) -> io::Result<Inode> {
        let (dir, name) = split(path)?;
        state.dirs.get(&dir).and_then(|d| d.current.get(&name)).copied().ok_or_else(|| not_found(path))
    }

    /// Cuts the power: every file and directory keeps what was synced plus a random prefix of what was not (the
    /// first operation dropped from a file may land torn). Open handles keep writing to the surviving files, as
    /// a restarted process would after reopening them; callers reopen everything.
    pub fn power_cut(&self, seed: u64) {
        let mut rng = Rng(seed);
        let mut s = self.lock();
        for file in s.files.values_mut() {
            let keep = rng.upto(file.pending.len());
            let mut data = std::mem::take(&mut file.durable);
            for op in &file.pending[..keep] {
                apply(&mut data, op);
            }
            if let Some(FileOp::Write { pos, bytes }) = file.pending.get(keep)
                && rng.upto(1) == 1
            {
                let torn = rng.upto(bytes.len());
                apply(&mut data, &FileOp::Write { pos: *pos, bytes: bytes[..torn].to_vec() });
            }
            file.pending.clear();
            file.current = data.clone();
            file.durable = data;
        }
        for dir in s.dirs.values_mut() {
            let keep = rng.upto(dir.pending.len());
            let mut entries = std::mem::take(&mut dir.durable);
            for op in &dir.pending[..keep] {
                apply_dir(&mut entries, op);
            }
            dir.pending.clear();
            dir.current = entries.clone();
            dir.durable = entries;
        }
        // Files no directory names any more are gone.
        let live: BTreeSet<Inode> = s.dirs.values().flat_map(|d| d.current.values().copied()).collect();
        s.files.retain(|inode, _| live.contains(inode));
    }

    /// Bit rot: flips one bit of a file's durable (and current) contents.
    pub fn flip_bit(&self, path: &Path, byte: u64, bit: u8) -> io::Result<()> {
        let mut s = self.lock();
        let inode = Self::inode_of(&s, path)?;
        let file = s.files.get_mut(&inode).ok_or_else(|| not_found(path))?;
        for data in [&mut file.durable, &mut file.current] {
            if let Some(b) = data.get_mut(byte as usize) {
                *b ^= 1 << (bit % 8);
            }
        }
        Ok(())
    }

    /// A synced file lost (a bad sector under its inode, an operator's `rm`): gone, durably.
    pub fn lose(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let (dir, name) = split(path)?;
        let d = s.dirs.get_mut(&dir).ok_or_else(|| not_found(path))?;
        d.current.remove(&name).ok_or_else(|| not_found(path))?;
        d.durable.remove(&name);
        Ok(())
    }

    /// A lying disk: syncs that report success and make nothing durable (`data` for files, `dir` for directories).
    pub fn ignore_syncs(&self, data: bool, dir: bool) {
        let mut s = self.lock();
        s.ignore_data_syncs = data;
        s.ignore_dir_syncs = dir;
    }
}

struct SimFile {
    state: Arc<Mutex<State>>,
    inode: Inode,
}

impl SimFile {
    fn with<T>(&self, f: impl FnOnce(&mut State, Inode) -> io::Result<T>) -> io::Result<T> {
        let mut s = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut s, self.inode)
    }
}

fn file_mut(s: &mut State, inode: Inode) -> io::Result<&mut FileState> {
    // A handle to a file that a power cut erased: the write goes nowhere, as on a real disk after a crash
    // (callers reopen after a cut; this only keeps stale handles harmless).
    s.files.get_mut(&inode).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "file erased by a power cut"))
}

impl StorageFile for SimFile {
    fn write_at(&mut self, buf: &[u8], pos: u64) -> io::Result<()> {
        self.with(|s, inode| {
            let f = file_mut(s, inode)?;
            let op = FileOp::Write { pos, bytes: buf.to_vec() };
            apply(&mut f.current, &op);
            f.pending.push(op);
            Ok(())
        })
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.with(|s, inode| {
            let f = file_mut(s, inode)?;
            let op = FileOp::SetLen(len);
            apply(&mut f.current, &op);
            f.pending.push(op);
            Ok(())
        })
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.with(|s, inode| {
            if s.ignore_data_syncs {
                return Ok(());
            }
            let f = file_mut(s, inode)?;
            f.durable = f.current.clone();
            f.pending.clear();
            Ok(())
        })
    }
}

impl Storage for SimStorage {
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        s.dirs.entry(dir.to_path_buf()).or_default();
        Ok(())
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let s = self.lock();
        let d = s.dirs.get(dir).ok_or_else(|| not_found(dir))?;
        Ok(d.current.keys().cloned().collect())
    }
    fn read_at(&self, path: &Path, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
        let s = self.lock();
        let inode = Self::inode_of(&s, path)?;
        let data = s.files.get(&inode).map_or(&[][..], |f| &f.current[..]);
        let start = usize::try_from(pos).unwrap_or(usize::MAX).min(data.len());
        let n = (data.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&data[start..start + n]);
        Ok(n)
    }
    fn len(&self, path: &Path) -> io::Result<u64> {
        let s = self.lock();
        let inode = Self::inode_of(&s, path)?;
        Ok(s.files.get(&inode).map_or(0, |f| f.current.len() as u64))
    }
    fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn StorageFile>> {
        let mut s = self.lock();
        let existing = Self::inode_of(&s, path).ok();
        let inode = match (how, existing) {
            (Open::Existing, None) => return Err(not_found(path)),
            (Open::CreateNew, Some(_)) => {
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("{} exists", path.display())));
            }
            (Open::Existing, Some(inode)) => inode,
            (Open::Truncate, Some(inode)) => {
                let f = file_mut(&mut s, inode)?;
                let op = FileOp::SetLen(0);
                apply(&mut f.current, &op);
                f.pending.push(op);
                inode
            }
            (Open::CreateNew | Open::Truncate, None) => {
                let (dir, name) = split(path)?;
                let inode = s.next_inode;
                s.next_inode += 1;
                s.files.insert(inode, FileState::default());
                s.dirs.get_mut(&dir).ok_or_else(|| not_found(&dir))?.change(DirOp::Link(name, inode));
                inode
            }
        };
        Ok(Box::new(SimFile { state: Arc::clone(&self.state), inode }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.lock();
        let inode = Self::inode_of(&s, from)?;
        let (from_dir, from_name) = split(from)?;
        let (to_dir, to_name) = split(to)?;
        if from_dir != to_dir {
            return Err(io::Error::new(io::ErrorKind::Unsupported, "renames across directories are not simulated"));
        }
        s.dirs.get_mut(&from_dir).ok_or_else(|| not_found(from))?.change(DirOp::Rename(from_name, to_name, inode));
        Ok(())
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        let mut s = self.lock();
        Self::inode_of(&s, path)?;
        let (dir, name) = split(path)?;
        s.dirs.get_mut(&dir).ok_or_else(|| not_found(path))?.change(DirOp::Unlink(name));
        Ok(())
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut s = self.lock();
        if s.ignore_dir_syncs {
            return Ok(());
        }
        let d = s.dirs.get_mut(dir).ok_or_else(|| not_found(dir))?;
        d.durable = d.current.clone();
        d.pending.clear();
        Ok(())
    }
}

/// One shard's tree: keys as the sled store lays them out.
type Tree = BTreeMap<Vec<u8>, Vec<u8>>;
type Trees = BTreeMap<usize, Tree>;

#[derive(Debug, Default)]
struct StoreState {
    current: Trees,
    /// What a power cut cannot take away: the state at the last barrier.
    durable: Trees,
    /// The state after each write since the last barrier: sled's non-barrier flush may have made any of them
    /// durable, or none.
    since_barrier: Vec<Trees>,
    /// Writes and barriers still to fail, for the checkpoint-failure tests.
    write_failures_pending: u32,
    barrier_failures_pending: u32,
}

/// A checkpoint store for the power-loss simulation, with sled's durability: a write survives a process crash at
/// once, but only a barrier makes it survive a power cut; after a cut the store is at its last barrier or at any
/// later write. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct SimCheckpointStore {
    state: Arc<Mutex<StoreState>>,
}

const SIM_OFFSET: &[u8] = b"o";
/// Where the node's own state lives among the shard trees (never a shard number).
const NODE_KEY: usize = usize::MAX;
const SIM_MARKET: &[u8] = b"m";

fn sim_key(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    [prefix, key].concat()
}

fn sim_tree(tree: crate::checkpoint::Tree) -> usize {
    match tree {
        crate::checkpoint::Tree::Shard(shard) => shard,
        crate::checkpoint::Tree::Node => NODE_KEY,
    }
}

impl SimCheckpointStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Cuts the power: the store comes back at its last barrier or at any write after it.
    pub fn power_cut(&self, seed: u64) {
        let mut rng = Rng(seed ^ 0x005E_ED0F_C4EC_4901);
        let mut s = self.lock();
        let pick = rng.upto(s.since_barrier.len());
        let state = if pick == 0 { s.durable.clone() } else { s.since_barrier[pick - 1].clone() };
        s.current = state.clone();
        s.durable = state;
        s.since_barrier.clear();
    }

    /// The next `n` writes fail (as a full disk or a failing device would make them).
    pub fn fail_next_writes(&self, n: u32) {
        self.lock().write_failures_pending = n;
    }

    /// The next `n` barriers fail.
    pub fn fail_next_barriers(&self, n: u32) {
        self.lock().barrier_failures_pending = n;
    }

    fn injected(pending: &mut u32, what: &str) -> Result<(), crate::checkpoint::CheckpointError> {
        if *pending > 0 {
            *pending -= 1;
            return Err(crate::checkpoint::CheckpointError::Injected(format!("{what} failed (injected)")));
        }
        Ok(())
    }
}

impl crate::checkpoint::CheckpointStore for SimCheckpointStore {
    fn write(
        &mut self,
        shard: usize,
        offset: vigil_model::Offset,
        market: &[u8],
        accounts: &[(&str, Vec<u8>)],
        records: &crate::checkpoint::Records,
    ) -> Result<u64, crate::checkpoint::CheckpointError> {
        let mut s = self.lock();
        Self::injected(&mut s.write_failures_pending, "write")?;
        let tree = s.current.entry(shard).or_default();
        let mut bytes = (market.len() + 8) as u64;
        for (id, value) in accounts {
            bytes += (id.len() + value.len()) as u64;
            tree.insert(sim_key(b"a/", id.as_bytes()), value.clone());
        }
        for (key, value) in records.keyed() {
            bytes += (key.len() + value.len()) as u64;
            tree.insert(key, value.to_vec());
        }
        tree.insert(SIM_MARKET.to_vec(), market.to_vec());
        tree.insert(SIM_OFFSET.to_vec(), offset.0.to_be_bytes().to_vec());
        let snapshot = s.current.clone();
        s.since_barrier.push(snapshot);
        Ok(bytes)
    }

    fn put_records(
        &mut self,
        tree: crate::checkpoint::Tree,
        records: &crate::checkpoint::Records,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut s = self.lock();
        Self::injected(&mut s.write_failures_pending, "write")?;
        let tree = s.current.entry(sim_tree(tree)).or_default();
        for (key, value) in records.keyed() {
            tree.insert(key, value.to_vec());
        }
        let snapshot = s.current.clone();
        s.since_barrier.push(snapshot);
        Ok(())
    }

    fn records(
        &self,
        tree: crate::checkpoint::Tree,
        kind: crate::checkpoint::RecordKind,
    ) -> Result<Vec<Vec<u8>>, crate::checkpoint::CheckpointError> {
        let s = self.lock();
        let prefix: &[u8] = match kind {
            crate::checkpoint::RecordKind::Triggers => b"t/",
            crate::checkpoint::RecordKind::Liquidations => b"l/",
        };
        Ok(s.current
            .get(&sim_tree(tree))
            .map(|t| t.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v.clone()).collect())
            .unwrap_or_default())
    }

    fn load(&self, shard: usize) -> Result<crate::checkpoint::Loaded, crate::checkpoint::CheckpointError> {
        let offset = self.offset(shard)?;
        let s = self.lock();
        let Some(tree) = s.current.get(&shard) else { return Ok(crate::checkpoint::Loaded::default()) };
        Ok(crate::checkpoint::Loaded {
            offset,
            market: tree.get(SIM_MARKET).cloned(),
            accounts: tree.iter().filter(|(k, _)| k.starts_with(b"a/")).map(|(_, v)| v.clone()).collect(),
        })
    }

    fn offset(&self, shard: usize) -> Result<vigil_model::Offset, crate::checkpoint::CheckpointError> {
        let s = self.lock();
        match s.current.get(&shard).and_then(|t| t.get(SIM_OFFSET)) {
            None => Ok(vigil_model::Offset(0)),
            Some(v) => {
                let b: [u8; 8] =
                    v.as_slice().try_into().map_err(|_| crate::checkpoint::CheckpointError::Watermark(shard))?;
                Ok(vigil_model::Offset(u64::from_be_bytes(b)))
            }
        }
    }

    fn size_on_disk(&self) -> Result<u64, crate::checkpoint::CheckpointError> {
        let s = self.lock();
        Ok(s.current.values().flat_map(|t| t.iter()).map(|(k, v)| (k.len() + v.len()) as u64).sum())
    }

    fn shards(&self) -> Result<Vec<usize>, crate::checkpoint::CheckpointError> {
        Ok(self.lock().current.keys().copied().filter(|k| *k != NODE_KEY).collect())
    }

    fn write_node(
        &mut self,
        offset: vigil_model::Offset,
        value: &[u8],
        records: &crate::checkpoint::Records,
    ) -> Result<(), crate::checkpoint::CheckpointError> {
        let mut s = self.lock();
        Self::injected(&mut s.write_failures_pending, "write")?;
        let tree = s.current.entry(NODE_KEY).or_default();
        for (key, v) in records.keyed() {
            tree.insert(key, v.to_vec());
        }
        tree.insert(SIM_MARKET.to_vec(), value.to_vec());
        tree.insert(SIM_OFFSET.to_vec(), offset.0.to_be_bytes().to_vec());
        let snapshot = s.current.clone();
        s.since_barrier.push(snapshot);
        Ok(())
    }

    fn shard_count(&self) -> Result<Option<usize>, crate::checkpoint::CheckpointError> {
        let s = self.lock();
        let Some(v) = s.current.get(&NODE_KEY).and_then(|t| t.get(b"s".as_slice())) else { return Ok(None) };
        let b: [u8; 8] =
            v.as_slice().try_into().map_err(|_| crate::checkpoint::CheckpointError::Watermark(NODE_KEY))?;
        Ok(Some(u64::from_be_bytes(b) as usize))
    }

    fn set_shard_count(&mut self, shards: usize) -> Result<(), crate::checkpoint::CheckpointError> {
        let mut s = self.lock();
        s.current.entry(NODE_KEY).or_default().insert(b"s".to_vec(), (shards as u64).to_be_bytes().to_vec());
        s.durable = s.current.clone();
        s.since_barrier.clear();
        Ok(())
    }

    fn node(&self) -> Result<Option<(vigil_model::Offset, Vec<u8>)>, crate::checkpoint::CheckpointError> {
        let s = self.lock();
        let Some(tree) = s.current.get(&NODE_KEY) else { return Ok(None) };
        let (Some(o), Some(v)) = (tree.get(SIM_OFFSET), tree.get(SIM_MARKET)) else { return Ok(None) };
        let b: [u8; 8] =
            o.as_slice().try_into().map_err(|_| crate::checkpoint::CheckpointError::Watermark(NODE_KEY))?;
        Ok(Some((vigil_model::Offset(u64::from_be_bytes(b)), v.clone())))
    }

    fn barrier(&mut self) -> Result<(), crate::checkpoint::CheckpointError> {
        let mut s = self.lock();
        Self::injected(&mut s.barrier_failures_pending, "barrier")?;
        s.durable = s.current.clone();
        s.since_barrier.clear();
        Ok(())
    }
}
