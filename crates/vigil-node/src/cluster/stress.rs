//! Stress tests across partitions: `vigil stress --cluster nats://…` asks one replica of every partition (core NATS
//! request-reply, a queue group per partition) to compute its part **at one offset** — the last offset of the
//! stream's last closed window when asked — and merges the parts into one report, as a node merges its shards'.
//!
//! A node computes its part when its sequencer reaches exactly that offset (every window's last offset is one it
//! stops at). A node already past it answers `passed`, and the requester asks again at the stream's new end.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use axum::body::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use vigil_engine::account::AdlEntry;
use vigil_engine::stress::{Request, ShardStress, merge_shards};
use vigil_model::Offset;
use vigil_model::liquidation::InsuranceFund;

use super::{EVENTS_STREAM, Partition};
use crate::pipeline::ShardJob;
use crate::stress::{NodeStressError, Report};

/// The subject partition `index`'s nodes answer stress requests on.
pub fn stress_subject(index: u32) -> String {
    format!("vigil.stress.p{index}")
}

/// A job to put into the shards' rings when the sequencer is exactly at `at`; `scheduled` says whether it was
/// (`false`: the sequencer was already past `at`).
pub struct JobAt {
    pub at: Offset,
    pub job: Arc<dyn ShardJob>,
    pub scheduled: oneshot::Sender<bool>,
}

/// What is asked of every partition.
#[derive(Clone, Serialize, Deserialize)]
enum Question {
    /// A stress request's JSON (as `POST /v1/stress` takes it).
    Stress { request: String },
    /// The first `limit` positions of one side of one symbol's ADL queue, and the side's length.
    Adl { symbol: String, long: bool, limit: usize },
}

/// What a requester sends: the offset of the cut, and the question.
#[derive(Serialize, Deserialize)]
struct Ask {
    at: u64,
    question: Question,
}

/// A partition's answer.
#[derive(Serialize, Deserialize)]
enum Reply {
    /// The partition's accounts, merged over its node's shards, at `at`.
    Part {
        partition: String,
        at: u64,
        result: ShardStress,
        /// The venue's insurance fund at `at`, as this node folds it (`None`: the fold did not reach `at` in time).
        fund: Option<InsuranceFund>,
    },
    /// The partition's part of an ADL queue at `at`: its first positions in the queue's order, and how many it has.
    Adl {
        at: u64,
        len: usize,
        top: Vec<(String, AdlEntry)>,
    },
    /// The node had already applied events beyond `at`: ask again at a later offset.
    Passed {
        consumed: u64,
    },
    Refused {
        code: String,
        message: String,
    },
}

/// A request or a reply on the wire: the codec's version byte, then bincode (exact: an ADL score is an `f64`, and
/// a text round trip could move its last bit and the queue's order with it).
fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let mut body = Vec::new();
    // These types always encode: the codec's only failure is on decode.
    let _ = vigil_store::codec::encode_value(value, &mut body);
    if let Some(version) = body.first_mut() {
        *version = vigil_store::codec::CODEC_VERSION;
    }
    body
}

/// Serves stress requests for `partition` until the connection ends: each is put into the sequencer at its offset.
pub async fn serve_stress(
    client: async_nats::Client,
    partition: Partition,
    shards: usize,
    jobs_at: mpsc::Sender<JobAt>,
    consumed: Arc<super::source::SourceStatus>,
    hub: Arc<crate::hub::Hub>,
) {
    let subject = stress_subject(partition.index);
    let mut requests = match client.queue_subscribe(subject.clone(), format!("vigil-stress-p{}", partition.index)).await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, subject, "cannot serve cluster stress requests");
            return;
        }
    };
    while let Some(message) = requests.next().await {
        let Some(reply_to) = message.reply.clone() else { continue };
        let (client, jobs_at, consumed, hub) =
            (client.clone(), jobs_at.clone(), Arc::clone(&consumed), Arc::clone(&hub));
        tokio::spawn(async move {
            let reply = answer(&message.payload, partition, shards, &jobs_at, &consumed, &hub).await;
            let body = encode(&reply);
            if let Err(e) = client.publish(reply_to, Bytes::from(body)).await {
                tracing::warn!(error = %e, "answering a cluster stress request");
            }
        });
    }
}

async fn answer(
    payload: &[u8],
    partition: Partition,
    shards: usize,
    jobs_at: &mpsc::Sender<JobAt>,
    status: &super::source::SourceStatus,
    hub: &crate::hub::Hub,
) -> Reply {
    let refused = |code: &str, message: String| Reply::Refused { code: code.to_owned(), message };
    let ask: Ask = match vigil_store::codec::decode_untrusted(payload) {
        Ok(a) => a,
        Err(e) => return refused("invalid_request", format!("a cluster request is {{at, question}}: {e}")),
    };
    let stopping = || refused("shutting_down", "the node is stopping".into());
    let passed = || Reply::Passed { consumed: status.consumed.load(std::sync::atomic::Ordering::Relaxed) };
    // Puts `job` into the rings at the asked offset: `Some(false)` if the node is past it, `None` if stopping.
    let schedule = |job: Arc<dyn ShardJob>| async move {
        let (scheduled, was) = oneshot::channel();
        jobs_at.send(JobAt { at: Offset(ask.at), job, scheduled }).await.ok()?;
        was.await.ok()
    };
    match ask.question {
        Question::Stress { request } => {
            let request = match crate::stress::parse_request(request.as_bytes()) {
                Ok(r) => r,
                Err(e) => return refused(e.code, e.message),
            };
            let (job, replies) = crate::stress::stress_job(&request);
            match schedule(job).await {
                Some(true) => {}
                Some(false) => return passed(),
                None => return stopping(),
            }
            match crate::stress::collect(replies, shards, &request).await {
                Ok(report) => {
                    let fund = hub.fund_at(report.offset).await;
                    Reply::Part { partition: partition.to_string(), at: report.offset.0, result: report.result, fund }
                }
                Err(NodeStressError::Refused(e)) => refused(e.code, e.message),
                Err(NodeStressError::Stopping) => stopping(),
            }
        }
        Question::Adl { symbol, long, limit } => {
            let (job, replies) = crate::adl::adl_job(Some(symbol));
            match schedule(job).await {
                Some(true) => {}
                Some(false) => return passed(),
                None => return stopping(),
            }
            match crate::adl::collect(replies, shards).await {
                Ok((at, mut entries)) => {
                    entries.retain(|(_, e)| (e.qty.0 > 0) == long);
                    crate::adl::sort_queue(&mut entries);
                    let len = entries.len();
                    entries.truncate(limit);
                    Reply::Adl { at: at.0, len, top: entries }
                }
                Err(crate::adl::AdlError::Refused(r)) => refused(r.reason.as_str(), r.message),
                Err(crate::adl::AdlError::Stopping) => stopping(),
            }
        }
    }
}

