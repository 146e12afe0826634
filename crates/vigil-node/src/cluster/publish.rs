//! `vigil publish`: the sequencer in front of the stream. Offsets are the input's non-blank lines, counted from 1
//! exactly as `vigil replay` counts them (an unreadable line takes its offset as a rejection), so a partitioned
//! cluster and a replay of the same input agree offset for offset.
//!
//! The stream never holds a closed window with a message missing. `vigil publish` keeps up to [`WINDOWS_AHEAD`]
//! windows in flight, each message stored only right after the one sent before it (`Nats-Expected-Last-Sequence`:
//! [`Pipeline`]); the node's forwarder, and `vigil publish` after a failure, publish a window whole before the next:
//! its partition messages, their PubAcks, then its closing message on the broadcast subject and that PubAck
//! ([`publish_window`]). A restart resumes after the last closed window (the last message on the broadcast subject), re-cutting the
//! window it was in the middle of: messages cut the same way deduplicate (`Nats-Msg-Id`), and a node applies an
//! offset once whatever the stream holds twice.

use std::collections::VecDeque;
use std::io::{BufReader, Read};
use std::time::Duration;

use anyhow::Context;
use async_nats::HeaderMap;
use async_nats::header::NATS_EXPECTED_LAST_SEQUENCE;
use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::{self, stream};
use axum::body::Bytes;
use vigil_model::{Offset, Reason, parse_line};
use vigil_store::codec::{RECORD_RESERVE, encode_event, encode_rejected_input};

use super::{
    BROADCAST_SUBJECT, COUNT_HEADER, EVENT_SUBJECTS, EVENTS_STREAM, FIRST_HEADER, PARTITIONS_HEADER, WINDOW_HEADER,
    Window, partition_of, partition_subject, push_record,
};
use crate::replay::LINE_BYTES_MAX;

#[derive(Clone, Debug)]
pub struct PublishConfig {
    pub url: String,
    pub partitions: u32,
    /// Events per window at most.
    pub window_events: usize,
    /// Bytes of one message's body at most (a window closes when any of its messages would grow past it).
    pub window_bytes: usize,
    /// A window closes when the input pauses this long (a pipe or a terminal).
    pub idle: Duration,
    /// Replicas of the events stream when the publisher creates it.
    pub replicas: usize,
    /// The stream's duplicate window.
    pub duplicate_window: Duration,
}

impl PublishConfig {
    pub fn new(url: &str, partitions: u32) -> Self {
        Self {
            url: url.to_owned(),
            partitions,
            window_events: 8192,
            window_bytes: 512 << 10,
            idle: Duration::from_millis(2),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

/// What a publisher run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PublishSummary {
    /// The last offset of the last closed window found in the stream at start (0: an empty stream).
    pub resumed_after: Offset,
    /// The last offset published (and acknowledged).
    pub last: Offset,
    pub windows: u64,
    pub messages: u64,
    /// Messages the stream already held (a resend after a crash).
    pub duplicates: u64,
    /// Times the windows sent ahead were resent one at a time (a message or an ack lost, a resend after a crash).
    pub resends: u64,
}

/// Connects to the first reachable of a comma-separated list of `nats://` addresses, retrying for
/// [`super::STARTUP_RETRY`]. The handshake is over when this returns: the server's INFO (its version) is known.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let addrs: Vec<String> = url.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
    anyhow::ensure!(!addrs.is_empty(), "no NATS address given");
    let what = format!("connecting to NATS at {url}");
    super::retry(&what, || {
        async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5)).connect(addrs.as_slice())
    })
    .await
}

/// The events stream, created if missing (file storage; `replicas` copies).
pub async fn events_stream(
    js: &jetstream::Context,
    replicas: usize,
    duplicate_window: Duration,
) -> anyhow::Result<stream::Stream> {
    super::file_stream(js, EVENTS_STREAM, EVENT_SUBJECTS, replicas, duplicate_window).await
}

