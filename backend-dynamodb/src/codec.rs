//! Items of the outbox table: encoding, decoding and DynamoDB's item-size rules.
//!
//! Attribute names are short on purpose: DynamoDB bills attribute *names* as item bytes.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use aws_sdk_dynamodb::primitives::Blob;
use aws_sdk_dynamodb::types::AttributeValue;
use outbox_core::{
    DateTime, Error, Message, MessageId, MessageStatus, MessageType, Result, StoredMessage,
    TraceContext, Utc,
};

pub(crate) const PK: &str = "pk";
pub(crate) const SK: &str = "sk";
/// The message id on a queue item (its key is the shard and slot).
pub(crate) const ID: &str = "i";
pub(crate) const TOPIC: &str = "t";
pub(crate) const KEY: &str = "k";
pub(crate) const PAYLOAD: &str = "p";
pub(crate) const HEADERS: &str = "h";
pub(crate) const CONTENT_TYPE: &str = "ct";
pub(crate) const MESSAGE_TYPE: &str = "mt";
pub(crate) const CORRELATION: &str = "ci";
pub(crate) const REPLY_TO: &str = "rt";
pub(crate) const CREATED: &str = "ca";
pub(crate) const DELIVER_AFTER: &str = "da";
pub(crate) const TRACEPARENT: &str = "tp";
pub(crate) const TRACESTATE: &str = "ts";
pub(crate) const BAGGAGE: &str = "bg";
pub(crate) const STATUS: &str = "st";
pub(crate) const SHARD: &str = "sh";
pub(crate) const SEQ: &str = "sq";
pub(crate) const ATTEMPTS: &str = "at";
pub(crate) const NEXT_ATTEMPT: &str = "na";
pub(crate) const LAST_ERROR: &str = "le";
pub(crate) const DISPATCHED_AT: &str = "dd";
/// DynamoDB TTL attribute (epoch seconds), on dispatched messages and inbox entries only.
pub(crate) const TTL: &str = "ttl";
/// On a guard item: the slot of the message in its shard's queue.
pub(crate) const SLOT: &str = "sl";
/// On a shard's meta item: the cursor (every slot up to it is dispatched or a hole).
pub(crate) const CURSOR: &str = "c";
/// On a shard's meta item: the sequence of the message at the cursor.
pub(crate) const CURSOR_SEQ: &str = "cq";
/// On a shard's meta item: slots at or below the cursor that are not dispatched (parked).
pub(crate) const HOLES: &str = "hl";
/// On a shard's meta item: the highest slot ever used, kept when `purge_dispatched` deletes
/// the last item of a queue (writers never reuse a slot).
pub(crate) const HIGH_WATER: &str = "hw";
/// On a shard's meta item: the sequence at the high-water slot.
pub(crate) const HIGH_WATER_SEQ: &str = "hq";
/// On the table meta item: the shard count the table was created with.
pub(crate) const SHARD_COUNT: &str = "sc";
/// Set on a queue item that could not be decoded and was parked.
pub(crate) const POISON: &str = "pz";
/// Expiry (epoch microseconds) of inbox entries and leases.
pub(crate) const EXPIRES: &str = "ex";
pub(crate) const OWNER: &str = "ow";
pub(crate) const TOKEN: &str = "tk";

/// Sort key of each shard's meta item (cursor and holes), above every message slot.
pub const META_SLOT: u64 = u64::MAX;
/// Highest slot a message can take in its shard's queue.
pub const MAX_SLOT: u64 = META_SLOT - 1;
/// Partition key of the table's own meta item (shard count, schema version).
pub(crate) const TABLE_META_PK: &str = "#table";
/// Prefix of queue partitions (`q#<shard>`).
pub(crate) const QUEUE_PREFIX: &str = "q#";
/// Prefix of id guard items (`m#<id>`).
pub(crate) const GUARD_PREFIX: &str = "m#";
/// Prefix of wake-up items (`w#<shard>`). `requeue` puts one per shard it made messages
/// pending in, so that the table's stream carries an `INSERT` for the shard: the requeue
/// itself is a `MODIFY`, which the stream listener ignores (dispatching is one too). They
/// expire through the table's TTL.
pub(crate) const WAKE_PREFIX: &str = "w#";

/// Item of the outbox table.
pub(crate) type Item = HashMap<String, AttributeValue>;

/// DynamoDB's item size limit, read conservatively as 400,000 bytes ("400 KB"; AWS accepts about
/// 409,600, moto 405,000).
pub const MAX_ITEM_SIZE: usize = 400_000;
/// Room kept in every message item for what the store writes later (`last_error`, dispatch
/// time, TTL, attempts, index keys).
pub const ITEM_HEADROOM: usize = 2 * 1024;
/// Largest message accepted, measured as the DynamoDB item it becomes.
pub const MAX_MESSAGE_SIZE: usize = MAX_ITEM_SIZE - ITEM_HEADROOM;
/// DynamoDB's limit on actions in one transaction.
pub const MAX_TRANSACTION_ACTIONS: usize = 100;
/// DynamoDB's limit on the aggregate item size of one transaction (4 MB).
pub const MAX_TRANSACTION_BYTES: usize = 4 * 1024 * 1024;

