//! The node's state shared between its threads and its readers: the trigger history and the released offset, the
//! checkpoint watermarks, the insurance fund and its fills, the ADL board, and the handles of the running node. The
//! output gate and the persistence thread write it; the HTTP handlers (and background tasks) read it.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{LiquidationRecord, Offset, Trigger};

use crate::intake::IngestBatch;
use crate::pipeline::{Checker, Jobs};

/// What the HTTP handlers share with the node's threads.
pub struct Hub {
    pub(crate) started: Instant,
    pub(crate) token: Option<String>,
    pub(crate) query_timeout: Duration,
    pub(crate) events_max: usize,
    pub(crate) node: OnceLock<Node>,
    /// Every trigger released so far, in the contract's order (offset, account, symbol, kind).
    pub(crate) triggers: RwLock<Vec<Trigger>>,
    /// The offset through which every output is durable and released: triggers at or below it are all in
    /// `triggers`, and no more will ever come for those offsets.
    pub(crate) released: watch::Sender<u64>,
    /// The offset the fund shown is as of (the released offset; in cluster mode, how far the venue's fold reaches).
    fund_through: watch::Sender<u64>,
    /// Each shard's last checkpoint watermark.
    pub(crate) checkpoints: Mutex<Vec<Offset>>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// One stress test at a time: each occupies every shard thread while it runs.
    pub(crate) stressing: tokio::sync::Semaphore,
    /// The insurance fund and every liquidation fill, as released by the output gate.
    pub(crate) insurance: RwLock<Insurance>,
    /// The ADL queues' bucket boundaries, refreshed in the background (`adl::refresh_board`).
    pub(crate) adl_board: RwLock<crate::adl::Board>,
    /// Cluster mode: the partition served and the consumer's position.
    pub(crate) source: OnceLock<Arc<crate::cluster::source::SourceStatus>>,
    /// Cluster mode: where released triggers go to be published to `VIGIL_TRIGGERS`.
    pub(crate) trigger_sink: OnceLock<mpsc::UnboundedSender<Vec<Trigger>>>,
    /// Cluster mode: released fills go to the coverage publisher, and the fund shown is the venue's fold
    /// (`cluster::fund`), not this partition's.
    pub(crate) fund_sink: OnceLock<mpsc::UnboundedSender<crate::cluster::fund::FundFeed>>,
}

/// The fund as of `through` (the released offset when it was last published), every fill up to it, and the fund
/// after each movement since the node started (for a stress report's cut).
#[derive(Clone, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Insurance {
    pub(crate) fund: InsuranceFund,
    pub(crate) through: u64,
    pub(crate) liquidations: Vec<LiquidationRecord>,
    pub(crate) moves: Vec<(Offset, InsuranceFund)>,
}

/// The running node, once recovery has finished.
pub struct Node {
    pub checker: Checker,
    pub ingest: mpsc::Sender<IngestBatch>,
    /// Questions for every shard at one offset (stress tests, the ADL queue), put into every shard's ring by the
    /// sequencer (`Pipeline::job`).
    pub jobs: Jobs,
    pub durable: Arc<AtomicU64>,
}

