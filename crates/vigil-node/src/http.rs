//! The HTTP JSON API (docs/api.md), served by axum on the node's tokio runtime.
//!
//! ```text
//!  POST /v1/events ── parse (JSON array or JSON Lines) ──▶ sequencer (same queue as TCP) ──▶ durable + released
//!  GET  /v1/accounts/{id}, POST …/check, GET /v1/instruments ──▶ Checker: the owning shard answers between events
//!  GET  /v1/triggers, /v1/triggers/stream ◀── Hub: trigger history, appended by the output gate once durable
//! ```
//!
//! Handlers never touch engine state: reads are messages to the shard that owns it, writes go through the
//! sequencer. Every error is a JSON body `{"code", "message"}` with a stable code.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tokio::sync::{oneshot, watch};
use vigil_engine::market::{Entry, InstrumentKind, Market};
use vigil_model::{Event, LiquidationRecord, Offset, Reason, Rejection, RejectionRecord, Right, Trigger, parse_line};
use vigil_store::codec::{RECORD_RESERVE, encode_event, encode_rejected_input};

pub use crate::hub::{Hub, HubConfig, Node};
use crate::intake::{Ack, IngestBatch, Item, Refusal};
use crate::metrics as m;
use crate::pipeline::{Answer, Ask};
use crate::replay::LINE_BYTES_MAX;
use crate::wire::CheckAnswer;

impl Hub {
    fn authorize(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(token) = &self.token else { return Ok(()) };
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if token_matches(token, given) {
            Ok(())
        } else {
            Err(ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required"))
        }
    }

    fn node(&self) -> Result<&Node, ApiError> {
        self.node.get().ok_or_else(|| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", "the node is recovering; try again shortly")
        })
    }
}

/// Compares a presented token with the configured one in time independent of where they differ.
pub fn token_matches(expected: &str, given: &str) -> bool {
    let (a, b) = (expected.as_bytes(), given.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

/// An API error: the status, a stable code and a message.
pub struct ApiError {
    status: StatusCode,
    code: String,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: &str) -> Self {
        Self { status, code: code.to_owned(), message: message.to_owned() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = error(self.status, &self.code, &self.message);
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// A JSON error body with a stable code.
pub fn error(status: StatusCode, code: &str, message: &str) -> Response {
    let body =
        format!("{{\"code\":{},\"message\":{}}}", serde_json::Value::from(code), serde_json::Value::from(message));
    json(status, body)
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], body).into_response()
}

/// Why a request body is not a batch of events at all (as opposed to a batch with bad events in it).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("the body starts a JSON array that does not parse: {0}")]
    MalformedArray(String),
}

/// Parses a body of events: a JSON array of event objects, or JSON Lines (blank lines skipped). Each element is
/// an event or the rejection it earns, exactly as `vigil replay` would judge that line; only a body that starts
/// an array and is not valid JSON is refused as a whole.
pub fn parse_events(body: &[u8]) -> Result<Vec<Result<Event, Rejection>>, BodyError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first == Some(&b'[') {
        let elements: Vec<&serde_json::value::RawValue> =
            serde_json::from_slice(body).map_err(|e| BodyError::MalformedArray(e.to_string()))?;
        return Ok(elements.into_iter().map(|raw| parse_line(raw.get())).collect());
    }
    let mut out = Vec::new();
    for line in body.split(|b| *b == b'\n') {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        out.push(if line.len() > LINE_BYTES_MAX {
            Err(vigil_model::reject(Reason::InvalidEvent, format!("line longer than {LINE_BYTES_MAX} bytes")))
        } else {
            match std::str::from_utf8(line) {
                Ok(text) => parse_line(text),
                Err(e) => Err(vigil_model::reject(Reason::InvalidEvent, format!("line is not UTF-8: {e}"))),
            }
        });
    }
    Ok(out)
}

/// Turns parsed lines into sequencer items with their journal records. An event too large to journal becomes a
/// rejection like any other unreadable input.
pub fn to_items(parsed: Vec<Result<Event, Rejection>>) -> Vec<(Item, Vec<u8>)> {
    parsed
        .into_iter()
        .map(|p| {
            let mut record = Vec::with_capacity(RECORD_RESERVE);
            let item = match p {
                Ok(event) => match encode_event(&event, &mut record) {
                    Ok(()) => Item::Event(event),
                    Err(e) => {
                        record.clear();
                        Item::Invalid(vigil_model::reject(Reason::InvalidEvent, format!("event not encodable: {e}")))
                    }
                },
                Err(r) => Item::Invalid(r),
            };
            if let Item::Invalid(r) = &item {
                encode_rejected_input(r.reason.as_str(), &r.message, &mut record);
            }
            (item, record)
        })
        .collect()
}

type Shared = State<Arc<Hub>>;

