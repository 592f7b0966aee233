//! The scenarios of issue 13 implemented so far, each run on one pair: [`run`] dispatches
//! to them (the service restarts are in `restarts`, the consumer crash in `worker`); what
//! they share is in `ctx`.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use outbox_core::{Error, ListQuery, MessageStatus, Result};
use outbox_rabbitmq::{Topology, declare_topology};

use crate::env::{Broker, Env, Pair, Recorder, write};
use crate::procs::tail;
use crate::report::Row;

use crate::ctx::{
    Ctx, IN_FLIGHT, Scenario, conclude, faults, join_writer, plan, relays, scaled, wait_growth,
};

/// Run `scenario` on `pair` and judge it.
pub async fn run(ctx: &mut Ctx, scenario: Scenario, pair: Pair) -> Row {
    let start = Instant::now();
    let mut row = Row::new(scenario.number(), scenario.name(), pair.name());
    let name = ctx.name();
    eprintln!("== {} on {} ({name})", scenario.name(), pair.name());
    // Dropped (stopped) when the scenario is over.
    let mut _moto = None;
    if pair == Pair::DynamodbKafka {
        match ctx.private_moto().await {
            Ok((m, note)) => {
                _moto = m;
                row.notes.push(note);
            }
            Err(e) => row
                .notes
                .push(format!("private moto failed ({e}); shared one used")),
        }
    }
    let shared = ctx.services.clone();
    if let Err(e) = Box::pin(crate::restarts::private_services(
        ctx, scenario, pair, &mut row,
    ))
    .await
    {
        row.fail(e.to_string());
        row.seconds = start.elapsed().as_secs_f64();
        row.judge();
        ctx.services = shared;
        return row;
    }
    let result = match scenario {
        Scenario::ConsumerCrash => crate::worker::consumer_crash(ctx, pair, &name, &mut row).await,
        _ => match Box::pin(Env::new(pair, name, &ctx.services)).await {
            Err(e) => Err(Error::unavailable(format!(
                "setting up {}: {e}",
                pair.name()
            ))),
            Ok(env) => {
                let r = match scenario {
                    Scenario::RelayCrash => Box::pin(relay_crash(ctx, &env, &mut row)).await,
                    Scenario::RacingRelays => Box::pin(racing_relays(ctx, &env, &mut row)).await,
                    Scenario::RelayPause => Box::pin(relay_pause(ctx, &env, &mut row)).await,
                    Scenario::Poison => Box::pin(poison(ctx, &env, &mut row)).await,
                    Scenario::BrokerRestart => {
                        Box::pin(crate::restarts::broker_restart(ctx, &env, &mut row)).await
                    }
                    Scenario::DbRestart => {
                        Box::pin(crate::restarts::db_restart(ctx, &env, &mut row)).await
                    }
                    Scenario::ClockSkew => {
                        Box::pin(crate::restarts::clock_skew(ctx, &env, &mut row)).await
                    }
                    Scenario::ConsumerCrash => Ok(()),
                };
                if let Err(e) = env.cleanup().await {
                    row.notes.push(format!("clean-up failed: {e}"));
                }
                r
            }
        },
    };
    // The private services of the scenario go (after the clean-up, which used them).
    ctx.rabbit = None;
    ctx.pg = None;
    ctx.services = shared;
    if let Err(e) = result {
        row.fail(e.to_string());
    }
    row.seconds = start.elapsed().as_secs_f64();
    row.judge();
    eprintln!(
        "   {}: {} messages, {} received, {} lost, {} duplicates, {} order violations ({:.1}s)",
        if row.passed { "PASS" } else { "FAIL" },
        row.messages,
        row.received,
        row.lost,
        row.duplicates.unwrap_or(0),
        row.order_violations,
        row.seconds
    );
    for f in &row.failures {
        eprintln!("   FAILED: {f}");
    }
    row
}

