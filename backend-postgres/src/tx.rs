//! [`PgTx`]: a database transaction spanning your SQL, outbox adds and inbox inserts.

use std::fmt;
use std::sync::Arc;

use outbox_core::{
    AbortState, Committed, ErrorKind, InboxEntry, InsertOutcome, Message, Result, Transaction,
    async_trait,
};
use sqlx::{PgConnection, Postgres};

use crate::core::Core;
use crate::error::parse_error_with;
use crate::ops;

/// An open PostgreSQL transaction (`READ COMMITTED`) on a pooled connection: your own SQL,
/// outbox adds and inbox inserts commit together, or not at all.
///
/// Obtained from [`TransactionalStore::begin`](outbox_core::TransactionalStore::begin).
///
/// - Run your own SQL on [`conn`](Self::conn): `sqlx::query("...").execute(tx.conn()).await`.
/// - A failed outbox or inbox operation (an invalid message, a duplicate message id, a lost
///   connection) aborts the transaction as the [`Transaction`] contract says: further adds,
///   inbox inserts and [`commit`](Transaction::commit) are refused with `InvalidInput` naming
///   the first error, and nothing is written. Only rollback remains.
/// - If you used [`conn`](Self::conn), `commit` first checks that PostgreSQL did not abort the
///   transaction because of an error in your SQL (PostgreSQL would otherwise turn the `COMMIT`
///   into a silent rollback): it fails instead of reporting a commit that did not happen.
/// - Dropping it without committing rolls back.
pub struct PgTx {
    core: Arc<Core>,
    tx: sqlx::Transaction<'static, Postgres>,
    committed: Committed,
    abort: AbortState,
    caller_sql: bool,
}

impl fmt::Debug for PgTx {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgTx")
            .field("staged_messages", &self.committed.ids.len())
            .field("aborted", &self.abort.is_aborted())
            .finish_non_exhaustive()
    }
}

impl PgTx {
    pub(crate) async fn begin(core: Arc<Core>) -> Result<PgTx> {
        let tx = core
            .pool
            .begin()
            .await
            .map_err(|e| parse_error_with(e, "beginning a transaction"))?;
        Ok(PgTx {
            core,
            tx,
            committed: Committed::default(),
            abort: AbortState::default(),
            caller_sql: false,
        })
    }

    /// The transaction's connection, for your own SQL. Do not run `COMMIT`, `ROLLBACK` or
    /// `BEGIN` on it; use [`commit`](Transaction::commit) and
    /// [`rollback`](Transaction::rollback).
    pub fn conn(&mut self) -> &mut PgConnection {
        self.caller_sql = true;
        &mut self.tx
    }
}

#[async_trait]
impl Transaction for PgTx {
    async fn add(&mut self, message: &Message) -> Result<()> {
        self.add_batch(std::slice::from_ref(message)).await
    }

    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        self.abort.check()?;
        let core = self.core.clone();
        // Invalid messages are rejected before anything reaches the database; they abort the
        // transaction all the same (one contract for every failure).
        let mut result = messages
            .iter()
            .try_for_each(|m| ops::check_message(&core, m));
        if result.is_ok() {
            result = ops::insert_messages(&mut self.tx, &core, messages).await;
        }
        self.abort.track(result)?;
        for m in messages {
            self.committed.record(m, core.shard_count);
        }
        Ok(())
    }

    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        self.abort.check()?;
        let core = self.core.clone();
        let now = core.clock.now();
        let result = match outbox_core::rules::check_inbox_entry(entry) {
            Ok(()) => ops::inbox_insert(&mut self.tx, &core, entry, now).await,
            Err(e) => Err(e),
        };
        self.abort.track(result)
    }

    async fn commit(mut self) -> Result<Committed> {
        if let Err(refused) = self.abort.check() {
            let _ = self.tx.rollback().await;
            return Err(refused);
        }
        if self.caller_sql {
            // In an aborted transaction every statement fails with 25P02, and COMMIT would
            // silently roll back. Ask first.
            if let Err(e) = sqlx::query("SELECT 1").execute(&mut *self.tx).await {
                let e = parse_error_with(
                    e,
                    "the transaction cannot commit: an earlier statement failed and \
                     PostgreSQL aborted it; nothing was written",
                );
                let _ = self.tx.rollback().await;
                return Err(e);
            }
        }
        self.tx.commit().await.map_err(|e| {
            parse_error_with(
                e,
                "committing (if the connection was lost, the outcome is unknown: retrying \
                 re-adds the same ids, which fails with AlreadyExists if the first commit \
                 succeeded)",
            )
        })?;
        Ok(self.committed)
    }

    async fn rollback(self) -> Result<()> {
        match self.tx.rollback().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = parse_error_with(e, "rolling back");
                if e.kind() == ErrorKind::Unavailable {
                    // The connection is gone; the server rolled the transaction back.
                    tracing::debug!(error = %e, "rollback on a lost connection");
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}
