//! The Lambda handler (feature `lambda`), invoked with a DynamoDB Streams event document (no
//! Lambda service): it drains the shards named by the event and reports the records of a shard
//! it could not drain (here: another relay holds its lease) as `batchItemFailures`.
#![cfg(feature = "lambda")]
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{endpoint_or_skip, store_with};
use outbox_core::memory::MemoryBroker;
use outbox_core::relay::{Relay, RelayConfig};
use outbox_core::{DistributedLock, Message, OutboxStore, shard_for};
use outbox_dynamodb::aws_lambda_events::event::dynamodb::Event;
use outbox_dynamodb::{DynamoDbConfig, handle_stream_event};

fn record(seq: &str, shard: u32, slot: u64, event: &str) -> serde_json::Value {
    serde_json::json!({
        "eventID": format!("e-{seq}"),
        "eventName": event,
        "eventVersion": "1.1",
        "eventSource": "aws:dynamodb",
        "awsRegion": "us-east-1",
        "dynamodb": {
            "ApproximateCreationDateTime": 1_764_583_200.0,
            "Keys": { "pk": { "S": format!("q#{shard}") }, "sk": { "N": slot.to_string() } },
            "SequenceNumber": seq,
            "SizeBytes": 26,
            "StreamViewType": "KEYS_ONLY"
        },
        "eventSourceARN": "arn:aws:dynamodb:us-east-1:123456789012:table/t/stream/2026-12-01T00:00:00.000"
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_handler_drains_the_event_shards_and_reports_partial_failures() {
    let Some(ep) = endpoint_or_skip("lambda_handler") else {
        return;
    };
    let config = DynamoDbConfig::new(format!("lambda_{}_", fastrand::u32(..)));
    let (store, _t) = store_with(&ep, config).await.unwrap();
    let n = store.shard_count();
    // Two keys in two different shards.
    let free_key = "alpha".to_owned();
    let free = shard_for(Some(&free_key), &outbox_core::MessageId::new(), n);
    let held_key = (0..)
        .map(|i| format!("beta-{i}"))
        .find(|k| shard_for(Some(k), &outbox_core::MessageId::new(), n) != free)
        .unwrap();
    let held = shard_for(Some(&held_key), &outbox_core::MessageId::new(), n);
    let a = Message::builder("orders").key(free_key).build().unwrap();
    let b = Message::builder("orders").key(held_key).build().unwrap();
    store.add(&a).await.unwrap();
    store.add(&b).await.unwrap();
    // Another relay holds the lease of b's shard.
    store
        .lock()
        .acquire(
            &format!("outbox/shard/{held}"),
            "another-relay",
            Duration::from_secs(60),
        )
        .await
        .unwrap()
        .unwrap();

    let broker = MemoryBroker::new();
    let relay = Relay::new(
        Arc::new(store.clone()),
        Arc::new(store.lock()),
        Arc::new(broker.producer()),
        RelayConfig::default(),
    )
    .unwrap();
    let doc = serde_json::json!({ "Records": [
        record("100", free, 1, "INSERT"),
        record("101", held, 1, "INSERT"),
        record("102", free, 1, "MODIFY"),
        record("103", free, u64::MAX, "INSERT"),
    ]});
    let event: Event = serde_json::from_value(doc).unwrap();
    let response = handle_stream_event(&relay, &store, event).await;
    let json = serde_json::to_value(&response).unwrap();
    assert_eq!(
        json["batchItemFailures"],
        serde_json::json!([{ "itemIdentifier": "101" }]),
        "{json}"
    );
    let published: Vec<_> = broker
        .published("orders")
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(
        published,
        vec![a.id],
        "the free shard was drained, the held one was not"
    );

    // Once the lease is free, the retried record drains its shard and nothing fails.
    let retry: Event = serde_json::from_value(
        serde_json::json!({ "Records": [record("101", held, 1, "INSERT")] }),
    )
    .unwrap();
    let lease = store
        .lock()
        .current(&format!("outbox/shard/{held}"))
        .await
        .unwrap()
        .unwrap();
    store.lock().release(&lease).await.unwrap();
    let response = handle_stream_event(&relay, &store, retry).await;
    assert!(response.batch_item_failures.is_empty());
    assert_eq!(broker.published("orders").len(), 2);
}
