//! The connection core of a [`SqliteStore`](crate::SqliteStore): the connection pool and how
//! each connection is opened, the settings every operation needs, and the SQL text of every
//! statement. A leaf: of this crate it imports only `error` (opening a connection maps
//! rusqlite's errors, and `error` imports nothing of this crate); every operation module
//! (`ops`, `tx`, `lock`) takes a [`Core`].

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Error, Result, SharedClock};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{join_error, parse_error, parse_error_with};

/// State shared by a store, its clones, its lock and its transactions.
pub(crate) struct Core {
    pub(crate) sql: Sql,
    pub(crate) pool: Pool,
    pub(crate) shard_count: u32,
    pub(crate) max_message_size: usize,
    pub(crate) inbox_retention: Duration,
    pub(crate) clock: SharedClock,
}

impl fmt::Debug for Core {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.pool.settings().path)
            .field("table_prefix", &self.sql.prefix)
            .field("shard_count", &self.shard_count)
            .field("pool_size", &self.pool.size)
            .finish_non_exhaustive()
    }
}

// The connection pool: at most `pool_size` connections to one file, opened lazily, used
// only on tokio's blocking threads.

/// How every connection of the pool (and [`SqliteStore::open_connection`](crate::SqliteStore::open_connection))
/// is set up.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) path: PathBuf,
    /// The `PRAGMA synchronous` value.
    pub(crate) synchronous: &'static str,
    /// The `PRAGMA journal_mode` value.
    pub(crate) journal_mode: &'static str,
    pub(crate) busy_timeout: Duration,
}

impl ConnSettings {
    /// Open and configure a connection. Blocking.
    pub(crate) fn open(&self) -> Result<Connection> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(&self.path, flags).map_err(|e| {
            parse_error_with(
                e,
                format_args!("cannot open sqlite database {}", self.path.display()),
            )
        })?;
        conn.busy_timeout(self.busy_timeout).map_err(parse_error)?;
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn
            .pragma_update_and_check(None, "journal_mode", self.journal_mode, |r| r.get(0))
            .map_err(|e| parse_error_with(e, "setting journal_mode"))?;
        if !mode.eq_ignore_ascii_case(self.journal_mode) {
            return Err(Error::config(format!(
                "sqlite database {} refused journal_mode={} (it reports {mode:?})",
                self.path.display(),
                self.journal_mode
            )));
        }
        conn.pragma_update(None, "synchronous", self.synchronous)
            .map_err(|e| parse_error_with(e, "setting synchronous"))?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(|e| parse_error_with(e, "setting foreign_keys"))?;
        Ok(conn)
    }
}

#[derive(Debug)]
struct Shared {
    settings: ConnSettings,
    idle: Mutex<Vec<Connection>>,
}

/// The pool. Clones share it.
#[derive(Debug, Clone)]
pub(crate) struct Pool {
    shared: Arc<Shared>,
    permits: Arc<Semaphore>,
    pub(crate) size: usize,
}

impl Pool {
    pub(crate) fn new(settings: ConnSettings, size: usize) -> Self {
        Pool {
            shared: Arc::new(Shared {
                settings,
                idle: Mutex::new(Vec::with_capacity(size)),
            }),
            permits: Arc::new(Semaphore::new(size)),
            size,
        }
    }

    pub(crate) fn settings(&self) -> &ConnSettings {
        &self.shared.settings
    }

    /// Wait for a free slot and take an idle connection if there is one. The connection itself
    /// is opened (if needed) by [`PooledConn::conn`], on a blocking thread.
    pub(crate) async fn get(&self) -> Result<PooledConn> {
        // Bounded by the busy timeout, so callers holding every connection (open transactions)
        // while waiting for another one get an error instead of waiting forever.
        let wait = self.shared.settings.busy_timeout;
        let permit = tokio::time::timeout(wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| {
                Error::unavailable(format!(
                    "no sqlite connection became free within the busy timeout ({wait:?}); all \
                     {} pooled connections are in use (long or leaked transactions?)",
                    self.size
                ))
            })?
            .map_err(|e| Error::unexpected("sqlite connection pool is closed").with_source(e))?;
        let conn = self
            .shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        Ok(PooledConn {
            conn,
            shared: self.shared.clone(),
            _permit: permit,
        })
    }

