//! [`MemoryStore`]: outbox, inbox and transactions held in process memory.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::clock::{SharedClock, SystemClock, truncate_micros};
use crate::error::{Error, ErrorKind, Result};
use crate::inbox::{InboxEntry, InboxStore, InsertOutcome, inbox_expiry};
use crate::message::{Message, MessageId, MessageStatus, StoredMessage, shard_for};
use crate::rules::{
    batch_error, check_inbox_entry, check_inbox_retention, check_message, check_shard_count,
    error_text,
};
use crate::store::{
    Capabilities, FailedAttempt, FailureOutcome, ListQuery, Ordering, OutboxStats, OutboxStore,
    PendingQuery, RequeueFilter,
};
use crate::tx::{AbortState, Committed, Transaction, TransactionalStore};

use super::lock::MemoryLock;

pub use crate::rules::{DEFAULT_INBOX_RETENTION, DEFAULT_SHARD_COUNT};

/// Page size of [`OutboxStore::list`] when the query's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;

/// Configures and builds a [`MemoryStore`]; see [`MemoryStore::builder`].
#[derive(Debug, Clone)]
pub struct MemoryStoreBuilder {
    clock: SharedClock,
    shard_count: u32,
    inbox_retention: Duration,
    max_message_size: Option<usize>,
}

impl Default for MemoryStoreBuilder {
    fn default() -> Self {
        MemoryStoreBuilder {
            clock: Arc::new(SystemClock),
            shard_count: DEFAULT_SHARD_COUNT,
            inbox_retention: DEFAULT_INBOX_RETENTION,
            max_message_size: None,
        }
    }
}

impl MemoryStoreBuilder {
    /// The clock that decides what is due, ages, inbox expiry and retention
    /// (default: [`SystemClock`]). Tests pass a [`ManualClock`](crate::ManualClock).
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Number of shards (default [`DEFAULT_SHARD_COUNT`]). Must be at least 1.
    pub fn with_shard_count(mut self, shard_count: u32) -> Self {
        self.shard_count = shard_count;
        self
    }

    /// How long inbox entries suppress duplicates (default [`DEFAULT_INBOX_RETENTION`]).
    /// Must not be zero.
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Largest accepted message, measured by [`Message::encoded_size`] (default `None`: no
    /// limit). Set it to the limit of your production backend to catch oversized messages in
    /// unit tests. Must not be `Some(0)`.
    pub fn with_max_message_size(mut self, limit: Option<usize>) -> Self {
        self.max_message_size = limit;
        self
    }

    /// Check the configuration and create the (empty) store.
    ///
    /// # Errors
    /// [`ErrorKind::ConfigInvalid`] for a shard count of 0, a zero (or too large) inbox
    /// retention ([`crate::rules`]) or a maximum message size of 0.
    pub fn build(self) -> Result<MemoryStore> {
        check_shard_count(self.shard_count, u32::MAX)?;
        check_inbox_retention(self.inbox_retention)?;
        if self.max_message_size == Some(0) {
            return Err(Error::config(
                "memory store max_message_size must be greater than zero (use None for no limit)",
            ));
        }
        Ok(MemoryStore {
            inner: Arc::new(Inner {
                clock: self.clock,
                shard_count: self.shard_count,
                inbox_retention: self.inbox_retention,
                max_message_size: self.max_message_size,
                state: Mutex::new(State::default()),
            }),
        })
    }
}

/// An outbox store, inbox store and transactional store in process memory.
///
/// Implements [`OutboxStore`], [`InboxStore`] and [`TransactionalStore`] with the full
/// contract of the conformance suite. Clones are cheap and share the same data, so one store
/// can be handed to the application, the relay and an inbox processor at once. All methods are
/// safe to call concurrently. Nothing survives the process: use it for unit tests, demos and
/// single-process tools.
///
/// Besides outbox messages and inbox entries, a transaction can write *records* (a key-value
/// map standing in for the application's own tables), see [`MemoryTx::put_record`]; they
/// commit atomically with the messages and inbox entries of the same transaction.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    clock: SharedClock,
    shard_count: u32,
    inbox_retention: Duration,
    max_message_size: Option<usize>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Every stored message by sequence (sequence order == commit order).
    messages: BTreeMap<u64, StoredMessage>,
    /// Message id -> sequence.
    by_id: HashMap<MessageId, u64>,
    /// Sequences of pending and parked messages, per shard (what `fetch_pending` scans).
    open: HashMap<u32, BTreeSet<u64>>,
    /// Dispatched messages by (dispatched_at, sequence), for purging.
    dispatched: BTreeSet<(DateTime<Utc>, u64)>,
    /// Last sequence handed out.
    last_sequence: u64,
    /// Inbox entries and when they were inserted.
    inbox: HashMap<InboxEntry, DateTime<Utc>>,
    /// Callers' records.
    records: BTreeMap<String, Bytes>,
}