/// How many times a request is asked again at the stream's new end when a partition had passed the offset.
const ATTEMPTS: usize = 10;

/// Asks every partition `question` at the stream's last closed window (again at its new end while a partition had
/// passed it): the offset of the cut and every partition's reply.
async fn scatter(url: &str, question: Question, timeout: Duration) -> anyhow::Result<(Offset, Vec<Reply>)> {
    let client = super::publish::connect(url).await?;
    let js = jetstream::new(client.clone());
    let what = format!("finding the stream {EVENTS_STREAM}");
    let stream = super::retry(&what, || js.get_stream(EVENTS_STREAM)).await?;
    for _ in 0..ATTEMPTS {
        let (at, partitions) = super::publish::last_close(&stream).await?;
        let partitions =
            partitions.with_context(|| format!("{EVENTS_STREAM} holds no closed window: nothing to ask about"))?;
        let payload = encode(&Ask { at: at.0, question: question.clone() });
        let asks = (0..partitions).map(|p| {
            let (client, payload) = (client.clone(), Bytes::from(payload.clone()));
            async move {
                let ask = async_nats::Request::new().payload(payload).timeout(Some(timeout));
                let answer = client
                    .send_request(stress_subject(p), ask)
                    .await
                    .map_err(|e| anyhow::anyhow!("asking partition {p}/{partitions} (is a node serving it?): {e}"))?;
                let reply: Reply = vigil_store::codec::decode_untrusted(&answer.payload)
                    .with_context(|| format!("partition {p}/{partitions}'s answer"))?;
                Ok::<_, anyhow::Error>((p, reply))
            }
        });
        let mut replies = Vec::with_capacity(partitions as usize);
        let mut passed = false;
        for r in futures_util::future::join_all(asks).await {
            match r? {
                (p, Reply::Passed { consumed }) => {
                    tracing::info!(partition = p, consumed, at = at.0, "a partition had passed the cut; asking again");
                    passed = true;
                }
                (p, Reply::Refused { code, message }) => anyhow::bail!("partition {p}/{partitions}: {code}: {message}"),
                (p, reply @ (Reply::Part { at: got, .. } | Reply::Adl { at: got, .. })) => {
                    anyhow::ensure!(got == at.0, "invariant: partition {p} answered at {got}, asked at {}", at.0);
                    replies.push(reply);
                }
            }
        }
        if !passed {
            return Ok((at, replies));
        }
    }
    anyhow::bail!("the stream kept moving past every cut ({ATTEMPTS} attempts): ask again when it is quieter")
}

/// Runs a stress request over every partition at one offset and merges their parts. `body` is the request's JSON.
pub async fn run_cluster(url: &str, body: &str, request: &Request, timeout: Duration) -> anyhow::Result<Report> {
    let (at, replies) = scatter(url, Question::Stress { request: body.to_owned() }, timeout).await?;
    let mut parts = Vec::with_capacity(replies.len());
    let mut funds = Vec::with_capacity(replies.len());
    for r in replies {
        if let Reply::Part { result, fund, .. } = r {
            parts.push(result);
            funds.push(fund);
        }
    }
    // Every node folds the same stream: the partitions' funds at one offset agree (a fold that did not reach the
    // cut in time leaves the fund out, as a node's report does).
    let fund = match funds.split_first() {
        Some((first, rest)) if rest.iter().all(|f| f == first) => *first,
        _ => anyhow::bail!("invariant: the partitions' folds of the insurance fund differ at {}: {funds:?}", at.0),
    };
    let result = merge_shards(parts, request.top);
    Ok(Report { offset: at, request: request.clone(), result, fund })
}

/// One side of `symbol`'s ADL queue over every partition at one offset, as `GET /v1/adl/{symbol}` shows a node's:
/// the partitions' first `limit` positions merged in the queue's order, ranked and bucketed over the whole side.
pub async fn adl_cluster(
    url: &str,
    symbol: &str,
    long: bool,
    limit: usize,
    timeout: Duration,
) -> anyhow::Result<String> {
    let question = Question::Adl { symbol: symbol.to_owned(), long, limit };
    let (at, replies) = scatter(url, question, timeout).await?;
    let mut len = 0;
    let mut entries = Vec::new();
    for r in replies {
        if let Reply::Adl { len: n, top, .. } = r {
            len += n;
            entries.extend(top);
        }
    }
    crate::adl::sort_queue(&mut entries);
    entries.truncate(limit);
    Ok(crate::adl::render_queue(symbol, long, at, &entries, len, limit))
}
