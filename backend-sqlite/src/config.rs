//! Configuration of a [`SqliteStore`](crate::SqliteStore).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Clock, Error, Result, SharedClock, SystemClock};

pub use outbox_core::rules::{
    DEFAULT_INBOX_RETENTION, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_SHARD_COUNT, DEFAULT_TABLE_PREFIX,
};
use outbox_core::rules::{check_inbox_retention, check_max_message_size, check_shard_count};

use crate::core::ConnSettings;

/// Default number of pooled connections.
pub const DEFAULT_POOL_SIZE: usize = 4;
/// Default time a statement waits for the database write lock before failing with a retryable
/// `Unavailable` error.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest message size the store accepts as a limit. SQLite's default `SQLITE_MAX_LENGTH`
/// (the largest string or blob, and the largest row) is 1,000,000,000 bytes.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 1_000_000_000;

/// The largest accepted `pool_size`.
pub const MAX_POOL_SIZE: usize = 1024;

const MAX_PREFIX_LEN: usize = 41;

/// SQLite's `PRAGMA synchronous`: how hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Synchronous {
    /// `FULL` (the default): a commit returns only after the write-ahead log was synced to
    /// disk. Nothing committed is lost, even on power loss or an OS crash.
    #[default]
    Full,
    /// `NORMAL`: in WAL mode the log is synced only at checkpoints. Still safe against an
    /// application crash, but on power loss or an OS crash the most recent commits may be
    /// rolled back (the database stays consistent). Faster commits.
    Normal,
    /// `EXTRA`: like `FULL`, and also syncs the directory after a rollback journal is deleted
    /// (only matters with [`JournalMode::Delete`]).
    Extra,
}

impl Synchronous {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
            Synchronous::Extra => "EXTRA",
        }
    }
}

/// SQLite's `PRAGMA journal_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum JournalMode {
    /// Write-ahead log (the default): readers never block the writer and the writer never
    /// blocks readers. Needs shared memory, so the file must be on a local file system.
    #[default]
    Wal,
    /// Classic rollback journal, for file systems without shared-memory support. Readers and
    /// the writer block each other briefly at commit.
    Delete,
}

impl JournalMode {
    pub(crate) fn pragma_value(self) -> &'static str {
        match self {
            JournalMode::Wal => "wal",
            JournalMode::Delete => "delete",
        }
    }
}

/// Everything [`SqliteStore::connect`](crate::SqliteStore::connect) needs.
///
/// Built with [`SqliteConfig::new`] and the `with_*` setters; checked by
/// [`validate`](Self::validate) (which `open` calls).
///
/// ```
/// use std::time::Duration;
/// use outbox_sqlite::{SqliteConfig, Synchronous};
/// let config = SqliteConfig::new("/var/lib/app/outbox.db")
///     .with_table_prefix("billing_")
///     .with_shard_count(8)
///     .with_synchronous(Synchronous::Normal)
///     .with_busy_timeout(Duration::from_secs(2));
/// assert!(config.validate().is_ok());
/// assert!(SqliteConfig::new("x.db").with_table_prefix("x; DROP TABLE y").validate().is_err());
/// ```
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    path: PathBuf,
    table_prefix: String,
    shard_count: u32,
    inbox_retention: Duration,
    max_message_size: usize,
    pool_size: usize,
    synchronous: Synchronous,
    journal_mode: JournalMode,
    busy_timeout: Duration,
    clock: SharedClock,
}