/// Limits and access settings of the HTTP listener.
#[derive(Clone, Debug)]
pub struct HubConfig {
    pub token: Option<String>,
    pub query_timeout: Duration,
    pub events_max: usize,
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        Self {
            started: Instant::now(),
            token: config.token,
            query_timeout: config.query_timeout,
            events_max: config.events_max,
            node: OnceLock::new(),
            triggers: RwLock::new(Vec::new()),
            released: watch::Sender::new(0),
            fund_through: watch::Sender::new(0),
            checkpoints: Mutex::new(Vec::new()),
            shutdown: watch::Sender::new(false),
            stressing: tokio::sync::Semaphore::new(1),
            insurance: RwLock::new(Insurance::default()),
            adl_board: RwLock::new(crate::adl::Board::default()),
            source: OnceLock::new(),
            trigger_sink: OnceLock::new(),
            fund_sink: OnceLock::new(),
        }
    }

    /// Replaces the ADL board.
    pub fn set_adl_board(&self, board: crate::adl::Board) {
        *crate::write(&self.adl_board, "the ADL board") = board;
    }

    /// Where to send a question for every shard, the shard count and the offset sequenced so far (once running).
    pub fn jobs(&self) -> Option<(Jobs, usize, Offset)> {
        let node = self.node.get()?;
        Some((node.jobs.clone(), node.checker.shards(), node.checker.sequenced()))
    }

    /// Whether the node is stopping.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Becomes true when the node stops.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Recovery finished: the fund and every liquidation fill so far.
    pub fn start_fund(&self, at: Offset, fund: InsuranceFund, liquidations: Vec<LiquidationRecord>) {
        let mut i = crate::write(&self.insurance, "the insurance fund");
        i.fund = fund;
        i.through = at.0;
        self.fund_through.send_replace(at.0);
        i.liquidations = liquidations;
        i.moves = vec![(at, fund)];
    }

    /// A copy of the fund, its fills and movements as shown (the cluster fold saves it with its own state).
    pub(crate) fn insurance_copy(&self) -> Insurance {
        crate::read(&self.insurance, "the insurance fund").clone()
    }

    /// Shows a saved fund, fills and movements (a restarted cluster node's fold resumes from them).
    pub(crate) fn restore_insurance(&self, saved: Insurance) {
        let through = saved.through;
        *crate::write(&self.insurance, "the insurance fund") = saved;
        self.fund_through.send_replace(through);
    }

    /// Released fills and the fund after each movement among them, as of `through`: shown, or in cluster mode
    /// handed to the coverage publisher (the fund they make here is this partition's only).
    pub fn publish_fund(
        &self,
        liquidations: Vec<LiquidationRecord>,
        moves: Vec<(Offset, InsuranceFund)>,
        through: Offset,
    ) {
        if let Some(sink) = self.fund_sink.get() {
            let _ = sink.send(crate::cluster::fund::FundFeed::Released { fills: liquidations, through });
            return;
        }
        self.show_fund(liquidations, moves, through);
    }

    /// Whether the fund shown is folded elsewhere (cluster mode).
    pub fn fund_folded_elsewhere(&self) -> bool {
        self.fund_sink.get().is_some()
    }

    /// Appends settled fills and the fund after each movement among them, as of `through`.
    pub fn show_fund(
        &self,
        liquidations: Vec<LiquidationRecord>,
        moves: Vec<(Offset, InsuranceFund)>,
        through: Offset,
    ) {
        let mut i = crate::write(&self.insurance, "the insurance fund");
        i.liquidations.extend(liquidations);
        if let Some((_, f)) = moves.last() {
            i.fund = *f;
        }
        i.moves.extend(moves);
        i.through = i.through.max(through.0);
        let through = i.through;
        drop(i);
        self.fund_through.send_if_modified(|t| {
            let advanced = through > *t;
            *t = through;
            advanced
        });
    }

    /// The fund as of offset `at`, once everything up to it is released and the fund is folded through it (in
    /// cluster mode the venue's fold trails the partition: `cluster::fund`), waiting at most the query timeout.
    pub async fn fund_at(&self, at: Offset) -> Option<InsuranceFund> {
        let (mut released, mut folded) = (self.released.subscribe(), self.fund_through.subscribe());
        let reached = tokio::time::timeout(self.query_timeout, async {
            released.wait_for(|r| *r >= at.0).await.is_ok() && folded.wait_for(|f| *f >= at.0).await.is_ok()
        })
        .await;
        if reached != Ok(true) {
            return None;
        }
        let i = crate::read(&self.insurance, "the insurance fund");
        let k = i.moves.partition_point(|(o, _)| *o <= at);
        k.checked_sub(1).map(|k| i.moves[k].1)
    }

    /// The fund and its offset, and the fills after `after` (or the last `limit` without it), with whether the page
    /// was cut short.
    pub(crate) fn insurance(
        &self,
        after: Option<u64>,
        limit: usize,
    ) -> (InsuranceFund, u64, Vec<LiquidationRecord>, bool) {
        let i = crate::read(&self.insurance, "the insurance fund");
        let all = &i.liquidations;
        let start = match after {
            Some(after) => all.partition_point(|l| l.offset.0 <= after),
            None => all.len().saturating_sub(limit),
        };
        let end = all.len().min(start + limit);
        (i.fund, i.through, all[start..end].to_vec(), end < all.len())
    }

    /// Recovery finished: the history so far, the watermarks, and the handles of the running node.
    pub fn start(&self, history: Vec<Trigger>, released: Offset, checkpoints: Vec<Offset>, node: Node) {
        *crate::write(&self.triggers, "the trigger history") = history;
        self.set_checkpoints(checkpoints);
        self.released.send_replace(released.0);
        let _ = self.node.set(node);
    }

    /// The node's read handle, once recovered.
    pub fn checker(&self) -> Option<Checker> {
        self.node.get().map(|n| n.checker.clone())
    }

    pub fn ready(&self) -> bool {
        self.node.get().is_some()
    }

    /// Appends released triggers (whole offsets) and advances the released offset.
    pub fn publish(&self, triggers: Vec<Trigger>, through: Offset) {
        if !triggers.is_empty()
            && let Some(sink) = self.trigger_sink.get()
        {
            let _ = sink.send(triggers.clone());
        }
        if !triggers.is_empty() {
            crate::write(&self.triggers, "the trigger history").extend(triggers);
        }
        self.released.send_if_modified(|r| {
            let advanced = through.0 > *r;
            if advanced {
                *r = through.0;
            }
            advanced
        });
    }

    pub fn set_checkpoint(&self, shard: usize, offset: Offset) {
        if let Some(w) = crate::lock(&self.checkpoints, "the checkpoint watermarks").get_mut(shard) {
            *w = offset;
        }
    }

    fn set_checkpoints(&self, all: Vec<Offset>) {
        *crate::lock(&self.checkpoints, "the checkpoint watermarks") = all;
    }

    /// The partition this node serves, in cluster mode.
    pub fn partition(&self) -> Option<crate::cluster::Partition> {
        self.source.get().map(|s| s.partition)
    }

    /// Ends live trigger streams (the node is stopping).
    pub fn shut_down(&self) {
        self.shutdown.send_replace(true);
    }

    pub fn released(&self) -> Offset {
        Offset(*self.released.borrow())
    }

    /// Triggers after `after`, whole offsets only, at most `limit` of them unless one offset alone has more;
    /// with whether the page was cut short.
    pub(crate) fn triggers_after(&self, after: u64, limit: usize) -> (Vec<Trigger>, bool) {
        let all = crate::read(&self.triggers, "the trigger history");
        let start = all.partition_point(|t| t.offset.0 <= after);
        let rest = &all[start..];
        // Whole offsets only: as many as fit in `limit`, or the first one alone if it is larger.
        let mut end = 0;
        while end < rest.len() {
            let offset = rest[end].offset;
            let mut next = end;
            while next < rest.len() && rest[next].offset == offset {
                next += 1;
            }
            if next > limit && end > 0 {
                break;
            }
            end = next;
            if end >= limit {
                break;
            }
        }
        (rest[..end].to_vec(), end < rest.len())
    }
}
