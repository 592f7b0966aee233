//! Shared by the RabbitMQ tests: broker URL from the environment, one isolated topology per
//! test (deleted afterwards), the transport conformance harness, and a targeted connection
//! kill.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_conformance::TransportHarness;
use outbox_core::{Consumer, Error, Message, Producer, Result, async_trait};
use outbox_rabbitmq::{
    AmqpUrl, ConnectionConfig, ConsumerConfig, ProducerConfig, RabbitMqConsumer, RabbitMqProducer,
    Topology, declare_topology, delete_topology, fetch_dead_letters,
};

/// The [`Isolated`] topology of a test named `$test`; the test returns (skipped) when no
/// broker is configured.
#[macro_export]
macro_rules! isolated {
    ($test:literal) => {
        match $crate::common::url_or_skip($test) {
            Some(url) => $crate::common::Isolated::new(url, &$crate::common::unique($test))
                .await
                .unwrap(),
            None => return,
        }
    };
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
pub const URL_ENV: &str = "OUTBOX_TEST_RABBITMQ_URL";

/// The broker URL, or a retryable `Unavailable` error when it is not configured (the
/// conformance runner then skips, or fails under `OUTBOX_TEST_REQUIRED=1`).
pub fn url() -> Result<AmqpUrl> {
    match std::env::var(URL_ENV) {
        Ok(v) if !v.trim().is_empty() => AmqpUrl::parse(v),
        _ => Err(Error::unavailable(format!("{URL_ENV} not set"))),
    }
}

/// For plain tests: the broker URL, or `None` after printing `SKIPPED` (panics instead when
/// `OUTBOX_TEST_REQUIRED=1`).
pub fn url_or_skip(test: &str) -> Option<AmqpUrl> {
    match url() {
        Ok(u) => Some(u),
        Err(_) if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("{test}: {URL_ENV} not set and OUTBOX_TEST_REQUIRED=1")
        }
        Err(_) => {
            eprintln!("SKIPPED {test}: {URL_ENV} not set");
            None
        }
    }
}

/// A unique lower-case name starting with `base`.
pub fn unique(base: &str) -> String {
    let suffix: String = (0..8).map(|_| fastrand::lowercase()).collect();
    format!("{base}_{suffix}")
}

/// One test's exchange, quorum queue, dead-letter exchange and queue, all named after
/// `name`; the queue is bound with the routing key `name` (the test's topic). Deleted on drop.
pub struct Isolated {
    pub name: String,
    pub connection: ConnectionConfig,
    pub topology: Topology,
}

impl Isolated {
    pub async fn new(url: AmqpUrl, name: &str) -> Result<Self> {
        let connection = ConnectionConfig::new(url);
        let topology = Topology::new(format!("{name}.x"), name).binding_keys([name]);
        declare_topology(&connection, &topology).await?;
        Ok(Isolated {
            name: name.to_owned(),
            connection,
            topology,
        })
    }

    pub fn topic(&self) -> &str {
        &self.name
    }

    pub fn producer_config(&self) -> ProducerConfig {
        ProducerConfig::new(self.connection.clone(), self.topology.exchange.clone())
    }

    pub fn producer(&self) -> RabbitMqProducer {
        RabbitMqProducer::new(self.producer_config()).unwrap()
    }

    pub fn consumer_config(&self) -> ConsumerConfig {
        ConsumerConfig::from_topology(self.connection.clone(), &self.topology)
    }

    pub async fn consumer(&self) -> Result<RabbitMqConsumer> {
        RabbitMqConsumer::connect(self.consumer_config()).await
    }

    /// Read the dead-letter queue until `expected` are there (at most 20 s).
    pub async fn dead_letters(
        &self,
        seen: &Mutex<Vec<(Message, String)>>,
        expected: usize,
    ) -> Result<Vec<(Message, String)>> {
        let dlq = self.topology.dead_letter_queue.clone().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = fetch_dead_letters(&self.connection, &dlq, 10_000).await?;
            let all = {
                let mut seen = seen.lock().unwrap();
                seen.extend(got.into_iter().map(|d| (d.message, d.reason)));
                seen.clone()
            };
            if all.len() >= expected || Instant::now() > deadline {
                return Ok(all);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Isolated {
    fn drop(&mut self) {
        let connection = self.connection.clone();
        let topology = self.topology.clone();
        // Drop may run inside or outside a runtime: delete on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let _ = rt.block_on(delete_topology(&connection, &topology));
        })
        .join();
    }
}

/// The transport conformance harness: one [`Isolated`] topology per case.
pub struct Harness {
    pub iso: Isolated,
    producer: Arc<RabbitMqProducer>,
    seen: Mutex<Vec<(Message, String)>>,
}

impl Harness {
    pub async fn new(name: &str) -> Result<Self> {
        let iso = Isolated::new(url()?, name).await?;
        // No client-side size check: the broker's own limit is what the suite exercises.
        let mut config = iso.producer_config();
        config.max_message_size = None;
        let producer = Arc::new(RabbitMqProducer::new(config)?);
        Ok(Harness {
            iso,
            producer,
            seen: Mutex::new(Vec::new()),
        })
    }
}

#[async_trait]
impl TransportHarness for Harness {
    fn topic(&self) -> &str {
        self.iso.topic()
    }

    fn producer(&self) -> Arc<dyn Producer> {
        self.producer.clone()
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(Box::new(self.iso.consumer().await?))
    }

    async fn dead_letters(&self, expected: usize) -> Result<Vec<(Message, String)>> {
        self.iso.dead_letters(&self.seen, expected).await
    }

    fn unreachable_producer(&self) -> Option<Arc<dyn Producer>> {
        let url = AmqpUrl::parse("amqp://guest:guest@127.0.0.1:1/%2f").unwrap();
        let mut connection = ConnectionConfig::new(url);
        connection.connect_timeout = Duration::from_secs(5);
        let config = ProducerConfig::new(connection, "unused");
        Some(Arc::new(RabbitMqProducer::new(config).unwrap()))
    }

    fn unroutable_topic(&self) -> Option<String> {
        Some(format!("{}.nobody_bound", self.iso.name))
    }

    /// The broker-wide `max_message_size` of a default RabbitMQ (128 MiB; the test broker
    /// is not reconfigured because others share it). The broker rejects a larger body in
    /// about a second.
    fn max_message_size(&self) -> Option<usize> {
        Some(outbox_rabbitmq::DEFAULT_MAX_MESSAGE_SIZE)
    }

    /// The relay's default `publish_timeout`.
    fn max_delivery_timeout(&self) -> Option<Duration> {
        Some(Duration::from_secs(10))
    }
}

/// Force-close every broker connection whose client-provided name is `name`, the way an
/// operator or a broker restart would (`rabbitmqctl close_connection`). Returns how many.
pub async fn kill_connections(name: &str) -> usize {
    let out = tokio::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .await
        .expect("run rabbitmqctl list_connections");
    assert!(out.status.success(), "rabbitmqctl list_connections failed");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut killed = 0;
    for line in listing.lines() {
        if !line.contains(&format!("\"{name}\"")) {
            continue;
        }
        let Some(pid) = line.split_whitespace().next() else {
            continue;
        };
        let status = tokio::process::Command::new("rabbitmqctl")
            .args(["-q", "close_connection", pid, "test"])
            .status()
            .await
            .expect("run rabbitmqctl close_connection");
        assert!(
            status.success(),
            "rabbitmqctl close_connection {pid} failed"
        );
        killed += 1;
    }
    killed
}
