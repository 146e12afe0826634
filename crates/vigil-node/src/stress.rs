//! `vigil stress` and `POST /v1/stress`: stress requests read from JSON, run over every shard at one offset, and
//! the report (JSON, and the loss curves drawn as SVG). The revaluation itself is `vigil_engine::stress`.
//!
//! Request: `{"scenarios": [{"name": "crash", "moves": {"BTC": "-0.3"}, "vol": {"BTC": "0.5"}}], "grids":
//! [{"underlying": "BTC", "from": "-0.5", "to": "0.5", "steps": 21}], "top": 10}` (`docs/api.md`).

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use vigil_engine::Engine;
use vigil_engine::account::Exposure;
use vigil_engine::market::Market;
use vigil_engine::stress::{
    Grid, Markets, Part, Pass, Relative, Request, Scenario, ShardStress, StressError, Tally, finish, merge_shards,
};
use vigil_model::num::parse_fixed;
use vigil_model::{Offset, Price};

use crate::pipeline::{ShardJob, StressJob, StressReply};

/// How many accounts a scenario lists when the request does not say.
pub const TOP_DEFAULT: usize = 10;

/// A relative move or shift: a decimal as a JSON string or number.
fn relative(v: &Value, what: &str) -> Result<Relative, StressError> {
    let text = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => return Err(StressError::invalid(format!("{what} must be a decimal (a string or a number)"))),
    };
    parse_fixed(&text)
        .ok()
        .and_then(|x| Relative::try_from(x).ok())
        .ok_or_else(|| StressError::invalid(format!("{what} is {text:?}, not a decimal with at most 8 places")))
}

/// `{"ASSET": "0.1", …}`, sorted by asset.
fn relatives(v: Option<&Value>, what: &str) -> Result<Vec<(String, Relative)>, StressError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let Value::Object(map) = v else {
        return Err(StressError::invalid(format!("{what} must be an object of asset to decimal")));
    };
    let mut out = Vec::with_capacity(map.len());
    for (asset, x) in map {
        out.push((asset.clone(), relative(x, &format!("{what} of {asset:?}"))?));
    }
    out.sort();
    Ok(out)
}

fn object<'a>(v: &'a Value, what: &str, allowed: &[&str]) -> Result<&'a Map<String, Value>, StressError> {
    let Value::Object(map) = v else { return Err(StressError::invalid(format!("{what} must be an object"))) };
    if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(StressError::invalid(format!("{what} has an unknown field {k:?} (expected one of {allowed:?})")));
    }
    Ok(map)
}

/// One scenario object: `{"name", "moves", "vol"}`; `index` names it when it has no name.
pub fn parse_scenario(v: &Value, index: usize) -> Result<Scenario, StressError> {
    let map = object(v, "a scenario", &["name", "moves", "vol"])?;
    let name = match map.get("name") {
        None => format!("scenario {}", index + 1),
        Some(Value::String(s)) if !s.is_empty() && s.len() <= 64 => s.clone(),
        Some(_) => return Err(StressError::invalid("a scenario's name is a string of 1 to 64 bytes")),
    };
    Ok(Scenario { name, moves: relatives(map.get("moves"), "moves")?, vol: relatives(map.get("vol"), "vol")? })
}

/// One grid object: `{"underlying", "from", "to", "steps"}`.
pub fn parse_grid(v: &Value) -> Result<Grid, StressError> {
    let map = object(v, "a grid", &["underlying", "from", "to", "steps"])?;
    let Some(Value::String(underlying)) = map.get("underlying") else {
        return Err(StressError::invalid("a grid needs an underlying (an asset name)"));
    };
    let get = |k: &str| map.get(k).ok_or_else(|| StressError::invalid(format!("a grid needs {k:?}")));
    let steps = get("steps")?
        .as_u64()
        .and_then(|s| u32::try_from(s).ok())
        .ok_or_else(|| StressError::invalid("a grid's steps is a positive integer"))?;
    Ok(Grid {
        underlying: underlying.clone(),
        from: relative(get("from")?, "a grid's from")?,
        to: relative(get("to")?, "a grid's to")?,
        steps,
    })
}

