//! [`DynamoDbStore`]: the outbox and inbox on DynamoDB.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::put_item::PutItemOutput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConsumedCapacity, DeleteRequest, KeysAndAttributes, Put,
    ReturnConsumedCapacity, Select, Update, WriteRequest,
};
use futures::{StreamExt, TryStreamExt};
use outbox_core::{
    Capabilities, DateTime, Error, ErrorKind, FailedAttempt, FailureOutcome, InboxEntry,
    InboxStore, InsertOutcome, ListQuery, Message, MessageId, MessageStatus, Ordering, OutboxStats,
    OutboxStore, PendingQuery, RequeueFilter, Result, StoredMessage, TransactionalStore, Utc,
    add_duration, inbox_expiry, shard_for,
};

use crate::codec::{
    self, ATTEMPTS, CREATED, DELIVER_AFTER, DISPATCHED_AT, EXPIRES, ITEM_HEADROOM, Item, KEY,
    LAST_ERROR, MAX_ITEM_SIZE, NEXT_ATTEMPT, PARKED_INDEX, PARKED_PK, PENDING_INDEX, PENDING_PK,
    PK, SEQ, SHARD, SK, STATUS, TOPIC, TTL, get_n, get_s, n, s,
};
use crate::config::{DynamoDbConfig, Sequencing};
use crate::error::parse_error;
use crate::lock::DynamoDbLock;
use crate::meter::CostMeter;
use crate::uow::DynamoDbUnitOfWork;

/// Largest message accepted, measured as the DynamoDB item it becomes.
pub const MAX_MESSAGE_SIZE: usize = MAX_ITEM_SIZE - ITEM_HEADROOM;
/// Items per `BatchWriteItem` (DynamoDB's limit; enforced here because some emulators accept more).
pub const BATCH_WRITE_LIMIT: usize = 25;
/// Keys per `BatchGetItem`.
pub const BATCH_GET_LIMIT: usize = 100;
/// Parallel requests of one store call (per-shard queries, per-id updates).
const PARALLEL: usize = 8;
/// Attempts to drain `UnprocessedItems` / `UnprocessedKeys` of batch calls.
const BATCH_ATTEMPTS: u32 = 10;

/// The outbox, inbox and unit of work on DynamoDB. Cheap to clone (shared state).
///
/// See the crate README for the schema, the cost per message and the consistency of each read.
#[derive(Clone)]
pub struct DynamoDbStore {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    config: DynamoDbConfig,
    outbox: String,
    inbox: String,
    locks: String,
    meter: CostMeter,
    /// Last sequence handed out by this process (hybrid logical clock).
    hlc: AtomicU64,
    /// One per shard: commits of this process touching a shard take its lock, so they do not
    /// race each other on the shard counter (only other processes can).
    shard_locks: Vec<tokio::sync::Mutex<()>>,
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

fn ser<E: std::error::Error + Send + Sync + 'static>(e: E) -> Error {
    Error::unexpected("building a DynamoDB request failed").with_source(e)
}

fn names(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn values(pairs: Vec<(&str, AttributeValue)>) -> HashMap<String, AttributeValue> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn id_key(id: &MessageId) -> HashMap<String, AttributeValue> {
    values(vec![(PK, s(id.to_string()))])
}

fn is_ccf<E: ProvideErrorMetadata, R>(e: &aws_sdk_dynamodb::error::SdkError<E, R>) -> bool {
    e.code() == Some("ConditionalCheckFailedException")
}

/// Outputs of single-item writes that report consumed capacity.
trait WriteOutput {
    fn consumed(&self) -> Option<&ConsumedCapacity>;
}

impl WriteOutput for PutItemOutput {
    fn consumed(&self) -> Option<&ConsumedCapacity> {
        self.consumed_capacity()
    }
}

impl WriteOutput for UpdateItemOutput {
    fn consumed(&self) -> Option<&ConsumedCapacity> {
        self.consumed_capacity()
    }
}

/// The result of a conditional single-item write: `Ok(true)` when it applied, `Ok(false)`
/// when its condition failed (the request is metered either way), other errors parsed.
fn conditional<O: WriteOutput, E>(
    meter: &CostMeter,
    op: &'static str,
    out: std::result::Result<O, SdkError<E, HttpResponse>>,
) -> Result<bool>
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match out {
        Ok(o) => {
            meter.record_one(op, true, o.consumed());
            Ok(true)
        }
        Err(e) if is_ccf(&e) => {
            meter.record_one(op, true, None);
            Ok(false)
        }
        Err(e) => Err(parse_error(e)),
    }
}

