//! [`RabbitMqProducer`]: confirmed, persistent, mandatory, pipelined publishing with
//! reconnection.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures::FutureExt;
use futures::stream::{FuturesUnordered, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};

use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{Error, Message, Producer, Result};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::codec;
use crate::conn::{Backoff, ConnectionConfig};
use crate::error::{Failure, parse_error};

/// RabbitMQ's default `max_message_size` (128 MiB), the largest body it accepts.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;

/// Default [`ProducerConfig::window`]: unconfirmed publishes per channel.
pub const DEFAULT_WINDOW: usize = 512;

/// Largest accepted [`ProducerConfig::window`].
pub const MAX_WINDOW: usize = 1 << 20;

/// How long closing an abandoned connection may wait for the broker's `close-ok`.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

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
    /// Confirm-mode channels the producer spreads its sends over (default 8). Concurrent
    /// sends and `send_batch` use them all; one `send_ordered` call uses one channel.
    pub channels: usize,
    /// Most unconfirmed publishes per channel at once, the publishing window (default
    /// [`DEFAULT_WINDOW`]). A send past it waits for a confirm to free a place.
    pub window: usize,
    /// The longest a send (`send`, `send_batch`'s messages, a whole `send_ordered` call)
    /// waits for the broker's confirms, counted from the start of the call (default 10 s).
    /// On expiry the send fails with a retryable error and the producer **closes its
    /// connection**, so nothing of it still queued in the client can go out later; this is
    /// [`Producer::delivery_timeout`]. The message may still have been stored
    /// (at-least-once).
    pub confirm_timeout: Duration,
    /// Reject bodies over this many bytes before sending, with a permanent
    /// `PayloadTooLarge` (default [`DEFAULT_MAX_MESSAGE_SIZE`], the broker's default
    /// limit; set it to the broker's `max_message_size`). `None`: let the broker decide.
    pub max_message_size: Option<usize>,
    /// Send every message as a CloudEvent in binary content mode (`None`, the default: off):
    /// `cloudEvents:id`, `cloudEvents:type`, `cloudEvents:source`, `cloudEvents:specversion`
    /// and `cloudEvents:time` headers (AMQP application properties) are added, with the values
    /// [`outbox_core::cloudevents`] defines; the content type is the AMQP `content-type`
    /// property as always. [`RabbitMqConsumer`](crate::RabbitMqConsumer) decodes such
    /// messages unchanged.
    pub cloud_events: Option<CloudEvents>,
}

