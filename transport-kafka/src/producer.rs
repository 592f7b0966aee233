//! [`KafkaProducer`]: confirmed, idempotent publishing; and [`create_topics`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{Error, Message, Producer, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::time::Instant;

use crate::config::KafkaConfig;
use crate::error::parse_error;
use crate::headers;

/// Settings the producer always uses; setting them to anything else is a `ConfigInvalid` error.
const FIXED: &[(&str, &[&str], &str)] = &[
    ("enable.idempotence", &["true"], "true"),
    ("acks", &["all", "-1"], "all"),
];

/// Default `message.timeout.ms` of the producer (librdkafka: 300 s): with the default
/// [`DEFAULT_SEND_QUEUE_TIMEOUT`](crate::DEFAULT_SEND_QUEUE_TIMEOUT) the
/// [`delivery_timeout`](Producer::delivery_timeout) is 10 s, the relay's default
/// `publish_timeout`.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(8);

/// Default `linger.ms` of the producer: how long librdkafka waits to fill a batch.
pub const DEFAULT_LINGER_MS: u32 = 1;

/// How long an enqueue waits before trying again while librdkafka's queue is full.
const QUEUE_FULL_RETRY: Duration = Duration::from_millis(10);

/// A [`Producer`] on an idempotent rdkafka `FutureProducer`.
///
/// - Always `enable.idempotence=true` and `acks=all` (other values are rejected): a broker
///   retry never duplicates or reorders a partition's records, and a send is confirmed only
///   once all in-sync replicas have the record.
/// - [`send`](Producer::send) returns after the delivery report: `Ok` means the broker
///   confirmed the record. [`send_batch`](Producer::send_batch) enqueues every record at once
///   (many in flight, batched by librdkafka) and waits for all reports.
/// - The message key is the record key, so one key's messages land in one partition, in
///   send order. The rest of the message travels in headers ([`headers`](crate::headers)).
/// - [`send_ordered`](Producer::send_ordered) enqueues a whole chain at once, in order
///   (the idempotent producer keeps a partition's order across its retries).
/// - `message.timeout.ms` defaults to [`DEFAULT_MESSAGE_TIMEOUT`] and `linger.ms` to
///   [`DEFAULT_LINGER_MS`] here; a send fails with a retryable error after the timeout.
///   [`delivery_timeout`](Producer::delivery_timeout) is the queue wait plus
///   `message.timeout.ms`.
/// - Errors come from [`parse_error`].
///
/// Clones share one librdkafka client.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
    config: KafkaConfig,
    max_bytes: usize,
    /// `message.timeout.ms`; `None` for 0 (no limit).
    message_timeout: Option<Duration>,
    /// CloudEvents binary content mode, when enabled.
    cloud_events: Option<CloudEvents>,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("config", &self.config)
            .field("message_max_bytes", &self.max_bytes)
            .field("cloud_events", &self.cloud_events)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// A producer with `config`'s settings (see the type docs for the fixed ones).
    ///
    /// # Errors
    /// `ConfigInvalid` for an unknown librdkafka property or value, `acks` other than
    /// `all`, or `enable.idempotence=false`.
    pub fn new(config: &KafkaConfig) -> Result<Self> {
        let max_bytes = config.message_max_bytes()?;
        let mut overrides: Vec<(&str, &str)> = Vec::new();
        for (key, allowed, default) in FIXED {
            match config.get(key) {
                Some(v) if !allowed.contains(&v.trim().to_ascii_lowercase().as_str()) => {
                    return Err(Error::config(format!(
                        "{key}={v} is not allowed: the Kafka producer needs {key}={default} for \
                         confirmed, duplicate-free delivery"
                    )));
                }
                Some(_) => {}
                None => overrides.push((key, default)),
            }
        }
        let default_timeout = DEFAULT_MESSAGE_TIMEOUT.as_millis().to_string();
        let message_timeout = match message_timeout_ms(config)? {
            Some(ms) => ms,
            None => {
                overrides.push(("message.timeout.ms", &default_timeout));
                u64::try_from(DEFAULT_MESSAGE_TIMEOUT.as_millis()).unwrap_or(u64::MAX)
            }
        };
        let default_linger = DEFAULT_LINGER_MS.to_string();
        if config.get("linger.ms").is_none() && config.get("queue.buffering.max.ms").is_none() {
            overrides.push(("linger.ms", &default_linger));
        }
        let producer: FutureProducer = config
            .client_config(&overrides)
            .create()
            .map_err(|e| parse_error(e, "creating the Kafka producer", None))?;
        Ok(KafkaProducer {
            producer,
            config: config.clone(),
            max_bytes,
            message_timeout: (message_timeout > 0).then(|| Duration::from_millis(message_timeout)),
            cloud_events: None,
        })
    }

    /// Send every message as a CloudEvent in binary content mode: the `ce_id`, `ce_type`,
    /// `ce_source`, `ce_specversion`, `ce_time` and `content-type` headers are added (see
    /// [`headers`](crate::headers) and [`outbox_core::cloudevents`]), so CloudEvents SDKs can
    /// read the records; [`KafkaConsumer`](crate::KafkaConsumer) still decodes them unchanged.
    ///
    /// ```no_run
    /// # fn main() -> outbox_core::Result<()> {
    /// use outbox_core::cloudevents::CloudEvents;
    /// use outbox_kafka::{KafkaConfig, KafkaProducer};
    /// let producer = KafkaProducer::new(&KafkaConfig::new("localhost:9092"))?
    ///     .with_cloud_events(CloudEvents::new("/billing")?);
    /// # Ok(()) }
    /// ```
    pub fn with_cloud_events(mut self, cloud_events: CloudEvents) -> Self {
        self.cloud_events = Some(cloud_events);
        self
    }

    /// The CloudEvents settings, when binary content mode is enabled.
    pub fn cloud_events(&self) -> Option<&CloudEvents> {
        self.cloud_events.as_ref()
    }

    /// Messages handed to librdkafka and not yet delivered or failed (queued or in flight),
    /// across all topics (`rd_kafka_outq_len`).
    pub fn in_flight(&self) -> usize {
        usize::try_from(rdkafka::producer::Producer::in_flight_count(&self.producer)).unwrap_or(0)
    }

    /// The configuration the producer was built with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Wait until every record handed to librdkafka is delivered or failed, at most `timeout`.
    ///
    /// # Errors
    /// Retryable `Unavailable` if records are still outstanding after `timeout`.
    pub async fn flush(&self, timeout: Duration) -> Result<()> {
        let producer = self.producer.clone();
        tokio::task::spawn_blocking(move || {
            rdkafka::producer::Producer::flush(&producer, Timeout::After(timeout))
        })
        .await
        .map_err(|e| Error::unexpected("the flush task failed").with_source(e))?
        .map_err(|e| parse_error(e, "flushing the Kafka producer", None))
    }

    /// Create `topics` (`(name, partitions)`) with the broker's default replication factor;
    /// see [`create_topics`].
    ///
    /// # Errors
    /// As [`create_topics`].
    pub async fn create_topics(&self, topics: &[(&str, i32)]) -> Result<()> {
        create_topics(&self.config, topics).await
    }
}

