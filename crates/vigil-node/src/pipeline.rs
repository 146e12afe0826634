//! The threaded pipeline: a sequencer, one pinned thread per shard, and a deterministic output merge.
//!
//! ```text
//!  sequencer (caller's thread): offset = last + 1
//!     ├─ account event ──▶ ring of shard_of(account)      (bounded SPSC; full = backpressure)
//!     └─ anything else ──▶ ring of every shard (one Arc, N refcounts)
//!  shard i (own thread, pinned): the only writer of its Engine; never awaits
//!     └─ rejections and triggers ──▶ output ring i, then `applied_i = offset` (Release)
//!  merge (caller's thread): releases outputs up to the watermark, in (offset, account, symbol, kind) order
//! ```
//!
//! The watermark is the offset below which no shard can still produce output: for each shard, its applied offset
//! if it still has routed events to apply, else the sequenced offset. Outputs of one offset from several shards
//! (a tick's triggers) are combined and sorted, so the released stream is identical for every shard count and
//! every thread timing.
//!
//! A stress test is a marker in every ring behind the events sequenced before it: each shard computes its part at
//! exactly that offset (a consistent cut across shards, without stopping the sequencer).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::{self, JoinHandle, Thread};
use std::time::Duration;

use tokio::sync::oneshot;
use vigil_engine::market::Market;
use vigil_engine::sharded::{fund_rejection, settle_liquidation};
use vigil_engine::stress::{Scenario, ShardStress, StressError};
use vigil_engine::{CheckOutcome, Config, Engine};

use crate::handoff::Parker;
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{
    AccountView, Amount, Event, Fill, LiquidationRecord, Offset, Rejection, RejectionRecord, Trigger, shard_of,
};

/// How an idle thread waits for work.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Wait {
    /// Busy-spin: lowest latency, burns a core. Only where each thread has a core of its own.
    Spin,
    /// Spin a little, then yield the core.
    SpinYield,
    /// Spin a little, then park until woken (tests, CI and small machines).
    #[default]
    Park,
}

impl std::str::FromStr for Wait {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "spin" => Ok(Wait::Spin),
            "spin-yield" => Ok(Wait::SpinYield),
            "park" => Ok(Wait::Park),
            other => Err(format!("unknown wait strategy {other:?} (spin, spin-yield or park)")),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PipelineConfig {
    pub engine: Config,
    pub shards: usize,
    pub wait: Wait,
    /// Capacity of each input and output ring, in messages.
    pub ring_capacity: usize,
    /// Pin shard threads to cores (a no-op where pinning is impossible).
    pub pin: bool,
    /// Notified by a shard each time it has emptied its ring after applying something: the sequencer waits on it
    /// to release outputs as soon as the shards are done, instead of polling.
    pub on_idle: Option<Arc<tokio::sync::Notify>>,
    /// Called with the message when a shard thread panics (a broken invariant). The node passes
    /// [`crate::fatal`]: a node with a dead shard must stop, not run half alive. Without it the panic surfaces
    /// on the sequencer's side (at the next full ring, `flush` or `finish`).
    pub on_shard_panic: Option<fn(String)>,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            engine: Config::default(),
            shards: 1,
            wait: Wait::Park,
            ring_capacity: 1 << 14,
            pin: true,
            on_idle: None,
            on_shard_panic: None,
        }
    }
}

enum Input {
    Event(Offset, Arc<Event>),
    /// Hand a checkpoint delta to the persistence channel, as of the sequenced offset carried: every event up to
    /// it that was routed to this shard comes before this message in its ring.
    Checkpoint(Offset),
    /// Answer this shard's part of a question asked of every shard, as of the sequenced offset carried
    /// (`Pipeline::job`).
    Job(Offset, Arc<dyn ShardJob>),
    Stop,
}

/// One shard's answer to a stress job: its index, the offset of the cut, its part.
pub type StressReply = (usize, Offset, Result<ShardStress, StressError>);

/// A question every shard answers at one offset (a consistent cut of the book while ingest goes on): the sequencer
/// puts it into every shard's ring behind everything sequenced so far ([`Pipeline::job`]).
pub trait ShardJob: Send + Sync {
    /// Answers for shard `shard`, whose state is that of offset `at`.
    fn run(&self, shard: usize, at: Offset, engine: &Engine);
}

impl ShardJob for StressJob {
    fn run(&self, shard: usize, at: Offset, engine: &Engine) {
        let part = engine.stress(&self.scenarios, self.top, &mut |_| {});
        let _ = self.reply.send((shard, at, part));
    }
}

/// Where questions for every shard are sent (the sequencer takes them in between batches).
pub type Jobs = tokio::sync::mpsc::Sender<Arc<dyn ShardJob>>;

/// A stress test for every shard at one offset.
pub struct StressJob {
    pub scenarios: Vec<Scenario>,
    pub top: usize,
    /// Each shard sends its part here.
    pub reply: tokio::sync::mpsc::UnboundedSender<StressReply>,
}

pub use crate::persist::{Persist, ShardDelta};

/// What a shard reports for one offset (sent only when there is something to report).
struct Output {
    offset: Offset,
    rejection: Option<Rejection>,
    triggers: Vec<Trigger>,
    /// The event went to every shard: each reports its rejection, and the merge checks they agree.
    broadcast: bool,
    /// A liquidation fill's record (its uncovered part decided by the merge's fund).
    liquidation: Option<LiquidationRecord>,
    /// An `insurance` event, which no shard sees: the merge applies it to the fund at its offset.
    insurance: Option<Amount>,
}

/// State a shard shares with the sequencer.
struct Shared {
    applied: AtomicU64,
    parker: Parker,
}

/// The answer to a routed pre-trade check.
pub type CheckReply = Result<CheckOutcome, Rejection>;

