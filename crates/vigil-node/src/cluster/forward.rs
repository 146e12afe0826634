//! `vigil serve --publish nats://… --partitions P`: a journaled node as the sequencer in front of the stream. Its
//! TCP and HTTP ingest, offsets, journal and idempotent producers are the single node's; each group commit's records
//! are then published to `VIGIL_EVENTS` in windows (as `vigil publish` cuts them), and a producer's batch is
//! acknowledged only once the stream has stored it — after the fdatasync **and** the PubAck.
//!
//! After a crash the node recovers its journal as always, then publishes what the journal holds after the stream's
//! last closed window before anything new: the stream ends up with every acknowledged event, at the node's offsets,
//! and a resend answered from the producers table is never published twice. The journal keeps its segments until
//! the stream has them (trims wait for the published offset as well as the checkpoints).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream;
use tokio::sync::mpsc;
use vigil_model::Offset;

use super::publish::{Cut, Line, PublishConfig, PublishSummary, publish_window};
use crate::intake::{Ack, AckReply};

/// Where a journaled node publishes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishTarget {
    pub url: String,
    pub partitions: u32,
    /// Replicas of `VIGIL_EVENTS` if the node creates it.
    pub replicas: usize,
}

/// One group commit: its records (stamps removed) in offset order, and the acks waiting for them.
pub struct Forward {
    pub records: Vec<(Offset, Vec<u8>)>,
    pub acks: Vec<(Ack, AckReply)>,
}

/// The stream's state when a publishing node starts: where it ends, checked against the journal.
pub struct Connected {
    pub js: jetstream::Context,
    /// The last offset of the stream's last closed window.
    pub published: Offset,
}

/// Connects and checks the stream against the journal (`first`..=`durable`): the stream must end inside it.
pub async fn connect(target: &PublishTarget, first: Offset, durable: Offset) -> anyhow::Result<Connected> {
    let client = super::publish::connect(&target.url).await?;
    let js = jetstream::new(client);
    let config = PublishConfig::new(&target.url, target.partitions);
    let stream = super::publish::events_stream(&js, target.replicas, config.duplicate_window).await?;
    let (published, partitions) = super::publish::last_close(&stream).await?;
    if let Some(p) = partitions.filter(|p| *p != target.partitions) {
        anyhow::bail!(
            "{} was published with {p} partitions; --partitions {} would send accounts elsewhere",
            super::EVENTS_STREAM,
            target.partitions
        );
    }
    anyhow::ensure!(
        published <= durable,
        "{} holds offsets up to {}, beyond this node's journal (it ends at {}): the stream was fed by another \
         sequencer; refusing to publish over it",
        super::EVENTS_STREAM,
        published.0,
        durable.0
    );
    anyhow::ensure!(
        durable == published || first.0 <= published.0 + 1,
        "{} ends at offset {}, but this node's journal starts at {}: the events between are in neither; refusing \
         to publish with a hole",
        super::EVENTS_STREAM,
        published.0,
        first.0
    );
    Ok(Connected { js, published })
}

/// Publishes what the journal held after the stream's end (`catch_up`), then every group commit as it comes,
/// answering each ack once the stream holds its batch; `published` follows the stream's end. Runs until `rx`
/// closes. A window the stream refuses for good (after the publisher's retries) ends the process: acknowledging
/// without it would break the promise, and a restart publishes it again from the journal.
pub async fn forward(
    connected: Connected,
    partitions: u32,
    catch_up: Vec<(Offset, Vec<u8>)>,
    mut rx: mpsc::UnboundedReceiver<Forward>,
    published: Arc<AtomicU64>,
) {
    let Connected { js, published: start } = connected;
    let config = PublishConfig::new("", partitions);
    let mut summary = PublishSummary { resumed_after: start, last: start, ..Default::default() };
    let mut cut = Cut::new(start.next(), partitions);
    let mut waiting: VecDeque<(Ack, AckReply)> = VecDeque::new();
    let mut queued: VecDeque<(Offset, Vec<u8>)> = catch_up.into();
    loop {
        if queued.is_empty() {
            match rx.recv().await {
                Some(f) => {
                    queued.extend(f.records);
                    waiting.extend(f.acks);
                }
                None => return,
            }
        }
        // Everything committed by now goes into this round's windows.
        while let Ok(f) = rx.try_recv() {
            queued.extend(f.records);
            waiting.extend(f.acks);
        }
        while let Some((offset, record)) = queued.pop_front() {
            if offset <= summary.last {
                continue; // already in the stream (the catch-up and the first commits can overlap)
            }
            if offset != cut.last.next() {
                crate::fatal(format!(
                    "invariant: the journal's records reach the publisher in order (offset {} after {})",
                    offset.0, cut.last.0
                ));
            }
            let line = Line::of_record(record, partitions);
            if cut.events > 0 && !cut.fits(&line, &config) {
                let next = cut.last.next();
                let full = std::mem::replace(&mut cut, Cut::new(next, partitions));
                publish(&js, full, &mut summary, &published).await;
            }
            cut.push(line);
        }
        if cut.events > 0 {
            let next = cut.last.next();
            let full = std::mem::replace(&mut cut, Cut::new(next, partitions));
            publish(&js, full, &mut summary, &published).await;
        }
        // Acks whose batch the stream holds; the rest wait for a later window.
        let through = summary.last;
        let mut still = VecDeque::with_capacity(waiting.len());
        for (ack, reply) in waiting.drain(..) {
            if ack.last <= through {
                let _ = reply.send(Ok(ack));
            } else {
                still.push_back((ack, reply));
            }
        }
        waiting = still;
    }
}

async fn publish(js: &jetstream::Context, cut: Cut, summary: &mut PublishSummary, published: &AtomicU64) {
    if let Err(e) = publish_window(js, cut, summary).await {
        crate::fatal(format!("publishing to the stream failed for good: {e:#}"));
    }
    published.store(summary.last.0, Ordering::Release);
}