/// Create `topics` (`(name, partitions)`) through the admin API, with the broker's default
/// replication factor. Topics that already exist are left alone (not an error).
///
/// # Errors
/// `InvalidInput` for an empty name or fewer than 1 partition; otherwise the first failure,
/// classified by [`parse_error`].
pub async fn create_topics(config: &KafkaConfig, topics: &[(&str, i32)]) -> Result<()> {
    for (name, partitions) in topics {
        if name.is_empty() {
            return Err(Error::invalid_input("topic name must not be empty"));
        }
        if *partitions < 1 {
            return Err(Error::invalid_input(format!(
                "topic {name}: partitions must be at least 1, got {partitions}"
            )));
        }
    }
    let admin: AdminClient<DefaultClientContext> = config
        .client_config(&[])
        .create()
        .map_err(|e| parse_error(e, "creating the Kafka admin client", None))?;
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions)| NewTopic::new(name, *partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(&new_topics, &options)
        .await
        .map_err(|e| parse_error(e, "creating Kafka topics", None))?;
    for result in results {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(parse_error(
                    rdkafka::error::KafkaError::AdminOp(code),
                    &format!("creating Kafka topic {topic}"),
                    None,
                ));
            }
        }
    }
    Ok(())
}

/// One record ready to produce.
pub(crate) struct Record {
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: headers::RawHeaders,
}

