//! The node's interfaces end to end: the real binary on ephemeral loopback ports, driven by a real HTTP client
//! (reqwest) and the TCP ingest client. Every endpoint, the token, the limits, malformed input, read-your-writes
//! on `check`, and a trigger stream that reconnects mid-way and sees every trigger exactly once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::{Client as Http, Response};
use serde_json::Value;
use vigil_model::{Offset, parse_line};
use vigil_node::wire::{CheckAnswer, Client, encode_batch};

struct Node {
    child: Child,
    ingest: String,
    base: String,
    http: Http,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(extra: &[&str]) -> (Node, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start_in(dir.path(), extra);
    (node, dir)
}

/// Starts a node on an existing data directory (a restart).
fn start_in(dir: &std::path::Path, extra: &[&str]) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--data"])
        .arg(dir)
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2"])
        .args(extra)
        .env_remove("VIGIL_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vigil serve starts");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = |prefix: &str| {
        let mut l = String::new();
        out.read_line(&mut l).expect("the node prints its addresses");
        l.trim().strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line {l:?}")).to_owned()
    };
    let ingest = line("listening on ");
    let base = format!("http://{}", line("http on "));
    let http = Http::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let node = Node { child, ingest, base, http };
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.get("/ready").map(|r| r.status()) != Some(StatusCode::OK) {
        assert!(Instant::now() < deadline, "the node never became ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    node
}

impl Node {
    fn get(&self, path: &str) -> Option<Response> {
        self.http.get(format!("{}{path}", self.base)).send().ok()
    }

    fn json(&self, path: &str) -> (StatusCode, Value) {
        let r = self.get(path).expect("response");
        let status = r.status();
        (status, serde_json::from_str(&r.text().expect("body")).expect("a JSON body"))
    }

    fn post(&self, path: &str, body: impl Into<reqwest::blocking::Body>, token: Option<&str>) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).body(body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().expect("response");
        let status = r.status();
        (status, serde_json::from_str(&r.text().expect("body")).expect("a JSON body"))
    }

    fn events(&self, body: &str) -> Value {
        let (status, v) = self.post("/v1/events", body.to_owned(), None);
        assert_eq!(status, StatusCode::OK, "{v}");
        v
    }
}

const SETUP: &str = r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}
{"type":"asset","asset":"BTC","haircut":"0.1"}
{"type":"price","symbol":"ETH","price":"3000"}
{"type":"deposit","account":"alice","asset":"USDC","amount":"1000"}
"#;