/// The last closed window in the stream: its last offset (0 if none) and the partition count it was published with.
pub async fn last_close(stream: &stream::Stream) -> anyhow::Result<(Offset, Option<u32>)> {
    match stream.get_last_raw_message_by_subject(BROADCAST_SUBJECT).await {
        Ok(m) => {
            let window = m
                .headers
                .get(WINDOW_HEADER)
                .and_then(|v| Window::parse(v.as_str()))
                .context("the last closing message in the stream has no readable window header")?;
            let partitions = m.headers.get(PARTITIONS_HEADER).and_then(|v| v.as_str().parse().ok());
            Ok((window.last, partitions))
        }
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok((Offset(0), None)),
        Err(e) => Err(anyhow::anyhow!("reading the stream's last closed window: {e}")),
    }
}

/// The last offset of the last closed window in the stream (0 if none).
pub async fn last_closed(stream: &stream::Stream) -> anyhow::Result<Offset> {
    Ok(last_close(stream).await?.0)
}

/// One input line, ready to publish: where it goes (`None`: the broadcast subject) and its journal record.
pub(crate) struct Line {
    pub(crate) partition: Option<u32>,
    pub(crate) record: Vec<u8>,
}

impl Line {
    /// A journal record (a node's, without its producer stamp), routed by its event's account.
    pub(crate) fn of_record(record: Vec<u8>, partitions: u32) -> Self {
        let partition = match vigil_store::codec::decode_event(&record) {
            Ok(event) => event.account().map(|a| partition_of(a, partitions)),
            Err(_) => None, // rejected input (0xFE): every partition takes its offset
        };
        Self { partition, record }
    }
}

/// Parses a line the way `vigil replay` does, into its destination and journal record.
fn prepare(line: Result<&str, String>, partitions: u32) -> Line {
    let parsed = match line {
        Ok(text) => parse_line(text),
        Err(message) => Err(vigil_model::reject(Reason::InvalidEvent, message)),
    };
    let mut record = Vec::with_capacity(RECORD_RESERVE);
    let event = match parsed {
        Ok(event) => match encode_event(&event, &mut record) {
            Ok(()) => Ok(event),
            Err(e) => {
                record.clear();
                Err(vigil_model::reject(Reason::InvalidEvent, format!("event not encodable: {e}")))
            }
        },
        Err(r) => Err(r),
    };
    match event {
        Ok(event) => Line { partition: event.account().map(|a| partition_of(a, partitions)), record },
        Err(r) => {
            encode_rejected_input(r.reason.as_str(), &r.message, &mut record);
            Line { partition: None, record }
        }
    }
}

/// Reads `input` on this thread, skipping the first `skip` offsets, and sends the prepared lines (in chunks) to
/// `tx`. Returns when the input ends or the receiver is gone.
fn read_input(
    input: impl Read,
    skip: u64,
    partitions: u32,
    tx: tokio::sync::mpsc::Sender<Vec<Line>>,
) -> anyhow::Result<()> {
    let mut input = BufReader::with_capacity(1 << 20, input);
    let mut buf = Vec::with_capacity(1024);
    let mut offset = 0u64;
    let mut chunk = Vec::with_capacity(256);
    loop {
        let Some(fits) = crate::replay::read_line(&mut input, &mut buf).context("reading the input")? else { break };
        if fits && buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        offset += 1;
        if offset <= skip {
            continue;
        }
        let line = if !fits {
            Err(format!("line longer than {LINE_BYTES_MAX} bytes"))
        } else {
            std::str::from_utf8(&buf).map_err(|e| format!("line is not UTF-8: {e}"))
        };
        chunk.push(prepare(line, partitions));
        // Hand over at once when nothing more is buffered (a pipe would block, or the input ends): the window may be
        // waiting for these lines, and the next may not come for a while.
        if chunk.len() >= 256 || input.buffer().is_empty() {
            if tx.blocking_send(std::mem::take(&mut chunk)).is_err() {
                return Ok(());
            }
            chunk.reserve(256);
        }
    }
    if !chunk.is_empty() {
        let _ = tx.blocking_send(chunk);
    }
    Ok(())
}

/// A window being cut: one body per partition and the broadcast body.
pub(crate) struct Cut {
    first: Offset,
    pub(crate) last: Offset,
    bodies: Vec<(Vec<u8>, u32, Option<Offset>)>,
    broadcast: (Vec<u8>, u32, Option<Offset>),
    pub(crate) events: usize,
}

impl Cut {
    pub(crate) fn new(first: Offset, partitions: u32) -> Self {
        Self {
            first,
            last: Offset(first.0 - 1),
            bodies: (0..partitions).map(|_| (Vec::new(), 0, None)).collect(),
            broadcast: (Vec::new(), 0, None),
            events: 0,
        }
    }

