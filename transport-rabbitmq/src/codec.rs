//! How a [`Message`] maps to an AMQP message (properties, headers, body) and back.
//!
//! See the crate README, "Message mapping", for the table.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{Error, Message, MessageId, MessageType, Result, TraceContext};

/// Header: the message's topic (the routing key may differ when a route is configured).
pub const HEADER_TOPIC: &str = "x-outbox-topic";
/// Header: the message key, when it has one (an empty key is carried as an empty string).
pub const HEADER_KEY: &str = "x-outbox-key";
/// Header: creation time, microseconds since the Unix epoch (signed 64-bit integer).
pub const HEADER_CREATED_AT: &str = "x-outbox-created-at";
/// Header: `deliver_after`, microseconds since the Unix epoch, when set.
pub const HEADER_DELIVER_AFTER: &str = "x-outbox-deliver-after";
/// Header: application headers that cannot travel under their own name (reserved names, or
/// names over 255 bytes), as an array of `[name, value]` arrays.
pub const HEADER_ESCAPED_HEADERS: &str = "x-outbox-headers";
/// Header: the content type, when it is over 255 bytes (too long for the AMQP property).
pub const HEADER_CONTENT_TYPE: &str = "x-outbox-content-type";
/// Header: the correlation id, when it is over 255 bytes.
pub const HEADER_CORRELATION_ID: &str = "x-outbox-correlation-id";
/// Header: the reply-to address, when it is over 255 bytes.
pub const HEADER_REPLY_TO: &str = "x-outbox-reply-to";
/// Header: the message type, when it is over 255 bytes.
pub const HEADER_TYPE: &str = "x-outbox-type";
/// Header on dead-lettered messages: why the message was dead-lettered (the handler's error).
pub const HEADER_DEAD_LETTER_REASON: &str = "x-outbox-dead-letter-reason";
/// Header on dead-lettered messages: the queue the message was consumed from.
pub const HEADER_DEAD_LETTER_QUEUE: &str = "x-outbox-dead-letter-queue";
/// Header on dead-lettered messages: the delivery attempt that failed last.
pub const HEADER_DEAD_LETTER_ATTEMPTS: &str = "x-outbox-dead-letter-attempts";
/// Header on dead-lettered messages: when it was dead-lettered, microseconds since the epoch.
pub const HEADER_DEAD_LETTERED_AT: &str = "x-outbox-dead-lettered-at";
/// Header set by quorum queues on redeliveries: how many times the message was delivered
/// before (returned by a nack, a reject or a closed channel).
pub const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
/// W3C trace context header names, carried verbatim.
pub const TRACE_HEADERS: [&str; 3] = ["traceparent", "tracestate", "baggage"];

/// Prefix of the CloudEvents attribute headers (AMQP application properties) in binary
/// content mode: `cloudEvents:id`, `cloudEvents:type`, ... (the CloudEvents AMQP binding).
/// Application headers with this prefix travel escaped, so they cannot be mistaken for them.
pub const CLOUD_EVENTS_PREFIX: &str = "cloudEvents:";

/// Longest AMQP short string (property values, header names, routing keys), in bytes.
pub const MAX_SHORT_STRING: usize = 255;

/// AMQP persistent delivery mode.
const PERSISTENT: u8 = 2;

/// Whether an application header travels under its own name: not reserved (`x-` is the
/// prefix RabbitMQ and this crate use for their own headers; the trace names and the
/// CloudEvents prefix are ours) and short enough for an AMQP header name.
fn is_plain_header(name: &str) -> bool {
    let has_prefix = |prefix: &str| {
        name.get(..prefix.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(prefix))
    };
    name.len() <= MAX_SHORT_STRING
        && !has_prefix("x-")
        && !has_prefix(CLOUD_EVENTS_PREFIX)
        && !TRACE_HEADERS.iter().any(|t| t.eq_ignore_ascii_case(name))
}

fn short(field: &str, value: &str) -> Result<ShortString> {
    ShortString::try_new(value).map_err(|_| {
        Error::invalid_input(format!(
            "{field} is {} bytes long; AMQP allows at most {MAX_SHORT_STRING}",
            value.len()
        ))
    })
}

fn long(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes()))
}

