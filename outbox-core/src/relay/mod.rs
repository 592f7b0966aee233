//! The relay: publishes stored messages to a broker and marks them dispatched.
//!
//! A [`Relay`] works over an [`OutboxStore`], a [`DistributedLock`] and a [`Producer`] (all as
//! trait objects). [`Relay::run`] is a pipeline: fetching, publishing and marking overlap.
//!
//! 1. It holds leases on a fair share of the store's shards (see *Sharing work*).
//! 2. It fetches due pending messages of those shards while earlier ones are still in flight,
//!    leaving out messages and keys that already are.
//! 3. Each key's messages (a *chain*, in store order) go to the transport back to back in one
//!    [`Producer::send_ordered`] call, which keeps several in flight where the transport
//!    preserves their order and stops the key at its first failure. Chains of different keys
//!    run concurrently, up to [`RelayConfig::max_in_flight`] messages in all (this bounds the
//!    relay's memory).
//! 4. Confirmed messages are marked dispatched as their chain finishes, grouped with the marks
//!    of every other chain confirmed meanwhile: one slow message never holds back the marks
//!    of other keys.
//!
//! **Failures.** A failure specific to a message counts towards
//! [`RetryPolicy::max_attempts`]: the message is retried after an exponential backoff, parked
//! (dead-lettered) after the last attempt, and parked at once on a permanent error (too large,
//! unroutable). An *outage* — a retryable `Unavailable` error from the broker, a send not
//! confirmed within [`RelayConfig::publish_timeout`], or the store unavailable — counts
//! nothing against any message: the whole relay pauses (a circuit breaker, doubling from
//! [`OutageBackoff::initial`] to [`OutageBackoff::max`] with jitter, logged when it opens and
//! closes) and resumes by itself. A broker outage of any length parks nothing.
//!
//! **Fast path.** After committing, the application hands the [`Committed`] result to
//! [`RelayHandle::notify`]; the relay wakes at once and publishes the new messages. Polling
//! every [`RelayConfig::poll_interval`] is the safety net that catches everything else
//! (crashed writers, other processes, retries that became due).
//!
//! **Sharing work.** Several relay instances (processes) may run against one store. Each takes
//! one *member* lease (`{lock_prefix}/member/{n}`), counts the live members, and holds its
//! fair share of *shard* leases (`{lock_prefix}/shard/{n}`), releasing surplus ones so
//! newcomers get theirs. Only the holder of a shard's lease publishes that shard. Leases are
//! renewed every third of their TTL, each on its own: an error reading other members' leases
//! postpones the rebalance but never the renewal. A shard with work in flight is never
//! released; it is drained first.
//!
//! **Leases bind.** No send starts later than `expiry - publish_timeout - clock_skew_margin`
//! of its shard's lease, every send is abandoned after `publish_timeout`, and the relay refuses
//! a producer whose own [`Producer::delivery_timeout`] is longer, so no send of this relay can
//! be confirmed after its lease expired — as long as the clocks of the relays and the lock
//! differ by less than [`RelayConfig::clock_skew_margin`]. Leases are owned by
//! `{instance_id}#{incarnation}`, a random incarnation per [`Relay`] value, so a stale holder
//! (paused, partitioned) can never renew the lease of its successor, and a second live relay
//! with the same `instance_id` is refused with `ConfigInvalid` (an *instance* lease,
//! `{lock_prefix}/instance/{instance_id}`, guards it).
//!
//! **Stale store writes are harmless.** A relay that lost its lease while a chain was in flight
//! still marks that chain's confirmed messages dispatched and records its failure. Neither can
//! lose a message or break per-key order: `mark_dispatched` records a fact (the broker
//! confirmed the message) and is idempotent, and a late `mark_failed` only affects a message
//! that is still pending — it counts one real failed attempt and delays the message's next
//! attempt, which the new holder then respects. So the stores do not check fencing tokens on
//! these writes; the conformance case `relay_stale_holder_publishes_nothing` shows it.
//!
//! **At-least-once.** A relay that dies loses nothing: its leases expire and another instance
//! (or the restarted one) takes over. Messages it published but had not yet marked are
//! published again (consumers deduplicate with the inbox).
//!
//! **Serverless.** [`Relay::run_once`] takes the free shards, drains one batch, releases the
//! leases and returns: one function invocation.
//!
//! **Shutdown.** [`Relay::run`] stops when its [`CancellationToken`] is cancelled: no new
//! fetch or send starts, the chains in flight finish (publish and mark), then every lease is
//! released.
//!
//! **Observability.** Spans `outbox.relay.batch` (per fetch) and `outbox.relay.publish` (per
//! chain, with message id, topic, key and attempt); the metrics named in
//! [`crate::metrics`]; [`Relay::health`] for applications that embed the relay.

