//! `vigil serve --source nats://… --partition N/P`: the node's start in cluster mode. Recovery restores the shards
//! and the node state from the checkpoint store; the consumer reads the stream from the oldest of their offsets;
//! the sequencer applies each window's events at their offsets on the same pipeline, gate and persistence as a
//! journaled node. The stream is durable before the node sees it, so an event is durable once sequenced.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::sync::{Notify, mpsc};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{Event, Offset, Trigger};

use super::fund::{FoldFile, FundFeed, fills_stream, fold_file, fold_fund, publish_coverage};
use super::source::{NatsSource, SourceBatch, SourceStatus};
use super::stress::JobAt;
use super::trigger_subject;
use super::triggers::{last_trigger_offset, publish_triggers, triggers_stream};
use crate::hub::{Hub, Node};
use crate::intake::{IngestBatch, Item, Refusal};
use crate::metrics as m;
use crate::pipeline::{Pipeline, ShardJob};
use crate::producers::Producers;
use crate::recovery::recover_checkpoints;
use crate::serve::{
    Durability, Gate, JournalMsg, RingSampler, Running, ServeConfig, idle_wait, pipeline_config, spawn_persistence,
};

/// Recovers and starts a cluster node.
pub(crate) fn start(
    config: &ServeConfig,
    source: NatsSource,
    runtime: &tokio::runtime::Runtime,
    hub: &Arc<Hub>,
) -> anyhow::Result<Running> {
    let started = Instant::now();
    // The NATS client spawns its tasks on the runtime it is created in.
    let _runtime = runtime.enter();
    let recovery = recover_checkpoints(&config.data, &config.engine, config.shards)?;
    let partition = source.partition;
    let status = Arc::new(SourceStatus::new(partition));
    status.consumed.store(recovery.start.0, Ordering::Relaxed);
    let _ = hub.source.set(Arc::clone(&status));
    let mut feed = runtime.block_on(super::source::open(&source, recovery.start, Arc::clone(&status)))?;
    // Triggers: the stored history after the last trigger the stream holds for this partition goes out again (a
    // crash may have released triggers this node never published; the ids deduplicate the rest).
    let client = runtime.block_on(super::publish::connect(&source.url))?;
    let js = jetstream::new(client.clone());
    runtime.block_on(triggers_stream(&js, config.trigger_replicas, config.trigger_duplicate_window))?;
    let subject = trigger_subject(partition.index);
    let last_stored =
        runtime.block_on(super::retry("reading the last stored trigger", || last_trigger_offset(&js, &subject)))?;
    let (trigger_tx, trigger_rx) = mpsc::unbounded_channel::<Vec<Trigger>>();
    let unpublished: Vec<Trigger> = recovery.history.iter().filter(|t| t.offset >= last_stored).cloned().collect();
    if !unpublished.is_empty() {
        let _ = trigger_tx.send(unpublished);
    }
    let _ = hub.trigger_sink.set(trigger_tx);
    runtime.spawn(publish_triggers(js.clone(), partition.index, trigger_rx));
    // The venue's insurance fund: this node's fills and the insurance events go to VIGIL_FILLS as coverage, and
    // the node folds every partition's coverage (`cluster::fund`). Checkpoints wait for the coverage's acks.
    runtime.block_on(fills_stream(&js, config.trigger_replicas, config.trigger_duplicate_window))?;
    let covered = Arc::new(AtomicU64::new(recovery.node_offset.0));
    let (fund_tx, fund_rx) = mpsc::unbounded_channel::<FundFeed>();
    let _ = hub.fund_sink.set(fund_tx.clone());
    // The fund shown is the venue's, folded from VIGIL_FILLS (not this partition's, restored): started empty
    // before the fold (from its saved state, or the stream's first message) starts showing.
    hub.start_fund(Offset(0), InsuranceFund::default(), Vec::new());
    runtime.spawn(publish_coverage(js.clone(), partition, recovery.node_offset, fund_rx, Arc::clone(&covered)));
    let saved =
        FoldFile { path: fold_file(&config.data), save_every: config.checkpoint_interval, status: Arc::clone(&status) };
    runtime.spawn(fold_fund(js, partition.count, Arc::clone(hub), saved));
    tracing::info!(
        partition = %partition,
        start = recovery.start.0,
        ms = started.elapsed().as_millis() as u64,
        "restored from checkpoints; the stream supplies the rest"
    );
    metrics::gauge!(m::RECOVERY_SECONDS).set(started.elapsed().as_secs_f64());

    let durable = Arc::new(AtomicU64::new(recovery.start.0));
    let committed = Arc::new(Notify::new());
    // No journal: trims have nowhere to go (the stream's own limits decide what it keeps).
    let (journal_tx, _) = std_mpsc::sync_channel::<JournalMsg>(1);
    let (delta_tx, persistence) = spawn_persistence(
        config,
        recovery.store,
        &recovery.watermarks,
        recovery.node_offset,
        journal_tx.clone(),
        &covered,
        hub,
    )?;
    let durability = Durability::new(journal_tx, delta_tx.clone(), Producers::default());
    let mut pipeline =
        Pipeline::start_with(&pipeline_config(config, &committed), recovery.engines, recovery.start, Some(delta_tx))?;
    pipeline.skip_restored();
    pipeline.continue_fund(recovery.fund, recovery.node_offset);
    pipeline.settle_restored(recovery.to_settle);
    let checker = pipeline.checker();

    // The node takes no events of its own.
    let (ingest_tx, mut ingest_rx) = mpsc::channel::<IngestBatch>(16);
    let refusal = format!(
        "this node consumes partition {partition} of {} from NATS; events go to the stream through `vigil publish`",
        super::EVENTS_STREAM
    );
    runtime.spawn(async move {
        while let Some(batch) = ingest_rx.recv().await {
            let _ = batch.reply.send(Err(Refusal::Source(refusal.clone())));
        }
    });
    let (batches_tx, batches_rx) = mpsc::channel::<SourceBatch>(64);
    runtime.spawn(async move {
        loop {
            match feed.next().await {
                Ok(Some(batch)) => {
                    if batches_tx.send(batch).await.is_err() {
                        return;
                    }
                }
                Ok(None) => crate::fatal("the stream's consumer ended"),
                Err(e) => crate::fatal(format!("consuming the stream: {e:#}")),
            }
        }
    });
    let (jobs_tx, jobs_rx) = mpsc::channel::<Arc<dyn ShardJob>>(16);
    let (jobs_at_tx, jobs_at_rx) = mpsc::channel::<JobAt>(16);
    runtime.spawn(super::stress::serve_stress(
        client,
        partition,
        config.shards,
        jobs_at_tx,
        Arc::clone(&status),
        Arc::clone(hub),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Gate::new(Arc::clone(&durable), Arc::clone(&committed), Arc::clone(hub));
    let sequencer = {
        let (config, handle, stop, durable) =
            (config.clone(), runtime.handle().clone(), Arc::clone(&stop), Arc::clone(&durable));
        crate::spawn_vital("vigil-sequencer", move || {
            let io = SequencerIo {
                batches: batches_rx,
                jobs: jobs_rx,
                jobs_at: jobs_at_rx,
                fund: fund_tx,
                committed,
                durable,
                stop,
            };
            sequencer_thread(handle, pipeline, io, durability, gate, config)
        })?
    };
    hub.start(
        recovery.history,
        recovery.start,
        recovery.watermarks,
        Node { checker: checker.clone(), ingest: ingest_tx.clone(), jobs: jobs_tx, durable: Arc::clone(&durable) },
    );
    runtime.spawn(sample_source(status));
    Ok(Running { checker, ingest: ingest_tx, stop, sequencer, threads: vec![persistence], durable })
}

/// Exports the consumer's position.
async fn sample_source(status: Arc<SourceStatus>) {
    let partition = status.partition.to_string();
    let lag = metrics::gauge!(m::SOURCE_LAG, "partition" => partition.clone());
    let consumed = metrics::gauge!(m::SOURCE_CONSUMED, "partition" => partition);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        lag.set(status.lag_messages.load(Ordering::Relaxed) as f64);
        consumed.set(status.consumed.load(Ordering::Relaxed) as f64);
    }
}

struct SequencerIo {
    batches: mpsc::Receiver<SourceBatch>,
    jobs: mpsc::Receiver<Arc<dyn ShardJob>>,
    /// Cluster stress requests: each goes into the rings when the sequencer is exactly at its offset.
    jobs_at: mpsc::Receiver<JobAt>,
    /// `insurance` events, as sequenced, for the coverage publisher.
    fund: mpsc::UnboundedSender<FundFeed>,
    committed: Arc<Notify>,
    durable: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

/// Puts the jobs whose offset the pipeline is exactly at into the rings; refuses those it has passed.
fn schedule_at(waiting: &mut Vec<JobAt>, pipeline: &mut Pipeline) {
    if waiting.is_empty() {
        return;
    }
    let now = pipeline.offset();
    for job in std::mem::take(waiting) {
        if job.at == now {
            pipeline.job(job.job);
            let _ = job.scheduled.send(true);
        } else if job.at < now {
            let _ = job.scheduled.send(false);
        } else {
            waiting.push(job);
        }
    }
}

/// The sequencer of a cluster node: windows from the consumer, applied at their offsets; outputs released (an
/// event is durable once the stream delivered it); checkpoints scheduled as on a journaled node.
fn sequencer_thread(
    runtime: tokio::runtime::Handle,
    mut pipeline: Pipeline,
    io: SequencerIo,
    mut durability: Durability,
    mut gate: Gate,
    config: ServeConfig,
) {
    let SequencerIo { mut batches, mut jobs, mut jobs_at, fund, committed, durable, stop } = io;
    let mut waiting_at: Vec<JobAt> = Vec::new();
    let mut sampler = RingSampler::new(config.shards);
    while !stop.load(Ordering::Acquire) {
        while let Ok(job) = jobs.try_recv() {
            pipeline.job(job);
        }
        while let Ok(job) = jobs_at.try_recv() {
            waiting_at.push(job);
        }
        schedule_at(&mut waiting_at, &mut pipeline);
        let batch = match batches.try_recv() {
            Ok(b) => b,
            Err(mpsc::error::TryRecvError::Empty) => {
                durability.idle(&mut pipeline, &mut gate, &mut sampler, &config);
                // Cluster stress jobs wait up to `IDLE_TICK` here: they are taken at the top of the loop.
                let woken = idle_wait(&runtime, &mut batches, &mut jobs, &committed, |job| {
                    pipeline.job(job);
                });
                match woken {
                    Some(Some(b)) => b,
                    Some(None) => break,
                    None => continue,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => break,
        };
        let SourceBatch { items, through } = batch;
        let count = items.len() as u64;
        for (offset, item) in items {
            if offset <= pipeline.offset() {
                continue;
            }
            match item {
                // The venue's fund decides it (`cluster::fund`): this partition's merge, whose fund would hold only
                // its own fills, never sees it and keeps no verdict of its own.
                Item::Event(Event::Insurance { amount }) => {
                    let _ = fund.send(FundFeed::Insurance(offset, amount));
                }
                Item::Event(event) => {
                    pipeline.submit_at(offset, event);
                }
                Item::Invalid(rejection) => {
                    pipeline.reject_at(offset, rejection);
                }
            }
        }
        pipeline.advance_to(through);
        schedule_at(&mut waiting_at, &mut pipeline);
        pipeline.publish();
        durable.store(pipeline.offset().0, Ordering::Release);
        gate.sequenced(pipeline.offset());
        durability.sequenced(count, &mut pipeline, &config);
    }
    // Shutdown: what was handed over is applied and checkpointed; the stream keeps the rest.
    pipeline.flush(&mut |r| gate.push(r));
    durability.checkpoint(&mut pipeline);
    pipeline.flush(&mut |r| gate.push(r));
    durability.persist_cuts(&mut pipeline);
    let drained = pipeline.offset();
    let _ = pipeline.finish(&mut |_| {});
    drop(durability);
    gate.release(drained);
    tracing::info!("sequencer stopped");
}
