//! `outbox relay` as a real process: it publishes a backlog to RabbitMQ or Kafka, serves the
//! metrics of that workload, wakes on PostgreSQL `NOTIFY`, and on SIGTERM exits 0 with its
//! leases released, so the shards can be taken at once.

#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{service, unique};
use outbox_core::{DistributedLock, Message, OutboxStore};

/// A running `outbox relay`, killed if the test ends early; its stderr collected.
struct RelayProcess {
    child: Child,
    stderr: Arc<Mutex<String>>,
}

impl RelayProcess {
    fn start(args: &[String]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_outbox"));
        cmd.arg("relay")
            .args(args)
            .env_remove("OUTBOX_STORE")
            .env_remove("OUTBOX_TRANSPORT")
            .env("AWS_ACCESS_KEY_ID", "local")
            .env("AWS_SECRET_ACCESS_KEY", "local")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start outbox relay");
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        RelayProcess { child, stderr }
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Wait until stderr contains `needle` (the relay prints its start line once running).
    async fn wait_for_log(&mut self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.stderr().contains(needle) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("relay exited early ({status}):\n{}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} in:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Send SIGTERM and wait for the exit; returns its code.
    async fn terminate(&mut self) -> Option<i32> {
        let pid = self.child.id().to_string();
        let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(killed.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "relay did not stop:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The Prometheus text of `http://127.0.0.1:port/metrics`.
fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text
}

/// The value of the sample `name` (with any labels), summed over its label sets.
fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let rest = l.strip_prefix(name)?;
            let rest = if rest.starts_with('{') {
                &rest[rest.find('}')? + 1..]
            } else {
                rest
            };
            rest.starts_with(' ').then(|| rest.trim().parse().ok())?
        })
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

fn messages(topic: &str, n: usize) -> Vec<Message> {
    (0..n)
        .map(|i| {
            Message::builder(topic)
                .key(format!("k{}", i % 7))
                .payload(format!("{{\"n\":{i}}}"))
                .build()
                .unwrap()
        })
        .collect()
}

async fn wait_drained(store: &dyn OutboxStore, relay: &RelayProcess, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let stats = store.stats().await.unwrap();
        if stats.pending == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{} still pending after {within:?}:\n{}",
            stats.pending,
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// After a graceful stop no shard lease is held, and another owner takes every shard at once.
async fn assert_leases_released(store: &dyn OutboxStore, lock: &dyn DistributedLock) {
    for shard in 0..store.shard_count() {
        let resource = format!("outbox/shard/{shard}");
        let current = lock.current(&resource).await.unwrap();
        assert!(current.is_none(), "{resource} still held: {current:?}");
        let taken = lock
            .acquire(&resource, "successor", Duration::from_secs(5))
            .await
            .unwrap();
        let lease = taken.unwrap_or_else(|| panic!("{resource} not free for a successor"));
        lock.release(&lease).await.unwrap();
    }
}

/// Relay flags for a test: a unique instance id, short intervals unless `extra` sets them.
fn relay_args(store_url: &str, transport_url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = vec![
        "--store".into(),
        store_url.into(),
        "--transport".into(),
        transport_url.into(),
        "--instance-id".into(),
        unique("cli_relay"),
    ];
    for (flag, value) in [
        ("--lease-ttl", "3s"),
        ("--publish-timeout", "500ms"),
        ("--clock-skew-margin", "500ms"),
        ("--stats-interval", "100ms"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag.to_owned(), value.to_owned()]);
        }
    }
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_a_backlog_to_rabbitmq_serves_metrics_and_stops_on_sigterm() {
    let Some(amqp) = service("OUTBOX_TEST_RABBITMQ_URL", "relay_to_rabbitmq") else {
        return;
    };
    let exchange = unique("cli_ex");
    let queue = unique("cli_q");
    let topic = unique("cli_topic");
    let connection =
        outbox_rabbitmq::ConnectionConfig::new(outbox_rabbitmq::AmqpUrl::parse(&amqp).unwrap());
    let topology = outbox_rabbitmq::Topology::new(&exchange, &queue).binding_keys([&topic]);
    outbox_rabbitmq::declare_topology(&connection, &topology)
        .await
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let store = outbox_sqlite::SqliteStore::connect(outbox_sqlite::SqliteConfig::new(&path))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    const N: usize = 300;
    store.add_batch(&messages(&topic, N)).await.unwrap();

    let port = free_port();
    let sep = if amqp.contains('?') { '&' } else { '?' };
    let args = relay_args(
        &format!("sqlite://{}", path.display()),
        &format!("{amqp}{sep}exchange={exchange}"),
        &[
            "--metrics-addr",
            &format!("127.0.0.1:{port}"),
            "--poll-interval",
            "50ms",
        ],
    );
    let mut relay = RelayProcess::start(&args);
    relay.wait_for_log("publishing from").await;
    wait_drained(&store, &relay, Duration::from_secs(30)).await;

    // The metrics of exactly this workload (counters are recorded when the marks commit,
    // gauges sampled every stats interval: poll until they settle).
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = scrape(port);
        let settled = metric(&text, outbox_core::metrics::PUBLISHED) == Some(N as f64)
            && metric(&text, outbox_core::metrics::PENDING) == Some(0.0)
            // Set when the leases are acquired (and again at each renewal).
            && metric(&text, outbox_core::metrics::LEASES_HELD).is_some();
        if settled || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        metric(&text, outbox_core::metrics::PUBLISHED),
        Some(N as f64),
        "{text}"
    );
    assert_eq!(
        metric(&text, outbox_core::metrics::PENDING),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, outbox_core::metrics::PARKED_NOW),
        Some(0.0),
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            &format!("{}_count", outbox_core::metrics::PUBLISH_LATENCY)
        ),
        Some(N as f64),
        "one latency sample per message:\n{text}"
    );
    assert_eq!(
        metric(&text, outbox_core::metrics::FAILED).unwrap_or(0.0),
        0.0,
        "{text}"
    );
    let shards = f64::from(store.shard_count());
    assert_eq!(
        metric(&text, outbox_core::metrics::LEASES_ACQUIRED),
        Some(shards),
        "one relay took every shard once:\n{text}"
    );
    assert_eq!(
        metric(&text, outbox_core::metrics::LEASES_HELD),
        Some(shards),
        "and holds them:\n{text}"
    );
    assert_eq!(
        metric(&text, outbox_core::metrics::CIRCUIT_OPEN),
        Some(0.0),
        "{text}"
    );

