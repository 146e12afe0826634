//! The node's source in cluster mode: its partition's subject and the broadcast subject of `VIGIL_EVENTS`, read
//! with an ordered consumer from the window holding its checkpoint watermark + 1, assembled into windows and
//! handed to the sequencer in offset order. The stream is the journal: the node writes none of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures_util::StreamExt;
use vigil_model::Offset;

use super::{
    BROADCAST_SUBJECT, EVENTS_STREAM, PARTITIONS_HEADER, Partition, WINDOW_HEADER, Window, item_of, partition_subject,
    records,
};
use crate::intake::Item;

/// Where a cluster node reads its events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsSource {
    /// `nats://host:port`, or several, comma-separated.
    pub url: String,
    pub partition: Partition,
}

/// What the consumer reports, for `GET /v1/status` and the metrics.
#[derive(Debug)]
pub struct SourceStatus {
    pub partition: Partition,
    /// The stream sequence of the last message read.
    pub stream_sequence: AtomicU64,
    /// Messages of this partition's subjects in the stream after it.
    pub lag_messages: AtomicU64,
    /// The last offset of the last window applied.
    pub consumed: AtomicU64,
    /// The `VIGIL_FILLS` message through which the fund's fold was last saved (`cluster::fund`, `fund-fold.bin`);
    /// 0 before the first save.
    pub fund_saved_sequence: AtomicU64,
}

impl SourceStatus {
    pub fn new(partition: Partition) -> Self {
        Self {
            partition,
            stream_sequence: AtomicU64::new(0),
            lag_messages: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            fund_saved_sequence: AtomicU64::new(0),
        }
    }
}

/// A closed window's events for this partition (and every broadcast event), in offset order, after the offsets
/// already handed over.
pub struct SourceBatch {
    pub items: Vec<(Offset, Item)>,
    /// The window's last offset: every event up to it has been handed over.
    pub through: Offset,
}

/// The oldest NATS server whose consumers honour `filter_subjects`.
const SERVER_MIN: (u64, u64) = (2, 10);

fn version_of(text: &str) -> Option<(u64, u64)> {
    let mut parts = text.trim_start_matches('v').split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.split('-').next()?.parse().ok()?))
}

/// The window of the message at `sequence`.
async fn window_at(stream: &stream::Stream, sequence: u64) -> anyhow::Result<Window> {
    let m = stream
        .get_raw_message(sequence)
        .await
        .map_err(|e| anyhow::anyhow!("reading message {sequence} of {EVENTS_STREAM}: {e}"))?;
    m.headers
        .get(WINDOW_HEADER)
        .and_then(|v| Window::parse(v.as_str()))
        .with_context(|| format!("message {sequence} of {EVENTS_STREAM} has no readable {WINDOW_HEADER} header"))
}

/// The first sequence in `[lo, hi)` whose window starts after `offset` (or `hi`): windows start at non-decreasing
/// offsets along the stream (the publisher closes one before it starts the next).
async fn first_starting_after(stream: &stream::Stream, mut lo: u64, mut hi: u64, offset: u64) -> anyhow::Result<u64> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if window_at(stream, mid).await?.first.0 > offset {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    Ok(lo)
}

/// The stream sequence to read from to see every event after `after`: the first message of the window that holds
/// `after + 1` (a few binary-search reads of message headers).
pub async fn start_sequence(stream: &mut stream::Stream, after: Offset) -> anyhow::Result<u64> {
    let info = stream.info().await.map_err(|e| anyhow::anyhow!("reading {EVENTS_STREAM}'s state: {e}"))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if info.state.messages == 0 || after.0 == 0 {
        return Ok(first.max(1));
    }
    let last_window = window_at(stream, last).await?;
    if last_window.last < after {
        anyhow::bail!(
            "this node's checkpoints are at offset {}, beyond {EVENTS_STREAM}'s end at offset {}: the stream is not the \
             one they were built from; refusing to start",
            after.0,
            last_window.last.0
        );
    }
    let end = last + 1;
    // The first message of a window starting beyond after + 1; the window before it holds after + 1.
    let beyond = first_starting_after(stream, first, end, after.0 + 1).await?;
    if beyond == first {
        anyhow::bail!(
            "{EVENTS_STREAM} starts at window {} but this node needs the events after offset {}: the stream no \
             longer holds them (its limits removed them); refusing to start with a hole",
            window_at(stream, first).await?.header(),
            after.0
        );
    }
    let holding = window_at(stream, beyond - 1).await?.first.0;
    first_starting_after(stream, first, beyond, holding - 1).await
}

