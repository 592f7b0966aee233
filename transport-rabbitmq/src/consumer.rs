//! [`RabbitMqConsumer`]: manual acks, prefetch, delivery counting and dead-lettering.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions,
    BasicQosOptions, ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection};
use outbox_core::{CancellationToken, Consumer, Delivery, Error, ErrorKind, Message, Result, Utc};
use tokio::sync::Mutex;

use crate::codec;
use crate::conn::{Backoff, ConnectionConfig};
use crate::error::{Failure, parse_error};
use crate::topology::Topology;

/// Configuration of a [`RabbitMqConsumer`].
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Broker address, connection name, timeouts, reconnect backoff.
    pub connection: ConnectionConfig,
    /// The queue to consume. Use a quorum queue (see [`QueueType`](crate::QueueType)).
    pub queue: String,
    /// Most deliveries handed out and not yet acked (`basic.qos` prefetch, default 64). Set
    /// it at least to the number of deliveries the processor handles at once.
    /// Use 1 with a single consumer for strict per-queue order across nacks.
    pub prefetch: u16,
    /// Exchange that [`Consumer::dead_letter`] publishes to (default `<queue>.dlx`, as
    /// declared by [`Topology::new`]). `""` is the default exchange: the routing key then
    /// names the dead-letter queue directly.
    pub dead_letter_exchange: String,
    /// Routing key of dead-letter publishes (default: the queue name, the binding
    /// [`declare_topology`](crate::declare_topology) creates).
    pub dead_letter_routing_key: String,
    /// How long to wait for the broker's confirm of a dead-letter publish (default 30 s).
    pub confirm_timeout: Duration,
}

impl ConsumerConfig {
    /// Consume `queue`; dead letters go to `<queue>.dlx` with routing key `queue`.
    pub fn new(connection: ConnectionConfig, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        ConsumerConfig {
            connection,
            dead_letter_exchange: format!("{queue}.dlx"),
            dead_letter_routing_key: queue.clone(),
            queue,
            prefetch: 64,
            confirm_timeout: Duration::from_secs(30),
        }
    }

    /// Consume the queue of `topology`, dead-lettering to its dead-letter exchange.
    pub fn from_topology(connection: ConnectionConfig, topology: &Topology) -> Self {
        let mut config = Self::new(connection, topology.queue.clone());
        if let Some(dlx) = &topology.dead_letter_exchange {
            config.dead_letter_exchange = dlx.clone();
        }
        config
    }
}

/// A [`Consumer`] of one RabbitMQ queue.
///
/// - **Manual acks**: a delivery is acked only by [`Consumer::ack`] (the inbox processor
///   calls it after the handler and its inbox entry committed). Un-acked deliveries return
///   to the queue when the consumer's channel closes (crash, drop, connection loss).
/// - **Prefetch**: at most [`ConsumerConfig::prefetch`] un-acked deliveries at a time.
/// - **Attempt**: `Delivery::attempt` is the quorum queue's `x-delivery-count` + 1. That
///   count lives in the queue, so it survives nacks, consumer restarts and reconnects.
/// - **nack** requeues (`basic.nack requeue=true`); quorum queues deliver returned
///   messages before the rest of the queue.
/// - **dead_letter** publishes the message (same properties and headers) to the dead-letter
///   exchange with `x-outbox-dead-letter-reason` and friends, waits for the confirm
///   (mandatory: an unbound dead-letter exchange is an error, not a silent drop), and only
///   then acks the original. If the publish fails the original is nacked back to the queue.
/// - **Reconnecting**: `receive` re-opens a lost connection and re-subscribes (with
///   backoff), instead of returning an error; it returns an error only for permanent
///   failures (queue deleted, access refused). Deliveries from before a reconnect can no
///   longer be acked: `ack` fails with a retryable error, the broker redelivers them.
/// - Messages that cannot be decoded (no UUID `message_id`) are dead-lettered with the
///   decoding error as reason.
pub struct RabbitMqConsumer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ConsumerConfig,
    connection: Mutex<ConnectionSlot>,
    subscription: Mutex<Option<Subscription>>,
    publisher: Mutex<Option<Channel>>,
    in_flight: std::sync::Mutex<HashMap<u64, Acker>>,
    current: std::sync::Mutex<Option<(Channel, ShortString)>>,
    next_tag: AtomicU64,
    closed: CancellationToken,
}

#[derive(Default)]
struct ConnectionSlot {
    connection: Option<Connection>,
    backoff: Backoff,
}

