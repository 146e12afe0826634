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
use vigil_engine::stress::{Request, ShardStress, merge_shards};
use vigil_model::Offset;

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

/// What a requester sends: the offset of the cut, and the stress request's JSON (as `POST /v1/stress` takes it).
#[derive(Serialize, Deserialize)]
struct Ask {
    at: u64,
    request: String,
}

/// A partition's answer.
#[derive(Serialize, Deserialize)]
enum Reply {
    /// The partition's accounts, merged over its node's shards, at `at`.
    Part {
        partition: String,
        at: u64,
        result: ShardStress,
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

/// Serves stress requests for `partition` until the connection ends: each is put into the sequencer at its offset.
pub async fn serve_stress(
    client: async_nats::Client,
    partition: Partition,
    shards: usize,
    jobs_at: mpsc::Sender<JobAt>,
    consumed: Arc<super::source::SourceStatus>,
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
        let (client, jobs_at, consumed) = (client.clone(), jobs_at.clone(), Arc::clone(&consumed));
        tokio::spawn(async move {
            let reply = answer(&message.payload, partition, shards, &jobs_at, &consumed).await;
            let body = serde_json::to_vec(&reply).unwrap_or_default();
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
) -> Reply {
    let refused = |code: &str, message: String| Reply::Refused { code: code.to_owned(), message };
    let ask: Ask = match serde_json::from_slice(payload) {
        Ok(a) => a,
        Err(e) => return refused("invalid_scenario", format!("a cluster stress request is {{at, request}}: {e}")),
    };
    let request = match crate::stress::parse_request(ask.request.as_bytes()) {
        Ok(r) => r,
        Err(e) => return refused(e.code, e.message),
    };
    let (job, replies) = crate::stress::stress_job(&request);
    let (scheduled, was) = oneshot::channel();
    if jobs_at.send(JobAt { at: Offset(ask.at), job, scheduled }).await.is_err() {
        return refused("shutting_down", "the node is stopping".into());
    }
    match was.await {
        Ok(true) => {}
        Ok(false) => return Reply::Passed { consumed: status.consumed.load(std::sync::atomic::Ordering::Relaxed) },
        Err(_) => return refused("shutting_down", "the node is stopping".into()),
    }
    match crate::stress::collect(replies, shards, &request).await {
        Ok(report) => Reply::Part { partition: partition.to_string(), at: report.offset.0, result: report.result },
        Err(NodeStressError::Refused(e)) => refused(e.code, e.message),
        Err(NodeStressError::Stopping) => refused("shutting_down", "the node is stopping".into()),
    }
}

/// How many times a request is asked again at the stream's new end when a partition had passed the offset.
const ATTEMPTS: usize = 10;

/// Runs a stress request over every partition at one offset and merges their parts. `body` is the request's JSON.
pub async fn run_cluster(url: &str, body: &str, request: &Request, timeout: Duration) -> anyhow::Result<Report> {
    let client = super::publish::connect(url).await?;
    let js = jetstream::new(client.clone());
    let what = format!("finding the stream {EVENTS_STREAM}");
    let stream = super::retry(&what, || js.get_stream(EVENTS_STREAM)).await?;
    for _ in 0..ATTEMPTS {
        let (at, partitions) = super::publish::last_close(&stream).await?;
        let partitions =
            partitions.with_context(|| format!("{EVENTS_STREAM} holds no closed window: nothing to stress"))?;
        let payload = serde_json::to_vec(&Ask { at: at.0, request: body.to_owned() })?;
        let asks = (0..partitions).map(|p| {
            let (client, payload) = (client.clone(), Bytes::from(payload.clone()));
            async move {
                let ask = async_nats::Request::new().payload(payload).timeout(Some(timeout));
                let answer = client
                    .send_request(stress_subject(p), ask)
                    .await
                    .map_err(|e| anyhow::anyhow!("asking partition {p}/{partitions} (is a node serving it?): {e}"))?;
                let reply: Reply = serde_json::from_slice(&answer.payload)
                    .with_context(|| format!("partition {p}/{partitions}'s answer"))?;
                Ok::<_, anyhow::Error>((p, reply))
            }
        });
        let replies = futures_util::future::join_all(asks).await;
        let mut parts = Vec::with_capacity(replies.len());
        let mut passed = false;
        for r in replies {
            match r? {
                (_, Reply::Part { result, at: got, .. }) => {
                    anyhow::ensure!(got == at.0, "invariant: a partition answered at {got}, asked at {}", at.0);
                    parts.push(result);
                }
                (p, Reply::Passed { consumed }) => {
                    tracing::info!(partition = p, consumed, at = at.0, "a partition had passed the cut; asking again");
                    passed = true;
                }
                (p, Reply::Refused { code, message }) => anyhow::bail!("partition {p}/{partitions}: {code}: {message}"),
            }
        }
        if passed {
            continue;
        }
        let result = merge_shards(parts, request.top);
        return Ok(Report { offset: at, request: request.clone(), result, fund: None });
    }
    anyhow::bail!("the stream kept moving past every cut ({ATTEMPTS} attempts): ask again when it is quieter")
}
