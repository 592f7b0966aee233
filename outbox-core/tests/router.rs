//! Typed messages and the `Router` behind an `InboxProcessor`, on the in-memory store and broker.
#![allow(clippy::unwrap_used)] // test helpers may panic

use std::sync::{Arc, Mutex};

use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
use outbox_core::{
    Consumer, ErrorKind, HandlerError, InboxEntry, InboxProcessor, InboxStore, Message,
    ProcessOutcome, Producer, Router, TypedHandler, TypedMessage, UnknownType, async_trait,
};
use serde::{Deserialize, Serialize};

const TOPIC: &str = "orders";
const SUB: &str = "billing";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    id: u64,
    total_cents: i64,
}
impl TypedMessage for OrderPlaced {
    const TYPE_NAME: &'static str = "order.placed";
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderCancelled {
    id: u64,
    reason: String,
}
impl TypedMessage for OrderCancelled {
    const TYPE_NAME: &'static str = "order.cancelled";
}

/// Records what it was called with; writes a record per call.
#[derive(Clone, Default)]
struct Seen {
    placed: Arc<Mutex<Vec<OrderPlaced>>>,
    cancelled: Arc<Mutex<Vec<OrderCancelled>>>,
}

#[async_trait]
impl TypedHandler<OrderPlaced, MemoryTx> for Seen {
    async fn handle(
        &self,
        v: OrderPlaced,
        m: &Message,
        tx: &mut MemoryTx,
    ) -> Result<(), HandlerError> {
        tx.put_record(format!("invoice/{}", v.id), m.id.to_string());
        self.placed.lock().unwrap().push(v);
        Ok(())
    }
}

#[async_trait]
impl TypedHandler<OrderCancelled, MemoryTx> for Seen {
    async fn handle(
        &self,
        v: OrderCancelled,
        _m: &Message,
        tx: &mut MemoryTx,
    ) -> Result<(), HandlerError> {
        if v.reason == "fail" {
            return Err(HandlerError::new("refund service down"));
        }
        tx.put_record(format!("refund/{}", v.id), v.reason.clone());
        self.cancelled.lock().unwrap().push(v);
        Ok(())
    }
}

fn router(seen: &Seen, unknown: UnknownType) -> Router<MemoryTx> {
    Router::new()
        .route::<OrderPlaced, _>(seen.clone())
        .unwrap()
        .route::<OrderCancelled, _>(seen.clone())
        .unwrap()
        .on_unknown(unknown)
}

async fn process_one(
    p: &InboxProcessor<MemoryStore, Router<MemoryTx>>,
    c: &dyn Consumer,
) -> ProcessOutcome {
    let d = c.receive().await.unwrap().unwrap();
    p.process(c, &d).await.unwrap()
}

#[tokio::test]
async fn dispatches_each_type_to_its_handler_with_the_decoded_value() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let seen = Seen::default();
    let p = InboxProcessor::new(
        Arc::new(store.clone()),
        "billing",
        router(&seen, UnknownType::DeadLetter),
    )
    .unwrap();
    let placed = OrderPlaced {
        id: 1,
        total_cents: 4200,
    };
    let cancelled = OrderCancelled {
        id: 2,
        reason: "changed mind".into(),
    };
    let producer = broker.producer();
    let m1 = Message::typed(TOPIC, &placed).unwrap();
    let m2 = Message::builder(TOPIC)
        .key("o-2")
        .typed(&cancelled)
        .build()
        .unwrap();
    producer.send(&m1).await.unwrap();
    producer.send(&m2).await.unwrap();

    assert_eq!(process_one(&p, &consumer).await, ProcessOutcome::Handled);
    assert_eq!(process_one(&p, &consumer).await, ProcessOutcome::Handled);

    assert_eq!(*seen.placed.lock().unwrap(), vec![placed]);
    assert_eq!(*seen.cancelled.lock().unwrap(), vec![cancelled]);
    assert_eq!(
        store.record("invoice/1").as_deref(),
        Some(m1.id.to_string().as_bytes())
    );
    assert_eq!(
        store.record("refund/2").as_deref(),
        Some(&b"changed mind"[..])
    );
    assert_eq!(broker.unacked(SUB), 0);
}