struct Subscription {
    // Keeps the channel open for as long as the subscription lives.
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl RabbitMqConsumer {
    /// Connect and start consuming `config.queue`.
    ///
    /// # Errors
    /// Retryable `Unavailable` when the broker is unreachable; permanent `NotFound` when the
    /// queue does not exist; `ConfigInvalid` for refused access or a bad configuration.
    pub async fn connect(config: ConsumerConfig) -> Result<Self> {
        if config.prefetch == 0 {
            return Err(Error::config(
                "ConsumerConfig::prefetch must be at least 1 (0 would mean unlimited)",
            ));
        }
        let consumer = RabbitMqConsumer {
            inner: Arc::new(Inner {
                config,
                connection: Mutex::new(ConnectionSlot::default()),
                subscription: Mutex::new(None),
                publisher: Mutex::new(None),
                in_flight: std::sync::Mutex::new(HashMap::new()),
                current: std::sync::Mutex::new(None),
                next_tag: AtomicU64::new(0),
                closed: CancellationToken::new(),
            }),
        };
        let subscription = consumer.subscribe().await?;
        *consumer.inner.subscription.lock().await = Some(subscription);
        Ok(consumer)
    }

    /// The configuration.
    pub fn config(&self) -> &ConsumerConfig {
        &self.inner.config
    }

    /// Stop consuming: `receive` returns `Ok(None)` from now on. Deliveries already handed
    /// out can still be acked, nacked or dead-lettered; prefetched ones not yet received go
    /// back to the queue.
    pub async fn close(&self) {
        self.inner.closed.cancel();
        let current = self.lock_current().take();
        if let Some((channel, tag)) = current {
            let _ = channel
                .basic_cancel(tag, lapin::options::BasicCancelOptions::default())
                .await;
        }
    }

    /// Deliveries handed out by `receive` and not yet settled.
    pub fn unsettled(&self) -> usize {
        self.lock_in_flight().len()
    }

    fn lock_in_flight(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Acker>> {
        self.inner
            .in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn lock_current(&self) -> std::sync::MutexGuard<'_, Option<(Channel, ShortString)>> {
        self.inner.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new channel, reconnecting first if the connection is gone.
    async fn open_channel(&self) -> Result<Channel> {
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
            match config.connect("outbox-consumer").await {
                Ok(c) => {
                    cs.backoff.succeeded();
                    cs.connection = Some(c);
                }
                Err(e) => {
                    cs.backoff.failed(config);
                    return Err(e);
                }
            }
        }
        let Some(connection) = cs.connection.as_ref() else {
            return Err(Error::unexpected(
                "RabbitMQ connection missing after connect",
            ));
        };
        match connection.create_channel().await {
            Ok(c) => Ok(c),
            Err(e) => {
                let e = parse_error(Failure::Lapin(e), "open a channel");
                if e.is_retryable() {
                    cs.connection = None;
                }
                Err(e)
            }
        }
    }

    async fn backoff_remaining(&self) -> Duration {
        self.inner.connection.lock().await.backoff.remaining()
    }

    async fn subscribe(&self) -> Result<Subscription> {
        let config = &self.inner.config;
        let queue = ShortString::try_new(config.queue.as_str()).map_err(|_| {
            Error::config(format!(
                "queue name {:?} is longer than 255 bytes",
                config.queue
            ))
        })?;
        let channel = self.open_channel().await?;
        let context = format!("consume queue {:?}", config.queue);
        let started = async {
            channel
                .basic_qos(config.prefetch, BasicQosOptions::default())
                .await?;
            channel
                .basic_consume(
                    queue,
                    ShortString::default(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        }
        .await;
        let consumer = started.map_err(|e| parse_error(Failure::Lapin(e), &context))?;
        // Deliveries of closed channels can never be settled: forget them.
        self.lock_in_flight().retain(|_, acker| !acker.poisoned());
        *self.lock_current() = Some((channel.clone(), consumer.tag()));
        Ok(Subscription {
            _channel: channel,
            consumer,
        })
    }

    fn take(&self, delivery: &Delivery, what: &str) -> Result<Acker> {
        self.lock_in_flight().remove(&delivery.tag).ok_or_else(|| {
            Error::new(
                ErrorKind::NotFound,
                format!(
                    "cannot {what} delivery {} (message {}) of queue {:?}: not an outstanding \
                     delivery of this consumer (already settled, or from another consumer)",
                    delivery.tag, delivery.message.id, self.inner.config.queue
                ),
            )
        })
    }

    /// Publish to the dead-letter exchange and wait for the confirm.
    async fn publish_dead_letter(&self, properties: BasicProperties, payload: &[u8]) -> Result<()> {
        let config = &self.inner.config;
        let context = format!(
            "dead-letter to exchange {:?} with routing key {:?}",
            config.dead_letter_exchange, config.dead_letter_routing_key
        );
        let names = ShortString::try_new(config.dead_letter_exchange.as_str())
            .and_then(|x| {
                ShortString::try_new(config.dead_letter_routing_key.as_str()).map(|k| (x, k))
            })
            .map_err(|_| Error::config(format!("{context}: a name is over 255 bytes")))?;
        let mut slot = self.inner.publisher.lock().await;
        let channel = match slot.as_ref() {
            Some(c) if c.status().connected() => c.clone(),
            _ => {
                let c = self.open_channel().await?;
                c.confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| parse_error(Failure::Lapin(e), &context))?;
                *slot = Some(c.clone());
                c
            }
        };
        let timeout = config.confirm_timeout;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let result = tokio::time::timeout(timeout, async {
            channel
                .basic_publish(names.0, names.1, options, payload, properties)
                .await?
                .await
        })
        .await;
        let failure = match result {
            Err(_) => Failure::Timeout(timeout),
            Ok(Err(e)) => Failure::Lapin(e),
            Ok(Ok(Confirmation::Ack(None))) => return Ok(()),
            Ok(Ok(Confirmation::Ack(Some(r)) | Confirmation::Nack(Some(r)))) => Failure::Returned {
                code: r.reply_code,
                text: r.reply_text.to_string(),
            },
            Ok(Ok(Confirmation::Nack(None))) => Failure::Nacked,
            Ok(Ok(Confirmation::NotRequested)) => Failure::NotConfirmed,
        };
        *slot = None;
        Err(parse_error(failure, &context))
    }

    /// A delivery that cannot be decoded: dead-letter it as it is, with the decoding error.
    async fn dead_letter_raw(&self, d: lapin::message::Delivery, error: &Error) -> Result<()> {
        let reason = format!("undecodable message: {error}");
        tracing::warn!(queue = %self.inner.config.queue, %reason, "dead-lettering a message");
        let props = codec::with_dead_letter_headers(
            d.properties.clone(),
            &reason,
            &self.inner.config.queue,
            codec::attempt(&d.properties),
            Utc::now(),
        );
        match self.publish_dead_letter(props, &d.data).await {
            Ok(()) => settle(&d.acker, Settle::Ack, "ack a dead-lettered delivery").await,
            Err(e) => {
                let _ = settle(&d.acker, Settle::Requeue, "nack").await;
                Err(e)
            }
        }
    }
}

enum Settle {
    Ack,
    Requeue,
}

async fn settle(acker: &Acker, how: Settle, what: &str) -> Result<()> {
    let result = match how {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    multiple: false,
                    requeue: true,
                })
                .await
        }
    };
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(Error::unavailable(format!(
            "{what}: the delivery's channel is closed; the broker redelivers the message"
        ))),
        Err(e) => Err(parse_error(Failure::Lapin(e), what)),
    }
}

