//! The order service's one test body, run on every backend: memory and SQLite (embedded),
//! PostgreSQL (`OUTBOX_TEST_POSTGRES_URL`) and DynamoDB (`OUTBOX_TEST_DYNAMODB_ENDPOINT`, moto
//! in CI). With `OUTBOX_TEST_REQUIRED=1` (CI) a missing service fails the test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use outbox::memory::{MemoryBroker, MemoryLock, MemoryStore};
use outbox::{DistributedLock, MessageId, OutboxStore, Relay, RelayConfig};
use outbox_example_orders::repos::{DynamoOrders, MemoryOrders, PgOrders, SqliteOrders};
use outbox_example_orders::{ORDER_PLACED, Order, OrderRepository, OrderService, PlaceError};

fn service_url(var: &str, test: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if std::env::var("OUTBOX_TEST_REQUIRED").is_ok_and(|v| v == "1") => {
            panic!("{test}: {var} is not set and OUTBOX_TEST_REQUIRED=1")
        }
        _ => {
            eprintln!("SKIPPED {test}: {var} not set");
            None
        }
    }
}

fn unique(base: &str) -> String {
    format!("{base}_{}", fastrand::u32(..))
}

fn order(id: &str, total_cents: i64) -> Order {
    Order {
        id: id.to_owned(),
        customer: "ada".to_owned(),
        total_cents,
    }
}

/// What every backend must do: an order and its event commit together or not at all, a
/// duplicate or invalid order writes nothing, and a relay publishes the event.
async fn places_orders<R>(store: R::Store, repo: R, lock: Arc<dyn DistributedLock>)
where
    R: OrderRepository,
    R::Store: OutboxStore + Clone + 'static,
{
    let outbox: Arc<dyn OutboxStore> = Arc::new(store.clone());
    let service = OrderService::new(store, repo);
    service.repository().migrate().await.unwrap();
    service.repository().migrate().await.unwrap(); // idempotent

    let a = order("o-1", 1250);
    let event: MessageId = service.place(&a).await.unwrap();
    assert_eq!(service.order("o-1").await.unwrap(), Some(a.clone()));
    let stored = outbox
        .get(event)
        .await
        .unwrap()
        .expect("the event is stored");
    assert_eq!(stored.message.topic, ORDER_PLACED);
    assert_eq!(stored.message.key.as_deref(), Some("o-1"));
    let sent: Order = serde_json::from_slice(&stored.message.payload).unwrap();
    assert_eq!(sent, a);
    assert_eq!(outbox.stats().await.unwrap().pending, 1);

    // A second order with the same id: refused, and its event was not written either.
    let again = order("o-1", 999);
    match service.place(&again).await {
        Err(PlaceError::Duplicate(id)) => assert_eq!(id, "o-1"),
        other => panic!("a duplicate order gave {other:?}"),
    }
    assert_eq!(service.order("o-1").await.unwrap(), Some(a.clone()));
    assert_eq!(
        outbox.stats().await.unwrap().pending,
        1,
        "no event without its order"
    );

    // Invalid: nothing written.
    assert!(matches!(
        service.place(&order("o-2", -1)).await,
        Err(PlaceError::Invalid(_))
    ));
    assert_eq!(service.order("o-2").await.unwrap(), None);

    let b = order("o-2", 500);
    service.place(&b).await.unwrap();
    assert_eq!(outbox.stats().await.unwrap().pending, 2);

    // The relay publishes both events, each once.
    let broker = MemoryBroker::new();
    let relay = Relay::new(
        outbox.clone(),
        lock,
        Arc::new(broker.producer()),
        RelayConfig::default(),
    )
    .unwrap();
    let mut published = 0;
    for _ in 0..20 {
        published += relay.run_once().await.unwrap().published;
        if published >= 2 {
            break;
        }
    }
    let got: Vec<Order> = broker
        .published(ORDER_PLACED)
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(got.contains(&a) && got.contains(&b), "{got:?}");
    assert_eq!(outbox.stats().await.unwrap().pending, 0);
}

#[tokio::test]
async fn on_memory() {
    let store = MemoryStore::new();
    let repo = MemoryOrders::new(store.clone());
    places_orders(store, repo, Arc::new(MemoryLock::default())).await;
}

/// A SQLite store in a new temporary directory (removed by the test at its end).
async fn sqlite_store(name: &str) -> (std::path::PathBuf, outbox::sqlite::SqliteStore) {
    use outbox::sqlite::{SqliteConfig, SqliteStore};
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).unwrap();
    let store = SqliteStore::connect(SqliteConfig::new(dir.join("orders.db")))
        .await
        .unwrap();
    (dir, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite() {
    let (dir, store) = sqlite_store("orders_example").await;
    store.migrate().await.unwrap();
    let repo = SqliteOrders::new(store.clone(), "orders").unwrap();
    let lock = Arc::new(store.lock());
    places_orders(store, repo, lock).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres() {
    use outbox::postgres::{PgConfig, PgStore, sqlx};
    let Some(url) = service_url("OUTBOX_TEST_POSTGRES_URL", "orders_on_postgres") else {
        return;
    };
    let schema = unique("orders_example");
    let store = PgStore::connect(&url, PgConfig::new().with_schema(&schema))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let repo = PgOrders::new(store.clone(), &format!("{schema}.orders")).unwrap();
    let lock = Arc::new(store.lock());
    places_orders(store.clone(), repo, lock).await;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_dynamodb() {
    use outbox::dynamodb::{DynamoDbConfig, DynamoDbStore, local_client};
    let Some(endpoint) = service_url("OUTBOX_TEST_DYNAMODB_ENDPOINT", "orders_on_dynamodb") else {
        return;
    };
    let prefix = format!("{}_", unique("orders_example"));
    let store = DynamoDbStore::new(local_client(&endpoint), DynamoDbConfig::new(&prefix)).unwrap();
    store.migrate().await.unwrap();
    let repo = DynamoOrders::new(store.clone(), &format!("{prefix}orders")).unwrap();
    let cleanup = repo.clone();
    let lock = Arc::new(store.lock());
    places_orders(store.clone(), repo, lock).await;
    cleanup.delete_table().await.unwrap();
    store.delete_tables().await.unwrap();
}

/// Table names are spliced into SQL: anything but letters, digits and `_` is refused.
#[tokio::test]
async fn hostile_table_names_are_refused() {
    let (dir, store) = sqlite_store("orders_example_names").await;
    for bad in ["", "orders; DROP TABLE x", "a.b", "1orders", "ord\"ers"] {
        let e = SqliteOrders::new(store.clone(), bad).unwrap_err();
        assert_eq!(e.kind(), outbox::ErrorKind::ConfigInvalid, "{bad:?}: {e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
