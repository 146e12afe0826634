//! `vigil load`: an open-loop load generator against a running node.
//!
//! ```text
//!  setup (reference data, deposits, opening trades) ── one TCP connection, flat out, not measured
//!  ingest: batches on a fixed schedule (or flat out) ── C TCP connections ──▶ ack latency from the *intended*
//!          send time, so a slow node is charged for the batches it delayed (no coordinated omission)
//!  checks: POST /v1/accounts/{id}/check on a fixed schedule over HTTP ──▶ latency from the intended time
//!  triggers: GET /v1/triggers/stream ──▶ latency from the intended send time of the batch holding the offset
//! ```
//!
//! Latencies go into HDR histograms (3 significant digits); the report gives p50/p99/p99.9/max.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use vigil_model::{Event, Offset, parse_line};

use crate::wire::Client;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// TCP ingest address.
    pub ingest: String,
    /// HTTP address (host:port), for checks and the trigger stream.
    pub http: String,
    pub token: Option<String>,
    /// Events per second after the setup; 0 = flat out.
    pub rate: u64,
    pub batch: usize,
    pub connections: usize,
    /// Pre-trade checks per second over HTTP (0 = none), for `checks_secs` seconds, alongside the ingest.
    pub checks_rate: u64,
    pub checks_secs: u64,
    /// Checks per frame over the binary TCP path (docs/wire.md, "Checks"), frames pipelined on one connection;
    /// 0 sends them over HTTP.
    pub checks_wire: usize,
    /// Checks per HTTP request, to `POST /v1/checks`; 0 or 1: one per request, to `POST /v1/accounts/{id}/check`.
    pub checks_batch: usize,
    /// Measure trigger latency through the live stream.
    pub triggers: bool,
    /// Print a progress line every second on standard error.
    pub progress: bool,
    /// Do not send the setup (the node already has it, from an earlier run with the same workload): a checks-only
    /// run then changes nothing on the node (no checkpoint competes with it).
    pub skip_setup: bool,
    /// The producer id the stream's batches carry (connection k sends as `{producer}-{k}`, batches numbered from
    /// 1), so that a batch resent after a lost ack is applied once; `None` picks one unique to this run.
    pub producer: Option<String>,
    /// How long a connection keeps reconnecting and resending its in-flight batch after the node went away (a
    /// crash, a restart) before the run fails.
    pub resend_for: Duration,
}

