//! [`DynamoDbConfig`]: table names, shards, retention, sequencing and the clock.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Error, Result, SharedClock, SystemClock};

/// Default number of shards.
pub const DEFAULT_SHARD_COUNT: u32 = 16;
/// Default inbox dedup window.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default time a dispatched message is kept before DynamoDB's TTL may delete it.
pub const DEFAULT_DISPATCHED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default number of attempts of one commit that loses races on a shard's sequence counter.
pub const DEFAULT_MAX_COMMIT_ATTEMPTS: u32 = 64;
/// Most shards a store accepts (each shard is one partition-key value of the pending index and
/// one counter item).
pub const MAX_SHARD_COUNT: u32 = 4096;

/// How the store assigns the sequence that orders messages of one key.
///
/// DynamoDB has no commit sequence, so the store makes one. See the crate README
/// ("Ordering") for the argument and the cost of each mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Sequencing {
    /// Exact commit order per shard, whatever the writers' clocks: every commit that adds
    /// messages reads the counter item of each shard it touches (strongly consistent) and
    /// advances it with a conditional update *in the same transaction*. Concurrent commits to
    /// one shard serialize on the counter; the loser retries with jittered backoff. Costs one
    /// extra transactional write (2 WCU) and one read (1 RCU) per shard per commit, and every
    /// add is a transaction.
    #[default]
    ShardCounter,
    /// Sequence from a hybrid logical clock of the writing process (wall-clock microseconds,
    /// strictly increasing within the process). No extra reads or writes, and a standalone
    /// `add` is a plain conditional `PutItem`. Per-key order across *different writer
    /// processes* then assumes their clocks agree to better than the time between two commits
    /// of the same key (chrony / Amazon Time Sync keep EC2 clocks within about a millisecond).
    WriterClock,
}

/// Configuration of a [`DynamoDbStore`](crate::DynamoDbStore).
///
/// ```
/// use std::time::Duration;
/// use outbox_dynamodb::{DynamoDbConfig, Sequencing};
/// let config = DynamoDbConfig::new("orders_")
///     .with_shard_count(32)
///     .with_inbox_retention(Duration::from_secs(24 * 3600))
///     .with_sequencing(Sequencing::ShardCounter);
/// assert_eq!(config.outbox_table(), "orders_outbox");
/// # config.validate().unwrap();
/// ```
#[derive(Clone)]
pub struct DynamoDbConfig {
    /// Prefix of every table name (`{prefix}outbox`, `{prefix}inbox`, `{prefix}locks`).
    pub table_prefix: String,
    /// Number of shards (default 16). Constant for the lifetime of the stored data.
    pub shard_count: u32,
    /// Inbox dedup window (default 7 days).
    pub inbox_retention: Duration,
    /// How long after dispatch DynamoDB's TTL may delete a message (default 7 days).
    pub dispatched_ttl: Duration,
    /// How message sequences are assigned (default [`Sequencing::ShardCounter`]).
    pub sequencing: Sequencing,
    /// Attempts of one commit that keeps losing the race on a shard counter before it gives
    /// up with a retryable `Unavailable` error (default 64).
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
            sequencing: Sequencing::default(),
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

    /// Set the sequencing mode.
    pub fn with_sequencing(mut self, s: Sequencing) -> Self {
        self.sequencing = s;
        self
    }

    /// Set the number of commit attempts on counter races.
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
        if self.shard_count == 0 || self.shard_count > MAX_SHARD_COUNT {
            return Err(Error::config(format!(
                "shard_count is {}; it must be between 1 and {MAX_SHARD_COUNT}",
                self.shard_count
            )));
        }
        if self.inbox_retention.is_zero() {
            return Err(Error::config(
                "inbox_retention must be greater than zero (a zero dedup window never detects a duplicate)",
            ));
        }
        if self.dispatched_ttl.is_zero() {
            return Err(Error::config("dispatched_ttl must be greater than zero"));
        }
        if self.max_commit_attempts == 0 {
            return Err(Error::config("max_commit_attempts must be at least 1"));
        }
        Ok(())
    }

    /// Most messages in one `add_batch` (and one unit of work), leaving room in DynamoDB's
    /// 100 actions for the shard counters the batch may touch.
    pub fn max_batch(&self) -> usize {
        match self.sequencing {
            Sequencing::WriterClock => crate::uow::MAX_TRANSACTION_ACTIONS,
            Sequencing::ShardCounter => {
                // n messages touch at most min(n, shards) counters: n + min(n, shards) <= 100.
                let shards = self.shard_count as usize;
                let half = crate::uow::MAX_TRANSACTION_ACTIONS / 2;
                if shards >= half {
                    half
                } else {
                    crate::uow::MAX_TRANSACTION_ACTIONS - shards
                }
            }
        }
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
            .field("sequencing", &self.sequencing)
            .field("max_commit_attempts", &self.max_commit_attempts)
            .field("clock", &self.clock)
            .finish()
    }
}
