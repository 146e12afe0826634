//! `vigil`: the margin engine's command line.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil_engine::{Config, Detection};
use vigil_node::config::NodeSettings;
use vigil_node::pipeline::Wait;
use vigil_node::replay::{Progress, ReplayOptions, replay};
use vigil_testkit::{Workload, write_workload};

// Events are allocated on the sequencer's thread and freed on the shards': glibc's allocator serialises that
// through arena locks and cost the pipeline about half its throughput (docs/performance.md); mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "vigil", version, about = "Vigil: an asynchronous margin engine for derivatives venues")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replays a JSON Lines event stream and prints the resulting state, triggers and rejections.
    Replay {
        /// The event stream (`-` for standard input).
        file: PathBuf,
        /// Number of shards (account partitions); the output is identical for every value.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=1024))]
        shards: u16,
        /// The quote (settlement) currency.
        #[arg(long, default_value = vigil_model::QUOTE_DEFAULT)]
        quote: String,
        /// How ticks find accounts to re-evaluate: `indexed` (safe price bands) or `rescan` (every holder).
        #[arg(long, default_value = "indexed")]
        detection: Detection,
        /// How idle shard threads wait: `spin`, `spin-yield` or `park`.
        #[arg(long, default_value = "park")]
        wait: Wait,
    },
    /// Runs the durable risk node: binary TCP ingest, HTTP API (checks, accounts, trigger stream, metrics), journal
    /// with group commit, checkpoints, crash recovery.
    /// Flags override the optional `--config` file, which overrides the defaults shown.
    Serve {
        /// A TOML file with any of the settings below (keys as the flags, with underscores;
        /// docs/configuration.md).
        #[arg(long)]
        config: Option<PathBuf>,
        #[command(flatten)]
        settings: Box<NodeSettings>,
    },
    /// Publishes a JSON Lines event stream to NATS JetStream for partitioned cluster nodes (docs/cluster.md):
    /// offsets, windows per partition, a window's close stored only after all its messages (windows sent ahead,
    /// each message expecting the stream's last sequence; the stream must have no other writer); resumes after the
    /// stream's last closed window.
    Publish {
        /// The event stream (`-` for standard input).
        file: PathBuf,
        /// NATS servers, `nats://host:port`, comma-separated.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats: String,
        /// Partitions of the accounts (docs/cluster.md gives the hash).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1024))]
        partitions: u32,
        /// Replicas of VIGIL_EVENTS, if the publisher creates it.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=5))]
        replicas: u64,
        /// Events per window at most.
        #[arg(long, default_value_t = 8192)]
        window_events: usize,
        /// VIGIL_EVENTS' duplicate window in seconds, if the publisher creates it.
        #[arg(long, default_value_t = 120)]
        duplicate_secs: u64,
    },
    /// Drives a running node: a workload over TCP at a target rate (or flat out), pre-trade checks over HTTP at a
    /// fixed rate, trigger latency through the live stream; reports throughput and latency percentiles.
    Load {
        /// The node's TCP ingest address.
        #[arg(long, default_value = "127.0.0.1:7878")]
        ingest: String,
        /// The node's HTTP address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http: String,
        /// Bearer token, when the node has one.
        #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// A JSON Lines workload; without it, one is generated (`vigil gen` with the flags below).
        #[arg(long)]
        file: Option<PathBuf>,
        /// Lines of the file that are setup (sent first, unmeasured).
        #[arg(long, default_value_t = 0)]
        setup: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// Events after the setup.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Percent of accounts opened close to maintenance margin (more triggers).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
        near: u32,
        /// Per-tick volatility of the price walk.
        #[arg(long, default_value_t = 0.0005)]
        volatility: f64,
        /// Target events per second; 0 sends flat out.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Events per batch.
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// TCP connections. Batches on different connections are sequenced in whatever order they arrive: with
        /// more than one, a file's events reach the node in another order than the file's (use 1 to compare the node
        /// with a replay of the file).
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Pre-trade checks per second over HTTP (0 = none), alongside the ingest.
        #[arg(long, default_value_t = 0)]
        checks_rate: u64,
        /// Seconds of checks.
        #[arg(long, default_value_t = 10)]
        checks_secs: u64,
        /// Send the checks over the binary TCP path (docs/wire.md, "Checks") instead of HTTP, this many per
        /// frame, frames pipelined on one connection (0 = HTTP).
        #[arg(long, default_value_t = 0)]
        checks_wire: usize,
        /// Send this many checks per HTTP request, to POST /v1/checks (0 or 1: one per request, to
        /// POST /v1/accounts/{id}/check).
        #[arg(long, default_value_t = 0)]
        checks_batch: usize,
        /// Measure trigger latency through GET /v1/triggers/stream.
        #[arg(long)]
        triggers: bool,
        /// Do not send the workload's setup (the node has it from an earlier run with the same seed and sizes).
        #[arg(long)]
        skip_setup: bool,
        /// Producer id of the stream's batches (connection k sends as ID-k, batches numbered from 1): a batch
        /// resent after a lost ack is applied once. Default: an id unique to the run.
        #[arg(long)]
        producer: Option<String>,
        /// Seconds a connection keeps reconnecting and resending its in-flight batch after the node went away.
        #[arg(long, default_value_t = 30)]
        resend_secs: u64,
    },
    /// Shows what a node's data directory holds: journal segments and durable offset, checkpoint watermarks.
    Inspect {
        /// The node's data directory.
        #[arg(long)]
        data: PathBuf,
        /// Read every journal record and check its CRC and offset.
        #[arg(long)]
        verify: bool,
    },
    /// Replays a JSON Lines file and writes the book at its last offset as CSV files (instruments, prices, accounts,
    /// balances, positions, and a manifest), for analysts and for reconciliation with other tools.
    Export {
        /// The input file (`-` for standard input); or `--data`.
        #[arg(required_unless_present = "data")]
        input: Option<PathBuf>,
        /// A node's data directory instead of a file: the book at its journal's last record (read-only).
        #[arg(long, conflicts_with = "input")]
        data: Option<PathBuf>,
        /// The directory the CSV files are written to (created if missing).
        #[arg(long, short)]
        out: PathBuf,
        /// The quote currency.
        #[arg(long, default_value = vigil_model::QUOTE_DEFAULT)]
        quote: String,
    },
    /// Revalues the whole book under market moves (named scenarios and grids) and reports the damage: accounts
    /// liquidatable and bankrupt, shortfall, loss by asset, the largest losses, loss curves. Changes nothing.
    /// The report (JSON) goes to standard output; timings to standard error.
    Stress {
        /// The event stream to replay (`-` for standard input); or `--data`, or `--cluster`.
        #[arg(required_unless_present_any = ["data", "cluster"])]
        input: Option<PathBuf>,
        /// Cluster mode (docs/cluster.md): ask one node of every partition of the stream on these NATS servers
        /// (`nats://host:port`, comma-separated) for its part at one offset, and merge them.
        #[arg(long, conflicts_with_all = ["input", "data", "runs"])]
        cluster: Option<String>,
        /// Cluster mode: how long a partition may take to answer, in seconds.
        #[arg(long, default_value_t = 300)]
        cluster_timeout_secs: u64,
        /// A node's data directory instead of a file: the book at its journal's last record (read-only; the shard
        /// count is the directory's).
        #[arg(long, conflicts_with = "input")]
        data: Option<PathBuf>,
        /// Shards (threads) a replayed file is split into.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=1024))]
        shards: u16,
        /// The quote currency.
        #[arg(long, default_value = vigil_model::QUOTE_DEFAULT)]
        quote: String,
        /// A request file: `{"scenarios": [...], "grids": [...], "top": N}` (docs/api.md).
        #[arg(long, conflicts_with_all = ["scenario", "grid"])]
        request: Option<PathBuf>,
        /// A scenario, e.g. '{"name":"crash","moves":{"BTC":"-0.3"},"vol":{"BTC":"0.5"}}' (repeatable).
        #[arg(long)]
        scenario: Vec<String>,
        /// A grid, e.g. '{"underlying":"BTC","from":"-0.5","to":"0.5","steps":21}' (repeatable).
        #[arg(long)]
        grid: Vec<String>,
        /// Accounts listed per scenario, by loss (with --scenario/--grid).
        #[arg(long, default_value_t = vigil_node::stress::TOP_DEFAULT)]
        top: usize,
        /// Draw each grid's loss curve into this SVG file.
        #[arg(long)]
        plot: Option<PathBuf>,
        /// Run the request this many times and report the best time (for measurements).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
        runs: u32,
    },
    /// Cluster mode (docs/cluster.md): one side of a symbol's auto-deleveraging queue over every partition at one
    /// offset, as `GET /v1/adl/{symbol}` answers for one node.
    Adl {
        /// The perpetual or future.
        symbol: String,
        /// NATS servers of the cluster, `nats://host:port`, comma-separated.
        #[arg(long)]
        cluster: String,
        /// `long` or `short`.
        #[arg(long)]
        side: String,
        /// Positions listed, from the front of the queue.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=10_000))]
        limit: u64,
        /// How long a partition may take to answer, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
    /// Writes a synthetic, seeded event stream (JSON Lines) for benches and demos.
    Gen {
        /// Output file (`-` for standard output).
        #[arg(long, short, default_value = "-")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(long, default_value_t = 10_000)]
        accounts: usize,
        /// Perpetuals (options come on top).
        #[arg(long, default_value_t = 8)]
        instruments: usize,
        #[arg(long, default_value_t = 4)]
        options: usize,
        /// Events after the setup.
        #[arg(long, default_value_t = 1_000_000)]
        events: usize,
        /// Share of ticks in the mix, in parts.
        #[arg(long, default_value_t = 80)]
        ticks: u32,
        /// Share of trades in the mix, in parts.
        #[arg(long, default_value_t = 20)]
        trades: u32,
        /// Share of funding events in the mix, in parts.
        #[arg(long, default_value_t = 0)]
        funding: u32,
        /// Percent of accounts opened close to maintenance margin.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=100))]
        near: u32,
        /// Per-tick volatility of the price walk.
        #[arg(long, default_value_t = 0.0005)]
        volatility: f64,
    },
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve { config, settings } => {
            init_logs("info");
            let file = match config {
                Some(path) => NodeSettings::load(&path)?,
                None => NodeSettings::default(),
            };
            let config = settings.resolve(file)?;
            vigil_node::serve::serve(config, |bound| {
                // Scripts and tests read these lines to find the ports. A closed standard output (a reader that
                // took the first line and left) must not stop the node: errors are ignored, never panicked on.
                let mut out = io::stdout().lock();
                let _ = writeln!(out, "listening on {}", bound.ingest);
                let _ = writeln!(out, "http on {}", bound.http);
                let _ = out.flush();
            })
        }
        Command::Publish { file, nats, partitions, replicas, window_events, duplicate_secs } => {
            init_logs("warn");
            let mut config = vigil_node::cluster::publish::PublishConfig::new(&nats, partitions);
            config.replicas = replicas as usize;
            config.window_events = window_events.max(1);
            config.duplicate_window = std::time::Duration::from_secs(duplicate_secs.max(1));
            let input: Box<dyn io::Read + Send> = if file.as_os_str() == "-" {
                Box::new(io::stdin())
            } else {
                Box::new(std::fs::File::open(&file).with_context(|| format!("opening {}", file.display()))?)
            };
            let runtime = runtime()?;
            let started = std::time::Instant::now();
            let summary = runtime.block_on(vigil_node::cluster::publish::publish(input, &config, |_| {}))?;
            let secs = started.elapsed().as_secs_f64();
            let events = summary.last.0 - summary.resumed_after.0;
            let mut out = io::stdout().lock();
            if events == 0 {
                writeln!(out, "nothing to publish: the stream holds offsets 1..={} of this input", summary.last.0)?;
                return Ok(());
            }
            let resends = match summary.resends {
                0 => String::new(),
                n => format!(", resent one window at a time {n} time(s)"),
            };
            writeln!(
                out,
                "published offsets {}..={} ({events} events, {} windows, {} messages, {} duplicates{resends}) in \
                 {secs:.2} s ({:.0} events/s)",
                summary.resumed_after.0 + 1,
                summary.last.0,
                summary.windows,
                summary.messages,
                summary.duplicates,
                events as f64 / secs.max(1e-9)
            )?;
            Ok(())
        }
        Command::Load {
            ingest,
            http,
            token,
            file,
            setup,
            seed,
            accounts,
            events,
            near,
            volatility,
            rate,
            batch,
            connections,
            checks_rate,
            checks_secs,
            checks_wire,
            checks_batch,
            triggers,
            skip_setup,
            producer,
            resend_secs,
        } => {
            let (stream, setup) = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    (vigil_node::load::read_workload(&text)?, setup)
                }
                None => {
                    let w = Workload {
                        seed,
                        accounts,
                        events,
                        near_percent: near,
                        volatility,
                        options: 0,
                        ..Workload::default()
                    };
                    let mut text = Vec::new();
                    write_workload(&w, &mut text).context("generating the workload")?;
                    let text = String::from_utf8(text).context("the workload is UTF-8")?;
                    let all = vigil_node::load::read_workload(&text)?;
                    let setup = all.len().saturating_sub(events);
                    (all, setup)
                }
            };
            let options = vigil_node::load::LoadOptions {
                ingest,
                http,
                token,
                rate,
                batch,
                connections,
                checks_rate,
                checks_secs,
                checks_wire,
                checks_batch,
                triggers,
                skip_setup,
                progress: io::stderr().is_terminal(),
                producer,
                resend_for: std::time::Duration::from_secs(resend_secs),
            };
            let report = vigil_node::load::run(&options, &stream, setup)?;
            vigil_node::load::print(&report, &mut io::stdout().lock()).context("writing the report")
        }
        Command::Export { input, data, out, quote } => {
            let config = vigil_engine::Config { quote, ..vigil_engine::Config::default() };
            // One shard for a file: the book is the same for every shard count.
            let book = load_book(input.as_deref(), data.as_deref(), &config, 1)?;
            let exported = vigil_node::export::export(&book, &out)?;
            vigil_node::export::print(&exported, &out, &mut io::stdout().lock()).context("writing the summary")
        }
        Command::Stress {
            input,
            data,
            cluster,
            cluster_timeout_secs,
            shards,
            quote,
            request,
            scenario,
            grid,
            top,
            plot,
            runs,
        } => {
            let (request, body) = match request {
                Some(path) => {
                    let body = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
                    let parsed = vigil_node::stress::parse_request(body.as_bytes())
                        .with_context(|| format!("in {}", path.display()))?;
                    (parsed, body)
                }
                None => {
                    let body = format!(
                        "{{\"scenarios\":[{}],\"grids\":[{}],\"top\":{top}}}",
                        scenario.join(","),
                        grid.join(",")
                    );
                    (stress_request(&scenario, &grid, top)?, body)
                }
            };
            if let Some(url) = cluster {
                let runtime = runtime()?;
                let started = std::time::Instant::now();
                let timeout = std::time::Duration::from_secs(cluster_timeout_secs.max(1));
                let report =
                    runtime.block_on(vigil_node::cluster::stress::run_cluster(&url, &body, &request, timeout))?;
                eprintln!(
                    "stress: {} scenario(s) over every partition at offset {} in {:.1} ms",
                    report.result.scenarios.len(),
                    report.offset.0,
                    started.elapsed().as_secs_f64() * 1e3
                );
                if let Some(path) = &plot {
                    vigil_node::stress::plot(&report, path)?;
                    eprintln!("loss curve drawn in {}", path.display());
                }
                let mut out = io::stdout().lock();
                out.write_all(report.to_string_pretty().as_bytes()).context("writing the report")?;
                return writeln!(out).context("writing the report");
            }
            let config = vigil_engine::Config { quote, ..vigil_engine::Config::default() };
            let loaded = std::time::Instant::now();
            let book = load_book(input.as_deref(), data.as_deref(), &config, usize::from(shards))?;
            let accounts: usize = book.engines.iter().map(vigil_engine::Engine::account_count).sum();
            eprintln!(
                "book: {accounts} accounts at offset {} on {} shard(s), loaded in {:.2} s",
                book.offset.0,
                book.engines.len(),
                loaded.elapsed().as_secs_f64()
            );
            let progress = vigil_node::stress::stderr_is_terminal();
            let mut best = None::<std::time::Duration>;
            let mut report = None;
            for _ in 0..runs {
                let started = std::time::Instant::now();
                let mut r = vigil_node::stress::run(&book.engines, book.offset, &request, progress)?;
                r.fund = Some(book.fund);
                let took = started.elapsed();
                best = Some(best.map_or(took, |b| b.min(took)));
                report = Some(r);
            }
            let (Some(report), Some(best)) = (report, best) else { anyhow::bail!("no run") };
            let n = report.result.scenarios.len();
            eprintln!(
                "stress: {n} scenario(s) in {:.1} ms (best of {runs}), {:.1} ms per scenario",
                best.as_secs_f64() * 1e3,
                best.as_secs_f64() * 1e3 / n.max(1) as f64
            );
            if let Some(path) = &plot {
                vigil_node::stress::plot(&report, path)?;
                eprintln!("loss curve drawn in {}", path.display());
            }
            let mut out = io::stdout().lock();
            out.write_all(report.to_string_pretty().as_bytes()).context("writing the report")?;
            writeln!(out).context("writing the report")
        }
        Command::Adl { symbol, cluster, side, limit, timeout_secs } => {
            let long = match side.as_str() {
                "long" => true,
                "short" => false,
                other => anyhow::bail!("--side must be long or short, got {other:?}"),
            };
            let runtime = runtime()?;
            let timeout = std::time::Duration::from_secs(timeout_secs.max(1));
            let queue = runtime.block_on(vigil_node::cluster::stress::adl_cluster(
                &cluster,
                &symbol,
                long,
                limit as usize,
                timeout,
            ))?;
            let mut out = io::stdout().lock();
            writeln!(out, "{queue}").context("writing the queue")
        }
        Command::Inspect { data, verify } => {
            let mut out = io::stdout().lock();
            vigil_node::inspect::inspect(&data, verify, &mut out)
        }
        Command::Gen {
            out,
            seed,
            accounts,
            instruments,
            options,
            events,
            ticks,
            trades,
            funding,
            near,
            volatility,
        } => {
            let w = Workload {
                seed,
                accounts,
                instruments,
                options,
                events,
                ticks,
                trades,
                funding,
                near_percent: near,
                volatility,
            };
            gen_command(out, w)
        }
        Command::Replay { file, shards, quote, detection, wait } => {
            let options = ReplayOptions { shards: usize::from(shards), config: Config { quote, detection }, wait };
            let stdout = io::stdout();
            let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
            let show = io::stderr().is_terminal();
            let mut report = |p: Progress| {
                let rate = p.offset.0 as f64 / p.elapsed.as_secs_f64().max(1e-9);
                eprint!("\rreplay: offset {} ({:.0} events/s)   ", p.offset.0, rate);
            };
            let progress: Option<&mut dyn FnMut(Progress)> = if show { Some(&mut report) } else { None };
            let summary = if file.as_os_str() == "-" {
                replay(io::stdin().lock(), &mut out, &options, progress)?
            } else {
                let f = File::open(&file).with_context(|| format!("opening {}", file.display()))?;
                replay(BufReader::with_capacity(1 << 16, f), &mut out, &options, progress)?
            };
            out.flush().context("writing to standard output")?;
            if show {
                eprintln!(
                    "\rreplay: {} events, {} accounts, {} triggers, {} rejections",
                    summary.offset.0, summary.accounts, summary.triggers, summary.rejections
                );
            }
            Ok(())
        }
    }
}

