//! DynamoDB-specific behaviour of `outbox-dynamodb` against a real endpoint
//! (`OUTBOX_TEST_DYNAMODB_ENDPOINT`; moto in CI). Each test has its own tables.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{endpoint_or_skip, fresh, record_exists, record_put};
use outbox_core::{
    Clock, ErrorKind, FailedAttempt, InboxEntry, InboxStore, InsertOutcome, ManualClock, Message,
    MessageId, Ordering, OutboxStore, PendingQuery, Transaction, TransactionalStore,
};
use outbox_dynamodb::aws_sdk_dynamodb::config::interceptors::BeforeTransmitInterceptorContextMut;
use outbox_dynamodb::aws_sdk_dynamodb::config::{ConfigBag, Intercept, RuntimeComponents};
use outbox_dynamodb::aws_sdk_dynamodb::error::BoxError;
use outbox_dynamodb::aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck};
use outbox_dynamodb::{
    DynamoDbConfig, DynamoDbStore, MAX_MESSAGE_SIZE, MAX_TRANSACTION_ACTIONS,
    MAX_TRANSACTION_BYTES, local_client,
};

fn clock() -> ManualClock {
    ManualClock::new()
}

fn msg(key: &str) -> Message {
    Message::builder("orders")
        .key(key)
        .payload("p")
        .build()
        .unwrap()
}

/// A raw GetItem (strongly consistent) of an outbox item.
async fn raw_get(
    store: &DynamoDbStore,
    pk: String,
    sk: String,
) -> BTreeMap<String, AttributeValue> {
    store
        .client()
        .get_item()
        .table_name(store.table_names().0)
        .key("pk", AttributeValue::S(pk))
        .key("sk", AttributeValue::N(sk))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .collect()
}

