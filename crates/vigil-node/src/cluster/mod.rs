//! Partitioned, replicated nodes on NATS JetStream (docs/cluster.md).
//!
//! ```text
//!  vigil publish: JSON Lines ─ offsets, windows ─▶ VIGIL_EVENTS (vigil.ev.p{N}, vigil.ev.all)
//!  vigil serve --source nats://… --partition N/P: ordered consumer (p{N} + all) ─▶ the same sequencer, shards,
//!      checkpoints as a single node (no journal of its own) ─▶ triggers ─▶ VIGIL_TRIGGERS (deduplicated by id)
//! ```
//!
//! The stream carries *windows*: the publisher cuts the sequenced events into consecutive offset ranges; a window's
//! events go out as one message per partition that has events in it (`vigil.ev.p{N}`), then one message on the
//! broadcast subject (`vigil.ev.all`) with the events that have no account, published last and always (even
//! empty): it closes the window. A node buffers its partition's messages until the closing message and then applies
//! the window's events in offset order. Every message of a window carries the window's range in a header.

pub mod forward;
pub mod fund;
pub mod node;
pub mod publish;
pub mod source;
pub mod stress;
pub mod triggers;

use std::fmt;
use std::str::FromStr;

use vigil_model::{Offset, Reason};
use vigil_store::codec::{REJECTED_INPUT, decode_event};

use crate::intake::Item;

/// The stream of sequenced events.
pub const EVENTS_STREAM: &str = "VIGIL_EVENTS";
/// The stream of liquidation triggers, each stored once.
pub const TRIGGERS_STREAM: &str = "VIGIL_TRIGGERS";
/// Events without an account, and every window's closing message.
pub const BROADCAST_SUBJECT: &str = "vigil.ev.all";
/// Every event subject (the stream's subjects).
pub const EVENT_SUBJECTS: &str = "vigil.ev.>";
/// Every trigger subject.
pub const TRIGGER_SUBJECTS: &str = "vigil.triggers.>";

/// The window a message belongs to: `first-last` (offsets, inclusive).
pub const WINDOW_HEADER: &str = "Vigil-Window";
/// The first offset the message carries (absent from an empty closing message).
pub const FIRST_HEADER: &str = "Vigil-Offset";
/// How many events the message carries.
pub const COUNT_HEADER: &str = "Vigil-Count";
/// The partition count the stream was published with (a node serving another count would miss accounts).
pub const PARTITIONS_HEADER: &str = "Vigil-Partitions";
/// The offset of a trigger, on its message in `VIGIL_TRIGGERS`.
pub const TRIGGER_OFFSET_HEADER: &str = "Vigil-Trigger-Offset";

/// The NATS server binary the tests and scripts run: `VIGIL_NATS_SERVER`, else `nats-server` on `PATH`.
pub fn nats_server_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("VIGIL_NATS_SERVER") {
        return Some(std::path::PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("nats-server")).find(|p| p.is_file())
}

/// The subject of partition `index`'s events.
pub fn partition_subject(index: u32) -> String {
    format!("vigil.ev.p{index}")
}

/// The subject partition `index`'s triggers are published to.
pub fn trigger_subject(index: u32) -> String {
    format!("vigil.triggers.p{index}")
}

/// The partition that owns `account` among `count`: FNV-1a (64-bit) of the account's UTF-8 bytes, then MurmurHash3's
/// 64-bit finalizer (`fmix64`), modulo `count`. (A node's shards take the FNV-1a value itself modulo the shard count:
/// the finalizer keeps the two choices independent, so a partition's accounts spread over all of its node's shards;
/// FNV-1a's own high bits are not mixed enough for short, similar names: `a0`…`a1999` split 85/15 on them.)
pub fn partition_of(account: &str, count: u32) -> u32 {
    (vigil_model::account_hash(account) % u64::from(count.max(1))) as u32
}

/// Which partition a node serves: `index` of `count`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partition {
    pub index: u32,
    pub count: u32,
}

