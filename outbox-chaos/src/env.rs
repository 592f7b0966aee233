//! What a scenario runs against: the services, one store and one broker of a pair (with
//! names unique to the run), the writers that commit messages through the library's
//! transactions, and the consumer that records every receipt.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use outbox_core::{
    CancellationToken, Consumer, DistributedLock, Error, Message, OutboxStats, OutboxStore, Result,
    Transaction, TransactionalStore,
};
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore, local_client};
use outbox_kafka::{ConsumerOptions, KafkaConfig, KafkaConsumer};
use outbox_postgres::{PgConfig, PgStore};
use outbox_rabbitmq::{
    ConnectionConfig, ConsumerConfig, RabbitMqConsumer, Topology, declare_topology, delete_topology,
};
use outbox_sqlite::{SqliteConfig, SqliteStore};
use uuid::Uuid;

use crate::check::{Receipt, Sent};

/// The header carrying a message's per-key sequence.
pub const SEQ_HEADER: &str = "chaos-seq";

/// Kafka topics of this program get this many partitions.
pub const KAFKA_PARTITIONS: i32 = 8;

/// A store → broker pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Pair {
    /// PostgreSQL → RabbitMQ.
    PgRabbitmq,
    /// DynamoDB (moto) → Kafka.
    DynamodbKafka,
    /// SQLite → RabbitMQ.
    SqliteRabbitmq,
}

impl Pair {
    /// Every pair, in the order they run.
    pub const ALL: [Pair; 3] = [Pair::PgRabbitmq, Pair::DynamodbKafka, Pair::SqliteRabbitmq];

    /// Its name on the command line and in the results.
    pub fn name(self) -> &'static str {
        match self {
            Pair::PgRabbitmq => "pg-rabbitmq",
            Pair::DynamodbKafka => "dynamodb-kafka",
            Pair::SqliteRabbitmq => "sqlite-rabbitmq",
        }
    }

    /// Relay timing for this pair: `(lease_ttl, publish_timeout, clock_skew_margin,
    /// poll_interval)` as `outbox relay` flags. moto is slow and shared, so DynamoDB polls
    /// less often and gets longer leases.
    pub fn relay_timing(self) -> [(&'static str, &'static str); 4] {
        match self {
            Pair::DynamodbKafka => [
                ("--lease-ttl", "6s"),
                ("--publish-timeout", "2s"),
                ("--clock-skew-margin", "500ms"),
                ("--poll-interval", "1s"),
            ],
            _ => [
                ("--lease-ttl", "3s"),
                ("--publish-timeout", "1s"),
                ("--clock-skew-margin", "250ms"),
                ("--poll-interval", "100ms"),
            ],
        }
    }

    /// The lease TTL of [`relay_timing`](Self::relay_timing).
    pub fn lease_ttl(self) -> Duration {
        match self {
            Pair::DynamodbKafka => Duration::from_secs(6),
            _ => Duration::from_secs(3),
        }
    }
}

pub use outbox_harness::Services;

/// `url` with `param` appended as a query parameter.
pub fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

/// The store of a run.
#[derive(Debug)]
pub enum Store {
    /// PostgreSQL, in a schema of its own.
    Pg {
        /// The store.
        store: PgStore,
        /// The schema (dropped at clean-up).
        schema: String,
    },
    /// SQLite, a file in a temporary directory.
    Sqlite {
        /// The store.
        store: SqliteStore,
        /// Holds the file.
        _dir: tempfile::TempDir,
    },
    /// DynamoDB on moto, tables under a prefix of their own.
    Dynamo {
        /// The store.
        store: DynamoDbStore,
    },
}

/// Commit `messages` in one transaction of `store`.
async fn commit_one<S: TransactionalStore>(store: &S, messages: &[Message]) -> Result<()> {
    let mut tx = store.begin().await?;
    tx.add_batch(messages).await?;
    tx.commit().await?;
    Ok(())
}

