//! The venue's insurance fund in a cluster (docs/cluster.md, "The insurance fund across partitions").
//!
//! The fund is a fold over two kinds of records in offset order: `insurance` events (broadcast: every partition
//! sees them) and liquidation fills (each seen only by the partition owning the account). No partition holds both,
//! so each partition's nodes publish what they release to `VIGIL_FILLS` as *coverage* messages: "partition `p`'s
//! fills and the venue's `insurance` events in offsets `(from, through]` are exactly these". Every node folds the
//! whole `VIGIL_FILLS` stream: a record at offset `o` is folded once every partition has covered `o`, so the fold
//! sees every fill and movement up to `min(covered)` in offset order and computes what a single node computes,
//! whichever replica published which range, and however their ranges overlap.
//!
//! A node never checkpoints past what its coverage messages hold (the persistence thread waits for their acks, as
//! a journaled node's waits for the journal), so a node restarted from its checkpoints starts covering exactly where
//! the stream's coverage of its partition may end: the ranges of one partition leave no gap.
//!
//! The fund's `deleverage` triggers go to `VIGIL_TRIGGERS` on `vigil.triggers.fund`, with the same message ids as
//! every other trigger: every node folding publishes them, the stream stores each once.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer, stream};
use axum::body::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use vigil_engine::sharded::{fund_rejection, settle_liquidation};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{Amount, LiquidationRecord, Offset, Trigger};

use super::triggers::{last_trigger_offset, trigger_id};
use super::{PARTITIONS_HEADER, Partition, TRIGGER_OFFSET_HEADER};
use crate::hub::Hub;
use crate::metrics as m;

/// The stream of coverage messages.
pub const FILLS_STREAM: &str = "VIGIL_FILLS";
/// Every coverage subject.
pub const FILLS_SUBJECTS: &str = "vigil.fills.>";
/// The subject the fund's `deleverage` triggers are published to (in `VIGIL_TRIGGERS`).
pub const FUND_TRIGGER_SUBJECT: &str = "vigil.triggers.fund";

/// The subject of partition `index`'s coverage messages.
pub fn fills_subject(index: u32) -> String {
    format!("vigil.fills.p{index}")
}

/// One coverage message: partition `partition`'s liquidation fills and every `insurance` event in `(from, through]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Coverage {
    pub partition: u32,
    pub partitions: u32,
    /// Exclusive.
    pub from: Offset,
    /// Inclusive.
    pub through: Offset,
    /// As the partition's merge released them (their `uncovered` part is the fold's to decide).
    pub fills: Vec<LiquidationRecord>,
    /// `insurance` events: offset and amount.
    pub insurance: Vec<(Offset, Amount)>,
}

impl Coverage {
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        // These types always encode: the codec's only failure is on decode.
        let _ = vigil_store::codec::encode_value(self, &mut body);
        body
    }

    pub fn decode(body: &[u8]) -> Result<Self, String> {
        vigil_store::codec::decode_value(body).map_err(|e| e.to_string())
    }

    /// Its message id: the same range of the same partition carries the same records whichever replica sends it.
    pub fn id(&self) -> String {
        format!("p{}.{}-{}", self.partition, self.from.0, self.through.0)
    }
}

/// What a node's sequencer and release hand the coverage publisher, in offset order of their own kind.
#[derive(Debug)]
pub enum FundFeed {
    /// An `insurance` event, when sequenced.
    Insurance(Offset, Amount),
    /// Fills released, and the offset through which everything has been released.
    Released { fills: Vec<LiquidationRecord>, through: Offset },
}

/// A coverage message goes out this long after the last when it carries fills or movements …
const SEND_BUSY: Duration = Duration::from_millis(20);
/// … and this long after when it only moves the range on (checkpoints wait for it: docs/cluster.md).
const SEND_IDLE: Duration = Duration::from_millis(250);

/// The coverage stream, created if missing.
pub async fn fills_stream(
    js: &jetstream::Context,
    replicas: usize,
    duplicate_window: Duration,
) -> anyhow::Result<stream::Stream> {
    super::file_stream(js, FILLS_STREAM, FILLS_SUBJECTS, replicas, duplicate_window).await
}

