//! Relay: a pre-filled backlog drained by one relay with its default configuration, against
//! (i) the raw publish rate of the same broker and (ii) the raw fetch+mark rate of the same
//! store, in the same pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{CancellationToken, Error, Producer, Relay, RelayConfig, Result};

use crate::backends::{Backend, DynamoBackend, PgBackend, SqliteBackend};
use crate::brokers::{Broker, Kafka, Memory, Rabbit};
use crate::cli::{Case, Word, case_label};
use crate::common::{Ctx, Series, messages, payload, rate, wait_for};
use crate::stats;

const SCENARIO: &str = "relay";

/// Key counts: many (per-key order barely limits concurrency) and few.
pub const KEY_COUNTS: [usize; 2] = [1_000, 10];

/// Run one backend→broker pair.
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    let (backend, mut broker, n): (Box<dyn Backend>, Box<dyn Broker>, usize) = match case {
        [Word::Sqlite, Word::Memory] => (
            Box::new(SqliteBackend::new().await?),
            Box::new(Memory::new()),
            ctx.count(20_000, 300),
        ),
        [Word::Postgres, Word::Rabbitmq] => (
            Box::new(PgBackend::new(ctx, false).await?),
            Box::new(Rabbit::new(ctx).await?),
            ctx.count(5_000, 300),
        ),
        [Word::Postgres, Word::Kafka] => (
            Box::new(PgBackend::new(ctx, false).await?),
            Box::new(Kafka::new(ctx)?),
            ctx.count(5_000, 300),
        ),
        [Word::Dynamodb, Word::Kafka] => (
            Box::new(DynamoBackend::new(ctx).await?),
            Box::new(Kafka::new(ctx)?),
            ctx.count(150, 20),
        ),
        _ => return Err(Error::invalid_input("relay: unknown case")),
    };
    let mut result = Ok(());
    for keys in KEY_COUNTS {
        result = measure(ctx, case, backend.as_ref(), broker.as_mut(), n, keys).await;
        if result.is_err() {
            break;
        }
    }
    let b = broker.cleanup(ctx).await;
    let s = backend.cleanup().await;
    result.and(b).and(s)
}

async fn measure(
    ctx: &mut Ctx,
    case: Case,
    backend: &dyn Backend,
    broker: &mut dyn Broker,
    n: usize,
    keys: usize,
) -> Result<()> {
    let label = format!("{}, {keys} keys", case_label(case));
    let body = payload(1024);
    let (mut lib, mut raw_broker, mut raw_store) =
        (Series::default(), Series::default(), Series::default());
    for pass in ctx.pass_range() {
        // The warm-up pass drains a fifth of the backlog: enough to warm caches and pools.
        let count = if pass == 0 { (n / 5).max(10) } else { n };
        ctx.status(format!("relay {label}: pass {pass}"));
        ctx.phase("setup");
        broker.next_pass(ctx).await?;
        backend.reset().await?;
        let topic = broker.topic();
        backend.fill(&messages(&topic, count, keys, 1024)?).await?;
        ctx.phase(&format!("lib relay {label}"));
        let elapsed = drain_with_relay(ctx, backend, broker.producer(), count).await?;
        lib.record(pass, rate(count, elapsed));

        ctx.phase(&format!("raw-broker relay {label}"));
        let start = Instant::now();
        broker.raw_publish(count, keys, &body).await?;
        raw_broker.record(pass, rate(count, start.elapsed()));

        ctx.phase("setup");
        backend.reset().await?;
        backend.fill(&messages(&topic, count, keys, 1024)?).await?;
        ctx.phase(&format!("raw-store relay {label}"));
        let start = Instant::now();
        let marked = backend.raw_drain().await?;
        let elapsed = start.elapsed();
        ctx.phase("setup");
        if marked != count {
            return Err(Error::unexpected(format!(
                "raw fetch+mark marked {marked} of {count} messages"
            )));
        }
        raw_store.record(pass, rate(count, elapsed));
        ctx.progress.inc(1);
    }
    let floor = stats::pairwise_min(&raw_broker.0, &raw_store.0);
    let ratio = stats::ratios(&lib.0, &floor).unwrap_or_default();
    let r = &mut ctx.report;
    r.add(SCENARIO, &label, "relay", "msg/s", &lib.0);
    r.add(
        SCENARIO,
        &label,
        "(i) raw broker publish",
        "msg/s",
        &raw_broker.0,
    );
    r.add(
        SCENARIO,
        &label,
        "(ii) raw store fetch+mark",
        "msg/s",
        &raw_store.0,
    );
    r.add(SCENARIO, &label, "relay / min(i, ii)", "×", &ratio);
    r.notes.push(format!(
        "relay {label}: backlog {n} messages of 1 KiB per pass (warm-up {})",
        (n / 5).max(10)
    ));
    Ok(())
}

/// Start one relay with the default configuration (its own lease names), and time it until
/// it has published `count` messages.
pub async fn drain_with_relay(
    ctx: &mut Ctx,
    backend: &dyn Backend,
    producer: Arc<dyn Producer>,
    count: usize,
) -> Result<Duration> {
    let config = RelayConfig {
        lock_prefix: ctx.name("lease"),
        ..RelayConfig::default()
    };
    let relay = Relay::new(backend.store(), backend.lock(), producer, config)?;
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let task = relay.spawn(shutdown.clone());
    let waited = wait_for(
        "relay draining the backlog",
        Duration::from_secs(600),
        Duration::from_millis(2),
        || relay.stats().published >= count as u64,
    )
    .await;
    let elapsed = start.elapsed();
    shutdown.cancel();
    let report = task
        .await
        .map_err(|e| Error::unexpected("relay task panicked").with_source(e))??;
    waited?;
    if report.failed > 0 {
        return Err(Error::unexpected(format!(
            "relay: {} publishes failed",
            report.failed
        )));
    }
    Ok(elapsed)
}
