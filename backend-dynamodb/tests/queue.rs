//! The v2 queue design against a real endpoint: poison items, parked messages keeping their
//! place, an emptied partition, the shard-count and schema guards, and the stream wake-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{endpoint_or_skip, store_with};
use outbox_core::memory::MemoryBroker;
use outbox_core::relay::{Relay, RelayConfig};
use outbox_core::{
    CancellationToken, Clock, ErrorKind, FailedAttempt, FailureOutcome, ListQuery, ManualClock,
    Message, MessageStatus, Ordering, OutboxStore, PendingQuery, RequeueFilter, shard_for,
};
use outbox_dynamodb::aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType,
    ScalarAttributeType,
};
use outbox_dynamodb::{
    DynamoDbConfig, DynamoDbStore, StreamListener, local_client, local_streams_client,
};

fn msg(key: &str) -> Message {
    Message::builder("orders")
        .key(key)
        .payload("p")
        .build()
        .unwrap()
}

fn prefix(test: &str) -> String {
    format!("{test}_{}_", fastrand::u32(..))
}

async fn one_shard(ep: &str, test: &str, clock: &ManualClock) -> (DynamoDbStore, common::Tables) {
    let config = DynamoDbConfig::new(prefix(test))
        .with_shard_count(1)
        .with_clock(Arc::new(clock.clone()));
    store_with(ep, config).await.unwrap()
}

