//! Scenarios 3 (broker restart), 4 (database restart) and 8 (clock skew). The services that
//! 3 and 4 restart are private instances of the run (`crate::private`), never the shared ones.

use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::{Duration, Instant};

use outbox_core::{Error, Result};

use crate::ctx::{Ctx, IN_FLIGHT, Scenario, conclude, join_writer, plan, relays, wait_growth};
use crate::env::{COMMIT_ERRORS, COMMITS_FOUND_WRITTEN, Env, Pair, Recorder, write};
use crate::private::{PrivatePg, PrivateRabbit};
use crate::report::Row;

/// How soon after a service is back the consumer must see new messages: the relay's outage
/// back-off is capped at [`OUTAGE_BACKOFF_MAX`] here, the RabbitMQ clients' reconnect
/// back-off at 5 s.
const RESUME_BOUND: Duration = Duration::from_secs(20);
/// `--outage-backoff-max` of the relays of scenarios 3 and 4 (the default is 30 s).
const OUTAGE_BACKOFF_MAX: &str = "2s";

/// Start the private service `scenario` restarts, and point the run's services at it.
///
/// # Errors
/// When the service cannot be started, or is not installed.
pub async fn private_services(
    ctx: &mut Ctx,
    scenario: Scenario,
    pair: Pair,
    row: &mut Row,
) -> Result<()> {
    match (scenario, pair) {
        (Scenario::BrokerRestart, Pair::PgRabbitmq | Pair::SqliteRabbitmq) => {
            let rabbit = PrivateRabbit::start(&ctx.logs).await?.ok_or_else(|| {
                Error::unavailable("broker-restart needs rabbitmq-server (/usr/sbin) installed")
            })?;
            ctx.services.rabbitmq = rabbit.url();
            row.notes.push(format!(
                "RabbitMQ: a private node {} on 127.0.0.1:{}",
                rabbit.node, rabbit.port
            ));
            ctx.rabbit = Some(rabbit);
        }
        (Scenario::DbRestart, Pair::PgRabbitmq) => {
            let pg = PrivatePg::start(&ctx.logs).await?.ok_or_else(|| {
                Error::unavailable(
                    "db-restart needs PostgreSQL's initdb and pg_ctl (/usr/lib/postgresql/15/bin \
                     or OUTBOX_CHAOS_PG_BIN)",
                )
            })?;
            ctx.services.postgres = pg.url();
            row.notes.push(format!(
                "PostgreSQL: a private cluster on 127.0.0.1:{}",
                pg.port
            ));
            ctx.pg = Some(pg);
        }
        _ => {}
    }
    Ok(())
}