fn insert(table: &mut FieldTable, name: &str, value: AMQPValue) {
    // Our own header names are constants well under 255 bytes; plain names were checked.
    if let Ok(name) = ShortString::try_new(name) {
        table.insert(name, value);
    }
}

/// The AMQP properties (with headers) carrying every field of `message` but the payload;
/// with the CloudEvents attributes as `cloudEvents:` headers when `cloud_events` is set (the
/// content type is the AMQP `content-type` property either way).
///
/// # Errors
/// [`ErrorKind::InvalidInput`](outbox_core::ErrorKind::InvalidInput) for an invalid message.
#[doc(hidden)]
pub fn encode(message: &Message, cloud_events: Option<&CloudEvents>) -> Result<BasicProperties> {
    message.validate()?;
    let mut headers = FieldTable::default();
    if let Some(ce) = cloud_events {
        for (name, value) in ce.attributes(message) {
            insert(
                &mut headers,
                &format!("{CLOUD_EVENTS_PREFIX}{name}"),
                long(&value),
            );
        }
    }
    insert(&mut headers, HEADER_TOPIC, long(&message.topic));
    if let Some(key) = &message.key {
        insert(&mut headers, HEADER_KEY, long(key));
    }
    insert(
        &mut headers,
        HEADER_CREATED_AT,
        AMQPValue::LongLongInt(message.created_at.timestamp_micros()),
    );
    if let Some(t) = message.deliver_after {
        insert(
            &mut headers,
            HEADER_DELIVER_AFTER,
            AMQPValue::LongLongInt(t.timestamp_micros()),
        );
    }
    let trace = &message.trace;
    for (name, value) in
        TRACE_HEADERS
            .iter()
            .zip([&trace.traceparent, &trace.tracestate, &trace.baggage])
    {
        if let Some(v) = value {
            insert(&mut headers, name, long(v));
        }
    }
    let mut escaped = FieldArray::default();
    for (name, value) in &message.headers {
        if is_plain_header(name) {
            insert(&mut headers, name, long(value));
        } else {
            escaped.push(AMQPValue::FieldArray(FieldArray::from(vec![
                long(name),
                long(value),
            ])));
        }
    }
    if !escaped.as_slice().is_empty() {
        insert(
            &mut headers,
            HEADER_ESCAPED_HEADERS,
            AMQPValue::FieldArray(escaped),
        );
    }

    let mut props = BasicProperties::default()
        .with_message_id(short("message id", &message.id.to_string())?)
        .with_delivery_mode(PERSISTENT);
    if let Ok(secs) = u64::try_from(message.created_at.timestamp()) {
        props = props.with_timestamp(secs);
    }
    // Properties are short strings; longer values (valid up to 1024 bytes) go to a header.
    let mut text_field =
        |props: BasicProperties,
         value: Option<&str>,
         header: &str,
         set: fn(BasicProperties, ShortString) -> BasicProperties| {
            match value {
                None => props,
                Some(v) => match ShortString::try_new(v) {
                    Ok(s) => set(props, s),
                    Err(_) => {
                        insert(&mut headers, header, long(v));
                        props
                    }
                },
            }
        };
    props = text_field(
        props,
        message.content_type.as_deref(),
        HEADER_CONTENT_TYPE,
        BasicProperties::with_content_type,
    );
    props = text_field(
        props,
        message.correlation_id.as_deref(),
        HEADER_CORRELATION_ID,
        BasicProperties::with_correlation_id,
    );
    props = text_field(
        props,
        message.reply_to.as_deref(),
        HEADER_REPLY_TO,
        BasicProperties::with_reply_to,
    );
    props = text_field(
        props,
        Some(message.message_type.as_str()),
        HEADER_TYPE,
        BasicProperties::with_type,
    );
    Ok(props.with_headers(headers))
}

/// A header value as text: strings as they are, numbers and booleans formatted. A long
/// string that is not UTF-8 has no text ([`decode`] refuses such a message first, see
/// [`check_utf8`]).
fn text(value: &AMQPValue) -> Option<String> {
    Some(match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.to_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        AMQPValue::Float(n) => n.to_string(),
        AMQPValue::Double(n) => n.to_string(),
        _ => return None,
    })
}