/// The consumer of one partition, assembling windows.
pub struct Feed {
    messages: consumer::pull::Ordered,
    windows: Windows,
    status: std::sync::Arc<SourceStatus>,
}

/// Connects, checks the server, and opens the partition's ordered consumer at the window holding `after + 1`.
/// Waits for the stream to exist (a node may start before the publisher).
pub async fn open(source: &NatsSource, after: Offset, status: std::sync::Arc<SourceStatus>) -> anyhow::Result<Feed> {
    let client = super::publish::connect(&source.url).await?;
    let server = client.server_info();
    if let Some(v) = version_of(&server.version)
        && v < SERVER_MIN
    {
        anyhow::bail!(
            "the NATS server at {} is version {}; a cluster node needs {}.{} or later (older servers ignore a \
             consumer's filter_subjects and would hand this node every partition's events)",
            source.url,
            server.version,
            SERVER_MIN.0,
            SERVER_MIN.1
        );
    }
    let js = jetstream::new(client);
    // A stream not created yet (the node started before the publisher), or a leader being elected: retried.
    let what = format!("finding the stream {EVENTS_STREAM}");
    let stream = super::retry(&what, || js.get_stream(EVENTS_STREAM)).await?;
    let start = super::retry("finding where to resume in the stream", || {
        let mut stream = stream.clone();
        async move { start_sequence(&mut stream, after).await }
    })
    .await?;
    let filters = vec![partition_subject(source.partition.index), BROADCAST_SUBJECT.to_owned()];
    let config = consumer::pull::OrderedConfig {
        filter_subjects: filters.clone(),
        deliver_policy: consumer::DeliverPolicy::ByStartSequence { start_sequence: start },
        ..Default::default()
    };
    let what = format!("creating the partition's consumer on {EVENTS_STREAM}");
    let consumer = super::retry(&what, || stream.create_consumer(config.clone())).await?;
    check_filters(&consumer.cached_info().config.filter_subjects, &filters)?;
    tracing::info!(partition = %source.partition, after = after.0, start_sequence = start, "consuming");
    let messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("reading the partition's consumer: {e}"))?;
    Ok(Feed { messages, windows: Windows::new(after), status })
}

/// A server that does not know `filter_subjects` (NATS < 2.10) drops the field silently: the consumer it returns
/// would deliver every subject.
pub fn check_filters(returned: &[String], asked: &[String]) -> anyhow::Result<()> {
    let mut got = returned.to_vec();
    let mut want = asked.to_vec();
    got.sort();
    want.sort();
    anyhow::ensure!(
        got == want,
        "the NATS server returned a consumer filtering {returned:?}, not {asked:?}: it ignores filter_subjects \
         (NATS older than 2.10), and would hand this node every partition's events; refusing to consume"
    );
    Ok(())
}

