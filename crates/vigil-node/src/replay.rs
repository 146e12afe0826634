//! `vigil replay`: JSON Lines in, the replay document of `events.md` out.
//!
//! Input streams line by line (a line is at most [`LINE_BYTES_MAX`]); triggers and rejections are spooled to
//! temporary files as they happen, so memory is bounded by the accounts' state, not by the input's length.

use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use vigil_engine::{Config, merged_views};
use vigil_model::view::{Document, fund_json, write_document};
use vigil_model::{Offset, Reason, parse_line};

use crate::pipeline::{Pipeline, PipelineConfig, Released, Wait};

/// Longest accepted line, in bytes; a longer line is rejected whole as `invalid_event`.
pub const LINE_BYTES_MAX: usize = 1 << 20;

#[derive(Clone, Debug)]
pub struct ReplayOptions {
    pub shards: usize,
    pub config: Config,
    pub wait: Wait,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        Self { shards: 1, config: Config::default(), wait: Wait::Park }
    }
}

/// Counts of what a replay saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplaySummary {
    pub offset: Offset,
    pub accounts: usize,
    pub triggers: u64,
    pub rejections: u64,
}

/// A progress report, at most about once a second.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub offset: Offset,
    pub elapsed: Duration,
}

struct Spool {
    writer: BufWriter<File>,
    count: u64,
}

impl Spool {
    fn new() -> anyhow::Result<Self> {
        let file = tempfile::tempfile().context("creating a spool file for replay output")?;
        Ok(Self { writer: BufWriter::new(file), count: 0 })
    }

    fn push(&mut self, json: &str) -> io::Result<()> {
        self.count += 1;
        self.writer.write_all(json.as_bytes())?;
        self.writer.write_all(b"\n")
    }

    fn into_lines(self) -> anyhow::Result<impl Iterator<Item = io::Result<String>>> {
        let mut file = self.writer.into_inner().map_err(|e| e.into_error()).context("flushing a spool file")?;
        file.seek(SeekFrom::Start(0)).context("rewinding a spool file")?;
        Ok(BufReader::new(file).lines())
    }
}

/// Reads one line into `buf` (without its line ending). `Ok(None)` at end of input; `Ok(Some(false))` for a
/// line longer than `LINE_BYTES_MAX`, which is consumed and discarded.
pub(crate) fn read_line<R: BufRead>(input: &mut R, buf: &mut Vec<u8>) -> io::Result<Option<bool>> {
    buf.clear();
    let n = input.by_ref().take(LINE_BYTES_MAX as u64 + 1).read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(None);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
        return Ok(Some(true));
    }
    if buf.len() <= LINE_BYTES_MAX {
        return Ok(Some(true)); // last line without a newline
    }
    // Too long: skip to the end of the line.
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            break;
        }
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                input.consume(i + 1);
                break;
            }
            None => {
                let l = chunk.len();
                input.consume(l);
            }
        }
    }
    Ok(Some(false))
}

/// Writes released outputs to the spools, keeping the first I/O error.
struct Sink {
    triggers: Spool,
    rejections: Spool,
    liquidations: Spool,
    error: Option<io::Error>,
}

impl Sink {
    fn accept(&mut self, released: Released) {
        let r = match released {
            Released::Trigger(t) => self.triggers.push(&t.to_json()),
            Released::Rejection(r) => self.rejections.push(&r.to_json()),
            Released::Liquidation(l) => self.liquidations.push(&l.to_json()),
            Released::Fund(..) => Ok(()), // the document shows the fund at the end
        };
        if let Err(e) = r {
            self.error.get_or_insert(e);
        }
    }
}

/// Replays a JSON Lines stream through the threaded pipeline and writes the replay document to `out`.
pub fn replay<R: BufRead, W: Write>(
    mut input: R,
    out: &mut W,
    options: &ReplayOptions,
    mut progress: Option<&mut dyn FnMut(Progress)>,
) -> anyhow::Result<ReplaySummary> {
    let config = PipelineConfig {
        engine: options.config.clone(),
        shards: options.shards,
        wait: options.wait,
        ..PipelineConfig::default()
    };
    let mut pipeline = Pipeline::start(&config).context("starting the shard threads")?;
    let mut sink =
        Sink { triggers: Spool::new()?, rejections: Spool::new()?, liquidations: Spool::new()?, error: None };
    let mut accept = |r: Released| sink.accept(r);
    let mut buf = Vec::with_capacity(1024);
    let started = Instant::now();
    let mut last_report = started;
    loop {
        let Some(fits) = read_line(&mut input, &mut buf).context("reading the event stream")? else { break };
        if fits && buf.iter().all(u8::is_ascii_whitespace) {
            continue; // blank lines are not events
        }
        let parsed = if !fits {
            Err(vigil_model::reject(Reason::InvalidEvent, format!("line longer than {LINE_BYTES_MAX} bytes")))
        } else {
            match std::str::from_utf8(&buf) {
                Ok(line) => parse_line(line),
                Err(e) => Err(vigil_model::reject(Reason::InvalidEvent, format!("line is not UTF-8: {e}"))),
            }
        };
        let offset = match parsed {
            Ok(event) => pipeline.submit(event),
            Err(rejection) => pipeline.reject(rejection),
        };
        if offset.0 % 1024 == 0 {
            pipeline.drain(&mut accept);
            if offset.0 % 65_536 == 0
                && let Some(report) = progress.as_mut()
            {
                let now = Instant::now();
                if now.duration_since(last_report) >= Duration::from_secs(1) {
                    last_report = now;
                    report(Progress { offset, elapsed: now.duration_since(started) });
                }
            }
        }
    }
    let offset = pipeline.offset();
    let (engines, fund) = pipeline.finish_with_fund(&mut accept);
    if let Some(e) = sink.error.take() {
        return Err(e).context("spooling replay output");
    }
    let views = merged_views(&engines);
    let summary = ReplaySummary {
        offset,
        accounts: views.len(),
        triggers: sink.triggers.count,
        rejections: sink.rejections.count,
    };
    write_document(
        out,
        Document {
            offset,
            accounts: views.iter().map(|v| Ok(v.to_json())),
            triggers: sink.triggers.into_lines()?,
            rejections: sink.rejections.into_lines()?,
            insurance_fund: fund_json(&fund),
            liquidations: sink.liquidations.into_lines()?,
        },
    )
    .context("writing the replay document")?;
    out.flush().context("flushing the replay document")?;
    Ok(summary)
}