/// A whole request: `{"scenarios": [...], "grids": [...], "top": N}`, validated ([`Request::validate`]).
pub fn parse_request(body: &[u8]) -> Result<Request, StressError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| StressError::invalid(format!("the request is not JSON: {e}")))?;
    let map = object(&v, "a stress request", &["scenarios", "grids", "top"])?;
    let list = |k: &str| match map.get(k) {
        None => Ok(&[][..]),
        Some(Value::Array(items)) => Ok(items.as_slice()),
        Some(_) => Err(StressError::invalid(format!("{k} must be an array"))),
    };
    let scenarios =
        list("scenarios")?.iter().enumerate().map(|(i, s)| parse_scenario(s, i)).collect::<Result<_, _>>()?;
    let grids = list("grids")?.iter().map(parse_grid).collect::<Result<_, _>>()?;
    let top = match map.get("top") {
        None => TOP_DEFAULT,
        Some(t) => t
            .as_u64()
            .and_then(|t| usize::try_from(t).ok())
            .ok_or_else(|| StressError::invalid("top is a non-negative integer"))?,
    };
    let request = Request { scenarios, grids, top };
    request.validate()?;
    Ok(request)
}

/// A stress test's answer: the request, the offset of the cut, and the book's figures now and per scenario (named
/// scenarios first, then each grid's steps).
pub struct Report {
    pub offset: Offset,
    pub request: Request,
    pub result: ShardStress,
    /// The insurance fund at the report's offset, beside the shortfalls (set by the caller, who holds the fund).
    pub fund: Option<vigil_model::liquidation::InsuranceFund>,
}

impl Report {
    /// Each grid with its steps' figures.
    pub fn curves(&self) -> Vec<(&Grid, &[Part])> {
        let mut at = self.request.scenarios.len();
        let mut out = Vec::with_capacity(self.request.grids.len());
        for g in &self.request.grids {
            let end = (at + g.steps as usize).min(self.result.scenarios.len());
            out.push((g, &self.result.scenarios[at.min(end)..end]));
            at = end;
        }
        out
    }

    /// The report as JSON, keys in the documented order (`docs/api.md`).
    pub fn to_string_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.document()).expect("invariant: the report serializes (strings and numbers)")
    }

    /// The report as compact JSON text, keys in the documented order.
    pub fn to_text(&self) -> String {
        serde_json::to_string(&self.document()).expect("invariant: the report serializes (strings and numbers)")
    }

    /// The report as a JSON value (keys sorted: for comparisons).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.document()).expect("invariant: the report serializes (strings and numbers)")
    }

    fn document(&self) -> doc::Report<'_> {
        use doc::*;
        fn rel(pairs: &[(String, Relative)]) -> Vec<(&str, String)> {
            pairs.iter().map(|(a, m)| (a.as_str(), Price(*m).to_string())).collect()
        }
        let exposure = |e: &Exposure| Figures {
            equity: e.equity.to_string(),
            maintenance_margin: e.maintenance_margin.to_string(),
        };
        let counts = |p: &Part| Counts {
            liquidatable: p.liquidatable,
            newly_liquidatable: p.newly_liquidatable,
            bankrupt: p.bankrupt,
            shortfall: p.shortfall.to_string(),
        };
        let scenarios = self
            .request
            .scenarios
            .iter()
            .zip(&self.result.scenarios)
            .map(|(s, p)| Named {
                name: &s.name,
                moves: Pairs(rel(&s.moves)),
                vol: Pairs(rel(&s.vol)),
                counts: counts(p),
                loss_by_asset: p
                    .assets
                    .iter()
                    .map(|a| AssetDoc { asset: &a.asset, loss: a.loss.to_string(), gain: a.gain.to_string() })
                    .collect(),
                top: p
                    .top
                    .iter()
                    .map(|t| TopDoc {
                        account: &t.account,
                        loss: t.loss.to_string(),
                        before: exposure(&t.before),
                        after: exposure(&t.after),
                    })
                    .collect(),
            })
            .collect();
        let grids = self
            .curves()
            .into_iter()
            .map(|(g, parts)| GridDoc {
                underlying: &g.underlying,
                from: Price(g.from).to_string(),
                to: Price(g.to).to_string(),
                steps: g.steps,
                curve: parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| Point { r#move: Price(g.step(i as u32)).to_string(), counts: counts(p) })
                    .collect(),
            })
            .collect();
        let now = &self.result.now;
        Report {
            offset: self.offset.0,
            accounts: now.accounts,
            now: Now { liquidatable: now.liquidatable, bankrupt: now.bankrupt, shortfall: now.shortfall.to_string() },
            insurance_fund: self.fund.map(|f| FundDoc {
                balance: f.balance.to_string(),
                fees: f.fees.to_string(),
                paid: f.paid.to_string(),
                uncovered: f.uncovered.to_string(),
            }),
            scenarios,
            grids,
        }
    }
}