/// 1: relay crash.
async fn relay_crash(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let n = scaled(ctx, env.pair, 20_000, 1_500);
    let kills = faults(ctx, env.pair, 50, 8) as u32;
    let (lo, hi) = if ctx.quick { (200, 900) } else { (300, 1_500) };
    let mut rng = ctx.rng();
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[]);
    relays.spawn()?;
    relays.spawn()?;
    let writing = Duration::from_millis(u64::from(kills) * (lo + hi) / 2 * 8 / 10);
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let mut most = 2;
    let mut all_at_once = 0;
    while relays.kills < kills {
        tokio::time::sleep(Duration::from_millis(rng.u64(lo..hi))).await;
        relays.check_alive()?;
        if relays.live.len() >= 2 && rng.u8(0..5) == 0 {
            all_at_once += 1;
            while !relays.live.is_empty() {
                relays.kill(0).await?;
            }
        } else {
            let victim = rng.usize(0..relays.live.len());
            relays.kill(victim).await?;
        }
        let target = rng.usize(1..=3);
        while relays.live.len() < target {
            relays.spawn()?;
        }
        most = most.max(relays.live.len());
    }
    let sent = join_writer(writer).await;
    let sent = match sent {
        Ok(s) => s,
        Err(e) => {
            let _ = relays.terminate_all(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    row.runs = 1;
    row.kills = relays.kills;
    row.notes.push(format!(
        "{} SIGKILLs ({all_at_once} of them killing every live relay at once), {} relay processes \
         started, up to {most} at once; lease TTL {:?}; duplicates are expected (a killed \
         relay's unconfirmed batch is republished) and not bounded by a check here",
        relays.kills,
        relays.started(),
        env.pair.lease_ttl()
    ));
    conclude(env, rec, &sent, &mut relays, row).await?;
    Ok(())
}

/// 5: racing relays.
async fn racing_relays(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let n = scaled(ctx, env.pair, 20_000, 2_000);
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[]);
    for _ in 0..4 {
        relays.spawn()?;
    }
    let writing = Duration::from_secs(ctx.count(20, 4) as u64);
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let sent = join_writer(writer).await?;
    row.runs = 1;
    row.max_duplicates = Some(0);
    row.notes
        .push("4 relays started together, no faults".to_owned());
    conclude(env, rec, &sent, &mut relays, row).await?;
    Ok(())
}

/// Whether any shard lease is held by an owner of instance `id`.
async fn holds_any(env: &Env, id: &str) -> Result<bool> {
    let lock = env.store.lock();
    let prefix = format!("{id}#");
    for shard in 0..env.store.outbox().shard_count() {
        if let Some(l) = lock.current(&format!("outbox/shard/{shard}")).await?
            && l.owner.starts_with(&prefix)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// 2: relay pause.
async fn relay_pause(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let cycles = faults(ctx, env.pair, 5, 2) as u32;
    let ttl = env.pair.lease_ttl();
    let n = scaled(ctx, env.pair, 10_000, 1_500);
    let mut rng = ctx.rng();
    let rec = Recorder::start(env.consumer().await?);
    let mut relays = relays(ctx, env, &[]);
    relays.spawn()?;
    // Keep writing through every cycle, so that the takeover has new messages to publish.
    // (plus slack for the start-up: a Kafka group join and moto take seconds).
    let writing = (ttl * 2 + Duration::from_secs(8)) * cycles + ttl * 3;
    let writer = tokio::spawn(write(
        env.store.clone(),
        plan(env, n, 200, writing),
        ctx.seed,
    ));
    let mut resumes = Vec::new();
    let mut takeovers = Vec::new();
    let result = async {
        for c in 0..cycles {
            // The first cycle includes the start-up (a Kafka group join, moto): be patient.
            let patience = Duration::from_secs(if c == 0 { 60 } else { 20 });
            if !wait_growth(&rec, rec.received(), 10, patience).await {
                return Err(Error::unavailable(format!(
                    "cycle {c}: nothing published before the pause"
                )));
            }
            let victim = if c == 0 {
                0
            } else {
                rng.usize(0..relays.live.len())
            };
            let id = relays.live[victim].id.clone();
            relays.pause(victim)?;
            let stopped = Instant::now();
            // What arrives later than this was published by another relay (what the paused
            // one had on the wire arrives within milliseconds).
            tokio::time::sleep(Duration::from_millis(300)).await;
            let at_pause = rec.received();
            if relays.live.len() < 2 {
                relays.spawn()?;
            }
            // Past the lease: the other relay must hold every shard the paused one had.
            tokio::time::sleep(ttl + Duration::from_millis(500)).await;
            let end = Instant::now() + ttl * 3 + Duration::from_secs(10);
            while Box::pin(holds_any(env, &id)).await? {
                if Instant::now() > end {
                    return Err(Error::unavailable(format!(
                        "cycle {c}: {id} still holds leases {:?} after SIGSTOP",
                        stopped.elapsed()
                    )));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            if !wait_growth(&rec, at_pause, 1, Duration::from_secs(30)).await {
                return Err(Error::unavailable(format!(
                    "cycle {c}: nothing published while {id} was paused"
                )));
            }
            takeovers.push(stopped.elapsed());
            let at = rec.received();
            relays.resume(victim)?;
            resumes.push((Instant::now(), at));
            relays.check_alive()?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        Ok(())
    }
    .await;
    let sent = join_writer(writer).await;
    let (sent, ()) = match (sent, result) {
        (Ok(s), Ok(())) => (s, ()),
        (Err(e), _) | (_, Err(e)) => {
            let _ = relays.terminate_all(Duration::from_secs(10)).await;
            return Err(e);
        }
    };
    row.runs = cycles;
    row.kills = relays.pauses;
    // Each pause may republish at most the paused relay's in-flight window once.
    row.max_duplicates = Some(u64::from(cycles) * IN_FLIGHT);
    let receipts = conclude(env, rec, &sent, &mut relays, row).await?;
    // Duplicates within 2 s after a SIGCONT of ids first received before it: the most a
    // resumed relay can have put on the wire before noticing its leases were gone.
    let mut stale = 0;
    for (at, index) in &resumes {
        let before: HashSet<_> = receipts[..*index].iter().map(|t| t.receipt.id).collect();
        stale += receipts[*index..]
            .iter()
            .filter(|t| t.at <= *at + Duration::from_secs(2) && before.contains(&t.receipt.id))
            .count();
    }
    row.notes.push(format!(
        "{cycles} SIGSTOP/SIGCONT cycles, each paused past the lease TTL {ttl:?} until the other \
         relay held all its shards (takeover after {}); {stale} duplicate(s) of earlier \
         receipts arrived within 2 s of a SIGCONT; allowed duplicates: the in-flight window \
         ({IN_FLIGHT}) per pause",
        takeovers
            .iter()
            .map(|d| format!("{:.1}s", d.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

/// 7: poison message.
async fn poison(ctx: &mut Ctx, env: &Env, row: &mut Row) -> Result<()> {
    let Broker::Rabbit {
        connection,
        topology,
    } = &env.broker
    else {
        return Err(Error::invalid_input("poison: RabbitMQ pairs only"));
    };
    let keys = ctx.count(40, 10);
    let per_key = ctx.count(50, 10) as u64;
    let poisoned = [0usize, 1, 2];
    let at = per_key / 2;
    let max_attempts = 3;
    let poison_topic = format!("{}.poison", env.name);
    let mut p = plan(env, keys * per_key as usize, keys, Duration::ZERO);
    p.special = poisoned
        .iter()
        .map(|k| (*k, at, poison_topic.clone()))
        .collect();
    let rec = Recorder::start(env.consumer().await?);
    let attempts = max_attempts.to_string();
    let mut relays = relays(
        ctx,
        env,
        &[
            ("--park-on-permanent", "false"),
            ("--max-attempts", &attempts),
            ("--initial-backoff", "100ms"),
            ("--max-backoff", "300ms"),
            ("--jitter", "false"),
        ],
    );
    relays.spawn()?;
    let sent = write(env.store.clone(), p, ctx.seed).await?;
    // Held back: the poisoned message and every later one of its key (the writers spread
    // messages over their keys round robin, so a key may have more or fewer than `per_key`).
    let held = sent
        .iter()
        .filter(|m| poisoned.iter().any(|k| m.key == format!("k{k}")) && m.seq >= at)
        .count();
    let end = Instant::now() + Duration::from_secs(60);
    let started = Instant::now();
    loop {
        relays.check_alive()?;
        let parked = env.store.stats().await?.parked;
        if parked >= poisoned.len() as u64 && rec.distinct() >= sent.len() - held {
            break;
        }
        if Instant::now() > end {
            return Err(Error::unavailable(format!(
                "poison: {parked} parked and {} of {} other messages received after 60 s",
                rec.distinct(),
                sent.len() - held
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flowed = started.elapsed();
    // Nothing of a poisoned key at or after the poison may have been delivered.
    let overtook = {
        let g = rec
            .receipts
            .lock()
            .map_err(|_| Error::unexpected("receipts lock poisoned"))?;
        g.list
            .iter()
            .filter(|t| {
                poisoned
                    .iter()
                    .any(|k| t.receipt.key.as_deref() == Some(&format!("k{k}")))
                    && t.receipt.seq.is_some_and(|s| s >= at)
            })
            .count()
    };
    if overtook > 0 {
        row.fail(format!(
            "{overtook} message(s) of a poisoned key delivered while its poison was parked"
        ));
    }
    let parked = env
        .store
        .outbox()
        .list(&ListQuery {
            status: Some(MessageStatus::Parked),
            ..ListQuery::default()
        })
        .await?;
    if parked.len() != poisoned.len()
        || parked
            .iter()
            .any(|m| m.attempts != max_attempts || m.message.topic != poison_topic)
    {
        row.fail(format!(
            "parked: expected the {} poison messages after {max_attempts} attempts each, got \
             {:?}",
            poisoned.len(),
            parked
                .iter()
                .map(|m| (m.message.topic.clone(), m.attempts))
                .collect::<Vec<_>>()
        ));
    }
    // Fix the cause (route the topic), then release the parked messages with the CLI.
    let fixed = Topology {
        binding_keys: vec![env.topic.clone(), poison_topic.clone()],
        ..topology.clone()
    };
    declare_topology(connection, &fixed).await?;
    let log = ctx.logs.join(format!("{}-requeue.log", env.name));
    let out = std::process::Command::new(&ctx.bin)
        .args(["requeue", "--store", &env.store_url, "--all-parked"])
        .env_remove("OUTBOX_STORE")
        .env("AWS_ACCESS_KEY_ID", "local")
        .env("AWS_SECRET_ACCESS_KEY", "local")
        .output()
        .map_err(|e| Error::unexpected("running outbox requeue").with_source(e))?;
    let _ = std::fs::write(
        &log,
        [out.stdout.as_slice(), out.stderr.as_slice()].concat(),
    );
    if !out.status.success() {
        row.fail(format!(
            "outbox requeue exited with {}: {}",
            out.status,
            tail(&log, 5)
        ));
    }
    row.runs = 1;
    row.notes.push(format!(
        "{} poisoned keys (one unroutable message each at position {at} of {per_key}): \
         parked after {max_attempts} attempts, {held} messages held back while the other \
         {} were delivered in {:.1}s; then the topic was bound and `outbox requeue \
         --all-parked` released them",
        poisoned.len(),
        sent.len() - held,
        flowed.as_secs_f64()
    ));
    conclude(env, rec, &sent, &mut relays, row).await?;
    Ok(())
}