fn wall_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Check an inbox entry's handler key.
pub(crate) fn check_entry(entry: &InboxEntry) -> Result<()> {
    if entry.handler_key.is_empty() {
        return Err(Error::invalid_input("inbox handler key must not be empty"));
    }
    if entry.handler_key.len() > 1024 {
        return Err(Error::invalid_input(format!(
            "inbox handler key is {} bytes long; DynamoDB sort keys hold at most 1024",
            entry.handler_key.len()
        )));
    }
    Ok(())
}

/// A filter expression with its attribute names and values.
type Filter<'a> = (
    &'a str,
    HashMap<String, String>,
    HashMap<String, AttributeValue>,
);

/// One pending-index entry.
#[derive(Debug, Clone)]
struct Candidate {
    seq: u64,
    id: MessageId,
}

impl DynamoDbStore {
    /// A store on `client` with `config`. Does not touch DynamoDB; call
    /// [`create_tables`](Self::create_tables) once (or create the tables with your own
    /// infrastructure-as-code, see the README).
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

    /// Create the outbox, inbox and lock tables and their indexes if missing, wait until they
    /// are active, and enable TTL. Idempotent; safe to call at every start.
    pub async fn create_tables(&self) -> Result<()> {
        crate::schema::create_tables(
            &self.inner.client,
            &self.inner.outbox,
            &self.inner.inbox,
            &self.inner.locks,
        )
        .await
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
    }

    /// Open a unit of work (same as [`TransactionalStore::begin`], without the `async`).
    pub fn unit_of_work(&self) -> DynamoDbUnitOfWork {
        DynamoDbUnitOfWork::new(self.clone())
    }

    /// The configuration.
    pub fn config(&self) -> &DynamoDbConfig {
        &self.inner.config
    }

    /// The DynamoDB client.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    /// Requests and reported capacity per operation.
    pub fn meter(&self) -> &CostMeter {
        &self.inner.meter
    }

    /// `(outbox, inbox, locks)` table names.
    pub fn table_names(&self) -> (&str, &str, &str) {
        (&self.inner.outbox, &self.inner.inbox, &self.inner.locks)
    }

    /// The DynamoDB item `message` becomes (as a new pending message), for size and cost
    /// estimates.
    pub fn message_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        let shard = shard_for(
            message.key.as_deref(),
            &message.id,
            self.shard_count_value(),
        );
        codec::encode_new(message, shard, u64::MAX / 2)
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

    pub(crate) fn shard_count_value(&self) -> u32 {
        self.inner.config.shard_count
    }

