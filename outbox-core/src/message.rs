//! The message model: what an application sends ([`Message`]) and what a store keeps about it
//! ([`StoredMessage`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::clock::truncate_micros;
use crate::error::{Error, Result};
use crate::otel::{self, TraceContext};
use crate::text::{check_name, check_no_nul, check_text};

/// The content type [`Message::json`] and [`MessageBuilder::json`] set.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The application header carrying a message's type name ([`TypedMessage::TYPE_NAME`], set by
/// [`MessageBuilder::typed`] and [`MessageBuilder::type_name`]). [`Router`](crate::Router)
/// dispatches on it, and transports in CloudEvents mode send it as the event's `type`.
pub const TYPE_NAME_HEADER: &str = "type-name";

/// A payload type with a stable name, so consumers can tell messages apart before decoding
/// them: the name travels in the [`TYPE_NAME_HEADER`] header (and as the CloudEvents `type`).
///
/// ```
/// use outbox_core::{Message, TypedMessage};
/// #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
/// struct OrderPlaced { id: u64 }
/// impl TypedMessage for OrderPlaced { const TYPE_NAME: &'static str = "com.example.order.placed"; }
///
/// let m = Message::typed("orders", &OrderPlaced { id: 42 }).unwrap();
/// assert_eq!(m.type_name(), Some("com.example.order.placed"));
/// assert_eq!(m.decode_json::<OrderPlaced>().unwrap(), OrderPlaced { id: 42 });
/// ```
pub trait TypedMessage: Serialize + DeserializeOwned {
    /// The type name, e.g. `com.example.order.placed`. Stable across versions of the type:
    /// it is how a consumer picks the handler.
    const TYPE_NAME: &'static str;
}

/// Whether `content_type` is JSON: `application/json`, or any `+json` media type
/// (`application/cloudevents+json`, ...), parameters (`; charset=utf-8`) allowed, case-insensitive.
pub fn is_json_content_type(content_type: &str) -> bool {
    let media = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    media == JSON_CONTENT_TYPE || (media.starts_with("application/") && media.ends_with("+json"))
}

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

    /// A message of `topic` whose payload is `value` as JSON, content type `application/json`.
    /// Use [`MessageBuilder::json`] to set a key or other fields as well.
    ///
    /// # Errors
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) when `value` cannot be serialized (a
    /// map with non-string keys, a failing `Serialize` impl); the builder's errors.
    pub fn json<T: Serialize + ?Sized>(topic: impl Into<String>, value: &T) -> Result<Message> {
        Message::builder(topic).json(value).build()
    }

    /// Like [`Message::json`], plus the type name `T::TYPE_NAME` in the [`TYPE_NAME_HEADER`]
    /// header.
    ///
    /// # Errors
    /// As [`Message::json`].
    pub fn typed<T: TypedMessage>(topic: impl Into<String>, value: &T) -> Result<Message> {
        Message::builder(topic).typed(value).build()
    }

    /// The type name from the [`TYPE_NAME_HEADER`] header, if the message has one.
    pub fn type_name(&self) -> Option<&str> {
        self.headers.get(TYPE_NAME_HEADER).map(String::as_str)
    }

    /// The payload decoded from JSON into a `T`.
    ///
    /// # Errors
    /// A permanent [`ErrorKind::Decode`](crate::ErrorKind::Decode) naming the message and the
    /// problem: no content type or one that is not JSON (see [`is_json_content_type`]), or a
    /// payload that is not a valid JSON `T` (the message is not changed; retrying cannot help).
    pub fn decode_json<T: DeserializeOwned>(&self) -> Result<T> {
        let decode_error = |what: String| Error::new(crate::ErrorKind::Decode, what);
        match self.content_type.as_deref() {
            Some(ct) if is_json_content_type(ct) => {}
            Some(ct) => {
                return Err(decode_error(format!(
                    "message {} has content type {ct:?}, not JSON; cannot decode it as {}",
                    self.id,
                    std::any::type_name::<T>()
                )));
            }
            None => {
                return Err(decode_error(format!(
                    "message {} has no content type; expected {JSON_CONTENT_TYPE} to decode it as {}",
                    self.id,
                    std::any::type_name::<T>()
                )));
            }
        }
        serde_json::from_slice(&self.payload).map_err(|e| {
            decode_error(format!(
                "message {} is not a valid JSON {}: {e}",
                self.id,
                std::any::type_name::<T>()
            ))
        })
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

    /// Check the invariants every store relies on, with the shared rules of [`crate::rules`]
    /// (names not empty, short text at most [`MAX_FIELD_LEN`](crate::MAX_FIELD_LEN) bytes, no
    /// NUL in any text). Builders call it; stores call it again on add, because fields are
    /// public.
    ///
    /// # Errors
    /// `InvalidInput` naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        check_name("topic", &self.topic)?;
        if let Some(k) = &self.key {
            check_text("key", k)?;
        }
        for (name, value) in &self.headers {
            check_name("header name", name)?;
            check_no_nul(&format!("header {name:?}"), value)?;
        }
        for (field, v) in [
            ("content_type", &self.content_type),
            ("correlation_id", &self.correlation_id),
            ("reply_to", &self.reply_to),
        ] {
            if let Some(v) = v {
                check_text(field, v)?;
            }
        }
        for (field, v) in [
            ("traceparent", &self.trace.traceparent),
            ("tracestate", &self.trace.tracestate),
            ("baggage", &self.trace.baggage),
        ] {
            if let Some(v) = v {
                check_no_nul(field, v)?;
            }
        }
        if let MessageType::Other(s) = &self.message_type {
            check_name("message_type", s)?;
            if !matches!(MessageType::parse(s), MessageType::Other(_)) {
                return Err(Error::invalid_input(format!(
                    "message_type Other({s:?}) is reserved; use the MessageType variant instead"
                )));
            }
        }
        Ok(())
    }
}