/// The router. `body_bytes_max` bounds every request body; `concurrency_max` the requests handled at once.
pub fn router(hub: Arc<Hub>, body_bytes_max: usize, concurrency_max: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/status", get(status))
        .route("/v1/events", post(post_events))
        .route("/v1/accounts/{id}", get(get_account))
        .route("/v1/accounts/{id}/check", post(post_check))
        .route("/v1/checks", post(post_checks))
        .route("/v1/instruments", get(get_instruments))
        .route("/v1/triggers", get(get_triggers))
        .route("/v1/triggers/stream", get(stream_triggers))
        .route("/v1/insurance", get(get_insurance))
        .route("/v1/adl/{symbol}", get(get_adl))
        .route("/v1/stress", post(post_stress))
        .fallback(not_found)
        .layer(axum::middleware::map_response(json_errors))
        .layer(axum::middleware::from_fn(count_requests))
        .layer(DefaultBodyLimit::max(body_bytes_max))
        .layer(tower::limit::ConcurrencyLimitLayer::new(concurrency_max.max(1)))
        .with_state(hub)
}

/// Counts requests by route (the matched pattern, never the account in the path) and status, and times them.
async fn count_requests(
    path: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let started = Instant::now();
    let response = next.run(request).await;
    let route = path.as_ref().map_or("unmatched", |p| p.as_str());
    let (requests, seconds) = route_metrics(route, response.status().as_u16());
    seconds.record(started.elapsed().as_secs_f64());
    requests.increment(1);
    response
}

/// The handles of one route's metrics: its latency histogram, and a request counter per status seen.
struct RouteMetrics {
    seconds: metrics::Histogram,
    by_status: Vec<(u16, metrics::Counter)>,
}

/// A route's request counter for `status` and its latency histogram, registered on first use and kept (routes and
/// statuses are bounded sets): a request costs a map lookup, not a registry lookup with labels built as strings.
fn route_metrics(route: &str, status: u16) -> (metrics::Counter, metrics::Histogram) {
    static ROUTES: OnceLock<Mutex<std::collections::HashMap<Box<str>, RouteMetrics>>> = OnceLock::new();
    let mut routes = crate::lock(ROUTES.get_or_init(Default::default), "the route metrics");
    let entry = match routes.get_mut(route) {
        Some(e) => e,
        None => routes.entry(route.into()).or_insert_with(|| RouteMetrics {
            seconds: metrics::histogram!(m::HTTP_SECONDS, "route" => route.to_owned()),
            by_status: Vec::new(),
        }),
    };
    let counter = match entry.by_status.iter().find(|(s, _)| *s == status) {
        Some((_, c)) => c.clone(),
        None => {
            let c = metrics::counter!(m::HTTP_REQUESTS, "route" => route.to_owned(), "status" => status.to_string());
            entry.by_status.push((status, c.clone()));
            c
        }
    };
    (counter, entry.seconds.clone())
}

/// Gives the framework's own refusals (a body over the limit, a bad query string, a wrong method) the API's JSON
/// error shape, with a code by status.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    let is_json =
        response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_client_error() => "bad_request",
        _ => "internal",
    };
    let text = axum::body::to_bytes(response.into_body(), 4096).await.unwrap_or_default();
    let message = String::from_utf8_lossy(&text);
    error(status, code, message.trim())
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "no such route (see docs/api.md)")
}

async fn health() -> Response {
    json(StatusCode::OK, "{\"status\":\"up\"}".into())
}

async fn ready(State(hub): Shared) -> Response {
    if hub.ready() {
        json(StatusCode::OK, "{\"status\":\"ready\"}".into())
    } else {
        json(StatusCode::SERVICE_UNAVAILABLE, "{\"status\":\"recovering\"}".into())
    }
}

