//! Optional declaration of the exchange, queue, bindings and dead-letter destination.

use lapin::options::{
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, ExchangeKind};
use outbox_core::Result;

use crate::conn::ConnectionConfig;
use crate::error::{Failure, parse_error};

/// The type of an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExchangeType {
    /// Routes on the exact routing key.
    Direct,
    /// Routes on routing-key patterns (`orders.*`, `#`). The default.
    #[default]
    Topic,
    /// Routes every message to every bound queue.
    Fanout,
}

/// The type of the consumed queue and of the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Replicated (Raft) queue. Counts deliveries in the `x-delivery-count` header, which
    /// survives requeues: [`RabbitMqConsumer`](crate::RabbitMqConsumer) needs it to report
    /// `Delivery::attempt`. The default.
    #[default]
    Quorum,
    /// Classic queue. Does not count redeliveries: every delivery has `attempt` 1, so failing
    /// messages are never dead-lettered by the inbox processor. Use only for queues whose
    /// consumers never nack.
    Classic,
}

/// What [`declare_topology`] creates (idempotently: re-declaring with the same arguments is
/// a no-op; with different arguments the broker refuses with a permanent
/// [`ErrorKind::ConfigInvalid`](outbox_core::ErrorKind::ConfigInvalid)).
///
/// Everything is durable. The queue gets `x-dead-letter-exchange` /
/// `x-dead-letter-routing-key` arguments pointing at the dead-letter exchange, so messages
/// the broker itself dead-letters (expiry, `reject` without requeue) land in the same
/// dead-letter queue as the ones [`Consumer::dead_letter`](outbox_core::Consumer::dead_letter)
/// sends there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// The exchange producers publish to.
    pub exchange: String,
    /// Its type.
    pub exchange_type: ExchangeType,
    /// The queue consumers read.
    pub queue: String,
    /// Binding keys of the queue to the exchange (default `["#"]`: everything).
    pub binding_keys: Vec<String>,
    /// Quorum (default) or classic.
    pub queue_type: QueueType,
    /// The dead-letter exchange (direct), `None` for no dead-letter destination.
    /// Default `<queue>.dlx`.
    pub dead_letter_exchange: Option<String>,
    /// The dead-letter queue, bound to the dead-letter exchange with the queue's name as
    /// binding key. Default `<queue>.dlq`.
    pub dead_letter_queue: Option<String>,
}

impl Topology {
    /// A topic exchange `exchange`, a quorum queue `queue` bound with `#`, and the
    /// dead-letter exchange `<queue>.dlx` with the queue `<queue>.dlq`.
    pub fn new(exchange: impl Into<String>, queue: impl Into<String>) -> Self {
        let queue = queue.into();
        Topology {
            exchange: exchange.into(),
            exchange_type: ExchangeType::Topic,
            binding_keys: vec!["#".to_owned()],
            queue_type: QueueType::Quorum,
            dead_letter_exchange: Some(format!("{queue}.dlx")),
            dead_letter_queue: Some(format!("{queue}.dlq")),
            queue,
        }
    }

    /// Replace the binding keys.
    pub fn binding_keys<I, S>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.binding_keys = keys.into_iter().map(Into::into).collect();
        self
    }

    fn queue_args(&self, dead_letter: bool) -> FieldTable {
        let mut args = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            args.insert(
                "x-queue-type".into(),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        if dead_letter && let Some(dlx) = &self.dead_letter_exchange {
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(LongString::from(dlx.as_str())),
            );
            args.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(LongString::from(self.queue.as_str())),
            );
        }
        args
    }
}

fn name(field: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        outbox_core::Error::config(format!(
            "{field} {value:?} is longer than the 255 bytes AMQP allows"
        ))
    })
}

/// Declare `topology` on the broker of `connection` (a short-lived connection).
///
/// # Errors
/// Retryable `Unavailable` when the broker is unreachable; permanent `ConfigInvalid` when
/// something exists with other arguments or access is refused; permanent `ConfigInvalid` for
/// a name over 255 bytes.
pub async fn declare_topology(connection: &ConnectionConfig, topology: &Topology) -> Result<()> {
    let conn = connection.connect("outbox-topology").await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| parse_error(Failure::Lapin(e), "open a channel"))?;
    let result = declare_on(&channel, topology).await;
    // Best effort: the connection closes when dropped anyway.
    let _ = conn.close(200, "OK".into()).await;
    result
}

async fn declare_on(channel: &Channel, t: &Topology) -> Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    let kind = match t.exchange_type {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Fanout => ExchangeKind::Fanout,
    };
    let lapin_err = |what: String| move |e| parse_error(Failure::Lapin(e), &what);
    let exchange = name("exchange", &t.exchange)?;
    let queue = name("queue", &t.queue)?;
    channel
        .exchange_declare(exchange.clone(), kind, durable, FieldTable::default())
        .await
        .map_err(lapin_err(format!("declare exchange {:?}", t.exchange)))?;
    if let (Some(dlx), Some(dlq)) = (&t.dead_letter_exchange, &t.dead_letter_queue) {
        let dlx_name = name("dead-letter exchange", dlx)?;
        let dlq_name = name("dead-letter queue", dlq)?;
        channel
            .exchange_declare(
                dlx_name.clone(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err(format!("declare dead-letter exchange {dlx:?}")))?;
        channel
            .queue_declare(dlq_name.clone(), durable_queue, t.queue_args(false))
            .await
            .map_err(lapin_err(format!("declare dead-letter queue {dlq:?}")))?;
        channel
            .queue_bind(
                dlq_name,
                dlx_name,
                queue.clone(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err(format!("bind {dlq:?} to {dlx:?}")))?;
    }
    channel
        .queue_declare(queue.clone(), durable_queue, t.queue_args(true))
        .await
        .map_err(lapin_err(format!("declare queue {:?}", t.queue)))?;
    for key in &t.binding_keys {
        channel
            .queue_bind(
                queue.clone(),
                exchange.clone(),
                name("binding key", key)?,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(lapin_err(format!(
                "bind {:?} to {:?} with {key:?}",
                t.queue, t.exchange
            )))?;
    }
    Ok(())
}

/// Delete the queues and exchanges of `topology`, with the messages they hold (for tests
/// and teardown). Missing ones are ignored.
///
/// # Errors
/// Retryable `Unavailable` when the broker is unreachable.
pub async fn delete_topology(connection: &ConnectionConfig, topology: &Topology) -> Result<()> {
    let conn = connection.connect("outbox-topology").await?;
    let mut names: Vec<(bool, &str)> = vec![(true, &topology.queue)];
    if let Some(q) = &topology.dead_letter_queue {
        names.push((true, q));
    }
    names.push((false, &topology.exchange));
    if let Some(x) = &topology.dead_letter_exchange {
        names.push((false, x));
    }
    for (is_queue, n) in names {
        let Ok(n) = ShortString::try_new(n) else {
            continue;
        };
        // A deletion failing (e.g. NOT_FOUND in older brokers) closes the channel: use one
        // channel per deletion.
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| parse_error(Failure::Lapin(e), "open a channel"))?;
        let _ = if is_queue {
            channel
                .queue_delete(n, QueueDeleteOptions::default())
                .await
                .map(|_| ())
        } else {
            channel
                .exchange_delete(n, ExchangeDeleteOptions::default())
                .await
        };
    }
    let _ = conn.close(200, "OK".into()).await;
    Ok(())
}