/// A read of a shard's state, answered by the shard thread between events (it owns the state).
pub enum Ask {
    /// The pre-trade check of a hypothetical fill.
    Check(Fill),
    /// Several checks of accounts of one shard, answered in one visit (a binary check frame's part).
    Checks(Vec<Fill>),
    /// The replay view of one account.
    Account(String),
    /// The shard's copy of the reference and market data (identical on every shard).
    Market,
    /// Monitoring counts (`Engine::stats`) of the shard asked (`Checker::stats`).
    Stats,
}

pub enum Answer {
    Check(CheckReply),
    Checks(Vec<CheckReply>),
    /// The view and the ADL scores of its positions (for their rank buckets).
    Account(Option<AccountView>, Vec<(String, vigil_engine::account::AdlEntry)>),
    Market(Box<Market>),
    Stats(vigil_engine::ShardStats),
}

/// A read waiting for its shard.
struct Query {
    ask: Ask,
    min_offset: Offset,
    reply: oneshot::Sender<Answer>,
}

/// Sends reads to the shard that owns the account; cloneable, usable from any thread.
#[derive(Clone)]
pub struct Checker {
    queries: Vec<mpsc::Sender<Query>>,
    threads: Vec<Thread>,
    shared: Vec<Arc<Shared>>,
    /// The sequencer's last offset, published after the event is routed.
    sequenced: Arc<AtomicU64>,
}

impl Checker {
    /// Asks the owning shard to check `fill` once it has applied `min_offset` (read-your-writes for a trader who
    /// just traded); the answer comes on the returned channel, from the shard's state at that moment.
    pub fn check(&self, fill: Fill, min_offset: Offset) -> oneshot::Receiver<Answer> {
        let shard = shard_of(&fill.account, self.queries.len());
        self.ask_shard(shard, Ask::Check(fill), min_offset)
    }

    /// Asks the shard owning `account` (or shard 0 for `Ask::Market`) once it has applied `min_offset`.
    /// A shard that has stopped drops the request; the receiver then reports it closed.
    pub fn ask(&self, ask: Ask, min_offset: Offset) -> oneshot::Receiver<Answer> {
        let shard = match &ask {
            Ask::Check(fill) => shard_of(&fill.account, self.queries.len()),
            Ask::Checks(fills) => fills.first().map_or(0, |f| shard_of(&f.account, self.queries.len())),
            Ask::Account(id) => shard_of(id, self.queries.len()),
            Ask::Market | Ask::Stats => 0,
        };
        self.ask_shard(shard, ask, min_offset)
    }

    fn ask_shard(&self, shard: usize, ask: Ask, min_offset: Offset) -> oneshot::Receiver<Answer> {
        let (tx, rx) = oneshot::channel();
        let _ = self.queries[shard].send(Query { ask, min_offset, reply: tx });
        self.threads[shard].unpark();
        rx
    }

    /// Asks shard `shard` to check `fills` (all of its accounts) in one visit once it has applied `min_offset`.
    pub fn check_batch(&self, shard: usize, fills: Vec<Fill>, min_offset: Offset) -> oneshot::Receiver<Answer> {
        self.ask_shard(shard.min(self.queries.len().saturating_sub(1)), Ask::Checks(fills), min_offset)
    }

    /// Asks shard `shard` for its monitoring counts (answered between events; one pass over its accounts).
    pub fn stats(&self, shard: usize) -> oneshot::Receiver<Answer> {
        self.ask_shard(shard.min(self.queries.len().saturating_sub(1)), Ask::Stats, Offset(0))
    }

    /// The number of shards.
    pub fn shards(&self) -> usize {
        self.queries.len()
    }

    /// The last offset sequenced.
    pub fn sequenced(&self) -> Offset {
        Offset(self.sequenced.load(Ordering::Acquire))
    }

    /// The last offset each shard has applied (a shard with nothing routed to it lags: it only applies
    /// broadcast events and its own accounts' events).
    pub fn applied(&self) -> Vec<Offset> {
        self.shared.iter().map(|s| Offset(s.applied.load(Ordering::Acquire))).collect()
    }
}

/// Answers the queries whose offset the shard has reached; keeps the others waiting.
fn serve_queries(
    engine: &Engine,
    queries: &mpsc::Receiver<Query>,
    waiting: &mut Vec<Query>,
    sequenced: &AtomicU64,
    drained: Option<&dyn Fn() -> bool>,
) {
    while let Ok(q) = queries.try_recv() {
        waiting.push(q);
    }
    if waiting.is_empty() {
        return;
    }
    // Read `sequenced` first, then find the ring empty: every event up to it that was routed here was pushed
    // before it was published, so it has been popped and applied.
    let published = sequenced.load(Ordering::Acquire);
    let reached = match drained {
        Some(empty) if empty() => published.max(engine.offset().0),
        _ => engine.offset().0,
    };
    let mut i = 0;
    while i < waiting.len() {
        // The asker may have given up waiting (a timeout): drop its request.
        if waiting[i].reply.is_closed() {
            waiting.swap_remove(i);
            continue;
        }
        if waiting[i].min_offset.0 > reached {
            i += 1;
            continue;
        }
        let q = waiting.swap_remove(i);
        let answer = match q.ask {
            Ask::Check(fill) => Answer::Check(engine.check(&fill.account, &fill)),
            Ask::Checks(fills) => Answer::Checks(fills.iter().map(|f| engine.check(&f.account, f)).collect()),
            Ask::Account(id) => Answer::Account(engine.account_view(&id), engine.account_adl(&id)),
            Ask::Market => Answer::Market(Box::new(engine.market().clone())),
            Ask::Stats => Answer::Stats(engine.stats()),
        };
        let _ = q.reply.send(answer);
    }
}

const SPINS: u32 = 128;
const YIELDS: u32 = 64;

