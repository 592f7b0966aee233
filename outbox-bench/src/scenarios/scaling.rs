//! Scaling: 1, 2 and 4 relays on one PostgreSQL outbox, each with its own RabbitMQ producer
//! behind a 5 ms publish latency ([`DelayProducer`]) and a window of [`WINDOW`] messages in
//! flight, so that the relays and not the two cores are the bottleneck: one relay can publish
//! at most `WINDOW / 5 ms` = 800 msg/s. (Without the window a pipelined relay keeps up to
//! `max_in_flight` sends waiting on the delay at once and one relay already saturates the two
//! cores, so more relays could add nothing.) Speedup against one relay, in the same pass.

use std::sync::Arc;
use std::time::{Duration, Instant};

use outbox_core::{CancellationToken, Error, Producer, Relay, RelayConfig, Result};

use crate::backends::{Backend, PgBackend};
use crate::brokers::{Broker, Rabbit};
use crate::cli::{Case, Word, case_label};
use crate::common::{Ctx, Series, messages, rabbit_producer, rate, wait_for};
use crate::layers::DelayProducer;
use crate::stats;

const SCENARIO: &str = "scaling";

/// The publish latency each producer gets.
pub const PUBLISH_DELAY: Duration = Duration::from_millis(5);

/// Messages each relay keeps in flight (its `max_in_flight` and `batch_size`).
pub const WINDOW: usize = 4;

/// Relay counts compared.
pub const RELAYS: [usize; 3] = [1, 2, 4];

/// Run the scaling scenario (PostgreSQL→RabbitMQ).
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    if case != [Word::Postgres, Word::Rabbitmq] {
        return Err(Error::invalid_input("scaling: unknown case"));
    }
    let mut broker = Rabbit::new(ctx).await?;
    let backend = PgBackend::new(ctx, false).await?;
    let result = measure(ctx, case, &backend, &mut broker).await;
    let b = broker.cleanup(ctx).await;
    let s = backend.cleanup().await;
    result.and(b).and(s)
}

async fn measure(
    ctx: &mut Ctx,
    case: Case,
    backend: &PgBackend,
    broker: &mut Rabbit,
) -> Result<()> {
    let label = format!("{}, 5 ms publish latency, 1000 keys", case_label(case));
    let n = ctx.count(3_000, 200);
    let mut series: Vec<Series> = vec![Series::default(); RELAYS.len()];
    for pass in ctx.pass_range() {
        let count = if pass == 0 { (n / 4).max(10) } else { n };
        for (i, relays) in RELAYS.iter().enumerate() {
            ctx.status(format!("scaling: {relays} relay(s), pass {pass}"));
            ctx.phase("setup");
            broker.next_pass(ctx).await?;
            backend.reset().await?;
            ctx.phase(&format!("lib scaling {relays} relays"));
            let elapsed = drain(ctx, backend, &*broker, *relays, count).await?;
            series[i].record(pass, rate(count, elapsed));
        }
        ctx.progress.inc(1);
    }
    let r = &mut ctx.report;
    for (relays, s) in RELAYS.iter().zip(&series) {
        r.add(
            SCENARIO,
            &label,
            &format!("{relays} relay(s)"),
            "msg/s",
            &s.0,
        );
    }
    for (relays, s) in RELAYS.iter().zip(&series).skip(1) {
        let speedup = stats::ratios(&s.0, &series[0].0).unwrap_or_default();
        r.add(
            SCENARIO,
            &label,
            &format!("speedup {relays} vs 1"),
            "×",
            &speedup,
        );
    }
    r.notes.push(format!(
        "scaling: backlog {n} messages per run; each relay has its own producer behind a \
         {} ms delay (once per send, send_batch or send_ordered call) and at most {WINDOW} \
         messages in flight; leases balanced before the clock starts",
        PUBLISH_DELAY.as_millis()
    ));
    Ok(())
}

async fn drain(
    ctx: &mut Ctx,
    backend: &PgBackend,
    broker: &dyn Broker,
    relays: usize,
    count: usize,
) -> Result<Duration> {
    let lock_prefix = ctx.name("lease");
    let mut all = Vec::new();
    for _ in 0..relays {
        let producer: Arc<dyn Producer> = Arc::new(DelayProducer::new(
            rabbit_producer(ctx, &broker_exchange(broker)?)?,
            PUBLISH_DELAY,
        ));
        let config = RelayConfig {
            lock_prefix: lock_prefix.clone(),
            max_in_flight: WINDOW,
            batch_size: WINDOW,
            ..RelayConfig::default()
        };
        all.push(Relay::new(
            backend.store(),
            backend.lock(),
            producer,
            config,
        )?);
    }
    balance(&all, backend.store().shard_count()).await?;
    backend
        .fill(&messages(&broker.topic(), count, 1_000, 1024)?)
        .await?;
    let shutdown = CancellationToken::new();
    let start = Instant::now();
    let tasks: Vec<_> = all.iter().map(|r| r.spawn(shutdown.clone())).collect();
    let waited = wait_for(
        "relays draining the backlog",
        Duration::from_secs(600),
        Duration::from_millis(2),
        || all.iter().map(|r| r.stats().published).sum::<u64>() >= count as u64,
    )
    .await;
    let elapsed = start.elapsed();
    shutdown.cancel();
    for t in tasks {
        t.await
            .map_err(|e| Error::unexpected("relay task failed").with_source(e))??;
    }
    waited?;
    Ok(elapsed)
}

fn broker_exchange(broker: &dyn Broker) -> Result<String> {
    broker
        .exchange()
        .ok_or_else(|| Error::invalid_input("scaling needs an exchange"))
}

/// Rebalance the relays in turn until each holds its fair share of the shards.
async fn balance(relays: &[Relay], shards: u32) -> Result<()> {
    let fair = (shards as usize).div_ceil(relays.len());
    for _ in 0..6 {
        let mut held = Vec::new();
        for r in relays {
            held.push(r.rebalance().await?.len());
        }
        if held.iter().sum::<usize>() == shards as usize && held.iter().all(|h| *h <= fair) {
            return Ok(());
        }
    }
    Err(Error::unexpected("relays did not balance their shards"))
}