impl fmt::Debug for RabbitMqConsumer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqConsumer")
            .field("config", &self.inner.config)
            .field("unsettled", &self.unsettled())
            .field("closed", &self.inner.closed.is_cancelled())
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Consumer for RabbitMqConsumer {
    /// The next delivery. Waits through connection losses (reconnecting with backoff).
    ///
    /// # Errors
    /// Permanent errors only: the queue is gone (`NotFound`), access refused
    /// (`ConfigInvalid`), an undecodable message that cannot be dead-lettered.
    async fn receive(&self) -> Result<Option<Delivery>> {
        let mut subscription = self.inner.subscription.lock().await;
        loop {
            if self.inner.closed.is_cancelled() {
                return Ok(None);
            }
            if subscription.is_none() {
                match self.subscribe().await {
                    Ok(s) => *subscription = Some(s),
                    Err(e) if e.is_retryable() => {
                        tracing::warn!(queue = %self.inner.config.queue, error = %e,
                            "RabbitMQ consumer cannot subscribe; retrying");
                        let wait = self
                            .backoff_remaining()
                            .await
                            .max(self.inner.config.connection.reconnect_min);
                        tokio::select! {
                            _ = self.inner.closed.cancelled() => {}
                            _ = tokio::time::sleep(wait) => {}
                        }
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            let Some(sub) = subscription.as_mut() else {
                continue;
            };
            let next = tokio::select! {
                _ = self.inner.closed.cancelled() => continue,
                next = sub.consumer.next() => next,
            };
            match next {
                Some(Ok(d)) => {
                    let attempt = codec::attempt(&d.properties);
                    match codec::decode(&d.properties, &d.data, d.routing_key.as_str()) {
                        Ok(message) => {
                            let tag = self.inner.next_tag.fetch_add(1, Ordering::Relaxed) + 1;
                            self.lock_in_flight().insert(tag, d.acker);
                            return Ok(Some(Delivery {
                                message,
                                attempt,
                                tag,
                            }));
                        }
                        Err(e) => match self.dead_letter_raw(d, &e).await {
                            Ok(()) => continue,
                            Err(e) if e.is_retryable() => continue,
                            Err(e) => return Err(e),
                        },
                    }
                }
                Some(Err(e)) => {
                    let e = parse_error(Failure::Lapin(e), "receive");
                    *subscription = None;
                    if !e.is_retryable() {
                        return Err(e);
                    }
                    tracing::warn!(queue = %self.inner.config.queue, error = %e,
                        "RabbitMQ consumer lost its channel; re-subscribing");
                }
                None => {
                    // Cancelled: by close(), or by the broker (queue deleted: re-subscribing
                    // then fails with NotFound).
                    *subscription = None;
                }
            }
        }
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let acker = self.take(delivery, "ack")?;
        settle(&acker, Settle::Ack, "ack").await
    }

    /// Requeue the message; it comes back with `attempt + 1`.
    async fn nack(&self, delivery: &Delivery) -> Result<()> {
        let acker = self.take(delivery, "nack")?;
        settle(&acker, Settle::Requeue, "nack").await
    }

    /// Publish to the dead-letter exchange with the reason, then ack. If the publish fails
    /// the delivery is nacked (requeued) and the error returned: nothing is lost.
    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        let acker = self.take(delivery, "dead-letter")?;
        let published = async {
            let props = codec::with_dead_letter_headers(
                codec::encode(&delivery.message, None)?,
                reason,
                &self.inner.config.queue,
                delivery.attempt,
                Utc::now(),
            );
            self.publish_dead_letter(props, &delivery.message.payload)
                .await
        }
        .await;
        match published {
            Ok(()) => settle(&acker, Settle::Ack, "ack a dead-lettered delivery").await,
            Err(e) => {
                if let Err(nack) = settle(&acker, Settle::Requeue, "nack").await {
                    tracing::warn!(error = %nack, "nack after a failed dead-letter failed");
                }
                Err(e)
            }
        }
    }
}

/// A message read from a dead-letter queue by [`fetch_dead_letters`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as published (id, headers and all).
    pub message: Message,
    /// Why it was dead-lettered: the handler's error, or the broker's `x-death` reason.
    pub reason: String,
    /// The delivery attempt that was dead-lettered, when recorded.
    pub attempts: Option<u32>,
}

/// Take up to `max` messages off the dead-letter queue `queue` (they are removed from it).
/// Messages that cannot be decoded are left in the queue.
///
/// # Errors
/// Retryable `Unavailable` when the broker is unreachable; `NotFound` when the queue does not
/// exist.
pub async fn fetch_dead_letters(
    connection: &ConnectionConfig,
    queue: &str,
    max: usize,
) -> Result<Vec<DeadLetter>> {
    let name = ShortString::try_new(queue)
        .map_err(|_| Error::config(format!("queue name {queue:?} is longer than 255 bytes")))?;
    let conn = connection.connect("outbox-dead-letters").await?;
    let context = format!("read dead-letter queue {queue:?}");
    let lapin_err = |e| parse_error(Failure::Lapin(e), &context);
    let channel = conn.create_channel().await.map_err(lapin_err)?;
    let mut found = Vec::new();
    let mut undecodable = Vec::new();
    while found.len() < max {
        let Some(got) = channel
            .basic_get(name.clone(), BasicGetOptions::default())
            .await
            .map_err(lapin_err)?
        else {
            break;
        };
        let d = got.delivery;
        match codec::decode(&d.properties, &d.data, d.routing_key.as_str()) {
            Ok(message) => {
                settle(&d.acker, Settle::Ack, "ack a dead letter").await?;
                found.push(DeadLetter {
                    reason: codec::dead_letter_reason(&d.properties).unwrap_or_default(),
                    attempts: codec::dead_letter_attempts(&d.properties),
                    message,
                });
            }
            // Keep it un-acked until the end, so basic_get does not return it again.
            Err(_) => undecodable.push(d.acker),
        }
    }
    for acker in undecodable {
        let _ = settle(
            &acker,
            Settle::Requeue,
            "requeue an undecodable dead letter",
        )
        .await;
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(found)
}
