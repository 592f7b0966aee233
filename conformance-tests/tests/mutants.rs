//! The suite must be able to fail: each test here breaks one behaviour of a backend (a
//! "mutant": a wrapper around the in-memory backend, a small flawed inbox or lock, or a
//! flawed producer in front of the in-memory broker) and
//! checks that the cases meant to catch it panic, while the same cases pass on the unbroken
//! baseline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_conformance::{
    BusinessRecords, Fixture, SetupContext, TransportHarness, inbox, lock, store, transport, tx,
};
use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
use outbox_core::{
    Capabilities, Clock, Committed, Consumer, DateTime, DistributedLock, Error, ErrorKind,
    FailedAttempt, FailureOutcome, InboxEntry, InboxStore, InsertOutcome, Lease, ListQuery,
    Message, MessageId, MessageStatus, Ordering, OutboxStats, OutboxStore, PendingQuery, Producer,
    RequeueFilter, Result, StoredMessage, Transaction, TransactionalStore, Utc, add_duration,
    async_trait, inbox_expiry,
};

/// One broken behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flaw {
    /// No flaw: the memory backend behind the wrappers.
    None,
    FetchAllShards,
    FetchUnordered,
    FetchReversed,
    FetchById,
    FetchNoLimit,
    FetchNotDue,
    BatchNotAtomic,
    SwallowDuplicate,
    DispatchNoop,
    NeverPark,
    RequeueNoop,
    AgeBySequence,
    PurgeNoLimit,
    PurgeNoRetention,
    NoSizeCheck,
    MillisTimestamps,
    WrongShard,
    ListIgnoresTopic,
    ListIgnoresKey,
    NoBatchLimitCheck,
    TxAddImmediate,
    TxCommitReversesAdds,
    TxCommittedIdsReversed,
    /// A failed add or inbox insert leaves the transaction usable (invalid input and stored
    /// ids rejected before the transaction sees them), so commit writes the rest.
    TxFailureKeepsTxUsable,
    /// NUL is stripped from header values instead of refused (a backend that sanitizes).
    StripsNul,
    /// Topics come back cut to 255 bytes (a backend with a shorter column).
    TruncatesTopic,
    /// `last_error` comes back cut to 255 bytes.
    TruncatesLastError,
    /// No flaw: the suite's own correct inbox (baseline of the inbox flaws).
    InboxBaseline,
    InboxNoExpiry,
    InboxRacy,
    InboxIgnoresHandlerKey,
    InboxPurgesLive,
    /// `purge_expired` deletes nothing and returns 0 (a backend that leaves it to a TTL).
    InboxPurgesNothing,
    /// Only an empty handler key is refused (NUL and over-long keys are stored).
    InboxOnlyEmptyKeyRule,
    /// Handler keys are cut to 255 bytes (a shorter key column).
    InboxTruncatesKeys,
    /// No flaw: the suite's own correct lock (baseline of the lock flaws).
    LockBaseline,
    LockNoExpiry,
    LockSameToken,
    LockNoOwnerCheck,
    LockRacy,
    LockNoValidation,
    LockRenewKeepsExpiry,
    /// Names are limited by characters, not bytes, and NUL is accepted.
    LockNameRuleCountsChars,
    /// Resource names are cut to 255 bytes.
    LockTruncatesNames,
}

