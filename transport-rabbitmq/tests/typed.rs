//! Typed messages and CloudEvents against the real broker (`OUTBOX_TEST_RABBITMQ_URL`):
//! the `cloudEvents:` application properties on the raw AMQP message, and typed messages
//! from a SQLite outbox through the relay and RabbitMQ to a `Router` behind an
//! `InboxProcessor` on SQLite.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{
    CancellationToken, Consumer, Delivery, HandlerError, InboxProcessor, Message, OutboxStore,
    Producer, Relay, RelayConfig, Router, Transaction, TransactionalStore, TypedHandler,
    TypedMessage, UnknownType, Utc, async_trait,
};
use outbox_rabbitmq::{RabbitMqProducer, fetch_dead_letters};
use outbox_sqlite::{SqliteConfig, SqliteStore, SqliteTx};
use serde::{Deserialize, Serialize};

async fn receive(c: &dyn Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), c.receive())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
        .expect("consumer not closed")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    id: i64,
    total_cents: i64,
}
impl TypedMessage for OrderPlaced {
    const TYPE_NAME: &'static str = "com.example.order.placed";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCancelled {
    id: i64,
}
impl TypedMessage for OrderCancelled {
    const TYPE_NAME: &'static str = "com.example.order.cancelled";
}

fn text(v: Option<&AMQPValue>) -> Option<String> {
    match v? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// In CloudEvents mode the raw AMQP message carries `cloudEvents:id`, `:type`, `:source`,
/// `:specversion` (`1.0`) and `:time` (RFC 3339) application properties and the AMQP
/// content type; our consumer decodes it unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloud_events_binary_mode_on_the_wire_and_round_trip() {
    let iso = isolated!("ce");
    let config = iso
        .producer_config()
        .with_cloud_events(CloudEvents::new("/tests/billing").unwrap());
    let producer = RabbitMqProducer::new(config).unwrap();
    let t = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:11:12.345678Z")
        .unwrap()
        .with_timezone(&Utc);
    let typed = Message::builder(iso.topic())
        .key("order-1")
        .typed(&OrderPlaced {
            id: 1,
            total_cents: 990,
        })
        .header(
            "cloudEvents:subject",
            "an application header, not an attribute",
        )
        .created_at(t)
        .build()
        .unwrap();
    // In the queue: CloudEvents copy, plain copy (a producer without the mode), CloudEvents copy.
    producer.send(&typed).await.unwrap();
    iso.producer().send(&typed).await.unwrap();
    producer.send(&typed).await.unwrap();

    let conn = Connection::connect(iso.connection.url.expose(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(iso.topic().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message in the queue");
    let p = &got.delivery.properties;
    let h = p.headers().as_ref().unwrap().inner();
    assert_eq!(
        text(h.get("cloudEvents:id")),
        Some(typed.id.to_string()),
        "{h:?}"
    );
    assert_eq!(
        text(h.get("cloudEvents:type")).as_deref(),
        Some("com.example.order.placed")
    );
    assert_eq!(
        text(h.get("cloudEvents:source")).as_deref(),
        Some("/tests/billing")
    );
    assert_eq!(
        text(h.get("cloudEvents:specversion")).as_deref(),
        Some("1.0")
    );
    assert_eq!(
        text(h.get("cloudEvents:time")).as_deref(),
        Some("2026-12-01T10:11:12.345678Z")
    );
    assert!(
        !h.contains_key("cloudEvents:subject"),
        "application headers with the prefix travel escaped"
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(got.delivery.data, br#"{"id":1,"total_cents":990}"#);

    // Without CloudEvents: none of the attributes.
    let got = ch
        .basic_get(iso.topic().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the plain copy in the queue");
    let h = got.delivery.properties.headers().as_ref().unwrap().inner();
    assert!(
        !h.keys().any(|k| k.as_str().starts_with("cloudEvents:")),
        "{h:?}"
    );
    drop(conn);

    // Our consumer decodes the CloudEvents copy unchanged.
    let c = iso.consumer().await.unwrap();
    let d = receive(&c).await;
    assert_eq!(d.message, typed);
    c.ack(&d).await.unwrap();
}

/// Billing: writes an invoice row per placed order and deletes it on a cancel, in the
/// inbox's transaction.
#[derive(Clone, Default)]
struct Billing {
    placed: Arc<Mutex<Vec<OrderPlaced>>>,
}

#[async_trait]
impl TypedHandler<OrderPlaced, SqliteTx> for Billing {
    async fn handle(
        &self,
        order: OrderPlaced,
        _m: &Message,
        tx: &mut SqliteTx,
    ) -> Result<(), HandlerError> {
        let (id, total) = (order.id, order.total_cents);
        tx.execute(move |conn| {
            conn.execute(
                "INSERT INTO invoices (order_id, total_cents) VALUES (?1, ?2)",
                (id, total),
            )
        })
        .await?;
        self.placed.lock().unwrap().push(order);
        Ok(())
    }
}

#[async_trait]
impl TypedHandler<OrderCancelled, SqliteTx> for Billing {
    async fn handle(
        &self,
        order: OrderCancelled,
        _m: &Message,
        tx: &mut SqliteTx,
    ) -> Result<(), HandlerError> {
        tx.execute(move |conn| {
            conn.execute("DELETE FROM invoices WHERE order_id = ?1", [order.id])
        })
        .await?;
        Ok(())
    }
}

/// Typed messages added to a SQLite outbox in the business transaction, published by the
/// relay through RabbitMQ (in CloudEvents mode), and dispatched by a `Router` to typed
/// handlers writing to SQLite; an unknown type and an undecodable payload land in the
/// dead-letter queue at once with their reasons.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_messages_end_to_end_sqlite_relay_rabbitmq_router() {
    let iso = isolated!("typed");
    let dir = tempfile::tempdir().unwrap();
    let producer_db = SqliteStore::connect(SqliteConfig::new(dir.path().join("orders.db")))
        .await
        .unwrap();
    producer_db.migrate().await.unwrap();
    let consumer_db = SqliteStore::connect(SqliteConfig::new(dir.path().join("billing.db")))
        .await
        .unwrap();
    consumer_db.migrate().await.unwrap();
    consumer_db
        .open_connection()
        .unwrap()
        .execute_batch(
            "CREATE TABLE invoices (order_id INTEGER PRIMARY KEY, total_cents INTEGER NOT NULL)",
        )
        .unwrap();

    let topic = iso.topic().to_owned();
    let placed: Vec<OrderPlaced> = (1..=3)
        .map(|id| OrderPlaced {
            id,
            total_cents: id * 100,
        })
        .collect();
    let mut tx = producer_db.begin().await.unwrap();
    for order in &placed {
        let m = Message::builder(&topic)
            .key(format!("order-{}", order.id))
            .typed(order)
            .build()
            .unwrap();
        tx.add(&m).await.unwrap();
    }
    let cancel = Message::builder(&topic)
        .key("order-2")
        .typed(&OrderCancelled { id: 2 })
        .build()
        .unwrap();
    tx.add(&cancel).await.unwrap();
    let unknown = Message::builder(&topic)
        .json(&serde_json::json!({"id": 9}))
        .type_name("com.example.order.shipped")
        .build()
        .unwrap();
    tx.add(&unknown).await.unwrap();
    let broken = Message::builder(&topic)
        .payload("{not json")
        .content_type("application/json")
        .type_name(OrderPlaced::TYPE_NAME)
        .build()
        .unwrap();
    tx.add(&broken).await.unwrap();
    tx.commit().await.unwrap();

    let config = iso
        .producer_config()
        .with_cloud_events(CloudEvents::new("/tests/orders").unwrap());
    let relay = Relay::new(
        Arc::new(producer_db.clone()),
        Arc::new(producer_db.lock()),
        Arc::new(RabbitMqProducer::new(config).unwrap()),
        RelayConfig::default(),
    )
    .unwrap();
    let mut published = 0;
    for _ in 0..10 {
        published += relay.run_once().await.unwrap().published;
        if producer_db.stats().await.unwrap().pending == 0 {
            break;
        }
    }
    assert_eq!(published, 6);
    assert_eq!(producer_db.stats().await.unwrap().pending, 0);

    let billing = Billing::default();
    let router = Router::<SqliteTx>::new()
        .route::<OrderPlaced, _>(billing.clone())
        .unwrap()
        .route::<OrderCancelled, _>(billing.clone())
        .unwrap()
        .on_unknown(UnknownType::DeadLetter);
    let processor = Arc::new(
        InboxProcessor::new(Arc::new(consumer_db.clone()), "billing", router)
            .unwrap()
            .with_max_deliveries(5),
    );
    let consumer = Arc::new(iso.consumer().await.unwrap());
    let shutdown = CancellationToken::new();
    let run = {
        let (processor, consumer, shutdown) =
            (processor.clone(), consumer.clone(), shutdown.clone());
        tokio::spawn(async move { processor.run(consumer.as_ref(), shutdown).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while {
        let s = processor.stats();
        s.handled + s.dead_lettered < 6
    } && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        (stats.handled, stats.retried, stats.dead_lettered),
        (4, 0, 2),
        "{stats:?}"
    );

    let mut seen = billing.placed.lock().unwrap().clone();
    seen.sort_by_key(|o| o.id);
    assert_eq!(seen, placed, "each placed order decoded once");
    let invoices: Vec<(i64, i64)> = {
        let conn = consumer_db.open_connection().unwrap();
        let mut stmt = conn
            .prepare("SELECT order_id, total_cents FROM invoices ORDER BY order_id")
            .unwrap();
        stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(invoices, vec![(1, 100), (3, 300)], "order 2 was cancelled");

    let dlq = iso.topology.dead_letter_queue.clone().unwrap();
    let mut dead = fetch_dead_letters(&iso.connection, &dlq, 10).await.unwrap();
    dead.sort_by_key(|d| d.message.id);
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!(dead[0].message.id, unknown.id);
    assert!(
        dead[0]
            .reason
            .contains("no route for message type \"com.example.order.shipped\""),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[1].message.id, broken.id);
    assert!(
        dead[1].reason.contains("not a valid JSON"),
        "{}",
        dead[1].reason
    );
    assert_eq!(
        dead[1].attempts,
        Some(1),
        "dead-lettered on the first delivery"
    );
}