/// The Prometheus text exposition of every metric (docs/operations.md).
async fn metrics() -> Response {
    // Read at the scrape: CPU per check or per event over a short run needs both ends exact.
    static CPU: OnceLock<metrics::Gauge> = OnceLock::new();
    if let Some(seconds) = m::process_cpu_seconds() {
        CPU.get_or_init(|| metrics::gauge!(m::PROCESS_CPU)).set(seconds);
    }
    (StatusCode::OK, [(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4"))], m::render())
        .into_response()
}

async fn status(State(hub): Shared) -> Response {
    let node = match hub.node() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let checkpoints = crate::lock(&hub.checkpoints, "the checkpoint watermarks").clone();
    let triggers = crate::read(&hub.triggers, "the trigger history").len();
    let mut s = String::with_capacity(256);
    let _ = write!(
        s,
        "{{\"version\":\"{}\",\"uptime_secs\":{},\"ready\":true,\"sequenced\":{},\"durable\":{},\"released\":{},\
         \"triggers\":{},",
        env!("CARGO_PKG_VERSION"),
        hub.started.elapsed().as_secs(),
        node.checker.sequenced().0,
        node.durable.load(Ordering::Acquire),
        hub.released().0,
        triggers,
    );
    if let Some(source) = hub.source.get() {
        let _ = write!(
            s,
            "\"partition\":\"{}\",\"consumed\":{},\"stream_sequence\":{},\"lag_messages\":{},\
             \"fund_saved_sequence\":{},",
            source.partition,
            source.consumed.load(Ordering::Relaxed),
            source.stream_sequence.load(Ordering::Relaxed),
            source.lag_messages.load(Ordering::Relaxed),
            source.fund_saved_sequence.load(Ordering::Relaxed),
        );
    }
    s.push_str("\"shards\":[");
    for (shard, applied) in node.checker.applied().iter().enumerate() {
        let checkpoint = checkpoints.get(shard).map_or(0, |o| o.0);
        if shard > 0 {
            s.push(',');
        }
        let _ = write!(s, "{{\"shard\":{shard},\"applied\":{},\"checkpoint\":{checkpoint}}}", applied.0);
    }
    s.push_str("]}");
    json(StatusCode::OK, s)
}

async fn post_events(State(hub): Shared, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(r) = hub.authorize(&headers) {
        return r.into_response();
    }
    let node = match hub.node() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let parsed = match parse_events(&body) {
        Ok(p) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "malformed_body", &e.to_string()),
    };
    if parsed.is_empty() {
        return error(StatusCode::BAD_REQUEST, "empty_batch", "the body holds no events");
    }
    if parsed.len() > hub.events_max {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_events",
            &format!("{} events in one request; at most {}", parsed.len(), hub.events_max),
        );
    }
    let producer = match producer_headers(&headers) {
        Ok(p) => p,
        Err(msg) => return error(StatusCode::BAD_REQUEST, "invalid_producer", &msg),
    };
    let items = to_items(parsed);
    metrics::counter!(m::INGEST_EVENTS, "transport" => "http").increment(items.len() as u64);
    metrics::counter!(m::INGEST_BATCHES, "transport" => "http").increment(1);
    let (reply, durable) = oneshot::channel();
    let (report, rejections) = oneshot::channel();
    if node.ingest.send(IngestBatch { items, producer, reply, report: Some(report) }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is stopping");
    }
    let (first, last) = match durable.await {
        Ok(Ok(Ack { first, last, duplicate: false })) => (first, last),
        Ok(Ok(Ack { first, last, duplicate: true })) => {
            // A resend of a batch already journaled: nothing appended; its rejections were in the first answer.
            let s = format!("{{\"first\":{},\"last\":{},\"duplicate\":true,\"rejections\":null}}", first.0, last.0);
            return json(StatusCode::OK, s);
        }
        Ok(Err(Refusal::Sequence(e))) => return error(StatusCode::CONFLICT, e.code(), &e.to_string()),
        Ok(Err(Refusal::Source(e))) => return error(StatusCode::CONFLICT, "ingest_disabled", &e),
        Ok(Err(e @ Refusal::Journal(_))) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "journal_failure", &e.to_string());
        }
        Err(_) => {
            return error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "stopped before the batch was durable");
        }
    };
    // Durable: the offsets are promised. The rejections come once every shard has applied them.
    let rejections = rejections.await.unwrap_or_default();
    let mut s = format!("{{\"first\":{},\"last\":{},\"rejections\":[", first.0, last.0);
    push_list(&mut s, rejections.iter().map(RejectionRecord::to_json));
    s.push_str("]}");
    json(StatusCode::OK, s)
}

/// The producer headers of `POST /v1/events`: `Vigil-Producer` (the id) and `Vigil-Sequence` (the batch number),
/// both or neither.
fn producer_headers(headers: &HeaderMap) -> Result<Option<(String, u64)>, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        headers.get(name).map(|v| v.to_str().map_err(|_| format!("the {name} header is not text"))).transpose()
    };
    match (text("vigil-producer")?, text("vigil-sequence")?) {
        (None, None) => Ok(None),
        (Some(id), Some(seq)) => {
            let seq = seq
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("Vigil-Sequence must be a whole number from 1, got {seq:?}"))?;
            Ok(Some((id.to_owned(), seq)))
        }
        _ => Err("Vigil-Producer and Vigil-Sequence go together: send both or neither".to_owned()),
    }
}

fn push_list(s: &mut String, items: impl Iterator<Item = String>) {
    for (i, item) in items.enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&item);
    }
}

#[derive(Deserialize)]
struct ReadParams {
    min_offset: Option<u64>,
}

/// Sends a read to its shard and waits for the answer, the offset and the timeout.
async fn ask(hub: &Hub, ask: Ask, min_offset: Option<u64>) -> Result<Answer, ApiError> {
    let node = hub.node()?;
    let min = Offset(min_offset.unwrap_or(0));
    let sequenced = node.checker.sequenced();
    if min > sequenced {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "offset_not_sequenced",
            &format!("min_offset {} is beyond the last sequenced offset {}", min.0, sequenced.0),
        ));
    }
    match tokio::time::timeout(hub.query_timeout, node.checker.ask(ask, min)).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(_)) => Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the shard stopped")),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            &format!("offset {} not applied within {} ms", min.0, hub.query_timeout.as_millis()),
        )),
    }
}