/// A latency summary in microseconds.
#[derive(Clone, Copy, Debug, Default)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    fn of(h: &Histogram<u64>) -> Self {
        Self {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

impl std::fmt::Display for Percentiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "p50 {} µs, p99 {} µs, p99.9 {} µs, max {} µs (n = {})",
            self.p50, self.p99, self.p999, self.max, self.count
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct LoadReport {
    pub events: u64,
    pub seconds: f64,
    pub batch_latency: Percentiles,
    pub checks: u64,
    pub check_errors: u64,
    pub checks_seconds: f64,
    pub check_latency: Percentiles,
    pub triggers: u64,
    pub trigger_latency: Percentiles,
    /// Batches sent again after the connection failed before their ack.
    pub resends: u64,
    /// Resends the node answered as duplicates (it had journaled the batch: nothing appended twice).
    pub duplicates: u64,
    /// CPU the node used over the run (its `process_cpu_seconds_total`, read before and after), in seconds.
    pub node_cpu: Option<f64>,
    /// CPU this generator used over the run, in seconds.
    pub own_cpu: Option<f64>,
    /// Checks (or check frames) sent more than 1 ms after their intended time: the generator fell behind.
    pub late_sends: u64,
    pub sends: u64,
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rate = self.events as f64 / self.seconds.max(1e-9);
        writeln!(
            f,
            "ingest: {} events in {:.3} s = {:.0} events/s (durable, acknowledged)",
            self.events, self.seconds, rate
        )?;
        writeln!(f, "  batch latency, intended send to ack: {}", self.batch_latency)?;
        if self.checks > 0 {
            let rate = self.checks as f64 / self.checks_seconds.max(1e-9);
            writeln!(
                f,
                "checks: {} in {:.3} s = {:.0}/s, {} errors",
                self.checks, self.checks_seconds, rate, self.check_errors
            )?;
            writeln!(f, "  check latency, intended send to answer: {}", self.check_latency)?;
        }
        if let Some(cpu) = self.node_cpu {
            let per = |n: u64| cpu * 1e6 / n.max(1) as f64;
            match (self.events, self.checks) {
                (0, 0) => writeln!(f, "node CPU: {cpu:.2} s")?,
                (0, c) => writeln!(f, "node CPU: {cpu:.2} s = {:.1} µs per check", per(c))?,
                (e, 0) => writeln!(f, "node CPU: {cpu:.2} s = {:.2} µs per event", per(e))?,
                (e, c) => writeln!(
                    f,
                    "node CPU: {cpu:.2} s for {e} events and {c} checks together (run them apart to see each's cost)"
                )?,
            }
        }
        if let Some(cpu) = self.own_cpu {
            writeln!(f, "generator CPU: {cpu:.2} s")?;
        }
        if self.late_sends * 100 > self.sends.max(1) {
            writeln!(
                f,
                "WARNING: the generator sent {} of {} checks or frames more than 1 ms late: it is saturated (or \
                 starved of CPU), so the latencies above include its own queueing",
                self.late_sends, self.sends
            )?;
        }
        if self.trigger_latency.count > 0 || self.triggers > 0 {
            writeln!(f, "triggers: {} streamed", self.triggers)?;
            writeln!(f, "  trigger latency, intended batch send to stream: {}", self.trigger_latency)?;
        }
        if self.resends > 0 {
            writeln!(
                f,
                "resends: {} batches sent again after a lost connection, {} answered as duplicates; every batch \
                 acknowledged once, at its own offsets",
                self.resends, self.duplicates
            )?;
        }
        Ok(())
    }
}

fn histogram() -> Histogram<u64> {
    // 1 µs to 10 minutes at 3 significant digits: the bounds are constants, so this cannot fail.
    Histogram::new_with_bounds(1, 600_000_000, 3)
        .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!()))
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).max(1)
}

/// Reads a JSON Lines workload; returns the events (a bad line is an error: a load run needs a valid stream).
pub fn read_workload(text: &str) -> anyhow::Result<Vec<Event>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| parse_line(l).map_err(|r| anyhow::anyhow!("line {}: {r}", i + 1)))
        .collect()
}

/// What the checks need from the workload: accounts, and instruments with a price.
struct Universe {
    accounts: Vec<String>,
    marks: Vec<(String, String)>,
}

fn universe(events: &[Event]) -> Universe {
    let mut accounts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut perps = std::collections::HashSet::new();
    let mut marks: HashMap<String, String> = HashMap::new();
    for e in events {
        match e {
            Event::Perp { symbol, .. } | Event::Future { symbol, .. } => {
                perps.insert(symbol.to_string());
            }
            Event::Price { symbol, price } if perps.contains(symbol.as_str()) => {
                marks.insert(symbol.to_string(), price.to_string());
            }
            Event::Deposit { account, .. } if seen.insert(account.to_string()) => accounts.push(account.to_string()),
            _ => {}
        }
    }
    let mut marks: Vec<(String, String)> = marks.into_iter().collect();
    marks.sort();
    Universe { accounts, marks }
}

/// Whether a failed send may be retried on a new connection: the node went away (crashed, restarting, refused a
/// batch because its journal failed, nothing acknowledged). A refusal of the batch itself is not retried.
fn retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionRefused | ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof | NotConnected
        | TimedOut | Interrupted => true,
        Other => e.to_string().starts_with("journal failure"),
        _ => false,
    }
}

