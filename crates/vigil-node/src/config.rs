//! The node's settings: an optional TOML file (`vigil serve --config vigil.toml`), every key also a flag. A flag
//! (or its environment variable) wins over the file, the file over the built-in default. Unknown keys are errors,
//! so a typo never passes silently. docs/configuration.md lists every key with its default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use vigil_engine::{Config, Detection};

use crate::pipeline::Wait;
use crate::serve::ServeConfig;
use crate::wire::FRAME_BYTES_MAX;

/// Node settings, each optional: from the file, or from the command line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Data directory (journal and checkpoints) [default: vigil-data].
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Binary TCP ingest address (docs/wire.md) [default: 127.0.0.1:7878].
    #[arg(long)]
    pub ingest: Option<SocketAddr>,
    /// HTTP API address (docs/api.md) [default: 127.0.0.1:8080].
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Bearer token required on writes (HTTP POST /v1/events and TCP ingest); required to listen beyond
    /// loopback [default: none].
    #[arg(long, env = "VIGIL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Shard threads [default: 2].
    #[arg(long)]
    pub shards: Option<u16>,
    /// indexed or rescan [default: indexed].
    #[arg(long)]
    pub detection: Option<String>,
    /// park, spin-yield or spin [default: park].
    #[arg(long)]
    pub wait: Option<String>,
    /// Pin each shard thread to a core (true or false) [default: true when the machine has a core for each
    /// shard plus two (sequencer, network), else false].
    #[arg(long)]
    pub pin: Option<bool>,
    /// The quote currency [default: USDC].
    #[arg(long)]
    pub quote: Option<String>,
    /// Checkpoint every this many events… [default: 1000000]
    #[arg(long)]
    pub checkpoint_events: Option<u64>,
    /// …or every this many seconds, when anything changed [default: 30].
    #[arg(long)]
    pub checkpoint_secs: Option<u64>,
    /// Checkpoint writes that may fail in a row before the node stops (exit status 3); each failed delta is kept
    /// and merged into the next attempt [default: 3].
    #[arg(long)]
    pub checkpoint_failures_max: Option<u32>,
    /// Journal segment size in bytes [default: 67108864].
    #[arg(long)]
    pub journal_segment_bytes: Option<u64>,
    /// Open TCP ingest connections at most [default: 1024].
    #[arg(long)]
    pub connections_max: Option<usize>,
    /// HTTP requests served at once; more wait [default: 1024].
    #[arg(long)]
    pub http_concurrency_max: Option<usize>,
    /// Largest HTTP request body in bytes [default: 16777216].
    #[arg(long)]
    pub http_body_bytes_max: Option<usize>,
    /// Largest TCP ingest frame in bytes, at most 16777216 [default: 16777216].
    #[arg(long)]
    pub frame_bytes_max: Option<usize>,
    /// How long a read waits for its min_offset, in milliseconds [default: 5000].
    #[arg(long)]
    pub query_timeout_ms: Option<u64>,
    /// Run the stress request of `stress_request` this often, in seconds; its figures go to the metrics
    /// (`vigil_stress_*`) [default: 0, off].
    #[arg(long)]
    pub stress_every_secs: Option<u64>,
    /// The scheduled stress test: a request file as `POST /v1/stress` takes (docs/api.md).
    #[arg(long)]
    pub stress_request: Option<PathBuf>,
    /// Rebuild the ADL queues' bucket boundaries (each position's `adl_bucket` in the account object) this often,
    /// in milliseconds, when anything was sequenced since; 0 turns buckets off [default: 5000].
    #[arg(long)]
    pub adl_refresh_ms: Option<u64>,
    /// The insurance fund's floor, in quote units, exported as `vigil_insurance_fund_floor` for the alert on the
    /// fund's balance [default: 0].
    #[arg(long)]
    pub fund_floor: Option<String>,
    /// Cluster mode: consume a partition of the VIGIL_EVENTS stream from these NATS servers (`nats://host:port`,
    /// comma-separated) instead of taking events and journaling them (docs/cluster.md). Needs --partition.
    #[arg(long)]
    pub source: Option<String>,
    /// Cluster mode: the partition served, `N/P` (0 <= N < P).
    #[arg(long)]
    pub partition: Option<String>,
    /// Cluster mode: replicas of VIGIL_TRIGGERS and VIGIL_FILLS, if this node creates them [default: 1].
    #[arg(long)]
    pub trigger_replicas: Option<usize>,
    /// Cluster mode: the duplicate window of VIGIL_TRIGGERS and VIGIL_FILLS in seconds, if this node creates them
    /// [default: 600].
    #[arg(long)]
    pub trigger_duplicate_secs: Option<u64>,
    /// Publish every journaled event to the VIGIL_EVENTS stream on these NATS servers too, acknowledging producers
    /// once the stream holds their batch: this node is the sequencer in front of a cluster (docs/cluster.md).
    /// Needs --partitions.
    #[arg(long)]
    pub publish: Option<String>,
    /// With --publish: the partition count of the stream.
    #[arg(long)]
    pub partitions: Option<u32>,
    /// With --publish: replicas of VIGIL_EVENTS if this node creates it [default: 1].
    #[arg(long)]
    pub publish_replicas: Option<usize>,
}

