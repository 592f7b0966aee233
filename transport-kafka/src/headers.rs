//! How a [`Message`] maps onto a Kafka record: key, value and headers.
//!
//! | record part | carries |
//! |---|---|
//! | key | [`Message::key`] (UTF-8); no key when `None` |
//! | value | [`Message::payload`] |
//! | `outbox.id` | message id (UUID, hyphenated) |
//! | `outbox.type` | message type (`event`, `command`, ...) |
//! | `outbox.key` | `present` when the key is `Some("")` (Kafka does not tell an empty key from none) |
//! | `outbox.content-type` | content type, when set |
//! | `outbox.correlation-id` | correlation id, when set |
//! | `outbox.reply-to` | reply-to, when set |
//! | `outbox.created-at` | creation time, RFC 3339 UTC with microseconds |
//! | `outbox.deliver-after` | delayed-delivery time, same format, when set |
//! | `traceparent`, `tracestate`, `baggage` | W3C trace context, under the standard names |
//! | `app.<name>` | application header `<name>` |
//!
//! With CloudEvents binary content mode enabled
//! ([`KafkaProducer::with_cloud_events`](crate::KafkaProducer::with_cloud_events)), records
//! also carry `ce_id`, `ce_type`, `ce_source`, `ce_specversion`, `ce_time` and, when the
//! message has a content type, `content-type` (the CloudEvents Kafka binding), with the values
//! [`outbox_core::cloudevents`] defines. The consumer ignores them: the `outbox.*` headers
//! still carry every field.
//!
//! Application headers live under `app.`, so no application header name can collide with the
//! transport's own (`traceparent` in [`Message::headers`] is `app.traceparent` on the wire).
//! Dead-lettered records additionally carry the `outbox.dlq.*` headers (see
//! [`DeadLetter`](crate::DeadLetter)).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{Error, Message, MessageId, MessageType, Result, TraceContext};
use rdkafka::message::{Header, Headers, OwnedHeaders};

/// Header of the message id.
pub const ID: &str = "outbox.id";
/// Header of the message type.
pub const TYPE: &str = "outbox.type";
/// Header marking a present, empty key.
pub const KEY: &str = "outbox.key";
/// Header of the content type.
pub const CONTENT_TYPE: &str = "outbox.content-type";
/// Header of the correlation id.
pub const CORRELATION_ID: &str = "outbox.correlation-id";
/// Header of the reply address.
pub const REPLY_TO: &str = "outbox.reply-to";
/// Header of the creation time.
pub const CREATED_AT: &str = "outbox.created-at";
/// Header of the delayed-delivery time.
pub const DELIVER_AFTER: &str = "outbox.deliver-after";
/// W3C `traceparent`.
pub const TRACEPARENT: &str = "traceparent";
/// W3C `tracestate`.
pub const TRACESTATE: &str = "tracestate";
/// W3C `baggage`.
pub const BAGGAGE: &str = "baggage";
/// Prefix of the CloudEvents attribute headers (`ce_id`, `ce_type`, ...).
pub const CE_PREFIX: &str = "ce_";
/// The CloudEvents `datacontenttype` header of the Kafka binding.
pub const CE_CONTENT_TYPE: &str = "content-type";
/// Prefix of application headers.
pub const APP_PREFIX: &str = "app.";
/// Dead letters: why the message was dead-lettered.
pub const DLQ_REASON: &str = "outbox.dlq.reason";
/// Dead letters: the topic the message was consumed from.
pub const DLQ_TOPIC: &str = "outbox.dlq.topic";
/// Dead letters: its partition there.
pub const DLQ_PARTITION: &str = "outbox.dlq.partition";
/// Dead letters: its offset there.
pub const DLQ_OFFSET: &str = "outbox.dlq.offset";
/// Dead letters: the delivery attempt that dead-lettered it.
pub const DLQ_ATTEMPT: &str = "outbox.dlq.attempt";
/// Dead letters: the consumer group that dead-lettered it.
pub const DLQ_GROUP: &str = "outbox.dlq.group";

/// Raw record headers, in order (a value may be null).
#[doc(hidden)]
pub type RawHeaders = Vec<(String, Option<Vec<u8>>)>;

pub(crate) fn format_time(t: DateTime<Utc>) -> String {
    outbox_core::cloudevents::format_time(t)
}

fn parse_time(name: &str, v: &str) -> Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(v)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| {
            Error::invalid_input(format!(
                "header {name} is not an RFC 3339 time ({v:?}): {e}"
            ))
        })
}

/// The headers of `message` as a record carries them; with the CloudEvents attributes when
/// `cloud_events` is set.
#[doc(hidden)]
pub fn encode(message: &Message, cloud_events: Option<&CloudEvents>) -> RawHeaders {
    let mut h: RawHeaders = Vec::with_capacity(14 + message.headers.len());
    let mut put = |k: &str, v: &str| h.push((k.to_owned(), Some(v.as_bytes().to_vec())));
    put(ID, &message.id.to_string());
    put(TYPE, message.message_type.as_str());
    if message.key.as_deref() == Some("") {
        put(KEY, "present");
    }
    for (name, v) in [
        (CONTENT_TYPE, &message.content_type),
        (CORRELATION_ID, &message.correlation_id),
        (REPLY_TO, &message.reply_to),
        (TRACEPARENT, &message.trace.traceparent),
        (TRACESTATE, &message.trace.tracestate),
        (BAGGAGE, &message.trace.baggage),
    ] {
        if let Some(v) = v {
            put(name, v);
        }
    }
    put(CREATED_AT, &format_time(message.created_at));
    if let Some(t) = message.deliver_after {
        put(DELIVER_AFTER, &format_time(t));
    }
    for (k, v) in &message.headers {
        put(&format!("{APP_PREFIX}{k}"), v);
    }
    if let Some(ce) = cloud_events {
        for (name, value) in ce.attributes(message) {
            put(&format!("{CE_PREFIX}{name}"), &value);
        }
        if let Some(ct) = &message.content_type {
            put(CE_CONTENT_TYPE, ct);
        }
    }
    h
}

