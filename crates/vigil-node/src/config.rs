//! The node's optional configuration file (TOML). Every key is optional; a command-line flag wins over the file,
//! the file over the built-in default. Unknown keys are errors, so a typo never passes silently.
//!
//! ```toml
//! data = "vigil-data"
//! ingest = "127.0.0.1:7878"
//! shards = 2
//! detection = "indexed"      # or "rescan"
//! wait = "park"              # or "spin-yield", "spin"
//! quote = "USDC"
//! checkpoint_events = 1000000
//! checkpoint_secs = 30
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde::Deserialize;
use vigil_engine::{Config, Detection};

use crate::pipeline::Wait;
use crate::serve::ServeConfig;

/// Node settings, each optional: from the file, or from the command line.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    pub data: Option<PathBuf>,
    pub ingest: Option<SocketAddr>,
    pub shards: Option<u16>,
    pub detection: Option<String>,
    pub wait: Option<String>,
    pub quote: Option<String>,
    pub checkpoint_events: Option<u64>,
    pub checkpoint_secs: Option<u64>,
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
        if let Some(n) = self.checkpoint_events.or(file.checkpoint_events) {
            c.checkpoint_events = n.max(1);
        }
        if let Some(s) = self.checkpoint_secs.or(file.checkpoint_secs) {
            c.checkpoint_interval = Duration::from_secs(s.max(1));
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
        let defaults = NodeSettings::default().resolve(NodeSettings::default()).unwrap();
        assert_eq!((defaults.shards, defaults.ingest.port()), (2, 7878));
        assert!(toml::from_str::<NodeSettings>("shard = 3").is_err());
        let bad = NodeSettings { detection: Some("fast".into()), ..NodeSettings::default() };
        assert!(bad.resolve(NodeSettings::default()).is_err());
        let zero = NodeSettings { shards: Some(0), ..NodeSettings::default() };
        assert!(zero.resolve(NodeSettings::default()).is_err());
    }
}
