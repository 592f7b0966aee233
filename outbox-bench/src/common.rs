//! What every scenario shares: the services, the run's unique names, the progress bar,
//! messages, stores and clean-up.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use indicatif::ProgressBar;
use outbox_core::{Error, Message, OutboxStore, Producer, Result};
use outbox_kafka::{KafkaConfig, KafkaProducer};
use outbox_postgres::{PgConfig, PgStore};
use outbox_rabbitmq::{
    ProducerConfig, RabbitMqProducer, Topology, declare_topology, delete_topology,
};

use crate::report::Report;

pub use outbox_harness::Services;

/// The state of one run.
#[derive(Debug)]
pub struct Ctx {
    /// Smoke mode: tiny counts, targets not judged.
    pub quick: bool,
    /// Measured passes per scenario.
    pub passes: u32,
    /// Lower-case unique id of this run; every schema, prefix, queue and topic starts with
    /// `bench_<run_id>`.
    pub run_id: String,
    /// Service addresses.
    pub services: Services,
    /// Progress (hidden unless stderr is a terminal and no JSON is written).
    pub progress: ProgressBar,
    /// The results so far.
    pub report: Report,
    /// Print each phase's start on stderr (`phase` lines), to cut a profile of the run into
    /// the library's and the baselines' windows (`scripts/bench-profile.sh`).
    pub marks: bool,
    /// When the run started.
    pub started: Instant,
    seq: u32,
}

impl Ctx {
    /// A new run.
    pub fn new(quick: bool, passes: u32, progress: ProgressBar) -> Self {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Ctx {
            quick,
            passes,
            // The random tail of a v7 uuid: unique enough, and short enough for identifiers.
            run_id: id[id.len() - 10..].to_owned(),
            services: Services::from_env(),
            progress,
            report: Report::default(),
            marks: false,
            started: Instant::now(),
            seq: 0,
        }
    }

    /// A fresh name for this run: `bench_<run_id>_<what><n>` (lower case, `[a-z0-9_]`).
    pub fn name(&mut self, what: &str) -> String {
        self.seq += 1;
        format!("bench_{}_{what}{}", self.run_id, self.seq)
    }

