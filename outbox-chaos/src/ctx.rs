//! What every scenario shares: the list of scenarios, the run context ([`Ctx`]) and the
//! helpers that start relays, write the plan and judge the outcome. The scenarios themselves
//! are in `scenarios`, `restarts` and `worker`, which all use this module.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::ValueEnum;
use outbox_core::{Error, Result};

use crate::check::{Receipt, Sent, tally};
use crate::env::{Env, Pair, Plan, Recorder, Services, Timed};
use crate::procs::Relays;
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
    pub(crate) async fn private_moto(&mut self) -> Result<(Option<crate::procs::Moto>, String)> {
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