    pub(crate) fn fits(&self, line: &Line, config: &PublishConfig) -> bool {
        let body = match line.partition {
            Some(p) => &self.bodies[p as usize].0,
            None => &self.broadcast.0,
        };
        self.events < config.window_events && body.len() + line.record.len() + 12 <= config.window_bytes
    }

    pub(crate) fn push(&mut self, line: Line) {
        self.last = self.last.next();
        self.events += 1;
        let target = match line.partition {
            Some(p) => &mut self.bodies[p as usize],
            None => &mut self.broadcast,
        };
        push_record(self.last, &line.record, &mut target.0);
        target.1 += 1;
        target.2.get_or_insert(self.last);
    }
}

fn headers(window: Window, partitions: u32, first: Option<Offset>, count: u32, id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(WINDOW_HEADER, window.header().as_str());
    h.insert(PARTITIONS_HEADER, partitions.to_string().as_str());
    if let Some(f) = first {
        h.insert(FIRST_HEADER, f.0.to_string().as_str());
    }
    h.insert(COUNT_HEADER, count.to_string().as_str());
    h.insert("Nats-Msg-Id", id);
    h
}

/// One message of a window, ready to (re)send.
struct Outgoing {
    subject: String,
    headers: HeaderMap,
    body: Bytes,
}

/// Sends the messages (all but the last pipelined), waits for their acks, then sends the last (the window's close)
/// and waits for its ack. Returns how many the stream already held.
async fn send_window(js: &jetstream::Context, messages: &[Outgoing]) -> Result<u64, String> {
    let Some((close, partitions)) = messages.split_last() else { return Ok(0) };
    let mut pending = Vec::with_capacity(partitions.len());
    for m in partitions {
        let ack = js.publish_with_headers(m.subject.clone(), m.headers.clone(), m.body.clone()).await;
        pending.push(ack.map_err(|e| e.to_string())?);
    }
    let mut duplicates = 0;
    for ack in pending {
        duplicates += u64::from(ack.await.map_err(|e| e.to_string())?.duplicate);
    }
    let ack = js
        .publish_with_headers(close.subject.clone(), close.headers.clone(), close.body.clone())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    Ok(duplicates + u64::from(ack.duplicate))
}

/// A window's messages, ready to send: its partition messages (those with events), then its close.
fn outgoing(cut: Cut) -> (Window, Vec<Outgoing>) {
    let window = Window { first: cut.first, last: cut.last };
    let partitions = cut.bodies.len() as u32;
    let mut messages = Vec::with_capacity(cut.bodies.len() + 1);
    for (index, (body, count, first)) in cut.bodies.into_iter().enumerate() {
        let Some(first) = first else { continue };
        // The id is the first offset and the window: a window re-cut differently after a crash is a different
        // message (its events deduplicate at the node, by offset), never a dropped one.
        let id = format!("{}.{}", first.0, window.header());
        messages.push(Outgoing {
            subject: partition_subject(index as u32),
            headers: headers(window, partitions, Some(first), count, &id),
            body: Bytes::from(body),
        });
    }
    let (body, count, first) = cut.broadcast;
    let id = format!("all.{}", window.header());
    messages.push(Outgoing {
        subject: BROADCAST_SUBJECT.to_owned(),
        headers: headers(window, partitions, first, count, &id),
        body: Bytes::from(body),
    });
    (window, messages)
}

/// Publishes one window: partition messages, their acks, then the closing message and its ack. A failure (a
/// leader election, a lost connection) resends the whole window until [`super::STARTUP_RETRY`] passes: the
/// messages keep their ids, so what was stored the first time deduplicates.
pub(crate) async fn publish_window(
    js: &jetstream::Context,
    cut: Cut,
    summary: &mut PublishSummary,
) -> anyhow::Result<()> {
    let (window, messages) = outgoing(cut);
    publish_messages(js, window, &messages, summary).await
}

async fn publish_messages(
    js: &jetstream::Context,
    window: Window,
    messages: &[Outgoing],
    summary: &mut PublishSummary,
) -> anyhow::Result<()> {
    let what = format!("publishing window {}", window.header());
    let duplicates = super::retry(&what, || send_window(js, messages)).await?;
    summary.duplicates += duplicates;
    stored(summary, window, messages.len());
    Ok(())
}

