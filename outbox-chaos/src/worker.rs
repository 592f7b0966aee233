//! Scenario 6, consumer crash: `InboxProcessor` runs in child processes (the hidden
//! `inbox-worker` subcommand of this binary) that are SIGKILLed at random moments, often
//! between the business write and the commit, or between the commit and the ack. Every
//! message must have exactly one business row at the end.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::{
    Consumer, Delivery, Error, HandlerError, InboxProcessor, Message, MessageHandler,
    ProcessOutcome, Producer, Result, async_trait,
};
use outbox_postgres::sqlx::{self, AssertSqlSafe, Row as _};
use outbox_postgres::{PgConfig, PgStore, PgTx};
use outbox_rabbitmq::{
    AmqpUrl, ConnectionConfig, ConsumerConfig, ProducerConfig, RabbitMqConsumer, RabbitMqProducer,
    Topology, declare_topology, delete_topology,
};
use uuid::Uuid;

use crate::check::{Sent, effects};
use crate::ctx::Ctx;
use crate::env::{Pair, SEQ_HEADER};
use crate::procs::{signal, tail, wait_exit};
use crate::report::Row;

/// Arguments of the hidden `inbox-worker` subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct WorkerArgs {
    /// PostgreSQL URL.
    #[arg(long)]
    postgres: String,
    /// Schema holding the inbox and the business table.
    #[arg(long)]
    schema: String,
    /// RabbitMQ URL.
    #[arg(long)]
    amqp: String,
    /// Queue to consume.
    #[arg(long)]
    queue: String,
    /// Seed of the handler's and the ack's random delays.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The inbox handler key of the workers.
const HANDLER_KEY: &str = "chaos-effects";
/// The business table (in the run's schema).
const EFFECTS: &str = "chaos_effects";

/// Inserts one business row, then dawdles before returning (the commit follows), so that a
/// kill often lands between the business write and the commit.
struct Effects {
    insert: String,
    rng: Mutex<fastrand::Rng>,
}

impl Effects {
    fn delay(&self, max_ms: u64) -> Duration {
        Duration::from_millis(self.rng.lock().map_or(0, |mut r| r.u64(0..=max_ms)))
    }
}

#[async_trait]
impl MessageHandler<PgTx> for Effects {
    async fn handle(
        &self,
        message: &Message,
        tx: &mut PgTx,
    ) -> std::result::Result<(), HandlerError> {
        sqlx::query(AssertSqlSafe(self.insert.clone()))
            .bind(message.id.as_uuid())
            .execute(tx.conn())
            .await
            .map_err(|e| HandlerError::new(e.to_string()))?;
        tokio::time::sleep(self.delay(8)).await;
        Ok(())
    }
}

/// A consumer whose acks wait a little first, so that a kill often lands between the commit
/// and the ack.
#[derive(Debug)]
struct SlowAck {
    inner: RabbitMqConsumer,
    rng: Mutex<fastrand::Rng>,
}

#[async_trait]
impl Consumer for SlowAck {
    async fn receive(&self) -> Result<Option<Delivery>> {
        self.inner.receive().await
    }

    async fn ack(&self, delivery: &Delivery) -> Result<()> {
        let ms = self.rng.lock().map_or(0, |mut r| r.u64(0..=5));
        tokio::time::sleep(Duration::from_millis(ms)).await;
        self.inner.ack(delivery).await
    }

    async fn nack(&self, delivery: &Delivery) -> Result<()> {
        self.inner.nack(delivery).await
    }

    async fn dead_letter(&self, delivery: &Delivery, reason: &str) -> Result<()> {
        self.inner.dead_letter(delivery, reason).await
    }
}

