//! Shard checkpoints in sled: one tree per shard holding the latest encoded version of each changed account, the
//! encoded market, the `{offset}` watermark and the records (triggers, liquidation fills) the shard emitted up to it,
//! all written by one atomic
//! `apply_batch`, then flushed.
//!
//! Accounts are stored in [`CHUNKS`] chunks per shard, not under a key each: an account's chunk is fixed by its
//! id's hash, and a chunk's value holds its accounts sorted by id. A checkpoint rewrites the chunks its accounts
//! fall in. sled pays several microseconds per key written (a copy-on-write of the leaf, and for a new key its
//! splits): a key per account made the first checkpoint of 50 000 accounts take about a second, and of 500 000 about
//! eleven, where their chunks take tens and hundreds of milliseconds (docs/performance.md, "Checkpoints in
//! chunks"). A store written before chunks (a key per account under `a/`) is read as it is; its first checkpoint
//! moves those accounts into their chunks, in the same atomic batch.
//!
//! Behind the small [`CheckpointStore`] trait so another embedded store can be measured against sled, and so the
//! power-loss simulation can run the node's checkpoint logic over a simulated store ([`crate::sim`]).
//!
//! Durability: sled 0.34's `flush()` ends in `sync_file_range` on Linux, which survives a process crash but is not
//! a power-loss barrier (no metadata, no device cache flush). [`CheckpointStore::barrier`] is: for sled it
//! `fsync`s every file and directory of the store. Journal segments behind a watermark are deleted only after a
//! barrier that follows the write of that watermark.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use vigil_model::Offset;

const KEY_OFFSET: &[u8] = b"o";
const KEY_MARKET: &[u8] = b"m";
/// A key per account (stores written before chunks): read, and moved into chunks by the next checkpoint.
const PREFIX_ACCOUNT: &[u8] = b"a/";
/// A chunk of accounts: `c/` and the chunk's number (`u32`, big-endian).
const PREFIX_CHUNK: &[u8] = b"c/";
/// Chunks per shard. More chunks make a checkpoint of few accounts cheaper (smaller chunks rewritten) and one of
/// many dearer (more keys): at 8 192, measured on sled 0.34, 1 000 accounts changed among 500 000 cost 20 ms against
/// 8–14 ms with a key per account, and all 500 000 cost 175 ms against 6–11 s.
pub const CHUNKS: u32 = 8192;
const PREFIX_TRIGGER: &[u8] = b"t/";
const PREFIX_LIQUIDATION: &[u8] = b"l/";
/// The tree of the node's own state (the producers table): value under `m`, offset under `o`.
const NODE_TREE: &str = "node";
/// The shard count a store was created for, in the node tree.
const KEY_SHARDS: &[u8] = b"s";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint store: {0}")]
    Sled(#[from] sled::Error),
    #[error("checkpoint store: malformed watermark in shard {0}")]
    Watermark(usize),
    #[error("checkpoint store: malformed chunk {chunk} of shard {shard}'s accounts")]
    Chunk { shard: usize, chunk: u32 },
    #[error("checkpoint store: an account or id of {0} bytes does not fit a chunk entry")]
    TooLarge(usize),
    #[error("checkpoint store: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A fault injected by a test or the simulation.
    #[error("checkpoint store: {0}")]
    Injected(String),
}

/// One shard's checkpoint as loaded: the watermark, the market and every account (encoded by the caller).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    pub offset: Offset,
    pub market: Option<Vec<u8>>,
    pub accounts: Vec<Vec<u8>>,
}

/// A tree of the store: a shard's, or the node's own (the producers table, the insurance fund, and the records
/// decided where the shards' outputs merge).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tree {
    Shard(usize),
    Node,
}

/// The kinds of record kept beside a tree's state, each under its own key prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    Triggers,
    Liquidations,
}

impl RecordKind {
    fn prefix(self) -> &'static [u8] {
        match self {
            RecordKind::Triggers => PREFIX_TRIGGER,
            RecordKind::Liquidations => PREFIX_LIQUIDATION,
        }
    }
}

