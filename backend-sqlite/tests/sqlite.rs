//! SQLite-specific behaviour of `outbox-sqlite`, against real database files.
//!
//! Every test uses its own file in its own temporary directory, so they run in parallel.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    Clock, DistributedLock, ErrorKind, FailedAttempt, FailureOutcome, InboxEntry, InboxStore,
    InsertOutcome, ListQuery, ManualClock, Message, MessageId, MessageStatus, MessageType,
    Ordering, OutboxStore, PendingQuery, RequeueFilter, TraceContext, Transaction,
    TransactionalStore,
};
use outbox_sqlite::{SCHEMA_VERSION, SqliteConfig, SqliteStore, rusqlite};
use tempfile::TempDir;

fn config(dir: &TempDir) -> SqliteConfig {
    SqliteConfig::new(dir.path().join("outbox.db"))
}

/// `SqliteStore::connect` then `migrate`, the setup of every store here.
async fn connect_and_migrate(config: SqliteConfig) -> outbox_core::Result<SqliteStore> {
    let store = SqliteStore::connect(config).await?;
    store.migrate().await?;
    Ok(store)
}

async fn open(dir: &TempDir) -> SqliteStore {
    connect_and_migrate(config(dir)).await.unwrap()
}

async fn open_with_clock(dir: &TempDir) -> (SqliteStore, ManualClock) {
    let clock = ManualClock::new();
    let store = connect_and_migrate(config(dir).with_clock(Arc::new(clock.clone())))
        .await
        .unwrap();
    (store, clock)
}

fn msg(key: &str) -> Message {
    Message::builder("topic")
        .key(key)
        .payload("p")
        .build()
        .unwrap()
}

fn all_shards(store: &SqliteStore) -> Vec<u32> {
    (0..store.shard_count()).collect()
}

async fn pending(store: &SqliteStore, ordering: Ordering) -> Vec<MessageId> {
    store
        .fetch_pending(&PendingQuery {
            shards: all_shards(store),
            limit: 1000,
            ordering,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message.id)
        .collect()
}

/// A caller table for business data.
async fn create_orders(store: &SqliteStore) {
    let conn = store.open_connection().unwrap();
    conn.execute_batch("CREATE TABLE orders (id INTEGER PRIMARY KEY, note TEXT NOT NULL)")
        .unwrap();
}

fn order_count(store: &SqliteStore) -> i64 {
    let conn = store.open_connection().unwrap();
    conn.query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
        .unwrap()
}

#[tokio::test]
async fn wal_full_sync_and_foreign_keys_are_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let conn = store.open_connection().unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let sync: i64 = conn
        .query_row("PRAGMA synchronous", [], |r| r.get(0))
        .unwrap();
    assert_eq!(sync, 2, "synchronous=FULL");
    let fk: i64 = conn
        .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
        .unwrap();
    assert_eq!(fk, 1);
    // The pooled connections too: the journal mode is a property of the file.
    store.add(&msg("k")).await.unwrap();
    assert!(dir.path().join("outbox.db-wal").exists());
}

#[tokio::test]
async fn migrations_rerun_and_run_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    store.add(&msg("k")).await.unwrap();
    drop(store);
    let store = open(&dir).await;
    assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    assert_eq!(store.stats().await.unwrap().pending, 1, "data kept");

    // Ten openers of a fresh file at once.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("outbox.db");
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let path = path.clone();
            tokio::spawn(async move { connect_and_migrate(SqliteConfig::new(path)).await })
        })
        .collect();
    for t in tasks {
        let store = t.await.unwrap().unwrap();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
    }
    let conn = rusqlite::Connection::open(&path).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM outbox_schema_version", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(rows, SCHEMA_VERSION, "each migration applied once");
}