/// Publishes this node's coverage of `partition` from `from` on, one message at a time (each stored before the
/// next is sent, so one replica's ranges reach the stream in order), storing the last acknowledged `through` in
/// `acked`. Runs until `rx` closes.
pub async fn publish_coverage(
    js: jetstream::Context,
    partition: Partition,
    mut from: Offset,
    mut rx: mpsc::UnboundedReceiver<FundFeed>,
    acked: Arc<AtomicU64>,
) {
    let subject = fills_subject(partition.index);
    let mut fills: Vec<LiquidationRecord> = Vec::new();
    let mut insurance: Vec<(Offset, Amount)> = Vec::new();
    let mut through = from;
    let mut sent_at = Instant::now();
    let mut open = true;
    let coverage = metrics::gauge!(m::CLUSTER_COVERAGE, "partition" => partition.index.to_string());
    while open || through > from {
        let busy = fills.iter().any(|f| f.offset <= through) || insurance.iter().any(|(o, _)| *o <= through);
        let due = sent_at + if busy { SEND_BUSY } else { SEND_IDLE };
        if open {
            tokio::select! {
                feed = rx.recv() => match feed {
                    Some(f) => take(f, from, &mut fills, &mut insurance, &mut through),
                    None => open = false,
                },
                _ = tokio::time::sleep_until(due.into()), if through > from => {}
            }
            while let Ok(f) = rx.try_recv() {
                take(f, from, &mut fills, &mut insurance, &mut through);
            }
            if through <= from || Instant::now() < due {
                continue;
            }
        }
        let (now_fills, later): (Vec<_>, Vec<_>) = fills.drain(..).partition(|f| f.offset <= through);
        fills = later;
        let (now_insurance, later): (Vec<_>, Vec<_>) = insurance.drain(..).partition(|(o, _)| *o <= through);
        insurance = later;
        let message = Coverage {
            partition: partition.index,
            partitions: partition.count,
            from,
            through,
            fills: now_fills,
            insurance: now_insurance,
        };
        send(&js, &subject, &message).await;
        from = through;
        acked.store(through.0, Ordering::Release);
        coverage.set(through.0 as f64);
        sent_at = Instant::now();
    }
}

fn take(
    feed: FundFeed,
    from: Offset,
    fills: &mut Vec<LiquidationRecord>,
    insurance: &mut Vec<(Offset, Amount)>,
    through: &mut Offset,
) {
    match feed {
        FundFeed::Insurance(offset, amount) if offset > from => insurance.push((offset, amount)),
        FundFeed::Insurance(..) => {}
        FundFeed::Released { fills: released, through: t } => {
            fills.extend(released.into_iter().filter(|f| f.offset > from));
            *through = (*through).max(t);
        }
    }
}

/// Sends one message until the stream holds it (or already did): coverage is what checkpoints wait for.
async fn send(js: &jetstream::Context, subject: &str, message: &Coverage) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", message.id().as_str());
    headers.insert(PARTITIONS_HEADER, message.partitions.to_string().as_str());
    publish_until_stored(js, subject, headers, Bytes::from(message.encode()), |e| {
        tracing::warn!(error = %e, from = message.from.0, through = message.through.0,
            "publishing coverage failed; sending it again");
    })
    .await;
}

/// Publishes one message until the stream stores it or answers that it already held its id (returns whether it
/// did), with backoff; each failure goes to `failed`, but "duplicate message id is in process" (10158: another
/// replica storing the same id at this moment), which is sent again and then answered as a duplicate.
async fn publish_until_stored(
    js: &jetstream::Context,
    subject: &str,
    headers: HeaderMap,
    body: Bytes,
    mut failed: impl FnMut(&str),
) -> bool {
    let mut backoff = Duration::from_millis(20);
    loop {
        let result = match js.publish_with_headers(subject.to_owned(), headers.clone(), body.clone()).await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(ack) => return ack.duplicate,
            Err(e) if e.contains("10158") => {}
            Err(e) => failed(&e),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// What one coverage message let the fold settle.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Folded {
    /// Fills settled, with the fund's verdict on their deficits.
    pub fills: Vec<LiquidationRecord>,
    /// The fund after each movement.
    pub moves: Vec<(Offset, InsuranceFund)>,
    /// `deleverage` triggers (a deficit the fund did not hold).
    pub triggers: Vec<Trigger>,
    /// `insurance` events the fund refused: offset and why.
    pub refused: Vec<(Offset, String)>,
}

/// The venue's fund folded over every partition's coverage.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Fold {
    fund: InsuranceFund,
    /// Every fill and movement at or below it is in `fund`.
    folded: Offset,
    /// How far each partition's coverage reaches.
    covered: Vec<Offset>,
    /// Messages past a gap in their partition's coverage, by `from` (a replica's are sent in order, so only a
    /// message stored out of order by a retry can wait here).
    waiting: Vec<BTreeMap<Offset, Coverage>>,
    fills: BTreeMap<Offset, LiquidationRecord>,
    insurance: BTreeMap<Offset, Amount>,
}