impl State {
    fn next_sequence(&mut self) -> Result<u64> {
        self.last_sequence = self
            .last_sequence
            .checked_add(1)
            .ok_or_else(|| Error::unexpected("memory store sequence exhausted"))?;
        Ok(self.last_sequence)
    }

    /// Store a message already checked for duplicates.
    fn insert_message(&mut self, message: &Message, shard_count: u32) -> Result<()> {
        let sequence = self.next_sequence()?;
        let shard = shard_for(message.key.as_deref(), &message.id, shard_count);
        self.by_id.insert(message.id, sequence);
        self.open.entry(shard).or_default().insert(sequence);
        self.messages.insert(
            sequence,
            StoredMessage {
                message: message.clone(),
                status: MessageStatus::Pending,
                attempts: 0,
                next_attempt_at: None,
                last_error: None,
                dispatched_at: None,
                shard,
                sequence,
            },
        );
        Ok(())
    }

    fn remove_open(&mut self, shard: u32, sequence: u64) {
        if let Some(set) = self.open.get_mut(&shard) {
            set.remove(&sequence);
            if set.is_empty() {
                self.open.remove(&shard);
            }
        }
    }

    fn inbox_live(&self, entry: &InboxEntry, now: DateTime<Utc>, retention: Duration) -> bool {
        self.inbox
            .get(entry)
            .is_some_and(|inserted_at| now < inbox_expiry(*inserted_at, retention))
    }
}

fn already_exists(id: MessageId, how: &str) -> Error {
    Error::new(
        ErrorKind::AlreadyExists,
        format!("message {id} {how}; nothing was written"),
    )
}

