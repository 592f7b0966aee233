//! [`SqliteTx`]: one `BEGIN IMMEDIATE` transaction on a pooled connection.

use std::fmt;
use std::sync::Arc;

use outbox_core::{
    AbortState, Committed, Error, InboxEntry, InsertOutcome, Message, Result, Transaction,
    async_trait,
};
use rusqlite::Connection;

use crate::core::{Core, PooledConn};
use crate::error::{join_error, parse_error, parse_error_with};
use crate::ops;

/// An open SQLite transaction: caller SQL, outbox adds and inbox inserts commit together.
///
/// Obtained from [`TransactionalStore::begin`](outbox_core::TransactionalStore::begin). It
/// owns a pooled connection on which `BEGIN IMMEDIATE` ran, so it holds the database's write
/// lock until it ends: keep it short, and do not call other write methods of the store while
/// holding it (they would wait for this lock until the busy timeout).
///
/// - Run your own SQL with [`execute`](Self::execute).
/// - Any failed operation (an error from your SQL, an invalid message, a duplicate message
///   id, a panic) aborts the transaction as the [`Transaction`] contract says: later calls,
///   including [`execute`](Self::execute), and [`commit`](Transaction::commit) are refused
///   with `InvalidInput` naming the first error, and nothing of it is written. Roll it back
///   (or drop it) and retry the whole unit of work if the first error is retryable.
/// - Dropping it without committing rolls back and returns the connection to the pool.
pub struct SqliteTx {
    core: Arc<Core>,
    conn: Option<PooledConn>,
    committed: Committed,
    abort: AbortState,
}

impl fmt::Debug for SqliteTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteTx")
            .field("open", &self.conn.is_some())
            .field("staged_messages", &self.committed.ids.len())
            .field("aborted", &self.abort.is_aborted())
            .finish_non_exhaustive()
    }
}

impl SqliteTx {
    pub(crate) async fn begin(core: Arc<Core>) -> Result<SqliteTx> {
        let mut pooled = core.pool.get().await?;
        let pooled = tokio::task::spawn_blocking(move || {
            pooled
                .conn()?
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(|e| parse_error_with(e, "beginning a transaction"))?;
            Ok::<_, Error>(pooled)
        })
        .await
        .map_err(join_error)??;
        Ok(SqliteTx {
            core,
            conn: Some(pooled),
            committed: Committed::default(),
            abort: AbortState::default(),
        })
    }

