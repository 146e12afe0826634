//! The binary TCP listener's connections (docs/wire.md): length-prefixed frames read with bounds and a body
//! timeout, the auth frame, batches handed to the sequencer (answered once durable), and check frames answered by
//! the shards, in order.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use vigil_model::{Event, Fill, Offset, shard_of};
use vigil_store::codec::{RECORD_RESERVE, encode_event, encode_rejected_input};

use crate::http::token_matches;
use crate::intake::{Ack, IngestBatch, Item};
use crate::pipeline::Answer;
use crate::wire::{
    Batch, CheckAnswer, WIRE_AUTH, WIRE_CHECKS, ack_frame, auth_ok_frame, checks_frame, decode_batch, decode_checks,
    duplicate_ack_frame, error_frame,
};

/// How long the rest of a frame may take once its length has arrived (a stalled sender is cut off).
const FRAME_BODY_TIMEOUT: Duration = Duration::from_secs(30);

async fn read_frame(stream: &mut TcpStream, max: usize) -> std::io::Result<Option<Result<Vec<u8>, String>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > max {
        return Ok(Some(Err(format!("frame length {len} out of bounds (1..={max})"))));
    }
    let mut body = vec![0u8; len];
    match tokio::time::timeout(FRAME_BODY_TIMEOUT, stream.read_exact(&mut body)).await {
        Ok(r) => r?,
        Err(_) => return Ok(Some(Err(format!("frame body not received within {} s", FRAME_BODY_TIMEOUT.as_secs())))),
    };
    Ok(Some(Ok(body)))
}

/// What a connection needs from the node.
#[derive(Clone)]
pub(crate) struct Listener {
    pub(crate) ingest: mpsc::Sender<IngestBatch>,
    /// Check frames go to the shards through it.
    pub(crate) checker: crate::pipeline::Checker,
    pub(crate) query_timeout: Duration,
    pub(crate) checks: metrics::Counter,
    pub(crate) token: Option<Arc<str>>,
    pub(crate) frame_bytes_max: usize,
    pub(crate) events: metrics::Counter,
    pub(crate) batches: metrics::Counter,
    /// Cluster mode: the partition served; checks of other partitions' accounts are refused.
    pub(crate) partition: Option<crate::cluster::Partition>,
}

/// What answering many checks at once needs from the node (a check frame on the wire, `POST /v1/checks`).
pub(crate) struct CheckVisit<'a> {
    pub(crate) checker: &'a crate::pipeline::Checker,
    pub(crate) query_timeout: Duration,
    /// Cluster mode: the partition served; checks of other partitions' accounts are refused.
    pub(crate) partition: Option<crate::cluster::Partition>,
}

/// Answers many checks (a check frame, docs/wire.md, "Checks"; or `POST /v1/checks`): the same check as
/// `POST /v1/accounts/{id}/check`, each shard visited once for its part, the answers in the checks' order. A check
/// already refused (`Err`, a body element that is no trade) keeps its refusal in its place.
pub(crate) async fn answer_checks(
    node: &CheckVisit<'_>,
    min: Offset,
    checks: Vec<Result<Fill, CheckAnswer>>,
) -> Vec<CheckAnswer> {
    let refused =
        |code: &str, message: &str| CheckAnswer::Refused { code: code.to_owned(), message: message.to_owned() };
    let sequenced = node.checker.sequenced();
    if min > sequenced {
        let message = format!("min_offset {} is beyond the last sequenced offset {}", min.0, sequenced.0);
        return checks.iter().map(|_| refused("offset_not_sequenced", &message)).collect();
    }
    let shards = node.checker.shards();
    let mut answers: Vec<Option<CheckAnswer>> = vec![None; checks.len()];
    let mut parts: Vec<(Vec<usize>, Vec<Fill>)> = vec![(Vec::new(), Vec::new()); shards];
    for (i, check) in checks.into_iter().enumerate() {
        let fill = match check {
            Ok(fill) => fill,
            Err(answer) => {
                answers[i] = Some(answer);
                continue;
            }
        };
        // The binary form skips the JSON parser: the fill is held to a trade's rules, as the HTTP body is.
        let event = Event::Trade(fill);
        if let Err(r) = vigil_model::validate(&event) {
            answers[i] = Some(refused(r.reason.as_str(), &r.message));
            continue;
        }
        let Event::Trade(fill) = event else { continue };
        if let Some(p) = node.partition.filter(|p| !p.owns(&fill.account)) {
            answers[i] = Some(refused("wrong_partition", &p.refusal(&fill.account)));
            continue;
        }
        let shard = shard_of(&fill.account, shards);
        parts[shard].0.push(i);
        parts[shard].1.push(fill);
    }
    let asked: Vec<_> = parts
        .into_iter()
        .enumerate()
        .filter(|(_, (at, _))| !at.is_empty())
        .map(|(shard, (at, fills))| (at, node.checker.check_batch(shard, fills, min)))
        .collect();
    for (at, reply) in asked {
        let replies = match tokio::time::timeout(node.query_timeout, reply).await {
            Ok(Ok(Answer::Checks(replies))) => replies,
            Ok(_) => {
                at.iter().for_each(|i| answers[*i] = Some(refused("shutting_down", "the shard stopped")));
                continue;
            }
            Err(_) => {
                let message = format!("offset {} not applied within {} ms", min.0, node.query_timeout.as_millis());
                at.iter().for_each(|i| answers[*i] = Some(refused("timeout", &message)));
                continue;
            }
        };
        for (i, reply) in at.into_iter().zip(replies) {
            answers[i] = Some(match reply {
                Ok(outcome) => CheckAnswer::Answered {
                    allowed: outcome.allowed,
                    reason: outcome.reason.map(|r| r.reason.as_str().to_owned()),
                    equity: outcome.after.equity,
                    initial_margin: outcome.after.initial_margin,
                    maintenance_margin: outcome.after.maintenance_margin,
                    available: outcome.after.available(),
                },
                Err(r) => refused(r.reason.as_str(), &r.message),
            });
        }
    }
    answers.into_iter().map(|a| a.unwrap_or_else(|| refused("internal", "no answer"))).collect()
}

