//! The message model: what an application sends ([`Message`]) and what a store keeps about it
//! ([`StoredMessage`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::truncate_micros;
use crate::error::{Error, Result};

/// Longest accepted topic, key, header name, content type or id-like field, in bytes.
pub const MAX_FIELD_LEN: usize = 1024;

/// A message id: a UUIDv7, so ids sort roughly by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageId(Uuid);

impl MessageId {
    /// A fresh, time-ordered id (UUIDv7).
    pub fn new() -> Self {
        MessageId(Uuid::now_v7())
    }

    /// Wrap an existing UUID (for example one read back from storage or a broker header).
    pub fn from_uuid(id: Uuid) -> Self {
        MessageId(id)
    }

    /// The underlying UUID.
    pub fn as_uuid(&self) -> Uuid {
        self.0
    }

    /// The 16 bytes of the UUID, big-endian (sorts like the id).
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl Default for MessageId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for MessageId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Uuid::parse_str(s)
            .map(MessageId)
            .map_err(|e| Error::invalid_input(format!("invalid message id {s:?}: {e}")))
    }
}

/// What a message means to its receiver.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum MessageType {
    /// Something happened (the default).
    #[default]
    Event,
    /// Please do something.
    Command,
    /// An answer to a command or query.
    Reply,
    /// A document or state transfer.
    Document,
    /// Anything else, by name.
    Other(String),
}

impl MessageType {
    /// The name carried in headers and stored in databases.
    pub fn as_str(&self) -> &str {
        match self {
            MessageType::Event => "event",
            MessageType::Command => "command",
            MessageType::Reply => "reply",
            MessageType::Document => "document",
            MessageType::Other(s) => s,
        }
    }

    /// Parse a stored name; unknown names become [`MessageType::Other`].
    pub fn parse(s: &str) -> Self {
        match s {
            "event" => MessageType::Event,
            "command" => MessageType::Command,
            "reply" => MessageType::Reply,
            "document" => MessageType::Document,
            other => MessageType::Other(other.to_owned()),
        }
    }
}

impl fmt::Display for MessageType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// W3C trace context carried with a message and restored on the consumer side.
///
/// Transports carry these as the headers `traceparent`, `tracestate` and `baggage`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct TraceContext {
    /// `traceparent`, e.g. `00-<trace-id>-<span-id>-01`.
    pub traceparent: Option<String>,
    /// `tracestate`, vendor-specific data.
    pub tracestate: Option<String>,
    /// `baggage`, application key-value pairs.
    pub baggage: Option<String>,
}

impl TraceContext {
    /// Whether no field is set.
    pub fn is_empty(&self) -> bool {
        self.traceparent.is_none() && self.tracestate.is_none() && self.baggage.is_none()
    }
}

/// A message an application wants delivered: built with [`Message::builder`], added to an outbox
/// store inside the application's transaction, published by the relay, received by consumers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Unique, time-ordered id. Consumers deduplicate on it.
    pub id: MessageId,
    /// Routing key: the Kafka topic, or the RabbitMQ routing key.
    pub topic: String,
    /// Partition / ordering key. Messages with the same key are published in commit order.
    pub key: Option<String>,
    /// The body, opaque bytes.
    pub payload: Bytes,
    /// Application headers.
    pub headers: BTreeMap<String, String>,
    /// MIME type of the payload, e.g. `application/json`.
    pub content_type: Option<String>,
    /// Event, command, ...
    pub message_type: MessageType,
    /// Id correlating this message with a conversation or request.
    pub correlation_id: Option<String>,
    /// Where replies should go.
    pub reply_to: Option<String>,
    /// When the message was created (microsecond precision).
    pub created_at: DateTime<Utc>,
    /// Not published before this instant (delayed delivery). `None`: as soon as possible.
    pub deliver_after: Option<DateTime<Utc>>,
    /// W3C trace context.
    pub trace: TraceContext,
}

impl Message {
    /// Start building a message for `topic`.
    ///
    /// ```
    /// use outbox_core::Message;
    /// let m = Message::builder("orders.created")
    ///     .key("order-42")
    ///     .payload(br#"{"id":42}"#.to_vec())
    ///     .content_type("application/json")
    ///     .header("tenant", "acme")
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(m.key.as_deref(), Some("order-42"));
    /// ```
    pub fn builder(topic: impl Into<String>) -> MessageBuilder {
        MessageBuilder::new(topic)
    }

    /// Approximate encoded size in bytes: payload plus every text field. Backends add their own
    /// per-item overhead when checking their size limit.
    pub fn encoded_size(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.payload.len()
            + self.topic.len()
            + opt(&self.key)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + opt(&self.content_type)
            + self.message_type.as_str().len()
            + opt(&self.correlation_id)
            + opt(&self.reply_to)
            + opt(&self.trace.traceparent)
            + opt(&self.trace.tracestate)
            + opt(&self.trace.baggage)
            + 16
            + 16
    }