#[tokio::test]
async fn two_prefixes_in_one_file_are_independent() {
    let dir = tempfile::tempdir().unwrap();
    let a = connect_and_migrate(config(&dir).with_table_prefix("a_"))
        .await
        .unwrap();
    let b = connect_and_migrate(config(&dir).with_table_prefix("b_").with_shard_count(4))
        .await
        .unwrap();
    let m = msg("k");
    a.add(&m).await.unwrap();
    assert!(a.get(m.id).await.unwrap().is_some());
    assert!(b.get(m.id).await.unwrap().is_none());
    b.add(&m).await.unwrap(); // same id, other prefix: no conflict
    assert_eq!(a.stats().await.unwrap().pending, 1);
    assert_eq!(b.stats().await.unwrap().pending, 1);

    let entry = InboxEntry::new(m.id, "h");
    assert_eq!(a.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(b.insert(&entry).await.unwrap(), InsertOutcome::Inserted);

    let ttl = Duration::from_secs(30);
    assert!(a.lock().acquire("r", "x", ttl).await.unwrap().is_some());
    assert!(b.lock().acquire("r", "y", ttl).await.unwrap().is_some());
    assert_eq!(a.shard_count(), 16);
    assert_eq!(b.shard_count(), 4);
}

#[tokio::test]
async fn invalid_prefix_is_config_invalid() {
    let dir = tempfile::tempdir().unwrap();
    for prefix in ["x; DROP TABLE y", "", "1abc", "sqlite_x", "a\"b"] {
        let e = connect_and_migrate(config(&dir).with_table_prefix(prefix))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{prefix}: {e}");
        assert!(e.to_string().contains("table_prefix"), "{e}");
    }
    assert!(
        !dir.path().join("outbox.db").exists(),
        "nothing was created"
    );
}

#[tokio::test]
async fn newer_schema_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir).await);
    let conn = rusqlite::Connection::open(dir.path().join("outbox.db")).unwrap();
    conn.execute(
        "INSERT INTO outbox_schema_version (version, applied_at) VALUES (?1, 0)",
        [SCHEMA_VERSION + 1],
    )
    .unwrap();
    let e = connect_and_migrate(config(&dir)).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("newer"), "{e}");
}

#[tokio::test]
async fn shard_count_is_fixed_for_the_data() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(&dir).await);
    let e = connect_and_migrate(config(&dir).with_shard_count(8))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    assert!(e.to_string().contains("shard_count"), "{e}");
}

#[tokio::test]
async fn unopenable_path_is_config_invalid() {
    let dir = tempfile::tempdir().unwrap();
    let e = connect_and_migrate(SqliteConfig::new(dir.path().join("missing/dir/x.db")))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("missing/dir/x.db"), "{e}");
}

#[tokio::test]
async fn caller_sql_and_outbox_commit_and_roll_back_together() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    create_orders(&store).await;

    // Commit: both.
    let m1 = msg("order-1");
    let mut tx = store.begin().await.unwrap();
    let n = tx
        .execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (1, 'a')", []))
        .await
        .unwrap();
    assert_eq!(n, 1);
    tx.add(&m1).await.unwrap();
    let entry = InboxEntry::new(MessageId::new(), "h");
    assert_eq!(
        tx.inbox_insert(&entry).await.unwrap(),
        InsertOutcome::Inserted
    );
    // Not visible to others before commit.
    assert!(store.get(m1.id).await.unwrap().is_none());
    assert_eq!(order_count(&store), 0);
    let committed = tx.commit().await.unwrap();
    assert_eq!(committed.ids, vec![m1.id]);
    assert_eq!(order_count(&store), 1);
    assert!(store.get(m1.id).await.unwrap().is_some());
    assert!(store.contains(&entry).await.unwrap());

    // Rollback: neither.
    let m2 = msg("order-2");
    let mut tx = store.begin().await.unwrap();
    tx.execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (2, 'b')", []))
        .await
        .unwrap();
    tx.add(&m2).await.unwrap();
    let entry2 = InboxEntry::new(MessageId::new(), "h");
    tx.inbox_insert(&entry2).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(order_count(&store), 1);
    assert!(store.get(m2.id).await.unwrap().is_none());
    assert!(!store.contains(&entry2).await.unwrap());

    // Dropped without commit: neither.
    let m3 = msg("order-3");
    let mut tx = store.begin().await.unwrap();
    tx.execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (3, 'c')", []))
        .await
        .unwrap();
    tx.add(&m3).await.unwrap();
    drop(tx);
    assert_eq!(order_count(&store), 1);
    assert!(store.get(m3.id).await.unwrap().is_none());
    // The write lock was released: another transaction commits.
    let mut tx = store.begin().await.unwrap();
    tx.add(&m3).await.unwrap();
    tx.commit().await.unwrap();
    assert!(store.get(m3.id).await.unwrap().is_some());
}

