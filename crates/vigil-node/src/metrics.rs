//! The node's metrics (docs/operations.md): names, buckets, the Prometheus recorder, cached handles.
//!
//! Everything goes through the `metrics` facade. Hot paths (a shard applying events, the journal committing, the
//! gate releasing) hold handles created once, so recording is an atomic add; labels are bounded sets (shard, event
//! type, reason, kind, route, status, band), never an account. Without an installed recorder (`vigil replay`,
//! tests) the handles are no-ops. Gauges that describe state (offsets, ring occupancy, accounts by band) are
//! sampled off the hot path by `sampler`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use vigil_engine::{MARGIN_BANDS, ShardStats};
use vigil_model::liquidation::InsuranceFund;
use vigil_model::{Amount, Event, LiquidationRecord, Reason, TriggerKind};

pub const BUILD_INFO: &str = "vigil_build_info";
pub const READY: &str = "vigil_ready";
pub const EVENTS_APPLIED: &str = "vigil_events_applied_total";
pub const INGEST_EVENTS: &str = "vigil_ingest_events_total";
pub const INGEST_BATCHES: &str = "vigil_ingest_batches_total";
pub const INGEST_DUPLICATES: &str = "vigil_ingest_duplicate_batches_total";
pub const REJECTIONS: &str = "vigil_rejections_total";
pub const TRIGGERS: &str = "vigil_triggers_total";
pub const TRIGGER_LATENCY: &str = "vigil_tick_to_trigger_seconds";
pub const SEQUENCED: &str = "vigil_sequenced_offset";
pub const DURABLE: &str = "vigil_durable_offset";
pub const RELEASED: &str = "vigil_released_offset";
pub const APPLIED: &str = "vigil_applied_offset";
pub const RING_OCCUPANCY: &str = "vigil_ring_occupancy";
pub const RING_CAPACITY: &str = "vigil_ring_capacity";
pub const FSYNC_SECONDS: &str = "vigil_journal_fsync_seconds";
pub const JOURNAL_BATCH: &str = "vigil_journal_batch_records";
pub const JOURNAL_FAILURES: &str = "vigil_journal_failures_total";
pub const CHECKPOINT_SECONDS: &str = "vigil_checkpoint_seconds";
pub const CHECKPOINT_BYTES: &str = "vigil_checkpoint_bytes";
pub const CHECKPOINT_FAILURES: &str = "vigil_checkpoint_failures_total";
pub const CHECKPOINT_OFFSET: &str = "vigil_checkpoint_offset";
pub const STORE_BYTES: &str = "vigil_checkpoint_store_bytes";
pub const RECOVERY_SECONDS: &str = "vigil_recovery_seconds";
pub const CHECK_SECONDS: &str = "vigil_check_seconds";
pub const ACCOUNTS: &str = "vigil_accounts";
pub const POSITIONS: &str = "vigil_positions";
pub const LIQUIDATING: &str = "vigil_accounts_liquidating";
pub const MARGIN_BAND: &str = "vigil_accounts_by_margin_ratio";
pub const HTTP_REQUESTS: &str = "vigil_http_requests_total";
pub const HTTP_SECONDS: &str = "vigil_http_request_seconds";
pub const PROCESS_CPU: &str = "process_cpu_seconds_total";
pub const CHECKS: &str = "vigil_checks_total";
pub const CLUSTER_TRIGGERS: &str = "vigil_cluster_triggers_published_total";
pub const CLUSTER_TRIGGER_FAILURES: &str = "vigil_cluster_trigger_publish_failures_total";
pub const CLUSTER_FUND_REFUSALS: &str = "vigil_cluster_fund_refusals_total";
pub const CLUSTER_FUND_FOLDED: &str = "vigil_cluster_fund_folded_offset";
pub const CLUSTER_COVERAGE: &str = "vigil_cluster_coverage_offset";
pub const SOURCE_LAG: &str = "vigil_source_lag_messages";
pub const SOURCE_CONSUMED: &str = "vigil_source_consumed_offset";
pub const FUND_BALANCE: &str = "vigil_insurance_fund_balance";
pub const FUND_FEES: &str = "vigil_insurance_fund_fees";
pub const FUND_PAID: &str = "vigil_insurance_fund_paid";
pub const FUND_UNCOVERED: &str = "vigil_insurance_fund_uncovered";
pub const FUND_FLOOR: &str = "vigil_insurance_fund_floor";
pub const LIQUIDATION_FILLS: &str = "vigil_liquidation_fills_total";
pub const STRESS_RUNS: &str = "vigil_stress_runs_total";
pub const STRESS_SECONDS: &str = "vigil_stress_seconds";
pub const STRESS_OFFSET: &str = "vigil_stress_offset";
pub const STRESS_SHORTFALL: &str = "vigil_stress_shortfall";
pub const STRESS_LIQUIDATABLE: &str = "vigil_stress_liquidatable_accounts";
pub const STRESS_BANKRUPT: &str = "vigil_stress_bankrupt_accounts";

