//! [`DynamoDbUnitOfWork`]: the caller's own `TransactWriteItems` entries, outbox messages and
//! inbox entries, committed in one `TransactWriteItems` call.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    ConditionCheck, Delete, Put, ReturnConsumedCapacity, TransactWriteItem, Update,
};
use outbox_core::{
    Committed, Error, ErrorKind, InboxEntry, InsertOutcome, Message, MessageId, Result,
    Transaction, shard_for,
};

use crate::codec::{item_size, value_size};
use crate::config::Sequencing;
use crate::error::{CancellationReasons, parse_error};
use crate::store::DynamoDbStore;

/// DynamoDB's limit on actions in one transaction.
pub const MAX_TRANSACTION_ACTIONS: usize = 100;
/// DynamoDB's limit on the aggregate item size of one transaction (4 MB).
pub const MAX_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;

/// What an entry of the final `TransactItems` list is, to map cancellation reasons.
#[derive(Debug, Clone)]
enum Role {
    Caller(usize),
    Inbox(InboxEntry),
    Message(MessageId),
    Counter(u32),
}

/// A unit of work: the caller's own writes, outbox messages and inbox entries, committed
/// atomically with one `TransactWriteItems` call (see the crate README).
///
/// Stage your own items with [`put`](Self::put), [`update`](Self::update),
/// [`delete`](Self::delete), [`condition_check`](Self::condition_check) or
/// [`push`](Self::push); each returns the entry's index, which
/// `ErrorKind::ConditionFailed { index }` names if that entry's condition fails at commit.
/// Messages ([`Transaction::add`]) and inbox entries ([`Transaction::inbox_insert`]) follow
/// your entries in the transaction. Dropping the unit of work discards everything.
pub struct DynamoDbUnitOfWork {
    store: DynamoDbStore,
    caller: Vec<TransactWriteItem>,
    caller_bytes: usize,
    inbox: Vec<InboxEntry>,
    messages: Vec<Message>,
    message_bytes: usize,
    ids: HashSet<MessageId>,
    token_override: Option<String>,
}

impl std::fmt::Debug for DynamoDbUnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbUnitOfWork")
            .field("caller_entries", &self.caller.len())
            .field("inbox_entries", &self.inbox.len())
            .field("messages", &self.messages.len())
            .finish()
    }
}

fn put_size(p: &Put) -> usize {
    item_size(p.item())
}

fn entry_size(e: &TransactWriteItem) -> usize {
    // The aggregate-size rule counts item sizes; for updates and condition checks we count
    // the key and expression values, a lower bound of what DynamoDB counts.
    let values = |m: Option<
        &std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>,
    >| { m.map_or(0, |m| m.values().map(value_size).sum::<usize>()) };
    if let Some(p) = e.put() {
        put_size(p)
    } else if let Some(u) = e.update() {
        item_size(u.key()) + values(u.expression_attribute_values())
    } else if let Some(d) = e.delete() {
        item_size(d.key()) + values(d.expression_attribute_values())
    } else if let Some(c) = e.condition_check() {
        item_size(c.key()) + values(c.expression_attribute_values())
    } else {
        0
    }
}

impl DynamoDbUnitOfWork {
    pub(crate) fn new(store: DynamoDbStore) -> Self {
        DynamoDbUnitOfWork {
            store,
            caller: Vec::new(),
            caller_bytes: 0,
            inbox: Vec::new(),
            messages: Vec::new(),
            message_bytes: 0,
            ids: HashSet::new(),
            token_override: None,
        }
    }

    /// Stage one of your own entries; returns its index in the transaction.
    pub fn push(&mut self, item: TransactWriteItem) -> usize {
        self.caller_bytes += entry_size(&item);
        self.caller.push(item);
        self.caller.len() - 1
    }

    /// Stage a `Put` of your own item; returns its index in the transaction.
    pub fn put(&mut self, put: Put) -> usize {
        self.push(TransactWriteItem::builder().put(put).build())
    }

    /// Stage an `Update` of your own item; returns its index in the transaction.
    pub fn update(&mut self, update: Update) -> usize {
        self.push(TransactWriteItem::builder().update(update).build())
    }

    /// Stage a `Delete` of your own item; returns its index in the transaction.
    pub fn delete(&mut self, delete: Delete) -> usize {
        self.push(TransactWriteItem::builder().delete(delete).build())
    }

    /// Stage a `ConditionCheck` on your own item; returns its index in the transaction.
    pub fn condition_check(&mut self, check: ConditionCheck) -> usize {
        self.push(TransactWriteItem::builder().condition_check(check).build())
    }

    /// Number of actions the commit will send (your entries, inbox entries, messages and, with
    /// [`Sequencing::ShardCounter`], one counter per touched shard).
    pub fn action_count(&self) -> usize {
        self.caller.len() + self.inbox.len() + self.messages.len() + self.counter_count()
    }

