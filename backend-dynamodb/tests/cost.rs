//! Cost per message, measured with the store's meter against the endpoint (moto in CI), beside
//! the same figures computed on paper from DynamoDB's published rules and Brighter V10's
//! figure for the same message, term by term. The meter computes units from the item sizes
//! it sends and receives (moto's own `ConsumedCapacity` is not accurate), so the figures are
//! deterministic and asserted exactly. Run with `--nocapture` to see the table (the README's
//! "Cost" section shows it).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use common::{endpoint_or_skip, record_put, store_with};
use outbox_core::{
    ManualClock, Message, MessageId, Ordering, OutboxStore, PendingQuery, Transaction,
    TransactionalStore,
};
use outbox_dynamodb::aws_sdk_dynamodb::types::AttributeValue;
use outbox_dynamodb::{DynamoDbConfig, DynamoDbStore, OpCost, item_size, read_units, write_units};

const N: usize = 16;

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

/// Brighter V10's DynamoDB item (`MessageItem` of `Paramore.Brighter.Outbox.DynamoDB.V4`) for
/// the same message, with Brighter's defaults for what our message does not set (character
/// encoding, CloudEvents type, source and spec version, an empty header bag, zero counters);
/// null properties are not stored.
fn brighter_item(m: &Message) -> HashMap<String, AttributeValue> {
    let ticks = 638_900_000_000_000_000i64; // 18 digits, like .NET ticks today
    let mut i = HashMap::new();
    i.insert("Body".into(), AttributeValue::B(m.payload.to_vec().into()));
    i.insert("CharacterEncoding".into(), s("UTF8"));
    i.insert(
        "ContentType".into(),
        s(m.content_type.as_deref().unwrap_or("text/plain")),
    );
    i.insert("CorrelationId".into(), s(&MessageId::new().to_string()));
    i.insert("CreatedAt".into(), s("2026-12-01T10:00:00.000Z"));
    i.insert("CreatedTime".into(), n(ticks));
    i.insert("OutstandingCreatedTime".into(), n(ticks));
    i.insert("DelayedMilliseconds".into(), n(0));
    i.insert("HandledCount".into(), n(0));
    i.insert("HeaderBag".into(), s("{}"));
    i.insert("MessageId".into(), s(&m.id.to_string()));
    i.insert("MessageType".into(), s("MT_EVENT"));
    if let Some(k) = &m.key {
        i.insert("PartitionKey".into(), s(k));
    }
    i.insert("Source".into(), s("http://goparamore.io"));
    i.insert("SpecVersion".into(), s("1.0"));
    i.insert("Topic".into(), s(&m.topic));
    i.insert("TopicShard".into(), s(&format!("{}_2", m.topic)));
    i.insert("Type".into(), s("goparamore.io.Paramore.Brighter.Message"));
    i.insert("Baggage".into(), s(""));
    i
}

/// An index entry with ALL projection: the item plus DynamoDB's 100 bytes of index overhead.
fn index_entry(item: usize) -> usize {
    item + 100
}

/// Brighter's WCU for add + dispatch, term by term: `(standalone, unit of work, terms)`.
fn brighter(m: &Message) -> (f64, f64, String) {
    let b = item_size(&brighter_item(m));
    // Dispatch: SET DeliveryTime (N), DeliveredAt (S) REMOVE OutstandingCreatedTime.
    let after = b + (12 + 10) + (11 + 24) - (22 + 10);
    let idx = write_units(index_entry(b));
    let idx_after = write_units(index_entry(after));
    let put = write_units(b);
    let add_standalone = put + 2.0 * idx;
    let add_uow = 2.0 * put + 2.0 * idx;
    let dispatch = write_units(b.max(after)) + 2.0 * idx + 2.0 * idx_after;
    let terms = format!(
        "item {b} B. add: put {put} (x2 in a transaction) + Outstanding {idx} + OutstandingAllTopics {idx}; dispatch: update {} + 2 index deletes {idx} + Delivered {idx_after} + DeliveredAllTopics {idx_after}",
        write_units(b.max(after))
    );
    (add_standalone + dispatch, add_uow + dispatch, terms)
}