mod breaker;
mod config;
mod leases;
#[cfg(feature = "mutants")]
pub mod mutants;
mod pipeline;

/// Whether a planted flaw is active: `flawed!(Name)` (always `false` without the `mutants`
/// feature).
#[cfg(not(feature = "mutants"))]
macro_rules! flawed {
    ($flaw:ident) => {
        false
    };
}
#[cfg(feature = "mutants")]
macro_rules! flawed {
    ($flaw:ident) => {
        $crate::relay::mutants::planted($crate::relay::mutants::RelayFlaw::$flaw)
    };
}
pub(crate) use flawed;

use std::collections::BTreeSet;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::{SharedClock, SystemClock};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::DistributedLock;
use crate::message::StoredMessage;
use crate::metrics as names;
use crate::store::{OutboxStats, OutboxStore, PendingQuery};
use crate::transport::Producer;
use crate::tx::Committed;

pub use config::{OutageBackoff, RelayConfig, RetryPolicy};
pub use leases::shard_lease_name;

use breaker::Breaker;
use leases::Leases;
use pipeline::{ChainDone, InFlight, Marker};

/// What a relay did: per call of [`Relay::run_once`], or in total for [`Relay::run`] and
/// [`Relay::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RunReport {
    /// Messages confirmed by the broker and marked dispatched.
    pub published: u64,
    /// Failed publish attempts specific to a message (each scheduled for retry or parked).
    pub failed: u64,
    /// Messages parked (dead-lettered) after their last failure.
    pub parked: u64,
    /// Batches fetched.
    pub batches: u64,
}

/// A relay's state for health checks: [`Relay::health`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RelayHealth {
    /// The relay's `instance_id`.
    pub instance_id: String,
    /// Shards whose lease it holds.
    pub shards: Vec<u32>,
    /// Whether the circuit breaker is open (broker or store unavailable).
    pub circuit_open: bool,
    /// Messages handed to the broker and not yet marked.
    pub in_flight: usize,
    /// When it last marked a published message, by its clock.
    pub last_published_at: Option<DateTime<Utc>>,
    /// Totals since the relay was created.
    pub totals: RunReport,
    /// The store's counts at the time of the call (`None` if the store could not be read).
    pub store: Option<OutboxStats>,
    /// Why the store could not be read.
    pub store_error: Option<String>,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    failed: AtomicU64,
    parked: AtomicU64,
    batches: AtomicU64,
}

impl Counters {
    fn snapshot(&self) -> RunReport {
        RunReport {
            published: self.published.load(AtomicOrdering::Relaxed),
            failed: self.failed.load(AtomicOrdering::Relaxed),
            parked: self.parked.load(AtomicOrdering::Relaxed),
            batches: self.batches.load(AtomicOrdering::Relaxed),
        }
    }
}

#[derive(Debug, Default)]
struct Wake {
    notify: Notify,
    shards: Mutex<BTreeSet<u32>>,
}

/// Hands freshly committed messages to a running relay for immediate dispatch. Cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    wake: Arc<Wake>,
}

impl RelayHandle {
    /// Wake the relay to publish the messages of `committed` now, instead of at the next poll.
    /// A no-op for an empty commit. Never blocks.
    pub fn notify(&self, committed: &Committed) {
        if committed.is_empty() {
            return;
        }
        self.notify_shards(committed.shards.iter().copied());
    }

