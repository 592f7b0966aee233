//! The outbox operations of a [`Core`] behind `OutboxStore` for
//! [`DynamoDbStore`](crate::DynamoDbStore) (adds go through the unit of work, `uow`): reads
//! of single messages, marks, requeue, stats, purge and list; reads of the queues go through
//! `queue`.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use aws_sdk_dynamodb::operation::batch_write_item::BatchWriteItemOutput;
use aws_sdk_dynamodb::operation::scan::ScanOutput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;
use aws_sdk_dynamodb::types::{
    AttributeValue, DeleteRequest, ReturnConsumedCapacity, ReturnValue, WriteRequest,
};
use futures::{StreamExt, TryStreamExt};
use outbox_core::{
    Error, ErrorKind, FailedAttempt, FailureOutcome, ListQuery, MessageId, MessageStatus,
    OutboxStats, PendingQuery, RequeueFilter, Result, StoredMessage, add_duration,
};

use crate::codec::{
    self, ATTEMPTS, DISPATCHED_AT, ID, Item, LAST_ERROR, META_SLOT, NEXT_ATTEMPT, PK, QUEUE_PREFIX,
    SK, STATUS, TOPIC, TTL, get_n, get_s, n, s,
};
use crate::core::{BATCH_ATTEMPTS, BATCH_WRITE_LIMIT, Core, PARALLEL};
use crate::meter::{Units, read_units, write_units};
use crate::queue::{Entry, classify, slot_of};
use crate::request::{Meta, build_err, send, send_conditional};

/// Size added to a queue item by `mark_dispatched` (`dd`, `ttl`, the longer status).
const DISPATCH_GROWTH: usize = 2 + 9 + 3 + 6 + 4;
/// How long a wake-up item of `requeue` is kept (its TTL; DynamoDB deletes it some time after).
const WAKE_TTL: Duration = Duration::from_secs(3600);

impl Core {
    /// The queue item of message `id` at `(shard, slot)`, strongly consistent; `None` if the
    /// slot holds another message (a stale location) or nothing.
    async fn queue_item(
        &self,
        id: &MessageId,
        at: (u32, u64),
        op: &'static str,
    ) -> Result<Option<Item>> {
        let id_s = id.to_string();
        Ok(self
            .get_strong(codec::queue_key(at.0, at.1), op)
            .await?
            .filter(|i| get_s(i, ID) == Some(id_s.as_str())))
    }

    /// Find a message by id: its location (memory or id guard), else every shard's open
    /// items (a message whose guard expired). Returns `(shard, slot, item)`.
    async fn find(&self, id: &MessageId, op: &'static str) -> Result<Option<(u32, u64, Item)>> {
        if let Some(at) = self.locate(id, op).await? {
            return Ok(self.queue_item(id, at, op).await?.map(|i| (at.0, at.1, i)));
        }
        let id_s = id.to_string();
        for shard in 0..self.config.shard_count {
            for (slot, entry) in self.read_open(shard, op).await? {
                let hit = match &entry {
                    Entry::Message(m) => m.message.id == *id,
                    Entry::Poison(p) => p.id.is_some_and(|p| p.to_string() == id_s),
                };
                if hit {
                    self.remember(*id, shard, slot);
                    return Ok(self
                        .queue_item(id, (shard, slot), op)
                        .await?
                        .map(|i| (shard, slot, i)));
                }
            }
        }
        Ok(None)
    }

    /// Return one parked message to pending.
    async fn requeue_at(&self, id: &MessageId, shard: u32, slot: u64) -> Result<bool> {
        Ok(send_conditional(
            &self.meter,
            "requeue",
            self.client
                .update_item()
                .table_name(&self.outbox)
                .set_key(Some(codec::queue_key(shard, slot)))
                .update_expression("SET #st = :pending, #at = :zero REMOVE #na")
                .condition_expression("#i = :id AND #st = :parked")
                .expression_attribute_names("#i", ID)
                .expression_attribute_names("#st", STATUS)
                .expression_attribute_names("#at", ATTEMPTS)
                .expression_attribute_names("#na", NEXT_ATTEMPT)
                .expression_attribute_values(":id", s(id.to_string()))
                .expression_attribute_values(":parked", s(MessageStatus::Parked.as_str()))
                .expression_attribute_values(":pending", s(MessageStatus::Pending.as_str()))
                .expression_attribute_values(":zero", n(0))
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            Units::write(write_units(1024)),
        )
        .await?
        .is_some())
    }