    /// Validate a message and return its item size, or `PayloadTooLarge`.
    pub(crate) fn checked_size(&self, message: &Message) -> Result<usize> {
        message.validate()?;
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

    /// First of `n` sequences: above `floor` (the shard counters) and above every sequence
    /// this process handed out, and at least the wall clock in microseconds.
    pub(crate) fn next_sequence(&self, floor: u64, n: u64) -> u64 {
        let mut last = self.inner.hlc.load(AtomicOrdering::SeqCst);
        loop {
            let base = (last + 1).max(floor + 1).max(wall_micros());
            match self.inner.hlc.compare_exchange(
                last,
                base + n - 1,
                AtomicOrdering::SeqCst,
                AtomicOrdering::SeqCst,
            ) {
                Ok(_) => return base,
                Err(now) => last = now,
            }
        }
    }

    /// Strongly consistent read of the shard counters (`None`: never written).
    pub(crate) async fn read_counters(&self, shards: &[u32]) -> Result<BTreeMap<u32, Option<u64>>> {
        let mut out: BTreeMap<u32, Option<u64>> = shards.iter().map(|s| (*s, None)).collect();
        let keys: Vec<HashMap<String, AttributeValue>> = out
            .keys()
            .map(|sh| values(vec![(PK, s(codec::counter_pk(*sh)))]))
            .collect();
        for chunk in keys.chunks(BATCH_GET_LIMIT) {
            for item in self
                .batch_get(chunk.to_vec(), "read_counters", &[PK, SEQ])
                .await?
            {
                let pk = get_s(&item, PK).unwrap_or_default();
                let shard: Option<u32> = pk.strip_prefix("#seq#").and_then(|v| v.parse().ok());
                if let Some(shard) = shard {
                    out.insert(shard, get_n(&item, SEQ)?);
                }
            }
        }
        Ok(out)
    }

    /// BatchGetItem (strongly consistent), retrying unprocessed keys.
    async fn batch_get(
        &self,
        keys: Vec<HashMap<String, AttributeValue>>,
        op: &'static str,
        projection: &[&str],
    ) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        let mut pending = keys;
        for attempt in 0..BATCH_ATTEMPTS {
            if pending.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
            }
            let mut ka = KeysAndAttributes::builder()
                .set_keys(Some(std::mem::take(&mut pending)))
                .consistent_read(true);
            if !projection.is_empty() {
                let mut expr = Vec::new();
                let mut map = HashMap::new();
                for (i, p) in projection.iter().enumerate() {
                    expr.push(format!("#p{i}"));
                    map.insert(format!("#p{i}"), (*p).to_owned());
                }
                ka = ka
                    .projection_expression(expr.join(", "))
                    .set_expression_attribute_names(Some(map));
            }
            let out = self
                .inner
                .client
                .batch_get_item()
                .request_items(&self.inner.outbox, ka.build().map_err(ser)?)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send()
                .await
                .map_err(parse_error)?;
            self.inner.meter.record(op, false, out.consumed_capacity());
            if let Some(items) = out.responses().and_then(|r| r.get(&self.inner.outbox)) {
                found.extend(items.iter().cloned());
            }
            if let Some(un) = out
                .unprocessed_keys()
                .and_then(|u| u.get(&self.inner.outbox))
            {
                pending = un.keys().to_vec();
            }
        }
        if !pending.is_empty() {
            return Err(Error::unavailable(format!(
                "BatchGetItem left {} keys unprocessed after {BATCH_ATTEMPTS} attempts (throttling); retry",
                pending.len()
            )));
        }
        Ok(found)
    }

    /// The conditional Put of a new message.
    pub(crate) fn message_put(&self, m: &Message, shard: u32, seq: u64) -> Result<Put> {
        Put::builder()
            .table_name(&self.inner.outbox)
            .set_item(Some(codec::encode_new(m, shard, seq)))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .build()
            .map_err(ser)
    }

    /// The conditional Update advancing a shard counter from `old` to `new`.
    pub(crate) fn counter_update(&self, shard: u32, old: Option<u64>, new: u64) -> Result<Update> {
        let b = Update::builder()
            .table_name(&self.inner.outbox)
            .key(PK, s(codec::counter_pk(shard)))
            .update_expression("SET #sq = :new")
            .expression_attribute_names("#sq", SEQ)
            .expression_attribute_values(":new", n(new));
        let b = match old {
            Some(old) => b
                .condition_expression("#sq = :old")
                .expression_attribute_values(":old", n(old)),
            None => b.condition_expression("attribute_not_exists(#sq)"),
        };
        b.build().map_err(ser)
    }

    /// The conditional Put of an inbox entry: absent, or present but expired.
    pub(crate) fn inbox_put(&self, entry: &InboxEntry) -> Result<Put> {
        check_entry(entry)?;
        let now = self.inner.config.clock.now();
        let expires = inbox_expiry(now, self.inner.config.inbox_retention);
        Put::builder()
            .table_name(&self.inner.inbox)
            .item(PK, s(entry.message_id.to_string()))
            .item(SK, s(&entry.handler_key))
            .item(EXPIRES, codec::micros(expires))
            .item(TTL, n(expires.timestamp().max(0)))
            .condition_expression("attribute_not_exists(#pk) OR #ex <= :now")
            .expression_attribute_names("#pk", PK)
            .expression_attribute_names("#ex", EXPIRES)
            .expression_attribute_values(":now", codec::micros(now))
            .build()
            .map_err(ser)
    }

    /// Standalone add of a single message with [`Sequencing::WriterClock`]: one PutItem.
    async fn put_one(&self, m: &Message) -> Result<()> {
        self.checked_size(m)?;
        let shard = shard_for(m.key.as_deref(), &m.id, self.shard_count_value());
        let _guard = self.lock_shards(&[shard].into_iter().collect()).await;
        let seq = self.next_sequence(0, 1);
        let p = self.message_put(m, shard, seq)?;
        let out = self
            .inner
            .client
            .put_item()
            .table_name(p.table_name())
            .set_item(Some(p.item().clone()))
            .condition_expression("attribute_not_exists(#pk)")
            .expression_attribute_names("#pk", PK)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        if conditional(&self.inner.meter, "add", out)? {
            Ok(())
        } else {
            Err(Error::new(
                ErrorKind::AlreadyExists,
                format!("message {} is already stored", m.id),
            ))
        }
    }

    /// Query one shard of the pending index in sequence order and choose what may be
    /// published, up to `limit`.
    async fn scan_shard(
        &self,
        shard: u32,
        limit: usize,
        ordering: Ordering,
        now: DateTime<Utc>,
    ) -> Result<Vec<Candidate>> {
        // Keyed parked messages hold back later messages of their key.
        let mut parked: HashMap<String, u64> = HashMap::new();
        if ordering == Ordering::PerKey {
            for item in self
                .query_index(
                    PARKED_INDEX,
                    PARKED_PK,
                    shard,
                    &[KEY, SEQ],
                    usize::MAX,
                    "fetch_pending",
                )
                .await?
            {
                if let (Some(k), Some(sq)) = (get_s(&item, KEY), get_n::<u64>(&item, SEQ)?) {
                    let e = parked.entry(k.to_owned()).or_insert(sq);
                    *e = (*e).min(sq);
                }
            }
        }
        let now_us = now.timestamp_micros();
        let mut blocked: HashSet<String> = HashSet::new();
        let mut chosen = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let page = limit.clamp(25, 1000) as i32;
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.outbox)
                .index_name(PENDING_INDEX)
                .key_condition_expression("#pp = :s")
                .expression_attribute_names("#pp", PENDING_PK)
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#sq", SEQ)
                .expression_attribute_names("#k", KEY)
                .expression_attribute_names("#da", DELIVER_AFTER)
                .expression_attribute_names("#na", NEXT_ATTEMPT)
                .projection_expression("#pk, #sq, #k, #da, #na")
                .expression_attribute_values(":s", n(shard))
                .limit(page)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send()
                .await
                .map_err(parse_error)?;
            self.inner
                .meter
                .record_one("fetch_pending", false, out.consumed_capacity());
            for item in out.items() {
                let seq: u64 = get_n(item, SEQ)?.unwrap_or(0);
                let id: MessageId = get_s(item, PK).unwrap_or_default().parse()?;
                let key = get_s(item, KEY);
                let due = get_n::<i64>(item, DELIVER_AFTER)?.is_none_or(|t| t <= now_us)
                    && get_n::<i64>(item, NEXT_ATTEMPT)?.is_none_or(|t| t <= now_us);
                if ordering == Ordering::PerKey
                    && let Some(k) = key
                {
                    if blocked.contains(k) || parked.get(k).is_some_and(|p| *p < seq) {
                        continue;
                    }
                    if !due {
                        blocked.insert(k.to_owned());
                        continue;
                    }
                }
                if due {
                    chosen.push(Candidate { seq, id });
                    if chosen.len() >= limit {
                        return Ok(chosen);
                    }
                }
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(chosen),
            }
        }
    }

    /// All entries of one shard of a sparse index (eventually consistent), projected.
    async fn query_index(
        &self,
        index: &str,
        pk: &str,
        shard: u32,
        projection: &[&str],
        max: usize,
        op: &'static str,
    ) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        let mut expr = Vec::new();
        let mut names = names(&[("#ix", pk)]);
        for (i, p) in projection.iter().enumerate() {
            expr.push(format!("#p{i}"));
            names.insert(format!("#p{i}"), (*p).to_owned());
        }
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.outbox)
                .index_name(index)
                .key_condition_expression("#ix = :s")
                .set_expression_attribute_names(Some(names.clone()))
                .projection_expression(expr.join(", "))
                .expression_attribute_values(":s", n(shard))
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send()
                .await
                .map_err(parse_error)?;
            self.inner
                .meter
                .record_one(op, false, out.consumed_capacity());
            items.extend(out.items().iter().cloned());
            if items.len() >= max {
                return Ok(items);
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(items),
            }
        }
    }

    /// Count the parked entries of one shard (`Select = COUNT` on the parked index).
    async fn count_parked(&self, shard: u32) -> Result<u64> {
        let mut total = 0u64;
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = self
                .inner
                .client
                .query()
                .table_name(&self.inner.outbox)
                .index_name(PARKED_INDEX)
                .key_condition_expression("#ix = :s")
                .expression_attribute_names("#ix", PARKED_PK)
                .expression_attribute_values(":s", n(shard))
                .select(Select::Count)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send()
                .await
                .map_err(parse_error)?;
            self.inner
                .meter
                .record_one("stats", false, out.consumed_capacity());
            total += out.count().max(0) as u64;
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(total),
            }
        }
    }

    /// Return one parked message to pending (condition: still parked, and of `topic` if given).
    async fn requeue_one(&self, id: MessageId, topic: Option<&str>) -> Result<bool> {
        let mut cond = "#st = :parked".to_owned();
        let mut req = self
            .inner
            .client
            .update_item()
            .table_name(&self.inner.outbox)
            .set_key(Some(id_key(&id)))
            .update_expression("SET #st = :pending, #at = :zero, #pp = #sh REMOVE #na, #pq")
            .expression_attribute_names("#st", STATUS)
            .expression_attribute_names("#at", ATTEMPTS)
            .expression_attribute_names("#pp", PENDING_PK)
            .expression_attribute_names("#sh", SHARD)
            .expression_attribute_names("#na", NEXT_ATTEMPT)
            .expression_attribute_names("#pq", PARKED_PK)
            .expression_attribute_values(":parked", s(MessageStatus::Parked.as_str()))
            .expression_attribute_values(":pending", s(MessageStatus::Pending.as_str()))
            .expression_attribute_values(":zero", n(0));
        if let Some(t) = topic {
            cond.push_str(" AND #t = :topic");
            req = req
                .expression_attribute_names("#t", TOPIC)
                .expression_attribute_values(":topic", s(t));
        }
        let out = req
            .condition_expression(cond)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        conditional(&self.inner.meter, "requeue", out)
    }

    /// BatchWriteItem deletes of outbox items, 25 per request, retrying unprocessed items.
    async fn delete_many(&self, keys: Vec<HashMap<String, AttributeValue>>) -> Result<u64> {
        let mut deleted = 0u64;
        for chunk in keys.chunks(BATCH_WRITE_LIMIT) {
            let mut pending: Vec<WriteRequest> = chunk
                .iter()
                .map(|k| {
                    DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(ser)
                })
                .collect::<Result<_>>()?;
            let mut attempt = 0;
            while !pending.is_empty() {
                if attempt >= BATCH_ATTEMPTS {
                    return Err(Error::unavailable(format!(
                        "BatchWriteItem left {} deletes unprocessed after {BATCH_ATTEMPTS} attempts (throttling); {deleted} were deleted, call again",
                        pending.len()
                    )));
                }
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(10 << attempt.min(6))).await;
                }
                attempt += 1;
                let sent = pending.len();
                let out = self
                    .inner
                    .client
                    .batch_write_item()
                    .request_items(&self.inner.outbox, std::mem::take(&mut pending))
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send()
                    .await
                    .map_err(parse_error)?;
                self.inner
                    .meter
                    .record("purge_dispatched", true, out.consumed_capacity());
                if let Some(un) = out
                    .unprocessed_items()
                    .and_then(|u| u.get(&self.inner.outbox))
                {
                    pending = un.to_vec();
                }
                deleted += (sent - pending.len()) as u64;
            }
        }
        Ok(deleted)
    }

    /// Full-table scan for operators' views (`list`, `purge_dispatched`): never on the relay's
    /// path.
    async fn scan(
        &self,
        filter: Option<Filter<'_>>,
        projection: Option<&str>,
        max: usize,
        op: &'static str,
    ) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let mut req = self
                .inner
                .client
                .scan()
                .table_name(&self.inner.outbox)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes);
            if let Some((expr, names, values)) = &filter {
                req = req
                    .filter_expression(*expr)
                    .set_expression_attribute_names(Some(names.clone()))
                    .set_expression_attribute_values((!values.is_empty()).then(|| values.clone()));
            }
            if let Some(p) = projection {
                req = req.projection_expression(p);
            }
            let out = req.send().await.map_err(parse_error)?;
            self.inner
                .meter
                .record_one(op, false, out.consumed_capacity());
            items.extend(out.items().iter().cloned());
            if items.len() >= max {
                items.truncate(max);
                return Ok(items);
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(items),
            }
        }
    }
}