fn secs(list: &[Duration]) -> String {
    list.iter()
        .map(|d| format!("{:.1}s", d.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Wait until the consumer receives something new after a service came back. Later than
/// [`RESUME_BOUND`] is a failed check (recorded in `row`, with the store's pending count to
/// tell a stalled relay from a stalled consumer), after which it waits up to 90 s more, so
/// the run still ends with every count. Returns 1 when late.
async fn resume(
    env: &Env,
    rec: &Recorder,
    relays: &mut crate::procs::Relays,
    what: &str,
    row: &mut Row,
) -> Result<u32> {
    let at = rec.received();
    let pending_then = env.store.stats().await.map(|s| s.pending).ok();
    if wait_growth(rec, at, 1, RESUME_BOUND).await {
        return Ok(0);
    }
    let pending = env.store.stats().await.map(|s| s.pending).ok();
    let show = |p: Option<u64>| p.map_or_else(|| "?".to_owned(), |p| p.to_string());
    let grown = wait_growth(rec, at, 1, Duration::from_secs(90)).await;
    relays.check_alive()?;
    row.fail(format!(
        "{what}: nothing received within {RESUME_BOUND:?} ({} then {} pending in the store); \
         {}",
        show(pending_then),
        show(pending),
        if grown {
            "received again later"
        } else {
            "still nothing 90 s later"
        }
    ));
    if grown {
        Ok(1)
    } else {
        Err(Error::unavailable(format!(
            "{what}: publishing did not resume"
        )))
    }
}

/// Stop the relays and return `e` (the scenario failed before its end).
async fn abort(relays: &mut crate::procs::Relays, e: Error) -> Result<()> {
    let _ = relays.terminate_all(Duration::from_secs(10)).await;
    Err(e)
}

/// 3: broker restart. The private node is stopped with `rabbitmqctl stop_app` (even cycles)
/// or its VM SIGKILLed (odd cycles), left down, then started again, while writers commit and
/// two relays publish. Publishing must resume by itself within [`RESUME_BOUND`] of the node
/// being back, no relay may exit, and the usual checks hold (nothing lost, order, nothing
/// pending or parked).
pub async fn broker_restart(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let cycles = ctx.count(4, 2);
    let down = Duration::from_secs(ctx.count(4, 2) as u64);
    let n = ctx.count(8_000, 1_500);
    let rabbit = ctx
        .rabbit
        .as_ref()
        .ok_or_else(|| Error::unexpected("broker-restart: no private RabbitMQ node"))?;
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[("--outage-backoff-max", OUTAGE_BACKOFF_MAX)]);
    relays.spawn()?;
    relays.spawn()?;
    // Keep writing through every cycle (a killed node takes ~10 s to boot again).
    let writing = (down + Duration::from_secs(12)) * cycles as u32 + Duration::from_secs(4);
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let mut outages = Vec::new();
    let mut resumed = Vec::new();
    let mut kinds = Vec::new();
    let mut late = 0;
    let result = async {
        for c in 0..cycles {
            let patience = Duration::from_secs(if c == 0 { 60 } else { 20 });
            if !wait_growth(&rec, rec.received(), 20, patience).await {
                return Err(Error::unavailable(format!(
                    "cycle {c}: nothing published before the restart"
                )));
            }
            let kill = c % 2 == 1;
            let t0 = Instant::now();
            if kill {
                rabbit.kill().await?;
            } else {
                rabbit.stop_app()?;
            }
            kinds.push(if kill { "SIGKILL" } else { "stop_app" });
            tokio::time::sleep(down).await;
            relays.check_alive()?;
            if kill {
                rabbit.restart().await?;
            } else {
                rabbit.start_app().await?;
            }
            let back = Instant::now();
            outages.push(back - t0);
            let what = format!("cycle {c}, the broker being back ({})", kinds[c]);
            late += resume(env, &rec, &mut relays, &what, row).await?;
            resumed.push(back.elapsed());
            relays.check_alive()?;
        }
        Ok(())
    }
    .await;
    let sent = join_writer(writer).await;
    let sent = match (sent, result) {
        (Ok(s), Ok(())) => s,
        (Err(e), _) | (_, Err(e)) => return abort(&mut relays, e).await,
    };
    row.runs = cycles as u32;
    row.kills = cycles as u32;
    // Per restart: the relays' unconfirmed window is published again, and the consumer's
    // unacked deliveries (prefetch 64) come back.
    row.max_duplicates = Some(cycles as u64 * (IN_FLIGHT * 2 + 64));
    row.notes.push(format!(
        "{cycles} broker restarts ({}), the broker down for {} each (boot included); \
         publishing resumed {} after the broker was back ({late} later than the bound \
         {RESUME_BOUND:?}; relays' \
         --outage-backoff-max {OUTAGE_BACKOFF_MAX}); 2 relays, none exited or was restarted",
        kinds.join(", "),
        secs(&outages),
        secs(&resumed)
    ));
    let receipts = conclude(env, rec, &sent, &mut relays, row).await?;
    let (violations, redelivered) = late_redeliveries(&receipts);
    row.notes.push(format!(
        "of the {violations} first receipts that came after a later message of their key, \
         {redelivered} were broker redeliveries (delivered before to the consumer connection \
         the restart closed, x-delivery-count > 0): order lost behind the consumer, not at \
         publishing"
    ));
    Ok(())
}

/// First receipts out of per-key order, and how many of them were redeliveries.
fn late_redeliveries(receipts: &[crate::env::Timed]) -> (u64, u64) {
    use std::collections::{HashMap, HashSet};
    let mut seen = HashSet::new();
    let mut last: HashMap<String, u64> = HashMap::new();
    let (mut violations, mut redelivered) = (0, 0);
    for t in receipts {
        let (Some(key), Some(seq)) = (t.receipt.key.clone(), t.receipt.seq) else {
            continue;
        };
        if !seen.insert(t.receipt.id) {
            continue;
        }
        match last.get(&key) {
            Some(&prev) if seq <= prev => {
                violations += 1;
                if t.attempt > 1 {
                    redelivered += 1;
                }
            }
            _ => {
                last.insert(key, seq);
            }
        }
    }
    (violations, redelivered)
}

/// Terminate every client session of the private cluster but this one; returns how many.
async fn terminate_backends(url: &str) -> Result<i64> {
    use outbox_postgres::sqlx;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(url)
        .await
        .map_err(outbox_postgres::parse_error)?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid <> pg_backend_pid() AND backend_type = 'client backend') AS t",
    )
    .fetch_one(&pool)
    .await
    .map_err(outbox_postgres::parse_error)?;
    pool.close().await;
    Ok(n)
}

