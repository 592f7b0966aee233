//! [`KafkaProducer`]: confirmed, idempotent publishing; and [`create_topics`].

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Error, Message, Producer, Result};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use crate::config::KafkaConfig;
use crate::error::parse_error;
use crate::headers;

/// Settings the producer always uses; setting them to anything else is a `ConfigInvalid` error.
const FIXED: &[(&str, &[&str], &str)] = &[
    ("enable.idempotence", &["true"], "true"),
    ("acks", &["all", "-1"], "all"),
];

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
/// - `message.timeout.ms` defaults to 30 s here (librdkafka: 300 s); a send fails with a
///   retryable error after it.
/// - Errors come from [`parse_error`].
///
/// Clones share one librdkafka client.
#[derive(Clone)]
pub struct KafkaProducer {
    producer: FutureProducer,
    config: KafkaConfig,
    max_bytes: usize,
}

impl fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("config", &self.config)
            .field("message_max_bytes", &self.max_bytes)
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
        if config.get("message.timeout.ms").is_none() && config.get("delivery.timeout.ms").is_none()
        {
            overrides.push(("message.timeout.ms", "30000"));
        }
        let producer: FutureProducer = config
            .client_config(&overrides)
            .create()
            .map_err(|e| parse_error(e, "creating the Kafka producer", None))?;
        Ok(KafkaProducer {
            producer,
            config: config.clone(),
            max_bytes,
        })
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
    pub(crate) fn of(message: &Message) -> Record {
        Record {
            topic: message.topic.clone(),
            key: message.key.as_ref().map(|k| k.as_bytes().to_vec()),
            payload: message.payload.to_vec(),
            headers: headers::encode(message),
        }
    }

    pub(crate) fn size(&self) -> usize {
        headers::record_size(self.key.as_deref(), &self.payload, &self.headers)
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
    match producer.send(fr, Timeout::After(queue_timeout)).await {
        Ok(_) => Ok(()),
        Err((e, _)) => Err(parse_error(e, context, Some((size, max_bytes)))),
    }
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
        let record = Record::of(message);
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use outbox_core::ErrorKind;

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