/// A header value as a signed integer.
pub(crate) fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        other => text(other).and_then(|s| s.parse().ok()),
    }
}

fn micros(field: &str, value: &AMQPValue) -> Result<DateTime<Utc>> {
    integer(value)
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(|| Error::invalid_input(format!("header {field} is not a timestamp")))
}

/// `InvalidInput` naming the header when a string value in `headers` (nested arrays and
/// tables included) is not UTF-8: header values are text in a [`Message`], and replacing the
/// bytes would hand the consumer something no producer sent.
fn check_utf8(headers: &FieldTable) -> Result<()> {
    fn check(name: &str, value: &AMQPValue) -> Result<()> {
        match value {
            AMQPValue::LongString(s) if std::str::from_utf8(s.as_bytes()).is_err() => Err(
                Error::invalid_input(format!("header {name} is not valid UTF-8")),
            ),
            AMQPValue::FieldArray(items) => {
                items.as_slice().iter().try_for_each(|v| check(name, v))
            }
            AMQPValue::FieldTable(table) => table
                .inner()
                .iter()
                .try_for_each(|(inner, v)| check(&format!("{name}.{}", inner.as_str()), v)),
            _ => Ok(()),
        }
    }
    headers
        .inner()
        .iter()
        .try_for_each(|(name, value)| check(name.as_str(), value))
}

/// The message carried by an AMQP message (the inverse of [`encode`]). Messages published
/// by other clients decode too, as long as they carry a UUID `message_id`: the topic falls
/// back to the routing key and the creation time to the `timestamp` property.
///
/// # Errors
/// [`ErrorKind::InvalidInput`](outbox_core::ErrorKind::InvalidInput) when the message id is
/// missing or not a UUID, a header of ours is malformed, or a header value is not UTF-8.
#[doc(hidden)]
pub fn decode(props: &BasicProperties, payload: &[u8], routing_key: &str) -> Result<Message> {
    let empty = FieldTable::default();
    let headers = props.headers().as_ref().unwrap_or(&empty);
    check_utf8(headers)?;
    let get = |name: &str| headers.inner().get(name);
    let get_text = |name: &str| get(name).and_then(text);

    let id: MessageId = props
        .message_id()
        .as_ref()
        .ok_or_else(|| Error::invalid_input("the AMQP message has no message_id property"))?
        .as_str()
        .parse()?;
    let created_at = match get(HEADER_CREATED_AT) {
        Some(v) => micros(HEADER_CREATED_AT, v)?,
        None => props
            .timestamp()
            .and_then(|s| i64::try_from(s).ok())
            .and_then(|s| DateTime::from_timestamp(s, 0))
            .unwrap_or_default(),
    };
    let deliver_after = get(HEADER_DELIVER_AFTER)
        .map(|v| micros(HEADER_DELIVER_AFTER, v))
        .transpose()?;
    let prop_or_header = |prop: &Option<ShortString>, header: &str| {
        get_text(header).or_else(|| prop.as_ref().map(|s| s.as_str().to_owned()))
    };

    let mut app_headers = BTreeMap::new();
    for (name, value) in headers {
        if is_plain_header(name.as_str())
            && let Some(v) = text(value)
        {
            app_headers.insert(name.as_str().to_owned(), v);
        }
    }
    if let Some(AMQPValue::FieldArray(pairs)) = get(HEADER_ESCAPED_HEADERS) {
        for pair in pairs.as_slice() {
            if let AMQPValue::FieldArray(pair) = pair
                && let [name, value] = pair.as_slice()
                && let (Some(name), Some(value)) = (text(name), text(value))
            {
                app_headers.insert(name, value);
            }
        }
    }

    let message = Message {
        id,
        topic: get_text(HEADER_TOPIC).unwrap_or_else(|| routing_key.to_owned()),
        key: get_text(HEADER_KEY),
        payload: bytes::Bytes::copy_from_slice(payload),
        headers: app_headers,
        content_type: prop_or_header(props.content_type(), HEADER_CONTENT_TYPE),
        message_type: prop_or_header(props.kind(), HEADER_TYPE)
            .map(|t| MessageType::parse(&t))
            .unwrap_or_default(),
        correlation_id: prop_or_header(props.correlation_id(), HEADER_CORRELATION_ID),
        reply_to: prop_or_header(props.reply_to(), HEADER_REPLY_TO),
        created_at,
        deliver_after,
        trace: TraceContext {
            traceparent: get_text(TRACE_HEADERS[0]),
            tracestate: get_text(TRACE_HEADERS[1]),
            baggage: get_text(TRACE_HEADERS[2]),
        },
    };
    Ok(message)
}

