//! outbox-kafka against the real broker in `OUTBOX_TEST_KAFKA_BROKERS` (skipped, with a
//! printed reason, when unset; failing when `OUTBOX_TEST_REQUIRED=1`). Each test has its own
//! topics and consumer group.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    KafkaHarness, MAX_BYTES, WAIT, brokers_or_skip, msg, read_partition, receive, unique,
};
use outbox_core::{
    CancellationToken, Consumer, Delivery, ErrorKind, Message, MessageType, Producer, Utc,
};
use outbox_kafka::rdkafka::Message as _;
use outbox_kafka::rdkafka::message::{Headers as _, OwnedHeaders};
use outbox_kafka::rdkafka::producer::{FutureProducer, FutureRecord};
use outbox_kafka::{ConsumerOptions, KafkaConfig, KafkaConsumer, KafkaProducer, headers};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_every_field_and_wire_format() {
    let h = harness!("round_trip_every_field_and_wire_format", 1);
    let full = Message::builder(&h.topic)
        .key("order-7")
        .payload(vec![0u8, 255, 10, 13])
        .header("tenant", "acme")
        .header(
            "traceparent",
            "an application header, not the trace context",
        )
        .header("outbox.id", "cannot clash either")
        .content_type("application/json")
        .message_type(MessageType::Other("order.placed.v2".into()))
        .correlation_id("corr")
        .reply_to("replies")
        .created_at(Utc::now() - chrono::Duration::microseconds(987_654_321))
        .deliver_after(Utc::now())
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .tracestate("congo=t61rcWkgMzE")
        .baggage("userId=alice,serverNode=DF%2028")
        .build()
        .unwrap();
    let empty_key = Message::builder(&h.topic)
        .key("")
        .content_type("")
        .build()
        .unwrap();
    h.producer.send(&full).await.unwrap();
    h.producer.send(&empty_key).await.unwrap();

    let c = h.kafka_consumer().unwrap();
    let a = receive(&c).await;
    assert_eq!((a.attempt, &a.message), (1, &full));
    c.ack(&a).await.unwrap();
    let b = receive(&c).await;
    assert_eq!(b.message, empty_key);
    c.ack(&b).await.unwrap();

    // On the wire: key as the record key, our fields under `outbox.`, trace context under
    // the W3C names, application headers under `app.`.
    let raw = read_partition(&h.config, &h.topic, 2, WAIT).await.unwrap();
    let r = &raw[0];
    assert_eq!(r.key(), Some(&b"order-7"[..]));
    let names: HashMap<String, String> = r
        .headers()
        .unwrap()
        .iter()
        .map(|hd| {
            (
                hd.key.to_owned(),
                String::from_utf8(hd.value.unwrap_or_default().to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(names[headers::ID], full.id.to_string());
    assert_eq!(names[headers::TYPE], "order.placed.v2");
    assert_eq!(names["app.tenant"], "acme");
    assert_eq!(names["app.outbox.id"], "cannot clash either");
    assert_eq!(
        names[headers::TRACEPARENT],
        full.trace.traceparent.clone().unwrap()
    );
    assert_eq!(
        names[headers::CREATED_AT].len(),
        "2024-01-01T00:00:00.000000Z".len(),
        "microsecond precision: {}",
        names[headers::CREATED_AT]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_partition_order_with_many_messages() {
    let h = harness!("per_partition_order_with_many_messages", 4);
    const KEYS: usize = 12;
    const PER_KEY: usize = 50;
    // Keys sent concurrently, each key's messages one after another.
    let mut tasks = Vec::new();
    for k in 0..KEYS {
        let p = h.producer.clone();
        let topic = h.topic.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..PER_KEY {
                p.send(&msg(&topic, &format!("key-{k}"), &i.to_string()))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = h.kafka_consumer().unwrap();
    let mut got: HashMap<String, Vec<usize>> = HashMap::new();
    for _ in 0..KEYS * PER_KEY {
        let d = receive(&c).await;
        c.ack(&d).await.unwrap();
        let seq: usize = std::str::from_utf8(&d.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        got.entry(d.message.key.clone().unwrap())
            .or_default()
            .push(seq);
    }
    assert_eq!(got.len(), KEYS);
    for (key, seqs) in got {
        assert_eq!(seqs, (0..PER_KEY).collect::<Vec<_>>(), "order of {key}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nack_redelivers_at_the_head_with_a_greater_attempt() {
    let h = harness!("nack_redelivers_at_the_head_with_a_greater_attempt", 1);
    let (a, b) = (msg(&h.topic, "k", "a"), msg(&h.topic, "k", "b"));
    h.producer.send(&a).await.unwrap();
    h.producer.send(&b).await.unwrap();
    let c = h.kafka_consumer().unwrap();
    let d = receive(&c).await;
    assert_eq!((d.message.id, d.attempt), (a.id, 1));
    c.nack(&d).await.unwrap();
    let d = receive(&c).await;
    assert_eq!((d.message.id, d.attempt), (a.id, 2), "a again, before b");
    c.nack(&d).await.unwrap();
    let d = receive(&c).await;
    assert_eq!((d.message.id, d.attempt), (a.id, 3));
    c.ack(&d).await.unwrap();
    let d = receive(&c).await;
    assert_eq!((d.message.id, d.attempt), (b.id, 1));
    c.ack(&d).await.unwrap();
    // A settled delivery cannot be settled again.
    let e = c.ack(&d).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::LeaseLost, "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letter_topic_gets_message_reason_and_origin() {
    let h = harness!("dead_letter_topic_gets_message_reason_and_origin", 1);
    let (a, b, c3) = (
        msg(&h.topic, "k", "poison"),
        msg(&h.topic, "k", "fine"),
        msg(&h.topic, "k", "later"),
    );
    h.producer.send(&a).await.unwrap();
    h.producer.send(&b).await.unwrap();
    {
        let c = h.kafka_consumer().unwrap();
        let d = receive(&c).await;
        c.nack(&d).await.unwrap();
        let d = receive(&c).await;
        assert_eq!((d.message.id, d.attempt), (a.id, 2));
        c.dead_letter(&d, "cannot parse order: missing field `sku`")
            .await
            .unwrap();
        let d = receive(&c).await;
        assert_eq!(d.message.id, b.id);
        c.ack(&d).await.unwrap();
    }
    let dead = h.read_dead_letters(1).await.unwrap();
    assert_eq!(dead.len(), 1);
    let dl = &dead[0];
    assert_eq!(dl.message, a, "the whole message, with its original topic");
    assert_eq!(dl.reason, "cannot parse order: missing field `sku`");
    assert_eq!((dl.partition, dl.offset, dl.attempt), (0, 0, 2));
    assert_eq!(dl.group, h.group);
    // Committed past it: a restarted consumer starts with the next new message.
    h.producer.send(&c3).await.unwrap();
    let c = h.kafka_consumer().unwrap();
    let d = receive(&c).await;
    assert_eq!(
        d.message.id, c3.id,
        "neither the dead letter nor the acked one again"
    );
    c.ack(&d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_resumes_from_the_committed_offset() {
    let h = harness!("restart_resumes_from_the_committed_offset", 1);
    let m: Vec<Message> = (0..5)
        .map(|i| msg(&h.topic, "k", &format!("m{i}")))
        .collect();
    for x in &m {
        h.producer.send(x).await.unwrap();
    }
    {
        let c = h.kafka_consumer().unwrap();
        let mut d = Vec::new();
        for _ in 0..4 {
            d.push(receive(&c).await);
        }
        c.ack(&d[0]).await.unwrap();
        c.ack(&d[1]).await.unwrap();
        // m2 stays unacked; m3 is acked out of order: the commit must stop at m2.
        c.ack(&d[3]).await.unwrap();
    } // dropped: leaves the group, committing what was acked
    let c = h.kafka_consumer().unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let d = receive(&c).await;
        c.ack(&d).await.unwrap();
        ids.push(d.message.id);
    }
    assert_eq!(
        ids,
        vec![m[2].id, m[3].id, m[4].id],
        "m0 and m1 are not redelivered; m2 (unacked) is, and m3 after it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_that_are_not_outbox_messages_are_dead_lettered() {
    let h = harness!("records_that_are_not_outbox_messages_are_dead_lettered", 1);
    let raw: FutureProducer = h.config.to_client_config().create().unwrap();
    raw.send(
        FutureRecord::to(&h.topic)
            .key("k")
            .payload("not ours")
            .headers(OwnedHeaders::new()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let ours = msg(&h.topic, "k", "ours");
    h.producer.send(&ours).await.unwrap();
    let c = h.kafka_consumer().unwrap();
    let d = receive(&c).await;
    assert_eq!(d.message.id, ours.id, "the foreign record is skipped");
    c.ack(&d).await.unwrap();
    let dlq = read_partition(&h.config, &h.dlq, 1, WAIT).await.unwrap();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].payload(), Some(&b"not ours"[..]));
    let reason = dlq[0]
        .headers()
        .unwrap()
        .iter()
        .find(|hd| hd.key == headers::DLQ_REASON)
        .and_then(|hd| hd.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap();
    assert!(reason.contains(headers::ID), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_classified() {
    let Some(brokers) = brokers_or_skip("errors_are_classified") else {
        return;
    };
    let h = KafkaHarness::new(&unique("errors"), 1).await.unwrap();

    // Too large: permanent, with the figures; nothing is sent.
    let big = Message::builder(&h.topic)
        .payload(vec![1u8; MAX_BYTES])
        .build()
        .unwrap();
    let e = h.producer.send(&big).await.unwrap_err();
    match e.kind() {
        ErrorKind::PayloadTooLarge { size, limit } => {
            assert_eq!(limit, MAX_BYTES);
            assert!(size > MAX_BYTES, "{size}");
        }
        other => panic!("expected PayloadTooLarge, got {other:?}: {e}"),
    }
    assert!(!e.is_retryable());

    // Unknown topic with auto-creation off: permanent NotFound.
    let e = h
        .producer
        .send(&msg(&format!("{}_nope", h.topic), "k", "x"))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
    assert!(!e.is_retryable());

    // Broker down: retryable Unavailable, in bounded time.
    let down =
        KafkaProducer::new(&KafkaConfig::new("127.0.0.1:1").set("message.timeout.ms", "1500"))
            .unwrap();
    let started = Instant::now();
    let e = down.send(&msg("t", "k", "x")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
    assert!(started.elapsed() < Duration::from_secs(30));
    // A batch reports per message.
    let results = down
        .send_batch(&[msg("t", "k", "1"), msg("t", "k", "2")])
        .await;
    assert_eq!(results.len(), 2);
    assert!(
        results
            .iter()
            .all(|r| r.as_ref().unwrap_err().is_retryable())
    );

    // Configuration mistakes are ConfigInvalid, named.
    let base = common::config(&brokers);
    for bad in [
        base.clone().set("acks", "1"),
        base.clone().set("enable.idempotence", "false"),
        base.clone().set("no.such.property", "1"),
    ] {
        let e = KafkaProducer::new(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    }
    let e = KafkaConsumer::new(
        &base.clone().set("enable.auto.commit", "true"),
        ConsumerOptions::new("g", ["t"]),
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(e.to_string().contains("enable.auto.commit"), "{e}");
    let e = KafkaConsumer::new(&base, ConsumerOptions::new("", ["t"])).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
}

/// A second member joins while the first holds one unacked delivery per partition (and has
/// acked everything else, out of order): the first commits what it can on revocation and
/// forgets the partitions; its late ack is refused; the group redelivers from each held
/// offset and never anything below it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebalance_keeps_committed_work_and_redelivers_the_rest() {
    let h = harness!("rebalance_keeps_committed_work_and_redelivers_the_rest", 2);
    const TOTAL: usize = 40;
    for i in 0..TOTAL {
        h.producer
            .send(&msg(&h.topic, &format!("k{}", i % 10), &i.to_string()))
            .await
            .unwrap();
    }
    let a = Arc::new(h.kafka_consumer().unwrap());
    let mut held: HashMap<i32, (Delivery, i64)> = HashMap::new();
    let mut position = HashMap::new();
    for _ in 0..TOTAL {
        let d = receive(a.as_ref()).await;
        let pos = a.record_position(&d).unwrap();
        position.insert(d.message.id, (pos.partition, pos.offset));
        if let std::collections::hash_map::Entry::Vacant(v) = held.entry(pos.partition) {
            v.insert((d, pos.offset));
        } else {
            a.ack(&d).await.unwrap();
        }
    }
    assert_eq!(held.len(), 2, "both partitions used");

    // The second member joins; both keep receiving until everything not committed came again.
    let expected: usize = position.values().filter(|(p, o)| *o >= held[p].1).count();
    let b = Arc::new(h.kafka_consumer().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    for c in [a.clone(), b.clone()] {
        let (got, stop) = (got.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let d = tokio::select! {
                    _ = stop.cancelled() => return,
                    d = c.receive() => d.unwrap().unwrap(),
                };
                got.lock().unwrap().push(d.message.id);
                c.ack(&d).await.unwrap();
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while got.lock().unwrap().len() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for t in tasks {
        t.await.unwrap();
    }
    let got = got.lock().unwrap().clone();
    for id in &got {
        let (p, o) = position[id];
        assert!(
            o >= held[&p].1,
            "offset {o} of partition {p} was committed before the rebalance, yet redelivered"
        );
    }
    for (d, _) in held.values() {
        assert!(
            got.contains(&d.message.id),
            "held message {} redelivered",
            d.message.id
        );
        let e = a.ack(d).await.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::LeaseLost, "{e}");
    }
    let unique: std::collections::HashSet<_> = got.iter().collect();
    assert_eq!(
        unique.len(),
        expected,
        "everything from the held offsets on came again"
    );
}