    assert_eq!(relay.terminate().await, Some(0), "{}", relay.stderr());
    if let Some((_, rest)) = amqp.split_once("://")
        && let Some((userinfo, _)) = rest.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        let log = relay.stderr();
        assert!(
            !log.contains(&format!(":{password}@")),
            "password shown:\n{log}"
        );
        assert!(log.contains(":***@"), "{log}");
    }
    assert!(
        relay.stderr().contains("leases released"),
        "{}",
        relay.stderr()
    );
    assert_leases_released(&store, &store.lock()).await;
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.parked), (0, 0));
    outbox_rabbitmq::delete_topology(&connection, &topology)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_wakes_on_postgres_notify_and_publishes_to_kafka() {
    let Some(pg) = service("OUTBOX_TEST_POSTGRES_URL", "relay_postgres_kafka") else {
        return;
    };
    let Some(brokers) = service("OUTBOX_TEST_KAFKA_BROKERS", "relay_postgres_kafka") else {
        return;
    };
    let topic = unique("cli_topic");
    outbox_kafka::create_topics(&outbox_kafka::KafkaConfig::new(&brokers), &[(&topic, 2)])
        .await
        .unwrap();
    let schema = unique("cli_relay");
    let writer = outbox_postgres::PgStore::connect(
        &pg,
        outbox_postgres::PgConfig::new()
            .with_schema(&schema)
            .with_notify(true),
    )
    .await
    .unwrap();
    writer.migrate().await.unwrap();

    // Polling every 60 s: only the NOTIFY can make it publish within seconds.
    let sep = if pg.contains('?') { '&' } else { '?' };
    let args = relay_args(
        &format!("{pg}{sep}schema={schema}"),
        &format!("kafka://{brokers}"),
        &[
            "--poll-interval",
            "60s",
            "--lease-ttl",
            "90s",
            "--publish-timeout",
            "5s",
        ],
    );
    let mut relay = RelayProcess::start(&args);
    relay.wait_for_log("wakes on LISTEN").await;
    // Leases taken (the first tick) before the commit, so the wake-up is what publishes.
    let lock = writer.lock();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lock.current("outbox/shard/0").await.unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "no lease taken:\n{}",
            relay.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let batch = messages(&topic, 40);
    writer.add_batch(&batch).await.unwrap();
    wait_drained(&writer, &relay, Duration::from_secs(15)).await;
    for m in &batch {
        let stored = writer.get(m.id).await.unwrap().unwrap();
        assert!(stored.dispatched_at.is_some(), "{} not dispatched", m.id);
    }

    assert_eq!(relay.terminate().await, Some(0), "{}", relay.stderr());
    assert_leases_released(&writer, &lock).await;
    outbox_postgres::sqlx::query(outbox_postgres::sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(writer.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_from_dynamodb_and_releases_its_leases() {
    let Some(endpoint) = service("OUTBOX_TEST_DYNAMODB_ENDPOINT", "relay_dynamodb") else {
        return;
    };
    let Some(brokers) = service("OUTBOX_TEST_KAFKA_BROKERS", "relay_dynamodb") else {
        return;
    };
    let topic = unique("cli_topic");
    outbox_kafka::create_topics(&outbox_kafka::KafkaConfig::new(&brokers), &[(&topic, 1)])
        .await
        .unwrap();
    let prefix = format!("{}_", unique("cli"));
    let store = outbox_dynamodb::DynamoDbStore::new(
        outbox_dynamodb::local_client(&endpoint),
        outbox_dynamodb::DynamoDbConfig::new(prefix.clone()),
    )
    .unwrap();
    store.migrate().await.unwrap();
    store.add_batch(&messages(&topic, 20)).await.unwrap();
    let args = relay_args(
        &format!("dynamodb://?region=us-east-1&endpoint={endpoint}&prefix={prefix}"),
        &format!("kafka://{brokers}"),
        &["--poll-interval", "50ms"],
    );
    let mut relay = RelayProcess::start(&args);
    // moto answers slowly on a loaded machine: 20 messages within 90 s.
    wait_drained(&store, &relay, Duration::from_secs(90)).await;
    assert_eq!(relay.terminate().await, Some(0), "{}", relay.stderr());
    assert_leases_released(&store, &store.lock()).await;
    store.delete_tables().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_wakes_on_the_dynamodb_stream() {
    let Some(endpoint) = service("OUTBOX_TEST_DYNAMODB_ENDPOINT", "relay_dynamodb_stream") else {
        return;
    };
    let Some(brokers) = service("OUTBOX_TEST_KAFKA_BROKERS", "relay_dynamodb_stream") else {
        return;
    };
    let topic = unique("cli_topic");
    outbox_kafka::create_topics(&outbox_kafka::KafkaConfig::new(&brokers), &[(&topic, 1)])
        .await
        .unwrap();
    let prefix = format!("{}_", unique("cli"));
    let store = outbox_dynamodb::DynamoDbStore::new(
        outbox_dynamodb::local_client(&endpoint),
        outbox_dynamodb::DynamoDbConfig::new(prefix.clone()),
    )
    .unwrap();
    store.migrate().await.unwrap();

    // Polling every 60 s: only the stream can make it publish within seconds.
    let args = relay_args(
        &format!("dynamodb://?region=us-east-1&endpoint={endpoint}&prefix={prefix}"),
        &format!("kafka://{brokers}"),
        &[
            "--poll-interval",
            "60s",
            "--lease-ttl",
            "90s",
            "--publish-timeout",
            "5s",
            "--stream-interval",
            "100ms",
        ],
    );
    let mut relay = RelayProcess::start(&args);
    relay.wait_for_log("wakes on the DynamoDB stream").await;
    // Every shard leased (the first tick) before the commit, so the wake-up is what publishes.
    let lock = store.lock();
    let deadline = Instant::now() + Duration::from_secs(20);
    for shard in 0..store.shard_count() {
        let resource = outbox_core::shard_lease_name("outbox", shard);
        while lock.current(&resource).await.unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "{resource} not taken:\n{}",
                relay.stderr()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let batch = messages(&topic, 20);
    store.add_batch(&batch).await.unwrap();
    // Well before the 60 s poll, also when moto answers slowly.
    wait_drained(&store, &relay, Duration::from_secs(45)).await;
    for m in &batch {
        let stored = store.get(m.id).await.unwrap().unwrap();
        assert!(stored.dispatched_at.is_some(), "{} not dispatched", m.id);
    }
    assert_eq!(relay.terminate().await, Some(0), "{}", relay.stderr());
    assert_leases_released(&store, &lock).await;
    store.delete_tables().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_publishes_cloud_events_to_kafka() {
    use outbox_kafka::rdkafka::Message as _;
    use outbox_kafka::rdkafka::consumer::{Consumer as _, StreamConsumer};
    use outbox_kafka::rdkafka::message::Headers as _;

    let Some(brokers) = service("OUTBOX_TEST_KAFKA_BROKERS", "relay_cloud_events") else {
        return;
    };
    let topic = unique("cli_topic");
    let kafka = outbox_kafka::KafkaConfig::new(&brokers);
    outbox_kafka::create_topics(&kafka, &[(&topic, 1)])
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.db");
    let store = outbox_sqlite::SqliteStore::connect(outbox_sqlite::SqliteConfig::new(&path))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let sent = Message::builder(&topic)
        .key("k")
        .json(&serde_json::json!({"n": 1}))
        .type_name("com.example.cli")
        .build()
        .unwrap();
    store.add(&sent).await.unwrap();

    // A bad source is refused before anything starts.
    let mut bad = relay_args(
        &format!("sqlite://{}", path.display()),
        &format!("kafka://{brokers}"),
        &["--cloudevents-source", "has space"],
    );
    let out = Command::new(env!("CARGO_BIN_EXE_outbox"))
        .arg("relay")
        .args(bad.drain(..))
        .env_remove("OUTBOX_STORE")
        .env_remove("OUTBOX_TRANSPORT")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("--cloudevents-source"), "{err}");

    let args = relay_args(
        &format!("sqlite://{}", path.display()),
        &format!("kafka://{brokers}"),
        &[
            "--poll-interval",
            "50ms",
            "--cloudevents-source",
            "/cli-test",
        ],
    );
    let mut relay = RelayProcess::start(&args);
    wait_drained(&store, &relay, Duration::from_secs(30)).await;
    assert_eq!(relay.terminate().await, Some(0), "{}", relay.stderr());

    let consumer: StreamConsumer = kafka
        .to_client_config()
        .set("group.id", unique("cli_reader"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let record = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within 60 s")
        .unwrap();
    let headers: std::collections::HashMap<String, String> = record
        .headers()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h.key.to_owned(),
                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    assert_eq!(headers["ce_id"], sent.id.to_string());
    assert_eq!(headers["ce_type"], "com.example.cli");
    assert_eq!(headers["ce_source"], "/cli-test");
    assert_eq!(headers["ce_specversion"], "1.0");
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(record.payload(), Some(&br#"{"n":1}"#[..]));
}