/// Latency buckets, in seconds: 10 µs to 10 s.
const SECONDS: [f64; 19] = [
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Records per journal commit.
const RECORDS: [f64; 14] = [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1e3, 2e3, 5e3, 1e4, 1e5];
/// Bytes: 1 KiB to 4 GiB, by 4×.
const BYTES: [f64; 12] = [
    1024.0,
    4096.0,
    16384.0,
    65536.0,
    262_144.0,
    1_048_576.0,
    4_194_304.0,
    16_777_216.0,
    67_108_864.0,
    268_435_456.0,
    1_073_741_824.0,
    4_294_967_296.0,
];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the Prometheus recorder once per process (a second node in the same process, as in the benches,
/// shares it) and starts its upkeep thread. `None` if another recorder was installed first.
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let mut builder = PrometheusBuilder::new();
            for (name, buckets) in [
                (TRIGGER_LATENCY, &SECONDS[..]),
                (FSYNC_SECONDS, &SECONDS[..]),
                (CHECKPOINT_SECONDS, &SECONDS[..]),
                (CHECK_SECONDS, &SECONDS[..]),
                (HTTP_SECONDS, &SECONDS[..]),
                (JOURNAL_BATCH, &RECORDS[..]),
                (CHECKPOINT_BYTES, &BYTES[..]),
            ] {
                builder = builder.set_buckets_for_metric(Matcher::Full(name.into()), buckets).ok()?;
            }
            let handle = builder.install_recorder().ok()?;
            let upkeep = handle.clone();
            // Histograms are drained into their buckets on upkeep; without it they grow.
            let _ = std::thread::Builder::new().name("vigil-metrics".into()).spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            });
            describe();
            gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            // Counters of rare events exist from the start at 0, so `increase()` and alerts see them.
            counter!(JOURNAL_FAILURES).increment(0);
            counter!(CHECKPOINT_FAILURES).increment(0);
            Some(handle)
        })
        .as_ref()
}

