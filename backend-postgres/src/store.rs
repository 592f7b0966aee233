//! [`PgStore`]: the outbox and inbox stores.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    CancellationToken, Capabilities, DateTime, Error, ErrorKind, FailedAttempt, FailureOutcome,
    InboxEntry, InboxStore, InsertOutcome, ListQuery, Message, MessageId, Ordering, OutboxStats,
    OutboxStore, PendingQuery, RelayHandle, RequeueFilter, Result, StoredMessage,
    TransactionalStore, Utc, async_trait, truncate_micros,
};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Row};

use crate::codec::{read_message, to_i64};
use crate::config::{PgConfig, redact_url};
use crate::core::{Core, Sql, q, quote};
use crate::error::parse_error_with;
use crate::lock::PgLock;
use crate::notify;
use crate::ops;
use crate::schema::{self, key_lock_class};
use crate::tx::PgTx;

/// One query's plan, from [`PgStore::explain_relay_queries`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryPlan {
    /// Which operation runs the query.
    pub name: String,
    /// The statement.
    pub sql: String,
    /// `EXPLAIN (COSTS OFF)` output, one plan node per line.
    pub plan: String,
}

/// Default number of rows of [`OutboxStore::list`] when the query's limit is 0.
const DEFAULT_LIST_LIMIT: usize = 100;

/// Outbox, inbox and lease storage in PostgreSQL; see the crate documentation.
///
/// Cheap to clone: clones share the connection pool.
#[derive(Clone)]
pub struct PgStore {
    core: Arc<Core>,
    config: Arc<PgConfig>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.core, f)
    }
}