/// The queue item of a message, found through its id guard with the raw client.
async fn raw_item(store: &DynamoDbStore, id: MessageId) -> BTreeMap<String, AttributeValue> {
    let guard = raw_get(store, format!("m#{id}"), "0".into()).await;
    let n = |k: &str| match guard.get(k) {
        Some(AttributeValue::N(v)) => v.clone(),
        other => panic!("guard of {id} has no {k}: {other:?}"),
    };
    raw_get(store, format!("q#{}", n("sh")), n("sl")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_than_100_actions_is_a_typed_error() {
    let Some(ep) = endpoint_or_skip("more_than_100_actions_is_a_typed_error") else {
        return;
    };
    let c = clock();
    let (store, _t) = fresh(&ep, "limit100", Arc::new(c.clone())).await;

    // 101 of the caller's own entries.
    let mut uow = store.begin().await.unwrap();
    for i in 0..=MAX_TRANSACTION_ACTIONS {
        uow.put(record_put(&store, &format!("r{i}")));
    }
    let e = uow.commit().await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::LimitExceeded {
            count: 101,
            limit: 100
        },
        "{e}"
    );
    assert!(e.to_string().contains("100 actions"), "{e}");
    assert!(!record_exists(&store, "r0").await.unwrap());

    // 97 entries of ours + messages: each message is two actions (queue item, id guard).
    let mut uow = store.begin().await.unwrap();
    for i in 0..97 {
        uow.put(record_put(&store, &format!("s{i}")));
    }
    uow.add(&msg("a")).await.unwrap(); // 97 + 2 = 99
    let e = uow.add_batch(&[msg("b-1"), msg("c-2")]).await.unwrap_err();
    assert!(
        matches!(e.kind(), ErrorKind::LimitExceeded { limit: 100, count } if count > 100),
        "{e}"
    );
    assert_eq!(uow.action_count(), 99, "a refused add stages nothing");
    // ... and aborts the transaction: commit is refused naming the limit, nothing written.
    let refused = uow.commit().await.unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::InvalidInput, "{refused}");
    assert!(refused.to_string().contains("100 actions"), "{refused}");
    assert!(!record_exists(&store, "s96").await.unwrap());
    // 99 actions fit.
    let mut uow = store.begin().await.unwrap();
    for i in 0..97 {
        uow.put(record_put(&store, &format!("s{i}")));
    }
    uow.add(&msg("a")).await.unwrap();
    uow.commit().await.unwrap();
    assert!(record_exists(&store, "s96").await.unwrap());

    // add_batch over the batch limit.
    let limit = store.capabilities().max_batch.unwrap();
    let too_many: Vec<Message> = (0..=limit).map(|i| msg(&format!("k{i}"))).collect();
    let e = store.add_batch(&too_many).await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::LimitExceeded {
            count: limit + 1,
            limit
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn item_and_transaction_size_limits() {
    let Some(ep) = endpoint_or_skip("item_and_transaction_size_limits") else {
        return;
    };
    let (store, _t) = fresh(&ep, "size400", Arc::new(clock())).await;
    // A 400 KB payload cannot fit a 400 KB item with its attributes.
    let big = Message::builder("t")
        .payload(vec![7u8; 400 * 1024])
        .build()
        .unwrap();
    let e = store.add(&big).await.unwrap_err();
    match e.kind() {
        ErrorKind::PayloadTooLarge { size, limit } => {
            assert_eq!(limit, MAX_MESSAGE_SIZE);
            assert!(size > 400 * 1024, "{size}");
        }
        k => panic!("expected PayloadTooLarge, got {k}: {e}"),
    }
    assert!(store.get(big.id).await.unwrap().is_none());

    // The largest accepted message round-trips untruncated.
    let probe = Message::builder("t").build().unwrap();
    let overhead = outbox_dynamodb::item_size(&store.message_item(&probe));
    let max = Message::builder("t")
        .payload(vec![9u8; MAX_MESSAGE_SIZE - overhead])
        .build()
        .unwrap();
    store.add(&max).await.unwrap();
    assert_eq!(store.get(max.id).await.unwrap().unwrap().message, max);
    let over = Message::builder("t")
        .payload(vec![9u8; MAX_MESSAGE_SIZE - overhead + 1])
        .build()
        .unwrap();
    assert!(matches!(
        store.add(&over).await.unwrap_err().kind(),
        ErrorKind::PayloadTooLarge { .. }
    ));

    // 4 MB per transaction: the eleventh 380 KB message is refused at add.
    let mut uow = store.begin().await.unwrap();
    let mut err = None;
    for i in 0..11 {
        let m = Message::builder("t")
            .key(format!("k{i}"))
            .payload(vec![1u8; 380 * 1024])
            .build()
            .unwrap();
        if let Err(e) = uow.add(&m).await {
            err = Some((i, e));
            break;
        }
    }
    let (i, e) = err.expect("the transaction must hit the 4 MB limit");
    assert_eq!(
        i, 10,
        "ten 380 KB messages fit in 4 MB, the eleventh does not"
    );
    assert!(
        matches!(e.kind(), ErrorKind::PayloadTooLarge { limit, .. } if limit == MAX_TRANSACTION_BYTES),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancellation_reasons_map_to_the_failing_entry() {
    let Some(ep) = endpoint_or_skip("cancellation_reasons_map_to_the_failing_entry") else {
        return;
    };
    let (store, _t) = fresh(&ep, "cancel", Arc::new(clock())).await;
    let records = common::records_table(&store);

    // The caller's own condition, entry 1 of 3 (a condition check on a missing item).
    let m = msg("k");
    let mut uow = store.begin().await.unwrap();
    assert_eq!(uow.put(record_put(&store, "a")), 0);
    let check = ConditionCheck::builder()
        .table_name(&records)
        .key("id", AttributeValue::S("missing".into()))
        .condition_expression("attribute_exists(id)")
        .build()
        .unwrap();
    assert_eq!(uow.condition_check(check), 1);
    uow.add(&m).await.unwrap();
    let e = uow.commit().await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::ConditionFailed { index: Some(1) },
        "{e}"
    );
    assert!(!e.is_retryable());
    assert!(
        e.to_string().contains("[1] ConditionalCheckFailed"),
        "the raw reasons are kept: {e}"
    );
    assert!(!record_exists(&store, "a").await.unwrap());
    assert!(store.get(m.id).await.unwrap().is_none());

    // The caller's put on an existing item: entry 0.
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "exists"));
    uow.commit().await.unwrap();
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "exists"));
    uow.add(&m).await.unwrap();
    let e = uow.commit().await.unwrap_err();
    assert_eq!(
        e.kind(),
        ErrorKind::ConditionFailed { index: Some(0) },
        "{e}"
    );

    // An inbox duplicate: AlreadyExists, the caller's item not written.
    let entry = InboxEntry::new(MessageId::new(), "handler");
    assert_eq!(store.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "b"));
    assert_eq!(
        uow.inbox_insert(&entry).await.unwrap(),
        InsertOutcome::Inserted
    );
    let e = uow.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains("inbox entry"), "{e}");
    assert!(!record_exists(&store, "b").await.unwrap());

    // An outbox id collision: AlreadyExists naming the message.
    store.add(&m).await.unwrap();
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "c"));
    uow.add(&m).await.unwrap();
    let e = uow.commit().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert!(e.to_string().contains(&m.id.to_string()), "{e}");
    assert!(!record_exists(&store, "c").await.unwrap());
}