#[test]
fn every_endpoint_answers_end_to_end() {
    // Proves each endpoint's success and error answers, that bad lines take offsets as rejections without stopping
    // the batch, and read-your-writes: a check naming the trade's offset sees the trade.
    let (node, _dir) = start(&[]);
    assert_eq!(node.json("/health").1["status"], "up");
    assert_eq!(node.json("/ready").1["status"], "ready");

    let v = node.events(&format!(
        "{SETUP}not json\n{{\"type\":\"deposit\",\"account\":\"bob\",\"asset\":\"DOGE\",\"amount\":\"1\"}}\n"
    ));
    assert_eq!((v["first"].as_u64(), v["last"].as_u64()), (Some(1), Some(6)));
    let rejections = v["rejections"].as_array().expect("list");
    assert_eq!(rejections.len(), 2);
    assert_eq!((rejections[0]["offset"].as_u64(), rejections[0]["reason"].as_str()), (Some(5), Some("invalid_event")));
    assert_eq!((rejections[1]["offset"].as_u64(), rejections[1]["reason"].as_str()), (Some(6), Some("unknown_asset")));

    // Before the trade: a 3 ETH buy needs IM 900 of 1 000 equity, allowed.
    let check = r#"{"symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#;
    let (s, c) = node.post("/v1/accounts/alice/check", check, None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["allowed"], true);
    assert_eq!(c["reason"], Value::Null);
    assert_eq!((c["initial_margin"].as_str(), c["available"].as_str()), (Some("900.00000000"), Some("100.00000000")));

    // The trade, as a JSON array; then the same check reading its write: now 6 ETH would need 1 800.
    let v = node.events(r#"[{"type":"trade","account":"alice","symbol":"ETH","side":"buy","qty":"3","price":"3000"}]"#);
    let trade = v["last"].as_u64().expect("offset");
    assert_eq!(trade, 7);
    let (s, c) = node.post(&format!("/v1/accounts/alice/check?min_offset={trade}"), check, None);
    assert_eq!(s, StatusCode::OK);
    assert_eq!(c["allowed"], false);
    assert_eq!(c["reason"], "insufficient_margin");
    assert_eq!((c["equity"].as_str(), c["initial_margin"].as_str()), (Some("1000.00000000"), Some("1800.00000000")));
    assert_eq!(c["maintenance_margin"], "900.00000000");
    assert_eq!(c["available"], "-800.00000000");

    let (s, a) = node.json(&format!("/v1/accounts/alice?min_offset={trade}"));
    assert_eq!(s, StatusCode::OK);
    assert_eq!(a["account"], "alice");
    assert_eq!(a["positions"][0]["qty"], "3.00000000");
    assert_eq!(a["positions"][0]["liquidation_price"], "2807.01754386");
    let keys: Vec<&str> = a.as_object().expect("object").keys().map(String::as_str).collect();
    for key in ["equity", "initial_margin", "maintenance_margin", "available", "liquidatable", "balances"] {
        assert!(keys.contains(&key), "account key {key}");
    }

    let (s, e) = node.json("/v1/accounts/nobody");
    assert_eq!((s, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_account")));
    let (s, e) = node.json("/v1/accounts/alice?min_offset=1000000");
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("offset_not_sequenced")));
    let (s, e) = node.post("/v1/accounts/alice/check", r#"{"symbol":"SOL","side":"buy","qty":"1","price":"1"}"#, None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_symbol")));
    let (s, e) = node.post("/v1/accounts/alice/check", r#"{"symbol":"ETH","side":"up","qty":"1","price":"1"}"#, None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_event")));
    let (s, e) =
        node.post("/v1/accounts/alice/check", r#"{"symbol":"ETH","side":"buy","qty":"1e400","price":"1"}"#, None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_number")));

    let (s, i) = node.json("/v1/instruments");
    assert_eq!(s, StatusCode::OK);
    assert_eq!(i["quote"], "USDC");
    assert_eq!(i["assets"][0]["asset"], "BTC");
    assert_eq!(i["assets"][0]["haircut"], "0.10000000");
    assert_eq!(i["instruments"][0]["symbol"], "ETH");
    assert_eq!(i["instruments"][0]["kind"], "perp");
    assert_eq!(i["instruments"][0]["tiers"][0]["mmr"], "0.05000000");

    // A tick that breaches: a trigger in the page, the status' offsets, the metrics.
    let v = node.events(r#"{"type":"price","symbol":"ETH","price":"2800"}"#);
    let tick = v["last"].as_u64().expect("offset");
    let (s, t) = node.json("/v1/triggers?after=0");
    assert_eq!(s, StatusCode::OK);
    assert_eq!(t["triggers"][0]["offset"].as_u64(), Some(tick));
    assert_eq!(t["triggers"][0]["account"], "alice");
    assert_eq!(t["triggers"][0]["kind"], "liquidate");
    assert_eq!(t["next_after"].as_u64(), Some(tick));
    let (_, t) = node.json(&format!("/v1/triggers?after={tick}"));
    assert_eq!(t["triggers"].as_array().map(Vec::len), Some(0));

    let (s, st) = node.json("/v1/status");
    assert_eq!(s, StatusCode::OK);
    assert_eq!((st["sequenced"].as_u64(), st["durable"].as_u64()), (Some(tick), Some(tick)));
    assert_eq!(st["shards"].as_array().map(Vec::len), Some(2));
    assert_eq!(st["version"], env!("CARGO_PKG_VERSION"));
    let metrics = node.get("/metrics").expect("metrics").text().expect("text");
    assert!(metrics.contains(&format!("vigil_durable_offset {tick}")), "{metrics}");

    // Bodies that are not batches change nothing.
    let (s, e) = node.post("/v1/events", "[{\"type\":", None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("malformed_body")));
    let (s, e) = node.post("/v1/events", "\n  \n", None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("empty_batch")));
    let (s, e) = node.json("/v2/nothing");
    assert_eq!((s, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("not_found")));
    assert_eq!(node.json("/v1/status").1["sequenced"].as_u64(), Some(tick), "nothing sequenced by refused bodies");
}

#[test]
fn writes_need_the_token_and_an_exposed_node_needs_one() {
    // Proves: without or with a wrong token, HTTP writes get 401 and TCP connections an error frame, and nothing
    // is sequenced; reads stay open; the right token works on both; `serve` refuses a non-loopback address
    // without a token.
    let (node, _dir) = start(&["--token", "s3cret"]);
    let body = r#"{"type":"deposit","account":"a","asset":"USDC","amount":"5"}"#;
    let (s, e) = node.post("/v1/events", body, None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::UNAUTHORIZED, Some("unauthorized")));
    let (s, _) = node.post("/v1/events", body, Some("s3cre"));
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let event = parse_line(body).expect("valid");
    let mut c = Client::connect(&node.ingest).expect("connect");
    let refused = c.send(std::slice::from_ref(&event)).expect_err("no auth frame");
    assert!(refused.to_string().contains("unauthorized"), "{refused}");
    assert!(Client::connect_with(&node.ingest, Some("wrong")).is_err());
    assert_eq!(node.json("/v1/status").1["sequenced"].as_u64(), Some(0));

    let (s, v) = node.post("/v1/events", body, Some("s3cret"));
    assert_eq!((s, v["first"].as_u64()), (StatusCode::OK, Some(1)));
    let mut c = Client::connect_with(&node.ingest, Some("s3cret")).expect("authorised");
    assert_eq!(c.send(&[event]).expect("ack"), (Offset(2), Offset(2)));
    assert_eq!(node.json("/v1/accounts/a?min_offset=2").1["balances"]["USDC"], "10.00000000");

    let dir = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["serve", "--data"])
        .arg(dir.path())
        .args(["--ingest", "127.0.0.1:0", "--http", "0.0.0.0:0"])
        .env_remove("VIGIL_TOKEN")
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("without a token"));
}