/// The `inbox-worker` process: consume and process until killed, printing `start <id>` when a
/// delivery arrives and `<outcome> <id>` when it is processed.
pub async fn worker(args: WorkerArgs) -> Result<()> {
    let store = PgStore::connect(&args.postgres, PgConfig::new().with_schema(&args.schema)).await?;
    let connection = ConnectionConfig::new(AmqpUrl::parse(args.amqp.clone())?);
    let consumer = SlowAck {
        inner: RabbitMqConsumer::connect(ConsumerConfig::new(connection, args.queue.clone()))
            .await?,
        rng: Mutex::new(fastrand::Rng::with_seed(args.seed)),
    };
    let handler = Effects {
        insert: format!(
            "INSERT INTO \"{}\".{EFFECTS} (message_id) VALUES ($1)",
            args.schema
        ),
        rng: Mutex::new(fastrand::Rng::with_seed(args.seed ^ 0x5eed)),
    };
    let processor = InboxProcessor::new(Arc::new(store), HANDLER_KEY, handler)?;
    loop {
        let d = match consumer.receive().await {
            Ok(Some(d)) => d,
            Ok(None) => return Ok(()),
            Err(e) if e.is_retryable() => {
                eprintln!("receive failed, retrying: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            Err(e) => return Err(e),
        };
        println!("start {}", d.message.id);
        match processor.process(&consumer, &d).await {
            Ok(ProcessOutcome::Handled) => println!("handled {}", d.message.id),
            Ok(ProcessOutcome::Duplicate) => println!("duplicate {}", d.message.id),
            Ok(other) => println!("{other:?} {}", d.message.id),
            Err(e) => eprintln!("not processed {}: {e}", d.message.id),
        }
    }
}

/// What one worker process printed.
#[derive(Debug, Default)]
struct WorkerLog {
    started: HashSet<String>,
    finished: HashSet<String>,
    duplicates: u64,
}

struct Worker {
    child: Child,
    log: Arc<Mutex<WorkerLog>>,
    reader: std::thread::JoinHandle<()>,
    stderr: std::path::PathBuf,
}

fn spawn_worker(ctx: &Ctx, args: &[String], n: u32) -> Result<Worker> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::config("cannot locate the current executable").with_source(e))?;
    let stderr = ctx.logs.join(format!("inbox-worker-{n}.log"));
    let file = std::fs::File::create(&stderr)
        .map_err(|e| Error::unexpected("creating a worker log").with_source(e))?;
    let mut child = Command::new(exe)
        .arg("inbox-worker")
        .args(args)
        .args(["--seed", &(ctx.seed + u64::from(n)).to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(file))
        .spawn()
        .map_err(|e| Error::unexpected("starting an inbox worker").with_source(e))?;
    let out = child
        .stdout
        .take()
        .ok_or_else(|| Error::unexpected("worker stdout missing"))?;
    let log = Arc::new(Mutex::new(WorkerLog::default()));
    let sink = log.clone();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(out)
            .lines()
            .map_while(std::result::Result::ok)
        {
            let Some((what, id)) = line.split_once(' ') else {
                continue;
            };
            if let Ok(mut g) = sink.lock() {
                match what {
                    "start" => {
                        g.started.insert(id.to_owned());
                    }
                    "duplicate" => {
                        g.duplicates += 1;
                        g.finished.insert(id.to_owned());
                    }
                    _ => {
                        g.finished.insert(id.to_owned());
                    }
                }
            }
        }
    });
    Ok(Worker {
        child,
        log,
        reader,
        stderr,
    })
}

/// Kill `w`; returns (deliveries it had started but not finished, inbox duplicates it saw).
async fn kill_worker(mut w: Worker) -> Result<(u64, u64)> {
    signal(w.child.id(), "KILL")?;
    wait_exit(&mut w.child, Duration::from_secs(10)).await?;
    let _ = w.reader.join();
    let g = w
        .log
        .lock()
        .map_err(|_| Error::unexpected("worker log poisoned"))?;
    Ok((
        g.started.difference(&g.finished).count() as u64,
        g.duplicates,
    ))
}

async fn pg(store: &PgStore, sql: String) -> Result<()> {
    sqlx::raw_sql(AssertSqlSafe(sql))
        .execute(store.pool())
        .await
        .map_err(outbox_postgres::parse_error)?;
    Ok(())
}

async fn effect_rows(store: &PgStore, schema: &str) -> Result<Vec<Uuid>> {
    let rows = sqlx::query(AssertSqlSafe(format!(
        "SELECT message_id FROM \"{schema}\".{EFFECTS}"
    )))
    .fetch_all(store.pool())
    .await
    .map_err(outbox_postgres::parse_error)?;
    rows.iter()
        .map(|r| r.try_get::<Uuid, _>(0))
        .collect::<std::result::Result<_, _>>()
        .map_err(outbox_postgres::parse_error)
}

