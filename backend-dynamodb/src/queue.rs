//! The per-shard queues: reading a shard's tail (writers), its open part from the cursor
//! (relay, stats, requeue), parking undecodable items, and moving the cursor.
//!
//! A shard's queue is one partition, `pk = q#<shard>`, whose sort key is the message's
//! *slot*: 1, 2, 3, ... with no gaps, assigned by the writers (see the README's "Ordering").
//! The partition also holds the shard's meta item at slot [`META_SLOT`]: the cursor (every
//! slot up to it is dispatched or is one of the listed holes) and the holes (parked messages
//! at or below the cursor). Dispatched messages stay in place until TTL deletes them, so a
//! slot is never reused.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::Instant;

use aws_sdk_dynamodb::operation::batch_get_item::BatchGetItemOutput;
use aws_sdk_dynamodb::operation::get_item::GetItemOutput;
use aws_sdk_dynamodb::operation::query::QueryOutput;
use aws_sdk_dynamodb::operation::update_item::UpdateItemOutput;
use aws_sdk_dynamodb::types::{AttributeValue, KeysAndAttributes, ReturnConsumedCapacity};
use outbox_core::{
    DateTime, Error, MessageId, MessageStatus, Ordering, Result, StoredMessage, Utc,
};

use crate::codec::{
    self, CURSOR, CURSOR_SEQ, HIGH_WATER, HIGH_WATER_SEQ, HOLES, ID, Item, KEY, LAST_ERROR,
    META_SLOT, PK, POISON, SEQ, SK, STATUS, get_n, get_s, n, s,
};
use crate::core::{BATCH_ATTEMPTS, BATCH_GET_LIMIT, Core, Known, ShardState};
use crate::meter::{Units, read_units, write_units};
use crate::request::{Meta, build_err, send, send_conditional};

impl ShardState {
    /// Take the meta item's view if it is ahead (another relay moved the cursor).
    fn merge(&mut self, meta: &ShardMeta) {
        if meta.cursor > self.cursor {
            self.cursor = meta.cursor;
            self.cursor_seq = self.cursor_seq.max(meta.cursor_seq);
            self.holes.extend(meta.holes.iter().copied());
            let c = self.cursor;
            self.known.retain(|slot, _| *slot > c);
        }
        if meta.cursor >= self.persisted.0 {
            self.persisted = (meta.cursor, meta.holes.clone());
        }
        self.loaded = true;
    }

    /// Move the cursor over the contiguous slots known to be dispatched or parked.
    fn advance(&mut self) {
        loop {
            let Some(next) = self.cursor.checked_add(1) else {
                return;
            };
            match self.known.get(&next) {
                Some(Known::Done) => {}
                Some(Known::Parked) => {
                    self.holes.insert(next);
                }
                _ => return,
            }
            self.known.remove(&next);
            self.cursor = next;
        }
    }
}

/// A shard's meta item.
#[derive(Debug, Clone, Default)]
pub(crate) struct ShardMeta {
    pub cursor: u64,
    pub cursor_seq: u64,
    pub holes: BTreeSet<u64>,
    /// Highest slot ever used, if a purge deleted the last item.
    pub high_water: u64,
    pub high_water_seq: u64,
}

fn decode_meta(item: &Item) -> Result<ShardMeta> {
    let holes = match item.get(HOLES) {
        Some(AttributeValue::Ns(v)) => v
            .iter()
            .map(|h| {
                h.parse::<u64>()
                    .map_err(|_| Error::unexpected(format!("shard meta: bad hole {h:?}")))
            })
            .collect::<Result<_>>()?,
        _ => BTreeSet::new(),
    };
    Ok(ShardMeta {
        cursor: get_n(item, CURSOR)?.unwrap_or(0),
        cursor_seq: get_n(item, CURSOR_SEQ)?.unwrap_or(0),
        holes,
        high_water: get_n(item, HIGH_WATER)?.unwrap_or(0),
        high_water_seq: get_n(item, HIGH_WATER_SEQ)?.unwrap_or(0),
    })
}

/// Where a shard's queue ends, for a writer.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Tail {
    /// Highest slot ever used (the last item's, or the cursor's if that is higher).
    pub slot: u64,
    /// Highest sequence in the shard.
    pub seq: u64,
}