#[test]
fn oversized_and_malformed_input_is_refused_and_changes_nothing() {
    // Proves the body, frame and connection limits, malformed frames and hostile bodies: clear errors, nothing
    // sequenced, and the node keeps serving.
    let (node, _dir) = start(&["--http-body-bytes-max", "4096", "--frame-bytes-max", "4096", "--connections-max", "2"]);
    let big = format!("{SETUP}{}", " ".repeat(5000));
    let r = node.http.post(format!("{}/v1/events", node.base)).body(big).send().expect("response");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let e: Value = serde_json::from_str(&r.text().expect("body")).expect("a JSON error");
    assert_eq!(e["code"], "body_too_large");

    let mut raw = TcpStream::connect(&node.ingest).expect("connect");
    raw.write_all(&(8192u32).to_le_bytes()).expect("write");
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert_eq!(answer.get(4), Some(&2), "an error frame");
    assert!(String::from_utf8_lossy(&answer[5..]).contains("out of bounds"));

    let mut c = Client::connect(&node.ingest).expect("connect");
    let mut frame = encode_batch(&[parse_line(r#"{"type":"asset","asset":"BTC"}"#).expect("valid")]);
    frame[5] ^= 0xFF; // corrupt the bincode body
    assert!(c.send_raw(&frame).is_err());

    // One connection over `connections_max` is refused with an error frame; the ones already open keep working.
    drop(c);
    let mut open: Vec<Client> = Vec::new();
    let event = parse_line(r#"{"type":"asset","asset":"ETH"}"#).expect("valid");
    for _ in 0..2 {
        // The refused connections above release their slots as their tasks end: allow that a moment.
        let deadline = Instant::now() + Duration::from_secs(5);
        let c = loop {
            let mut c = Client::connect(&node.ingest).expect("connect");
            match c.send(std::slice::from_ref(&event)) {
                Ok(_) => break c,
                Err(e) if e.to_string().contains("too many") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("not served: {e}"),
            }
        };
        open.push(c);
    }
    let mut third = Client::connect(&node.ingest).expect("the TCP handshake itself succeeds");
    let refused = third.send(std::slice::from_ref(&event)).expect_err("over the limit");
    assert!(refused.to_string().contains("too many connections"), "{refused}");
    assert!(open[0].send(std::slice::from_ref(&event)).is_ok(), "open connections still served");
    drop(open);

    for hostile in ["[[[[[[[[", "{\"type\":\"trade\"", "\u{0}\u{1}", "[1,2,", "]"] {
        let (s, _) = node.post("/v1/events", hostile, None);
        assert!(s == StatusCode::BAD_REQUEST || s == StatusCode::OK, "{hostile:?}: {s}");
    }
    // The lines of the last loop that were JSON Lines became rejections (they take offsets); the rest nothing.
    let sequenced = node.json("/v1/status").1["sequenced"].as_u64().expect("offset");
    let (_, v) = node.post("/v1/events", "{\"type\":\"asset\",\"asset\":\"BTC\"}", None);
    assert_eq!(v["first"].as_u64(), Some(sequenced + 1), "the node still sequences");
    let (s, e) = node.post("/v1/accounts/x/check", "x".repeat(5000), None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::PAYLOAD_TOO_LARGE, Some("body_too_large")));
    let (s, e) = node.json("/v1/accounts/x?min_offset=soon");
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("bad_request")));
}

/// Reads SSE events (id, data) from a stream until `until` returns true.
fn read_events(reader: &mut impl BufRead, mut until: impl FnMut(u64) -> bool) -> Vec<(u64, Vec<Value>)> {
    let mut out = Vec::new();
    let (mut id, mut data) = (None, String::new());
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).expect("stream") > 0, "stream ended early");
        let line = line.trim_end_matches(['\r', '\n']);
        if let Some(v) = line.strip_prefix("id: ") {
            id = v.parse().ok();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        } else if line.is_empty() && !data.is_empty() {
            let offset = id.take().expect("every event has an id");
            out.push((offset, serde_json::from_str(&data).expect("a JSON array")));
            data.clear();
            if until(offset) {
                return out;
            }
        }
    }
}

#[test]
fn the_trigger_stream_resumes_after_a_reconnect_exactly_once() {
    // Proves the liquidator's contract: a stream cut mid-way and resumed from its last id receives every trigger
    // once, in order, and the union equals the trigger history.
    let (node, _dir) = start(&[]);
    let mut setup = String::new();
    // Five accounts, liquidated at five different prices (2807, 2736, 2631, 2456, 2105), bankrupt further down:
    // each of the six ticks below emits triggers. Ticking again after that emits none (episodes are open).
    for (i, qty) in ["3", "2.5", "2", "1.5", "1"].iter().enumerate() {
        setup.push_str(&format!(
            "{{\"type\":\"deposit\",\"account\":\"t{i}\",\"asset\":\"USDC\",\"amount\":\"1000\"}}\n\
             {{\"type\":\"trade\",\"account\":\"t{i}\",\"symbol\":\"ETH\",\"side\":\"buy\",\"qty\":\"{qty}\",\"price\":\"3000\"}}\n"
        ));
    }
    node.events(&format!("{SETUP}{setup}"));
    let tick =
        |p: u32| node.events(&format!("{{\"type\":\"price\",\"symbol\":\"ETH\",\"price\":\"{p}\"}}"))["last"].as_u64();

    let stream = node.get("/v1/triggers/stream?after=0").expect("stream");
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let mut reader = BufReader::new(stream);
    let mut offsets = vec![tick(2800).expect("offset"), tick(2700).expect("offset"), tick(2600).expect("offset")];
    let first = read_events(&mut reader, |o| o == offsets[1]);
    drop(reader); // the liquidator disconnects after two offsets
    offsets.push(tick(2400).expect("offset"));
    offsets.push(tick(2000).expect("offset"));
    offsets.push(tick(1500).expect("offset")); // the last account goes bankrupt
    let resumed = node
        .http
        .get(format!("{}/v1/triggers/stream", node.base))
        .header("Last-Event-ID", first.last().expect("two events").0.to_string())
        .send()
        .expect("stream");
    let last = offsets[5];
    let second = read_events(&mut BufReader::new(resumed), |o| o == last);

    let seen: Vec<u64> = first.iter().chain(&second).map(|(o, _)| *o).collect();
    assert_eq!(seen, offsets, "every trigger offset once, in order");
    let streamed: Vec<Value> = first.into_iter().chain(second).flat_map(|(_, t)| t).collect();
    let (_, history) = node.json("/v1/triggers?after=0");
    assert_eq!(&streamed, history["triggers"].as_array().expect("list"));
    let accounts: Vec<&str> =
        streamed.iter().filter(|t| t["kind"] == "liquidate").filter_map(|t| t["account"].as_str()).collect();
    assert_eq!(accounts, ["t0", "t1", "t2", "t3", "t4"]);
}

