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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use vigil_engine::Config;
use vigil_model::{Event, Offset};
use vigil_store::checkpoint::SledStore;
use vigil_store::codec::encode_event;
use vigil_store::journal::{Journal, JournalConfig, OsSyncer};
use vigil_store::layout;

use crate::pipeline::{Pipeline, PipelineConfig, Released, ShardDelta, Wait};
use crate::recovery::{recover, write_delta};
use crate::wire::{FRAME_BYTES_MAX, ack_frame, decode_batch, error_frame};

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub data: PathBuf,
    pub ingest: SocketAddr,
    pub shards: usize,
    pub engine: Config,
    pub wait: Wait,
    /// Checkpoint after this many events…
    pub checkpoint_events: u64,
    /// …or this long, whichever comes first (if anything changed).
    pub checkpoint_interval: Duration,
    pub journal: JournalConfig,
}

impl ServeConfig {
    pub fn new(data: PathBuf) -> Self {
        Self {
            data,
            ingest: SocketAddr::from(([127, 0, 0, 1], 7878)),
            shards: 2,
            engine: Config::default(),
            wait: Wait::Park,
            checkpoint_events: 1_000_000,
            checkpoint_interval: Duration::from_secs(30),
            journal: JournalConfig::default(),
        }
    }
}

type AckReply = oneshot::Sender<Result<(Offset, Offset), String>>;

/// A batch from a connection: events with their encoded journal records.
struct IngestBatch {
    events: Vec<(Event, Vec<u8>)>,
    reply: AckReply,
}

enum JournalMsg {
    Batch { first: Offset, records: Vec<Vec<u8>>, reply: AckReply },
    Trim(Offset),
}