impl Record {
    pub(crate) fn of(message: &Message, cloud_events: Option<&CloudEvents>) -> Record {
        Record {
            topic: message.topic.clone(),
            key: message.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: message.payload.to_vec(),
            headers: headers::encode(message, cloud_events),
        }
    }

    pub(crate) fn size(&self) -> usize {
        headers::record_size(self.key.as_deref(), &self.payload, &self.headers)
    }
}

/// `message.timeout.ms` (or its alias `delivery.timeout.ms`) as set on `config`.
fn message_timeout_ms(config: &KafkaConfig) -> Result<Option<u64>> {
    let Some((key, v)) = ["message.timeout.ms", "delivery.timeout.ms"]
        .into_iter()
        .find_map(|k| config.get(k).map(|v| (k, v)))
    else {
        return Ok(None);
    };
    v.trim()
        .parse()
        .map(Some)
        .map_err(|_| Error::config(format!("{key} must be a number of milliseconds, got {v:?}")))
}

/// Hand `record` to librdkafka, waiting (until `enqueue_by`) while its local queue is full.
/// Records enqueued one after another keep that order in their partition.
pub(crate) async fn enqueue(
    producer: &FutureProducer,
    record: &Record,
    max_bytes: usize,
    enqueue_by: Instant,
    context: &str,
) -> Result<DeliveryFuture> {
    let size = record.size();
    if size > max_bytes {
        return Err(Error::payload_too_large(size, max_bytes).set_retryable(false));
    }
    let mut fr: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&record.topic)
        .payload(record.payload.as_slice())
        .headers(headers::to_owned_headers(&record.headers));
    if let Some(k) = &record.key {
        fr = fr.key(k.as_slice());
    }
    loop {
        match producer.send_result(fr) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back))
                if Instant::now() < enqueue_by =>
            {
                fr = back;
                tokio::time::sleep(QUEUE_FULL_RETRY).await;
            }
            Err((e, _)) => return Err(parse_error(e, context, Some((size, max_bytes)))),
        }
    }
}

/// Wait for the delivery report of an enqueued record of `size` bytes.
pub(crate) async fn delivered(
    delivery: DeliveryFuture,
    size: usize,
    max_bytes: usize,
    context: &str,
) -> Result<()> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(parse_error(e, context, Some((size, max_bytes)))),
        Err(_) => Err(Error::unavailable(format!(
            "{context}: the producer was dropped before the delivery report"
        ))),
    }
}

/// Produce `record` and wait for its delivery report. Shared by the producer and the
/// consumer's dead-letter path.
pub(crate) async fn produce(
    producer: &FutureProducer,
    record: &Record,
    max_bytes: usize,
    queue_timeout: Duration,
    context: &str,
) -> Result<()> {
    let delivery = enqueue(
        producer,
        record,
        max_bytes,
        Instant::now() + queue_timeout,
        context,
    )
    .await?;
    delivered(delivery, record.size(), max_bytes, context).await
}

#[async_trait]
impl Producer for KafkaProducer {
    /// Produce one record and wait for the broker's confirmation (`acks=all`).
    ///
    /// # Errors
    /// `InvalidInput` for an invalid message; permanent `PayloadTooLarge` over
    /// `message.max.bytes` (key + value + headers); otherwise [`parse_error`].
    async fn send(&self, message: &Message) -> Result<()> {
        message.validate()?;
        let record = Record::of(message, self.cloud_events.as_ref());
        let context = format!("sending message {} to topic {}", message.id, message.topic);
        produce(
            &self.producer,
            &record,
            self.max_bytes,
            self.config.send_queue_timeout(),
            &context,
        )
        .await
    }

    /// Enqueue all records at once (librdkafka batches them), then wait for every report.
    async fn send_batch(&self, messages: &[Message]) -> Vec<Result<()>> {
        futures::future::join_all(messages.iter().map(|m| self.send(m))).await
    }