pub(crate) fn s(v: impl Into<String>) -> AttributeValue {
    AttributeValue::S(v.into())
}

pub(crate) fn n(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

pub(crate) fn micros(t: DateTime<Utc>) -> AttributeValue {
    n(t.timestamp_micros())
}

/// Partition key of a shard's queue.
pub(crate) fn queue_pk(shard: u32) -> String {
    format!("{QUEUE_PREFIX}{shard}")
}

/// The shard of a queue partition key (`None` for any other item).
pub(crate) fn shard_of_pk(pk: &str) -> Option<u32> {
    pk.strip_prefix(QUEUE_PREFIX)?.parse().ok()
}

/// The shard named by a wake-up item's partition key (`None` for any other item).
pub(crate) fn shard_of_wake_pk(pk: &str) -> Option<u32> {
    pk.strip_prefix(WAKE_PREFIX)?.parse().ok()
}

/// A wake-up item for `shard`: a new sort key each time (the time in microseconds and 20
/// random bits), so that its put is an `INSERT`; `ttl` is when DynamoDB may delete it.
pub(crate) fn wake_item(shard: u32, now: DateTime<Utc>, ttl: i64) -> Item {
    let nonce = MessageId::new().as_uuid().as_u128() & 0xF_FFFF;
    let mut item = Item::new();
    item.insert(PK.into(), s(format!("{WAKE_PREFIX}{shard}")));
    item.insert(
        SK.into(),
        n(format!("{}{nonce:07}", now.timestamp_micros().max(0))),
    );
    item.insert(TTL.into(), n(ttl.max(0)));
    item
}

/// Partition key of a message's id guard.
pub(crate) fn guard_pk(id: &MessageId) -> String {
    format!("{GUARD_PREFIX}{id}")
}

/// Key of a queue item.
pub(crate) fn queue_key(shard: u32, slot: u64) -> Item {
    let mut k = Item::new();
    k.insert(PK.into(), s(queue_pk(shard)));
    k.insert(SK.into(), n(slot));
    k
}

/// Key of a message's id guard.
pub(crate) fn guard_key(id: &MessageId) -> Item {
    let mut k = Item::new();
    k.insert(PK.into(), s(guard_pk(id)));
    k.insert(SK.into(), n(0));
    k
}

/// Key of the table meta item.
pub(crate) fn table_meta_key() -> Item {
    let mut k = Item::new();
    k.insert(PK.into(), s(TABLE_META_PK));
    k.insert(SK.into(), n(0));
    k
}

/// The id guard of a message at `(shard, slot)`, deleted by TTL at `ttl` (epoch seconds).
pub(crate) fn encode_guard(id: &MessageId, shard: u32, slot: u64, ttl: i64) -> Item {
    let mut item = guard_key(id);
    item.insert(SHARD.into(), n(shard));
    item.insert(SLOT.into(), n(slot));
    item.insert(TTL.into(), n(ttl.max(0)));
    item
}

/// Encode a message as a new pending queue item at `slot` of `shard` with sequence `seq`.
pub(crate) fn encode_new(message: &Message, shard: u32, slot: u64, seq: u64) -> Item {
    let mut item = queue_key(shard, slot);
    item.insert(ID.into(), s(message.id.to_string()));
    item.insert(TOPIC.into(), s(&message.topic));
    if let Some(k) = &message.key {
        item.insert(KEY.into(), s(k));
    }
    item.insert(
        PAYLOAD.into(),
        AttributeValue::B(Blob::new(message.payload.to_vec())),
    );
    if !message.headers.is_empty() {
        item.insert(
            HEADERS.into(),
            AttributeValue::M(
                message
                    .headers
                    .iter()
                    .map(|(k, v)| (k.clone(), s(v)))
                    .collect(),
            ),
        );
    }
    let opt = |item: &mut Item, name: &str, v: &Option<String>| {
        if let Some(v) = v {
            item.insert(name.into(), s(v));
        }
    };
    opt(&mut item, CONTENT_TYPE, &message.content_type);
    if message.message_type != MessageType::Event {
        item.insert(MESSAGE_TYPE.into(), s(message.message_type.as_str()));
    }
    opt(&mut item, CORRELATION, &message.correlation_id);
    opt(&mut item, REPLY_TO, &message.reply_to);
    item.insert(CREATED.into(), micros(message.created_at));
    if let Some(t) = message.deliver_after {
        item.insert(DELIVER_AFTER.into(), micros(t));
    }
    opt(&mut item, TRACEPARENT, &message.trace.traceparent);
    opt(&mut item, TRACESTATE, &message.trace.tracestate);
    opt(&mut item, BAGGAGE, &message.trace.baggage);
    item.insert(STATUS.into(), s(MessageStatus::Pending.as_str()));
    item.insert(SHARD.into(), n(shard));
    item.insert(SEQ.into(), n(seq));
    item
}

fn bad(what: &str) -> Error {
    Error::unexpected(format!("malformed outbox item: {what}"))
}

pub(crate) fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    match item.get(name) {
        Some(AttributeValue::S(v)) => Some(v),
        _ => None,
    }
}