pub(crate) async fn connection(mut stream: TcpStream, node: Listener) {
    let _ = stream.set_nodelay(true);
    let mut authorized = node.token.is_none();
    loop {
        let body = match read_frame(&mut stream, node.frame_bytes_max).await {
            Ok(None) | Err(_) => return,
            Ok(Some(Err(msg))) => {
                let _ = stream.write_all(&error_frame(&msg)).await;
                return;
            }
            Ok(Some(Ok(b))) => b,
        };
        if body.first() == Some(&WIRE_AUTH) {
            let given = std::str::from_utf8(&body[1..]).unwrap_or("");
            let ok = node.token.as_deref().is_none_or(|t| token_matches(t, given));
            if !ok {
                let _ = stream.write_all(&error_frame("unauthorized: wrong token")).await;
                return;
            }
            authorized = true;
            if stream.write_all(&auth_ok_frame()).await.is_err() {
                return;
            }
            continue;
        }
        if !authorized {
            let _ = stream.write_all(&error_frame("unauthorized: this node requires an auth frame first")).await;
            return;
        }
        if body.first() == Some(&WIRE_CHECKS) {
            let frame = match decode_checks(&body) {
                Ok((min, fills)) => {
                    node.checks.increment(fills.len() as u64);
                    let visit = CheckVisit {
                        checker: &node.checker,
                        query_timeout: node.query_timeout,
                        partition: node.partition,
                    };
                    checks_frame(&answer_checks(&visit, min, fills.into_iter().map(Ok).collect()).await)
                }
                Err(e) => {
                    let _ = stream.write_all(&error_frame(&e.to_string())).await;
                    return;
                }
            };
            if stream.write_all(&frame).await.is_err() {
                return;
            }
            continue;
        }
        let Batch { producer, events } = match decode_batch(&body) {
            Ok(b) => b,
            Err(e) => {
                let _ = stream.write_all(&error_frame(&e.to_string())).await;
                return;
            }
        };
        let mut items = Vec::with_capacity(events.len());
        for event in events {
            let mut record = Vec::with_capacity(RECORD_RESERVE);
            // The binary form skips the JSON parser: hold each event to its rules. One that breaks them takes its
            // offset as a rejection, exactly as its JSON line would.
            if let Err(rejection) = vigil_model::validate(&event) {
                encode_rejected_input(rejection.reason.as_str(), &rejection.message, &mut record);
                items.push((Item::Invalid(rejection), record));
                continue;
            }
            if let Err(e) = encode_event(&event, &mut record) {
                let _ = stream.write_all(&error_frame(&e.to_string())).await;
                return;
            }
            items.push((Item::Event(event), record));
        }
        node.events.increment(items.len() as u64);
        node.batches.increment(1);
        let (tx, rx) = oneshot::channel();
        if node.ingest.send(IngestBatch { items, producer, reply: tx, report: None }).await.is_err() {
            let _ = stream.write_all(&error_frame("node shutting down")).await;
            return;
        }
        let frame = match rx.await {
            Ok(Ok(Ack { first, last, duplicate: false })) => ack_frame(first, last),
            Ok(Ok(Ack { first, last, duplicate: true })) => duplicate_ack_frame(first, last),
            Ok(Err(e)) => error_frame(&e.to_string()),
            Err(_) => error_frame("node stopped before the batch was durable"),
        };
        if stream.write_all(&frame).await.is_err() {
            return;
        }
    }
}
