//! A small connection pool: at most `pool_size` connections to one file, opened lazily, used
//! only on tokio's blocking threads.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outbox_core::{Error, Result};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{JournalMode, SqliteConfig, Synchronous};
use crate::error::{join_error, parse_error, parse_error_with};

/// How every connection of the pool (and [`SqliteStore::open_connection`](crate::SqliteStore::open_connection))
/// is set up.
#[derive(Debug, Clone)]
pub(crate) struct ConnSettings {
    pub(crate) path: PathBuf,
    pub(crate) synchronous: Synchronous,
    pub(crate) journal_mode: JournalMode,
    pub(crate) busy_timeout: Duration,
}

impl ConnSettings {
    pub(crate) fn from_config(config: &SqliteConfig) -> Self {
        ConnSettings {
            path: config.path().to_owned(),
            synchronous: config.synchronous(),
            journal_mode: config.journal_mode(),
            busy_timeout: config.busy_timeout(),
        }
    }

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
            .pragma_update_and_check(
                None,
                "journal_mode",
                self.journal_mode.pragma_value(),
                |r| r.get(0),
            )
            .map_err(|e| parse_error_with(e, "setting journal_mode"))?;
        if !mode.eq_ignore_ascii_case(self.journal_mode.pragma_value()) {
            return Err(Error::config(format!(
                "sqlite database {} refused journal_mode={} (it reports {mode:?})",
                self.path.display(),
                self.journal_mode.pragma_value()
            )));
        }
        conn.pragma_update(None, "synchronous", self.synchronous.pragma_value())
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
    size: usize,
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
