//! The relay's settings: every [`RelayConfig`] knob as a flag and in the `--config` TOML
//! file, and the merge of defaults, file and flags. No I/O but reading the file, so the
//! parsing can be fuzzed (`fuzz/`, target `relay_config`).

use std::path::Path;
use std::time::Duration;

use clap::{Args, ValueEnum};
use outbox_core::{Ordering, RelayConfig};
use serde::Deserialize;

use crate::util::{CliError, CliResult, parse_duration};

/// Every [`RelayConfig`] knob as a flag (unset: the TOML file's value, else the default).
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct Knobs {
    /// Name of this instance in leases (default: relay-<uuid>); unique per process.
    #[arg(long, value_name = "ID")]
    instance_id: Option<String>,
    /// Messages fetched per batch (default 100).
    #[arg(long, value_name = "N")]
    batch_size: Option<usize>,
    /// Most publishes in flight at once (default 64).
    #[arg(long, value_name = "N")]
    max_in_flight: Option<usize>,
    /// How often to look for due messages when not woken (default 500ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    poll_interval: Option<Duration>,
    /// Shard lease time-to-live (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    lease_ttl: Option<Duration>,
    /// Longest wait for one broker confirmation (default 10s); publish timeout plus clock
    /// skew margin must not exceed half the lease TTL.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    publish_timeout: Option<Duration>,
    /// How much the clocks of the relays and the lock may disagree (default 2s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    clock_skew_margin: Option<Duration>,
    /// How often to sample the store's counts for the pending/parked/age gauges (default 15s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    stats_interval: Option<Duration>,
    /// Per-key ordering (default) or none.
    #[arg(long, value_enum)]
    ordering: Option<OrderingArg>,
    /// Prefix of lease names (default outbox).
    #[arg(long, value_name = "PREFIX")]
    lock_prefix: Option<String>,
    /// Park a message after this many failed attempts (default 10).
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// Delay after the first failure (default 1s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    initial_backoff: Option<Duration>,
    /// Upper bound of the retry delay (default 5m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    max_backoff: Option<Duration>,
    /// Growth factor of the retry delay per failure (default 2).
    #[arg(long, value_name = "FACTOR")]
    backoff_multiplier: Option<f64>,
    /// Randomise each retry delay between 50% and 100% (default true).
    #[arg(long, value_name = "BOOL")]
    jitter: Option<bool>,
    /// Park at once on a permanent publish error (default true).
    #[arg(long, value_name = "BOOL")]
    park_on_permanent: Option<bool>,
    /// First pause of the whole relay while the broker or store is unavailable (default 100ms).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    outage_backoff_initial: Option<Duration>,
    /// Longest such pause (default 30s).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    outage_backoff_max: Option<Duration>,
}

/// Ordering as typed on the command line and in the TOML file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum OrderingArg {
    /// Messages of one key are published in commit order.
    PerKey,
    /// No ordering guarantee.
    Unordered,
}

impl From<OrderingArg> for Ordering {
    fn from(o: OrderingArg) -> Self {
        match o {
            OrderingArg::PerKey => Ordering::PerKey,
            OrderingArg::Unordered => Ordering::Unordered,
        }
    }
}