impl ProducerConfig {
    /// Publish every topic to `exchange` with the topic as routing key.
    pub fn new(connection: ConnectionConfig, exchange: impl Into<String>) -> Self {
        ProducerConfig {
            connection,
            exchange: exchange.into(),
            routes: BTreeMap::new(),
            channels: 8,
            window: DEFAULT_WINDOW,
            confirm_timeout: Duration::from_secs(10),
            max_message_size: Some(DEFAULT_MAX_MESSAGE_SIZE),
            cloud_events: None,
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

    /// Send messages as CloudEvents in binary content mode with `cloud_events`' source (see
    /// [`cloud_events`](Self::cloud_events)).
    pub fn with_cloud_events(mut self, cloud_events: CloudEvents) -> Self {
        self.cloud_events = Some(cloud_events);
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
        if self.window == 0 || self.window > MAX_WINDOW {
            return Err(Error::config(format!(
                "ProducerConfig::window must be between 1 and {MAX_WINDOW}, got {}",
                self.window
            )));
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
/// - **Confirmed**: every channel is in confirm mode; a send returns `Ok` only after the
///   broker's `basic.ack` for that message, i.e. after it was routed and stored (for quorum
///   queues, replicated to a majority).
/// - **Persistent**: delivery mode 2, so durable queues keep the message across a broker
///   restart.
/// - **Mandatory**: an unroutable message comes back (`basic.return`); its send then fails
///   with a permanent [`ErrorKind::NotFound`](outbox_core::ErrorKind::NotFound) instead of
///   the broker silently dropping it. Returns are matched to sends by the AMQP
///   `message_id` (the message's id), never by arrival order.
/// - **Pipelined**: up to [`ProducerConfig::window`] publishes per channel wait for their
///   confirms at once, on [`ProducerConfig::channels`] channels. Confirms are tracked per
///   delivery tag (lapin resolves each tag of a `multiple` ack).
/// - **Bounded**: nothing waits longer than [`ProducerConfig::confirm_timeout`]; on expiry
///   the connection is closed (see there).
/// - **Reconnecting**: a send that finds the connection (or its channel) closed opens a new
///   one; a failed connection attempt delays the next one (exponential backoff, see
///   [`ConnectionConfig`]) and sends fail fast with a retryable error meanwhile. No message
///   stays stuck behind a dead connection, and the producer never needs recreating.
///
/// Clones share connection and channels.
#[derive(Clone)]
pub struct RabbitMqProducer {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProducerConfig,
    connection: Mutex<ConnectionSlot>,
    lanes: Vec<Mutex<Option<Arc<Lane>>>>,
    next_lane: AtomicUsize,
    connects: AtomicU64,
}

#[derive(Default)]
struct ConnectionSlot {
    connection: Option<Connection>,
    /// Which connection this is (the value of `connects` when it was opened).
    generation: u64,
    backoff: Backoff,
}

/// One confirm-mode channel with its window and the task that settles its confirms.
struct Lane {
    channel: Channel,
    /// The connection the channel belongs to ([`ConnectionSlot::generation`]).
    generation: u64,
    /// Held while publishing one message: publishes of one caller go out in call order,
    /// and confirms are registered in delivery-tag order.
    publish: Mutex<()>,
    /// Free places in the window.
    window: Arc<Semaphore>,
    /// To [`settle_confirms`].
    confirms: mpsc::UnboundedSender<Pending>,
}

/// A publish waiting for its confirm.
struct Pending {
    confirm: PublisherConfirm,
    message_id: String,
    done: oneshot::Sender<std::result::Result<(), Failure>>,
    _place: OwnedSemaphorePermit,
}

/// A publish whose confirm arrived.
struct Settled {
    confirmation: lapin::Result<Confirmation>,
    message_id: String,
    done: oneshot::Sender<std::result::Result<(), Failure>>,
    _place: OwnedSemaphorePermit,
}

/// Returned messages not yet matched to their publish, keyed by message id.
const MAX_UNMATCHED_RETURNS: usize = 4096;

/// Settle the confirms of one channel as they arrive, until the lane is dropped and every
/// registered confirm resolved.
///
/// lapin hands a returned message (`basic.return`) to whichever confirm it resolves next,
/// which under pipelining (and `multiple` acks, which lapin resolves tag by tag in no set
/// order) need not be the returned message's own publish. The broker sends the return before
/// the ack of the same message, and lapin resolves every tag of one ack frame before any
/// waiter runs; so after one confirm resolves, this drains every registration and every
/// other confirm already resolved, then matches returns to publishes by message id.
async fn settle_confirms(mut registrations: mpsc::UnboundedReceiver<Pending>) {
    let mut waiting = FuturesUnordered::new();
    let mut returned: HashMap<String, (u16, String)> = HashMap::new();
    let mut open = true;
    let arrived = |p: Pending| async move {
        let confirmation = p.confirm.await;
        Settled {
            confirmation,
            message_id: p.message_id,
            done: p.done,
            _place: p._place,
        }
    };
    while open || !waiting.is_empty() {
        let first = tokio::select! {
            registration = registrations.recv(), if open => {
                match registration {
                    Some(p) => waiting.push(arrived(p)),
                    None => open = false,
                }
                continue;
            }
            Some(settled) = waiting.next(), if !waiting.is_empty() => settled,
            else => break,
        };
        let mut batch = vec![first];
        while let Ok(p) = registrations.try_recv() {
            waiting.push(arrived(p));
        }
        while let Some(Some(settled)) = waiting.next().now_or_never() {
            batch.push(settled);
        }
        for s in &batch {
            if let Ok(Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m))) = &s.confirmation
                && let Some(id) = m.properties.message_id()
            {
                returned.insert(id.to_string(), (m.reply_code, m.reply_text.to_string()));
            }
        }
        for s in batch {
            let outcome = if let Some((code, text)) = returned.remove(&s.message_id) {
                Err(Failure::Returned { code, text })
            } else {
                match s.confirmation {
                    Ok(Confirmation::Ack(_)) => Ok(()),
                    Ok(Confirmation::Nack(_)) => Err(Failure::Nacked),
                    Ok(Confirmation::NotRequested) => Err(Failure::NotConfirmed),
                    Err(e) => Err(Failure::Lapin(e)),
                }
            };
            // The sender may have given up (timeout); nothing to tell then.
            let _ = s.done.send(outcome);
        }
        if returned.len() > MAX_UNMATCHED_RETURNS {
            tracing::warn!(
                unmatched = returned.len(),
                "RabbitMQ returned messages that match no waiting publish; forgetting them"
            );
            returned.clear();
        }
    }
}

/// A message ready to publish.
struct Prepared<'a> {
    exchange: ShortString,
    routing_key: ShortString,
    properties: BasicProperties,
    payload: &'a [u8],
    message_id: String,
    context: String,
}

/// The confirm of one publish, on its way.
type Confirm = oneshot::Receiver<std::result::Result<(), Failure>>;

impl RabbitMqProducer {
    /// A producer that connects on its first send (so it can be built while the broker is
    /// down).
    ///
    /// # Errors
    /// `ConfigInvalid` for a bad configuration.
    pub fn new(config: ProducerConfig) -> Result<Self> {
        config.validate()?;
        let lanes = (0..config.channels).map(|_| Mutex::new(None)).collect();
        Ok(RabbitMqProducer {
            inner: Arc::new(Inner {
                config,
                connection: Mutex::new(ConnectionSlot::default()),
                lanes,
                next_lane: AtomicUsize::new(0),
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
        producer.lane(0).await?;
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
        for slot in &self.inner.lanes {
            slot.lock().await.take();
        }
        if let Some(c) = self.inner.connection.lock().await.connection.take() {
            let _ = c.close(200, "OK".into()).await;
        }
    }

    /// The lane of slot `index`, opening a channel (and a connection) if it is gone.
    async fn lane(&self, index: usize) -> Result<Arc<Lane>> {
        let mut slot = self.inner.lanes[index].lock().await;
        if let Some(lane) = slot.as_ref()
            && lane.channel.status().connected()
        {
            return Ok(lane.clone());
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
                    cs.generation = self.inner.connects.fetch_add(1, Ordering::Relaxed) + 1;
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
                let (confirms, registrations) = mpsc::unbounded_channel();
                tokio::spawn(settle_confirms(registrations));
                let lane = Arc::new(Lane {
                    channel,
                    generation: cs.generation,
                    publish: Mutex::new(()),
                    window: Arc::new(Semaphore::new(self.inner.config.window)),
                    confirms,
                });
                *slot = Some(lane.clone());
                Ok(lane)
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

    /// The next lane, round robin; waiting (to connect, or for the slot) until `deadline`
    /// at most.
    async fn next_lane(&self, deadline: Instant) -> Result<Arc<Lane>> {
        let index = self.inner.next_lane.fetch_add(1, Ordering::Relaxed) % self.inner.lanes.len();
        match tokio::time::timeout_at(deadline, self.lane(index)).await {
            Ok(lane) => lane,
            Err(_) => Err(parse_error(
                Failure::Timeout(self.inner.config.confirm_timeout),
                &format!("open a channel to {}", self.inner.config.connection.url),
            )),
        }
    }

    /// Check and encode `message` for publishing.
    fn prepare<'a>(&self, message: &'a Message) -> Result<Prepared<'a>> {
        let route = self.inner.config.route_for(&message.topic);
        let exchange = short("exchange", &route.exchange)?;
        let routing_key = short("routing key (topic)", &route.routing_key)?;
        let properties = codec::encode(message, self.inner.config.cloud_events.as_ref())?;
        if let Some(limit) = self.inner.config.max_message_size
            && message.payload.len() > limit
        {
            return Err(Error::payload_too_large(message.payload.len(), limit));
        }
        Ok(Prepared {
            exchange,
            routing_key,
            properties,
            payload: &message.payload,
            message_id: message.id.to_string(),
            context: format!(
                "publish message {} to exchange {:?} with routing key {:?}",
                message.id, route.exchange, route.routing_key
            ),
        })
    }

    /// Publish `m` on `lane` once there is room in its window; the confirm comes through
    /// the returned receiver.
    async fn publish(
        &self,
        lane: &Lane,
        m: &Prepared<'_>,
        deadline: Instant,
    ) -> std::result::Result<Confirm, Failure> {
        let timeout = Failure::Timeout(self.inner.config.confirm_timeout);
        let place =
            match tokio::time::timeout_at(deadline, lane.window.clone().acquire_owned()).await {
                Ok(Ok(place)) => place,
                Ok(Err(_)) => return Err(Failure::Unconfirmed),
                Err(_) => return Err(timeout),
            };
        let Ok(_turn) = tokio::time::timeout_at(deadline, lane.publish.lock()).await else {
            return Err(timeout);
        };
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let confirm = tokio::time::timeout_at(
            deadline,
            lane.channel.basic_publish(
                m.exchange.clone(),
                m.routing_key.clone(),
                options,
                m.payload,
                m.properties.clone(),
            ),
        )
        .await
        .map_err(|_| timeout)??;
        let (done, confirmed) = oneshot::channel();
        lane.confirms
            .send(Pending {
                confirm,
                message_id: m.message_id.clone(),
                done,
                _place: place,
            })
            .map_err(|_| Failure::Unconfirmed)?;
        Ok(confirmed)
    }

    /// Wait for `confirm` until `deadline`.
    async fn confirmed(
        &self,
        confirm: Confirm,
        deadline: Instant,
    ) -> std::result::Result<(), Failure> {
        match tokio::time::timeout_at(deadline, confirm).await {
            Ok(Ok(outcome)) => outcome,
            // The settling task ended without an answer: the channel is gone.
            Ok(Err(_)) => Err(Failure::Unconfirmed),
            Err(_) => Err(Failure::Timeout(self.inner.config.confirm_timeout)),
        }
    }

    /// Turn a failure of a publish on `lane` into the error to report; after a timeout,
    /// close the lane's connection first, so that nothing still queued in the client for
    /// it can reach the broker later.
    async fn fail(&self, lane: &Lane, failure: Failure, context: &str) -> Error {
        if matches!(failure, Failure::Timeout(_)) {
            self.abandon(lane).await;
        }
        parse_error(failure, context)
    }

    /// Close the connection of `lane` (if it is still the current one) after a confirm
    /// timeout. `connection.close` goes out ahead of publishes still queued in lapin
    /// (control frames have priority), the broker discards what follows it, and lapin
    /// drops the queued frames when the connection shuts down. Every send still waiting on
    /// the connection fails with a retryable error.
    async fn abandon(&self, lane: &Lane) {
        let connection = {
            let mut cs = self.inner.connection.lock().await;
            if cs.generation != lane.generation {
                None
            } else {
                cs.connection.take()
            }
        };
        let Some(connection) = connection else {
            return;
        };
        tracing::warn!(
            timeout_ms = self.inner.config.confirm_timeout.as_millis(),
            "RabbitMQ publish unconfirmed within the confirm timeout; closing the connection \
             so that nothing of it is published later"
        );
        let _ = tokio::time::timeout(
            CLOSE_WAIT,
            connection.close(
                320,
                "outbox: confirm timeout, abandoning unconfirmed publishes".into(),
            ),
        )
        .await;
        for slot in &self.inner.lanes {
            let mut slot = slot.lock().await;
            if slot
                .as_ref()
                .is_some_and(|l| l.generation == lane.generation)
            {
                *slot = None;
            }
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
    /// Publish with confirm, persistence and `mandatory`, sharing a channel's window with
    /// concurrent sends.
    ///
    /// # Errors
    /// - permanent `InvalidInput`: an invalid message, or a routing key (topic) or exchange
    ///   over 255 bytes;
    /// - permanent `PayloadTooLarge`: over [`ProducerConfig::max_message_size`] or the
    ///   broker's `max_message_size`;
    /// - permanent `NotFound`: unroutable (returned), or the exchange does not exist;
    /// - permanent `ConfigInvalid`: access refused;
    /// - retryable `Unavailable`: connection or channel failure, reconnect backoff, negative
    ///   confirm, confirm timeout (which closes the connection). After a connection failure
    ///   during the publish the send is retried once on a new connection, within the same
    ///   confirm timeout, which may duplicate the message (at-least-once; the consumer's
    ///   inbox removes duplicates).
    async fn send(&self, message: &Message) -> Result<()> {
        let m = self.prepare(message)?;
        let deadline = Instant::now() + self.inner.config.confirm_timeout;
        let mut retried = false;
        loop {
            let lane = self.next_lane(deadline).await?;
            let outcome = match self.publish(&lane, &m, deadline).await {
                Ok(confirm) => self.confirmed(confirm, deadline).await,
                Err(f) => Err(f),
            };
            let failure = match outcome {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            let died = matches!(failure, Failure::Lapin(_)) && !lane.channel.status().connected();
            let error = self.fail(&lane, failure, &m.context).await;
            if died && error.is_retryable() && !retried {
                tracing::info!(error = %error, "channel closed during publish; retrying once");
                retried = true;
                continue;
            }
            return Err(error);
        }
    }

    /// Every message as by [`send`](Producer::send), all at once: they spread over the
    /// channels and their windows. No order between them is implied.
    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
        futures::future::join_all(messages.iter().map(|m| self.send(m))).await
    }

    /// Publish `messages` back to back on one channel, up to [`ProducerConfig::window`]
    /// unconfirmed at once, and collect their confirms in order.
    ///
    /// - One channel, so the broker receives and enqueues them in slice order.
    /// - Results stop at the first failure. Publishing stops as soon as a failure is known
    ///   (an invalid or too large message is never published, nor anything after it); but
    ///   messages already published behind a message that then fails (returned, nacked)
    ///   are not recalled and may be stored: see the crate README.
    /// - The whole call is bounded by [`ProducerConfig::confirm_timeout`]: the first
    ///   message unconfirmed by then gets a retryable timeout error and the connection is
    ///   closed.
    /// - No retry on a new connection: after a connection failure the first unconfirmed
    ///   message gets a retryable error.
    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(messages.len());
        if messages.is_empty() {
            return results;
        }
        // A chain whose first message cannot be published fails with that error, also
        // while the broker is unreachable.
        if let Err(e) = self.prepare(&messages[0]) {
            results.push(Err(e));
            return results;
        }
        let deadline = Instant::now() + self.inner.config.confirm_timeout;
        let lane = match self.next_lane(deadline).await {
            Ok(lane) => lane,
            Err(e) => {
                results.push(Err(e));
                return results;
            }
        };
        // Published, confirm outstanding, in slice order.
        let mut open: VecDeque<(Confirm, String)> = VecDeque::new();
        // Why publishing stopped before the end, if it did: (failure, context).
        let mut stopped: Option<(std::result::Result<Failure, Error>, String)> = None;
        for message in messages {
            // Take the confirms that already arrived; stop at a failure.
            while let Some((confirm, _)) = open.front_mut() {
                match confirm.try_recv() {
                    Ok(Ok(())) => {
                        open.pop_front();
                        results.push(Ok(()));
                    }
                    Ok(Err(f)) => {
                        let (_, context) = open.pop_front().expect("front exists");
                        results.push(Err(self.fail(&lane, f, &context).await));
                        return results;
                    }
                    Err(_) => break,
                }
            }
            let m = match self.prepare(message) {
                Ok(m) => m,
                Err(e) => {
                    stopped = Some((Err(e), String::new()));
                    break;
                }
            };
            match self.publish(&lane, &m, deadline).await {
                Ok(confirm) => open.push_back((confirm, m.context)),
                Err(f) => {
                    stopped = Some((Ok(f), m.context));
                    break;
                }
            }
        }
        for (confirm, context) in open {
            match self.confirmed(confirm, deadline).await {
                Ok(()) => results.push(Ok(())),
                Err(f) => {
                    results.push(Err(self.fail(&lane, f, &context).await));
                    return results;
                }
            }
        }
        if let Some((failure, context)) = stopped {
            results.push(Err(match failure {
                Ok(f) => self.fail(&lane, f, &context).await,
                Err(e) => e,
            }));
        }
        results
    }

    /// [`ProducerConfig::confirm_timeout`]: no send is left pending longer; then the
    /// connection is closed.
    fn delivery_timeout(&self) -> Option<Duration> {
        Some(self.inner.config.confirm_timeout)
    }
}
