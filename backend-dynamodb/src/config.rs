//! [`DynamoDbConfig`]: table names, shards, retention, guards and the clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Error, Result, SharedClock, SystemClock};

pub use outbox_core::rules::{DEFAULT_INBOX_RETENTION, DEFAULT_SHARD_COUNT};
use outbox_core::rules::{check_inbox_retention, check_shard_count};
/// Default time a dispatched message is kept before DynamoDB's TTL may delete it.
pub const DEFAULT_DISPATCHED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default number of attempts of one commit that loses races on a shard's sequence counter.
pub const DEFAULT_MAX_COMMIT_ATTEMPTS: u32 = 64;
/// Most shards a store accepts (each shard is one queue partition).
pub const MAX_SHARD_COUNT: u32 = 4096;

/// Default lifetime of a message's id guard (the item that makes a duplicate id fail with
/// `AlreadyExists` and that locates the message by id), counted from the add.
pub const DEFAULT_ID_GUARD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// Default minimum time between two writes of a shard's cursor by one store instance.
pub const DEFAULT_CURSOR_PERSIST_INTERVAL: Duration = Duration::from_secs(5);

/// Configuration of a [`DynamoDbStore`](crate::DynamoDbStore).
///
/// ```
/// use std::time::Duration;
/// use outbox_dynamodb::DynamoDbConfig;
/// let config = DynamoDbConfig::new("orders_")
///     .with_shard_count(32)
///     .with_inbox_retention(Duration::from_secs(24 * 3600));
/// assert_eq!(config.outbox_table(), "orders_outbox");
/// # config.validate().unwrap();
/// ```
#[derive(Clone)]
pub struct DynamoDbConfig {
    /// Prefix of every table name (`{prefix}outbox`, `{prefix}inbox`, `{prefix}locks`).
    pub table_prefix: String,
    /// Number of shards (default 16): one queue partition each. Recorded in the table at
    /// creation and checked by every store that opens it.
    pub shard_count: u32,
    /// Inbox dedup window (default 7 days).
    pub inbox_retention: Duration,
    /// How long after dispatch DynamoDB's TTL may delete a message (default 7 days).
    pub dispatched_ttl: Duration,
    /// Lifetime of a message's id guard from its add (default 30 days; at least
    /// `dispatched_ttl`). Within it a duplicate id fails with `AlreadyExists`.
    pub id_guard_ttl: Duration,
    /// Minimum time between two writes of a shard's cursor by this store (default 5 s).
    pub cursor_persist_interval: Duration,
    /// Attempts of one commit that keeps losing the race for its shard's next slot before it
    /// gives up with a retryable `Unavailable` error (default 64).
    pub max_commit_attempts: u32,
    /// The clock deciding what is due, ages, inbox expiry and lease expiry.
    pub clock: SharedClock,
}

impl DynamoDbConfig {
    /// Defaults with the given table prefix.
    pub fn new(table_prefix: impl Into<String>) -> Self {
        DynamoDbConfig {
            table_prefix: table_prefix.into(),
            shard_count: DEFAULT_SHARD_COUNT,
            inbox_retention: DEFAULT_INBOX_RETENTION,
            dispatched_ttl: DEFAULT_DISPATCHED_TTL,
            id_guard_ttl: DEFAULT_ID_GUARD_TTL,
            cursor_persist_interval: DEFAULT_CURSOR_PERSIST_INTERVAL,
            max_commit_attempts: DEFAULT_MAX_COMMIT_ATTEMPTS,
            clock: Arc::new(SystemClock),
        }
    }

    /// Set the shard count.
    pub fn with_shard_count(mut self, n: u32) -> Self {
        self.shard_count = n;
        self
    }

    /// Set the inbox dedup window.
    pub fn with_inbox_retention(mut self, d: Duration) -> Self {
        self.inbox_retention = d;
        self
    }

    /// Set the TTL of dispatched messages.
    pub fn with_dispatched_ttl(mut self, d: Duration) -> Self {
        self.dispatched_ttl = d;
        self
    }