impl Fold {
    pub fn new(partitions: u32) -> Self {
        let n = partitions.max(1) as usize;
        Self {
            fund: InsuranceFund::default(),
            folded: Offset(0),
            covered: vec![Offset(0); n],
            waiting: vec![BTreeMap::new(); n],
            fills: BTreeMap::new(),
            insurance: BTreeMap::new(),
        }
    }

    pub fn fund(&self) -> InsuranceFund {
        self.fund
    }

    /// Every fill and movement at or below this offset is folded.
    pub fn folded(&self) -> Offset {
        self.folded
    }

    /// Takes one coverage message and folds whatever every partition now covers.
    pub fn take(&mut self, message: Coverage) -> Result<Folded, String> {
        let p = message.partition as usize;
        if message.partitions as usize != self.covered.len() || p >= self.covered.len() {
            return Err(format!(
                "coverage of partition {}/{} in a cluster of {} partitions",
                message.partition,
                message.partitions,
                self.covered.len()
            ));
        }
        if message.through <= self.covered[p] {
            return Ok(Folded::default());
        }
        if message.from > self.covered[p] {
            self.waiting[p].insert(message.from, message);
            return Ok(Folded::default());
        }
        self.absorb(message);
        while let Some(next) = self.waiting[p].first_entry() {
            if *next.key() > self.covered[p] {
                break;
            }
            let next = next.remove();
            if next.through > self.covered[p] {
                self.absorb(next);
            }
        }
        Ok(self.fold())
    }

    fn absorb(&mut self, message: Coverage) {
        let p = message.partition as usize;
        let floor = self.covered[p].max(self.folded);
        for f in message.fills {
            if f.offset > floor && f.offset <= message.through {
                self.fills.insert(f.offset, f);
            }
        }
        for (o, a) in message.insurance {
            if o > self.folded && o <= message.through {
                self.insurance.insert(o, a);
            }
        }
        self.covered[p] = message.through;
    }

    fn fold(&mut self) -> Folded {
        let mut out = Folded::default();
        let Some(upto) = self.covered.iter().copied().min() else { return out };
        if upto <= self.folded {
            return out;
        }
        loop {
            let fill = self.fills.first_key_value().map(|(o, _)| *o).filter(|o| *o <= upto);
            let movement = self.insurance.first_key_value().map(|(o, _)| *o).filter(|o| *o <= upto);
            match (fill, movement) {
                (Some(f), m) if m.is_none_or(|m| f < m) => {
                    let Some(record) = self.fills.remove(&f) else { break };
                    let record = settle_liquidation(&mut self.fund, record, &mut out.triggers);
                    out.fills.push(record);
                    out.moves.push((f, self.fund));
                }
                (_, Some(m)) => {
                    let Some(amount) = self.insurance.remove(&m) else { break };
                    match self.fund.transfer(amount) {
                        Ok(()) => out.moves.push((m, self.fund)),
                        Err(e) => out.refused.push((m, fund_rejection(e).message)),
                    }
                }
                _ => break,
            }
        }
        self.folded = upto;
        out
    }
}

/// Folds `VIGIL_FILLS` for as long as the node runs: the venue's fund for `GET /v1/insurance` and the fund gauges,
/// and its `deleverage` triggers published to `VIGIL_TRIGGERS` (each once: those at or below the last one the
/// stream holds were published before, in order, by some node's fold). The fold starts from the node's saved fold
/// (`fund-fold.bin` in its data directory) when it has one for this stream, else from the stream's first message,
/// and saves itself every `save_every` while messages come.
pub async fn fold_fund(js: jetstream::Context, partitions: u32, hub: Arc<Hub>, saved: FoldFile) {
    if let Err(e) = fold_loop(&js, partitions, &hub, &saved).await {
        crate::fatal(format!("folding the insurance fund from {FILLS_STREAM}: {e:#}"));
    }
}