fn sum(m: &BTreeMap<&'static str, OpCost>, f: impl Fn(&OpCost) -> f64) -> f64 {
    m.values().map(f).sum()
}

struct Measured {
    add_wcu: f64,
    add_rcu: f64,
    dispatch_wcu: f64,
    fetch_rcu: f64,
    requests_add: f64,
    requests_fetch: f64,
    requests_dispatch: f64,
}

fn message(payload: usize, i: usize) -> Message {
    Message::builder("orders.placed")
        .key(format!("order-{i}"))
        .content_type("application/json")
        .payload(vec![b'x'; payload])
        .build()
        .unwrap()
}

/// Add `N` messages (standalone or each in its own unit of work with one item of yours),
/// fetch them, dispatch them; per message.
async fn measure(store: &DynamoDbStore, payload: usize, uow: bool) -> Measured {
    let msgs: Vec<Message> = (0..N).map(|i| message(payload, i)).collect();
    let meter = store.meter();
    meter.take();
    for (i, m) in msgs.iter().enumerate() {
        if uow {
            let mut tx = store.begin().await.unwrap();
            tx.put(record_put(store, &format!("r-{payload}-{i}-{}", m.id)));
            tx.add(m).await.unwrap();
            tx.commit().await.unwrap();
        } else {
            store.add(m).await.unwrap();
        }
    }
    let add = meter.take();
    let query = PendingQuery {
        shards: (0..store.shard_count()).collect(),
        limit: N,
        ordering: Ordering::PerKey,
    };
    let fetched = store.fetch_pending(&query).await.unwrap();
    assert_eq!(fetched.len(), N);
    let fetch = meter.take();
    store
        .mark_dispatched(&msgs.iter().map(|m| m.id).collect::<Vec<_>>())
        .await
        .unwrap();
    let dispatch = meter.take();
    // The next fetch passes the dispatched slots without reading them again.
    assert!(store.fetch_pending(&query).await.unwrap().is_empty());
    meter.take();
    let per = |x: f64| x / N as f64;
    Measured {
        // Your own item is yours: its units are not the outbox's.
        add_wcu: per(sum(&add, |c| c.wcu))
            - if uow {
                per(yours_units(store, payload, &msgs))
            } else {
                0.0
            },
        add_rcu: per(sum(&add, |c| c.rcu)),
        dispatch_wcu: per(sum(&dispatch, |c| c.wcu)),
        fetch_rcu: per(sum(&fetch, |c| c.rcu)),
        requests_add: per(sum(&add, |c| c.requests as f64)),
        requests_fetch: per(sum(&fetch, |c| c.requests as f64)),
        requests_dispatch: per(sum(&dispatch, |c| c.requests as f64)),
    }
}