#[tokio::test]
async fn a_failed_operation_aborts_the_transaction_and_the_pool_stays_healthy() {
    let dir = tempfile::tempdir().unwrap();
    let store = connect_and_migrate(config(&dir).with_pool_size(1))
        .await
        .unwrap();
    create_orders(&store).await;
    let existing = msg("k");
    store.add(&existing).await.unwrap();

    // Duplicate id inside a transaction: AlreadyExists, and nothing of it commits.
    let mut tx = store.begin().await.unwrap();
    tx.execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (1, 'a')", []))
        .await
        .unwrap();
    let fresh = msg("k2");
    tx.add(&fresh).await.unwrap();
    let e = tx.add(&existing).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains(&existing.id.to_string()), "{e}");
    // Aborted: commit is refused with InvalidInput naming the duplicate.
    let e = tx.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    assert!(e.to_string().contains(&existing.id.to_string()), "{e}");
    assert_eq!(order_count(&store), 0);
    assert!(store.get(fresh.id).await.unwrap().is_none());

    // An error in the caller's SQL aborts too.
    let mut tx = store.begin().await.unwrap();
    let e = tx
        .execute(|c| c.execute("INSERT INTO no_such_table VALUES (1)", []))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unexpected);
    let refused = tx.add(&fresh).await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused}");
    assert!(refused.to_string().contains("no_such_table"), "{refused}");
    let refused = tx
        .execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (2, 'b')", []))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused}");
    tx.rollback().await.unwrap();

    // A panicking closure: the transaction is unusable, its connection rolled back.
    let mut tx = store.begin().await.unwrap();
    tx.add(&fresh).await.unwrap();
    let e = tx
        .execute(|_| -> rusqlite::Result<()> { panic!("boom") })
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unexpected);
    assert!(tx.commit().await.is_err());
    assert!(store.get(fresh.id).await.unwrap().is_none());

    // A transaction ended inside the closure is reported, not silently reused.
    let mut tx = store.begin().await.unwrap();
    assert!(tx.execute(|c| c.execute_batch("ROLLBACK")).await.is_err());
    drop(tx);

    // The single pooled connection is still healthy.
    store.add(&fresh).await.unwrap();
    let mut tx = store.begin().await.unwrap();
    tx.execute(|c| c.execute("INSERT INTO orders (id, note) VALUES (1, 'a')", []))
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(order_count(&store), 1);
}

