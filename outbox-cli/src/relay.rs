//! `outbox relay`: the relay as its own process, configured by a TOML file and flags, with
//! Prometheus metrics, wake-ups on the store's own signal, and a graceful stop on SIGTERM
//! and SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use outbox_core::{CancellationToken, Ordering, Relay, RelayConfig};
use serde::Deserialize;

use crate::backend::{self, Mode};
use crate::location::{StoreLocation, TransportLocation};
use crate::ops::StoreArgs;
use crate::transport;
use crate::util::{CliError, CliResult, human_duration, parse_duration};

/// `outbox relay`: publish from a store to a broker until SIGTERM or SIGINT.
#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    #[command(flatten)]
    store: StoreArgs,
    /// The broker: kafka://HOST:PORT[,HOST:PORT...] (more librdkafka settings through
    /// OUTBOX_KAFKA_* variables) or amqp://USER:PASS@HOST:PORT/VHOST[?exchange=E].
    #[arg(
        long,
        value_name = "URL",
        env = "OUTBOX_TRANSPORT",
        hide_env_values = true
    )]
    transport: String,
    /// Serve Prometheus metrics on http://ADDR/metrics (e.g. 127.0.0.1:9898).
    #[arg(long, value_name = "ADDR", env = "OUTBOX_METRICS_ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// A TOML file with relay settings; flags given here override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// DynamoDB stores: how often to read the table's stream for new messages (default
    /// 250ms); the relay publishes a woken shard at once. Other stores ignore it.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration,
        default_value = "250ms")]
    stream_interval: Duration,
    /// Publish every message as a CloudEvent (binary content mode: Kafka `ce_*` headers,
    /// AMQP `cloudEvents:` headers) with this `source`, e.g. /billing.
    #[arg(long, value_name = "SOURCE", env = "OUTBOX_CLOUDEVENTS_SOURCE")]
    cloudevents_source: Option<String>,
    /// Testing only (hidden): run the relay and its store on a clock this many milliseconds
    /// ahead of the system clock (negative: behind), to show what clock skew between relays
    /// does (the fault suite's clock-skew scenario).
    #[arg(long, hide = true, value_name = "MS", allow_hyphen_values = true)]
    clock_offset_ms: Option<i64>,
    #[command(flatten)]
    knobs: Knobs,
}

/// The system clock shifted by a fixed offset (`--clock-offset-ms`).
#[derive(Debug)]
struct OffsetClock {
    offset_us: i64,
}

impl outbox_core::Clock for OffsetClock {
    fn now(&self) -> outbox_core::DateTime<outbox_core::Utc> {
        let now = outbox_core::Utc::now();
        now.timestamp_micros()
            .checked_add(self.offset_us)
            .and_then(outbox_core::DateTime::from_timestamp_micros)
            .unwrap_or_else(|| outbox_core::truncate_micros(now))
    }
}

/// The clock of `--clock-offset-ms`, or the system clock.
fn relay_clock(offset_ms: Option<i64>) -> outbox_core::SharedClock {
    match offset_ms {
        Some(ms) if ms != 0 => std::sync::Arc::new(OffsetClock {
            offset_us: ms.saturating_mul(1000),
        }),
        _ => std::sync::Arc::new(outbox_core::SystemClock),
    }
}

