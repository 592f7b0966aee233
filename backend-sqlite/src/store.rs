//! [`SqliteStore`]: the outbox and inbox stores.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    Capabilities, DateTime, Error, FailedAttempt, FailureOutcome, InboxEntry, InboxStore,
    InsertOutcome, ListQuery, Message, MessageId, OutboxStats, OutboxStore, PendingQuery,
    RequeueFilter, Result, StoredMessage, TransactionalStore, Utc, async_trait, truncate_micros,
};
use rusqlite::{Connection, OptionalExtension, named_params, params};

use crate::codec::{count, from_micros, read_message, to_i64, to_micros};
use crate::config::SqliteConfig;
use crate::core::{Core, Pool, Sql};
use crate::error::parse_error_with;
use crate::lock::SqliteLock;
use crate::ops::{self, read, write};
use crate::schema;
use crate::tx::SqliteTx;

/// Default number of rows of [`OutboxStore::list`] when the query's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;

/// Outbox, inbox and lease storage in one SQLite file; see the crate documentation.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct SqliteStore {
    core: Arc<Core>,
    config: Arc<SqliteConfig>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.core, f)
    }
}

impl SqliteStore {
    /// Open (creating if missing) the database file of `config` with a pool of
    /// `config.pool_size()` connections. Does not touch the schema: call
    /// [`migrate`](Self::migrate) (or run it once at deployment), as with every backend.
    ///
    /// # Errors
    /// `ConfigInvalid` for an invalid setting or a file that cannot be opened; `Unavailable`
    /// if the database stayed locked for longer than the busy timeout.
    pub async fn connect(config: SqliteConfig) -> Result<SqliteStore> {
        config.validate()?;
        let pool = Pool::new(config.conn_settings(), config.pool_size());
        // Open one connection now, so a bad path fails here rather than at the first call.
        pool.run(|_| Ok(())).await?;
        Ok(SqliteStore {
            core: Arc::new(Core {
                sql: Sql::new(config.table_prefix()),
                pool,
                shard_count: config.shard_count(),
                max_message_size: config.max_message_size(),
                inbox_retention: config.inbox_retention(),
                clock: config.clock().clone(),
            }),
            config: Arc::new(config),
        })
    }

    /// Create or upgrade the tables to [`SCHEMA_VERSION`](crate::SCHEMA_VERSION) and record
    /// (first run) or check the shard count. Idempotent, and safe to run concurrently from
    /// many processes (one `BEGIN IMMEDIATE` transaction). Returns the schema version.
    ///
    /// # Errors
    /// `ConfigInvalid` for a schema version newer than this code knows, or a shard count
    /// different from the recorded one; `Unavailable` if the database stayed locked for
    /// longer than the busy timeout.
    pub async fn migrate(&self) -> Result<i64> {
        let prefix = self.config.table_prefix().to_owned();
        let shard_count = self.core.shard_count;
        let now = to_micros(self.core.clock.now());
        self.core
            .pool
            .run(move |conn| schema::migrate(conn, &prefix, shard_count, now))
            .await
    }

    /// Open an outbox that [`migrate`](Self::migrate) created before, creating nothing: for
    /// operators' tools, where a mistyped path or table prefix must be an error rather than a
    /// new, empty outbox. Then like [`connect`](Self::connect) (the schema is not touched).
    ///
    /// # Errors
    /// `NotFound` when the file does not exist or holds no outbox tables under the
    /// configured prefix; otherwise as [`connect`](Self::connect).
    pub async fn connect_existing(config: SqliteConfig) -> Result<SqliteStore> {
        config.validate()?;
        let path = config.path().to_owned();
        if !path.is_file() {
            return Err(Error::new(
                outbox_core::ErrorKind::NotFound,
                format!("sqlite database file {} does not exist", path.display()),
            ));
        }
        let settings = config.conn_settings();
        let table = format!("{}schema_version", config.table_prefix());
        let found = tokio::task::spawn_blocking(move || -> Result<bool> {
            let conn = settings.open()?;
            conn.query_row(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
                [&table],
                |r| r.get(0),
            )
            .map_err(|e| parse_error_with(e, "looking for the outbox tables"))
        })
        .await
        .map_err(|e| Error::unexpected("the sqlite open task failed").with_source(e))??;
        if !found {
            return Err(Error::new(
                outbox_core::ErrorKind::NotFound,
                format!(
                    "{} holds no outbox tables with table prefix {:?}",
                    path.display(),
                    config.table_prefix()
                ),
            ));
        }
        Self::connect(config).await
    }