/// Builder for [`Message`]; see [`Message::builder`].
#[derive(Debug, Clone)]
pub struct MessageBuilder {
    msg: Message,
    /// A failure of a fallible step ([`json`](Self::json)), reported by [`build`](Self::build)
    /// (kind and message: the builder stays `Clone`).
    error: Option<(crate::ErrorKind, String)>,
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
                trace: otel::current_trace_context(),
            },
            error: None,
        }
    }

    /// The payload as JSON, content type `application/json`. A serialization failure is
    /// reported by [`build`](Self::build) (as [`ErrorKind::Decode`](crate::ErrorKind::Decode)).
    pub fn json<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => {
                self.msg.payload = Bytes::from(body);
                self.msg.content_type = Some(JSON_CONTENT_TYPE.to_owned());
            }
            Err(e) => {
                self.error.get_or_insert_with(|| {
                    (
                        crate::ErrorKind::Decode,
                        format!(
                            "cannot serialize {} as JSON: {e}",
                            std::any::type_name::<T>()
                        ),
                    )
                });
            }
        }
        self
    }

    /// [`json`](Self::json) plus the type name `T::TYPE_NAME` (see [`TypedMessage`]).
    pub fn typed<T: TypedMessage>(self, value: &T) -> Self {
        self.json(value).type_name(T::TYPE_NAME)
    }

    /// Set the type name (the [`TYPE_NAME_HEADER`] header) by hand.
    pub fn type_name(self, name: impl Into<String>) -> Self {
        self.header(TYPE_NAME_HEADER, name)
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
    /// The whole trace context. With the `opentelemetry` feature, the builder starts with the
    /// context of the current `tracing` span; this replaces it.
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
    /// empty topic, a field over [`MAX_FIELD_LEN`](crate::MAX_FIELD_LEN) bytes, a NUL character
    /// (also in a header value or trace field), an empty header name ([`crate::rules`]);
    /// [`ErrorKind::Decode`](crate::ErrorKind::Decode) when [`json`](Self::json) failed.
    pub fn build(self) -> Result<Message> {
        if let Some((kind, message)) = self.error {
            return Err(Error::new(kind, message));
        }
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
    use crate::text::MAX_FIELD_LEN;

    #[test]
    fn builder_rejects_bad_input_with_field_name() {
        let e = Message::builder("t")
            .header("h", "a\0b")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("header \"h\""), "{e}");
        let e = Message::builder("t")
            .traceparent("0\0")
            .build()
            .unwrap_err();
        assert!(e.to_string().contains("traceparent"), "{e}");
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

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Placed {
        id: u64,
        note: String,
    }
    impl TypedMessage for Placed {
        const TYPE_NAME: &'static str = "test.placed";
    }

    #[test]
    fn json_round_trip_and_typed_header() {
        let v = Placed {
            id: 7,
            note: "ü".into(),
        };
        let m = Message::json("t", &v).unwrap();
        assert_eq!(m.content_type.as_deref(), Some("application/json"));
        assert_eq!(m.type_name(), None);
        assert_eq!(m.decode_json::<Placed>().unwrap(), v);
        let m = Message::builder("t").key("k").typed(&v).build().unwrap();
        assert_eq!(m.key.as_deref(), Some("k"));
        assert_eq!(m.type_name(), Some("test.placed"));
        assert_eq!(m.headers[TYPE_NAME_HEADER], "test.placed");
        assert_eq!(m.decode_json::<Placed>().unwrap(), v);
    }

    #[test]
    fn json_content_types() {
        for ct in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/cloudevents+json",
        ] {
            assert!(is_json_content_type(ct), "{ct}");
        }
        for ct in ["text/plain", "application/xml", "", "json", "text/x+json"] {
            assert!(!is_json_content_type(ct), "{ct}");
        }
    }

    #[test]
    fn decode_mismatches_are_permanent_decode_errors_naming_the_problem() {
        let text = Message::builder("t")
            .payload("{}")
            .content_type("text/plain")
            .build()
            .unwrap();
        let e = text.decode_json::<Placed>().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Decode);
        assert!(!e.is_retryable());
        assert!(e.message().contains("text/plain"), "{e}");
        assert!(e.message().contains(&text.id.to_string()), "{e}");

        let none = Message::builder("t").payload("{}").build().unwrap();
        let e = none.decode_json::<Placed>().unwrap_err();
        assert!(e.message().contains("no content type"), "{e}");

        let wrong_shape = Message::json("t", &serde_json::json!({"id": "x"})).unwrap();
        let e = wrong_shape.decode_json::<Placed>().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Decode);
        assert!(e.message().contains("Placed"), "{e}");
        assert!(e.message().contains("invalid type"), "{e}");

        // Non-string map keys cannot be JSON: the builder reports it at build().
        let bad = std::collections::HashMap::from([((1, 2), 3)]);
        let e = Message::builder("t").json(&bad).build().unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::Decode);
        assert!(e.message().contains("cannot serialize"), "{e}");
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