impl Wait {
    /// One idle round of a consumer whose queue was empty; `empty` re-checks it after announcing sleep.
    fn idle(self, spins: &mut u32, shared: &Shared, empty: impl Fn() -> bool) {
        *spins += 1;
        match self {
            Wait::Spin => std::hint::spin_loop(),
            _ if *spins < SPINS => std::hint::spin_loop(),
            Wait::SpinYield => thread::yield_now(),
            // Yield a while before parking: on a machine with fewer cores than busy threads, this hands the core
            // to the sequencer instead of paying a park/unpark round trip per batch.
            Wait::Park if *spins < SPINS + YIELDS => thread::yield_now(),
            Wait::Park => {
                // The protocol is model-checked (`handoff`); the timeout only bounds how long a shard sleeps
                // when nothing wakes it (a check arriving through another path, say).
                shared.parker.sleep_unless(|| !empty(), || thread::park_timeout(Duration::from_millis(5)));
            }
        }
    }
}

fn wake(wait: Wait, shared: &Shared, thread: &Thread) {
    if wait == Wait::Park {
        shared.parker.wake(|| thread.unpark());
    }
}

/// One released output: a rejection or a trigger, in the contract's order.
pub enum Released {
    Rejection(RejectionRecord),
    Trigger(Trigger),
    /// A liquidation fill, with the fund's verdict on its deficit.
    Liquidation(LiquidationRecord),
    /// The insurance fund after a movement at this offset.
    Fund(Offset, InsuranceFund),
}

impl Released {
    pub fn offset(&self) -> Offset {
        match self {
            Released::Rejection(r) => r.offset,
            Released::Trigger(t) => t.offset,
            Released::Liquidation(l) => l.offset,
            Released::Fund(offset, _) => *offset,
        }
    }
}

pub struct Pipeline {
    checker: Checker,
    inputs: Vec<rtrb::Producer<Input>>,
    outputs: Vec<rtrb::Consumer<Output>>,
    shared: Vec<Arc<Shared>>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<Engine>>,
    /// Last offset routed to each shard.
    routed: Vec<u64>,
    /// The offset each shard's engine was started at.
    restored: Vec<u64>,
    /// Whether a shard is given no event at or below `restored` (a source that replays from the oldest checkpoint);
    /// otherwise such an offset reaches the shard, which refuses it as the broken invariant it is.
    skip_restored: bool,
    offset: Offset,
    /// Outputs received, not yet released, by offset.
    pending: BTreeMap<Offset, Vec<Output>>,
    wait: Wait,
    /// Shards given work since the last `publish`.
    unwoken: Vec<bool>,
    unwoken_count: usize,
    since_publish: u32,
    /// Every output at or below this offset has been released.
    drained: Offset,
    /// The insurance fund, folded at release in offset order (`insurance` events and liquidation records).
    fund: InsuranceFund,
    /// Offsets of checkpoints asked for whose node state is not yet cut (release has not passed them).
    cuts_wanted: VecDeque<Offset>,
    /// Node states cut at those offsets, for the caller to persist.
    cuts: Vec<FundCut>,
    /// Records decided at release since the last cut: `deleverage` triggers and settled liquidation fills.
    since_cut: (Vec<Trigger>, Vec<LiquidationRecord>),
    /// Whether checkpoints are persisted (a node): only then are the records kept for cuts.
    persisted: bool,
    /// The offset the fund was restored at: fund movements and fills at or below it are already in it.
    fund_from: Offset,
}

/// What the merge owns as of a checkpoint's offset: the fund, and the records it decided since the previous cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FundCut {
    pub offset: Offset,
    pub fund: InsuranceFund,
    pub deleverage: Vec<Trigger>,
    pub liquidations: Vec<LiquidationRecord>,
}

/// Events between two wake-ups of the shards by `submit`.
const WAKE_BATCH: u32 = 64;

struct ShardIo {
    on_idle: Option<Arc<tokio::sync::Notify>>,
    deltas: Option<mpsc::Sender<Persist>>,
    input: rtrb::Consumer<Input>,
    output: rtrb::Producer<Output>,
    queries: mpsc::Receiver<Query>,
    shared: Arc<Shared>,
    sequenced: Arc<AtomicU64>,
}