impl MemoryStore {
    /// A store with the defaults: [`SystemClock`], [`DEFAULT_SHARD_COUNT`] shards,
    /// [`DEFAULT_INBOX_RETENTION`], no size limit.
    pub fn new() -> Self {
        MemoryStore {
            inner: Arc::new(Inner {
                clock: Arc::new(SystemClock),
                shard_count: DEFAULT_SHARD_COUNT,
                inbox_retention: DEFAULT_INBOX_RETENTION,
                max_message_size: None,
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// Configure a store (clock, shard count, inbox retention, size limit).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use std::time::Duration;
    /// use outbox_core::{ManualClock, memory::MemoryStore};
    ///
    /// let store = MemoryStore::builder()
    ///     .with_clock(Arc::new(ManualClock::new()))
    ///     .with_shard_count(4)
    ///     .with_inbox_retention(Duration::from_secs(3600))
    ///     .with_max_message_size(Some(256 * 1024))
    ///     .build()?;
    /// # Ok::<(), outbox_core::Error>(())
    /// ```
    pub fn builder() -> MemoryStoreBuilder {
        MemoryStoreBuilder::default()
    }

    /// The clock this store reads.
    pub fn clock(&self) -> SharedClock {
        Arc::clone(&self.inner.clock)
    }

    /// A new in-memory distributed lock on this store's clock (what `lock()` gives on the
    /// other backends; the lock keeps its own leases). Each call makes a separate lock:
    /// share one between the relays that must exclude each other.
    pub fn lock(&self) -> MemoryLock {
        MemoryLock::new(self.clock())
    }

    /// The committed value of the record `key`, if any (see [`MemoryTx::put_record`]).
    pub fn record(&self, key: &str) -> Option<Bytes> {
        self.state().records.get(key).cloned()
    }

    /// Number of committed records.
    pub fn record_count(&self) -> usize {
        self.state().records.len()
    }

    /// Every committed record, sorted by key.
    pub fn records(&self) -> Vec<(String, Bytes)> {
        self.state()
            .records
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> DateTime<Utc> {
        self.inner.clock.now()
    }

    /// Field and size checks shared by every add path.
    fn check_message(&self, message: &Message) -> Result<()> {
        check_message(message)?;
        match self.inner.max_message_size {
            Some(limit) => message.check_size(limit),
            None => Ok(()),
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.state();
        f.debug_struct("MemoryStore")
            .field("shard_count", &self.inner.shard_count)
            .field("inbox_retention", &self.inner.inbox_retention)
            .field("max_message_size", &self.inner.max_message_size)
            .field("messages", &st.messages.len())
            .field("inbox_entries", &st.inbox.len())
            .field("records", &st.records.len())
            .finish()
    }
}

#[async_trait]
impl OutboxStore for MemoryStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full().with_max_message_size(self.inner.max_message_size)
    }

    fn shard_count(&self) -> u32 {
        self.inner.shard_count
    }

    async fn add(&self, message: &Message) -> Result<()> {
        self.check_message(message)?;
        let mut st = self.state();
        if st.by_id.contains_key(&message.id) {
            return Err(already_exists(message.id, "is already stored"));
        }
        st.insert_message(message, self.inner.shard_count)
    }

    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        let mut ids = HashSet::with_capacity(messages.len());
        for (i, m) in messages.iter().enumerate() {
            self.check_message(m).map_err(|e| batch_error(e, i))?;
            if !ids.insert(m.id) {
                return Err(already_exists(
                    m.id,
                    &format!("appears more than once in the batch (again at entry {i})"),
                ));
            }
        }
        let mut st = self.state();
        if let Some(m) = messages.iter().find(|m| st.by_id.contains_key(&m.id)) {
            return Err(already_exists(
                m.id,
                "is already stored; no message of the batch",
            ));
        }
        for m in messages {
            st.insert_message(m, self.inner.shard_count)?;
        }
        Ok(())
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        let st = self.state();
        Ok(st
            .by_id
            .get(&id)
            .and_then(|seq| st.messages.get(seq))
            .cloned())
    }

    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        if query.limit == 0 || query.shards.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.now();
        let st = self.state();
        let shards: BTreeSet<u32> = query.shards.iter().copied().collect();
        let mut picked: Vec<u64> = Vec::new();
        // A key always maps to one shard, so per-key blocking is local to a shard, and the
        // first `limit` eligible messages overall are among the first `limit` of each shard.
        for shard in shards {
            let Some(open) = st.open.get(&shard) else {
                continue;
            };
            let mut blocked: HashSet<&str> = HashSet::new();
            let mut taken = 0usize;
            for seq in open {
                let Some(m) = st.messages.get(seq) else {
                    continue;
                };
                let due = m.is_due(now);
                match (query.ordering, m.message.key.as_deref()) {
                    (Ordering::PerKey, Some(key)) => {
                        if blocked.contains(key) {
                            continue;
                        }
                        if !due {
                            // Parked, backing off or delayed: later messages of the key wait.
                            blocked.insert(key);
                            continue;
                        }
                    }
                    _ => {
                        if !due {
                            continue;
                        }
                    }
                }
                picked.push(*seq);
                taken += 1;
                if taken >= query.limit {
                    break;
                }
            }
        }
        picked.sort_unstable();
        picked.truncate(query.limit);
        Ok(picked
            .iter()
            .filter_map(|seq| st.messages.get(seq).cloned())
            .collect())
    }

    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        let now = self.now();
        let mut st = self.state();
        for id in ids {
            let Some(&seq) = st.by_id.get(id) else {
                continue;
            };
            let Some(m) = st.messages.get_mut(&seq) else {
                continue;
            };
            if m.status == MessageStatus::Dispatched {
                continue;
            }
            m.status = MessageStatus::Dispatched;
            m.dispatched_at = Some(now);
            let shard = m.shard;
            st.remove_open(shard, seq);
            st.dispatched.insert((now, seq));
        }
        Ok(())
    }

    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome> {
        let mut st = self.state();
        let Some(&seq) = st.by_id.get(&id) else {
            return Err(Error::new(
                ErrorKind::NotFound,
                format!("message {id} is not stored (never added, or purged)"),
            ));
        };
        let Some(m) = st.messages.get_mut(&seq) else {
            return Err(Error::unexpected(format!(
                "memory store index names message {id} but it is missing"
            )));
        };
        if m.status != MessageStatus::Pending {
            return Ok(FailureOutcome::NotPending);
        }
        m.attempts = m.attempts.saturating_add(1);
        m.last_error = Some(error_text(&attempt.error));
        if m.attempts >= attempt.max_attempts {
            m.status = MessageStatus::Parked;
            m.next_attempt_at = None;
            Ok(FailureOutcome::Parked {
                attempts: m.attempts,
            })
        } else {
            let next = truncate_micros(attempt.next_attempt_at);
            m.next_attempt_at = Some(next);
            Ok(FailureOutcome::Retrying {
                attempts: m.attempts,
                next_attempt_at: next,
            })
        }
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let mut st = self.state();
        let candidates: Vec<u64> = match filter {
            RequeueFilter::Ids(ids) => ids
                .iter()
                .filter_map(|id| st.by_id.get(id))
                .copied()
                .collect(),
            RequeueFilter::Topic(_) | RequeueFilter::All => st
                .open
                .values()
                .flat_map(|set| set.iter().copied())
                .collect(),
        };
        let mut count = 0u64;
        for seq in candidates {
            let Some(m) = st.messages.get_mut(&seq) else {
                continue;
            };
            if m.status != MessageStatus::Parked {
                continue;
            }
            if let RequeueFilter::Topic(topic) = filter
                && &m.message.topic != topic
            {
                continue;
            }
            m.status = MessageStatus::Pending;
            m.attempts = 0;
            m.next_attempt_at = None;
            count += 1;
        }
        Ok(count)
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let now = self.now();
        let st = self.state();
        let mut stats = OutboxStats::default();
        let mut oldest: Option<DateTime<Utc>> = None;
        for seq in st.open.values().flat_map(|set| set.iter()) {
            let Some(m) = st.messages.get(seq) else {
                continue;
            };
            match m.status {
                MessageStatus::Pending => {
                    stats.pending += 1;
                    let created = m.message.created_at;
                    if oldest.is_none_or(|o| created < o) {
                        oldest = Some(created);
                    }
                }
                MessageStatus::Parked => stats.parked += 1,
                MessageStatus::Dispatched => {}
            }
        }
        stats.oldest_pending_age =
            oldest.map(|created| (now - created).to_std().unwrap_or(Duration::ZERO));
        Ok(stats)
    }

    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = self.now();
        let Some(cutoff) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
        else {
            // The retention reaches before the earliest representable time: nothing is old enough.
            return Ok(0);
        };
        let mut st = self.state();
        let doomed: Vec<(DateTime<Utc>, u64)> = st
            .dispatched
            .range(..=(cutoff, u64::MAX))
            .take(limit)
            .copied()
            .collect();
        for key in &doomed {
            st.dispatched.remove(key);
            if let Some(m) = st.messages.remove(&key.1) {
                st.by_id.remove(&m.message.id);
            }
        }
        Ok(doomed.len() as u64)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        let limit = if query.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            query.limit
        };
        let st = self.state();
        Ok(st
            .messages
            .values()
            .filter(|m| query.status.is_none_or(|s| m.status == s))
            .filter(|m| query.topic.as_ref().is_none_or(|t| &m.message.topic == t))
            .filter(|m| {
                query
                    .key
                    .as_ref()
                    .is_none_or(|k| m.message.key.as_ref() == Some(k))
            })
            .take(limit)
            .cloned()
            .collect())
    }

    async fn dispatched_since(&self, since: DateTime<Utc>) -> Result<Option<u64>> {
        let st = self.state();
        Ok(Some(st.dispatched.range((since, 0)..).count() as u64))
    }
}