/// The exposition text (empty without a recorder).
pub fn render() -> String {
    HANDLE.get().and_then(Option::as_ref).map(PrometheusHandle::render).unwrap_or_default()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(BUILD_INFO, "Build information: 1, labelled by version.");
    describe_gauge!(READY, "1 once recovery has finished and the node serves, else 0.");
    describe_gauge!(PROCESS_CPU, Unit::Seconds, "CPU time (user + system) the node has used since it started.");
    describe_counter!(CHECKS, "Pre-trade checks answered, by transport (http, tcp).");
    describe_counter!(
        CLUSTER_TRIGGERS,
        "Triggers published to VIGIL_TRIGGERS (cluster mode), by outcome: stored, or duplicate (another replica, or an \
         earlier run, stored it first)."
    );
    describe_counter!(CLUSTER_TRIGGER_FAILURES, "Trigger publishes that failed and were retried (cluster mode).");
    describe_counter!(
        CLUSTER_FUND_REFUSALS,
        "insurance withdrawals the venue's fund refused (cluster mode: the fold over VIGIL_FILLS decides them)."
    );
    describe_gauge!(
        CLUSTER_FUND_FOLDED,
        "The offset through which this node's fold of VIGIL_FILLS holds the venue's insurance fund (cluster mode)."
    );
    describe_gauge!(
        CLUSTER_COVERAGE,
        "The offset through which VIGIL_FILLS holds this node's fills and insurance events (cluster mode)."
    );
    describe_gauge!(
        SOURCE_LAG,
        "Messages of this node's partition (and the broadcast subject) in VIGIL_EVENTS not yet read (cluster mode)."
    );
    describe_gauge!(SOURCE_CONSUMED, "The last offset of the last window this node applied (cluster mode).");
    describe_counter!(EVENTS_APPLIED, "Events applied by a shard (accepted or rejected), by shard and type.");
    describe_counter!(INGEST_EVENTS, "Events received, by transport (tcp, http).");
    describe_counter!(INGEST_BATCHES, "Batches received, by transport (tcp, http).");
    describe_counter!(
        INGEST_DUPLICATES,
        "Resent batches a producer had already journaled: answered with their original offsets, nothing appended."
    );
    describe_counter!(STRESS_RUNS, "Stress tests run on the node (POST /v1/stress and the scheduled one).");
    describe_gauge!(STRESS_SECONDS, Unit::Seconds, "How long the last stress test took, from request to report.");
    describe_gauge!(STRESS_OFFSET, "The offset (the cut) of the last stress test.");
    describe_gauge!(
        STRESS_SHORTFALL,
        "Last stress test: the book's shortfall (sum over units of max(0, -equity)) under each named scenario."
    );
    describe_gauge!(STRESS_LIQUIDATABLE, "Last stress test: accounts liquidatable under each named scenario.");
    describe_gauge!(STRESS_BANKRUPT, "Last stress test: accounts bankrupt under each named scenario.");
    describe_counter!(REJECTIONS, "Rejected events, by reason code (docs/events.md).");
    describe_counter!(TRIGGERS, "Liquidation triggers released, by kind (liquidate, bankrupt).");
    describe_histogram!(TRIGGER_LATENCY, Unit::Seconds, "From sequencing an event to releasing its trigger.");
    describe_gauge!(SEQUENCED, "Last offset given out by the sequencer.");
    describe_gauge!(DURABLE, "Last offset covered by a journal fdatasync.");
    describe_gauge!(RELEASED, "Offset through which outputs are durable and published.");
    describe_gauge!(APPLIED, "Last offset a shard applied, by shard.");
    describe_gauge!(RING_OCCUPANCY, "Messages waiting in a shard's input ring, by shard.");
    describe_gauge!(RING_CAPACITY, "Capacity of each shard's input ring.");
    describe_histogram!(FSYNC_SECONDS, Unit::Seconds, "Duration of a journal commit (write + fdatasync).");
    describe_histogram!(JOURNAL_BATCH, Unit::Count, "Records per journal commit (group commit size).");
    describe_counter!(JOURNAL_FAILURES, "Journal write or fdatasync failures (the node exits after one).");
    describe_histogram!(CHECKPOINT_SECONDS, Unit::Seconds, "Duration of writing one shard's checkpoint delta.");
    describe_histogram!(
        CHECKPOINT_BYTES,
        Unit::Bytes,
        "Bytes one shard's checkpoint wrote: the account chunks it rewrote, its records and the market."
    );
    describe_counter!(CHECKPOINT_FAILURES, "Checkpoint writes that failed (the journal keeps everything).");
    describe_gauge!(CHECKPOINT_OFFSET, "Watermark of a shard's last checkpoint, by shard.");
    describe_gauge!(STORE_BYTES, Unit::Bytes, "Size of the sled checkpoint store on disk.");
    describe_gauge!(RECOVERY_SECONDS, Unit::Seconds, "Duration of the last recovery at startup.");
    describe_histogram!(CHECK_SECONDS, Unit::Seconds, "Pre-trade check latency in the node (HTTP handler).");
    describe_gauge!(ACCOUNTS, "Accounts, by shard.");
    describe_gauge!(POSITIONS, "Open positions, by shard.");
    describe_gauge!(LIQUIDATING, "Accounts with a unit in a liquidation episode, by shard.");
    describe_gauge!(MARGIN_BAND, "Accounts with positions by margin ratio (MM / equity) band, by shard.");
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status.");
    describe_histogram!(HTTP_SECONDS, Unit::Seconds, "HTTP request duration, by route.");
}

/// The event types, in `Event::type_name` terms (a liquidation fill counted apart from trades), for per-type
/// counters.
const EVENT_TYPES: [&str; 17] = [
    "asset",
    "perp",
    "future",
    "option",
    "price",
    "funding",
    "settle",
    "deposit",
    "withdraw",
    "transfer",
    "trade",
    "clock",
    "risk",
    "account_config",
    "liquidation",
    "insurance",
    "liquidation_params",
];

fn type_index(event: &Event) -> usize {
    match event {
        Event::Asset { .. } => 0,
        Event::Perp { .. } => 1,
        Event::Future { .. } => 2,
        Event::Option { .. } => 3,
        Event::Price { .. } => 4,
        Event::Funding { .. } => 5,
        Event::Settle { .. } => 6,
        Event::Deposit { .. } => 7,
        Event::Withdraw { .. } => 8,
        Event::Transfer { .. } => 9,
        Event::Trade(_) => 10,
        Event::Clock { .. } => 11,
        Event::Risk { .. } => 12,
        Event::AccountConfig { .. } => 13,
        Event::Liquidation(_) => 14,
        Event::Insurance { .. } => 15,
        Event::LiquidationParams { .. } => 16,
    }
}

/// A shard's handles, created on its thread at start.
pub struct ShardMetrics {
    applied: [Counter; EVENT_TYPES.len()],
}

impl ShardMetrics {
    pub fn new(shard: usize) -> Self {
        let shard = shard.to_string();
        Self { applied: EVENT_TYPES.map(|t| counter!(EVENTS_APPLIED, "shard" => shard.clone(), "type" => t)) }
    }

