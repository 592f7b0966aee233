//! `outbox demo`: an order service and a billing service on embedded SQLite, connected by the
//! outbox, a relay that crashes mid-run, an in-memory broker that delivers duplicates, and an
//! inbox that suppresses them. At the end the SQLite files are checked: nothing lost, no
//! duplicate effect, per-key order kept.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use outbox_core::memory::{MemoryBroker, MemoryConsumer};
use outbox_core::{
    CancellationToken, Committed, Consumer, DistributedLock, HandlerError, InboxProcessor, Message,
    MessageHandler, OutboxStore, ProcessOutcome, Producer, Relay, RelayConfig, RelayHandle,
    RunReport, Transaction, TransactionalStore, async_trait,
};
use outbox_sqlite::{SqliteStore, SqliteTx, rusqlite};
use tokio::task::JoinHandle;

use crate::store::{self, Durability};
use crate::util::{CliError, CliResult, Context, human_duration, parse_duration};

/// Topic of both order events (one topic, so the broker keeps their per-key order).
const TOPIC: &str = "orders";
/// The billing service's broker subscription.
const SUBSCRIPTION: &str = "billing";
/// Inbox handler key of the billing handler.
const HANDLER_KEY: &str = "billing";
/// The order service's database file.
const ORDERS_DB: &str = "orders.db";
/// The billing service's database file.
const BILLING_DB: &str = "billing.db";

/// Options of `outbox demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Orders to place; each commits an order row and two messages (OrderPlaced,
    /// PaymentRequested) in one transaction.
    #[arg(long, default_value_t = 10_000, value_name = "N",
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub orders: u64,
    /// Concurrent writer tasks placing orders.
    #[arg(long, default_value_t = 4, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub writers: u32,
    /// Directory for orders.db and billing.db (created if missing; must not already hold
    /// them). Default: a fresh temporary directory.
    #[arg(long, value_name = "PATH")]
    pub dir: Option<PathBuf>,
    /// Keep the SQLite files at the end (they are removed otherwise).
    #[arg(long)]
    pub keep: bool,
    /// Kill the relay abruptly once this fraction of the messages was published (0 < F < 1);
    /// a new relay instance takes over when the dead one's leases expire.
    #[arg(long, default_value_t = 0.4, value_name = "FRACTION", value_parser = parse_fraction)]
    pub kill_at: f64,
    /// Make the broker redeliver every Nth handled message once more (0: never).
    #[arg(long, default_value_t = 50, value_name = "N")]
    pub duplicate_every: u64,
    /// SQLite durability of both databases.
    #[arg(long, value_enum, default_value_t = Durability::Normal)]
    pub durability: Durability,
    /// Give up (and fail) if the run has not finished after this long (e.g. 90s, 5m).
    #[arg(long, default_value = "5m", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Duration,
    /// No progress bar or progress lines.
    #[arg(long)]
    pub quiet: bool,
}

fn parse_fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number; expected a fraction such as 0.4"))?;
    if f.is_finite() && f > 0.0 && f < 1.0 {
        Ok(f)
    } else {
        Err(format!(
            "{s} is out of range; expected a fraction strictly between 0 and 1, such as 0.4"
        ))
    }
}

/// Run the demo. `Ok(true)` when every check passed.
pub async fn run(args: DemoArgs) -> CliResult<bool> {
    let workdir = WorkDir::new(args.dir.as_deref(), args.keep)?;
    let result = run_in(&args, workdir.path()).await;
    let note = workdir.finish();
    if let Some(note) = note {
        println!("{note}");
    }
    result
}

