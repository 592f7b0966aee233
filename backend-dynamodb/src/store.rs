//! [`DynamoDbStore`]: the public store type on a shared [`Core`], with its `OutboxStore`,
//! `InboxStore` and `TransactionalStore` implementations. The operations themselves live in
//! `outbox` and `queue` (outbox), `inbox` and `uow` (unit of work); this module wires them up.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::AttributeValue;
use outbox_core::{
    Capabilities, Error, ErrorKind, FailedAttempt, FailureOutcome, InboxEntry, InboxStore,
    InsertOutcome, ListQuery, Message, MessageId, OutboxStats, OutboxStore, PendingQuery,
    RequeueFilter, Result, StoredMessage, TransactionalStore,
};

use crate::codec::{self, MAX_MESSAGE_SIZE, MAX_SLOT};
use crate::config::DynamoDbConfig;
use crate::core::Core;
use crate::lock::DynamoDbLock;
use crate::meter::CostMeter;
use crate::schema;
use crate::stream::StreamListener;
use crate::uow::DynamoDbTx;

/// The outbox, inbox and unit of work on DynamoDB. Cheap to clone (shared state).
///
/// See the crate README for the schema, the ordering argument, the cost per message and the
/// consistency of each read.
#[derive(Clone)]
pub struct DynamoDbStore {
    core: Arc<Core>,
}

impl std::fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("outbox_table", &self.core.outbox)
            .field("inbox_table", &self.core.inbox)
            .field("lock_table", &self.core.locks)
            .field("config", &self.core.config)
            .finish()
    }
}

/// A client for a local endpoint (moto, DynamoDB Local): region `us-east-1` and static
/// dummy credentials. For AWS use [`DynamoDbStore::from_env`] or your own client.
pub fn local_client(endpoint: &str) -> Client {
    let conf = aws_sdk_dynamodb::Config::builder()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "local",
            "local",
            None,
            None,
            "outbox-local",
        ))
        .build();
    Client::from_conf(conf)
}

impl DynamoDbStore {
    /// A store on `client` with `config`. Does not touch DynamoDB; call
    /// [`migrate`](Self::migrate) once (or create the tables with your own
    /// infrastructure-as-code, see the README). The first operation checks the shard count
    /// recorded in the table.
    ///
    /// # Errors
    /// `ConfigInvalid` from [`DynamoDbConfig::validate`].
    pub fn new(client: Client, config: DynamoDbConfig) -> Result<Self> {
        config.validate()?;
        Ok(DynamoDbStore {
            core: Arc::new(Core::new(client, config)),
        })
    }

    /// A store with a client from the standard AWS configuration: the default credential
    /// chain, region, and `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_DYNAMODB` when set.
    ///
    /// # Errors
    /// `ConfigInvalid` from [`DynamoDbConfig::validate`].
    pub async fn from_env(config: DynamoDbConfig) -> Result<Self> {
        let sdk = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        Self::new(Client::new(&sdk), config)
    }

    /// Bring the tables up to date, the setup step every backend names `migrate`: create the
    /// outbox, inbox and lock tables if missing (outbox with its stream, TTL on
    /// the outbox and inbox), wait until they are active, record the shard count, and check
    /// that existing tables have the expected keys, indexes, stream and TTL attribute.
    /// Idempotent; safe to call at every start.
    ///
    /// # Errors
    /// `ConfigInvalid` naming the table and what differs when an existing table does not
    /// match, or when the table records another shard count.
    pub async fn migrate(&self) -> Result<()> {
        schema::create_tables(
            &self.core.client,
            &self.core.outbox,
            &self.core.inbox,
            &self.core.locks,
        )
        .await?;
        self.core.ensure_open().await
    }

    /// Delete the three tables (tests and tear-down). Missing tables are fine.
    pub async fn delete_tables(&self) -> Result<()> {
        schema::delete_tables(
            &self.core.client,
            &[&self.core.outbox, &self.core.inbox, &self.core.locks],
        )
        .await
    }

    /// The distributed lock on this store's lock table, with the store's clock.
    pub fn lock(&self) -> DynamoDbLock {
        DynamoDbLock::new(
            self.core.client.clone(),
            self.core.locks.clone(),
            self.core.config.clock.clone(),
        )
        .with_meter(self.core.meter.clone())
    }

