//! PostgreSQL-specific tests against the real server (`OUTBOX_TEST_POSTGRES_URL`): commit
//! order under racing writers with delayed commits, many relays claiming at once, migrations
//! run twice and concurrently, injection attempts, connections killed mid-transaction, the
//! database lease clock, `LISTEN/NOTIFY` wake-up, password redaction and the query plans.
//! Each test uses its own schema, dropped afterwards.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{DropSchema, assert_kind, schema_name, store, url_or_skip};
use outbox_core::memory::MemoryBroker;
use outbox_core::{
    CancellationToken, DistributedLock, ErrorKind, InboxEntry, InboxStore, InsertOutcome,
    ManualClock, Message, MessageId, Ordering, OutboxStore, PendingQuery, Producer, Relay,
    RelayConfig, Result, StoredMessage, Transaction, TransactionalStore, async_trait,
};
use outbox_postgres::{LockClock, PgConfig, PgStore};
use sqlx::{AssertSqlSafe, Connection};

fn multi_thread<F: std::future::Future>(fut: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap()
        .block_on(fut)
}

async fn wait_until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let ok = tokio::time::timeout(Duration::from_secs(30), async {
        while !cond().await {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(ok.is_ok(), "timed out waiting until {what}");
}

fn all_shards(store: &PgStore) -> Vec<u32> {
    (0..store.shard_count()).collect()
}

async fn fetch(store: &PgStore, limit: usize) -> Vec<StoredMessage> {
    store
        .fetch_pending(&PendingQuery {
            shards: all_shards(store),
            limit,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap()
}

fn hot(payload: impl Into<Vec<u8>>) -> Message {
    Message::builder("hot")
        .key("hot-key")
        .payload(payload.into())
        .build()
        .unwrap()
}

async fn backend_pid(conn: &mut sqlx::PgConnection) -> i32 {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Whether backend `pid` is waiting for an advisory lock.
async fn waits_for_advisory_lock(pool: &sqlx::PgPool, pid: i32) -> bool {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE pid = $1 AND locktype = 'advisory' \
         AND NOT granted)",
    )
    .bind(pid)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Watermill issue 311, deterministically: writer A inserts first and commits last. With a
/// sequence drawn at insert time, B's row (higher sequence) would be visible while A's
/// (lower sequence) is not yet: a relay would publish B before A, and a reader tracking the
/// highest sequence seen would skip A for good. Here B's add waits on A's key lock (checked in
/// `pg_locks`) until A commits after a delay, so B is sequenced after A: fetch order equals
/// commit order, and nothing is skipped. Then the same with A rolling back.
#[test]
fn commit_order_second_writer_waits_for_first_commit() {
    multi_thread(async {
        let Some((store, _guard)) = store("commit_order_wait", PgConfig::new()).await else {
            return;
        };
        for a_commits in [true, false] {
            let a_msg = hot("a");
            let b_msg = hot("b");
            let mut a = store.begin().await.unwrap();
            a.add(&a_msg).await.unwrap();

            let (pid_tx, pid_rx) = tokio::sync::oneshot::channel();
            let s = store.clone();
            let b_in = b_msg.clone();
            let b = tokio::spawn(async move {
                let mut b = s.begin().await.unwrap();
                pid_tx.send(backend_pid(b.conn()).await).unwrap();
                b.add(&b_in).await.unwrap();
                b.commit().await.unwrap();
            });
            let b_pid = pid_rx.await.unwrap();
            wait_until("B waits for A's key lock", || {
                waits_for_advisory_lock(store.pool(), b_pid)
            })
            .await;
            assert!(!b.is_finished(), "B must not commit before A ends");
            assert!(fetch(&store, 10).await.is_empty(), "nothing committed yet");

            // Delay A's commit inside the transaction, then end it.
            sqlx::query("SELECT pg_sleep(0.05)")
                .execute(a.conn())
                .await
                .unwrap();
            if a_commits {
                a.commit().await.unwrap();
            } else {
                a.rollback().await.unwrap();
            }
            b.await.unwrap();

            let fetched = fetch(&store, 10).await;
            let ids: Vec<MessageId> = fetched.iter().map(|m| m.message.id).collect();
            if a_commits {
                assert_eq!(ids, vec![a_msg.id, b_msg.id], "commit order A, B");
                assert!(fetched[0].sequence < fetched[1].sequence);
            } else {
                assert_eq!(ids, vec![b_msg.id], "A rolled back; B is not lost");
            }
            store.mark_dispatched(&ids).await.unwrap();
        }
    });
}

/// The hazard is real on this server: without the key lock (a plain identity column, as
/// in Watermill 311), the writer that inserted first can commit last, so sequence order is
/// not commit order and a sequence-cursor reader skips a message.
#[test]
fn naive_identity_sequence_is_not_commit_order() {
    multi_thread(async {
        let Some(url) = url_or_skip("naive_identity_sequence_is_not_commit_order") else {
            return;
        };
        let schema = schema_name("naive");
        let _guard = DropSchema {
            url: url.clone(),
            schema: schema.clone(),
        };
        let t = format!("\"{schema}\".naive");
        let mut setup = sqlx::PgConnection::connect(&url).await.unwrap();
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE SCHEMA \"{schema}\"; CREATE TABLE {t} \
             (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, v text)"
        )))
        .execute(&mut setup)
        .await
        .unwrap();
        let mut a = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut b = sqlx::PgConnection::connect(&url).await.unwrap();
        let mut ta = a.begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {t} (v) VALUES ('a')")))
            .execute(&mut *ta)
            .await
            .unwrap();
        let mut tb = b.begin().await.unwrap();
        sqlx::query(AssertSqlSafe(format!("INSERT INTO {t} (v) VALUES ('b')")))
            .execute(&mut *tb)
            .await
            .unwrap();
        tb.commit().await.unwrap();
        // A cursor reader now sees only b (seq 2) and would advance its cursor past 1.
        let seen: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT seq, v FROM {t} ORDER BY seq"
        )))
        .fetch_all(&mut setup)
        .await
        .unwrap();
        assert_eq!(seen, vec![(2, "b".to_owned())]);
        ta.commit().await.unwrap();
        let after_cursor: Vec<(i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
            "SELECT seq, v FROM {t} WHERE seq > 2 ORDER BY seq"
        )))
        .fetch_all(&mut setup)
        .await
        .unwrap();
        assert!(
            after_cursor.is_empty(),
            "a (seq 1) is never seen past the cursor"
        );
    });
}