/// The report's JSON shape: fields serialize in declaration order, which is the documented order.
mod doc {
    use serde::Serialize;
    use serde::ser::{SerializeMap, Serializer};

    #[derive(Serialize)]
    pub struct Report<'a> {
        pub offset: u64,
        pub accounts: u64,
        pub now: Now,
        /// The insurance fund at the report's offset (`null` only where the caller has none).
        pub insurance_fund: Option<FundDoc>,
        pub scenarios: Vec<Named<'a>>,
        pub grids: Vec<GridDoc<'a>>,
    }

    #[derive(Serialize)]
    pub struct FundDoc {
        pub balance: String,
        pub fees: String,
        pub paid: String,
        pub uncovered: String,
    }

    #[derive(Serialize)]
    pub struct Now {
        pub liquidatable: u64,
        pub bankrupt: u64,
        pub shortfall: String,
    }

    #[derive(Serialize)]
    pub struct Counts {
        pub liquidatable: u64,
        pub newly_liquidatable: u64,
        pub bankrupt: u64,
        pub shortfall: String,
    }

    /// `{"ASSET": "decimal", …}` in the given order.
    pub struct Pairs<'a>(pub Vec<(&'a str, String)>);

    impl Serialize for Pairs<'_> {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(self.0.len()))?;
            for (k, v) in &self.0 {
                map.serialize_entry(k, v)?;
            }
            map.end()
        }
    }

    #[derive(Serialize)]
    pub struct Named<'a> {
        pub name: &'a str,
        pub moves: Pairs<'a>,
        pub vol: Pairs<'a>,
        #[serde(flatten)]
        pub counts: Counts,
        pub loss_by_asset: Vec<AssetDoc<'a>>,
        pub top: Vec<TopDoc<'a>>,
    }

    #[derive(Serialize)]
    pub struct AssetDoc<'a> {
        pub asset: &'a str,
        pub loss: String,
        pub gain: String,
    }

    #[derive(Serialize)]
    pub struct Figures {
        pub equity: String,
        pub maintenance_margin: String,
    }

    #[derive(Serialize)]
    pub struct TopDoc<'a> {
        pub account: &'a str,
        pub loss: String,
        pub before: Figures,
        pub after: Figures,
    }

    #[derive(Serialize)]
    pub struct GridDoc<'a> {
        pub underlying: &'a str,
        pub from: String,
        pub to: String,
        pub steps: u32,
        pub curve: Vec<Point>,
    }

    #[derive(Serialize)]
    pub struct Point {
        pub r#move: String,
        #[serde(flatten)]
        pub counts: Counts,
    }
}

/// Accounts per piece of work in [`run`]: small enough that a thread on a slower core takes fewer pieces (the
/// threads finish together), large enough that taking one costs nothing next to evaluating it.
pub const CHUNK: usize = 4096;

