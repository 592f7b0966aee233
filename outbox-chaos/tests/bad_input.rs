//! The bad-input catalogue (issue 13): for each class of bad input, the tests that feed it to
//! the real code against the real services, each asserting a typed error ([`ErrorKind`])
//! that names the problem, no panic, and nothing lost or half-written.
//!
//! | class | test(s) | backend / broker |
//! |---|---|---|
//! | payload over the backend's limit | `conformance-tests/src/store.rs::size_limit` (run by every backend's `tests/conformance.rs`); `backend-sqlite/tests/sqlite.rs::duplicates_and_size_limits_write_nothing`; `backend-dynamodb/tests/dynamodb.rs::item_and_transaction_size_limits` | SQLite, PostgreSQL, DynamoDB |
//! | payload over the broker's limit | `conformance-tests/src/transport.rs::too_large_is_permanent` (each transport's `tests/conformance.rs`); `transport-rabbitmq/tests/rabbitmq.rs::broker_enforced_max_message_size_is_permanent`; `transport-kafka/tests/kafka.rs::errors_are_classified` | RabbitMQ, Kafka |
//! | more than 100 actions / 4 MB in a DynamoDB unit of work | `backend-dynamodb/tests/dynamodb.rs::more_than_100_actions_is_a_typed_error`, `::item_and_transaction_size_limits` | DynamoDB (moto) |
//! | malicious identifiers: schema, table prefix | `backend-postgres/tests/postgres.rs::injection_attempts`; `backend-sqlite/tests/sqlite.rs::invalid_prefix_is_config_invalid`; `backend-dynamodb/tests/dynamodb.rs::config_errors_name_the_field` | PostgreSQL, SQLite, DynamoDB |
//! | malicious identifiers: queue, exchange, topic names | `transport-rabbitmq/tests/rabbitmq.rs::unroutable_and_missing_exchange_are_permanent` (300-byte topic); [`hostile_queue_and_topic_names_are_typed_errors`] | RabbitMQ, Kafka |
//! | malformed, unknown-scheme and credential-bearing URLs | `outbox-cli/tests/ops.rs::errors_are_clear_and_never_show_a_password`, `::postgres_password_is_redacted_on_success_paths`; `backend-postgres/tests/postgres.rs::passwords_are_redacted`; `transport-rabbitmq/tests/rabbitmq.rs::too_large_unreachable_and_redaction`; fuzz target `store_url` (no Display/Debug shows a planted password) | CLI, PostgreSQL, RabbitMQ |
//! | unroutable topic | `conformance-tests/src/transport.rs::unroutable_is_permanent`; `transport-rabbitmq/tests/rabbitmq.rs::unroutable_and_missing_exchange_are_permanent`; `transport-kafka/tests/kafka.rs::errors_are_classified` (unknown topic: NotFound) | RabbitMQ, Kafka |
//! | topic name the broker rejects | [`hostile_queue_and_topic_names_are_typed_errors`]; `transport-rabbitmq/tests/rabbitmq.rs::unroutable_and_missing_exchange_are_permanent` | Kafka, RabbitMQ |
//! | corrupted stored row / item: parked with a reason, the relay keeps going | [`sqlite_corrupt_row_is_parked_and_the_relay_keeps_going`], [`postgres_corrupt_row_is_parked_and_the_relay_keeps_going`]; `backend-dynamodb/tests/queue.rs::a_poison_item_is_parked_with_a_reason_and_the_shard_keeps_flowing`; fuzz targets `sqlite_row`, `postgres_row`, `dynamodb_item` | SQLite, PostgreSQL, DynamoDB → RabbitMQ |
//! | non-UTF-8, oversized or reserved-name header values | `conformance-tests/src/store.rs::invalid_input` (NUL, empty and over-`MAX_FIELD_LEN` names); `transport-kafka/tests/kafka.rs::records_that_are_not_outbox_messages_are_dead_lettered`; `transport-rabbitmq/tests/rabbitmq.rs::undecodable_message_is_dead_lettered`, `::confirmed_round_trip_of_every_field` (reserved `x-` / trace names travel escaped); fuzz targets `kafka_headers`, `amqp_properties` | Kafka, RabbitMQ, every backend |
//! | expired DynamoDB inbox entry not yet deleted by TTL | `backend-dynamodb/tests/dynamodb.rs::expired_inbox_entries_count_as_absent`; `conformance-tests/src/inbox.rs::retention_expiry` | DynamoDB (moto), every backend |
//!
//! Run: `source ~/.cache/outbox-services/env; OUTBOX_TEST_REQUIRED=1 cargo test -p
//! outbox-chaos --test bad_input`.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    DistributedLock, ErrorKind, Message, MessageId, OutboxStore, Producer, Relay, RelayConfig,
    RequeueFilter,
};
use outbox_postgres::{PgConfig, PgStore, sqlx};
use outbox_rabbitmq::{
    AmqpUrl, ConnectionConfig, ProducerConfig, RabbitMqProducer, Topology, declare_topology,
    delete_topology,
};
use outbox_sqlite::{SqliteConfig, SqliteStore, rusqlite};