async fn run_in(args: &DemoArgs, dir: &Path) -> CliResult<bool> {
    let expected = args.orders * 2;
    let orders_path = dir.join(ORDERS_DB);
    let billing_path = dir.join(BILLING_DB);

    println!(
        "outbox demo: {} ({expected} messages) from {}; relay killed at {:.0}% published; {}",
        plural(args.orders, "order"),
        plural(u64::from(args.writers), "writer"),
        args.kill_at * 100.0,
        match args.duplicate_every {
            0 => "no broker duplicates".to_owned(),
            1 => "the broker duplicates every handled message".to_owned(),
            n => format!("the broker duplicates 1 in {n} handled messages"),
        }
    );
    println!(
        "databases: {} and {}",
        orders_path.display(),
        billing_path.display()
    );
    println!("durability: SQLite {}", args.durability.describe());

    // --- the two services' databases
    let orders = Arc::new(
        store::open(&orders_path, None, args.durability)
            .await
            .context(format_args!("opening {}", orders_path.display()))?,
    );
    create_schema(&orders, ORDERS_SCHEMA)
        .await
        .context("creating the orders table")?;
    let billing = Arc::new(
        store::open(&billing_path, None, args.durability)
            .await
            .context(format_args!("opening {}", billing_path.display()))?,
    );
    create_schema(&billing, BILLING_SCHEMA)
        .await
        .context("creating the billing_events table")?;

    // --- broker, relay, consumer
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUBSCRIPTION, &[TOPIC]);
    let lock: Arc<dyn DistributedLock> = Arc::new(orders.lock());
    let producer: Arc<dyn Producer> = Arc::new(broker.producer());
    let outbox: Arc<dyn OutboxStore> = orders.clone();

    let kill_threshold = ((expected as f64 * args.kill_at).ceil() as u64).clamp(1, expected - 1);
    let crashing = Arc::new(CrashingProducer::new(broker.producer(), kill_threshold));
    let relay1 = Relay::new(
        outbox.clone(),
        lock.clone(),
        crashing.clone(),
        relay_config(1),
    )?;
    let relay1_task = relay1.spawn(CancellationToken::new());
    let current_handle = Arc::new(Mutex::new(relay1.handle()));

    let processor = Arc::new(
        InboxProcessor::new(billing.clone(), HANDLER_KEY, BillingHandler)?.with_max_deliveries(5),
    );
    let counters = Arc::new(ConsumerCounters::default());
    let consumer_stop = CancellationToken::new();
    let started = Instant::now();
    let consumer_task = tokio::spawn(consume(
        processor.clone(),
        consumer,
        broker.clone(),
        args.duplicate_every,
        counters.clone(),
        consumer_stop.clone(),
    ));

    // --- writers
    let next_order = Arc::new(AtomicU64::new(0));
    let mut writers: Vec<JoinHandle<CliResult<()>>> = (0..args.writers)
        .map(|_| {
            tokio::spawn(write_orders(
                orders.clone(),
                current_handle.clone(),
                next_order.clone(),
                args.orders,
            ))
        })
        .collect();

    // --- watch: progress, the crash, the takeover, completion
    let mut progress = Progress::new(expected, args.quiet);
    let mut relay1_task = Some(relay1_task);
    let mut relay2: Option<(
        Relay,
        JoinHandle<outbox_core::Result<RunReport>>,
        CancellationToken,
    )> = None;
    let mut killed: Option<(Instant, u64)> = None;
    let mut took_over: Option<Duration> = None;
    let deadline = started + args.timeout;
    let mut timed_out = false;
    let mut handled_at: Option<Duration> = None;
    let mut writers_done: Option<Duration> = None;

    loop {
        let handled = processor.stats().handled;
        progress.update(handled);

        if let Some(task) = relay1_task.as_ref()
            && killed.is_none()
            && (crashing.tripped() || task.is_finished())
        {
            if let Some(task) = relay1_task.take() {
                task.abort();
                // An aborted task ends with a cancellation error: that is the point.
                let _ = task.await;
            }
            let at = broker.published_count() as u64;
            killed = Some((Instant::now(), at));
            progress.line(format!(
                "[{:>6}] relay 1 killed abruptly in the middle of a batch, after {at} of \
                 {expected} messages were published (its leases are left to expire)",
                human_duration(started.elapsed())
            ));
            let r2 = Relay::new(
                outbox.clone(),
                lock.clone(),
                producer.clone(),
                relay_config(2),
            )?;
            let stop2 = CancellationToken::new();
            let task2 = r2.spawn(stop2.clone());
            *current_handle.lock().unwrap_or_else(|p| p.into_inner()) = r2.handle();
            r2.handle().wake();
            progress.line(format!(
                "[{:>6}] relay 2 started (new instance id {}); it takes over when the leases expire",
                human_duration(started.elapsed()),
                r2.config().instance_id
            ));
            relay2 = Some((r2, task2, stop2));
        }
        if let (Some((killed_at, _)), Some((r2, _, _)), None) = (killed, relay2.as_ref(), took_over)
            && r2.stats().published > 0
        {
            let after = killed_at.elapsed();
            took_over = Some(after);
            progress.line(format!(
                "[{:>6}] relay 2 published its first message, {} after the crash",
                human_duration(started.elapsed()),
                human_duration(after)
            ));
        }

        // A writer that failed ends the run.
        let mut i = 0;
        while i < writers.len() {
            if writers[i].is_finished() {
                let w = writers.swap_remove(i);
                match w.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        progress.finish();
                        shutdown_on_error(
                            relay1_task.take(),
                            relay2.take(),
                            &consumer_stop,
                            &broker,
                        );
                        return Err(e.context("order writer failed"));
                    }
                    Err(e) => {
                        progress.finish();
                        shutdown_on_error(
                            relay1_task.take(),
                            relay2.take(),
                            &consumer_stop,
                            &broker,
                        );
                        return Err(CliError::new(format!("order writer task failed: {e}")));
                    }
                }
            } else {
                i += 1;
            }
        }
        if writers.is_empty() && writers_done.is_none() {
            writers_done = Some(started.elapsed());
            progress.line(format!(
                "[{:>6}] all {} orders committed ({:.0} orders/s)",
                human_duration(started.elapsed()),
                args.orders,
                args.orders as f64 / started.elapsed().as_secs_f64().max(1e-9)
            ));
        }
        if consumer_task.is_finished() {
            progress.finish();
            shutdown_on_error(relay1_task.take(), relay2.take(), &consumer_stop, &broker);
            return match consumer_task.await {
                Ok(Err(e)) => Err(e.context("billing consumer failed")),
                Ok(Ok(())) => Err(CliError::new("billing consumer stopped unexpectedly")),
                Err(e) => Err(CliError::new(format!("billing consumer task failed: {e}"))),
            };
        }

        if handled >= expected {
            handled_at = Some(started.elapsed());
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    progress.update(processor.stats().handled);
    progress.finish();
    if timed_out {
        let stats = outbox.stats().await.ok();
        println!(
            "TIMEOUT after {}: {} of {expected} messages handled; outbox pending {}, parked {}",
            human_duration(args.timeout),
            processor.stats().handled,
            stats.map_or_else(|| "?".to_owned(), |s| s.pending.to_string()),
            stats.map_or_else(|| "?".to_owned(), |s| s.parked.to_string()),
        );
    }

    // --- graceful shutdown: writers done, relay drained and stopped, consumer drained and stopped
    let _ = writers_done;
    for w in writers {
        match tokio::time::timeout(Duration::from_secs(10), w).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => return Err(e.context("order writer failed")),
            Ok(Err(e)) => return Err(CliError::new(format!("order writer task failed: {e}"))),
            Err(_) => return Err(CliError::new("order writers did not finish")),
        }
    }
    // The relay marks a batch dispatched after the broker confirmed all of it: wait for that.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while !timed_out && Instant::now() < drain_until {
        match outbox.stats().await {
            Ok(s) if s.pending == 0 => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    if let Some(task) = relay1_task.take() {
        // Never killed (cannot happen with 0 < kill_at < 1, but stop it cleanly anyway).
        task.abort();
        let _ = task.await;
    }
    let relay2_report = match relay2.take() {
        Some((r2, task, stop)) => {
            stop.cancel();
            match tokio::time::timeout(Duration::from_secs(10), task).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => println!("warning: relay 2 ended with an error: {e}"),
                Ok(Err(e)) => println!("warning: relay 2 task failed: {e}"),
                Err(_) => println!("warning: relay 2 did not stop within 10s"),
            }
            Some(r2.stats())
        }
        None => None,
    };
    // Let the consumer work off the last broker redeliveries (the inbox must see them too),
    // then stop consuming.
    let drain_until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < drain_until
        && (broker.queued(SUBSCRIPTION) > 0 || broker.unacked(SUBSCRIPTION) > 0)
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    consumer_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(10), consumer_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => println!("warning: billing consumer ended with an error: {e}"),
        Ok(Err(e)) => println!("warning: billing consumer task failed: {e}"),
        Err(_) => println!("warning: billing consumer did not stop within 10s"),
    }
    broker.close();

    // --- verification, from the SQLite files
    let outbox_stats = outbox.stats().await.context("reading outbox stats")?;
    let check = verify(&orders, &orders_path, &billing_path).await?;
    let p = processor.stats();
    let elapsed = handled_at.unwrap_or_else(|| started.elapsed());
    let published = broker.published_count() as u64;
    let secs = elapsed.as_secs_f64().max(1e-9);

    let row = |label: &str, value: String, note: &str| {
        if note.is_empty() {
            println!("  {label:<24}{value:>10}");
        } else {
            println!("  {label:<24}{value:>10}   {note}");
        }
    };
    println!();
    println!("summary");
    row(
        "durability",
        args.durability_name().to_owned(),
        "SQLite synchronous mode of both databases",
    );
    row(
        "orders written",
        check.orders.to_string(),
        "rows in orders.db",
    );
    row(
        "messages stored",
        check.stored.to_string(),
        "outbox rows in orders.db, committed with the orders",
    );
    row(
        "published",
        published.to_string(),
        &format!(
            "broker sends, incl. {} republished after the crash",
            published.saturating_sub(check.stored)
        ),
    );
    row(
        "delivered",
        counters.delivered.load(AtomicOrdering::Relaxed).to_string(),
        &format!(
            "to the billing consumer, incl. {} broker redeliveries requested",
            counters.redeliveries.load(AtomicOrdering::Relaxed)
        ),
    );
    row(
        "duplicates suppressed",
        p.duplicates.to_string(),
        "by the inbox (handler key \"billing\")",
    );
    row(
        "handled",
        p.handled.to_string(),
        "billing handler runs committed",
    );
    if p.retried + p.dead_lettered + counters.errors.load(AtomicOrdering::Relaxed) > 0 {
        row(
            "retried / dead-lettered",
            format!("{} / {}", p.retried, p.dead_lettered),
            &format!(
                "{} processing errors (redelivered)",
                counters.errors.load(AtomicOrdering::Relaxed)
            ),
        );
    }
    row(
        "lost",
        check.lost.to_string(),
        "stored message ids with no billing row",
    );
    row(
        "duplicate effects",
        check.duplicate_effects.to_string(),
        "billing rows minus distinct message ids",
    );
    row(
        "order violations",
        check.order_violations.to_string(),
        "orders whose PaymentRequested was handled before their OrderPlaced",
    );
    row(
        "outbox pending",
        outbox_stats.pending.to_string(),
        "at the end",
    );
    row(
        "outbox parked",
        outbox_stats.parked.to_string(),
        "at the end",
    );
    let restart_note = match (killed, took_over) {
        (Some((_, at)), Some(after)) => format!(
            "relay 1 killed at {at} published; relay 2 took over after {}, published {}",
            human_duration(after),
            relay2_report.map_or(0, |r| r.published)
        ),
        (Some((_, at)), None) => {
            format!("relay 1 killed at {at} published; relay 2 found nothing left to publish")
        }
        _ => "the relay was never killed".to_owned(),
    };
    row(
        "relay restarts",
        u64::from(killed.is_some()).to_string(),
        &restart_note,
    );
    row(
        "elapsed",
        human_duration(elapsed),
        "first order written to last message handled",
    );
    row(
        "throughput",
        format!("{:.0}", args.orders as f64 / secs),
        &format!(
            "orders/s  ({:.0} messages/s end to end, including the relay takeover)",
            expected as f64 / secs
        ),
    );

    let mut problems = Vec::new();
    if timed_out {
        problems.push(format!("timed out after {}", human_duration(args.timeout)));
    }
    if check.lost > 0 {
        problems.push(format!("{} message(s) lost", check.lost));
    }
    if check.duplicate_effects > 0 {
        problems.push(format!(
            "{} duplicate effect(s) past the inbox",
            check.duplicate_effects
        ));
    }
    if check.order_violations > 0 {
        problems.push(format!(
            "{} per-key order violation(s)",
            check.order_violations
        ));
    }
    if check.orders != args.orders || check.stored != expected {
        problems.push(format!(
            "expected {} orders and {expected} stored messages, found {} and {}",
            args.orders, check.orders, check.stored
        ));
    }
    println!();
    if problems.is_empty() {
        println!("result: OK: nothing lost, no duplicate effects, per-key order kept");
        Ok(true)
    } else {
        println!("result: FAILED: {}", problems.join("; "));
        Ok(false)
    }
}