/// `s` cut to at most `max` bytes, on a character boundary.
fn truncated(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

/// `m` with NUL removed from its header values.
fn strip_nul(m: &Message) -> Message {
    let mut m = m.clone();
    for v in m.headers.values_mut() {
        *v = v.replace('\0', "");
    }
    m
}

impl Flaw {
    fn baseline(self) -> Flaw {
        let name = format!("{self:?}");
        if name.starts_with("Inbox") {
            Flaw::InboxBaseline
        } else if name.starts_with("Lock") {
            Flaw::LockBaseline
        } else {
            Flaw::None
        }
    }

    fn is_inbox(self) -> bool {
        self.baseline() == Flaw::InboxBaseline
    }

    fn is_lock(self) -> bool {
        self.baseline() == Flaw::LockBaseline
    }
}

// ---------------------------------------------------------------------------------------------
// Outbox store and transactions.

#[derive(Debug, Clone)]
struct Mutant {
    inner: MemoryStore,
    flaw: Flaw,
    own_inbox: Option<Arc<OwnInbox>>,
}

const SIZE_LIMIT: usize = 64 * 1024;
/// The wrapper enforces this batch limit itself (the memory backend has none).
const BATCH_LIMIT: usize = 8;

#[async_trait]
impl OutboxStore for Mutant {
    fn capabilities(&self) -> Capabilities {
        let caps = self.inner.capabilities().with_max_batch(Some(BATCH_LIMIT));
        let caps = if self.flaw == Flaw::NoSizeCheck {
            caps.with_max_message_size(Some(SIZE_LIMIT))
        } else {
            caps
        };
        // The own inbox does not take part in memory transactions.
        caps.with_transactions(caps.transactions && self.own_inbox.is_none())
    }
    fn shard_count(&self) -> u32 {
        self.inner.shard_count()
    }
    async fn add(&self, m: &Message) -> Result<()> {
        let stripped;
        let m = if self.flaw == Flaw::StripsNul {
            stripped = strip_nul(m);
            &stripped
        } else {
            m
        };
        match self.inner.add(m).await {
            Err(e)
                if self.flaw == Flaw::SwallowDuplicate && e.kind() == ErrorKind::AlreadyExists =>
            {
                Ok(())
            }
            r => r,
        }
    }
    async fn add_batch(&self, ms: &[Message]) -> Result<()> {
        if ms.len() > BATCH_LIMIT && self.flaw != Flaw::NoBatchLimitCheck {
            let kind = ErrorKind::LimitExceeded {
                count: ms.len(),
                limit: BATCH_LIMIT,
            };
            return Err(Error::new(kind, "batch over the limit"));
        }
        if self.flaw == Flaw::StripsNul {
            let ms: Vec<Message> = ms.iter().map(strip_nul).collect();
            return self.inner.add_batch(&ms).await;
        }
        if self.flaw == Flaw::BatchNotAtomic {
            for m in ms {
                self.inner.add(m).await?;
            }
            return Ok(());
        }
        self.inner.add_batch(ms).await
    }
    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        let got = self.inner.get(id).await?;
        Ok(got.map(|mut s| {
            if self.flaw == Flaw::MillisTimestamps {
                let ms = s.message.created_at.timestamp_millis();
                s.message.created_at = DateTime::from_timestamp_millis(ms).unwrap_or_default();
            }
            if self.flaw == Flaw::TruncatesTopic {
                s.message.topic = truncated(&s.message.topic, 255);
            }
            if self.flaw == Flaw::TruncatesLastError {
                s.last_error = s.last_error.map(|e| truncated(&e, 255));
            }
            if self.flaw == Flaw::WrongShard && s.message.key.is_none() {
                s.shard = (s.shard + 1) % self.inner.shard_count();
            }
            s
        }))
    }
    async fn fetch_pending(&self, q: &PendingQuery) -> Result<Vec<StoredMessage>> {
        let mut q = q.clone();
        match self.flaw {
            Flaw::FetchAllShards => q.shards = (0..self.inner.shard_count()).collect(),
            Flaw::FetchUnordered => q.ordering = Ordering::Unordered,
            Flaw::FetchNoLimit => q.limit = 10_000,
            Flaw::FetchNotDue => {
                let all = self
                    .inner
                    .list(&ListQuery {
                        status: Some(MessageStatus::Pending),
                        topic: None,
                        key: None,
                        limit: 10_000,
                    })
                    .await?;
                return Ok(all
                    .into_iter()
                    .filter(|m| q.shards.contains(&m.shard))
                    .take(q.limit)
                    .collect());
            }
            _ => {}
        }
        let mut got = self.inner.fetch_pending(&q).await?;
        if self.flaw == Flaw::FetchReversed {
            got.reverse();
        }
        if self.flaw == Flaw::FetchById {
            got.sort_by_key(|m| m.message.id);
        }
        Ok(got)
    }
    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        if self.flaw == Flaw::DispatchNoop {
            return Ok(());
        }
        self.inner.mark_dispatched(ids).await
    }
    async fn mark_failed(&self, id: MessageId, a: &FailedAttempt) -> Result<FailureOutcome> {
        let mut a = a.clone();
        if self.flaw == Flaw::NeverPark {
            a.max_attempts = u32::MAX;
        }
        self.inner.mark_failed(id, &a).await
    }
    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        if self.flaw == Flaw::RequeueNoop {
            return Ok(0);
        }
        self.inner.requeue(filter).await
    }
    async fn stats(&self) -> Result<OutboxStats> {
        let mut stats = self.inner.stats().await?;
        if self.flaw == Flaw::AgeBySequence {
            let q = ListQuery {
                status: Some(MessageStatus::Pending),
                topic: None,
                key: None,
                limit: 1,
            };
            let first = self.inner.list(&q).await?;
            stats.oldest_pending_age = first.first().and_then(|m| {
                (self.inner.clock().now() - m.message.created_at)
                    .to_std()
                    .ok()
            });
        }
        Ok(stats)
    }
    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        match self.flaw {
            Flaw::PurgeNoLimit => self.inner.purge_dispatched(retention, 10_000).await,
            Flaw::PurgeNoRetention => self.inner.purge_dispatched(Duration::ZERO, limit).await,
            _ => self.inner.purge_dispatched(retention, limit).await,
        }
    }
    async fn list(&self, q: &ListQuery) -> Result<Vec<StoredMessage>> {
        let mut q = q.clone();
        if self.flaw == Flaw::ListIgnoresTopic {
            q.topic = None;
        }
        if self.flaw == Flaw::ListIgnoresKey {
            q.key = None;
        }
        self.inner.list(&q).await
    }
}

