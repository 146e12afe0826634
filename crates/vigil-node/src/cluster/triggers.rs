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

/// The offset of the last trigger `VIGIL_TRIGGERS` holds on `subject` (0 if none).
pub async fn last_trigger_offset(js: &jetstream::Context, subject: &str) -> anyhow::Result<super::Offset> {
    let stream = js.get_stream(TRIGGERS_STREAM).await?;
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(m) => {
            Ok(super::Offset(m.headers.get(TRIGGER_OFFSET_HEADER).and_then(|v| v.as_str().parse().ok()).unwrap_or(0)))
        }
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(super::Offset(0)),
        Err(e) => Err(anyhow::anyhow!("reading the last stored trigger on {subject}: {e}")),
    }
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
/// awaits their acks. Those that failed are sent again after a backoff until stored (or found stored): a trigger is
/// the node's promise, it waits, it is never dropped.
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
        // A `deleverage` trigger follows from the insurance fund, and a partition's merge folds only its own
        // accounts' fills: the venue's fund, and its deleverage triggers, come from the fold over every
        // partition's coverage (`cluster::fund`), which publishes them.
        queued.retain(|t| t.kind != TriggerKind::Deleverage);
        let mut round: Vec<(HeaderMap, Bytes)> = queued
            .drain(..queued.len().min(IN_FLIGHT_MAX))
            .map(|t| {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", trigger_id(&t).as_str());
                headers.insert(TRIGGER_OFFSET_HEADER, t.offset.0.to_string().as_str());
                (headers, Bytes::from(t.to_json()))
            })
            .collect();
        // Those that fail are sent again (alone) after a backoff. "Duplicate message id is in process" (10158) is
        // another replica storing the same trigger at this moment: sent again, it is answered as a duplicate.
        let mut backoff = Duration::from_millis(20);
        while !round.is_empty() {
            let (duplicates, stored_now, failures, retry) = send_round(&js, &subject, round).await;
            duplicate.increment(duplicates);
            stored.increment(stored_now);
            failed.increment(failures);
            if !retry.is_empty() {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            round = retry;
        }
    }
}

/// Sends a round and awaits every ack: how many the stream already held, how many it stored, how many failed (not
/// counting another replica's store of the same id in process), and the messages to send again.
async fn send_round(
    js: &jetstream::Context,
    subject: &str,
    round: Vec<(HeaderMap, Bytes)>,
) -> (u64, u64, u64, Vec<(HeaderMap, Bytes)>) {
    let mut pending = Vec::with_capacity(round.len());
    for (headers, body) in &round {
        let sent = js.publish_with_headers(subject.to_owned(), headers.clone(), body.clone()).await;
        pending.push(async move {
            match sent {
                Ok(future) => future.await.map(|a| a.duplicate).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            }
        });
    }
    let (mut duplicates, mut stored, mut failed, mut retry) = (0, 0, 0, Vec::new());
    let mut first_error = None;
    for (result, message) in all_acks(pending).await.into_iter().zip(round) {
        match result {
            Ok(true) => duplicates += 1,
            Ok(false) => stored += 1,
            Err(e) => {
                if !e.contains("10158") {
                    failed += 1;
                    first_error.get_or_insert(e);
                }
                retry.push(message);
            }
        }
    }
    if let Some(error) = first_error {
        tracing::warn!(%error, failed, "publishing triggers failed; sending them again");
    }
    (duplicates, stored, failed, retry)
}

/// Awaits a round's acks together, in order. An ack's timeout starts when it is first polled, so awaiting them one
/// after another would wait a timeout per lost ack: a round lost to a leader election (1 024 acks that never come)
/// would take 1 024 × 5 s before any trigger was sent again. Together, the round waits one timeout.
async fn all_acks<T, F: std::future::Future<Output = T>>(pending: Vec<F>) -> Vec<T> {
    futures_util::future::join_all(pending).await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::all_acks;

    /// Acks that never come, each timing out as async-nats's do (the timer starts at the first poll): a round of
    /// them waits one timeout, not one per ack (tokio's paused clock: no wall-clock time is measured).
    #[tokio::test(start_paused = true)]
    async fn a_round_whose_acks_are_all_lost_waits_one_timeout() {
        let timeout = Duration::from_secs(5);
        let lost = (0..1024).map(|i| async move {
            let never = std::future::pending::<()>();
            tokio::time::timeout(timeout, never).await.map_err(|_| i)
        });
        let started = tokio::time::Instant::now();
        let results = all_acks(lost.collect()).await;
        assert_eq!(started.elapsed(), timeout);
        assert_eq!(results, (0..1024).map(Err).collect::<Vec<Result<(), i32>>>());
    }
}