    /// Check `encoded_size()` against a backend's `limit`.
    ///
    /// # Errors
    /// `PayloadTooLarge { size, limit }` naming the message when it is over the limit.
    pub fn check_size(&self, limit: usize) -> Result<()> {
        let size = self.encoded_size();
        if size > limit {
            return Err(Error::new(
                crate::ErrorKind::PayloadTooLarge { size, limit },
                format!(
                    "message {} is {size} bytes (encoded), over the limit of {limit} bytes; \
                     nothing was written",
                    self.id
                ),
            ));
        }
        Ok(())
    }

    /// Check the invariants every store relies on. Builders call it; stores call it again on
    /// add, because fields are public.
    pub fn validate(&self) -> Result<()> {
        check_text("topic", &self.topic, false)?;
        if let Some(k) = &self.key {
            check_text("key", k, true)?;
        }
        for name in self.headers.keys() {
            check_text("header name", name, false)?;
        }
        for (field, v) in [
            ("content_type", &self.content_type),
            ("correlation_id", &self.correlation_id),
            ("reply_to", &self.reply_to),
        ] {
            if let Some(v) = v {
                check_text(field, v, true)?;
            }
        }
        if let MessageType::Other(s) = &self.message_type {
            check_text("message_type", s, false)?;
            if !matches!(MessageType::parse(s), MessageType::Other(_)) {
                return Err(Error::invalid_input(format!(
                    "message_type Other({s:?}) is reserved; use the MessageType variant instead"
                )));
            }
        }
        Ok(())
    }
}

fn check_text(field: &str, v: &str, allow_empty: bool) -> Result<()> {
    if !allow_empty && v.is_empty() {
        return Err(Error::invalid_input(format!("{field} must not be empty")));
    }
    if v.len() > MAX_FIELD_LEN {
        return Err(Error::invalid_input(format!(
            "{field} is {} bytes long; the limit is {MAX_FIELD_LEN}",
            v.len()
        )));
    }
    if v.contains('\0') {
        return Err(Error::invalid_input(format!(
            "{field} must not contain NUL characters"
        )));
    }
    Ok(())
}

/// Builder for [`Message`]; see [`Message::builder`].
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    msg: Message,
}

impl MessageBuilder {
    fn new(topic: impl Into<String>) -> Self {
        MessageBuilder {
            msg: Message {
                id: MessageId::new(),
                topic: topic.into(),
                key: None,
                payload: Bytes::new(),
                headers: BTreeMap::new(),
                content_type: None,
                message_type: MessageType::Event,
                correlation_id: None,
                reply_to: None,
                created_at: truncate_micros(Utc::now()),
                deliver_after: None,
                trace: TraceContext::default(),
            },
        }
    }

    /// Use a given id instead of a fresh UUIDv7.
    pub fn id(mut self, id: MessageId) -> Self {
        self.msg.id = id;
        self
    }
    /// Partition / ordering key.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.msg.key = Some(key.into());
        self
    }
    /// The body.
    pub fn payload(mut self, payload: impl Into<Bytes>) -> Self {
        self.msg.payload = payload.into();
        self
    }
    /// Add one header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.msg.headers.insert(name.into(), value.into());
        self
    }
    /// MIME type of the payload.
    pub fn content_type(mut self, ct: impl Into<String>) -> Self {
        self.msg.content_type = Some(ct.into());
        self
    }
    /// Event (default), command, ...
    pub fn message_type(mut self, t: MessageType) -> Self {
        self.msg.message_type = t;
        self
    }
    /// Correlation id.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.msg.correlation_id = Some(id.into());
        self
    }
    /// Reply address.
    pub fn reply_to(mut self, to: impl Into<String>) -> Self {
        self.msg.reply_to = Some(to.into());
        self
    }
    /// Creation time (defaults to now). Truncated to microseconds.
    pub fn created_at(mut self, t: DateTime<Utc>) -> Self {
        self.msg.created_at = truncate_micros(t);
        self
    }
    /// Do not publish before `t` (delayed delivery). Truncated to microseconds.
    pub fn deliver_after(mut self, t: DateTime<Utc>) -> Self {
        self.msg.deliver_after = Some(truncate_micros(t));
        self
    }
    /// The whole trace context.
    pub fn trace(mut self, trace: TraceContext) -> Self {
        self.msg.trace = trace;
        self
    }
    /// W3C `traceparent`.
    pub fn traceparent(mut self, v: impl Into<String>) -> Self {
        self.msg.trace.traceparent = Some(v.into());
        self
    }
    /// W3C `tracestate`.
    pub fn tracestate(mut self, v: impl Into<String>) -> Self {
        self.msg.trace.tracestate = Some(v.into());
        self
    }
    /// W3C `baggage`.
    pub fn baggage(mut self, v: impl Into<String>) -> Self {
        self.msg.trace.baggage = Some(v.into());
        self
    }

    /// Validate and finish.
    ///
    /// # Errors
    /// [`ErrorKind::InvalidInput`](crate::ErrorKind::InvalidInput) naming the offending field:
    /// empty topic, a field over [`MAX_FIELD_LEN`] bytes, a NUL character, an empty header name.
    pub fn build(self) -> Result<Message> {
        self.msg.validate()?;
        Ok(self.msg)
    }
}

