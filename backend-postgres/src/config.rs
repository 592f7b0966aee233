//! Configuration of a [`PgStore`](crate::PgStore): names, limits, clocks, pool settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{Clock, Error, Result, SharedClock, SystemClock};

use crate::core::LockClock;

/// Default schema.
pub const DEFAULT_SCHEMA: &str = "public";
pub use outbox_core::rules::{
    DEFAULT_INBOX_RETENTION, DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_SHARD_COUNT, DEFAULT_TABLE_PREFIX,
};
use outbox_core::rules::{check_inbox_retention, check_max_message_size, check_shard_count};
/// The largest accepted `max_message_size`: 256 MiB. PostgreSQL's own limit for one `bytea`
/// value is 1 GB, and a protocol message (all parameters of one statement) is limited to 1 GB
/// too; a quarter of that leaves room for batches.
pub const MAX_MESSAGE_SIZE_LIMIT: usize = 256 * 1024 * 1024;
/// Default most pooled connections, for [`PgStore::connect`](crate::PgStore::connect).
pub const DEFAULT_POOL_SIZE: u32 = 10;
/// Default time to wait for a pooled connection before a retryable `Unavailable` error.
pub const DEFAULT_ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest schema name or table prefix (so `{prefix}messages_key_blockers` stays within
/// PostgreSQL's 63-byte identifiers).
const MAX_IDENT_LEN: usize = 41;

/// Everything a [`PgStore`](crate::PgStore) needs besides the connection.
///
/// ```
/// use std::time::Duration;
/// use outbox_postgres::{LockClock, PgConfig};
/// let config = PgConfig::new()
///     .with_schema("billing")
///     .with_table_prefix("outbox_")
///     .with_shard_count(8)
///     .with_inbox_retention(Duration::from_secs(24 * 3600))
///     .with_lock_clock(LockClock::Database);
/// assert!(config.validate().is_ok());
/// assert!(PgConfig::new().with_schema("x\"; DROP TABLE y; --").validate().is_err());
/// ```
#[derive(Clone)]
pub struct PgConfig {
    schema: String,
    table_prefix: String,
    shard_count: u32,
    inbox_retention: Duration,
    max_message_size: usize,
    clock: SharedClock,
    lock_clock: LockClock,
    notify: bool,
    pool_size: u32,
    acquire_timeout: Duration,
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("schema", &self.schema)
            .field("table_prefix", &self.table_prefix)
            .field("shard_count", &self.shard_count)
            .field("inbox_retention", &self.inbox_retention)
            .field("max_message_size", &self.max_message_size)
            .field("lock_clock", &self.lock_clock)
            .field("notify", &self.notify)
            .field("pool_size", &self.pool_size)
            .field("acquire_timeout", &self.acquire_timeout)
            .finish_non_exhaustive()
    }
}

impl Default for PgConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl PgConfig {
    /// Every default: schema `public`, prefix `outbox_`, 16 shards, 7 days inbox retention,
    /// 10 MiB messages, the system clock, leases on the database clock, no `NOTIFY`,
    /// 10 connections, 5 s acquire timeout.
    pub fn new() -> Self {
        PgConfig {
            schema: DEFAULT_SCHEMA.to_owned(),
            table_prefix: DEFAULT_TABLE_PREFIX.to_owned(),
            shard_count: DEFAULT_SHARD_COUNT,
            inbox_retention: DEFAULT_INBOX_RETENTION,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            clock: Arc::new(SystemClock),
            lock_clock: LockClock::default(),
            notify: false,
            pool_size: DEFAULT_POOL_SIZE,
            acquire_timeout: DEFAULT_ACQUIRE_TIMEOUT,
        }
    }