/// Many writers race on one key; every transaction sleeps (`pg_sleep`, random 0–10 ms)
/// between its insert and its commit, and records its commit position with a counter row it
/// updates last (the counter's row lock makes that order exactly the commit order). A relay
/// loop drains concurrently while they write. The drained order of the key must equal the
/// commit order, and every message must be drained exactly once.
#[test]
fn commit_order_many_writers_with_delayed_commits() {
    const WRITERS: usize = 12;
    const TXS: usize = 6;
    multi_thread(async {
        let Some((store, _guard)) = store(
            "commit_order_race",
            PgConfig::new().with_pool_size(WRITERS as u32 + 4),
        )
        .await
        else {
            return;
        };
        let schema = store.config().schema().to_owned();
        let counter = format!("\"{schema}\".commit_counter");
        sqlx::raw_sql(AssertSqlSafe(format!(
            "CREATE TABLE {counter} (n bigint NOT NULL); INSERT INTO {counter} VALUES (0)"
        )))
        .execute(store.pool())
        .await
        .unwrap();

        let barrier = Arc::new(tokio::sync::Barrier::new(WRITERS));
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            let barrier = barrier.clone();
            let counter = counter.clone();
            writers.push(tokio::spawn(async move {
                barrier.wait().await;
                // (commit position, ids in add order)
                let mut log: Vec<(i64, Vec<MessageId>)> = Vec::new();
                for t in 0..TXS {
                    let batch: Vec<Message> = (0..1 + (w + t) % 3)
                        .map(|j| hot(format!("{w}/{t}/{j}")))
                        .collect();
                    let unkeyed = Message::builder("cold").build().unwrap();
                    let mut tx = store.begin().await.unwrap();
                    tx.add(&unkeyed).await.unwrap();
                    tx.add_batch(&batch).await.unwrap();
                    let delay = fastrand::u32(0..=10) as f64 / 1000.0;
                    sqlx::query("SELECT pg_sleep($1)")
                        .bind(delay)
                        .execute(tx.conn())
                        .await
                        .unwrap();
                    let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
                        "UPDATE {counter} SET n = n + 1 RETURNING n"
                    )))
                    .fetch_one(tx.conn())
                    .await
                    .unwrap();
                    tx.commit().await.unwrap();
                    log.push((n, batch.iter().map(|m| m.id).collect()));
                }
                log
            }));
        }

        // The relay's side, concurrently: fetch (PerKey), mark dispatched, repeat.
        let done = CancellationToken::new();
        let drainer = {
            let store = store.clone();
            let done = done.clone();
            tokio::spawn(async move {
                let mut drained: Vec<StoredMessage> = Vec::new();
                loop {
                    let finished = done.is_cancelled();
                    let batch = fetch(&store, 7).await;
                    if batch.is_empty() {
                        if finished {
                            return drained;
                        }
                        tokio::task::yield_now().await;
                        continue;
                    }
                    let ids: Vec<MessageId> = batch.iter().map(|m| m.message.id).collect();
                    store.mark_dispatched(&ids).await.unwrap();
                    drained.extend(batch);
                }
            })
        };
        let mut log = Vec::new();
        for w in writers {
            log.extend(w.await.unwrap());
        }
        done.cancel();
        let drained = drainer.await.unwrap();

        log.sort_by_key(|(n, _)| *n);
        let expected: Vec<MessageId> = log.iter().flat_map(|(_, ids)| ids.clone()).collect();
        let hot_drained: Vec<MessageId> = drained
            .iter()
            .filter(|m| m.message.key.is_some())
            .map(|m| m.message.id)
            .collect();
        let total_hot = expected.len();
        assert_eq!(
            hot_drained.len(),
            total_hot,
            "every keyed message drained exactly once"
        );
        assert_eq!(hot_drained, expected, "drain order is commit order");
        let distinct: HashSet<MessageId> = drained.iter().map(|m| m.message.id).collect();
        assert_eq!(distinct.len(), drained.len(), "no message drained twice");
        assert_eq!(drained.len(), total_hot + WRITERS * TXS, "nothing skipped");
        assert_eq!(store.stats().await.unwrap().pending, 0);
    });
}