/// Sends `producer`'s batch number `sequence` until the node acknowledges it: after a failure that may have lost
/// the ack, reconnects (backing off, for at most `options.resend_for`) and sends the same batch with the same
/// number again. The node answers a batch it journaled already with its original offsets, so the batch is
/// applied once whichever way the failure fell.
fn send_until_acknowledged(
    client: &mut Option<Client>,
    options: &LoadOptions,
    (producer, sequence): (&str, u64),
    batch: &[Event],
    (resends, duplicates): (&AtomicU64, &AtomicU64),
) -> anyhow::Result<(Offset, Offset)> {
    let mut deadline = None;
    let mut backoff = Duration::from_millis(5);
    let mut attempt = 0u32;
    loop {
        let result = match client.as_mut() {
            Some(c) => c.send_as(producer, sequence, batch),
            None => Client::connect_with(&options.ingest, options.token.as_deref()).and_then(|c| {
                let c = client.insert(c);
                c.send_as(producer, sequence, batch)
            }),
        };
        match result {
            Ok((first, last, duplicate)) => {
                if attempt > 0 {
                    resends.fetch_add(1, Ordering::Relaxed);
                }
                if duplicate {
                    duplicates.fetch_add(1, Ordering::Relaxed);
                }
                return Ok((first, last));
            }
            Err(e) if retryable(&e) => {
                *client = None;
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + options.resend_for);
                if Instant::now() >= deadline {
                    return Err(anyhow::Error::new(e).context(format!(
                        "batch {sequence} of producer {producer}: the node did not come back within {:?}",
                        options.resend_for
                    )));
                }
                thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_millis(250));
                attempt += 1;
            }
            Err(e) => {
                return Err(anyhow::Error::new(e).context(format!("batch {sequence} of producer {producer} refused")));
            }
        }
    }
}

/// Checks that every batch was acknowledged once, at offsets of its own: as many offsets as events, and no two
/// batches sharing one (a resend applied twice would show as a second range; one answered as a duplicate carries
/// the original range).
fn exactly_once(acks: &[(Offset, Offset, Instant)], batches: &[&[Event]]) -> anyhow::Result<()> {
    let mut ranges: Vec<(u64, u64)> = acks.iter().map(|(f, l, _)| (f.0, l.0)).collect();
    ranges.sort_unstable();
    anyhow::ensure!(ranges.len() == batches.len(), "{} batches sent, {} acknowledged", batches.len(), ranges.len());
    let offsets: u64 = ranges.iter().map(|(f, l)| l + 1 - f).sum();
    let events: u64 = batches.iter().map(|b| b.len() as u64).sum();
    anyhow::ensure!(offsets == events, "{events} events sent, {offsets} offsets acknowledged");
    if let Some(w) = ranges.windows(2).find(|w| w[1].0 <= w[0].1) {
        anyhow::bail!("two batches acknowledged at overlapping offsets {:?} and {:?}", w[0], w[1]);
    }
    Ok(())
}