fn run_shard(index: usize, mut engine: Engine, io: ShardIo, wait: Wait) -> Engine {
    let ShardIo { on_idle, deltas, mut input, mut output, queries, shared, sequenced } = io;
    let mut applied_since_idle = false;
    let metrics = crate::metrics::ShardMetrics::new(index);
    let mut triggers: Vec<Trigger> = Vec::new();
    let mut since_delta: Vec<Trigger> = Vec::new();
    let mut fills_since_delta: Vec<LiquidationRecord> = Vec::new();
    let mut waiting: Vec<Query> = Vec::new();
    let mut spins = 0;
    let mut since_queries = 0u32;
    loop {
        let message = match input.pop() {
            Ok(m) => m,
            Err(_) => {
                if applied_since_idle {
                    applied_since_idle = false;
                    if let Some(n) = &on_idle {
                        n.notify_one();
                    }
                }
                serve_queries(&engine, &queries, &mut waiting, &sequenced, Some(&|| input.is_empty()));
                wait.idle(&mut spins, &shared, || input.is_empty());
                continue;
            }
        };
        spins = 0;
        since_queries += 1;
        if since_queries >= 256 {
            since_queries = 0;
            serve_queries(&engine, &queries, &mut waiting, &sequenced, None);
        }
        match message {
            Input::Stop => return engine,
            Input::Checkpoint(at) => {
                // Taking the delta clones only the changed accounts; encoding and writing happen elsewhere.
                if let Some(tx) = &deltas {
                    let mut delta = engine.take_delta();
                    // A quiet shard is as current as the sequencer: its watermark must not hold the journal back.
                    delta.offset = delta.offset.max(at);
                    let _ = tx.send(Persist::Shard(Box::new(ShardDelta {
                        shard: index,
                        delta,
                        triggers: std::mem::take(&mut since_delta),
                        liquidations: std::mem::take(&mut fills_since_delta),
                    })));
                }
            }
            Input::Job(at, job) => {
                // Everything sequenced up to `at` and routed here came before this message: the state is `at`'s.
                job.run(index, at, &engine);
            }
            Input::Event(offset, event) => {
                // The sequencer numbers events in order; an engine silently skips an offset it has already
                // applied (a replayed prefix), so a repeated or reordered offset here would lose an event.
                assert!(
                    offset > engine.offset(),
                    "invariant: offsets strictly increase into every engine (shard {index} was given offset {} after \
                     {})",
                    offset.0,
                    engine.offset().0
                );
                triggers.clear();
                let result = engine.apply(offset, &event, &mut triggers);
                metrics.applied(&event);
                let broadcast = event.account().is_none();
                // Every shard reports its rejection of a broadcast event: the merge checks they agree (they see the
                // same reference and market data; a disagreement is a bug that would fork the shards' states).
                let rejection = result.err();
                let liquidation = engine.take_liquidation();
                if deltas.is_some() {
                    since_delta.extend(triggers.iter().cloned());
                    fills_since_delta.extend(liquidation.iter().cloned());
                }
                if rejection.is_some() || !triggers.is_empty() || liquidation.is_some() {
                    let mut out = Output {
                        offset,
                        rejection,
                        triggers: std::mem::take(&mut triggers),
                        broadcast,
                        liquidation,
                        insurance: None,
                    };
                    let mut full_spins = 0;
                    loop {
                        match output.push(out) {
                            Ok(()) => break,
                            Err(rtrb::PushError::Full(back)) => {
                                out = back;
                                // The sequencer drains outputs whenever it waits; yield to it.
                                full_spins += 1;
                                if full_spins > SPINS {
                                    thread::yield_now();
                                }
                            }
                        }
                    }
                }
                shared.applied.store(offset.0, Ordering::Release);
                applied_since_idle = true;
            }
        }
    }
}

/// Every shard given a broadcast event must reach the same verdict on it: all accept it (then none reports a rejection) or
/// all reject it for the same reason. Anything else is a broken invariant (the shards' states would fork), fatal
/// with both verdicts in the message.
fn check_broadcast_verdicts(offset: Offset, outs: &[Output], shards: usize) {
    let rejected: Vec<&Rejection> = outs.iter().filter(|o| o.broadcast).filter_map(|o| o.rejection.as_ref()).collect();
    let Some(first) = rejected.first() else { return };
    if let Some(other) = rejected.iter().find(|r| r.reason != first.reason) {
        panic!(
            "invariant: the shards disagree on broadcast event {}: one rejected it with {:?} ({}), another with {:?} \
             ({})",
            offset.0, first.reason, first.message, other.reason, other.message
        );
    }
    if rejected.len() != shards {
        panic!(
            "invariant: the shards disagree on broadcast event {}: {} of {shards} rejected it with {:?} ({}), the \
             others accepted it",
            offset.0,
            rejected.len(),
            first.reason,
            first.message
        );
    }
}

impl Pipeline {
    /// Starts one thread per shard, each with an empty engine.
    pub fn start(config: &PipelineConfig) -> std::io::Result<Self> {
        let engines = (0..config.shards.max(1)).map(|_| Engine::new(&config.engine)).collect();
        Self::start_with(config, engines, Offset(0), None)
    }