/// A producer that records overlapping publishes of one message id (two relays at once).
#[derive(Debug)]
struct Watch {
    inner: outbox_core::memory::MemoryProducer,
    in_flight: Mutex<HashSet<MessageId>>,
    overlaps: Mutex<Vec<MessageId>>,
}

#[async_trait]
impl Producer for Watch {
    async fn send(&self, message: &Message) -> Result<()> {
        if !self.in_flight.lock().unwrap().insert(message.id) {
            self.overlaps.lock().unwrap().push(message.id);
        }
        tokio::task::yield_now().await;
        let r = self.inner.send(message).await;
        self.in_flight.lock().unwrap().remove(&message.id);
        r
    }
}

/// Eight relays (database-clock leases, system clock) start together behind a barrier while
/// four writers add messages: every message is published exactly once, never by two relays
/// at once, in per-key order, and the work is split.
#[test]
fn many_relays_claiming_at_once() {
    const RELAYS: usize = 8;
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 150;
    multi_thread(async {
        let Some((store, _guard)) = store("many_relays", PgConfig::new().with_pool_size(24)).await
        else {
            return;
        };
        let broker = MemoryBroker::new();
        let producer = Arc::new(Watch {
            inner: broker.producer(),
            in_flight: Mutex::new(HashSet::new()),
            overlaps: Mutex::new(Vec::new()),
        });
        let shutdown = CancellationToken::new();
        let barrier = Arc::new(tokio::sync::Barrier::new(RELAYS + WRITERS));
        let mut relays = Vec::new();
        let mut running = Vec::new();
        for i in 0..RELAYS {
            let relay = Relay::new(
                Arc::new(store.clone()),
                Arc::new(store.lock()),
                producer.clone(),
                RelayConfig {
                    instance_id: format!("relay-{i}"),
                    batch_size: 20,
                    poll_interval: Duration::from_millis(10),
                    ..RelayConfig::default()
                },
            )
            .unwrap();
            let barrier = barrier.clone();
            let r = relay.clone();
            let token = shutdown.clone();
            running.push(tokio::spawn(async move {
                barrier.wait().await;
                r.run(token).await
            }));
            relays.push(relay);
        }
        let mut writers = Vec::new();
        for w in 0..WRITERS {
            let store = store.clone();
            let barrier = barrier.clone();
            writers.push(tokio::spawn(async move {
                barrier.wait().await;
                let mut added = Vec::new();
                for i in 0..PER_WRITER {
                    let m = Message::builder("t")
                        .key(format!("w{w}-k{}", i % 10))
                        .payload(format!("{w}/{i}"))
                        .build()
                        .unwrap();
                    store.add(&m).await.unwrap();
                    added.push(m);
                }
                added
            }));
        }
        let mut added = Vec::new();
        for w in writers {
            added.extend(w.await.unwrap());
        }
        let total = WRITERS * PER_WRITER;
        wait_until("every message is published", || {
            let n = broker.published_count();
            async move { n >= total }
        })
        .await;
        shutdown.cancel();
        for r in running {
            r.await.unwrap().unwrap();
        }
        let published = broker.published("t");
        let ids: Vec<MessageId> = published.iter().map(|m| m.id).collect();
        let distinct: HashSet<MessageId> = ids.iter().copied().collect();
        assert_eq!(ids.len(), total, "published exactly once each");
        assert_eq!(distinct, added.iter().map(|m| m.id).collect());
        assert!(
            producer.overlaps.lock().unwrap().is_empty(),
            "a message was published by two relays at once"
        );
        let order = |ms: &[Message]| {
            let mut by: BTreeMap<String, Vec<MessageId>> = BTreeMap::new();
            for m in ms {
                by.entry(m.key.clone().unwrap()).or_default().push(m.id);
            }
            by
        };
        assert_eq!(order(&published), order(&added), "per-key order");
        let workers = relays.iter().filter(|r| r.stats().published > 0).count();
        assert!(
            workers > 1,
            "the work was split (only {workers} relay worked)"
        );
        let sum: u64 = relays.iter().map(|r| r.stats().published).sum();
        assert_eq!(sum as usize, total);
        assert_eq!(store.stats().await.unwrap().pending, 0);
    });
}

