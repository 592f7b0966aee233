//! [`DynamoDbStore`]: the client, configuration and per-process state shared by the outbox
//! ([`crate::outbox`]), the inbox ([`crate::inbox`]) and the unit of work ([`crate::uow`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::types::{AttributeValue, ReturnConsumedCapacity};
use outbox_core::{Error, ErrorKind, Message, MessageId, Result, shard_for};

use crate::codec::{self, ITEM_HEADROOM, MAX_ITEM_SIZE, MAX_SLOT, SHARD_COUNT, get_n};
use crate::config::DynamoDbConfig;
use crate::lock::DynamoDbLock;
use crate::meter::{CostMeter, Units, read_units, write_units};
use crate::queue::ShardState;
use crate::request::{Meta, send, send_conditional};
use crate::uow::DynamoDbTx;

/// Largest message accepted, measured as the DynamoDB item it becomes.
pub const MAX_MESSAGE_SIZE: usize = MAX_ITEM_SIZE - ITEM_HEADROOM;
/// Items per `BatchWriteItem` (DynamoDB's limit; enforced here because some emulators accept more).
pub const BATCH_WRITE_LIMIT: usize = 25;
/// Keys per `BatchGetItem`.
pub const BATCH_GET_LIMIT: usize = 100;
/// Ids whose queue position a store remembers (from its own adds and fetches), so that
/// `mark_dispatched` and `mark_failed` address the queue item without reading the id guard.
pub const LOCATOR_CAPACITY: usize = 100_000;
/// Parallel requests of one store call (per-shard reads, per-id updates).
pub(crate) const PARALLEL: usize = 8;
/// Attempts to drain `UnprocessedItems` / `UnprocessedKeys` of batch calls.
pub(crate) const BATCH_ATTEMPTS: u32 = 10;

/// The outbox, inbox and unit of work on DynamoDB. Cheap to clone (shared state).
///
/// See the crate README for the schema, the ordering argument, the cost per message and the
/// consistency of each read.
#[derive(Clone)]
pub struct DynamoDbStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) client: Client,
    pub(crate) config: DynamoDbConfig,
    pub(crate) outbox: String,
    pub(crate) inbox: String,
    pub(crate) locks: String,
    pub(crate) meter: CostMeter,
    /// Last sequence handed out by this process (hybrid logical clock).
    hlc: AtomicU64,
    /// One per shard: commits of this process touching a shard take its lock, so they do not
    /// race each other for the shard's next slot (only other processes can).
    shard_locks: Vec<tokio::sync::Mutex<()>>,
    /// The table's recorded shard count was checked against the configuration.
    opened: tokio::sync::OnceCell<()>,
    /// id -> (shard, slot), bounded.
    locator: Mutex<Locator>,
    /// Cursor, holes and what this store knows about each shard's queue.
    pub(crate) shards: Mutex<HashMap<u32, ShardState>>,
    /// Undecodable queue items this store parked.
    pub(crate) poisoned: AtomicU64,
}

/// Bounded id -> (shard, slot) map; the oldest entries go first.
#[derive(Default)]
struct Locator {
    map: HashMap<MessageId, (u32, u64)>,
    order: VecDeque<MessageId>,
}

