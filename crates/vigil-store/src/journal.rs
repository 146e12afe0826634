//! The event journal: append-only segment files of checksummed records, group commit, and recovery.
//!
//! Record: `len: u32 | crc32c: u32 | offset: u64 | payload[len]`, little endian; the CRC covers the offset and the
//! payload. Offsets are gapless across segments. A segment is named by the offset of its first record
//! (`00000000000000000001.log`) and holds at most `segment_bytes_max` bytes.
//!
//! Group commit: `append` only buffers; `commit` writes everything buffered, `fdatasync`s, and only then advances
//! the durable offset. A failed write or sync **poisons** the journal: every later call fails, nothing more is
//! acknowledged, and the caller must exit (after a failed fsync the page cache may no longer hold what the disk
//! lost; retrying would acknowledge data that is gone, the PostgreSQL "fsyncgate" lesson).
//!
//! Preallocation: a segment is born full size, its bytes physically written as zeros and synced, and records are
//! then written over the zeros at their position. Overwriting blocks that are already allocated and written changes
//! no file size and no extent, so each group commit's `fdatasync` flushes data only, never filesystem metadata
//! (`fallocate` would not do: its unwritten extents need a metadata update on first write). A helper thread
//! prepares the next segment (`next.prealloc`) while the current one fills, so a roll is a rename and a directory
//! sync. `JournalConfig::preallocate = false` gives plain appends (the benchmark compares both). A new journal's
//! first segment is the exception: it grows as it is written, so that a first start does not wait for a full
//! segment of zeros (the helper prepares the second meanwhile).
//!
//! Recovery: every segment is read and every record checked. Records end where the bytes that follow are all zero
//! (the preallocated remainder, checked a chunk at a time without being held in memory). A bad record in the last segment is a torn tail if no valid record follows it: the
//! tail is truncated (and synced). Anything else (a bad record followed by a valid one, a bad record in an earlier
//! segment, a gap between segments) is corruption in the middle: `open` refuses, naming the segment and the byte
//! position.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use vigil_model::Offset;

use crate::storage::{Open, OsStorage, Storage, StorageFile};

/// Bytes of a record header.
pub const HEADER_BYTES: usize = 16;

#[derive(Clone, Debug)]
pub struct JournalConfig {
    /// A segment is closed when the next record would take it past this size.
    pub segment_bytes_max: u64,
    /// Largest payload accepted.
    pub record_bytes_max: u32,
    /// Segments are created full size, zero-filled and synced, ahead of use (see the module documentation).
    pub preallocate: bool,
    /// The next segment is prepared by a helper thread (else inline, at the roll before it is needed: the
    /// deterministic simulation wants no thread).
    pub prepare_in_background: bool,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self { segment_bytes_max: 64 << 20, record_bytes_max: 1 << 20, preallocate: true, prepare_in_background: true }
    }
}

/// The next segment, zero-filled and synced by the helper thread; renamed into place at a roll.
const PREPARED: &str = "next.prealloc";
/// Where the helper writes before the rename that makes `PREPARED` complete.
const PREPARING: &str = "next.prealloc.tmp";

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "journal corrupt in {segment} at byte {position}: {reason}; refusing to start (this is not a torn tail: \
         valid data follows, or the segment is not the last)"
    )]
    Corrupt { segment: PathBuf, position: u64, reason: String },
    #[error("the journal is poisoned by an earlier I/O failure; nothing more can be made durable")]
    Poisoned,
    #[error("append of offset {got}, expected {expected}: offsets are gapless")]
    OffsetGap { expected: u64, got: u64 },
    #[error("record of {0} bytes exceeds the limit")]
    RecordTooLarge(usize),
    #[error("journal record {offset} in {segment} at byte {position} does not decode: {reason}; refusing to start")]
    Payload { segment: PathBuf, position: u64, offset: u64, reason: String },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> JournalError {
    let context = context.into();
    move |source| JournalError::Io { context, source }
}

/// What `open` found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// The last offset in the journal (0 if empty): everything up to it is durable.
    pub durable: Offset,
    /// The first offset the journal holds (segments before it were deleted behind checkpoints); `durable + 1`
    /// when it holds no record.
    pub first: Offset,
    /// Bytes cut from a torn tail.
    pub truncated_bytes: u64,
    pub segments: usize,
}

/// One segment on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentInfo {
    pub path: PathBuf,
    pub first: Offset,
    /// Last offset in it (`first − 1` when empty).
    pub last: Offset,
    /// Bytes of records in it (the file may be longer: the preallocated zeros).
    pub bytes: u64,
}

pub struct Journal {
    dir: PathBuf,
    config: JournalConfig,
    storage: Arc<dyn Storage>,
    segments: Vec<SegmentInfo>,
    /// The segment being written (none only before the first one exists, inside `open`).
    file: Option<Box<dyn StorageFile>>,
    /// The helper preparing the next segment, if one is running.
    preparing: Option<JoinHandle<io::Result<()>>>,
    buffer: Vec<u8>,
    /// Offset of the last record appended (buffered or written).
    appended: u64,
    durable: Offset,
    poisoned: bool,
}