/// `migrate` twice, then sixteen times concurrently on a fresh schema from separate stores:
/// all succeed, one set of tables, one version row. A newer recorded version and a different
/// shard count are refused.
#[test]
fn migrations_twice_and_concurrently() {
    multi_thread(async {
        let Some(url) = url_or_skip("migrations_twice_and_concurrently") else {
            return;
        };
        let schema = schema_name("migrate");
        let _guard = DropSchema {
            url: url.clone(),
            schema: schema.clone(),
        };
        let config = || PgConfig::new().with_schema(&schema).with_pool_size(2);
        let first = PgStore::connect(&url, config()).await.unwrap();
        assert_eq!(first.schema_version().await.unwrap(), 0);
        assert_kind(
            first.stats().await,
            ErrorKind::ConfigInvalid,
            "stats before migrate",
        );

        let barrier = Arc::new(tokio::sync::Barrier::new(16));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let url = url.clone();
            let barrier = barrier.clone();
            let config = config();
            tasks.push(tokio::spawn(async move {
                let s = PgStore::connect(&url, config).await.unwrap();
                barrier.wait().await;
                s.migrate().await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), outbox_postgres::SCHEMA_VERSION);
        }
        assert_eq!(first.migrate().await.unwrap(), 1);
        assert_eq!(first.migrate().await.unwrap(), 1);
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{schema}\".outbox_schema_version"
        )))
        .fetch_one(first.pool())
        .await
        .unwrap();
        assert_eq!(rows, 1, "one version row");
        first.add(&hot("x")).await.unwrap();
        assert_eq!(first.stats().await.unwrap().pending, 1);

        let other = PgStore::connect(&url, config().with_shard_count(8))
            .await
            .unwrap();
        let e = assert_kind(other.migrate().await, ErrorKind::ConfigInvalid, "shards");
        assert!(e.to_string().contains("shard_count"), "{e}");

        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO \"{schema}\".outbox_schema_version (version) VALUES (99)"
        )))
        .execute(first.pool())
        .await
        .unwrap();
        let e = assert_kind(first.migrate().await, ErrorKind::ConfigInvalid, "newer");
        assert!(e.to_string().contains("99"), "{e}");
        assert_eq!(first.stats().await.unwrap().pending, 1, "data untouched");
    });
}