/// Runs `request` over `engines` (the shards of one book, all at `offset`) on as many threads as shards. The
/// shards' accounts are cut into pieces of [`CHUNK`] that the threads take in turn, whichever shard a piece is
/// of: on a machine whose cores run at different speeds (a virtual machine's neighbours), a thread per shard
/// would wait for the slowest. With `progress`, the accounts done are shown on standard error while it runs.
pub fn run(engines: &[Engine], offset: Offset, request: &Request, progress: bool) -> Result<Report, StressError> {
    request.validate()?;
    let scenarios = request.expand();
    let shocked = engines.iter().map(|e| e.shock_all(&scenarios)).collect::<Result<Vec<_>, _>>()?;
    let passes: Vec<Pass> =
        engines.iter().zip(&shocked).enumerate().map(|(i, (e, s))| Pass::new(i, e, &scenarios, s)).collect();
    // Each thread's own copy of every shard's markets (a market caches what it computes: not shared).
    let copies: Vec<Vec<(Market, Vec<Market>)>> = (0..passes.len())
        .map(|_| engines.iter().zip(&shocked).map(|(e, s)| (e.market().clone(), s.clone())).collect())
        .collect();
    let Some(first) = passes.first() else {
        return Ok(Report { offset, request: request.clone(), result: merge_shards(Vec::new(), 0), fund: None });
    };
    let pieces: Vec<(usize, std::ops::Range<usize>)> = passes
        .iter()
        .enumerate()
        .flat_map(|(i, p)| (0..p.accounts()).step_by(CHUNK).map(move |s| (i, s..(s + CHUNK).min(p.accounts()))))
        .collect();
    let (next, done) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let total: usize = passes.iter().map(Pass::accounts).sum();
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let handles: Vec<_> = copies
            .into_iter()
            .map(|copy| {
                let (passes, pieces, next, done) = (&passes, &pieces, &next, &done);
                scope.spawn(move || {
                    let markets: Vec<Markets> = copy.iter().map(|(now, s)| Markets { now, shocked: s }).collect();
                    let mut tally = Tally::new(first, request.top);
                    while let Some((shard, range)) = pieces.get(next.fetch_add(1, Ordering::Relaxed)) {
                        passes[*shard].run(markets[*shard], range.clone(), &mut tally);
                        done.fetch_add(range.len(), Ordering::Relaxed);
                    }
                    tally
                })
            })
            .collect();
        if progress {
            while !handles.iter().all(|h| h.is_finished()) {
                std::thread::sleep(Duration::from_millis(200));
                eprint!(
                    "\rstress: {} scenario(s), {}/{total} accounts ({} shards), {:.1} s   ",
                    scenarios.len(),
                    done.load(Ordering::Relaxed),
                    engines.len(),
                    started.elapsed().as_secs_f64()
                );
                let _ = std::io::stderr().flush();
            }
            eprintln!();
        }
        handles
            .into_iter()
            .map(|h| match h.join() {
                Ok(t) => t,
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    });
    let markets: Vec<Markets> =
        engines.iter().zip(&shocked).map(|(e, s)| Markets { now: e.market(), shocked: s }).collect();
    Ok(Report { offset, request: request.clone(), result: finish(&passes, &markets, tallies, request.top), fund: None })
}