#[tokio::test]
async fn sync_add_in_with_the_callers_rusqlite_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    create_orders(&store).await;
    let s = store.clone();
    let (m1, m2, m3) = (msg("a"), msg("b"), msg("c"));
    let (c1, c2, c3) = (m1.clone(), m2.clone(), m3.clone());
    let entry = InboxEntry::new(MessageId::new(), "h");
    let e2 = entry.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = s.open_connection().unwrap();
        // Committed together.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.execute("INSERT INTO orders (id, note) VALUES (1, 'a')", [])
            .unwrap();
        s.add_in(&tx, &c1).unwrap();
        s.add_batch_in(&tx, std::slice::from_ref(&c2)).unwrap();
        assert_eq!(
            s.inbox_insert_in(&tx, &e2).unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(
            s.inbox_insert_in(&tx, &e2).unwrap(),
            InsertOutcome::Duplicate
        );
        tx.commit().unwrap();
        // Rolled back together.
        let tx = conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .unwrap();
        tx.execute("INSERT INTO orders (id, note) VALUES (2, 'b')", [])
            .unwrap();
        s.add_in(&tx, &c3).unwrap();
        let dup = s.add_in(&tx, &c1).unwrap_err();
        assert_eq!(dup.kind(), ErrorKind::AlreadyExists);
        tx.rollback().unwrap();
    })
    .await
    .unwrap();
    assert_eq!(order_count(&store), 1);
    assert!(store.get(m1.id).await.unwrap().is_some());
    assert!(store.get(m2.id).await.unwrap().is_some());
    assert!(store.get(m3.id).await.unwrap().is_none());
    assert!(store.contains(&entry).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transactions_on_one_key_get_sequences_in_commit_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    {
        let conn = store.open_connection().unwrap();
        conn.execute_batch(
            "CREATE TABLE commit_counter (id INTEGER PRIMARY KEY, n INTEGER NOT NULL);
             INSERT INTO commit_counter VALUES (1, 0);",
        )
        .unwrap();
    }
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let m = msg("the-key");
                let mut tx = store.begin().await.unwrap();
                // Half add the message before touching the counter, half after.
                if i % 2 == 0 {
                    tx.add(&m).await.unwrap();
                }
                tokio::task::yield_now().await;
                // Transactions are serialised, so the counter value a transaction sees is
                // its position in commit order.
                let position: i64 = tx
                    .execute(|c| {
                        c.query_row(
                            "UPDATE commit_counter SET n = n + 1 WHERE id = 1 RETURNING n",
                            [],
                            |r| r.get(0),
                        )
                    })
                    .await
                    .unwrap();
                if i % 2 == 1 {
                    tx.add(&m).await.unwrap();
                }
                tx.commit().await.unwrap();
                (position, m.id)
            })
        })
        .collect();
    let mut by_commit = Vec::new();
    for t in tasks {
        by_commit.push(t.await.unwrap());
    }
    by_commit.sort();
    let commit_order: Vec<MessageId> = by_commit.into_iter().map(|(_, id)| id).collect();

    let listed = store
        .list(&ListQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let by_sequence: Vec<MessageId> = listed.iter().map(|m| m.message.id).collect();
    assert_eq!(by_sequence, commit_order);
    assert!(listed.windows(2).all(|w| w[0].sequence < w[1].sequence));
    assert_eq!(pending(&store, Ordering::PerKey).await, commit_order);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_inbox_inserts_of_one_pair_have_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let entry = InboxEntry::new(MessageId::new(), "handler");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let store = store.clone();
            let entry = entry.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    store.insert(&entry).await.unwrap()
                } else {
                    let mut tx = store.begin().await.unwrap();
                    let outcome = tx.inbox_insert(&entry).await.unwrap();
                    tx.commit().await.unwrap();
                    outcome
                }
            })
        })
        .collect();
    let mut inserted = 0;
    for t in tasks {
        if t.await.unwrap() == InsertOutcome::Inserted {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1);
    // Another handler key is independent.
    let other = InboxEntry::new(entry.message_id, "other");
    assert_eq!(store.insert(&other).await.unwrap(), InsertOutcome::Inserted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_race_has_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let lock = store.lock();
            tokio::spawn(async move {
                lock.acquire("shard-0", &format!("relay-{i}"), Duration::from_secs(30))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(lease) = t.await.unwrap() {
            winners.push(lease);
        }
    }
    assert_eq!(winners.len(), 1);
    assert_eq!(winners[0].token, 1);
    let current = store.lock().current("shard-0").await.unwrap().unwrap();
    assert_eq!(current, winners[0]);
}

#[tokio::test]
async fn lease_tokens_grow_across_release_and_takeover() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open_with_clock(&dir).await;
    let lock = store.lock();
    let ttl = Duration::from_secs(10);
    let a = lock.acquire("r", "a", ttl).await.unwrap().unwrap();
    assert!(lock.acquire("r", "b", ttl).await.unwrap().is_none());
    // Acquire by the holder is a renew.
    clock.advance(Duration::from_secs(5));
    let again = lock.acquire("r", "a", ttl).await.unwrap().unwrap();
    assert_eq!(again.token, a.token);
    assert!(again.expires_at > a.expires_at);
    // Renew by a non-holder fails.
    let fake = outbox_core::Lease {
        owner: "b".into(),
        ..a.clone()
    };
    assert_eq!(
        lock.renew(&fake, ttl).await.unwrap_err().kind(),
        ErrorKind::LeaseLost
    );
    assert_eq!(
        lock.release(&fake).await.unwrap_err().kind(),
        ErrorKind::LeaseLost
    );
    // Release, then another owner gets a greater token.
    lock.release(&again).await.unwrap();
    assert!(lock.current("r").await.unwrap().is_none());
    assert_eq!(
        lock.release(&again).await.unwrap_err().kind(),
        ErrorKind::LeaseLost
    );
    let b = lock.acquire("r", "b", ttl).await.unwrap().unwrap();
    assert!(b.token > a.token);
    // Expiry: an expired lease nobody took over can still be renewed...
    clock.advance(Duration::from_secs(11));
    assert!(lock.current("r").await.unwrap().is_none());
    let b = lock.renew(&b, ttl).await.unwrap();
    assert_eq!(lock.current("r").await.unwrap().unwrap(), b);
    // ...but once taken over, the old holder has lost it.
    clock.advance(Duration::from_secs(11));
    let c = lock.acquire("r", "c", ttl).await.unwrap().unwrap();
    assert!(c.token > b.token);
    assert_eq!(
        lock.renew(&b, ttl).await.unwrap_err().kind(),
        ErrorKind::LeaseLost
    );
    // Bad input.
    for (r, o, t) in [("", "x", ttl), ("r", "", ttl), ("r", "x", Duration::ZERO)] {
        assert_eq!(
            lock.acquire(r, o, t).await.unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
    }
}

#[tokio::test]
async fn expired_inbox_entry_can_be_inserted_again() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open_with_clock(&dir).await;
    let entry = InboxEntry::new(MessageId::new(), "h");
    assert_eq!(store.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(
        store.insert(&entry).await.unwrap(),
        InsertOutcome::Duplicate
    );
    assert!(store.contains(&entry).await.unwrap());
    clock.advance(store.retention() - Duration::from_secs(1));
    assert_eq!(
        store.insert(&entry).await.unwrap(),
        InsertOutcome::Duplicate
    );
    assert_eq!(store.purge_expired(100).await.unwrap(), 0);
    clock.advance(Duration::from_secs(1));
    assert!(!store.contains(&entry).await.unwrap());
    // Expired but not purged: counts as absent.
    assert_eq!(store.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(
        store.insert(&entry).await.unwrap(),
        InsertOutcome::Duplicate
    );
    // Purge deletes only expired entries, in bounded batches.
    for _ in 0..3 {
        store
            .insert(&InboxEntry::new(MessageId::new(), "old"))
            .await
            .unwrap();
    }
    clock.advance(store.retention());
    store
        .insert(&InboxEntry::new(MessageId::new(), "fresh"))
        .await
        .unwrap();
    assert_eq!(store.purge_expired(2).await.unwrap(), 2);
    assert_eq!(store.purge_expired(10).await.unwrap(), 2);
    assert_eq!(store.purge_expired(10).await.unwrap(), 0);
    assert_eq!(
        store
            .insert(&InboxEntry::new(MessageId::new(), ""))
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
}

/// A current-thread runtime keeps running other tasks while an SQLite call waits: here an
/// `add` waits for the write lock held by an open transaction (it would block the only
/// runtime thread, and time out, if SQLite ran on it).
#[tokio::test(flavor = "current_thread")]
async fn sqlite_work_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let mut tx = store.begin().await.unwrap(); // holds the write lock
    tx.add(&msg("k")).await.unwrap();

    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let _ = started_tx.send(());
            store.add(&msg("k")).await
        })
    };
    started_rx.await.unwrap();
    // The waiting add is parked on a blocking thread; this thread keeps making progress.
    let ticker = tokio::spawn(async {
        let mut n = 0;
        for _ in 0..1000 {
            tokio::task::yield_now().await;
            n += 1;
        }
        n
    });
    assert_eq!(ticker.await.unwrap(), 1000);
    assert!(!waiter.is_finished(), "the add waits for the write lock");
    tx.commit().await.unwrap();
    waiter.await.unwrap().unwrap();
    assert_eq!(store.stats().await.unwrap().pending, 2);
}