    /// Use this `ClientRequestToken` for the (first) commit attempt instead of a fresh one.
    /// Resending the same unit of work with the same token within 10 minutes is then
    /// idempotent on DynamoDB. Tokens are 1–36 characters.
    pub fn set_client_request_token(&mut self, token: impl Into<String>) -> Result<()> {
        let token = token.into();
        if token.is_empty() || token.len() > 36 {
            return Err(Error::invalid_input(format!(
                "ClientRequestToken must be 1 to 36 characters, got {}",
                token.len()
            )));
        }
        self.token_override = Some(token);
        Ok(())
    }

    fn counter_count(&self) -> usize {
        match self.store.config().sequencing {
            Sequencing::WriterClock => 0,
            Sequencing::ShardCounter => self.shards().len(),
        }
    }

    fn shards(&self) -> BTreeSet<u32> {
        let n = self.store.shard_count_value();
        self.messages
            .iter()
            .map(|m| shard_for(m.key.as_deref(), &m.id, n))
            .collect()
    }

    fn check_limits(&self) -> Result<()> {
        let count = self.action_count();
        if count > MAX_TRANSACTION_ACTIONS {
            return Err(Error::new(
                ErrorKind::LimitExceeded {
                    count,
                    limit: MAX_TRANSACTION_ACTIONS,
                },
                format!(
                    "a DynamoDB transaction holds at most {MAX_TRANSACTION_ACTIONS} actions; this unit of work has {count} ({} of yours, {} inbox entries, {} messages, {} shard counters)",
                    self.caller.len(),
                    self.inbox.len(),
                    self.messages.len(),
                    self.counter_count()
                ),
            ));
        }
        let size = self.caller_bytes + self.message_bytes + self.inbox.len() * 128;
        if size > MAX_TRANSACTION_BYTES {
            return Err(Error::new(
                ErrorKind::PayloadTooLarge {
                    size,
                    limit: MAX_TRANSACTION_BYTES,
                },
                format!(
                    "a DynamoDB transaction holds at most {MAX_TRANSACTION_BYTES} bytes of items (4 MB); this unit of work has {size}"
                ),
            ));
        }
        Ok(())
    }