impl Locator {
    fn insert(&mut self, id: MessageId, at: (u32, u64)) {
        if self.map.insert(id, at).is_none() {
            self.order.push_back(id);
            while self.order.len() > LOCATOR_CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

impl std::fmt::Debug for DynamoDbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbStore")
            .field("outbox_table", &self.inner.outbox)
            .field("inbox_table", &self.inner.inbox)
            .field("lock_table", &self.inner.locks)
            .field("config", &self.inner.config)
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

fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
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
        let shard_count = config.shard_count;
        Ok(DynamoDbStore {
            inner: Arc::new(Inner {
                client,
                outbox: config.outbox_table(),
                inbox: config.inbox_table(),
                locks: config.lock_table(),
                config,
                meter: CostMeter::default(),
                hlc: AtomicU64::new(0),
                shard_locks: (0..shard_count)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                opened: tokio::sync::OnceCell::new(),
                locator: Mutex::new(Locator::default()),
                shards: Mutex::new(HashMap::new()),
                poisoned: AtomicU64::new(0),
            }),
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
        crate::schema::create_tables(
            &self.inner.client,
            &self.inner.outbox,
            &self.inner.inbox,
            &self.inner.locks,
        )
        .await?;
        self.ensure_open().await
    }

    /// Delete the three tables (tests and tear-down). Missing tables are fine.
    pub async fn delete_tables(&self) -> Result<()> {
        crate::schema::delete_tables(
            &self.inner.client,
            &[&self.inner.outbox, &self.inner.inbox, &self.inner.locks],
        )
        .await
    }

    /// The distributed lock on this store's lock table, with the store's clock.
    pub fn lock(&self) -> DynamoDbLock {
        DynamoDbLock::new(
            self.inner.client.clone(),
            self.inner.locks.clone(),
            self.inner.config.clock.clone(),
        )
        .with_meter(self.inner.meter.clone())
    }

    /// A new, empty transaction (what [`TransactionalStore::begin`](outbox_core::TransactionalStore::begin)
    /// returns; `begin` is the public way).
    pub(crate) fn unit_of_work(&self) -> DynamoDbTx {
        DynamoDbTx::new(self.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &DynamoDbConfig {
        &self.inner.config
    }

    /// The DynamoDB client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Requests and capacity per operation.
    pub fn meter(&self) -> &CostMeter {
        &self.inner.meter
    }

    /// `(outbox, inbox, locks)` table names.
    pub fn table_names(&self) -> (&str, &str, &str) {
        (&self.inner.outbox, &self.inner.inbox, &self.inner.locks)
    }

    /// Undecodable queue items this store found and parked (each once).
    pub fn poisoned_count(&self) -> u64 {
        self.inner.poisoned.load(AtomicOrdering::Relaxed)
    }

    /// The queue item `message` becomes (as a new pending message), for size and cost
    /// estimates: with the widest shard number of this configuration and the widest slot and
    /// sequence, so the size limit does not depend on the shard a key hashes to.
    pub fn message_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        let widest = self.inner.config.shard_count.saturating_sub(1);
        codec::encode_new(message, widest, MAX_SLOT, u64::MAX / 2)
    }

    /// The id guard item of `message` (written beside its queue item), for size estimates.
    pub fn guard_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        codec::encode_guard(&message.id, self.shard_of(message), MAX_SLOT, i64::MAX / 2)
    }

    pub(crate) fn shard_of(&self, message: &Message) -> u32 {
        shard_for(
            message.key.as_deref(),
            &message.id,
            self.inner.config.shard_count,
        )
    }

    /// Lock the given shards (in ascending order, so lockers never deadlock).
    pub(crate) async fn lock_shards(
        &self,
        shards: &std::collections::BTreeSet<u32>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::with_capacity(shards.len());
        for s in shards {
            if let Some(m) = self.inner.shard_locks.get(*s as usize) {
                guards.push(m.lock().await);
            }
        }
        guards
    }

    /// Validate a message and return its item size, or `PayloadTooLarge`.
    pub(crate) fn checked_size(&self, message: &Message) -> Result<usize> {
        outbox_core::rules::check_message(message)?;
        let size = codec::item_size(&self.message_item(message));
        if size > MAX_MESSAGE_SIZE {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge {
                    size,
                    limit: MAX_MESSAGE_SIZE,
                },
                format!(
                    "message {} becomes a DynamoDB item of {size} bytes; the limit is {MAX_MESSAGE_SIZE} (400,000-byte item limit minus {ITEM_HEADROOM} bytes for delivery state)",
                    message.id
                ),
            ));
        }
        Ok(size)
    }

    /// First of `n` sequences: above `floor` (the shards' last sequences) and above every
    /// sequence this process handed out, and at least the wall clock in microseconds.
    ///
    /// # Errors
    /// `Unexpected` if the sequence space is exhausted (a stored sequence near `u64::MAX`).
    pub(crate) fn next_sequence(&self, floor: u64, n: u64) -> Result<u64> {
        let exhausted = || {
            Error::unexpected(format!(
                "sequence space exhausted: a stored sequence ({floor}) is too close to u64::MAX"
            ))
        };
        let mut last = self.inner.hlc.load(AtomicOrdering::SeqCst);
        loop {
            let base = last
                .checked_add(1)
                .ok_or_else(exhausted)?
                .max(floor.checked_add(1).ok_or_else(exhausted)?)
                .max(wall_micros());
            let end = base
                .checked_add(n.saturating_sub(1))
                .ok_or_else(exhausted)?;
            match self.inner.hlc.compare_exchange(
                last,
                end,
                AtomicOrdering::SeqCst,
                AtomicOrdering::SeqCst,
            ) {
                Ok(_) => return Ok(base),
                Err(now) => last = now,
            }
        }
    }

    /// Remember where a message is.
    pub(crate) fn remember(&self, id: MessageId, shard: u32, slot: u64) {
        self.inner
            .locator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, (shard, slot));
    }