    /// Wake the relay to publish the new messages of these shards now (for a wake-up signal
    /// that names shards, such as a DynamoDB stream record). Never blocks.
    pub fn notify_shards(&self, shards: impl IntoIterator<Item = u32>) {
        self.wake
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(shards);
        self.wake.notify.notify_one();
    }

    /// Wake the relay to sweep every shard it holds now.
    pub fn wake(&self) {
        self.wake.notify.notify_one();
    }
}

struct Inner {
    store: Arc<dyn OutboxStore>,
    lock: Arc<dyn DistributedLock>,
    producer: Arc<dyn Producer>,
    clock: SharedClock,
    config: RelayConfig,
    /// Lease owner: `{instance_id}#{incarnation}`.
    owner: String,
    wake: Arc<Wake>,
    leases: tokio::sync::Mutex<Leases>,
    flight: Mutex<InFlight>,
    breaker: Breaker,
    marker: Marker,
    counters: Counters,
    last_published: Mutex<Option<DateTime<Utc>>>,
}

impl Inner {
    fn flight(&self) -> std::sync::MutexGuard<'_, InFlight> {
        self.flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn finish(&self, done: &ChainDone) {
        self.flight().finish(done);
    }
}

/// Publishes stored messages; see the [module docs](self). Cheap to clone (clones share state,
/// leases and incarnation).
#[derive(Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("instance_id", &self.inner.config.instance_id)
            .field("store", &self.inner.store)
            .field("producer", &self.inner.producer)
            .field("stats", &self.inner.counters.snapshot())
            .finish_non_exhaustive()
    }
}

/// Chains admitted by one pass (registered in flight, to be spawned at once), and whether
/// messages were left for busy keys.
struct Started {
    chains: Vec<pipeline::Chain>,
    fetched: usize,
    /// Messages were left behind: their key (or they themselves) was in flight, or the room
    /// ran out. A finishing chain should bring on the next fetch.
    waiting: bool,
    /// The store returned as many rows as asked: more may be due.
    full: bool,
}

impl Started {
    /// Spawn the chains onto `tasks`.
    fn spawn_onto(self, inner: &Arc<Inner>, tasks: &mut JoinSet<ChainDone>) {
        for chain in self.chains {
            tasks.spawn(inner.clone().run_chain(chain));
        }
    }

    /// Give the chains up without sending anything (shutdown).
    fn abandon(self, inner: &Inner) {
        for chain in self.chains {
            inner.finish(&pipeline::ChainDone::of(&chain, inner.config.ordering));
        }
    }
}

impl Relay {
    /// A relay publishing from `store` to `producer`, coordinating through `lock`.
    ///
    /// # Errors
    /// `ConfigInvalid` if `config` is invalid (see [`RelayConfig::validate`]) or the
    /// producer may keep an unconfirmed send longer than `config.publish_timeout` (see
    /// [`Producer::delivery_timeout`]).
    pub fn new(
        store: Arc<dyn OutboxStore>,
        lock: Arc<dyn DistributedLock>,
        producer: Arc<dyn Producer>,
        config: RelayConfig,
    ) -> Result<Self> {
        Self::with_clock(store, lock, producer, config, Arc::new(SystemClock))
    }

