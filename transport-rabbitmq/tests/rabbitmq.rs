//! Tests of `outbox-rabbitmq` against the real broker (`OUTBOX_TEST_RABBITMQ_URL`); each
//! test declares its own exchange, quorum queue and dead-letter queue and deletes them after.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Isolated, kill_connections, msg};
use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use outbox_core::memory::{MemoryStore, MemoryTx};
use outbox_core::{
    CancellationToken, Consumer, Delivery, ErrorKind, HandlerError, InboxProcessor, Message,
    MessageHandler, MessageId, MessageType, Producer, Utc, async_trait,
};
use outbox_rabbitmq::{
    AmqpUrl, ConnectionConfig, ProducerConfig, RabbitMqProducer, fetch_dead_letters,
};

async fn receive(c: &dyn Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(30), c.receive())
        .await
        .expect("a delivery within 30 s")
        .unwrap()
        .expect("consumer not closed")
}

/// Every field, including values AMQP cannot carry as they are (application headers named
/// like ours or RabbitMQ's, names over 255 bytes, properties over 255 bytes), survives a
/// confirmed send; the raw AMQP message is persistent, carries message id, type, timestamp
/// and the documented headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_round_trip_of_every_field() {
    let iso = isolated!("rt");
    let full = Message::builder(iso.topic())
        .key("order-42")
        .payload(vec![0u8, 255, 1, 2])
        .header("tenant", "acme")
        .header("x-outbox-key", "an application header, not ours")
        .header("traceparent", "application value")
        .header("x-death", "not RabbitMQ's")
        .header("n".repeat(300), "long name")
        .content_type("c".repeat(400))
        .message_type(MessageType::Other("audit".into()))
        .correlation_id("corr-1")
        .reply_to("r".repeat(1024))
        .created_at(Utc::now() - chrono::Duration::microseconds(7))
        .deliver_after(Utc::now())
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .tracestate("rojo=1")
        .baggage("userId=alice")
        .build()
        .unwrap();
    let producer = iso.producer();
    producer.send(&full).await.unwrap();
    producer.send(&full).await.unwrap();

    // Raw look at the first copy.
    let conn = Connection::connect(iso.connection.url.expose(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = ch
        .basic_get(iso.topic().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a message in the queue");
    let p = &got.delivery.properties;
    assert_eq!(*p.delivery_mode(), Some(2), "persistent");
    assert_eq!(
        p.message_id().as_ref().map(|s| s.to_string()),
        Some(full.id.to_string())
    );
    assert_eq!(
        p.kind().as_ref().map(|s| s.to_string()).as_deref(),
        Some("audit")
    );
    assert_eq!(*p.timestamp(), Some(full.created_at.timestamp() as u64));
    assert_eq!(
        p.correlation_id()
            .as_ref()
            .map(|s| s.to_string())
            .as_deref(),
        Some("corr-1")
    );
    let headers = p.headers().as_ref().unwrap().inner();
    assert_eq!(
        headers.get("x-outbox-created-at"),
        Some(&AMQPValue::LongLongInt(full.created_at.timestamp_micros()))
    );
    assert!(headers.contains_key("tenant") && headers.contains_key("baggage"));
    assert!(
        headers.contains_key("x-outbox-headers"),
        "escaped app headers"
    );
    drop(conn);

    // The second copy through the consumer.
    let c = iso.consumer().await.unwrap();
    let d = receive(&c).await;
    assert_eq!(d.message, full);
    assert_eq!(d.attempt, 1);
    c.ack(&d).await.unwrap();
}

/// Messages of each key, sent one after another per key while keys are sent concurrently,
/// arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn per_key_order_with_concurrent_keys() {
    let iso = isolated!("order");
    let producer = Arc::new(iso.producer());
    let mut tasks = Vec::new();
    for k in 0..8 {
        let p = producer.clone();
        let topic = iso.topic().to_owned();
        tasks.push(tokio::spawn(async move {
            for i in 0..25 {
                p.send(&msg(&topic, &format!("k{k}"), &i.to_string()))
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let c = iso.consumer().await.unwrap();
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for _ in 0..200 {
        let d = receive(&c).await;
        c.ack(&d).await.unwrap();
        let n = std::str::from_utf8(&d.message.payload)
            .unwrap()
            .parse()
            .unwrap();
        seen.entry(d.message.key.clone().unwrap())
            .or_default()
            .push(n);
    }
    assert_eq!(seen.len(), 8);
    for (k, ns) in seen {
        assert_eq!(ns, (0..25).collect::<Vec<_>>(), "order of {k}");
    }
}

/// nack requeues: the message comes back with attempt 2, then 3; the count lives in the
/// quorum queue, so a consumer that dies without acking also counts, and the next consumer
/// sees the next attempt. A settled delivery cannot be settled again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_and_restart_count_attempts() {
    let iso = isolated!("nack");
    let p = iso.producer();
    let first = msg(iso.topic(), "k", "first");
    p.send(&first).await.unwrap();
    {
        let c = iso.consumer().await.unwrap();
        for expected in 1..=3 {
            let d = receive(&c).await;
            assert_eq!((d.message.id, d.attempt), (first.id, expected));
            c.nack(&d).await.unwrap();
            let e = c.ack(&d).await.unwrap_err();
            assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        }
        let d = receive(&c).await;
        assert_eq!((d.message.id, d.attempt), (first.id, 4));
        // Dropped without ack: a crash.
    }
    let c = iso.consumer().await.unwrap();
    let d = receive(&c).await;
    assert_eq!(
        (d.message.id, d.attempt),
        (first.id, 5),
        "count survives restarts"
    );
    c.ack(&d).await.unwrap();
    let second = msg(iso.topic(), "k", "second");
    p.send(&second).await.unwrap();
    let d = receive(&c).await;
    assert_eq!((d.message.id, d.attempt), (second.id, 1));
    c.ack(&d).await.unwrap();
}

#[derive(Clone, Default)]
struct Handler {
    poison: Option<MessageId>,
    effects: Arc<Mutex<HashMap<MessageId, u32>>>,
}

#[async_trait]
impl MessageHandler<MemoryTx> for Handler {
    async fn handle(&self, message: &Message, tx: &mut MemoryTx) -> Result<(), HandlerError> {
        if self.poison == Some(message.id) {
            return Err(HandlerError::new("cannot handle poison (test)"));
        }
        tx.put_record(format!("effect/{}", message.id), "done");
        *self.effects.lock().unwrap().entry(message.id).or_default() += 1;
        Ok(())
    }
}

/// Behind `InboxProcessor::run`, a message whose handler always fails is redelivered and,
/// on the 3rd failure, lands in the dead-letter queue with every field, the handler's error
/// as reason and the attempt count; the other messages are handled once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_with_reason_after_n_failures() {
    let iso = isolated!("dlq");
    let p = iso.producer();
    let poison = Message::builder(iso.topic())
        .key("k")
        .payload("poison")
        .header("tenant", "acme")
        .correlation_id("c-1")
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .build()
        .unwrap();
    let good = [msg(iso.topic(), "k", "a"), msg(iso.topic(), "k", "b")];
    p.send(&good[0]).await.unwrap();
    p.send(&poison).await.unwrap();
    p.send(&good[1]).await.unwrap();

    let handler = Handler {
        poison: Some(poison.id),
        ..Handler::default()
    };
    let processor = Arc::new(
        InboxProcessor::new(Arc::new(MemoryStore::new()), "dlq-test", handler.clone())
            .expect("processor")
            .with_max_deliveries(3),
    );
    let consumer = Arc::new(iso.consumer().await.unwrap());
    let shutdown = CancellationToken::new();
    let run = {
        let (processor, consumer, shutdown) =
            (processor.clone(), consumer.clone(), shutdown.clone());
        tokio::spawn(async move { processor.run(consumer.as_ref(), shutdown).await })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while (processor.stats().dead_lettered < 1 || processor.stats().handled < 2)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let stats = run.await.unwrap().unwrap();
    assert_eq!(
        (stats.handled, stats.retried, stats.dead_lettered),
        (2, 2, 1),
        "{stats:?}"
    );

    let dlq = iso.topology.dead_letter_queue.clone().unwrap();
    let dead = fetch_dead_letters(&iso.connection, &dlq, 10).await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].message, poison, "every field kept");
    assert!(
        dead[0].reason.contains("cannot handle poison"),
        "{}",
        dead[0].reason
    );
    assert_eq!(dead[0].attempts, Some(3));
    let effects = handler.effects.lock().unwrap().clone();
    assert_eq!(effects, HashMap::from([(good[0].id, 1), (good[1].id, 1)]));
}

/// Publish `body` with `props` straight through lapin (as another client would) on a
/// channel of its own, which is returned for reading the dead-letter queue.
async fn publish_raw(iso: &Isolated, props: BasicProperties, body: &[u8]) -> lapin::Channel {
    let conn = Connection::connect(iso.connection.url.expose(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        iso.topology.exchange.as_str().into(),
        iso.topic().into(),
        BasicPublishOptions::default(),
        body,
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ch
}

/// A good message published after the raw one is the next delivery (the raw one was
/// skipped), and the raw one is in the dead-letter queue: its delivery and the reason.
async fn skipped_to_dead_letters(
    iso: &Isolated,
    ch: &lapin::Channel,
) -> (lapin::message::Delivery, String) {
    let good = msg(iso.topic(), "k", "ok");
    iso.producer().send(&good).await.unwrap();
    let c = iso.consumer().await.unwrap();
    let d = receive(&c).await;
    assert_eq!(d.message.id, good.id, "the foreign message was skipped");
    c.ack(&d).await.unwrap();
    let dlq = iso.topology.dead_letter_queue.clone().unwrap();
    let got = ch
        .basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the foreign message in the dead-letter queue");
    let reason = match &got.delivery.properties.headers().as_ref().unwrap().inner()
        [outbox_rabbitmq::HEADER_DEAD_LETTER_REASON]
    {
        AMQPValue::LongString(s) => s.to_string(),
        other => panic!("reason header {other:?}"),
    };
    assert!(reason.starts_with("undecodable message"), "{reason}");
    (got.delivery, reason)
}

/// A message without a UUID message id (published by some other client) cannot become a
/// `Message`: the consumer dead-letters it with the decoding error and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_is_dead_lettered() {
    let iso = isolated!("raw");
    let props = BasicProperties::default().with_message_id("not-a-uuid".into());
    let ch = publish_raw(&iso, props, b"foreign").await;
    let (dead, reason) = skipped_to_dead_letters(&iso, &ch).await;
    assert_eq!(dead.data, b"foreign");
    assert!(reason.contains("not-a-uuid"), "{reason}");
}

/// A header value that is not UTF-8 is refused, not rewritten: the message is dead-lettered
/// with a reason naming the header and its bytes kept as they were, and the consumer goes on.
/// (Replacing the bytes would hand the handler a value no producer sent.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_header_value_is_dead_lettered_not_rewritten() {
    let iso = isolated!("raw_utf8");
    let id = outbox_core::MessageId::new().to_string();
    let mut headers = FieldTable::default();
    headers.insert(
        "tenant".into(),
        AMQPValue::LongString(vec![b'a', 0xff, 0xfe].into()),
    );
    let props = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_headers(headers);
    let ch = publish_raw(&iso, props, b"payload").await;
    let (dead, reason) = skipped_to_dead_letters(&iso, &ch).await;
    assert!(
        reason.contains("header tenant is not valid UTF-8"),
        "{reason}"
    );
    assert_eq!(
        dead.properties.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    let kept = &dead.properties.headers().as_ref().unwrap().inner()["tenant"];
    assert_eq!(
        kept,
        &AMQPValue::LongString(vec![b'a', 0xff, 0xfe].into()),
        "bytes kept"
    );
}

/// Unroutable (no binding for the routing key) and a missing exchange are permanent
/// `NotFound` errors; the producer keeps working afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_and_missing_exchange_are_permanent() {
    let iso = isolated!("unroutable");
    let p = iso.producer();
    let e = p
        .send(&msg(&format!("{}.nobody", iso.topic()), "k", "x"))
        .await
        .unwrap_err();
    assert_eq!(
        (e.kind(), e.is_retryable()),
        (ErrorKind::NotFound, false),
        "{e}"
    );
    assert!(e.to_string().contains("unroutable"), "{e}");

    let config = iso
        .producer_config()
        .route("elsewhere", format!("{}.missing", iso.name), "rk");
    let p2 = RabbitMqProducer::new(config).unwrap();
    let e = p2.send(&msg("elsewhere", "k", "x")).await.unwrap_err();
    assert_eq!(
        (e.kind(), e.is_retryable()),
        (ErrorKind::NotFound, false),
        "{e}"
    );

    let ok = msg(iso.topic(), "k", "after");
    p.send(&ok).await.unwrap();
    p2.send(&ok).await.unwrap();
    let long_topic = "t".repeat(300);
    let e = p.send(&msg(&long_topic, "k", "x")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    let c = iso.consumer().await.unwrap();
    assert_eq!(receive(&c).await.message.id, ok.id);
    assert_eq!(receive(&c).await.message.id, ok.id);
}

/// Over the configured `max_message_size` is a permanent `PayloadTooLarge` before anything
/// is sent. The unreachable broker is a retryable `Unavailable`, returned quickly, and
/// neither errors nor `Debug` show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_unreachable_and_redaction() {
    let iso = isolated!("limits");
    let mut config = iso.producer_config();
    config.max_message_size = Some(1000);
    let p = RabbitMqProducer::new(config).unwrap();
    let big = Message::builder(iso.topic())
        .payload(vec![1u8; 1001])
        .build()
        .unwrap();
    let e = p.send(&big).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::PayloadTooLarge {
            size: 1001,
            limit: 1000
        }
    );
    assert!(!e.is_retryable());

    let url = AmqpUrl::parse("amqp://user:hunter2@127.0.0.1:1/%2f").unwrap();
    let down = RabbitMqProducer::new(ProducerConfig::new(ConnectionConfig::new(url), "x")).unwrap();
    let started = Instant::now();
    for _ in 0..3 {
        let e = down.send(&msg("t", "k", "x")).await.unwrap_err();
        assert_eq!(
            (e.kind(), e.is_retryable()),
            (ErrorKind::Unavailable, true),
            "{e}"
        );
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!format!("{down:?}").contains("hunter2"));
    assert!(format!("{down:?}").contains("user:***@"));
}

/// The broker force-closes the producer's and the consumer's connections (as an operator
/// or a broker restart does). The next send succeeds on a new connection without
/// recreating the producer, a batch right after is confirmed in full, and the consumer
/// re-subscribes by itself: everything is delivered, nothing is stuck. The delivery that
/// was open when the consumer's connection died comes again with a greater attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reconnect_after_connections_are_force_closed() {
    let iso = isolated!("reconnect");
    let mut pc = iso.producer_config();
    let producer_name = format!("{}-producer", iso.name);
    pc.connection.connection_name = Some(producer_name.clone());
    let p = RabbitMqProducer::new(pc).unwrap();
    let mut cc = iso.consumer_config();
    let consumer_name = format!("{}-consumer", iso.name);
    cc.connection.connection_name = Some(consumer_name.clone());
    let c = outbox_rabbitmq::RabbitMqConsumer::connect(cc)
        .await
        .unwrap();

    let before = msg(iso.topic(), "k", "before");
    p.send(&before).await.unwrap();
    let open = receive(&c).await;
    assert_eq!(open.message.id, before.id);
    assert_eq!(p.connections_opened(), 1);

    assert_eq!(kill_connections(&producer_name).await, 1);
    assert_eq!(kill_connections(&consumer_name).await, 1);

    let after = msg(iso.topic(), "k", "after");
    p.send(&after).await.expect("the next send reconnects");
    assert_eq!(p.connections_opened(), 2);
    let batch: Vec<Message> = (0..50)
        .map(|i| msg(iso.topic(), "b", &i.to_string()))
        .collect();
    for r in p.send_batch(&batch).await {
        r.unwrap();
    }
    let e = c.ack(&open).await.unwrap_err();
    assert!(e.is_retryable(), "the old channel is gone: {e}");

    let mut ids = HashSet::new();
    let mut redelivered = None;
    while ids.len() < 52 {
        let d = receive(&c).await;
        if d.message.id == before.id {
            redelivered = Some(d.attempt);
        }
        c.ack(&d).await.unwrap();
        ids.insert(d.message.id);
    }
    assert!(ids.contains(&after.id) && ids.contains(&before.id));
    assert!(redelivered.unwrap() >= 2, "attempt {redelivered:?}");
}

/// A body over the broker's own `max_message_size` (128 MiB by default), with the client-side
/// check off: the broker closes the channel with PRECONDITION_FAILED, classified as a
/// permanent `PayloadTooLarge` carrying both sizes; the next send works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_enforced_max_message_size_is_permanent() {
    let iso = isolated!("broker_limit");
    let mut config = iso.producer_config();
    config.max_message_size = None;
    let p = RabbitMqProducer::new(config).unwrap();
    let limit = outbox_rabbitmq::DEFAULT_MAX_MESSAGE_SIZE;
    let big = Message::builder(iso.topic())
        .payload(vec![1u8; limit + 1])
        .build()
        .unwrap();
    let started = Instant::now();
    let e = p.send(&big).await.unwrap_err();
    eprintln!(
        "broker rejected {} bytes in {:?}: {e}",
        limit + 1,
        started.elapsed()
    );
    assert_eq!(
        e.kind(),
        ErrorKind::PayloadTooLarge {
            size: limit + 1,
            limit
        },
        "{e}"
    );
    assert!(!e.is_retryable());
    drop(big);
    p.send(&msg(iso.topic(), "k", "small")).await.unwrap();
}

/// Deliveries are handed out while earlier ones are still unacked (up to the prefetch), so
/// a processor can handle several at once; acks in any order settle each one, and nothing
/// comes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_deliveries_in_hand_at_once_acked_out_of_order() {
    let iso = isolated!("in_hand");
    let p = iso.producer();
    let sent: Vec<Message> = (0..20)
        .map(|i| msg(iso.topic(), &format!("k{i}"), "x"))
        .collect();
    for r in p.send_batch(&sent).await {
        r.unwrap();
    }
    let c = iso.consumer().await.unwrap();
    assert!(
        c.config().prefetch >= 20,
        "default prefetch {}",
        c.config().prefetch
    );
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(receive(&c).await);
    }
    let ids: HashSet<MessageId> = held.iter().map(|d| d.message.id).collect();
    assert_eq!(ids, sent.iter().map(|m| m.id).collect::<HashSet<_>>());
    for d in held.iter().rev() {
        c.ack(d).await.unwrap();
    }
    let again = tokio::time::timeout(Duration::from_millis(500), c.receive()).await;
    assert!(again.is_err(), "nothing is delivered again: {again:?}");
}
