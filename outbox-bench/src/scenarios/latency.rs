//! Latency: a steady rate of single-message commits on PostgreSQL; the time from each
//! commit's return to the broker's confirm of that message, for a relay woken by
//! `RelayHandle::notify`, by PostgreSQL `LISTEN/NOTIFY` only, and by polling only. Baseline:
//! the raw client's publish→confirm of one message at a time, at the same rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outbox_core::{
    CancellationToken, Error, MessageId, Relay, RelayConfig, Result, Transaction,
    TransactionalStore,
};

use crate::backends::PgBackend;
use crate::brokers::{Broker, Kafka, Rabbit};
use crate::cli::{Case, Word, case_label};
use crate::common::{Ctx, Series, messages, payload};
use crate::layers::ConfirmClock;
use crate::stats;

const SCENARIO: &str = "latency";

/// Commits per second.
pub const RATE: u64 = 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Notify,
    Listen,
    Poll,
}

impl Wake {
    fn label(self) -> &'static str {
        match self {
            Wake::Notify => "notify",
            Wake::Listen => "LISTEN/NOTIFY only",
            Wake::Poll => "polling only",
        }
    }
}

/// Run one PostgreSQL→broker pair.
pub async fn run(ctx: &mut Ctx, case: Case) -> Result<()> {
    let mut broker: Box<dyn Broker> = match case {
        [Word::Postgres, Word::Rabbitmq] => Box::new(Rabbit::new(ctx).await?),
        [Word::Postgres, Word::Kafka] => Box::new(Kafka::new(ctx)?),
        _ => return Err(Error::invalid_input("latency: unknown case")),
    };
    let plain = PgBackend::new(ctx, false).await?;
    let notifying = PgBackend::new(ctx, true).await?;
    let result = measure(ctx, case, &plain, &notifying, broker.as_mut()).await;
    let b = broker.cleanup(ctx).await;
    let p = crate::backends::Backend::cleanup(&plain).await;
    let q = crate::backends::Backend::cleanup(&notifying).await;
    result.and(b).and(p).and(q)
}

async fn measure(
    ctx: &mut Ctx,
    case: Case,
    plain: &PgBackend,
    notifying: &PgBackend,
    broker: &mut dyn Broker,
) -> Result<()> {
    let label = case_label(case);
    let n = ctx.count(1_500, 100);
    let wakes = [Wake::Notify, Wake::Listen, Wake::Poll];
    // Per wake-up: p50, p99, max; and the baseline's.
    let mut lib: Vec<[Series; 3]> = vec![Default::default(); wakes.len()];
    let mut raw: [Series; 3] = Default::default();
    for pass in ctx.pass_range() {
        ctx.status(format!("latency {label}: pass {pass}"));
        for (i, wake) in wakes.iter().enumerate() {
            broker.next_pass(ctx).await?;
            let backend = if *wake == Wake::Listen {
                notifying
            } else {
                plain
            };
            let l = relay_latencies(ctx, backend, &*broker, *wake, n).await?;
            record(&mut lib[i], pass, &l)?;
            if i == 0 {
                // The baseline right after the library's run with notify.
                let r = raw_latencies(&*broker, n).await?;
                record(&mut raw, pass, &r)?;
            }
        }
        ctx.progress.inc(1);
    }
    let r = &mut ctx.report;
    for (wake, s) in wakes.iter().zip(&lib) {
        for (q, series) in ["p50", "p99", "max"].iter().zip(s) {
            r.add(
                SCENARIO,
                &label,
                &format!("{}: {q}", wake.label()),
                "ms",
                &series.0,
            );
        }
    }
    for (q, series) in ["p50", "p99", "max"].iter().zip(&raw) {
        r.add(
            SCENARIO,
            &label,
            &format!("raw publish→confirm: {q}"),
            "ms",
            &series.0,
        );
    }
    let ratio = stats::ratios(&lib[0][1].0, &raw[1].0).unwrap_or_default();
    r.add(SCENARIO, &label, "notify p99 / raw p99", "×", &ratio);
    r.notes.push(format!(
        "latency {label}: {n} single-message commits at {RATE}/s per run; latency from the \
         commit's return to the relay's confirmed send"
    ));
    Ok(())
}