    /// Like [`new`](Self::new), timing backoff and leases by `clock`. In tests, pass the
    /// clock the store and lock were built with.
    ///
    /// # Errors
    /// As [`new`](Self::new).
    pub fn with_clock(
        store: Arc<dyn OutboxStore>,
        lock: Arc<dyn DistributedLock>,
        producer: Arc<dyn Producer>,
        config: RelayConfig,
        clock: SharedClock,
    ) -> Result<Self> {
        config.validate()?;
        match producer.delivery_timeout() {
            Some(t) if t > config.publish_timeout => {
                return Err(Error::config(format!(
                    "the producer may keep an unconfirmed send for {t:?}, longer than the \
                     relay's publish_timeout ({:?}): a send abandoned by the relay could land \
                     after its lease expired; lower the transport's delivery timeout or raise \
                     publish_timeout",
                    config.publish_timeout
                )));
            }
            Some(_) => {}
            None => tracing::debug!(
                "relay: the producer does not bound its delivery time; a send abandoned after \
                 publish_timeout may still reach the broker later"
            ),
        }
        let owner = format!("{}#{:08x}", config.instance_id, fastrand::u32(..));
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                lock,
                producer,
                clock,
                config,
                owner,
                wake: Arc::new(Wake::default()),
                leases: tokio::sync::Mutex::new(Leases::default()),
                flight: Mutex::new(InFlight::default()),
                breaker: Breaker::default(),
                marker: Marker::default(),
                counters: Counters::default(),
                last_published: Mutex::new(None),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
    }

    /// The owner name of this relay's leases: `{instance_id}#{incarnation}`.
    pub fn lease_owner(&self) -> &str {
        &self.inner.owner
    }