/// Draws each grid's loss curve (shortfall, and liquidatable accounts on a second axis, against the move) into an
/// SVG file, one chart per grid stacked vertically.
pub fn plot(report: &Report, path: &Path) -> anyhow::Result<()> {
    use plotters::prelude::*;
    let curves = report.curves();
    if curves.is_empty() {
        anyhow::bail!("--plot draws the loss curve of a grid: the request has none");
    }
    let height = 420 * curves.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("drawing {}: {e}", path.display()))?;
    let areas = root.split_evenly((curves.len(), 1));
    for (area, (grid, parts)) in areas.iter().zip(curves) {
        let points: Vec<(f64, f64, f64)> = parts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let x = grid.step(i as u32) as f64 / 1e8;
                (x, p.shortfall.0 as f64 / 1e8, p.liquidatable as f64)
            })
            .collect();
        let (lo, hi) = (grid.from.min(grid.to) as f64 / 1e8, grid.from.max(grid.to) as f64 / 1e8);
        let (lo, hi) = if hi > lo { (lo, hi) } else { (lo - 0.01, hi + 0.01) };
        let max_short = points.iter().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.05;
        let max_liq = points.iter().map(|p| p.2).fold(0.0, f64::max).max(1.0) * 1.05;
        let draw = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", path.display());
        let mut chart = ChartBuilder::on(area)
            .caption(
                format!("{}: shortfall and liquidatable accounts (offset {})", grid.underlying, report.offset.0),
                ("sans-serif", 18),
            )
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(90)
            .right_y_label_area_size(70)
            .build_cartesian_2d(lo..hi, 0.0..max_short)
            .map_err(|e| draw(&e))?
            .set_secondary_coord(lo..hi, 0.0..max_liq);
        chart
            .configure_mesh()
            .x_desc(format!("move of {} (relative)", grid.underlying))
            .y_desc("shortfall (quote)")
            .draw()
            .map_err(|e| draw(&e))?;
        chart.configure_secondary_axes().y_desc("liquidatable accounts").draw().map_err(|e| draw(&e))?;
        chart
            .draw_series(LineSeries::new(points.iter().map(|p| (p.0, p.1)), RED.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label("shortfall")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .draw_secondary_series(LineSeries::new(points.iter().map(|p| (p.0, p.2)), BLUE.stroke_width(2)))
            .map_err(|e| draw(&e))?
            .label("liquidatable")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperMiddle)
            .draw()
            .map_err(|e| draw(&e))?;
    }
    root.present().map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

/// Whether standard error is a terminal (progress is shown only there).
pub fn stderr_is_terminal() -> bool {
    std::io::stderr().is_terminal()
}

/// Why a running node gave no report.
#[derive(Debug)]
pub enum NodeStressError {
    /// The request names something the book does not have, or needs a price it lacks.
    Refused(StressError),
    /// The node is stopping.
    Stopping,
}

/// Runs `request` on a running node: a job through the sequencer (`jobs`), so every one of its `shards` computes
/// its part at the same offset, merged here. Waits as long as the computing takes (a dead shard ends the process;
/// a stopping node drops the job, and this returns `Stopping`).
pub async fn on_node(
    jobs: &tokio::sync::mpsc::Sender<Arc<dyn ShardJob>>,
    shards: usize,
    request: &Request,
) -> Result<Report, NodeStressError> {
    let (job, replies) = stress_job(request);
    jobs.send(job).await.map_err(|_| NodeStressError::Stopping)?;
    collect(replies, shards, request).await
}

/// A stress job for every shard of a node, and where their parts arrive.
pub fn stress_job(request: &Request) -> (Arc<dyn ShardJob>, tokio::sync::mpsc::UnboundedReceiver<StressReply>) {
    let (reply, replies) = tokio::sync::mpsc::unbounded_channel();
    (Arc::new(StressJob { scenarios: request.expand(), top: request.top, reply }), replies)
}

/// Waits for the `shards` parts of a stress job and merges them into the node's report.
pub async fn collect(
    mut replies: tokio::sync::mpsc::UnboundedReceiver<StressReply>,
    shards: usize,
    request: &Request,
) -> Result<Report, NodeStressError> {
    let mut parts = Vec::with_capacity(shards);
    let mut cut = None;
    let mut refused = None;
    while parts.len() + usize::from(refused.is_some()) < shards {
        let Some((_, at, part)) = replies.recv().await else { return Err(NodeStressError::Stopping) };
        // One job, one marker per ring: every shard answers at the same offset.
        debug_assert!(cut.is_none_or(|c| c == at), "invariant: the shards answer a stress job at one offset");
        cut = Some(at);
        match part {
            Ok(p) => parts.push(p),
            // Every shard refuses alike (same market): the first refusal is the answer; the rest are not awaited.
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    if let Some(e) = refused {
        return Err(NodeStressError::Refused(e));
    }
    let result = merge_shards(parts, request.top);
    Ok(Report { offset: cut.unwrap_or(Offset(0)), request: request.clone(), result, fund: None })
}
