//! `vigil serve`: the durable risk node.
//!
//! ```text
//!  TCP connections (tokio) ── decode frame, encode each event's journal record ──▶ sequencer thread
//!  sequencer: offsets, pipeline.submit (shards apply at once) ──▶ journal thread (group commit, fdatasync)
//!  journal thread: durable offset ──▶ acks to clients; output gate releases triggers only at or below it
//!  shards: checkpoint deltas on a sequenced command ──▶ persistence thread (sled apply_batch + flush)
//!  persistence: oldest checkpoint watermark ──▶ journal deletes segments behind it
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};
use vigil_engine::Config;
use vigil_model::{Offset, RejectionRecord};
use vigil_store::codec::{Stamp, encode_stamp};
use vigil_store::journal::{Journal, JournalConfig};

use crate::http::{Hub, HubConfig, Node};
pub use crate::intake::{Ack, AckReply, IngestBatch, Item, Refusal};
use crate::metrics as m;
use crate::persist::Persister;
use crate::persist::{NodeState, NodeValue, Persist};
use crate::pipeline::{Answer, Pipeline, PipelineConfig, Released, ShardJob, Wait};
use crate::producers::{LastBatch, Producers, Verdict};
use crate::recovery::recover;
use crate::tcp::{Listener, connection};
use crate::wire::{BATCH_EVENTS_MAX, FRAME_BYTES_MAX, error_frame};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub ingest: SocketAddr,
    /// The HTTP API (docs/api.md).
    pub http: SocketAddr,
    /// Bearer token required on writes (HTTP `POST /v1/events`, every TCP ingest connection).
    pub token: Option<String>,
    /// Open TCP ingest connections at most; more are refused with an error frame.
    pub connections_max: usize,
    /// HTTP requests handled at once; more wait.
    pub http_concurrency_max: usize,
    /// Largest HTTP request body, in bytes.
    pub http_body_bytes_max: usize,
    /// Largest TCP ingest frame, in bytes (at most `wire::FRAME_BYTES_MAX`).
    pub frame_bytes_max: usize,
    /// How long a read waits for its `min_offset`.
    pub query_timeout: Duration,
    pub shards: usize,
    pub engine: Config,
    pub wait: Wait,
    /// Pin each shard thread to a core of its own.
    pub pin: bool,
    /// Checkpoint after this many events…
    pub checkpoint_events: u64,
    /// …or this long, whichever comes first (if anything changed).
    pub checkpoint_interval: Duration,
    /// Checkpoint writes that may fail in a row before the node stops (a failed delta is kept and retried).
    pub checkpoint_failures_max: u32,
    pub journal: JournalConfig,
    /// A stress test run on a schedule (`stress_every_secs`, `stress_request`): its figures go to the metrics.
    pub stress_schedule: Option<(Duration, vigil_engine::stress::Request)>,
    /// How often the ADL board (the account object's `adl_bucket`s) is rebuilt; `None`: never.
    pub adl_refresh: Option<Duration>,
    /// The insurance fund's floor, exported for the alert on its balance.
    pub fund_floor: vigil_model::Amount,
    /// Cluster mode: the partition's events come from NATS JetStream (docs/cluster.md), not from the node's own
    /// ingest and journal.
    pub source: Option<crate::cluster::source::NatsSource>,
    /// Cluster mode: replicas of `VIGIL_TRIGGERS` if the node creates it.
    pub trigger_replicas: usize,
    /// Cluster mode: the duplicate window of `VIGIL_TRIGGERS` if the node creates it.
    pub trigger_duplicate_window: Duration,
    /// Publish every journaled event to `VIGIL_EVENTS` as well, acknowledging producers once the stream holds them
    /// (the sequencer in front of a cluster: docs/cluster.md).
    pub publish: Option<crate::cluster::forward::PublishTarget>,
}

impl ServeConfig {
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            ingest: SocketAddr::from(([127, 0, 0, 1], 7878)),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: None,
            connections_max: 1024,
            http_concurrency_max: 1024,
            http_body_bytes_max: 16 << 20,
            frame_bytes_max: FRAME_BYTES_MAX,
            query_timeout: Duration::from_secs(5),
            shards: 2,
            engine: Config::default(),
            wait: Wait::Park,
            pin: true,
            checkpoint_events: 1_000_000,
            checkpoint_interval: Duration::from_secs(30),
            checkpoint_failures_max: 3,
            journal: JournalConfig::default(),
            stress_schedule: None,
            adl_refresh: Some(Duration::from_secs(5)),
            fund_floor: vigil_model::Amount::ZERO,
            source: None,
            trigger_replicas: 1,
            trigger_duplicate_window: Duration::from_secs(600),
            publish: None,
        }
    }
}

pub(crate) enum JournalMsg {
    Batch {
        first: Offset,
        records: Vec<Vec<u8>>,
        reply: AckReply,
    },
    /// A resend of a batch sequenced earlier: answered after the next commit (by then the original is durable: it
    /// was sent to this thread before).
    Duplicate {
        ack: Ack,
        reply: AckReply,
    },
    Trim(Offset),
}

/// Runs the journal's group commit until the channel closes. A failed write or sync poisons the journal:
/// `on_poison` is called (the binary exits non-zero) and nothing more is acknowledged.
/// Where committed records go when the node publishes to a stream (`--publish`): the forwarder, which answers the
/// acks once the stream holds their batch, and the offset the stream holds through (journal trims wait for it).
struct Forwarding {
    tx: tokio::sync::mpsc::UnboundedSender<crate::cluster::forward::Forward>,
    published: Arc<AtomicU64>,
}