/// One item of a shard's queue, classified.
#[derive(Debug, Clone)]
pub(crate) enum Entry {
    /// A message that decodes.
    Message(Box<StoredMessage>),
    /// An item that does not decode; parked with `reason`.
    Poison(Box<Poison>),
}

/// An undecodable queue item.
#[derive(Debug, Clone)]
pub(crate) struct Poison {
    pub shard: u32,
    pub slot: u64,
    pub id: Option<MessageId>,
    pub key: Option<String>,
    pub status: Option<MessageStatus>,
    pub reason: String,
    pub seq: u64,
}

impl Entry {
    fn known(&self) -> Known {
        match self {
            Entry::Message(m) => match m.status {
                MessageStatus::Dispatched => Known::Done,
                MessageStatus::Parked => Known::Parked,
                _ => Known::Open,
            },
            Entry::Poison(p) if p.status == Some(MessageStatus::Dispatched) => Known::Done,
            Entry::Poison(_) => Known::Parked,
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        match self {
            Entry::Message(m) => m.sequence,
            Entry::Poison(p) => p.seq,
        }
    }

    /// The stored state to show for this item (`list`, `get`): a poison item shows as parked
    /// with its reason, under its id if readable (else a nil id).
    pub(crate) fn to_stored(&self, shard_count: u32) -> StoredMessage {
        match self {
            Entry::Message(m) => (**m).clone(),
            Entry::Poison(p) => {
                let mut msg = outbox_core::Message::builder("<undecodable>")
                    .build()
                    .unwrap_or_else(|_| unreachable_message());
                msg.id =
                    p.id.unwrap_or_else(|| MessageId::from_uuid(uuid::Uuid::nil()));
                msg.key = p.key.clone();
                StoredMessage {
                    message: msg,
                    status: p.status.unwrap_or(MessageStatus::Parked),
                    attempts: 0,
                    next_attempt_at: None,
                    last_error: Some(p.reason.clone()),
                    dispatched_at: None,
                    shard: p.shard.min(shard_count.saturating_sub(1)),
                    sequence: p.seq,
                }
            }
        }
    }
}

/// Only reached if core's builder rejected a fixed, valid topic.
fn unreachable_message() -> outbox_core::Message {
    outbox_core::Message {
        id: MessageId::new(),
        topic: "<undecodable>".into(),
        key: None,
        payload: bytes::Bytes::new(),
        headers: Default::default(),
        content_type: None,
        message_type: outbox_core::MessageType::Event,
        correlation_id: None,
        reply_to: None,
        created_at: Utc::now(),
        deliver_after: None,
        trace: Default::default(),
    }
}

/// Classify a queue item (never fails: what does not decode is poison).
pub(crate) fn classify(shard: u32, slot: u64, item: &Item) -> Entry {
    match codec::decode(item) {
        Ok(m) => Entry::Message(Box::new(m)),
        Err(e) => Entry::Poison(Box::new(Poison {
            shard,
            slot,
            id: get_s(item, ID).and_then(|v| v.parse().ok()),
            key: get_s(item, KEY).map(str::to_owned),
            status: get_s(item, STATUS).and_then(|v| v.parse().ok()),
            reason: match (get_s(item, STATUS), get_s(item, LAST_ERROR)) {
                (Some("parked"), Some(le)) if item.contains_key(POISON) => le.to_owned(),
                _ => format!(
                    "undecodable queue item (shard {shard}, slot {slot}): {}",
                    e.message()
                ),
            },
            seq: get_n(item, SEQ).ok().flatten().unwrap_or(0),
        })),
    }
}

/// The slot of a queue item.
pub(crate) fn slot_of(item: &Item) -> Result<u64> {
    get_n::<u64>(item, SK)?.ok_or_else(|| Error::unexpected("queue item without a slot"))
}

/// How many of `items` (in slot order) `fetch_pending` could return: due pending messages
/// whose key is not blocked by an earlier parked, undecodable or waiting message (`PerKey`).
fn count_candidates<'a>(
    items: impl Iterator<Item = &'a Item>,
    per_key: bool,
    now_us: i64,
) -> usize {
    let mut blocked: HashSet<&str> = HashSet::new();
    let mut count = 0;
    for i in items {
        let key = get_s(i, KEY);
        let at = |name: &str| get_n::<i64>(i, name).ok().flatten();
        match get_s(i, STATUS) {
            Some("dispatched") => {}
            Some("pending") => {
                if per_key && key.is_some_and(|k| blocked.contains(k)) {
                    continue;
                }
                let due = at(codec::DELIVER_AFTER).is_none_or(|t| t <= now_us)
                    && at(codec::NEXT_ATTEMPT).is_none_or(|t| t <= now_us);
                if due {
                    count += 1;
                } else if per_key {
                    blocked.extend(key);
                }
            }
            _ => {
                if per_key {
                    blocked.extend(key);
                }
            }
        }
    }
    count
}