#[async_trait]
impl OutboxStore for DynamoDbStore {
    fn capabilities(&self) -> Capabilities {
        Capabilities::full()
            .with_max_message_size(Some(MAX_MESSAGE_SIZE))
            .with_max_batch(Some(self.inner.config.max_batch()))
            .with_inbox_duplicate_at_insert(false)
    }

    fn shard_count(&self) -> u32 {
        self.inner.config.shard_count
    }

    async fn add(&self, message: &Message) -> Result<()> {
        match self.inner.config.sequencing {
            Sequencing::WriterClock => self.put_one(message).await,
            Sequencing::ShardCounter => {
                let mut uow = self.unit_of_work();
                uow.stage(std::slice::from_ref(message))?;
                uow.commit_inner().await.map(|_| ())
            }
        }
    }

    async fn add_batch(&self, messages: &[Message]) -> Result<()> {
        let limit = self.inner.config.max_batch();
        if messages.len() > limit {
            return Err(Error::new(
                ErrorKind::LimitExceeded {
                    count: messages.len(),
                    limit,
                },
                format!(
                    "add_batch takes at most {limit} messages (DynamoDB's 100 actions per transaction, less one shard counter per shard); got {}",
                    messages.len()
                ),
            ));
        }
        match messages {
            [] => Ok(()),
            [one] if self.inner.config.sequencing == Sequencing::WriterClock => {
                self.put_one(one).await
            }
            _ => {
                let mut uow = self.unit_of_work();
                uow.stage(messages)?;
                uow.commit_inner().await.map(|_| ())
            }
        }
    }