    /// Where a message is: from memory, else from its id guard (strongly consistent).
    pub(crate) async fn locate(
        &self,
        id: &MessageId,
        op: &'static str,
    ) -> Result<Option<(u32, u64)>> {
        let known = self
            .inner
            .locator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(id)
            .copied();
        if known.is_some() {
            return Ok(known);
        }
        let out: GetItemOutput = send(
            &self.inner.meter,
            Meta::read(op),
            self.inner
                .client
                .get_item()
                .table_name(&self.inner.outbox)
                .set_key(Some(codec::guard_key(id)))
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            |o: &GetItemOutput| Units::read(read_units(o.item().map_or(0, codec::item_size))),
        )
        .await?;
        let Some(item) = out.item() else {
            return Ok(None);
        };
        match (
            get_n::<u32>(item, codec::SHARD)?,
            get_n::<u64>(item, codec::SLOT)?,
        ) {
            (Some(shard), Some(slot)) => {
                self.remember(*id, shard, slot);
                Ok(Some((shard, slot)))
            }
            _ => Err(Error::unexpected(format!(
                "the id guard of message {id} has no shard or slot"
            ))),
        }
    }

    /// Check (once per store) that the table records this store's shard count; record it if
    /// the table has none yet (tables created by your own infrastructure-as-code).
    pub(crate) async fn ensure_open(&self) -> Result<()> {
        self.inner
            .opened
            .get_or_try_init(|| self.check_shard_count())
            .await
            .map(|_| ())
    }

    async fn check_shard_count(&self) -> Result<()> {
        let want = self.inner.config.shard_count;
        for _ in 0..2 {
            let out: GetItemOutput = send(
                &self.inner.meter,
                Meta::read("open"),
                self.inner
                    .client
                    .get_item()
                    .table_name(&self.inner.outbox)
                    .set_key(Some(codec::table_meta_key()))
                    .consistent_read(true)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                |_| Units::read(1.0),
            )
            .await?;
            if let Some(item) = out.item() {
                let have: Option<u32> = get_n(item, SHARD_COUNT)?;
                return match have {
                    Some(have) if have == want => Ok(()),
                    Some(have) => Err(Error::config(format!(
                        "table {} was created with shard_count {have}, but this store is configured with shard_count {want}; every writer and relay of a table must use the table's shard count (messages would otherwise go to shards no relay reads)",
                        self.inner.outbox
                    ))),
                    None => Err(Error::config(format!(
                        "table {} has a meta item without a shard count; it was not created by this library",
                        self.inner.outbox
                    ))),
                };
            }
            let mut item = codec::table_meta_key();
            item.insert(SHARD_COUNT.into(), codec::n(want));
            item.insert("v".into(), codec::n(2));
            let size = codec::item_size(&item);
            send_conditional(
                &self.inner.meter,
                "open",
                self.inner
                    .client
                    .put_item()
                    .table_name(&self.inner.outbox)
                    .set_item(Some(item))
                    .condition_expression("attribute_not_exists(#pk)")
                    .expression_attribute_names("#pk", codec::PK)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                Units::write(write_units(size)),
            )
            .await?;
        }
        Err(Error::unavailable(format!(
            "could not read the meta item of table {} after recording it; retry",
            self.inner.outbox
        )))
    }
}
