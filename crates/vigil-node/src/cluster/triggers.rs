//! Triggers to `VIGIL_TRIGGERS`: every replica of a partition publishes the triggers it releases, each with
//! `Nats-Msg-Id` = the trigger's identity, so the stream stores each once however many replicas publish it
//! (within the stream's duplicate window: docs/cluster.md).

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use axum::body::Bytes;
use tokio::sync::mpsc;
use vigil_model::{Trigger, TriggerKind};

use super::{TRIGGER_OFFSET_HEADER, TRIGGER_SUBJECTS, TRIGGERS_STREAM, trigger_subject};
use crate::metrics as m;

/// The identity of a trigger, its message id: `offset:account:symbol:kind` (an empty symbol for the cross account).
pub fn trigger_id(t: &Trigger) -> String {
    format!("{}:{}:{}:{}", t.offset.0, t.account, t.symbol.as_deref().unwrap_or(""), t.kind.as_str())
}

/// The triggers stream, created if missing.
pub async fn triggers_stream(
    js: &jetstream::Context,
    replicas: usize,
    duplicate_window: Duration,
) -> anyhow::Result<stream::Stream> {
    super::file_stream(js, TRIGGERS_STREAM, TRIGGER_SUBJECTS, replicas, duplicate_window).await
}

/// Triggers published before their acks are awaited: one round trip per round, not per trigger (one at a time, each
/// stored trigger cost about a millisecond on the 3-server R3 cluster: docs/performance.md).
const IN_FLIGHT_MAX: usize = 1024;

/// Publishes released triggers in order until `rx` closes, pipelined: a round sends up to [`IN_FLIGHT_MAX`] and then
/// awaits their acks. A failed round is sent again whole after a backoff (ids deduplicate what was stored): a trigger
/// is the node's promise, it waits, it is never dropped.
pub async fn publish_triggers(js: jetstream::Context, partition: u32, mut rx: mpsc::UnboundedReceiver<Vec<Trigger>>) {
    let subject = trigger_subject(partition);
    let label = format!("{partition}");
    let stored = metrics::counter!(m::CLUSTER_TRIGGERS, "outcome" => "stored", "partition" => label.clone());
    let duplicate = metrics::counter!(m::CLUSTER_TRIGGERS, "outcome" => "duplicate", "partition" => label.clone());
    let failed = metrics::counter!(m::CLUSTER_TRIGGER_FAILURES, "partition" => label);
    let mut queued: std::collections::VecDeque<Trigger> = std::collections::VecDeque::new();
    loop {
        if queued.is_empty() {
            match rx.recv().await {
                Some(batch) => queued.extend(batch),
                None => return,
            }
        }
        while let Ok(batch) = rx.try_recv() {
            queued.extend(batch);
        }
        // A `deleverage` trigger follows from the insurance fund, and a partition's fund covers only its own
        // accounts' fills (docs/cluster.md, "Limits"): it is not the venue's, so it is not published.
        queued.retain(|t| t.kind != TriggerKind::Deleverage);
        let round: Vec<(HeaderMap, Bytes)> = queued
            .drain(..queued.len().min(IN_FLIGHT_MAX))
            .map(|t| {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", trigger_id(&t).as_str());
                headers.insert(TRIGGER_OFFSET_HEADER, t.offset.0.to_string().as_str());
                (headers, Bytes::from(t.to_json()))
            })
            .collect();
        let mut backoff = Duration::from_millis(50);
        loop {
            match send_round(&js, &subject, &round).await {
                Ok(duplicates) => {
                    duplicate.increment(duplicates);
                    stored.increment(round.len() as u64 - duplicates);
                    break;
                }
                Err(e) => {
                    failed.increment(1);
                    tracing::warn!(error = %e, triggers = round.len(), "publishing triggers failed; sending again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        }
    }
}

/// Sends a round and awaits every ack: how many the stream already held.
async fn send_round(js: &jetstream::Context, subject: &str, round: &[(HeaderMap, Bytes)]) -> Result<u64, String> {
    let mut acks = Vec::with_capacity(round.len());
    for (headers, body) in round {
        let ack = js.publish_with_headers(subject.to_owned(), headers.clone(), body.clone()).await;
        acks.push(ack.map_err(|e| e.to_string())?);
    }
    let mut duplicates = 0;
    for ack in acks {
        duplicates += u64::from(ack.await.map_err(|e| e.to_string())?.duplicate);
    }
    Ok(duplicates)
}
