//! Atomic writes: the caller's business data, outbox messages and inbox entries in one
//! transaction.
//!
//! Every backend exposes the same steps:
//!
//! 1. `store.begin().await?` opens a transaction ([`TransactionalStore::begin`]);
//! 2. the caller writes its own data through the backend-specific handle (SQL through
//!    `SqliteTx::execute` or `PgTx::conn`, staged `TransactWriteItems` entries through
//!    `DynamoDbTx::put` and friends, records through `MemoryTx::put_record`);
//! 3. `tx.add(&message)` / `tx.inbox_insert(&entry)` stage outbox and inbox writes;
//! 4. `tx.commit().await?` makes all of it durable at once, or nothing; it returns
//!    [`Committed`], which the caller hands to the relay for immediate dispatch.
//!
//! Dropping a transaction without committing rolls it back. What a failed operation leaves
//! behind is the same on every backend: see [`Transaction`].

use std::collections::BTreeSet;

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
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
///
/// # Behavior after a failure (every backend)
///
/// 1. A failed [`add`](Self::add), [`add_batch`](Self::add_batch) or
///    [`inbox_insert`](Self::inbox_insert) returns its typed error at once (`InvalidInput`,
///    `PayloadTooLarge`, `LimitExceeded`, `AlreadyExists`, `Unavailable`, ...). A failed write
///    of your own data aborts the transaction too where the backend's handle reports it
///    (SQLite's `execute`; a failed statement on PostgreSQL's `conn`).
/// 2. From then on the transaction is *aborted*: it can only be rolled back (or dropped).
///    [`rollback`](Self::rollback) succeeds. [`commit`](Self::commit), and every further
///    `add`, `add_batch` and `inbox_insert`, fail with [`ErrorKind::InvalidInput`] (not
///    retryable) whose message says that an earlier error aborted the transaction and names
///    that error (after a failed statement of yours on PostgreSQL, which does not say which
///    one failed, it says just that), and nothing of the transaction is ever written. So a
///    caller that ignores an error, or retries only the failed call, can never commit a
///    partial unit of work: retry the whole unit in a new transaction (the first error's
///    `is_retryable()` says whether that may help). Writes of your own data after the abort are refused where the handle can
///    report errors (SQLite's `execute`) and otherwise staged and discarded with the rest.
/// 3. Some failures can only be detected when the backend writes, at commit: a message id
///    that is already stored when
///    [`Capabilities::duplicate_id_at_add`](crate::Capabilities) is false, an inbox duplicate
///    when [`Capabilities::inbox_duplicate_at_insert`](crate::Capabilities) is false (both
///    DynamoDB, which cannot read inside a transaction), a concurrent transaction that
///    committed the same id or inbox entry first, a caller condition that fails. Then the
///    staging call succeeded and `commit` fails with the typed error (`AlreadyExists`,
///    `ConditionFailed`), writing nothing.
/// 4. `InsertOutcome::Duplicate` from `inbox_insert` is not a failure: the transaction stays
///    usable (the caller normally rolls back and skips its handler).
/// 5. The store itself is unaffected by an aborted transaction: other and later transactions
///    work as usual.
///
/// Backends keep this state with [`AbortState`].
#[async_trait]
pub trait Transaction: Send {
    /// Stage a message to be stored as pending when the transaction commits.
    ///
    /// # Behavior
    /// Same checks as [`OutboxStore::add`](crate::OutboxStore::add) (`InvalidInput`,
    /// `PayloadTooLarge` at once). A duplicate id fails with `AlreadyExists`, here or (see
    /// [`Capabilities::duplicate_id_at_add`](crate::Capabilities)) at commit, and then nothing
    /// of the transaction is written. Any error aborts the transaction (see the trait's
    /// documentation). Messages get their store sequence in add order, and per-key order
    /// across transactions follows commit order.
    async fn add(&mut self, message: &Message) -> Result<()>;

    /// Stage several messages, as [`add`](Self::add) for each in order.
    ///
    /// # Behavior
    /// If one fails, the transaction is aborted like after a failed `add`: `commit` is
    /// refused and nothing of it is ever visible.
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
    /// should roll back and skip the handler; the transaction is not aborted). Backends that
    /// can only detect duplicates at commit (see
    /// [`Capabilities::inbox_duplicate_at_insert`](crate::Capabilities)) return `Inserted`
    /// here and fail [`commit`](Self::commit) with `AlreadyExists`. An error (an invalid entry,
    /// a lost connection) aborts the transaction. If the transaction rolls back, the entry is
    /// not recorded.
    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome>;

    /// Make every staged write durable, atomically.
    ///
    /// # Behavior
    /// All or nothing. On error nothing was written; `is_retryable()` tells whether the whole
    /// transaction may be retried. An aborted transaction is refused with `InvalidInput`
    /// naming the error that aborted it.
    async fn commit(self) -> Result<Committed>;

    /// Discard every staged write.
    ///
    /// # Behavior
    /// Nothing of the transaction is ever visible. Equivalent to dropping it. Succeeds on an
    /// aborted transaction.
    async fn rollback(self) -> Result<()>;
}

/// The abort state of a transaction: the first error of a staging operation, after which
/// only rollback is allowed (rule 2 of [`Transaction`]). Backends keep one per transaction,
/// so every backend refuses with the same error.
///
/// ```
/// use outbox_core::{AbortState, Error, ErrorKind};
/// let mut state = AbortState::default();
/// assert!(state.check().is_ok());
/// let first: Result<(), Error> = Err(Error::invalid_input("message type is empty"));
/// assert!(state.track(first).is_err());
/// let refused = state.check().unwrap_err();
/// assert_eq!(refused.kind(), ErrorKind::InvalidInput);
/// assert!(refused.message().contains("message type is empty"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct AbortState {
    /// The first error, as displayed (kind, message and source).
    first: Option<String>,
}

impl AbortState {
    /// Whether an earlier error aborted the transaction.
    pub fn is_aborted(&self) -> bool {
        self.first.is_some()
    }

    /// Remember `error` as the reason for the abort, unless an earlier one is already
    /// remembered.
    pub fn abort(&mut self, error: &Error) {
        if self.first.is_none() {
            // Display: kind, retryability, message and the native source error.
            self.first = Some(error.to_string());
        }
    }

    /// Pass `result` through, aborting the transaction if it is an error.
    pub fn track<T>(&mut self, result: Result<T>) -> Result<T> {
        if let Err(e) = &result {
            self.abort(e);
        }
        result
    }

    /// `Ok` while the transaction is usable; after an abort, the refusal of every call but
    /// rollback: `InvalidInput`, not retryable, naming the first error.
    pub fn check(&self) -> Result<()> {
        match &self.first {
            None => Ok(()),
            Some(first) => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "the transaction was aborted by an earlier error and can only be rolled \
                     back; nothing of it was written (retry the whole unit of work in a new \
                     transaction). The earlier error: {first}"
                ),
            )
            .set_retryable(false)),
        }
    }
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
