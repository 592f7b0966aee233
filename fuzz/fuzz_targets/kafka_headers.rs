//! Kafka records → messages (`outbox_kafka::headers::decode`, what the consumer runs on
//! every record): any key, value and headers (names, null values, non-UTF-8 bytes,
//! duplicates) give a message or an `InvalidInput` error, never a panic. A decoded message
//! encodes (with or without the CloudEvents `ce_*` headers) and decodes back to itself.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use outbox_core::{ErrorKind, truncate_micros};
use outbox_fuzz::{cloud_events, id_text, pick_text};
use outbox_kafka::headers::{self, RawHeaders};

const NAMES: &[&str] = &[
    headers::ID,
    headers::TYPE,
    headers::KEY,
    headers::CONTENT_TYPE,
    headers::CORRELATION_ID,
    headers::REPLY_TO,
    headers::CREATED_AT,
    headers::DELIVER_AFTER,
    headers::TRACEPARENT,
    headers::TRACESTATE,
    headers::BAGGAGE,
    "app.a",
    "app.",
    "app.traceparent",
    "ce_id",
    "ce_time",
    headers::CE_CONTENT_TYPE,
    headers::DLQ_REASON,
];

fn header_value(u: &mut Unstructured<'_>, name: &str) -> Result<Option<Vec<u8>>> {
    if u.ratio(1, 10)? {
        return Ok(None);
    }
    Ok(Some(match (name, u.int_in_range(0..=3u8)?) {
        (headers::ID, 0..=2) => id_text(u)?.into_bytes(),
        (headers::CREATED_AT | headers::DELIVER_AFTER, 0..=2) => pick_text(
            u,
            &[
                "2026-12-01T15:00:00.123456Z",
                "2026-12-01T15:00:00.123456789Z",
                "2026-12-01T15:00:00+14:00",
                "+262143-12-31T23:59:59Z",
                "9999-12-31T23:59:60Z",
                "1970-01-01T00:00:00Z",
            ],
        )?
        .into_bytes(),
        (_, 0..=1) => u.arbitrary::<String>()?.into_bytes(),
        _ => u.arbitrary()?,
    }))
}

struct Input {
    topic: String,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    raw: RawHeaders,
    cloud_events: Option<outbox_core::cloudevents::CloudEvents>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let mut raw = RawHeaders::new();
        if u.ratio(3, 4)? {
            raw.push((headers::ID.into(), Some(id_text(u)?.into_bytes())));
            raw.push((
                headers::CREATED_AT.into(),
                Some(b"2026-12-01T15:00:00.000001Z".to_vec()),
            ));
        }
        let n = u.int_in_range(0..=12u8)?;
        for _ in 0..n {
            let name = pick_text(u, NAMES)?;
            let value = header_value(u, &name)?;
            raw.push((name, value));
        }
        Ok(Input {
            topic: pick_text(u, &["orders", ""])?,
            key: u.arbitrary()?,
            payload: u.arbitrary()?,
            raw,
            cloud_events: cloud_events(u)?,
        })
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("topic", &self.topic)
            .field("key", &self.key)
            .field("payload", &self.payload)
            .field("raw", &self.raw)
            .finish()
    }
}

fuzz_target!(|input: Input| {
    let decoded = headers::decode(
        &input.topic,
        input.key.as_deref(),
        input.payload.as_deref(),
        &input.raw,
    );
    let message = match decoded {
        Ok(m) => m,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            return;
        }
    };
    // The wire carries microseconds; a record written by another producer may carry more.
    let exact = message.created_at == truncate_micros(message.created_at)
        && message
            .deliver_after
            .is_none_or(|t| t == truncate_micros(t));
    let raw = headers::encode(&message, input.cloud_events.as_ref());
    let key = message.key.as_deref().map(str::as_bytes);
    match headers::decode(&message.topic, key, Some(&message.payload), &raw) {
        Ok(again) if exact => assert_eq!(again, message, "round trip"),
        Ok(_) => {}
        Err(e) => panic!("a decoded message does not decode after encoding: {e}"),
    }
});
