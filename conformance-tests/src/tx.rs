//! Transaction cases: the `# Behavior` sections of [`Transaction`] and [`TransactionalStore`]
//! (outbox contract item 2 seen from the transaction's side). Every case skips when
//! `capabilities().transactions` is false.

use std::collections::BTreeSet;

use outbox_core::{
    Committed, InboxEntry, Message, MessageId, Ordering, OutboxStore, Transaction,
    TransactionalStore, shard_for,
};

use crate::harness::{Fixture, skip};
use crate::support::{
    BIG, assert_absent, fetch, get, ids, keyed, keys_in_distinct_shards, msg, msg_ids, ok,
};

fn no_transactions<S: TransactionalStore>(f: &Fixture<S>, case: &str) -> bool {
    if f.outbox.capabilities().transactions {
        false
    } else {
        skip(case, "backend has no transactions");
        true
    }
}

fn shards_of(store: &dyn OutboxStore, messages: &[&Message]) -> BTreeSet<u32> {
    messages
        .iter()
        .map(|m| shard_for(m.key.as_deref(), &m.id, store.shard_count()))
        .collect()
}

/// `commit` returns `Committed` with the added ids in add order and their shards; a
/// transaction with only business writes commits with an empty `Committed`.
pub async fn commit_reports_ids_and_shards<S: TransactionalStore>(f: &Fixture<S>) {
    if no_transactions(f, "tx_commit_reports_ids_and_shards") {
        return;
    }
    let store = &*f.outbox;
    let n = store.shard_count();
    let keys = keys_in_distinct_shards("tx", n, n.min(2) as usize);
    let a = keyed("tx", &keys[0].0);
    let b = msg("tx");
    let c = keyed("tx", &keys[keys.len() - 1].0);
    let mut tx = ok(f.tx_store.begin().await, "begin");
    for m in [&a, &b, &c] {
        ok(tx.add(m).await, "tx.add");
    }
    let committed = ok(tx.commit().await, "commit");
    assert_eq!(
        committed.ids,
        msg_ids(&[&a, &b, &c]),
        "Committed.ids in add order"
    );
    assert_eq!(
        committed.shards,
        shards_of(store, &[&a, &b, &c]),
        "Committed.shards"
    );
    assert!(!committed.is_empty());

    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "no-messages").await,
        "write business record",
    );
    let committed = ok(tx.commit().await, "commit");
    assert_eq!(committed, Committed::default(), "no message added");
    assert!(ok(f.records.exists("no-messages").await, "records.exists"));
}

/// `begin`: nothing staged is visible to others before commit (`get`, `fetch_pending`, `list`,
/// `stats`, inbox `contains`, the caller's record); everything is after commit.
pub async fn invisible_before_commit<S: TransactionalStore>(f: &Fixture<S>) {
    if no_transactions(f, "tx_invisible_before_commit") {
        return;
    }
    let store = &*f.outbox;
    let m = keyed("tx", "k");
    let e = InboxEntry::new(MessageId::new(), "handler");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "pending-record").await,
        "write business record",
    );
    ok(tx.add(&m).await, "tx.add");
    ok(tx.inbox_insert(&e).await, "tx.inbox_insert");

    assert_absent(store, m.id, "its transaction is open").await;
    assert!(
        fetch(store, Ordering::Unordered, BIG).await.is_empty(),
        "fetch_pending sees nothing"
    );
    assert!(
        ok(store.list(&Default::default()).await, "list").is_empty(),
        "list sees nothing"
    );
    assert_eq!(ok(store.stats().await, "stats").pending, 0);
    assert!(
        !ok(f.inbox.contains(&e).await, "contains"),
        "the inbox entry is invisible"
    );
    assert!(!ok(
        f.records.exists("pending-record").await,
        "records.exists"
    ));

    ok(tx.commit().await, "commit");
    assert_eq!(get(store, m.id).await.message, m);
    assert_eq!(ids(&fetch(store, Ordering::PerKey, BIG).await), vec![m.id]);
    assert!(ok(f.inbox.contains(&e).await, "contains"));
    assert!(ok(
        f.records.exists("pending-record").await,
        "records.exists"
    ));
}