    async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.outbox)
            .set_key(Some(id_key(&id)))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await
            .map_err(parse_error)?;
        self.inner
            .meter
            .record_one("get", false, out.consumed_capacity());
        out.item().map(codec::decode).transpose()
    }

    async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        if query.limit == 0 || query.shards.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.inner.config.clock.now();
        let shards: Vec<u32> = query
            .shards
            .iter()
            .copied()
            .filter(|s| *s < self.shard_count_value())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let per_shard: Vec<Vec<Candidate>> = futures::stream::iter(shards)
            .map(|shard| self.scan_shard(shard, query.limit, query.ordering, now))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut candidates: Vec<Candidate> = per_shard.into_iter().flatten().collect();
        candidates.sort_by_key(|c| c.seq);
        candidates.truncate(query.limit);
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        // Bodies, strongly consistent: the index may lag the table, so the table decides.
        let keys: Vec<_> = candidates.iter().map(|c| id_key(&c.id)).collect();
        let mut bodies: HashMap<MessageId, StoredMessage> = HashMap::new();
        for chunk in keys.chunks(BATCH_GET_LIMIT) {
            for item in self.batch_get(chunk.to_vec(), "fetch_pending", &[]).await? {
                let m = codec::decode(&item)?;
                bodies.insert(m.message.id, m);
            }
        }
        let mut blocked: HashSet<String> = HashSet::new();
        let mut out = Vec::with_capacity(candidates.len());
        for c in candidates {
            let Some(m) = bodies.remove(&c.id) else {
                continue;
            };
            let key = m.message.key.clone();
            let per_key = query.ordering == Ordering::PerKey;
            if per_key && key.as_ref().is_some_and(|k| blocked.contains(k)) {
                continue;
            }
            if m.status != MessageStatus::Pending || !m.is_due(now) {
                if per_key && m.status != MessageStatus::Dispatched {
                    blocked.extend(key);
                }
                continue;
            }
            out.push(m);
        }
        Ok(out)
    }

    async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let now = self.inner.config.clock.now();
        let ttl = add_duration(now, self.inner.config.dispatched_ttl).timestamp();
        let unique: Vec<MessageId> = ids
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        futures::stream::iter(unique)
            .map(|id| async move {
                let out = self
                    .inner
                    .client
                    .update_item()
                    .table_name(&self.inner.outbox)
                    .set_key(Some(id_key(&id)))
                    .update_expression("SET #st = :d, #dd = :now, #ttl = :ttl REMOVE #pp, #pq, #na")
                    .condition_expression("attribute_exists(#pk) AND #st <> :d")
                    .expression_attribute_names("#pk", PK)
                    .expression_attribute_names("#st", STATUS)
                    .expression_attribute_names("#dd", DISPATCHED_AT)
                    .expression_attribute_names("#ttl", TTL)
                    .expression_attribute_names("#pp", PENDING_PK)
                    .expression_attribute_names("#pq", PARKED_PK)
                    .expression_attribute_names("#na", NEXT_ATTEMPT)
                    .expression_attribute_values(":d", s(MessageStatus::Dispatched.as_str()))
                    .expression_attribute_values(":now", codec::micros(now))
                    .expression_attribute_values(":ttl", n(ttl.max(0)))
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send()
                    .await;
                // A failed condition means unknown or already dispatched: idempotent.
                conditional(&self.inner.meter, "mark_dispatched", out).map(|_| ())
            })
            .buffer_unordered(PARALLEL * 2)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    async fn mark_failed(&self, id: MessageId, attempt: &FailedAttempt) -> Result<FailureOutcome> {
        let error = codec::clip_error(&attempt.error);
        for _ in 0..16 {
            let out = self
                .inner
                .client
                .get_item()
                .table_name(&self.inner.outbox)
                .set_key(Some(id_key(&id)))
                .consistent_read(true)
                .projection_expression("#st, #at")
                .expression_attribute_names("#st", STATUS)
                .expression_attribute_names("#at", ATTEMPTS)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send()
                .await
                .map_err(parse_error)?;
            self.inner
                .meter
                .record_one("mark_failed", false, out.consumed_capacity());
            let Some(item) = out.item() else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("message {id} is not stored (never added, or purged)"),
                ));
            };
            if get_s(item, STATUS) != Some(MessageStatus::Pending.as_str()) {
                return Ok(FailureOutcome::NotPending);
            }
            let old: u32 = get_n(item, ATTEMPTS)?.unwrap_or(0);
            let attempts = old.saturating_add(1);
            let park = attempts >= attempt.max_attempts;
            let next = outbox_core::truncate_micros(attempt.next_attempt_at);
            let mut req = self
                .inner
                .client
                .update_item()
                .table_name(&self.inner.outbox)
                .set_key(Some(id_key(&id)))
                .condition_expression(
                    "#st = :pending AND (attribute_not_exists(#at) OR #at = :old)",
                )
                .expression_attribute_names("#st", STATUS)
                .expression_attribute_names("#at", ATTEMPTS)
                .expression_attribute_names("#le", LAST_ERROR)
                .expression_attribute_names("#na", NEXT_ATTEMPT)
                .expression_attribute_values(":pending", s(MessageStatus::Pending.as_str()))
                .expression_attribute_values(":old", n(old))
                .expression_attribute_values(":a", n(attempts))
                .expression_attribute_values(":le", s(&error))
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes);
            req = if park {
                req.update_expression(
                    "SET #st = :parked, #at = :a, #le = :le, #pq = #sh REMOVE #pp, #na",
                )
                .expression_attribute_names("#pq", PARKED_PK)
                .expression_attribute_names("#pp", PENDING_PK)
                .expression_attribute_names("#sh", SHARD)
                .expression_attribute_values(":parked", s(MessageStatus::Parked.as_str()))
            } else {
                req.update_expression("SET #at = :a, #le = :le, #na = :na")
                    .expression_attribute_values(":na", codec::micros(next))
            };
            match req.send().await {
                Ok(o) => {
                    self.inner
                        .meter
                        .record_one("mark_failed", true, o.consumed_capacity());
                    return Ok(if park {
                        FailureOutcome::Parked { attempts }
                    } else {
                        FailureOutcome::Retrying {
                            attempts,
                            next_attempt_at: next,
                        }
                    });
                }
                // Changed under us (dispatched, or another failure recorded): read again.
                Err(e) if is_ccf(&e) => continue,
                Err(e) => return Err(parse_error(e)),
            }
        }
        Err(Error::unavailable(format!(
            "message {id} kept changing while recording a failure; retry"
        )))
    }

    async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        let (targets, topic): (Vec<MessageId>, Option<&str>) = match filter {
            RequeueFilter::Ids(ids) => (
                ids.iter()
                    .copied()
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect(),
                None,
            ),
            RequeueFilter::Topic(_) | RequeueFilter::All => {
                let topic = match filter {
                    RequeueFilter::Topic(t) => Some(t.as_str()),
                    _ => None,
                };
                let per_shard: Vec<Vec<Item>> = futures::stream::iter(0..self.shard_count_value())
                    .map(|shard| {
                        self.query_index(
                            PARKED_INDEX,
                            PARKED_PK,
                            shard,
                            &[PK, TOPIC],
                            usize::MAX,
                            "requeue",
                        )
                    })
                    .buffer_unordered(PARALLEL)
                    .try_collect()
                    .await?;
                let ids = per_shard
                    .into_iter()
                    .flatten()
                    .filter(|i| topic.is_none_or(|t| get_s(i, TOPIC) == Some(t)))
                    .map(|i| get_s(&i, PK).unwrap_or_default().parse())
                    .collect::<Result<Vec<MessageId>>>()?;
                (ids, topic)
            }
        };
        let done: Vec<bool> = futures::stream::iter(targets)
            .map(|id| self.requeue_one(id, topic))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(done.into_iter().filter(|d| *d).count() as u64)
    }

    async fn stats(&self) -> Result<OutboxStats> {
        let now = self.inner.config.clock.now();
        let shards = 0..self.shard_count_value();
        let per_shard: Vec<(u64, Option<i64>, u64)> = futures::stream::iter(shards)
            .map(|shard| async move {
                let pending = self
                    .query_index(
                        PENDING_INDEX,
                        PENDING_PK,
                        shard,
                        &[CREATED],
                        usize::MAX,
                        "stats",
                    )
                    .await?;
                let mut oldest: Option<i64> = None;
                for item in &pending {
                    if let Some(ca) = get_n::<i64>(item, CREATED)? {
                        oldest = Some(oldest.map_or(ca, |o| o.min(ca)));
                    }
                }
                let parked = self.count_parked(shard).await?;
                Ok::<_, Error>((pending.len() as u64, oldest, parked))
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let pending = per_shard.iter().map(|p| p.0).sum();
        let parked = per_shard.iter().map(|p| p.2).sum();
        let oldest = per_shard.iter().filter_map(|p| p.1).min();
        let oldest_pending_age = oldest.map(|ca| {
            let age = now.timestamp_micros().saturating_sub(ca).max(0);
            Duration::from_micros(age as u64)
        });
        Ok(OutboxStats {
            pending,
            parked,
            oldest_pending_age,
        })
    }

    async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        let now = self.inner.config.clock.now();
        let Some(cutoff) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
        else {
            return Ok(0);
        };
        let doomed = self
            .scan(
                Some((
                    "#st = :d AND #dd <= :cutoff",
                    names(&[("#st", STATUS), ("#dd", DISPATCHED_AT)]),
                    values(vec![
                        (":d", s(MessageStatus::Dispatched.as_str())),
                        (":cutoff", codec::micros(cutoff)),
                    ]),
                )),
                Some(PK),
                limit,
                "purge_dispatched",
            )
            .await?;
        let keys = doomed
            .iter()
            .filter_map(|i| get_s(i, PK))
            .map(|pk| values(vec![(PK, s(pk))]))
            .collect();
        self.delete_many(keys).await
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        let limit = if query.limit == 0 { 100 } else { query.limit };
        let mut expr = vec!["attribute_exists(#st)".to_owned()];
        let mut nm = names(&[("#st", STATUS)]);
        let mut vals = HashMap::new();
        if let Some(st) = query.status {
            expr.push("#st = :st".to_owned());
            vals.insert(":st".to_owned(), s(st.as_str()));
        }
        if let Some(t) = &query.topic {
            expr.push("#t = :t".to_owned());
            nm.insert("#t".to_owned(), TOPIC.to_owned());
            vals.insert(":t".to_owned(), s(t));
        }
        let filter = expr.join(" AND ");
        let items = self
            .scan(Some((filter.as_str(), nm, vals)), None, usize::MAX, "list")
            .await?;
        let mut all = items
            .iter()
            .map(codec::decode)
            .collect::<Result<Vec<_>>>()?;
        all.sort_by_key(|m| m.sequence);
        all.truncate(limit);
        Ok(all)
    }
}

