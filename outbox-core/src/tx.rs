//! Atomic writes: the caller's business data, outbox messages and inbox entries in one
//! transaction.
//!
//! Every backend exposes the same pattern:
//!
//! 1. `store.begin().await?` opens a transaction ([`TransactionalStore::begin`]);
//! 2. the caller writes its own data through the backend-specific handle (a SQL connection for
//!    SQLite/PostgreSQL, staged `TransactWriteItems` entries for DynamoDB, records for memory);
//! 3. `tx.add(&message)` / `tx.inbox_insert(&entry)` stage outbox and inbox writes;
//! 4. `tx.commit().await?` makes all of it durable at once, or nothing; it returns
//!    [`Committed`], which the caller hands to the relay for immediate dispatch.
//!
//! Dropping a transaction without committing rolls it back.

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::error::Result;
use crate::inbox::{InboxEntry, InsertOutcome};
use crate::message::{Message, MessageId, shard_for};

/// What a commit made durable: the ids and shards of the added messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Ids of the messages added in the transaction, in add order.
    pub ids: Vec<MessageId>,
    /// Shards of those messages.
    pub shards: BTreeSet<u32>,
}

impl Committed {
    /// Record a staged message (backends call this as they stage adds).
    pub fn record(&mut self, message: &Message, shard_count: u32) {
        self.ids.push(message.id);
        self.shards
            .insert(shard_for(message.key.as_deref(), &message.id, shard_count));
    }

    /// Whether the transaction added no message.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// An open transaction of a backend. Dropping it without [`commit`](Self::commit) rolls back.
#[async_trait]
pub trait Transaction: Send {
    /// Stage a message to be stored as pending when the transaction commits.
    ///
    /// # Behavior
    /// Same checks as [`OutboxStore::add`](crate::OutboxStore::add) (`InvalidInput`,
    /// `PayloadTooLarge` at once). A duplicate id fails with `AlreadyExists`, here or at
    /// commit, and then nothing of the transaction is written. Messages get their store
    /// sequence in add order, and per-key order across transactions follows commit order.
    async fn add(&mut self, message: &Message) -> Result<()>;

    /// Stage several messages, as [`add`](Self::add) for each in order.
    ///
    /// # Behavior
    /// If one fails, the transaction must not be committed (commit would fail or the caller
    /// rolls back); nothing of it is ever partly visible.
    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        for m in messages {
            self.add(m).await?;
        }
        Ok(())
    }

    /// Record an inbox entry as part of this transaction.
    ///
    /// # Behavior
    /// Returns `Duplicate` when a live entry for the pair already exists (then the caller
    /// should roll back and skip the handler). Backends that can only detect duplicates at
    /// commit (see [`Capabilities::inbox_duplicate_at_insert`](crate::Capabilities)) return
    /// `Inserted` here and fail [`commit`](Self::commit) with `AlreadyExists`.
    /// If the transaction rolls back, the entry is not recorded.
    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome>;

    /// Make every staged write durable, atomically.
    ///
    /// # Behavior
    /// All or nothing. On error nothing was written; `is_retryable()` tells whether the whole
    /// transaction may be retried.
    async fn commit(self) -> Result<Committed>;

    /// Discard every staged write.
    ///
    /// # Behavior
    /// Nothing of the transaction is ever visible. Equivalent to dropping it.
    async fn rollback(self) -> Result<()>;
}

/// A store that can open transactions spanning caller writes, outbox adds and inbox inserts.
#[async_trait]
pub trait TransactionalStore: Send + Sync {
    /// The backend's transaction handle.
    type Tx: Transaction + 'static;

    /// Open a transaction.
    ///
    /// # Behavior
    /// Nothing staged in the returned transaction is visible to others before it commits.
    async fn begin(&self) -> Result<Self::Tx>;
}