#[test]
fn vigil_load_drives_a_running_node() {
    // Proves the load tool end to end against the real node: every generated event acknowledged, checks answered
    // without error, the trigger stream read, and the node's state moved by exactly that many events.
    let (node, _dir) = start(&["--token", "t"]);
    let http = node.base.trim_start_matches("http://").to_owned();
    // `vigil load` against this node with `args` (split at spaces) after the addresses and token; its report, once
    // it succeeded.
    let load = |args: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .args(["load", "--ingest", &node.ingest, "--http", &http, "--token", "t"])
            .args(args.split_whitespace())
            .output()
            .expect("vigil load runs");
        let report = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{report}\n{}", String::from_utf8_lossy(&out.stderr));
        report
    };
    let report = load(concat!(
        "--accounts 200 --events 20000 --near 20 --volatility 0.003 --rate 40000 --batch 500 ",
        "--checks-rate 200 --checks-secs 1 --triggers"
    ));
    assert!(report.contains("ingest: 20000 events"), "{report}");
    assert!(report.contains("checks: 200 in") && report.contains(", 0 errors"), "{report}");
    let streamed: u64 = report
        .lines()
        .find_map(|l| l.strip_prefix("triggers: ")?.strip_suffix(" streamed")?.parse().ok())
        .expect("a trigger line");
    let (_, status) = node.json("/v1/status");
    let (_, history) = node.json("/v1/triggers?after=0&limit=10000");
    let setup_end = status["sequenced"].as_u64().expect("offset") - 20_000;
    let after_setup =
        history["triggers"].as_array().expect("list").iter().filter(|t| t["offset"].as_u64() > Some(setup_end)).count();
    assert!(streamed > 0, "the workload breaches: {report}");
    assert_eq!(streamed, after_setup as u64, "the stream saw every trigger of the measured run");

    // Checks over HTTP, 10 per request to POST /v1/checks (each answered in place, none refused).
    let report = load("--skip-setup --accounts 200 --events 0 --checks-rate 500 --checks-secs 1 --checks-batch 10");
    assert!(report.contains("checks: 500 in") && report.contains(", 0 errors"), "{report}");

    // Checks over the binary path, 50 per frame, on the authenticated connection; the node has the setup.
    let report = load("--skip-setup --accounts 200 --events 0 --checks-rate 5000 --checks-secs 1 --checks-wire 50");
    assert!(report.contains("checks: 5000 in") && report.contains(", 0 errors"), "{report}");
    // The node's CPU over the run, from its own metric, per check (a checks-only run), and the generator's.
    let per_check: f64 = report
        .lines()
        .find_map(|l| l.strip_prefix("node CPU: ")?.split(" = ").nth(1)?.strip_suffix(" µs per check")?.parse().ok())
        .unwrap_or_else(|| panic!("a node CPU line: {report}"));
    assert!(per_check.is_finite() && per_check >= 0.0, "{report}");
    assert!(report.contains("generator CPU: "), "{report}");
}