/// Sends the setup, then the stream; runs checks and the trigger stream alongside. `setup` events are sent
/// first, flat out and unmeasured.
pub fn run(options: &LoadOptions, events: &[Event], setup: usize) -> anyhow::Result<LoadReport> {
    let token = options.token.as_deref();
    let batch = options.batch.max(1);
    let mut c =
        Client::connect_with(&options.ingest, token).with_context(|| format!("connecting to {}", options.ingest))?;
    let setup = setup.min(events.len());
    let mut start_offset = Offset(0);
    let to_send = if options.skip_setup { 0 } else { setup };
    for chunk in events[..to_send].chunks(batch) {
        let (_, last) = c.send(chunk).context("sending the setup")?;
        start_offset = last;
    }
    if to_send == 0 {
        // Learn where the stream starts: ask the node.
        start_offset = Offset(status_sequenced(&options.http)?);
    }
    drop(c);
    // The node's and the generator's CPU over the measured run (the setup excluded).
    let (node_cpu_before, own_cpu_before) = (node_cpu(&options.http), crate::metrics::process_cpu_seconds());
    let stream = &events[setup..];
    let universe = universe(&events[..setup.max(1).min(events.len())]);
    let done = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));

    // The trigger stream, from the stream's first offset.
    let trigger_times: Arc<Mutex<Vec<(u64, Instant, usize)>>> = Arc::new(Mutex::new(Vec::new()));
    let trigger_thread = if options.triggers {
        let (url, times, done) = (
            format!("http://{}/v1/triggers/stream?after={}", options.http, start_offset.0),
            Arc::clone(&trigger_times),
            Arc::clone(&done),
        );
        let response = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()?
            .get(&url)
            .send()
            .with_context(|| format!("subscribing to {url}"))?;
        anyhow::ensure!(response.status().is_success(), "trigger stream: HTTP {}", response.status());
        Some(thread::spawn(move || read_stream(response, &times, &done)))
    } else {
        None
    };

    // Checks over HTTP, on their own runtime and schedule.
    let checks_thread = if options.checks_rate > 0 && !universe.accounts.is_empty() && !universe.marks.is_empty() {
        let (http, rate, secs) = (options.http.clone(), options.checks_rate, options.checks_secs.max(1));
        let (wire, ingest, token) = (options.checks_wire, options.ingest.clone(), options.token.clone());
        let batch = options.checks_batch;
        Some(thread::spawn(move || {
            if wire > 0 {
                run_wire_checks(&ingest, token.as_deref(), rate, secs, wire, &universe)
            } else {
                run_checks(&http, token.as_deref(), rate, secs, batch, &universe)
            }
        }))
    } else {
        None
    };

    // The ingest: batch i is due at start + i × batch / rate; connection k sends batches k, k + C, …
    let batches: Vec<&[Event]> = stream.chunks(batch).collect();
    let connections = options.connections.max(1);
    let acks: Mutex<Vec<(Offset, Offset, Instant)>> = Mutex::new(Vec::with_capacity(batches.len()));
    let hist = Mutex::new(histogram());
    let start = Instant::now();
    let rate = options.rate;
    let progress = options.progress.then(|| {
        let (sent, done) = (Arc::clone(&sent), Arc::clone(&done));
        thread::spawn(move || {
            let begun = Instant::now();
            while !done.load(Ordering::Acquire) {
                thread::sleep(Duration::from_millis(250));
                let n = sent.load(Ordering::Relaxed);
                eprint!("\rload: {n} events acknowledged, {:.0} events/s   ", n as f64 / begun.elapsed().as_secs_f64());
            }
            eprintln!();
        })
    });
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let producer = options.producer.clone().unwrap_or_else(|| {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        format!("vigil-load-{}-{nanos}", std::process::id())
    });
    let (resends, duplicates) = (AtomicU64::new(0), AtomicU64::new(0));
    thread::scope(|s| {
        for k in 0..connections {
            let (batches, acks, hist, sent, failure) = (&batches, &acks, &hist, &sent, &failure);
            let (resends, duplicates) = (&resends, &duplicates);
            let producer = format!("{producer}-{k}");
            s.spawn(move || {
                let mut local = histogram();
                let mut mine = Vec::new();
                let result = (|| -> anyhow::Result<()> {
                    let mut c = Some(Client::connect_with(&options.ingest, token)?);
                    let mut sequence = 0u64;
                    let mut i = k;
                    while i < batches.len() {
                        let intended = if rate > 0 {
                            let due = start + Duration::from_secs_f64((i * batch) as f64 / rate as f64);
                            let now = Instant::now();
                            if due > now {
                                thread::sleep(due - now);
                            }
                            due
                        } else {
                            Instant::now()
                        };
                        sequence += 1;
                        let (first, last) = send_until_acknowledged(
                            &mut c,
                            options,
                            (&producer, sequence),
                            batches[i],
                            (resends, duplicates),
                        )?;
                        let _ = local.record(micros(intended.elapsed()));
                        mine.push((first, last, intended));
                        sent.fetch_add(batches[i].len() as u64, Ordering::Relaxed);
                        i += connections;
                    }
                    Ok(())
                })();
                if let Err(e) = result {
                    crate::lock(failure, "the load's first failure").get_or_insert(e);
                }
                let _ = crate::lock(hist, "the batch latency histogram").add(&local);
                crate::lock(acks, "the acknowledged batches").extend(mine);
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    if let Some(e) = crate::lock(&failure, "the load's first failure").take() {
        done.store(true, Ordering::Release);
        return Err(e.context("ingest"));
    }
    exactly_once(&crate::lock(&acks, "the acknowledged batches"), &batches)?;
    let mut report = LoadReport {
        events: sent.load(Ordering::Relaxed),
        seconds,
        batch_latency: Percentiles::of(&crate::lock(&hist, "the batch latency histogram")),
        resends: resends.load(Ordering::Relaxed),
        duplicates: duplicates.load(Ordering::Relaxed),
        ..LoadReport::default()
    };
    if let Some(t) = checks_thread {
        let (n, errors, secs, h, sends, late_sends) =
            t.join().map_err(|_| anyhow::anyhow!("the checks thread panicked"))??;
        report.sends = sends;
        report.late_sends = late_sends;
        report.checks = n;
        report.check_errors = errors;
        report.checks_seconds = secs;
        report.check_latency = Percentiles::of(&h);
    }
    if let Some(t) = trigger_thread {
        // Let the last triggers arrive (they follow the acks by the shards' apply time).
        let last = crate::lock(&acks, "the acknowledged batches").iter().map(|(_, l, _)| l.0).max().unwrap_or(0);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if status_released(&options.http).unwrap_or(0) >= last {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        // Then until the stream has delivered the last trigger of the run (the history says which offset).
        let target = last_trigger_offset(&options.http, start_offset.0, last).unwrap_or(0);
        while Instant::now() < deadline + Duration::from_secs(5) {
            let seen = crate::lock(&trigger_times, "the trigger times").last().map_or(0, |(o, _, _)| *o);
            if seen >= target {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        done.store(true, Ordering::Release);
        let mut acks = std::mem::take(&mut *crate::lock(&acks, "the acknowledged batches"));
        acks.sort_by_key(|(f, _, _)| *f);
        let times = crate::lock(&trigger_times, "the trigger times").clone();
        let mut h = histogram();
        for (offset, at, n) in &times {
            report.triggers += *n as u64;
            let i = acks.partition_point(|(_, l, _)| l.0 < *offset);
            if let Some((f, _, intended)) = acks.get(i)
                && f.0 <= *offset
            {
                let _ = h.record(micros(at.saturating_duration_since(*intended)));
            }
        }
        report.trigger_latency = Percentiles::of(&h);
        // The stream thread blocks on its socket until the next event or keep-alive; it is not joined.
        drop(t);
    }
    done.store(true, Ordering::Release);
    if let Some(p) = progress {
        let _ = p.join();
    }
    report.node_cpu = node_cpu_before.zip(node_cpu(&options.http)).map(|(a, b)| b - a);
    report.own_cpu = own_cpu_before.zip(crate::metrics::process_cpu_seconds()).map(|(a, b)| b - a);
    Ok(report)
}

/// Reads SSE events, recording (offset, arrival, trigger count) until `done`.
fn read_stream(response: reqwest::blocking::Response, times: &Mutex<Vec<(u64, Instant, usize)>>, done: &AtomicBool) {
    let mut reader = BufReader::new(response);
    let mut id: Option<u64> = None;
    let mut line = String::new();
    while !done.load(Ordering::Acquire) {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let l = line.trim_end();
        if let Some(v) = l.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(data) = l.strip_prefix("data: ")
            && let Some(offset) = id.take()
        {
            let n = data.matches("\"offset\"").count();
            crate::lock(times, "the trigger times").push((offset, Instant::now(), n));
        }
    }
}

fn status_field(http: &str, field: &str) -> anyhow::Result<u64> {
    // A node prints its addresses before recovery: while it answers `not_ready`, ask again (for up to a minute).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = reqwest::blocking::get(format!("http://{http}/v1/status"))?.text()?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        if v["code"] == "not_ready" && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
            continue;
        }
        return v[field].as_u64().ok_or_else(|| anyhow::anyhow!("status has no {field}: {body}"));
    }
}

/// The offset of the last trigger in (after, through], from the trigger history (0 if none).
fn last_trigger_offset(http: &str, mut after: u64, through: u64) -> anyhow::Result<u64> {
    let mut last = 0;
    loop {
        let body = reqwest::blocking::get(format!("http://{http}/v1/triggers?after={after}&limit=10000"))?.text()?;
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let page = v["triggers"].as_array().cloned().unwrap_or_default();
        for t in &page {
            match t["offset"].as_u64() {
                Some(o) if o <= through => last = o,
                _ => return Ok(last),
            }
        }
        let next = v["next_after"].as_u64().unwrap_or(after);
        if page.is_empty() || next <= after {
            return Ok(last);
        }
        after = next;
    }
}

fn status_sequenced(http: &str) -> anyhow::Result<u64> {
    status_field(http, "sequenced")
}

fn status_released(http: &str) -> anyhow::Result<u64> {
    status_field(http, "released")
}

/// Checks sent, errors, seconds, the latency histogram, sends (checks or frames) and how many were late.
type CheckResult = anyhow::Result<(u64, u64, f64, Histogram<u64>, u64, u64)>;

/// Whether a send at `now` is more than 1 ms behind `due`.
fn late(due: Instant, now: Instant) -> bool {
    now.saturating_duration_since(due) > Duration::from_millis(1)
}

/// The node's CPU seconds so far, from its metrics.
fn node_cpu(http: &str) -> Option<f64> {
    let text = reqwest::blocking::get(format!("http://{http}/metrics")).ok()?.text().ok()?;
    text.lines().find_map(|l| l.strip_prefix("process_cpu_seconds_total ")?.trim().parse().ok())
}

/// Open-loop checks: check i is due at start + i / rate; its latency runs from then to the answer.
fn run_checks(http: &str, token: Option<&str>, rate: u64, secs: u64, batch: usize, universe: &Universe) -> CheckResult {
    // Two workers: with one, the generator's own queueing showed in the tail (p99 4.6 ms against 2.8 ms).
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let pool = Arc::new(crate::httpc::Pool::new(http, token));
    let total = rate * secs;
    // Checks per request: one to `/v1/accounts/{id}/check`, or `batch` to `/v1/checks` (request j due when its
    // first check is; each check's latency runs from its request's due time to the answer).
    let per = batch.max(1) as u64;
    let requests = total.div_ceil(per);
    let hist = Arc::new(Mutex::new(histogram()));
    let errors = Arc::new(AtomicU64::new(0));
    let body_of = |i: u64, with_account: bool| {
        let (symbol, price) = &universe.marks[i as usize % universe.marks.len()];
        let account = &universe.accounts[(i as usize * 7919) % universe.accounts.len()];
        let fields = format!("\"symbol\":\"{symbol}\",\"side\":\"buy\",\"qty\":\"0.001\",\"price\":\"{price}\"");
        let body =
            if with_account { format!("{{\"account\":\"{account}\",{fields}}}") } else { format!("{{{fields}}}") };
        (account.clone(), body)
    };
    let started = Instant::now();
    // Pacing on a plain thread (the OS timer's precision is tens of microseconds; tokio's timer wheel ticks every
    // millisecond, which would bias every latency by up to that much); requests run on the runtime.
    let handle = runtime.handle().clone();
    let mut tasks = Vec::with_capacity(requests as usize);
    let mut late_sends = 0;
    for j in 0..requests {
        let first = j * per;
        let n = per.min(total - first);
        let due = started + Duration::from_secs_f64(first as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        late_sends += u64::from(late(due, Instant::now()));
        let (path, body) = if per == 1 {
            let (account, body) = body_of(first, false);
            (format!("/v1/accounts/{account}/check"), body)
        } else {
            let bodies: Vec<String> = (first..first + n).map(|i| body_of(i, true).1).collect();
            ("/v1/checks".to_owned(), format!("[{}]", bodies.join(",")))
        };
        let (pool, hist, errors) = (Arc::clone(&pool), Arc::clone(&hist), Arc::clone(&errors));
        tasks.push(handle.spawn(async move {
            let refused = match pool.post(&path, &body).await {
                Ok(a) if (200..300).contains(&a.status) && per == 1 => 0,
                // A batch answers each check in place: those refused carry a `code`.
                Ok(a) if (200..300).contains(&a.status) => {
                    match serde_json::from_slice::<Vec<serde_json::Value>>(&a.body) {
                        Ok(answers) if answers.len() as u64 == n => {
                            answers.iter().filter(|a| a.get("code").is_some()).count() as u64
                        }
                        _ => n,
                    }
                }
                _ => n,
            };
            let elapsed = micros(due.elapsed());
            errors.fetch_add(refused, Ordering::Relaxed);
            let _ = crate::lock(&hist, "the check latency histogram").record_n(elapsed, n);
        }));
    }
    runtime.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let h = crate::lock(&hist, "the check latency histogram").clone();
    Ok((total, errors.load(Ordering::Relaxed), secs, h, requests, late_sends))
}

/// Open-loop checks over the binary path: frame j (of `per_frame` checks) is due at start + j × per_frame / rate;
/// a reader takes the answers in order on the same connection, and each check's latency runs from its frame's due
/// time to the frame's answer.
fn run_wire_checks(
    ingest: &str,
    token: Option<&str>,
    rate: u64,
    secs: u64,
    per_frame: usize,
    universe: &Universe,
) -> CheckResult {
    let mut sender = Client::connect_with(ingest, token).with_context(|| format!("connecting to {ingest}"))?;
    let mut reader = sender.try_clone().context("a second handle on the connection")?;
    let fills: Vec<vigil_model::Fill> = (0..universe.accounts.len().max(1) * 2)
        .map(|i| {
            let (symbol, price) = &universe.marks[i % universe.marks.len()];
            vigil_model::Fill {
                account: universe.accounts[(i * 7919) % universe.accounts.len()].clone(),
                symbol: symbol.clone(),
                side: vigil_model::Side::Buy,
                qty: vigil_model::Qty::parse("0.001").unwrap_or(vigil_model::Qty::ZERO),
                price: vigil_model::Price::parse(price).unwrap_or(vigil_model::Price(1)),
                fee: vigil_model::Amount::ZERO,
                margin_mode: vigil_model::MarginMode::Cross,
            }
        })
        .collect();
    let total = rate * secs;
    let frames = total.div_ceil(per_frame as u64);
    let (due_tx, due_rx) = std::sync::mpsc::channel::<(Instant, usize)>();
    let read = thread::spawn(move || -> anyhow::Result<(u64, Histogram<u64>)> {
        let mut hist = histogram();
        let mut errors = 0;
        while let Ok((due, n)) = due_rx.recv() {
            let answers = reader.read_checks().context("reading check answers")?;
            let latency = micros(due.elapsed());
            anyhow::ensure!(answers.len() == n, "{} answers to a frame of {n} checks", answers.len());
            for a in &answers {
                errors += u64::from(matches!(a, crate::wire::CheckAnswer::Refused { .. }));
                let _ = hist.record(latency);
            }
        }
        Ok((errors, hist))
    });
    let started = Instant::now();
    let mut at = 0usize;
    let mut late_sends = 0;
    for j in 0..frames {
        let due = started + Duration::from_secs_f64((j * per_frame as u64) as f64 / rate as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        late_sends += u64::from(late(due, Instant::now()));
        let n = per_frame.min((total - j * per_frame as u64) as usize);
        let frame: Vec<vigil_model::Fill> = (0..n).map(|k| fills[(at + k) % fills.len()].clone()).collect();
        at += n;
        sender.send_checks(Offset(0), &frame).context("sending a check frame")?;
        if due_tx.send((due, n)).is_err() {
            break;
        }
    }
    drop(due_tx);
    let (errors, hist) = read.join().map_err(|_| anyhow::anyhow!("the answer reader panicked"))??;
    Ok((total, errors, started.elapsed().as_secs_f64(), hist, frames, late_sends))
}

/// Writes the report (the command's output).
pub fn print(report: &LoadReport, out: &mut impl Write) -> std::io::Result<()> {
    write!(out, "{report}")
}
