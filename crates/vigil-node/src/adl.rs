//! The auto-deleveraging queue across shards (`liquidation.md`, "Deleveraging"; docs/api.md): every shard scores
//! its positions at one offset (a job in every ring, as a stress test is), the parts are merged in the queue's
//! order, and each position gets its rank and rank bucket (1–5, the lights venues show).
//!
//! The account object shows each position's bucket from a [`Board`]: the entries at the queue's four bucket
//! boundaries, refreshed in the background ([`refresh_board`]). A position's current score placed against the
//! boundaries gives exactly its bucket in the queue as of the board's offset.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::mpsc::{Sender, UnboundedReceiver, UnboundedSender, unbounded_channel};
use vigil_engine::Engine;
use vigil_engine::account::AdlEntry;
use vigil_model::liquidation::{adl_bucket, adl_order};
use vigil_model::{MarginMode, Offset, Rejection};

use crate::pipeline::ShardJob;

/// One shard's part: its index, the offset of the cut, its scored positions with their symbols.
pub type AdlReply = (usize, Offset, Result<Vec<(String, AdlEntry)>, Rejection>);

/// The ADL question for every shard: the positions of one symbol, or of every perpetual and future.
pub struct AdlJob {
    pub symbol: Option<String>,
    pub reply: UnboundedSender<AdlReply>,
}

impl ShardJob for AdlJob {
    fn run(&self, shard: usize, at: Offset, engine: &Engine) {
        let part = engine
            .adl_entries(self.symbol.as_deref())
            .map(|entries| entries.into_iter().map(|e| (engine.market().name(e.slot).to_owned(), e)).collect());
        let _ = self.reply.send((shard, at, part));
    }
}

/// Why the queue could not be gathered.
#[derive(Debug)]
pub enum AdlError {
    /// The symbol is unknown or not a perpetual or future (every shard refuses alike).
    Refused(Rejection),
    /// The node is stopping.
    Stopping,
}

/// Scores every position at one offset across `shards` shards: the offset and the entries, in no order.
pub async fn gather(
    jobs: &Sender<Arc<dyn ShardJob>>,
    shards: usize,
    symbol: Option<String>,
) -> Result<(Offset, Vec<(String, AdlEntry)>), AdlError> {
    let (job, replies) = adl_job(symbol);
    jobs.send(job).await.map_err(|_| AdlError::Stopping)?;
    collect(replies, shards).await
}

/// The ADL job for every shard of a node, and where their parts arrive.
pub fn adl_job(symbol: Option<String>) -> (Arc<dyn ShardJob>, UnboundedReceiver<AdlReply>) {
    let (reply, replies) = unbounded_channel();
    (Arc::new(AdlJob { symbol, reply }), replies)
}

/// Waits for the `shards` parts of an ADL job: the offset and the entries, in no order.
pub async fn collect(
    mut replies: UnboundedReceiver<AdlReply>,
    shards: usize,
) -> Result<(Offset, Vec<(String, AdlEntry)>), AdlError> {
    let mut entries = Vec::new();
    let mut cut = Offset(0);
    for _ in 0..shards {
        let Some((_, at, part)) = replies.recv().await else { return Err(AdlError::Stopping) };
        debug_assert!(cut == Offset(0) || cut == at, "invariant: the shards answer one job at one offset");
        cut = at;
        entries.extend(part.map_err(AdlError::Refused)?);
    }
    Ok((cut, entries))
}

/// Orders entries as the queue does: highest score first, equal scores by account id.
pub fn sort_queue(entries: &mut [(String, AdlEntry)]) {
    entries.sort_by(|a, b| adl_order((a.1.score, &a.1.account), (b.1.score, &b.1.account)));
}

/// The queue of one side of one symbol as JSON: its offset and length, then the first `limit` positions with their
/// rank (from 1) and bucket. `entries` hold that symbol's positions of both sides, in no order.
pub fn queue_json(
    symbol: &str,
    long: bool,
    offset: Offset,
    mut entries: Vec<(String, AdlEntry)>,
    limit: usize,
) -> String {
    entries.retain(|(_, e)| (e.qty.0 > 0) == long);
    sort_queue(&mut entries);
    let len = entries.len();
    render_queue(symbol, long, offset, &entries, len, limit)
}

/// One side's queue as JSON from its first positions in the queue's order (`sorted`, at least the first `limit`)
/// and the side's length: what partitions' parts merge into (`cluster::stress`).
pub fn render_queue(
    symbol: &str,
    long: bool,
    offset: Offset,
    entries: &[(String, AdlEntry)],
    len: usize,
    limit: usize,
) -> String {
    let mut s = String::with_capacity(128 + 200 * limit.min(len));
    s.push_str("{\"symbol\":");
    s.push_str(&serde_json::Value::from(symbol).to_string());
    s.push_str(&format!(",\"side\":\"{}\",\"offset\":{},\"positions\":{len},\"queue\":[", side(long), offset.0));
    for (rank, (_, e)) in entries.iter().take(limit).enumerate() {
        if rank > 0 {
            s.push(',');
        }
        let mode = match e.mode {
            MarginMode::Cross => "cross",
            MarginMode::Isolated => "isolated",
        };
        s.push_str(&format!(
            "{{\"rank\":{},\"bucket\":{},\"account\":{},\"score\":{},\"qty\":\"{}\",\"unrealized_pnl\":\"{}\",\
             \"unit_equity\":\"{}\",\"margin_mode\":\"{mode}\"}}",
            rank + 1,
            adl_bucket(rank, len),
            serde_json::Value::from(&*e.account),
            serde_json::Value::from(e.score),
            e.qty,
            e.unrealized_pnl,
            e.unit_equity,
        ));
    }
    s.push_str("]}");
    s
}