pub(crate) fn get_n<T: FromStr>(item: &Item, name: &str) -> Result<Option<T>> {
    match item.get(name) {
        None => Ok(None),
        Some(AttributeValue::N(v)) => v
            .parse()
            .map(Some)
            .map_err(|_| bad(&format!("attribute {name} is not a valid number: {v:?}"))),
        Some(_) => Err(bad(&format!("attribute {name} is not a number"))),
    }
}

pub(crate) fn get_time(item: &Item, name: &str) -> Result<Option<DateTime<Utc>>> {
    match get_n::<i64>(item, name)? {
        None => Ok(None),
        Some(us) => DateTime::from_timestamp_micros(us)
            .map(Some)
            .ok_or_else(|| bad(&format!("attribute {name} is out of range"))),
    }
}

/// Decode an outbox item. Public (hidden) so the fuzz targets and the bad-input tests can
/// decode items without a table.
///
/// # Errors
/// [`ErrorKind::Unexpected`](outbox_core::ErrorKind::Unexpected) ("malformed outbox item")
/// naming the attribute that is missing or not what this crate writes.
#[doc(hidden)]
pub fn decode(item: &Item) -> Result<StoredMessage> {
    let id: MessageId = get_s(item, ID)
        .ok_or_else(|| bad("no message id"))?
        .parse()
        .map_err(|_| bad("the message id is not a UUID"))?;
    let opt = |name: &str| get_s(item, name).map(str::to_owned);
    let payload = match item.get(PAYLOAD) {
        Some(AttributeValue::B(b)) => bytes::Bytes::from(b.clone().into_inner()),
        None => bytes::Bytes::new(),
        Some(_) => return Err(bad("payload is not binary")),
    };
    let headers: BTreeMap<String, String> = match item.get(HEADERS) {
        Some(AttributeValue::M(m)) => m
            .iter()
            .map(|(k, v)| match v {
                AttributeValue::S(v) => Ok((k.clone(), v.clone())),
                _ => Err(bad("header value is not a string")),
            })
            .collect::<Result<_>>()?,
        None => BTreeMap::new(),
        Some(_) => return Err(bad("headers are not a map")),
    };
    let message = Message {
        id,
        topic: opt(TOPIC).ok_or_else(|| bad("no topic"))?,
        key: opt(KEY),
        payload,
        headers,
        content_type: opt(CONTENT_TYPE),
        message_type: get_s(item, MESSAGE_TYPE).map_or(MessageType::Event, MessageType::parse),
        correlation_id: opt(CORRELATION),
        reply_to: opt(REPLY_TO),
        created_at: get_time(item, CREATED)?.ok_or_else(|| bad("no created_at"))?,
        deliver_after: get_time(item, DELIVER_AFTER)?,
        trace: TraceContext {
            traceparent: opt(TRACEPARENT),
            tracestate: opt(TRACESTATE),
            baggage: opt(BAGGAGE),
        },
    };
    Ok(StoredMessage {
        message,
        status: MessageStatus::from_str(get_s(item, STATUS).ok_or_else(|| bad("no status"))?)
            .map_err(|e| bad(e.message()))?,
        attempts: get_n(item, ATTEMPTS)?.unwrap_or(0),
        next_attempt_at: get_time(item, NEXT_ATTEMPT)?,
        last_error: opt(LAST_ERROR),
        dispatched_at: get_time(item, DISPATCHED_AT)?,
        shard: get_n(item, SHARD)?.ok_or_else(|| bad("no shard"))?,
        sequence: get_n(item, SEQ)?.ok_or_else(|| bad("no sequence"))?,
    })
}

/// Size of an attribute value by DynamoDB's rules (numbers approximated from their digits).
pub fn value_size(v: &AttributeValue) -> usize {
    match v {
        AttributeValue::S(s) => s.len(),
        AttributeValue::N(n) => {
            let digits = n.chars().filter(char::is_ascii_digit).count();
            digits.div_ceil(2) + 1
        }
        AttributeValue::B(b) => b.as_ref().len(),
        AttributeValue::Bool(_) | AttributeValue::Null(_) => 1,
        AttributeValue::Ss(v) => v.iter().map(String::len).sum(),
        AttributeValue::Ns(v) => v
            .iter()
            .map(|n| value_size(&AttributeValue::N(n.clone())))
            .sum(),
        AttributeValue::Bs(v) => v.iter().map(|b| b.as_ref().len()).sum(),
        AttributeValue::M(m) => {
            3 + m
                .iter()
                .map(|(k, v)| k.len() + value_size(v) + 1)
                .sum::<usize>()
        }
        AttributeValue::L(l) => 3 + l.iter().map(|v| value_size(v) + 1).sum::<usize>(),
        _ => 0,
    }
}

/// Size of an item by DynamoDB's rules: attribute names plus values.
pub fn item_size(item: &HashMap<String, AttributeValue>) -> usize {
    item.iter().map(|(k, v)| k.len() + value_size(v)).sum()
}
