//! Shard checkpoints in sled: one tree per shard holding the latest encoded version of each changed account, the
//! encoded market, the `{offset}` watermark and the records (triggers, liquidation fills) the shard emitted up to it,
//! all written by one atomic
//! `apply_batch`, then flushed.
//!
//! Behind the small [`CheckpointStore`] trait so another embedded store can be measured against sled, and so the
//! power-loss simulation can run the node's checkpoint logic over a simulated store ([`crate::sim`]).
//!
//! Durability: sled 0.34's `flush()` ends in `sync_file_range` on Linux, which survives a process crash but is not
//! a power-loss barrier (no metadata, no device cache flush). [`CheckpointStore::barrier`] is: for sled it
//! `fsync`s every file and directory of the store. Journal segments behind a watermark are deleted only after a
//! barrier that follows the write of that watermark.

use std::path::{Path, PathBuf};

use vigil_model::Offset;

const KEY_OFFSET: &[u8] = b"o";
const KEY_MARKET: &[u8] = b"m";
const PREFIX_ACCOUNT: &[u8] = b"a/";
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

fn account_key(id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(PREFIX_ACCOUNT.len() + id.len());
    k.extend_from_slice(PREFIX_ACCOUNT);
    k.extend_from_slice(id.as_bytes());
    k
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
        for (id, value) in accounts {
            bytes += (id.len() + value.len()) as u64;
            batch.insert(account_key(id), value.as_slice());
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
        let mut accounts = Vec::new();
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
            s.write(1, Offset(15), b"m1", &[("carol", b"c1".to_vec())], &Records::default()).unwrap();
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
        assert_eq!(l0.accounts, vec![b"a2".to_vec(), b"b1".to_vec()]);
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
}
