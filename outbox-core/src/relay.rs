//! The relay: publishes stored messages to a broker and marks them dispatched.
//!
//! A [`Relay`] is generic over an [`OutboxStore`], a [`DistributedLock`] and a [`Producer`]
//! (all as trait objects). Each cycle it
//!
//! 1. holds leases on a fair share of the store's shards (see *Sharing work* below),
//! 2. fetches a batch of due pending messages of those shards,
//! 3. publishes them with bounded concurrency — the messages of one key one after another, in
//!    store order, stopping the key at its first failure (per-key order, the default),
//! 4. marks the confirmed ones dispatched in one call, and records failures: the message is
//!    retried after an exponential backoff and parked (dead-lettered) after
//!    [`RetryPolicy::max_attempts`]; a permanent publish error parks it at once.
//!
//! **Fast path.** After committing, the application hands the [`Committed`] result to a
//! [`RelayHandle::notify`]; the relay wakes at once and publishes the new messages. Polling
//! every [`RelayConfig::poll_interval`] is the safety net that catches everything else
//! (crashed writers, other processes, retries that became due).
//!
//! **Sharing work.** Several relay instances (processes) may run against one store. Each takes
//! one *member* lease (`{lock_prefix}/member/{n}`), counts the live members, and holds
//! `ceil(shards / members)` *shard* leases (`{lock_prefix}/shard/{n}`), releasing surplus ones
//! so newcomers get theirs. Only the holder of a shard's lease publishes that shard, so two
//! relays never publish the same message concurrently. Leases are renewed every third of
//! their TTL; a relay stops publishing a shard as soon as its lease cannot be renewed, and no
//! publish is started later than [`RelayConfig::publish_timeout`] before the lease expires.
//! A relay that dies loses nothing: its leases expire and another instance (or the restarted
//! one) takes over. Messages it published but had not yet marked are published again
//! (at-least-once; consumers deduplicate with the inbox).
//!
//! **Serverless.** [`Relay::run_once`] takes the free shards, drains one batch, releases the
//! leases and returns: one function invocation.
//!
//! **Shutdown.** [`Relay::run`] stops when its [`CancellationToken`] is cancelled: the batch
//! in flight finishes, then every lease is released.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::clock::{SharedClock, SystemClock, add_duration};
use crate::error::{Error, ErrorKind, Result};
use crate::lock::{DistributedLock, Lease};
use crate::message::{MessageId, StoredMessage};
use crate::store::{FailedAttempt, FailureOutcome, Ordering, OutboxStore, PendingQuery};
use crate::transport::Producer;
use crate::tx::Committed;

/// When to retry a failed publish, and when to give up.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Park a message after this many failed attempts. Default 10.
    pub max_attempts: u32,
    /// Delay after the first failure. Default 1 s.
    pub initial_backoff: Duration,
    /// Upper bound of the delay. Default 5 min.
    pub max_backoff: Duration,
    /// Growth factor per failure. Default 2.
    pub multiplier: f64,
    /// Randomise each delay between 50 % and 100 % of its value, so many failing messages do not
    /// retry in lockstep. Default true.
    pub jitter: bool,
    /// Park at once on a permanent publish error (`!is_retryable()`, e.g. too large for the
    /// broker, unroutable) instead of retrying. Default true. `requeue` brings parked messages
    /// back after the cause is fixed.
    pub park_on_permanent: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: true,
            park_on_permanent: true,
        }
    }
}

impl RetryPolicy {
    /// The delay before the next attempt after `attempts` failures (1 = first failure).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exp = attempts.saturating_sub(1).min(64) as i32;
        let max = self.max_backoff.as_secs_f64();
        let base = (self.initial_backoff.as_secs_f64() * self.multiplier.max(1.0).powi(exp))
            .min(max)
            .max(0.0);
        let secs = if self.jitter {
            base * (0.5 + 0.5 * fastrand::f64())
        } else {
            base
        };
        Duration::from_secs_f64(secs)
    }

    fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts must be at least 1"));
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return Err(Error::config(format!(
                "retry.multiplier must be a finite number >= 1, got {}",
                self.multiplier
            )));
        }
        if self.initial_backoff > self.max_backoff {
            return Err(Error::config(
                "retry.initial_backoff must not exceed retry.max_backoff",
            ));
        }
        Ok(())
    }
}