impl Partition {
    /// Whether this partition owns `account`.
    pub fn owns(&self, account: &str) -> bool {
        partition_of(account, self.count) == self.index
    }
}

impl Partition {
    /// Why this partition does not answer for `account`: the owning partition, for the gateway.
    pub fn refusal(&self, account: &str) -> String {
        format!(
            "account {account:?} belongs to partition {}/{}; this node serves partition {self} (docs/cluster.md gives \
             the hash)",
            partition_of(account, self.count),
            self.count
        )
    }
}

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl FromStr for Partition {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("a partition is N/P with 0 <= N < P (such as 0/2), got {s:?}");
        let (n, p) = s.split_once('/').ok_or_else(bad)?;
        let index: u32 = n.trim().parse().map_err(|_| bad())?;
        let count: u32 = p.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count || count > 1024 {
            return Err(bad());
        }
        Ok(Self { index, count })
    }
}

/// A window's range of offsets, inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub first: Offset,
    pub last: Offset,
}

impl Window {
    pub fn header(&self) -> String {
        format!("{}-{}", self.first.0, self.last.0)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('-')?;
        let (first, last) = (Offset(a.parse().ok()?), Offset(b.parse().ok()?));
        (first.0 >= 1 && first <= last).then_some(Self { first, last })
    }
}

/// A file-stored stream of `subjects`, created if missing (`replicas` copies, `duplicate_window`).
pub async fn file_stream(
    js: &async_nats::jetstream::Context,
    name: &str,
    subjects: &str,
    replicas: usize,
    duplicate_window: std::time::Duration,
) -> anyhow::Result<async_nats::jetstream::stream::Stream> {
    let config = async_nats::jetstream::stream::Config {
        name: name.to_owned(),
        subjects: vec![subjects.to_owned()],
        storage: async_nats::jetstream::stream::StorageType::File,
        num_replicas: replicas.max(1),
        duplicate_window,
        ..Default::default()
    };
    retry(&format!("creating or finding the stream {name}"), || js.get_or_create_stream(config.clone())).await
}

/// How long a start-up request to JetStream is retried: a cluster that has just started elects its meta leader
/// first, and answers "JetStream not available" until then.
pub const STARTUP_RETRY: std::time::Duration = std::time::Duration::from_secs(60);

/// Runs `request` until it succeeds or [`STARTUP_RETRY`] has passed (then its last error, with `what`).
pub async fn retry<T, E: fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut request: impl FnMut() -> F,
) -> anyhow::Result<T> {
    let deadline = std::time::Instant::now() + STARTUP_RETRY;
    loop {
        match request().await {
            Ok(v) => return Ok(v),
            Err(e) if std::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "{what}: retrying");
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            }
            Err(e) => return Err(anyhow::anyhow!("{what}: {e}")),
        }
    }
}

/// Appends one event to a message body: `offset: u64 LE | length: u32 LE | record`, where `record` is the event's
/// journal record (the codec of `vigil-store`: an encoded event, or rejected input).
pub fn push_record(offset: Offset, record: &[u8], body: &mut Vec<u8>) {
    body.extend_from_slice(&offset.0.to_le_bytes());
    body.extend_from_slice(&(record.len() as u32).to_le_bytes());
    body.extend_from_slice(record);
}

/// A message body that does not decode: the stream holds something this build did not write.
#[derive(Debug, thiserror::Error)]
#[error("undecodable message body at byte {at}: {what}")]
pub struct BodyError {
    pub at: usize,
    pub what: String,
}

/// The records of a message body, in order (an error ends them: the rest of the body does not decode).
pub fn records(body: &[u8]) -> Records<'_> {
    Records { body, at: 0 }
}

