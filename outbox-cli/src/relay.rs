//! `outbox relay`: the relay as its own process, configured by a TOML file and flags, with
//! Prometheus metrics, wake-ups on the store's own signal, and a graceful stop on SIGTERM
//! and SIGINT.

pub(crate) mod config;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use outbox_core::{CancellationToken, Relay, RelayConfig};

use crate::backend::{self, Mode};
use crate::location::{StoreLocation, TransportLocation};
use crate::ops::StoreArgs;
use crate::transport;
use crate::util::{CliError, CliResult, human_duration, parse_duration};
use config::Knobs;

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

/// The relay configuration: defaults, then the file, then the flags.
fn relay_config(args: &RelayArgs) -> CliResult<RelayConfig> {
    config::relay_config(args.config.as_deref(), args.knobs.clone())
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
}
