//! [`RabbitMqProducer`]: confirmed, persistent, mandatory publishing with reconnection.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use outbox_core::{Error, Message, Producer, Result};
use tokio::sync::Mutex;

use crate::codec;
use crate::conn::{Backoff, ConnectionConfig};
use crate::error::{Failure, parse_error};

/// RabbitMQ's default `max_message_size` (128 MiB), the largest body it accepts.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// Where messages of one topic are published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The exchange (`""` is the default exchange, which routes to the queue named by the
    /// routing key).
    pub exchange: String,
    /// The routing key.
    pub routing_key: String,
}

/// Configuration of a [`RabbitMqProducer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// Broker address, connection name, timeouts, reconnect backoff.
    pub connection: ConnectionConfig,
    /// The exchange of topics without an entry in [`routes`](Self::routes); their routing
    /// key is the topic itself.
    pub exchange: String,
    /// Per-topic exchange and routing key, overriding the default mapping.
    pub routes: BTreeMap<String, Route>,
    /// Publishes in flight at once, each on its own channel (default 8). `send_batch` uses
    /// them all.
    pub channels: usize,
    /// How long to wait for the broker's confirm (default 30 s); then the send fails with a
    /// retryable error (the message may still have been stored: at-least-once).
    pub confirm_timeout: Duration,
    /// Reject bodies over this many bytes before sending, with a permanent
    /// `PayloadTooLarge` (default [`DEFAULT_MAX_MESSAGE_SIZE`], the broker's default
    /// limit; set it to the broker's `max_message_size`). `None`: let the broker decide.
    pub max_message_size: Option<usize>,
}

impl ProducerConfig {
    /// Publish every topic to `exchange` with the topic as routing key.
    pub fn new(connection: ConnectionConfig, exchange: impl Into<String>) -> Self {
        ProducerConfig {
            connection,
            exchange: exchange.into(),
            routes: BTreeMap::new(),
            channels: 8,
            confirm_timeout: Duration::from_secs(30),
            max_message_size: Some(DEFAULT_MAX_MESSAGE_SIZE),
        }
    }

    /// Publish `topic` to `exchange` with `routing_key` instead.
    pub fn route(
        mut self,
        topic: impl Into<String>,
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
    ) -> Self {
        self.routes.insert(
            topic.into(),
            Route {
                exchange: exchange.into(),
                routing_key: routing_key.into(),
            },
        );
        self
    }

    /// Where `topic` is published.
    pub fn route_for(&self, topic: &str) -> Route {
        self.routes.get(topic).cloned().unwrap_or_else(|| Route {
            exchange: self.exchange.clone(),
            routing_key: topic.to_owned(),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.channels == 0 {
            return Err(Error::config("ProducerConfig::channels must be at least 1"));
        }
        if self.confirm_timeout.is_zero() {
            return Err(Error::config(
                "ProducerConfig::confirm_timeout must be positive",
            ));
        }
        if ShortString::try_new(self.exchange.as_str()).is_err() {
            return Err(Error::config(format!(
                "exchange name {:?} is longer than 255 bytes",
                self.exchange
            )));
        }
        Ok(())
    }
}

/// A [`Producer`] publishing to RabbitMQ.
///
/// - **Confirmed**: every channel is in confirm mode; `send` returns `Ok` only after the
///   broker's `basic.ack`, i.e. after the message was routed and stored (for quorum queues,
///   replicated to a majority).
/// - **Persistent**: delivery mode 2, so durable queues keep the message across a broker
///   restart.
/// - **Mandatory**: an unroutable message comes back (`basic.return`); `send` then fails
///   with a permanent [`ErrorKind::NotFound`](outbox_core::ErrorKind::NotFound) instead of
///   the broker silently dropping it.
/// - **Reconnecting**: a send that finds the connection (or its channel) closed opens a new
///   one; a failed connection attempt delays the next one (exponential backoff, see
///   [`ConnectionConfig`]) and sends fail fast with a retryable error meanwhile. No message
///   stays stuck behind a dead connection, and the producer never needs recreating.
/// - **One publish per channel at a time** (up to [`ProducerConfig::channels`] in
///   parallel), so a returned message is always attributed to the right send.
///
/// Clones share connection and channels.
#[derive(Clone)]
pub struct RabbitMqProducer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    connection: Mutex<ConnectionSlot>,
    channels: Vec<Mutex<Option<Channel>>>,
    next_channel: AtomicUsize,
    connects: AtomicU64,
}

#[derive(Default)]
struct ConnectionSlot {
    connection: Option<Connection>,
    backoff: Backoff,
}

impl RabbitMqProducer {
    /// A producer that connects on its first send (so it can be built while the broker is
    /// down).
    ///
    /// # Errors
    /// `ConfigInvalid` for a bad configuration.
    pub fn new(config: ProducerConfig) -> Result<Self> {
        config.validate()?;
        let channels = (0..config.channels).map(|_| Mutex::new(None)).collect();
        Ok(RabbitMqProducer {
            inner: Arc::new(Inner {
                config,
                connection: Mutex::new(ConnectionSlot::default()),
                channels,
                next_channel: AtomicUsize::new(0),
                connects: AtomicU64::new(0),
            }),
        })
    }

    /// A producer, connected now (fails fast on a wrong address or credentials).
    ///
    /// # Errors
    /// `ConfigInvalid` for a bad configuration or refused credentials; retryable
    /// `Unavailable` when the broker is unreachable.
    pub async fn connect(config: ProducerConfig) -> Result<Self> {
        let producer = Self::new(config)?;
        let mut slot = producer.inner.channels[0].lock().await;
        producer.channel(&mut slot).await?;
        drop(slot);
        Ok(producer)
    }