/// 4: database restart. The private cluster is restarted (`pg_ctl restart -m fast`, even
/// cycles) or every session of the relays, the writers and the checker is terminated
/// (`pg_terminate_backend`, odd cycles), while writers commit and two relays publish.
/// Writers get retryable errors and retry; a commit that failed is looked up, and a
/// transaction found half written fails the run. Publishing must resume by itself.
pub async fn db_restart(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let cycles = ctx.count(6, 2);
    let n = ctx.count(8_000, 1_500);
    let pg = ctx
        .pg
        .as_ref()
        .ok_or_else(|| Error::unexpected("db-restart: no private PostgreSQL cluster"))?;
    let url = pg.url();
    let errors_before = COMMIT_ERRORS.load(AtomicOrdering::Relaxed);
    let found_before = COMMITS_FOUND_WRITTEN.load(AtomicOrdering::Relaxed);
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[("--outage-backoff-max", OUTAGE_BACKOFF_MAX)]);
    relays.spawn()?;
    relays.spawn()?;
    let writing = Duration::from_secs(5) * cycles as u32 + Duration::from_secs(4);
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let mut took = Vec::new();
    let mut resumed = Vec::new();
    let mut terminated = Vec::new();
    let mut late = 0;
    let result = async {
        for c in 0..cycles {
            let patience = Duration::from_secs(if c == 0 { 60 } else { 20 });
            if !wait_growth(&rec, rec.received(), 20, patience).await {
                return Err(Error::unavailable(format!(
                    "cycle {c}: nothing published before the fault"
                )));
            }
            let t0 = Instant::now();
            if c % 2 == 0 {
                pg.restart()?;
            } else {
                terminated.push(terminate_backends(&url).await?);
            }
            let back = Instant::now();
            took.push(back - t0);
            let what = format!("cycle {c}, the database being back");
            late += resume(env, &rec, &mut relays, &what, row).await?;
            resumed.push(back.elapsed());
            relays.check_alive()?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(())
    }
    .await;
    let sent = join_writer(writer).await;
    let sent = match (sent, result) {
        (Ok(s), Ok(())) => s,
        (Err(e), _) | (_, Err(e)) => return abort(&mut relays, e).await,
    };
    row.runs = cycles as u32;
    row.kills = cycles as u32;
    row.max_duplicates = Some(cycles as u64 * IN_FLIGHT * 2);
    let errors = COMMIT_ERRORS.load(AtomicOrdering::Relaxed) - errors_before;
    let found = COMMITS_FOUND_WRITTEN.load(AtomicOrdering::Relaxed) - found_before;
    row.notes.push(format!(
        "{} restarts (pg_ctl restart -m fast, {} each) and {} rounds of pg_terminate_backend \
         ({:?} sessions) mid-run; publishing resumed {} after each ({late} later than the \
         bound {RESUME_BOUND:?}); \
         writers: {errors} commits failed with a retryable error and were looked up ({found} \
         found written, the others retried), 0 half-written (a partial one fails the run); \
         2 relays, none exited or was restarted",
        cycles.div_ceil(2),
        secs(&took.iter().step_by(2).copied().collect::<Vec<_>>()),
        cycles / 2,
        terminated,
        secs(&resumed)
    ));
    conclude(env, rec, &sent, &mut relays, row).await?;
    Ok(())
}

/// Count `needle` in the relays' logs.
fn count_in_logs(relays: &crate::procs::Relays, needle: &str) -> usize {
    relays
        .logs()
        .iter()
        .map(|p| {
            std::fs::read_to_string(p)
                .unwrap_or_default()
                .matches(needle)
                .count()
        })
        .sum()
}

