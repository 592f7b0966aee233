//! The outbox store contract.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::message::{Message, MessageId, MessageStatus, StoredMessage};

/// How the relay may reorder messages that share a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum Ordering {
    /// Messages with the same key are published in store-sequence (commit) order. While the
    /// oldest unpublished message of a key is not due (backoff, `deliver_after`) or is parked,
    /// later messages of that key wait. Messages without a key are unordered.
    #[default]
    PerKey,
    /// No ordering guarantee; any due message may be published.
    Unordered,
}

/// What [`OutboxStore::fetch_pending`] should return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingQuery {
    /// Only messages of these shards. Empty means none.
    pub shards: Vec<u32>,
    /// At most this many messages.
    pub limit: usize,
    /// Ordering policy to respect when choosing messages.
    pub ordering: Ordering,
}

/// How to record a failed publish attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedAttempt {
    /// The publish error, stored as `last_error`.
    pub error: String,
    /// When to try again if the message is not parked.
    pub next_attempt_at: DateTime<Utc>,
    /// Park the message once `attempts` reaches this number.
    pub max_attempts: u32,
}

/// The state of a message after [`OutboxStore::mark_failed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    /// Still pending; next attempt scheduled.
    Retrying {
        /// Failed attempts so far.
        attempts: u32,
        /// When it becomes due again.
        next_attempt_at: DateTime<Utc>,
    },
    /// Parked (dead letter) after this many attempts.
    Parked {
        /// Failed attempts so far.
        attempts: u32,
    },
    /// The message was not pending (already dispatched, parked or gone); nothing changed.
    NotPending,
}

/// Which parked messages [`OutboxStore::requeue`] returns to pending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueFilter {
    /// These ids (only those that are parked).
    Ids(Vec<MessageId>),
    /// Every parked message of a topic.
    Topic(String),
    /// Every parked message.
    All,
}

/// Filter for [`OutboxStore::list`] (operators' view, not the relay's path).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListQuery {
    /// Only this status.
    pub status: Option<MessageStatus>,
    /// Only this topic.
    pub topic: Option<String>,
    /// Only messages with this key (messages without a key never match).
    pub key: Option<String>,
    /// At most this many (store order). `0` means the store's default of 100.
    pub limit: usize,
}

/// Figures for health checks and dashboards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OutboxStats {
    /// Messages waiting to be published, due or not.
    pub pending: u64,
    /// Parked (dead-lettered) messages.
    pub parked: u64,
    /// Age of the oldest pending message (by `created_at`), `None` when nothing is pending.
    pub oldest_pending_age: Option<Duration>,
}

/// What a backend can do; the conformance suite picks cases by it.
#[non_exhaustive]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Largest accepted message, in bytes as the backend measures it (`None`: no limit).
    pub max_message_size: Option<usize>,
    /// Most messages accepted in one `add_batch` or one transaction (`None`: no limit).
    pub max_batch: Option<usize>,
    /// Caller writes, outbox adds and inbox inserts can share one atomic transaction.
    pub transactions: bool,
    /// An inbox insert inside a transaction reports `Duplicate` immediately (SQL backends).
    /// When `false`, a duplicate is detected at commit, which fails with `AlreadyExists`
    /// (DynamoDB's unit of work).
    pub inbox_duplicate_at_insert: bool,
    /// A transactional add of a message id that is already stored fails at `add` with
    /// `AlreadyExists` (SQL backends, memory). When `false`, the add succeeds and `commit`
    /// fails with `AlreadyExists`, writing nothing (DynamoDB's transaction, which cannot read
    /// inside a transaction). An id added twice in one transaction fails at `add` everywhere.
    pub duplicate_id_at_add: bool,
}

impl Capabilities {
    /// Every flag set and no limits. Backends adjust it with the `with_*` setters (the struct
    /// is `#[non_exhaustive]`, so it cannot be built literally outside this crate).
    pub fn full() -> Self {
        Capabilities {
            max_message_size: None,
            max_batch: None,
            transactions: true,
            inbox_duplicate_at_insert: true,
            duplicate_id_at_add: true,
        }
    }

    /// Set the message size limit.
    pub fn with_max_message_size(mut self, limit: Option<usize>) -> Self {
        self.max_message_size = limit;
        self
    }

    /// Set the batch limit.
    pub fn with_max_batch(mut self, limit: Option<usize>) -> Self {
        self.max_batch = limit;
        self
    }

    /// Set whether transactions are supported.
    pub fn with_transactions(mut self, yes: bool) -> Self {
        self.transactions = yes;
        self
    }

    /// Set whether inbox duplicates show at insert time.
    pub fn with_inbox_duplicate_at_insert(mut self, yes: bool) -> Self {
        self.inbox_duplicate_at_insert = yes;
        self
    }

    /// Set whether a transactional add of a stored id fails at add time.
    pub fn with_duplicate_id_at_add(mut self, yes: bool) -> Self {
        self.duplicate_id_at_add = yes;
        self
    }
}