    /// Set the lifetime of id guards.
    pub fn with_id_guard_ttl(mut self, d: Duration) -> Self {
        self.id_guard_ttl = d;
        self
    }

    /// Set the minimum time between cursor writes.
    pub fn with_cursor_persist_interval(mut self, d: Duration) -> Self {
        self.cursor_persist_interval = d;
        self
    }

    /// Set the number of commit attempts on slot races.
    pub fn with_max_commit_attempts(mut self, n: u32) -> Self {
        self.max_commit_attempts = n;
        self
    }

    /// Set the clock.
    pub fn with_clock(mut self, clock: SharedClock) -> Self {
        self.clock = clock;
        self
    }

    /// Name of the outbox table.
    pub fn outbox_table(&self) -> String {
        format!("{}outbox", self.table_prefix)
    }

    /// Name of the inbox table.
    pub fn inbox_table(&self) -> String {
        format!("{}inbox", self.table_prefix)
    }

    /// Name of the lock table.
    pub fn lock_table(&self) -> String {
        format!("{}locks", self.table_prefix)
    }

    /// Check the configuration.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the field: a table prefix with characters DynamoDB rejects
    /// (allowed: `a-z A-Z 0-9 _ - .`) or longer than 240 bytes, a shard count of 0 or over
    /// [`MAX_SHARD_COUNT`], a zero inbox retention or dispatched TTL, zero commit attempts.
    pub fn validate(&self) -> Result<()> {
        let p = &self.table_prefix;
        if p.len() > 240 {
            return Err(Error::config(format!(
                "table_prefix is {} bytes long; at most 240 (table names are limited to 255)",
                p.len()
            )));
        }
        if let Some(c) = p
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(Error::config(format!(
                "table_prefix {p:?} contains {c:?}; DynamoDB table names allow a-z A-Z 0-9 _ - ."
            )));
        }
        check_shard_count(self.shard_count, MAX_SHARD_COUNT)?;
        check_inbox_retention(self.inbox_retention)?;
        if self.dispatched_ttl.is_zero() {
            return Err(Error::config("dispatched_ttl must be greater than zero"));
        }
        if self.id_guard_ttl < self.dispatched_ttl {
            return Err(Error::config(format!(
                "id_guard_ttl ({:?}) must be at least dispatched_ttl ({:?}): a dispatched message must stay readable by id",
                self.id_guard_ttl, self.dispatched_ttl
            )));
        }
        if self.cursor_persist_interval.is_zero()
            || self.cursor_persist_interval * 100 > self.dispatched_ttl
        {
            return Err(Error::config(format!(
                "cursor_persist_interval ({:?}) must be non-zero and at most a hundredth of dispatched_ttl ({:?})",
                self.cursor_persist_interval, self.dispatched_ttl
            )));
        }
        if self.max_commit_attempts == 0 {
            return Err(Error::config("max_commit_attempts must be at least 1"));
        }
        Ok(())
    }

    /// Most messages in one `add_batch` (and one unit of work): each message is two actions
    /// of DynamoDB's 100 (its queue item and its id guard).
    pub fn max_batch(&self) -> usize {
        crate::codec::MAX_TRANSACTION_ACTIONS / 2
    }
}

impl Default for DynamoDbConfig {
    /// Defaults with the table prefix `outbox_`.
    fn default() -> Self {
        Self::new("outbox_")
    }
}

impl fmt::Debug for DynamoDbConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DynamoDbConfig")
            .field("table_prefix", &self.table_prefix)
            .field("shard_count", &self.shard_count)
            .field("inbox_retention", &self.inbox_retention)
            .field("dispatched_ttl", &self.dispatched_ttl)
            .field("id_guard_ttl", &self.id_guard_ttl)
            .field("cursor_persist_interval", &self.cursor_persist_interval)
            .field("max_commit_attempts", &self.max_commit_attempts)
            .field("clock", &self.clock)
            .finish()
    }
}