/// Where a stored message is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MessageStatus {
    /// Waiting to be published (possibly after a failed attempt, or a `deliver_after`).
    Pending,
    /// Published and confirmed by the broker.
    Dispatched,
    /// Gave up after `max_attempts` failures (dead letter). Only `requeue` brings it back.
    Parked,
}

impl MessageStatus {
    /// Stable lower-case name used by storage and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            MessageStatus::Pending => "pending",
            MessageStatus::Dispatched => "dispatched",
            MessageStatus::Parked => "parked",
        }
    }
}

impl FromStr for MessageStatus {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pending" => Ok(MessageStatus::Pending),
            "dispatched" => Ok(MessageStatus::Dispatched),
            "parked" => Ok(MessageStatus::Parked),
            other => Err(Error::invalid_input(format!(
                "unknown message status {other:?} (expected pending, dispatched or parked)"
            ))),
        }
    }
}

impl fmt::Display for MessageStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message as an outbox store holds it: the message plus delivery state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// The message exactly as added.
    pub message: Message,
    /// Current state.
    pub status: MessageStatus,
    /// Failed publish attempts so far.
    pub attempts: u32,
    /// Earliest time of the next attempt (set by failures; `None` before the first failure).
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The error of the most recent failed attempt.
    pub last_error: Option<String>,
    /// When the broker confirmed the message.
    pub dispatched_at: Option<DateTime<Utc>>,
    /// Shard, from [`shard_for`] at add time.
    pub shard: u32,
    /// Store-assigned position; per-key order follows it. Opaque, compare only within one store.
    pub sequence: u64,
}

impl StoredMessage {
    /// Whether the message may be published at `now` (pending, `deliver_after` and
    /// `next_attempt_at` reached). Ordering constraints are the store's business.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.status == MessageStatus::Pending
            && self.message.deliver_after.is_none_or(|t| t <= now)
            && self.next_attempt_at.is_none_or(|t| t <= now)
    }
}

/// The shard of a message: a stable, unsigned 64-bit FNV-1a hash of its key (or of its id when
/// it has no key), modulo `shard_count`. Stable across processes, versions and platforms, so
/// every writer and relay agrees on it.
///
/// ```
/// use outbox_core::shard_for;
/// assert_eq!(shard_for(Some("order-1"), &outbox_core::MessageId::new(), 16),
///            shard_for(Some("order-1"), &outbox_core::MessageId::new(), 16));
/// ```
pub fn shard_for(key: Option<&str>, id: &MessageId, shard_count: u32) -> u32 {
    let bytes: &[u8] = match key {
        Some(k) => k.as_bytes(),
        None => id.as_bytes(),
    };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shard_count.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_rejects_bad_input_with_field_name() {
        let e = Message::builder("").build().unwrap_err();
        assert!(e.to_string().contains("topic"), "{e}");
        let e = Message::builder("t")
            .key("k".repeat(MAX_FIELD_LEN + 1))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("key"), "{e}");
        let e = Message::builder("t").header("", "v").build().unwrap_err();
        assert!(e.to_string().contains("header"), "{e}");
        let e = Message::builder("t")
            .message_type(MessageType::Other("event".into()))
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("reserved"), "{e}");
    }

    #[test]
    fn shard_hash_is_stable_and_in_range() {
        // Fixed expectations: changing the hash would strand stored messages in wrong shards.
        let id = MessageId::new();
        assert_eq!(
            shard_for(Some(""), &id, 1_000_000),
            (0xcbf2_9ce4_8422_2325_u64 % 1_000_000) as u32
        );
        assert_eq!(
            shard_for(Some("a"), &id, u32::MAX),
            (0xaf63_dc4c_8601_ec8c_u64 % u64::from(u32::MAX)) as u32
        );
        for i in 0..1000 {
            assert!(shard_for(Some(&format!("k{i}")), &id, 7) < 7);
        }
        assert_eq!(shard_for(None, &id, 0), 0);
    }

    #[test]
    fn ids_are_time_ordered() {
        let a = MessageId::new();
        let b = MessageId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<MessageId>().unwrap(), a);
        assert!("nope".parse::<MessageId>().is_err());
    }
}