/// Records stored with a checkpoint, each as `(identity key, value)`: writing the same identity twice keeps one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Records {
    pub triggers: Vec<(Vec<u8>, Vec<u8>)>,
    pub liquidations: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Records {
    pub fn is_empty(&self) -> bool {
        self.triggers.is_empty() && self.liquidations.is_empty()
    }

    /// Every record with its full key (kind prefix first), and the bytes they take.
    pub fn keyed(&self) -> impl Iterator<Item = (Vec<u8>, &[u8])> {
        let triggers = self.triggers.iter().map(|(k, v)| (prefixed(PREFIX_TRIGGER, k), v.as_slice()));
        triggers.chain(self.liquidations.iter().map(|(k, v)| (prefixed(PREFIX_LIQUIDATION, k), v.as_slice())))
    }
}

/// What a checkpoint writer needs.
pub trait CheckpointStore: Send {
    /// Writes one delta atomically (accounts by id, the market, the watermark, and the records emitted up to it)
    /// and makes it survive a process crash (not necessarily a power cut: see [`CheckpointStore::barrier`]).
    /// Returns the bytes written.
    fn write(
        &mut self,
        shard: usize,
        offset: Offset,
        market: &[u8],
        accounts: &[(&str, Vec<u8>)],
        records: &Records,
    ) -> Result<u64, CheckpointError>;
    /// Adds records to a tree without moving its watermark, durably.
    fn put_records(&mut self, tree: Tree, records: &Records) -> Result<(), CheckpointError>;
    /// Every record value of one kind stored in a tree, in key order.
    fn records(&self, tree: Tree, kind: RecordKind) -> Result<Vec<Vec<u8>>, CheckpointError>;
    /// Loads a shard's checkpoint (empty if none).
    fn load(&self, shard: usize) -> Result<Loaded, CheckpointError>;
    /// The watermark of a shard (0 if none).
    fn offset(&self, shard: usize) -> Result<Offset, CheckpointError>;
    /// Bytes on disk.
    fn size_on_disk(&self) -> Result<u64, CheckpointError>;
    /// The shards that have a checkpoint, ascending.
    fn shards(&self) -> Result<Vec<usize>, CheckpointError>;
    /// Makes everything written so far survive a power cut. Called before any journal segment behind a new
    /// watermark is deleted.
    fn barrier(&mut self) -> Result<(), CheckpointError>;
    /// Writes the node's own state as of `offset`, replacing the previous one, with the records decided up to it,
    /// atomically.
    fn write_node(&mut self, offset: Offset, value: &[u8], records: &Records) -> Result<(), CheckpointError>;
    /// The node's state and its offset, if one was written.
    fn node(&self) -> Result<Option<(Offset, Vec<u8>)>, CheckpointError>;
    /// The shard count the store was created for, if recorded.
    fn shard_count(&self) -> Result<Option<usize>, CheckpointError>;
    /// Records the shard count, durably (a barrier follows).
    fn set_shard_count(&mut self, shards: usize) -> Result<(), CheckpointError>;
}

pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

/// `fsync`s every file and directory under `dir` (the directory last, after its entries).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path)?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