    /// The configuration the store was connected with.
    pub fn config(&self) -> &SqliteConfig {
        &self.config
    }

    /// The distributed lock on this database, sharing the store's pool and clock.
    pub fn lock(&self) -> SqliteLock {
        SqliteLock {
            core: self.core.clone(),
        }
    }

    /// The schema version recorded in the database for this store's table prefix.
    pub async fn schema_version(&self) -> Result<i64> {
        let table = format!("{}schema_version", self.core.sql.prefix);
        self.core
            .pool
            .run(move |conn| {
                conn.query_row(
                    &format!("SELECT coalesce(max(version), 0) FROM {table}"),
                    [],
                    |r| r.get(0),
                )
                .map_err(|e| parse_error_with(e, "reading the schema version"))
            })
            .await
    }

    /// Open a new connection to the store's file, set up like the pool's (busy timeout,
    /// journal mode, `synchronous`, foreign keys), for callers who run their own synchronous
    /// transactions with [`add_in`](Self::add_in) and friends.
    ///
    /// Blocking: call it outside async code or inside `spawn_blocking`. Start write
    /// transactions with `TransactionBehavior::Immediate`, so they queue for the write lock
    /// (within the busy timeout) instead of failing when another writer got in first.
    pub fn open_connection(&self) -> Result<Connection> {
        self.core.pool.settings().open()
    }

    /// Store `message` as pending inside the caller's own rusqlite transaction (same file and
    /// schema). Same checks and errors as [`OutboxStore::add`]; it becomes visible when the
    /// caller commits. Blocking.
    ///
    /// A failed add leaves the caller's transaction open: roll it back, because the contract
    /// is all-or-nothing.
    pub fn add_in(&self, tx: &rusqlite::Transaction<'_>, message: &Message) -> Result<()> {
        ops::insert_message(tx, &self.core, message)
    }

    /// [`add_in`](Self::add_in) for several messages, in order. Every message is checked
    /// before the first is written. Blocking.
    pub fn add_batch_in(&self, tx: &rusqlite::Transaction<'_>, messages: &[Message]) -> Result<()> {
        ops::insert_messages(tx, &self.core, messages)
    }

    /// Record an inbox entry inside the caller's own rusqlite transaction: `Duplicate` if a
    /// live entry exists (then roll back and skip the handler). Blocking.
    pub fn inbox_insert_in(
        &self,
        tx: &rusqlite::Transaction<'_>,
        entry: &InboxEntry,
    ) -> Result<InsertOutcome> {
        ops::inbox_insert(tx, &self.core, entry, self.core.clock.now())
    }

    /// Run `f` in a write transaction on a pooled connection.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection, &Core) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| write(conn, |c| f(c, &core)))
            .await
    }

    /// Run `f` in a read transaction on a pooled connection.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection, &Core) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let core = self.core.clone();
        self.core
            .pool
            .run(move |conn| read(conn, |c| f(c, &core)))
            .await
    }
}

/// Read the message at `sequence`: the outer error is the database's, the inner one says the
/// row does not decode (a corrupted or foreign row).
fn fetch_by_sequence(
    conn: &Connection,
    core: &Core,
    sequence: i64,
) -> Result<Result<StoredMessage>> {
    let ctx = |e| parse_error_with(e, format_args!("reading message #{sequence}"));
    let mut stmt = conn
        .prepare_cached(&core.sql.message_by_sequence)
        .map_err(ctx)?;
    stmt.query_row([sequence], |row| Ok(read_message(row)))
        .map_err(ctx)
}