/// The iterator of [`records`]: reads each record in place, allocating nothing.
pub struct Records<'a> {
    body: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<(Offset, &'a [u8]), BodyError>;

    fn next(&mut self) -> Option<Self::Item> {
        let at = self.at;
        if at >= self.body.len() {
            return None;
        }
        let Some(header) = self.body.get(at..at + 12) else {
            self.at = self.body.len();
            return Some(Err(BodyError { at, what: "a truncated record header".into() }));
        };
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&header[..8]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&header[8..]);
        let len = u32::from_le_bytes(len) as usize;
        let Some(record) = self.body.get(at + 12..at + 12 + len) else {
            self.at = self.body.len();
            return Some(Err(BodyError { at, what: format!("a record of {len} bytes past the end") }));
        };
        self.at = at + 12 + len;
        Some(Ok((Offset(u64::from_le_bytes(offset)), record)))
    }
}

/// The sequencer item of a record: the event, or the rejection the publisher gave unreadable input.
pub fn item_of(record: &[u8]) -> Result<Item, String> {
    if record.first() == Some(&REJECTED_INPUT) {
        let text = String::from_utf8_lossy(&record[1..]);
        let (reason, message) = text.split_once(": ").unwrap_or(("invalid_event", &text));
        let reason = Reason::ALL.into_iter().find(|r| r.as_str() == reason).unwrap_or(Reason::InvalidEvent);
        return Ok(Item::Invalid(vigil_model::reject(reason, message.to_owned())));
    }
    decode_event(record).map(Item::Event).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_parse_and_refuse_nonsense() {
        assert_eq!("1/4".parse::<Partition>(), Ok(Partition { index: 1, count: 4 }));
        for bad in ["4/4", "0/0", "1", "a/2", "-1/2", "0/5000"] {
            assert!(bad.parse::<Partition>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_partition_hash_is_the_documented_one_and_independent_of_the_shard_hash() {
        // fmix64(FNV-1a("a")) = fmix64(0xaf63dc4c8601ec8c) = 0x82a2a958a9bece5b (computed independently, in Python,
        // from the two published definitions).
        assert_eq!(partition_of("a", 1 << 31), (0x82a2_a958_a9be_ce5b_u64 % (1 << 31)) as u32);
        // Short, similar names spread evenly, and each partition's accounts land on both shards of a 2-shard node.
        let mut seen = [[0u32; 2]; 2];
        for i in 0..2000 {
            let a = format!("a{i}");
            seen[partition_of(&a, 2) as usize][vigil_model::shard_of(&a, 2)] += 1;
        }
        assert!(seen.iter().flatten().all(|n| (440..=560).contains(n)), "{seen:?}");
    }

    #[test]
    fn bodies_round_trip_and_truncation_is_an_error() {
        let mut body = Vec::new();
        push_record(Offset(7), b"abc", &mut body);
        push_record(Offset(9), b"", &mut body);
        let all = |body| records(body).collect::<Result<Vec<_>, _>>();
        let got = all(&body).expect("decodes");
        assert_eq!(got, vec![(Offset(7), &b"abc"[..]), (Offset(9), &b""[..])]);
        assert!(all(&body[..body.len() - 1]).is_err());
        assert!(all(&body[..5]).is_err());
        // The records before the damage are read; nothing after it.
        let mut cut = records(&body[..body.len() - 1]);
        assert_eq!(cut.next().map(|r| r.is_ok()), Some(true));
        assert_eq!(cut.next().map(|r| r.is_err()), Some(true));
        assert!(cut.next().is_none());
        assert_eq!(Window::parse("3-9"), Some(Window { first: Offset(3), last: Offset(9) }));
        assert_eq!(Window::parse("9-3"), None);
    }

    #[test]
    fn rejected_input_keeps_its_reason() {
        let mut record = Vec::new();
        vigil_store::codec::encode_rejected_input("invalid_number", "bad: 1e999", &mut record);
        match item_of(&record) {
            Ok(Item::Invalid(r)) => {
                assert_eq!(r.reason, Reason::InvalidNumber);
                assert_eq!(r.message, "bad: 1e999");
            }
            _ => panic!("expected a rejection"),
        }
    }
}
