//! CloudEvents binary content mode against the real broker: the exact `ce_*` headers on the
//! raw record, and an unchanged round trip through our consumer.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;

use common::{WAIT, read_partition, receive};
use outbox_core::cloudevents::CloudEvents;
use outbox_core::{Consumer, Message, Producer, TypedMessage, Utc};
use outbox_kafka::KafkaProducer;
use outbox_kafka::rdkafka::Message as _;
use outbox_kafka::rdkafka::message::Headers as _;

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct OrderPlaced {
    id: u64,
}
impl TypedMessage for OrderPlaced {
    const TYPE_NAME: &'static str = "com.example.order.placed";
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn binary_mode_headers_on_the_wire_and_round_trip() {
    let h = harness!("cloudevents_binary_mode", 1);
    let producer = KafkaProducer::new(&h.config)
        .unwrap()
        .with_cloud_events(CloudEvents::new("/tests/billing").unwrap());
    let typed = Message::builder(&h.topic)
        .key("order-1")
        .typed(&OrderPlaced { id: 1 })
        .header("tenant", "acme")
        .created_at(
            chrono::DateTime::parse_from_rfc3339("2026-12-01T10:11:12.345678Z")
                .unwrap()
                .with_timezone(&Utc),
        )
        .build()
        .unwrap();
    let untyped = Message::builder(&h.topic).payload("plain").build().unwrap();
    producer.send(&typed).await.unwrap();
    producer.send(&untyped).await.unwrap();

    let raw = read_partition(&h.config, &h.topic, 2, WAIT).await.unwrap();
    assert_eq!(raw.len(), 2);
    let headers = |i: usize| -> HashMap<String, String> {
        raw[i]
            .headers()
            .unwrap()
            .iter()
            .map(|hd| {
                (
                    hd.key.to_owned(),
                    String::from_utf8(hd.value.unwrap_or_default().to_vec()).unwrap(),
                )
            })
            .collect()
    };
    let a = headers(0);
    assert_eq!(a["ce_id"], typed.id.to_string());
    assert_eq!(a["ce_type"], "com.example.order.placed");
    assert_eq!(a["ce_source"], "/tests/billing");
    assert_eq!(a["ce_specversion"], "1.0");
    assert_eq!(a["ce_time"], "2026-12-01T10:11:12.345678Z");
    assert_eq!(a["content-type"], "application/json");
    assert_eq!(raw[0].payload(), Some(&br#"{"id":1}"#[..]), "data as-is");
    assert_eq!(raw[0].key(), Some(&b"order-1"[..]));
    let b = headers(1);
    assert_eq!(b["ce_type"], h.topic, "untyped: the topic is the type");
    assert!(
        !b.contains_key("content-type"),
        "no datacontenttype without a content type"
    );

    // A producer without CloudEvents adds none of them.
    let plain = Message::builder(&h.topic).build().unwrap();
    h.producer.send(&plain).await.unwrap();
    let raw = read_partition(&h.config, &h.topic, 3, WAIT).await.unwrap();
    let names: Vec<&str> = raw[2].headers().unwrap().iter().map(|hd| hd.key).collect();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("ce_") || *n == "content-type"),
        "{names:?}"
    );

    // Our consumer decodes every message unchanged.
    let c = h.kafka_consumer().unwrap();
    for expected in [&typed, &untyped, &plain] {
        let d = receive(&c).await;
        assert_eq!(&d.message, expected);
        c.ack(&d).await.unwrap();
    }
    assert_eq!(
        typed.decode_json::<OrderPlaced>().unwrap(),
        OrderPlaced { id: 1 }
    );
}