    /// Starts one thread per given engine (recovered shards), continuing after `offset`. Checkpoint deltas, when
    /// requested with [`Pipeline::checkpoint`], go to `deltas`.
    pub fn start_with(
        config: &PipelineConfig,
        engines: Vec<Engine>,
        offset: Offset,
        deltas: Option<mpsc::Sender<Persist>>,
    ) -> std::io::Result<Self> {
        let n = engines.len().max(1);
        let mut engines = engines.into_iter();
        let cores = if config.pin { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };
        let sequenced = Arc::new(AtomicU64::new(offset.0));
        let mut p = Pipeline {
            checker: Checker {
                queries: Vec::with_capacity(n),
                threads: Vec::with_capacity(n),
                shared: Vec::with_capacity(n),
                sequenced: Arc::clone(&sequenced),
            },
            inputs: Vec::with_capacity(n),
            outputs: Vec::with_capacity(n),
            shared: Vec::with_capacity(n),
            threads: Vec::with_capacity(n),
            handles: Vec::with_capacity(n),
            routed: vec![0; n],
            restored: vec![0; n],
            skip_restored: false,
            offset,
            pending: BTreeMap::new(),
            wait: config.wait,
            unwoken: vec![false; n],
            unwoken_count: 0,
            since_publish: 0,
            drained: offset,
            fund: InsuranceFund::default(),
            cuts_wanted: VecDeque::new(),
            cuts: Vec::new(),
            since_cut: (Vec::new(), Vec::new()),
            persisted: deltas.is_some(),
            fund_from: Offset(0),
        };
        for i in 0..n {
            let (in_tx, in_rx) = rtrb::RingBuffer::new(config.ring_capacity.max(2));
            let (out_tx, out_rx) = rtrb::RingBuffer::new(config.ring_capacity.max(2));
            let engine = engines.next().unwrap_or_else(|| Engine::new(&config.engine));
            p.restored[i] = engine.offset().0;
            let shared = Arc::new(Shared { applied: AtomicU64::new(engine.offset().0), parker: Parker::new() });
            let core = (!cores.is_empty()).then(|| cores[(i + 1) % cores.len()]);
            let (query_tx, query_rx) = mpsc::channel();
            let io = ShardIo {
                on_idle: config.on_idle.clone(),
                deltas: deltas.clone(),
                input: in_rx,
                output: out_tx,
                queries: query_rx,
                shared: Arc::clone(&shared),
                sequenced: Arc::clone(&sequenced),
            };
            let wait = config.wait;
            let on_panic = config.on_shard_panic;
            let handle = thread::Builder::new().name(format!("vigil-shard-{i}")).spawn(move || {
                if let Some(core) = core {
                    // Pinning is best effort: where the OS refuses, the shard runs unpinned.
                    let _ = core_affinity::set_for_current(core);
                }
                match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_shard(i, engine, io, wait))) {
                    Ok(engine) => engine,
                    Err(panic) => {
                        if let Some(on_panic) = on_panic {
                            on_panic(format!("shard {i} panicked: {}", crate::panic_message(&*panic)));
                        }
                        std::panic::resume_unwind(panic)
                    }
                }
            })?;
            p.threads.push(handle.thread().clone());
            p.checker.queries.push(query_tx);
            p.checker.threads.push(handle.thread().clone());
            p.checker.shared.push(Arc::clone(&shared));
            p.handles.push(handle);
            p.inputs.push(in_tx);
            p.outputs.push(out_rx);
            p.shared.push(shared);
        }
        Ok(p)
    }

    pub fn shard_count(&self) -> usize {
        self.inputs.len()
    }

    /// A handle for pre-trade checks, usable from other threads while the pipeline runs.
    pub fn checker(&self) -> Checker {
        self.checker.clone()
    }

    /// The last offset assigned.
    pub fn offset(&self) -> Offset {
        self.offset
    }

    fn push(&mut self, shard: usize, mut message: Input) {
        if let Input::Event(offset, _) = &message {
            self.routed[shard] = offset.0;
        }
        loop {
            match self.inputs[shard].push(message) {
                Ok(()) => break,
                Err(rtrb::PushError::Full(back)) => {
                    // Backpressure: the shard is behind. Drain outputs meanwhile, so a shard blocked on its own
                    // full output ring can go on. A shard that died will never make room: its panic goes on here.
                    message = back;
                    self.surface_dead_shard();
                    self.collect();
                    wake(Wait::Park, &self.shared[shard], &self.threads[shard]);
                    thread::yield_now();
                }
            }
        }
        if !self.unwoken[shard] {
            self.unwoken[shard] = true;
            self.unwoken_count += 1;
        }
    }

    /// Wakes the shards that were given work since the last call. `submit` calls it every `WAKE_BATCH` events
    /// (a wake costs a full fence); callers that pause between events call it before they pause.
    pub fn publish(&mut self) {
        if self.unwoken_count == 0 {
            return;
        }
        for shard in 0..self.unwoken.len() {
            if self.unwoken[shard] {
                self.unwoken[shard] = false;
                wake(self.wait, &self.shared[shard], &self.threads[shard]);
            }
        }
        self.unwoken_count = 0;
        self.since_publish = 0;
    }

    /// Sequences an event: assigns the next offset and routes it. Blocks (draining outputs) while rings are full.
    pub fn submit(&mut self, event: Event) -> Offset {
        self.submit_at(self.offset.next(), event)
    }

    /// Moves the sequenced offset to `offset` without an event (offsets another partition owns); at or below the
    /// current one it does nothing.
    pub fn advance_to(&mut self, offset: Offset) {
        if offset > self.offset {
            self.offset = offset;
            self.checker.sequenced.store(offset.0, Ordering::Release);
        }
    }

    /// How many shards were given a broadcast event at `offset` (with [`Pipeline::skip_restored`], not those whose
    /// restored engine already held it).
    fn shards_given(&self, offset: Offset) -> usize {
        if self.skip_restored { self.restored.iter().filter(|r| offset.0 > **r).count() } else { self.inputs.len() }
    }

    /// From now on, a shard is not given the events its engine already held when the pipeline started: the source
    /// replays from the oldest shard's checkpoint, and the others skip what theirs hold.
    pub fn skip_restored(&mut self) {
        self.skip_restored = true;
    }

    /// Routes an event at an offset given by the source (a partitioned stream: offsets may skip, never repeat or go
    /// back).
    pub fn submit_at(&mut self, offset: Offset, event: Event) -> Offset {
        assert!(offset > self.offset, "invariant: offsets increase ({} after {})", offset.0, self.offset.0);
        self.offset = offset;
        let n = self.inputs.len();
        if let Event::Insurance { amount } = event {
            // The fund is the merge's: the event is decided at its offset, after every earlier liquidation.
            let out = Output {
                offset,
                rejection: None,
                triggers: vec![],
                broadcast: false,
                liquidation: None,
                insurance: Some(amount),
            };
            self.pending.entry(offset).or_default().push(out);
            self.checker.sequenced.store(offset.0, Ordering::Release);
            return offset;
        }
        match event.account() {
            Some(account) => {
                let shard = shard_of(account, n);
                if !self.skip_restored || offset.0 > self.restored[shard] {
                    self.push(shard, Input::Event(offset, Arc::new(event)));
                }
            }
            None => {
                let event = Arc::new(event);
                for shard in 0..n {
                    if !self.skip_restored || offset.0 > self.restored[shard] {
                        self.push(shard, Input::Event(offset, Arc::clone(&event)));
                    }
                }
            }
        }
        self.checker.sequenced.store(offset.0, Ordering::Release);
        self.since_publish += 1;
        if self.since_publish >= WAKE_BATCH {
            self.publish();
        }
        offset
    }

    /// Puts a job into every shard's ring behind everything sequenced so far, and wakes the shards: each answers
    /// with its part at the current offset (returned), however far it had got when asked.
    pub fn job(&mut self, job: Arc<dyn ShardJob>) -> Offset {
        for shard in 0..self.inputs.len() {
            self.push(shard, Input::Job(self.offset, Arc::clone(&job)));
        }
        self.publish();
        self.offset
    }

    /// Sequences an input that is not an event (an unreadable line): it takes the next offset as a rejection.
    pub fn reject(&mut self, rejection: Rejection) -> Offset {
        self.reject_at(self.offset.next(), rejection)
    }

    /// [`Pipeline::reject`] at an offset given by the source.
    pub fn reject_at(&mut self, offset: Offset, rejection: Rejection) -> Offset {
        assert!(offset > self.offset, "invariant: offsets increase ({} after {})", offset.0, self.offset.0);
        self.offset = offset;
        self.checker.sequenced.store(offset.0, Ordering::Release);
        let out = Output {
            offset,
            rejection: Some(rejection),
            triggers: vec![],
            broadcast: false,
            liquidation: None,
            insurance: None,
        };
        self.pending.entry(offset).or_default().push(out);
        offset
    }

    fn collect(&mut self) {
        for out in &mut self.outputs {
            while let Ok(o) = out.pop() {
                self.pending.entry(o.offset).or_default().push(o);
            }
        }
    }

    fn watermark(&self) -> Offset {
        let mut w = self.offset.0;
        for (s, shared) in self.shared.iter().enumerate() {
            let applied = shared.applied.load(Ordering::Acquire);
            if applied < self.routed[s] {
                w = w.min(applied);
            }
        }
        Offset(w)
    }

    /// Releases every output up to the watermark, in the contract's order.
    pub fn drain(&mut self, sink: &mut impl FnMut(Released)) {
        self.publish();
        // Watermark first, then collect: every output at or below it is already in its ring.
        let watermark = self.watermark();
        self.collect();
        self.release(watermark, sink);
    }

    /// Messages waiting in each shard's input ring, and the rings' capacity.
    pub fn ring_occupancy(&self) -> (Vec<usize>, usize) {
        let capacity = self.inputs.first().map_or(0, |p| p.buffer().capacity());
        (self.inputs.iter().map(|p| capacity.saturating_sub(p.slots())).collect(), capacity)
    }

    /// The insurance fund as of the last released offset.
    pub fn fund(&self) -> InsuranceFund {
        self.fund
    }

    /// Continues a recovered fund (as of the offset the pipeline starts after).
    pub fn set_fund(&mut self, fund: InsuranceFund) {
        self.fund = fund;
    }

    /// Continues a fund stored as of `at`, which may be after the offset the pipeline starts from (a shard
    /// restored from an older checkpoint replays from there): movements and fills at or below `at` are in it, and
    /// are neither folded again nor reported again.
    pub fn continue_fund(&mut self, fund: InsuranceFund, at: Offset) {
        self.fund = fund;
        self.fund_from = at;
    }

    /// Fills a shard settled into its checkpoint beyond the fund's stored offset (the shard will not apply their
    /// events again): the merge settles each at its offset, in order with the rest, as if the shard emitted it.
    pub fn settle_restored(&mut self, fills: Vec<LiquidationRecord>) {
        for record in fills {
            let offset = record.offset;
            let out = Output {
                offset,
                rejection: None,
                triggers: vec![],
                broadcast: false,
                liquidation: Some(record),
                insurance: None,
            };
            self.pending.entry(offset).or_default().push(out);
        }
    }

    /// The node states cut since the last call (see [`Pipeline::checkpoint`]), in offset order.
    pub fn take_cuts(&mut self) -> Vec<FundCut> {
        std::mem::take(&mut self.cuts)
    }

    /// Cuts the merge's state at every wanted offset below `next` (everything at or below it is folded).
    fn cut_before(&mut self, next: Offset) {
        while let Some(at) = self.cuts_wanted.pop_front_if(|at| *at < next) {
            let (deleverage, liquidations) = std::mem::take(&mut self.since_cut);
            self.cuts.push(FundCut { offset: at, fund: self.fund, deleverage, liquidations });
        }
    }

    /// The offset through which every output has been released (by `drain`, `flush` or `finish`).
    pub fn drained(&self) -> Offset {
        self.drained
    }

    fn release(&mut self, watermark: Offset, sink: &mut impl FnMut(Released)) {
        self.drained = self.drained.max(watermark);
        while let Some(entry) = self.pending.first_entry() {
            if *entry.key() > watermark {
                break;
            }
            let (offset, outs) = entry.remove_entry();
            if self.cuts_wanted.front().is_some_and(|at| *at < offset) {
                self.cut_before(offset);
            }
            check_broadcast_verdicts(offset, &outs, self.shards_given(offset));
            let mut triggers: Vec<Trigger> = Vec::new();
            let mut rejection = None;
            let mut liquidation = None;
            let mut moved = false;
            let folded = offset <= self.fund_from;
            for mut o in outs {
                if folded {
                    o.insurance = None;
                    o.liquidation = None;
                }
                rejection = rejection.or(o.rejection);
                triggers.extend(o.triggers);
                if let Some(amount) = o.insurance {
                    match self.fund.transfer(amount) {
                        Ok(()) => moved = true,
                        Err(e) => rejection = Some(fund_rejection(e)),
                    }
                }
                if let Some(record) = o.liquidation {
                    let start = triggers.len();
                    let record = settle_liquidation(&mut self.fund, record, &mut triggers);
                    if self.persisted {
                        self.since_cut.0.extend(triggers[start..].iter().cloned());
                        self.since_cut.1.push(record.clone());
                    }
                    liquidation = Some(record);
                    moved = true;
                }
            }
            if let Some(r) = rejection {
                sink(Released::Rejection(RejectionRecord { offset, reason: r.reason, message: r.message }));
            }
            triggers.sort_unstable();
            for t in triggers {
                sink(Released::Trigger(t));
            }
            if let Some(record) = liquidation {
                sink(Released::Liquidation(record));
            }
            if moved {
                sink(Released::Fund(offset, self.fund));
            }
        }
        self.cut_before(watermark.next());
    }

    /// Asks every shard for a checkpoint delta as of the last sequenced offset (a sequenced command: each shard
    /// takes it after applying everything before it), and the merge for its state at that offset: a [`FundCut`],
    /// ready from [`Pipeline::take_cuts`] once release has passed it. Returns the offset.
    pub fn checkpoint(&mut self) -> Offset {
        let at = self.offset;
        self.cuts_wanted.push_back(at);
        for shard in 0..self.inputs.len() {
            self.push(shard, Input::Checkpoint(at));
        }
        self.publish();
        at
    }

    /// If a shard thread has ended (only a panic ends one before `finish`), continues its panic here rather than
    /// wait forever for it.
    fn surface_dead_shard(&mut self) {
        if let Some(i) = self.handles.iter().position(|h| h.is_finished()) {
            let handle = self.handles.remove(i);
            match handle.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => panic!("invariant: shard {i} stopped before the pipeline finished"),
            }
        }
    }

    /// Waits until every shard has applied everything sequenced so far, releasing all outputs.
    pub fn flush(&mut self, sink: &mut impl FnMut(Released)) {
        loop {
            self.surface_dead_shard();
            self.drain(sink);
            if self.pending.is_empty() && self.watermark() == self.offset {
                // Outputs of offsets up to the watermark were collected by `drain` before this check.
                self.drain(sink);
                return;
            }
            thread::yield_now();
        }
    }

    /// Stops the shards after they applied everything, releases the remaining outputs, and returns the engines.
    pub fn finish(self, sink: &mut impl FnMut(Released)) -> Vec<Engine> {
        self.finish_with_fund(sink).0
    }

    /// [`Pipeline::finish`], with the insurance fund as of the last offset.
    pub fn finish_with_fund(mut self, sink: &mut impl FnMut(Released)) -> (Vec<Engine>, InsuranceFund) {
        self.publish();
        for shard in 0..self.inputs.len() {
            self.push(shard, Input::Stop);
        }
        self.publish();
        let mut engines = Vec::with_capacity(self.handles.len());
        let handles = std::mem::take(&mut self.handles);
        for handle in handles {
            while !handle.is_finished() {
                self.collect();
                thread::yield_now();
            }
            match handle.join() {
                Ok(engine) => engines.push(engine),
                // A shard that panicked broke an invariant; there is no state to return for it.
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        self.collect();
        let end = self.offset;
        self.release(end, sink);
        (engines, self.fund)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::{Amount, MarginMode, Price, Qty, Side, parse_line};

    fn event(line: &str) -> Event {
        parse_line(line).unwrap()
    }

    /// Two engines that differ in reference data (only the first lists ETH): a broken invariant on purpose.
    fn forked_engines() -> Vec<Engine> {
        let config = Config::default();
        let mut listed = Engine::new(&config);
        let perp = event(r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#);
        listed.apply(Offset(1), &perp, &mut Vec::new()).unwrap();
        let mut unlisted = Engine::new(&config);
        // Both at offset 1, as the pipeline expects of engines it continues after offset 1.
        let deposit = event(r#"{"type":"deposit","account":"x","asset":"USDC","amount":"1"}"#);
        unlisted.apply(Offset(1), &deposit, &mut Vec::new()).unwrap();
        vec![listed, unlisted]
    }

    #[test]
    #[should_panic(expected = "the shards disagree on broadcast event 2: 1 of 2 rejected it")]
    fn shards_that_disagree_on_a_broadcast_event_are_fatal() {
        // Proves the merge checks every shard's verdict on a broadcast event: one shard accepting a price the
        // other rejects stops the pipeline, naming the offset and the rejection.
        let config = PipelineConfig { shards: 2, pin: false, ..PipelineConfig::default() };
        let mut p = Pipeline::start_with(&config, forked_engines(), Offset(1), None).unwrap();
        p.submit(event(r#"{"type":"price","symbol":"ETH","price":"3000"}"#));
        p.flush(&mut |_| {});
    }

    #[test]
    fn a_broadcast_event_a_restored_shard_skips_is_judged_by_the_shards_given_it() {
        // Proves a source that replays from the oldest checkpoint (cluster mode) does not mistake a shard that
        // skipped a broadcast event (its checkpoint holds it) for one that accepted it: the rejection the lagging
        // shard gives is released, and the run goes on. (Found by the cluster test: a `funding` event on a future,
        // rejected by one shard after a restart, was fatal.)
        let config = Config::default();
        let deposit = |a: &str| event(&format!(r#"{{"type":"deposit","account":"{a}","asset":"USDC","amount":"1"}}"#));
        let unknown_price = event(r#"{"type":"price","symbol":"NOPE","price":"1"}"#);
        let mut ahead = Engine::new(&config);
        ahead.apply(Offset(1), &deposit("x"), &mut Vec::new()).unwrap();
        let _ = ahead.apply(Offset(2), &unknown_price, &mut Vec::new());
        ahead.apply(Offset(3), &deposit("x"), &mut Vec::new()).unwrap();
        let mut behind = Engine::new(&config);
        behind.apply(Offset(1), &deposit("y"), &mut Vec::new()).unwrap();
        let pconfig = PipelineConfig { shards: 2, pin: false, ..PipelineConfig::default() };
        let mut p = Pipeline::start_with(&pconfig, vec![ahead, behind], Offset(1), None).unwrap();
        p.skip_restored();
        p.submit_at(Offset(2), unknown_price.clone());
        p.submit_at(Offset(3), deposit("x"));
        p.submit_at(Offset(4), unknown_price);
        let mut rejected = Vec::new();
        p.finish(&mut |r| {
            if let Released::Rejection(r) = r {
                rejected.push(r.offset.0);
            }
        });
        assert_eq!(rejected, vec![2, 4]);
    }

    #[test]
    #[should_panic(expected = "was given offset 1 after 1")]
    fn an_offset_an_engine_already_has_is_fatal_and_surfaces_from_the_shard() {
        // Proves a shard refuses an offset at or below its engine's (which the engine alone would skip silently),
        // and that its panic reaches the sequencer's side.
        let config = PipelineConfig { shards: 2, pin: false, ..PipelineConfig::default() };
        // Continuing after offset 0 with engines already at offset 1: the first event is offset 1 again.
        let mut p = Pipeline::start_with(&config, forked_engines(), Offset(0), None).unwrap();
        p.submit(event(r#"{"type":"deposit","account":"x","asset":"USDC","amount":"1"}"#));
        p.submit(event(r#"{"type":"deposit","account":"y","asset":"USDC","amount":"1"}"#));
        p.finish(&mut |_| {});
    }

    #[test]
    fn the_merge_cuts_the_fund_at_each_checkpoint_offset() {
        // Proves each `FundCut` holds the fund exactly as of its offset (what `Sharded` folds in order, whatever
        // the three shards' timing), and that the cuts' records, taken together, are every settled fill and
        // deleverage trigger up to the last cut, each in the cut whose interval holds its offset. (Seed 5: a stream
        // whose fund runs dry, so deleverage triggers are among the records.)
        let lines = vigil_testkit::generate(&vigil_testkit::StreamConfig {
            seed: 5,
            events: 3000,
            accounts: 12,
            liquidation_percent: 12,
            ..vigil_testkit::StreamConfig::default()
        });
        let (tx, rx) = mpsc::channel();
        let config = PipelineConfig { shards: 3, ..PipelineConfig::default() };
        let engines = (0..3).map(|_| Engine::new(&config.engine)).collect();
        let mut p = Pipeline::start_with(&config, engines, Offset(0), Some(tx)).unwrap();
        let mut reference = vigil_engine::Sharded::new(&config.engine, 1);
        let mut fund_at = vec![InsuranceFund::default()];
        let mut deleverage = Vec::new();
        let mut cuts = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            let mut fired = Vec::new();
            match parse_line(line) {
                Ok(e) => {
                    let _ = reference.apply(&e, &mut fired);
                    p.submit(e);
                }
                Err(r) => {
                    reference.next_offset();
                    p.reject(r);
                }
            }
            deleverage.extend(fired.into_iter().filter(|t| t.kind == vigil_model::TriggerKind::Deleverage));
            fund_at.push(*reference.fund());
            if i % 37 == 36 {
                p.checkpoint();
            }
            if i % 101 == 0 {
                p.drain(&mut |_| {});
                cuts.extend(p.take_cuts());
            }
        }
        p.checkpoint();
        p.flush(&mut |_| {});
        cuts.extend(p.take_cuts());
        let _ = p.finish(&mut |_| {});
        drop(rx);
        assert_eq!(cuts.len(), lines.len() / 37 + 1);
        let mut fills = Vec::new();
        let mut triggers = Vec::new();
        let mut previous = Offset(0);
        for cut in &cuts {
            assert_eq!(cut.fund, fund_at[cut.offset.0 as usize], "the fund at the cut's offset {}", cut.offset.0);
            assert!(cut.liquidations.iter().all(|l| previous < l.offset && l.offset <= cut.offset));
            assert!(cut.deleverage.iter().all(|t| previous < t.offset && t.offset <= cut.offset));
            fills.extend(cut.liquidations.iter().cloned());
            triggers.extend(cut.deleverage.iter().cloned());
            previous = cut.offset;
        }
        assert!(fills.len() >= 10 && !triggers.is_empty(), "fills {}, deleverage {}", fills.len(), triggers.len());
        assert_eq!(fills, reference.liquidations());
        assert_eq!(triggers, deleverage);
    }

    #[test]
    fn checks_are_routed_and_read_their_writes() {
        // Proves a check with min_offset sees the trade at that offset, and one naming another shard's offset
        // is still answered.
        let mut p = Pipeline::start(&PipelineConfig { shards: 4, ..PipelineConfig::default() }).unwrap();
        let checker = p.checker();
        p.submit(event(r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}"#));
        p.submit(event(r#"{"type":"price","symbol":"ETH","price":"3000"}"#));
        p.submit(event(r#"{"type":"deposit","account":"a","asset":"USDC","amount":"1000"}"#));
        let trade =
            p.submit(event(r#"{"type":"trade","account":"a","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#));
        let fill = Fill {
            account: "a".into(),
            symbol: "ETH".into(),
            side: Side::Buy,
            qty: Qty::units(1),
            price: Price::units(3000),
            fee: Amount::ZERO,
            margin_mode: MarginMode::Cross,
        };
        let Answer::Check(answer) = checker.check(fill.clone(), trade).blocking_recv().unwrap() else { panic!() };
        let answer = answer.unwrap();
        // After the trade IM is 900 of 1 000 equity: one more ETH (IM 1 200) is refused.
        assert_eq!(answer.before.initial_margin, Amount::units(900));
        assert!(!answer.allowed);
        let name = (0..).map(|i| format!("other-{i}")).find(|n| shard_of(n, 4) != shard_of("a", 4)).unwrap();
        let other = p.submit(event(&format!(r#"{{"type":"deposit","account":"{name}","asset":"USDC","amount":"1"}}"#)));
        let Answer::Check(later) = checker.check(fill, other).blocking_recv().unwrap() else { panic!() };
        assert!(later.is_ok());
        let Answer::Account(Some(view), _) = checker.ask(Ask::Account("a".into()), trade).blocking_recv().unwrap()
        else {
            panic!("account a exists")
        };
        assert_eq!(view.positions.len(), 1);
        let Answer::Account(None, _) = checker.ask(Ask::Account("nobody".into()), trade).blocking_recv().unwrap()
        else {
            panic!("no such account")
        };
        let Answer::Market(market) = checker.ask(Ask::Market, trade).blocking_recv().unwrap() else { panic!() };
        assert!(market.slot("ETH").is_some());
        assert_eq!(checker.applied().len(), 4);
        let mut released = 0;
        p.finish(&mut |_| released += 1);
        assert_eq!(released, 0);
    }
}