impl Feed {
    /// The next closed window's events, or `None` when the consumer ends.
    pub async fn next(&mut self) -> anyhow::Result<Option<SourceBatch>> {
        loop {
            let Some(message) = self.messages.next().await else { return Ok(None) };
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    // The ordered consumer recreates itself where it left off (a leader change, a reconnect).
                    tracing::warn!(error = %e, "reading {EVENTS_STREAM}; the consumer resumes");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Ok(info) = message.info() {
                self.status.stream_sequence.store(info.stream_sequence, Ordering::Relaxed);
                self.status.lag_messages.store(info.pending, Ordering::Relaxed);
            }
            let window = message
                .headers
                .as_ref()
                .and_then(|h| h.get(WINDOW_HEADER))
                .and_then(|v| Window::parse(v.as_str()))
                .with_context(|| format!("a message on {} without a readable window header", message.subject))?;
            let published_with = message
                .headers
                .as_ref()
                .and_then(|h| h.get(PARTITIONS_HEADER))
                .and_then(|v| v.as_str().parse::<u32>().ok());
            if let Some(p) = published_with.filter(|p| *p != self.status.partition.count) {
                anyhow::bail!(
                    "{EVENTS_STREAM} was published with {p} partitions, but this node serves partition {}: its accounts \
                     are not where it reads; start it with --partition N/{p}",
                    self.status.partition
                );
            }
            let closes = message.subject.as_str() == BROADCAST_SUBJECT;
            if let Some(batch) = self.windows.add(window, closes, &message.payload)? {
                self.status.consumed.store(batch.through.0, Ordering::Relaxed);
                return Ok(Some(batch));
            }
        }
    }
}

/// The events of the windows not closed yet, assembled into batches in offset order.
///
/// A window's events come in its partitions' messages and then the broadcast subject's, which closes it; each
/// message's records are in offset order. A message resent (the publisher's restart) or a window re-cut brings
/// offsets again: each is handed over once.
pub struct Windows {
    /// Records of open windows in arrival order: runs each in offset order, possibly overlapping.
    waiting: Vec<(Offset, Item)>,
    /// Every offset up to this one has been handed over.
    handed: Offset,
}

/// The most events a batch reserves room for up front (a window's length bounds its events).
const RESERVE_MAX: u64 = 1 << 16;

impl Windows {
    pub fn new(handed: Offset) -> Self {
        Self { waiting: Vec::new(), handed }
    }

    /// Adds a message's records of `window` (those after the offsets handed over); when the message `closes` the
    /// window, returns the events up to its last offset, in offset order, each once. A body that does not decode
    /// adds nothing.
    pub fn add(&mut self, window: Window, closes: bool, body: &[u8]) -> anyhow::Result<Option<SourceBatch>> {
        if self.waiting.is_empty() {
            // One allocation for the window instead of a doubling series of them (each fresh memory to fault in).
            let len = (window.last.0 - window.first.0).saturating_add(1).min(RESERVE_MAX);
            self.waiting.reserve(len as usize);
        }
        let before = self.waiting.len();
        if let Err(e) = self.push_records(window, body) {
            self.waiting.truncate(before);
            return Err(e);
        }
        if !closes {
            return Ok(None);
        }
        // Stable, and linear on sorted runs: the partitions' messages, then the broadcast one, merge.
        if !self.waiting.is_sorted_by_key(|(o, _)| *o) {
            self.waiting.sort_by_key(|(o, _)| *o);
        }
        self.waiting.dedup_by_key(|(o, _)| *o);
        let cut = self.waiting.partition_point(|(o, _)| *o <= window.last);
        let rest = self.waiting.split_off(cut);
        let items = std::mem::replace(&mut self.waiting, rest);
        self.handed = self.handed.max(window.last);
        Ok(Some(SourceBatch { items, through: self.handed }))
    }