#[async_trait]
impl InboxStore for MemoryStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        check_inbox_entry(entry)?;
        let now = self.now();
        let mut st = self.state();
        if st.inbox_live(entry, now, self.inner.inbox_retention) {
            return Ok(InsertOutcome::Duplicate);
        }
        st.inbox.insert(entry.clone(), now);
        Ok(InsertOutcome::Inserted)
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        check_inbox_entry(entry)?;
        let now = self.now();
        Ok(self
            .state()
            .inbox_live(entry, now, self.inner.inbox_retention))
    }

    fn retention(&self) -> Duration {
        self.inner.inbox_retention
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = self.now();
        let retention = self.inner.inbox_retention;
        let mut st = self.state();
        let expired: Vec<InboxEntry> = st
            .inbox
            .iter()
            .filter(|(_, inserted_at)| now >= inbox_expiry(**inserted_at, retention))
            .map(|(entry, _)| entry.clone())
            .take(limit)
            .collect();
        for entry in &expired {
            st.inbox.remove(entry);
        }
        Ok(expired.len() as u64)
    }
}

#[async_trait]
impl TransactionalStore for MemoryStore {
    type Tx = MemoryTx;

    async fn begin(&self) -> Result<MemoryTx> {
        Ok(MemoryTx {
            store: self.clone(),
            messages: Vec::new(),
            staged_ids: HashSet::new(),
            inbox: Vec::new(),
            staged_inbox: HashSet::new(),
            records: BTreeMap::new(),
            abort: AbortState::default(),
        })
    }
}