impl SledStore {
    /// Opens (or creates) the store. sled releases its file lock from background threads after the last handle
    /// is dropped, so an open right after a drop in the same process can find it still held: that case is
    /// retried for up to two seconds (another process holding it is refused after that).
    pub fn open(path: &Path) -> Result<Self, CheckpointError> {
        let mut tries = 0;
        loop {
            match sled::Config::new().path(path).open() {
                Ok(db) => return Ok(Self { db, path: path.to_owned() }),
                Err(sled::Error::Io(e)) if lock_busy(&e) && tries < 200 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    fn tree(&self, shard: usize) -> Result<sled::Tree, CheckpointError> {
        Ok(self.db.open_tree(format!("shard-{shard}"))?)
    }

    fn sled_tree(&self, tree: Tree) -> Result<sled::Tree, CheckpointError> {
        match tree {
            Tree::Shard(shard) => self.tree(shard),
            Tree::Node => Ok(self.db.open_tree(NODE_TREE)?),
        }
    }
}

/// Whether opening failed on sled's file lock being held. sled reports it as an `Other` error whose message holds
/// the `WouldBlock` of `flock` ("could not acquire lock on …"), not as a `WouldBlock` error: matching the kind alone
/// never retried (a reopen in the same process failed in CI).
fn lock_busy(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("could not acquire lock")
}

fn prefixed(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + key.len());
    k.extend_from_slice(prefix);
    k.extend_from_slice(key);
    k
}

/// The chunk an account is stored in: bits 40 and up of its mixed hash, so the choice is independent of the shard
/// (the low bits of FNV-1a) and of the cluster partition (the mixed hash modulo the partition count).
pub fn chunk_of(id: &str) -> u32 {
    ((vigil_model::account_hash(id) >> 40) % u64::from(CHUNKS)) as u32
}

fn chunk_key(chunk: u32) -> [u8; 6] {
    let mut k = [0; 6];
    k[..2].copy_from_slice(PREFIX_CHUNK);
    k[2..].copy_from_slice(&chunk.to_be_bytes());
    k
}

/// A chunk entry: an account's id and its encoded value.
type Entry<'a> = (&'a [u8], &'a [u8]);

/// A chunk's entries, `(id, encoded account)`, as stored: each `id length: u32 LE | id | value length: u32 LE |
/// value`, ids strictly ascending. `None` if the bytes are not such a sequence.
fn chunk_entries(mut bytes: &[u8]) -> Option<Vec<Entry<'_>>> {
    fn field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, rest) = bytes.split_first_chunk::<4>()?;
        let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
        if rest.len() < len {
            return None;
        }
        let (value, rest) = rest.split_at(len);
        *bytes = rest;
        Some(value)
    }
    let mut out: Vec<Entry> = Vec::new();
    while !bytes.is_empty() {
        let id = field(&mut bytes)?;
        let value = field(&mut bytes)?;
        if out.last().is_some_and(|(last, _)| *last >= id) {
            return None;
        }
        out.push((id, value));
    }
    Some(out)
}

/// Appends one entry to a chunk's value (see [`chunk_entries`]).
fn push_entry(out: &mut Vec<u8>, id: &[u8], value: &[u8]) -> Result<(), CheckpointError> {
    let len = |n: usize| u32::try_from(n).map_err(|_| CheckpointError::TooLarge(n));
    out.extend_from_slice(&len(id.len())?.to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(&len(value.len())?.to_le_bytes());
    out.extend_from_slice(value);
    Ok(())
}

/// A chunk's new value: its `stored` entries with the `changed` ones (ids ascending, unique) written over them.
fn merged_chunk(stored: &[Entry], changed: &[Entry]) -> Result<Vec<u8>, CheckpointError> {
    let size = stored.iter().chain(changed).map(|(id, v)| id.len() + v.len() + 8).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    let (mut a, mut b) = (stored.iter().peekable(), changed.iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) if x.0 < y.0 => a.next(),
            (Some(x), Some(y)) if x.0 == y.0 => {
                a.next();
                b.next()
            }
            (Some(_), None) => a.next(),
            (_, Some(_)) => b.next(),
            (None, None) => break,
        };
        if let Some((id, value)) = next {
            push_entry(&mut out, id, value)?;
        }
    }
    Ok(out)
}

impl CheckpointStore for SledStore {
    fn write(
        &mut self,
        shard: usize,
        offset: Offset,
        market: &[u8],
        accounts: &[(&str, Vec<u8>)],
        records: &Records,
    ) -> Result<u64, CheckpointError> {
        let tree = self.tree(shard)?;
        let mut batch = sled::Batch::default();
        let mut bytes = (market.len() + 8) as u64;
        // The changed accounts by chunk. A store's accounts still under a key each join them (their keys removed
        // in the same batch), the changed version winning.
        let mut chunks: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
        // Latest first: of an id given twice in one delta the later wins, as a second insert into a batch would.
        for (id, value) in accounts.iter().rev() {
            chunks.entry(chunk_of(id)).or_default().push((id.as_bytes(), value.as_slice()));
        }
        let legacy: Vec<(sled::IVec, sled::IVec)> = tree.scan_prefix(PREFIX_ACCOUNT).collect::<Result<_, _>>()?;
        for (key, value) in &legacy {
            batch.remove(key);
            let id = &key[PREFIX_ACCOUNT.len()..];
            let text = std::str::from_utf8(id).map_err(|_| CheckpointError::Chunk { shard, chunk: u32::MAX })?;
            chunks.entry(chunk_of(text)).or_default().push((id, value));
        }
        for (chunk, mut changed) in chunks {
            // A stable sort: of an id given more than once (changed, latest first, then legacy), the first is kept.
            changed.sort_by(|x, y| x.0.cmp(y.0));
            changed.dedup_by(|later, first| later.0 == first.0);
            let key = chunk_key(chunk);
            let stored = tree.get(key)?;
            let entries = match &stored {
                Some(v) => chunk_entries(v).ok_or(CheckpointError::Chunk { shard, chunk })?,
                None => Vec::new(),
            };
            let value = merged_chunk(&entries, &changed)?;
            bytes += value.len() as u64;
            batch.insert(&key[..], value);
        }
        for (key, value) in records.keyed() {
            bytes += (key.len() + value.len()) as u64;
            batch.insert(key, value);
        }
        batch.insert(KEY_MARKET, market);
        batch.insert(KEY_OFFSET, &offset.0.to_be_bytes()[..]);
        tree.apply_batch(batch)?;
        self.db.flush()?;
        Ok(bytes)
    }

