//! Connecting, with a timeout, and the reconnect backoff shared by producer and consumer.

use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};
use outbox_core::{Error, Result};

use crate::error::{Failure, parse_error};
use crate::url::AmqpUrl;

/// How a producer or consumer connects and reconnects.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// The broker. Its password is redacted in `Debug` and in every error.
    pub url: AmqpUrl,
    /// Name shown by `rabbitmqctl list_connections client_properties` and the management
    /// UI. `None`: `outbox-producer` / `outbox-consumer`.
    pub connection_name: Option<String>,
    /// Give up a connection attempt after this long (default 10 s).
    pub connect_timeout: Duration,
    /// First delay after a failed connection attempt (default 100 ms). Doubles per further
    /// failure up to [`reconnect_max`](Self::reconnect_max); reset by a success.
    pub reconnect_min: Duration,
    /// Longest delay between connection attempts (default 5 s).
    pub reconnect_max: Duration,
}

impl ConnectionConfig {
    /// Defaults for `url`.
    pub fn new(url: AmqpUrl) -> Self {
        ConnectionConfig {
            url,
            connection_name: None,
            connect_timeout: Duration::from_secs(10),
            reconnect_min: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
        }
    }

    pub(crate) async fn connect(&self, default_name: &str) -> Result<Connection> {
        let name = self.connection_name.as_deref().unwrap_or(default_name);
        let props = ConnectionProperties::default().with_connection_name(name.into());
        let context = format!("connect to {}", self.url);
        match tokio::time::timeout(
            self.connect_timeout,
            Connection::connect(self.url.expose(), props),
        )
        .await
        {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(e)) => Err(parse_error(Failure::Lapin(e), &context)),
            Err(_) => Err(parse_error(
                Failure::Timeout(self.connect_timeout),
                &context,
            )),
        }
    }
}

/// Exponential backoff between connection attempts.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    failures: u32,
    retry_at: Option<Instant>,
}

impl Backoff {
    /// `Err` while the last failure's delay has not passed: retryable, says when to retry.
    pub(crate) fn check(&self, what: &str) -> Result<()> {
        match self.retry_at {
            Some(at) if at > Instant::now() => Err(Error::unavailable(format!(
                "{what}: reconnecting after {} failed attempt(s); next attempt in {} ms",
                self.failures,
                at.saturating_duration_since(Instant::now()).as_millis()
            ))),
            _ => Ok(()),
        }
    }

    /// How long until the next attempt is allowed.
    pub(crate) fn remaining(&self) -> Duration {
        self.retry_at.map_or(Duration::ZERO, |at| {
            at.saturating_duration_since(Instant::now())
        })
    }

    pub(crate) fn failed(&mut self, config: &ConnectionConfig) {
        self.failures = self.failures.saturating_add(1);
        let exp = self.failures.saturating_sub(1).min(16);
        let delay = config
            .reconnect_min
            .saturating_mul(1u32 << exp)
            .min(config.reconnect_max);
        self.retry_at = Some(Instant::now() + delay);
    }

    pub(crate) fn succeeded(&mut self) {
        self.failures = 0;
        self.retry_at = None;
    }
}
