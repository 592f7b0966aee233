//! AMQP messages → messages (`outbox_rabbitmq::decode_properties`, what the consumer runs
//! on every delivery): basic properties parsed from wire bytes by the AMQP parser lapin uses,
//! or built from arbitrary header tables (every AMQP value type, nested arrays, reserved
//! `x-`, `cloudEvents:` and trace names), give a message or an `InvalidInput` error, never a
//! panic. A decoded message that is valid encodes (with or without the CloudEvents
//! attributes) and decodes back to itself.

#![no_main]

use arbitrary::{Arbitrary, Result, Unstructured};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, DecimalValue, FieldArray, FieldTable, LongString, ShortString};
use libfuzzer_sys::fuzz_target;
use outbox_core::ErrorKind;
use outbox_fuzz::{cloud_events, id_text, pick_text};
use outbox_rabbitmq::{decode_properties, encode_properties};

const NAMES: &[&str] = &[
    outbox_rabbitmq::HEADER_TOPIC,
    outbox_rabbitmq::HEADER_KEY,
    outbox_rabbitmq::HEADER_CREATED_AT,
    outbox_rabbitmq::HEADER_DELIVER_AFTER,
    outbox_rabbitmq::HEADER_ESCAPED_HEADERS,
    outbox_rabbitmq::HEADER_CONTENT_TYPE,
    outbox_rabbitmq::HEADER_CORRELATION_ID,
    outbox_rabbitmq::HEADER_REPLY_TO,
    outbox_rabbitmq::HEADER_TYPE,
    outbox_rabbitmq::HEADER_DELIVERY_COUNT,
    "traceparent",
    "TraceParent",
    "tracestate",
    "baggage",
    "cloudEvents:id",
    "x-custom",
    "a",
];

fn short(u: &mut Unstructured<'_>, known: &[&str]) -> Result<ShortString> {
    let s = pick_text(u, known)?;
    Ok(ShortString::try_new(s).unwrap_or_default())
}

fn value(u: &mut Unstructured<'_>, depth: u32) -> Result<AMQPValue> {
    Ok(match u.int_in_range(0..=17u8)? {
        0 => AMQPValue::Boolean(u.arbitrary()?),
        1 => AMQPValue::ShortShortInt(u.arbitrary()?),
        2 => AMQPValue::ShortShortUInt(u.arbitrary()?),
        3 => AMQPValue::ShortInt(u.arbitrary()?),
        4 => AMQPValue::ShortUInt(u.arbitrary()?),
        5 => AMQPValue::LongInt(u.arbitrary()?),
        6 => AMQPValue::LongUInt(u.arbitrary()?),
        7 | 8 => AMQPValue::LongLongInt(match u.int_in_range(0..=2u8)? {
            0 => 1_764_000_000_000_000 + i64::from(u.arbitrary::<i32>()?),
            1 => *u.choose(&[i64::MIN, i64::MAX, -1, 0])?,
            _ => u.arbitrary()?,
        }),
        9 => AMQPValue::Float(u.arbitrary()?),
        10 => AMQPValue::Double(u.arbitrary()?),
        11 => AMQPValue::DecimalValue(DecimalValue {
            scale: u.arbitrary()?,
            value: u.arbitrary()?,
        }),
        12 => AMQPValue::ShortString(short(u, &[])?),
        13 => AMQPValue::LongString(LongString::from(u.arbitrary::<Vec<u8>>()?)),
        14 if depth < 3 => {
            let n = u.int_in_range(0..=4u8)?;
            let mut a = Vec::new();
            for _ in 0..n {
                a.push(value(u, depth + 1)?);
            }
            AMQPValue::FieldArray(FieldArray::from(a))
        }
        15 => AMQPValue::Timestamp(u.arbitrary()?),
        16 if depth < 3 => AMQPValue::FieldTable(table(u, depth + 1)?),
        _ => AMQPValue::Void,
    })
}

fn table(u: &mut Unstructured<'_>, depth: u32) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    let n = u.int_in_range(0..=10u8)?;
    for _ in 0..n {
        let name = short(u, NAMES)?;
        let v = if name.as_str() == outbox_rabbitmq::HEADER_ESCAPED_HEADERS && u.arbitrary()? {
            // The escaped-headers array: [[name, value], ...], sometimes malformed.
            let n = u.int_in_range(0..=3u8)?;
            let mut pairs = Vec::new();
            for _ in 0..n {
                let pair = vec![value(u, depth + 1)?, value(u, depth + 1)?];
                pairs.push(AMQPValue::FieldArray(FieldArray::from(pair)));
            }
            AMQPValue::FieldArray(FieldArray::from(pairs))
        } else {
            value(u, depth)?
        };
        t.insert(name, v);
    }
    Ok(t)
}

fn opt_short(u: &mut Unstructured<'_>, known: &[&str]) -> Result<Option<ShortString>> {
    Ok(if u.arbitrary()? {
        Some(short(u, known)?)
    } else {
        None
    })
}

struct Input {
    props: BasicProperties,
    payload: Vec<u8>,
    routing_key: String,
    cloud_events: Option<outbox_core::cloudevents::CloudEvents>,
}

impl<'a> Arbitrary<'a> for Input {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let props = if u.ratio(1, 4)? {
            // Wire bytes through the parser lapin runs on every content header.
            let bytes: Vec<u8> = u.arbitrary()?;
            match lapin::protocol::basic::parse_properties(bytes.as_slice()) {
                Ok((_, props)) => props,
                Err(_) => BasicProperties::default(),
            }
        } else {
            let mut props = BasicProperties::default();
            if u.ratio(7, 8)? {
                let id = id_text(u)?;
                props = props.with_message_id(ShortString::try_new(id).unwrap_or_default());
            }
            if let Some(v) = opt_short(u, &["application/json", ""])? {
                props = props.with_content_type(v);
            }
            if let Some(v) = opt_short(u, &[])? {
                props = props.with_correlation_id(v);
            }
            if let Some(v) = opt_short(u, &[])? {
                props = props.with_reply_to(v);
            }
            if let Some(v) = opt_short(u, &["event", "command", "", "Event"])? {
                props = props.with_type(v);
            }
            if u.arbitrary()? {
                props = props.with_timestamp(u.arbitrary()?);
            }
            if u.ratio(7, 8)? {
                props = props.with_headers(table(u, 0)?);
            }
            props
        };
        Ok(Input {
            props,
            payload: u.arbitrary()?,
            routing_key: pick_text(u, &["orders", ""])?,
            cloud_events: cloud_events(u)?,
        })
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("props", &self.props)
            .field("payload", &self.payload)
            .field("routing_key", &self.routing_key)
            .finish()
    }
}

fuzz_target!(|input: Input| {
    let message = match decode_properties(&input.props, &input.payload, &input.routing_key) {
        Ok(m) => m,
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
            return;
        }
    };
    if message.validate().is_err() {
        return;
    }
    let props = match encode_properties(&message, input.cloud_events.as_ref()) {
        Ok(p) => p,
        Err(e) => panic!("a valid decoded message does not encode: {e}"),
    };
    match decode_properties(&props, &message.payload, &message.topic) {
        Ok(again) => assert_eq!(again, message, "round trip"),
        Err(e) => panic!("an encoded message does not decode: {e}"),
    }
});