/// Every knob of the relay, with production defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct RelayConfig {
    /// Name of this instance in leases. Default: `relay-<uuid>`; unique per process.
    pub instance_id: String,
    /// Messages fetched per batch. Default 100.
    pub batch_size: usize,
    /// Most publishes in flight at once (keys published concurrently). Default 64.
    pub max_in_flight: usize,
    /// How often to look for due messages when not woken. Default 500 ms.
    pub poll_interval: Duration,
    /// Lease time-to-live; renewed every third of it. Default 30 s.
    pub lease_ttl: Duration,
    /// Longest wait for one broker confirmation; must be less than a third of `lease_ttl`.
    /// Default 10 s.
    pub publish_timeout: Duration,
    /// Retry and parking policy.
    pub retry: RetryPolicy,
    /// Per-key ordering (default) or none.
    pub ordering: Ordering,
    /// Prefix of lease names, to run independent relays against one lock. Default `outbox`.
    pub lock_prefix: String,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            instance_id: format!("relay-{}", uuid::Uuid::now_v7().simple()),
            batch_size: 100,
            max_in_flight: 64,
            poll_interval: Duration::from_millis(500),
            lease_ttl: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            ordering: Ordering::PerKey,
            lock_prefix: "outbox".to_owned(),
        }
    }
}

impl RelayConfig {
    /// Check the configuration; [`Relay::new`] calls it.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the offending field.
    pub fn validate(&self) -> Result<()> {
        if self.instance_id.is_empty() {
            return Err(Error::config("instance_id must not be empty"));
        }
        if self.lock_prefix.is_empty() {
            return Err(Error::config("lock_prefix must not be empty"));
        }
        if self.batch_size == 0 {
            return Err(Error::config("batch_size must be at least 1"));
        }
        if self.max_in_flight == 0 {
            return Err(Error::config("max_in_flight must be at least 1"));
        }
        if self.poll_interval.is_zero() {
            return Err(Error::config("poll_interval must be greater than zero"));
        }
        if self.lease_ttl < Duration::from_millis(30) {
            return Err(Error::config("lease_ttl must be at least 30 ms"));
        }
        if self.publish_timeout.is_zero() || self.publish_timeout * 3 > self.lease_ttl {
            return Err(Error::config(format!(
                "publish_timeout ({:?}) must be non-zero and at most a third of lease_ttl ({:?})",
                self.publish_timeout, self.lease_ttl
            )));
        }
        self.retry.validate()
    }

    fn renew_every(&self) -> Duration {
        self.lease_ttl / 3
    }
}

/// What a relay did: per call of [`Relay::run_once`], or in total for [`Relay::run`] and
/// [`Relay::stats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunReport {
    /// Messages confirmed by the broker and marked dispatched.
    pub published: u64,
    /// Failed publish attempts (each scheduled for retry or parked).
    pub failed: u64,
    /// Messages parked (dead-lettered) after their last failure.
    pub parked: u64,
    /// Batches fetched.
    pub batches: u64,
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
        self.wake
            .shards
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(committed.shards.iter().copied());
        self.wake.notify.notify_one();
    }

    /// Wake the relay to publish the new messages of these shards now (for a wake-up signal
    /// that names shards, such as a DynamoDB stream record). Never blocks.
    pub fn notify_shards(&self, shards: impl IntoIterator<Item = u32>) {
        let mut woken = self.wake.shards.lock().unwrap_or_else(|p| p.into_inner());
        let before = woken.len();
        woken.extend(shards);
        let any = woken.len() > before;
        drop(woken);
        if any {
            self.wake.notify.notify_one();
        }
    }

    /// Wake the relay to sweep every shard it holds now.
    pub fn wake(&self) {
        self.wake.notify.notify_one();
    }
}

#[derive(Debug, Default)]
struct Leases {
    member: Option<Lease>,
    shards: BTreeMap<u32, Lease>,
    next_rebalance: Option<DateTime<Utc>>,
}

struct Inner {
    store: Arc<dyn OutboxStore>,
    lock: Arc<dyn DistributedLock>,
    producer: Arc<dyn Producer>,
    clock: SharedClock,
    config: RelayConfig,
    wake: Arc<Wake>,
    leases: tokio::sync::Mutex<Leases>,
    counters: Counters,
}

/// Publishes stored messages; see the [module docs](self). Cheap to clone (clones share state).
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