fn segment_name(first: u64) -> String {
    format!("{first:020}.log")
}

fn crc(offset: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&offset.to_le_bytes()), payload)
}

/// Encodes one record into `out`.
pub fn encode_record(offset: u64, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc(offset, payload).to_le_bytes());
    out.extend_from_slice(&offset.to_le_bytes());
    out.extend_from_slice(payload);
}

/// A record parsed at a position, or why not.
enum Parsed<'a> {
    Record { offset: u64, payload: &'a [u8], next: usize },
    Bad(String),
}

fn parse_at(bytes: &[u8], pos: usize, record_bytes_max: u32) -> Parsed<'_> {
    let Some(header) = bytes.get(pos..pos + HEADER_BYTES) else {
        return Parsed::Bad(format!("short header ({} bytes)", bytes.len() - pos));
    };
    let word = |i: usize| u32::from_le_bytes([header[i], header[i + 1], header[i + 2], header[i + 3]]);
    let len = word(0);
    let stored_crc = word(4);
    let mut off = [0u8; 8];
    off.copy_from_slice(&header[8..16]);
    let offset = u64::from_le_bytes(off);
    if len == 0 || len > record_bytes_max {
        return Parsed::Bad(format!("implausible length {len}"));
    }
    let end = pos + HEADER_BYTES + len as usize;
    let Some(payload) = bytes.get(pos + HEADER_BYTES..end) else {
        return Parsed::Bad(format!(
            "short record: {len} bytes announced, {} present",
            bytes.len() - pos - HEADER_BYTES
        ));
    };
    if crc(offset, payload) != stored_crc {
        return Parsed::Bad("checksum mismatch".into());
    }
    Parsed::Record { offset, payload, next: end }
}

/// Whether any valid record starts after `from` (a torn tail has none). A record starts with its non-zero
/// length, so only positions before the last non-zero byte are tried.
fn valid_record_after(bytes: &[u8], from: usize, record_bytes_max: u32) -> bool {
    let end = bytes.iter().rposition(|b| *b != 0).map_or(0, |p| p + 1);
    (from + 1..end).any(|p| matches!(parse_at(bytes, p, record_bytes_max), Parsed::Record { .. }))
}

/// Whether every byte of `bytes` is zero (written to vectorize: no early exit).
fn all_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |acc, b| acc | b) == 0
}

/// Bytes read at a time.
const READ_CHUNK: usize = 1 << 20;

/// A segment read from its start only as far as its records go, through a window of about two chunks. A
/// preallocated segment is mostly zeros and a full one is 64 MiB: restart time must follow what was written, and
/// memory must not follow the segment size, so records are parsed in the window and the zero tail is checked a
/// chunk at a time (only a damaged segment is read whole, to look for valid records after the damage).
struct SegmentReader<'a> {
    storage: &'a dyn Storage,
    path: &'a Path,
    len: usize,
    /// The file's bytes from `base` on.
    bytes: Vec<u8>,
    base: usize,
}

impl<'a> SegmentReader<'a> {
    fn new(storage: &'a dyn Storage, path: &'a Path) -> Result<Self, JournalError> {
        let len = storage.len(path).map_err(io_err(format!("reading {}", path.display())))?;
        let len = usize::try_from(len).map_err(|_| JournalError::Corrupt {
            segment: path.to_owned(),
            position: 0,
            reason: format!("a segment of {len} bytes"),
        })?;
        Ok(Self { storage, path, len, bytes: Vec::with_capacity(2 * READ_CHUNK), base: 0 })
    }

    fn read(&self, at: usize, buf: &mut [u8]) -> Result<usize, JournalError> {
        self.storage.read_at(self.path, at as u64, buf).map_err(io_err(format!("reading {}", self.path.display())))
    }

    /// Reads until the file's bytes up to `end` (or its end) are held.
    fn fill_to(&mut self, end: usize) -> Result<(), JournalError> {
        let end = end.min(self.len);
        while self.base + self.bytes.len() < end {
            let held = self.bytes.len();
            let at = self.base + held;
            let want = (end - at).max(READ_CHUNK).min(self.len - at);
            self.bytes.resize(held + want, 0);
            let n = self
                .storage
                .read_at(self.path, at as u64, &mut self.bytes[held..])
                .map_err(io_err(format!("reading {}", self.path.display())))?;
            self.bytes.truncate(held + n);
            if n == 0 {
                // The file is shorter than its length said: what is held is all there is.
                self.len = at;
            }
        }
        Ok(())
    }