fn stored(summary: &mut PublishSummary, window: Window, messages: usize) {
    summary.messages += messages as u64;
    summary.windows += 1;
    summary.last = window.last;
}

/// Windows `vigil publish` sends before the acks of the first of them are in.
const WINDOWS_AHEAD: usize = 4;

/// A window sent ahead, its acks not all in.
struct Ahead {
    window: Window,
    messages: Vec<Outgoing>,
    acks: Vec<PublishAckFuture>,
}

/// `vigil publish`'s sender: windows pipelined, without waiting for a window's acks before the next is sent, and
/// still never a close in the stream with a message of its window missing.
///
/// Each message carries `Nats-Expected-Last-Sequence`: the stream's last sequence once every message sent before it
/// is stored. JetStream stores a message only if the stream's last sequence (counting the messages it is storing)
/// is that one, so a message lost (a leader election, a lost connection) makes every message sent after it be
/// refused as well: the stream holds a prefix of what was sent, in order, the invariant of the careful way. The
/// publisher is the stream's only writer (`docs/cluster.md`). At the first ack that fails or says duplicate (a
/// resend after a restart: the stream did not grow), every window not known stored is resent the careful way
/// ([`publish_window`]: what the stream holds deduplicates), and the stream's last sequence is read again.
struct Pipeline<'a> {
    js: &'a jetstream::Context,
    stream: stream::Stream,
    /// The stream's last sequence once every message sent is stored.
    last_sequence: u64,
    ahead: VecDeque<Ahead>,
}

impl<'a> Pipeline<'a> {
    async fn new(js: &'a jetstream::Context, stream: stream::Stream) -> anyhow::Result<Self> {
        let mut p = Self { js, stream, last_sequence: 0, ahead: VecDeque::new() };
        p.last_sequence = p.stream_last_sequence().await?;
        Ok(p)
    }

    async fn stream_last_sequence(&self) -> anyhow::Result<u64> {
        let info = super::retry("reading the stream's last sequence", || self.stream.get_info()).await?;
        Ok(info.state.last_sequence)
    }

    /// Sends a window; completes the oldest windows beyond [`WINDOWS_AHEAD`].
    async fn send(
        &mut self,
        cut: Cut,
        summary: &mut PublishSummary,
        progress: &mut impl FnMut(&PublishSummary),
    ) -> anyhow::Result<()> {
        let (window, messages) = outgoing(cut);
        let mut acks = Vec::with_capacity(messages.len());
        for m in &messages {
            let mut headers = m.headers.clone();
            headers.insert(NATS_EXPECTED_LAST_SEQUENCE, self.last_sequence.to_string().as_str());
            match self.js.publish_with_headers(m.subject.clone(), headers, m.body.clone()).await {
                Ok(ack) => {
                    acks.push(ack);
                    self.last_sequence += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, window = %window.header(), "publishing ahead; resending the careful way");
                    break;
                }
            }
        }
        let complete = acks.len() == messages.len();
        self.ahead.push_back(Ahead { window, messages, acks });
        if !complete {
            return self.resend(summary, progress).await;
        }
        self.complete_down_to(WINDOWS_AHEAD, summary, progress).await
    }

    /// Waits for the acks of every window sent.
    async fn finish(
        &mut self,
        summary: &mut PublishSummary,
        progress: &mut impl FnMut(&PublishSummary),
    ) -> anyhow::Result<()> {
        self.complete_down_to(0, summary, progress).await
    }

    /// Completes the oldest windows until at most `ahead` are in flight.
    async fn complete_down_to(
        &mut self,
        ahead: usize,
        summary: &mut PublishSummary,
        progress: &mut impl FnMut(&PublishSummary),
    ) -> anyhow::Result<()> {
        while self.ahead.len() > ahead {
            self.complete_oldest(summary, progress).await?;
        }
        Ok(())
    }

    async fn complete_oldest(
        &mut self,
        summary: &mut PublishSummary,
        progress: &mut impl FnMut(&PublishSummary),
    ) -> anyhow::Result<()> {
        let Some(Ahead { window, messages, acks }) = self.ahead.pop_front() else { return Ok(()) };
        for ack in acks {
            let stored = match ack.await {
                Ok(a) if !a.duplicate => continue,
                Ok(_) => "stored already".to_owned(),
                Err(e) => e.to_string(),
            };
            tracing::info!(window = %window.header(), ack = %stored, "a window sent ahead was not stored in order; resending the careful way");
            self.ahead.push_front(Ahead { window, messages, acks: Vec::new() });
            return self.resend(summary, progress).await;
        }
        stored(summary, window, messages.len());
        progress(summary);
        Ok(())
    }

    /// Resends every window not known stored, one at a time, then reads where the stream ends.
    async fn resend(
        &mut self,
        summary: &mut PublishSummary,
        progress: &mut impl FnMut(&PublishSummary),
    ) -> anyhow::Result<()> {
        summary.resends += 1;
        // The acks still outstanding are dropped: their messages were sent before the resends on this connection,
        // so the server has taken each of them, stored or refused, before it answers the first resend.
        for Ahead { window, messages, .. } in std::mem::take(&mut self.ahead) {
            publish_messages(self.js, window, &messages, summary).await?;
            progress(summary);
        }
        self.last_sequence = self.stream_last_sequence().await?;
        Ok(())
    }
}