    /// A new, empty transaction (what [`TransactionalStore::begin`] returns; `begin` is the
    /// public way).
    fn unit_of_work(&self) -> DynamoDbTx {
        DynamoDbTx::new(self.core.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &DynamoDbConfig {
        &self.core.config
    }

    /// The DynamoDB client.
    pub fn client(&self) -> &Client {
        &self.core.client
    }

    /// Requests and capacity per operation.
    pub fn meter(&self) -> &CostMeter {
        &self.core.meter
    }

    /// `(outbox, inbox, locks)` table names.
    pub fn table_names(&self) -> (&str, &str, &str) {
        (&self.core.outbox, &self.core.inbox, &self.core.locks)
    }

    /// Undecodable queue items this store found and parked (each once).
    pub fn poisoned_count(&self) -> u64 {
        self.core.poisoned.load(AtomicOrdering::Relaxed)
    }

    /// The queue item `message` becomes (as a new pending message), for size and cost
    /// estimates: with the widest shard number of this configuration and the widest slot and
    /// sequence, so the size limit does not depend on the shard a key hashes to.
    pub fn message_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        self.core.message_item(message)
    }

    /// The id guard item of `message` (written beside its queue item), for size estimates.
    pub fn guard_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        codec::encode_guard(
            &message.id,
            self.core.shard_of(message),
            MAX_SLOT,
            i64::MAX / 2,
        )
    }
}

impl StreamListener {
    /// A listener on the stream of `store`'s outbox table (which `migrate` enables).
    ///
    /// # Errors
    /// `ConfigInvalid` if the table has no stream; DynamoDB errors.
    pub async fn new(
        store: &DynamoDbStore,
        client: aws_sdk_dynamodbstreams::Client,
    ) -> Result<Self> {
        StreamListener::open(store.client(), store.table_names().0, client).await
    }
}

#[async_trait]
impl OutboxStore for DynamoDbStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
            .with_max_message_size(Some(MAX_MESSAGE_SIZE))
            .with_max_batch(Some(self.core.config.max_batch()))
            .with_inbox_duplicate_at_insert(false)
            .with_duplicate_id_at_add(false)
    }

    fn shard_count(&self) -> u32 {
        self.core.config.shard_count
    }

    async fn add(&self, message: &Message) -> Result<()> {
        let mut uow = self.unit_of_work();
        uow.stage(std::slice::from_ref(message))?;
        uow.commit_inner().await.map(|_| ())
    }

    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        let limit = self.core.config.max_batch();
        if messages.len() > limit {
            return Err(Error::new(
                ErrorKind::LimitExceeded {
                    count: messages.len(),
                    limit,
                },
                format!(
                    "add_batch takes at most {limit} messages (DynamoDB's 100 actions per transaction; each message is its queue item and its id guard); got {}",
                    messages.len()
                ),
            ));
        }
        if messages.is_empty() {
            return Ok(());
        }
        let mut uow = self.unit_of_work();
        uow.stage(messages)?;
        uow.commit_inner().await.map(|_| ())
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        self.core.get(id).await
    }

    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        self.core.fetch_pending(query).await
    }

    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        self.core.mark_dispatched(ids).await
    }

    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome> {
        self.core.mark_failed(id, attempt).await
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        self.core.requeue(filter).await
    }

    async fn stats(&self) -> Result<OutboxStats> {
        self.core.stats().await
    }

    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        self.core.purge_dispatched(retention, limit).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        self.core.list(query).await
    }
}

#[async_trait]
impl InboxStore for DynamoDbStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        self.core.inbox_insert(entry).await
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        self.core.inbox_contains(entry).await
    }

    fn retention(&self) -> Duration {
        self.core.config.inbox_retention
    }

    /// Scans the inbox table for entries expired by this store's clock and deletes up to
    /// `limit` of them, each with a conditional `DeleteItem` (still expired), so an entry
    /// inserted again meanwhile stays and concurrent purges never count one entry twice.
    ///
    /// DynamoDB's TTL deletes expired entries for free (within days of expiry), and expired
    /// entries already count as absent, so this is optional on AWS. Its cost: the scan
    /// reads the table from the start on every call (0.5 RCU per 4 KiB read, eventually
    /// consistent), plus 1 WCU per deleted entry.
    async fn purge_expired(&self, limit: usize) -> Result<u64> {
        self.core.inbox_purge_expired(limit).await
    }
}

#[async_trait]
impl TransactionalStore for DynamoDbStore {
    type Tx = DynamoDbTx;

    async fn begin(&self) -> Result<DynamoDbTx> {
        Ok(self.unit_of_work())
    }
}