/// Captures the `ClientRequestToken` of every TransactWriteItems attempt, and sends the first
/// attempt to a closed port so the SDK retries it.
#[derive(Debug, Clone, Default)]
struct TokenSpy {
    tokens: Arc<Mutex<Vec<String>>>,
    fail_next: Arc<AtomicBool>,
}

impl Intercept for TokenSpy {
    fn name(&self) -> &'static str {
        "TokenSpy"
    }

    fn modify_before_transmit(
        &self,
        ctx: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let req = ctx.request_mut();
        let body = req
            .body()
            .bytes()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default();
        let tag = "\"ClientRequestToken\":\"";
        if let Some(start) = body.find(tag) {
            let rest = &body[start + tag.len()..];
            let token = rest.split('"').next().unwrap_or_default().to_owned();
            self.tokens.lock().unwrap().push(token);
            if self.fail_next.swap(false, AtomicOrdering::SeqCst) {
                req.set_uri("http://127.0.0.1:1/")?;
            }
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_request_token_is_stable_across_sdk_retries() {
    let Some(ep) = endpoint_or_skip("client_request_token_is_stable_across_sdk_retries") else {
        return;
    };
    let spy = TokenSpy::default();
    let conf = local_client(&ep)
        .config()
        .to_builder()
        .interceptor(spy.clone())
        .build();
    let client = outbox_dynamodb::aws_sdk_dynamodb::Client::from_conf(conf);
    let prefix = format!("crt_{}_", fastrand::u32(..));
    let store = DynamoDbStore::new(
        client,
        DynamoDbConfig::new(prefix).with_clock(Arc::new(clock())),
    )
    .unwrap();
    let (_, guard) = common::store_with(&ep, store.config().clone())
        .await
        .unwrap();

    // First attempt never reaches DynamoDB (connection refused); the SDK retries it.
    spy.fail_next.store(true, AtomicOrdering::SeqCst);
    let m = msg("k");
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "r"));
    uow.add(&m).await.unwrap();
    uow.commit().await.unwrap();
    let tokens = spy.tokens.lock().unwrap().clone();
    assert_eq!(
        tokens.len(),
        2,
        "one failed attempt and its retry: {tokens:?}"
    );
    assert_eq!(tokens[0], tokens[1], "the retry carries the same token");
    assert!(!tokens[0].is_empty() && tokens[0].len() <= 36);
    assert!(store.get(m.id).await.unwrap().is_some());

    // Another unit of work gets another token; an explicit token is sent as given.
    let mut uow = store.begin().await.unwrap();
    uow.add(&msg("k")).await.unwrap();
    uow.set_client_request_token("order-42-attempt").unwrap();
    uow.commit().await.unwrap();
    let tokens = spy.tokens.lock().unwrap().clone();
    assert_eq!(tokens.len(), 3);
    assert_eq!(tokens[2], "order-42-attempt");
    let mut uow = store.begin().await.unwrap();
    assert_eq!(
        uow.set_client_request_token("x".repeat(37))
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidInput
    );
    drop(guard);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expired_inbox_entries_count_as_absent() {
    let Some(ep) = endpoint_or_skip("expired_inbox_entries_count_as_absent") else {
        return;
    };
    let c = clock();
    let (store, _t) = fresh(&ep, "inboxttl", Arc::new(c.clone())).await;
    let entry = InboxEntry::new(MessageId::new(), "h");
    assert_eq!(store.insert(&entry).await.unwrap(), InsertOutcome::Inserted);
    assert_eq!(
        store.insert(&entry).await.unwrap(),
        InsertOutcome::Duplicate
    );
    c.advance(store.retention() - Duration::from_micros(1));
    assert!(store.contains(&entry).await.unwrap());
    c.advance(Duration::from_micros(1));
    assert!(
        !store.contains(&entry).await.unwrap(),
        "expired at the window's end"
    );
    // The item is still there (TTL deletes lazily; moto never), yet it counts as absent.
    let raw = store
        .client()
        .get_item()
        .table_name(store.table_names().1)
        .key("pk", AttributeValue::S(entry.message_id.to_string()))
        .key("sk", AttributeValue::S(entry.handler_key.clone()))
        .send()
        .await
        .unwrap();
    let item = raw.item().expect("expired item not yet deleted");
    assert!(item.contains_key("ttl"), "TTL attribute set: {item:?}");
    let mut uow = store.begin().await.unwrap();
    uow.put(record_put(&store, "handled-again"));
    uow.inbox_insert(&entry).await.unwrap();
    uow.commit().await.unwrap();
    assert!(store.contains(&entry).await.unwrap());
    assert_eq!(
        store.insert(&entry).await.unwrap(),
        InsertOutcome::Duplicate
    );
    assert_eq!(
        store.purge_expired(100).await.unwrap(),
        0,
        "the entry inserted again is live: purge leaves it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cleanup_of_more_than_25_items_and_ttl_only_on_dispatch() {
    let Some(ep) = endpoint_or_skip("cleanup_of_more_than_25_items_and_ttl_only_on_dispatch")
    else {
        return;
    };
    let c = clock();
    let (store, _t) = fresh(&ep, "purge", Arc::new(c.clone())).await;
    let msgs: Vec<Message> = (0..60)
        .map(|_| Message::builder("t").build().unwrap())
        .collect();
    store.add_batch(&msgs[..50]).await.unwrap();
    store.add_batch(&msgs[50..]).await.unwrap();
    let pending = msg("pending");
    let parked = msg("parked");
    store.add(&pending).await.unwrap();
    store.add(&parked).await.unwrap();
    store
        .mark_failed(
            parked.id,
            &FailedAttempt {
                error: "x".into(),
                next_attempt_at: c.now(),
                max_attempts: 1,
            },
        )
        .await
        .unwrap();
    let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
    store.mark_dispatched(&ids).await.unwrap();
    assert!(!raw_item(&store, pending.id).await.contains_key("ttl"));
    assert!(!raw_item(&store, parked.id).await.contains_key("ttl"));
    let dispatched = raw_item(&store, ids[0]).await;
    assert!(dispatched.contains_key("ttl"), "{dispatched:?}");
    assert_eq!(
        dispatched.get("st"),
        Some(&AttributeValue::S("dispatched".into())),
        "dispatched in place: {dispatched:?}"
    );

    c.advance(Duration::from_secs(3600));
    let n = store
        .purge_dispatched(Duration::from_secs(60), 100)
        .await
        .unwrap();
    assert_eq!(
        n, 60,
        "more than 25 deletes take several BatchWriteItem calls"
    );
    let calls = store.meter().snapshot()["purge_dispatched"].requests;
    assert!(
        calls >= 4,
        "at least 3 BatchWriteItem calls of <= 25 plus the scan: {calls}"
    );
    for id in &ids {
        assert!(store.get(*id).await.unwrap().is_none());
    }
    assert!(store.get(pending.id).await.unwrap().is_some());
    assert!(store.get(parked.id).await.unwrap().is_some());
}

/// Holds the first TransactWriteItems of a client until released: the writer has read its
/// shard's tail and built its request, and another process commits in between.
#[derive(Debug, Clone)]
struct Pause {
    armed: Arc<AtomicBool>,
    reached: Arc<Mutex<std::sync::mpsc::Sender<()>>>,
    go: Arc<Mutex<std::sync::mpsc::Receiver<()>>>,
}

impl Intercept for Pause {
    fn name(&self) -> &'static str {
        "Pause"
    }

    fn modify_before_transmit(
        &self,
        ctx: &mut BeforeTransmitInterceptorContextMut<'_>,
        _rc: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let is_transaction = ctx
            .request()
            .headers()
            .get("x-amz-target")
            .is_some_and(|t| t.ends_with("TransactWriteItems"));
        if is_transaction && self.armed.swap(false, AtomicOrdering::SeqCst) {
            self.reached.lock().unwrap().send(()).unwrap();
            // Hand this worker's other tasks to the runtime while waiting.
            tokio::task::block_in_place(|| self.go.lock().unwrap().recv().unwrap());
        }
        Ok(())
    }
}

/// Two store instances (two "processes": no shared in-process shard locks). Writer A reads the
/// shard's tail and sends its transaction only after writer B committed a message of the same
/// key: A's put at the slot it chose fails its condition, A reads again and lands after B. So
/// the queue's order is commit order by construction, whatever the timing. (Truly concurrent
/// transactions are not tested here: moto does not isolate concurrent TransactWriteItems.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stale_writer_loses_its_slot_and_lands_after_the_commit_it_raced() {
    let Some(ep) = endpoint_or_skip("a_stale_writer_loses_its_slot") else {
        return;
    };
    let c = clock();
    let (b, _t) = fresh(&ep, "stale", Arc::new(c.clone())).await;
    let (reached_tx, reached_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel();
    let pause = Pause {
        armed: Arc::new(AtomicBool::new(true)),
        reached: Arc::new(Mutex::new(reached_tx)),
        go: Arc::new(Mutex::new(go_rx)),
    };
    let conf = local_client(&ep)
        .config()
        .to_builder()
        .interceptor(pause)
        .build();
    let a = DynamoDbStore::new(
        outbox_dynamodb::aws_sdk_dynamodb::Client::from_conf(conf),
        b.config().clone(),
    )
    .unwrap();
    let m_a = msg("hot");
    let m_b = msg("hot");
    let writer_a = {
        let (a, m_a) = (a.clone(), m_a.clone());
        tokio::spawn(async move { a.add(&m_a).await })
    };
    tokio::task::spawn_blocking(move || reached_rx.recv().unwrap())
        .await
        .unwrap();
    b.add(&m_b).await.unwrap();
    go_tx.send(()).unwrap();
    writer_a.await.unwrap().unwrap();

    // Two tail reads and two transactions; the failed one is metered (it consumed capacity).
    let commits = a.meter().snapshot()["commit"];
    assert_eq!(commits.requests, 4, "{commits:?}");
    assert_eq!(commits.failed_conditions, 1, "{commits:?}");
    let per_attempt = 2.0
        * outbox_dynamodb::write_units(outbox_dynamodb::item_size(&a.message_item(&m_a)))
        + 2.0 * outbox_dynamodb::write_units(outbox_dynamodb::item_size(&a.guard_item(&m_a)));
    assert_eq!(commits.wcu, 2.0 * per_attempt, "{commits:?}");
    let fetched = b
        .fetch_pending(&PendingQuery {
            shards: (0..b.shard_count()).collect(),
            limit: 10,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap();
    let ids: Vec<MessageId> = fetched.iter().map(|m| m.message.id).collect();
    assert_eq!(ids, vec![m_b.id, m_a.id], "commit order");
    assert!(fetched[0].sequence < fetched[1].sequence);
    assert_eq!(
        raw_item(&b, m_b.id).await.get("sk"),
        Some(&AttributeValue::N("1".into()))
    );
    assert_eq!(
        raw_item(&b, m_a.id).await.get("sk"),
        Some(&AttributeValue::N("2".into()))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_errors_name_the_field() {
    let client = local_client("http://127.0.0.1:1");
    for (config, field) in [
        (DynamoDbConfig::new("bad prefix"), "table_prefix"),
        (DynamoDbConfig::default().with_shard_count(0), "shard_count"),
        (
            DynamoDbConfig::default().with_inbox_retention(Duration::ZERO),
            "inbox_retention",
        ),
    ] {
        let e = DynamoDbStore::new(client.clone(), config).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ConfigInvalid);
        assert!(e.to_string().contains(field), "{e}");
    }
    let store = DynamoDbStore::new(client, DynamoDbConfig::default()).unwrap();
    assert_eq!(store.capabilities().max_batch, Some(50));
    // Unreachable endpoint: a retryable Unavailable error.
    let e = store.get(MessageId::new()).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(e.is_retryable());
}
