//! Shared by the Kafka tests: broker address from the environment, test settings, and the
//! transport conformance harness.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_conformance::TransportHarness;
use outbox_core::{Consumer, Delivery, Error, Message, Producer, Result, async_trait};
use outbox_kafka::rdkafka::Message as _;
use outbox_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
use outbox_kafka::rdkafka::{Offset, TopicPartitionList};
use outbox_kafka::{ConsumerOptions, DeadLetter, KafkaConfig, KafkaConsumer, KafkaProducer};

/// The harness of a test named `$name` with a fresh topic of `$partitions` partitions; the
/// test returns (skipped) when no broker is configured.
#[macro_export]
macro_rules! harness {
    ($name:literal, $partitions:expr) => {{
        if $crate::common::brokers_or_skip($name).is_none() {
            return;
        }
        $crate::common::KafkaHarness::new(&$crate::common::unique($name), $partitions)
            .await
            .expect("create topics")
    }};
}

/// How long a test waits for one delivery.
pub const WAIT: Duration = Duration::from_secs(60);

/// The next delivery, within [`WAIT`].
pub async fn receive(c: &dyn Consumer) -> Delivery {
    tokio::time::timeout(WAIT, c.receive())
        .await
        .expect("a delivery within 60 s")
        .expect("receive")
        .expect("consumer open")
}

/// A message of `topic` with `key` and `body`.
pub fn msg(topic: &str, key: &str, body: &str) -> Message {
    Message::builder(topic)
        .key(key)
        .payload(body.as_bytes().to_vec())
        .build()
        .unwrap()
}

/// Where the broker is.
pub const BROKERS_ENV: &str = "OUTBOX_TEST_KAFKA_BROKERS";
/// The `message.max.bytes` of every test client: small, so the too-large case is cheap.
pub const MAX_BYTES: usize = 64 * 1024;

/// The broker address, or a retryable `Unavailable` error when it is not configured (the
/// conformance runner then skips, or fails under `OUTBOX_TEST_REQUIRED=1`).
pub fn brokers() -> Result<String> {
    match std::env::var(BROKERS_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(v),
        _ => Err(Error::unavailable(format!("{BROKERS_ENV} not set"))),
    }
}

/// For plain tests: the broker address, or `None` after printing `SKIPPED` (panics instead
/// when `OUTBOX_TEST_REQUIRED=1`).
pub fn brokers_or_skip(test: &str) -> Option<String> {
    match brokers() {
        Ok(b) => Some(b),
        Err(_) if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("{test}: {BROKERS_ENV} not set and OUTBOX_TEST_REQUIRED=1")
        }
        Err(_) => {
            eprintln!("SKIPPED {test}: {BROKERS_ENV} not set");
            None
        }
    }
}

/// Test settings: a 6 s session (group joins take about half of it on tansu), a 64 KiB
/// message limit, no topic auto-creation (unknown topics fail fast and permanently).
pub fn config(brokers: &str) -> KafkaConfig {
    KafkaConfig::new(brokers)
        .set("session.timeout.ms", "6000")
        .set("message.max.bytes", MAX_BYTES.to_string())
        .set("allow.auto.create.topics", "false")
        .set("topic.metadata.propagation.max.ms", "1000")
}

/// A unique lower-case name starting with `base`.
pub fn unique(base: &str) -> String {
    let suffix: String = (0..8).map(|_| fastrand::lowercase()).collect();
    format!("{base}_{suffix}")
}

/// Every record of partition 0 of `topic` (read without a group), waiting up to `wait` until
/// at least `expected` are there and everything up to the high watermark was read.
pub async fn read_partition(
    config: &KafkaConfig,
    topic: &str,
    expected: usize,
    wait: Duration,
) -> Result<Vec<outbox_kafka::rdkafka::message::OwnedMessage>> {
    // `assign` needs a group id, but nothing joins or commits: no group wait.
    let consumer: StreamConsumer = config
        .to_client_config()
        .set("group.id", unique("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| outbox_kafka::parse_error(e, "reader", None))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .map_err(|e| outbox_kafka::parse_error(e, "reader", None))?;
    consumer
        .assign(&tpl)
        .map_err(|e| outbox_kafka::parse_error(e, "reader", None))?;
    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    loop {
        let (_, high) = consumer
            .fetch_watermarks(topic, 0, Duration::from_secs(5))
            .map_err(|e| outbox_kafka::parse_error(e, "watermarks", None))?;
        let read_to = out
            .last()
            .map_or(0, |m: &outbox_kafka::rdkafka::message::OwnedMessage| {
                m.offset() + 1
            });
        if out.len() >= expected && read_to >= high {
            return Ok(out);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(out);
        }
        if read_to < high
            && let Ok(Ok(m)) =
                tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await
        {
            out.push(m.detach());
            continue;
        }
        // Nothing new on the broker yet: look again shortly (bounded by `deadline`).
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One isolated destination per case: a fresh topic (3 partitions), group and DLQ topic.
pub struct KafkaHarness {
    pub config: KafkaConfig,
    pub topic: String,
    pub group: String,
    pub dlq: String,
    pub producer: Arc<KafkaProducer>,
}

impl KafkaHarness {
    /// Create the case's topics on the broker.
    pub async fn new(name: &str, partitions: i32) -> Result<Self> {
        let config = config(&brokers()?);
        let topic = format!("{name}_t");
        let dlq = format!("{topic}.dlq");
        outbox_kafka::create_topics(&config, &[(&topic, partitions), (&dlq, 1)]).await?;
        let producer = Arc::new(KafkaProducer::new(&config)?);
        Ok(KafkaHarness {
            group: format!("{name}_g"),
            config,
            topic,
            dlq,
            producer,
        })
    }

    /// A consumer of the case's topic in the case's group.
    pub fn kafka_consumer(&self) -> Result<KafkaConsumer> {
        KafkaConsumer::new(
            &self.config,
            ConsumerOptions::new(&self.group, [&self.topic]),
        )
    }

    /// The decoded dead letters (waiting up to 30 s for `expected`).
    pub async fn read_dead_letters(&self, expected: usize) -> Result<Vec<DeadLetter>> {
        read_partition(&self.config, &self.dlq, expected, Duration::from_secs(30))
            .await?
            .iter()
            .map(DeadLetter::decode)
            .collect()
    }
}

#[async_trait]
impl TransportHarness for KafkaHarness {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(self.kafka_consumer()?))
    }

    async fn dead_letters(&self, expected: usize) -> Result<Vec<(Message, String)>> {
        Ok(self
            .read_dead_letters(expected)
            .await?
            .into_iter()
            .map(|d| (d.message, d.reason))
            .collect())
    }

    fn unreachable_producer(&self) -> Option<Arc<dyn Producer>> {
        let config = KafkaConfig::new("127.0.0.1:1").set("message.timeout.ms", "2000");
        Some(Arc::new(KafkaProducer::new(&config).unwrap()))
    }

    /// tansu auto-creates topics unless the client asks it not to; the test clients set
    /// `allow.auto.create.topics=false`, and then an unknown topic is rejected.
    fn unroutable_topic(&self) -> Option<String> {
        Some(format!("{}_missing", self.topic))
    }

    fn per_key_order_across_consumers(&self) -> bool {
        true // one consumer per partition; a key always maps to one partition
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(MAX_BYTES)
    }

    /// The relay's default `publish_timeout`.
    fn max_delivery_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }
}