#[tokio::test]
async fn every_field_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir).await;
    let t = chrono::DateTime::parse_from_rfc3339("2024-02-29T23:59:59.123456Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let full = Message::builder("orders.created")
        .key("order-ü-42")
        .payload(vec![0u8, 159, 146, 150, 255])
        .header("tenant", "acme")
        .header("empty", "")
        .content_type("application/octet-stream")
        .message_type(MessageType::Other("audit".into()))
        .correlation_id("corr")
        .reply_to("replies")
        .created_at(t)
        .deliver_after(t + chrono::Duration::microseconds(1))
        .trace(TraceContext {
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            tracestate: Some("rojo=00f067aa0ba902b7".into()),
            baggage: Some("userId=alice".into()),
        })
        .build()
        .unwrap();
    let minimal = Message::builder("t").build().unwrap();
    store
        .add_batch(&[full.clone(), minimal.clone()])
        .await
        .unwrap();
    let got = store.get(full.id).await.unwrap().unwrap();
    assert_eq!(got.message, full);
    assert_eq!(got.status, MessageStatus::Pending);
    assert_eq!(got.attempts, 0);
    assert_eq!(
        got.shard,
        outbox_core::shard_for(full.key.as_deref(), &full.id, 16)
    );
    let got_min = store.get(minimal.id).await.unwrap().unwrap();
    assert_eq!(got_min.message, minimal);
    assert!(got_min.message.payload.is_empty());
    assert!(got_min.sequence > got.sequence);
}