fn valid_name(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || id.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_account",
            "an account is 1 to 64 bytes, no control characters",
        ));
    }
    Ok(())
}

/// In cluster mode, an account of another partition is refused with the partition that owns it.
fn served_here(hub: &Hub, id: &str) -> Result<(), ApiError> {
    match hub.partition() {
        Some(p) if !p.owns(id) => {
            Err(ApiError::new(StatusCode::MISDIRECTED_REQUEST, "wrong_partition", &p.refusal(id)))
        }
        _ => Ok(()),
    }
}

async fn get_account(State(hub): Shared, Path(id): Path<String>, Query(p): Query<ReadParams>) -> Response {
    if let Err(r) = valid_name(&id).and_then(|()| served_here(&hub, &id)) {
        return r.into_response();
    }
    match ask(&hub, Ask::Account(id.clone()), p.min_offset).await {
        Ok(Answer::Account(Some(view), scores)) => {
            // Each position's bucket: its score placed in its queue as of the last ADL board.
            let board = crate::read(&hub.adl_board, "the ADL board");
            let bucket = |i: usize| {
                let p = &view.positions[i];
                let long = p.qty.0 > 0;
                let (_, e) = scores.iter().find(|(symbol, e)| *symbol == p.symbol && e.mode == p.margin_mode)?;
                board.bucket(&p.symbol, long, e.score, &e.account)
            };
            json(StatusCode::OK, view.to_json_with_adl(bucket))
        }
        Ok(_) => error(StatusCode::NOT_FOUND, "unknown_account", &format!("no account {id:?}")),
        Err(r) => r.into_response(),
    }
}

async fn post_check(State(hub): Shared, Path(id): Path<String>, Query(p): Query<ReadParams>, body: Bytes) -> Response {
    if let Err(r) = valid_name(&id).and_then(|()| served_here(&hub, &id)) {
        return r.into_response();
    }
    let started = Instant::now();
    let fill = match check_fill(&id, &body) {
        Ok(f) => f,
        Err(r) => return error(StatusCode::BAD_REQUEST, r.reason.as_str(), &r.message),
    };
    match ask(&hub, Ask::Check(fill), p.min_offset).await {
        Ok(Answer::Check(Ok(outcome))) => {
            static CHECK_SECONDS: OnceLock<(metrics::Histogram, metrics::Counter)> = OnceLock::new();
            let (seconds, checks) = CHECK_SECONDS.get_or_init(|| {
                (metrics::histogram!(m::CHECK_SECONDS), metrics::counter!(m::CHECKS, "transport" => "http"))
            });
            seconds.record(started.elapsed().as_secs_f64());
            checks.increment(1);
            let a = &outcome.after;
            let reason = match &outcome.reason {
                Some(r) => serde_json::Value::from(r.reason.as_str()).to_string(),
                None => "null".into(),
            };
            json(
                StatusCode::OK,
                format!(
                    "{{\"allowed\":{},\"reason\":{reason},\"equity\":\"{}\",\"initial_margin\":\"{}\",\
                     \"maintenance_margin\":\"{}\",\"available\":\"{}\"}}",
                    outcome.allowed,
                    a.equity,
                    a.initial_margin,
                    a.maintenance_margin,
                    a.available()
                ),
            )
        }
        // The fill could not be a trade at all (unknown symbol, no mark price, settled instrument…).
        Ok(Answer::Check(Err(r))) => error(StatusCode::UNPROCESSABLE_ENTITY, r.reason.as_str(), &r.message),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "unexpected answer"),
        Err(r) => r.into_response(),
    }
}

/// Many checks in one request (`docs/api.md`): each as `POST /v1/accounts/{id}/check` answers it, in the body's
/// order, every shard visited once for its part (as a check frame on the wire).
async fn post_checks(State(hub): Shared, Query(p): Query<ReadParams>, body: Bytes) -> Response {
    let node = match hub.node() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let started = Instant::now();
    let checks = match check_fills(&body, hub.events_max) {
        Ok(c) => c,
        Err((status, r)) => return error(status, r.reason.as_str(), &r.message),
    };
    let refused = |r: Rejection| CheckAnswer::Refused { code: r.reason.as_str().to_owned(), message: r.message };
    let checks: Vec<_> = checks.into_iter().map(|c| c.map_err(refused)).collect();
    let n = checks.len() as u64;
    let visit = crate::tcp::CheckVisit {
        checker: &node.checker,
        query_timeout: hub.query_timeout,
        partition: hub.source.get().map(|s| s.partition),
    };
    let answers = crate::tcp::answer_checks(&visit, Offset(p.min_offset.unwrap_or(0)), checks).await;
    static BATCH: OnceLock<(metrics::Histogram, metrics::Counter)> = OnceLock::new();
    let (seconds, counted) = BATCH
        .get_or_init(|| (metrics::histogram!(m::CHECK_SECONDS), metrics::counter!(m::CHECKS, "transport" => "http")));
    let elapsed = started.elapsed().as_secs_f64();
    let mut out = String::with_capacity(answers.len() * 160 + 2);
    out.push('[');
    for (i, a) in answers.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match a {
            CheckAnswer::Answered { allowed, reason, equity, initial_margin, maintenance_margin, available } => {
                seconds.record(elapsed);
                let reason = reason.as_deref().map_or("null".into(), |r| serde_json::Value::from(r).to_string());
                let _ = write!(
                    out,
                    "{{\"allowed\":{allowed},\"reason\":{reason},\"equity\":\"{equity}\",\"initial_margin\":\"{initial_margin}\",\
                     \"maintenance_margin\":\"{maintenance_margin}\",\"available\":\"{available}\"}}"
                );
            }
            CheckAnswer::Refused { code, message } => {
                let _ = write!(
                    out,
                    "{{\"code\":{},\"message\":{}}}",
                    serde_json::Value::from(code.as_str()),
                    serde_json::Value::from(message.as_str())
                );
            }
        }
    }
    out.push(']');
    counted.increment(n);
    json(StatusCode::OK, out)
}