impl NodeSettings {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// `self` (the command line) over `file` over the defaults.
    pub fn resolve(self, file: NodeSettings) -> anyhow::Result<ServeConfig> {
        let mut c = ServeConfig::new(self.data.or(file.data).unwrap_or_else(|| PathBuf::from("vigil-data")));
        if let Some(ingest) = self.ingest.or(file.ingest) {
            c.ingest = ingest;
        }
        if let Some(http) = self.http.or(file.http) {
            c.http = http;
        }
        c.token = self.token.or(file.token);
        let shards = self.shards.or(file.shards).unwrap_or(2);
        anyhow::ensure!((1..=256).contains(&shards), "shards must be between 1 and 256, got {shards}");
        c.shards = usize::from(shards);
        let detection: Detection = match self.detection.or(file.detection) {
            Some(d) => d.parse().map_err(anyhow::Error::msg)?,
            None => Detection::default(),
        };
        let quote = self.quote.or(file.quote).unwrap_or_else(|| vigil_model::QUOTE_DEFAULT.to_owned());
        c.engine = Config { quote, detection };
        if let Some(w) = self.wait.or(file.wait) {
            c.wait = w.parse::<Wait>().map_err(anyhow::Error::msg)?;
        }
        // Pinned shards on a machine without spare cores wait for their core while it runs something else: on
        // 2 cores, 2 pinned shards took the check p99 from ~5 ms to ~40 ms (docs/performance.md).
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        c.pin = self.pin.or(file.pin).unwrap_or(cores >= c.shards + 2);
        if let Some(n) = self.checkpoint_events.or(file.checkpoint_events) {
            c.checkpoint_events = n.max(1);
        }
        if let Some(s) = self.checkpoint_secs.or(file.checkpoint_secs) {
            c.checkpoint_interval = Duration::from_secs(s.max(1));
        }
        if let Some(n) = self.checkpoint_failures_max.or(file.checkpoint_failures_max) {
            anyhow::ensure!(n >= 1, "checkpoint_failures_max must be at least 1");
            c.checkpoint_failures_max = n;
        }
        if let Some(b) = self.journal_segment_bytes.or(file.journal_segment_bytes) {
            anyhow::ensure!(b >= 1 << 20, "journal_segment_bytes must be at least 1 MiB (1048576), got {b}");
            c.journal.segment_bytes_max = b;
        }
        if let Some(n) = self.connections_max.or(file.connections_max) {
            anyhow::ensure!(n >= 1, "connections_max must be at least 1");
            c.connections_max = n;
        }
        if let Some(n) = self.http_concurrency_max.or(file.http_concurrency_max) {
            anyhow::ensure!(n >= 1, "http_concurrency_max must be at least 1");
            c.http_concurrency_max = n;
        }
        if let Some(n) = self.http_body_bytes_max.or(file.http_body_bytes_max) {
            anyhow::ensure!(n >= 1024, "http_body_bytes_max must be at least 1024, got {n}");
            c.http_body_bytes_max = n;
        }
        if let Some(n) = self.frame_bytes_max.or(file.frame_bytes_max) {
            anyhow::ensure!(
                (64..=FRAME_BYTES_MAX).contains(&n),
                "frame_bytes_max must be between 64 and {FRAME_BYTES_MAX}, got {n}"
            );
            c.frame_bytes_max = n;
        }
        if let Some(ms) = self.query_timeout_ms.or(file.query_timeout_ms) {
            c.query_timeout = Duration::from_millis(ms.max(1));
        }
        if let Some(ms) = self.adl_refresh_ms.or(file.adl_refresh_ms) {
            c.adl_refresh = (ms > 0).then(|| Duration::from_millis(ms));
        }
        if let Some(floor) = self.fund_floor.or(file.fund_floor) {
            c.fund_floor = vigil_model::Amount::parse(&floor)
                .map_err(|e| anyhow::anyhow!("fund_floor must be a decimal amount, got {floor:?}: {e}"))?;
        }
        match (self.source.or(file.source), self.partition.or(file.partition)) {
            (Some(url), Some(partition)) => {
                anyhow::ensure!(
                    url.split(',').all(|u| u.trim().starts_with("nats://")),
                    "source must be nats://host:port (comma-separated for several servers), got {url:?}"
                );
                let partition = partition.parse().map_err(anyhow::Error::msg)?;
                c.source = Some(crate::cluster::source::NatsSource { url, partition });
            }
            (None, None) => {}
            (Some(_), None) => anyhow::bail!("source is set: partition (N/P) must say which partition to serve"),
            (None, Some(_)) => anyhow::bail!("partition is set: source must name the NATS servers to consume"),
        }
        match (self.publish.or(file.publish), self.partitions.or(file.partitions)) {
            (Some(url), Some(partitions)) => {
                anyhow::ensure!(
                    c.source.is_none(),
                    "a node either publishes the stream (publish) or reads it (source)"
                );
                anyhow::ensure!(
                    url.split(',').all(|u| u.trim().starts_with("nats://")),
                    "publish must be nats://host:port (comma-separated for several servers), got {url:?}"
                );
                anyhow::ensure!((1..=1024).contains(&partitions), "partitions must be 1 to 1024, got {partitions}");
                let replicas = self.publish_replicas.or(file.publish_replicas).unwrap_or(1);
                anyhow::ensure!((1..=5).contains(&replicas), "publish_replicas must be 1 to 5, got {replicas}");
                c.publish = Some(crate::cluster::forward::PublishTarget { url, partitions, replicas });
            }
            (None, None) => {}
            (Some(_), None) => anyhow::bail!("publish is set: partitions must say how many partitions the stream has"),
            (None, Some(_)) => anyhow::bail!("partitions is set: publish must name the NATS servers to publish to"),
        }
        if let Some(n) = self.trigger_replicas.or(file.trigger_replicas) {
            anyhow::ensure!((1..=5).contains(&n), "trigger_replicas must be 1 to 5, got {n}");
            c.trigger_replicas = n;
        }
        if let Some(secs) = self.trigger_duplicate_secs.or(file.trigger_duplicate_secs) {
            anyhow::ensure!(secs >= 1, "trigger_duplicate_secs must be at least 1");
            c.trigger_duplicate_window = Duration::from_secs(secs);
        }
        let every = self.stress_every_secs.or(file.stress_every_secs).unwrap_or(0);
        let request = self.stress_request.or(file.stress_request);
        if every > 0 {
            let Some(path) = request else {
                anyhow::bail!("stress_every_secs is set: stress_request must name the request file to run");
            };
            let body = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let request = crate::stress::parse_request(&body).with_context(|| format!("in {}", path.display()))?;
            c.stress_schedule = Some((Duration::from_secs(every), request));
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_which_overrides_defaults() {
        // Proves the precedence, the parsing of every key, and that unknown keys and bad values are errors.
        let file: NodeSettings = toml::from_str(
            r#"
            data = "/srv/vigil"
            ingest = "127.0.0.1:9000"
            shards = 4
            detection = "rescan"
            wait = "spin-yield"
            checkpoint_secs = 5
            "#,
        )
        .unwrap();
        let flags = NodeSettings { shards: Some(8), ..NodeSettings::default() };
        let c = flags.resolve(file).unwrap();
        assert_eq!(c.data, PathBuf::from("/srv/vigil"));
        assert_eq!(c.ingest.port(), 9000);
        assert_eq!(c.shards, 8);
        assert_eq!(c.engine.detection, Detection::Rescan);
        assert_eq!(c.wait, Wait::SpinYield);
        assert_eq!(c.checkpoint_interval, Duration::from_secs(5));
        assert_eq!(c.checkpoint_events, 1_000_000);
        assert_eq!(c.token, None);
        assert_eq!(c.http.port(), 8080);
        let defaults = NodeSettings::default().resolve(NodeSettings::default()).unwrap();
        assert_eq!((defaults.shards, defaults.ingest.port()), (2, 7878));
        assert!(toml::from_str::<NodeSettings>("shard = 3").is_err());
        let bad = NodeSettings { detection: Some("fast".into()), ..NodeSettings::default() };
        assert!(bad.resolve(NodeSettings::default()).is_err());
        let every: NodeSettings = toml::from_str(
            r#"
            http = "127.0.0.1:9001"
            token = "t0k"
            journal_segment_bytes = 2097152
            connections_max = 3
            http_concurrency_max = 4
            http_body_bytes_max = 4096
            frame_bytes_max = 1024
            query_timeout_ms = 250
            adl_refresh_ms = 0
            fund_floor = "2500.5"
            "#,
        )
        .unwrap();
        let c = NodeSettings::default().resolve(every).unwrap();
        assert_eq!((c.http.port(), c.token.as_deref()), (9001, Some("t0k")));
        assert_eq!((c.journal.segment_bytes_max, c.connections_max, c.http_concurrency_max), (2 << 20, 3, 4));
        assert_eq!((c.http_body_bytes_max, c.frame_bytes_max), (4096, 1024));
        assert_eq!(c.query_timeout, Duration::from_millis(250));
        assert_eq!((c.adl_refresh, c.fund_floor), (None, vigil_model::Amount(250_050_000_000)));
        assert_eq!(defaults.adl_refresh, Some(Duration::from_secs(5)));
        let floor = NodeSettings { fund_floor: Some("lots".into()), ..NodeSettings::default() };
        assert!(floor.resolve(NodeSettings::default()).is_err());
        let huge = NodeSettings { frame_bytes_max: Some(FRAME_BYTES_MAX + 1), ..NodeSettings::default() };
        assert!(huge.resolve(NodeSettings::default()).is_err());
        let zero = NodeSettings { shards: Some(0), ..NodeSettings::default() };
        assert!(zero.resolve(NodeSettings::default()).is_err());
    }
}
