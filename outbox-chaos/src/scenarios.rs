//! The scenarios of issue 13 implemented so far, each run on one pair.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use outbox_core::{Error, ListQuery, MessageStatus, Result};
use outbox_rabbitmq::{Topology, declare_topology};

use crate::check::{Receipt, Sent, tally};
use crate::env::{Broker, Env, Pair, Plan, Recorder, Services, Timed, write};
use crate::procs::{Relays, tail};
use crate::report::Row;

/// A scenario of issue 13.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scenario {
    /// 1: relays SIGKILLed at random moments and restarted, at times 2–3 at once.
    RelayCrash,
    /// 5: four relays, no faults: nothing published twice.
    RacingRelays,
    /// 2: a relay SIGSTOPped past its lease, another takes over, then SIGCONT.
    RelayPause,
    /// 7: one message per poisoned key is unroutable: parked, its key held back, requeued.
    Poison,
    /// 6: `InboxProcessor` processes SIGKILLed mid-handler: one effect per message.
    ConsumerCrash,
    /// 3: a private RabbitMQ node stopped (`stop_app`) and killed, then started, mid-run.
    BrokerRestart,
    /// 4: a private PostgreSQL cluster restarted, and its sessions terminated, mid-run.
    DbRestart,
    /// 8: relays whose clocks differ, below and above the clock-skew margin.
    ClockSkew,
}

impl Scenario {
    /// Every implemented scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 8] = [
        Scenario::RelayCrash,
        Scenario::RacingRelays,
        Scenario::RelayPause,
        Scenario::Poison,
        Scenario::ConsumerCrash,
        Scenario::BrokerRestart,
        Scenario::DbRestart,
        Scenario::ClockSkew,
    ];

    /// Its number in issue 13.
    pub fn number(self) -> u8 {
        match self {
            Scenario::RelayCrash => 1,
            Scenario::RelayPause => 2,
            Scenario::RacingRelays => 5,
            Scenario::ConsumerCrash => 6,
            Scenario::Poison => 7,
            Scenario::BrokerRestart => 3,
            Scenario::DbRestart => 4,
            Scenario::ClockSkew => 8,
        }
    }

    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::RelayCrash => "relay-crash",
            Scenario::RacingRelays => "racing-relays",
            Scenario::RelayPause => "relay-pause",
            Scenario::Poison => "poison",
            Scenario::ConsumerCrash => "consumer-crash",
            Scenario::BrokerRestart => "broker-restart",
            Scenario::DbRestart => "db-restart",
            Scenario::ClockSkew => "clock-skew",
        }
    }

    /// The pairs it runs on.
    pub fn pairs(self) -> &'static [Pair] {
        match self {
            Scenario::Poison => &[Pair::PgRabbitmq, Pair::SqliteRabbitmq],
            // SQLite has one writer per file: a relay stopped inside a write transaction
            // holds the file lock, so every writer and relay waits for it (or gives up on
            // its busy timeout) until SIGCONT. Not a fencing question; see RELIABILITY.md.
            Scenario::RelayPause => &[Pair::PgRabbitmq, Pair::DynamodbKafka],
            Scenario::ConsumerCrash => &[Pair::PgRabbitmq],
            // A private RabbitMQ node; the in-memory Kafka-protocol broker is not restarted
            // yet (README, RELIABILITY.md).
            Scenario::BrokerRestart => &[Pair::PgRabbitmq, Pair::SqliteRabbitmq],
            // moto keeps its state in memory: a restart loses the tables.
            Scenario::DbRestart => &[Pair::PgRabbitmq],
            // PostgreSQL judges lease expiry by the database's clock, SQLite by each
            // relay's own: both are shown.
            Scenario::ClockSkew => &[Pair::PgRabbitmq, Pair::SqliteRabbitmq],
            _ => &Pair::ALL,
        }
    }
}

/// The state of one invocation.
#[derive(Debug)]
pub struct Ctx {
    /// Fewer messages and faults.
    pub quick: bool,
    /// Seed of every random choice.
    pub seed: u64,
    /// The `outbox` binary.
    pub bin: PathBuf,
    /// Service addresses.
    pub services: Services,
    /// Where the child processes' logs go.
    pub logs: PathBuf,
    /// The private RabbitMQ node of the running scenario (broker-restart).
    pub rabbit: Option<crate::private::PrivateRabbit>,
    /// The private PostgreSQL cluster of the running scenario (db-restart).
    pub pg: Option<crate::private::PrivatePg>,
    run_id: String,
    seq: u32,
    shared_dynamodb: String,
}

impl Ctx {
    /// A new invocation.
    pub fn new(quick: bool, seed: u64, bin: PathBuf, logs: PathBuf) -> Ctx {
        let id = uuid::Uuid::now_v7().simple().to_string();
        Ctx {
            quick,
            seed,
            bin,
            services: Services::from_env(),
            logs,
            rabbit: None,
            pg: None,
            run_id: id[id.len() - 8..].to_owned(),
            seq: 0,
            shared_dynamodb: Services::from_env().dynamodb,
        }
    }

    /// Point DynamoDB at a fresh private moto server for one scenario (moto grows by
    /// gigabytes and slows down under relay load, so each scenario gets a new one); keeps the
    /// shared endpoint when no moto is installed. Returns the server and a note.
    async fn private_moto(&mut self) -> Result<(Option<crate::procs::Moto>, String)> {
        let moto = crate::procs::Moto::start(&self.logs.join("moto.log")).await?;
        Ok(match moto {
            Some(m) => {
                self.services.dynamodb = m.endpoint.clone();
                let note = format!("DynamoDB: a private moto server at {}", m.endpoint);
                (Some(m), note)
            }
            None => {
                self.services.dynamodb = self.shared_dynamodb.clone();
                let note = format!(
                    "DynamoDB: the shared endpoint {} (no moto_server found to start a private one)",
                    self.services.dynamodb
                );
                (None, note)
            }
        })
    }