fn journal_thread(
    mut journal: Journal,
    rx: std_mpsc::Receiver<JournalMsg>,
    durable: Arc<AtomicU64>,
    on_commit: Arc<Notify>,
    on_poison: Box<dyn FnOnce(String) + Send>,
    forwarding: Option<Forwarding>,
) {
    let mut waiting: Vec<(Ack, AckReply)> = Vec::new();
    let mut group: Vec<(Offset, Vec<u8>)> = Vec::new();
    let fsync_seconds = metrics::histogram!(m::FSYNC_SECONDS);
    let batch_records = metrics::histogram!(m::JOURNAL_BATCH);
    let durable_gauge = metrics::gauge!(m::DURABLE);
    while let Ok(first_msg) = rx.recv() {
        let mut records_in_group = 0usize;
        let mut trim = None;
        let mut fail: Option<String> = None;
        let mut msg = Some(first_msg);
        // Group: everything queued now goes into one commit.
        while let Some(m) = msg.take().or_else(|| rx.try_recv().ok()) {
            match m {
                JournalMsg::Batch { first, records, reply } => {
                    let last = Offset(first.0 + records.len() as u64 - 1);
                    records_in_group += records.len();
                    if fail.is_none() {
                        for (i, r) in records.iter().enumerate() {
                            if let Err(e) = journal.append(Offset(first.0 + i as u64), r) {
                                fail = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    if forwarding.is_some() {
                        for (i, r) in records.into_iter().enumerate() {
                            group.push((Offset(first.0 + i as u64), unstamped(r)));
                        }
                    }
                    waiting.push((Ack { first, last, duplicate: false }, reply));
                }
                JournalMsg::Duplicate { ack, reply } => waiting.push((ack, reply)),
                JournalMsg::Trim(offset) => trim = Some(offset),
            }
        }
        let commit_started = Instant::now();
        let committed = match fail {
            Some(e) => Err(e),
            None => journal.commit().map_err(|e| e.to_string()),
        };
        if records_in_group > 0 {
            fsync_seconds.record(commit_started.elapsed().as_secs_f64());
            batch_records.record(records_in_group as f64);
        }
        match committed {
            Ok(offset) => {
                durable.store(offset.0, Ordering::Release);
                durable_gauge.set(offset.0 as f64);
                // The sequencer releases triggers and HTTP answers up to the new durable offset at once.
                on_commit.notify_one();
                match &forwarding {
                    // Acks wait for the stream as well: the forwarder answers them.
                    Some(f) => {
                        let forward = crate::cluster::forward::Forward {
                            records: std::mem::take(&mut group),
                            acks: std::mem::take(&mut waiting),
                        };
                        let _ = f.tx.send(forward);
                    }
                    None => {
                        for (ack, reply) in waiting.drain(..) {
                            debug_assert!(
                                ack.last <= offset,
                                "invariant: an ack is sent only once its batch is durable"
                            );
                            let _ = reply.send(Ok(ack));
                        }
                    }
                }
                // Segments go only behind the checkpoints and, when publishing, behind what the stream holds.
                let trim = trim.map(|t| match &forwarding {
                    Some(f) => t.min(Offset(f.published.load(Ordering::Acquire) + 1)),
                    None => t,
                });
                if let Some(t) = trim
                    && let Err(e) = journal.delete_before(t)
                {
                    tracing::warn!(error = %e, "could not delete journal segments behind the checkpoints");
                }
            }
            Err(e) => {
                for (_, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(Refusal::Journal(e.clone())));
                }
                metrics::counter!(m::JOURNAL_FAILURES).increment(1);
                tracing::error!(error = %e, "journal poisoned");
                on_poison(e);
                return;
            }
        }
    }
}

/// A journal record without its producer stamp: what the stream carries.
fn unstamped(record: Vec<u8>) -> Vec<u8> {
    match vigil_store::codec::split_stamp(&record) {
        Ok((Some(_), payload)) => payload.to_vec(),
        _ => record,
    }
}

/// Persists checkpoint deltas off the shard threads (the rules are `persist::Persister`'s); tells the journal the
/// oldest watermark a barrier made durable. `on_fatal` stops the node after too many failures in a row.
/// How long a stopping node's last checkpoints wait to become durable.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);

fn persistence_thread(
    mut persister: Persister,
    rx: std_mpsc::Receiver<Persist>,
    journal: std_mpsc::SyncSender<JournalMsg>,
    durable: Arc<AtomicU64>,
    hub: Arc<Hub>,
    on_fatal: Box<dyn FnOnce(String) + Send>,
) {
    let mut on_fatal = Some(on_fatal);
    let shards = persister.watermarks().len();
    while let Ok(message) = rx.recv() {
        let started = Instant::now();
        let offset = match &message {
            Persist::Shard(delta) => delta.delta.offset,
            Persist::Node(state) => state.offset,
        };
        // Shards apply before the journal syncs: a checkpoint must never get ahead of the journal, or a crash
        // would recover state from events the journal lost (and reuse their offsets). If the journal is
        // poisoned the process exits; this wait never ends otherwise. (A cluster node waits here for its coverage
        // in VIGIL_FILLS instead, which needs NATS: a stopping node gives it `SHUTDOWN_WAIT`, then leaves the rest
        // to the stream, which holds every event the checkpoints would have.)
        let mut stopping_since: Option<Instant> = None;
        while durable.load(Ordering::Acquire) < offset.0 {
            if hub.is_shutting_down() {
                let since = *stopping_since.get_or_insert_with(Instant::now);
                if since.elapsed() > SHUTDOWN_WAIT {
                    tracing::warn!(offset = offset.0, "stopping without the last checkpoints: not yet durable");
                    return;
                }
            }
            thread::sleep(Duration::from_micros(200));
        }
        match persister.handle(message) {
            Ok(w) if w.shard >= shards => {
                tracing::debug!(offset = w.offset.0, bytes = w.bytes, "node state written");
                let _ = journal.try_send(JournalMsg::Trim(w.trim));
            }
            Ok(w) => {
                let shard_label = w.shard.to_string();
                metrics::histogram!(m::CHECKPOINT_SECONDS, "shard" => shard_label.clone())
                    .record(started.elapsed().as_secs_f64());
                metrics::histogram!(m::CHECKPOINT_BYTES, "shard" => shard_label.clone()).record(w.bytes as f64);
                metrics::gauge!(m::CHECKPOINT_OFFSET, "shard" => shard_label).set(w.offset.0 as f64);
                if let Ok(size) = persister.store().size_on_disk() {
                    metrics::gauge!(m::STORE_BYTES).set(size as f64);
                }
                tracing::info!(
                    shard = w.shard,
                    offset = w.offset.0,
                    accounts = w.accounts,
                    bytes = w.bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
                hub.set_checkpoint(w.shard, w.offset);
                // A full queue drops this trim; the next checkpoint sends a later one.
                let _ = journal.try_send(JournalMsg::Trim(w.trim));
            }
            Err(f) => {
                metrics::counter!(m::CHECKPOINT_FAILURES).increment(1);
                tracing::error!(
                    shard = f.shard,
                    in_a_row = f.in_a_row,
                    error = format!("{:#}", f.error),
                    "checkpoint failed; the delta is kept for the next one and the journal keeps everything"
                );
                if f.fatal
                    && let Some(stop) = on_fatal.take()
                {
                    stop(format!(
                        "{} checkpoint writes failed in a row (last: {:#}); the journal holds every acknowledged \
                         event: free space or fix the disk, then restart",
                        f.in_a_row, f.error
                    ));
                    return;
                }
            }
        }
    }
    // Shutdown: a kept delta gets one more try, so a clean stop leaves nothing to replay that it could store.
    if persister.has_kept()
        && let Err(f) = persister.retry_kept()
    {
        tracing::error!(shard = f.shard, error = format!("{:#}", f.error), "final checkpoint failed");
    }
}

/// The longest the sequencer sleeps when idle (outputs wake it earlier: see `sequencer_thread`).
pub(crate) const IDLE_TICK: Duration = Duration::from_millis(10);

/// How often the sequencer samples its gauges (when idle; under load, between batches that find the queue empty).
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// A batch waiting for its rejections.
pub(crate) struct Report {
    first: Offset,
    last: Offset,
    rejections: Vec<RejectionRecord>,
    reply: oneshot::Sender<Vec<RejectionRecord>>,
}

/// The output gate: outputs leave only at or below the durable offset.
pub(crate) struct Gate {
    items: VecDeque<Released>,
    reports: VecDeque<Report>,
    durable: Arc<AtomicU64>,
    /// Signalled by the journal thread after each commit and by a shard that emptied its ring: outputs may be
    /// releasable.
    committed: Arc<Notify>,
    hub: Arc<Hub>,
    released: u64,
    /// When each batch was sequenced: `(last offset, instant)`, oldest first (for trigger latency).
    sequenced_at: VecDeque<(Offset, Instant)>,
    metrics: m::GateMetrics,
    /// The offset the hub's fund was last published as of.
    fund_through: u64,
}

impl Gate {
    /// Releases what is durable; `drained` is the offset through which the pipeline has handed over outputs.
    pub(crate) fn release(&mut self, drained: Offset) {
        let durable = Offset(self.durable.load(Ordering::Acquire));
        let mut triggers = Vec::new();
        let mut liquidations = Vec::new();
        let mut moves = Vec::new();
        while let Some(r) = self.items.front()
            && r.offset() <= durable
        {
            let Some(r) = self.items.pop_front() else { break };
            self.released += 1;
            match r {
                Released::Trigger(t) => {
                    while self.sequenced_at.front().is_some_and(|(last, _)| *last < t.offset) {
                        self.sequenced_at.pop_front();
                    }
                    if let Some((_, at)) = self.sequenced_at.front() {
                        self.metrics.latency.record(at.elapsed().as_secs_f64());
                    }
                    self.metrics.trigger(t.kind);
                    tracing::debug!(offset = t.offset.0, account = %t.account, kind = t.kind.as_str(),
                        symbol = t.symbol.as_deref().unwrap_or(""), "trigger");
                    triggers.push(t);
                }
                Released::Liquidation(l) => {
                    tracing::debug!(offset = l.offset.0, account = %l.account, symbol = %l.symbol, "liquidation");
                    self.metrics.fill(&l);
                    liquidations.push(l);
                }
                Released::Fund(offset, f) => {
                    if !self.hub.fund_folded_elsewhere() {
                        self.metrics.fund(&f);
                    }
                    moves.push((offset, f));
                }
                Released::Rejection(rec) => {
                    self.metrics.rejection(rec.reason);
                    if let Some(report) =
                        self.reports.iter_mut().find(|p| p.first <= rec.offset && rec.offset <= p.last)
                    {
                        report.rejections.push(rec);
                    }
                }
            }
        }
        let through = durable.min(drained);
        if !liquidations.is_empty() || !moves.is_empty() || through.0 > self.fund_through {
            self.fund_through = through.0;
            self.hub.publish_fund(liquidations, moves, through);
        }
        self.hub.publish(triggers, through);
        self.metrics.released.set(through.0 as f64);
        // No trigger can come any more at or below `through`.
        while self.sequenced_at.front().is_some_and(|(last, _)| *last <= through) {
            self.sequenced_at.pop_front();
        }
        while self.reports.front().is_some_and(|p| p.last <= through) {
            if let Some(p) = self.reports.pop_front() {
                let _ = p.reply.send(p.rejections);
            }
        }
    }
}

/// A sequencer with nothing queued blocks here until its next input (`Some(Some(_))`; `Some(None)`: the inputs are
/// closed), or until outputs may be releasable — a journal commit, or a shard that emptied its ring: both notify
/// `committed` — waking at least every `IDLE_TICK` for checkpoints and gauges (`None`). A job that arrives meanwhile
/// goes to `on_job`. (The timer must be created inside the runtime's context, hence the async block; `recv` is
/// cancel-safe; a notification sent while the sequencer was busy is kept.)
pub(crate) fn idle_wait<T>(
    runtime: &tokio::runtime::Handle,
    inputs: &mut mpsc::Receiver<T>,
    jobs: &mut mpsc::Receiver<Arc<dyn ShardJob>>,
    committed: &Notify,
    mut on_job: impl FnMut(Arc<dyn ShardJob>),
) -> Option<Option<T>> {
    runtime.block_on(async {
        tokio::select! {
            input = inputs.recv() => Some(input),
            Some(job) = jobs.recv() => {
                on_job(job);
                None
            }
            _ = committed.notified() => None,
            _ = tokio::time::sleep(IDLE_TICK) => None,
        }
    })
}

/// The sequencer: offsets, routing, the journal handoff, the output gate and checkpoint scheduling. Runs until
/// `stop` is set (then takes what is already queued) or every sender is gone.
/// Where the sequencer sends what must become durable, and the producers table it keeps.
pub(crate) struct Durability {
    journal: std_mpsc::SyncSender<JournalMsg>,
    persist: std_mpsc::Sender<Persist>,
    producers: Producers,
    /// The producers table as of each checkpoint whose node state the merge has not cut yet.
    producers_at: VecDeque<(Offset, Producers)>,
    duplicates: metrics::Counter,
    /// Events sequenced since the last checkpoint, and when it was asked for.
    since_checkpoint: u64,
    last_checkpoint: Instant,
}

impl Durability {
    /// Asks every shard for a checkpoint delta at the sequenced offset, and the merge for its state there; the
    /// node state (producers table and fund) goes to the persistence thread once release passes that offset
    /// ([`Durability::persist_cuts`]).
    pub(crate) fn checkpoint(&mut self, pipeline: &mut Pipeline) {
        let at = pipeline.checkpoint();
        self.producers_at.push_back((at, self.producers.clone()));
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
    }

    /// Counts `events` sequenced, and asks for a checkpoint after `checkpoint_events` of them.
    pub(crate) fn sequenced(&mut self, events: u64, pipeline: &mut Pipeline, config: &ServeConfig) {
        self.since_checkpoint += events;
        if self.since_checkpoint >= config.checkpoint_events {
            self.checkpoint(pipeline);
        }
    }

    /// What a sequencer does with nothing queued: hand the merged outputs to the gate and release what is durable,
    /// persist the node states cut, sample the gauges, and checkpoint if `checkpoint_interval` has passed with
    /// anything sequenced.
    pub(crate) fn idle(
        &mut self,
        pipeline: &mut Pipeline,
        gate: &mut Gate,
        sampler: &mut RingSampler,
        config: &ServeConfig,
    ) {
        pipeline.drain(&mut |r| gate.items.push_back(r));
        self.persist_cuts(pipeline);
        gate.release(pipeline.drained());
        sampler.maybe_sample(pipeline);
        if self.since_checkpoint > 0 && self.last_checkpoint.elapsed() >= config.checkpoint_interval {
            self.checkpoint(pipeline);
        }
    }

    /// Sends the node states whose fund the merge has cut.
    pub(crate) fn persist_cuts(&mut self, pipeline: &mut Pipeline) {
        for cut in pipeline.take_cuts() {
            let Some((at, producers)) = self.producers_at.pop_front() else { break };
            debug_assert_eq!(at, cut.offset, "invariant: cuts come in the order checkpoints were asked for");
            let state = NodeState {
                offset: at,
                value: NodeValue { producers, fund: cut.fund },
                triggers: cut.deleverage,
                liquidations: cut.liquidations,
            };
            let _ = self.persist.send(Persist::Node(Box::new(state)));
        }
    }
}

/// What the sequencer takes in: batches to sequence, and stress jobs to put into the shards' rings between them.
struct Intake {
    ingest: mpsc::Receiver<IngestBatch>,
    jobs: mpsc::Receiver<Arc<dyn ShardJob>>,
}

fn sequencer_thread(
    runtime: tokio::runtime::Handle,
    mut pipeline: Pipeline,
    intake: Intake,
    mut durability: Durability,
    mut gate: Gate,
    stop: Arc<AtomicBool>,
    config: ServeConfig,
) {
    let Intake { mut ingest, mut jobs } = intake;
    let committed = Arc::clone(&gate.committed);
    let mut sampler = RingSampler::new(config.shards);
    let mut stopping = false;
    loop {
        if !stopping && stop.load(Ordering::Acquire) {
            // No new batches; the queued ones are still taken (their senders were told nothing yet).
            stopping = true;
            ingest.close();
        }
        // A stress job goes in between two batches: its cut is the offset sequenced so far.
        while let Ok(job) = jobs.try_recv() {
            pipeline.job(job);
        }
        let batch = match ingest.try_recv() {
            Ok(b) => Some(b),
            Err(mpsc::error::TryRecvError::Empty) => {
                durability.idle(&mut pipeline, &mut gate, &mut sampler, &config);
                let woken = idle_wait(&runtime, &mut ingest, &mut jobs, &committed, |job| {
                    pipeline.job(job);
                });
                match woken {
                    Some(Some(b)) => Some(b),
                    Some(None) => None,
                    None => continue,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        let Some(IngestBatch { items, producer, reply, report }) = batch else { break };
        if items.is_empty() {
            continue; // never built by the listeners; an empty batch has no offsets to acknowledge
        }
        if let Some((id, sequence)) = &producer {
            match durability.producers.check(id, *sequence) {
                Ok(Verdict::Fresh) => {}
                Ok(Verdict::Duplicate(b)) => {
                    // Appends nothing; answered with the original offsets once they are durable. (`report` is
                    // dropped: the original answer carried the rejections.)
                    durability.duplicates.increment(1);
                    let ack = Ack { first: b.first, last: b.last, duplicate: true };
                    if durability.journal.send(JournalMsg::Duplicate { ack, reply }).is_err() {
                        break;
                    }
                    continue;
                }
                Err(e) => {
                    let _ = reply.send(Err(Refusal::Sequence(e)));
                    continue;
                }
            }
        }
        let first = pipeline.offset().next();
        let mut records = Vec::with_capacity(items.len());
        for (item, record) in items {
            match item {
                Item::Event(event) => pipeline.submit(event),
                Item::Invalid(rejection) => pipeline.reject(rejection),
            };
            records.push(record);
        }
        let count = records.len() as u64;
        pipeline.publish();
        if let Some((id, sequence)) = &producer {
            let count = records.len();
            durability.producers.record(id, LastBatch { sequence: *sequence, first, last: pipeline.offset() });
            // The stamp rides on the batch's first record: recovery rebuilds the table from it.
            let mut stamped = Vec::with_capacity(records[0].len() + 16 + id.len());
            let stamp = Stamp { producer: id, sequence: *sequence, count: count as u32 };
            encode_stamp(&stamp, &mut stamped);
            stamped.extend_from_slice(&records[0]);
            records[0] = stamped;
        }
        gate.sequenced_at.push_back((pipeline.offset(), Instant::now()));
        if let Some(reply) = report {
            let last = pipeline.offset();
            gate.reports.push_back(Report { first, last, rejections: Vec::new(), reply });
        }
        if durability.journal.send(JournalMsg::Batch { first, records, reply }).is_err() {
            break; // the journal thread stopped (poisoned)
        }
        durability.sequenced(count, &mut pipeline, &config);
    }
    // Shutdown: apply everything, checkpoint (the merge's cut is taken by the second flush), release what is
    // durable.
    pipeline.flush(&mut |r| gate.items.push_back(r));
    durability.checkpoint(&mut pipeline);
    pipeline.flush(&mut |r| gate.items.push_back(r));
    durability.persist_cuts(&mut pipeline);
    let drained = pipeline.offset();
    let _ = pipeline.finish(&mut |_| {});
    drop(durability);
    // The journal thread commits what it was sent before it stops; wait for that, then release it.
    let target = drained.0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while gate.durable.load(Ordering::Acquire) < target && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(1));
    }
    gate.release(drained);
    tracing::info!(released = gate.released, "sequencer stopped");
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// How often the shards are asked for their monitoring counts (one pass over their accounts each).
const STATS_EVERY: Duration = Duration::from_secs(5);

/// Samples, off the hot path, what the shards hold: applied offsets every second, account counts and margin
/// bands every `STATS_EVERY` (asked of each shard between two of its events).
async fn sample_shards(hub: Arc<Hub>) {
    let Some(checker) = hub.checker() else { return };
    let applied: Vec<metrics::Gauge> =
        (0..checker.shards()).map(|s| metrics::gauge!(m::APPLIED, "shard" => s.to_string())).collect();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_stats: Option<Instant> = None;
    loop {
        tick.tick().await;
        for (g, o) in applied.iter().zip(checker.applied()) {
            g.set(o.0 as f64);
        }
        if last_stats.is_some_and(|t| t.elapsed() < STATS_EVERY) {
            continue;
        }
        last_stats = Some(Instant::now());
        for shard in 0..checker.shards() {
            if let Ok(Ok(Answer::Stats(stats))) = tokio::time::timeout(STATS_EVERY, checker.stats(shard)).await {
                m::shard_stats(shard, &stats);
            }
        }
    }
}

/// The addresses the node listens on.
#[derive(Clone, Copy, Debug)]
pub struct Bound {
    pub ingest: SocketAddr,
    pub http: SocketAddr,
}

/// Refuses to expose an unauthenticated node beyond loopback.
pub fn check_exposure(config: &ServeConfig) -> anyhow::Result<()> {
    if config.token.is_none() {
        for (what, addr) in [("ingest", config.ingest), ("http", config.http)] {
            anyhow::ensure!(
                addr.ip().is_loopback(),
                "refusing to listen for {what} on {addr}, beyond loopback, without a token (set --token, `token` \
                 in the config file, or VIGIL_TOKEN)"
            );
        }
    }
    if let Some(t) = &config.token {
        anyhow::ensure!(!t.is_empty() && !t.chars().any(char::is_control), "the token must be non-empty text");
    }
    Ok(())
}

/// The running node's parts that `serve` holds while it listens, whatever its source.
pub(crate) struct Running {
    pub(crate) checker: crate::pipeline::Checker,
    pub(crate) ingest: mpsc::Sender<IngestBatch>,
    /// Set to stop the sequencer (it takes what is queued, checkpoints, and ends).
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) sequencer: thread::JoinHandle<()>,
    /// Joined after the sequencer, in order (the journal, the persistence thread).
    pub(crate) threads: Vec<thread::JoinHandle<()>>,
    pub(crate) durable: Arc<AtomicU64>,
}

impl Gate {
    /// Takes an output the pipeline released, to leave once durable.
    pub(crate) fn push(&mut self, released: Released) {
        self.items.push_back(released);
    }

    /// Notes when the events through `last` were sequenced (for the trigger latency).
    pub(crate) fn sequenced(&mut self, last: Offset) {
        self.sequenced_at.push_back((last, Instant::now()));
    }

    pub(crate) fn new(durable: Arc<AtomicU64>, committed: Arc<Notify>, hub: Arc<Hub>) -> Self {
        Self {
            items: VecDeque::new(),
            reports: VecDeque::new(),
            durable,
            committed,
            hub,
            released: 0,
            sequenced_at: VecDeque::new(),
            metrics: m::GateMetrics::new(),
            fund_through: 0,
        }
    }
}

impl Durability {
    pub(crate) fn new(
        journal: std_mpsc::SyncSender<JournalMsg>,
        persist: std_mpsc::Sender<Persist>,
        producers: Producers,
    ) -> Self {
        Self {
            journal,
            persist,
            producers,
            producers_at: VecDeque::new(),
            duplicates: metrics::counter!(m::INGEST_DUPLICATES),
            since_checkpoint: 0,
            last_checkpoint: Instant::now(),
        }
    }
}

/// The pipeline of a node: its shards, with the sequencer woken when a shard empties its ring.
pub(crate) fn pipeline_config(config: &ServeConfig, committed: &Arc<Notify>) -> PipelineConfig {
    PipelineConfig {
        engine: config.engine.clone(),
        shards: config.shards,
        wait: config.wait,
        pin: config.pin,
        on_idle: Some(Arc::clone(committed)),
        on_shard_panic: Some(|message| crate::fatal(message)),
        ..PipelineConfig::default()
    }
}

/// Starts the persistence thread over the recovered store (the checkpoint gauges start from what recovery found).
pub(crate) fn spawn_persistence(
    config: &ServeConfig,
    store: Box<dyn vigil_store::checkpoint::CheckpointStore>,
    watermarks: &[Offset],
    node_offset: Offset,
    journal: std_mpsc::SyncSender<JournalMsg>,
    durable: &Arc<AtomicU64>,
    hub: &Arc<Hub>,
) -> anyhow::Result<(std_mpsc::Sender<Persist>, thread::JoinHandle<()>)> {
    let (delta_tx, delta_rx) = std_mpsc::channel::<Persist>();
    if let Ok(size) = store.size_on_disk() {
        metrics::gauge!(m::STORE_BYTES).set(size as f64);
    }
    for (shard, w) in watermarks.iter().enumerate() {
        metrics::gauge!(m::CHECKPOINT_OFFSET, "shard" => shard.to_string()).set(w.0 as f64);
    }
    let persister = Persister::new(store, watermarks.to_vec(), node_offset, config.checkpoint_failures_max);
    let (durable, hub) = (Arc::clone(durable), Arc::clone(hub));
    let on_fatal = Box::new(|e: String| {
        eprintln!("vigil: checkpoint store failing, exiting: {e}");
        std::process::exit(3);
    });
    let handle = crate::spawn_vital("vigil-persist", move || {
        persistence_thread(persister, delta_rx, journal, durable, hub, on_fatal)
    })?;
    Ok((delta_tx, handle))
}

/// Samples the sequenced offset and the rings' occupancy into their gauges.
pub(crate) struct RingSampler {
    sequenced: metrics::Gauge,
    rings: Vec<metrics::Gauge>,
    last: Instant,
}

impl RingSampler {
    pub(crate) fn new(shards: usize) -> Self {
        Self {
            sequenced: metrics::gauge!(m::SEQUENCED),
            rings: (0..shards).map(|s| metrics::gauge!(m::RING_OCCUPANCY, "shard" => s.to_string())).collect(),
            last: Instant::now(),
        }
    }

    /// Samples if `SAMPLE_EVERY` has passed since the last time.
    pub(crate) fn maybe_sample(&mut self, pipeline: &Pipeline) {
        if self.last.elapsed() < SAMPLE_EVERY {
            return;
        }
        self.last = Instant::now();
        self.sequenced.set(pipeline.offset().0 as f64);
        let (occupancy, capacity) = pipeline.ring_occupancy();
        for (g, n) in self.rings.iter().zip(occupancy) {
            g.set(n as f64);
        }
        metrics::gauge!(m::RING_CAPACITY).set(capacity as f64);
    }
}

/// Connects a publishing node to the stream and starts its forwarder with what the journal holds after the stream's
/// end (`--publish`, `cluster::forward`).
fn start_forwarding(
    target: &crate::cluster::forward::PublishTarget,
    recovery: &crate::recovery::Recovery,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<Forwarding> {
    let _entered = runtime.enter();
    let journal = &recovery.journal;
    let (first, durable) = (recovery.journal_recovered.first, journal.durable());
    let connected = runtime.block_on(crate::cluster::forward::connect(target, first, durable))?;
    let mut catch_up = Vec::new();
    journal
        .replay(connected.published.next(), |offset, payload| {
            if offset <= durable {
                catch_up.push((offset, unstamped(payload.to_vec())));
            }
            Ok(())
        })
        .context("reading the journal after the stream's end")?;
    tracing::info!(stream_end = connected.published.0, to_publish = catch_up.len(), "publishing to the stream");
    let published = Arc::new(AtomicU64::new(connected.published.0));
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    runtime.spawn(crate::cluster::forward::forward(connected, target.partitions, catch_up, rx, Arc::clone(&published)));
    Ok(Forwarding { tx, published })
}

/// Recovers from the journal and the checkpoints and starts the journaled node: journal, persistence, pipeline
/// and sequencer threads.
fn start_journaled(
    config: &ServeConfig,
    runtime: &tokio::runtime::Runtime,
    hub: &Arc<Hub>,
    started: Instant,
) -> anyhow::Result<Running> {
    let recovery = recover(&config.data, &config.engine, config.shards, config.journal.clone())?;
    tracing::info!(
        durable = recovery.journal_recovered.durable.0,
        truncated_bytes = recovery.journal_recovered.truncated_bytes,
        replayed = recovery.replayed,
        triggers = recovery.triggers.len(),
        ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    metrics::gauge!(m::RECOVERY_SECONDS).set(started.elapsed().as_secs_f64());
    metrics::gauge!(m::DURABLE).set(recovery.journal.durable().0 as f64);
    let durable_offset = recovery.journal.durable();
    let durable = Arc::new(AtomicU64::new(durable_offset.0));
    let (journal_tx, journal_rx) = std_mpsc::sync_channel::<JournalMsg>(1024);
    let committed = Arc::new(Notify::new());
    let forwarding = match &config.publish {
        Some(target) => Some(start_forwarding(target, &recovery, runtime)?),
        None => None,
    };
    let journal_handle = {
        let (durable, committed) = (Arc::clone(&durable), Arc::clone(&committed));
        let journal = recovery.journal;
        crate::spawn_vital("vigil-journal", move || {
            journal_thread(
                journal,
                journal_rx,
                durable,
                committed,
                Box::new(|e| {
                    eprintln!("vigil: journal failure, exiting: {e}");
                    std::process::exit(2);
                }),
                forwarding,
            )
        })?
    };
    let (delta_tx, persistence_handle) = spawn_persistence(
        config,
        recovery.store,
        &recovery.watermarks,
        recovery.node_offset,
        journal_tx.clone(),
        &durable,
        hub,
    )?;
    let durability = Durability::new(journal_tx, delta_tx.clone(), recovery.producers);
    let mut pipeline =
        Pipeline::start_with(&pipeline_config(config, &committed), recovery.engines, durable_offset, Some(delta_tx))?;
    pipeline.set_fund(recovery.fund);
    let checker = pipeline.checker();
    let (ingest_tx, ingest_rx) = mpsc::channel::<IngestBatch>(256);
    let (jobs_tx, jobs_rx) = mpsc::channel::<Arc<dyn ShardJob>>(16);
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Gate::new(Arc::clone(&durable), committed, Arc::clone(hub));
    gate.metrics.fund(&recovery.fund);
    let sequencer = {
        let (config, handle, stop) = (config.clone(), runtime.handle().clone(), Arc::clone(&stop));
        crate::spawn_vital("vigil-sequencer", move || {
            let intake = Intake { ingest: ingest_rx, jobs: jobs_rx };
            sequencer_thread(handle, pipeline, intake, durability, gate, stop, config)
        })?
    };
    hub.start_fund(durable_offset, recovery.fund, recovery.liquidations);
    hub.start(
        recovery.history,
        durable_offset,
        recovery.watermarks,
        Node { checker: checker.clone(), ingest: ingest_tx.clone(), jobs: jobs_tx, durable: Arc::clone(&durable) },
    );
    Ok(Running {
        checker,
        ingest: ingest_tx,
        stop,
        sequencer,
        threads: vec![journal_handle, persistence_handle],
        durable,
    })
}

/// Runs the node until SIGTERM/SIGINT. `ready` receives the bound addresses as soon as they are bound: the HTTP
/// API answers `/health` (and `/ready` with 503) while recovery runs; TCP connections wait in the backlog.
pub fn serve(config: ServeConfig, ready: impl FnOnce(Bound)) -> anyhow::Result<()> {
    check_exposure(&config)?;
    let started = Instant::now();
    // Held until serve returns (the kernel releases it if the process dies).
    let _lock = vigil_store::lock_data_dir(&config.data).map_err(anyhow::Error::msg)?;
    if m::install().is_none() {
        tracing::warn!("another metrics recorder is installed in this process: /metrics will be empty");
    }
    metrics::gauge!(m::READY).set(0.0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let hub = Arc::new(Hub::new(HubConfig {
        token: config.token.clone(),
        query_timeout: config.query_timeout,
        events_max: BATCH_EVENTS_MAX,
    }));
    let (tcp, http) = runtime.block_on(async {
        let tcp = TcpListener::bind(config.ingest).await.with_context(|| format!("binding {}", config.ingest))?;
        let http = TcpListener::bind(config.http).await.with_context(|| format!("binding {}", config.http))?;
        Ok::<_, anyhow::Error>((tcp, http))
    })?;
    let bound = Bound { ingest: tcp.local_addr()?, http: http.local_addr()? };
    tracing::info!(ingest = %bound.ingest, http = %bound.http, data = %config.data.display(), "listening");
    let (http_stop_tx, mut http_stop_rx) = tokio::sync::watch::channel(false);
    let http_task = {
        let app = crate::http::router(Arc::clone(&hub), config.http_body_bytes_max, config.http_concurrency_max);
        runtime.spawn(async move {
            let shutdown = async move {
                let _ = http_stop_rx.wait_for(|s| *s).await;
            };
            use axum::serve::ListenerExt;
            // Small answers must leave at once, not wait for Nagle's algorithm to gather more.
            let http = http.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            if let Err(e) = axum::serve(http, app).with_graceful_shutdown(shutdown).await {
                tracing::error!(error = %e, "http server failed");
            }
        })
    };
    ready(bound);

    let running = match config.source.clone() {
        None => start_journaled(&config, &runtime, &hub, started)?,
        Some(source) => crate::cluster::node::start(&config, source, &runtime, &hub)?,
    };
    let Running { checker: checker_for_wire, ingest: ingest_tx, stop, sequencer: sequencer_handle, threads, durable } =
        running;
    metrics::gauge!(m::READY).set(1.0);
    runtime.spawn(sample_shards(Arc::clone(&hub)));
    if let Some(every) = config.adl_refresh {
        runtime.spawn(crate::adl::refresh_board(Arc::clone(&hub), every));
    }
    metrics::gauge!(m::FUND_FLOOR).set(config.fund_floor.0 as f64 / 1e8);
    if let Some((every, request)) = config.stress_schedule.clone() {
        runtime.spawn(crate::http::scheduled_stress(Arc::clone(&hub), every, request));
    }
    tracing::info!(ms = started.elapsed().as_millis() as u64, "ready");

    let listener = Listener {
        ingest: ingest_tx,
        checker: checker_for_wire,
        query_timeout: config.query_timeout,
        checks: metrics::counter!(m::CHECKS, "transport" => "tcp"),
        token: config.token.as_deref().map(Arc::from),
        frame_bytes_max: config.frame_bytes_max.min(FRAME_BYTES_MAX),
        events: metrics::counter!(m::INGEST_EVENTS, "transport" => "tcp"),
        batches: metrics::counter!(m::INGEST_BATCHES, "transport" => "tcp"),
        partition: config.source.as_ref().map(|s| s.partition),
    };
    let connections_max = config.connections_max.max(1);
    let slots = Arc::new(tokio::sync::Semaphore::new(connections_max));
    runtime.block_on(async {
        let signal = shutdown_signal();
        tokio::pin!(signal);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut signal => break,
                accepted = tcp.accept() => {
                    if let Ok((mut stream, _)) = accepted {
                        // A permit per open connection, released the moment its task ends.
                        match Arc::clone(&slots).try_acquire_owned() {
                            Ok(permit) => {
                                let listener = listener.clone();
                                connections.spawn(async move {
                                    connection(stream, listener).await;
                                    drop(permit);
                                });
                            }
                            Err(_) => {
                                let msg = format!("too many connections (at most {connections_max})");
                                connections.spawn(async move { let _ = stream.write_all(&error_frame(&msg)).await; });
                            }
                        }
                    }
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // Stop accepting; close connections (a batch not yet acknowledged was never promised).
        drop(tcp);
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        tracing::info!("shutting down: draining");
    });
    // The sequencer takes what is queued, drains, checkpoints and stops (while the runtime it waits through is
    // still alive); then the journal and persistence threads finish their queues. HTTP requests in flight get
    // their answers; live trigger streams end.
    drop(listener);
    let _ = http_stop_tx.send(true);
    stop.store(true, Ordering::Release);
    let _ = sequencer_handle.join();
    hub.shut_down();
    for t in threads {
        let _ = t.join();
    }
    let _ = runtime.block_on(async { tokio::time::timeout(Duration::from_secs(5), http_task).await });
    runtime.shutdown_timeout(Duration::from_secs(5));
    tracing::info!(durable = durable.load(Ordering::Acquire), "stopped");
    Ok(())
}