/// Publishes `input` (JSON Lines) to the events stream, resuming after the last closed window it already holds.
/// `progress` is called after each window with what was published so far.
pub async fn publish(
    input: impl Read + Send + 'static,
    config: &PublishConfig,
    mut progress: impl FnMut(&PublishSummary),
) -> anyhow::Result<PublishSummary> {
    anyhow::ensure!(config.partitions >= 1 && config.partitions <= 1024, "--partitions must be 1 to 1024");
    let client = connect(&config.url).await?;
    let js = jetstream::new(client.clone());
    let stream = events_stream(&js, config.replicas, config.duplicate_window).await?;
    let (resumed_after, published_with) = last_close(&stream).await?;
    if let Some(p) = published_with.filter(|p| *p != config.partitions) {
        anyhow::bail!(
            "{EVENTS_STREAM} was published with {p} partitions; --partitions {} would send accounts to other \
             partitions than its nodes read",
            config.partitions
        );
    }
    let mut summary = PublishSummary { resumed_after, last: resumed_after, ..Default::default() };
    if resumed_after.0 > 0 {
        tracing::info!(after = resumed_after.0, "resuming after the stream's last closed window");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<Line>>(64);
    let partitions = config.partitions;
    let reader = std::thread::Builder::new()
        .name("vigil-publish-read".into())
        .spawn(move || read_input(input, resumed_after.0, partitions, tx))
        .context("starting the input reader")?;
    let mut pipeline = Pipeline::new(&js, stream).await?;
    let mut cut = Cut::new(resumed_after.next(), partitions);
    let mut queued: VecDeque<Line> = VecDeque::new();
    let mut ended = false;
    loop {
        if queued.is_empty() && !ended {
            let next = if cut.events == 0 {
                rx.recv().await
            } else {
                match tokio::time::timeout(config.idle, rx.recv()).await {
                    Ok(n) => n,
                    Err(_) => {
                        // The input paused: close what is cut, and see it stored.
                        let next_first = cut.last.next();
                        let full = std::mem::replace(&mut cut, Cut::new(next_first, partitions));
                        pipeline.send(full, &mut summary, &mut progress).await?;
                        pipeline.finish(&mut summary, &mut progress).await?;
                        continue;
                    }
                }
            };
            match next {
                Some(lines) => queued.extend(lines),
                None => ended = true,
            }
        }
        while let Some(line) = queued.pop_front() {
            if cut.events > 0 && !cut.fits(&line, config) {
                queued.push_front(line);
                break;
            }
            cut.push(line);
        }
        let window_full = !queued.is_empty();
        if (window_full || (ended && queued.is_empty())) && cut.events > 0 {
            let next_first = cut.last.next();
            let full = std::mem::replace(&mut cut, Cut::new(next_first, partitions));
            pipeline.send(full, &mut summary, &mut progress).await?;
        }
        if ended && queued.is_empty() && cut.events == 0 {
            break;
        }
    }
    pipeline.finish(&mut summary, &mut progress).await?;
    reader.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    client.flush().await.context("flushing the NATS connection")?;
    Ok(summary)
}