async fn fetch(store: &DynamoDbStore, ordering: Ordering) -> Vec<Message> {
    store
        .fetch_pending(&PendingQuery {
            shards: (0..store.shard_count()).collect(),
            limit: 100,
            ordering,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect()
}

async fn slot_of(store: &DynamoDbStore, m: &Message) -> String {
    let g = store
        .client()
        .get_item()
        .table_name(store.table_names().0)
        .key("pk", AttributeValue::S(format!("m#{}", m.id)))
        .key("sk", AttributeValue::N("0".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap();
    match g.item().and_then(|i| i.get("sl")) {
        Some(AttributeValue::N(v)) => v.clone(),
        other => panic!("no slot for {}: {other:?}", m.id),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_poison_item_is_parked_with_a_reason_and_the_shard_keeps_flowing() {
    let Some(ep) = endpoint_or_skip("poison") else {
        return;
    };
    let clock = ManualClock::new();
    let (store, _t) = one_shard(&ep, "poison", &clock).await;
    let first = msg("a");
    store.add(&first).await.unwrap();
    // A corrupt item at the next slot, written with the raw client: its id is not a UUID and
    // its payload is a string.
    store
        .client()
        .put_item()
        .table_name(store.table_names().0)
        .item("pk", AttributeValue::S("q#0".into()))
        .item("sk", AttributeValue::N("2".into()))
        .item("i", AttributeValue::S("not-a-uuid".into()))
        .item("k", AttributeValue::S("b".into()))
        .item("p", AttributeValue::S("text".into()))
        .item("st", AttributeValue::S("pending".into()))
        .item("sq", AttributeValue::N("1".into()))
        .send()
        .await
        .unwrap();
    let after = msg("c");
    store.add(&after).await.unwrap();
    assert_eq!(
        slot_of(&store, &after).await,
        "3",
        "writers pass the poison item"
    );

    let got = fetch(&store, Ordering::PerKey).await;
    assert_eq!(
        got,
        vec![first.clone(), after.clone()],
        "the shard keeps flowing"
    );
    assert_eq!(store.poisoned_count(), 1);
    assert_eq!(store.meter().snapshot()["poison"].requests, 1);
    fetch(&store, Ordering::PerKey).await;
    assert_eq!(store.poisoned_count(), 1, "parked once");

    let listed = store.list(&ListQuery::default()).await.unwrap();
    assert_eq!(listed.len(), 3);
    let poison = listed
        .iter()
        .find(|m| m.status == MessageStatus::Parked)
        .expect("list shows the poison item");
    let reason = poison.last_error.as_deref().unwrap_or_default();
    assert!(
        reason.contains("undecodable") && reason.contains("slot 2"),
        "{reason}"
    );
    assert_eq!(poison.message.key.as_deref(), Some("b"));
    let stats = store.stats().await.unwrap();
    assert_eq!((stats.pending, stats.parked), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parked_messages_keep_their_place_across_requeue() {
    let Some(ep) = endpoint_or_skip("parked_place") else {
        return;
    };
    let clock = ManualClock::new();
    let (store, _t) = one_shard(&ep, "parked", &clock).await;
    let a1 = msg("k");
    let b = msg("other");
    let a2 = msg("k");
    for m in [&a1, &b, &a2] {
        store.add(m).await.unwrap();
    }
    let outcome = store
        .mark_failed(
            a1.id,
            &FailedAttempt {
                error: "broker said no".into(),
                next_attempt_at: clock.now(),
                max_attempts: 1,
            },
        )
        .await
        .unwrap();
    assert!(matches!(
        outcome,
        outbox_core::FailureOutcome::Parked { .. }
    ));
    let seq_before = store.get(a1.id).await.unwrap().unwrap().sequence;
    assert_eq!(
        fetch(&store, Ordering::PerKey).await,
        vec![b.clone()],
        "a1 parked blocks a2"
    );
    store.mark_dispatched(&[b.id]).await.unwrap();
    // The cursor passes the parked a1 (a hole) and the dispatched b; a2 still waits.
    assert!(fetch(&store, Ordering::PerKey).await.is_empty());
    assert_eq!(fetch(&store, Ordering::Unordered).await, vec![a2.clone()]);
    assert_eq!(
        store
            .requeue(&RequeueFilter::Ids(vec![a1.id]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        fetch(&store, Ordering::PerKey).await,
        vec![a1.clone(), a2.clone()]
    );
    assert_eq!(
        store.get(a1.id).await.unwrap().unwrap().sequence,
        seq_before
    );
    // Another store instance (no memory of this one) sees the same.
    let other = DynamoDbStore::new(local_client(&ep), store.config().clone()).unwrap();
    assert_eq!(fetch(&other, Ordering::PerKey).await, vec![a1, a2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_emptied_partition_never_reuses_a_slot() {
    let Some(ep) = endpoint_or_skip("emptied") else {
        return;
    };
    let clock = ManualClock::new();
    let (store, _t) = one_shard(&ep, "emptied", &clock).await;
    let first = msg("a");
    store.add(&first).await.unwrap();
    let seq1 = store.get(first.id).await.unwrap().unwrap().sequence;
    assert_eq!(fetch(&store, Ordering::PerKey).await.len(), 1);
    store.mark_dispatched(&[first.id]).await.unwrap();
    assert!(fetch(&store, Ordering::PerKey).await.is_empty());
    assert_eq!(store.purge_dispatched(Duration::ZERO, 10).await.unwrap(), 1);
    assert!(store.get(first.id).await.unwrap().is_none());
    // The queue partition holds no message now; the next one still takes slot 2.
    let second = msg("a");
    store.add(&second).await.unwrap();
    assert_eq!(slot_of(&store, &second).await, "2");
    assert!(store.get(second.id).await.unwrap().unwrap().sequence > seq1);
    let other = DynamoDbStore::new(local_client(&ep), store.config().clone()).unwrap();
    let third = msg("a");
    other.add(&third).await.unwrap();
    assert_eq!(slot_of(&store, &third).await, "3");
    assert_eq!(fetch(&other, Ordering::PerKey).await, vec![second, third]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shard_count_mismatch_is_config_invalid_naming_both_values() {
    let Some(ep) = endpoint_or_skip("shard_count_mismatch") else {
        return;
    };
    let config = DynamoDbConfig::new(prefix("scm")).with_shard_count(16);
    let (store, _t) = store_with(&ep, config).await.unwrap();
    let other = DynamoDbStore::new(
        local_client(&ep),
        store.config().clone().with_shard_count(8),
    )
    .unwrap();
    let e = other.add(&msg("k")).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    let text = e.to_string();
    assert!(
        text.contains("shard_count 16") && text.contains("shard_count 8"),
        "{text}"
    );
    let e = other.migrate().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    assert!(
        store
            .fetch_pending(&PendingQuery {
                shards: vec![0],
                limit: 1,
                ordering: Ordering::PerKey
            })
            .await
            .is_ok()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn create_tables_rejects_an_existing_table_of_another_schema() {
    let Some(ep) = endpoint_or_skip("schema_mismatch") else {
        return;
    };
    let config = DynamoDbConfig::new(prefix("schema"));
    let client = local_client(&ep);
    let store = DynamoDbStore::new(client.clone(), config).unwrap();
    let (outbox, inbox, locks) = store.table_names();
    let _t = common::Tables::new(&ep, &[outbox, inbox, locks]);
    // A version-1 style table: message id as the only key.
    client
        .create_table()
        .table_name(outbox)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("pk")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .unwrap(),
        )
        .key_schema(
            KeySchemaElement::builder()
                .attribute_name("pk")
                .key_type(KeyType::Hash)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let e = store.migrate().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::ConfigInvalid, "{e}");
    let text = e.to_string();
    assert!(
        text.contains(outbox) && text.contains("key schema"),
        "{text}"
    );
}

/// The shards one poll of `listener` reports.
async fn poll_shards(listener: &mut StreamListener) -> Vec<u32> {
    listener.poll_once().await.unwrap().into_iter().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_stream_listener_wakes_the_relay_for_exactly_the_new_shards() {
    let Some(ep) = endpoint_or_skip("stream_listener") else {
        return;
    };
    let (store, _t) = store_with(&ep, DynamoDbConfig::new(prefix("stream")))
        .await
        .unwrap();
    let mut listener = StreamListener::new(&store, local_streams_client(&ep))
        .await
        .unwrap();
    assert!(listener.poll_once().await.unwrap().is_empty());
    let m = msg("stream-key");
    store.add(&m).await.unwrap();
    let shard = shard_for(m.key.as_deref(), &m.id, store.shard_count());
    let mut woken = listener.poll_once().await.unwrap();
    for _ in 0..20 {
        if !woken.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        woken = listener.poll_once().await.unwrap();
    }
    assert_eq!(woken.into_iter().collect::<Vec<_>>(), vec![shard]);
    // Dispatching (a MODIFY) wakes nothing.
    store.mark_dispatched(&[m.id]).await.unwrap();
    assert!(listener.poll_once().await.unwrap().is_empty());
    // Parking (a MODIFY) wakes nothing; requeueing wakes the shard (its wake-up item).
    let parked = msg("stream-key");
    store.add(&parked).await.unwrap();
    assert_eq!(poll_shards(&mut listener).await, vec![shard]);
    let outcome = store
        .mark_failed(
            parked.id,
            &FailedAttempt {
                error: "broken".into(),
                next_attempt_at: chrono::Utc::now(),
                max_attempts: 1,
            },
        )
        .await
        .unwrap();
    assert!(
        matches!(outcome, FailureOutcome::Parked { .. }),
        "{outcome:?}"
    );
    assert!(listener.poll_once().await.unwrap().is_empty());
    let requeued = store
        .requeue(&RequeueFilter::Ids(vec![parked.id]))
        .await
        .unwrap();
    assert_eq!(requeued, 1);
    assert_eq!(
        poll_shards(&mut listener).await,
        vec![shard],
        "a requeue wakes its shard"
    );
    // The wake-up item is not a message: nothing else became pending.
    assert_eq!(store.stats().await.unwrap().pending, 1);
    store.mark_dispatched(&[parked.id]).await.unwrap();

    // A running relay that polls once an hour publishes a new message when woken.
    let broker = MemoryBroker::new();
    let store_arc = Arc::new(store.clone());
    let relay = Relay::new(
        store_arc.clone(),
        Arc::new(store.lock()),
        Arc::new(broker.producer()),
        RelayConfig {
            poll_interval: Duration::from_secs(3600),
            ..RelayConfig::default()
        },
    )
    .unwrap();
    let stop = CancellationToken::new();
    let running = relay.spawn(stop.clone());
    let listen =
        tokio::spawn(listener.run(relay.handle(), Duration::from_millis(50), stop.clone()));
    for _ in 0..100 {
        if relay.held_shards().await.len() == store.shard_count() as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the first sweep finish so the relay waits on its (hour-long) poll interval.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let next = msg("stream-key");
    store.add(&next).await.unwrap();
    let mut published = false;
    for _ in 0..100 {
        if broker.published("orders").iter().any(|p| p.id == next.id) {
            published = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    running.await.unwrap().unwrap();
    listen.await.unwrap();
    assert!(
        published,
        "the stream wake-up published the message without a poll"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_blocked_key_does_not_starve_the_keys_behind_it() {
    let Some(ep) = endpoint_or_skip("starve") else {
        return;
    };
    let clock = ManualClock::new();
    let (store, _t) = one_shard(&ep, "starve", &clock).await;
    let head = msg("k");
    store.add(&head).await.unwrap();
    store
        .mark_failed(
            head.id,
            &FailedAttempt {
                error: "retry later".into(),
                next_attempt_at: clock.now() + chrono::Duration::hours(1),
                max_attempts: 10,
            },
        )
        .await
        .unwrap();
    // More than one page of the relay's read (25 items at limit 2) of the blocked key.
    let blocked: Vec<Message> = (0..30).map(|_| msg("k")).collect();
    store.add_batch(&blocked).await.unwrap();
    let other = msg("other");
    store.add(&other).await.unwrap();
    let got: Vec<Message> = store
        .fetch_pending(&PendingQuery {
            shards: vec![0],
            limit: 2,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.message)
        .collect();
    assert_eq!(
        got,
        vec![other],
        "the read goes past the blocked key's messages"
    );
}