    /// Run `f` on a pooled connection on a blocking thread.
    pub(crate) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let mut pooled = self.get().await?;
        tokio::task::spawn_blocking(move || f(pooled.conn()?))
            .await
            .map_err(join_error)?
    }
}

/// A connection slot of the pool. Dropping it returns a healthy connection (no transaction
/// open) to the pool; a connection left inside a transaction is rolled back first, and closed
/// instead if that fails.
#[derive(Debug)]
pub(crate) struct PooledConn {
    conn: Option<Connection>,
    shared: Arc<Shared>,
    _permit: OwnedSemaphorePermit,
}

impl PooledConn {
    /// The connection, opening it first if this slot has none. Blocking.
    pub(crate) fn conn(&mut self) -> Result<&mut Connection> {
        if self.conn.is_none() {
            self.conn = Some(self.shared.settings.open()?);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| Error::unexpected("sqlite connection slot is empty"))
    }
}

impl Drop for PooledConn {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        if !conn.is_autocommit() {
            // Left inside a transaction (dropped transaction, error, panic): roll back.
            if let Err(e) = conn.execute_batch("ROLLBACK") {
                tracing::warn!(error = %e, "sqlite rollback of an abandoned transaction failed; closing the connection");
                return;
            }
            if !conn.is_autocommit() {
                return;
            }
        }
        self.shared
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
    }
}

/// The columns of a message row, in the order `codec::read_message` reads them.
const MESSAGE_COLUMNS: &str = "sequence, id, topic, key, payload, headers, content_type, \
     message_type, correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
     baggage, status, attempts, next_attempt_at, last_error, dispatched_at, shard";

/// The condition under which an earlier message of a key holds back later ones (PerKey):
/// parked, or pending but not due at `:now`. The first three terms repeat the WHERE clause
/// of the `messages_key_blockers` partial index word for word, so SQLite uses it.
fn blocker_condition(alias: &str) -> String {
    format!(
        "{a}.key IS NOT NULL AND {a}.status <> 'dispatched' \
         AND ({a}.status = 'parked' OR {a}.next_attempt_at IS NOT NULL OR {a}.deliver_after IS NOT NULL) \
         AND ({a}.status = 'parked' OR {a}.next_attempt_at > :now OR {a}.deliver_after > :now)",
        a = alias
    )
}

/// The SQL text of every statement, built once per store for its prefix.
#[derive(Debug)]
pub(crate) struct Sql {
    pub(crate) prefix: String,
    pub(crate) insert_message: String,
    pub(crate) get_message: String,
    pub(crate) pending_per_key: String,
    pub(crate) pending_unordered: String,
    pub(crate) message_by_sequence: String,
    pub(crate) mark_dispatched: String,
    pub(crate) failed_state: String,
    pub(crate) mark_retrying: String,
    pub(crate) mark_parked: String,
    pub(crate) requeue_id: String,
    pub(crate) requeue_topic: String,
    pub(crate) requeue_all: String,
    pub(crate) stats: String,
    pub(crate) purge_dispatched: String,
    pub(crate) list: String,
    pub(crate) dispatched_since: String,
    pub(crate) inbox_insert: String,
    pub(crate) inbox_contains: String,
    pub(crate) inbox_purge: String,
    pub(crate) lease_get: String,
    pub(crate) lease_insert: String,
    pub(crate) lease_take: String,
    pub(crate) lease_extend: String,
    pub(crate) lease_release: String,
}