    /// The configuration.
    pub fn config(&self) -> &ProducerConfig {
        &self.inner.config
    }

    /// How many connections this producer opened so far (1 after the first send; each
    /// reconnect adds one).
    pub fn connections_opened(&self) -> u64 {
        self.inner.connects.load(Ordering::Relaxed)
    }

    /// Close the connection. A later send reconnects.
    pub async fn close(&self) {
        for slot in &self.inner.channels {
            slot.lock().await.take();
        }
        if let Some(c) = self.inner.connection.lock().await.connection.take() {
            let _ = c.close(200, "OK".into()).await;
        }
    }

    /// A confirm-mode channel for `slot`, reconnecting if the connection is gone.
    async fn channel(&self, slot: &mut Option<Channel>) -> Result<Channel> {
        if let Some(c) = slot.as_ref()
            && c.status().connected()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let config = &self.inner.config.connection;
        let mut cs = self.inner.connection.lock().await;
        if !cs
            .connection
            .as_ref()
            .is_some_and(|c| c.status().connected())
        {
            if cs.connection.take().is_some() {
                tracing::info!(url = %config.url, "RabbitMQ connection lost; reconnecting");
            }
            cs.backoff.check(&format!("connect to {}", config.url))?;
            match config.connect("outbox-producer").await {
                Ok(c) => {
                    cs.backoff.succeeded();
                    self.inner.connects.fetch_add(1, Ordering::Relaxed);
                    cs.connection = Some(c);
                }
                Err(e) => {
                    cs.backoff.failed(config);
                    tracing::warn!(error = %e, "RabbitMQ connection attempt failed");
                    return Err(e);
                }
            }
        }
        let Some(connection) = cs.connection.as_ref() else {
            return Err(Error::unexpected(
                "RabbitMQ connection missing after connect",
            ));
        };
        let opened = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        }
        .await;
        match opened {
            Ok(channel) => {
                *slot = Some(channel.clone());
                Ok(channel)
            }
            Err(e) => {
                let e = parse_error(Failure::Lapin(e), "open a confirm-mode channel");
                if e.is_retryable() {
                    // Most likely the connection died: open a new one next time.
                    cs.connection = None;
                }
                Err(e)
            }
        }
    }

    async fn publish_once(
        &self,
        channel: &Channel,
        exchange: &ShortString,
        routing_key: &ShortString,
        payload: &[u8],
        properties: BasicProperties,
    ) -> std::result::Result<(), Failure> {
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let timeout = self.inner.config.confirm_timeout;
        let confirmation = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(
                    exchange.clone(),
                    routing_key.clone(),
                    options,
                    payload,
                    properties,
                )
                .await?
                .await
        })
        .await
        .map_err(|_| Failure::Timeout(timeout))??;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(Failure::Returned {
                    code: returned.reply_code,
                    text: returned.reply_text.to_string(),
                })
            }
            Confirmation::Nack(None) => Err(Failure::Nacked),
            Confirmation::NotRequested => Err(Failure::NotConfirmed),
        }
    }
}

impl fmt::Debug for RabbitMqProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqProducer")
            .field("config", &self.inner.config)
            .field("connections_opened", &self.connections_opened())
            .finish_non_exhaustive()
    }
}

fn short(field: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid_input(format!(
            "{field} {value:?} is {} bytes long; AMQP allows at most 255",
            value.len()
        ))
    })
}

#[async_trait]
impl Producer for RabbitMqProducer {
    /// Publish with confirm, persistence and `mandatory`.
    ///
    /// # Errors
    /// - permanent `InvalidInput`: an invalid message, or a routing key (topic) or exchange
    ///   over 255 bytes;
    /// - permanent `PayloadTooLarge`: over [`ProducerConfig::max_message_size`] or the
    ///   broker's `max_message_size`;
    /// - permanent `NotFound`: unroutable (returned), or the exchange does not exist;
    /// - permanent `ConfigInvalid`: access refused;
    /// - retryable `Unavailable`: connection or channel failure, reconnect backoff, negative
    ///   confirm, confirm timeout. After a connection failure during the publish the send
    ///   is retried once on a new connection, which may duplicate the message
    ///   (at-least-once; the consumer's inbox removes duplicates).
    async fn send(&self, message: &Message) -> Result<()> {
        let route = self.inner.config.route_for(&message.topic);
        let exchange = short("exchange", &route.exchange)?;
        let routing_key = short("routing key (topic)", &route.routing_key)?;
        let properties = codec::encode(message)?;
        if let Some(limit) = self.inner.config.max_message_size
            && message.payload.len() > limit
        {
            return Err(Error::payload_too_large(message.payload.len(), limit));
        }
        let context = format!(
            "publish message {} to exchange {:?} with routing key {:?}",
            message.id, route.exchange, route.routing_key
        );
        let index =
            self.inner.next_channel.fetch_add(1, Ordering::Relaxed) % self.inner.channels.len();
        let mut slot = self.inner.channels[index].lock().await;
        let mut retried = false;
        loop {
            let channel = self.channel(&mut slot).await?;
            let result = self
                .publish_once(
                    &channel,
                    &exchange,
                    &routing_key,
                    &message.payload,
                    properties.clone(),
                )
                .await;
            let failure = match result {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            // Never reuse a channel after a failure: it may be closed, or hold a stale
            // confirm or returned message.
            *slot = None;
            let died = matches!(failure, Failure::Lapin(_)) && !channel.status().connected();
            let error = parse_error(failure, &context);
            if died && error.is_retryable() && !retried {
                tracing::info!(error = %error, "channel closed during publish; retrying once");
                retried = true;
                continue;
            }
            return Err(error);
        }
    }
}