    /// Enqueue the whole chain at once, in slice order, then collect the delivery reports in
    /// order, stopping at the first failure.
    ///
    /// - Per partition, the broker writes the records in slice order (idempotent producer).
    ///   A chain spanning several topics keeps the order within each topic's partition only.
    /// - Enqueuing stops at a message that cannot be enqueued (invalid, over
    ///   `message.max.bytes`, queue still full after the send queue timeout): neither it nor
    ///   anything after it is sent.
    /// - Records enqueued after a record that then fails are not recalled: see the crate
    ///   README for when they may still be written.
    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        let mut results = Vec::with_capacity(messages.len());
        let enqueue_by = Instant::now() + self.config.send_queue_timeout();
        let mut enqueued = Vec::with_capacity(messages.len());
        let mut stopped = None;
        for message in messages {
            if let Err(e) = message.validate() {
                stopped = Some(e);
                break;
            }
            let record = Record::of(message, self.cloud_events.as_ref());
            let context = format!("sending message {} to topic {}", message.id, message.topic);
            match enqueue(
                &self.producer,
                &record,
                self.max_bytes,
                enqueue_by,
                &context,
            )
            .await
            {
                Ok(delivery) => enqueued.push((delivery, record.size(), context)),
                Err(e) => {
                    stopped = Some(e);
                    break;
                }
            }
        }
        for (delivery, size, context) in enqueued {
            let r = delivered(delivery, size, self.max_bytes, &context).await;
            let failed = r.is_err();
            results.push(r);
            if failed {
                return results;
            }
        }
        if let Some(e) = stopped {
            results.push(Err(e));
        }
        results
    }

    /// The send queue timeout plus `message.timeout.ms`: a record is enqueued within the
    /// first and abandoned by librdkafka after the second (see the crate README for a
    /// request already on the wire). `None` when `message.timeout.ms` is 0 (no limit).
    fn delivery_timeout(&self) -> Option<Duration> {
        self.message_timeout
            .map(|t| t.saturating_add(self.config.send_queue_timeout()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::ErrorKind;

    #[tokio::test]
    async fn delivery_timeout_is_queue_wait_plus_message_timeout() {
        let p = KafkaProducer::new(&KafkaConfig::new("127.0.0.1:1")).unwrap();
        assert_eq!(p.delivery_timeout(), Some(Duration::from_secs(10)));
        let c = KafkaConfig::new("127.0.0.1:1")
            .set("delivery.timeout.ms", "3000")
            .with_send_queue_timeout(Duration::from_millis(500));
        let p = KafkaProducer::new(&c).unwrap();
        assert_eq!(p.delivery_timeout(), Some(Duration::from_millis(3500)));
        let c = KafkaConfig::new("127.0.0.1:1").set("message.timeout.ms", "0");
        assert_eq!(KafkaProducer::new(&c).unwrap().delivery_timeout(), None);
        let c = KafkaConfig::new("127.0.0.1:1").set("message.timeout.ms", "soon");
        let e = KafkaProducer::new(&c).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
        assert!(e.to_string().contains("message.timeout.ms"), "{e}");
    }

    #[tokio::test]
    async fn security_settings_pass_through_to_librdkafka() {
        // Building a client validates the settings without connecting.
        for (protocol, mechanism) in [
            ("SSL", None),
            ("SASL_SSL", Some("SCRAM-SHA-512")),
            ("SASL_PLAINTEXT", Some("PLAIN")),
        ] {
            let mut config = KafkaConfig::new("127.0.0.1:1")
                .set("security.protocol", protocol)
                .set("compression.type", "zstd");
            if let Some(m) = mechanism {
                config = config
                    .set("sasl.mechanism", m)
                    .set("sasl.username", "svc")
                    .set("sasl.password", "pw");
            }
            let p = KafkaProducer::new(&config).unwrap();
            assert!(!format!("{p:?}").contains("\"pw\""), "{p:?}");
        }
        let e = KafkaProducer::new(&KafkaConfig::new("b:1").set("security.protocol", "NOPE"))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
        assert!(e.to_string().contains("security.protocol"), "{e}");
    }
}
