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

/// Publishes released triggers in order until `rx` closes; a failed publish is retried (the trigger is the node's
/// promise: it waits, it is never dropped).
pub async fn publish_triggers(js: jetstream::Context, partition: u32, mut rx: mpsc::UnboundedReceiver<Vec<Trigger>>) {
    let subject = trigger_subject(partition);
    let label = format!("{partition}");
    let stored = metrics::counter!(m::CLUSTER_TRIGGERS, "outcome" => "stored", "partition" => label.clone());
    let duplicate = metrics::counter!(m::CLUSTER_TRIGGERS, "outcome" => "duplicate", "partition" => label.clone());
    let failed = metrics::counter!(m::CLUSTER_TRIGGER_FAILURES, "partition" => label);
    while let Some(batch) = rx.recv().await {
        // A `deleverage` trigger follows from the insurance fund, and a partition's fund covers only its own
        // accounts' fills (docs/cluster.md, "Limits"): it is not the venue's, so it is not published.
        for t in batch.into_iter().filter(|t| t.kind != TriggerKind::Deleverage) {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", trigger_id(&t).as_str());
            headers.insert(TRIGGER_OFFSET_HEADER, t.offset.0.to_string().as_str());
            let body = Bytes::from(t.to_json());
            let mut backoff = Duration::from_millis(50);
            loop {
                let sent = match js.publish_with_headers(subject.clone(), headers.clone(), body.clone()).await {
                    Ok(ack) => ack.await.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                match sent {
                    Ok(ack) if ack.duplicate => duplicate.increment(1),
                    Ok(_) => stored.increment(1),
                    Err(e) => {
                        failed.increment(1);
                        tracing::warn!(error = %e, trigger = %trigger_id(&t), "publishing a trigger failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
                break;
            }
        }
    }
}