    fn load(&self, shard: usize) -> Result<Loaded, CheckpointError> {
        let tree = self.tree(shard)?;
        let offset = self.offset(shard)?;
        let market = tree.get(KEY_MARKET)?.map(|v| v.to_vec());
        // Chunks in order, then accounts still under a key each (a store not checkpointed since chunks): a write
        // moves those into chunks and removes their keys atomically, so no id is in both.
        let mut accounts = Vec::new();
        for item in tree.scan_prefix(PREFIX_CHUNK) {
            let (key, v) = item?;
            let chunk = key.get(PREFIX_CHUNK.len()..).and_then(|b| <[u8; 4]>::try_from(b).ok()).map(u32::from_be_bytes);
            let chunk = chunk.ok_or(CheckpointError::Chunk { shard, chunk: u32::MAX })?;
            let entries = chunk_entries(&v).ok_or(CheckpointError::Chunk { shard, chunk })?;
            accounts.extend(entries.into_iter().map(|(_, value)| value.to_vec()));
        }
        for item in tree.scan_prefix(PREFIX_ACCOUNT) {
            let (_, v) = item?;
            accounts.push(v.to_vec());
        }
        Ok(Loaded { offset, market, accounts })
    }

    fn put_records(&mut self, tree: Tree, records: &Records) -> Result<(), CheckpointError> {
        if records.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for (key, value) in records.keyed() {
            batch.insert(key, value);
        }
        self.sled_tree(tree)?.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    fn records(&self, tree: Tree, kind: RecordKind) -> Result<Vec<Vec<u8>>, CheckpointError> {
        let mut out = Vec::new();
        for item in self.sled_tree(tree)?.scan_prefix(kind.prefix()) {
            out.push(item?.1.to_vec());
        }
        Ok(out)
    }

    fn offset(&self, shard: usize) -> Result<Offset, CheckpointError> {
        match self.tree(shard)?.get(KEY_OFFSET)? {
            None => Ok(Offset(0)),
            Some(v) => {
                let b: [u8; 8] = v.as_ref().try_into().map_err(|_| CheckpointError::Watermark(shard))?;
                Ok(Offset(u64::from_be_bytes(b)))
            }
        }
    }

    fn size_on_disk(&self) -> Result<u64, CheckpointError> {
        Ok(self.db.size_on_disk()?)
    }

    fn shards(&self) -> Result<Vec<usize>, CheckpointError> {
        let mut out: Vec<usize> = self
            .db
            .tree_names()
            .iter()
            .filter_map(|n| std::str::from_utf8(n).ok()?.strip_prefix("shard-")?.parse().ok())
            .collect();
        out.sort_unstable();
        Ok(out)
    }

    fn write_node(&mut self, offset: Offset, value: &[u8], records: &Records) -> Result<(), CheckpointError> {
        let mut batch = sled::Batch::default();
        for (key, v) in records.keyed() {
            batch.insert(key, v);
        }
        batch.insert(KEY_MARKET, value);
        batch.insert(KEY_OFFSET, &offset.0.to_be_bytes()[..]);
        self.db.open_tree(NODE_TREE)?.apply_batch(batch)?;
        self.db.flush()?;
        Ok(())
    }

    fn node(&self) -> Result<Option<(Offset, Vec<u8>)>, CheckpointError> {
        let tree = self.db.open_tree(NODE_TREE)?;
        let (Some(offset), Some(value)) = (tree.get(KEY_OFFSET)?, tree.get(KEY_MARKET)?) else { return Ok(None) };
        let b: [u8; 8] = offset.as_ref().try_into().map_err(|_| CheckpointError::Watermark(usize::MAX))?;
        Ok(Some((Offset(u64::from_be_bytes(b)), value.to_vec())))
    }

    fn shard_count(&self) -> Result<Option<usize>, CheckpointError> {
        let Some(v) = self.db.open_tree(NODE_TREE)?.get(KEY_SHARDS)? else { return Ok(None) };
        let b: [u8; 8] = v.as_ref().try_into().map_err(|_| CheckpointError::Watermark(usize::MAX))?;
        Ok(Some(u64::from_be_bytes(b) as usize))
    }

    fn set_shard_count(&mut self, shards: usize) -> Result<(), CheckpointError> {
        self.db.open_tree(NODE_TREE)?.insert(KEY_SHARDS, &(shards as u64).to_be_bytes()[..])?;
        self.barrier()
    }

    fn barrier(&mut self) -> Result<(), CheckpointError> {
        self.db.flush()?;
        sync_tree(&self.path)
            .map_err(|source| CheckpointError::Io { context: format!("syncing {}", self.path.display()), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_held_is_recognised_in_the_form_sled_reports_it() {
        // Proves the reopen retry matches sled 0.34.7's lock error (`config.rs`: an `Other` error whose message
        // carries the `flock` error), which the first version, matching `WouldBlock` alone, never retried.
        let flock = std::io::Error::from_raw_os_error(11);
        let sled = std::io::Error::other(format!("could not acquire lock on {:?}: {:?}", "/tmp/x/db", flock));
        assert!(lock_busy(&sled));
        assert!(lock_busy(&std::io::Error::from(std::io::ErrorKind::WouldBlock)));
        assert!(!lock_busy(&std::io::Error::other("no space left on device")));
    }

    #[test]
    fn deltas_accumulate_and_survive_reopening() {
        // Proves later deltas override earlier versions of an account, the watermark follows, shards are
        // separate, and everything is there after the store is reopened.
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            assert_eq!(s.load(0).unwrap(), Loaded::default());
            let t = |k: &str, v: &str| (k.as_bytes().to_vec(), v.as_bytes().to_vec());
            let triggers = |list: &[(Vec<u8>, Vec<u8>)]| Records { triggers: list.to_vec(), ..Records::default() };
            s.write(
                0,
                Offset(10),
                b"m1",
                &[("alice", b"a1".to_vec()), ("bob", b"b1".to_vec())],
                &triggers(&[t("k1", "t1")]),
            )
            .unwrap();
            let both = Records { triggers: vec![t("k2", "t2")], liquidations: vec![t("k2", "l2")] };
            s.write(0, Offset(20), b"m2", &[("alice", b"a2".to_vec())], &both).unwrap();
            // An id twice in one delta: the later version wins.
            s.write(1, Offset(15), b"m1", &[("carol", b"c0".to_vec()), ("carol", b"c1".to_vec())], &Records::default())
                .unwrap();
            // The same identity again (a trigger re-emitted by recovery) keeps one copy.
            s.put_records(Tree::Shard(0), &triggers(&[t("k1", "t1"), t("k3", "t3")])).unwrap();
            // The node's tree: its value and records, apart from the shards'.
            let node = Records { triggers: vec![t("k9", "t9")], liquidations: vec![t("k8", "l8")] };
            s.write_node(Offset(18), b"n1", &node).unwrap();
            s.put_records(Tree::Node, &Records { liquidations: vec![t("k7", "l7")], ..Records::default() }).unwrap();
            assert!(s.size_on_disk().unwrap() > 0);
        }
        let s = SledStore::open(dir.path()).unwrap();
        let l0 = s.load(0).unwrap();
        assert_eq!(l0.offset, Offset(20));
        assert_eq!(l0.market.as_deref(), Some(&b"m2"[..]));
        let mut accounts = l0.accounts.clone();
        accounts.sort();
        assert_eq!(accounts, vec![b"a2".to_vec(), b"b1".to_vec()]);
        assert_eq!(s.offset(1).unwrap(), Offset(15));
        assert_eq!(s.load(1).unwrap().accounts, vec![b"c1".to_vec()]);
        assert_eq!(s.shards().unwrap(), vec![0, 1]);
        let records = |tree, kind| s.records(tree, kind).unwrap();
        assert_eq!(records(Tree::Shard(0), RecordKind::Triggers), vec![b"t1".to_vec(), b"t2".to_vec(), b"t3".to_vec()]);
        assert_eq!(records(Tree::Shard(0), RecordKind::Liquidations), vec![b"l2".to_vec()]);
        assert!(records(Tree::Shard(1), RecordKind::Triggers).is_empty());
        assert_eq!(s.node().unwrap(), Some((Offset(18), b"n1".to_vec())));
        assert_eq!(records(Tree::Node, RecordKind::Triggers), vec![b"t9".to_vec()]);
        assert_eq!(records(Tree::Node, RecordKind::Liquidations), vec![b"l7".to_vec(), b"l8".to_vec()]);
        assert_eq!(s.offset(0).unwrap(), Offset(20));
    }

    /// The accounts a store loads for `shard`, sorted (a load gives them in chunk order).
    fn sorted_accounts(s: &SledStore, shard: usize) -> Vec<Vec<u8>> {
        let mut out = s.load(shard).unwrap().accounts;
        out.sort();
        out
    }

    #[test]
    fn a_chunk_holds_its_entries_in_id_order_and_malformed_bytes_are_refused() {
        // Proves the chunk format reads back what was merged (changed entries over stored ones, ids ascending),
        // and that truncated, unordered or repeated entries are refused rather than misread.
        let stored: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"c", b"3"), (b"e", b"")];
        let changed: Vec<(&[u8], &[u8])> = vec![(b"b", b"2"), (b"c", b"33"), (b"f", b"6")];
        let bytes = merged_chunk(&stored, &changed).unwrap();
        let want: Vec<(&[u8], &[u8])> = vec![(b"a", b"1"), (b"b", b"2"), (b"c", b"33"), (b"e", b""), (b"f", b"6")];
        assert_eq!(chunk_entries(&bytes).unwrap(), want);
        assert_eq!(chunk_entries(&[]).unwrap(), Vec::<(&[u8], &[u8])>::new());
        for cut in 1..bytes.len() {
            let read = chunk_entries(&bytes[..cut]);
            // A cut between two entries is a shorter chunk; anywhere else it is refused.
            assert!(read.is_none() || read.unwrap().len() < want.len(), "cut at {cut}");
        }
        let unordered = merged_chunk(&[(b"b", b"2")], &[]).unwrap();
        let mut twice = unordered.clone();
        twice.extend_from_slice(&unordered);
        assert!(chunk_entries(&twice).is_none(), "a repeated id");
        let mut backwards = merged_chunk(&[(b"b", b"2")], &[]).unwrap();
        backwards.extend_from_slice(&merged_chunk(&[(b"a", b"1")], &[]).unwrap());
        assert!(chunk_entries(&backwards).is_none(), "ids out of order");
    }

    #[test]
    fn many_accounts_share_chunks_and_each_keeps_its_last_version() {
        // Proves that with far more accounts than chunks, a checkpoint of some accounts leaves the others of
        // their chunks as they were, across reopening.
        let dir = tempfile::tempdir().unwrap();
        let n = (CHUNKS as usize) * 3;
        let ids: Vec<String> = (0..n).map(|i| format!("acc{i}")).collect();
        let version = |i: usize, v: u8| format!("{}:{v}", ids[i]).into_bytes();
        let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        {
            let mut s = SledStore::open(dir.path()).unwrap();
            let all: Vec<(&str, Vec<u8>)> = (0..n).map(|i| (ids[i].as_str(), version(i, 0))).collect();
            s.write(0, Offset(1), b"m", &all, &Records::default()).unwrap();
            let some: Vec<(&str, Vec<u8>)> = (0..n).step_by(7).map(|i| (ids[i].as_str(), version(i, 1))).collect();
            s.write(0, Offset(2), b"m", &some, &Records::default()).unwrap();
            for (i, id) in ids.iter().enumerate() {
                want.insert(id.clone(), version(i, u8::from(i % 7 == 0)));
            }
        }
        let s = SledStore::open(dir.path()).unwrap();
        let mut expected: Vec<Vec<u8>> = want.into_values().collect();
        expected.sort();
        assert_eq!(sorted_accounts(&s, 0), expected);
        let chunks = s.tree(0).unwrap().scan_prefix(PREFIX_CHUNK).count();
        assert!(chunks > CHUNKS as usize * 9 / 10 && chunks <= CHUNKS as usize, "{chunks} chunks");
    }

    #[test]
    fn a_store_with_a_key_per_account_is_read_and_moved_into_chunks_by_its_next_checkpoint() {
        // Proves a store written before chunks loses nothing: its accounts load as they are, and the next
        // checkpoint moves them into chunks (the changed version winning) and removes their keys.
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open(dir.path()).unwrap();
            let tree = s.tree(0).unwrap();
            for (id, v) in [("alice", "a0"), ("bob", "b0"), ("carol", "c0")] {
                tree.insert(prefixed(PREFIX_ACCOUNT, id.as_bytes()), v.as_bytes()).unwrap();
            }
            tree.insert(KEY_OFFSET, &5u64.to_be_bytes()[..]).unwrap();
            tree.insert(KEY_MARKET, &b"m0"[..]).unwrap();
        }
        let mut s = SledStore::open(dir.path()).unwrap();
        let old = |s: &SledStore| s.tree(0).unwrap().scan_prefix(PREFIX_ACCOUNT).count();
        assert_eq!(sorted_accounts(&s, 0), vec![b"a0".to_vec(), b"b0".to_vec(), b"c0".to_vec()]);
        assert_eq!(old(&s), 3);
        s.write(0, Offset(9), b"m1", &[("bob", b"b1".to_vec()), ("dave", b"d1".to_vec())], &Records::default())
            .unwrap();
        assert_eq!(old(&s), 0);
        let want = vec![b"a0".to_vec(), b"b1".to_vec(), b"c0".to_vec(), b"d1".to_vec()];
        assert_eq!(sorted_accounts(&s, 0), want);
        drop(s);
        assert_eq!(sorted_accounts(&SledStore::open(dir.path()).unwrap(), 0), want);
    }