/// Scenario 6 on `pair` (PostgreSQL inbox, RabbitMQ deliveries).
pub async fn consumer_crash(ctx: &mut Ctx, pair: Pair, name: &str, row: &mut Row) -> Result<()> {
    if pair != Pair::PgRabbitmq {
        return Err(Error::invalid_input("consumer-crash: pg-rabbitmq only"));
    }
    let services = ctx.services.clone();
    let schema = format!("{name}_s");
    let store = PgStore::connect(&services.postgres, PgConfig::new().with_schema(&schema)).await?;
    store.migrate().await?;
    pg(
        &store,
        format!(
            "CREATE TABLE \"{schema}\".{EFFECTS} (message_id uuid NOT NULL, \
             at timestamptz NOT NULL DEFAULT now())"
        ),
    )
    .await?;
    let connection = services.amqp()?;
    let topic = format!("{name}.ok");
    let topology = Topology::new(format!("{name}_x"), format!("{name}_q")).binding_keys([&topic]);
    let result = async {
        declare_topology(&connection, &topology).await?;
        crash_run(ctx, &store, &schema, &connection, &topology, &topic, row).await
    }
    .await;
    let a = delete_topology(&connection, &topology).await;
    let b = pg(
        &store,
        format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
    )
    .await;
    if let Err(e) = a.and(b) {
        row.notes.push(format!("clean-up failed: {e}"));
    }
    result
}

async fn crash_run(
    ctx: &mut Ctx,
    store: &PgStore,
    schema: &str,
    connection: &ConnectionConfig,
    topology: &Topology,
    topic: &str,
    row: &mut Row,
) -> Result<()> {
    let n = ctx.count(3_000, 400);
    let kills = ctx.count(30, 6) as u32;
    let mut rng = fastrand::Rng::with_seed(ctx.seed ^ 0xc0ffee);
    // Deliveries come straight from the library's producer: this scenario is about the
    // consumer side (the relay side is covered by 1, 2 and 5).
    let producer =
        RabbitMqProducer::new(ProducerConfig::new(connection.clone(), &topology.exchange))?;
    let mut sent = Vec::with_capacity(n);
    let mut batch = Vec::new();
    for i in 0..n {
        let (key, seq) = (i % 50, (i / 50) as u64);
        let m = Message::builder(topic)
            .key(format!("k{key}"))
            .header(SEQ_HEADER, seq.to_string())
            .payload(format!("{{\"key\":{key},\"seq\":{seq}}}"))
            .build()?;
        sent.push(Sent {
            id: m.id.as_uuid(),
            key: format!("k{key}"),
            seq,
        });
        batch.push(m);
    }
    for chunk in batch.chunks(200) {
        for r in producer.send_batch(chunk).await {
            r?;
        }
    }
    producer.close().await;
    let args = vec![
        "--postgres".to_owned(),
        ctx.services.postgres.clone(),
        "--schema".to_owned(),
        schema.to_owned(),
        "--amqp".to_owned(),
        ctx.services.rabbitmq.clone(),
        "--queue".to_owned(),
        topology.queue.clone(),
    ];
    let (mut interrupted, mut duplicates, mut started) = (0u64, 0u64, 0u32);
    let mut w = spawn_worker(ctx, &args, started)?;
    while started < kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(250..900))).await;
        if let Ok(Some(status)) = w.child.try_wait() {
            return Err(Error::unexpected(format!(
                "inbox worker exited by itself ({status}): {}",
                tail(&w.stderr, 10)
            )));
        }
        let (i, d) = kill_worker(w).await?;
        interrupted += i;
        duplicates += d;
        started += 1;
        w = spawn_worker(ctx, &args, started)?;
    }
    let end = Instant::now() + Duration::from_secs(120);
    let ids: Vec<Uuid> = sent.iter().map(|s| s.id).collect();
    let drained = loop {
        let rows = effect_rows(store, schema).await?;
        let e = effects(&ids, &rows);
        if e.lost == 0 {
            break Ok(());
        }
        if let Ok(Some(status)) = w.child.try_wait() {
            break Err(Error::unexpected(format!(
                "inbox worker exited by itself ({status}): {}",
                tail(&w.stderr, 10)
            )));
        }
        if Instant::now() > end {
            break Err(Error::unavailable(format!(
                "{} message(s) without effect after 120 s",
                e.lost
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Let redeliveries of the last kill reach the inbox, then stop the last worker.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (i, d) = kill_worker(w).await?;
    interrupted += i;
    duplicates += d;
    let rows = effect_rows(store, schema).await?;
    let e = effects(&ids, &rows);
    row.runs = 1;
    row.messages = n as u64;
    row.received = rows.len() as u64;
    row.kills = kills;
    row.lost = e.lost;
    row.corrupt = e.unknown;
    row.duplicate_effects = Some(e.duplicate_effects);
    row.duplicates = Some(duplicates);
    row.notes.push(format!(
        "{kills} SIGKILLs of the InboxProcessor process; {interrupted} deliveries were in the \
         handler, the commit or the ack when their process died (redelivered by RabbitMQ); \
         {duplicates} redeliveries of already committed messages were suppressed by the inbox \
         (kill between commit and ack); per-key order is not judged here (a crash's requeued \
         deliveries come back out of order)"
    ));
    drained
}