/// What one skewed run measured.
struct SkewRun {
    tally: crate::check::Tally,
    pending: u64,
    parked: u64,
    leases_lost: usize,
    relays_failed: Option<String>,
}

/// Two relays publish `n` messages, one on the system clock and one `skew_ms` ahead.
async fn skewed_run(
    ctx: &Ctx,
    env: &Env,
    n: usize,
    writing: Duration,
    skew_ms: i64,
) -> Result<SkewRun> {
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[]);
    relays.spawn()?;
    // Started a little later, so that its lease maintenance is out of phase with the
    // other's (in phase, it would always look right after the other renewed).
    tokio::time::sleep(Duration::from_millis(700)).await;
    relays.spawn_with(&["--clock-offset-ms".to_owned(), skew_ms.to_string()])?;
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let sent = match join_writer(writer).await {
        Ok(s) => s,
        Err(e) => {
            let _ = relays.terminate_all(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    let mut row = Row::default();
    let concluded = conclude(env, rec, &sent, &mut relays, &mut row).await;
    let relays_failed = concluded.err().map(|e| e.to_string());
    let tally = crate::check::Tally {
        messages: row.messages,
        received: row.received,
        lost: row.lost,
        duplicates: row.duplicates.unwrap_or(0),
        order_violations: row.order_violations,
        corrupt: row.corrupt,
    };
    Ok(SkewRun {
        tally,
        pending: row.pending,
        parked: row.parked,
        leases_lost: count_in_logs(&relays, "relay: lease lost"),
        relays_failed,
    })
}

/// 8: clock skew. Two relays, one of them on a clock ahead of the other's (the hidden
/// `outbox relay --clock-offset-ms`). Judged: skew below the margin (`--clock-skew-margin`
/// 250 ms; 200 ms) → nothing published twice, per-key order, nothing lost. Measured and
/// reported, not judged except for loss: skew beyond the lease TTL (3.5 s with a 3 s TTL:
/// every lease of the other relay looks expired to the skewed one), on fresh names.
pub async fn clock_skew(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let n = ctx.count(10_000, 1_500);
    let writing = Duration::from_secs(ctx.count(15, 5) as u64);
    let below_ms = 200;
    let above_ms = 3_500;
    let below = skewed_run(ctx, env, n, writing, below_ms).await?;
    row.absorb(&below.tally);
    row.pending = below.pending;
    row.parked = below.parked;
    row.runs = 2;
    row.max_duplicates = Some(0);
    if let Some(e) = below.relays_failed {
        row.fail(e);
    }
    // The probe above the margin, on names of its own.
    let name = ctx.name();
    let probe_env = Box::pin(Env::new(env.pair, name, &ctx.services)).await?;
    let above = skewed_run(ctx, &probe_env, n, writing, above_ms).await;
    if let Err(e) = probe_env.cleanup().await {
        row.notes.push(format!("clean-up of the probe failed: {e}"));
    }
    let above = above?;
    if above.tally.lost > 0 || above.tally.corrupt > 0 || above.pending > 0 || above.parked > 0 {
        row.fail(format!(
            "skew {above_ms} ms: {} lost, {} corrupt, {}/{} pending/parked at the end (even \
             above the margin nothing may be lost)",
            above.tally.lost, above.tally.corrupt, above.pending, above.parked
        ));
    }
    if let Some(e) = above.relays_failed {
        row.fail(format!("skew {above_ms} ms: {e}"));
    }
    let lock = match env.pair {
        Pair::PgRabbitmq => "the PostgreSQL lock judges expiry by the database's now()",
        _ => "the SQLite lock judges expiry by each relay's own clock",
    };
    row.notes.push(format!(
        "2 relays, one {below_ms} ms ahead (margin 250 ms, lease TTL 3 s): {} duplicates, {} \
         order violations, {} leases lost (judged); probe with one relay {above_ms} ms ahead, \
         {} messages (not judged but for loss): {} duplicates, {} order violations, {} lost, \
         {} leases lost; {lock}",
        below.tally.duplicates,
        below.tally.order_violations,
        below.leases_lost,
        above.tally.messages,
        above.tally.duplicates,
        above.tally.order_violations,
        above.tally.lost,
        above.leases_lost,
    ));
    Ok(())
}