/// Park the pending rows that do not decode, with the reason as `last_error`, so the relay
/// keeps going (and later messages of their keys wait, as behind any parked message).
fn park_undecodable(conn: &Connection, core: &Core, rows: &[(i64, String)]) -> Result<()> {
    let ctx = |e| parse_error_with(e, "parking undecodable messages");
    let sql = format!(
        "UPDATE {}messages SET status = 'parked', last_error = ?2, next_attempt_at = NULL \
         WHERE sequence = ?1 AND status = 'pending'",
        core.sql.prefix
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(ctx)?;
    for (sequence, reason) in rows {
        stmt.execute(params![sequence, outbox_core::rules::error_text(reason)])
            .map_err(ctx)?;
    }
    Ok(())
}

fn collect_messages(
    conn: &Connection,
    sql: &str,
    params: impl rusqlite::Params,
    what: &str,
) -> Result<Vec<StoredMessage>> {
    let ctx = |e| parse_error_with(e, what);
    let mut stmt = conn.prepare_cached(sql).map_err(ctx)?;
    let rows = stmt
        .query_map(params, |row| Ok(read_message(row)))
        .map_err(ctx)?;
    let mut out = Vec::new();
    for row in rows {
        out.push(row.map_err(ctx)??);
    }
    Ok(out)
}

#[async_trait]
impl OutboxStore for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full().with_max_message_size(Some(self.core.max_message_size))
    }

    fn shard_count(&self) -> u32 {
        self.core.shard_count
    }

    async fn add(&self, message: &Message) -> Result<()> {
        ops::check_message(&self.core, message)?;
        let message = message.clone();
        self.write(move |c, core| ops::insert_message(c, core, &message))
            .await
    }

    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        let messages = messages.to_vec();
        self.write(move |c, core| ops::insert_messages(c, core, &messages))
            .await
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        self.read(move |c, core| {
            let ctx = |e| parse_error_with(e, format_args!("reading message {id}"));
            let mut stmt = c.prepare_cached(&core.sql.get_message).map_err(ctx)?;
            stmt.query_row([id.to_string()], |row| Ok(read_message(row)))
                .optional()
                .map_err(ctx)?
                .transpose()
        })
        .await
    }

    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        // Shards outside 0..shard_count hold no messages.
        let shards: BTreeSet<u32> = query
            .shards
            .iter()
            .copied()
            .filter(|s| *s < self.core.shard_count)
            .collect();
        if shards.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
        let limit = query.limit;
        let ordering = query.ordering;
        let now = to_micros(self.core.clock.now());
        let (messages, undecodable) = self
            .read(move |c, core| {
                let ctx = |e| parse_error_with(e, "fetching pending messages");
                let sql = match ordering {
                    outbox_core::Ordering::PerKey => &core.sql.pending_per_key,
                    outbox_core::Ordering::Unordered => &core.sql.pending_unordered,
                };
                // Per shard, the `limit` oldest eligible sequences (index order, stops early);
                // the global `limit` oldest are among them. Keys never span shards, so the
                // per-key rule is decided within each shard.
                let mut sequences = Vec::new();
                {
                    let mut stmt = c.prepare_cached(sql).map_err(ctx)?;
                    for shard in shards {
                        let rows = stmt
                            .query_map(
                                named_params! {
                                    ":shard": i64::from(shard),
                                    ":now": now,
                                    ":limit": to_i64(limit),
                                },
                                |r| r.get::<_, i64>(0),
                            )
                            .map_err(ctx)?;
                        for row in rows {
                            sequences.push(row.map_err(ctx)?);
                        }
                    }
                }
                sequences.sort_unstable();
                sequences.truncate(limit);
                let mut messages = Vec::with_capacity(sequences.len());
                let mut undecodable = Vec::new();
                for s in sequences {
                    match fetch_by_sequence(c, core, s)? {
                        Ok(m) => messages.push(m),
                        Err(e) => undecodable.push((s, format!("undecodable stored message: {e}"))),
                    }
                }
                Ok((messages, undecodable))
            })
            .await?;
        if let Some((first, _)) = undecodable.first() {
            // Later messages may share a key with it: leave them to the next fetch, which
            // sees the parked message and holds its key back.
            let first = u64::try_from(*first).unwrap_or(0);
            let mut messages = messages;
            messages.retain(|m| m.sequence < first);
            tracing::warn!(
                count = undecodable.len(),
                "parking stored messages that do not decode"
            );
            self.write(move |c, core| park_undecodable(c, core, &undecodable))
                .await?;
            return Ok(messages);
        }
        Ok(messages)
    }

    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids = ids.to_vec();
        let now = to_micros(self.core.clock.now());
        self.write(move |c, core| {
            let ctx = |e| parse_error_with(e, "marking messages dispatched");
            let mut stmt = c.prepare_cached(&core.sql.mark_dispatched).map_err(ctx)?;
            for id in ids {
                stmt.execute(params![id.to_string(), now]).map_err(ctx)?;
            }
            Ok(())
        })
        .await
    }

    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome> {
        let attempt = attempt.clone();
        let error = outbox_core::rules::error_text(&attempt.error);
        self.write(move |c, core| {
            let ctx = |e| parse_error_with(e, format_args!("recording a failed attempt of {id}"));
            let state: Option<(String, i64)> = c
                .prepare_cached(&core.sql.failed_state)
                .map_err(ctx)?
                .query_row([id.to_string()], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
                .map_err(ctx)?;
            let Some((status, attempts)) = state else {
                return Err(Error::new(
                    outbox_core::ErrorKind::NotFound,
                    format!("no message with id {id}"),
                ));
            };
            if status != "pending" {
                return Ok(FailureOutcome::NotPending);
            }
            let attempts = u32::try_from(attempts)
                .unwrap_or(u32::MAX)
                .saturating_add(1);
            if attempts >= attempt.max_attempts {
                c.prepare_cached(&core.sql.mark_parked)
                    .map_err(ctx)?
                    .execute(params![id.to_string(), i64::from(attempts), error])
                    .map_err(ctx)?;
                Ok(FailureOutcome::Parked { attempts })
            } else {
                let next = truncate_micros(attempt.next_attempt_at);
                c.prepare_cached(&core.sql.mark_retrying)
                    .map_err(ctx)?
                    .execute(params![
                        id.to_string(),
                        i64::from(attempts),
                        error,
                        to_micros(next)
                    ])
                    .map_err(ctx)?;
                Ok(FailureOutcome::Retrying {
                    attempts,
                    next_attempt_at: next,
                })
            }
        })
        .await
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let filter = filter.clone();
        self.write(move |c, core| {
            let ctx = |e| parse_error_with(e, "requeueing parked messages");
            let changed = match filter {
                RequeueFilter::Ids(ids) => {
                    let mut stmt = c.prepare_cached(&core.sql.requeue_id).map_err(ctx)?;
                    let mut n = 0;
                    for id in BTreeSet::from_iter(ids) {
                        n += stmt.execute([id.to_string()]).map_err(ctx)?;
                    }
                    n
                }
                RequeueFilter::Topic(topic) => c
                    .prepare_cached(&core.sql.requeue_topic)
                    .map_err(ctx)?
                    .execute([topic])
                    .map_err(ctx)?,
                RequeueFilter::All => c
                    .prepare_cached(&core.sql.requeue_all)
                    .map_err(ctx)?
                    .execute([])
                    .map_err(ctx)?,
            };
            Ok(count(changed))
        })
        .await
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let now = self.core.clock.now();
        self.read(move |c, core| {
            let ctx = |e| parse_error_with(e, "reading outbox stats");
            let (pending, parked, oldest): (i64, i64, Option<i64>) = c
                .prepare_cached(&core.sql.stats)
                .map_err(ctx)?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .map_err(ctx)?;
            let oldest_pending_age = match oldest {
                Some(micros) => {
                    let created = from_micros("created_at", micros)?;
                    Some((now - created).to_std().unwrap_or(Duration::ZERO))
                }
                None => None,
            };
            Ok(OutboxStats {
                pending: u64::try_from(pending).unwrap_or(0),
                parked: u64::try_from(parked).unwrap_or(0),
                oldest_pending_age,
            })
        })
        .await
    }

    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = self.core.clock.now();
        let Some(cutoff) = chrono_duration(retention).and_then(|d| now.checked_sub_signed(d))
        else {
            // A retention reaching before the earliest representable time keeps everything.
            return Ok(0);
        };
        let cutoff = to_micros(cutoff);
        self.write(move |c, core| {
            let ctx = |e| parse_error_with(e, "purging dispatched messages");
            let n = c
                .prepare_cached(&core.sql.purge_dispatched)
                .map_err(ctx)?
                .execute(params![cutoff, to_i64(limit)])
                .map_err(ctx)?;
            Ok(count(n))
        })
        .await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        let status = query.status.map(|s| s.as_str());
        let topic = query.topic.clone();
        let key = query.key.clone();
        let limit = if query.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            query.limit
        };
        self.read(move |c, core| {
            collect_messages(
                c,
                &core.sql.list,
                params![status, topic, key, to_i64(limit)],
                "listing messages",
            )
        })
        .await
    }

    async fn dispatched_since(&self, since: DateTime<Utc>) -> Result<Option<u64>> {
        let since = to_micros(since);
        self.read(move |c, core| {
            let ctx = |e| parse_error_with(e, "counting dispatched messages");
            let n: i64 = c
                .prepare_cached(&core.sql.dispatched_since)
                .map_err(ctx)?
                .query_row(params![since], |r| r.get(0))
                .map_err(ctx)?;
            Ok(Some(u64::try_from(n).unwrap_or(0)))
        })
        .await
    }
}

