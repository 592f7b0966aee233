//! Cost report: requests (counted by the store's meter against the real endpoint) and
//! capacity units per message (computed from the measured item sizes with DynamoDB's published
//! rules, because moto's `ConsumedCapacity` is not accurate: it reports 1 unit for any put,
//! nothing for transactions, 0.5 for updates). Run with `--nocapture` to see the table.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use common::{endpoint_or_skip, record_put, store_with};
use outbox_core::{
    InboxEntry, InboxStore, ManualClock, Message, MessageId, Ordering, OutboxStore, PendingQuery,
    Transaction, TransactionalStore,
};
use outbox_dynamodb::{DynamoDbConfig, Sequencing, item_size};

/// Write units of one standard write of an item of `size` bytes.
fn wcu(size: usize) -> f64 {
    size.div_ceil(1024).max(1) as f64
}

// A pending-index entry (table key, index keys, projected k/ca, + 100 bytes of index
// overhead) is about 180 bytes: 1 WCU to write, 1 WCU to delete.

struct Row {
    what: &'static str,
    requests: f64,
    rcu: f64,
    wcu: f64,
}

async fn report(sequencing: Sequencing, payload: usize) -> Option<(f64, f64)> {
    let ep = endpoint_or_skip("cost_report")?;
    const N: usize = 20;
    let config = DynamoDbConfig::new(format!("cost_{}_", fastrand::u32(..)))
        .with_sequencing(sequencing)
        .with_clock(Arc::new(ManualClock::new()));
    let (store, _guard) = store_with(&ep, config).await.unwrap();
    let msgs: Vec<Message> = (0..N)
        .map(|i| {
            Message::builder("orders.placed")
                .key(format!("order-{i}"))
                .content_type("application/json")
                .payload(vec![b'x'; payload])
                .build()
                .unwrap()
        })
        .collect();
    let size = item_size(&store.message_item(&msgs[0]));
    // dispatched adds dd (2+9), ttl (3+6), status +3, minus pp (2+2)
    let dispatched_size = size + 11 + 9 + 3 - 4;

    let meter = store.meter();
    meter.take();
    for (i, m) in msgs.iter().enumerate() {
        let mut uow = store.begin().await.unwrap();
        uow.put(record_put(&store, &format!("order-{i}")));
        uow.add(m).await.unwrap();
        uow.commit().await.unwrap();
    }
    let add = meter.take();
    let fetched = store
        .fetch_pending(&PendingQuery {
            shards: (0..store.shard_count()).collect(),
            limit: N,
            ordering: Ordering::PerKey,
        })
        .await
        .unwrap();
    assert_eq!(fetched.len(), N);
    let fetch = meter.take();
    let ids: Vec<MessageId> = msgs.iter().map(|m| m.id).collect();
    store.mark_dispatched(&ids).await.unwrap();
    let dispatch = meter.take();
    for m in &msgs {
        store
            .insert(&InboxEntry::new(m.id, "billing"))
            .await
            .unwrap();
    }
    let inbox = meter.take();
    let reqs = |m: &std::collections::BTreeMap<&'static str, outbox_dynamodb::OpCost>| {
        m.values().map(|c| c.requests).sum::<u64>() as f64 / N as f64
    };

    let counter = sequencing == Sequencing::ShardCounter;
    let shards_touched = store.shard_count().min(N as u32) as f64; // keys spread over shards
    let add_wcu = 2.0 * wcu(size) + 1.0 + if counter { 2.0 } else { 0.0 };
    let add_rcu = if counter { 1.0 } else { 0.0 };
    let dispatch_wcu = wcu(size.max(dispatched_size)) + 1.0;
    let rows = [
        Row {
            what: "add inside a unit of work (message put + pending index entry)",
            requests: reqs(&add),
            rcu: add_rcu,
            wcu: add_wcu,
        },
        Row {
            what: "dispatch (`mark_dispatched`: update + index delete)",
            requests: reqs(&dispatch),
            rcu: 0.0,
            wcu: dispatch_wcu,
        },
        Row {
            what: "inbox insert (standalone conditional put)",
            requests: reqs(&inbox),
            rcu: 0.0,
            wcu: 1.0,
        },
        Row {
            what: "relay reads per message, batch of 20 over all shards",
            requests: reqs(&fetch),
            // per shard: pending query (>= 0.5) + parked query (>= 0.5); bodies 1 RCU each
            rcu: (shards_touched * 1.0 + N as f64 * 1.0) / N as f64,
            wcu: 0.0,
        },
    ];
    println!(
        "\n### {sequencing:?}, payload {payload} B, message item {size} B (dispatched {dispatched_size} B)\n"
    );
    println!("| operation | requests/msg | RCU/msg | WCU/msg |\n|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {:.2} | {:.2} | {:.1} |",
            r.what, r.requests, r.rcu, r.wcu
        );
    }
    let ours = add_wcu + dispatch_wcu;
    // Brighter: 4 GSIs projecting ALL; 2 sparse "outstanding" at add, moved to 2 "delivered"
    // at dispatch (each move = delete + put of a full copy).
    let brighter_add = 2.0 * wcu(size) + 2.0 * wcu(size);
    let brighter_dispatch = wcu(size) + 4.0 * wcu(size);
    let brighter_standalone = wcu(size) + 2.0 * wcu(size) + brighter_dispatch;
    println!(
        "\nadd + dispatch: ours {ours:.0} WCU in a unit of work; Brighter {:.0} WCU in a unit of work, {brighter_standalone:.0} standalone",
        brighter_add + brighter_dispatch
    );
    Some((ours, brighter_add + brighter_dispatch))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cost_report() {
    for sequencing in [Sequencing::ShardCounter, Sequencing::WriterClock] {
        for payload in [700, 1024] {
            let Some((ours, brighter)) = report(sequencing, payload).await else {
                return;
            };
            assert!(
                ours < brighter,
                "{sequencing:?}: {ours} vs Brighter {brighter}"
            );
        }
    }
}

/// A standalone `add` with writer-clock sequencing is one `PutItem`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn standalone_add_with_writer_clock_is_one_put() {
    let Some(ep) = endpoint_or_skip("standalone_add_with_writer_clock_is_one_put") else {
        return;
    };
    let config = DynamoDbConfig::new(format!("cost1_{}_", fastrand::u32(..)))
        .with_sequencing(Sequencing::WriterClock);
    let (store, _guard) = store_with(&ep, config).await.unwrap();
    let m = Message::builder("t")
        .payload(vec![0u8; 700])
        .build()
        .unwrap();
    store.meter().take();
    store.add(&m).await.unwrap();
    let add = store.meter().take();
    assert_eq!(add.len(), 1, "{add:?}");
    assert_eq!(add["add"].requests, 1);
    println!(
        "standalone add (WriterClock, item {} B): 1 PutItem, {} WCU + 1 WCU pending index",
        item_size(&store.message_item(&m)),
        wcu(item_size(&store.message_item(&m)))
    );
}