fn gen_command(out: PathBuf, w: Workload) -> anyhow::Result<()> {
    let sink: Box<dyn Write> = if out.as_os_str() == "-" {
        Box::new(io::stdout().lock())
    } else {
        Box::new(File::create(&out).with_context(|| format!("creating {}", out.display()))?)
    };
    let mut o = BufWriter::with_capacity(1 << 16, sink);
    let lines = write_workload(&w, &mut o).context("writing the workload")?;
    o.flush().with_context(|| format!("writing {}", out.display()))?;
    if io::stderr().is_terminal() {
        eprintln!("gen: {lines} lines");
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Command::Serve { .. } | Command::Publish { .. } | Command::Load { .. }) {
        no_huge_pages();
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process: for the commands that stream messages (the node, the
/// publisher, the load tool). mimalloc asks for them on its arenas, and a node's stream of short-lived messages
/// then keeps faulting fresh 2 MiB pages in, each zeroed by the kernel: a cluster node catching up took 564–611
/// such faults (1.1–1.2 GiB zeroed) for a 234–290 MiB peak, and a quarter of its CPU was the zeroing. Without
/// them its CPU fell by about a quarter and its peak memory by a quarter; end-to-end cluster throughput did not
/// change beyond this machine's noise (docs/performance.md, "Cluster mode"). The batch commands, which build one
/// large book and read it (`stress`, `replay`, ...), keep the host's setting: huge pages there spare the TLB,
/// and a stress pass over a 1M-account book took 82–85 ms with them against 88–96 ms without, a replay 1.49–1.55 s
/// against 1.60–1.71 s (docs/performance.md, "Stress tests").
/// Best effort: a kernel without the setting leaves the default.
fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = nix::sys::prctl::set_thp_disable(true);
}

/// The book of a replayed file, or of a data directory.
fn load_book(
    input: Option<&std::path::Path>,
    data: Option<&std::path::Path>,
    config: &vigil_engine::Config,
    shards: usize,
) -> anyhow::Result<vigil_node::book::Book> {
    match (input, data) {
        (_, Some(data)) => vigil_node::book::from_data(data, config),
        (Some(input), None) => vigil_node::book::replay_path(input, config, shards),
        (None, None) => anyhow::bail!("give an input file or --data DIR"),
    }
}

/// A request from `--scenario` and `--grid` flags.
/// Logs to standard error at `RUST_LOG`, or `default`.
fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

/// The async runtime of the commands that talk to NATS.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn stress_request(scenarios: &[String], grids: &[String], top: usize) -> anyhow::Result<vigil_engine::stress::Request> {
    let value = |text: &str, what: &str| -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(text).with_context(|| format!("{what} {text:?} is not JSON"))
    };
    let mut request = vigil_engine::stress::Request { top, ..Default::default() };
    for (i, s) in scenarios.iter().enumerate() {
        request.scenarios.push(vigil_node::stress::parse_scenario(&value(s, "--scenario")?, i)?);
    }
    for g in grids {
        request.grids.push(vigil_node::stress::parse_grid(&value(g, "--grid")?)?);
    }
    request.validate()?;
    Ok(request)
}