    #[test]
    fn a_malformed_chunk_fails_the_load_and_the_next_write_naming_it() {
        // Proves a damaged chunk is an error naming the shard and chunk, never accounts silently dropped.
        let dir = tempfile::tempdir().unwrap();
        let mut s = SledStore::open(dir.path()).unwrap();
        s.write(0, Offset(1), b"m", &[("alice", b"a1".to_vec())], &Records::default()).unwrap();
        let chunk = chunk_of("alice");
        s.tree(0).unwrap().insert(chunk_key(chunk), &[9u8, 0, 0, 0, b'x'][..]).unwrap();
        let named = |e: CheckpointError| matches!(e, CheckpointError::Chunk { shard: 0, chunk: c } if c == chunk);
        assert!(named(s.load(0).unwrap_err()));
        assert!(named(s.write(0, Offset(2), b"m", &[("alice", b"a2".to_vec())], &Records::default()).unwrap_err()));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(32))]

        /// Proves any sequence of checkpoints loads as the last version of every account written, in two shards,
        /// with ids that collide in chunks (few chunks' worth of short ids) and empty values.
        #[test]
        fn checkpoints_load_as_the_last_version_of_every_account(
            writes in proptest::collection::vec(
                (0usize..2, proptest::collection::vec((0u16..3000, proptest::collection::vec(0u8..4, 0..3)), 0..40)),
                1..6,
            )
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut s = SledStore::open(dir.path()).unwrap();
            let mut model: [BTreeMap<String, Vec<u8>>; 2] = Default::default();
            for (k, (shard, accounts)) in writes.iter().enumerate() {
                let accounts: BTreeMap<String, Vec<u8>> =
                    accounts.iter().map(|(id, v)| (format!("u{id}"), v.clone())).collect();
                let list: Vec<(&str, Vec<u8>)> = accounts.iter().map(|(id, v)| (id.as_str(), v.clone())).collect();
                s.write(*shard, Offset(k as u64 + 1), b"m", &list, &Records::default()).unwrap();
                model[*shard].extend(accounts);
            }
            drop(s);
            let s = SledStore::open(dir.path()).unwrap();
            for (shard, accounts) in model.iter().enumerate() {
                let mut want: Vec<Vec<u8>> = accounts.values().cloned().collect();
                want.sort();
                proptest::prop_assert_eq!(sorted_accounts(&s, shard), want);
            }
        }
    }
}