/// The delivery attempt (1 for the first delivery) from the quorum queue's
/// `x-delivery-count` header (absent on a first delivery).
pub(crate) fn attempt(props: &BasicProperties) -> u32 {
    let count = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(HEADER_DELIVERY_COUNT))
        .and_then(integer)
        .unwrap_or(0);
    u32::try_from(count.max(0))
        .unwrap_or(u32::MAX)
        .saturating_add(1)
}

/// `props` with the dead-letter headers added.
pub(crate) fn with_dead_letter_headers(
    props: BasicProperties,
    reason: &str,
    queue: &str,
    attempts: u32,
    now: DateTime<Utc>,
) -> BasicProperties {
    let mut headers = props.headers().clone().unwrap_or_default();
    insert(&mut headers, HEADER_DEAD_LETTER_REASON, long(reason));
    insert(&mut headers, HEADER_DEAD_LETTER_QUEUE, long(queue));
    insert(
        &mut headers,
        HEADER_DEAD_LETTER_ATTEMPTS,
        AMQPValue::LongLongInt(i64::from(attempts)),
    );
    insert(
        &mut headers,
        HEADER_DEAD_LETTERED_AT,
        AMQPValue::LongLongInt(now.timestamp_micros()),
    );
    props.with_headers(headers)
}

/// The dead-letter reason: ours ([`with_dead_letter_headers`]), else the broker's
/// (`x-death` reason of the latest death: `rejected`, `expired`, `maxlen`, `delivery_limit`).
pub(crate) fn dead_letter_reason(props: &BasicProperties) -> Option<String> {
    let headers = props.headers().as_ref()?;
    if let Some(reason) = headers
        .inner()
        .get(HEADER_DEAD_LETTER_REASON)
        .and_then(text)
    {
        return Some(reason);
    }
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(death)) => death
                .inner()
                .get("reason")
                .and_then(text)
                .map(|r| format!("dead-lettered by the broker: {r}")),
            _ => None,
        },
        _ => None,
    }
}

/// The dead-letter attempts header, if present.
pub(crate) fn dead_letter_attempts(props: &BasicProperties) -> Option<u32> {
    props
        .headers()
        .as_ref()?
        .inner()
        .get(HEADER_DEAD_LETTER_ATTEMPTS)
        .and_then(integer)
        .and_then(|n| u32::try_from(n).ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_including_colliding_and_long_names() {
        let long_value = "v".repeat(1000);
        let m = Message::builder("orders.created")
            .key("")
            .payload(vec![0u8, 1, 2, 255])
            .header("tenant", "acme")
            .header("x-outbox-key", "app value, not ours")
            .header("traceparent", "app header named like the trace header")
            .header("x-death", "not RabbitMQ's")
            .header("cloudEvents:id", "an application header")
            .header("h".repeat(600), "long name")
            .content_type(long_value.clone())
            .correlation_id("corr")
            .reply_to("replies")
            .message_type(MessageType::Other("t".repeat(300)))
            .deliver_after(Utc::now())
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .tracestate("a=b")
            .baggage("k=v")
            .build()
            .unwrap();
        let props = encode(&m, None).unwrap();
        let back = decode(&props, &m.payload, "ignored").unwrap();
        assert_eq!(back, m);
        assert_eq!(attempt(&props), 1);
        // With CloudEvents attributes: the same message back.
        let ce = CloudEvents::new("/test").unwrap();
        let props = encode(&m, Some(&ce)).unwrap();
        let h = props.headers().as_ref().unwrap().inner();
        assert_eq!(
            h.get("cloudEvents:specversion").and_then(text).as_deref(),
            Some("1.0")
        );
        assert_eq!(
            h.get("cloudEvents:id").and_then(text),
            Some(m.id.to_string())
        );
        assert_eq!(decode(&props, &m.payload, "ignored").unwrap(), m);
    }
}
