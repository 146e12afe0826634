//! `vigil`: the margin engine's command line.

use std::fs::File;
use std::io::{self, BufReader, BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use vigil_engine::{Config, Detection};
use vigil_node::pipeline::Wait;
use vigil_node::replay::{Progress, ReplayOptions, replay};

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
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vigil: {e:#}");
            ExitCode::FAILURE
        }
    }
}
