//! SQLite rows → stored messages (`outbox_sqlite::decode_row`, what every read of the
//! outbox table runs): any column values give a message or an `Unexpected` error naming the
//! column, never a panic; a decoded message goes through both brokers' encoders.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use outbox_core::ErrorKind;
use outbox_fuzz::{cloud_events, id_text, micros, pick_text, publish_encoders};
use outbox_sqlite::{MessageRow, decode_row};

const STATUSES: &[&str] = &["pending", "dispatched", "parked", "PENDING", ""];
const TYPES: &[&str] = &["event", "command", "reply", "document", ""];

fn opt_micros(u: &mut Unstructured<'_>) -> Result<Option<i64>> {
    Ok(if u.arbitrary()? {
        Some(micros(u)?)
    } else {
        None
    })
}

struct Input {
    row: MessageRow,
    cloud_events: Option<outbox_core::cloudevents::CloudEvents>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let headers = if u.ratio(3, 4)? {
            let map: BTreeMap<String, String> = u.arbitrary()?;
            serde_json::to_string(&map).unwrap_or_default()
        } else {
            pick_text(u, &["{}", "[]", "null", "{\"a\":1}", "{\"a\":null}", ""])?
        };
        let row = MessageRow {
            sequence: u.arbitrary()?,
            id: id_text(u)?,
            topic: u.arbitrary()?,
            key: u.arbitrary()?,
            payload: u.arbitrary()?,
            headers,
            content_type: u.arbitrary()?,
            message_type: pick_text(u, TYPES)?,
            correlation_id: u.arbitrary()?,
            reply_to: u.arbitrary()?,
            created_at: micros(u)?,
            deliver_after: opt_micros(u)?,
            traceparent: u.arbitrary()?,
            tracestate: u.arbitrary()?,
            baggage: u.arbitrary()?,
            status: pick_text(u, STATUSES)?,
            attempts: u.arbitrary()?,
            next_attempt_at: opt_micros(u)?,
            last_error: u.arbitrary()?,
            dispatched_at: opt_micros(u)?,
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
    let expected_sequence = input.row.sequence;
    match decode_row(input.row) {
        Ok(stored) => {
            assert_eq!(i64::try_from(stored.sequence).ok(), Some(expected_sequence));
            publish_encoders(&stored.message, input.cloud_events.as_ref());
        }
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unexpected, "{e}");
            assert!(e.to_string().contains("stored"), "{e}");
        }
    }
});