impl Store {
    /// The store as the relay's collaborators see it.
    pub fn outbox(&self) -> Arc<dyn OutboxStore> {
        match self {
            Store::Pg { store, .. } => Arc::new(store.clone()),
            Store::Sqlite { store, .. } => Arc::new(store.clone()),
            Store::Dynamo { store } => Arc::new(store.clone()),
        }
    }

    /// Commit `messages` atomically, through the library's transactional API.
    pub async fn commit(&self, messages: &[Message]) -> Result<()> {
        match self {
            Store::Pg { store, .. } => commit_one(store, messages).await,
            Store::Sqlite { store, .. } => commit_one(store, messages).await,
            Store::Dynamo { store } => commit_one(store, messages).await,
        }
    }

    /// The lease lock the relays share.
    pub fn lock(&self) -> Arc<dyn DistributedLock> {
        match self {
            Store::Pg { store, .. } => Arc::new(store.lock()),
            Store::Sqlite { store, .. } => Arc::new(store.lock()),
            Store::Dynamo { store } => Arc::new(store.lock()),
        }
    }

    /// Pending and parked counts.
    pub async fn stats(&self) -> Result<OutboxStats> {
        self.outbox().stats().await
    }

    async fn cleanup(&self) -> Result<()> {
        match self {
            Store::Pg { store, schema } => {
                let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
                outbox_postgres::sqlx::raw_sql(outbox_postgres::sqlx::AssertSqlSafe(sql))
                    .execute(store.pool())
                    .await
                    .map_err(outbox_postgres::parse_error)?;
                store.pool().close().await;
                Ok(())
            }
            Store::Sqlite { .. } => Ok(()),
            Store::Dynamo { store } => store.delete_tables().await,
        }
    }
}

/// The broker side of a run.
#[derive(Debug)]
pub enum Broker {
    /// A topic exchange and a quorum queue bound to the run's topic only.
    Rabbit {
        /// Connection settings.
        connection: ConnectionConfig,
        /// What was declared.
        topology: Topology,
    },
    /// A topic of the run.
    Kafka {
        /// Client settings.
        config: KafkaConfig,
        /// Topics created (deleted at clean-up).
        topics: Vec<String>,
    },
}

impl Broker {
    async fn cleanup(&self) -> Result<()> {
        match self {
            Broker::Rabbit {
                connection,
                topology,
            } => delete_topology(connection, topology).await,
            Broker::Kafka { config, topics } => {
                // A consumer of a scenario that failed may still be closing (its Recorder was
                // dropped, which only cancels it): librdkafka has crashed (SIGSEGV in its
                // metadata cache) when a subscribed topic was deleted under it.
                tokio::time::sleep(Duration::from_secs(2)).await;
                use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions};
                use outbox_kafka::rdkafka::client::DefaultClientContext;
                let admin: AdminClient<DefaultClientContext> =
                    config.to_client_config().create().map_err(|e| {
                        outbox_kafka::parse_error(e, "creating a Kafka admin client", None)
                    })?;
                let names: Vec<&str> = topics.iter().map(String::as_str).collect();
                admin
                    .delete_topics(&names, &AdminOptions::new())
                    .await
                    .map_err(|e| outbox_kafka::parse_error(e, "deleting topics", None))?;
                Ok(())
            }
        }
    }
}

/// One pair, set up for one scenario run, with names unique to it.
#[derive(Debug)]
pub struct Env {
    /// The pair.
    pub pair: Pair,
    /// Prefix of every name of this run (`chaos_<run>_<n>`, `[a-z0-9_]`).
    pub name: String,
    /// The store the writers commit to.
    pub store: Arc<Store>,
    /// The broker.
    pub broker: Broker,
    /// The topic (RabbitMQ routing key) the writers use.
    pub topic: String,
    /// `--store` for `outbox` processes.
    pub store_url: String,
    /// `--transport` for `outbox` processes.
    pub transport_url: String,
}