/// Messages published one after another (one key), or alone.
type Chain = Vec<StoredMessage>;

enum Published {
    Ok(MessageId),
    Failed(Box<StoredMessage>, Error),
}

impl Relay {
    /// A relay publishing from `store` to `producer`, coordinating through `lock`.
    ///
    /// # Errors
    /// `ConfigInvalid` if `config` is invalid (see [`RelayConfig::validate`]).
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
    /// `ConfigInvalid` if `config` is invalid (see [`RelayConfig::validate`]).
    pub fn with_clock(
        store: Arc<dyn OutboxStore>,
        lock: Arc<dyn DistributedLock>,
        producer: Arc<dyn Producer>,
        config: RelayConfig,
        clock: SharedClock,
    ) -> Result<Self> {
        config.validate()?;
        Ok(Relay {
            inner: Arc::new(Inner {
                store,
                lock,
                producer,
                clock,
                config,
                wake: Arc::new(Wake::default()),
                leases: tokio::sync::Mutex::new(Leases::default()),
                counters: Counters::default(),
            }),
        })
    }

    /// The configuration in force.
    pub fn config(&self) -> &RelayConfig {
        &self.inner.config
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
        let mut leases = self.inner.leases.lock().await;
        let result = async {
            self.inner.acquire_shards(&mut leases, shards).await?;
            let shards: Vec<u32> = leases.shards.keys().copied().collect();
            let deadline = self.inner.publish_deadline(&leases);
            self.inner.pass(&shards, deadline).await
        }
        .await;
        self.inner.release_all(&mut leases).await;
        result?;
        Ok(diff(self.stats(), before))
    }

    /// One step of [`run`](Self::run): maintain leases (renew; rebalance every third of the
    /// TTL), then publish one batch of the held shards. Leases are kept.
    ///
    /// # Errors
    /// Store errors of the batch (lease maintenance errors are logged and the held leases
    /// used as they are).
    pub async fn tick(&self) -> Result<RunReport> {
        self.tick_shards(&BTreeSet::new()).await.map(|(r, _)| r)
    }

    async fn tick_shards(&self, woken: &BTreeSet<u32>) -> Result<(RunReport, usize)> {
        let before = self.stats();
        let inner = &self.inner;
        let mut leases = inner.leases.lock().await;
        if let Err(e) = inner.maintain(&mut leases, false).await {
            tracing::warn!(error = %e, "relay: lease maintenance failed");
        }
        let held: Vec<u32> = leases.shards.keys().copied().collect();
        // Woken for particular shards: look there first; otherwise sweep all held shards.
        let narrowed: Vec<u32> = held.iter().copied().filter(|s| woken.contains(s)).collect();
        let shards = if narrowed.is_empty() { held } else { narrowed };
        let deadline = inner.publish_deadline(&leases);
        drop(leases);
        let n = inner.pass(&shards, deadline).await?;
        Ok((diff(self.stats(), before), n))
    }

    /// Maintain leases now, whatever the schedule: renew, count live relays, release surplus
    /// shards and take free ones up to the fair share. Returns the shards held afterwards.
    ///
    /// # Errors
    /// Lock errors.
    pub async fn rebalance(&self) -> Result<Vec<u32>> {
        let mut leases = self.inner.leases.lock().await;
        self.inner.maintain(&mut leases, true).await?;
        Ok(leases.shards.keys().copied().collect())
    }

    /// Release every lease this relay holds (graceful stop; [`run`](Self::run) does it on
    /// shutdown). Failures are logged: an unreleased lease simply expires.
    pub async fn release(&self) {
        let mut leases = self.inner.leases.lock().await;
        self.inner.release_all(&mut leases).await;
    }