/// Every [`RelayConfig`] knob as a flag (unset: the TOML file's value, else the default).
#[derive(Debug, Clone, Default, Args)]
pub struct Knobs {
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
pub enum OrderingArg {
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
    fn load(path: &PathBuf) -> CliResult<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| CliError::new(format!("reading {}: {e}", path.display())))?;
        toml::from_str(&text)
            .map_err(|e| CliError::new(format!("invalid relay config {}: {e}", path.display())))
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

/// The relay configuration: defaults, then the file, then the flags.
fn relay_config(args: &RelayArgs) -> CliResult<RelayConfig> {
    let mut config = RelayConfig::default();
    if let Some(path) = &args.config {
        FileConfig::load(path)?.into_knobs().apply(&mut config);
    }
    args.knobs.clone().apply(&mut config);
    config
        .validate()
        .map_err(|e| CliError::from(e).context("invalid relay configuration"))?;
    Ok(config)
}

/// Run `outbox relay` until SIGTERM or SIGINT; then finish the batch in flight, release the
/// leases and return.
pub async fn run(args: RelayArgs) -> CliResult<()> {
    let store_location = StoreLocation::parse(&args.store.store)?;
    let transport_location = TransportLocation::parse(&args.transport)?;
    let config = relay_config(&args)?;
    let clock = relay_clock(args.clock_offset_ms);
    let opened =
        backend::open_with_clock(&store_location, Mode::Existing, Some(clock.clone())).await?;
    let cloud_events = args
        .cloudevents_source
        .clone()
        .map(outbox_core::cloudevents::CloudEvents::new)
        .transpose()
        .map_err(|e| CliError::from(e).context("--cloudevents-source"))?;
    let producer =
        transport::open(&transport_location, config.publish_timeout, cloud_events).await?;
    if let Some(addr) = args.metrics_addr {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .map_err(|e| CliError::new(format!("cannot serve metrics on {addr}: {e}")))?;
    }
    let instance = config.instance_id.clone();
    let poll = config.poll_interval;
    let relay = Relay::with_clock(
        opened.store.clone(),
        opened.lock.clone(),
        producer,
        config,
        clock,
    )
    .map_err(|e| CliError::from(e).context("starting the relay"))?;
    let shutdown = CancellationToken::new();
    let signals = listen_for_signals(shutdown.clone())?;
    let wake = opened
        .listen(relay.handle(), args.stream_interval, shutdown.clone())
        .await
        .map_err(|e| e.context("setting up wake-ups"))?;
    eprintln!(
        "outbox relay {instance}: publishing from {store_location} to {transport_location}; \
         wakes on {}, polls every {}{}",
        wake.as_deref().unwrap_or("polling only"),
        human_duration(poll),
        args.metrics_addr
            .map(|a| format!("; metrics on http://{a}/metrics"))
            .unwrap_or_default()
    );
    let report = relay
        .run(shutdown)
        .await
        .map_err(|e| CliError::from(e).context("relay"))?;
    signals.abort();
    eprintln!(
        "outbox relay {instance}: stopped after publishing {} message(s) in {} batch(es) \
         ({} failed attempt(s), {} parked); leases released",
        report.published, report.batches, report.failed, report.parked
    );
    Ok(())
}

/// Cancel `shutdown` on the first SIGTERM or SIGINT; exit at once (130) on a second one.
fn listen_for_signals(shutdown: CancellationToken) -> CliResult<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| CliError::new(format!("cannot listen for SIGTERM: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| CliError::new(format!("cannot listen for SIGINT: {e}")))?;
    Ok(tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("outbox relay: stopping: finishing the batch in flight and releasing leases");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("outbox relay: second signal, exiting without waiting");
        std::process::exit(130);
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn clock_offset_shifts_the_relay_clock() {
        let skew = |ms| {
            let before = outbox_core::Utc::now();
            let t = relay_clock(Some(ms)).now();
            (t - before).num_milliseconds()
        };
        let ahead = skew(5_000);
        assert!((4_990..5_100).contains(&ahead), "{ahead}");
        let behind = skew(-3_000);
        assert!((-3_010..-2_900).contains(&behind), "{behind}");
        assert!(skew(0).abs() < 100);
    }

    #[test]
    fn clock_offset_is_hidden_from_help_and_takes_negative_values() {
        use clap::{CommandFactory, Parser};
        let mut cli = crate::Cli::command();
        let help = cli
            .find_subcommand_mut("relay")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("--transport"));
        assert!(!help.contains("clock-offset"));
        let parsed = crate::Cli::try_parse_from([
            "outbox",
            "relay",
            "--store",
            "sqlite:///tmp/x.db",
            "--transport",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "--clock-offset-ms",
            "-2500",
        ]);
        assert!(parsed.is_ok(), "{:?}", parsed.err());
    }

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
