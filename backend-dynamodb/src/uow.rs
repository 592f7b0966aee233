//! [`DynamoDbTx`]: the caller's own `TransactWriteItems` entries, outbox messages and
//! inbox entries, committed in one `TransactWriteItems` call.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::types::{
    AttributeValue, ConditionCheck, Delete, Put, ReturnConsumedCapacity, TransactWriteItem, Update,
};
use outbox_core::{
    AbortState, Committed, Error, ErrorKind, InboxEntry, InsertOutcome, Message, MessageId, Result,
    Transaction, add_duration,
};

use crate::codec::{
    self, ITEM_HEADROOM, MAX_MESSAGE_SIZE, MAX_SLOT, MAX_TRANSACTION_ACTIONS,
    MAX_TRANSACTION_BYTES, PK, item_size, value_size,
};
use crate::core::Core;
use crate::error::{CancellationReasons, parse_error};
use crate::meter::{Units, write_units};
use crate::request::{Meta, build_err, metered};

/// Upper bound of an id guard item's size.
const GUARD_BYTES: usize = 96;

/// What an entry of the final `TransactItems` list is, to map cancellation reasons.
#[derive(Debug, Clone)]
enum Role {
    Caller(usize),
    Inbox(InboxEntry),
    /// A message's queue item: its condition fails when another commit took the slot.
    Slot(u32),
    /// A message's id guard: its condition fails when the id is stored.
    Guard(MessageId),
}

/// Resends of one identical request (same items, same `ClientRequestToken`) after an
/// ambiguous failure (timeout, 5xx, `TransactionInProgressException`, throttling).
const RESENDS: u32 = 3;

/// One attempt's request: slots assigned, items built, token chosen. Built once and resent
/// as it is.
struct Plan {
    items: Vec<TransactWriteItem>,
    roles: Vec<Role>,
    token: String,
    /// (id, shard, slot) of every message.
    placed: Vec<(MessageId, u32, u64)>,
    units: Units,
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
///
/// A failed [`add`](Transaction::add), [`add_batch`](Transaction::add_batch) or
/// [`inbox_insert`](Transaction::inbox_insert) (invalid or oversized message, an id added
/// twice, too many actions or bytes for one transaction) aborts the unit of work as the
/// [`Transaction`] contract says: further adds, inbox inserts and
/// [`commit`](Transaction::commit) are refused with `InvalidInput` naming the first error, and
/// nothing is written; entries you stage after that are discarded with the rest. DynamoDB
/// cannot read inside a transaction, so an id that is already stored and an inbox duplicate
/// show at commit (`AlreadyExists`, nothing written), as
/// [`Capabilities`](outbox_core::Capabilities) declares.
pub struct DynamoDbTx {
    core: Arc<Core>,
    caller: Vec<TransactWriteItem>,
    caller_bytes: usize,
    inbox: Vec<InboxEntry>,
    messages: Vec<Message>,
    message_bytes: usize,
    ids: HashSet<MessageId>,
    token_override: Option<String>,
    abort: AbortState,
}

impl std::fmt::Debug for DynamoDbTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoDbTx")
            .field("caller_entries", &self.caller.len())
            .field("inbox_entries", &self.inbox.len())
            .field("messages", &self.messages.len())
            .field("aborted", &self.abort.is_aborted())
            .finish()
    }
}

fn names_size(m: Option<&std::collections::HashMap<String, String>>) -> usize {
    m.map_or(0, |m| m.iter().map(|(k, v)| k.len() + v.len()).sum())
}

fn values_size(
    m: Option<&std::collections::HashMap<String, aws_sdk_dynamodb::types::AttributeValue>>,
) -> usize {
    m.map_or(0, |m| m.iter().map(|(k, v)| k.len() + value_size(v)).sum())
}