/// Runs a stress request (`docs/api.md`, "Stress tests") on every shard at one offset; one at a time.
async fn post_stress(State(hub): Shared, body: Bytes) -> Response {
    let request = match crate::stress::parse_request(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.code, &e.message),
    };
    let node = match hub.node() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    let Ok(_permit) = hub.stressing.try_acquire() else {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "stress_running",
            "a stress test is running (one at a time: each occupies every shard); retry when it is done",
        );
    };
    let started = Instant::now();
    match crate::stress::on_node(&node.jobs, node.checker.shards(), &request).await {
        Ok(mut report) => {
            report.fund = hub.fund_at(report.offset).await;
            m::record_stress(&report, started.elapsed());
            json(StatusCode::OK, report.to_text())
        }
        Err(crate::stress::NodeStressError::Refused(e)) => {
            let status =
                if e.code == "invalid_scenario" { StatusCode::BAD_REQUEST } else { StatusCode::UNPROCESSABLE_ENTITY };
            error(status, e.code, &e.message)
        }
        Err(crate::stress::NodeStressError::Stopping) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is stopping")
        }
    }
}

/// Runs `request` every `every` until the node stops, after any stress test already running; each report goes to
/// the metrics (`metrics::record_stress`), a refusal to the log.
pub async fn scheduled_stress(hub: Arc<Hub>, every: Duration, request: vigil_engine::stress::Request) {
    let mut shutdown = hub.shutdown.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        let Ok(node) = hub.node() else { continue };
        let Ok(_permit) = hub.stressing.acquire().await else { return };
        let started = Instant::now();
        match crate::stress::on_node(&node.jobs, node.checker.shards(), &request).await {
            Ok(report) => {
                m::record_stress(&report, started.elapsed());
                tracing::info!(
                    offset = report.offset.0,
                    ms = started.elapsed().as_millis() as u64,
                    "scheduled stress test"
                );
            }
            Err(crate::stress::NodeStressError::Refused(e)) => {
                tracing::warn!(error = %e, "the scheduled stress test was refused");
            }
            Err(crate::stress::NodeStressError::Stopping) => return,
        }
    }
}

/// Reads a check body `{symbol, side, qty, price, margin_mode?}` as the trade it would be, through the event
/// parser (same validation, same reasons).
pub fn check_fill(account: &str, body: &[u8]) -> Result<vigil_model::Fill, Rejection> {
    // A flat body is read in place; anything else (and every refusal) the full way below.
    if let Some(fill) = std::str::from_utf8(body).ok().and_then(|t| vigil_model::parse_flat_trade(t, Some(account))) {
        return Ok(fill);
    }
    check_fill_full(account, body)
}

/// [`check_fill`] through serde_json's `Value` only.
pub fn check_fill_full(account: &str, body: &[u8]) -> Result<vigil_model::Fill, Rejection> {
    let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(body)
        .map_err(|e| vigil_model::reject(Reason::InvalidEvent, format!("the body is not a JSON object: {e}")))?;
    check_object(account, object)
}

/// Reads a `POST /v1/checks` body: a JSON array of checks, each a check body with its `account`. The body as a
/// whole is refused only when it is not such an array (or holds more than `max`); each element that is no trade
/// gets its own refusal, in its place.
pub fn check_fills(
    body: &[u8],
    max: usize,
) -> Result<Vec<Result<vigil_model::Fill, Rejection>>, (StatusCode, Rejection)> {
    check_fills_with(body, max, true)
}

/// [`check_fills`] with each element read through serde_json's `Value` only.
pub fn check_fills_full(
    body: &[u8],
    max: usize,
) -> Result<Vec<Result<vigil_model::Fill, Rejection>>, (StatusCode, Rejection)> {
    check_fills_with(body, max, false)
}