#[tokio::test]
async fn duplicates_and_size_limits_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = connect_and_migrate(config(&dir).with_max_message_size(1000))
        .await
        .unwrap();
    assert_eq!(store.capabilities().max_message_size, Some(1000));
    let m = msg("k");
    store.add(&m).await.unwrap();
    let mut changed = m.clone();
    changed.topic = "other".into();
    let e = store.add(&changed).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert_eq!(store.get(m.id).await.unwrap().unwrap().message, m);

    let fresh = msg("k");
    let e = store
        .add_batch(&[fresh.clone(), m.clone()])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert!(store.get(fresh.id).await.unwrap().is_none());
    let e = store
        .add_batch(&[fresh.clone(), fresh.clone()])
        .await
        .unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::AlreadyExists,
        "duplicate within the batch"
    );
    assert!(store.get(fresh.id).await.unwrap().is_none());

    let big = Message::builder("t")
        .payload(vec![7u8; 1000])
        .build()
        .unwrap();
    let size = big.encoded_size();
    let e = store.add(&big).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge { size, limit: 1000 });
    let e = store
        .add_batch(&[fresh.clone(), big.clone()])
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PayloadTooLarge { size, limit: 1000 });
    assert!(store.get(fresh.id).await.unwrap().is_none());

    let mut invalid = msg("k");
    invalid.topic.clear();
    let e = store.add(&invalid).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
    assert!(e.to_string().contains("topic"), "{e}");
    assert_eq!(store.stats().await.unwrap().pending, 1);
}