/// An open transaction on a [`MemoryStore`] (from [`TransactionalStore::begin`]).
///
/// Stages outbox messages ([`Transaction::add`]), inbox entries
/// ([`Transaction::inbox_insert`]) and records ([`put_record`](Self::put_record),
/// [`delete_record`](Self::delete_record)); nothing is visible to anyone else until
/// [`commit`](Transaction::commit), which applies all of it atomically or nothing.
/// Dropping the transaction, or [`rollback`](Transaction::rollback), discards it.
///
/// Conflicts with concurrent transactions (the same message id or inbox entry committed
/// meanwhile) are detected again at commit, which then fails with
/// [`ErrorKind::AlreadyExists`] and writes nothing. Records are last-writer-wins: there is no
/// conflict detection on them.
///
/// If a staging operation fails (invalid or oversized message, duplicate id, invalid inbox
/// entry), the transaction is aborted as the [`Transaction`] contract says: further adds,
/// inbox inserts and `commit` are refused with `InvalidInput` and nothing is written; only
/// rollback remains. Records staged after the abort are discarded with the rest.
pub struct MemoryTx {
    store: MemoryStore,
    messages: Vec<Message>,
    staged_ids: HashSet<MessageId>,
    inbox: Vec<InboxEntry>,
    staged_inbox: HashSet<InboxEntry>,
    /// Key -> new value (`None`: delete), applied in key order at commit.
    records: BTreeMap<String, Option<Bytes>>,
    abort: AbortState,
}

impl fmt::Debug for MemoryTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryTx")
            .field("messages", &self.messages.len())
            .field("inbox_entries", &self.inbox.len())
            .field("records", &self.records.len())
            .field("aborted", &self.abort.is_aborted())
            .finish()
    }
}

impl MemoryTx {
    /// Stage writing `value` under `key` in the store's records (the stand-in for the
    /// application's own tables). Applied at commit, together with the staged messages and
    /// inbox entries; a later put or delete of the same key in this transaction wins.
    pub fn put_record(&mut self, key: impl Into<String>, value: impl Into<Bytes>) {
        self.records.insert(key.into(), Some(value.into()));
    }

    /// Stage deleting the record `key` (a no-op at commit if it does not exist).
    pub fn delete_record(&mut self, key: impl Into<String>) {
        self.records.insert(key.into(), None);
    }

    /// The record `key` as this transaction sees it: its own staged write if any, else the
    /// committed value.
    pub fn record(&self, key: &str) -> Option<Bytes> {
        match self.records.get(key) {
            Some(staged) => staged.clone(),
            None => self.store.record(key),
        }
    }

    /// Number of messages staged so far.
    pub fn staged_messages(&self) -> usize {
        self.messages.len()
    }

    fn stage(&mut self, message: &Message) -> Result<()> {
        self.store.check_message(message)?;
        if self.staged_ids.contains(&message.id) {
            return Err(already_exists(
                message.id,
                "was already added in this transaction",
            ));
        }
        if self.store.state().by_id.contains_key(&message.id) {
            return Err(already_exists(message.id, "is already stored"));
        }
        self.staged_ids.insert(message.id);
        self.messages.push(message.clone());
        Ok(())
    }

    fn stage_inbox(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        check_inbox_entry(entry)?;
        if self.staged_inbox.contains(entry) {
            return Ok(InsertOutcome::Duplicate);
        }
        let now = self.store.now();
        let retention = self.store.inner.inbox_retention;
        if self.store.state().inbox_live(entry, now, retention) {
            return Ok(InsertOutcome::Duplicate);
        }
        self.staged_inbox.insert(entry.clone());
        self.inbox.push(entry.clone());
        Ok(InsertOutcome::Inserted)
    }
}