/// Durable storage for outgoing messages.
///
/// Every backend implements this trait, and the conformance suite holds each one to the
/// behaviour documented on every method. Time ("due", "age", retention) is read from the
/// store's own [`Clock`](crate::Clock), injected at construction.
///
/// Writing a message *together with business data* goes through the backend's transaction
/// type (see [`TransactionalStore`](crate::TransactionalStore)); the plain [`add`](Self::add)
/// here is a standalone, single-message transaction.
#[async_trait]
pub trait OutboxStore: Send + Sync + std::fmt::Debug {
    /// What this backend supports and its limits.
    ///
    /// # Behavior
    /// Constant for the lifetime of the store.
    fn capabilities(&self) -> Capabilities;

    /// Number of shards; every message's shard is `shard_for(key, id, shard_count)`.
    ///
    /// # Behavior
    /// Constant for the lifetime of the stored data. At least 1.
    fn shard_count(&self) -> u32;

    /// Store one message as pending, in its own transaction.
    ///
    /// # Behavior
    /// - On success the message is durable and pending; it is returned by `fetch_pending` once due.
    /// - Every field round-trips exactly (timestamps to the microsecond).
    /// - A message with an id that is already stored fails with `AlreadyExists`; the stored
    ///   message is unchanged.
    /// - A message over the backend's size limit fails with `PayloadTooLarge { size, limit }`
    ///   and nothing is written; invalid fields fail with `InvalidInput`.
    async fn add(&self, message: &Message) -> Result<()>;

    /// Store several messages atomically, in the given order (sequence follows slice order).
    ///
    /// # Behavior
    /// All or nothing: if any message fails (duplicate id, also within the batch; too large;
    /// invalid), nothing of the batch is written and the error names the cause.
    /// An empty batch is a no-op.
    async fn add_batch(&self, messages: &[Message]) -> Result<()>;

    /// Read one message by id.
    ///
    /// # Behavior
    /// `Ok(None)` when no message has this id (never added, or purged).
    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>>;

    /// Messages the relay may publish now.
    ///
    /// # Behavior
    /// - Only `Pending` messages with `deliver_after <= now` and `next_attempt_at <= now`, in
    ///   the requested shards.
    /// - Oldest first by store sequence, at most `limit`.
    /// - With [`Ordering::PerKey`], a message is returned only if every earlier (lower sequence)
    ///   non-dispatched message with the same key is returned before it in the same result;
    ///   so a key whose head message is not due, or parked, returns nothing.
    /// - Never returns dispatched or parked messages.
    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>>;

    /// Record that the broker confirmed these messages.
    ///
    /// # Behavior
    /// Sets status `Dispatched` and `dispatched_at = now`. Idempotent: ids already dispatched,
    /// or unknown, are ignored (a repeated call succeeds and changes nothing). Parked messages
    /// are marked dispatched too (a late confirmation wins). A dispatched message never
    /// appears in `fetch_pending` again (`requeue` only touches parked messages).
    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()>;

    /// Record a failed publish attempt of a pending message.
    ///
    /// # Behavior
    /// Increments `attempts` and stores the error. If `attempts` reaches `max_attempts` the
    /// message becomes `Parked` (no longer pending); otherwise `next_attempt_at` is set and the
    /// message is not due before it. A message that is not pending is left unchanged and
    /// `NotPending` is returned; an unknown id fails with `NotFound`.
    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome>;

    /// Return parked messages to pending.
    ///
    /// # Behavior
    /// Matching parked messages become `Pending` with `attempts = 0`, `next_attempt_at` unset
    /// (due at once) and their sequence unchanged (they keep their place in per-key order).
    /// Pending and dispatched messages are not touched. Returns how many were requeued.
    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64>;

    /// Counts and the age of the oldest pending message.
    ///
    /// # Behavior
    /// Exact at the time of the call; `oldest_pending_age = now - created_at` of the oldest
    /// pending message (by `created_at`), `None` when none is pending.
    async fn stats(&self) -> Result<OutboxStats>;

    /// Delete dispatched messages whose `dispatched_at` is older than `now - retention`.
    ///
    /// # Behavior
    /// Deletes at most `limit` messages per call and returns how many; call again until it
    /// returns less than `limit`. Pending and parked messages are never deleted.
    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64>;

    /// Operators' listing (CLI, dashboards). Not used by the relay; may be slower.
    ///
    /// # Behavior
    /// Matching messages in store sequence order, at most `limit` (100 when 0).
    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>>;

    /// How many messages were marked dispatched at or after `since` (operators' view, e.g.
    /// "dispatched in the last hour"; purged messages are not counted).
    ///
    /// # Behavior
    /// `Ok(None)` when the backend cannot count this cheaply (the default); otherwise the
    /// exact count at the time of the call.
    async fn dispatched_since(&self, since: DateTime<Utc>) -> Result<Option<u64>> {
        let _ = since;
        Ok(None)
    }
}