#[tokio::test]
async fn per_key_order_waits_for_a_failing_or_parked_head() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open_with_clock(&dir).await;
    let (a1, a2, b1) = (msg("a"), msg("a"), msg("b"));
    let free = Message::builder("t").build().unwrap();
    store
        .add_batch(&[a1.clone(), a2.clone(), b1.clone(), free.clone()])
        .await
        .unwrap();
    assert_eq!(
        pending(&store, Ordering::PerKey).await,
        vec![a1.id, a2.id, b1.id, free.id]
    );

    let retry_at = clock.now() + chrono::Duration::seconds(10);
    let out = store
        .mark_failed(
            a1.id,
            &FailedAttempt {
                error: "broker down".into(),
                next_attempt_at: retry_at,
                max_attempts: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        FailureOutcome::Retrying {
            attempts: 1,
            next_attempt_at: retry_at
        }
    );
    assert_eq!(
        pending(&store, Ordering::PerKey).await,
        vec![b1.id, free.id]
    );
    assert_eq!(
        pending(&store, Ordering::Unordered).await,
        vec![a2.id, b1.id, free.id]
    );
    clock.advance(Duration::from_secs(10));
    assert_eq!(pending(&store, Ordering::PerKey).await.len(), 4);

    let out = store
        .mark_failed(
            a1.id,
            &FailedAttempt {
                error: "still down".into(),
                next_attempt_at: clock.now(),
                max_attempts: 2,
            },
        )
        .await
        .unwrap();
    assert_eq!(out, FailureOutcome::Parked { attempts: 2 });
    let parked = store.get(a1.id).await.unwrap().unwrap();
    assert_eq!(parked.status, MessageStatus::Parked);
    assert_eq!(parked.last_error.as_deref(), Some("still down"));
    assert_eq!(
        pending(&store, Ordering::PerKey).await,
        vec![b1.id, free.id]
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.parked), (3, 1));

    assert_eq!(
        store
            .requeue(&RequeueFilter::Topic("topic".into()))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        pending(&store, Ordering::PerKey).await,
        vec![a1.id, a2.id, b1.id, free.id]
    );
    // Dispatching the head releases the rest; limit and shards are respected.
    store.mark_dispatched(&[a1.id]).await.unwrap();
    store.mark_dispatched(&[a1.id]).await.unwrap();
    let first = store
        .fetch_pending(&PendingQuery {
            shards: all_shards(&store),
            limit: 1,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap();
    assert_eq!(first[0].message.id, a2.id);
    let b_shard = outbox_core::shard_for(Some("b"), &b1.id, 16);
    let only_b = store
        .fetch_pending(&PendingQuery {
            shards: vec![b_shard],
            limit: 10,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap();
    assert!(only_b.iter().any(|m| m.message.id == b1.id));
    assert!(only_b.iter().all(|m| m.shard == b_shard));
    assert_eq!(
        store
            .mark_failed(
                a1.id,
                &FailedAttempt {
                    error: "x".into(),
                    next_attempt_at: clock.now(),
                    max_attempts: 5
                }
            )
            .await
            .unwrap(),
        FailureOutcome::NotPending
    );
    assert_eq!(
        store
            .mark_failed(
                MessageId::new(),
                &FailedAttempt {
                    error: "x".into(),
                    next_attempt_at: clock.now(),
                    max_attempts: 5
                }
            )
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::NotFound
    );
}

#[tokio::test]
async fn delayed_head_holds_back_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open_with_clock(&dir).await;
    let later = clock.now() + chrono::Duration::seconds(60);
    let head = Message::builder("t")
        .key("k")
        .deliver_after(later)
        .build()
        .unwrap();
    let next = msg("k");
    store
        .add_batch(&[head.clone(), next.clone()])
        .await
        .unwrap();
    assert!(pending(&store, Ordering::PerKey).await.is_empty());
    assert_eq!(pending(&store, Ordering::Unordered).await, vec![next.id]);
    clock.advance(Duration::from_secs(60));
    assert_eq!(
        pending(&store, Ordering::PerKey).await,
        vec![head.id, next.id]
    );
}

#[tokio::test]
async fn purge_is_bounded_and_keeps_pending_and_parked() {
    let dir = tempfile::tempdir().unwrap();
    let (store, clock) = open_with_clock(&dir).await;
    let msgs: Vec<Message> = (0..5).map(|i| msg(&format!("k{i}"))).collect();
    store.add_batch(&msgs).await.unwrap();
    let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
    store.mark_dispatched(&ids[..3]).await.unwrap();
    store
        .mark_failed(
            ids[3],
            &FailedAttempt {
                error: "x".into(),
                next_attempt_at: clock.now(),
                max_attempts: 1,
            },
        )
        .await
        .unwrap();
    let day = Duration::from_secs(86_400);
    assert_eq!(store.purge_dispatched(day, 10).await.unwrap(), 0);
    clock.advance(day + Duration::from_secs(1));
    assert_eq!(store.purge_dispatched(day, 2).await.unwrap(), 2);
    assert_eq!(store.purge_dispatched(day, 2).await.unwrap(), 1);
    assert_eq!(store.purge_dispatched(day, 2).await.unwrap(), 0);
    assert!(store.get(ids[0]).await.unwrap().is_none());
    assert_eq!(
        store.get(ids[3]).await.unwrap().unwrap().status,
        MessageStatus::Parked
    );
    assert_eq!(
        store.get(ids[4]).await.unwrap().unwrap().status,
        MessageStatus::Pending
    );
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.parked), (1, 1));
    assert_eq!(
        stats.oldest_pending_age,
        Some((clock.now() - msgs[4].created_at).to_std().unwrap())
    );
}

/// Holding every pooled connection and asking for another fails after the busy timeout with a
/// retryable error instead of hanging.
#[tokio::test]
async fn an_exhausted_pool_fails_with_a_retryable_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = connect_and_migrate(
        config(&dir)
            .with_pool_size(1)
            .with_busy_timeout(Duration::from_millis(200)),
    )
    .await
    .unwrap();
    let tx = store.begin().await.unwrap();
    let e = store.get(MessageId::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(e.to_string().contains("pooled connections"), "{e}");
    tx.rollback().await.unwrap();
    assert!(store.get(MessageId::new()).await.unwrap().is_none());
}
