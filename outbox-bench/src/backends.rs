//! The stores under test, each with its hand-written fetch+mark baseline.

use std::sync::Arc;

use async_trait::async_trait;
use futures::StreamExt;
use outbox_core::{DistributedLock, Error, Message, OutboxStore, Result};
use outbox_dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore, local_client};
use outbox_harness::Moto;
use outbox_postgres::PgStore;
use outbox_postgres::sqlx::{self, AssertSqlSafe, Row};
use outbox_sqlite::{SqliteConfig, SqliteStore};

use crate::common::{Ctx, drop_schema, fill, pg_exec, pg_store};

/// Rows fetched per round by the hand-written baselines.
pub const RAW_BATCH: usize = 500;

/// A store with the relay's collaborators and a hand-written fetch+mark loop.
#[async_trait]
pub trait Backend: Send + Sync {
    /// The library's store.
    fn store(&self) -> Arc<dyn OutboxStore>;
    /// The library's lock for the relay.
    fn lock(&self) -> Arc<dyn DistributedLock>;
    /// Fill a backlog (not timed), through the library.
    async fn fill(&self, messages: &[Message]) -> Result<()> {
        fill(self.store().as_ref(), messages, self.fill_batch()).await
    }
    /// Messages per `add_batch` when filling.
    fn fill_batch(&self) -> usize {
        500
    }
    /// Fetch and mark dispatched every pending message by hand-written queries; returns how
    /// many were marked.
    async fn raw_drain(&self) -> Result<usize>;
    /// Forget every message (between passes), so every pass starts from the same table.
    async fn reset(&self) -> Result<()>;
    /// Remove what was created.
    async fn cleanup(&self) -> Result<()>;
}

// ---- SQLite ---------------------------------------------------------------------------

/// SQLite in a temporary directory.
pub struct SqliteBackend {
    store: SqliteStore,
    messages: String,
    _dir: tempfile::TempDir,
}

impl SqliteBackend {
    /// A fresh database file.
    pub async fn new() -> Result<Self> {
        let dir = tempfile::tempdir()
            .map_err(|e| Error::unexpected("creating a temporary directory").with_source(e))?;
        let store = SqliteStore::connect(SqliteConfig::new(dir.path().join("relay.db"))).await?;
        store.migrate().await?;
        Ok(SqliteBackend {
            messages: format!("{}messages", store.config().table_prefix()),
            store,
            _dir: dir,
        })
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut outbox_sqlite::rusqlite::Connection) -> outbox_sqlite::rusqlite::Result<T>
        + Send
        + 'static,
    ) -> Result<T> {
        let mut conn = self.store.open_connection()?;
        tokio::task::spawn_blocking(move || f(&mut conn))
            .await
            .map_err(|e| Error::unexpected("blocking task failed").with_source(e))?
            .map_err(outbox_sqlite::parse_error)
    }
}

#[async_trait]
impl Backend for SqliteBackend {
    fn store(&self) -> Arc<dyn OutboxStore> {
        Arc::new(self.store.clone())
    }

    fn lock(&self) -> Arc<dyn DistributedLock> {
        Arc::new(self.store.lock())
    }