    /// Put a wake-up item for each of `shards`, so that relays woken by the table's stream
    /// (`StreamListener`, the Lambda handler) look at them now, not at their next poll. A
    /// failure is only logged: the requeue is done, and polling finds the messages.
    async fn wake_stream(&self, shards: &BTreeSet<u32>) {
        let now = self.config.clock.now();
        let ttl = add_duration(now, WAKE_TTL).timestamp();
        let results: Vec<Result<()>> = futures::stream::iter(shards.iter().copied())
            .map(|shard| async move {
                let req = self
                    .client
                    .put_item()
                    .table_name(&self.outbox)
                    .set_item(Some(codec::wake_item(shard, now, ttl)))
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send();
                send(&self.meter, Meta::write("requeue_wake"), req, |_| {
                    Units::write(1.0)
                })
                .await
                .map(|_| ())
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for e in results.into_iter().filter_map(|r| r.err()) {
            tracing::warn!(error = %e, "requeue: could not wake the stream listeners; \
                relays find the requeued messages at their next poll");
        }
    }

    /// Full-table scan (operators' views: `list`, `purge_dispatched`), strongly consistent.
    async fn scan_queue(
        &self,
        filter: &str,
        mut names: HashMap<String, String>,
        mut values: HashMap<String, AttributeValue>,
        op: &'static str,
    ) -> Result<Vec<Item>> {
        names.insert("#pk".into(), PK.into());
        names.insert("#sk".into(), SK.into());
        values.insert(":q".into(), s(QUEUE_PREFIX));
        values.insert(":meta".into(), n(META_SLOT));
        let expr = format!("begins_with(#pk, :q) AND #sk < :meta{filter}");
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out: ScanOutput = send(
                &self.meter,
                Meta::read(op),
                self.client
                    .scan()
                    .table_name(&self.outbox)
                    .consistent_read(true)
                    .filter_expression(&expr)
                    .set_expression_attribute_names(Some(names.clone()))
                    .set_expression_attribute_values(Some(values.clone()))
                    .set_exclusive_start_key(start.take())
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                |o: &ScanOutput| {
                    Units::read(read_units(o.items().iter().map(codec::item_size).sum()))
                },
            )
            .await?;
            items.extend(out.items().iter().cloned());
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(items),
            }
        }
    }

    /// BatchWriteItem deletes, 25 per request, retrying unprocessed items.
    async fn delete_many(&self, keys: Vec<Item>) -> Result<u64> {
        let mut deleted = 0u64;
        for chunk in keys.chunks(BATCH_WRITE_LIMIT) {
            let mut pending: Vec<WriteRequest> = chunk
                .iter()
                .map(|k| {
                    DeleteRequest::builder()
                        .set_key(Some(k.clone()))
                        .build()
                        .map(|d| WriteRequest::builder().delete_request(d).build())
                        .map_err(build_err)
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
                let out: BatchWriteItemOutput = send(
                    &self.meter,
                    Meta::write("purge_dispatched"),
                    self.client
                        .batch_write_item()
                        .request_items(&self.outbox, std::mem::take(&mut pending))
                        .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                        .send(),
                    |_| Units::write(sent as f64),
                )
                .await?;
                if let Some(un) = out.unprocessed_items().and_then(|u| u.get(&self.outbox)) {
                    pending = un.to_vec();
                }
                deleted += (sent - pending.len()) as u64;
            }
        }
        Ok(deleted)
    }
}

/// The `OutboxStore` operations other than adds (which go through the unit of work), called
/// by the trait implementation on [`DynamoDbStore`](crate::DynamoDbStore).
impl Core {
    pub(crate) async fn get(&self, id: MessageId) -> Result<Option<StoredMessage>> {
        self.ensure_open().await?;
        Ok(self.find(&id, "get").await?.map(|(shard, slot, item)| {
            classify(shard, slot, &item).to_stored(self.config.shard_count)
        }))
    }