struct MutantTx {
    inner: MemoryTx,
    store: Mutant,
    staged: Vec<Message>,
}

#[async_trait]
impl Transaction for MutantTx {
    async fn add(&mut self, m: &Message) -> Result<()> {
        match self.store.flaw {
            Flaw::TxAddImmediate => self.store.inner.add(m).await,
            Flaw::TxFailureKeepsTxUsable => {
                m.validate()?;
                if self.store.inner.get(m.id).await?.is_some() {
                    return Err(Error::new(ErrorKind::AlreadyExists, "stored id"));
                }
                self.inner.add(m).await
            }
            Flaw::TxCommitReversesAdds => {
                self.staged.push(m.clone());
                Ok(())
            }
            _ => self.inner.add(m).await,
        }
    }
    async fn inbox_insert(&mut self, e: &InboxEntry) -> Result<InsertOutcome> {
        if self.store.flaw == Flaw::TxFailureKeepsTxUsable && e.handler_key.is_empty() {
            return Err(Error::invalid_input("empty handler key"));
        }
        self.inner.inbox_insert(e).await
    }
    async fn commit(mut self) -> Result<Committed> {
        for m in self.staged.iter().rev() {
            self.inner.add(m).await?;
        }
        let mut committed = self.inner.commit().await?;
        if self.store.flaw == Flaw::TxCommittedIdsReversed {
            committed.ids.reverse();
        }
        Ok(committed)
    }
    async fn rollback(self) -> Result<()> {
        self.inner.rollback().await
    }
}

#[async_trait]
impl TransactionalStore for Mutant {
    type Tx = MutantTx;
    async fn begin(&self) -> Result<MutantTx> {
        Ok(MutantTx {
            inner: self.inner.begin().await?,
            store: self.clone(),
            staged: Vec::new(),
        })
    }
}

struct Records(MemoryStore);

#[async_trait]
impl BusinessRecords<MutantTx> for Records {
    async fn write(&self, tx: &mut MutantTx, key: &str) -> Result<()> {
        tx.inner.put_record(key, "x");
        Ok(())
    }
    async fn exists(&self, key: &str) -> Result<bool> {
        Ok(self.0.record(key).is_some())
    }
}

// ---------------------------------------------------------------------------------------------
// A small inbox of our own, correct unless flawed.

/// The window of a check-then-act flaw, made deterministic: each caller that has checked waits
/// until a second caller has checked too (or 2 s pass, for a caller that is alone), so two
/// concurrent callers always both see the state before either acts. A bare `yield_now` let one
/// task finish before the others were scheduled on a loaded machine, and the flaw went unseen.
#[derive(Debug, Default)]
struct Racers(std::sync::atomic::AtomicUsize);

