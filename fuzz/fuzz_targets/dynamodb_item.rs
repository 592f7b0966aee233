//! DynamoDB items → stored messages (`outbox_dynamodb::decode_item`, what every read of
//! the outbox table runs) and DynamoDB's item-size rules: any attribute map gives a message
//! or an `Unexpected` "malformed outbox item" error naming the attribute, never a panic; a
//! decoded message goes through both brokers' encoders.

#![no_main]

use std::collections::HashMap;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use outbox_core::ErrorKind;
use outbox_dynamodb::aws_sdk_dynamodb::primitives::Blob;
use outbox_dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use outbox_dynamodb::{decode_item, item_size};
use outbox_fuzz::{cloud_events, id_text, micros, pick_text, publish_encoders};

/// The attribute names of an outbox item (see backend-dynamodb/src/codec.rs).
const NAMES: &[&str] = &[
    "pk", "sk", "i", "t", "k", "p", "h", "ct", "mt", "ci", "rt", "ca", "da", "tp", "ts", "bg",
    "st", "sh", "sq", "at", "na", "le", "dd", "ttl", "pz",
];
const STATUSES: &[&str] = &["pending", "dispatched", "parked", ""];

fn value(u: &mut Unstructured<'_>, name: &str, depth: u32) -> Result<AttributeValue> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 | 1 => AttributeValue::S(match name {
            "i" => id_text(u)?,
            "st" => pick_text(u, STATUSES)?,
            _ => u.arbitrary()?,
        }),
        2 | 3 => AttributeValue::N(match u.int_in_range(0..=2u8)? {
            0 => micros(u)?.to_string(),
            1 => u.arbitrary::<u64>()?.to_string(),
            _ => pick_text(
                u,
                &["-1", "1e3", "1.5", "NaN", "", "99999999999999999999999"],
            )?,
        }),
        4 => AttributeValue::B(Blob::new(u.arbitrary::<Vec<u8>>()?)),
        5 => AttributeValue::Bool(u.arbitrary()?),
        6 => AttributeValue::Null(u.arbitrary()?),
        7 if depth < 3 => {
            let n = u.int_in_range(0..=4u8)?;
            let mut m = HashMap::new();
            for _ in 0..n {
                let k: String = u.arbitrary()?;
                let v = value(u, "", depth + 1)?;
                m.insert(k, v);
            }
            AttributeValue::M(m)
        }
        8 if depth < 3 => {
            let n = u.int_in_range(0..=4u8)?;
            let mut l = Vec::new();
            for _ in 0..n {
                l.push(value(u, "", depth + 1)?);
            }
            AttributeValue::L(l)
        }
        _ => AttributeValue::Ss(u.arbitrary()?),
    })
}

struct Input {
    item: HashMap<String, AttributeValue>,
    cloud_events: Option<outbox_core::cloudevents::CloudEvents>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let mut item = HashMap::new();
        // Start from a sound item most of the time, so decoding gets past the first checks.
        if u.ratio(3, 4)? {
            item.insert("i".into(), AttributeValue::S(id_text(u)?));
            item.insert("t".into(), AttributeValue::S(u.arbitrary()?));
            item.insert("ca".into(), AttributeValue::N(micros(u)?.to_string()));
            item.insert("st".into(), AttributeValue::S(pick_text(u, STATUSES)?));
            item.insert(
                "sh".into(),
                AttributeValue::N(u.arbitrary::<u32>()?.to_string()),
            );
            item.insert(
                "sq".into(),
                AttributeValue::N(u.arbitrary::<u64>()?.to_string()),
            );
        }
        let n = u.int_in_range(0..=12u8)?;
        for _ in 0..n {
            let name = pick_text(u, NAMES)?;
            let v = value(u, &name, 0)?;
            item.insert(name, v);
        }
        Ok(Input {
            item,
            cloud_events: cloud_events(u)?,
        })
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.item.fmt(f)
    }
}

fuzz_target!(|input: Input| {
    let _ = item_size(&input.item);
    match decode_item(&input.item) {
        Ok(stored) => publish_encoders(&stored.message, input.cloud_events.as_ref()),
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::Unexpected, "{e}");
        }
    }
});