impl DemoArgs {
    fn durability_name(&self) -> &'static str {
        match self.durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// `1 order`, `2 orders`.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

fn relay_config(n: u32) -> RelayConfig {
    RelayConfig {
        instance_id: format!("demo-relay-{n}"),
        batch_size: 500,
        max_in_flight: 256,
        poll_interval: Duration::from_millis(100),
        // Short leases so the takeover after the crash is quick.
        lease_ttl: Duration::from_millis(1500),
        publish_timeout: Duration::from_millis(500),
        // Both relays run in this process and read one clock.
        clock_skew_margin: Duration::from_millis(100),
        ..RelayConfig::default()
    }
}

/// Relay 1's producer: forwards to the broker for the first `allowed` sends, then freezes
/// (further sends never complete, like a process that stopped mid-batch) and raises a flag so
/// the demo kills the relay task right there. Messages of that batch that reached the broker
/// were never marked dispatched: the next relay publishes them again.
#[derive(Debug)]
struct CrashingProducer {
    inner: outbox_core::memory::MemoryProducer,
    allowed: AtomicU64,
    tripped: std::sync::atomic::AtomicBool,
}

impl CrashingProducer {
    fn new(inner: outbox_core::memory::MemoryProducer, allowed: u64) -> Self {
        CrashingProducer {
            inner,
            allowed: AtomicU64::new(allowed),
            tripped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn tripped(&self) -> bool {
        self.tripped.load(AtomicOrdering::SeqCst)
    }
}

#[async_trait]
impl Producer for CrashingProducer {
    async fn send(&self, message: &Message) -> outbox_core::Result<()> {
        let go = self
            .allowed
            .fetch_update(AtomicOrdering::SeqCst, AtomicOrdering::SeqCst, |n| {
                n.checked_sub(1)
            })
            .is_ok();
        if go {
            return self.inner.send(message).await;
        }
        self.tripped.store(true, AtomicOrdering::SeqCst);
        std::future::pending().await
    }
}

/// Stop background work after a fatal error (the relay is aborted; its leases expire).
fn shutdown_on_error(
    relay1: Option<JoinHandle<outbox_core::Result<RunReport>>>,
    relay2: Option<(
        Relay,
        JoinHandle<outbox_core::Result<RunReport>>,
        CancellationToken,
    )>,
    consumer_stop: &CancellationToken,
    broker: &MemoryBroker,
) {
    if let Some(t) = relay1 {
        t.abort();
    }
    if let Some((_, t, stop)) = relay2 {
        stop.cancel();
        t.abort();
    }
    consumer_stop.cancel();
    broker.close();
}

// ---------------------------------------------------------------------------------------------
// The order service

const ORDERS_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS orders (
    id           TEXT PRIMARY KEY,
    customer     TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    status       TEXT NOT NULL,
    created_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);";

struct Order {
    id: String,
    customer: String,
    amount_cents: i64,
}

impl Order {
    fn number(n: u64) -> Self {
        Order {
            id: format!("order-{n:07}"),
            customer: format!("customer-{:04}", n % 997),
            amount_cents: 100 + ((n * 7_919) % 100_000) as i64,
        }
    }

    fn event(&self, event_type: &str) -> outbox_core::Result<Message> {
        let payload = serde_json::json!({
            "type": event_type,
            "order_id": self.id,
            "customer": self.customer,
            "amount_cents": self.amount_cents,
        });
        Message::builder(TOPIC)
            .key(self.id.clone())
            .header("event-type", event_type)
            .content_type("application/json")
            .payload(payload.to_string().into_bytes())
            .build()
    }
}

/// One order: the order row and its two messages in one transaction.
async fn place_order(store: &SqliteStore, order: &Order) -> outbox_core::Result<Committed> {
    let placed = order.event("OrderPlaced")?;
    let payment = order.event("PaymentRequested")?;
    let mut tx = store.begin().await?;
    let (id, customer, amount) = (order.id.clone(), order.customer.clone(), order.amount_cents);
    tx.execute(move |conn| {
        conn.execute(
            "INSERT INTO orders (id, customer, amount_cents, status) VALUES (?1, ?2, ?3, 'placed')",
            rusqlite::params![id, customer, amount],
        )
    })
    .await?;
    tx.add(&placed).await?;
    tx.add(&payment).await?;
    tx.commit().await
}

async fn write_orders(
    store: Arc<SqliteStore>,
    relay: Arc<Mutex<RelayHandle>>,
    next: Arc<AtomicU64>,
    total: u64,
) -> CliResult<()> {
    loop {
        let n = next.fetch_add(1, AtomicOrdering::Relaxed);
        if n >= total {
            return Ok(());
        }
        let order = Order::number(n);
        let mut attempt = 0u32;
        let committed = loop {
            match place_order(&store, &order).await {
                Ok(c) => break c,
                Err(e) if e.is_retryable() && attempt < 20 => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(5 * u64::from(attempt))).await;
                }
                Err(e) => {
                    return Err(CliError::from(e).context(format_args!("placing {}", order.id)));
                }
            }
        };
        relay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .notify(&committed);
    }
}

// ---------------------------------------------------------------------------------------------
// The billing service

const BILLING_SCHEMA: &str = "
-- Deliberately no unique constraint on message_id: a duplicate effect that got past the inbox
-- must show up as an extra row, not as a failed insert.
CREATE TABLE IF NOT EXISTS billing_events (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id   TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    event_type   TEXT NOT NULL,
    amount_cents INTEGER NOT NULL,
    handled_at   TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX IF NOT EXISTS billing_events_message_id ON billing_events (message_id);
CREATE INDEX IF NOT EXISTS billing_events_order_id ON billing_events (order_id, event_type);";

/// Records one billing row per order event, in the inbox transaction.
struct BillingHandler;

#[async_trait]
impl MessageHandler<SqliteTx> for BillingHandler {
    async fn handle(&self, message: &Message, tx: &mut SqliteTx) -> Result<(), HandlerError> {
        let event: serde_json::Value = serde_json::from_slice(&message.payload)
            .map_err(|e| HandlerError::new(format!("payload is not JSON: {e}")))?;
        let text = |field: &str| {
            event[field]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| HandlerError::new(format!("payload has no string field {field:?}")))
        };
        let event_type = text("type")?;
        let order_id = text("order_id")?;
        let amount = event["amount_cents"]
            .as_i64()
            .ok_or_else(|| HandlerError::new("payload has no integer field \"amount_cents\""))?;
        let message_id = message.id.to_string();
        tx.execute(move |conn| {
            conn.execute(
                "INSERT INTO billing_events (message_id, order_id, event_type, amount_cents) \
                 VALUES (?1, ?2, ?3, ?4)",
                rusqlite::params![message_id, order_id, event_type, amount],
            )
        })
        .await?;
        Ok(())
    }
}

#[derive(Debug, Default)]
struct ConsumerCounters {
    delivered: AtomicU64,
    redeliveries: AtomicU64,
    errors: AtomicU64,
}

/// Receive and process deliveries; ask the broker for a duplicate of every Nth handled one.
async fn consume(
    processor: Arc<InboxProcessor<SqliteStore, BillingHandler>>,
    consumer: MemoryConsumer,
    broker: MemoryBroker,
    duplicate_every: u64,
    counters: Arc<ConsumerCounters>,
    stop: CancellationToken,
) -> CliResult<()> {
    let mut handled = 0u64;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            d = consumer.receive() => d.context("receiving from the broker")?,
        };
        let Some(delivery) = next else {
            return Ok(());
        };
        counters.delivered.fetch_add(1, AtomicOrdering::Relaxed);
        match processor.process(&consumer, &delivery).await {
            Ok(ProcessOutcome::Handled) => {
                handled += 1;
                if duplicate_every > 0 && handled.is_multiple_of(duplicate_every) {
                    broker
                        .redeliver(SUBSCRIPTION, delivery.message.id)
                        .context("asking the broker for a redelivery")?;
                    counters.redeliveries.fetch_add(1, AtomicOrdering::Relaxed);
                }
            }
            Ok(_) => {}
            Err(e) => {
                counters.errors.fetch_add(1, AtomicOrdering::Relaxed);
                tracing::warn!(message_id = %delivery.message.id, error = %e,
                    "billing: delivery not processed; it will be redelivered");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Schema and verification

async fn create_schema(store: &SqliteStore, sql: &'static str) -> outbox_core::Result<()> {
    let mut tx = store.begin().await?;
    tx.execute(move |conn| conn.execute_batch(sql)).await?;
    tx.commit().await?;
    Ok(())
}

struct Check {
    orders: u64,
    stored: u64,
    lost: u64,
    duplicate_effects: u64,
    order_violations: u64,
}

/// Count, from the files themselves, what was stored, lost, duplicated and reordered.
async fn verify(
    orders_store: &SqliteStore,
    orders_path: &Path,
    billing_path: &Path,
) -> CliResult<Check> {
    // The backend keeps ids as hyphenated UUID text, like billing_events.message_id.
    let outbox_table = format!("{}messages", orders_store.config().table_prefix());
    let orders_path = orders_path.to_owned();
    let billing_path = billing_path.to_owned();
    tokio::task::spawn_blocking(move || check_files(&orders_path, &billing_path, &outbox_table))
        .await
        .map_err(|e| CliError::new(format!("verification task failed: {e}")))?
        .context("verifying the databases")
}

/// The checks of [`verify`], on the two files (blocking).
fn check_files(orders_path: &Path, billing_path: &Path, outbox_table: &str) -> CliResult<Check> {
    let conn = rusqlite::Connection::open(billing_path)
        .context(format_args!("opening {}", billing_path.display()))?;
    conn.execute(
        "ATTACH DATABASE ?1 AS o",
        [orders_path.to_string_lossy().as_ref()],
    )
    .context(format_args!("attaching {}", orders_path.display()))?;
    let count = |sql: &str| -> CliResult<u64> {
        let n: i64 = conn.query_row(sql, [], |r| r.get(0))?;
        Ok(u64::try_from(n).unwrap_or(0))
    };
    let orders = count("SELECT COUNT(*) FROM o.orders")?;
    let stored = count(&format!("SELECT COUNT(*) FROM o.{outbox_table}"))?;
    let lost = count(&format!(
        "SELECT COUNT(*) FROM o.{outbox_table} m WHERE NOT EXISTS \
         (SELECT 1 FROM billing_events b WHERE b.message_id = m.id)"
    ))?;
    let rows = count("SELECT COUNT(*) FROM billing_events")?;
    let distinct = count("SELECT COUNT(DISTINCT message_id) FROM billing_events")?;
    // Handling order is the billing row order (seq): every PaymentRequested needs an earlier
    // OrderPlaced of the same order.
    let order_violations = count(
        "SELECT COUNT(*) FROM billing_events p WHERE p.event_type = 'PaymentRequested' \
         AND NOT EXISTS (SELECT 1 FROM billing_events o2 WHERE o2.order_id = p.order_id \
         AND o2.event_type = 'OrderPlaced' AND o2.seq < p.seq)",
    )?;
    Ok(Check {
        orders,
        stored,
        lost,
        duplicate_effects: rows.saturating_sub(distinct),
        order_violations,
    })
}

// ---------------------------------------------------------------------------------------------
// Output

/// A progress bar on a terminal, a few plain lines otherwise, nothing with `--quiet`.
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    total: u64,
    next_plain: u64,
    started: Instant,
}

impl Progress {
    fn new(total: u64, quiet: bool) -> Self {
        let terminal = std::io::stdout().is_terminal();
        let bar = (!quiet && terminal).then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {human_pos}/{human_len} messages handled  \
                 {rate}  eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .with_key(
                "rate",
                |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.0}/s", state.per_sec());
                },
            )
            .progress_chars("=> ");
            bar.set_style(style);
            bar
        });
        Progress {
            bar,
            plain: !quiet && !terminal,
            total,
            next_plain: total.div_ceil(4),
            started: Instant::now(),
        }
    }

    fn update(&mut self, handled: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(handled.min(self.total));
        }
        if self.plain && handled >= self.next_plain && self.next_plain <= self.total {
            let rate = handled as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
            println!(
                "[{:>6}] progress: {handled}/{} messages handled ({rate:.0}/s)",
                human_duration(self.started.elapsed()),
                self.total
            );
            while self.next_plain <= handled {
                self.next_plain += self.total.div_ceil(4).max(1);
            }
        }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => println!("{text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Where the databases live, and cleaning them up.
struct WorkDir {
    path: PathBuf,
    temp: Option<tempfile::TempDir>,
    keep: bool,
}

impl WorkDir {
    fn new(dir: Option<&Path>, keep: bool) -> CliResult<Self> {
        match dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .context(format_args!("creating directory {}", dir.display()))?;
                for name in [ORDERS_DB, BILLING_DB] {
                    let f = dir.join(name);
                    if f.exists() {
                        return Err(CliError::new(format!(
                            "{} already exists; the demo needs fresh databases: pass another \
                             --dir or delete it",
                            f.display()
                        )));
                    }
                }
                Ok(WorkDir {
                    path: dir.to_owned(),
                    temp: None,
                    keep,
                })
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("outbox-demo-")
                    .tempdir()
                    .context("creating a temporary directory")?;
                Ok(WorkDir {
                    path: temp.path().to_owned(),
                    temp: Some(temp),
                    keep,
                })
            }
        }
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Remove the databases unless asked to keep them; returns a note for the user.
    fn finish(self) -> Option<String> {
        if self.keep {
            if let Some(temp) = self.temp {
                let _ = temp.keep();
            }
            return Some(format!("databases kept in {}", self.path.display()));
        }
        match self.temp {
            Some(temp) => temp
                .close()
                .err()
                .map(|e| format!("warning: could not remove {}: {e}", self.path.display())),
            None => {
                let mut failed = Vec::new();
                for db in [ORDERS_DB, BILLING_DB] {
                    for suffix in ["", "-wal", "-shm", "-journal"] {
                        let f = self.path.join(format!("{db}{suffix}"));
                        if f.exists()
                            && let Err(e) = std::fs::remove_file(&f)
                        {
                            failed.push(format!("{}: {e}", f.display()));
                        }
                    }
                }
                (!failed.is_empty())
                    .then(|| format!("warning: could not remove {}", failed.join(", ")))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fraction_must_be_strictly_between_0_and_1() {
        assert_eq!(parse_fraction("0.4"), Ok(0.4));
        for bad in ["0", "1", "1.5", "-0.1", "NaN", "inf", "banana", ""] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
    }

    /// The checks must see what they count: a lost message, a duplicate effect and an order
    /// violation planted in hand-made files.
    #[test]
    fn checks_detect_loss_duplicates_and_reordering() {
        let dir = tempfile::tempdir().unwrap();
        let (orders_path, billing_path) = (dir.path().join("o.db"), dir.path().join("b.db"));
        let o = rusqlite::Connection::open(&orders_path).unwrap();
        o.execute_batch(ORDERS_SCHEMA).unwrap();
        o.execute_batch(
            "CREATE TABLE x_messages (sequence INTEGER PRIMARY KEY, id TEXT NOT NULL);
             INSERT INTO orders (id, customer, amount_cents, status)
                 VALUES ('order-1', 'c', 1, 'placed'), ('order-2', 'c', 1, 'placed');
             INSERT INTO x_messages (id) VALUES ('m1'), ('m2'), ('m3'), ('m4');",
        )
        .unwrap();
        let b = rusqlite::Connection::open(&billing_path).unwrap();
        b.execute_batch(BILLING_SCHEMA).unwrap();
        let check = || check_files(&orders_path, &billing_path, "x_messages").unwrap();
        b.execute_batch(
            "INSERT INTO billing_events (message_id, order_id, event_type, amount_cents) VALUES
                 ('m1', 'order-1', 'OrderPlaced', 1),
                 ('m2', 'order-1', 'PaymentRequested', 1),
                 ('m3', 'order-2', 'OrderPlaced', 1),
                 ('m4', 'order-2', 'PaymentRequested', 1);",
        )
        .unwrap();
        let c = check();
        assert_eq!(
            (
                c.orders,
                c.stored,
                c.lost,
                c.duplicate_effects,
                c.order_violations
            ),
            (2, 4, 0, 0, 0)
        );

        b.execute_batch(
            "DELETE FROM billing_events WHERE message_id = 'm3';
             INSERT INTO billing_events (message_id, order_id, event_type, amount_cents)
                 VALUES ('m3', 'order-2', 'OrderPlaced', 1), ('m1', 'order-1', 'OrderPlaced', 1);",
        )
        .unwrap();
        let c = check();
        assert_eq!((c.lost, c.duplicate_effects, c.order_violations), (0, 1, 1));

        b.execute_batch("DELETE FROM billing_events WHERE message_id = 'm4';")
            .unwrap();
        let c = check();
        assert_eq!((c.lost, c.duplicate_effects, c.order_violations), (1, 1, 0));
    }

    #[test]
    fn order_events_carry_key_and_json() {
        let o = Order::number(42);
        let m = o.event("OrderPlaced").unwrap();
        assert_eq!(m.key.as_deref(), Some("order-0000042"));
        assert_eq!(m.topic, TOPIC);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["type"], "OrderPlaced");
        assert_eq!(v["order_id"], "order-0000042");
    }
}
