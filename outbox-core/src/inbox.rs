//! The inbox (idempotent consumer) contract.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::message::MessageId;

/// One handled message, for one handler.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InboxEntry {
    /// Id of the received message.
    pub message_id: MessageId,
    /// Which handler processed it. The same message may be handled once per handler key.
    pub handler_key: String,
}

impl InboxEntry {
    /// An entry for `message_id` handled by `handler_key`.
    pub fn new(message_id: MessageId, handler_key: impl Into<String>) -> Self {
        InboxEntry {
            message_id,
            handler_key: handler_key.into(),
        }
    }
}

/// Result of an inbox insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InsertOutcome {
    /// First time this (message id, handler key) pair was seen: handle the message.
    Inserted,
    /// Seen before (and not expired): skip the handler, acknowledge the delivery.
    Duplicate,
}

/// Durable record of handled messages, so a redelivered message has no second effect.
///
/// Inside a handler's transaction, use the backend's
/// [`Transaction::inbox_insert`](crate::Transaction::inbox_insert) instead of
/// [`insert`](Self::insert), so the entry commits or rolls back with the handler's writes.
#[async_trait]
pub trait InboxStore: Send + Sync + std::fmt::Debug {
    /// Record `entry` in its own transaction.
    ///
    /// # Behavior
    /// - Returns `Inserted` the first time a (message id, handler key) pair is inserted and
    ///   `Duplicate` afterwards, also when many callers insert the same pair concurrently:
    ///   exactly one of them gets `Inserted`.
    /// - The same message id with a different handler key is independent.
    /// - An entry older than the store's dedup window counts as absent (the insert succeeds
    ///   again), whether or not it has physically been deleted yet.
    /// - An empty handler key fails with `InvalidInput`.
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome>;

    /// Whether a live (unexpired) entry exists.
    ///
    /// # Behavior
    /// `true` exactly when a following `insert` of the same pair would return `Duplicate`.
    async fn contains(&self, entry: &InboxEntry) -> Result<bool>;

    /// The dedup window: entries expire this long after they were inserted.
    ///
    /// # Behavior
    /// Constant for the lifetime of the store.
    fn retention(&self) -> Duration;

    /// Delete expired entries, at most `limit` per call; returns how many were deleted.
    ///
    /// # Behavior
    /// Only entries older than the retention are deleted. Backends that expire entries by
    /// themselves (DynamoDB TTL) may return 0 and rely on that.
    async fn purge_expired(&self, limit: usize) -> Result<u64>;
}

/// When an inbox entry inserted at `inserted_at` expires, for a window of `retention`.
pub fn inbox_expiry(inserted_at: DateTime<Utc>, retention: Duration) -> DateTime<Utc> {
    crate::clock::add_duration(inserted_at, retention)
}