impl Env {
    /// Create the store (migrated) and the broker objects of `pair` under `name`.
    pub async fn new(pair: Pair, name: String, services: &Services) -> Result<Env> {
        let topic = match pair {
            Pair::DynamodbKafka => format!("{name}_t"),
            _ => format!("{name}.ok"),
        };
        let (store, store_url) = match pair {
            Pair::PgRabbitmq => {
                let schema = format!("{name}_s");
                let store = PgStore::connect(
                    &services.postgres,
                    PgConfig::new().with_schema(&schema).with_notify(true),
                )
                .await?;
                store.migrate().await?;
                let url = with_param(&services.postgres, &format!("schema={schema}"));
                (Store::Pg { store, schema }, url)
            }
            Pair::SqliteRabbitmq => {
                let dir = tempfile::Builder::new()
                    .prefix("outbox-chaos-")
                    .tempdir()
                    .map_err(|e| Error::unexpected("creating a temp dir").with_source(e))?;
                let path = dir.path().join("outbox.db");
                let store = SqliteStore::connect(SqliteConfig::new(&path)).await?;
                store.migrate().await?;
                let url = format!("sqlite://{}", path.display());
                (Store::Sqlite { store, _dir: dir }, url)
            }
            Pair::DynamodbKafka => {
                let prefix = format!("{name}_");
                let store = DynamoDbStore::new(
                    local_client(&services.dynamodb),
                    DynamoDbConfig::new(&prefix),
                )?;
                store.migrate().await?;
                let url = format!(
                    "dynamodb://?region=us-east-1&endpoint={}&prefix={prefix}",
                    services.dynamodb
                );
                (Store::Dynamo { store }, url)
            }
        };
        let (broker, transport_url) = match pair {
            Pair::DynamodbKafka => {
                let config = services.kafka_config();
                outbox_kafka::create_topics(&config, &[(topic.as_str(), KAFKA_PARTITIONS)]).await?;
                (
                    Broker::Kafka {
                        config,
                        topics: vec![topic.clone()],
                    },
                    format!("kafka://{}", services.kafka),
                )
            }
            _ => {
                let connection = services.amqp()?;
                let topology =
                    Topology::new(format!("{name}_x"), format!("{name}_q")).binding_keys([&topic]);
                declare_topology(&connection, &topology).await?;
                let url = with_param(
                    &services.rabbitmq,
                    &format!("exchange={}", topology.exchange),
                );
                (
                    Broker::Rabbit {
                        connection,
                        topology,
                    },
                    url,
                )
            }
        };
        Ok(Env {
            pair,
            name,
            store: Arc::new(store),
            broker,
            topic,
            store_url,
            transport_url,
        })
    }

    /// A consumer of everything the run publishes (a fresh Kafka group).
    pub async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        Ok(match &self.broker {
            Broker::Rabbit {
                connection,
                topology,
            } => Box::new(
                RabbitMqConsumer::connect(ConsumerConfig::from_topology(
                    connection.clone(),
                    topology,
                ))
                .await?,
            ),
            Broker::Kafka { config, topics } => Box::new(KafkaConsumer::new(
                &config
                    .clone()
                    .set("topic.metadata.refresh.interval.ms", "500")
                    .set("fetch.wait.max.ms", "10"),
                ConsumerOptions::new(format!("{}_g", self.name), topics.clone()),
            )?),
        })
    }

    /// Remove what was created.
    pub async fn cleanup(&self) -> Result<()> {
        let a = self.broker.cleanup().await;
        let b = self.store.cleanup().await;
        a.and(b)
    }
}

/// What the writers commit.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Messages in total.
    pub messages: usize,
    /// Distinct keys (`k0`, `k1`, ...).
    pub keys: usize,
    /// Concurrent writer tasks; each owns the keys `k` with `k % writers == w`, so the
    /// per-key sequence is the commit order.
    pub writers: usize,
    /// Spread the writes over about this long (0: as fast as possible).
    pub duration: Duration,
    /// Topic of every message...
    pub topic: String,
    /// ...except these `(key index, seq)` messages, which go to the given topic instead.
    pub special: Vec<(usize, u64, String)>,
}