impl PgStore {
    /// Connect a pool of `config.pool_size()` connections to `url` (`postgres://...`). Does
    /// not touch the schema: call [`migrate`](Self::migrate) (or run it once at deployment).
    ///
    /// # Errors
    /// `ConfigInvalid` for an invalid setting or connection string (the message shows the
    /// URL with its password redacted), `Unavailable` (retryable) if the server cannot be
    /// reached, and `ConfigInvalid` if it refuses the credentials.
    pub async fn connect(url: &str, config: PgConfig) -> Result<PgStore> {
        config.validate()?;
        let redacted = redact_url(url);
        let options = PgConnectOptions::from_str(url).map_err(|e| {
            Error::config(format!("invalid PostgreSQL connection string {redacted}")).with_source(e)
        })?;
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size())
            .acquire_timeout(config.acquire_timeout())
            .connect_with(options)
            .await
            .map_err(|e| parse_error_with(e, format_args!("connecting to {redacted}")))?;
        Self::build(pool, config, Some(redacted))
    }

    /// A store on your own pool (for example the one your application already uses, so
    /// business writes and outbox adds share connections). Validates `config`; does not touch
    /// the database.
    pub fn new(pool: PgPool, config: PgConfig) -> Result<PgStore> {
        config.validate()?;
        Self::build(pool, config, None)
    }

    fn build(pool: PgPool, config: PgConfig, url: Option<String>) -> Result<PgStore> {
        let schema = config.schema().to_owned();
        let prefix = config.table_prefix().to_owned();
        Ok(PgStore {
            core: Arc::new(Core {
                pool,
                sql: Sql::new(&schema, &prefix),
                key_lock_class: key_lock_class(&schema, &prefix),
                channel: notify::channel_name(&schema, &prefix),
                schema,
                table_prefix: prefix,
                shard_count: config.shard_count(),
                max_message_size: config.max_message_size(),
                inbox_retention: config.inbox_retention(),
                clock: config.clock().clone(),
                lock_clock: config.lock_clock(),
                notify: config.notify(),
                url,
            }),
            config: Arc::new(config),
        })
    }

    /// Create or upgrade the tables to [`SCHEMA_VERSION`](crate::SCHEMA_VERSION), creating the
    /// schema if missing, and record (first run) or check the shard count. Idempotent, and safe
    /// to run concurrently from many processes: it runs in one transaction serialised by an
    /// advisory lock. Returns the schema version.
    ///
    /// # Errors
    /// `ConfigInvalid` when the database has a newer schema version than this code knows, or
    /// a different shard count; `Unavailable` when the database cannot be reached.
    pub async fn migrate(&self) -> Result<i64> {
        let mut conn = self.acquire().await?;
        schema::migrate(
            &mut conn,
            &self.core.schema,
            &self.core.table_prefix,
            self.core.shard_count,
        )
        .await
    }

    /// The schema version recorded for this store's schema and prefix (0 before `migrate`).
    pub async fn schema_version(&self) -> Result<i64> {
        let mut conn = self.acquire().await?;
        let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
            .bind(format!(
                "{}.{}",
                quote(&self.core.schema),
                quote(&format!("{}schema_version", self.core.table_prefix))
            ))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| parse_error_with(e, "reading the schema version"))?;
        if !exists {
            return Ok(0);
        }
        sqlx::query_scalar(q(&self.core.sql.schema_version))
            .fetch_one(&mut *conn)
            .await
            .map_err(|e| parse_error_with(e, "reading the schema version"))
    }

    /// The configuration.
    pub fn config(&self) -> &PgConfig {
        &self.config
    }

    /// The pool, for your own queries.
    pub fn pool(&self) -> &PgPool {
        &self.core.pool
    }

    /// The distributed lock on this database (the `{prefix}leases` table), sharing the pool.
    pub fn lock(&self) -> PgLock {
        PgLock {
            core: self.core.clone(),
        }
    }

    /// The qualified, quoted name of the messages table, e.g. `"public"."outbox_messages"`,
    /// for operators' own queries.
    pub fn messages_table(&self) -> &str {
        &self.core.sql.messages_table
    }

    /// The `LISTEN` channel that adds notify when [`PgConfig::with_notify`] is on:
    /// `{schema}.{prefix}messages` (a hash when longer than 63 bytes). The payload lists the
    /// shards written, comma-separated.
    pub fn notify_channel(&self) -> &str {
        &self.core.channel
    }

    /// The plans PostgreSQL chooses for the relay's and the cleanup's queries on the current
    /// data (`EXPLAIN`, not executed), for operators checking that no query scans the messages
    /// table. Parameters: every shard, the store clock's now, a limit of 100.
    pub async fn explain_relay_queries(&self) -> Result<Vec<QueryPlan>> {
        let shards: Vec<i32> = (0..self.core.shard_count)
            .filter_map(|s| i32::try_from(s).ok())
            .collect();
        let now = self.now();
        let sql = &self.core.sql;
        let mut conn = self.acquire().await?;
        let mut out = Vec::new();
        let cases: [(&str, &Arc<str>); 7] = [
            ("fetch_pending (PerKey)", &sql.pending_per_key),
            ("fetch_pending (Unordered)", &sql.pending_unordered),
            ("mark_dispatched", &sql.mark_dispatched),
            ("purge_dispatched", &sql.purge_dispatched),
            ("stats", &sql.stats),
            ("inbox purge_expired", &sql.inbox_purge),
            ("inbox insert", &sql.inbox_insert),
        ];
        for (name, text) in cases {
            let explain = sqlx::AssertSqlSafe(format!("EXPLAIN (COSTS OFF) {text}"));
            let query = sqlx::query_scalar::<_, String>(explain);
            let query = match name {
                "fetch_pending (PerKey)" | "fetch_pending (Unordered)" => {
                    query.bind(shards.clone()).bind(now).bind(100_i64)
                }
                "mark_dispatched" => query
                    .bind(vec![uuid::Uuid::now_v7(), uuid::Uuid::now_v7()])
                    .bind(now),
                "purge_dispatched" | "inbox purge_expired" => query.bind(now).bind(100_i64),
                "inbox insert" => query
                    .bind(uuid::Uuid::now_v7())
                    .bind("handler")
                    .bind(now)
                    .bind(now),
                _ => query,
            };
            let lines = query
                .fetch_all(&mut *conn)
                .await
                .map_err(|e| parse_error_with(e, format_args!("explaining {name}")))?;
            out.push(QueryPlan {
                name: name.to_owned(),
                sql: text.to_string(),
                plan: lines.join("\n"),
            });
        }
        Ok(out)
    }

    /// Store `message` as pending on `conn`, which is usually inside your own transaction
    /// (`&mut *tx` for an `sqlx::Transaction`): it becomes visible when you commit, and rolls
    /// back with your writes. Same checks and errors as [`OutboxStore::add`].
    ///
    /// Per-key order: the add takes a transaction-scoped advisory lock on the message's key,
    /// held until your transaction ends, so concurrent writers of one key commit in sequence
    /// order (see the README). Keep such transactions short. Outside a transaction the add is
    /// a transaction of its own.
    ///
    /// A failed add (for example a duplicate id) aborts your transaction, as every failed
    /// statement does in PostgreSQL: roll it back.
    pub async fn add_in(&self, conn: &mut PgConnection, message: &Message) -> Result<()> {
        ops::insert_messages(conn, &self.core, std::slice::from_ref(message)).await
    }

    /// [`add_in`](Self::add_in) for several messages, in order, with one multi-row insert.
    /// Every message is checked before anything is sent.
    pub async fn add_batch_in(&self, conn: &mut PgConnection, messages: &[Message]) -> Result<()> {
        ops::insert_messages(conn, &self.core, messages).await
    }

    /// Record an inbox entry on `conn`, usually inside your handler's transaction: `Duplicate`
    /// if a live entry exists (then roll back and skip the handler).
    pub async fn inbox_insert_in(
        &self,
        conn: &mut PgConnection,
        entry: &InboxEntry,
    ) -> Result<InsertOutcome> {
        ops::inbox_insert(conn, &self.core, entry, self.core.clock.now()).await
    }

    /// Wake `relay` whenever a transaction that added messages to this outbox commits, from
    /// any process, by `LISTEN`ing on [`notify_channel`](Self::notify_channel). Needs
    /// [`PgConfig::with_notify`](crate::PgConfig::with_notify) on the writers' stores.
    ///
    /// Returns once the `LISTEN` is in place; the returned task runs until `shutdown` is
    /// cancelled. It holds one dedicated connection (not from the pool's budget of idle
    /// connections: sqlx's listener takes one connection out of the pool for good). If the
    /// connection drops it reconnects and wakes the relay once, since notifications sent
    /// meanwhile are lost; the relay's polling remains the safety net in every case.
    ///
    /// # Errors
    /// `Unavailable` if the listening connection cannot be opened.
    pub async fn listen(
        &self,
        relay: RelayHandle,
        shutdown: CancellationToken,
    ) -> Result<tokio::task::JoinHandle<()>> {
        notify::listen(
            self.pool(),
            self.notify_channel().to_owned(),
            relay,
            shutdown,
        )
        .await
    }

    async fn acquire(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>> {
        self.core
            .pool
            .acquire()
            .await
            .map_err(|e| parse_error_with(e, "acquiring a pooled connection"))
    }

    fn now(&self) -> DateTime<Utc> {
        self.core.clock.now()
    }
}