fn side(long: bool) -> &'static str {
    if long { "long" } else { "short" }
}

/// A queue's key: the symbol and the side (true: longs).
type QueueKey = (String, bool);

/// One queue's bucket boundaries: its length and the entries at ranks ⌈k·len/5⌉, k = 1..4 (where they exist).
#[derive(Clone, Debug, Default, PartialEq)]
struct Bounds {
    len: usize,
    starts: Vec<(f64, Box<str>)>,
}

/// The bucket boundaries of every queue as of one offset.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Board {
    pub offset: Offset,
    queues: HashMap<QueueKey, Bounds>,
}

impl Board {
    /// The board of every queue in `entries` (all symbols, both sides, in no order) at `offset`.
    pub fn new(offset: Offset, entries: Vec<(String, AdlEntry)>) -> Self {
        let mut by_queue: HashMap<QueueKey, Vec<(f64, Box<str>)>> = HashMap::new();
        for (symbol, e) in entries {
            by_queue.entry((symbol, e.qty.0 > 0)).or_default().push((e.score, e.account));
        }
        let queues = by_queue
            .into_iter()
            .map(|(key, mut q)| {
                q.sort_by(|a, b| adl_order((a.0, &a.1), (b.0, &b.1)));
                let len = q.len();
                let starts =
                    (1..=4).map(|k| (k * len).div_ceil(5)).filter(|r| *r < len).map(|r| q[r].clone()).collect();
                (key, Bounds { len, starts })
            })
            .collect();
        Self { offset, queues }
    }

    /// The bucket of a position scored `score` in `account`, placed in its queue as of the board's offset; `None`
    /// when the board has no such queue (it was empty then) or the position is not in the queue (no score).
    pub fn bucket(&self, symbol: &str, long: bool, score: f64, account: &str) -> Option<u8> {
        let bounds = self.queues.get(&(symbol.to_owned(), long))?;
        let passed = bounds
            .starts
            .iter()
            .filter(|(s, a)| adl_order((score, account), (*s, a)) != std::cmp::Ordering::Less)
            .count();
        // A position at rank r passes the boundary at ⌈k·len/5⌉ exactly when ⌊5r/len⌋ ≥ k: `adl_bucket`'s count.
        Some(5 - passed as u8)
    }
}

/// Rebuilds the board every `every` while the node runs, when anything was sequenced since the last one.
pub async fn refresh_board(hub: Arc<crate::http::Hub>, every: std::time::Duration) {
    let mut shutdown = hub.shutdown_signal();
    let mut last = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Some((jobs, shards, sequenced)) = hub.jobs() else { continue };
        if last == Some(sequenced) {
            continue;
        }
        match gather(&jobs, shards, None).await {
            Ok((offset, entries)) => {
                hub.set_adl_board(Board::new(offset, entries));
                last = Some(sequenced);
            }
            Err(AdlError::Refused(e)) => tracing::warn!(error = %e.message, "the ADL board was refused"),
            Err(AdlError::Stopping) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::{Amount, Qty};

    fn entry(account: &str, score: f64, qty: i64) -> (String, AdlEntry) {
        let e = AdlEntry {
            account: account.into(),
            slot: Default::default(),
            score,
            qty: Qty(qty),
            unrealized_pnl: Amount::ZERO,
            unit_equity: Amount::ZERO,
            mode: MarginMode::Cross,
        };
        ("ETH".to_owned(), e)
    }

    #[test]
    fn the_board_gives_every_queued_position_its_bucket_in_the_queue() {
        // Proves the boundaries reproduce `adl_bucket(rank, len)` for every position of queues of every length
        // from 1 to 40, with tied scores (ordered by account id), and that the sides are separate queues.
        let mut rng = vigil_testkit::Rng::new(7);
        for len in 1..=40usize {
            let mut entries: Vec<(String, AdlEntry)> = (0..len)
                .map(|i| entry(&format!("a{i:03}"), (rng.below(8) as f64) - 3.0, 1 + rng.below(5) as i64))
                .collect();
            entries.push(entry("short", 100.0, -1));
            let board = Board::new(Offset(9), entries.clone());
            entries.retain(|(_, e)| e.qty.0 > 0);
            sort_queue(&mut entries);
            for (rank, (_, e)) in entries.iter().enumerate() {
                let got = board.bucket("ETH", true, e.score, &e.account);
                assert_eq!(got, Some(adl_bucket(rank, len)), "len {len}, rank {rank}");
            }
            assert_eq!(board.bucket("ETH", false, 100.0, "short"), Some(5));
            assert_eq!(board.bucket("BTC", true, 1.0, "x"), None);
        }
    }

    #[test]
    fn the_queue_is_ranked_highest_score_first_ties_by_account() {
        let entries = vec![entry("b", 1.0, 2), entry("a", 1.0, 1), entry("c", 3.0, 1), entry("s", 9.0, -1)];
        let json: serde_json::Value =
            serde_json::from_str(&queue_json("ETH", true, Offset(4), entries, 2)).expect("valid JSON");
        assert_eq!(json["positions"], 3);
        assert_eq!(json["offset"], 4);
        let accounts: Vec<&str> =
            json["queue"].as_array().unwrap().iter().map(|e| e["account"].as_str().unwrap()).collect();
        assert_eq!(accounts, vec!["c", "a"]);
        assert_eq!((json["queue"][0]["rank"].as_u64(), json["queue"][0]["bucket"].as_u64()), (Some(1), Some(5)));
        assert_eq!(json["queue"][1]["bucket"].as_u64(), Some(4));
    }
}