/// The message of key `key`, position `seq`.
fn message(topic: &str, key: usize, seq: u64) -> Result<Message> {
    Message::builder(topic)
        .key(format!("k{key}"))
        .header(SEQ_HEADER, seq.to_string())
        .payload(format!("{{\"key\":{key},\"seq\":{seq}}}"))
        .content_type("application/json")
        .build()
}

fn sent_of(m: &Message, seq: u64) -> Sent {
    Sent {
        id: m.id.as_uuid(),
        key: m.key.clone().unwrap_or_default(),
        seq,
    }
}

/// Commit `plan` from `plan.writers` concurrent tasks, 1 to 4 messages per transaction.
/// Returns what was committed, in commit order per writer. A commit that fails with a
/// retryable error is checked (was it written after all?) and retried with the same ids.
pub async fn write(store: Arc<Store>, plan: Plan, seed: u64) -> Result<Vec<Sent>> {
    let writers = plan.writers.clamp(1, plan.keys.max(1));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let plan = plan.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(seed.wrapping_add(w as u64));
            let owned: Vec<usize> = (0..plan.keys).filter(|k| k % writers == w).collect();
            let share = plan.messages / writers + usize::from(w < plan.messages % writers);
            let mut next_seq = vec![0u64; owned.len()];
            let mut sent = Vec::with_capacity(share);
            let start = Instant::now();
            let mut i = 0;
            while i < share {
                let n = rng.usize(1..=4).min(share - i);
                let mut batch = Vec::with_capacity(n);
                let mut seqs = Vec::with_capacity(n);
                for j in i..i + n {
                    let slot = j % owned.len();
                    let (key, seq) = (owned[slot], next_seq[slot]);
                    next_seq[slot] += 1;
                    let topic = plan
                        .special
                        .iter()
                        .find(|(k, s, _)| *k == key && *s == seq)
                        .map_or(plan.topic.as_str(), |(_, _, t)| t.as_str());
                    batch.push(message(topic, key, seq)?);
                    seqs.push(seq);
                }
                commit_retrying(&store, &batch).await?;
                sent.extend(batch.iter().zip(seqs).map(|(m, s)| sent_of(m, s)));
                i += n;
                if !plan.duration.is_zero() {
                    let due = plan.duration.mul_f64(i as f64 / share as f64);
                    if let Some(wait) = due.checked_sub(start.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok::<_, Error>(sent)
        }));
    }
    let mut all = Vec::with_capacity(plan.messages);
    for t in tasks {
        let sent = t
            .await
            .map_err(|e| Error::unexpected("writer task failed").with_source(e))??;
        all.extend(sent);
    }
    Ok(all)
}

/// Commits of the writers that failed with a retryable error (the writers retried them).
pub static COMMIT_ERRORS: AtomicU64 = AtomicU64::new(0);
/// Of those, commits found written after all when looked up (the error came after the commit).
pub static COMMITS_FOUND_WRITTEN: AtomicU64 = AtomicU64::new(0);

/// How many of `batch`'s messages are in the store; `None` when the look-up failed.
async fn written(store: &Store, batch: &[Message]) -> Option<usize> {
    let outbox = store.outbox();
    let mut n = 0;
    for m in batch {
        if outbox.get(m.id).await.ok()?.is_some() {
            n += 1;
        }
    }
    Some(n)
}