#[test]
fn stress_tests_on_a_running_node_are_cut_at_one_offset() {
    // Proves POST /v1/stress end to end while events stream in: every report is the book at exactly its offset
    // (each equals `vigil_node::stress::run` over the first `offset` lines replayed offline, for 2 shards whose
    // threads were busy applying events when asked); the refusals; and, once the node has stopped,
    // `vigil stress --data` on its data directory gives the report at the last offset.
    let config = vigil_testkit::StreamConfig {
        seed: 11,
        events: 4000,
        accounts: 40,
        bad_percent: 2,
        portfolio_percent: 3,
        // Fills and fund movements: each report's insurance fund must be the fund at its cut.
        liquidation_percent: 5,
    };
    let lines = vigil_testkit::generate(&config);
    let (mut node, dir) = start(&[]);
    let request = r#"{"scenarios":[{"name":"crash","moves":{"BTC":"-0.3","ETH":"-0.4"},"vol":{"BTC":"0.5"}},{"name":"rally","moves":{"ETH":"0.25"}}],"grids":[{"underlying":"BTC","from":"-0.2","to":"0.2","steps":5}],"top":4}"#;
    let (s, e) = node.post("/v1/stress", "{\"scenarios\":[]}", None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scenario")));
    let (s, e) = node.post("/v1/stress", "not json", None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_scenario")));
    // Nothing declared yet: BTC is unknown.
    let (s, e) = node.post("/v1/stress", request, None);
    assert_eq!((s, e["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("unknown_asset")), "{e}");

    // The first half goes in before any report is taken, so at least one report is cut mid-stream whatever the
    // machine's speed; the second half streams while reports are taken.
    let half = lines.len() / 2;
    for chunk in lines[..half].chunks(50) {
        node.events(&chunk.join("\n"));
    }
    let mut reports: Vec<Value> = Vec::new();
    let (s, v) = node.post("/v1/stress", request, None);
    assert_eq!(s, StatusCode::OK, "{v}");
    reports.push(v);
    let base = node.base.clone();
    let body_lines = lines[half..].to_vec();
    let producer = std::thread::spawn(move || {
        let http = Http::builder().timeout(Duration::from_secs(30)).build().expect("client");
        for chunk in body_lines.chunks(50) {
            let r = http.post(format!("{base}/v1/events")).body(chunk.join("\n")).send().expect("posted");
            assert_eq!(r.status(), StatusCode::OK);
        }
    });
    while !producer.is_finished() || reports.len() < 3 {
        let (s, v) = node.post("/v1/stress", request, None);
        match s {
            StatusCode::OK => reports.push(v),
            // Before the assets are declared.
            StatusCode::UNPROCESSABLE_ENTITY => assert_eq!(v["code"], "unknown_asset", "{v}"),
            other => panic!("{other}: {v}"),
        }
    }
    producer.join().expect("the producer");
    let total = lines.len() as u64;
    let mid_stream = reports.iter().filter(|r| r["offset"].as_u64().is_some_and(|o| o < total)).count();
    assert!(mid_stream >= 1, "no report was cut mid-stream ({} reports)", reports.len());
    let parsed = vigil_node::stress::parse_request(request.as_bytes()).expect("valid");
    let offline = |upto: usize| {
        let book =
            vigil_node::book::replay(lines[..upto].join("\n").as_bytes(), &vigil_engine::Config::default(), 2, false)
                .expect("replays");
        let mut report = vigil_node::stress::run(&book.engines, book.offset, &parsed, false).expect("runs");
        report.fund = Some(book.fund);
        report.to_json()
    };
    let zero =
        serde_json::json!({"balance":"0.00000000","fees":"0.00000000","paid":"0.00000000","uncovered":"0.00000000"});
    assert!(reports.iter().any(|r| r["insurance_fund"] != zero), "the fund moved before some cut");
    for r in &reports {
        let at = r["offset"].as_u64().expect("an offset") as usize;
        assert_eq!(r, &offline(at), "the report at offset {at} is not the book at {at}");
    }
    let metrics = node.get("/metrics").expect("metrics").text().expect("text");
    assert!(metrics.contains("vigil_stress_shortfall{scenario=\"crash\"}"), "{metrics}");

    // Stop the node (SIGTERM: drain, checkpoint), then read its data directory offline.
    let status = Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().expect("kill -TERM");
    assert!(status.success());
    assert!(node.child.wait().expect("exit").success());
    let out = Command::new(env!("CARGO_BIN_EXE_vigil"))
        .args(["stress", "--data"])
        .arg(dir.path())
        .args(["--scenario", r#"{"name":"crash","moves":{"BTC":"-0.3","ETH":"-0.4"},"vol":{"BTC":"0.5"}}"#])
        .args(["--scenario", r#"{"name":"rally","moves":{"ETH":"0.25"}}"#])
        .args(["--grid", r#"{"underlying":"BTC","from":"-0.2","to":"0.2","steps":5}"#, "--top", "4"])
        .output()
        .expect("vigil stress runs");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let from_data: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
    assert_eq!(from_data, offline(lines.len()));
}

/// liquidation.md's partial-close check (fees 30 and 41.925, the fund pays 5.00), then a drained fund and dYdX's
/// contract-loss example (the fund pays 15.00 it does not hold: uncovered, a `deleverage` trigger).
const LIQUIDATIONS: &str = r#"{"type":"insurance","amount":"1000"}
{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.05","mmr":"0.03"}]}
{"type":"price","symbol":"ETH","price":"3000"}
{"type":"deposit","account":"A","asset":"USDC","amount":"2500"}
{"type":"deposit","account":"B","asset":"USDC","amount":"2500"}
{"type":"deposit","account":"C","asset":"USDC","amount":"2500"}
{"type":"trade","account":"A","symbol":"ETH","side":"buy","qty":"10","price":"3000"}
{"type":"trade","account":"B","symbol":"ETH","side":"buy","qty":"10","price":"3000"}
{"type":"trade","account":"C","symbol":"ETH","side":"buy","qty":"10","price":"3000"}
{"type":"price","symbol":"ETH","price":"2800"}
{"type":"trade","account":"A","symbol":"ETH","side":"sell","qty":"1","price":"2780","liquidation":true}
{"type":"liquidation_params","max_liquidation_fee":"0.015"}
{"type":"trade","account":"B","symbol":"ETH","side":"sell","qty":"1","price":"2795","liquidation":true}
{"type":"trade","account":"C","symbol":"ETH","side":"sell","qty":"1","price":"2745","liquidation":true}
{"type":"insurance","amount":"-1066.925"}
{"type":"perp","symbol":"ABC","tiers":[{"imr":"0.05","mmr":"0.03"}]}
{"type":"price","symbol":"ABC","price":"1"}
{"type":"deposit","account":"D","asset":"USDC","amount":"100"}
{"type":"trade","account":"D","symbol":"ABC","side":"buy","qty":"500","price":"1"}
{"type":"price","symbol":"ABC","price":"0.801"}
{"type":"trade","account":"D","symbol":"ABC","side":"sell","qty":"500","price":"0.77","liquidation":true}
{"type":"insurance","amount":"-1"}
"#;

/// What `GET /v1/insurance` must say after [`LIQUIDATIONS`], whatever happened to the node in between.
fn assert_insurance_after_liquidations(node: &Node) {
    let (s, i) = node.json("/v1/insurance");
    assert_eq!(s, StatusCode::OK, "{i}");
    let fund = &i["insurance_fund"];
    assert_eq!(
        (fund["balance"].as_str(), fund["fees"].as_str(), fund["paid"].as_str(), fund["uncovered"].as_str()),
        (Some("-15.00000000"), Some("71.92500000"), Some("20.00000000"), Some("15.00000000")),
        "{i}"
    );
    assert_eq!(i["offset"].as_u64(), Some(22));
    let fills = i["liquidations"].as_array().expect("a list");
    let summary: Vec<(u64, &str, &str, &str, &str)> = fills
        .iter()
        .map(|l| {
            let text = |k: &str| l[k].as_str().unwrap_or("?");
            (l["offset"].as_u64().unwrap_or(0), text("account"), text("fee"), text("fund_paid"), text("uncovered"))
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            (11, "A", "30.00000000", "0.00000000", "0.00000000"),
            (13, "B", "41.92500000", "0.00000000", "0.00000000"),
            (14, "C", "0.00000000", "5.00000000", "0.00000000"),
            (21, "D", "0.00000000", "15.00000000", "15.00000000"),
        ]
    );
    assert_eq!(fills[0]["bankruptcy_price"], "2750.00000000");
    // Paged like triggers: after an offset, at most `limit`, `next_after` to go on from.
    let (_, page) = node.json("/v1/insurance?after=11&limit=2");
    let offsets: Vec<u64> =
        page["liquidations"].as_array().expect("a list").iter().filter_map(|l| l["offset"].as_u64()).collect();
    assert_eq!(offsets, vec![13, 14]);
    assert_eq!(page["next_after"].as_u64(), Some(14));
    let (_, page) = node.json("/v1/insurance?after=14&limit=2");
    assert_eq!(page["liquidations"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["next_after"].as_u64(), Some(22));
    // Without `after`: the last `limit` fills.
    let (_, last) = node.json("/v1/insurance?limit=1");
    assert_eq!(last["liquidations"][0]["offset"].as_u64(), Some(21));
    // The deficit the fund did not hold raised a `deleverage` trigger; the withdrawal past the balance was refused.
    let (_, t) = node.json("/v1/triggers?after=20");
    let deleverage: Vec<&Value> =
        t["triggers"].as_array().expect("a list").iter().filter(|t| t["kind"] == "deleverage").collect();
    assert_eq!(deleverage.len(), 1, "{t}");
    assert_eq!((deleverage[0]["offset"].as_u64(), deleverage[0]["account"].as_str()), (Some(21), Some("D")));
    assert_eq!(deleverage[0]["uncovered"], "15.00000000");
}

#[test]
fn the_insurance_fund_and_its_fills_are_served_and_survive_kill_9_and_a_restart() {
    // Proves GET /v1/insurance (the published checks' figures, paging, the last fills), the deleverage trigger,
    // the fund's metrics, and that all of it is the same after kill -9 (the fund refolded from the journal) and
    // after a clean stop (the fund stored with the node state at the final checkpoint).
    let (mut node, dir) = start(&["--checkpoint-events", "5"]);
    let v = node.events(LIQUIDATIONS);
    assert_eq!(v["last"].as_u64(), Some(22));
    let reasons: Vec<(u64, &str)> = v["rejections"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|r| (r["offset"].as_u64().unwrap_or(0), r["reason"].as_str().unwrap_or("?")))
        .collect();
    assert_eq!(reasons, vec![(22, "insufficient_balance")]);
    assert_insurance_after_liquidations(&node);
    let metrics = node.get("/metrics").expect("metrics").text().expect("text");
    for line in [
        "vigil_insurance_fund_balance -15",
        "vigil_insurance_fund_fees 71.925",
        "vigil_insurance_fund_paid 20",
        "vigil_insurance_fund_uncovered 15",
        "vigil_liquidation_fills_total{outcome=\"fee\"} 2",
        "vigil_liquidation_fills_total{outcome=\"deficit\"} 2",
        "vigil_triggers_total{kind=\"deleverage\"} 1",
    ] {
        assert!(metrics.lines().any(|l| l == line), "missing {line:?} in\n{metrics}");
    }

    node.child.kill().expect("kill -9");
    let _ = node.child.wait();
    let mut node = start_in(dir.path(), &[]);
    assert_insurance_after_liquidations(&node);
    let metrics = node.get("/metrics").expect("metrics").text().expect("text");
    assert!(metrics.lines().any(|l| l == "vigil_insurance_fund_uncovered 15"), "restored gauges:\n{metrics}");

    let status = Command::new("kill").args(["-TERM", &node.child.id().to_string()]).status().expect("kill -TERM");
    assert!(status.success());
    assert!(node.child.wait().expect("exit").success());
    let node = start_in(dir.path(), &[]);
    assert_insurance_after_liquidations(&node);
}

#[test]
fn the_adl_queue_ranks_one_side_at_one_offset_and_accounts_show_their_buckets() {
    // Proves GET /v1/adl/{symbol}: Binance's ranking computed by hand (scores 0.75, 0.6, −0.119 for the longs),
    // ranks and buckets, the side's own queue, refusals; and each position's `adl_bucket` in the account object
    // once the board has been built (waited for, never slept for).
    let (node, _dir) = start(&["--adl-refresh-ms", "20"]);
    node.events(
        r#"{"type":"perp","symbol":"ETH","tiers":[{"imr":"0.1","mmr":"0.05"}]}
{"type":"price","symbol":"ETH","price":"3000"}
{"type":"deposit","account":"L1","asset":"USDC","amount":"1000"}
{"type":"deposit","account":"L2","asset":"USDC","amount":"1000"}
{"type":"deposit","account":"L3","asset":"USDC","amount":"3000"}
{"type":"deposit","account":"S1","asset":"USDC","amount":"1000"}
{"type":"trade","account":"L1","symbol":"ETH","side":"buy","qty":"1","price":"2000"}
{"type":"trade","account":"L2","symbol":"ETH","side":"buy","qty":"2","price":"2500"}
{"type":"trade","account":"L3","symbol":"ETH","side":"buy","qty":"1","price":"3500"}
{"type":"trade","account":"S1","symbol":"ETH","side":"sell","qty":"1","price":"3500"}
"#,
    );
    let (s, q) = node.json("/v1/adl/ETH?side=long&limit=2");
    assert_eq!(s, StatusCode::OK, "{q}");
    assert_eq!((q["symbol"].as_str(), q["side"].as_str()), (Some("ETH"), Some("long")));
    assert_eq!((q["offset"].as_u64(), q["positions"].as_u64()), (Some(10), Some(3)));
    let queue = q["queue"].as_array().expect("a list");
    let ranked: Vec<(u64, u64, &str)> = queue
        .iter()
        .map(|e| {
            (e["rank"].as_u64().unwrap_or(0), e["bucket"].as_u64().unwrap_or(0), e["account"].as_str().unwrap_or("?"))
        })
        .collect();
    assert_eq!(ranked, vec![(1, 5, "L1"), (2, 4, "L2")]);
    // L1: pnl ratio 1 000 / 2 000 = 0.5, leverage 3 000 / 2 000 = 1.5; L2: 1 000 / 5 000 = 0.2, 6 000 / 2 000 = 3.
    let score = |i: usize| queue[i]["score"].as_f64().unwrap_or(f64::NAN);
    assert!((score(0) - 0.75).abs() < 1e-12 && (score(1) - 0.6).abs() < 1e-12, "{q}");
    assert_eq!(
        (queue[0]["qty"].as_str(), queue[0]["unrealized_pnl"].as_str()),
        (Some("1.00000000"), Some("1000.00000000"))
    );
    let (_, all) = node.json("/v1/adl/ETH?side=long");
    let last = &all["queue"][2];
    // L3 loses: pnl ratio −500 / 3 500, leverage 3 000 / 2 500: score −0.142857 / 1.2; rank 3 of 3 is bucket 2.
    assert_eq!((last["account"].as_str(), last["bucket"].as_u64()), (Some("L3"), Some(2)));
    assert!((last["score"].as_f64().unwrap_or(f64::NAN) + 500.0 / 3500.0 / 1.2).abs() < 1e-12, "{all}");
    let (_, shorts) = node.json("/v1/adl/ETH?side=short");
    assert_eq!((shorts["positions"].as_u64(), shorts["queue"][0]["account"].as_str()), (Some(1), Some("S1")));

    let (s, e) = node.json("/v1/adl/ETH?side=up");
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_side")));
    let (s, e) = node.json("/v1/adl/ETH");
    assert_eq!((s, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_side")));
    let (s, e) = node.json("/v1/adl/DOGE?side=long");
    assert_eq!((s, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_symbol")));
    // An option is not deleveraged; an asset is not an instrument.
    node.events(
        r#"{"type":"asset","asset":"BTC"}
{"type":"option","symbol":"BTC-C","underlying":"BTC","right":"call","strike":"50000","expiry":"2030-01-01T00:00:00Z"}"#,
    );
    let (s, e) = node.json("/v1/adl/BTC-C?side=long");
    assert_eq!((s, e["code"].as_str()), (StatusCode::UNPROCESSABLE_ENTITY, Some("invalid_reference")), "{e}");
    let (s, e) = node.json("/v1/adl/BTC?side=long");
    assert_eq!((s, e["code"].as_str()), (StatusCode::NOT_FOUND, Some("unknown_symbol")), "{e}");

    // The account object: each position's bucket, from the board the node rebuilds in the background.
    let deadline = Instant::now() + Duration::from_secs(60);
    let bucket = |account: &str| node.json(&format!("/v1/accounts/{account}")).1["positions"][0]["adl_bucket"].as_u64();
    while bucket("L3").is_none() {
        assert!(Instant::now() < deadline, "the ADL board was never built");
        std::thread::sleep(Duration::from_millis(10));
    }
    let buckets: Vec<Option<u64>> = ["L1", "L2", "L3", "S1"].iter().map(|a| bucket(a)).collect();
    assert_eq!(buckets, vec![Some(5), Some(4), Some(2), Some(5)]);
}

#[test]
fn binary_check_frames_answer_as_http_does_in_order_and_pipelined() {
    // Proves the binary check path (docs/wire.md, "Checks"): each answer equals the HTTP check's for the same
    // fill, in the frame's order across shards; refusals carry HTTP's codes; `min_offset` reads the writes before
    // it and one beyond the sequenced offset is refused; pipelined frames are answered in order.
    let (node, _dir) = start(&[]);
    node.events(SETUP);
    node.events(
        r#"{"type":"deposit","account":"bob","asset":"USDC","amount":"50000"}
{"type":"trade","account":"alice","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#,
    );
    let fill = |account: &str, symbol: &str, qty: &str| {
        let line = format!(
            r#"{{"type":"trade","account":"{account}","symbol":"{symbol}","side":"buy","qty":"{qty}","price":"3000"}}"#
        );
        match parse_line(&line).expect("a trade") {
            vigil_model::Event::Trade(f) => f,
            _ => unreachable!("a trade line"),
        }
    };
    let fills =
        vec![fill("alice", "ETH", "3"), fill("bob", "ETH", "1"), fill("alice", "SOL", "1"), fill("nobody", "ETH", "1")];
    let mut client = Client::connect(&node.ingest).expect("connect");
    let answers = client.check(Offset(6), &fills).expect("answers");
    assert_eq!(answers.len(), fills.len());
    for (f, a) in fills.iter().zip(&answers) {
        let body = format!(r#"{{"symbol":"{}","side":"buy","qty":"{}","price":"3000"}}"#, f.symbol, f.qty);
        let (status, http) = node.post(&format!("/v1/accounts/{}/check?min_offset=6", f.account), body, None);
        match a {
            CheckAnswer::Answered { allowed, reason, equity, initial_margin, maintenance_margin, available } => {
                assert_eq!(status, StatusCode::OK, "{http}");
                assert_eq!(http["allowed"].as_bool(), Some(*allowed));
                assert_eq!(http["reason"].as_str(), reason.as_deref());
                let figures = [equity, initial_margin, maintenance_margin, available].map(ToString::to_string);
                let from_http = ["equity", "initial_margin", "maintenance_margin", "available"]
                    .map(|k| http[k].as_str().unwrap_or("?").to_owned());
                assert_eq!(figures, from_http, "{}", f.account);
            }
            CheckAnswer::Refused { code, .. } => {
                assert_ne!(status, StatusCode::OK, "{http}");
                assert_eq!(http["code"].as_str(), Some(code.as_str()), "{}", f.account);
            }
        }
    }
    assert!(
        matches!(&answers[0], CheckAnswer::Answered { allowed: false, reason: Some(r), .. } if r == "insufficient_margin")
    );
    assert!(matches!(&answers[1], CheckAnswer::Answered { allowed: true, .. }));
    assert!(matches!(&answers[2], CheckAnswer::Refused { code, .. } if code == "unknown_symbol"));

    // Beyond the sequenced offset: every check of the frame is refused, the connection stays.
    let beyond = client.check(Offset(1_000_000), &fills[..1]).expect("answers");
    assert!(matches!(&beyond[0], CheckAnswer::Refused { code, .. } if code == "offset_not_sequenced"));
    // A fill that breaks a trade's rules (a zero quantity) is refused like the HTTP body.
    let mut zero = fill("alice", "ETH", "1");
    zero.qty = vigil_model::Qty::ZERO;
    let zero = client.check(Offset(0), &[zero]).expect("answers");
    assert!(
        matches!(&zero[0], CheckAnswer::Refused { code, .. } if code == "invalid_number" || code == "invalid_event"),
        "{zero:?}"
    );
    // Pipelined: three frames out, then three answers, in order.
    for n in 1..=3 {
        client.send_checks(Offset(0), &fills[..n]).expect("sent");
    }
    for n in 1..=3 {
        assert_eq!(client.read_checks().expect("answers"), answers[..n].to_vec());
    }
}

#[test]
fn a_batch_of_checks_answers_each_as_its_single_check_does_in_order() {
    // Proves `POST /v1/checks`: each element's answer equals `POST /v1/accounts/{id}/check` for the same check
    // (figures, or the refusal's code), in the body's order across shards and accounts; an element that is no
    // trade is refused in its place without failing the others; a body that is not an array of checks, or an empty
    // one, is refused whole; `min_offset` beyond the sequenced offset refuses every element.
    let (node, _dir) = start(&[]);
    node.events(SETUP);
    node.events(
        r#"{"type":"deposit","account":"bob","asset":"USDC","amount":"50000"}
{"type":"trade","account":"alice","symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#,
    );
    let singles = [
        ("alice", r#"{"symbol":"ETH","side":"buy","qty":"3","price":"3000"}"#),
        ("bob", r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#),
        ("alice", r#"{"symbol":"SOL","side":"buy","qty":"1","price":"3000"}"#),
        ("bob", r#"{"symbol":"ETH","side":"up","qty":"1","price":"3000"}"#),
        ("alice", r#"{"symbol":"ETH","side":"sell","qty":"0.5","price":"2990","margin_mode":"cross"}"#),
    ];
    let mut elements: Vec<String> = singles.iter().map(|(a, b)| format!(r#"{{"account":"{a}",{}"#, &b[1..])).collect();
    elements.push(r#"{"symbol":"ETH","side":"buy","qty":"1","price":"3000"}"#.into()); // no account
    elements.push("7".into());
    let (status, batch) = node.post("/v1/checks?min_offset=6", format!("[{}]", elements.join(",")), None);
    assert_eq!(status, StatusCode::OK, "{batch}");
    let answers = batch.as_array().expect("an array of answers");
    assert_eq!(answers.len(), elements.len());
    for ((account, body), got) in singles.iter().zip(answers) {
        let (status, single) = node.post(&format!("/v1/accounts/{account}/check?min_offset=6"), *body, None);
        if status == StatusCode::OK {
            assert_eq!(got, &single, "{account} {body}");
        } else {
            assert_eq!(got["code"], single["code"], "{account} {body}: {got} against {single}");
        }
    }
    assert_eq!(answers[0]["reason"].as_str(), Some("insufficient_margin"), "{batch}");
    assert_eq!(answers[1]["allowed"].as_bool(), Some(true), "{batch}");
    assert_eq!(answers[2]["code"].as_str(), Some("unknown_symbol"), "{batch}");
    assert_eq!(answers[3]["code"].as_str(), Some("invalid_event"), "{batch}");
    assert_eq!(answers[5]["code"].as_str(), Some("invalid_event"), "{batch}");
    assert_eq!(answers[6]["code"].as_str(), Some("invalid_event"), "{batch}");

    let (status, e) = node.post("/v1/checks", r#"{"account":"alice"}"#, None);
    assert_eq!((status, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_event")), "{e}");
    let (status, e) = node.post("/v1/checks", "[]", None);
    assert_eq!((status, e["code"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_event")), "{e}");
    let (status, beyond) = node.post("/v1/checks?min_offset=1000000", format!("[{}]", elements[0]), None);
    assert_eq!(status, StatusCode::OK, "{beyond}");
    assert_eq!(beyond[0]["code"].as_str(), Some("offset_not_sequenced"), "{beyond}");
}