impl Sql {
    /// Statements for `prefix`, which must have been validated.
    pub(crate) fn new(prefix: &str) -> Self {
        let m = format!("{prefix}messages");
        let i = format!("{prefix}inbox");
        let l = format!("{prefix}leases");
        let cols = MESSAGE_COLUMNS;
        let due = "(m.deliver_after IS NULL OR m.deliver_after <= :now) \
                   AND (m.next_attempt_at IS NULL OR m.next_attempt_at <= :now)";
        let pending_base = format!(
            "SELECT m.sequence FROM {m} AS m \
             WHERE m.status = 'pending' AND m.shard = :shard AND {due}"
        );
        Sql {
            prefix: prefix.to_owned(),
            insert_message: format!(
                "INSERT INTO {m} (id, topic, key, payload, headers, content_type, message_type, \
                 correlation_id, reply_to, created_at, deliver_after, traceparent, tracestate, \
                 baggage, status, attempts, shard) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 'pending', 0, ?15)"
            ),
            get_message: format!("SELECT {cols} FROM {m} WHERE id = ?1"),
            pending_per_key: format!(
                "{pending_base} AND (m.key IS NULL OR NOT EXISTS (\
                 SELECT 1 FROM {m} AS e WHERE e.key = m.key AND e.sequence < m.sequence AND {blk})) \
                 ORDER BY m.sequence LIMIT :limit",
                blk = blocker_condition("e")
            ),
            pending_unordered: format!("{pending_base} ORDER BY m.sequence LIMIT :limit"),
            message_by_sequence: format!("SELECT {cols} FROM {m} WHERE sequence = ?1"),
            mark_dispatched: format!(
                "UPDATE {m} SET status = 'dispatched', dispatched_at = ?2 \
                 WHERE id = ?1 AND status <> 'dispatched'"
            ),
            failed_state: format!("SELECT status, attempts FROM {m} WHERE id = ?1"),
            mark_retrying: format!(
                "UPDATE {m} SET attempts = ?2, last_error = ?3, next_attempt_at = ?4 \
                 WHERE id = ?1 AND status = 'pending'"
            ),
            mark_parked: format!(
                "UPDATE {m} SET status = 'parked', attempts = ?2, last_error = ?3, \
                 next_attempt_at = NULL WHERE id = ?1 AND status = 'pending'"
            ),
            requeue_id: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE id = ?1 AND status = 'parked'"
            ),
            requeue_topic: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE topic = ?1 AND status = 'parked'"
            ),
            requeue_all: format!(
                "UPDATE {m} SET status = 'pending', attempts = 0, next_attempt_at = NULL \
                 WHERE status = 'parked'"
            ),
            stats: format!(
                "SELECT (SELECT count(*) FROM {m} WHERE status = 'pending'), \
                        (SELECT count(*) FROM {m} WHERE status = 'parked'), \
                        (SELECT min(created_at) FROM {m} WHERE status = 'pending')"
            ),
            purge_dispatched: format!(
                "DELETE FROM {m} WHERE sequence IN (\
                 SELECT sequence FROM {m} WHERE status = 'dispatched' AND dispatched_at <= ?1 \
                 ORDER BY dispatched_at LIMIT ?2)"
            ),
            list: format!(
                "SELECT {cols} FROM {m} WHERE (?1 IS NULL OR status = ?1) \
                 AND (?2 IS NULL OR topic = ?2) AND (?3 IS NULL OR key = ?3) \
                 ORDER BY sequence LIMIT ?4"
            ),
            dispatched_since: format!(
                "SELECT count(*) FROM {m} WHERE status = 'dispatched' AND dispatched_at >= ?1"
            ),
            inbox_insert: format!(
                "INSERT INTO {i} (message_id, handler_key, inserted_at, expires_at) \
                 VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (message_id, handler_key) DO UPDATE \
                 SET inserted_at = excluded.inserted_at, expires_at = excluded.expires_at \
                 WHERE {i}.expires_at <= ?3"
            ),
            inbox_contains: format!(
                "SELECT EXISTS (SELECT 1 FROM {i} \
                 WHERE message_id = ?1 AND handler_key = ?2 AND expires_at > ?3)"
            ),
            inbox_purge: format!(
                "DELETE FROM {i} WHERE rowid IN (\
                 SELECT rowid FROM {i} WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)"
            ),
            lease_get: format!("SELECT owner, token, expires_at FROM {l} WHERE resource = ?1"),
            lease_insert: format!(
                "INSERT INTO {l} (resource, owner, token, expires_at) VALUES (?1, ?2, ?3, ?4)"
            ),
            lease_take: format!(
                "UPDATE {l} SET owner = ?2, token = ?3, expires_at = ?4 WHERE resource = ?1"
            ),
            lease_extend: format!(
                "UPDATE {l} SET expires_at = ?4 WHERE resource = ?1 AND owner = ?2 AND token = ?3"
            ),
            lease_release: format!(
                "UPDATE {l} SET owner = NULL WHERE resource = ?1 AND owner = ?2 AND token = ?3"
            ),
        }
    }
}