/// Runs the journal's group commit until the channel closes. A failed write or sync poisons the journal:
/// `on_poison` is called (the binary exits non-zero) and nothing more is acknowledged.
fn journal_thread(
    mut journal: Journal,
    rx: std_mpsc::Receiver<JournalMsg>,
    durable: Arc<AtomicU64>,
    on_poison: Box<dyn FnOnce(String) + Send>,
) {
    let mut waiting: Vec<(Offset, Offset, AckReply)> = Vec::new();
    while let Ok(first_msg) = rx.recv() {
        let mut trim = None;
        let mut fail: Option<String> = None;
        let mut msg = Some(first_msg);
        // Group: everything queued now goes into one commit.
        while let Some(m) = msg.take().or_else(|| rx.try_recv().ok()) {
            match m {
                JournalMsg::Batch { first, records, reply } => {
                    let last = Offset(first.0 + records.len() as u64 - 1);
                    if fail.is_none() {
                        for (i, r) in records.iter().enumerate() {
                            if let Err(e) = journal.append(Offset(first.0 + i as u64), r) {
                                fail = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    waiting.push((first, last, reply));
                }
                JournalMsg::Trim(offset) => trim = Some(offset),
            }
        }
        let committed = match fail {
            Some(e) => Err(e),
            None => journal.commit().map_err(|e| e.to_string()),
        };
        match committed {
            Ok(offset) => {
                durable.store(offset.0, Ordering::Release);
                for (first, last, reply) in waiting.drain(..) {
                    let _ = reply.send(Ok((first, last)));
                }
                if let Some(t) = trim
                    && let Err(e) = journal.delete_before(t)
                {
                    tracing::warn!(error = %e, "could not delete journal segments behind the checkpoints");
                }
            }
            Err(e) => {
                for (_, _, reply) in waiting.drain(..) {
                    let _ = reply.send(Err(format!("journal failure, nothing acknowledged: {e}")));
                }
                tracing::error!(error = %e, "journal poisoned");
                on_poison(e);
                return;
            }
        }
    }
}

/// Persists checkpoint deltas off the shard threads; tells the journal the oldest durable watermark.
fn persistence_thread(
    mut store: SledStore,
    rx: std_mpsc::Receiver<ShardDelta>,
    mut watermarks: Vec<Offset>,
    journal: std_mpsc::SyncSender<JournalMsg>,
    durable: Arc<AtomicU64>,
) {
    while let Ok(ShardDelta { shard, delta, triggers }) = rx.recv() {
        let started = Instant::now();
        let offset = delta.offset;
        // Shards apply before the journal syncs: a checkpoint must never get ahead of the journal, or a crash
        // would recover state from events the journal lost (and reuse their offsets). If the journal is
        // poisoned the process exits; this wait never ends otherwise.
        while durable.load(Ordering::Acquire) < offset.0 {
            thread::sleep(Duration::from_micros(200));
        }
        match write_delta(&mut store, shard, &delta, &triggers) {
            Ok(bytes) => {
                tracing::info!(
                    shard,
                    offset = offset.0,
                    accounts = delta.accounts.len(),
                    bytes,
                    ms = started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
                if let Some(w) = watermarks.get_mut(shard) {
                    *w = offset;
                }
                if let Some(oldest) = watermarks.iter().min() {
                    let _ = journal.try_send(JournalMsg::Trim(*oldest));
                }
            }
            Err(e) => tracing::error!(shard, error = %e, "checkpoint failed; the journal keeps everything"),
        }
    }
}

/// The sequencer: offsets, routing, the journal handoff, the output gate and checkpoint scheduling.
fn sequencer_thread(
    runtime: tokio::runtime::Handle,
    mut pipeline: Pipeline,
    mut ingest: mpsc::Receiver<IngestBatch>,
    journal: std_mpsc::SyncSender<JournalMsg>,
    durable: Arc<AtomicU64>,
    config: ServeConfig,
) {
    let mut gate: VecDeque<Released> = VecDeque::new();
    let mut since_checkpoint = 0u64;
    let mut last_checkpoint = Instant::now();
    let mut released = 0u64;
    let mut release = |gate: &mut VecDeque<Released>| {
        let d = Offset(durable.load(Ordering::Acquire));
        while gate.front().is_some_and(|r| r.offset() <= d) {
            if let Some(r) = gate.pop_front() {
                released += 1;
                if let Released::Trigger(t) = r {
                    tracing::info!(offset = t.offset.0, account = %t.account, kind = t.kind.as_str(),
                        symbol = t.symbol.as_deref().unwrap_or(""), "trigger");
                }
            }
        }
    };
    loop {
        let batch = match ingest.try_recv() {
            Ok(b) => Some(b),
            Err(mpsc::error::TryRecvError::Empty) => {
                pipeline.drain(&mut |r| gate.push_back(r));
                release(&mut gate);
                if since_checkpoint > 0 && last_checkpoint.elapsed() >= config.checkpoint_interval {
                    pipeline.checkpoint();
                    since_checkpoint = 0;
                    last_checkpoint = Instant::now();
                }
                // Nothing queued: block until the next batch, waking every millisecond for outputs and checkpoints.
                // (The timer must be created inside the runtime's context, hence the async block.)
                match runtime.block_on(async { tokio::time::timeout(Duration::from_millis(1), ingest.recv()).await }) {
                    Ok(Some(b)) => Some(b),
                    Ok(None) => None,
                    Err(_) => continue,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => None,
        };
        let Some(IngestBatch { events, reply }) = batch else { break };
        let first = Offset(pipeline.offset().0 + 1);
        let mut records = Vec::with_capacity(events.len());
        for (event, record) in events {
            pipeline.submit(event);
            records.push(record);
        }
        since_checkpoint += records.len() as u64;
        pipeline.publish();
        if journal.send(JournalMsg::Batch { first, records, reply }).is_err() {
            break; // the journal thread stopped (poisoned)
        }
        if since_checkpoint >= config.checkpoint_events {
            pipeline.checkpoint();
            since_checkpoint = 0;
            last_checkpoint = Instant::now();
        }
    }
    // Shutdown: apply everything, checkpoint, release what is durable.
    pipeline.flush(&mut |r| gate.push_back(r));
    pipeline.checkpoint();
    let _ = pipeline.finish(&mut |_| {});
    drop(journal);
    release(&mut gate);
    tracing::info!(released, "sequencer stopped");
}

async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Result<Vec<u8>, String>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > FRAME_BYTES_MAX {
        return Ok(Some(Err(format!("frame length {len} out of bounds (1..={FRAME_BYTES_MAX})"))));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some(Ok(body)))
}

async fn connection(mut stream: TcpStream, ingest: mpsc::Sender<IngestBatch>) {
    let _ = stream.set_nodelay(true);
    loop {
        let body = match read_frame(&mut stream).await {
            Ok(None) | Err(_) => return,
            Ok(Some(Err(msg))) => {
                let _ = stream.write_all(&error_frame(&msg)).await;
                return;
            }
            Ok(Some(Ok(b))) => b,
        };
        let events = match decode_batch(&body) {
            Ok(e) => e,
            Err(e) => {
                let _ = stream.write_all(&error_frame(&e.to_string())).await;
                return;
            }
        };
        let mut with_records = Vec::with_capacity(events.len());
        for event in events {
            let mut record = Vec::new();
            if let Err(e) = encode_event(&event, &mut record) {
                let _ = stream.write_all(&error_frame(&e.to_string())).await;
                return;
            }
            with_records.push((event, record));
        }
        let (tx, rx) = oneshot::channel();
        if ingest.send(IngestBatch { events: with_records, reply: tx }).await.is_err() {
            let _ = stream.write_all(&error_frame("node shutting down")).await;
            return;
        }
        let frame = match rx.await {
            Ok(Ok((first, last))) => ack_frame(first, last),
            Ok(Err(e)) => error_frame(&e),
            Err(_) => error_frame("node stopped before the batch was durable"),
        };
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
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

/// Runs the node until SIGTERM/SIGINT. `ready` receives the bound ingest address.
pub fn serve(config: ServeConfig, ready: impl FnOnce(SocketAddr)) -> anyhow::Result<()> {
    let started = Instant::now();
    let recovery = recover(&config.data, &config.engine, config.shards, config.journal.clone(), Box::new(OsSyncer))?;
    tracing::info!(
        durable = recovery.journal_recovered.durable.0,
        truncated_bytes = recovery.journal_recovered.truncated_bytes,
        replayed = recovery.replayed,
        triggers = recovery.triggers.len(),
        ms = started.elapsed().as_millis() as u64,
        "recovered"
    );
    let durable_offset = recovery.journal.durable();
    let durable = Arc::new(AtomicU64::new(durable_offset.0));
    let (journal_tx, journal_rx) = std_mpsc::sync_channel::<JournalMsg>(1024);
    let journal_handle = {
        let durable = Arc::clone(&durable);
        let journal = recovery.journal;
        thread::Builder::new().name("vigil-journal".into()).spawn(move || {
            journal_thread(
                journal,
                journal_rx,
                durable,
                Box::new(|e| {
                    eprintln!("vigil: journal failure, exiting: {e}");
                    std::process::exit(2);
                }),
            )
        })?
    };
    let (delta_tx, delta_rx) = std_mpsc::channel::<ShardDelta>();
    let store = SledStore::open(&layout::checkpoints(&config.data)).context("opening the checkpoint store")?;
    let persistence_handle = {
        let (watermarks, journal, durable) = (recovery.watermarks.clone(), journal_tx.clone(), Arc::clone(&durable));
        thread::Builder::new()
            .name("vigil-persist".into())
            .spawn(move || persistence_thread(store, delta_rx, watermarks, journal, durable))?
    };
    let pipeline_config = PipelineConfig {
        engine: config.engine.clone(),
        shards: config.shards,
        wait: config.wait,
        ..PipelineConfig::default()
    };
    let pipeline = Pipeline::start_with(&pipeline_config, recovery.engines, durable_offset, Some(delta_tx))?;
    let (ingest_tx, ingest_rx) = mpsc::channel::<IngestBatch>(256);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let sequencer_handle = {
        let (durable, config, handle) = (Arc::clone(&durable), config.clone(), runtime.handle().clone());
        thread::Builder::new()
            .name("vigil-sequencer".into())
            .spawn(move || sequencer_thread(handle, pipeline, ingest_rx, journal_tx, durable, config))?
    };
    runtime.block_on(async {
        let listener = TcpListener::bind(config.ingest).await.with_context(|| format!("binding {}", config.ingest))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, data = %config.data.display(), "listening");
        ready(addr);
        let signal = shutdown_signal();
        tokio::pin!(signal);
        let mut connections = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut signal => break,
                accepted = listener.accept() => {
                    if let Ok((stream, _)) = accepted {
                        connections.spawn(connection(stream, ingest_tx.clone()));
                    }
                }
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
        // Stop accepting; close connections (a batch not yet acknowledged was never promised).
        drop(listener);
        connections.abort_all();
        while connections.join_next().await.is_some() {}
        tracing::info!("shutting down: draining");
        Ok::<(), anyhow::Error>(())
    })?;
    // The last sender: the sequencer sees the queue close, drains, checkpoints and stops (while the runtime it
    // waits through is still alive); then the journal and persistence threads finish their queues.
    drop(ingest_tx);
    let _ = sequencer_handle.join();
    let _ = journal_handle.join();
    let _ = persistence_handle.join();
    runtime.shutdown_timeout(Duration::from_secs(5));
    tracing::info!(durable = durable.load(Ordering::Acquire), "stopped");
    Ok(())
}