    /// Stage messages after checking them (validity, size, duplicates, limits); on error
    /// nothing is staged.
    pub(crate) fn stage(&mut self, messages: &[Message]) -> Result<()> {
        let mut bytes = 0;
        let mut seen = HashSet::new();
        for m in messages {
            bytes += self.store.checked_size(m)?;
            if self.ids.contains(&m.id) || !seen.insert(m.id) {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!("message {} is added twice in one unit of work", m.id),
                ));
            }
        }
        let before = (self.messages.len(), self.message_bytes);
        self.messages.extend_from_slice(messages);
        self.message_bytes += bytes;
        if let Err(e) = self.check_limits() {
            self.messages.truncate(before.0);
            self.message_bytes = before.1;
            return Err(e);
        }
        self.ids.extend(seen);
        Ok(())
    }

    /// Commit: one `TransactWriteItems` (after reading the shard counters, with
    /// [`Sequencing::ShardCounter`]). Retries by itself only when it lost a race on a shard
    /// counter.
    pub(crate) async fn commit_inner(self) -> Result<Committed> {
        let mut committed = Committed::default();
        let n = self.store.shard_count_value();
        for m in &self.messages {
            committed.record(m, n);
        }
        if self.caller.is_empty() && self.inbox.is_empty() && self.messages.is_empty() {
            return Ok(committed);
        }
        self.check_limits()?;
        let max_attempts = self.store.config().max_commit_attempts;
        let _guards = self.store.lock_shards(&self.shards()).await;
        let mut token = self.token_override.clone();
        for attempt in 1..=max_attempts {
            let token_now = token
                .take()
                .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
            match self.attempt(&token_now).await? {
                Attempt::Done => return Ok(committed),
                Attempt::LostRace(reasons) => {
                    if attempt == max_attempts {
                        return Err(Error::unavailable(format!(
                            "gave up after {max_attempts} commit attempts: concurrent writers kept advancing the same shard counters; retry the unit of work (last reasons: {reasons})"
                        ))
                        .with_source(reasons));
                    }
                    backoff(attempt).await;
                }
            }
        }
        Err(Error::unexpected("commit loop ended without a result"))
    }

    async fn attempt(&self, token: &str) -> Result<Attempt> {
        let store = &self.store;
        let config = store.config();
        let mut roles: Vec<Role> = Vec::new();
        let mut items: Vec<TransactWriteItem> = Vec::new();
        for (i, e) in self.caller.iter().enumerate() {
            roles.push(Role::Caller(i));
            items.push(e.clone());
        }
        for entry in &self.inbox {
            roles.push(Role::Inbox(entry.clone()));
            items.push(
                TransactWriteItem::builder()
                    .put(store.inbox_put(entry)?)
                    .build(),
            );
        }
        if !self.messages.is_empty() {
            let n = store.shard_count_value();
            let shard_of: Vec<u32> = self
                .messages
                .iter()
                .map(|m| shard_for(m.key.as_deref(), &m.id, n))
                .collect();
            let counters: BTreeMap<u32, Option<u64>> = match config.sequencing {
                Sequencing::ShardCounter => store.read_counters(&shard_of).await?,
                Sequencing::WriterClock => BTreeMap::new(),
            };
            let floor = counters.values().flatten().copied().max().unwrap_or(0);
            let base = store.next_sequence(floor, self.messages.len() as u64);
            let last = base + self.messages.len() as u64 - 1;
            for (i, m) in self.messages.iter().enumerate() {
                roles.push(Role::Message(m.id));
                items.push(
                    TransactWriteItem::builder()
                        .put(store.message_put(m, shard_of[i], base + i as u64)?)
                        .build(),
                );
            }
            for (shard, old) in &counters {
                roles.push(Role::Counter(*shard));
                items.push(
                    TransactWriteItem::builder()
                        .update(store.counter_update(*shard, *old, last)?)
                        .build(),
                );
            }
        }
        let out = store
            .client()
            .transact_write_items()
            .set_transact_items(Some(items))
            .client_request_token(token)
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
            .send()
            .await;
        match out {
            Ok(o) => {
                store.meter().record("commit", true, o.consumed_capacity());
                Ok(Attempt::Done)
            }
            Err(e) => {
                store.meter().record("commit", true, &[]);
                let reasons = match &e {
                    aws_sdk_dynamodb::error::SdkError::ServiceError(s) => match s.err() {
                        TransactWriteItemsError::TransactionCanceledException(c) => {
                            Some(CancellationReasons::from_sdk(c.cancellation_reasons()))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                match reasons {
                    Some(r) => map_cancellation(&roles, r),
                    None => Err(parse_error(e)),
                }
            }
        }
    }
}

enum Attempt {
    Done,
    LostRace(CancellationReasons),
}

async fn backoff(attempt: u32) {
    let cap = 5u64 << attempt.min(5); // 10 ms .. 160 ms
    tokio::time::sleep(Duration::from_millis(fastrand::u64(1..=cap))).await;
}

/// Map the per-entry cancellation reasons to a typed error (or a lost counter race).
fn map_cancellation(roles: &[Role], reasons: CancellationReasons) -> Result<Attempt> {
    let mut lost_race = false;
    let mut conflict = None;
    for (i, role) in roles.iter().enumerate() {
        let Some(code) = reasons.code(i) else {
            continue;
        };
        let conditional = code == "ConditionalCheckFailed";
        let transient = matches!(
            code,
            "TransactionConflict" | "ThrottlingError" | "ProvisionedThroughputExceeded"
        );
        match role {
            Role::Counter(shard) if conditional || transient => {
                tracing::debug!(shard, code, "lost the race on a shard counter; retrying");
                lost_race = true;
            }
            Role::Caller(index) if conditional => {
                return Err(Error::new(
                    ErrorKind::ConditionFailed {
                        index: Some(*index),
                    },
                    format!(
                        "the condition of your entry {index} failed; nothing was written (reasons: {reasons})"
                    ),
                )
                .with_source(reasons));
            }
            Role::Inbox(entry) if conditional => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "inbox entry (message {}, handler {:?}) already exists: the message was handled; nothing was written (reasons: {reasons})",
                        entry.message_id, entry.handler_key
                    ),
                )
                .with_source(reasons));
            }
            Role::Message(id) if conditional => {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "message {id} is already stored; nothing was written (reasons: {reasons})"
                    ),
                )
                .with_source(reasons));
            }
            _ if transient => conflict = Some(i),
            _ => {
                let (kind, retryable, what) = crate::error::classify_code(Some(code), None);
                let kind = match (kind, role) {
                    (ErrorKind::ConditionFailed { .. }, Role::Caller(index)) => {
                        ErrorKind::ConditionFailed {
                            index: Some(*index),
                        }
                    }
                    (k, _) => k,
                };
                return Err(Error::new(
                    kind,
                    format!("transaction entry {i} was rejected: {what}; nothing was written (reasons: {reasons})"),
                )
                .set_retryable(retryable)
                .with_source(reasons));
            }
        }
    }
    if let Some(i) = conflict {
        return Err(Error::unavailable(format!(
            "transaction entry {i} conflicted with another transaction or was throttled; nothing was written, retry the unit of work (reasons: {reasons})"
        ))
        .with_source(reasons));
    }
    if lost_race {
        return Ok(Attempt::LostRace(reasons));
    }
    Err(Error::unexpected(format!(
        "transaction cancelled without a failing entry (reasons: {reasons})"
    ))
    .with_source(reasons))
}

#[async_trait]
impl Transaction for DynamoDbUnitOfWork {
    async fn add(&mut self, message: &Message) -> Result<()> {
        self.stage(std::slice::from_ref(message))
    }

    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        self.stage(messages)
    }

    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        crate::store::check_entry(entry)?;
        if self.inbox.contains(entry) {
            return Ok(InsertOutcome::Duplicate);
        }
        self.inbox.push(entry.clone());
        if let Err(e) = self.check_limits() {
            self.inbox.pop();
            return Err(e);
        }
        // Duplicates show at commit (AlreadyExists): DynamoDB cannot read inside a transaction.
        Ok(InsertOutcome::Inserted)
    }

    async fn commit(self) -> Result<Committed> {
        self.commit_inner().await
    }

    async fn rollback(self) -> Result<()> {
        Ok(())
    }
}