    /// Schema holding the tables (created by `migrate` if missing). Must match
    /// `^[a-z_][a-z0-9_]{0,40}$` and not start with `pg_`.
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Prefix of every table, index and sequence name. Must match `^[a-z_][a-z0-9_]{0,40}$`.
    /// Several prefixes can share a schema.
    pub fn with_table_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.table_prefix = prefix.into();
        self
    }

    /// Number of shards (at least 1). Fixed for the lifetime of the stored data: `migrate`
    /// records it and fails with `ConfigInvalid` when it differs from the recorded one.
    pub fn with_shard_count(mut self, shard_count: u32) -> Self {
        self.shard_count = shard_count;
        self
    }

    /// How long inbox entries deduplicate (more than zero).
    pub fn with_inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// Largest accepted message in bytes as
    /// [`Message::encoded_size`](outbox_core::Message::encoded_size) measures it
    /// (1 ..= [`MAX_MESSAGE_SIZE_LIMIT`]).
    pub fn with_max_message_size(mut self, limit: usize) -> Self {
        self.max_message_size = limit;
        self
    }

    /// The clock deciding "due", backoff, ages, inbox expiry and retention (and lease expiry
    /// with [`LockClock::Store`]).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Which clock judges lease expiry; see [`LockClock`].
    pub fn with_lock_clock(mut self, lock_clock: LockClock) -> Self {
        self.lock_clock = lock_clock;
        self
    }

    /// Send `pg_notify` on [`PgStore::notify_channel`](crate::PgStore::notify_channel) in every
    /// transaction that adds messages, so a [`PgStore::listen`](crate::PgStore::listen) task
    /// wakes the relay at commit. Off by default: notifying transactions serialise on
    /// PostgreSQL's notification queue at commit, which costs throughput under heavy write load.
    pub fn with_notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Most connections of the pool [`PgStore::connect`](crate::PgStore::connect) opens
    /// (ignored by [`PgStore::new`](crate::PgStore::new), which takes your pool).
    pub fn with_pool_size(mut self, pool_size: u32) -> Self {
        self.pool_size = pool_size;
        self
    }

    /// How long [`PgStore::connect`](crate::PgStore::connect)'s pool waits for a free
    /// connection before a retryable `Unavailable` error.
    pub fn with_acquire_timeout(mut self, timeout: Duration) -> Self {
        self.acquire_timeout = timeout;
        self
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
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

    /// The store's clock.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// The lease clock.
    pub fn lock_clock(&self) -> LockClock {
        self.lock_clock
    }

    /// Whether adds send `pg_notify`.
    pub fn notify(&self) -> bool {
        self.notify
    }

    /// The pool size used by `connect`.
    pub fn pool_size(&self) -> u32 {
        self.pool_size
    }

    /// The acquire timeout used by `connect`.
    pub fn acquire_timeout(&self) -> Duration {
        self.acquire_timeout
    }

    /// Check every setting; the error (`ConfigInvalid`) names the offending one.
    pub fn validate(&self) -> Result<()> {
        validate_ident("schema", &self.schema)?;
        if self.schema.starts_with("pg_") {
            return Err(Error::config(format!(
                "invalid schema {:?}: names starting with \"pg_\" are reserved by PostgreSQL",
                self.schema
            )));
        }
        validate_ident("table_prefix", &self.table_prefix)?;
        check_shard_count(self.shard_count, i32::MAX as u32)?;
        check_inbox_retention(self.inbox_retention)?;
        check_max_message_size(self.max_message_size, MAX_MESSAGE_SIZE_LIMIT)?;
        if self.pool_size == 0 {
            return Err(Error::config("pool_size must be at least 1"));
        }
        if self.acquire_timeout.is_zero() {
            return Err(Error::config("acquire_timeout must be more than zero"));
        }
        Ok(())
    }
}

/// Check a schema name or table prefix: `^[a-z_][a-z0-9_]{0,40}$`. Lower case only, so the
/// quoted identifier means the same as the unquoted one in hand-written SQL.
pub(crate) fn validate_ident(what: &str, value: &str) -> Result<()> {
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !first_ok || !rest_ok || value.len() > MAX_IDENT_LEN {
        return Err(Error::config(format!(
            "invalid {what} {value:?}: it must match ^[a-z_][a-z0-9_]{{0,40}}$ (a lower-case \
             letter or underscore, then up to 40 lower-case letters, digits or underscores)"
        )));
    }
    Ok(())
}