    /// A handle to wake this relay after commits.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            wake: self.inner.wake.clone(),
        }
    }

    /// Totals since the relay was created.
    pub fn stats(&self) -> RunReport {
        self.inner.counters.snapshot()
    }

    /// Shards whose lease this relay holds right now.
    pub async fn held_shards(&self) -> Vec<u32> {
        self.inner
            .leases
            .lock()
            .await
            .shards
            .keys()
            .copied()
            .collect()
    }

    /// The relay's state for a health check, with the store's counts read now.
    pub async fn health(&self) -> RelayHealth {
        let (store, store_error) = match self.inner.store.stats().await {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        RelayHealth {
            instance_id: self.inner.config.instance_id.clone(),
            shards: self.held_shards().await,
            circuit_open: self.inner.breaker.open_until().is_some(),
            in_flight: self.inner.flight().len(),
            last_published_at: *self
                .inner
                .last_published
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
            totals: self.stats(),
            store,
            store_error,
        }
    }

    /// Serverless entry point: take every free shard, publish one batch, release the leases.
    ///
    /// # Errors
    /// Store or lock errors (publish failures are recorded on the messages, not returned).
    pub async fn run_once(&self) -> Result<RunReport> {
        let all: Vec<u32> = (0..self.inner.store.shard_count()).collect();
        self.run_once_for(&all).await
    }

    /// Like [`run_once`](Self::run_once), for the given shards only (those that are free);
    /// shards outside `0..shard_count` are ignored. For a wake-up that names shards, such as
    /// a DynamoDB Streams event handed to a function.
    ///
    /// # Errors
    /// Store or lock errors (publish failures are recorded on the messages, not returned).
    pub async fn run_once_for(&self, shards: &[u32]) -> Result<RunReport> {
        let before = self.stats();
        let result = async {
            let sendable = {
                let mut leases = self.inner.leases.lock().await;
                self.inner.acquire_shards(&mut leases, shards).await?;
                leases.sendable(&self.inner, self.inner.clock.now())
            };
            let started = self.pass(&sendable, self.inner.config.batch_size).await?;
            self.join_all(started).await;
            Ok::<_, Error>(())
        }
        .await;
        self.release().await;
        result?;
        Ok(diff(self.stats(), before))
    }

    /// One step of [`run`](Self::run), for tests and manual stepping: maintain leases (renew;
    /// rebalance every third of the TTL), then fetch one batch of the held shards, publish it
    /// and wait until it is marked. Leases are kept. Unlike `run`, a tick does not wait for an
    /// open circuit breaker: calling it is trying now.
    ///
    /// # Errors
    /// `ConfigInvalid` if another live relay uses this `instance_id`; store errors of the
    /// fetch (lease maintenance errors are logged and the held leases used as they are).
    pub async fn tick(&self) -> Result<RunReport> {
        let before = self.stats();
        let sendable = {
            let mut leases = self.inner.leases.lock().await;
            self.maintain_logged(&mut leases, false).await?;
            leases.sendable(&self.inner, self.inner.clock.now())
        };
        let started = self.pass(&sendable, self.inner.config.batch_size).await?;
        self.join_all(started).await;
        let mut leases = self.inner.leases.lock().await;
        let busy = self.inner.flight().busy_shards();
        self.inner.release_drained(&mut leases, &busy).await;
        Ok(diff(self.stats(), before))
    }

    /// Maintain leases now, whatever the schedule: renew, count live relays, release surplus
    /// shards (draining those with work in flight) and take free ones up to the fair share.
    /// Returns the shards held afterwards.
    ///
    /// # Errors
    /// Lock errors; `ConfigInvalid` if another live relay uses this `instance_id`.
    pub async fn rebalance(&self) -> Result<Vec<u32>> {
        let mut leases = self.inner.leases.lock().await;
        let busy = self.inner.flight().busy_shards();
        self.inner.maintain(&mut leases, &busy, true).await?;
        Ok(leases.shards.keys().copied().collect())
    }

    /// Release every lease this relay holds (graceful stop; [`run`](Self::run) does it on
    /// shutdown, after the work in flight finished). Failures are logged: an unreleased lease
    /// simply expires. Do not call it while `run` or `tick` is working.
    pub async fn release(&self) {
        let mut leases = self.inner.leases.lock().await;
        self.inner.release_all(&mut leases).await;
    }

    /// Run until `shutdown` is cancelled: keep a fair share of shard leases, publish due
    /// messages as they are committed (on [`RelayHandle::notify`]) or found by polling, with
    /// fetching, publishing and marking overlapping.
    ///
    /// Store, lock and broker errors are logged and ridden out (the circuit breaker pauses
    /// the relay during outages); they never end the loop. On shutdown no new work starts, the
    /// work in flight finishes and every lease is released.
    ///
    /// # Errors
    /// `ConfigInvalid` if another live relay uses this `instance_id` (checked at start, for up
    /// to one `lease_ttl` in case it is this instance's own crashed predecessor, and at every
    /// renewal).
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RunReport> {
        let before = self.stats();
        let result = self.run_loop(&shutdown).await;
        self.release().await;
        result?;
        Ok(diff(self.stats(), before))
    }

    /// Run [`run`](Self::run) on a tokio task.
    pub fn spawn(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<Result<RunReport>> {
        let relay = self.clone();
        tokio::spawn(async move { relay.run(shutdown).await })
    }

    async fn run_loop(&self, shutdown: &CancellationToken) -> Result<()> {
        let inner = &self.inner;
        let config = &inner.config;
        self.start_leases(shutdown).await?;
        let mut chains: JoinSet<ChainDone> = JoinSet::new();
        let mut fetch: Option<tokio::task::JoinHandle<Result<Started>>> = None;
        let mut want_fetch = true;
        let mut waiting = false;
        let now = Instant::now();
        let mut next_poll = now + config.poll_interval;
        let mut next_maintenance = now + config.renew_every();
        let mut next_stats = now;
        let mut fatal = None;
        loop {
            if fetch.is_none() && want_fetch && inner.breaker.open_until().is_none() {
                let capacity = config.max_in_flight.saturating_sub(inner.flight().len());
                // At the cap the wish stays: the next chain to finish frees room and brings
                // the loop back here (dropping it would idle the relay until the next poll).
                if capacity > 0 {
                    want_fetch = false;
                    fetch = Some(self.spawn_pass(capacity.min(config.batch_size)).await);
                }
            }
            let breaker_open = inner.breaker.open_until();
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(done) = chains.join_next(), if !chains.is_empty() => {
                    if let Ok(done) = done {
                        inner.finish(&done);
                    }
                    // A key that had messages waiting behind this chain is free again.
                    want_fetch |= waiting;
                    let mut leases = inner.leases.lock().await;
                    if !leases.draining.is_empty() {
                        let busy = inner.flight().busy_shards();
                        inner.release_drained(&mut leases, &busy).await;
                    }
                }
                joined = async { fetch.as_mut().expect("guarded by is_some").await }, if fetch.is_some() => {
                    fetch = None;
                    match joined {
                        Ok(Ok(started)) => {
                            // A full read means more may be due: fetch again at once if this
                            // one started something, else as soon as a chain finishes (the
                            // rows it returned were in flight), never in a busy loop.
                            want_fetch |= !started.chains.is_empty() && started.full;
                            waiting = started.waiting || started.full;
                            started.spawn_onto(inner, &mut chains);
                        }
                        Ok(Err(e)) => {
                            if e.is_retryable() {
                                inner.breaker.trip(&config.outage_backoff, "store", &e.to_string());
                            } else {
                                tracing::warn!(error = %e, "relay: fetch failed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "relay: fetch task failed"),
                    }
                }
                _ = inner.wake.notify.notified() => want_fetch = true,
                _ = tokio::time::sleep_until(next_poll) => {
                    next_poll = Instant::now() + config.poll_interval;
                    want_fetch = true;
                }
                _ = tokio::time::sleep_until(breaker_open.unwrap_or(next_poll)), if breaker_open.is_some() => {
                    want_fetch = true;
                }
                _ = tokio::time::sleep_until(next_maintenance) => {
                    let mut leases = inner.leases.lock().await;
                    match self.maintain_logged(&mut leases, true).await {
                        Ok(()) => {}
                        Err(e) => { fatal = Some(e); break; }
                    }
                    let soon = leases.next_maintenance.is_some_and(|t| {
                        t < crate::clock::add_duration(inner.clock.now(), config.renew_every() / 2)
                    });
                    next_maintenance = Instant::now()
                        + if soon { config.renew_every() / 4 } else { config.renew_every() };
                    inner.gauge(names::LEASES_HELD, leases.shards.len() as f64);
                    want_fetch = true;
                }
                _ = tokio::time::sleep_until(next_stats) => {
                    next_stats = Instant::now() + config.stats_interval;
                    let relay = self.clone();
                    tokio::spawn(async move { relay.sample_stats().await });
                }
            }
            inner.gauge(
                names::CIRCUIT_OPEN,
                if inner.breaker.open_until().is_some() {
                    1.0
                } else {
                    0.0
                },
            );
        }
        // Shutdown (or a refused instance id): finish what is in flight, start nothing new.
        if let Some(f) = fetch.take()
            && let Ok(Ok(started)) = f.await
        {
            started.abandon(inner);
        }
        while let Some(done) = chains.join_next().await {
            if let Ok(done) = done {
                inner.finish(&done);
            }
        }
        fatal.map_or(Ok(()), Err)
    }

    /// Take the first leases. A live relay with the same instance id is refused, after
    /// waiting up to one `lease_ttl` for a crashed predecessor's guard to expire.
    async fn start_leases(&self, shutdown: &CancellationToken) -> Result<()> {
        let give_up = Instant::now() + self.inner.config.lease_ttl;
        loop {
            let mut leases = self.inner.leases.lock().await;
            match self.maintain_logged(&mut leases, true).await {
                Err(e) if Instant::now() < give_up && !shutdown.is_cancelled() => {
                    drop(leases);
                    tracing::warn!(error = %e, "relay: waiting for the instance lease");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.inner.config.renew_every() / 4) => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// Maintain leases; only a refused instance id is an error, the rest is logged.
    async fn maintain_logged(&self, leases: &mut Leases, force: bool) -> Result<()> {
        let busy = self.inner.flight().busy_shards();
        match self.inner.maintain(leases, &busy, force).await {
            Err(e) if e.kind() == ErrorKind::ConfigInvalid => Err(e),
            Err(e) => {
                tracing::warn!(error = %e, "relay: lease maintenance failed");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Start a fetch-and-dispatch pass of the sendable shards on its own task.
    async fn spawn_pass(&self, capacity: usize) -> tokio::task::JoinHandle<Result<Started>> {
        let relay = self.clone();
        let woken: BTreeSet<u32> = std::mem::take(
            &mut *self
                .inner
                .wake
                .shards
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        tokio::spawn(async move {
            let sendable = {
                let leases = relay.inner.leases.lock().await;
                leases.sendable(&relay.inner, relay.inner.clock.now())
            };
            // Woken for particular shards: look there first; the next poll sweeps the rest.
            let narrowed: Vec<u32> = sendable
                .iter()
                .copied()
                .filter(|s| woken.contains(s))
                .collect();
            let shards = if narrowed.is_empty() {
                sendable
            } else {
                narrowed
            };
            relay.pass(&shards, capacity).await
        })
    }

    /// Fetch up to `capacity` new messages of `shards` and start their chains. The query asks
    /// for the messages in flight too (they are still pending in the store) and leaves them
    /// out here, with every later message of their keys.
    async fn pass(&self, shards: &[u32], capacity: usize) -> Result<Started> {
        let inner = &self.inner;
        let mut started = Started {
            chains: Vec::new(),
            fetched: 0,
            waiting: false,
            full: false,
        };
        if shards.is_empty() || capacity == 0 {
            return Ok(started);
        }
        let (in_flight, fetch) = {
            let mut flight = inner.flight();
            (flight.len(), flight.fetching())
        };
        let span = tracing::info_span!("outbox.relay.batch", shards = shards.len(), in_flight);
        let limit = capacity.saturating_add(in_flight);
        let batch = inner
            .store
            .fetch_pending(&PendingQuery {
                shards: shards.to_vec(),
                limit,
                ordering: inner.config.ordering,
            })
            .instrument(span.clone())
            .await;
        let batch: Vec<StoredMessage> = match batch {
            Ok(b) if !b.is_empty() => b,
            other => {
                inner.flight().fetched(&fetch);
                return other.map(|_| started);
            }
        };
        started.full = batch.len() >= limit;
        inner.counters.batches.fetch_add(1, AtomicOrdering::Relaxed);
        inner.count(names::BATCHES, 1);
        // Admission is checked against the leases as they are now, after the fetch.
        let leases = inner.leases.lock().await;
        let mut flight = inner.flight();
        let (chains, waiting) = flight.admit(batch, inner.config.ordering, &fetch);
        flight.fetched(&fetch);
        started.waiting = waiting;
        let now = inner.clock.now();
        let mut room = capacity;
        for chain in chains {
            let Some(head) = chain.first() else { continue };
            if room == 0 {
                started.waiting = true;
                break;
            }
            if !leases.may_send(inner, head.shard, now) {
                continue; // lease lost, draining, or too close to expiry: leave it untouched
            }
            room = room.saturating_sub(chain.len());
            started.fetched += chain.len();
            flight.start(&chain, inner.config.ordering);
            started.chains.push(chain);
        }
        span.record("in_flight", flight.len());
        Ok(started)
    }

    async fn join_all(&self, started: Started) {
        let mut tasks = JoinSet::new();
        started.spawn_onto(&self.inner, &mut tasks);
        while let Some(done) = tasks.join_next().await {
            if let Ok(done) = done {
                self.inner.finish(&done);
            }
        }
    }

    /// Sample the store's counts into the gauges.
    async fn sample_stats(&self) {
        match self.inner.store.stats().await {
            Ok(s) => {
                self.inner.gauge(names::PENDING, s.pending as f64);
                self.inner.gauge(names::PARKED_NOW, s.parked as f64);
                self.inner.gauge(
                    names::OLDEST_PENDING_AGE,
                    s.oldest_pending_age.map_or(0.0, |d| d.as_secs_f64()),
                );
            }
            Err(e) => tracing::debug!(error = %e, "relay: could not sample store stats"),
        }
    }
}

impl Inner {
    fn gauge(&self, name: &'static str, value: f64) {
        metrics::gauge!(name, "instance" => self.config.instance_id.clone()).set(value);
    }
}

fn diff(after: RunReport, before: RunReport) -> RunReport {
    RunReport {
        published: after.published - before.published,
        failed: after.failed - before.failed,
        parked: after.parked - before.parked,
        batches: after.batches - before.batches,
    }
}