/// The units the unit of work's meter counts for your own entries.
fn yours_units(store: &DynamoDbStore, payload: usize, msgs: &[Message]) -> f64 {
    msgs.iter()
        .enumerate()
        .map(|(i, m)| {
            let put = record_put(store, &format!("r-{payload}-{i}-{}", m.id));
            let size = item_size(put.item())
                + put.condition_expression().map_or(0, str::len)
                + put
                    .expression_attribute_names()
                    .map_or(0, |m| m.iter().map(|(k, v)| k.len() + v.len()).sum());
            2.0 * write_units(size)
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_per_message_against_brighter() {
    let Some(ep) = endpoint_or_skip("cost_per_message_against_brighter") else {
        return;
    };
    let config = DynamoDbConfig::new(format!("cost_{}_", fastrand::u32(..)))
        .with_clock(Arc::new(ManualClock::new()))
        .with_cursor_persist_interval(Duration::from_secs(3600));
    let (store, _guard) = store_with(&ep, config).await.unwrap();
    // Warm-up: the store reads each shard's meta item once, and writes each cursor once.
    measure(&store, 16, false).await;

    println!(
        "\n| payload | mode | requests add / fetch / dispatch | add WCU | dispatch WCU | add + dispatch WCU (on paper) | Brighter V10 | ratio | relay RCU |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for payload in [256usize, 1024, 4096] {
        let probe = message(payload, 0);
        let q = item_size(&store.message_item(&probe));
        let g = item_size(&store.guard_item(&probe));
        let (b_standalone, b_uow, terms) = brighter(&probe);
        for uow in [false, true] {
            let m = measure(&store, payload, uow).await;
            // On paper: the transaction writes the queue item and the guard (x2 each); the
            // dispatch updates the queue item in place (its size after the update).
            let paper_add = 2.0 * write_units(q) + 2.0 * write_units(g);
            let paper_dispatch = write_units(q + 24);
            assert_eq!(m.add_wcu, paper_add, "{payload} B add");
            assert_eq!(m.dispatch_wcu, paper_dispatch, "{payload} B dispatch");
            let ours = m.add_wcu + m.dispatch_wcu;
            let theirs = if uow { b_uow } else { b_standalone };
            let ratio = ours / theirs;
            println!(
                "| {payload} B (item {q} B, guard {g} B) | {} | {:.2} / {:.2} / {:.2} | {} | {} | **{ours}** | {theirs} | {ratio:.2} | {:.2} (+{:.2} RCU tail reads at add) |",
                if uow { "unit of work" } else { "standalone" },
                m.requests_add,
                m.requests_fetch,
                m.requests_dispatch,
                m.add_wcu,
                m.dispatch_wcu,
                m.fetch_rcu,
                m.add_rcu,
            );
            // The target (at most half of Brighter) holds from 1 KiB up; see the README for
            // 256 B, where one 1 KB write unit is the floor of every write.
            if payload >= 1024 {
                assert!(ratio <= 0.5, "{payload} B: {ours} vs Brighter {theirs}");
            }
            // One strongly consistent read per 4 KB of items, at least 1 per shard and fetch:
            // with N messages over up to N shards, at most one unit per message plus the size.
            assert!(
                m.fetch_rcu <= (read_units(q) * 1.0).max(1.0),
                "{payload} B: relay reads {} RCU per message",
                m.fetch_rcu
            );
        }
        println!("\nBrighter, {payload} B: {terms}");
    }
}

/// The store's lock counts its requests on the store's meter: a lease item is under 1 KB, so
/// every conditional write is 1 WCU, applied or not (a lost race costs too), and a strongly
/// consistent `current` is 1 RCU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_requests_are_metered_on_the_stores_meter() {
    use outbox_core::DistributedLock;
    let Some(ep) = endpoint_or_skip("cost_leases") else {
        return;
    };
    let config = DynamoDbConfig::new(format!("cost_leases_{}_", fastrand::u32(..)));
    let (store, _t) = store_with(&ep, config).await.unwrap();
    let lock = store.lock();
    let meter = store.meter();
    meter.take();
    let ttl = Duration::from_secs(30);
    let lease = lock.acquire("r", "a", ttl).await.unwrap().unwrap();
    // Held by "a": "b" fails the take and the extend-my-own condition, two requests.
    assert!(lock.acquire("r", "b", ttl).await.unwrap().is_none());
    let lease = lock.renew(&lease, ttl).await.unwrap();
    assert!(lock.current("r").await.unwrap().is_some());
    lock.release(&lease).await.unwrap();
    let costs = meter.take();
    let got = |op: &str| costs.get(op).copied().unwrap_or_default();
    let acquire = got("lock_acquire");
    assert_eq!(
        (acquire.requests, acquire.failed_conditions, acquire.wcu),
        (3, 2, 3.0),
        "{costs:?}"
    );
    assert_eq!(
        (got("lock_renew").requests, got("lock_renew").wcu),
        (1, 1.0)
    );
    assert_eq!(
        (got("lock_release").requests, got("lock_release").wcu),
        (1, 1.0)
    );
    assert_eq!(
        (got("lock_current").requests, got("lock_current").rcu),
        (1, 1.0)
    );
}