    /// Run until `shutdown` is cancelled: keep a fair share of shard leases, publish due
    /// messages as they are committed (on [`RelayHandle::notify`]) or found by polling.
    ///
    /// Store, lock and broker errors are logged and retried after the poll interval; they
    /// never end the loop. On shutdown the batch in flight finishes and every lease is
    /// released.
    ///
    /// # Errors
    /// None at present; the `Result` leaves room for fatal conditions.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<RunReport> {
        let before = self.stats();
        let inner = &self.inner;
        // Start with a tick: take leases and publish what is already due, then wait.
        let mut drained = false;
        while !shutdown.is_cancelled() {
            if drained {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(inner.config.poll_interval) => {}
                    _ = inner.wake.notify.notified() => {}
                }
            }
            let woken: BTreeSet<u32> =
                std::mem::take(&mut *inner.wake.shards.lock().unwrap_or_else(|p| p.into_inner()));
            drained = match self.tick_shards(&woken).await {
                Ok((_, n)) => n < inner.config.batch_size,
                Err(e) => {
                    tracing::warn!(error = %e, "relay: batch failed; retrying after poll interval");
                    true
                }
            };
        }
        self.release().await;
        Ok(diff(self.stats(), before))
    }

    /// Run [`run`](Self::run) on a tokio task.
    pub fn spawn(&self, shutdown: CancellationToken) -> tokio::task::JoinHandle<Result<RunReport>> {
        let relay = self.clone();
        tokio::spawn(async move { relay.run(shutdown).await })
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

impl Inner {
    fn shard_resource(&self, shard: u32) -> String {
        format!("{}/shard/{shard}", self.config.lock_prefix)
    }

    fn member_resource(&self, slot: u32) -> String {
        format!("{}/member/{slot}", self.config.lock_prefix)
    }

    /// Latest instant at which a publish may start: the earliest shard lease expiry minus
    /// the publish timeout.
    fn publish_deadline(&self, leases: &Leases) -> DateTime<Utc> {
        let earliest = leases
            .shards
            .values()
            .map(|l| l.expires_at)
            .min()
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        chrono::Duration::from_std(self.config.publish_timeout)
            .ok()
            .and_then(|d| earliest.checked_sub_signed(d))
            .unwrap_or(earliest)
    }

    /// Renew what is held, and every third of the TTL rebalance: count members, release
    /// surplus shards, take free ones up to the fair share.
    async fn maintain(&self, leases: &mut Leases, force: bool) -> Result<()> {
        let now = self.clock.now();
        if !force && leases.next_rebalance.is_some_and(|t| now < t) {
            return Ok(());
        }
        leases.next_rebalance = Some(add_duration(now, self.config.renew_every()));
        let ttl = self.config.lease_ttl;
        let owner = self.config.instance_id.as_str();
        let shard_count = self.store.shard_count();

        // 1. membership
        leases.member = match leases.member.take() {
            Some(l) => self.renew_or_drop(l).await,
            None => None,
        };
        if leases.member.is_none() {
            for slot in 0..shard_count {
                if let Some(l) = self
                    .lock
                    .acquire(&self.member_resource(slot), owner, ttl)
                    .await?
                {
                    leases.member = Some(l);
                    break;
                }
            }
        }
        let Some(member) = &leases.member else {
            // More relays than shards: stand by.
            self.release_shards(leases).await;
            return Ok(());
        };
        let my_slot = member
            .resource
            .rsplit('/')
            .next()
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(0);
        // Live members, and how many of them have a lower slot than ours.
        let (mut members, mut rank) = (0u32, 0u32);
        for slot in 0..shard_count {
            let live = slot == my_slot
                || self
                    .lock
                    .current(&self.member_resource(slot))
                    .await?
                    .is_some();
            if live {
                members += 1;
                if slot < my_slot {
                    rank += 1;
                }
            }
        }
        let target = fair_share(shard_count, members, rank);

        // 2. renew held shards
        let held = std::mem::take(&mut leases.shards);
        for (shard, lease) in held {
            if let Some(l) = self.renew_or_drop(lease).await {
                leases.shards.insert(shard, l);
            }
        }
        // 3. release surplus
        while leases.shards.len() > target {
            if let Some((_, lease)) = leases.shards.pop_last() {
                self.release_quietly(&lease).await;
            }
        }
        // 4. take free shards up to the target, starting at this member's natural range
        let start = rank.saturating_mul(shard_count / members);
        self.acquire_free_shards(leases, Some((target, start)))
            .await
    }

    /// Acquire free shard leases: up to `limit.0` held in total, scanning from shard `limit.1`
    /// (wrapping). `None`: every free shard.
    async fn acquire_free_shards(
        &self,
        leases: &mut Leases,
        limit: Option<(usize, u32)>,
    ) -> Result<()> {
        let shard_count = self.store.shard_count();
        let (target, start) = limit.unwrap_or((shard_count as usize, 0));
        for i in 0..shard_count {
            if leases.shards.len() >= target {
                break;
            }
            let shard = (start + i) % shard_count;
            if leases.shards.contains_key(&shard) {
                continue;
            }
            if let Some(l) = self
                .lock
                .acquire(
                    &self.shard_resource(shard),
                    &self.config.instance_id,
                    self.config.lease_ttl,
                )
                .await?
            {
                leases.shards.insert(shard, l);
            }
        }
        Ok(())
    }

    /// Acquire the free ones of `shards` (unknown shard numbers are ignored).
    async fn acquire_shards(&self, leases: &mut Leases, shards: &[u32]) -> Result<()> {
        let shard_count = self.store.shard_count();
        let wanted: BTreeSet<u32> = shards
            .iter()
            .copied()
            .filter(|s| *s < shard_count)
            .collect();
        for shard in wanted {
            if leases.shards.contains_key(&shard) {
                continue;
            }
            if let Some(l) = self
                .lock
                .acquire(
                    &self.shard_resource(shard),
                    &self.config.instance_id,
                    self.config.lease_ttl,
                )
                .await?
            {
                leases.shards.insert(shard, l);
            }
        }
        Ok(())
    }

    async fn renew_or_drop(&self, lease: Lease) -> Option<Lease> {
        match self.lock.renew(&lease, self.config.lease_ttl).await {
            Ok(l) => Some(l),
            Err(e) => {
                if e.kind() == ErrorKind::LeaseLost {
                    tracing::info!(resource = %lease.resource, "relay: lease lost");
                    None
                } else {
                    tracing::warn!(resource = %lease.resource, error = %e, "relay: renew failed");
                    // Keep it only while it is certainly still ours.
                    (lease.expires_at > self.clock.now()).then_some(lease)
                }
            }
        }
    }

    async fn release_quietly(&self, lease: &Lease) {
        if let Err(e) = self.lock.release(lease).await {
            tracing::debug!(resource = %lease.resource, error = %e, "relay: release failed");
        }
    }

    async fn release_shards(&self, leases: &mut Leases) {
        for (_, lease) in std::mem::take(&mut leases.shards) {
            self.release_quietly(&lease).await;
        }
    }

    async fn release_all(&self, leases: &mut Leases) {
        self.release_shards(leases).await;
        if let Some(m) = leases.member.take() {
            self.release_quietly(&m).await;
        }
        leases.next_rebalance = None;
    }

    /// Fetch one batch of the given shards and publish it. Returns the batch size.
    async fn pass(&self, shards: &[u32], deadline: DateTime<Utc>) -> Result<usize> {
        if shards.is_empty() {
            return Ok(0);
        }
        let batch = self
            .store
            .fetch_pending(&PendingQuery {
                shards: shards.to_vec(),
                limit: self.config.batch_size,
                ordering: self.config.ordering,
            })
            .await?;
        let n = batch.len();
        if n == 0 {
            return Ok(0);
        }
        self.counters.batches.fetch_add(1, AtomicOrdering::Relaxed);
        let results = self
            .publish(chains(batch, self.config.ordering), deadline)
            .await;

        let mut dispatched = Vec::with_capacity(n);
        let mut failed = Vec::new();
        for r in results {
            match r {
                Published::Ok(id) => dispatched.push(id),
                Published::Failed(m, e) => failed.push((m, e)),
            }
        }
        if !dispatched.is_empty() {
            self.store.mark_dispatched(&dispatched).await?;
            self.counters
                .published
                .fetch_add(dispatched.len() as u64, AtomicOrdering::Relaxed);
        }
        for (m, e) in failed {
            self.record_failure(&m, &e).await?;
        }
        Ok(n)
    }

    async fn publish(&self, chains: Vec<Chain>, deadline: DateTime<Utc>) -> Vec<Published> {
        let timeout = self.config.publish_timeout;
        let producer = &self.producer;
        let clock = &self.clock;
        futures::stream::iter(chains)
            .map(|chain| async move {
                let mut out = Vec::with_capacity(chain.len());
                for m in chain {
                    if clock.now() > deadline {
                        // Our lease may lapse before a confirmation could arrive: leave the
                        // rest for the next holder (or our next cycle), untouched.
                        break;
                    }
                    let res = match tokio::time::timeout(timeout, producer.send(&m.message)).await {
                        Ok(r) => r,
                        Err(_) => Err(Error::unavailable(format!(
                            "broker did not confirm within {timeout:?}"
                        ))),
                    };
                    match res {
                        Ok(()) => out.push(Published::Ok(m.message.id)),
                        Err(e) => {
                            // Later messages of this key wait for this one.
                            out.push(Published::Failed(Box::new(m), e));
                            break;
                        }
                    }
                }
                out
            })
            .buffer_unordered(self.config.max_in_flight)
            .flat_map(futures::stream::iter)
            .collect()
            .await
    }

    async fn record_failure(&self, m: &StoredMessage, e: &Error) -> Result<()> {
        let retry = &self.config.retry;
        let attempts = m.attempts.saturating_add(1);
        let max_attempts = if retry.park_on_permanent && !e.is_retryable() {
            attempts // park now
        } else {
            retry.max_attempts
        };
        let outcome = self
            .store
            .mark_failed(
                m.message.id,
                &FailedAttempt {
                    error: e.to_string(),
                    next_attempt_at: add_duration(self.clock.now(), retry.backoff(attempts)),
                    max_attempts,
                },
            )
            .await?;
        self.counters.failed.fetch_add(1, AtomicOrdering::Relaxed);
        match outcome {
            FailureOutcome::Parked { attempts } => {
                self.counters.parked.fetch_add(1, AtomicOrdering::Relaxed);
                tracing::warn!(message_id = %m.message.id, topic = %m.message.topic, attempts,
                    error = %e, "relay: message parked");
            }
            FailureOutcome::Retrying {
                attempts,
                next_attempt_at,
            } => {
                tracing::debug!(message_id = %m.message.id, attempts, %next_attempt_at,
                    error = %e, "relay: publish failed; will retry");
            }
            FailureOutcome::NotPending => {}
        }
        Ok(())
    }
}

/// Shards the member of rank `rank` (0-based, by member slot) should hold when `members`
/// relays share `shards`: `shards / members`, plus one for the first `shards % members` ranks,
/// so the shares add up to exactly `shards` and differ by at most one.
fn fair_share(shards: u32, members: u32, rank: u32) -> usize {
    let members = members.max(1);
    (shards / members + u32::from(rank < shards % members)) as usize
}

/// Split a batch (in store order) into chains published one after another: one per key with
/// [`Ordering::PerKey`], one per message otherwise.
fn chains(batch: Vec<StoredMessage>, ordering: Ordering) -> Vec<Chain> {
    let mut out: Vec<Chain> = Vec::new();
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for m in batch {
        match (&m.message.key, ordering) {
            (Some(k), Ordering::PerKey) => match by_key.get(k) {
                Some(&i) => out[i].push(m),
                None => {
                    by_key.insert(k.clone(), out.len());
                    out.push(vec![m]);
                }
            },
            _ => out.push(vec![m]),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            jitter: false,
            ..RetryPolicy::default()
        };
        assert_eq!(p.backoff(1), Duration::from_secs(1));
        assert_eq!(p.backoff(2), Duration::from_secs(2));
        assert_eq!(p.backoff(4), Duration::from_secs(8));
        assert_eq!(p.backoff(40), Duration::from_secs(300));
        assert_eq!(p.backoff(u32::MAX), Duration::from_secs(300));
        let j = RetryPolicy::default();
        for _ in 0..100 {
            let d = j.backoff(3);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
    }

    #[test]
    fn fair_shares_cover_every_shard_and_differ_by_at_most_one() {
        for shards in 1..40u32 {
            for members in 1..12u32 {
                let shares: Vec<usize> = (0..members)
                    .map(|r| fair_share(shards, members, r))
                    .collect();
                assert_eq!(shares.iter().sum::<usize>(), shards as usize);
                let (min, max) = (shares.iter().min(), shares.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{shares:?}");
            }
        }
        assert_eq!(fair_share(4, 3, 0), 2);
        assert_eq!(fair_share(4, 3, 2), 1);
    }

    #[test]
    fn config_validation_names_the_field() {
        let bad = RelayConfig {
            batch_size: 0,
            ..RelayConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("batch_size")
        );
        let bad = RelayConfig {
            publish_timeout: Duration::from_secs(20),
            ..RelayConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("publish_timeout")
        );
        let bad = RelayConfig {
            retry: RetryPolicy {
                multiplier: f64::NAN,
                ..RetryPolicy::default()
            },
            ..RelayConfig::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("multiplier")
        );
        RelayConfig::default().validate().unwrap();
    }
}