    fn push_records(&mut self, window: Window, body: &[u8]) -> anyhow::Result<()> {
        for record in records(body) {
            let (offset, record) = record?;
            if offset <= self.handed || offset < window.first || offset > window.last {
                continue; // handed over already (a resent or re-cut window), or not this window's
            }
            let item = item_of(record).map_err(|e| anyhow::anyhow!("offset {}: {e}", offset.0))?;
            self.waiting.push((offset, item));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_versions_parse() {
        assert_eq!(version_of("2.9.10"), Some((2, 9)));
        assert_eq!(version_of("v2.15.1"), Some((2, 15)));
        assert_eq!(version_of("2.11.0-beta.1"), Some((2, 11)));
        assert!(version_of("2.9.10").is_some_and(|v| v < SERVER_MIN));
    }

    /// A message body of clock events at `offsets` (any event does: the assembly reads offsets, not contents).
    fn body(offsets: impl IntoIterator<Item = u64>) -> Vec<u8> {
        let mut body = Vec::new();
        for o in offsets {
            let mut record = Vec::new();
            let event = vigil_model::Event::Clock { time: vigil_model::Timestamp(i128::from(o)) };
            vigil_store::codec::encode_event(&event, &mut record).expect("encodes");
            super::super::push_record(Offset(o), &record, &mut body);
        }
        body
    }

    fn offsets(batch: &SourceBatch) -> Vec<u64> {
        batch.items.iter().map(|(o, _)| o.0).collect()
    }

    fn window(first: u64, last: u64) -> Window {
        Window { first: Offset(first), last: Offset(last) }
    }

    #[test]
    fn a_window_is_handed_over_in_offset_order_when_its_broadcast_message_closes_it() {
        let mut w = Windows::new(Offset(0));
        // The partition's events of window 1..=10 in two messages, then the broadcast events.
        assert!(w.add(window(1, 10), false, &body([2, 3, 7])).expect("adds").is_none());
        assert!(w.add(window(1, 10), false, &body([8])).expect("adds").is_none());
        let batch = w.add(window(1, 10), true, &body([1, 4, 5, 6, 9, 10])).expect("adds").expect("closed");
        assert_eq!(offsets(&batch), (1..=10).collect::<Vec<_>>());
        assert_eq!(batch.through, Offset(10));
        // A window with no broadcast events closes with an empty broadcast message.
        w.add(window(11, 12), false, &body([11, 12])).expect("adds");
        let batch = w.add(window(11, 12), true, &[]).expect("adds").expect("closed");
        assert_eq!((offsets(&batch), batch.through), (vec![11, 12], Offset(12)));
    }

    #[test]
    fn resent_and_recut_windows_hand_each_offset_over_once() {
        let mut w = Windows::new(Offset(4));
        // Offsets up to the watermark are skipped; so are offsets outside the message's window.
        w.add(window(1, 8), false, &body([2, 5, 6, 9])).expect("adds");
        // The publisher restarted and resent the window (re-cut from 3): its partition message again.
        w.add(window(3, 8), false, &body([5, 6])).expect("adds");
        let batch = w.add(window(3, 8), true, &body([3, 7, 8])).expect("adds").expect("closed");
        assert_eq!(offsets(&batch), vec![5, 6, 7, 8]);
        // The old window's broadcast message, arriving again after: nothing left to hand over.
        let batch = w.add(window(1, 8), true, &body([1, 3, 4, 7, 8])).expect("adds").expect("closed");
        assert_eq!((offsets(&batch), batch.through), (vec![], Offset(8)));
        // A later window's partition message before an earlier window closes waits for its own close.
        w.add(window(11, 12), false, &body([11])).expect("adds");
        let batch = w.add(window(9, 10), true, &body([9, 10])).expect("adds").expect("closed");
        assert_eq!(offsets(&batch), vec![9, 10]);
        let batch = w.add(window(11, 12), true, &body([12])).expect("adds").expect("closed");
        assert_eq!(offsets(&batch), vec![11, 12]);
    }

    #[test]
    fn a_body_that_does_not_decode_adds_nothing() {
        let mut w = Windows::new(Offset(0));
        w.add(window(1, 4), false, &body([1])).expect("adds");
        let mut damaged = body([2, 3]);
        damaged.pop();
        let Err(err) = w.add(window(1, 4), false, &damaged) else { panic!("a damaged body is refused") };
        assert!(err.to_string().contains("undecodable message body"), "{err}");
        let batch = w.add(window(1, 4), true, &body([4])).expect("adds").expect("closed");
        assert_eq!(offsets(&batch), vec![1, 4]);
    }

    #[test]
    fn a_consumer_without_the_asked_filters_is_refused() {
        let asked = vec!["vigil.ev.p1".to_owned(), "vigil.ev.all".to_owned()];
        assert!(check_filters(&asked.iter().rev().cloned().collect::<Vec<_>>(), &asked).is_ok());
        let err = check_filters(&[], &asked).expect_err("refused");
        assert!(err.to_string().contains("ignores filter_subjects"), "{err}");
    }
}