fn check_fills_with(
    body: &[u8],
    max: usize,
    in_place: bool,
) -> Result<Vec<Result<vigil_model::Fill, Rejection>>, (StatusCode, Rejection)> {
    let bad = |m: String| (StatusCode::BAD_REQUEST, vigil_model::reject(Reason::InvalidEvent, m));
    let list: Vec<&serde_json::value::RawValue> =
        serde_json::from_slice(body).map_err(|e| bad(format!("the body is not a JSON array of checks: {e}")))?;
    if list.is_empty() {
        return Err(bad("the body holds no checks".into()));
    }
    if list.len() > max {
        let r =
            vigil_model::reject(Reason::InvalidEvent, format!("{} checks in one request; at most {max}", list.len()));
        return Err((StatusCode::PAYLOAD_TOO_LARGE, r));
    }
    let one = |i: usize, raw: &serde_json::value::RawValue| {
        // A flat element is read in place; anything else (and every refusal) the full way.
        if in_place && let Some(fill) = vigil_model::parse_flat_trade(raw.get(), None) {
            return Ok(fill);
        }
        let refuse = |m: String| vigil_model::reject(Reason::InvalidEvent, m);
        let Ok(serde_json::Value::Object(mut object)) = serde_json::from_str(raw.get()) else {
            return Err(refuse(format!("check {i} is not a JSON object")));
        };
        match object.remove("account") {
            Some(serde_json::Value::String(account)) => check_object(&account, object),
            Some(_) => Err(refuse(format!("check {i}: `account` must be a string"))),
            None => Err(refuse(format!("check {i}: missing field `account`"))),
        }
    };
    Ok(list.into_iter().enumerate().map(|(i, v)| one(i, v)).collect())
}

/// A check body's object, with the account it is for, as the trade it would be.
fn check_object(
    account: &str,
    mut object: serde_json::Map<String, serde_json::Value>,
) -> Result<vigil_model::Fill, Rejection> {
    for key in ["type", "account"] {
        if object.contains_key(key) {
            return Err(vigil_model::reject(Reason::InvalidEvent, format!("unknown field `{key}` in a check")));
        }
    }
    object.insert("type".into(), "trade".into());
    object.insert("account".into(), account.into());
    // The parsed object goes to the event parser as it is (no second pass through text).
    match vigil_model::parse_value(&serde_json::Value::Object(object))? {
        Event::Trade(fill) => Ok(fill),
        Event::Liquidation(_) => Err(vigil_model::reject(
            Reason::InvalidEvent,
            "a pre-trade check is not a liquidation fill: drop `liquidation`",
        )),
        _ => Err(vigil_model::reject(Reason::InvalidEvent, "not a trade")),
    }
}

async fn get_instruments(State(hub): Shared) -> Response {
    match ask(&hub, Ask::Market, None).await {
        Ok(Answer::Market(market)) => json(StatusCode::OK, instruments_json(&market)),
        Ok(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "unexpected answer"),
        Err(r) => r.into_response(),
    }
}

/// `{"quote", "assets": [{asset, haircut, price}], "instruments": [{symbol, kind, price, settled, tiers | option}]}`.
pub fn instruments_json(market: &Market) -> String {
    let mut assets = Vec::new();
    let mut instruments = Vec::new();
    let mut quote = String::new();
    let price = |slot| market.price(slot).map_or("null".into(), |p| format!("\"{p}\""));
    for slot in 0..market.slots() as u32 {
        let name = serde_json::Value::from(market.name(slot)).to_string();
        match market.entry(slot) {
            Some(Entry::Quote) => quote = name,
            Some(Entry::Asset { haircut }) => {
                assets.push(format!("{{\"asset\":{name},\"haircut\":\"{haircut}\",\"price\":{}}}", price(slot)))
            }
            Some(Entry::Instrument(i)) => {
                let mut s = format!("{{\"symbol\":{name},\"kind\":");
                match &i.kind {
                    InstrumentKind::Perp => s.push_str("\"perp\""),
                    InstrumentKind::Future => s.push_str("\"future\""),
                    InstrumentKind::Option { underlying, terms } => {
                        let right = match terms.right {
                            Right::Call => "call",
                            Right::Put => "put",
                        };
                        let m = &terms.margin;
                        let _ = write!(
                            s,
                            "\"option\",\"underlying\":{},\"right\":\"{right}\",\"strike\":\"{}\",\
                             \"margin\":{{\"im_max\":\"{}\",\"im_min\":\"{}\",\"mm\":\"{}\"}}",
                            serde_json::Value::from(market.name(*underlying)),
                            terms.strike,
                            m.im_max,
                            m.im_min,
                            m.mm
                        );
                    }
                }
                let _ = write!(s, ",\"price\":{},\"settled\":{}", price(slot), i.settled);
                if let Some(tiers) = &i.tiers {
                    s.push_str(",\"tiers\":[");
                    push_list(
                        &mut s,
                        tiers.tiers().iter().map(|t| {
                            let max = t.max_notional.map_or("null".into(), |m| format!("\"{m}\""));
                            format!("{{\"max_notional\":{max},\"imr\":\"{}\",\"mmr\":\"{}\"}}", t.imr, t.mmr)
                        }),
                    );
                    s.push(']');
                }
                s.push('}');
                instruments.push(s);
            }
            None => {}
        }
    }
    let mut s = format!("{{\"quote\":{quote},\"assets\":[");
    push_list(&mut s, assets.into_iter());
    s.push_str("],\"instruments\":[");
    push_list(&mut s, instruments.into_iter());
    s.push_str("]}");
    s
}