    /// Run the caller's own SQL inside this transaction, on a blocking thread.
    ///
    /// `f` gets the transaction's connection; do not run `COMMIT`, `ROLLBACK` or `BEGIN` in
    /// it (that ends this transaction, which is then reported as an error). If `f` returns an
    /// error, the transaction is aborted (see the type's documentation); the error is mapped
    /// with [`parse_error`](crate::parse_error) (a unique violation is `AlreadyExists`, a
    /// lock timeout a retryable `Unavailable`).
    ///
    /// ```no_run
    /// # async fn demo(mut tx: outbox_sqlite::SqliteTx) -> outbox_core::Result<()> {
    /// let rows = tx
    ///     .execute(|conn| conn.execute("UPDATE accounts SET balance = balance - 10 WHERE id = 1", []))
    ///     .await?;
    /// # let _ = rows; Ok(()) }
    /// ```
    pub async fn execute<T, F>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.run(move |conn| f(conn).map_err(parse_error)).await
    }

    /// Ids of the messages added so far (what [`commit`](Transaction::commit) will report).
    pub fn staged(&self) -> &Committed {
        &self.committed
    }

    /// Run `f` on the transaction's connection on a blocking thread; any failure aborts the
    /// transaction.
    async fn run<T, F>(&mut self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.abort.check()?;
        let Some(mut pooled) = self.conn.take() else {
            let e = Error::unexpected(
                "the transaction is no longer usable (an earlier operation on it was cancelled \
                 or panicked, and it was rolled back)",
            );
            self.abort.abort(&e);
            return Err(e);
        };
        let joined = tokio::task::spawn_blocking(move || {
            let (result, still_open) = match pooled.conn() {
                Ok(conn) => {
                    let result = f(conn);
                    (result, !conn.is_autocommit())
                }
                Err(e) => (Err(e), false),
            };
            (pooled, result, still_open)
        })
        .await;
        // On a panic the connection was dropped (rolled back) on the blocking thread.
        let (pooled, result, still_open) = match joined {
            Ok(v) => v,
            Err(e) => {
                let e = join_error(e);
                self.abort.abort(&e);
                return Err(e);
            }
        };
        self.conn = Some(pooled);
        let result = match result {
            Ok(_) if !still_open => Err(Error::unexpected(
                "the transaction ended inside the operation (COMMIT, ROLLBACK or a fatal \
                 SQLite error); its writes may or may not have been committed",
            )),
            other => other,
        };
        if let Err(e) = &result {
            self.abort.abort(e);
        }
        result
    }

    /// End the transaction with `sql` (`COMMIT` or `ROLLBACK`) on a blocking thread.
    async fn finish(&mut self, sql: &'static str) -> Result<()> {
        let Some(mut pooled) = self.conn.take() else {
            return Err(Error::unexpected(
                "the transaction is no longer usable (an earlier operation on it was cancelled \
                 or panicked, and it was rolled back)",
            ));
        };
        tokio::task::spawn_blocking(move || {
            let conn = pooled.conn()?;
            if conn.is_autocommit() {
                // SQLite already rolled the transaction back (after a fatal error).
                return if sql == "ROLLBACK" {
                    Ok(())
                } else {
                    Err(Error::unexpected(
                        "the transaction had already been rolled back by SQLite; nothing was \
                         committed",
                    ))
                };
            }
            // On failure `pooled` is dropped here, which rolls back (or closes) the connection.
            conn.execute_batch(sql)
                .map_err(|e| parse_error_with(e, format_args!("{sql} failed")))
        })
        .await
        .map_err(join_error)?
    }
}

#[async_trait]
impl Transaction for SqliteTx {
    async fn add(&mut self, message: &Message) -> Result<()> {
        let core = self.core.clone();
        let msg = message.clone();
        self.run(move |conn| ops::insert_message(conn, &core, &msg))
            .await?;
        self.committed.record(message, self.core.shard_count);
        Ok(())
    }

    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        self.abort.check()?;
        if messages.is_empty() {
            return Ok(());
        }
        let core = self.core.clone();
        let msgs = messages.to_vec();
        self.run(move |conn| ops::insert_messages(conn, &core, &msgs))
            .await?;
        for m in messages {
            self.committed.record(m, self.core.shard_count);
        }
        Ok(())
    }

    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        let core = self.core.clone();
        let entry = entry.clone();
        let now = self.core.clock.now();
        self.run(move |conn| ops::inbox_insert(conn, &core, &entry, now))
            .await
    }

    async fn commit(mut self) -> Result<Committed> {
        if let Err(refused) = self.abort.check() {
            // Roll back (or drop) the connection before reporting.
            let _ = self.finish("ROLLBACK").await;
            return Err(refused);
        }
        self.finish("COMMIT").await?;
        Ok(std::mem::take(&mut self.committed))
    }

    async fn rollback(mut self) -> Result<()> {
        if self.conn.is_none() {
            // Already rolled back (cancelled or panicked operation).
            return Ok(());
        }
        self.finish("ROLLBACK").await
    }
}

impl Drop for SqliteTx {
    fn drop(&mut self) {
        let Some(pooled) = self.conn.take() else {
            return;
        };
        // Dropping the pooled connection rolls back the open transaction. Do it on a blocking
        // thread when a runtime is around, so the async caller never waits for SQLite.
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(move || drop(pooled));
            }
            Err(_) => drop(pooled),
        }
    }
}