#[async_trait]
impl Transaction for MemoryTx {
    async fn add(&mut self, message: &Message) -> Result<()> {
        self.abort.check()?;
        let result = self.stage(message);
        self.abort.track(result)
    }

    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        self.abort.check()?;
        for m in messages {
            self.add(m).await?;
        }
        Ok(())
    }

    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        self.abort.check()?;
        let result = self.stage_inbox(entry);
        self.abort.track(result)
    }

    async fn commit(self) -> Result<Committed> {
        self.abort.check()?;
        let inner = &self.store.inner;
        let now = inner.clock.now();
        let mut st = self.store.state();
        // Re-check under the lock: a concurrent transaction may have committed meanwhile.
        if let Some(m) = self.messages.iter().find(|m| st.by_id.contains_key(&m.id)) {
            return Err(already_exists(
                m.id,
                "was committed by a concurrent writer; nothing of this transaction",
            ));
        }
        if let Some(e) = self
            .inbox
            .iter()
            .find(|e| st.inbox_live(e, now, inner.inbox_retention))
        {
            return Err(Error::new(
                ErrorKind::AlreadyExists,
                format!(
                    "inbox entry (message {}, handler {:?}) was committed by a concurrent \
                     transaction; nothing of this transaction was written",
                    e.message_id, e.handler_key
                ),
            ));
        }
        // Sequences cannot realistically run out; checked so that the apply below is total.
        if st
            .last_sequence
            .checked_add(self.messages.len() as u64)
            .is_none()
        {
            return Err(Error::unexpected("memory store sequence exhausted"));
        }
        let mut committed = Committed::default();
        for m in &self.messages {
            st.insert_message(m, inner.shard_count)?;
            committed.record(m, inner.shard_count);
        }
        for e in self.inbox {
            st.inbox.insert(e, now);
        }
        for (key, value) in self.records {
            match value {
                Some(v) => {
                    st.records.insert(key, v);
                }
                None => {
                    st.records.remove(&key);
                }
            }
        }
        Ok(committed)
    }

    async fn rollback(self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may unwrap
mod tests {
    use super::*;
    use crate::{Clock, ManualClock};

    fn msg(key: Option<&str>) -> Message {
        let b = Message::builder("t").payload("x");
        match key {
            Some(k) => b.key(k),
            None => b,
        }
        .build()
        .unwrap()
    }

    fn store_with(clock: &ManualClock) -> MemoryStore {
        MemoryStore::builder()
            .with_clock(Arc::new(clock.clone()))
            .with_shard_count(4)
            .build()
            .unwrap()
    }

    #[tokio::test]
    async fn the_store_lock_reads_the_store_clock() {
        use crate::lock::DistributedLock;
        let clock = ManualClock::new();
        let lock = store_with(&clock).lock();
        let ttl = Duration::from_secs(10);
        let lease = lock.acquire("shard-0", "a", ttl).await.unwrap().unwrap();
        assert!(lock.acquire("shard-0", "b", ttl).await.unwrap().is_none());
        clock.advance(ttl);
        let taken = lock.acquire("shard-0", "b", ttl).await.unwrap();
        assert!(
            taken.is_some_and(|l| l.token > lease.token),
            "expired on the store's clock: another owner takes over with a higher token"
        );
    }

    fn all_shards(store: &MemoryStore, ordering: Ordering) -> PendingQuery {
        PendingQuery {
            shards: (0..store.shard_count()).collect(),
            limit: 100,
            ordering,
        }
    }

    #[test]
    fn builder_rejects_bad_config() {
        let e = MemoryStore::builder()
            .with_shard_count(0)
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains("shard_count"), "{e}");
        let e = MemoryStore::builder()
            .with_inbox_retention(Duration::ZERO)
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        let e = MemoryStore::builder()
            .with_max_message_size(Some(0))
            .build()
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
    }

    #[tokio::test]
    async fn concurrent_transactions_with_same_message_id_first_commit_wins() {
        let store = MemoryStore::new();
        let m = msg(Some("k"));
        let mut a = store.begin().await.unwrap();
        let mut b = store.begin().await.unwrap();
        a.add(&m).await.unwrap();
        a.put_record("a", "1");
        b.add(&m).await.unwrap();
        b.put_record("b", "2");
        let other = msg(None);
        b.add(&other).await.unwrap();
        b.inbox_insert(&InboxEntry::new(m.id, "h")).await.unwrap();

        let committed = a.commit().await.unwrap();
        assert_eq!(committed.ids, vec![m.id]);
        let e = b.commit().await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert!(e.to_string().contains(&m.id.to_string()), "{e}");

        // Nothing of b was applied.
        assert_eq!(store.record("a").as_deref(), Some(&b"1"[..]));
        assert_eq!(store.record("b"), None);
        assert!(store.get(other.id).await.unwrap().is_none());
        assert!(!store.contains(&InboxEntry::new(m.id, "h")).await.unwrap());
        assert_eq!(store.stats().await.unwrap().pending, 1);
    }

    #[tokio::test]
    async fn concurrent_inbox_inserts_in_transactions_conflict_at_commit() {
        let store = MemoryStore::new();
        let entry = InboxEntry::new(MessageId::new(), "h");
        let mut a = store.begin().await.unwrap();
        let mut b = store.begin().await.unwrap();
        assert_eq!(
            a.inbox_insert(&entry).await.unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(
            b.inbox_insert(&entry).await.unwrap(),
            InsertOutcome::Inserted
        );
        assert_eq!(
            b.inbox_insert(&entry).await.unwrap(),
            InsertOutcome::Duplicate
        );
        b.put_record("effect", "b");
        a.commit().await.unwrap();
        assert_eq!(
            b.commit().await.unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        assert_eq!(store.record("effect"), None);
        let mut c = store.begin().await.unwrap();
        assert_eq!(
            c.inbox_insert(&entry).await.unwrap(),
            InsertOutcome::Duplicate
        );
    }

    #[tokio::test]
    async fn rollback_and_drop_discard_everything() {
        let store = MemoryStore::new();
        let m = msg(None);
        let mut tx = store.begin().await.unwrap();
        tx.add(&m).await.unwrap();
        tx.put_record("r", "v");
        assert_eq!(tx.record("r").as_deref(), Some(&b"v"[..]));
        assert!(
            store.get(m.id).await.unwrap().is_none(),
            "visible before commit"
        );
        tx.rollback().await.unwrap();
        {
            let mut tx = store.begin().await.unwrap();
            tx.add(&m).await.unwrap();
        }
        assert!(store.get(m.id).await.unwrap().is_none());
        assert_eq!(store.record_count(), 0);
        // The id is still free.
        store.add(&m).await.unwrap();
    }

    #[tokio::test]
    async fn failed_add_aborts_the_transaction() {
        let store = MemoryStore::new();
        let m = msg(None);
        store.add(&m).await.unwrap();
        let mut tx = store.begin().await.unwrap();
        let fresh = msg(None);
        tx.add(&fresh).await.unwrap();
        tx.put_record("r", "v");
        assert_eq!(
            tx.add(&m).await.unwrap_err().kind(),
            ErrorKind::AlreadyExists
        );
        let refused = tx.commit().await.unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused}");
        assert!(refused.message().contains(&m.id.to_string()), "{refused}");
        assert!(store.get(fresh.id).await.unwrap().is_none());
        assert_eq!(store.record("r"), None);
    }

    #[tokio::test]
    async fn records_commit_in_order_and_delete() {
        let store = MemoryStore::new();
        let mut tx = store.begin().await.unwrap();
        tx.put_record("a", "1");
        tx.put_record("b", "2");
        tx.put_record("a", "3");
        let c = tx.commit().await.unwrap();
        assert!(c.is_empty());
        assert_eq!(store.record("a").as_deref(), Some(&b"3"[..]));
        let mut tx = store.begin().await.unwrap();
        tx.delete_record("b");
        assert_eq!(tx.record("b"), None);
        tx.commit().await.unwrap();
        assert_eq!(store.records(), vec![("a".to_owned(), Bytes::from("3"))]);
    }

    #[tokio::test]
    async fn sequences_follow_commit_order_not_begin_order() {
        let store = MemoryStore::new();
        let first = msg(Some("k"));
        let second = msg(Some("k"));
        let mut early = store.begin().await.unwrap();
        early.add(&first).await.unwrap();
        let mut late = store.begin().await.unwrap();
        late.add(&second).await.unwrap();
        late.commit().await.unwrap();
        early.commit().await.unwrap();
        let got = store
            .fetch_pending(&all_shards(&store, Ordering::PerKey))
            .await
            .unwrap();
        let ids: Vec<_> = got.iter().map(|m| m.message.id).collect();
        assert_eq!(ids, vec![second.id, first.id]);
    }

    #[tokio::test]
    async fn per_key_head_blocks_key_but_not_others() {
        let clock = ManualClock::new();
        let store = store_with(&clock);
        let a1 = msg(Some("a"));
        let a2 = msg(Some("a"));
        let b1 = msg(Some("b"));
        let n1 = msg(None);
        store
            .add_batch(&[a1.clone(), a2.clone(), b1.clone(), n1.clone()])
            .await
            .unwrap();
        let outcome = store
            .mark_failed(
                a1.id,
                &FailedAttempt {
                    error: "boom".into(),
                    next_attempt_at: clock.now() + chrono::Duration::seconds(10),
                    max_attempts: 3,
                },
            )
            .await
            .unwrap();
        assert!(matches!(
            outcome,
            FailureOutcome::Retrying { attempts: 1, .. }
        ));

        let ids = |v: Vec<StoredMessage>| v.into_iter().map(|m| m.message.id).collect::<Vec<_>>();
        let per_key = ids(store
            .fetch_pending(&all_shards(&store, Ordering::PerKey))
            .await
            .unwrap());
        assert_eq!(per_key, vec![b1.id, n1.id]);
        let unordered = ids(store
            .fetch_pending(&all_shards(&store, Ordering::Unordered))
            .await
            .unwrap());
        assert_eq!(unordered, vec![a2.id, b1.id, n1.id]);

        clock.advance(Duration::from_secs(10));
        let per_key = ids(store
            .fetch_pending(&all_shards(&store, Ordering::PerKey))
            .await
            .unwrap());
        assert_eq!(per_key, vec![a1.id, a2.id, b1.id, n1.id]);

        // A limit cutting a key keeps the prefix only.
        let mut q = all_shards(&store, Ordering::PerKey);
        q.limit = 1;
        let got = ids(store.fetch_pending(&q).await.unwrap());
        assert_eq!(got, vec![a1.id]);
    }

    #[tokio::test]
    async fn parking_requeue_and_dispatch() {
        let clock = ManualClock::new();
        let store = store_with(&clock);
        let m = msg(Some("k"));
        let later = msg(Some("k"));
        store.add(&m).await.unwrap();
        store.add(&later).await.unwrap();
        let fail = FailedAttempt {
            error: "nope".into(),
            next_attempt_at: clock.now(),
            max_attempts: 2,
        };
        store.mark_failed(m.id, &fail).await.unwrap();
        assert_eq!(
            store.mark_failed(m.id, &fail).await.unwrap(),
            FailureOutcome::Parked { attempts: 2 }
        );
        assert_eq!(
            store.mark_failed(m.id, &fail).await.unwrap(),
            FailureOutcome::NotPending
        );
        let stats = store.stats().await.unwrap();
        assert_eq!((stats.pending, stats.parked), (1, 1));
        assert!(
            store
                .fetch_pending(&all_shards(&store, Ordering::PerKey))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            store
                .requeue(&RequeueFilter::Topic("other".into()))
                .await
                .unwrap(),
            0
        );
        assert_eq!(store.requeue(&RequeueFilter::All).await.unwrap(), 1);
        let s = store.get(m.id).await.unwrap().unwrap();
        assert_eq!(
            (s.status, s.attempts, s.last_error.as_deref()),
            (MessageStatus::Pending, 0, Some("nope"))
        );
        store
            .mark_dispatched(&[m.id, m.id, MessageId::new()])
            .await
            .unwrap();
        let d = store.get(m.id).await.unwrap().unwrap();
        assert_eq!(d.dispatched_at, Some(clock.now()));
        assert_eq!(
            store
                .mark_failed(MessageId::new(), &fail)
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::NotFound
        );

        clock.advance(Duration::from_secs(60));
        store.mark_dispatched(&[later.id]).await.unwrap();
        assert_eq!(
            store
                .purge_dispatched(Duration::from_secs(30), 10)
                .await
                .unwrap(),
            1
        );
        assert!(store.get(m.id).await.unwrap().is_none());
        assert!(store.get(later.id).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn inbox_entries_expire_with_the_clock() {
        let clock = ManualClock::new();
        let store = MemoryStore::builder()
            .with_clock(Arc::new(clock.clone()))
            .with_inbox_retention(Duration::from_secs(60))
            .build()
            .unwrap();
        let e = InboxEntry::new(MessageId::new(), "h");
        assert_eq!(store.insert(&e).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(store.insert(&e).await.unwrap(), InsertOutcome::Duplicate);
        assert_eq!(
            store
                .insert(&InboxEntry::new(e.message_id, "other"))
                .await
                .unwrap(),
            InsertOutcome::Inserted
        );
        clock.advance(Duration::from_secs(60));
        assert!(!store.contains(&e).await.unwrap());
        assert_eq!(store.purge_expired(1).await.unwrap(), 1);
        assert_eq!(store.purge_expired(10).await.unwrap(), 1);
        assert_eq!(store.insert(&e).await.unwrap(), InsertOutcome::Inserted);
        assert_eq!(
            store
                .insert(&InboxEntry::new(e.message_id, ""))
                .await
                .unwrap_err()
                .kind(),
            ErrorKind::InvalidInput
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_inbox_inserts_exactly_one_wins() {
        let store = MemoryStore::new();
        let entry = InboxEntry::new(MessageId::new(), "h");
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (store, entry) = (store.clone(), entry.clone());
                tokio::spawn(async move {
                    if i % 2 == 0 {
                        store.insert(&entry).await.unwrap() == InsertOutcome::Inserted
                    } else {
                        let mut tx = store.begin().await.unwrap();
                        tx.inbox_insert(&entry).await.unwrap() == InsertOutcome::Inserted
                            && tx.commit().await.is_ok()
                    }
                })
            })
            .collect();
        let mut winners = 0;
        for t in tasks {
            if t.await.unwrap() {
                winners += 1;
            }
        }
        assert_eq!(winners, 1);
    }

    #[tokio::test]
    async fn size_limit_and_batch_duplicates() {
        let store = MemoryStore::builder()
            .with_max_message_size(Some(100))
            .build()
            .unwrap();
        let big = Message::builder("t")
            .payload(vec![0u8; 200])
            .build()
            .unwrap();
        let e = store.add(&big).await.unwrap_err();
        assert_eq!(
            e.kind(),
            ErrorKind::PayloadTooLarge {
                size: big.encoded_size(),
                limit: 100
            }
        );
        let m = msg(None);
        let e = store
            .add_batch(&[m.clone(), msg(None), m.clone()])
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AlreadyExists);
        assert_eq!(store.stats().await.unwrap().pending, 0);
        let mut tx = store.begin().await.unwrap();
        assert!(matches!(
            tx.add(&big).await.unwrap_err().kind(),
            ErrorKind::PayloadTooLarge { .. }
        ));
    }
}