/// Identifiers that try to inject SQL are refused before anything reaches the server;
/// values that look like SQL are stored verbatim (bind parameters) and break nothing.
#[test]
fn injection_attempts() {
    multi_thread(async {
        for (schema, prefix) in [
            ("x\"; DROP SCHEMA public CASCADE; --", "outbox_"),
            ("public", "o\"; DROP TABLE t; --"),
            ("public", "o'; DROP TABLE t; --"),
            ("Public", "outbox_"),
            ("public", "outbox_ messages"),
            ("public", "outbox_\0"),
            ("pg_catalog", "outbox_"),
            ("public", "ünïcode"),
            ("", "outbox_"),
            ("public", ""),
        ] {
            let config = PgConfig::new()
                .with_schema(schema)
                .with_table_prefix(prefix);
            let e = assert_kind(config.validate(), ErrorKind::ConfigInvalid, schema);
            assert!(
                e.to_string().contains("schema") || e.to_string().contains("table_prefix"),
                "{e}"
            );
            // Refused without connecting (the URL points nowhere).
            let e = assert_kind(
                PgStore::connect("postgres://nobody@127.0.0.1:1/none", config).await,
                ErrorKind::ConfigInvalid,
                prefix,
            );
            assert!(!e.is_retryable());
        }
        let Some((store, _guard)) = store("injection_values", PgConfig::new()).await else {
            return;
        };
        let evil = "x'); DROP TABLE outbox_messages; --\"";
        let m = Message::builder(evil)
            .key(evil)
            .header(evil, evil)
            .correlation_id(evil)
            .reply_to(evil)
            .content_type(evil)
            .build()
            .unwrap();
        store.add(&m).await.unwrap();
        assert_eq!(store.get(m.id).await.unwrap().unwrap().message, m);
        let entry = InboxEntry::new(m.id, evil);
        assert_eq!(store.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
        let lock = store.lock();
        let lease = lock
            .acquire(evil, evil, Duration::from_secs(10))
            .await
            .unwrap()
            .unwrap();
        let current = lock.current(evil).await.unwrap().unwrap();
        assert_eq!(
            (current.resource, current.owner, current.token),
            (lease.resource, lease.owner, lease.token)
        );
        let listed = store
            .list(&outbox_core::ListQuery {
                topic: Some(evil.to_owned()),
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(store.stats().await.unwrap().pending, 1, "tables intact");
    });
}

async fn terminate(pool: &sqlx::PgPool, pid: i32) {
    let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
        .bind(pid)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(killed, "pg_terminate_backend({pid})");
}

/// A transaction whose connection is killed (`pg_terminate_backend`) before commit fails with
/// a retryable error and leaves nothing behind; retrying it commits the message and the
/// business row exactly once. Killing every connection of the pool loses no committed message,
/// and the store keeps working on new connections.
#[test]
fn killed_connection_mid_transaction_loses_nothing() {
    multi_thread(async {
        let Some((store, _guard)) = store("killed_connection", PgConfig::new()).await else {
            return;
        };
        let schema = store.config().schema().to_owned();
        let orders = format!("\"{schema}\".orders");
        sqlx::query(AssertSqlSafe(format!(
            "CREATE TABLE {orders} (id text PRIMARY KEY)"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let committed_before = hot("before");
        store.add(&committed_before).await.unwrap();

        // A separate pool for the killer, so it never kills itself.
        let killer = sqlx::PgPool::connect(&common::url().unwrap())
            .await
            .unwrap();
        let m = hot("order-1");
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut tx = store.begin().await.unwrap();
            sqlx::query(AssertSqlSafe(format!(
                "INSERT INTO {orders} (id) VALUES ('order-1')"
            )))
            .execute(tx.conn())
            .await
            .unwrap();
            tx.add(&m).await.unwrap();
            if attempts == 1 {
                let pid = backend_pid(tx.conn()).await;
                terminate(&killer, pid).await;
                let e = tx
                    .commit()
                    .await
                    .expect_err("commit on a killed connection");
                assert!(e.is_retryable(), "{e}");
                assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
                assert!(store.get(m.id).await.unwrap().is_none(), "nothing written");
                continue;
            }
            tx.commit().await.unwrap();
            break;
        }
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {orders}")))
            .fetch_one(store.pool())
            .await
            .unwrap();
        assert_eq!(n, 1);

        // Kill every connection of the store's pool (idle ones too).
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(store.pool().acquire().await.unwrap());
        }
        for c in &mut conns {
            let pid = backend_pid(c).await;
            terminate(&killer, pid).await;
        }
        drop(conns);
        let fetched: Vec<MessageId> = {
            let mut out = Vec::new();
            for _ in 0..5 {
                match store
                    .fetch_pending(&PendingQuery {
                        shards: all_shards(&store),
                        limit: 10,
                        ordering: Ordering::PerKey,
                    })
                    .await
                {
                    Ok(b) => {
                        out = b.iter().map(|m| m.message.id).collect();
                        break;
                    }
                    Err(e) => assert!(e.is_retryable(), "{e}"),
                }
            }
            out
        };
        assert_eq!(fetched, vec![committed_before.id, m.id], "nothing lost");
    });
}

/// Leases on the database clock: a client whose clock is an hour ahead cannot take over a
/// live lease (with client-clock leases it could), and the expiry it is told is on its own
/// clock. A short lease expires by the server's clock.
#[test]
fn lease_database_clock_ignores_client_skew() {
    multi_thread(async {
        let Some((store, _guard)) = store("lease_db_clock", PgConfig::new()).await else {
            return;
        };
        let url = common::url().unwrap();
        let skewed_clock = ManualClock::at(chrono::Utc::now() + chrono::Duration::hours(1));
        let skewed = PgStore::connect(
            &url,
            store
                .config()
                .clone()
                .with_clock(Arc::new(skewed_clock.clone())),
        )
        .await
        .unwrap();
        let honest = store.lock();
        let lease = honest
            .acquire("shard-1", "honest", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        let now = chrono::Utc::now();
        assert!(lease.expires_at > now && lease.expires_at <= now + chrono::Duration::seconds(60));
        assert_eq!(
            skewed
                .lock()
                .acquire("shard-1", "skewed", Duration::from_secs(60))
                .await
                .unwrap(),
            None,
            "skew must not let a client take a live lease"
        );
        let seen = skewed.lock().current("shard-1").await.unwrap().unwrap();
        assert_eq!(seen.owner, "honest");
        let skewed_now = outbox_core::Clock::now(&skewed_clock);
        assert!(
            seen.expires_at > skewed_now,
            "reported on the caller's clock"
        );

        // With client-clock leases the same skew breaks exclusion: that is why Database is the
        // default.
        let skewed_store_clock = PgStore::connect(
            &url,
            skewed.config().clone().with_lock_clock(LockClock::Store),
        )
        .await
        .unwrap();
        assert!(
            skewed_store_clock
                .lock()
                .acquire("shard-1", "skewed", Duration::from_secs(60))
                .await
                .unwrap()
                .is_some()
        );

        // Expiry by the server's clock, with a greater token.
        let short = honest
            .acquire("shard-2", "a", Duration::from_millis(50))
            .await
            .unwrap()
            .unwrap();
        let taken = Arc::new(Mutex::new(None));
        wait_until("the short lease expires on the server", || {
            let lock = honest.clone();
            let slot = taken.clone();
            async move {
                let r = lock
                    .acquire("shard-2", "b", Duration::from_secs(60))
                    .await
                    .unwrap();
                let done = r.is_some();
                *slot.lock().unwrap() = r;
                done
            }
        })
        .await;
        let taken = taken.lock().unwrap().clone().unwrap();
        assert!(taken.token > short.token);
        assert_kind(
            honest.renew(&short, Duration::from_secs(1)).await,
            ErrorKind::LeaseLost,
            "old holder",
        );
    });
}

/// With `NOTIFY` on, a relay with a one-hour poll interval publishes a message committed by
/// another store (another "process") as soon as `listen` wakes it.
#[test]
fn notify_wakes_relay() {
    multi_thread(async {
        let Some((store, _guard)) = store("notify", PgConfig::new().with_notify(true)).await else {
            return;
        };
        let broker = MemoryBroker::new();
        let relay = Relay::new(
            Arc::new(store.clone()),
            Arc::new(store.lock()),
            Arc::new(broker.producer()),
            RelayConfig {
                poll_interval: Duration::from_secs(3600),
                ..RelayConfig::default()
            },
        )
        .unwrap();
        let shutdown = CancellationToken::new();
        let listener = store
            .listen(relay.handle(), shutdown.clone())
            .await
            .unwrap();
        // Take the shards now (a running relay first waits for its poll interval).
        assert!(!relay.rebalance().await.unwrap().is_empty());
        let running = relay.spawn(shutdown.clone());
        let writer = PgStore::connect(&common::url().unwrap(), store.config().clone())
            .await
            .unwrap();
        let m = hot("wake");
        let mut tx = writer.begin().await.unwrap();
        tx.add(&m).await.unwrap();
        tx.commit().await.unwrap(); // no relay.handle().notify(..): only NOTIFY wakes it
        wait_until("the message is published", || {
            let n = broker.published_count();
            async move { n == 1 }
        })
        .await;
        shutdown.cancel();
        running.await.unwrap().unwrap();
        listener.await.unwrap();
    });
}

/// Passwords never show in `Debug` or in errors.
#[test]
fn passwords_are_redacted() {
    multi_thread(async {
        let secret = "s3cr3t-Passw0rd";
        let bad = format!("postgres://outbox:{secret}@127.0.0.1:1/outbox");
        let e = PgStore::connect(
            &bad,
            PgConfig::new().with_acquire_timeout(Duration::from_secs(2)),
        )
        .await
        .unwrap_err();
        assert!(e.is_retryable(), "{e}");
        assert!(!format!("{e} {e:?}").contains(secret), "{e:?}");
        assert!(format!("{e}").contains("outbox:***@127.0.0.1:1"), "{e}");
        let e = PgStore::connect(
            &format!("postgres://u:{secret}@h:notaport/db"),
            PgConfig::new(),
        )
        .await
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(!format!("{e} {e:?}").contains(secret), "{e:?}");

        let Some(url) = url_or_skip("passwords_are_redacted") else {
            return;
        };
        // Trust authentication accepts any password, so this connects.
        let with_secret = url.replacen("outbox:outbox@", &format!("outbox:{secret}@"), 1);
        let store = PgStore::connect(&with_secret, PgConfig::new())
            .await
            .unwrap();
        for shown in [
            format!("{store:?}"),
            format!("{:?}", store.lock()),
            format!("{:?}", store.config()),
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(format!("{store:?}").contains("***"), "{store:?}");
        let mut tx = store.begin().await.unwrap();
        assert!(!format!("{tx:?}").contains(secret));
        let _ = tx.conn();
        tx.rollback().await.unwrap();
    });
}

/// With enough rows for the planner to care (30,000 dispatched, 1,000 pending over 16 shards,
/// blockers on some keys, 5,000 inbox entries) and fresh statistics, no relay or cleanup query
/// scans the messages or inbox table. Prints the plans (they are in the README).
#[test]
fn relay_queries_use_indexes() {
    multi_thread(async {
        let Some((store, _guard)) = store("explain", PgConfig::new()).await else {
            return;
        };
        let t = store.messages_table().to_owned();
        let schema = store.config().schema().to_owned();
        // Bulk rows through the store's own multi-row insert.
        let mut all = Vec::new();
        for i in 0..31_000 {
            let mut b = Message::builder("bulk").payload(vec![0u8; 64]);
            if i % 3 != 0 {
                b = b.key(format!("k{}", i % 500));
            }
            all.push(b.build().unwrap());
        }
        for chunk in all.chunks(1000) {
            store.add_batch(chunk).await.unwrap();
        }
        let dispatched: Vec<MessageId> = all[..30_000].iter().map(|m| m.id).collect();
        for chunk in dispatched.chunks(5000) {
            store.mark_dispatched(chunk).await.unwrap();
        }
        // Some blockers: backing-off and parked heads.
        for m in all[30_000..30_050].iter() {
            store
                .mark_failed(
                    m.id,
                    &outbox_core::FailedAttempt {
                        error: "down".into(),
                        next_attempt_at: chrono::Utc::now() + chrono::Duration::hours(1),
                        max_attempts: if m.payload.len() % 2 == 0 { 1 } else { 5 },
                    },
                )
                .await
                .unwrap();
        }
        for _ in 0..5 {
            let entries: Vec<InboxEntry> = (0..1000)
                .map(|_| InboxEntry::new(MessageId::new(), "h"))
                .collect();
            for e in &entries {
                store.insert(e).await.unwrap();
            }
        }
        sqlx::raw_sql(AssertSqlSafe(format!(
            "ANALYZE {t}; ANALYZE \"{schema}\".outbox_inbox"
        )))
        .execute(store.pool())
        .await
        .unwrap();
        let plans = store.explain_relay_queries().await.unwrap();
        assert_eq!(plans.len(), 7);
        for p in &plans {
            println!("== {}\n{}\n", p.name, p.plan);
            assert!(
                !p.plan.contains("Seq Scan on outbox_messages")
                    && !p.plan.contains("Seq Scan on outbox_inbox"),
                "{} scans a table:\n{}",
                p.name,
                p.plan
            );
        }
        let by_name: HashMap<&str, &str> = plans
            .iter()
            .map(|p| (p.name.as_str(), p.plan.as_str()))
            .collect();
        assert!(by_name["fetch_pending (PerKey)"].contains("outbox_messages_pending"));
        assert!(by_name["fetch_pending (PerKey)"].contains("outbox_messages_key_blockers"));
        assert!(by_name["fetch_pending (Unordered)"].contains("outbox_messages_pending"));
        assert!(by_name["purge_dispatched"].contains("outbox_messages_dispatched"));
        assert!(by_name["stats"].contains("outbox_messages_pending_created"));
        assert!(by_name["inbox purge_expired"].contains("outbox_inbox_expires"));
    });
}

/// Errors inside a caller's transaction: a duplicate id aborts it and commit is refused with
/// `InvalidInput` naming it; an error in the caller's own SQL (which PostgreSQL would turn into a silent
/// rollback at COMMIT) makes commit fail instead of pretending success. `add_in` works on a
/// plain sqlx transaction.
#[test]
fn caller_transactions_and_errors() {
    multi_thread(async {
        let Some((store, _guard)) = store("caller_tx", PgConfig::new()).await else {
            return;
        };
        let m = hot("m");
        store.add(&m).await.unwrap();

        let mut tx = store.begin().await.unwrap();
        let other = hot("other");
        tx.add(&other).await.unwrap();
        assert_kind(tx.add(&m).await, ErrorKind::AlreadyExists, "duplicate");
        // Aborted: commit is refused with InvalidInput naming the duplicate.
        let e = assert_kind(tx.commit().await, ErrorKind::InvalidInput, "commit");
        assert!(e.to_string().contains(&m.id.to_string()), "{e}");
        assert!(store.get(other.id).await.unwrap().is_none());

        let mut tx = store.begin().await.unwrap();
        tx.add(&other).await.unwrap();
        let _ = sqlx::query("SELECT * FROM no_such_table")
            .execute(tx.conn())
            .await;
        let e = tx.commit().await.expect_err("aborted by the caller's SQL");
        assert!(e.to_string().contains("aborted"), "{e}");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
        assert!(store.get(other.id).await.unwrap().is_none());

        // A plain sqlx transaction with the *_in functions.
        let mut tx = store.pool().begin().await.unwrap();
        store.add_in(&mut tx, &other).await.unwrap();
        let batch = vec![hot("b1"), hot("b2")];
        store.add_batch_in(&mut tx, &batch).await.unwrap();
        assert_eq!(
            store
                .inbox_insert_in(&mut tx, &InboxEntry::new(m.id, "h"))
                .await
                .unwrap(),
            InsertOutcome::Inserted
        );
        assert!(store.get(other.id).await.unwrap().is_none(), "not yet");
        tx.commit().await.unwrap();
        let ids: Vec<MessageId> = fetch(&store, 10)
            .await
            .iter()
            .map(|s| s.message.id)
            .collect();
        assert_eq!(ids, vec![m.id, other.id, batch[0].id, batch[1].id]);
        assert!(store.contains(&InboxEntry::new(m.id, "h")).await.unwrap());

        // Header values and trace fields with NUL: PostgreSQL text cannot hold them.
        let mut bad = hot("nul");
        bad.headers.insert("h".into(), "a\0b".into());
        let e = assert_kind(store.add(&bad).await, ErrorKind::InvalidInput, "NUL header");
        assert!(e.to_string().contains("NUL"), "{e}");
    });
}