#[derive(Deserialize)]
struct PageParams {
    after: Option<u64>,
    limit: Option<usize>,
}

/// Most triggers in one page.
const PAGE_MAX: usize = 10_000;

async fn get_triggers(State(hub): Shared, Query(p): Query<PageParams>) -> Response {
    if let Err(r) = hub.node() {
        return r.into_response();
    }
    let after = p.after.unwrap_or(0);
    let limit = p.limit.unwrap_or(1000).clamp(1, PAGE_MAX);
    // Read the released offset before the list: everything at or below it is in the list by then.
    let through = hub.released().0;
    let (page, truncated) = hub.triggers_after(after, limit);
    let next_after = match page.last() {
        Some(t) if truncated => t.offset.0,
        Some(t) => t.offset.0.max(through),
        None => after.max(through),
    };
    let mut s = String::from("{\"triggers\":[");
    push_list(&mut s, page.iter().map(Trigger::to_json));
    let _ = write!(s, "],\"next_after\":{next_after},\"released\":{through}}}");
    json(StatusCode::OK, s)
}

#[derive(Deserialize)]
struct AdlParams {
    side: Option<String>,
    limit: Option<usize>,
}

/// The ADL queue of one side of a perpetual or future (docs/api.md), computed on every shard at one offset.
async fn get_adl(State(hub): Shared, Path(symbol): Path<String>, Query(p): Query<AdlParams>) -> Response {
    let long = match p.side.as_deref() {
        Some("long") => true,
        Some("short") => false,
        other => {
            let given = other.map_or("none".to_owned(), |s| format!("{s:?}"));
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_side",
                &format!("side must be \"long\" or \"short\" (given: {given})"),
            );
        }
    };
    let limit = p.limit.unwrap_or(100).clamp(1, PAGE_MAX);
    let node = match hub.node() {
        Ok(n) => n,
        Err(r) => return r.into_response(),
    };
    match crate::adl::gather(&node.jobs, node.checker.shards(), Some(symbol.clone())).await {
        Ok((offset, entries)) => json(StatusCode::OK, crate::adl::queue_json(&symbol, long, offset, entries, limit)),
        Err(crate::adl::AdlError::Refused(r)) => {
            let status = if r.reason == Reason::UnknownSymbol {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            error(status, r.reason.as_str(), &r.message)
        }
        Err(crate::adl::AdlError::Stopping) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "shutting_down", "the node is stopping")
        }
    }
}

/// The insurance fund and the liquidation fills (docs/api.md): the last `limit` fills, or with `after` the fills
/// after that offset, paged like triggers.
async fn get_insurance(State(hub): Shared, Query(p): Query<PageParams>) -> Response {
    if let Err(r) = hub.node() {
        return r.into_response();
    }
    let limit = p.limit.unwrap_or(100).clamp(1, PAGE_MAX);
    let (fund, through, page, truncated) = hub.insurance(p.after, limit);
    let next_after = match page.last() {
        Some(l) if truncated => l.offset.0,
        Some(l) => l.offset.0.max(through),
        None => p.after.unwrap_or(0).max(through),
    };
    let mut s = String::from("{\"insurance_fund\":");
    s.push_str(&vigil_model::view::fund_json(&fund));
    s.push_str(",\"liquidations\":[");
    push_list(&mut s, page.iter().map(LiquidationRecord::to_json));
    let _ = write!(s, "],\"next_after\":{next_after},\"offset\":{through}}}");
    json(StatusCode::OK, s)
}

/// State of one live stream: the last offset sent, and events ready to send.
struct StreamState {
    hub: Arc<Hub>,
    after: u64,
    ready: std::collections::VecDeque<SseEvent>,
    released: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
}

/// One SSE event per offset: `id` the offset, `event: triggers`, `data` a JSON array of that offset's triggers.
fn offset_events(triggers: &[Trigger]) -> Vec<(u64, SseEvent)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < triggers.len() {
        let offset = triggers[i].offset.0;
        let mut j = i;
        let mut data = String::from("[");
        while j < triggers.len() && triggers[j].offset.0 == offset {
            if j > i {
                data.push(',');
            }
            data.push_str(&triggers[j].to_json());
            j += 1;
        }
        data.push(']');
        out.push((offset, SseEvent::default().id(offset.to_string()).event("triggers").data(data)));
        i = j;
    }
    out
}

