//! The baselines' raw broker clients, with the best settings each client allows.
//!
//! - RabbitMQ (lapin): one connection, one confirm-mode channel, persistent and mandatory
//!   publishes, up to [`RABBIT_WINDOW`] unconfirmed in flight.
//! - Kafka (rdkafka): `enable.idempotence=true`, `acks=all`, every record enqueued at once
//!   (librdkafka keeps 5 requests in flight per broker, the most idempotence allows), 1 ms
//!   linger.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use outbox_core::{Error, Result};
use outbox_kafka::rdkafka::ClientConfig;
use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use outbox_kafka::rdkafka::util::Timeout;

/// Unconfirmed publishes in flight on the raw RabbitMQ channel.
pub const RABBIT_WINDOW: usize = 1024;

fn amqp_err(e: lapin::Error) -> Error {
    Error::unavailable(format!("raw RabbitMQ client: {e}"))
}

/// A raw RabbitMQ publisher.
pub struct RawRabbit {
    _connection: Connection,
    channel: Channel,
    exchange: ShortString,
}

impl RawRabbit {
    /// Connect and open a confirm-mode channel publishing to `exchange`.
    pub async fn connect(url: &str, exchange: &str) -> Result<Self> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .map_err(amqp_err)?;
        let channel = connection.create_channel().await.map_err(amqp_err)?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(amqp_err)?;
        Ok(RawRabbit {
            _connection: connection,
            channel,
            exchange: ShortString::from(exchange),
        })
    }

    fn properties(id: &str, key: &str) -> BasicProperties {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-outbox-key".into(),
            AMQPValue::LongString(LongString::from(key)),
        );
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_headers(headers)
    }

    /// Publish `n` messages of `payload` with routing key `topic`, keys cycling over
    /// `keys`; return once every one is confirmed.
    pub async fn publish(&self, topic: &str, n: usize, keys: usize, payload: &Bytes) -> Result<()> {
        let routing = ShortString::from(topic);
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let mut in_flight = FuturesUnordered::new();
        for i in 0..n {
            if in_flight.len() >= RABBIT_WINDOW
                && let Some(r) = in_flight.next().await
            {
                check(r)?;
            }
            let props = Self::properties(&i.to_string(), &format!("key-{}", i % keys.max(1)));
            let confirm = self
                .channel
                .basic_publish(
                    self.exchange.clone(),
                    routing.clone(),
                    options,
                    payload,
                    props,
                )
                .await
                .map_err(amqp_err)?;
            in_flight.push(confirm);
        }
        while let Some(r) = in_flight.next().await {
            check(r)?;
        }
        Ok(())
    }

    /// Remove every message from `queue` (between passes).
    pub async fn purge(&self, queue: &str) -> Result<()> {
        self.channel
            .queue_purge(queue.into(), lapin::options::QueuePurgeOptions::default())
            .await
            .map_err(amqp_err)?;
        Ok(())
    }

    /// Publish one message and wait for its confirm; the time it took.
    pub async fn publish_one(&self, topic: &str, payload: &Bytes) -> Result<Duration> {
        let start = Instant::now();
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.clone(),
                ShortString::from(topic),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                payload,
                Self::properties("latency", "key-0"),
            )
            .await
            .map_err(amqp_err)?;
        check(confirm.await)?;
        Ok(start.elapsed())
    }
}

fn check(r: lapin::Result<Confirmation>) -> Result<()> {
    match r.map_err(amqp_err)? {
        Confirmation::Ack(None) => Ok(()),
        other => Err(Error::unavailable(format!(
            "raw RabbitMQ publish not confirmed: {other:?}"
        ))),
    }
}

/// A raw Kafka producer.
pub struct RawKafka {
    producer: FutureProducer,
}

impl RawKafka {
    /// An idempotent `acks=all` producer with everything in flight.
    pub fn new(brokers: &str) -> Result<Self> {
        let producer = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("message.timeout.ms", "30000")
            .create()
            .map_err(|e| outbox_kafka::parse_error(e, "creating the raw Kafka producer", None))?;
        Ok(RawKafka { producer })
    }

    /// Produce `n` records of `payload` to `topic`, keys cycling over `keys`; return once
    /// every one is acknowledged.
    pub async fn publish(&self, topic: &str, n: usize, keys: usize, payload: &Bytes) -> Result<()> {
        let keys: Vec<String> = (0..keys.max(1)).map(|k| format!("key-{k}")).collect();
        let mut pending = Vec::with_capacity(n);
        for i in 0..n {
            let record = FutureRecord::to(topic)
                .key(keys[i % keys.len()].as_str())
                .payload(payload.as_ref());
            let delivery = self
                .producer
                .send_result(record)
                .map_err(|(e, _)| outbox_kafka::parse_error(e, "raw Kafka enqueue", None))?;
            pending.push(delivery);
        }
        for d in pending {
            match d.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    return Err(outbox_kafka::parse_error(e, "raw Kafka produce", None));
                }
                Err(_) => return Err(Error::unavailable("raw Kafka delivery report dropped")),
            }
        }
        Ok(())
    }

    /// Produce one record and wait for its acknowledgement; the time it took.
    pub async fn publish_one(&self, topic: &str, payload: &Bytes) -> Result<Duration> {
        let start = Instant::now();
        self.producer
            .send(
                FutureRecord::to(topic)
                    .key("key-0")
                    .payload(payload.as_ref()),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| outbox_kafka::parse_error(e, "raw Kafka produce", None))?;
        Ok(start.elapsed())
    }
}