fn query_units(o: &QueryOutput) -> Units {
    Units::read(read_units(o.items().iter().map(codec::item_size).sum()))
}

impl Core {
    /// A strongly consistent `GetItem` of the outbox table's item at `key` (1 RCU per 4 KB).
    pub(crate) async fn get_strong(&self, key: Item, op: &'static str) -> Result<Option<Item>> {
        let out: GetItemOutput = send(
            &self.meter,
            Meta::read(op),
            self.client
                .get_item()
                .table_name(&self.outbox)
                .set_key(Some(key))
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            |o: &GetItemOutput| Units::read(read_units(o.item().map_or(0, codec::item_size))),
        )
        .await?;
        Ok(out.item)
    }

    /// Where a message is: from memory, else from its id guard (strongly consistent).
    pub(crate) async fn locate(
        &self,
        id: &MessageId,
        op: &'static str,
    ) -> Result<Option<(u32, u64)>> {
        let known = self.located(id);
        if known.is_some() {
            return Ok(known);
        }
        let Some(item) = self.get_strong(codec::guard_key(id), op).await? else {
            return Ok(None);
        };
        let item = &item;
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

    /// Strongly consistent read of where shard `shard`'s queue ends: one `Query` of the two
    /// highest sort keys (the meta item and the last message).
    pub(crate) async fn read_tail(&self, shard: u32, op: &'static str) -> Result<Tail> {
        let out = send(
            &self.meter,
            Meta::read(op),
            self.client
                .query()
                .table_name(&self.outbox)
                .key_condition_expression("#pk = :pk")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_values(":pk", s(codec::queue_pk(shard)))
                .scan_index_forward(false)
                .limit(2)
                .consistent_read(true)
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            query_units,
        )
        .await?;
        let mut tail = Tail::default();
        for item in out.items() {
            let slot = slot_of(item)?;
            if slot == META_SLOT {
                let meta = decode_meta(item)?;
                tail.slot = tail.slot.max(meta.cursor).max(meta.high_water);
                tail.seq = tail.seq.max(meta.cursor_seq).max(meta.high_water_seq);
            } else {
                tail.slot = tail.slot.max(slot);
                tail.seq = tail.seq.max(get_n(item, SEQ).ok().flatten().unwrap_or(0));
            }
        }
        Ok(tail)
    }

    /// Strongly consistent read of a shard's meta item.
    pub(crate) async fn read_meta(&self, shard: u32, op: &'static str) -> Result<ShardMeta> {
        self.get_strong(codec::queue_key(shard, META_SLOT), op)
            .await?
            .as_ref()
            .map(decode_meta)
            .transpose()
            .map(Option::unwrap_or_default)
    }

    /// Strongly consistent BatchGetItem of outbox items, retrying unprocessed keys.
    pub(crate) async fn batch_get(&self, keys: Vec<Item>, op: &'static str) -> Result<Vec<Item>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(BATCH_GET_LIMIT) {
            let mut pending = chunk.to_vec();
            for attempt in 0..BATCH_ATTEMPTS {
                if pending.is_empty() {
                    break;
                }
                if attempt > 0 {
                    tokio::time::sleep(std::time::Duration::from_millis(10 << attempt.min(6)))
                        .await;
                }
                let ka = KeysAndAttributes::builder()
                    .set_keys(Some(std::mem::take(&mut pending)))
                    .consistent_read(true)
                    .build()
                    .map_err(build_err)?;
                let table = self.outbox.clone();
                let out: BatchGetItemOutput = send(
                    &self.meter,
                    Meta::read(op),
                    self.client
                        .batch_get_item()
                        .request_items(&self.outbox, ka)
                        .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                        .send(),
                    |o: &BatchGetItemOutput| {
                        let items = o.responses().and_then(|r| r.get(&table));
                        // Each item of a BatchGetItem is a read of its own.
                        Units::read(items.map_or(0.0, |v| {
                            v.iter().map(|i| read_units(codec::item_size(i))).sum()
                        }))
                    },
                )
                .await?;
                if let Some(items) = out.responses().and_then(|r| r.get(&self.outbox)) {
                    found.extend(items.iter().cloned());
                }
                if let Some(un) = out.unprocessed_keys().and_then(|u| u.get(&self.outbox)) {
                    pending = un.keys().to_vec();
                }
            }
            if !pending.is_empty() {
                return Err(Error::unavailable(format!(
                    "BatchGetItem left {} keys unprocessed after {BATCH_ATTEMPTS} attempts (throttling); retry",
                    pending.len()
                )));
            }
        }
        Ok(found)
    }