    pub(crate) async fn fetch_pending(&self, query: &PendingQuery) -> Result<Vec<StoredMessage>> {
        if query.limit == 0 || query.shards.is_empty() {
            return Ok(Vec::new());
        }
        self.ensure_open().await?;
        let now = self.config.clock.now();
        let shards: Vec<u32> = query
            .shards
            .iter()
            .copied()
            .filter(|s| *s < self.config.shard_count)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let per_shard: Vec<Vec<(u64, StoredMessage)>> = futures::stream::iter(shards)
            .map(|shard| self.fetch_shard(shard, query.limit, query.ordering, now))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut all: Vec<StoredMessage> = per_shard.into_iter().flatten().map(|(_, m)| m).collect();
        // Within a shard sequences follow slots; across shards they follow the writers' clocks.
        all.sort_by_key(|m| m.sequence);
        all.truncate(query.limit);
        Ok(all)
    }

    pub(crate) async fn mark_dispatched(&self, ids: &[MessageId]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        self.ensure_open().await?;
        let now = self.config.clock.now();
        let ttl = add_duration(now, self.config.dispatched_ttl).timestamp();
        let unique: Vec<MessageId> = ids
            .iter()
            .copied()
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        futures::stream::iter(unique)
            .map(|id| async move {
                // Unknown ids (never added, purged, guard expired) are ignored.
                let Some((shard, slot)) = self.locate(&id, "mark_dispatched").await? else {
                    return Ok(());
                };
                let req = self
                    .client
                    .update_item()
                    .table_name(&self.outbox)
                    .set_key(Some(codec::queue_key(shard, slot)))
                    .update_expression("SET #st = :d, #dd = :now, #ttl = :ttl REMOVE #na")
                    .condition_expression("#i = :id AND #st <> :d")
                    .expression_attribute_names("#i", ID)
                    .expression_attribute_names("#st", STATUS)
                    .expression_attribute_names("#dd", DISPATCHED_AT)
                    .expression_attribute_names("#ttl", TTL)
                    .expression_attribute_names("#na", NEXT_ATTEMPT)
                    .expression_attribute_values(":id", s(id.to_string()))
                    .expression_attribute_values(":d", s(MessageStatus::Dispatched.as_str()))
                    .expression_attribute_values(":now", codec::micros(now))
                    .expression_attribute_values(":ttl", n(ttl.max(0)))
                    .return_values(ReturnValue::AllOld)
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes);
                let out = crate::request::metered(
                    &self.meter,
                    Meta::write("mark_dispatched"),
                    req.send(),
                    |o: &UpdateItemOutput| {
                        let old = o.attributes().map_or(0, codec::item_size);
                        Units::write(write_units(old + DISPATCH_GROWTH))
                    },
                    Units::write(1.0),
                )
                .await;
                match out {
                    Ok(_) => {
                        self.note_dispatched(shard, slot);
                        Ok(())
                    }
                    // Already dispatched, or the slot holds another message: nothing to do.
                    Err(e) if crate::request::is_condition_failed(&e) => Ok(()),
                    Err(e) => Err(crate::error::parse_error(e)),
                }
            })
            .buffer_unordered(PARALLEL * 2)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    pub(crate) async fn mark_failed(
        &self,
        id: MessageId,
        attempt: &FailedAttempt,
    ) -> Result<FailureOutcome> {
        self.ensure_open().await?;
        let error = outbox_core::rules::error_text(&attempt.error);
        for _ in 0..16 {
            let Some((shard, slot, item)) = self.find(&id, "mark_failed").await? else {
                return Err(Error::new(
                    ErrorKind::NotFound,
                    format!("message {id} is not stored (never added, or purged)"),
                ));
            };
            if get_s(&item, STATUS) != Some(MessageStatus::Pending.as_str()) {
                return Ok(FailureOutcome::NotPending);
            }
            let old: u32 = get_n(&item, ATTEMPTS)?.unwrap_or(0);
            let attempts = old.saturating_add(1);
            let park = attempts >= attempt.max_attempts;
            let next = outbox_core::truncate_micros(attempt.next_attempt_at);
            let mut req = self
                .client
                .update_item()
                .table_name(&self.outbox)
                .set_key(Some(codec::queue_key(shard, slot)))
                .condition_expression(
                    "#i = :id AND #st = :pending AND (attribute_not_exists(#at) OR #at = :old)",
                )
                .expression_attribute_names("#i", ID)
                .expression_attribute_names("#st", STATUS)
                .expression_attribute_names("#at", ATTEMPTS)
                .expression_attribute_names("#le", LAST_ERROR)
                .expression_attribute_values(":id", s(id.to_string()))
                .expression_attribute_values(":pending", s(MessageStatus::Pending.as_str()))
                .expression_attribute_values(":old", n(old))
                .expression_attribute_values(":a", n(attempts))
                .expression_attribute_values(":le", s(&error))
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes);
            req = if park {
                req.update_expression("SET #st = :parked, #at = :a, #le = :le REMOVE #na")
                    .expression_attribute_names("#na", NEXT_ATTEMPT)
                    .expression_attribute_values(":parked", s(MessageStatus::Parked.as_str()))
            } else {
                req.update_expression("SET #at = :a, #le = :le, #na = :na")
                    .expression_attribute_names("#na", NEXT_ATTEMPT)
                    .expression_attribute_values(":na", codec::micros(next))
            };
            let units = Units::write(write_units(codec::item_size(&item) + error.len() + 16));
            if send_conditional(&self.meter, "mark_failed", req.send(), units)
                .await?
                .is_some()
            {
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
        }
        Err(Error::unavailable(format!(
            "message {id} kept changing while recording a failure; retry"
        )))
    }