    async fn raw_drain(&self) -> Result<usize> {
        let m = self.messages.clone();
        self.blocking(move |c| {
            let mut total = 0;
            let select = format!(
                "SELECT sequence, id, topic, key, payload, headers, created_at FROM {m} \
                 WHERE status = 'pending' ORDER BY sequence LIMIT {RAW_BATCH}"
            );
            loop {
                let tx = c.transaction()?;
                let seqs: Vec<i64> = {
                    let mut st = tx.prepare_cached(&select)?;
                    let rows = st.query_map([], |r| {
                        let _body: Vec<u8> = r.get(4)?;
                        r.get::<_, i64>(0)
                    })?;
                    rows.collect::<outbox_sqlite::rusqlite::Result<_>>()?
                };
                if seqs.is_empty() {
                    tx.commit()?;
                    return Ok(total);
                }
                let list = seqs
                    .iter()
                    .map(i64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                tx.execute(
                    &format!(
                        "UPDATE {m} SET status = 'dispatched', dispatched_at = ?1 \
                         WHERE sequence IN ({list})"
                    ),
                    [outbox_core::Utc::now().timestamp_micros()],
                )?;
                tx.commit()?;
                total += seqs.len();
            }
        })
        .await
    }

    async fn reset(&self) -> Result<()> {
        let m = self.messages.clone();
        self.blocking(move |c| c.execute_batch(&format!("DELETE FROM {m}")))
            .await
    }

    async fn cleanup(&self) -> Result<()> {
        Ok(())
    }
}

// ---- PostgreSQL -----------------------------------------------------------------------

/// PostgreSQL in a schema of this run.
pub struct PgBackend {
    /// The store.
    pub store: PgStore,
    /// Its schema.
    pub schema: String,
    select: String,
    mark: String,
}

impl PgBackend {
    /// A migrated schema of its own (`notify`: writers send `NOTIFY`).
    pub async fn new(ctx: &mut Ctx, notify: bool) -> Result<Self> {
        let schema = ctx.name("pg");
        let store = pg_store(ctx, &schema, notify).await?;
        let m = store.messages_table().to_owned();
        Ok(PgBackend {
            select: format!(
                "SELECT sequence, id, topic, key, payload, headers, content_type, message_type, \
                 created_at FROM {m} WHERE status = 'pending' ORDER BY sequence LIMIT {RAW_BATCH}"
            ),
            mark: format!(
                "UPDATE {m} SET status = 'dispatched', dispatched_at = now() WHERE id = ANY($1)"
            ),
            store,
            schema,
        })
    }
}

#[async_trait]
impl Backend for PgBackend {
    fn store(&self) -> Arc<dyn OutboxStore> {
        Arc::new(self.store.clone())
    }

    fn lock(&self) -> Arc<dyn DistributedLock> {
        Arc::new(self.store.lock())
    }

    async fn raw_drain(&self) -> Result<usize> {
        let pool = self.store.pool();
        let mut total = 0;
        loop {
            let rows = sqlx::query(AssertSqlSafe(self.select.clone()))
                .fetch_all(pool)
                .await
                .map_err(outbox_postgres::parse_error)?;
            if rows.is_empty() {
                return Ok(total);
            }
            let ids: Vec<uuid::Uuid> = rows
                .iter()
                .map(|r| r.try_get::<uuid::Uuid, _>("id"))
                .collect::<std::result::Result<_, _>>()
                .map_err(outbox_postgres::parse_error)?;
            sqlx::query(AssertSqlSafe(self.mark.clone()))
                .bind(&ids)
                .execute(pool)
                .await
                .map_err(outbox_postgres::parse_error)?;
            total += ids.len();
        }
    }

    async fn reset(&self) -> Result<()> {
        pg_exec(
            &self.store,
            format!("TRUNCATE {}", self.store.messages_table()),
        )
        .await
    }

    async fn cleanup(&self) -> Result<()> {
        drop_schema(&self.store, &self.schema).await
    }
}

// ---- DynamoDB -------------------------------------------------------------------------

/// DynamoDB tables of this run on a private moto server, restarted for every pass.
///
/// moto's `TransactWriteItems` deep-copies the whole table, stream records included, so on a
/// server that keeps its history every request gets slower and the server's memory grows
/// without bound (`outbox_harness::Moto`). A fresh server per pass makes every pass start
/// from the same empty tables. Without a `moto_server` to start, the shared endpoint is used
/// and the tables are kept across passes.
pub struct DynamoBackend {
    prefix: String,
    shared: String,
    logs: tempfile::TempDir,
    inner: std::sync::Mutex<(Option<Moto>, DynamoDbStore)>,
}

impl DynamoBackend {
    /// Fresh tables with the default settings under a prefix of this run.
    pub async fn new(ctx: &mut Ctx) -> Result<Self> {
        let prefix = format!("{}_", ctx.name("ddb"));
        let logs = tempfile::tempdir()
            .map_err(|e| Error::unexpected("creating a temporary directory").with_source(e))?;
        let (moto, store) = dynamo_tables(&ctx.services.dynamodb, logs.path(), &prefix).await?;
        Ok(DynamoBackend {
            prefix,
            shared: ctx.services.dynamodb.clone(),
            logs,
            inner: std::sync::Mutex::new((moto, store)),
        })
    }