fn required() -> bool {
    std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1")
}

/// The value of a service variable; `None` (test skipped) when unset, a panic when unset and
/// `OUTBOX_TEST_REQUIRED=1`.
fn service(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if required() => panic!("{test}: {var} is not set and OUTBOX_TEST_REQUIRED=1"),
        _ => {
            eprintln!("SKIPPED {test}: {var} not set");
            None
        }
    }
}

fn unique(base: &str) -> String {
    let suffix: String = (0..8).map(|_| fastrand::lowercase()).collect();
    format!("{base}_{suffix}")
}

/// A RabbitMQ exchange and queue for one test (the topic is the binding key), deleted on
/// [`Broker::delete`].
struct Broker {
    connection: ConnectionConfig,
    topology: Topology,
    topic: String,
}

impl Broker {
    async fn new(url: &str, name: &str) -> Broker {
        let connection = ConnectionConfig::new(AmqpUrl::parse(url).unwrap());
        let topology = Topology::new(format!("{name}.x"), name).binding_keys([name]);
        declare_topology(&connection, &topology).await.unwrap();
        Broker {
            connection,
            topology,
            topic: name.to_owned(),
        }
    }

    fn producer(&self) -> Arc<dyn Producer> {
        Arc::new(
            RabbitMqProducer::new(ProducerConfig::new(
                self.connection.clone(),
                self.topology.exchange.clone(),
            ))
            .unwrap(),
        )
    }

    async fn delete(self) {
        let _ = delete_topology(&self.connection, &self.topology).await;
    }
}

fn msg(topic: &str, key: &str, payload: &str) -> Message {
    Message::builder(topic)
        .key(key)
        .payload(payload.to_owned())
        .build()
        .unwrap()
}

fn relay(store: Arc<dyn OutboxStore>, lock: Arc<dyn DistributedLock>, broker: &Broker) -> Relay {
    let config = RelayConfig {
        lease_ttl: Duration::from_secs(30),
        ..RelayConfig::default()
    };
    Relay::new(store, lock, broker.producer(), config).unwrap()
}

/// Run the relay until two passes in a row publish nothing (a pass that parks a corrupted
/// row leaves the messages after it to the next one); every pass must succeed: a corrupted
/// row must not stop the relay.
async fn drain(relay: &Relay) -> u64 {
    let mut published = 0;
    let mut idle = 0;
    for _ in 0..20 {
        let report = relay.run_once().await.expect("the relay keeps going");
        published += report.published;
        idle = if report.published == 0 { idle + 1 } else { 0 };
        if idle == 2 {
            break;
        }
    }
    published
}

/// The four messages of the corrupted-row tests: key `k1` twice (the first one will be
/// corrupted), `k2` and `k3` once.
fn four(topic: &str) -> [Message; 4] {
    [
        msg(topic, "k1", "a"),
        msg(topic, "k1", "b"),
        msg(topic, "k2", "c"),
        msg(topic, "k3", "d"),
    ]
}