    /// The record at byte `pos` (never before an earlier call's), reading as much of the file as it needs.
    /// Bytes before `pos` are let go a chunk at a time.
    fn parse(&mut self, pos: usize, record_bytes_max: u32) -> Result<Parsed<'_>, JournalError> {
        if pos - self.base >= READ_CHUNK {
            self.bytes.drain(..pos - self.base);
            self.base = pos;
        }
        self.fill_to(pos.saturating_add(HEADER_BYTES))?;
        let at = pos - self.base;
        if let Some(len) = self.bytes.get(at..at + 4) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]);
            if len <= record_bytes_max {
                self.fill_to(pos + HEADER_BYTES + len as usize)?;
            }
        }
        Ok(match parse_at(&self.bytes, at, record_bytes_max) {
            Parsed::Record { offset, payload, next } => Parsed::Record { offset, payload, next: self.base + next },
            bad => bad,
        })
    }

    /// Whether everything from byte `pos` (at or after the window's start) to the end of the file is zero: the
    /// clean end of the records (the preallocated remainder). What is not held is read a chunk at a time.
    fn zero_from(&mut self, pos: usize) -> Result<bool, JournalError> {
        if pos > self.len {
            return Ok(false);
        }
        if !all_zero(self.bytes.get(pos - self.base..).unwrap_or_default()) {
            return Ok(false);
        }
        let mut at = (self.base + self.bytes.len()).max(pos);
        let mut chunk = vec![0u8; READ_CHUNK.min(self.len - at)];
        while at < self.len {
            let want = (self.len - at).min(chunk.len());
            let n = self.read(at, &mut chunk[..want])?;
            if n == 0 {
                break;
            }
            if !all_zero(&chunk[..n]) {
                return Ok(false);
            }
            at += n;
        }
        Ok(true)
    }

    /// The whole file, read again from its start.
    fn whole(&self) -> Result<Vec<u8>, JournalError> {
        let mut all = vec![0u8; self.len];
        let n = self.read(0, &mut all)?;
        all.truncate(n);
        Ok(all)
    }
}

/// Writes `PREPARED`: `size` zero bytes, synced, then renamed into place (so its existence means it is whole).
/// Reuses one left by an earlier run.
fn prepare(storage: &dyn Storage, dir: &Path, size: u64) -> io::Result<()> {
    let done = dir.join(PREPARED);
    if storage.len(&done).is_ok_and(|len| len == size) {
        return Ok(());
    }
    let tmp = dir.join(PREPARING);
    let mut file = storage.open(&tmp, Open::Truncate)?;
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(chunk.len() as u64) as usize;
        file.write_at(&chunk[..n], at)?;
        at += n as u64;
    }
    file.sync_data()?;
    storage.rename(&tmp, &done)
}

fn list_segments(storage: &dyn Storage, dir: &Path) -> Result<Vec<(u64, PathBuf)>, JournalError> {
    let mut out = Vec::new();
    for name in storage.list(dir).map_err(io_err(format!("listing {}", dir.display())))? {
        let Some(stem) = name.strip_suffix(".log") else { continue };
        if let Ok(first) = stem.parse::<u64>() {
            out.push((first, dir.join(&name)));
        }
    }
    out.sort();
    Ok(out)
}

/// Reads and checks every record of the journal in `dir` on the real disk: [`read_in`] with [`OsStorage`].
pub fn read(
    dir: &Path,
    config: &JournalConfig,
    from: Offset,
    visit: impl FnMut(Offset, &[u8]) -> Result<(), String>,
) -> Result<Offset, JournalError> {
    read_in(&OsStorage, dir, config, from, visit)
}