    /// A fresh name `chaos_<run>_<n>` (`[a-z0-9_]`).
    pub fn name(&mut self) -> String {
        self.seq += 1;
        format!("chaos_{}_{}", self.run_id, self.seq)
    }

    /// `full` normally, `quick` with `--quick`.
    pub fn count(&self, full: usize, quick: usize) -> usize {
        if self.quick { quick } else { full }
    }

    /// A random generator for a scenario, derived from the seed.
    pub(crate) fn rng(&mut self) -> fastrand::Rng {
        fastrand::Rng::with_seed(self.seed.wrapping_add(u64::from(self.seq) * 7919))
    }
}

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

/// Relay batch and window sizes of every scenario.
const BATCH: &str = "100";
pub(crate) const IN_FLIGHT: u64 = 400;

/// `outbox relay` flags for `pair`, with `extra` flags appended.
pub(crate) fn relay_flags(pair: Pair, extra: &[(&str, &str)]) -> Vec<String> {
    let mut out = Vec::new();
    let in_flight = IN_FLIGHT.to_string();
    let base = [
        ("--stats-interval", "1s"),
        ("--batch-size", BATCH),
        ("--max-in-flight", in_flight.as_str()),
    ];
    for (flag, value) in pair.relay_timing().iter().chain(base.iter()).chain(extra) {
        out.push((*flag).to_owned());
        out.push((*value).to_owned());
    }
    out
}

pub(crate) fn relays(ctx: &Ctx, env: &Env, extra: &[(&str, &str)]) -> Relays {
    Relays::new(
        &ctx.bin,
        &env.store_url,
        &env.transport_url,
        &relay_flags(env.pair, extra),
        &ctx.logs,
        &env.name,
    )
}

/// Messages for a scenario: on moto (about 85 messages/s through one relay, see
/// BENCHMARKS.md, and far less with several relays renewing 16 leases each) a fortieth of
/// the full run's messages and a tenth of the quick run's.
pub(crate) fn scaled(ctx: &Ctx, pair: Pair, full: usize, quick: usize) -> usize {
    match pair {
        Pair::DynamodbKafka => ctx.count(full / 40, quick / 10).max(1),
        _ => ctx.count(full, quick),
    }
}

/// Faults for a scenario (a fifth of the full run's and half the quick run's on moto).
pub(crate) fn faults(ctx: &Ctx, pair: Pair, full: usize, quick: usize) -> usize {
    match pair {
        Pair::DynamodbKafka => ctx.count(full / 5, quick / 2).max(1),
        _ => ctx.count(full, quick),
    }
}

/// How long to wait for the last messages once the faults are over.
fn drain_timeout(pair: Pair) -> Duration {
    pair.lease_ttl() * 4 + Duration::from_secs(60)
}

/// Wait until every one of `expected` messages was received and nothing is pending.
async fn drain(env: &Env, rec: &Recorder, expected: usize, relays: &mut Relays) -> Result<()> {
    let timeout = drain_timeout(env.pair);
    let end = Instant::now() + timeout;
    loop {
        relays.check_alive()?;
        let pending = env.store.stats().await.map(|s| s.pending).ok();
        if rec.distinct() >= expected && pending == Some(0) {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(Error::unavailable(format!(
                "not drained after {timeout:?}: {} of {expected} messages received, {} \
                 pending in the store",
                rec.distinct(),
                pending.map_or_else(|| "?".to_owned(), |p| p.to_string())
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Drain, stop the relays with SIGTERM (each must exit 0), wait for stragglers, stop the
/// consumer, and count. Every step runs even when an earlier one failed; the first failure
/// is returned after the row has been filled.
pub(crate) async fn conclude(
    env: &Env,
    rec: Recorder,
    sent: &[Sent],
    relays: &mut Relays,
    row: &mut Row,
) -> Result<Vec<Timed>> {
    let drained = drain(env, &rec, sent.len(), relays).await;
    let stopped = relays.terminate_all(Duration::from_secs(30)).await;
    // Duplicates still on their way (a republished batch) are counted too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let receipts = rec.finish().await?;
    let plain: Vec<Receipt> = receipts.iter().map(|t| t.receipt.clone()).collect();
    row.absorb(&tally(sent, &plain));
    let stats = env.store.stats().await?;
    row.pending = stats.pending;
    row.parked = stats.parked;
    drained?;
    stopped?;
    Ok(receipts)
}

pub(crate) fn plan(env: &Env, messages: usize, keys: usize, duration: Duration) -> Plan {
    Plan {
        messages,
        keys,
        writers: 4,
        duration,
        topic: env.topic.clone(),
        special: Vec::new(),
    }
}

pub(crate) async fn join_writer(
    writer: tokio::task::JoinHandle<Result<Vec<Sent>>>,
) -> Result<Vec<Sent>> {
    writer
        .await
        .map_err(|e| Error::unexpected("writers failed").with_source(e))?
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

/// Wait until the consumer has `more` deliveries beyond `from`.
pub(crate) async fn wait_growth(
    rec: &Recorder,
    from: usize,
    more: usize,
    timeout: Duration,
) -> bool {
    let end = Instant::now() + timeout;
    while rec.received() < from + more {
        if Instant::now() > end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
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