/// SQLite: a row whose `headers` are not JSON (written past the store, by hand or by a
/// foreign writer) is parked with a reason naming the column; the other keys are published,
/// the later message of its key waits; once repaired and requeued, both go out in order.
#[tokio::test]
async fn sqlite_corrupt_row_is_parked_and_the_relay_keeps_going() {
    let test = "sqlite_corrupt_row_is_parked_and_the_relay_keeps_going";
    let Some(url) = service("OUTBOX_TEST_RABBITMQ_URL", test) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let store = SqliteStore::connect(SqliteConfig::new(&path).with_shard_count(1))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let broker = Broker::new(&url, &unique("bad_sqlite")).await;
    let messages = four(&broker.topic);
    for m in &messages {
        store.add(m).await.unwrap();
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    let corrupt = |sql: &str| {
        raw.execute(sql, [messages[0].id.to_string()]).unwrap();
    };
    corrupt("UPDATE outbox_messages SET headers = 'not json' WHERE id = ?1");
    let status = |id: MessageId| -> (String, Option<String>) {
        raw.query_row(
            "SELECT status, last_error FROM outbox_messages WHERE id = ?1",
            [id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    };

    let store = Arc::new(store);
    let relay = relay(store.clone(), Arc::new(store.lock()), &broker);
    assert_eq!(drain(&relay).await, 2, "k2 and k3 are published");
    let (s, reason) = status(messages[0].id);
    assert_eq!(s, "parked");
    let reason = reason.unwrap();
    assert!(
        reason.contains("headers"),
        "the reason names the column: {reason}"
    );
    assert_eq!(
        status(messages[1].id).0,
        "pending",
        "k1's second message waits"
    );
    assert_eq!(status(messages[2].id).0, "dispatched");
    assert_eq!(status(messages[3].id).0, "dispatched");

    // Repaired and requeued: nothing was lost, k1 goes out in order.
    corrupt("UPDATE outbox_messages SET headers = '{}' WHERE id = ?1");
    let n = store
        .requeue(&RequeueFilter::Ids(vec![messages[0].id]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(drain(&relay).await, 2);
    for m in &messages {
        assert_eq!(status(m.id).0, "dispatched", "{}", m.payload.len());
    }
    broker.delete().await;
}

/// The SQLite decoder itself: the error is `Unexpected` and names the column.
#[test]
fn sqlite_decoder_names_the_corrupt_column() {
    let row = outbox_sqlite::MessageRow {
        id: MessageId::new().to_string(),
        topic: "t".into(),
        headers: "{}".into(),
        message_type: "event".into(),
        status: "pending".into(),
        ..Default::default()
    };
    assert!(outbox_sqlite::decode_row(row.clone()).is_ok());
    for (column, bad) in [
        (
            "id",
            outbox_sqlite::MessageRow {
                id: "nope".into(),
                ..row.clone()
            },
        ),
        (
            "headers",
            outbox_sqlite::MessageRow {
                headers: "{\"a\":1}".into(),
                ..row.clone()
            },
        ),
        (
            "status",
            outbox_sqlite::MessageRow {
                status: "lost".into(),
                ..row.clone()
            },
        ),
        (
            "created_at",
            outbox_sqlite::MessageRow {
                created_at: i64::MAX,
                ..row.clone()
            },
        ),
        (
            "attempts",
            outbox_sqlite::MessageRow {
                attempts: -1,
                ..row.clone()
            },
        ),
    ] {
        let e = outbox_sqlite::decode_row(bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unexpected, "{column}: {e}");
        assert!(e.to_string().contains(column), "{column}: {e}");
    }
}

/// PostgreSQL: a row whose `headers` are JSON but not an object of strings is parked with a
/// reason naming the column; the relay keeps going as on SQLite.
#[tokio::test]
async fn postgres_corrupt_row_is_parked_and_the_relay_keeps_going() {
    let test = "postgres_corrupt_row_is_parked_and_the_relay_keeps_going";
    let Some(pg_url) = service("OUTBOX_TEST_POSTGRES_URL", test) else {
        return;
    };
    let Some(url) = service("OUTBOX_TEST_RABBITMQ_URL", test) else {
        return;
    };
    let schema = unique("t_bad_input");
    let store = PgStore::connect(
        &pg_url,
        PgConfig::new().with_schema(&schema).with_shard_count(1),
    )
    .await
    .unwrap();
    store.migrate().await.unwrap();
    let broker = Broker::new(&url, &unique("bad_pg")).await;
    let messages = four(&broker.topic);
    for m in &messages {
        store.add(m).await.unwrap();
    }
    let table = format!("\"{schema}\".\"outbox_messages\"");
    let pool = store.pool().clone();
    let exec = |sql: String, id: MessageId| {
        let pool = pool.clone();
        async move {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(id.as_uuid())
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    exec(
        format!("UPDATE {table} SET headers = '{{\"a\": 1}}'::jsonb WHERE id = $1"),
        messages[0].id,
    )
    .await;
    let status = |id: MessageId| {
        let pool = pool.clone();
        let table = table.clone();
        async move {
            let row: (String, Option<String>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "SELECT status, last_error FROM {table} WHERE id = $1"
            )))
            .bind(id.as_uuid())
            .fetch_one(&pool)
            .await
            .unwrap();
            row
        }
    };

    let store = Arc::new(store);
    let relay = relay(store.clone(), Arc::new(store.lock()), &broker);
    assert_eq!(drain(&relay).await, 2, "k2 and k3 are published");
    let (s, reason) = status(messages[0].id).await;
    assert_eq!(s, "parked");
    let reason = reason.unwrap();
    assert!(
        reason.contains("headers"),
        "the reason names the column: {reason}"
    );
    assert_eq!(status(messages[1].id).await.0, "pending");
    assert_eq!(status(messages[2].id).await.0, "dispatched");
    assert_eq!(status(messages[3].id).await.0, "dispatched");

    exec(
        format!("UPDATE {table} SET headers = '{{}}'::jsonb WHERE id = $1"),
        messages[0].id,
    )
    .await;
    let n = store
        .requeue(&RequeueFilter::Ids(vec![messages[0].id]))
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(drain(&relay).await, 2);
    for m in &messages {
        assert_eq!(status(m.id).await.0, "dispatched");
    }
    broker.delete().await;
    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&pool)
    .await;
}

/// Kafka topic names the broker rejects (illegal characters, over 249 bytes) and RabbitMQ
/// queue names it cannot carry (over 255 bytes): a typed, permanent error, nothing sent.
#[tokio::test]
async fn hostile_queue_and_topic_names_are_typed_errors() {
    let test = "hostile_queue_and_topic_names_are_typed_errors";
    let Some(brokers) = service("OUTBOX_TEST_KAFKA_BROKERS", test) else {
        return;
    };
    let Some(url) = service("OUTBOX_TEST_RABBITMQ_URL", test) else {
        return;
    };
    let producer =
        outbox_kafka::KafkaProducer::new(&outbox_kafka::KafkaConfig::new(&brokers)).unwrap();
    for topic in [
        "bad topic; DROP TABLE x".to_owned(),
        "a/b\\c".to_owned(),
        "t".repeat(300),
    ] {
        let e = producer
            .send(&msg(&topic, "k", "x"))
            .await
            .expect_err("the broker rejects the topic name");
        assert!(
            matches!(
                e.kind(),
                ErrorKind::InvalidInput | ErrorKind::NotFound | ErrorKind::ConfigInvalid
            ),
            "{topic:.40}: {e}"
        );
        assert!(!e.is_retryable(), "{topic:.40}: {e}");
    }

    let connection = ConnectionConfig::new(AmqpUrl::parse(&url).unwrap());
    let queue = "q".repeat(300);
    let e = declare_topology(&connection, &Topology::new("x.bad", &queue))
        .await
        .expect_err("a 300-byte queue name");
    assert!(
        matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::ConfigInvalid),
        "{e}"
    );
    assert!(e.to_string().contains("255"), "names the limit: {e}");
}