/// Reads and checks every record of the journal in `dir`, calling `visit` for each at or after `from`; an error
/// from `visit` (a payload that does not decode) stops the read as [`JournalError::Payload`], naming the segment
/// and byte. The same checks as recovery, without repairing anything: a torn tail is reported as `Corrupt` too.
pub fn read_in(
    storage: &dyn Storage,
    dir: &Path,
    config: &JournalConfig,
    from: Offset,
    mut visit: impl FnMut(Offset, &[u8]) -> Result<(), String>,
) -> Result<Offset, JournalError> {
    let mut expected = None::<u64>;
    let mut last = 0;
    for (first, path) in list_segments(storage, dir)? {
        let mut reader = SegmentReader::new(storage, &path)?;
        let mut pos = 0;
        if expected.is_some_and(|e| e != first) || (expected.is_none() && first == 0) {
            return Err(JournalError::Corrupt { segment: path, position: 0, reason: "gap between segments".into() });
        }
        let mut next = first;
        while pos < reader.len {
            let bad = match reader.parse(pos, config.record_bytes_max)? {
                Parsed::Record { offset, payload, next: end } if offset == next => {
                    if offset >= from.0
                        && let Err(reason) = visit(Offset(offset), payload)
                    {
                        return Err(JournalError::Payload { segment: path, position: pos as u64, offset, reason });
                    }
                    next += 1;
                    pos = end;
                    continue;
                }
                Parsed::Record { offset, .. } => format!("offset {offset} where {next} was expected"),
                Parsed::Bad(reason) => reason,
            };
            if reader.zero_from(pos)? {
                break;
            }
            return Err(JournalError::Corrupt { segment: path, position: pos as u64, reason: bad });
        }
        expected = Some(next);
        // An empty last segment still says where the journal ends: before its first offset.
        last = next - 1;
    }
    Ok(Offset(last))
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, recovering a torn tail; refuses corruption in the middle.
    pub fn open(
        dir: &Path,
        config: JournalConfig,
        storage: Arc<dyn Storage>,
    ) -> Result<(Journal, Recovered), JournalError> {
        storage.create_dir_all(dir).map_err(io_err(format!("creating {}", dir.display())))?;
        let listed = list_segments(&*storage, dir)?;
        let mut segments = Vec::with_capacity(listed.len().max(1));
        let mut truncated_bytes = 0;
        let mut next: Option<u64> = None;
        let count = listed.len();
        for (i, (first, path)) in listed.into_iter().enumerate() {
            let is_last = i + 1 == count;
            if next.is_some_and(|n| n != first) || first == 0 {
                let reason = format!("segment starts at offset {first}, expected {}", next.unwrap_or(1));
                return Err(JournalError::Corrupt { segment: path, position: 0, reason });
            }
            let mut reader = SegmentReader::new(&*storage, &path)?;
            let mut pos = 0usize;
            let mut expect = first;
            while pos < reader.len {
                let bad = match reader.parse(pos, config.record_bytes_max)? {
                    Parsed::Record { offset, next: end, .. } if offset == expect => {
                        expect += 1;
                        pos = end;
                        continue;
                    }
                    Parsed::Record { offset, .. } => format!("offset {offset} where {expect} was expected"),
                    Parsed::Bad(reason) => reason,
                };
                if reader.zero_from(pos)? {
                    break;
                }
                let bytes = reader.whole()?;
                if !is_last || valid_record_after(&bytes, pos, config.record_bytes_max) {
                    return Err(JournalError::Corrupt { segment: path, position: pos as u64, reason: bad });
                }
                let garbage_end = bytes.iter().rposition(|b| *b != 0).map_or(pos, |p| p + 1);
                // A torn tail: cut it, and make the cut durable before anything is appended after it.
                let mut file =
                    storage.open(&path, Open::Existing).map_err(io_err(format!("opening {}", path.display())))?;
                file.set_len(pos as u64).map_err(io_err(format!("truncating {}", path.display())))?;
                file.sync_data().map_err(io_err(format!("syncing {}", path.display())))?;
                truncated_bytes = (garbage_end - pos) as u64;
                break;
            }
            next = Some(expect);
            segments.push(SegmentInfo { path, first: Offset(first), last: Offset(expect - 1), bytes: pos as u64 });
        }
        let appended = next.map_or(0, |n| n - 1);
        let first = segments.first().map_or(Offset(appended + 1), |s| s.first);
        let recovered_segments = segments.len();
        let file = match segments.last() {
            Some(s) => {
                let mut file =
                    storage.open(&s.path, Open::Existing).map_err(io_err(format!("opening {}", s.path.display())))?;
                // What was found may have been in the page cache only (written by a process that died before its
                // sync): make it durable, names included, before anything derived from it (an ack to a resend,
                // a re-emitted trigger) is published.
                file.sync_data().map_err(io_err(format!("syncing {}", s.path.display())))?;
                storage.sync_dir(dir).map_err(io_err(format!("syncing directory {}", dir.display())))?;
                Some(file)
            }
            None => None,
        };
        let mut journal = Journal {
            dir: dir.to_owned(),
            config,
            storage,
            segments,
            file,
            preparing: None,
            buffer: Vec::with_capacity(1 << 20),
            appended,
            durable: Offset(appended),
            poisoned: false,
        };
        if recovered_segments == 0 {
            // A new journal's first segment grows as it is written: zero-filling and syncing a full segment here
            // was most of a first start (80 ms of 64 MiB on CI's class of machine). The helper prepares the next.
            journal.create_segment(1, false)?;
        } else {
            journal.prepare_next();
        }
        let recovered =
            Recovered { durable: Offset(appended), first, truncated_bytes, segments: journal.segments.len() };
        Ok((journal, recovered))
    }

    /// Starts the helper that prepares the next segment, if preallocating and none is running.
    fn prepare_next(&mut self) {
        if self.config.preallocate && self.config.prepare_in_background && self.preparing.is_none() {
            let (dir, size, storage) = (self.dir.clone(), self.config.segment_bytes_max, Arc::clone(&self.storage));
            self.preparing = Some(std::thread::spawn(move || prepare(&*storage, &dir, size)));
        }
    }

    /// Makes the segment starting at `first` the one being written: with `preallocated` (and preallocation on),
    /// the prepared file renamed into place (prepared now if the helper failed or was not running), else a new
    /// empty file that grows as it is written.
    fn create_segment(&mut self, first: u64, preallocated: bool) -> Result<(), JournalError> {
        let path = self.dir.join(segment_name(first));
        let file = if self.config.preallocate && preallocated {
            let helper = self.preparing.take().map(|h| h.join());
            if !matches!(helper, Some(Ok(Ok(())))) {
                prepare(&*self.storage, &self.dir, self.config.segment_bytes_max)
                    .map_err(io_err(format!("preallocating a segment in {}", self.dir.display())))?;
            }
            self.storage
                .rename(&self.dir.join(PREPARED), &path)
                .map_err(io_err(format!("creating {}", path.display())))?;
            self.storage.open(&path, Open::Existing)
        } else {
            self.storage.open(&path, Open::CreateNew)
        };
        let file = file.map_err(io_err(format!("opening {}", path.display())))?;
        // The new name must survive a crash as well as its contents.
        self.storage.sync_dir(&self.dir).map_err(io_err(format!("syncing directory {}", self.dir.display())))?;
        self.file = Some(file);
        self.segments.push(SegmentInfo { path, first: Offset(first), last: Offset(first - 1), bytes: 0 });
        self.prepare_next();
        Ok(())
    }

    /// The last durable offset.
    pub fn durable(&self) -> Offset {
        self.durable
    }

    /// The last offset appended (durable or not).
    pub fn appended(&self) -> Offset {
        Offset(self.appended)
    }

    pub fn is_poisoned(&self) -> bool {
        self.poisoned
    }

    pub fn segments(&self) -> &[SegmentInfo] {
        &self.segments
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Buffers a record. Offsets must follow each other with no gap. Nothing is durable until `commit`.
    pub fn append(&mut self, offset: Offset, payload: &[u8]) -> Result<(), JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if offset.0 != self.appended + 1 {
            return Err(JournalError::OffsetGap { expected: self.appended + 1, got: offset.0 });
        }
        if payload.is_empty() || payload.len() > self.config.record_bytes_max as usize {
            return Err(JournalError::RecordTooLarge(payload.len()));
        }
        let record_bytes = (HEADER_BYTES + payload.len()) as u64;
        let current = self.segments.last().map_or(0, |s| s.bytes) + self.buffer.len() as u64;
        if current > 0 && current + record_bytes > self.config.segment_bytes_max {
            self.roll()?;
        }
        encode_record(offset.0, payload, &mut self.buffer);
        self.appended = offset.0;
        Ok(())
    }

    /// Closes the current segment (writing and syncing what is buffered for it) and starts the next one.
    fn roll(&mut self) -> Result<(), JournalError> {
        self.write_buffer()?;
        self.sync()?;
        // The record about to be appended is the segment's first.
        let first = self.appended + 1;
        let created = self.create_segment(first, true);
        if created.is_err() {
            self.poisoned = true;
        }
        created
    }

    fn write_buffer(&mut self) -> Result<(), JournalError> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let at = self.segments.last().map_or(0, |s| s.bytes);
        let Some(file) = self.file.as_mut() else {
            self.poisoned = true;
            return Err(JournalError::Poisoned);
        };
        if let Err(e) = file.write_at(&self.buffer, at) {
            self.poisoned = true;
            return Err(io_err("writing the journal")(e));
        }
        if let Some(s) = self.segments.last_mut() {
            s.bytes += self.buffer.len() as u64;
        }
        self.buffer.clear();
        Ok(())
    }

    fn sync(&mut self) -> Result<(), JournalError> {
        let synced = match self.file.as_mut() {
            Some(file) => file.sync_data(),
            None => Err(io::Error::other("no segment open")),
        };
        if let Err(e) = synced {
            // Never retried: see the module documentation.
            self.poisoned = true;
            return Err(io_err("fdatasync of the journal")(e));
        }
        if let Some(s) = self.segments.last_mut() {
            s.last = Offset(self.appended);
        }
        self.durable = Offset(self.appended);
        Ok(())
    }

    /// Group commit: writes everything buffered, syncs once, and returns the new durable offset.
    pub fn commit(&mut self) -> Result<Offset, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if self.appended == self.durable.0 {
            return Ok(self.durable);
        }
        self.write_buffer()?;
        self.sync()?;
        Ok(self.durable)
    }

    /// Calls `visit` for every record at or after `from`, reading only what `open` verified (each segment's
    /// records up to its last, never its zero tail). An error from `visit` stops the read as [`JournalError::Payload`].
    pub fn replay(
        &self,
        from: Offset,
        mut visit: impl FnMut(Offset, &[u8]) -> Result<(), String>,
    ) -> Result<(), JournalError> {
        for segment in self.segments.iter().filter(|s| s.last >= from && s.last >= s.first) {
            let mut reader = SegmentReader::new(&*self.storage, &segment.path)?;
            let mut pos = 0usize;
            let mut expect = segment.first.0;
            while expect <= segment.last.0 {
                match reader.parse(pos, self.config.record_bytes_max)? {
                    Parsed::Record { offset, payload, next } if offset == expect => {
                        if offset >= from.0
                            && let Err(reason) = visit(Offset(offset), payload)
                        {
                            let (segment, position) = (segment.path.clone(), pos as u64);
                            return Err(JournalError::Payload { segment, position, offset, reason });
                        }
                        expect += 1;
                        pos = next;
                    }
                    // Changed on disk since `open` verified it.
                    _ => {
                        let reason = format!("record {expect} changed since the journal was opened");
                        return Err(JournalError::Corrupt {
                            segment: segment.path.clone(),
                            position: pos as u64,
                            reason,
                        });
                    }
                }
            }
        }
        Ok(())
    }

    /// Cuts every record after `keep` (recovery drops a batch whose tail a crash lost: never acknowledged, and
    /// all-or-nothing for its producer). Later segments are deleted; in the segment that holds `keep + 1`, the
    /// records from it on are overwritten with zeros (the clean end), then synced. Returns the records cut.
    pub fn truncate_after(&mut self, keep: Offset) -> Result<u64, JournalError> {
        if self.poisoned {
            return Err(JournalError::Poisoned);
        }
        if keep.0 >= self.appended {
            return Ok(0);
        }
        assert!(self.buffer.is_empty() && self.durable.0 == self.appended, "invariant: truncation follows open");
        let cut = self.appended - keep.0;
        let mut removed = false;
        while self.segments.len() > 1 && self.segments.last().is_some_and(|s| s.first > keep) {
            if let Some(s) = self.segments.pop() {
                self.storage.remove(&s.path).map_err(io_err(format!("deleting {}", s.path.display())))?;
                removed = true;
            }
        }
        let Some(segment) = self.segments.last_mut() else { return Err(JournalError::Poisoned) };
        let mut reader = SegmentReader::new(&*self.storage, &segment.path)?;
        let mut pos = 0usize;
        while let Parsed::Record { offset, next, .. } = reader.parse(pos, self.config.record_bytes_max)? {
            if offset > keep.0 {
                break;
            }
            pos = next;
        }
        let mut file = self
            .storage
            .open(&segment.path, Open::Existing)
            .map_err(io_err(format!("opening {}", segment.path.display())))?;
        let zeros = vec![0u8; segment.bytes as usize - pos];
        file.write_at(&zeros, pos as u64).map_err(io_err(format!("truncating {}", segment.path.display())))?;
        file.sync_data().map_err(io_err(format!("syncing {}", segment.path.display())))?;
        if removed {
            self.storage.sync_dir(&self.dir).map_err(io_err(format!("syncing directory {}", self.dir.display())))?;
        }
        segment.bytes = pos as u64;
        segment.last = keep;
        self.file = Some(file);
        self.appended = keep.0;
        self.durable = keep;
        Ok(cut)
    }

    /// Deletes the segments whose records are all below `offset` (the oldest durable checkpoint). The segment
    /// being written is never deleted.
    pub fn delete_before(&mut self, offset: Offset) -> Result<usize, JournalError> {
        let mut deleted = 0;
        while self.segments.len() > 1 && self.segments[0].last < offset && self.segments[1].first <= offset {
            let s = self.segments.remove(0);
            self.storage.remove(&s.path).map_err(io_err(format!("deleting {}", s.path.display())))?;
            deleted += 1;
        }
        if deleted > 0 {
            self.storage.sync_dir(&self.dir).map_err(io_err(format!("syncing directory {}", self.dir.display())))?;
        }
        Ok(deleted)
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        // The helper only writes `next.prealloc`; waiting keeps it from outliving the journal's directory.
        if let Some(h) = self.preparing.take() {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::io::Read;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn read_file(path: &Path) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        File::open(path)?.read_to_end(&mut v)?;
        Ok(v)
    }

    fn open(dir: &Path, segment_bytes_max: u64) -> Result<(Journal, Recovered), JournalError> {
        Journal::open(dir, JournalConfig { segment_bytes_max, ..JournalConfig::default() }, Arc::new(OsStorage))
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("event-{i}-{}", "x".repeat((i % 40) as usize)).into_bytes()
    }

    fn fill(j: &mut Journal, from: u64, to: u64) {
        for i in from..=to {
            j.append(Offset(i), &payload(i)).unwrap();
            if i % 7 == 0 {
                j.commit().unwrap();
            }
        }
        j.commit().unwrap();
    }

    /// Where the records of a segment file end.
    fn j_end(path: &Path) -> u64 {
        let bytes = read_file(path).unwrap();
        let mut pos = 0;
        while let Parsed::Record { next, .. } = parse_at(&bytes, pos, 1 << 20) {
            pos = next;
        }
        pos as u64
    }

    fn all(dir: &Path) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        read(dir, &JournalConfig::default(), Offset(1), |o, p| {
            out.push((o.0, p.to_vec()));
            Ok(())
        })
        .unwrap();
        out
    }

    #[test]
    fn appends_commit_and_reopen_across_segments() {
        // Proves records survive reopening, offsets stay gapless across segment rolls, and durable follows commit.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, r) = open(dir.path(), 1024).unwrap();
        assert_eq!(r.durable, Offset(0));
        j.append(Offset(1), b"a").unwrap();
        assert_eq!(j.durable(), Offset(0));
        assert_eq!(j.commit().unwrap(), Offset(1));
        fill(&mut j, 2, 500);
        assert!(j.segments().len() > 5, "{} segments", j.segments().len());
        assert!(matches!(j.append(Offset(502), b"x"), Err(JournalError::OffsetGap { expected: 501, got: 502 })));
        drop(j);
        let (j, r) = open(dir.path(), 1024).unwrap();
        assert_eq!((r.durable, r.truncated_bytes), (Offset(500), 0));
        assert_eq!(j.appended(), Offset(500));
        let records = all(dir.path());
        assert_eq!(records.len(), 500);
        assert!(records.iter().enumerate().all(|(i, (o, p))| *o == i as u64 + 1 && (i == 0 || *p == payload(*o))));
    }

    #[test]
    fn segments_are_preallocated_and_their_zero_tail_is_a_clean_end() {
        // Proves a segment is full size from birth (all but a new journal's first, which grows as it is written),
        // the next one is prepared ahead, reopening after a crash-like drop finds the records and cuts nothing,
        // and the same journal works without preallocation.
        for preallocate in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let config = JournalConfig { segment_bytes_max: 4096, preallocate, ..JournalConfig::default() };
            let (mut j, _) = Journal::open(dir.path(), config.clone(), Arc::new(OsStorage)).unwrap();
            fill(&mut j, 1, 150);
            let segments = j.segments().to_vec();
            assert!(segments.len() >= 2);
            for s in &segments {
                let len = fs::metadata(&s.path).unwrap().len();
                let full = preallocate && s.first > Offset(1);
                assert_eq!(len == 4096, full, "{} is {len} bytes", s.path.display());
                assert!(s.bytes <= 4096 && s.bytes > 0);
            }
            drop(j);
            assert_eq!(dir.path().join(PREPARED).exists(), preallocate);
            let (mut j, r) = Journal::open(dir.path(), config.clone(), Arc::new(OsStorage)).unwrap();
            assert_eq!((r.durable, r.truncated_bytes, r.segments), (Offset(150), 0, segments.len()));
            fill(&mut j, 151, 300);
            drop(j);
            let records = all(dir.path());
            assert_eq!(records.len(), 300);
            assert!(records.iter().all(|(o, p)| *o == 1 || *p == payload(*o)));
        }
    }

    #[test]
    fn torn_tails_at_every_byte_recover_to_the_last_whole_record() {
        // Proves cutting the last segment at any byte recovers exactly the records wholly before the cut.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = open(dir.path(), 1 << 20).unwrap();
        fill(&mut j, 1, 40);
        let path = j.segments()[0].path.clone();
        drop(j);
        let full = read_file(&path).unwrap();
        // Record boundaries, to know what each cut must leave.
        let mut ends = vec![0usize];
        let mut pos = 0;
        while let Parsed::Record { next, .. } = parse_at(&full, pos, 1 << 20) {
            ends.push(next);
            pos = next;
            if pos == full.len() {
                break;
            }
        }
        // Every cut through the records, and a few into the preallocated zeros after them.
        let records_end = ends.last().copied().unwrap_or(0);
        for cut in (0..full.len().min(records_end + 64)).step_by(3) {
            fs::write(&path, &full[..cut]).unwrap();
            let (j, r) = open(dir.path(), 1 << 20).unwrap();
            let whole = ends.iter().filter(|e| **e <= cut).count() as u64 - 1;
            assert_eq!(r.durable, Offset(whole), "cut at {cut}");
            assert_eq!(j.appended(), Offset(whole));
            drop(j);
            assert_eq!(all(dir.path()).len() as u64, whole);
        }
    }

    #[test]
    fn garbage_appended_after_the_tail_is_truncated() {
        // Proves zeros or random bytes after the last record (a torn batch) are cut and appending resumes.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = open(dir.path(), 1 << 20).unwrap();
        fill(&mut j, 1, 10);
        let path = j.segments()[0].path.clone();
        drop(j);
        let end = j_end(&path);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0u8; 100], end).unwrap();
        f.write_all_at(&[0xAB; 37], end + 100).unwrap();
        drop(f);
        let (mut j, r) = open(dir.path(), 1 << 20).unwrap();
        assert_eq!((r.durable, r.truncated_bytes), (Offset(10), 137));
        fill(&mut j, 11, 20);
        drop(j);
        assert_eq!(all(dir.path()).len(), 20);
    }

    #[test]
    fn the_zero_tail_of_a_large_segment_is_checked_to_its_end() {
        // Proves the tail is read a chunk at a time to the very end of a preallocated segment several chunks long:
        // bytes written megabytes past the last record are found, cut as a torn tail when no valid record is
        // among them, and refused as damage when one is.
        let dir = tempfile::tempdir().unwrap();
        let config = JournalConfig { segment_bytes_max: 4 * READ_CHUNK as u64, ..JournalConfig::default() };
        let (mut j, _) = Journal::open(dir.path(), config.clone(), Arc::new(OsStorage)).unwrap();
        let big = vec![7u8; READ_CHUNK - 64];
        for o in 1..=5 {
            j.append(Offset(o), &big).unwrap();
        }
        j.append(Offset(6), b"small").unwrap();
        j.commit().unwrap();
        let last = j.segments().last().unwrap().clone();
        assert!(last.first > Offset(1) && last.last == Offset(6), "{last:?}");
        drop(j);
        assert_eq!(fs::metadata(&last.path).unwrap().len(), 4 * READ_CHUNK as u64);
        let far = 3 * READ_CHUNK as u64 + 12_345;
        let f = OpenOptions::new().write(true).open(&last.path).unwrap();
        f.write_all_at(&[0xAB; 37], far).unwrap();
        drop(f);
        let (j, r) = Journal::open(dir.path(), config.clone(), Arc::new(OsStorage)).unwrap();
        assert_eq!((r.durable, r.truncated_bytes), (Offset(6), far + 37 - last.bytes));
        drop(j);
        let mut record = Vec::new();
        encode_record(9, b"a valid record where none was written", &mut record);
        let f = OpenOptions::new().write(true).open(&last.path).unwrap();
        f.write_all_at(&record, far).unwrap();
        drop(f);
        match Journal::open(dir.path(), config, Arc::new(OsStorage)) {
            Err(JournalError::Corrupt { segment, position, .. }) => {
                assert_eq!((segment, position), (last.path.clone(), last.bytes));
            }
            other => panic!("expected Corrupt, got {:?}", other.map(|(_, r)| r)),
        }
    }

    #[test]
    fn a_flipped_bit_in_the_middle_refuses_to_start() {
        // Proves corruption followed by valid records is refused with the segment and byte position, in the last
        // segment and in an earlier one.
        for segment_bytes_max in [1 << 20, 2048] {
            let dir = tempfile::tempdir().unwrap();
            let (mut j, _) = open(dir.path(), segment_bytes_max).unwrap();
            fill(&mut j, 1, 200);
            let target = j.segments()[0].path.clone();
            let at = j.segments()[0].bytes as usize / 3;
            drop(j);
            let mut bytes = read_file(&target).unwrap();
            bytes[at] ^= 0x10;
            fs::write(&target, &bytes).unwrap();
            match open(dir.path(), segment_bytes_max) {
                Err(JournalError::Corrupt { segment, position, .. }) => {
                    assert_eq!(segment, target);
                    assert!(position <= at as u64);
                    let msg = format!("{}", JournalError::Corrupt { segment, position, reason: "x".into() });
                    assert!(msg.contains("refusing to start"));
                }
                Err(e) => panic!("unexpected error {e}"),
                Ok(_) => panic!("opened a corrupt journal ({segment_bytes_max})"),
            }
        }
    }

    /// The real disk, with `fdatasync` failing on demand.
    #[derive(Debug)]
    struct FailingStorage {
        fail: Arc<AtomicBool>,
    }

    struct FailingFile {
        inner: Box<dyn StorageFile>,
        fail: Arc<AtomicBool>,
    }

    impl StorageFile for FailingFile {
        fn write_at(&mut self, buf: &[u8], pos: u64) -> io::Result<()> {
            self.inner.write_at(buf, pos)
        }
        fn set_len(&mut self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(io::Error::other("injected fsync failure"));
            }
            self.inner.sync_data()
        }
    }

    impl Storage for FailingStorage {
        fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
            OsStorage.create_dir_all(dir)
        }
        fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
            OsStorage.list(dir)
        }
        fn read_at(&self, path: &Path, pos: u64, buf: &mut [u8]) -> io::Result<usize> {
            OsStorage.read_at(path, pos, buf)
        }
        fn len(&self, path: &Path) -> io::Result<u64> {
            OsStorage.len(path)
        }
        fn open(&self, path: &Path, how: Open) -> io::Result<Box<dyn StorageFile>> {
            Ok(Box::new(FailingFile { inner: OsStorage.open(path, how)?, fail: Arc::clone(&self.fail) }))
        }
        fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
            OsStorage.rename(from, to)
        }
        fn remove(&self, path: &Path) -> io::Result<()> {
            OsStorage.remove(path)
        }
        fn sync_dir(&self, dir: &Path) -> io::Result<()> {
            OsStorage.sync_dir(dir)
        }
    }

    #[test]
    fn a_failed_fsync_poisons_the_journal() {
        // Proves a failed fsync acknowledges nothing, and every later append and commit fails (never retried).
        let dir = tempfile::tempdir().unwrap();
        let fail = Arc::new(AtomicBool::new(false));
        let storage = Arc::new(FailingStorage { fail: Arc::clone(&fail) });
        let (mut j, _) = Journal::open(dir.path(), JournalConfig::default(), storage).unwrap();
        fill(&mut j, 1, 5);
        j.append(Offset(6), b"six").unwrap();
        fail.store(true, Ordering::SeqCst);
        assert!(matches!(j.commit(), Err(JournalError::Io { .. })));
        assert_eq!(j.durable(), Offset(5));
        assert!(j.is_poisoned());
        fail.store(false, Ordering::SeqCst);
        assert!(matches!(j.commit(), Err(JournalError::Poisoned)));
        assert!(matches!(j.append(Offset(7), b"seven"), Err(JournalError::Poisoned)));
        assert_eq!(j.durable(), Offset(5));
    }

    #[test]
    fn segments_behind_a_checkpoint_are_deleted() {
        // Proves only whole segments below the offset go, never the one being written, and reading still works
        // from the first remaining record.
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = open(dir.path(), 1024).unwrap();
        fill(&mut j, 1, 300);
        let before = j.segments().len();
        let keep_from = j.segments()[3].first;
        let deleted = j.delete_before(keep_from).unwrap();
        assert_eq!(deleted, 3);
        assert_eq!(j.segments().len(), before - 3);
        drop(j);
        let mut n = 0;
        read(dir.path(), &JournalConfig::default(), keep_from, |_, _| {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 300 - keep_from.0 + 1);
        let (j, _) = open(dir.path(), 1024).unwrap();
        assert_eq!(j.appended(), Offset(300));
    }
}