async fn commit_retrying(store: &Store, batch: &[Message]) -> Result<()> {
    let mut backoff = Duration::from_millis(50);
    let mut ambiguous = false;
    for _ in 0..20 {
        match store.commit(batch).await {
            Ok(()) => return Ok(()),
            Err(e) if e.is_retryable() => {
                COMMIT_ERRORS.fetch_add(1, AtomicOrdering::Relaxed);
                // All or nothing: every message of the transaction is there, or none is.
                match written(store, batch).await {
                    Some(n) if n == batch.len() => {
                        COMMITS_FOUND_WRITTEN.fetch_add(1, AtomicOrdering::Relaxed);
                        return Ok(());
                    }
                    Some(n) if n > 0 => {
                        return Err(Error::unexpected(format!(
                            "half-written transaction: {n} of its {} messages are in the \
                             store after the commit failed ({e})",
                            batch.len()
                        )));
                    }
                    _ => {}
                }
                eprintln!("  writer: retryable commit error, retrying: {e}");
                ambiguous = true;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            // A retry of a commit whose look-up failed may find its ids taken: by itself.
            Err(e) if ambiguous => {
                return match written(store, batch).await {
                    Some(n) if n == batch.len() => {
                        COMMITS_FOUND_WRITTEN.fetch_add(1, AtomicOrdering::Relaxed);
                        Ok(())
                    }
                    _ => Err(e),
                };
            }
            Err(e) => return Err(e),
        }
    }
    Err(Error::unavailable("writer: a commit kept failing"))
}

/// A receipt with the time it arrived.
#[derive(Debug, Clone)]
pub struct Timed {
    /// The receipt.
    pub receipt: Receipt,
    /// When it arrived.
    pub at: Instant,
    /// Which delivery of the message it was at the broker (1: the first; more: the broker
    /// redelivered it, e.g. after a consumer connection died with it unacked).
    pub attempt: u32,
}

/// Every receipt so far, and the distinct ids among them.
#[derive(Debug, Default)]
pub struct Receipts {
    /// In arrival order.
    pub list: Vec<Timed>,
    /// Distinct ids.
    pub distinct: HashSet<Uuid>,
}

/// The checking consumer: receives, records (id, key, seq) and acks every delivery.
#[derive(Debug)]
pub struct Recorder {
    /// What was received.
    pub receipts: Arc<Mutex<Receipts>>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<()>>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        // A scenario that failed early drops its recorder: stop consuming.
        self.stop.cancel();
    }
}

impl Recorder {
    /// Start consuming with `consumer`.
    pub fn start(consumer: Box<dyn Consumer>) -> Recorder {
        let receipts = Arc::new(Mutex::new(Receipts::default()));
        let stop = CancellationToken::new();
        let (r, s) = (receipts.clone(), stop.clone());
        let task = tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    _ = s.cancelled() => return Ok(()),
                    d = consumer.receive() => d,
                };
                let d = match next {
                    Ok(Some(d)) => d,
                    Ok(None) => return Ok(()),
                    Err(e) if e.is_retryable() => {
                        eprintln!("  consumer: receive failed, retrying: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    Err(e) => {
                        eprintln!("  consumer: receive failed for good, stopping: {e}");
                        return Err(e);
                    }
                };
                let m = &d.message;
                let receipt = Receipt {
                    id: m.id.as_uuid(),
                    key: m.key.clone(),
                    seq: m.headers.get(SEQ_HEADER).and_then(|s| s.parse().ok()),
                };
                if let Ok(mut g) = r.lock() {
                    g.distinct.insert(receipt.id);
                    g.list.push(Timed {
                        receipt,
                        at: Instant::now(),
                        attempt: d.attempt,
                    });
                }
                if let Err(e) = consumer.ack(&d).await {
                    eprintln!("  consumer: ack failed (a redelivery will follow): {e}");
                }
            }
        });
        Recorder {
            receipts,
            stop,
            task,
        }
    }

    /// Distinct ids received so far.
    pub fn distinct(&self) -> usize {
        self.receipts.lock().map_or(0, |g| g.distinct.len())
    }

    /// Deliveries received so far.
    pub fn received(&self) -> usize {
        self.receipts.lock().map_or(0, |g| g.list.len())
    }

    /// Stop and return every receipt.
    pub async fn finish(mut self) -> Result<Vec<Timed>> {
        self.stop.cancel();
        (&mut self.task)
            .await
            .map_err(|e| Error::unexpected("consumer task failed").with_source(e))??;
        let mut g = self
            .receipts
            .lock()
            .map_err(|_| Error::unexpected("receipts lock poisoned"))?;
        Ok(std::mem::take(&mut g.list))
    }
}