#[async_trait]
impl InboxStore for DynamoDbStore {
    async fn insert(&self, entry: &InboxEntry) -> Result<InsertOutcome> {
        let p = self.inbox_put(entry)?;
        let out = self
            .inner
            .client
            .put_item()
            .table_name(p.table_name())
            .set_item(Some(p.item().clone()))
            .set_condition_expression(p.condition_expression().map(str::to_owned))
            .set_expression_attribute_names(p.expression_attribute_names().cloned())
            .set_expression_attribute_values(p.expression_attribute_values().cloned())
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        Ok(if conditional(&self.inner.meter, "inbox_insert", out)? {
            InsertOutcome::Inserted
        } else {
            InsertOutcome::Duplicate
        })
    }

    async fn contains(&self, entry: &InboxEntry) -> Result<bool> {
        check_entry(entry)?;
        let out = self
            .inner
            .client
            .get_item()
            .table_name(&self.inner.inbox)
            .key(PK, s(entry.message_id.to_string()))
            .key(SK, s(&entry.handler_key))
            .consistent_read(true)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await
            .map_err(parse_error)?;
        self.inner
            .meter
            .record_one("inbox_contains", false, out.consumed_capacity());
        let now = self.inner.config.clock.now().timestamp_micros();
        match out.item() {
            None => Ok(false),
            Some(item) => Ok(get_n::<i64>(item, EXPIRES)?.is_some_and(|ex| now < ex)),
        }
    }

    fn retention(&self) -> Duration {
        self.inner.config.inbox_retention
    }

    /// DynamoDB's TTL deletes expired entries (lazily); expired entries already count as
    /// absent. Returns 0.
    async fn purge_expired(&self, _limit: usize) -> Result<u64> {
        Ok(0)
    }
}

#[async_trait]
impl TransactionalStore for DynamoDbStore {
    type Tx = DynamoDbUnitOfWork;

    async fn begin(&self) -> Result<DynamoDbUnitOfWork> {
        Ok(self.unit_of_work())
    }
}