/// A connection URL with the password replaced by `***`, for `Debug`, `Display` and logs.
///
/// Handles URLs (`postgres://user:secret@host/db`, also the `password=` query parameter) and
/// key/value strings (`host=x password=secret`).
///
/// ```
/// use outbox_postgres::redact_url;
/// assert_eq!(redact_url("postgres://app:s3cr3t@db:5432/app"), "postgres://app:***@db:5432/app");
/// assert_eq!(redact_url("postgresql://db/app?password=s3cr3t&sslmode=require"),
///            "postgresql://db/app?password=***&sslmode=require");
/// assert_eq!(redact_url("host=db password=s3cr3t user=app"), "host=db password=*** user=app");
/// ```
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    // userinfo: scheme://user:password@host
    if let Some(scheme_end) = out.find("://") {
        let rest_start = scheme_end + 3;
        let authority_end = out[rest_start..]
            .find(['/', '?', '#'])
            .map_or(out.len(), |i| rest_start + i);
        if let Some(at) = out[rest_start..authority_end].rfind('@') {
            let userinfo = &out[rest_start..rest_start + at];
            if let Some(colon) = userinfo.find(':') {
                let start = rest_start + colon + 1;
                let end = rest_start + at;
                out.replace_range(start..end, "***");
            }
        }
    }
    // password=... as a query parameter or a key/value pair
    let mut search = 0;
    while let Some(pos) = out[search..].find("password=") {
        let at = search + pos;
        let start = at + "password=".len();
        let whole_word = at == 0 || matches!(out.as_bytes()[at - 1], b'?' | b'&' | b' ' | b'\t');
        if whole_word {
            let end = out[start..]
                .find(['&', ' ', '\t', '#'])
                .map_or(out.len(), |i| start + i);
            out.replace_range(start..end, "***");
            search = start + 3;
        } else {
            search = start;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn identifiers() {
        for ok in ["outbox_", "_", "a", "a_1", &"a".repeat(41)] {
            assert!(validate_ident("schema", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "1a",
            "A",
            "x; DROP TABLE y",
            "x\"; DROP TABLE y; --",
            "a-b",
            "é",
            &"a".repeat(42),
            "a b",
            "a.b",
            "a'b",
        ] {
            let e = validate_ident("table_prefix", bad).unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::ConfigInvalid, "{bad}");
            assert!(e.to_string().contains("table_prefix"), "{e}");
        }
        let e = PgConfig::new().with_schema("pg_x").validate().unwrap_err();
        assert!(e.to_string().contains("pg_"), "{e}");
    }

    #[test]
    fn settings_are_checked() {
        assert!(PgConfig::new().validate().is_ok());
        for (cfg, needle) in [
            (PgConfig::new().with_shard_count(0), "shard_count"),
            (
                PgConfig::new().with_inbox_retention(Duration::ZERO),
                "inbox_retention",
            ),
            (PgConfig::new().with_max_message_size(0), "max_message_size"),
            (
                PgConfig::new().with_max_message_size(MAX_MESSAGE_SIZE_LIMIT + 1),
                "max_message_size",
            ),
            (PgConfig::new().with_pool_size(0), "pool_size"),
            (
                PgConfig::new().with_acquire_timeout(Duration::ZERO),
                "acquire_timeout",
            ),
        ] {
            let e = cfg.validate().unwrap_err();
            assert_eq!(e.kind(), outbox_core::ErrorKind::ConfigInvalid);
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    #[test]
    fn redaction() {
        for (url, want) in [
            (
                "postgres://outbox:outbox@127.0.0.1:5432/outbox",
                "postgres://outbox:***@127.0.0.1:5432/outbox",
            ),
            ("postgres://u:p%40ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("postgres://h/db?password=x", "postgres://h/db?password=***"),
            (
                "postgres://h/db?sslmode=x&password=y&a=b",
                "postgres://h/db?sslmode=x&password=***&a=b",
            ),
            ("password=x host=h", "password=*** host=h"),
            ("host=h mypassword=x", "host=h mypassword=x"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }
}