    pub(crate) async fn requeue(&self, filter: &RequeueFilter) -> Result<u64> {
        self.ensure_open().await?;
        let targets: Vec<(MessageId, u32, u64)> = match filter {
            RequeueFilter::Ids(ids) => {
                let unique: HashSet<MessageId> = ids.iter().copied().collect();
                let mut out = Vec::new();
                for id in unique {
                    if let Some((shard, slot)) = self.locate(&id, "requeue").await? {
                        out.push((id, shard, slot));
                    }
                }
                out
            }
            RequeueFilter::Topic(_) | RequeueFilter::All => {
                let topic = match filter {
                    RequeueFilter::Topic(t) => Some(t.as_str()),
                    _ => None,
                };
                let per_shard: Vec<Vec<(u64, Entry)>> =
                    futures::stream::iter(0..self.config.shard_count)
                        .map(|shard| self.read_open(shard, "requeue"))
                        .buffer_unordered(PARALLEL)
                        .try_collect()
                        .await?;
                per_shard
                    .into_iter()
                    .flatten()
                    .filter_map(|(slot, e)| match e {
                        Entry::Message(m)
                            if m.status == MessageStatus::Parked
                                && topic.is_none_or(|t| m.message.topic == t) =>
                        {
                            Some((m.message.id, m.shard, slot))
                        }
                        _ => None,
                    })
                    .collect()
            }
        };
        let done: Vec<Option<u32>> = futures::stream::iter(targets)
            .map(|(id, shard, slot)| async move {
                Ok::<_, Error>(self.requeue_at(&id, shard, slot).await?.then_some(shard))
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let shards: BTreeSet<u32> = done.iter().flatten().copied().collect();
        self.wake_stream(&shards).await;
        Ok(done.iter().flatten().count() as u64)
    }

    pub(crate) async fn stats(&self) -> Result<OutboxStats> {
        self.ensure_open().await?;
        let now = self.config.clock.now();
        let per_shard: Vec<Vec<(u64, Entry)>> = futures::stream::iter(0..self.config.shard_count)
            .map(|shard| self.read_open(shard, "stats"))
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        let mut stats = OutboxStats::default();
        let mut oldest: Option<outbox_core::DateTime<outbox_core::Utc>> = None;
        for (_, entry) in per_shard.into_iter().flatten() {
            match entry {
                Entry::Message(m) if m.status == MessageStatus::Pending => {
                    stats.pending += 1;
                    oldest =
                        Some(oldest.map_or(m.message.created_at, |o| o.min(m.message.created_at)));
                }
                Entry::Message(m) if m.status == MessageStatus::Parked => stats.parked += 1,
                Entry::Message(_) => {}
                Entry::Poison(_) => stats.parked += 1,
            }
        }
        stats.oldest_pending_age = oldest.map(|ca| {
            let age = now
                .timestamp_micros()
                .saturating_sub(ca.timestamp_micros())
                .max(0);
            Duration::from_micros(u64::try_from(age).unwrap_or(0))
        });
        Ok(stats)
    }

    pub(crate) async fn purge_dispatched(&self, retention: Duration, limit: usize) -> Result<u64> {
        if limit == 0 {
            return Ok(0);
        }
        self.ensure_open().await?;
        let now = self.config.clock.now();
        let Some(cutoff) = chrono::Duration::from_std(retention)
            .ok()
            .and_then(|r| now.checked_sub_signed(r))
        else {
            return Ok(0);
        };
        let mut names = HashMap::new();
        names.insert("#st".to_owned(), STATUS.to_owned());
        names.insert("#dd".to_owned(), DISPATCHED_AT.to_owned());
        let mut values = HashMap::new();
        values.insert(":d".to_owned(), s(MessageStatus::Dispatched.as_str()));
        values.insert(":cutoff".to_owned(), codec::micros(cutoff));
        let doomed = self
            .scan_queue(
                " AND #st = :d AND #dd <= :cutoff",
                names,
                values,
                "purge_dispatched",
            )
            .await?;
        // A slot is never freed while a writer could still choose it: before the last item of
        // a queue goes, its slot is recorded as the shard's high water (writers read it).
        let mut by_shard: BTreeMap<u32, Vec<(u64, Item)>> = BTreeMap::new();
        for item in doomed {
            if let Some(shard) = get_s(&item, PK).and_then(codec::shard_of_pk) {
                by_shard
                    .entry(shard)
                    .or_default()
                    .push((slot_of(&item)?, item));
            }
        }
        let mut keys = Vec::new();
        let mut purged = 0usize;
        'shards: for (shard, mut items) in by_shard {
            let tail = self.read_tail(shard, "purge_dispatched").await?;
            items.sort_by_key(|(slot, _)| *slot);
            for (slot, item) in items {
                if purged >= limit {
                    break 'shards;
                }
                if slot >= tail.slot {
                    let seq = get_n(&item, crate::codec::SEQ)?.unwrap_or(0);
                    self.raise_high_water(shard, slot, seq).await?;
                }
                keys.push(codec::queue_key(shard, slot));
                if let Some(id) = get_s(&item, ID).and_then(|v| v.parse::<MessageId>().ok()) {
                    keys.push(codec::guard_key(&id));
                }
                purged += 1;
            }
        }
        self.delete_many(keys).await?;
        Ok(purged as u64)
    }

    pub(crate) async fn list(&self, query: &ListQuery) -> Result<Vec<StoredMessage>> {
        self.ensure_open().await?;
        let limit = if query.limit == 0 { 100 } else { query.limit };
        let mut filter = String::new();
        let mut names = HashMap::new();
        let mut values = HashMap::new();
        if let Some(t) = &query.topic {
            filter.push_str(" AND #t = :t");
            names.insert("#t".to_owned(), TOPIC.to_owned());
            values.insert(":t".to_owned(), s(t));
        }
        let items = self.scan_queue(&filter, names, values, "list").await?;
        let shard_count = self.config.shard_count;
        let mut all = Vec::with_capacity(items.len());
        for item in &items {
            let Some(shard) = get_s(item, PK).and_then(codec::shard_of_pk) else {
                continue;
            };
            let stored = classify(shard, slot_of(item)?, item).to_stored(shard_count);
            let key_matches = query
                .key
                .as_ref()
                .is_none_or(|k| stored.message.key.as_ref() == Some(k));
            if key_matches && query.status.is_none_or(|st| st == stored.status) {
                all.push(stored);
            }
        }
        all.sort_by_key(|m| m.sequence);
        all.truncate(limit);
        Ok(all)
    }
}