    /// The store of the current pass.
    pub fn dynamo(&self) -> DynamoDbStore {
        self.lock_inner().1.clone()
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, (Option<Moto>, DynamoDbStore)> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Start a private moto server (falling back to `shared` when none is installed) and create
/// the library's tables under `prefix` on it.
pub async fn dynamo_tables(
    shared: &str,
    logs: &std::path::Path,
    prefix: &str,
) -> Result<(Option<Moto>, DynamoDbStore)> {
    let moto = Moto::start(&logs.join("moto.log")).await?;
    let endpoint = moto.as_ref().map_or(shared, |m| m.endpoint.as_str());
    let store = DynamoDbStore::new(local_client(endpoint), DynamoDbConfig::new(prefix))?;
    store.migrate().await?;
    Ok((moto, store))
}

#[async_trait]
impl Backend for DynamoBackend {
    fn store(&self) -> Arc<dyn OutboxStore> {
        Arc::new(self.dynamo())
    }

    fn lock(&self) -> Arc<dyn DistributedLock> {
        Arc::new(self.dynamo().lock())
    }

    fn fill_batch(&self) -> usize {
        25
    }

    /// Hand-written: per shard, a strongly consistent Query of the shard's queue partition
    /// (`pk = q#<shard>`) for pending items, then an UpdateItem per item setting it
    /// dispatched, 16 in flight.
    async fn raw_drain(&self) -> Result<usize> {
        let store = self.dynamo();
        let client = store.client();
        let (table, _, _) = store.table_names();
        let mut total = 0;
        for shard in 0..store.shard_count() {
            let mut start = None;
            loop {
                let page = client
                    .query()
                    .table_name(table)
                    .consistent_read(true)
                    .key_condition_expression("pk = :q")
                    .filter_expression("st = :p")
                    .expression_attribute_values(":q", AttributeValue::S(format!("q#{shard}")))
                    .expression_attribute_values(":p", AttributeValue::S("pending".into()))
                    .set_exclusive_start_key(start.take())
                    .limit(100)
                    .send()
                    .await
                    .map_err(outbox_dynamodb::parse_error)?;
                let keys: Vec<(AttributeValue, AttributeValue)> = page
                    .items()
                    .iter()
                    .filter_map(|i| Some((i.get("pk")?.clone(), i.get("sk")?.clone())))
                    .collect();
                let results: Vec<Result<()>> = futures::stream::iter(keys.iter().cloned())
                    .map(|(pk, sk)| async move {
                        client
                            .update_item()
                            .table_name(table)
                            .key("pk", pk)
                            .key("sk", sk)
                            .update_expression("SET st = :d")
                            .expression_attribute_values(
                                ":d",
                                AttributeValue::S("dispatched".into()),
                            )
                            .send()
                            .await
                            .map(|_| ())
                            .map_err(outbox_dynamodb::parse_error)
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
                for r in results {
                    r?;
                }
                total += keys.len();
                match page.last_evaluated_key() {
                    Some(k) => start = Some(k.clone()),
                    None => break,
                }
            }
        }
        Ok(total)
    }

    /// A fresh private server with fresh tables (on the shared endpoint: nothing, drained
    /// items are dispatched and each pass adds a fresh backlog).
    async fn reset(&self) -> Result<()> {
        if self.lock_inner().0.is_none() {
            return Ok(());
        }
        // Stop the old server first: two at once would hold twice the memory.
        self.lock_inner().0 = None;
        let fresh = dynamo_tables(&self.shared, self.logs.path(), &self.prefix).await?;
        *self.lock_inner() = fresh;
        Ok(())
    }

    async fn cleanup(&self) -> Result<()> {
        let store = self.dynamo();
        store.delete_tables().await
    }
}