impl Racers {
    async fn meet(&self) {
        use std::sync::atomic::Ordering;
        self.0.fetch_add(1, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.0.load(Ordering::SeqCst) < 2 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

#[derive(Debug)]
struct OwnInbox {
    clock: Arc<dyn Clock>,
    retention: Duration,
    flaw: Flaw,
    entries: Mutex<HashMap<(MessageId, String), DateTime<Utc>>>,
    racers: Racers,
}

impl OwnInbox {
    fn key(&self, e: &InboxEntry) -> (MessageId, String) {
        let handler = match self.flaw {
            Flaw::InboxIgnoresHandlerKey => String::new(),
            Flaw::InboxTruncatesKeys => truncated(&e.handler_key, 255),
            _ => e.handler_key.clone(),
        };
        (e.message_id, handler)
    }
    fn check(&self, e: &InboxEntry) -> Result<()> {
        if self.flaw == Flaw::InboxOnlyEmptyKeyRule {
            if e.handler_key.is_empty() {
                return Err(Error::invalid_input("empty handler key"));
            }
            return Ok(());
        }
        outbox_core::rules::check_inbox_entry(e)
    }
    fn live(&self, at: Option<&DateTime<Utc>>) -> bool {
        at.is_some_and(|t| {
            self.flaw == Flaw::InboxNoExpiry || self.clock.now() < inbox_expiry(*t, self.retention)
        })
    }
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<(MessageId, String), DateTime<Utc>>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl InboxStore for OwnInbox {
    async fn insert(&self, e: &InboxEntry) -> Result<InsertOutcome> {
        self.check(e)?;
        let key = self.key(e);
        if self.flaw == Flaw::InboxRacy {
            let seen = self.live(self.entries().get(&key));
            self.racers.meet().await;
            if seen {
                return Ok(InsertOutcome::Duplicate);
            }
            self.entries().insert(key, self.clock.now());
            return Ok(InsertOutcome::Inserted);
        }
        let mut entries = self.entries();
        if self.live(entries.get(&key)) {
            return Ok(InsertOutcome::Duplicate);
        }
        entries.insert(key, self.clock.now());
        Ok(InsertOutcome::Inserted)
    }
    async fn contains(&self, e: &InboxEntry) -> Result<bool> {
        self.check(e)?;
        Ok(self.live(self.entries().get(&self.key(e))))
    }
    fn retention(&self) -> Duration {
        self.retention
    }
    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        if self.flaw == Flaw::InboxPurgesNothing {
            return Ok(0);
        }
        let mut entries = self.entries();
        let doomed: Vec<_> = entries
            .iter()
            .filter(|(_, t)| self.flaw == Flaw::InboxPurgesLive || !self.live(Some(t)))
            .map(|(k, _)| k.clone())
            .take(limit)
            .collect();
        for k in &doomed {
            entries.remove(k);
        }
        Ok(doomed.len() as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// A small lock of our own, correct unless flawed.

#[derive(Debug)]
struct OwnLock {
    clock: Arc<dyn Clock>,
    flaw: Flaw,
    state: Mutex<(u64, HashMap<String, Lease>)>,
    racers: Racers,
}

impl OwnLock {
    fn state(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<String, Lease>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn live(&self, lease: &Lease) -> bool {
        self.flaw == Flaw::LockNoExpiry || self.clock.now() < lease.expires_at
    }
    fn holds(&self, lease: &Lease) -> bool {
        let state = self.state();
        match state.1.get(&lease.resource) {
            Some(cur) if self.flaw == Flaw::LockNoOwnerCheck => cur.resource == lease.resource,
            Some(cur) => cur.owner == lease.owner && cur.token == lease.token,
            None => false,
        }
    }
    fn lost(what: &str) -> Error {
        Error::new(ErrorKind::LeaseLost, what)
    }
    /// The shared name rule, or a flawed one; none at all with `LockNoValidation`.
    fn check_names(&self, resource: &str, owner: &str) -> Result<()> {
        match self.flaw {
            Flaw::LockNoValidation => Ok(()),
            Flaw::LockNameRuleCountsChars => {
                let bad = |n: &str| n.is_empty() || n.chars().count() > outbox_core::MAX_FIELD_LEN;
                if bad(resource) || bad(owner) {
                    return Err(Error::invalid_input("bad lease name"));
                }
                Ok(())
            }
            _ => outbox_core::rules::check_lease_names(resource, owner),
        }
    }
    fn check_resource(&self, resource: &str) -> Result<()> {
        self.check_names(resource, "owner")
    }
    fn stored_name(&self, resource: &str) -> String {
        if self.flaw == Flaw::LockTruncatesNames {
            truncated(resource, 255)
        } else {
            resource.to_owned()
        }
    }
}

#[async_trait]
impl DistributedLock for OwnLock {
    async fn acquire(&self, resource: &str, owner: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.check_names(resource, owner)?;
        if self.flaw != Flaw::LockNoValidation && ttl.is_zero() {
            return Err(Error::invalid_input("bad acquire"));
        }
        let stored = self.stored_name(resource);
        let resource = stored.as_str();
        let expires_at = add_duration(self.clock.now(), ttl);
        if self.flaw == Flaw::LockRacy {
            // Check, then act later: two acquirers can both see the resource free.
            let free = self.state().1.get(resource).is_none_or(|c| !self.live(c));
            self.racers.meet().await;
            if !free {
                return Ok(None);
            }
        }
        let mut state = self.state();
        if let Some(cur) = state.1.get(resource).filter(|c| self.live(c)).cloned()
            && self.flaw != Flaw::LockRacy
        {
            if cur.owner != owner {
                return Ok(None);
            }
            let renewed = Lease { expires_at, ..cur };
            state.1.insert(resource.to_owned(), renewed.clone());
            return Ok(Some(renewed));
        }
        let token = if self.flaw == Flaw::LockSameToken {
            1
        } else {
            state.0 += 1;
            state.0
        };
        let lease = Lease {
            resource: resource.to_owned(),
            owner: owner.to_owned(),
            token,
            expires_at,
        };
        state.1.insert(resource.to_owned(), lease.clone());
        Ok(Some(lease))
    }
    async fn renew(&self, lease: &Lease, ttl: Duration) -> Result<Lease> {
        self.check_names(&lease.resource, &lease.owner)?;
        if !self.holds(lease) {
            return Err(Self::lost("renew by a non-holder"));
        }
        let mut renewed = lease.clone();
        if self.flaw != Flaw::LockRenewKeepsExpiry {
            renewed.expires_at = add_duration(self.clock.now(), ttl);
        }
        self.state()
            .1
            .insert(lease.resource.clone(), renewed.clone());
        Ok(renewed)
    }
    async fn release(&self, lease: &Lease) -> Result<()> {
        self.check_names(&lease.resource, &lease.owner)?;
        if !self.holds(lease) {
            return Err(Self::lost("release by a non-holder"));
        }
        self.state().1.remove(&lease.resource);
        Ok(())
    }
    async fn current(&self, resource: &str) -> Result<Option<Lease>> {
        self.check_resource(resource)?;
        Ok(self
            .state()
            .1
            .get(&self.stored_name(resource))
            .filter(|l| self.live(l))
            .cloned())
    }
}

// ---------------------------------------------------------------------------------------------

async fn setup(ctx: SetupContext, flaw: Flaw) -> Result<Fixture<Mutant>> {
    let retention = Duration::from_secs(3600);
    // The baseline checks the size limit itself; `NoSizeCheck` only claims it.
    let memory = MemoryStore::builder()
        .with_clock(ctx.shared_clock())
        .with_inbox_retention(retention)
        .with_max_message_size((flaw == Flaw::None).then_some(SIZE_LIMIT))
        .build()?;
    let own_inbox = flaw.is_inbox().then(|| {
        Arc::new(OwnInbox {
            clock: ctx.shared_clock(),
            retention,
            flaw,
            entries: Mutex::new(HashMap::new()),
            racers: Racers::default(),
        })
    });
    let store = Mutant {
        inner: memory.clone(),
        flaw,
        own_inbox: own_inbox.clone(),
    };
    let inbox: Arc<dyn InboxStore> = match own_inbox {
        Some(own) => own,
        None => Arc::new(memory.clone()),
    };
    let lock: Arc<dyn DistributedLock> = if flaw.is_lock() {
        Arc::new(OwnLock {
            clock: ctx.shared_clock(),
            flaw,
            state: Mutex::new((0, HashMap::new())),
            racers: Racers::default(),
        })
    } else {
        Arc::new(outbox_core::memory::MemoryLock::new(ctx.shared_clock()))
    };
    Ok(Fixture {
        outbox: Arc::new(store.clone()),
        inbox,
        lock,
        tx_store: Arc::new(store),
        records: Arc::new(Records(memory)),
        clock: ctx.clock,
        keep_alive: Vec::new(),
    })
}

/// Run `$case` on the baseline of `$flaw` (must pass) and on `$flaw` (must panic).
macro_rules! catches {
    ($flaw:expr, $($case:path),+ $(,)?) => {$({
        let flaw: Flaw = $flaw;
        let case = stringify!($case);
        for (variant, must_fail) in [(flaw.baseline(), false), (flaw, true)] {
            let fixture = outbox_conformance::harness::setup(case, |ctx| setup(ctx, variant))
                .await
                .expect("memory setup never skips");
            let failed = tokio::spawn(async move { $case(&fixture).await }).await.is_err();
            assert_eq!(
                failed, must_fail,
                "{case} on {variant:?}: expected {}",
                if must_fail { "a failure (the flaw went unnoticed)" } else { "a pass" }
            );
        }
    })+};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_cases_catch_fetch_flaws() {
    catches!(Flaw::FetchAllShards, store::fetch_only_requested_shards);
    catches!(
        Flaw::FetchUnordered,
        store::per_key_failing_head_blocks_key,
        store::per_key_parked_head_blocks_key,
        store::per_key_delayed_head_blocks_key,
    );
    catches!(
        Flaw::FetchReversed,
        store::fetch_oldest_first_and_limit,
        store::add_batch_in_order,
        store::per_key_order_concurrent_writers,
    );
    catches!(Flaw::FetchById, tx::commit_order_is_fetch_order);
    catches!(Flaw::FetchNoLimit, store::fetch_oldest_first_and_limit);
    catches!(
        Flaw::FetchNotDue,
        store::fetch_only_due,
        store::mark_failed_backoff
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_cases_catch_write_flaws() {
    catches!(
        Flaw::BatchNotAtomic,
        store::duplicate_add_rejected,
        store::duplicate_within_batch,
        store::invalid_input,
    );
    catches!(Flaw::SwallowDuplicate, store::duplicate_add_rejected);
    catches!(Flaw::NoBatchLimitCheck, store::batch_limit);
    catches!(Flaw::NoSizeCheck, store::size_limit);
    catches!(Flaw::MillisTimestamps, store::round_trip);
    catches!(Flaw::WrongShard, store::round_trip, store::shard_assignment);
    catches!(Flaw::StripsNul, store::invalid_input);
    catches!(Flaw::TruncatesTopic, store::longest_names_round_trip);
    catches!(Flaw::TruncatesLastError, store::last_error_rule);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_cases_catch_state_flaws() {
    catches!(
        Flaw::DispatchNoop,
        store::mark_dispatched_idempotent,
        store::mark_dispatched_parked
    );
    catches!(
        Flaw::NeverPark,
        store::mark_failed_parks_after_max_attempts,
        store::requeue_parked
    );
    catches!(Flaw::RequeueNoop, store::requeue_parked);
    catches!(Flaw::AgeBySequence, store::stats_counts_and_oldest_age);
    catches!(
        Flaw::PurgeNoLimit,
        store::purge_dispatched_retention_and_limit
    );
    catches!(
        Flaw::PurgeNoRetention,
        store::purge_dispatched_retention_and_limit
    );
    catches!(Flaw::ListIgnoresTopic, store::list_filters_and_order);
    catches!(Flaw::ListIgnoresKey, store::list_filters_and_order);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tx_cases_catch_flaws() {
    catches!(
        Flaw::TxAddImmediate,
        tx::invisible_before_commit,
        store::transactional_add_rollback,
        inbox::transactional_insert_rollback,
    );
    catches!(
        Flaw::TxCommitReversesAdds,
        tx::add_order_is_sequence_order,
        store::per_key_order_concurrent_writers,
    );
    catches!(
        Flaw::TxCommittedIdsReversed,
        tx::commit_reports_ids_and_shards
    );
    catches!(
        Flaw::TxFailureKeepsTxUsable,
        tx::failed_add_aborts,
        tx::duplicate_add_aborts,
        tx::failed_inbox_insert_aborts,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inbox_cases_catch_flaws() {
    catches!(
        Flaw::InboxNoExpiry,
        inbox::retention_expiry,
        inbox::purge_expired
    );
    catches!(Flaw::InboxRacy, inbox::concurrent_insert_one_winner);
    catches!(Flaw::InboxIgnoresHandlerKey, inbox::first_insert_wins);
    catches!(Flaw::InboxPurgesLive, inbox::purge_expired);
    catches!(Flaw::InboxPurgesNothing, inbox::purge_expired);
    catches!(Flaw::InboxOnlyEmptyKeyRule, inbox::invalid_handler_key);
    catches!(Flaw::InboxTruncatesKeys, inbox::longest_handler_key);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lock_cases_catch_flaws() {
    catches!(
        Flaw::LockNoExpiry,
        lock::expiry_takeover,
        lock::concurrent_takeover_one_winner
    );
    catches!(
        Flaw::LockSameToken,
        lock::release_then_reacquire,
        lock::tokens_strictly_increase,
        lock::expiry_takeover,
    );
    catches!(Flaw::LockNoOwnerCheck, lock::non_holder_rejected);
    catches!(Flaw::LockRacy, lock::concurrent_acquire_one_winner);
    catches!(Flaw::LockNoValidation, lock::invalid_input);
    catches!(Flaw::LockRenewKeepsExpiry, lock::renew_extends);
    catches!(Flaw::LockNameRuleCountsChars, lock::invalid_names);
    catches!(Flaw::LockTruncatesNames, lock::longest_names);
}

// ---------------------------------------------------------------------------------------------
// Transports: a producer wrapped around the in-memory broker, broken in one way.

/// One broken behaviour of a producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProducerFlaw {
    /// No flaw: `send_ordered` stops at the first failure, in order, and the delivery
    /// timeout is bounded.
    Baseline,
    /// `send_ordered` publishes the chain back to front (results still in slice order).
    OrderedReversed,
    /// `send_ordered` goes on past a failure, publishing and reporting every message.
    OrderedPastFailure,
    /// `send_ordered` reports `Ok` for a message that failed.
    OrderedSwallowsFailure,
    /// No bound on how long a send can stay pending.
    DeliveryUnbounded,
    /// A bound longer than the harness allows.
    DeliveryTooLong,
}

/// What the mutant harness allows as delivery timeout (a network transport's bound).
const MAX_DELIVERY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct FlawedProducer {
    inner: outbox_core::memory::MemoryProducer,
    flaw: ProducerFlaw,
}

#[async_trait]
impl Producer for FlawedProducer {
    async fn send(&self, m: &Message) -> Result<()> {
        self.inner.send(m).await
    }

    async fn send_ordered(&self, messages: &[Message]) -> Vec<Result<()>> {
        match self.flaw {
            ProducerFlaw::OrderedReversed => {
                let mut results = Vec::new();
                for m in messages.iter().rev() {
                    results.push(self.inner.send(m).await);
                }
                results.reverse();
                results
            }
            ProducerFlaw::OrderedPastFailure => {
                let mut results = Vec::new();
                for m in messages {
                    results.push(self.inner.send(m).await);
                }
                results
            }
            ProducerFlaw::OrderedSwallowsFailure => {
                let mut results = Vec::new();
                for m in messages {
                    let failed = self.inner.send(m).await.is_err();
                    results.push(Ok(()));
                    if failed {
                        break;
                    }
                }
                results
            }
            _ => self.inner.send_ordered(messages).await,
        }
    }

    fn delivery_timeout(&self) -> Option<Duration> {
        match self.flaw {
            ProducerFlaw::DeliveryUnbounded => None,
            ProducerFlaw::DeliveryTooLong => Some(MAX_DELIVERY * 3),
            _ => Some(MAX_DELIVERY / 2),
        }
    }
}

/// The memory broker behind a [`FlawedProducer`], posing as a network transport (its sends
/// must be bounded by [`MAX_DELIVERY`]).
struct MutantTransport {
    broker: MemoryBroker,
    topic: String,
    subscription: String,
    flaw: ProducerFlaw,
}

#[async_trait]
impl TransportHarness for MutantTransport {
    fn topic(&self) -> &str {
        &self.topic
    }

    fn producer(&self) -> Arc<dyn Producer> {
        Arc::new(FlawedProducer {
            inner: self.broker.producer(),
            flaw: self.flaw,
        })
    }

    async fn consumer(&self) -> Result<Box<dyn Consumer>> {
        self.broker.redeliver_unacked(&self.subscription);
        Ok(Box::new(
            self.broker.subscribe(&self.subscription, &[&self.topic]),
        ))
    }

    async fn dead_letters(&self, _expected: usize) -> Result<Vec<(Message, String)>> {
        Ok(self.broker.dead_letters(&self.subscription))
    }

    fn max_message_size(&self) -> Option<usize> {
        Some(SIZE_LIMIT)
    }

    fn max_delivery_timeout(&self) -> Option<Duration> {
        Some(MAX_DELIVERY)
    }
}

fn mutant_transport(flaw: ProducerFlaw) -> MutantTransport {
    let ctx = SetupContext::new("transport_mutant");
    MutantTransport {
        broker: MemoryBroker::new().with_max_message_size(SIZE_LIMIT),
        topic: format!("{}.events", ctx.name),
        subscription: format!("{}.sub", ctx.name),
        flaw,
    }
}

/// Run `$case` on the baseline producer (must pass) and on `$flaw` (must panic).
macro_rules! transport_catches {
    ($flaw:expr, $($case:path),+ $(,)?) => {$({
        let flaw: ProducerFlaw = $flaw;
        let case = stringify!($case);
        for (variant, must_fail) in [(ProducerFlaw::Baseline, false), (flaw, true)] {
            let harness = mutant_transport(variant);
            let failed = tokio::spawn(async move { $case(&harness).await }).await.is_err();
            assert_eq!(
                failed, must_fail,
                "{case} on {variant:?}: expected {}",
                if must_fail { "a failure (the flaw went unnoticed)" } else { "a pass" }
            );
        }
    })+};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transport_cases_catch_producer_flaws() {
    transport_catches!(
        ProducerFlaw::OrderedReversed,
        transport::send_ordered_chain_in_order,
        transport::send_ordered_stops_at_permanent_failure,
    );
    transport_catches!(
        ProducerFlaw::OrderedPastFailure,
        transport::send_ordered_stops_at_permanent_failure
    );
    transport_catches!(
        ProducerFlaw::OrderedSwallowsFailure,
        transport::send_ordered_stops_at_permanent_failure
    );
    transport_catches!(
        ProducerFlaw::DeliveryUnbounded,
        transport::delivery_timeout_bounded
    );
    transport_catches!(
        ProducerFlaw::DeliveryTooLong,
        transport::delivery_timeout_bounded
    );
}

/// Relay flaws, planted process-wide through the `mutants` feature of outbox-core. Only this
/// test uses relays in this binary, and it runs its cases one after another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn relay_cases_catch_relay_flaws() {
    use outbox_conformance::relay;
    use outbox_core::relay::mutants::{RelayFlaw, plant};
    macro_rules! relay_catches {
        ($flaw:expr, $($case:path),+ $(,)?) => {$({
            let case = stringify!($case);
            for (planted, must_fail) in [(RelayFlaw::None, false), ($flaw, true)] {
                let fixture = outbox_conformance::harness::setup(case, |ctx| setup(ctx, Flaw::None))
                    .await
                    .expect("memory setup never skips");
                plant(planted);
                let failed = tokio::spawn(async move { $case(&fixture).await }).await.is_err();
                plant(RelayFlaw::None);
                assert_eq!(
                    failed, must_fail,
                    "{case} with {planted:?}: expected {}",
                    if must_fail { "a failure (the flaw went unnoticed)" } else { "a pass" }
                );
            }
        })+};
    }
    relay_catches!(
        RelayFlaw::CountOutages,
        relay::broker_down_then_recovers,
        relay::outage_parks_nothing_in_run,
    );
    relay_catches!(
        RelayFlaw::IgnoreDeadline,
        relay::stale_holder_publishes_nothing
    );
    relay_catches!(
        RelayFlaw::PipelineWholeChain,
        relay::failing_head_holds_back_its_key_when_pipelined
    );
    relay_catches!(
        RelayFlaw::MarkBeforeConfirm,
        relay::broker_down_then_recovers,
        relay::killed_at_any_point_loses_nothing,
    );
}