fn rows_to_messages(rows: Vec<sqlx::postgres::PgRow>) -> Result<Vec<StoredMessage>> {
    rows.iter().map(read_message).collect()
}

#[async_trait]
impl OutboxStore for PgStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full().with_max_message_size(Some(self.core.max_message_size))
    }

    fn shard_count(&self) -> u32 {
        self.core.shard_count
    }

    async fn add(&self, message: &Message) -> Result<()> {
        ops::check_message(&self.core, message)?;
        let mut conn = self.acquire().await?;
        ops::insert_messages(&mut conn, &self.core, std::slice::from_ref(message)).await
    }

    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        if messages.is_empty() {
            return Ok(());
        }
        // One statement: atomic without an explicit transaction.
        let mut conn = self.acquire().await?;
        ops::insert_messages(&mut conn, &self.core, messages).await
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        let row = sqlx::query(q(&self.core.sql.get_message))
            .bind(id.as_uuid())
            .fetch_optional(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, format_args!("reading message {id}")))?;
        row.as_ref().map(read_message).transpose()
    }

    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        // Shards outside 0..shard_count hold no messages.
        let shards: Vec<i32> = query
            .shards
            .iter()
            .copied()
            .filter(|s| *s < self.core.shard_count)
            .collect::<BTreeSet<u32>>()
            .into_iter()
            .filter_map(|s| i32::try_from(s).ok())
            .collect();
        if shards.is_empty() || query.limit == 0 {
            return Ok(Vec::new());
        }
        let sql = match query.ordering {
            Ordering::PerKey => &self.core.sql.pending_per_key,
            Ordering::Unordered => &self.core.sql.pending_unordered,
        };
        let rows = sqlx::query(q(sql))
            .bind(shards)
            .bind(self.now())
            .bind(to_i64(query.limit))
            .fetch_all(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "fetching pending messages"))?;
        // A row that does not decode (corrupted, or written by something else) is parked
        // with the reason, so the relay keeps going; rows after it may share its key and
        // are left to the next fetch, which sees it parked and holds the key back.
        let mut messages = Vec::with_capacity(rows.len());
        for row in &rows {
            match read_message(row) {
                Ok(m) => messages.push(m),
                Err(e) => {
                    let sequence: i64 = row
                        .try_get("sequence")
                        .map_err(|e| parse_error_with(e, "reading column sequence"))?;
                    tracing::warn!(sequence, "parking a stored message that does not decode");
                    let sql: Arc<str> = Arc::from(format!(
                        "UPDATE {} SET status = 'parked', last_error = $2, \
                         next_attempt_at = NULL WHERE sequence = $1 AND status = 'pending'",
                        self.core.sql.messages_table
                    ));
                    sqlx::query(q(&sql))
                        .bind(sequence)
                        .bind(outbox_core::rules::error_text(&format!(
                            "undecodable stored message: {e}"
                        )))
                        .execute(&self.core.pool)
                        .await
                        .map_err(|e| parse_error_with(e, "parking an undecodable message"))?;
                    break;
                }
            }
        }
        Ok(messages)
    }

    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let ids: Vec<uuid::Uuid> = ids.iter().map(MessageId::as_uuid).collect();
        sqlx::query(q(&self.core.sql.mark_dispatched))
            .bind(ids)
            .bind(self.now())
            .execute(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "marking messages dispatched"))?;
        Ok(())
    }

    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome> {
        let ctx = |e| parse_error_with(e, format_args!("recording a failed attempt of {id}"));
        let next = truncate_micros(attempt.next_attempt_at);
        let error = outbox_core::rules::error_text(&attempt.error);
        let row = sqlx::query(q(&self.core.sql.mark_failed))
            .bind(id.as_uuid())
            .bind(error)
            .bind(i64::from(attempt.max_attempts))
            .bind(next)
            .fetch_optional(&self.core.pool)
            .await
            .map_err(ctx)?;
        if let Some(row) = row {
            let attempts: i64 = row.try_get("attempts").map_err(ctx)?;
            let status: String = row.try_get("status").map_err(ctx)?;
            let attempts = u32::try_from(attempts).unwrap_or(u32::MAX);
            return Ok(if status == "parked" {
                FailureOutcome::Parked { attempts }
            } else {
                FailureOutcome::Retrying {
                    attempts,
                    next_attempt_at: next,
                }
            });
        }
        let exists = sqlx::query(q(&self.core.sql.message_status))
            .bind(id.as_uuid())
            .fetch_optional(&self.core.pool)
            .await
            .map_err(ctx)?;
        match exists {
            Some(_) => Ok(FailureOutcome::NotPending),
            None => Err(Error::new(
                ErrorKind::NotFound,
                format!("no message with id {id}"),
            )),
        }
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let ctx = |e| parse_error_with(e, "requeueing parked messages");
        let query = match filter {
            RequeueFilter::Ids(ids) => {
                if ids.is_empty() {
                    return Ok(0);
                }
                let ids: Vec<uuid::Uuid> = ids.iter().map(MessageId::as_uuid).collect();
                sqlx::query(q(&self.core.sql.requeue_ids)).bind(ids)
            }
            RequeueFilter::Topic(topic) => {
                sqlx::query(q(&self.core.sql.requeue_topic)).bind(topic.clone())
            }
            RequeueFilter::All => sqlx::query(q(&self.core.sql.requeue_all)),
        };
        let done = query.execute(&self.core.pool).await.map_err(ctx)?;
        Ok(done.rows_affected())
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let ctx = |e| parse_error_with(e, "reading outbox stats");
        let now = self.now();
        let row = sqlx::query(q(&self.core.sql.stats))
            .fetch_one(&self.core.pool)
            .await
            .map_err(ctx)?;
        let pending: i64 = row.try_get("pending").map_err(ctx)?;
        let parked: i64 = row.try_get("parked").map_err(ctx)?;
        let oldest: Option<DateTime<Utc>> = row.try_get("oldest").map_err(ctx)?;
        Ok(OutboxStats {
            pending: u64::try_from(pending).unwrap_or(0),
            parked: u64::try_from(parked).unwrap_or(0),
            oldest_pending_age: oldest.map(|t| (now - t).to_std().unwrap_or(Duration::ZERO)),
        })
    }

    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let Some(cutoff) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|d| self.now().checked_sub_signed(d))
        else {
            // A retention reaching before the earliest representable time keeps everything.
            return Ok(0);
        };
        let done = sqlx::query(q(&self.core.sql.purge_dispatched))
            .bind(cutoff)
            .bind(to_i64(limit))
            .execute(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "purging dispatched messages"))?;
        Ok(done.rows_affected())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        let limit = if query.limit == 0 {
            DEFAULT_LIST_LIMIT
        } else {
            query.limit
        };
        let rows = sqlx::query(q(&self.core.sql.list))
            .bind(query.status.map(|s| s.as_str()))
            .bind(query.topic.as_deref())
            .bind(query.key.as_deref())
            .bind(to_i64(limit))
            .fetch_all(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "listing messages"))?;
        rows_to_messages(rows)
    }

    async fn dispatched_since(&self, since: DateTime<Utc>) -> Result<Option<u64>> {
        let n: i64 = sqlx::query_scalar(q(&self.core.sql.dispatched_since))
            .bind(since)
            .fetch_one(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "counting dispatched messages"))?;
        Ok(Some(u64::try_from(n).unwrap_or(0)))
    }
}

#[async_trait]
impl InboxStore for PgStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        outbox_core::rules::check_inbox_entry(entry)?;
        let mut conn = self.acquire().await?;
        ops::inbox_insert(&mut conn, &self.core, entry, self.now()).await
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        outbox_core::rules::check_inbox_entry(entry)?;
        sqlx::query_scalar(q(&self.core.sql.inbox_contains))
            .bind(entry.message_id.as_uuid())
            .bind(&entry.handler_key)
            .bind(self.now())
            .fetch_one(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "reading the inbox"))
    }

    fn retention(&self) -> Duration {
        self.core.inbox_retention
    }

    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let done = sqlx::query(q(&self.core.sql.inbox_purge))
            .bind(self.now())
            .bind(to_i64(limit))
            .execute(&self.core.pool)
            .await
            .map_err(|e| parse_error_with(e, "purging expired inbox entries"))?;
        Ok(done.rows_affected())
    }
}

#[async_trait]
impl TransactionalStore for PgStore {
    type Tx = PgTx;

    async fn begin(&self) -> Result<PgTx> {
        PgTx::begin(self.core.clone()).await
    }
}