/// Where and how often a node saves its fold.
pub struct FoldFile {
    pub path: std::path::PathBuf,
    pub save_every: Duration,
    /// Shown in `/v1/status` as `fund_saved_sequence`.
    pub status: Arc<super::source::SourceStatus>,
}

/// The file a node keeps its fold in, in its data directory.
pub fn fold_file(data: &std::path::Path) -> std::path::PathBuf {
    data.join("fund-fold.bin")
}

/// The fold after one message of `VIGIL_FILLS`, with the fund, fills and movements it showed by then.
#[derive(Serialize, Deserialize)]
struct SavedFold {
    /// The stream's creation time (nanoseconds since the epoch): a stream deleted and made again is another one.
    stream_created: i128,
    /// The last message folded.
    sequence: u64,
    partitions: u32,
    fold: Fold,
    shown: crate::hub::Insurance,
}

/// Writes `bytes` to `path` through a temporary file, synced and renamed over it, then syncs the directory: a crash
/// leaves the old file or the new one.
fn write_whole(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    match path.parent() {
        Some(dir) => std::fs::File::open(dir)?.sync_all(),
        None => Ok(()),
    }
}

/// The saved fold, if the file holds one for this stream (same creation time, a sequence it has stored, the same
/// partition count); anything else is logged and ignored: the fold then starts from the stream's first message.
fn read_saved(path: &std::path::Path, created: i128, last_sequence: u64, partitions: u32) -> Option<SavedFold> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "the saved fund fold is unreadable; folding from the start");
            return None;
        }
    };
    let saved: SavedFold = match vigil_store::codec::decode_value(&bytes) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, path = %path.display(), "the saved fund fold does not decode; folding from the start");
            return None;
        }
    };
    if saved.stream_created != created || saved.sequence > last_sequence || saved.partitions != partitions {
        tracing::warn!(
            saved_sequence = saved.sequence,
            last_sequence,
            "the saved fund fold is of another {FILLS_STREAM} (or partition count); folding from the start"
        );
        return None;
    }
    Some(saved)
}

async fn fold_loop(js: &jetstream::Context, partitions: u32, hub: &Arc<Hub>, file: &FoldFile) -> anyhow::Result<()> {
    let what = format!("finding {FILLS_STREAM}");
    let stream = super::retry(&what, || js.get_stream(FILLS_STREAM)).await?;
    // As the server answered just now.
    let info = stream.cached_info();
    let (created, last_sequence) = (info.created.unix_timestamp_nanos(), info.state.last_sequence);
    let published =
        super::retry("reading the last stored deleverage trigger", || last_trigger_offset(js, FUND_TRIGGER_SUBJECT))
            .await?;
    let (mut fold, mut sequence) = match read_saved(&file.path, created, last_sequence, partitions) {
        Some(saved) => {
            tracing::info!(
                sequence = saved.sequence,
                folded = saved.fold.folded().0,
                "the fund's fold resumes from its saved state"
            );
            hub.restore_insurance(saved.shown);
            file.status.fund_saved_sequence.store(saved.sequence, Ordering::Relaxed);
            (saved.fold, saved.sequence)
        }
        None => (Fold::new(partitions), 0),
    };
    let deliver_policy = match sequence {
        0 => consumer::DeliverPolicy::All,
        s => consumer::DeliverPolicy::ByStartSequence { start_sequence: s + 1 },
    };
    let config = consumer::pull::OrderedConfig {
        filter_subject: FILLS_SUBJECTS.to_owned(),
        deliver_policy,
        ..Default::default()
    };
    let what = format!("creating the fund's consumer on {FILLS_STREAM}");
    let consumer = super::retry(&what, || stream.create_consumer(config.clone())).await?;
    let mut messages =
        consumer.messages().await.map_err(|e| anyhow::anyhow!("reading {FILLS_STREAM}'s consumer: {e}"))?;
    let gauges = m::GateMetrics::new();
    let refusals = metrics::counter!(m::CLUSTER_FUND_REFUSALS);
    let folded_gauge = metrics::gauge!(m::CLUSTER_FUND_FOLDED);
    folded_gauge.set(fold.folded().0 as f64);
    let (mut saved_sequence, mut saved_at) = (sequence, Instant::now());
    loop {
        // With messages not saved yet, waits for the next one at most until the save is due (a quiet stream
        // still gets its last messages saved); with none, for as long as it takes.
        let next = if sequence > saved_sequence {
            let due = file.save_every.saturating_sub(saved_at.elapsed());
            tokio::time::timeout(due, messages.next()).await.ok()
        } else {
            Some(messages.next().await)
        };
        let next = match next {
            Some(None) => anyhow::bail!("the consumer ended"),
            Some(Some(next)) => Some(next),
            None => None,
        };
        if let Some(message) = next {
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "reading {FILLS_STREAM}; the consumer resumes");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let coverage = Coverage::decode(&message.payload)
                .map_err(|e| anyhow::anyhow!("an undecodable message on {}: {e}", message.subject))?;
            let folded = fold.take(coverage).map_err(|e| anyhow::anyhow!(e))?;
            for (offset, why) in &folded.refused {
                refusals.increment(1);
                tracing::info!(offset = offset.0, why, "an insurance event refused by the venue's fund");
            }
            if let Some((_, f)) = folded.moves.last() {
                gauges.fund(f);
            }
            for t in folded.triggers.iter().filter(|t| t.offset > published) {
                publish_trigger(js, t).await;
            }
            folded_gauge.set(fold.folded().0 as f64);
            hub.show_fund(folded.fills, folded.moves, fold.folded());
            match message.info() {
                Ok(info) => sequence = info.stream_sequence,
                Err(e) => anyhow::bail!("a message of {FILLS_STREAM} without its stream sequence: {e}"),
            }
        }
        if sequence > saved_sequence && saved_at.elapsed() >= file.save_every {
            let saved = SavedFold {
                stream_created: created,
                sequence,
                partitions,
                fold: fold.clone(),
                shown: hub.insurance_copy(),
            };
            let mut bytes = Vec::new();
            // These types always encode: the codec's only failure is on decode.
            let _ = vigil_store::codec::encode_value(&saved, &mut bytes);
            let path = file.path.clone();
            let written = tokio::task::spawn_blocking(move || write_whole(&path, &bytes)).await;
            match written.map_err(std::io::Error::other).and_then(|w| w) {
                Ok(()) => {
                    file.status.fund_saved_sequence.store(sequence, Ordering::Relaxed);
                    saved_sequence = sequence;
                }
                Err(e) => tracing::warn!(error = %e, "saving the fund's fold failed; it is tried again later"),
            }
            saved_at = Instant::now();
        }
    }
}