    #[inline]
    pub fn applied(&self, event: &Event) {
        self.applied[type_index(event)].increment(1);
    }
}

/// The output gate's handles.
pub struct GateMetrics {
    rejections: Vec<Counter>,
    liquidate: Counter,
    bankrupt: Counter,
    deleverage: Counter,
    pub latency: Histogram,
    pub released: Gauge,
    fund: [Gauge; 4],
    /// Liquidation fills by outcome: a fee to the fund, a deficit it paid (whole or in part), neither.
    fills: [Counter; 3],
}

impl GateMetrics {
    pub fn new() -> Self {
        Self {
            rejections: Reason::ALL.iter().map(|r| counter!(REJECTIONS, "reason" => r.as_str())).collect(),
            liquidate: counter!(TRIGGERS, "kind" => TriggerKind::Liquidate.as_str()),
            bankrupt: counter!(TRIGGERS, "kind" => TriggerKind::Bankrupt.as_str()),
            deleverage: counter!(TRIGGERS, "kind" => TriggerKind::Deleverage.as_str()),
            latency: histogram!(TRIGGER_LATENCY),
            released: gauge!(RELEASED),
            fund: [gauge!(FUND_BALANCE), gauge!(FUND_FEES), gauge!(FUND_PAID), gauge!(FUND_UNCOVERED)],
            fills: [
                counter!(LIQUIDATION_FILLS, "outcome" => "fee"),
                counter!(LIQUIDATION_FILLS, "outcome" => "deficit"),
                counter!(LIQUIDATION_FILLS, "outcome" => "even"),
            ],
        }
    }

    /// The fund's figures, in quote units (gauges: they are state, restored with the node).
    pub fn fund(&self, fund: &InsuranceFund) {
        let figures = [fund.balance, fund.fees, fund.paid, fund.uncovered];
        for (g, a) in self.fund.iter().zip(figures) {
            g.set(a.0 as f64 / 1e8);
        }
    }

    pub fn fill(&self, record: &LiquidationRecord) {
        let i = if record.fee > Amount::ZERO {
            0
        } else if record.fund_paid > Amount::ZERO {
            1
        } else {
            2
        };
        self.fills[i].increment(1);
    }

    pub fn rejection(&self, reason: Reason) {
        if let Some(c) = Reason::ALL.iter().position(|r| *r == reason).and_then(|i| self.rejections.get(i)) {
            c.increment(1);
        }
    }

    pub fn trigger(&self, kind: TriggerKind) {
        match kind {
            TriggerKind::Liquidate => self.liquidate.increment(1),
            TriggerKind::Bankrupt => self.bankrupt.increment(1),
            TriggerKind::Deleverage => self.deleverage.increment(1),
        }
    }
}

impl Default for GateMetrics {
    fn default() -> Self {
        Self::new()
    }
}

/// CPU time (user + system) this process has used, in seconds, from `/proc/self/stat` (Linux; clock ticks of
/// 1/100 s, the kernel's fixed `USER_HZ` on every Linux ABI the node runs on); `None` elsewhere.
pub fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name is in parentheses and may hold spaces: the fields start after the last `)`.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    Some((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// Publishes one shard's monitoring counts.
pub fn shard_stats(shard: usize, stats: &ShardStats) {
    let s = shard.to_string();
    gauge!(ACCOUNTS, "shard" => s.clone()).set(stats.accounts as f64);
    gauge!(POSITIONS, "shard" => s.clone()).set(stats.positions as f64);
    gauge!(LIQUIDATING, "shard" => s.clone()).set(stats.liquidating as f64);
    for (band, n) in MARGIN_BANDS.iter().zip(stats.bands) {
        gauge!(MARGIN_BAND, "shard" => s.clone(), "band" => *band).set(n as f64);
    }
}

/// Publishes a stress report: run count and duration, its offset, and per named scenario the shortfall and counts
/// (grid steps are not labelled: a curve would be one series per step).
pub fn record_stress(report: &crate::stress::Report, took: Duration) {
    counter!(STRESS_RUNS).increment(1);
    gauge!(STRESS_SECONDS).set(took.as_secs_f64());
    gauge!(STRESS_OFFSET).set(report.offset.0 as f64);
    for (s, p) in report.request.scenarios.iter().zip(&report.result.scenarios) {
        let name = s.name.clone();
        gauge!(STRESS_SHORTFALL, "scenario" => name.clone()).set(p.shortfall.0 as f64 / 1e8);
        gauge!(STRESS_LIQUIDATABLE, "scenario" => name.clone()).set(p.liquidatable as f64);
        gauge!(STRESS_BANKRUPT, "scenario" => name).set(p.bankrupt as f64);
    }
}