    /// Strongly consistent `Query` of a shard's queue above slot `after`, page by page, until
    /// `enough(items so far)` or the end. The meta item comes last, if reached.
    async fn query_after(
        &self,
        shard: u32,
        after: u64,
        page: i32,
        op: &'static str,
        mut enough: impl FnMut(&[Item]) -> bool,
    ) -> Result<Vec<Item>> {
        let mut items = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let out = send(
                &self.meter,
                Meta::read(op),
                self.client
                    .query()
                    .table_name(&self.outbox)
                    .key_condition_expression("#pk = :pk AND #sk > :after")
                    .expression_attribute_names("#pk", PK)
                    .expression_attribute_names("#sk", SK)
                    .expression_attribute_values(":pk", s(codec::queue_pk(shard)))
                    .expression_attribute_values(":after", n(after))
                    .consistent_read(true)
                    .limit(page)
                    .set_exclusive_start_key(start.take())
                    .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                    .send(),
                query_units,
            )
            .await?;
            items.extend(out.items().iter().cloned());
            if enough(&items) {
                return Ok(items);
            }
            match out.last_evaluated_key() {
                Some(k) => start = Some(k.clone()),
                None => return Ok(items),
            }
        }
    }

    /// Park an undecodable item with its reason (once), and count it.
    async fn park_poison(&self, p: &Poison) -> Result<()> {
        let out: Option<UpdateItemOutput> = send_conditional(
            &self.meter,
            "poison",
            self.client
                .update_item()
                .table_name(&self.outbox)
                .set_key(Some(codec::queue_key(p.shard, p.slot)))
                .update_expression("SET #st = :parked, #le = :le, #pz = :t")
                .condition_expression("attribute_exists(#pk) AND attribute_not_exists(#pz)")
                .expression_attribute_names("#pk", PK)
                .expression_attribute_names("#st", STATUS)
                .expression_attribute_names("#le", LAST_ERROR)
                .expression_attribute_names("#pz", POISON)
                .expression_attribute_values(":parked", s(MessageStatus::Parked.as_str()))
                .expression_attribute_values(":le", s(outbox_core::rules::error_text(&p.reason)))
                .expression_attribute_values(":t", AttributeValue::Bool(true))
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            Units::write(write_units(1024)),
        )
        .await?;
        if out.is_some() {
            self.poisoned
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(shard = p.shard, slot = p.slot, reason = %p.reason, "outbox: parked an undecodable queue item");
        }
        Ok(())
    }

    /// Classify items, parking the poison ones that are not parked yet.
    async fn classify_all(&self, shard: u32, items: &[Item]) -> Result<Vec<(u64, Entry)>> {
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            let slot = slot_of(item)?;
            if slot == META_SLOT {
                continue;
            }
            let entry = classify(shard, slot, item);
            if let Entry::Poison(p) = &entry
                && !item.contains_key(POISON)
                && p.status != Some(MessageStatus::Dispatched)
            {
                self.park_poison(p).await?;
            }
            out.push((slot, entry));
        }
        Ok(out)
    }

    /// Every item of a shard that is not dispatched (holes and everything above the cursor),
    /// strongly consistent, in slot order; for `stats`, `requeue` and lookups by id.
    pub(crate) async fn read_open(
        &self,
        shard: u32,
        op: &'static str,
    ) -> Result<Vec<(u64, Entry)>> {
        let meta = self.read_meta(shard, op).await?;
        let keys: Vec<Item> = meta
            .holes
            .iter()
            .map(|h| codec::queue_key(shard, *h))
            .collect();
        let mut items = if keys.is_empty() {
            Vec::new()
        } else {
            self.batch_get(keys, op).await?
        };
        items.extend(
            self.query_after(shard, meta.cursor, 1000, op, |_| false)
                .await?,
        );
        let mut entries = self.classify_all(shard, &items).await?;
        entries.retain(|(_, e)| e.known() != Known::Done);
        entries.sort_by_key(|(slot, _)| *slot);
        Ok(entries)
    }

    /// Record that this store dispatched the message at `(shard, slot)`.
    pub(crate) fn note_dispatched(&self, shard: u32, slot: u64) {
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let st = shards.entry(shard).or_default();
        if slot > st.cursor {
            st.known.insert(slot, Known::Done);
        }
    }

    /// The relay's read of one shard: up to `limit` messages that may be published now, in
    /// slot order, by the rules of `ordering` (see `OutboxStore::fetch_pending`).
    pub(crate) async fn fetch_shard(
        &self,
        shard: u32,
        limit: usize,
        ordering: Ordering,
        now: DateTime<Utc>,
    ) -> Result<Vec<(u64, StoredMessage)>> {
        let loaded = {
            let shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            shards.get(&shard).is_some_and(|s| s.loaded)
        };
        if !loaded {
            let meta = self.read_meta(shard, "fetch_pending").await?;
            let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            let st = shards.entry(shard).or_default();
            st.merge(&meta);
            st.advance();
        }
        let (cursor, holes) = {
            let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            let st = shards.entry(shard).or_default();
            st.advance();
            (st.cursor, st.holes.clone())
        };
        let mut items = if holes.is_empty() {
            Vec::new()
        } else {
            self.batch_get(
                holes.iter().map(|h| codec::queue_key(shard, *h)).collect(),
                "fetch_pending",
            )
            .await?
        };
        let per_key = ordering == Ordering::PerKey;
        let now_us = now.timestamp_micros();
        let page = i32::try_from(limit.clamp(25, 1000)).unwrap_or(1000);
        // Stop reading once `limit` messages could be returned (the exact choice is made
        // below): items waiting for a retry, and messages of keys blocked by an earlier
        // parked or waiting one, never stop the read, so they cannot starve what is behind.
        let hole_items = items.clone();
        let range = self
            .query_after(shard, cursor, page, "fetch_pending", |read| {
                count_candidates(hole_items.iter().chain(read), per_key, now_us) >= limit
            })
            .await?;
        let meta = range
            .iter()
            .find(|i| slot_of(i).ok() == Some(META_SLOT))
            .map(decode_meta)
            .transpose()?;
        items.extend(range);
        let mut entries = self.classify_all(shard, &items).await?;
        entries.sort_by_key(|(slot, _)| *slot);

        let mut blocked: HashSet<String> = HashSet::new();
        let mut chosen = Vec::new();
        for (slot, entry) in &entries {
            match entry {
                Entry::Poison(p) => {
                    if per_key && p.status != Some(MessageStatus::Dispatched) {
                        blocked.extend(p.key.clone());
                    }
                }
                Entry::Message(m) => {
                    let key = m.message.key.as_deref();
                    match m.status {
                        MessageStatus::Dispatched => {}
                        MessageStatus::Parked => {
                            if per_key {
                                blocked.extend(key.map(str::to_owned));
                            }
                        }
                        _ => {
                            if per_key && key.is_some_and(|k| blocked.contains(k)) {
                                continue;
                            }
                            let due = m
                                .message
                                .deliver_after
                                .is_none_or(|t| t.timestamp_micros() <= now_us)
                                && m.next_attempt_at
                                    .is_none_or(|t| t.timestamp_micros() <= now_us);
                            if !due {
                                if per_key {
                                    blocked.extend(key.map(str::to_owned));
                                }
                                continue;
                            }
                            if chosen.len() < limit {
                                chosen.push((*slot, (**m).clone()));
                            }
                        }
                    }
                }
            }
        }
        for (slot, m) in &chosen {
            self.remember(m.message.id, shard, *slot);
        }
        let persist = {
            let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
            let st = shards.entry(shard).or_default();
            if let Some(meta) = &meta {
                st.merge(meta);
            }
            for (slot, entry) in &entries {
                let k = entry.known();
                if st.holes.contains(slot) {
                    if k == Known::Done {
                        st.holes.remove(slot);
                    }
                } else if *slot > st.cursor {
                    st.known.insert(*slot, k);
                    if *slot == st.cursor + 1 {
                        st.cursor_seq = st.cursor_seq.max(entry.seq());
                    }
                }
            }
            let before = st.cursor;
            st.advance();
            if st.cursor > before {
                // The sequence at the new cursor: the highest seen at or below it.
                let c = st.cursor;
                st.cursor_seq = entries
                    .iter()
                    .filter(|(slot, _)| *slot <= c)
                    .map(|(_, e)| e.seq())
                    .max()
                    .unwrap_or(0)
                    .max(st.cursor_seq);
            }
            let changed = (st.cursor, &st.holes) != (st.persisted.0, &st.persisted.1);
            let due = st
                .last_persist
                .is_none_or(|t| t.elapsed() >= self.config.cursor_persist_interval);
            (changed && due).then(|| (st.cursor, st.cursor_seq, st.holes.clone()))
        };
        if let Some((c, cq, holes)) = persist {
            self.persist_meta(shard, c, cq, &holes).await?;
        }
        Ok(chosen)
    }

    /// Record `slot` (with its sequence) as the highest slot ever used in `shard`, before the
    /// item there is deleted, so that writers never take that slot again.
    pub(crate) async fn raise_high_water(&self, shard: u32, slot: u64, seq: u64) -> Result<()> {
        send_conditional(
            &self.meter,
            "purge_dispatched",
            self.client
                .update_item()
                .table_name(&self.outbox)
                .set_key(Some(codec::queue_key(shard, META_SLOT)))
                .update_expression("SET #hw = :hw, #hq = :hq")
                .condition_expression("attribute_not_exists(#hw) OR #hw < :hw")
                .expression_attribute_names("#hw", HIGH_WATER)
                .expression_attribute_names("#hq", HIGH_WATER_SEQ)
                .expression_attribute_values(":hw", n(slot))
                .expression_attribute_values(":hq", n(seq))
                .return_consumed_capacity(ReturnConsumedCapacity::Indexes)
                .send(),
            Units::write(1.0),
        )
        .await
        .map(|_| ())
    }

    /// Write a shard's cursor and holes, if no other store moved the cursor further.
    async fn persist_meta(&self, shard: u32, c: u64, cq: u64, holes: &BTreeSet<u64>) -> Result<()> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.outbox)
            .set_key(Some(codec::queue_key(shard, META_SLOT)))
            .condition_expression("attribute_not_exists(#c) OR #c <= :c")
            .expression_attribute_names("#c", CURSOR)
            .expression_attribute_names("#cq", CURSOR_SEQ)
            .expression_attribute_names("#hl", HOLES)
            .expression_attribute_values(":c", n(c))
            .expression_attribute_values(":cq", n(cq))
            .return_consumed_capacity(ReturnConsumedCapacity::Indexes);
        req = if holes.is_empty() {
            req.update_expression("SET #c = :c, #cq = :cq REMOVE #hl")
        } else {
            req.update_expression("SET #c = :c, #cq = :cq, #hl = :hl")
                .expression_attribute_values(
                    ":hl",
                    AttributeValue::Ns(holes.iter().map(u64::to_string).collect()),
                )
        };
        let applied = send_conditional(
            &self.meter,
            "cursor",
            req.send(),
            Units::write(write_units(64 + holes.len() * 12)),
        )
        .await?
        .is_some();
        let mut shards = self.shards.lock().unwrap_or_else(|p| p.into_inner());
        let st = shards.entry(shard).or_default();
        st.last_persist = Some(Instant::now());
        if applied {
            st.persisted = (c, holes.clone());
        }
        Ok(())
    }
}