    /// `full` normally, `quick` in smoke mode.
    pub fn count(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// Pass indices: 0 is the warm-up, 1..=passes are measured.
    pub fn pass_range(&self) -> std::ops::RangeInclusive<u32> {
        0..=self.passes
    }

    /// Show what runs now.
    pub fn status(&self, what: impl Into<String>) {
        self.progress.set_message(what.into());
    }

    /// Mark the start of a phase (`outbox-bench: phase <what> at <s> s` on stderr, with
    /// `marks`); a phase ends where the next one, or the case, does.
    pub fn phase(&self, what: &str) {
        if self.marks {
            eprintln!(
                "outbox-bench: phase {what} at {:.3} s",
                self.started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Values of the measured passes, in order (the warm-up is never recorded).
#[derive(Debug, Default, Clone)]
pub struct Series(pub Vec<f64>);

impl Series {
    /// Record `value` of pass `pass` unless it is the warm-up.
    pub fn record(&mut self, pass: u32, value: f64) {
        if pass > 0 {
            self.0.push(value);
        }
    }
}

/// A payload of `size` bytes (printable, so it reads the same in every store).
pub fn payload(size: usize) -> Bytes {
    Bytes::from(
        (0..size)
            .map(|i| b"abcdefghijklmnopqrstuvwxyz012345"[i % 32])
            .collect::<Vec<u8>>(),
    )
}

/// `n` messages on `topic` with `size`-byte payloads, keys cycling over `keys` distinct
/// values.
pub fn messages(topic: &str, n: usize, keys: usize, size: usize) -> Result<Vec<Message>> {
    messages_with(topic, n, keys, &payload(size))
}

/// `n` messages on `topic` carrying `body`, keys cycling over `keys` distinct values.
pub fn messages_with(topic: &str, n: usize, keys: usize, body: &Bytes) -> Result<Vec<Message>> {
    (0..n)
        .map(|i| {
            Message::builder(topic)
                .key(format!("key-{}", i % keys.max(1)))
                .payload(body.clone())
                .content_type("application/json")
                .build()
        })
        .collect()
}

/// Add `messages` to `store` in batches of `batch` (not timed: fills a backlog).
pub async fn fill(store: &dyn OutboxStore, messages: &[Message], batch: usize) -> Result<()> {
    for chunk in messages.chunks(batch.max(1)) {
        store.add_batch(chunk).await?;
    }
    Ok(())
}

/// Wait until `done()` holds, checking every `every`; `Unavailable` after `timeout`.
pub async fn wait_for(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut done: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if done() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(Error::unavailable(format!(
                "{what}: not done after {timeout:?}"
            )));
        }
        tokio::time::sleep(every).await;
    }
}

/// Messages per second.
pub fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// A migrated PostgreSQL store in a schema of its own.
pub async fn pg_store(ctx: &Ctx, schema: &str, notify: bool) -> Result<PgStore> {
    let store = PgStore::connect(
        &ctx.services.postgres,
        PgConfig::new().with_schema(schema).with_notify(notify),
    )
    .await?;
    store.migrate().await?;
    Ok(store)
}

/// Drop a schema this run created.
pub async fn drop_schema(store: &PgStore, schema: &str) -> Result<()> {
    let sql = format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
    outbox_postgres::sqlx::raw_sql(outbox_postgres::sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .map_err(outbox_postgres::parse_error)?;
    Ok(())
}

/// Run `sql` (this program's own DDL or DML) on `store`'s pool.
pub async fn pg_exec(store: &PgStore, sql: String) -> Result<()> {
    outbox_postgres::sqlx::raw_sql(outbox_postgres::sqlx::AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .map_err(outbox_postgres::parse_error)?;
    Ok(())
}

/// A topic exchange and quorum queue bound with `#`, declared; delete with
/// [`delete_topology`].
pub async fn rabbit_topology(ctx: &mut Ctx) -> Result<Topology> {
    let name = ctx.name("x");
    let topology = Topology::new(name.clone(), format!("{name}_q"));
    declare_topology(&ctx.services.amqp()?, &topology).await?;
    Ok(topology)
}

/// Remove a topology this run declared.
pub async fn drop_topology(ctx: &Ctx, topology: &Topology) -> Result<()> {
    delete_topology(&ctx.services.amqp()?, topology).await
}

/// The library's RabbitMQ producer to `exchange`, its confirm timeout within the relay's
/// default publish timeout.
pub fn rabbit_producer(ctx: &Ctx, exchange: &str) -> Result<Arc<dyn Producer>> {
    let mut config = ProducerConfig::new(ctx.services.amqp()?, exchange);
    config.confirm_timeout = Duration::from_secs(9);
    Ok(Arc::new(RabbitMqProducer::new(config)?))
}

/// The Kafka settings (idempotent, `acks=all` are the library's fixed settings): 8 s of
/// `message.timeout.ms` plus the default 2 s local queue wait stay within the relay's
/// default 10 s publish timeout.
pub fn kafka_config(ctx: &Ctx) -> KafkaConfig {
    KafkaConfig::new(ctx.services.kafka.clone()).set("message.timeout.ms", "8000")
}

/// The library's Kafka producer.
pub fn kafka_producer(ctx: &Ctx) -> Result<Arc<dyn Producer>> {
    Ok(Arc::new(KafkaProducer::new(&kafka_config(ctx))?))
}

/// Create a topic of this run with `partitions` partitions.
pub async fn kafka_topic(ctx: &mut Ctx, partitions: i32) -> Result<String> {
    let topic = ctx.name("t");
    outbox_kafka::create_topics(&kafka_config(ctx), &[(topic.as_str(), partitions)]).await?;
    Ok(topic)
}

/// Delete topics this run created.
pub async fn drop_topics(ctx: &Ctx, topics: &[String]) -> Result<()> {
    use outbox_kafka::rdkafka::admin::{AdminClient, AdminOptions};
    use outbox_kafka::rdkafka::client::DefaultClientContext;
    if topics.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = kafka_config(ctx)
        .to_client_config()
        .create()
        .map_err(|e| outbox_kafka::parse_error(e, "creating a Kafka admin client", None))?;
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    admin
        .delete_topics(&names, &AdminOptions::new())
        .await
        .map_err(|e| outbox_kafka::parse_error(e, "deleting topics", None))?;
    Ok(())
}