/// Bytes one of the caller's entries adds to the transaction: the item of a `Put`; for an
/// `Update`, `Delete` or `ConditionCheck` the key, the expressions and their names and values
/// (a lower bound of what DynamoDB counts, which includes the stored item).
fn entry_size(e: &TransactWriteItem) -> usize {
    let expr = |x: Option<&str>| x.map_or(0, str::len);
    if let Some(p) = e.put() {
        item_size(p.item())
            + expr(p.condition_expression())
            + names_size(p.expression_attribute_names())
            + values_size(p.expression_attribute_values())
    } else if let Some(u) = e.update() {
        item_size(u.key())
            + u.update_expression().len()
            + expr(u.condition_expression())
            + names_size(u.expression_attribute_names())
            + values_size(u.expression_attribute_values())
    } else if let Some(d) = e.delete() {
        item_size(d.key())
            + expr(d.condition_expression())
            + names_size(d.expression_attribute_names())
            + values_size(d.expression_attribute_values())
    } else if let Some(c) = e.condition_check() {
        item_size(c.key())
            + c.condition_expression().len()
            + names_size(c.expression_attribute_names())
            + values_size(c.expression_attribute_values())
    } else {
        0
    }
}

impl DynamoDbTx {
    pub(crate) fn new(core: Arc<Core>) -> Self {
        DynamoDbTx {
            core,
            caller: Vec::new(),
            caller_bytes: 0,
            inbox: Vec::new(),
            messages: Vec::new(),
            message_bytes: 0,
            ids: HashSet::new(),
            token_override: None,
            abort: AbortState::default(),
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

    /// Number of actions the commit will send: your entries, inbox entries, and two per
    /// message (its queue item and its id guard).
    pub fn action_count(&self) -> usize {
        self.caller.len() + self.inbox.len() + 2 * self.messages.len()
    }

    /// Use this `ClientRequestToken` for the first commit request instead of a fresh one.
    /// Every request is resent as it is (same items, same token) after an ambiguous failure,
    /// which DynamoDB applies at most once within 10 minutes. A request with new slots (after
    /// losing the race for a slot) gets a new token. Tokens are 1–36 characters.
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

    fn shards(&self) -> BTreeSet<u32> {
        self.messages
            .iter()
            .map(|m| self.core.shard_of(m))
            .collect()
    }

    /// Bytes of the transaction as counted here (a lower bound for your updates and checks).
    fn size_estimate(&self) -> usize {
        self.caller_bytes
            + self.message_bytes
            + self.messages.len() * GUARD_BYTES
            + self.inbox.len() * 128
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
                    "a DynamoDB transaction holds at most {MAX_TRANSACTION_ACTIONS} actions; this unit of work has {count} ({} of yours, {} inbox entries, {} messages at 2 actions each: queue item and id guard)",
                    self.caller.len(),
                    self.inbox.len(),
                    self.messages.len()
                ),
            ));
        }
        let size = self.size_estimate();
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
            bytes += self.core.checked_size(m)?;
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

    /// Stage an inbox entry after checking it and the limits; on error nothing is staged.
    fn stage_inbox(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        outbox_core::rules::check_inbox_entry(entry)?;
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

    /// Commit: read the tail of each touched shard (strongly consistent), put every message
    /// at the next free slot of its shard and its id guard, with your entries and the inbox
    /// entries, in one `TransactWriteItems`. Retries by itself only when it lost the race for
    /// a slot (new slots, new token), and resends the identical request after an ambiguous
    /// failure.
    pub(crate) async fn commit_inner(self) -> Result<Committed> {
        let mut committed = Committed::default();
        let n = self.core.config.shard_count;
        for m in &self.messages {
            committed.record(m, n);
        }
        if self.caller.is_empty() && self.inbox.is_empty() && self.messages.is_empty() {
            return Ok(committed);
        }
        self.check_limits()?;
        self.core.ensure_open().await?;
        let max_attempts = self.core.config.max_commit_attempts;
        let _guards = self.core.lock_shards(&self.shards()).await;
        let mut token = self.token_override.clone();
        for attempt in 1..=max_attempts {
            let plan = self.plan(token.take()).await?;
            match self.send(&plan).await? {
                Attempt::Done => {
                    for (id, shard, slot) in &plan.placed {
                        self.core.remember(*id, *shard, *slot);
                    }
                    return Ok(committed);
                }
                Attempt::LostRace(reasons) => {
                    if attempt == max_attempts {
                        return Err(Error::unavailable(format!(
                            "gave up after {max_attempts} commit attempts: concurrent writers kept taking the next slot of the same shards; retry the unit of work (last reasons: {reasons})"
                        ))
                        .with_source(reasons));
                    }
                    backoff(attempt).await;
                }
            }
        }
        Err(Error::unexpected("commit loop ended without a result"))
    }

    /// Read the touched shards' tails, assign slots and sequences, build the request.
    async fn plan(&self, token: Option<String>) -> Result<Plan> {
        let core = &self.core;
        let mut roles: Vec<Role> = Vec::new();
        let mut items: Vec<TransactWriteItem> = Vec::new();
        let mut wcu = 0.0;
        for (i, e) in self.caller.iter().enumerate() {
            roles.push(Role::Caller(i));
            wcu += 2.0 * write_units(entry_size(e));
            items.push(e.clone());
        }
        for entry in &self.inbox {
            let put = core.inbox_put(entry)?;
            wcu += 2.0 * write_units(item_size(put.item()));
            roles.push(Role::Inbox(entry.clone()));
            items.push(TransactWriteItem::builder().put(put).build());
        }
        let mut placed = Vec::with_capacity(self.messages.len());
        if !self.messages.is_empty() {
            let shard_of: Vec<u32> = self.messages.iter().map(|m| core.shard_of(m)).collect();
            let touched: BTreeSet<u32> = shard_of.iter().copied().collect();
            let tails =
                futures::future::try_join_all(touched.iter().map(|s| core.read_tail(*s, "commit")))
                    .await?;
            let mut next: BTreeMap<u32, u64> = BTreeMap::new();
            let mut floor = 0;
            for (shard, tail) in touched.iter().zip(&tails) {
                next.insert(*shard, tail.slot);
                floor = floor.max(tail.seq);
            }
            let count = u64::try_from(self.messages.len()).unwrap_or(u64::MAX);
            let base = core.next_sequence(floor, count)?;
            let now = core.config.clock.now();
            let guard_ttl = add_duration(now, core.config.id_guard_ttl).timestamp();
            for (i, m) in self.messages.iter().enumerate() {
                let shard = shard_of[i];
                let slot = next
                    .get_mut(&shard)
                    .map(|s| {
                        *s = s.saturating_add(1);
                        *s
                    })
                    .filter(|s| *s <= MAX_SLOT)
                    .ok_or_else(|| {
                        Error::unexpected(format!("shard {shard} has used every slot of its queue"))
                    })?;
                let seq = base + i as u64;
                let queue_item = codec::encode_new(m, shard, slot, seq);
                let guard = codec::encode_guard(&m.id, shard, slot, guard_ttl);
                wcu += 2.0 * write_units(item_size(&queue_item))
                    + 2.0 * write_units(item_size(&guard));
                for (role, item) in [(Role::Slot(shard), queue_item), (Role::Guard(m.id), guard)] {
                    roles.push(role);
                    items.push(
                        TransactWriteItem::builder()
                            .put(
                                Put::builder()
                                    .table_name(&core.outbox)
                                    .set_item(Some(item))
                                    .condition_expression("attribute_not_exists(#pk)")
                                    .expression_attribute_names("#pk", PK)
                                    .build()
                                    .map_err(build_err)?,
                            )
                            .build(),
                    );
                }
                placed.push((m.id, shard, slot));
            }
        }
        Ok(Plan {
            items,
            roles,
            token: token.unwrap_or_else(|| uuid::Uuid::now_v7().to_string()),
            placed,
            units: Units::write(wcu),
        })
    }

    /// Whether `plan` was applied (its first message's guard names its slot): after an
    /// ambiguous failure, a resend that fails on its own conditions may mean it landed.
    async fn landed(&self, plan: &Plan) -> Result<bool> {
        let Some((id, shard, slot)) = plan.placed.first() else {
            return Ok(false);
        };
        Ok(self.core.locate(id, "commit").await? == Some((*shard, *slot)))
    }

    /// Send `plan`, resending the identical request after ambiguous failures.
    async fn send(&self, plan: &Plan) -> Result<Attempt> {
        let core = &self.core;
        let mut ambiguous = false;
        let mut resend = 0;
        loop {
            let out = metered(
                &core.meter,
                Meta::write("commit"),
                core.client
                    .transact_write_items()
                    .set_transact_items(Some(plan.items.clone()))
                    .client_request_token(&plan.token)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                |_| plan.units,
                plan.units,
            )
            .await;
            let err = match out {
                Ok(_) => return Ok(Attempt::Done),
                Err(e) => e,
            };
            let reasons = match &err {
                SdkError::ServiceError(s) => match s.err() {
                    TransactWriteItemsError::TransactionCanceledException(c) => {
                        Some(CancellationReasons::from_sdk(c.cancellation_reasons()))
                    }
                    _ => None,
                },
                _ => None,
            };
            if let Some(r) = reasons {
                return match map_cancellation(&plan.roles, r) {
                    Ok(Attempt::LostRace(r)) if ambiguous && self.landed(plan).await? => {
                        tracing::debug!(reasons = %r, "commit: the first request had landed");
                        Ok(Attempt::Done)
                    }
                    Err(e)
                        if ambiguous
                            && e.kind() == ErrorKind::AlreadyExists
                            && self.landed(plan).await? =>
                    {
                        Ok(Attempt::Done)
                    }
                    other => other,
                };
            }
            let code = err.code().map(str::to_owned);
            if code.as_deref() == Some("IdempotentParameterMismatchException") {
                if self.landed(plan).await? {
                    return Ok(Attempt::Done);
                }
                return Err(parse_error(err));
            }
            if code.as_deref() == Some("ValidationException")
                && err.message().is_some_and(|m| {
                    m.contains("4 MB") || m.contains("larger than") || m.contains("size")
                })
            {
                let size = self.size_estimate();
                return Err(Error::new(
                    ErrorKind::PayloadTooLarge {
                        size,
                        limit: MAX_TRANSACTION_BYTES,
                    },
                    format!(
                        "DynamoDB refused the transaction as too large (estimated {size} bytes here; DynamoDB also counts the stored items your updates and condition checks touch); nothing was written: {}",
                        aws_sdk_dynamodb::error::DisplayErrorContext(&err)
                    ),
                )
                .with_source(err));
            }
            let e = parse_error(err);
            // Throttling, 5xx, timeouts, TransactionInProgress: the request may or may not have
            // been applied; the identical request with the same token applies at most once.
            if e.is_retryable() && resend < RESENDS {
                resend += 1;
                ambiguous = true;
                tracing::debug!(error = %e, resend, "commit: resending the identical request");
                backoff(resend).await;
                continue;
            }
            if ambiguous && self.landed(plan).await.unwrap_or(false) {
                return Ok(Attempt::Done);
            }
            return Err(e);
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

/// Map the per-entry cancellation reasons to a typed error (or a lost race for a slot).
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
            Role::Slot(shard) if conditional || transient => {
                tracing::debug!(shard, code, "lost the race for a slot; retrying");
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
            Role::Guard(id) if conditional => {
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
impl Transaction for DynamoDbTx {
    async fn add(&mut self, message: &Message) -> Result<()> {
        self.add_batch(std::slice::from_ref(message)).await
    }

    async fn add_batch(&mut self, messages: &[Message]) -> Result<()> {
        self.abort.check()?;
        let result = self.stage(messages);
        self.abort.track(result)
    }

    async fn inbox_insert(&mut self, entry: &InboxEntry) -> Result<InsertOutcome> {
        self.abort.check()?;
        let result = self.stage_inbox(entry);
        self.abort.track(result)
    }

    async fn commit(self) -> Result<Committed> {
        self.abort.check()?;
        self.commit_inner().await
    }

    async fn rollback(self) -> Result<()> {
        Ok(())
    }
}

impl Core {
    /// The queue item `message` becomes (as a new pending message), for size and cost
    /// estimates: with the widest shard number of this configuration and the widest slot and
    /// sequence, so the size limit does not depend on the shard a key hashes to.
    pub(crate) fn message_item(&self, message: &Message) -> HashMap<String, AttributeValue> {
        let widest = self.config.shard_count.saturating_sub(1);
        codec::encode_new(message, widest, MAX_SLOT, u64::MAX / 2)
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
}