#[tokio::test]
async fn undecodable_payload_is_dead_lettered_at_once_with_the_reason() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let seen = Seen::default();
    let p = InboxProcessor::new(
        Arc::new(store.clone()),
        "billing",
        router(&seen, UnknownType::DeadLetter),
    )
    .unwrap()
    .with_max_deliveries(5);
    // Right type name, wrong shape; right type name, not JSON at all.
    let wrong_shape = Message::builder(TOPIC)
        .json(&serde_json::json!({"id": "not a number"}))
        .type_name(OrderPlaced::TYPE_NAME)
        .build()
        .unwrap();
    let not_json = Message::builder(TOPIC)
        .payload("<order/>")
        .content_type("application/xml")
        .type_name(OrderPlaced::TYPE_NAME)
        .build()
        .unwrap();
    broker.producer().send(&wrong_shape).await.unwrap();
    broker.producer().send(&not_json).await.unwrap();

    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered,
        "first delivery, no retries"
    );
    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered
    );
    let dead = broker.dead_letters(SUB);
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].0.id, wrong_shape.id);
    assert!(dead[0].1.contains("order.placed"), "{}", dead[0].1);
    assert!(dead[0].1.contains("not a valid JSON"), "{}", dead[0].1);
    assert!(dead[1].1.contains("application/xml"), "{}", dead[1].1);
    assert!(seen.placed.lock().unwrap().is_empty());
    assert!(
        !store
            .contains(&InboxEntry::new(wrong_shape.id, "billing"))
            .await
            .unwrap(),
        "nothing committed for a dead-lettered message"
    );
    let stats = p.stats();
    assert_eq!(
        (stats.handled, stats.retried, stats.dead_lettered),
        (0, 0, 2)
    );
}

#[tokio::test]
async fn unknown_types_follow_the_configured_outcome() {
    let unknown = Message::builder(TOPIC)
        .json(&serde_json::json!({"id": 3}))
        .type_name("order.shipped")
        .build()
        .unwrap();
    let untyped = Message::json(TOPIC, &serde_json::json!({"id": 4})).unwrap();

    // DeadLetter (default): at once, reason naming the type.
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let p = InboxProcessor::new(
        Arc::new(MemoryStore::new()),
        "billing",
        router(&Seen::default(), UnknownType::default()),
    )
    .unwrap();
    broker.producer().send(&unknown).await.unwrap();
    broker.producer().send(&untyped).await.unwrap();
    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered
    );
    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered
    );
    let dead = broker.dead_letters(SUB);
    assert!(
        dead[0]
            .1
            .contains("no route for message type \"order.shipped\""),
        "{}",
        dead[0].1
    );
    assert!(dead[1].1.contains("no type-name header"), "{}", dead[1].1);

    // Retry: redelivered until max_deliveries, then dead-lettered.
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let p = InboxProcessor::new(
        Arc::new(MemoryStore::new()),
        "billing",
        router(&Seen::default(), UnknownType::Retry),
    )
    .unwrap()
    .with_max_deliveries(2);
    broker.producer().send(&unknown).await.unwrap();
    assert_eq!(process_one(&p, &consumer).await, ProcessOutcome::Retrying);
    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered
    );

    // Skip: acked, inbox entry recorded, nothing else.
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let p = InboxProcessor::new(
        Arc::new(store.clone()),
        "billing",
        router(&Seen::default(), UnknownType::Skip),
    )
    .unwrap();
    broker.producer().send(&unknown).await.unwrap();
    assert_eq!(process_one(&p, &consumer).await, ProcessOutcome::Handled);
    assert_eq!(store.record_count(), 0);
    assert!(
        store
            .contains(&InboxEntry::new(unknown.id, "billing"))
            .await
            .unwrap()
    );
    assert_eq!(broker.unacked(SUB), 0);
    assert!(broker.dead_letters(SUB).is_empty());
}

#[tokio::test]
async fn a_typed_handler_error_is_retried_like_any_handler_error() {
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(SUB, &[TOPIC]);
    let seen = Seen::default();
    let p = InboxProcessor::new(
        Arc::new(MemoryStore::new()),
        "billing",
        router(&seen, UnknownType::DeadLetter),
    )
    .unwrap()
    .with_max_deliveries(2);
    let m = Message::typed(
        TOPIC,
        &OrderCancelled {
            id: 9,
            reason: "fail".into(),
        },
    )
    .unwrap();
    broker.producer().send(&m).await.unwrap();
    assert_eq!(process_one(&p, &consumer).await, ProcessOutcome::Retrying);
    assert_eq!(
        process_one(&p, &consumer).await,
        ProcessOutcome::DeadLettered
    );
    assert!(
        broker.dead_letters(SUB)[0]
            .1
            .contains("refund service down"),
        "the handler's error is the reason"
    );
}

#[test]
fn duplicate_and_empty_routes_are_rejected() {
    struct Empty;
    impl Serialize for Empty {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_unit()
        }
    }
    impl<'de> Deserialize<'de> for Empty {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            <()>::deserialize(d).map(|()| Empty)
        }
    }
    impl TypedMessage for Empty {
        const TYPE_NAME: &'static str = "";
    }
    #[async_trait]
    impl TypedHandler<Empty, MemoryTx> for Seen {
        async fn handle(
            &self,
            _: Empty,
            _: &Message,
            _: &mut MemoryTx,
        ) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let seen = Seen::default();
    let e = Router::<MemoryTx>::new()
        .route::<OrderPlaced, _>(seen.clone())
        .unwrap()
        .route::<OrderPlaced, _>(seen.clone())
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists);
    assert!(e.message().contains("order.placed"), "{e}");
    let e = Router::<MemoryTx>::new()
        .route::<Empty, _>(seen)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidInput);
}