fn chrono_duration(d: Duration) -> Option<chrono::Duration> {
    chrono::Duration::from_std(d).ok()
}

#[async_trait]
impl InboxStore for SqliteStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        outbox_core::rules::check_inbox_entry(entry)?;
        let entry = entry.clone();
        let now = self.core.clock.now();
        self.write(move |c, core| ops::inbox_insert(c, core, &entry, now))
            .await
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        outbox_core::rules::check_inbox_entry(entry)?;
        let entry = entry.clone();
        let now = to_micros(self.core.clock.now());
        self.read(move |c, core| {
            let ctx = |e| parse_error_with(e, "reading the inbox");
            c.prepare_cached(&core.sql.inbox_contains)
                .map_err(ctx)?
                .query_row(
                    params![entry.message_id.to_string(), entry.handler_key, now],
                    |r| r.get(0),
                )
                .map_err(ctx)
        })
        .await
    }

    fn retention(&self) -> Duration {
        self.core.inbox_retention
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = to_micros(self.core.clock.now());
        self.write(move |c, core| {
            let ctx = |e| parse_error_with(e, "purging expired inbox entries");
            let n = c
                .prepare_cached(&core.sql.inbox_purge)
                .map_err(ctx)?
                .execute(params![now, to_i64(limit)])
                .map_err(ctx)?;
            Ok(count(n))
        })
        .await
    }
}

#[async_trait]
impl TransactionalStore for SqliteStore {
    type Tx = SqliteTx;

    async fn begin(&self) -> Result<SqliteTx> {
        SqliteTx::begin(self.core.clone()).await
    }
}