fn record(s: &mut [Series; 3], pass: u32, latencies_ms: &[f64]) -> Result<()> {
    let q = |p| {
        stats::quantile(latencies_ms, p).ok_or_else(|| Error::unexpected("no latencies measured"))
    };
    s[0].record(pass, q(0.5)?);
    s[1].record(pass, q(0.99)?);
    s[2].record(pass, q(1.0)?);
    Ok(())
}

type Times = Arc<Mutex<HashMap<MessageId, Instant>>>;

async fn relay_latencies(
    ctx: &mut Ctx,
    backend: &PgBackend,
    broker: &dyn Broker,
    wake: Wake,
    n: usize,
) -> Result<Vec<f64>> {
    let clock = ConfirmClock::new(broker.producer());
    let confirms = clock.confirms();
    let config = RelayConfig {
        lock_prefix: ctx.name("lease"),
        ..RelayConfig::default()
    };
    let store = Arc::new(backend.store.clone());
    let relay = Relay::new(
        store.clone(),
        Arc::new(backend.store.lock()),
        Arc::new(clock),
        config,
    )?;
    let shutdown = CancellationToken::new();
    let task = relay.spawn(shutdown.clone());
    let listener = match wake {
        Wake::Listen => Some(
            backend
                .store
                .listen(relay.handle(), shutdown.clone())
                .await?,
        ),
        _ => None,
    };
    // Let the relay take its leases before the load starts.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let handle = relay.handle();
    let commits: Times = Arc::default();
    let msgs = messages(&broker.topic(), n, 1_000, 1024)?;
    let start = tokio::time::Instant::now();
    let mut writers = tokio::task::JoinSet::new();
    for (i, m) in msgs.into_iter().enumerate() {
        tokio::time::sleep_until(start + Duration::from_micros(i as u64 * 1_000_000 / RATE)).await;
        let (store, handle, commits) = (store.clone(), handle.clone(), commits.clone());
        writers.spawn(async move {
            let mut tx = store.begin().await?;
            tx.add(&m).await?;
            let committed = tx.commit().await?;
            let at = Instant::now();
            if wake == Wake::Notify {
                handle.notify(&committed);
            }
            commits
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(m.id, at);
            Ok::<_, Error>(())
        });
    }
    while let Some(r) = writers.join_next().await {
        r.map_err(|e| Error::unexpected("writer task failed").with_source(e))??;
    }
    let all = crate::common::wait_for(
        "every message confirmed",
        Duration::from_secs(60),
        Duration::from_millis(5),
        || confirms.lock().unwrap_or_else(|p| p.into_inner()).len() >= n,
    )
    .await;
    shutdown.cancel();
    task.await
        .map_err(|e| Error::unexpected("relay task failed").with_source(e))??;
    if let Some(l) = listener {
        let _ = l.await;
    }
    all?;
    let commits = commits.lock().unwrap_or_else(|p| p.into_inner());
    let confirms = confirms.lock().unwrap_or_else(|p| p.into_inner());
    Ok(commits
        .iter()
        .filter_map(|(id, at)| confirms.get(id).map(|c| c.saturating_duration_since(*at)))
        .map(|d| d.as_secs_f64() * 1e3)
        .collect())
}

async fn raw_latencies(broker: &dyn Broker, n: usize) -> Result<Vec<f64>> {
    let body = payload(1024);
    let start = tokio::time::Instant::now();
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        tokio::time::sleep_until(start + Duration::from_micros(i as u64 * 1_000_000 / RATE)).await;
        out.push(broker.raw_publish_one(&body).await?.as_secs_f64() * 1e3);
    }
    Ok(out)
}