/// Publishes one trigger until stored (or found stored), before the next: the stream's last one then tells a
/// restarted fold which it has published.
async fn publish_trigger(js: &jetstream::Context, t: &Trigger) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", trigger_id(t).as_str());
    headers.insert(TRIGGER_OFFSET_HEADER, t.offset.0.to_string().as_str());
    let duplicate = publish_until_stored(js, FUND_TRIGGER_SUBJECT, headers, Bytes::from(t.to_json()), |e| {
        metrics::counter!(m::CLUSTER_TRIGGER_FAILURES, "partition" => "fund").increment(1);
        tracing::warn!(error = %e, "publishing a deleverage trigger failed; sending it again");
    })
    .await;
    let outcome = if duplicate { "duplicate" } else { "stored" };
    metrics::counter!(m::CLUSTER_TRIGGERS, "outcome" => outcome, "partition" => "fund").increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::{Price, Qty, TriggerKind};

    fn fill(offset: u64, account: &str, fee: i128, paid: i128) -> LiquidationRecord {
        LiquidationRecord {
            offset: Offset(offset),
            account: account.to_owned(),
            symbol: "BTC-PERP".to_owned(),
            qty: Qty(100_000_000),
            price: Price(1),
            bankruptcy_price: None,
            fee: Amount(fee),
            fund_paid: Amount(paid),
            uncovered: Amount::ZERO,
            equity: Amount(-1),
            maintenance_margin: Amount(1),
        }
    }

    fn coverage(p: u32, from: u64, through: u64, fills: Vec<LiquidationRecord>, ins: &[(u64, i128)]) -> Coverage {
        Coverage {
            partition: p,
            partitions: 2,
            from: Offset(from),
            through: Offset(through),
            fills,
            insurance: ins.iter().map(|(o, a)| (Offset(*o), Amount(*a))).collect(),
        }
    }

    #[test]
    fn the_fold_settles_in_offset_order_once_every_partition_covers_it() {
        // Partition 1's fill at 5 draws on the deposit at 3 and the fee at 4 (partition 0's), and is folded only
        // when partition 0 covers 5; the deficit beyond the balance is uncovered, with a deleverage trigger.
        let mut fold = Fold::new(2);
        let first = fold.take(coverage(1, 0, 6, vec![fill(5, "b", 0, 150)], &[(3, 100)])).expect("taken");
        assert_eq!(first, Folded::default(), "partition 0 covers nothing yet");
        let second = fold.take(coverage(0, 0, 4, vec![fill(4, "a", 20, 0)], &[(3, 100)])).expect("taken");
        assert_eq!(second.moves.iter().map(|(o, f)| (o.0, f.balance.0)).collect::<Vec<_>>(), vec![(3, 100), (4, 120)]);
        assert_eq!(fold.folded(), Offset(4));
        let third = fold.take(coverage(0, 4, 9, vec![], &[(3, 100), (8, -50)])).expect("taken");
        assert_eq!(third.fills.len(), 1);
        assert_eq!(third.fills[0].uncovered, Amount(30), "120 held against 150");
        assert_eq!(third.triggers.len(), 1);
        assert_eq!(third.triggers[0].kind, TriggerKind::Deleverage);
        assert_eq!(third.triggers[0].uncovered, Some(Amount(30)));
        assert_eq!(fold.folded(), Offset(6), "partition 1 covers only 6: the withdrawal at 8 waits");
        assert!(third.refused.is_empty());
        let fourth = fold.take(coverage(1, 6, 9, vec![], &[(8, -50)])).expect("taken");
        assert_eq!(fourth.refused.len(), 1, "a withdrawal from a fund below zero is refused: {fourth:?}");
        assert_eq!(fold.fund().balance, Amount(-30));
        assert_eq!(fold.fund().uncovered, Amount(30));
    }

    #[test]
    fn overlapping_duplicate_and_out_of_order_ranges_fold_the_same() {
        // Two replicas of each partition cut their ranges differently; one range arrives after a later one. The
        // fund is the one a single fold of the exact records gives.
        let fills0 = [fill(2, "a", 10, 0), fill(7, "a", 0, 25)];
        let fills1 = [fill(4, "b", 5, 0), fill(9, "b", 0, 100)];
        let ins = [(1, 50), (6, -10)];
        let part = |p: u32, from: u64, through: u64| {
            let fills = if p == 0 { &fills0[..] } else { &fills1[..] };
            let fills = fills.iter().filter(|f| f.offset.0 > from && f.offset.0 <= through).cloned().collect();
            let ins: Vec<(u64, i128)> = ins.iter().copied().filter(|(o, _)| *o > from && *o <= through).collect();
            coverage(p, from, through, fills, &ins)
        };
        let orders = [
            vec![part(0, 0, 10), part(1, 0, 10)],
            vec![part(1, 0, 3), part(0, 0, 5), part(1, 3, 10), part(0, 0, 8), part(0, 5, 10), part(1, 0, 10)],
            vec![part(0, 5, 10), part(1, 0, 4), part(0, 0, 5), part(1, 4, 10), part(1, 4, 10)],
        ];
        let mut funds = Vec::new();
        for order in orders {
            let mut fold = Fold::new(2);
            let mut settled = Vec::new();
            for c in order {
                settled.extend(fold.take(c).expect("taken").fills);
            }
            assert_eq!(fold.folded(), Offset(10));
            assert_eq!(settled.iter().map(|f| f.offset.0).collect::<Vec<_>>(), vec![2, 4, 7, 9]);
            funds.push((fold.fund(), settled));
        }
        assert!(funds.windows(2).all(|w| w[0] == w[1]), "{funds:?}");
        // 50 + 10 + 5 - 10 = 55; 25 paid (30 left); 100 asked for, 30 held: 70 uncovered.
        assert_eq!(funds[0].0.balance, Amount(-70));
        assert_eq!(funds[0].1[3].uncovered, Amount(70));
    }

    #[test]
    fn coverage_of_another_cluster_size_is_an_error_and_messages_round_trip() {
        let mut fold = Fold::new(3);
        assert!(fold.take(coverage(0, 0, 1, vec![], &[])).is_err());
        let c = coverage(1, 4, 9, vec![fill(5, "b", 1, 0)], &[(6, 7)]);
        assert_eq!(Coverage::decode(&c.encode()), Ok(c.clone()));
        assert_eq!(c.id(), "p1.4-9");
        assert!(Coverage::decode(&[0xff, 1, 2]).is_err());
    }
}