async fn stream_triggers(State(hub): Shared, headers: HeaderMap, Query(p): Query<PageParams>) -> Response {
    if let Err(r) = hub.node() {
        return r.into_response();
    }
    // A reconnecting EventSource sends the last id it saw; it wins over the query.
    let last_event_id = headers.get("last-event-id").and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse().ok());
    let after = last_event_id.or(p.after).unwrap_or(0);
    let state = StreamState {
        released: hub.released.subscribe(),
        shutdown: hub.shutdown.subscribe(),
        hub,
        after,
        ready: Default::default(),
    };
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(e) = st.ready.pop_front() {
                return Some((Ok::<_, std::convert::Infallible>(e), st));
            }
            if *st.shutdown.borrow() {
                return None;
            }
            // Mark the value seen before reading the list, so a release after the read wakes the wait below.
            st.released.borrow_and_update();
            let (page, _) = st.hub.triggers_after(st.after, 1000);
            if let Some(last) = page.last() {
                st.after = last.offset.0;
                st.ready.extend(offset_events(&page).into_iter().map(|(_, e)| e));
                continue;
            }
            tokio::select! {
                changed = st.released.changed() => if changed.is_err() { return None },
                _ = st.shutdown.changed() => {}
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::{Amount, TriggerKind};

    fn trigger(offset: u64, account: &str) -> Trigger {
        Trigger {
            offset: Offset(offset),
            account: account.into(),
            symbol: None,
            kind: TriggerKind::Liquidate,
            equity: Amount::ZERO,
            maintenance_margin: Amount::ZERO,
            uncovered: None,
        }
    }

    #[test]
    fn bodies_parse_as_arrays_or_lines_and_bad_lines_become_rejections() {
        let lines = b"{\"type\":\"asset\",\"asset\":\"BTC\"}\n\n  \nnot json\n{\"type\":\"price\",\"symbol\":\"BTC\",\"price\":\"1\"}";
        let parsed = parse_events(lines).unwrap();
        assert_eq!(parsed.len(), 3);
        assert!(parsed[0].is_ok() && parsed[2].is_ok());
        assert_eq!(parsed[1].as_ref().unwrap_err().reason, Reason::InvalidEvent);
        let array = br#" [{"type":"asset","asset":"BTC"}, 7, {"type":"price","symbol":"BTC","price":"0.123456789"}]"#;
        let parsed = parse_events(array).unwrap();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[1].as_ref().unwrap_err().reason, Reason::InvalidEvent);
        assert_eq!(parsed[2].as_ref().unwrap_err().reason, Reason::InvalidNumber);
        assert!(matches!(parse_events(b"[{\"type\":"), Err(BodyError::MalformedArray(_))));
        assert!(parse_events(b"\xff\xfe").unwrap()[0].is_err());
        // Every rejected line still gets a journal record (it takes an offset).
        let items = to_items(parse_events(b"x\ny").unwrap());
        assert!(items.iter().all(|(i, r)| matches!(i, Item::Invalid(_)) && r[0] == vigil_store::codec::REJECTED_INPUT));
    }

    #[test]
    fn check_bodies_are_read_as_trades() {
        let fill = check_fill("a", br#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#).unwrap();
        assert_eq!((fill.account.as_str(), fill.symbol.as_str()), ("a", "ETH"));
        let bad = check_fill("a", br#"{"symbol":"ETH","side":"buy","qty":"-1","price":"3000"}"#).unwrap_err();
        assert_eq!(bad.reason, Reason::InvalidNumber);
        assert_eq!(check_fill("a", b"[1]").unwrap_err().reason, Reason::InvalidEvent);
        let typed = br#"{"type":"deposit","symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#;
        assert_eq!(check_fill("a", typed).unwrap_err().reason, Reason::InvalidEvent);
    }

    #[test]
    fn trigger_pages_never_split_an_offset() {
        let hub = Hub::new(HubConfig { token: None, query_timeout: Duration::from_secs(1), events_max: 10 });
        hub.publish(
            vec![trigger(3, "a"), trigger(3, "b"), trigger(5, "a"), trigger(9, "a"), trigger(9, "b")],
            Offset(9),
        );
        let (page, more) = hub.triggers_after(0, 2);
        assert_eq!((page.len(), more), (2, true));
        let (page, more) = hub.triggers_after(3, 2);
        assert_eq!((page.iter().map(|t| t.offset.0).collect::<Vec<_>>(), more), (vec![5], true));
        let (page, more) = hub.triggers_after(5, 1);
        assert_eq!((page.len(), more), (2, false), "one offset alone is sent whole");
        assert_eq!(hub.triggers_after(9, 10).0.len(), 0);
        assert!(token_matches("secret", "secret"));
        assert!(!token_matches("secret", "secreT") && !token_matches("secret", "") && !token_matches("s", "secret"));
    }
}