/// Bytes of key, value and headers: what the size limit is checked against.
pub(crate) fn record_size(key: Option<&[u8]>, payload: &[u8], headers: &RawHeaders) -> usize {
    key.map_or(0, <[u8]>::len)
        + payload.len()
        + headers
            .iter()
            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

pub(crate) fn to_owned_headers(raw: &RawHeaders) -> OwnedHeaders {
    raw.iter()
        .fold(OwnedHeaders::new_with_capacity(raw.len()), |acc, (k, v)| {
            acc.insert(Header {
                key: k.as_str(),
                value: v.as_deref(),
            })
        })
}

pub(crate) fn from_record_headers<H: Headers>(headers: Option<&H>) -> RawHeaders {
    headers
        .map(|h| {
            h.iter()
                .map(|hd| (hd.key.to_owned(), hd.value.map(<[u8]>::to_vec)))
                .collect()
        })
        .unwrap_or_default()
}

/// The last value of header `name`, as UTF-8.
pub(crate) fn get<'a>(raw: &'a RawHeaders, name: &str) -> Result<Option<&'a str>> {
    match raw.iter().rev().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, None)) => Ok(Some("")),
        Some((_, Some(v))) => std::str::from_utf8(v)
            .map(Some)
            .map_err(|_| Error::invalid_input(format!("header {name} is not valid UTF-8"))),
    }
}

/// Rebuild the message of a record of `topic`.
///
/// # Errors
/// `InvalidInput` naming the problem: no `outbox.id` (not published by this crate), a
/// malformed id or time, non-UTF-8 key or header values, or a message failing
/// [`Message::validate`].
#[doc(hidden)]
pub fn decode(
    topic: &str,
    key: Option<&[u8]>,
    payload: Option<&[u8]>,
    raw: &RawHeaders,
) -> Result<Message> {
    let id: MessageId = get(raw, ID)?
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "record has no {ID} header (not published by outbox-kafka)"
            ))
        })?
        .parse()?;
    let key = match key {
        Some(k) if !k.is_empty() => Some(
            String::from_utf8(k.to_vec())
                .map_err(|_| Error::invalid_input("record key is not valid UTF-8"))?,
        ),
        _ if get(raw, KEY)?.is_some() => Some(String::new()),
        _ => None,
    };
    let text = |name: &str| get(raw, name).map(|v| v.map(str::to_owned));
    let created_at = match get(raw, CREATED_AT)? {
        Some(v) => parse_time(CREATED_AT, v)?,
        None => {
            return Err(Error::invalid_input(format!(
                "record has no {CREATED_AT} header"
            )));
        }
    };
    let deliver_after = get(raw, DELIVER_AFTER)?
        .map(|v| parse_time(DELIVER_AFTER, v))
        .transpose()?;
    let mut headers = BTreeMap::new();
    for (k, _) in raw {
        if let Some(name) = k.strip_prefix(APP_PREFIX)
            && let Some(v) = get(raw, k)?
        {
            headers.insert(name.to_owned(), v.to_owned());
        }
    }
    let message = Message {
        id,
        topic: topic.to_owned(),
        key,
        payload: payload
            .map(bytes::Bytes::copy_from_slice)
            .unwrap_or_default(),
        headers,
        content_type: text(CONTENT_TYPE)?,
        message_type: MessageType::parse(get(raw, TYPE)?.unwrap_or("event")),
        correlation_id: text(CORRELATION_ID)?,
        reply_to: text(REPLY_TO)?,
        created_at,
        deliver_after,
        trace: TraceContext {
            traceparent: text(TRACEPARENT)?,
            tracestate: text(TRACESTATE)?,
            baggage: text(BAGGAGE)?,
        },
    };
    message.validate()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_through_headers() {
        let m = Message::builder("t")
            .key("")
            .payload("p")
            .header("traceparent", "app-level")
            .header("tenant", "acme")
            .content_type("")
            .correlation_id("c")
            .reply_to("r")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .tracestate("v=1")
            .baggage("a=b")
            .deliver_after(Utc::now())
            .message_type(MessageType::Other("custom".into()))
            .build()
            .unwrap();
        let raw = encode(&m, None);
        let back = decode("t", Some(b""), Some(b"p"), &raw).unwrap();
        assert_eq!(back, m);
        let no_key = Message::builder("t").build().unwrap();
        let back = decode("t", None, None, &encode(&no_key, None)).unwrap();
        assert_eq!(back, no_key);
        // CloudEvents headers are extra: the message decodes unchanged.
        let ce = CloudEvents::new("/test").unwrap();
        let raw = encode(&m, Some(&ce));
        assert_eq!(get(&raw, "ce_specversion").unwrap(), Some("1.0"));
        assert_eq!(get(&raw, "ce_source").unwrap(), Some("/test"));
        assert_eq!(get(&raw, CE_CONTENT_TYPE).unwrap(), Some(""));
        assert_eq!(decode("t", Some(b""), Some(b"p"), &raw).unwrap(), m);
    }

    #[test]
    fn foreign_records_are_rejected_with_a_reason() {
        let e = decode("t", None, Some(b"x"), &Vec::new()).unwrap_err();
        assert!(e.to_string().contains(ID), "{e}");
        let raw = vec![(ID.to_owned(), Some(b"nope".to_vec()))];
        assert!(decode("t", None, None, &raw).is_err());
    }
}