/// `Transaction::add_batch` and repeated `add`: messages get their sequence in add order.
pub async fn add_order_is_sequence_order<S: TransactionalStore>(f: &Fixture<S>) {
    if no_transactions(f, "tx_add_order_is_sequence_order") {
        return;
    }
    let store = &*f.outbox;
    // Descending ids, so only the add order explains the result.
    let mut pool: Vec<MessageId> = (0..6).map(|_| MessageId::new()).collect();
    pool.reverse();
    let all: Vec<Message> = pool
        .iter()
        .map(|id| crate::support::build(Message::builder("tx").key("same-key").id(*id)))
        .collect();
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(tx.add_batch(&all[..3]).await, "tx.add_batch");
    for m in &all[3..] {
        ok(tx.add(m).await, "tx.add");
    }
    let committed = ok(tx.commit().await, "commit");
    let expected: Vec<MessageId> = all.iter().map(|m| m.id).collect();
    assert_eq!(committed.ids, expected);
    let fetched = fetch(store, Ordering::PerKey, BIG).await;
    assert_eq!(ids(&fetched), expected, "fetched in add order");
    assert!(fetched.windows(2).all(|w| w[0].sequence < w[1].sequence));

    // A later transaction's messages come after, for the same key.
    let later = keyed("tx", "same-key");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(tx.add(&later).await, "tx.add");
    ok(tx.commit().await, "commit");
    let fetched = fetch(store, Ordering::PerKey, BIG).await;
    assert_eq!(fetched.last().map(|m| m.message.id), Some(later.id));
}

/// Per-key order is commit order (contract item 7): transaction A begins and stages a message
/// of a key, then transaction B begins and stages a message of the same key. Whichever of the
/// two is ready to commit first commits first, and the other commits only after it returned:
/// B when the backend lets its writes through while A is open (then the commits happen B, A),
/// A when B's writes wait for A (SQLite's write lock, PostgreSQL's per-key lock: A, B). Either
/// way a fetch returns the key's messages in commit order. Run twice, with A's id sorting first
/// and then last, so one run always has ids that sort against commit order: only the store's
/// commit sequence explains the result.
pub async fn commit_order_is_fetch_order<S: TransactionalStore>(f: &Fixture<S>) {
    if no_transactions(f, "tx_commit_order_is_fetch_order") {
        return;
    }
    for a_sorts_first in [true, false] {
        let key = format!("commit-order-{a_sorts_first}");
        let (lo, hi) = (MessageId::new(), MessageId::new());
        let (a_id, b_id) = if a_sorts_first { (lo, hi) } else { (hi, lo) };
        let a = crate::support::build(Message::builder("tx").key(&key).id(a_id));
        let b = crate::support::build(Message::builder("tx").key(&key).id(b_id));
        // Who commits first: decided once, by whichever transaction claims it first.
        let first: std::sync::Mutex<Option<MessageId>> = std::sync::Mutex::new(None);
        let claim = |id: MessageId| -> bool {
            let mut first = first.lock().unwrap_or_else(|p| p.into_inner());
            *first.get_or_insert(id) == id
        };
        let (staged_tx, staged_rx) = tokio::sync::oneshot::channel::<()>();
        let (b_claimed, a_done, b_done) = (
            tokio::sync::Notify::new(),
            tokio::sync::Notify::new(),
            tokio::sync::Notify::new(),
        );
        let first_tx = async {
            let mut tx = ok(f.tx_store.begin().await, "begin A");
            ok(tx.add(&a).await, "A: add");
            let _ = staged_tx.send(());
            // Give B the time to claim the first commit, unless its writes wait for A.
            let _ =
                tokio::time::timeout(std::time::Duration::from_millis(300), b_claimed.notified())
                    .await;
            if !claim(a.id) {
                b_done.notified().await;
            }
            ok(tx.commit().await, "commit A");
            a_done.notify_one();
        };
        let second_tx = async {
            staged_rx.await.expect("A staged");
            let mut tx = ok(f.tx_store.begin().await, "begin B");
            ok(tx.add(&b).await, "B: add");
            if claim(b.id) {
                b_claimed.notify_one();
            } else {
                a_done.notified().await;
            }
            ok(tx.commit().await, "commit B");
            b_done.notify_one();
        };
        tokio::join!(first_tx, second_tx);
        let committed = match *first.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(id) if id == b.id => vec![b.id, a.id],
            _ => vec![a.id, b.id],
        };
        let fetched: Vec<MessageId> = fetch(&*f.outbox, Ordering::PerKey, BIG)
            .await
            .iter()
            .filter(|m| m.message.key.as_deref() == Some(key.as_str()))
            .map(|m| m.message.id)
            .collect();
        assert_eq!(
            fetched, committed,
            "the key's messages come in commit order (A's id sorts first: {a_sorts_first})"
        );
    }
}
