//! PostgreSQL rows → stored messages (`outbox_postgres::decode_row`, what every read of the
//! outbox table runs): any `jsonb` headers, status and counts give a message or an
//! `Unexpected` error naming the column, never a panic; a decoded message goes through both
//! brokers' encoders.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Result, Unstructured};
use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use outbox_core::ErrorKind;
use outbox_fuzz::{cloud_events, micros, pick_text, publish_encoders};
use outbox_postgres::{MessageRow, decode_row};

const STATUSES: &[&str] = &["pending", "dispatched", "parked", "Parked", ""];
const TYPES: &[&str] = &["event", "command", "reply", "document", ""];

fn time(u: &mut Unstructured<'_>) -> Result<DateTime<Utc>> {
    Ok(DateTime::from_timestamp_micros(micros(u)?).unwrap_or_default())
}

fn opt_time(u: &mut Unstructured<'_>) -> Result<Option<DateTime<Utc>>> {
    Ok(if u.arbitrary()? { Some(time(u)?) } else { None })
}

struct Input {
    row: MessageRow,
    cloud_events: Option<outbox_core::cloudevents::CloudEvents>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let headers = match u.int_in_range(0..=2u8)? {
            0 => {
                serde_json::to_value(u.arbitrary::<BTreeMap<String, String>>()?).unwrap_or_default()
            }
            1 => serde_json::from_str(&u.arbitrary::<String>()?).unwrap_or_default(),
            _ => serde_json::json!({ "n": u.arbitrary::<i64>()?, "s": u.arbitrary::<String>()? }),
        };
        let row = MessageRow {
            sequence: u.arbitrary()?,
            id: uuid::Uuid::from_u128(u.arbitrary()?),
            topic: u.arbitrary()?,
            key: u.arbitrary()?,
            payload: u.arbitrary()?,
            headers,
            content_type: u.arbitrary()?,
            message_type: pick_text(u, TYPES)?,
            correlation_id: u.arbitrary()?,
            reply_to: u.arbitrary()?,
            created_at: time(u)?,
            deliver_after: opt_time(u)?,
            traceparent: u.arbitrary()?,
            tracestate: u.arbitrary()?,
            baggage: u.arbitrary()?,
            status: pick_text(u, STATUSES)?,
            attempts: u.arbitrary()?,
            next_attempt_at: opt_time(u)?,
            last_error: u.arbitrary()?,
            dispatched_at: opt_time(u)?,
            shard: u.arbitrary()?,
        };
        Ok(Input {
            row,
            cloud_events: cloud_events(u)?,
        })
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.row.fmt(f)
    }
}

fuzz_target!(|input: Input| {
    let expected_shard = input.row.shard;
    match decode_row(input.row) {
        Ok(stored) => {
            assert_eq!(i32::try_from(stored.shard).ok(), Some(expected_shard));
            publish_encoders(&stored.message, input.cloud_events.as_ref());
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unexpected, "{e}");
            assert!(e.to_string().contains("stored message"), "{e}");
        }
    }
});