impl SqliteConfig {
    /// A configuration for the database file at `path` (created if missing) with every default:
    /// prefix `outbox_`, 16 shards, 7 days inbox retention, 10 MiB messages, 4 connections,
    /// `synchronous=FULL`, WAL, 5 s busy timeout, the system clock.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            table_prefix: DEFAULT_TABLE_PREFIX.to_owned(),
            shard_count: DEFAULT_SHARD_COUNT,
            inbox_retention: DEFAULT_INBOX_RETENTION,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            pool_size: DEFAULT_POOL_SIZE,
            synchronous: Synchronous::default(),
            journal_mode: JournalMode::default(),
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            clock: Arc::new(SystemClock),
        }
    }

    /// Prefix of every table and index name. Must match `^[A-Za-z_][A-Za-z0-9_]{0,40}$` and
    /// must not start with `sqlite_`. Several prefixes can share one file. SQLite compares
    /// names case-insensitively, so `App_` and `app_` name the same tables.
    pub fn with_table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// Number of shards (at least 1). Fixed for the lifetime of the stored data: it is
    /// recorded on first open, and opening with a different count fails with `ConfigInvalid`.
    pub fn with_shard_count(mut self, shard_count: u32) -> Self {
        self.shard_count = shard_count;
        self
    }

    /// How long inbox entries deduplicate (must be more than zero).
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Largest accepted message in bytes, as
    /// [`Message::encoded_size`](outbox_core::Message::encoded_size) measures it
    /// (1 ..= [`MAX_MESSAGE_SIZE_LIMIT`]).
    pub fn with_max_message_size(mut self, limit: usize) -> Self {
        self.max_message_size = limit;
        self
    }

    /// Most connections open at once (1 ..= [`MAX_POOL_SIZE`]). Connections are opened
    /// lazily. An open [`SqliteTx`](crate::SqliteTx) holds one until it ends; an operation
    /// that finds none free within the busy timeout fails with a retryable `Unavailable`.
    pub fn with_pool_size(mut self, pool_size: usize) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// Durability of commits; see [`Synchronous`].
    pub fn with_synchronous(mut self, synchronous: Synchronous) -> Self {
        self.synchronous = synchronous;
        self
    }

    /// Journal mode; see [`JournalMode`].
    pub fn with_journal_mode(mut self, journal_mode: JournalMode) -> Self {
        self.journal_mode = journal_mode;
        self
    }

    /// How long an operation waits for a free pooled connection, and then for a lock held by
    /// another connection (or process), before failing with a retryable `Unavailable` error.
    /// More than zero, at most `i32::MAX` milliseconds.
    pub fn with_busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// The clock deciding "due", lease expiry, inbox expiry and retention.
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The table prefix.
    pub fn table_prefix(&self) -> &str {
        &self.table_prefix
    }

    /// The number of shards.
    pub fn shard_count(&self) -> u32 {
        self.shard_count
    }

    /// The inbox dedup window.
    pub fn inbox_retention(&self) -> Duration {
        self.inbox_retention
    }

    /// The message size limit in bytes.
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }

    /// The most connections open at once.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }

    /// The `synchronous` setting.
    pub fn synchronous(&self) -> Synchronous {
        self.synchronous
    }

    /// The journal mode.
    pub fn journal_mode(&self) -> JournalMode {
        self.journal_mode
    }

    /// The busy timeout.
    pub fn busy_timeout(&self) -> Duration {
        self.busy_timeout
    }

    /// The clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Check every setting; the error (`ConfigInvalid`) names the offending one.
    pub fn validate(&self) -> Result<()> {
        validate_prefix(&self.table_prefix)?;
        let path = self.path.to_string_lossy();
        if path.is_empty() {
            return Err(Error::config("sqlite path must not be empty"));
        }
        if path == ":memory:" || path.contains("mode=memory") {
            return Err(Error::config(format!(
                "sqlite path {path:?} is an in-memory database, which every pooled connection \
                 would see as a different database; use a file (e.g. in a temporary directory) \
                 or the in-memory backend of outbox-core"
            )));
        }
        check_shard_count(self.shard_count, u32::MAX)?;
        if self.pool_size == 0 || self.pool_size > MAX_POOL_SIZE {
            return Err(Error::config(format!(
                "pool_size must be between 1 and {MAX_POOL_SIZE}, got {}",
                self.pool_size
            )));
        }
        check_inbox_retention(self.inbox_retention)?;
        check_max_message_size(self.max_message_size, MAX_MESSAGE_SIZE_LIMIT)?;
        if self.busy_timeout.is_zero() {
            return Err(Error::config("busy_timeout must be more than zero"));
        }
        if self.busy_timeout.as_millis() > i32::MAX as u128 {
            return Err(Error::config(format!(
                "busy_timeout must be at most {} ms",
                i32::MAX
            )));
        }
        Ok(())
    }
}

/// Check a table prefix: `^[A-Za-z_][A-Za-z0-9_]{0,40}$`, not starting with `sqlite_`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<()> {
    let mut chars = prefix.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !first_ok || !rest_ok || prefix.len() > MAX_PREFIX_LEN {
        return Err(Error::config(format!(
            "invalid table_prefix {prefix:?}: it must match ^[A-Za-z_][A-Za-z0-9_]{{0,40}}$ \
             (a letter or underscore, then up to 40 letters, digits or underscores)"
        )));
    }
    if prefix.to_ascii_lowercase().starts_with("sqlite_") {
        return Err(Error::config(format!(
            "invalid table_prefix {prefix:?}: names starting with \"sqlite_\" are reserved by SQLite"
        )));
    }
    Ok(())
}

impl SqliteConfig {
    /// How the store opens each connection of its pool.
    pub(crate) fn conn_settings(&self) -> ConnSettings {
        ConnSettings {
            path: self.path().to_owned(),
            synchronous: self.synchronous().pragma_value(),
            journal_mode: self.journal_mode().pragma_value(),
            busy_timeout: self.busy_timeout(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        for ok in ["outbox_", "_", "a", "A_1", &"a".repeat(41)] {
            assert!(validate_prefix(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "x; DROP TABLE y",
            "a-b",
            "é",
            &"a".repeat(42),
            "sqlite_x",
            "SQLite_",
            "a b",
        ] {
            let e = validate_prefix(bad).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::ConfigInvalid, "{bad}");
            assert!(e.to_string().contains("table_prefix"), "{e}");
        }
    }

    #[test]
    fn settings_are_checked() {
        let base = || SqliteConfig::new("x.db");
        assert!(base().validate().is_ok());
        for (cfg, needle) in [
            (base().with_shard_count(0), "shard_count"),
            (base().with_pool_size(0), "pool_size"),
            (base().with_pool_size(MAX_POOL_SIZE + 1), "pool_size"),
            (
                base().with_inbox_retention(Duration::ZERO),
                "inbox_retention",
            ),
            (base().with_max_message_size(0), "max_message_size"),
            (
                base().with_max_message_size(MAX_MESSAGE_SIZE_LIMIT + 1),
                "max_message_size",
            ),
            (base().with_busy_timeout(Duration::ZERO), "busy_timeout"),
            (SqliteConfig::new(":memory:"), "in-memory"),
            (SqliteConfig::new(""), "path"),
        ] {
            let e = cfg.validate().unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::ConfigInvalid);
            assert!(e.to_string().contains(needle), "{e}");
        }
    }
}