/// The `--config` file: the same knobs, durations written like the flags' (`500ms`, `30s`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    instance_id: Option<String>,
    batch_size: Option<usize>,
    max_in_flight: Option<usize>,
    #[serde(default, deserialize_with = "duration")]
    poll_interval: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    lease_ttl: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    publish_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    clock_skew_margin: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    stats_interval: Option<Duration>,
    ordering: Option<OrderingArg>,
    lock_prefix: Option<String>,
    #[serde(default)]
    retry: FileRetry,
    #[serde(default)]
    outage_backoff: FileOutageBackoff,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOutageBackoff {
    #[serde(default, deserialize_with = "duration")]
    initial: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    max: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRetry {
    max_attempts: Option<u32>,
    #[serde(default, deserialize_with = "duration")]
    initial_backoff: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    max_backoff: Option<Duration>,
    multiplier: Option<f64>,
    jitter: Option<bool>,
    park_on_permanent: Option<bool>,
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

impl FileConfig {
    /// Parse the text of a `--config` file.
    fn parse(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// The file's knobs as flags, so one merge rule serves both.
    fn into_knobs(self) -> Knobs {
        Knobs {
            instance_id: self.instance_id,
            batch_size: self.batch_size,
            max_in_flight: self.max_in_flight,
            poll_interval: self.poll_interval,
            lease_ttl: self.lease_ttl,
            publish_timeout: self.publish_timeout,
            clock_skew_margin: self.clock_skew_margin,
            stats_interval: self.stats_interval,
            ordering: self.ordering,
            lock_prefix: self.lock_prefix,
            max_attempts: self.retry.max_attempts,
            initial_backoff: self.retry.initial_backoff,
            max_backoff: self.retry.max_backoff,
            backoff_multiplier: self.retry.multiplier,
            jitter: self.retry.jitter,
            park_on_permanent: self.retry.park_on_permanent,
            outage_backoff_initial: self.outage_backoff.initial,
            outage_backoff_max: self.outage_backoff.max,
        }
    }
}

impl Knobs {
    /// Set every knob given here on `config`.
    fn apply(self, config: &mut RelayConfig) {
        macro_rules! set {
            ($($field:ident => $($target:ident).+),* $(,)?) => {$(
                if let Some(v) = self.$field {
                    config.$($target).+ = v.into();
                }
            )*};
        }
        set!(
            instance_id => instance_id,
            batch_size => batch_size,
            max_in_flight => max_in_flight,
            poll_interval => poll_interval,
            lease_ttl => lease_ttl,
            publish_timeout => publish_timeout,
            clock_skew_margin => clock_skew_margin,
            stats_interval => stats_interval,
            ordering => ordering,
            lock_prefix => lock_prefix,
            max_attempts => retry.max_attempts,
            initial_backoff => retry.initial_backoff,
            max_backoff => retry.max_backoff,
            backoff_multiplier => retry.multiplier,
            jitter => retry.jitter,
            park_on_permanent => retry.park_on_permanent,
            outage_backoff_initial => outage_backoff.initial,
            outage_backoff_max => outage_backoff.max,
        );
    }
}

/// The relay configuration: defaults, then the file at `path` (if any), then `flags`,
/// validated.
pub(crate) fn relay_config(path: Option<&Path>, flags: Knobs) -> CliResult<RelayConfig> {
    match path {
        None => merge(None, flags),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::new(format!("reading {}: {e}", path.display())))?;
            relay_config_from_text(&text, flags, &path.display().to_string())
        }
    }
}

/// The relay configuration from the text of a `--config` file (named `origin` in errors) and
/// `flags`, validated: what [`relay_config`] does once the file is read.
pub(crate) fn relay_config_from_text(
    text: &str,
    flags: Knobs,
    origin: &str,
) -> CliResult<RelayConfig> {
    let file = FileConfig::parse(text)
        .map_err(|e| CliError::new(format!("invalid relay config {origin}: {e}")))?;
    merge(Some(file), flags)
}

fn merge(file: Option<FileConfig>, flags: Knobs) -> CliResult<RelayConfig> {
    let mut config = RelayConfig::default();
    if let Some(file) = file {
        file.into_knobs().apply(&mut config);
    }
    flags.apply(&mut config);
    config
        .validate()
        .map_err(|e| CliError::from(e).context("invalid relay configuration"))?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn file_then_flags_override_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            instance_id = "from-file"
            batch_size = 7
            max_in_flight = 3
            poll_interval = "250ms"
            lease_ttl = "9s"
            publish_timeout = "2s"
            clock_skew_margin = "1s"
            stats_interval = "5s"
            ordering = "unordered"
            lock_prefix = "orders"
            [retry]
            max_attempts = 4
            initial_backoff = "100ms"
            max_backoff = "1m"
            multiplier = 1.5
            jitter = false
            park_on_permanent = false
            [outage_backoff]
            initial = "50ms"
            max = "10s"
            "#,
        )
        .unwrap();
        let mut config = RelayConfig::default();
        file.into_knobs().apply(&mut config);
        Knobs {
            batch_size: Some(11),
            jitter: Some(true),
            ..Knobs::default()
        }
        .apply(&mut config);
        assert_eq!(config.instance_id, "from-file");
        assert_eq!(config.batch_size, 11, "the flag wins");
        assert_eq!(config.max_in_flight, 3);
        assert_eq!(config.poll_interval, Duration::from_millis(250));
        assert_eq!(config.lease_ttl, Duration::from_secs(9));
        assert_eq!(config.publish_timeout, Duration::from_secs(2));
        assert_eq!(config.clock_skew_margin, Duration::from_secs(1));
        assert_eq!(config.stats_interval, Duration::from_secs(5));
        assert_eq!(config.outage_backoff.initial, Duration::from_millis(50));
        assert_eq!(config.outage_backoff.max, Duration::from_secs(10));
        assert_eq!(config.ordering, Ordering::Unordered);
        assert_eq!(config.lock_prefix, "orders");
        assert_eq!(config.retry.max_attempts, 4);
        assert_eq!(config.retry.initial_backoff, Duration::from_millis(100));
        assert_eq!(config.retry.max_backoff, Duration::from_secs(60));
        assert_eq!(config.retry.multiplier, 1.5);
        assert!(config.retry.jitter, "the flag wins");
        assert!(!config.retry.park_on_permanent);
        config.validate().unwrap();
    }

    #[test]
    fn rejects_unknown_keys_and_bad_durations() {
        let e = toml::from_str::<FileConfig>("batch_sise = 3").unwrap_err();
        assert!(e.to_string().contains("batch_sise"), "{e}");
        let e = toml::from_str::<FileConfig>("lease_ttl = \"30\"").unwrap_err();
        assert!(e.to_string().contains("missing unit"), "{e}");
    }
}
