//! Outbox store cases: contract items 1–10 ("Outbox store" in DESIGN.md) and the `# Behavior`
//! sections of [`OutboxStore`].
//!
//! Every case expects an empty store and panics with a description of the violated behaviour.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use bytes::Bytes;
use outbox_core::{
    Clock, DateTime, ErrorKind, FailureOutcome, ListQuery, Message, MessageId, MessageStatus,
    MessageType, Ordering, OutboxStats, OutboxStore, RequeueFilter, Transaction,
    TransactionalStore, Utc, shard_for,
};

use crate::harness::Fixture;
use crate::support::{
    BIG, add, all_shards, assert_absent, assert_kind, build, err, fetch, fetch_shards, get, ids,
    keyed, keys_in_distinct_shards, minus, msg, msg_ids, ok, park, plus, retry_after, status,
};
use crate::support::{bad_names, longest_name, over_long_name};

fn micros(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(t).unwrap_or_else(|| panic!("timestamp {t} out of range"))
}

fn check_fresh(stored: &outbox_core::StoredMessage, m: &Message, shard_count: u32) {
    assert_eq!(&stored.message, m, "message fields must round-trip exactly");
    assert_eq!(
        stored.status,
        MessageStatus::Pending,
        "a new message is pending"
    );
    assert_eq!(stored.attempts, 0, "a new message has no attempts");
    assert_eq!(
        stored.next_attempt_at, None,
        "a new message has no next_attempt_at"
    );
    assert_eq!(stored.last_error, None, "a new message has no last_error");
    assert_eq!(
        stored.dispatched_at, None,
        "a new message has no dispatched_at"
    );
    assert_eq!(
        stored.shard,
        shard_for(m.key.as_deref(), &m.id, shard_count),
        "shard must be shard_for(key, id, shard_count)"
    );
}

/// Item 1: every field comes back exactly, through `get` and `fetch_pending`: all optional
/// fields set, non-UTF-8 payload bytes, unicode headers, microsecond timestamps,
/// `deliver_after`, every message type; and a minimal message with every option unset.
/// `get` of an unknown id is `None`.
pub async fn round_trip<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let now = f.clock.now();
    let full = build(
        Message::builder("orders.créés/v1")
            .key("order-ü-42")
            .payload(Bytes::from_static(&[
                0x00, 0xff, 0xfe, 0x80, 0xc3, 0x28, 0xed, 0xa0, 0x80, 0x7f, 0x0a, 0x00,
            ]))
            .header("tenant", "acme")
            .header("ключ", "値 ✓ 🚀")
            .header("empty-value", "")
            .header("x-quote", "\"';--\\")
            .content_type("application/octet-stream")
            .message_type(MessageType::Command)
            .correlation_id("corr-Ω-1")
            .reply_to("replies.orders")
            .created_at(micros(1_700_000_000_123_457))
            .deliver_after(now - chrono::Duration::microseconds(1_000_007))
            .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
            .tracestate("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
            .baggage("userId=alice,serverNode=DF%2028"),
    );
    let minimal = build(Message::builder("t"));
    let mut all = vec![full, minimal];
    for (i, t) in [
        MessageType::Event,
        MessageType::Reply,
        MessageType::Document,
        MessageType::Other("audit.snapshot".to_owned()),
    ]
    .into_iter()
    .enumerate()
    {
        all.push(build(
            Message::builder("types")
                .key(format!("type-{i}"))
                .message_type(t)
                .payload(vec![i as u8; i + 1])
                .created_at(micros(1_600_000_000_000_001 + i as i64)),
        ));
    }
    for m in &all {
        add(store, m).await;
    }
    let shard_count = store.shard_count();
    for m in &all {
        check_fresh(&get(store, m.id).await, m, shard_count);
    }
    let fetched = fetch(store, Ordering::PerKey, BIG).await;
    assert_eq!(
        fetched.len(),
        all.len(),
        "fetch_pending must return every due message"
    );
    for (stored, m) in fetched.iter().zip(&all) {
        check_fresh(stored, m, shard_count);
    }
    assert_absent(store, MessageId::new(), "never added").await;
}

/// The store's constants: `shard_count() >= 1` and unchanged, `capabilities()` unchanged, and
/// every message's shard is `shard_for(key, id, shard_count)` (keyed and unkeyed).
pub async fn shard_assignment<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let n = store.shard_count();
    assert!(n >= 1, "shard_count must be at least 1");
    let caps = store.capabilities();
    let mut all = Vec::new();
    for i in 0..20 {
        let m = if i % 2 == 0 {
            keyed("shards", &format!("key-{i}"))
        } else {
            msg("shards")
        };
        add(store, &m).await;
        all.push(m);
    }
    for m in &all {
        assert_eq!(
            get(store, m.id).await.shard,
            shard_for(m.key.as_deref(), &m.id, n),
            "shard of {:?} must be shard_for(key, id, {n})",
            m.key
        );
    }
    assert_eq!(store.shard_count(), n, "shard_count must be constant");
    assert_eq!(store.capabilities(), caps, "capabilities must be constant");
}

/// Item 2: a message added inside the caller's transaction exists after commit, together with
/// the caller's record, and is pending.
pub async fn transactional_add_commit<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let m = keyed("orders", "order-1");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "order-1").await,
        "write business record",
    );
    ok(tx.add(&m).await, "tx.add");
    let committed = ok(tx.commit().await, "commit");
    assert_eq!(
        committed.ids,
        vec![m.id],
        "Committed must list the added message"
    );
    assert!(
        ok(f.records.exists("order-1").await, "records.exists"),
        "the business record must exist after commit"
    );
    check_fresh(&get(store, m.id).await, &m, store.shard_count());
    assert_eq!(ids(&fetch(store, Ordering::PerKey, BIG).await), vec![m.id]);
}

/// Item 2: after rollback, and after dropping the transaction, neither the message nor the
/// caller's record exists, nothing is pending, and the id is free to be added again.
pub async fn transactional_add_rollback<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let rolled = keyed("orders", "order-rolled-back");
    let dropped = msg("orders");

    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "rolled-back").await,
        "write business record",
    );
    ok(tx.add(&rolled).await, "tx.add");
    ok(tx.rollback().await, "rollback");

    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "dropped").await,
        "write business record",
    );
    ok(tx.add(&dropped).await, "tx.add");
    drop(tx);

    for key in ["rolled-back", "dropped"] {
        assert!(
            !ok(f.records.exists(key).await, "records.exists"),
            "business record {key:?} must not exist after its transaction was discarded"
        );
    }
    assert_absent(store, rolled.id, "its transaction rolled back").await;
    assert_absent(store, dropped.id, "its transaction was dropped").await;
    assert!(fetch(store, Ordering::Unordered, BIG).await.is_empty());
    assert_eq!(ok(store.stats().await, "stats").pending, 0);
    // No leftovers (a stale unique key, a reserved row): the ids are still free.
    add(store, &rolled).await;
    add(store, &dropped).await;
}

/// Item 3: adding an id that is stored fails with `AlreadyExists` and the stored message is
/// unchanged; a batch containing a stored id writes nothing.
pub async fn duplicate_add_rejected<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let original = build(Message::builder("orders").key("k").payload("original"));
    add(store, &original).await;
    let mut imposter = original.clone();
    imposter.topic = "other".to_owned();
    imposter.payload = Bytes::from_static(b"changed");
    imposter.key = None;
    assert_kind(
        store.add(&imposter).await,
        ErrorKind::AlreadyExists,
        "add of a stored id",
    );
    assert_eq!(
        get(store, original.id).await.message,
        original,
        "stored message must be unchanged"
    );

    let before = msg("batch");
    let after = msg("batch");
    let e = err(
        store
            .add_batch(&[before.clone(), imposter.clone(), after.clone()])
            .await,
        "add_batch containing a stored id",
    );
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_absent(store, before.id, "its batch failed").await;
    assert_absent(store, after.id, "its batch failed").await;
    assert_eq!(
        get(store, original.id).await.message,
        original,
        "stored message must be unchanged"
    );
    assert_eq!(ok(store.stats().await, "stats").pending, 1);
}

/// Item 3: a batch with the same id twice fails with `AlreadyExists` and writes nothing; the
/// ids stay free. An empty batch is a no-op.
pub async fn duplicate_within_batch<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a = msg("batch");
    let b = msg("batch");
    let mut a_again = a.clone();
    a_again.payload = Bytes::from_static(b"second copy");
    let e = err(
        store.add_batch(&[a.clone(), b.clone(), a_again]).await,
        "add_batch with a duplicate inside",
    );
    assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    assert_absent(store, a.id, "its batch failed").await;
    assert_absent(store, b.id, "its batch failed").await;
    ok(store.add_batch(&[]).await, "add_batch(empty)");
    assert_eq!(ok(store.stats().await, "stats"), OutboxStats::default());
    ok(
        store.add_batch(&[a.clone(), b.clone()]).await,
        "add_batch after the failed one",
    );
    assert_eq!(get(store, a.id).await.message, a);
}

/// Item 3 with transactions: a transaction adding a stored id fails with `AlreadyExists` (at
/// `add` or at `commit`) and nothing of it is written: not its other messages, not the
/// caller's record.
pub async fn duplicate_add_in_transaction<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let original = msg("orders");
    add(store, &original).await;
    let fresh = msg("orders");
    let mut dup = original.clone();
    dup.payload = Bytes::from_static(b"changed");

    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "dup-tx").await,
        "write business record",
    );
    ok(tx.add(&fresh).await, "tx.add(fresh)");
    if store.capabilities().duplicate_id_at_add {
        let e = err(tx.add(&dup).await, "tx.add of a stored id");
        assert_eq!(
            e.kind(),
            ErrorKind::AlreadyExists,
            "tx.add of a stored id: {e}"
        );
        drop(tx);
    } else {
        // Found at commit: the backend cannot read inside a transaction.
        ok(
            tx.add(&dup).await,
            "tx.add of a stored id (duplicate_id_at_add = false)",
        );
        let e = err(
            tx.commit().await,
            "commit of a transaction adding a stored id",
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    }
    assert_absent(store, fresh.id, "its transaction failed").await;
    assert!(
        !ok(f.records.exists("dup-tx").await, "records.exists"),
        "the business record of a failed transaction must not exist"
    );
    assert_eq!(
        get(store, original.id).await.message,
        original,
        "stored message must be unchanged"
    );
}

/// `add_batch` stores messages in slice order: sequences increase along the slice and
/// `fetch_pending` returns them in that order.
pub async fn add_batch_in_order<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    // Ids in descending order, so an implementation ordering by id fails.
    let mut id_pool: Vec<MessageId> = (0..6).map(|_| MessageId::new()).collect();
    id_pool.reverse();
    let batch: Vec<Message> = id_pool
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let b = Message::builder("batch").id(*id);
            build(if i % 2 == 0 {
                b.key(format!("k{i}"))
            } else {
                b
            })
        })
        .collect();
    ok(store.add_batch(&batch).await, "add_batch");
    let mut last = None;
    for m in &batch {
        let seq = get(store, m.id).await.sequence;
        if let Some(prev) = last {
            assert!(
                seq > prev,
                "sequence must follow slice order ({seq} after {prev})"
            );
        }
        last = Some(seq);
    }
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        batch.iter().map(|m| m.id).collect::<Vec<_>>(),
        "fetch_pending must return the batch in slice order"
    );
}

/// A batch over `capabilities().max_batch` fails with `LimitExceeded` and writes nothing; a
/// batch of exactly the limit succeeds. Needs a batch limit (registered only with one).
pub async fn batch_limit<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let limit = store
        .capabilities()
        .max_batch
        .expect("store_batch_limit needs Capabilities::max_batch");
    let too_many: Vec<Message> = (0..=limit).map(|_| msg("batch")).collect();
    let e = err(store.add_batch(&too_many).await, "add_batch over max_batch");
    assert_eq!(
        e.kind(),
        ErrorKind::LimitExceeded {
            count: limit + 1,
            limit
        },
        "{e}"
    );
    for m in &too_many {
        assert_absent(store, m.id, "its batch was over the limit").await;
    }
    ok(
        store.add_batch(&too_many[..limit]).await,
        "add_batch of exactly max_batch",
    );
    assert_eq!(ok(store.stats().await, "stats").pending, limit as u64);
}

/// Item 4: only due messages: `deliver_after` in the future is excluded until the clock
/// reaches it (inclusive).
pub async fn fetch_only_due<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let now = f.clock.now();
    let immediate = msg("due");
    let in_30 = build(Message::builder("due").deliver_after(plus(now, 30)));
    let in_60 = build(Message::builder("due").deliver_after(plus(now, 60)));
    let past = build(Message::builder("due").deliver_after(minus(now, 60)));
    for m in [&immediate, &in_30, &in_60, &past] {
        add(store, m).await;
    }
    for ordering in [Ordering::PerKey, Ordering::Unordered] {
        assert_eq!(
            ids(&fetch(store, ordering, BIG).await),
            msg_ids(&[&immediate, &past]),
            "only messages with deliver_after <= now are due ({ordering:?})"
        );
    }
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&immediate, &in_30, &past]),
        "deliver_after == now is due"
    );
    f.clock.advance(Duration::from_secs(30));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&immediate, &in_30, &in_60, &past])
    );
}

/// Item 4: only the requested shards; an empty shard list returns nothing.
pub async fn fetch_only_requested_shards<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let n = store.shard_count();
    let ordering = Ordering::PerKey;
    if n < 2 {
        let m = msg("single");
        add(store, &m).await;
        assert_eq!(
            ids(&fetch_shards(store, vec![0], ordering, BIG).await),
            vec![m.id]
        );
        assert!(fetch_shards(store, vec![], ordering, BIG).await.is_empty());
        return; // a single shard: only [0] and [] can be checked
    }
    let keys = keys_in_distinct_shards("shard", n, if n >= 3 { 3 } else { 2 });
    let (ka, sa) = &keys[0];
    let (kb, sb) = &keys[1];
    let a1 = keyed("shards", ka);
    let b1 = keyed("shards", kb);
    let a2 = keyed("shards", ka);
    let unkeyed = msg("shards");
    let su = shard_for(None, &unkeyed.id, n);
    for m in [&a1, &b1, &a2, &unkeyed] {
        add(store, m).await;
    }
    let expect = |shards: &[u32]| -> Vec<MessageId> {
        [&a1, &b1, &a2, &unkeyed]
            .into_iter()
            .filter(|m| shards.contains(&shard_for(m.key.as_deref(), &m.id, n)))
            .map(|m| m.id)
            .collect()
    };
    for shards in [
        vec![*sa],
        vec![*sb],
        vec![su],
        vec![*sa, *sb],
        all_shards(store),
    ] {
        assert_eq!(
            ids(&fetch_shards(store, shards.clone(), ordering, BIG).await),
            expect(&shards),
            "fetch_pending of shards {shards:?}"
        );
    }
    assert!(
        fetch_shards(store, vec![], ordering, BIG).await.is_empty(),
        "an empty shard list means no shard"
    );
    if let Some((_, sc)) = keys.get(2)
        && ![*sa, *sb, su].contains(sc)
    {
        assert!(
            fetch_shards(store, vec![*sc], ordering, BIG)
                .await
                .is_empty(),
            "shard {sc} holds no message"
        );
    }
}

/// Item 4: oldest first by store sequence (not by id or `created_at`), across shards, at most
/// `limit` (0 returns nothing).
pub async fn fetch_oldest_first_and_limit<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let now = f.clock.now();
    let mut id_pool: Vec<MessageId> = (0..10).map(|_| MessageId::new()).collect();
    id_pool.reverse();
    let mut added = Vec::new();
    for (i, id) in id_pool.into_iter().enumerate() {
        // Descending ids and created_at: only the store sequence gives add order.
        let m = build(
            Message::builder("order")
                .id(id)
                .created_at(minus(now, i as i64)),
        );
        add(store, &m).await;
        added.push(m.id);
    }
    for ordering in [Ordering::PerKey, Ordering::Unordered] {
        let all = fetch(store, ordering, BIG).await;
        assert_eq!(
            ids(&all),
            added,
            "oldest first by store sequence ({ordering:?})"
        );
        assert!(
            all.windows(2).all(|w| w[0].sequence < w[1].sequence),
            "sequences must be strictly increasing in add order"
        );
        for limit in [0, 1, 3, 10, 11] {
            assert_eq!(
                ids(&fetch(store, ordering, limit).await),
                added[..limit.min(added.len())].to_vec(),
                "at most limit = {limit}, oldest first ({ordering:?})"
            );
        }
    }
}

/// Item 5: `mark_dispatched` sets `Dispatched` and `dispatched_at = now`; a repeat (also with
/// unknown ids or an empty list) succeeds and changes nothing; the message is never pending
/// again: not fetched, not requeued, `mark_failed` reports `NotPending`.
pub async fn mark_dispatched_idempotent<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a = keyed("dispatch", "k");
    let b = keyed("dispatch", "k");
    add(store, &a).await;
    add(store, &b).await;
    let at = f.clock.now();
    ok(store.mark_dispatched(&[a.id]).await, "mark_dispatched");
    let stored = get(store, a.id).await;
    assert_eq!(stored.status, MessageStatus::Dispatched);
    assert_eq!(
        stored.dispatched_at,
        Some(at),
        "dispatched_at must be the store clock's now"
    );
    assert_eq!(stored.message, a);
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        vec![b.id],
        "a dispatched head no longer holds back its key"
    );

    f.clock.advance(Duration::from_secs(5));
    ok(
        store.mark_dispatched(&[a.id, MessageId::new()]).await,
        "repeated mark_dispatched",
    );
    ok(store.mark_dispatched(&[]).await, "mark_dispatched(empty)");
    assert_eq!(
        get(store, a.id).await,
        stored,
        "a repeated mark_dispatched changes nothing"
    );

    assert_eq!(
        ok(store.requeue(&RequeueFilter::All).await, "requeue(All)"),
        0
    );
    assert_eq!(
        ok(
            store.requeue(&RequeueFilter::Ids(vec![a.id])).await,
            "requeue(Ids)"
        ),
        0
    );
    let outcome = ok(
        store
            .mark_failed(
                a.id,
                &retry_after(&f.clock, Duration::from_secs(1), 5, "late"),
            )
            .await,
        "mark_failed of a dispatched message",
    );
    assert_eq!(outcome, FailureOutcome::NotPending);
    assert_eq!(
        get(store, a.id).await,
        stored,
        "a dispatched message stays unchanged"
    );
    f.clock.advance(Duration::from_secs(3600));
    for ordering in [Ordering::PerKey, Ordering::Unordered] {
        assert_eq!(ids(&fetch(store, ordering, BIG).await), vec![b.id]);
    }
    assert_eq!(ok(store.stats().await, "stats").pending, 1);
}

/// Item 5: a late confirmation wins: `mark_dispatched` of a parked message makes it
/// `Dispatched`.
pub async fn mark_dispatched_parked<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let m = msg("late");
    add(store, &m).await;
    park(store, &f.clock, m.id).await;
    ok(
        store.mark_dispatched(&[m.id]).await,
        "mark_dispatched of a parked message",
    );
    let stored = get(store, m.id).await;
    assert_eq!(stored.status, MessageStatus::Dispatched);
    assert_eq!(stored.dispatched_at, Some(f.clock.now()));
    let stats = ok(store.stats().await, "stats");
    assert_eq!((stats.pending, stats.parked), (0, 0));
    assert_eq!(
        ok(store.requeue(&RequeueFilter::All).await, "requeue(All)"),
        0
    );
}

/// Item 6: a failure increments `attempts`, stores the error and `next_attempt_at`; the message
/// stays pending but is not due before `next_attempt_at` (inclusive). Unknown id: `NotFound`.
pub async fn mark_failed_backoff<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let m = msg("fail");
    add(store, &m).await;
    let first = retry_after(
        &f.clock,
        Duration::from_secs(10),
        5,
        "broker down: timeout ☂",
    );
    let outcome = ok(store.mark_failed(m.id, &first).await, "mark_failed");
    assert_eq!(
        outcome,
        FailureOutcome::Retrying {
            attempts: 1,
            next_attempt_at: first.next_attempt_at
        }
    );
    let stored = get(store, m.id).await;
    assert_eq!(stored.status, MessageStatus::Pending);
    assert_eq!(stored.attempts, 1);
    assert_eq!(stored.last_error.as_deref(), Some(first.error.as_str()));
    assert_eq!(stored.next_attempt_at, Some(first.next_attempt_at));
    assert_eq!(stored.message, m, "a failure does not touch the message");
    assert!(
        fetch(store, Ordering::Unordered, BIG).await.is_empty(),
        "not due before next_attempt_at"
    );
    assert_eq!(
        ok(store.stats().await, "stats").pending,
        1,
        "a backing-off message is pending"
    );
    f.clock.advance(Duration::from_secs(9));
    assert!(
        fetch(store, Ordering::Unordered, BIG).await.is_empty(),
        "not due before next_attempt_at"
    );
    f.clock.advance(Duration::from_secs(1));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        vec![m.id],
        "due at next_attempt_at"
    );

    let second = retry_after(&f.clock, Duration::from_secs(20), 5, "second failure");
    let outcome = ok(store.mark_failed(m.id, &second).await, "mark_failed");
    assert_eq!(
        outcome,
        FailureOutcome::Retrying {
            attempts: 2,
            next_attempt_at: second.next_attempt_at
        }
    );
    let stored = get(store, m.id).await;
    assert_eq!(stored.attempts, 2);
    assert_eq!(stored.last_error.as_deref(), Some("second failure"));
    assert!(fetch(store, Ordering::Unordered, BIG).await.is_empty());

    assert_kind(
        store.mark_failed(MessageId::new(), &second).await,
        ErrorKind::NotFound,
        "mark_failed of an unknown id",
    );
}

/// Item 6: when `attempts` reaches `max_attempts` the message is parked: no longer pending or
/// fetched (ever), counted as parked; further failures return `NotPending` and change nothing.
pub async fn mark_failed_parks_after_max_attempts<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let m = msg("park");
    add(store, &m).await;
    for (i, expected_attempts) in [1_u32, 2].into_iter().enumerate() {
        let attempt = retry_after(&f.clock, Duration::ZERO, 3, &format!("failure {i}"));
        let outcome = ok(store.mark_failed(m.id, &attempt).await, "mark_failed");
        assert_eq!(
            outcome,
            FailureOutcome::Retrying {
                attempts: expected_attempts,
                next_attempt_at: attempt.next_attempt_at
            }
        );
    }
    let last = retry_after(&f.clock, Duration::ZERO, 3, "final failure");
    let outcome = ok(store.mark_failed(m.id, &last).await, "mark_failed");
    assert_eq!(outcome, FailureOutcome::Parked { attempts: 3 });
    let stored = get(store, m.id).await;
    assert_eq!(stored.status, MessageStatus::Parked);
    assert_eq!(stored.attempts, 3);
    assert_eq!(stored.last_error.as_deref(), Some("final failure"));

    f.clock.advance(Duration::from_secs(86_400));
    for ordering in [Ordering::PerKey, Ordering::Unordered] {
        assert!(
            fetch(store, ordering, BIG).await.is_empty(),
            "parked is never fetched"
        );
    }
    let stats = ok(store.stats().await, "stats");
    assert_eq!((stats.pending, stats.parked), (0, 1));
    assert_eq!(stats.oldest_pending_age, None);

    let again = ok(
        store
            .mark_failed(
                m.id,
                &retry_after(&f.clock, Duration::ZERO, 3, "after parking"),
            )
            .await,
        "mark_failed of a parked message",
    );
    assert_eq!(again, FailureOutcome::NotPending);
    assert_eq!(
        get(store, m.id).await,
        stored,
        "a parked message stays unchanged"
    );

    let once = msg("park");
    add(store, &once).await;
    park(store, &f.clock, once.id).await;
    assert_eq!(status(store, once.id).await, MessageStatus::Parked);
}

/// Item 6: `requeue` returns matching parked messages to pending with `attempts = 0`, no
/// `next_attempt_at` (due at once) and the same sequence; by ids, by topic and all; pending
/// and dispatched messages are untouched; returns the count.
pub async fn requeue_parked<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let p1 = msg("topic-a");
    let p2 = msg("topic-b");
    let p3 = msg("topic-c");
    let pending = msg("topic-b");
    let dispatched = msg("topic-b");
    for m in [&p1, &p2, &p3, &pending, &dispatched] {
        add(store, m).await;
    }
    for m in [&p1, &p2, &p3] {
        park(store, &f.clock, m.id).await;
    }
    let backoff = retry_after(&f.clock, Duration::from_secs(600), 10, "retrying");
    ok(store.mark_failed(pending.id, &backoff).await, "mark_failed");
    ok(
        store.mark_dispatched(&[dispatched.id]).await,
        "mark_dispatched",
    );
    let pending_before = get(store, pending.id).await;
    let dispatched_before = get(store, dispatched.id).await;
    let p1_before = get(store, p1.id).await;

    let n = ok(
        store
            .requeue(&RequeueFilter::Ids(vec![
                p1.id,
                pending.id,
                dispatched.id,
                MessageId::new(),
            ]))
            .await,
        "requeue(Ids)",
    );
    assert_eq!(n, 1, "only parked messages are requeued");
    let p1_after = get(store, p1.id).await;
    assert_eq!(p1_after.status, MessageStatus::Pending);
    assert_eq!(p1_after.attempts, 0);
    assert_eq!(p1_after.next_attempt_at, None);
    assert_eq!(
        p1_after.sequence, p1_before.sequence,
        "requeue keeps the sequence"
    );
    assert_eq!(p1_after.message, p1);
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        vec![p1.id],
        "a requeued message is due at once"
    );

    let n = ok(
        store
            .requeue(&RequeueFilter::Topic("topic-b".to_owned()))
            .await,
        "requeue(Topic)",
    );
    assert_eq!(
        n, 1,
        "requeue(Topic) touches only parked messages of that topic"
    );
    assert_eq!(status(store, p2.id).await, MessageStatus::Pending);
    assert_eq!(status(store, p3.id).await, MessageStatus::Parked);

    assert_eq!(
        ok(store.requeue(&RequeueFilter::All).await, "requeue(All)"),
        1
    );
    assert_eq!(status(store, p3.id).await, MessageStatus::Pending);
    assert_eq!(
        ok(store.requeue(&RequeueFilter::All).await, "requeue(All)"),
        0
    );

    assert_eq!(
        get(store, pending.id).await,
        pending_before,
        "pending messages are untouched"
    );
    assert_eq!(
        get(store, dispatched.id).await,
        dispatched_before,
        "dispatched messages are untouched"
    );
    let stats = ok(store.stats().await, "stats");
    assert_eq!((stats.pending, stats.parked), (4, 0));
}

/// Item 7: while the head message of a key is backing off, later messages of that key wait
/// (not other keys, not unkeyed messages); `Ordering::Unordered` opts out; once due, the key
/// comes back in sequence order.
pub async fn per_key_failing_head_blocks_key<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a1 = keyed("k", "key-a");
    let b1 = keyed("k", "key-b");
    let a2 = keyed("k", "key-a");
    let u1 = msg("k");
    let a3 = keyed("k", "key-a");
    for m in [&a1, &b1, &a2, &u1, &a3] {
        add(store, m).await;
    }
    ok(
        store
            .mark_failed(
                a1.id,
                &retry_after(&f.clock, Duration::from_secs(60), 10, "down"),
            )
            .await,
        "mark_failed",
    );
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&b1, &u1]),
        "a backing-off head holds back its key only"
    );
    assert_eq!(
        ids(&fetch(store, Ordering::Unordered, BIG).await),
        msg_ids(&[&b1, &a2, &u1, &a3]),
        "Unordered ignores key order"
    );
    f.clock.advance(Duration::from_secs(60));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&a1, &b1, &a2, &u1, &a3])
    );
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, 2).await),
        msg_ids(&[&a1, &b1])
    );
    ok(store.mark_dispatched(&[a1.id]).await, "mark_dispatched");
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&b1, &a2, &u1, &a3])
    );
}

/// Item 7: a parked head holds back its key (for good) until it is requeued, where it keeps
/// its place, or dispatched.
pub async fn per_key_parked_head_blocks_key<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a1 = keyed("k", "key-a");
    let a2 = keyed("k", "key-a");
    let b1 = keyed("k", "key-b");
    for m in [&a1, &a2, &b1] {
        add(store, m).await;
    }
    park(store, &f.clock, a1.id).await;
    f.clock.advance(Duration::from_secs(86_400));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        vec![b1.id],
        "a parked head holds back its key"
    );
    assert_eq!(
        ids(&fetch(store, Ordering::Unordered, BIG).await),
        msg_ids(&[&a2, &b1]),
        "Unordered ignores key order"
    );
    assert_eq!(
        ok(
            store.requeue(&RequeueFilter::Ids(vec![a1.id])).await,
            "requeue"
        ),
        1
    );
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&a1, &a2, &b1]),
        "a requeued head keeps its place"
    );
    park(store, &f.clock, a1.id).await;
    ok(
        store.mark_dispatched(&[a1.id]).await,
        "mark_dispatched of the parked head",
    );
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&a2, &b1])
    );
}

/// Item 7: a head message with `deliver_after` in the future holds back its key.
pub async fn per_key_delayed_head_blocks_key<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a1 = build(
        Message::builder("k")
            .key("key-a")
            .deliver_after(plus(f.clock.now(), 60)),
    );
    let a2 = keyed("k", "key-a");
    let b1 = keyed("k", "key-b");
    for m in [&a1, &a2, &b1] {
        add(store, m).await;
    }
    assert_eq!(ids(&fetch(store, Ordering::PerKey, BIG).await), vec![b1.id]);
    assert_eq!(
        ids(&fetch(store, Ordering::Unordered, BIG).await),
        msg_ids(&[&a2, &b1])
    );
    f.clock.advance(Duration::from_secs(60));
    assert_eq!(
        ids(&fetch(store, Ordering::PerKey, BIG).await),
        msg_ids(&[&a1, &a2, &b1])
    );
}

/// Item 7 with concurrent writers: 16 tasks each commit 8 transactions of 2 messages for one
/// shared key (standalone `add_batch` calls without transactions). Draining with `PerKey`
/// returns every message once, sequences strictly increasing, each task's messages in its
/// own order, and — whenever a transaction's commit returned before another's began — the
/// earlier one first (commit order).
pub async fn per_key_order_concurrent_writers<S: TransactionalStore + 'static>(f: &Fixture<S>) {
    const TASKS: usize = 16;
    const TXS: usize = 8;
    const PER_TX: usize = 2;
    let transactions = f.outbox.capabilities().transactions;
    // Logical clock: every commit is bracketed by two ticks.
    let ticks = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let outbox = f.outbox.clone();
        let tx_store = f.tx_store.clone();
        let ticks = ticks.clone();
        let barrier = barrier.clone();
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            // (message id, task, index within task, tick before commit, tick after commit)
            let mut log: Vec<(MessageId, usize, usize, u64, u64)> = Vec::new();
            for t in 0..TXS {
                let batch: Vec<Message> = (0..PER_TX)
                    .map(|j| {
                        build(
                            Message::builder("hot")
                                .key("hot-key")
                                .payload(format!("{task}/{t}/{j}")),
                        )
                    })
                    .collect();
                let before;
                if transactions {
                    let mut tx = ok(tx_store.begin().await, "begin");
                    for m in &batch {
                        ok(tx.add(m).await, "tx.add");
                    }
                    before = ticks.fetch_add(1, AtomicOrdering::SeqCst);
                    ok(tx.commit().await, "commit");
                } else {
                    before = ticks.fetch_add(1, AtomicOrdering::SeqCst);
                    ok(outbox.add_batch(&batch).await, "add_batch");
                }
                let after = ticks.fetch_add(1, AtomicOrdering::SeqCst);
                for (j, m) in batch.iter().enumerate() {
                    log.push((m.id, task, t * PER_TX + j, before, after));
                }
            }
            log
        }));
    }
    let mut log = Vec::new();
    for h in handles {
        log.extend(h.await.expect("writer task panicked"));
    }
    let total = TASKS * TXS * PER_TX;
    assert_eq!(log.len(), total);

    let store = &*f.outbox;
    let mut drained = Vec::new();
    loop {
        let batch = fetch(store, Ordering::PerKey, 50).await;
        if batch.is_empty() {
            break;
        }
        assert!(
            drained.len() + batch.len() <= total,
            "fetch_pending returned more than was added"
        );
        ok(store.mark_dispatched(&ids(&batch)).await, "mark_dispatched");
        drained.extend(batch);
    }
    assert_eq!(
        drained.len(),
        total,
        "every committed message is fetched exactly once"
    );
    assert!(
        drained.windows(2).all(|w| w[0].sequence < w[1].sequence),
        "one key is drained in strictly increasing sequence"
    );
    let position: BTreeMap<MessageId, usize> = drained
        .iter()
        .enumerate()
        .map(|(i, m)| (m.message.id, i))
        .collect();
    assert_eq!(position.len(), total, "no message is fetched twice");
    let mut last_of_task: Vec<Option<usize>> = vec![None; TASKS];
    let mut by_pos: Vec<_> = log.iter().map(|e| (position[&e.0], e)).collect();
    by_pos.sort_by_key(|(p, _)| *p);
    for (_, (id, task, index, _, _)) in &by_pos {
        if let Some(prev) = last_of_task[*task] {
            assert!(
                *index > prev,
                "task {task}: message #{index} ({id}) fetched after its later message #{prev}"
            );
        }
        last_of_task[*task] = Some(*index);
    }
    for (id_x, _, _, _, after_x) in &log {
        for (id_y, _, _, before_y, _) in &log {
            if after_x < before_y {
                assert!(
                    position[id_x] < position[id_y],
                    "{id_x} was committed before the commit of {id_y} began, \
                     but is published after it"
                );
            }
        }
    }
}

/// Item 8: pending count (due or not), parked count, and the age of the oldest pending
/// message by `created_at` (not by sequence), following the store's clock.
pub async fn stats_counts_and_oldest_age<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    assert_eq!(
        ok(store.stats().await, "stats"),
        OutboxStats {
            pending: 0,
            parked: 0,
            oldest_pending_age: None
        }
    );
    let now = f.clock.now();
    let recent = build(Message::builder("stats").created_at(minus(now, 10)));
    let oldest = build(Message::builder("stats").created_at(minus(now, 30)));
    let newest = build(Message::builder("stats").created_at(now));
    let delayed = build(
        Message::builder("stats")
            .created_at(minus(now, 5))
            .deliver_after(plus(now, 3600)),
    );
    for m in [&recent, &oldest, &newest, &delayed] {
        add(store, m).await;
    }
    let stats = |p: u64, k: u64, age: Option<u64>| OutboxStats {
        pending: p,
        parked: k,
        oldest_pending_age: age.map(Duration::from_secs),
    };
    assert_eq!(ok(store.stats().await, "stats"), stats(4, 0, Some(30)));
    f.clock.advance(Duration::from_secs(5));
    assert_eq!(
        ok(store.stats().await, "stats"),
        stats(4, 0, Some(35)),
        "age follows the clock"
    );
    park(store, &f.clock, oldest.id).await;
    assert_eq!(ok(store.stats().await, "stats"), stats(3, 1, Some(15)));
    ok(
        store.mark_dispatched(&[recent.id, newest.id]).await,
        "mark_dispatched",
    );
    assert_eq!(ok(store.stats().await, "stats"), stats(1, 1, Some(10)));
    ok(
        store.mark_dispatched(&[delayed.id]).await,
        "mark_dispatched",
    );
    assert_eq!(ok(store.stats().await, "stats"), stats(0, 1, None));
}

/// Item 9: `purge_dispatched` deletes only dispatched messages older than the retention, at
/// most `limit` per call (callers loop until a call returns less); pending and parked
/// messages are never deleted, whatever the retention.
pub async fn purge_dispatched_retention_and_limit<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let old: Vec<Message> = (0..5).map(|_| msg("purge")).collect();
    let young = msg("purge");
    let pending = msg("purge");
    let parked = msg("purge");
    for m in old.iter().chain([&young, &pending, &parked]) {
        add(store, m).await;
    }
    ok(
        store.mark_dispatched(&ids_of(&old)).await,
        "mark_dispatched",
    );
    f.clock.advance(Duration::from_secs(30 * 60));
    ok(store.mark_dispatched(&[young.id]).await, "mark_dispatched");
    park(store, &f.clock, parked.id).await;
    f.clock.advance(Duration::from_secs(40 * 60));
    // Now: old dispatched 70 min ago, young 40 min ago; retention 1 h.
    let hour = Duration::from_secs(3600);
    let mut counts = Vec::new();
    loop {
        let n = ok(store.purge_dispatched(hour, 2).await, "purge_dispatched");
        assert!(n <= 2, "purge_dispatched deleted {n} with limit 2");
        counts.push(n);
        if n < 2 {
            break;
        }
        assert!(
            counts.len() <= 5,
            "purge_dispatched keeps returning the limit: {counts:?}"
        );
    }
    assert_eq!(
        counts.iter().sum::<u64>(),
        5,
        "every expired dispatched message is purged: {counts:?}"
    );
    for m in &old {
        assert_absent(store, m.id, "purged").await;
    }
    assert_eq!(
        status(store, young.id).await,
        MessageStatus::Dispatched,
        "within retention"
    );
    assert_eq!(
        ok(store.purge_dispatched(hour, 100).await, "purge_dispatched"),
        0
    );

    assert_eq!(
        ok(
            store.purge_dispatched(Duration::ZERO, 100).await,
            "purge_dispatched(0)"
        ),
        1,
        "with zero retention every dispatched message goes"
    );
    assert_absent(store, young.id, "purged").await;
    assert_eq!(
        status(store, pending.id).await,
        MessageStatus::Pending,
        "pending is never purged"
    );
    assert_eq!(
        status(store, parked.id).await,
        MessageStatus::Parked,
        "parked is never purged"
    );
    let stats = ok(store.stats().await, "stats");
    assert_eq!((stats.pending, stats.parked), (1, 1));
}

fn ids_of(v: &[Message]) -> Vec<MessageId> {
    v.iter().map(|m| m.id).collect()
}

/// Item 10: a message over `capabilities().max_message_size` fails with
/// `PayloadTooLarge { size > limit, limit }` at `add`, `add_batch` and `Transaction::add`, and
/// nothing is written; a message of half the limit is stored untruncated. Needs a size limit
/// (registered only with one).
pub async fn size_limit<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let caps = store.capabilities();
    let limit = caps
        .max_message_size
        .expect("store_size_limit needs Capabilities::max_message_size");
    let check = |e: outbox_core::Error, what: &str| match e.kind() {
        ErrorKind::PayloadTooLarge { size, limit: l } => {
            assert_eq!(
                l, limit,
                "{what}: the error must report the backend's limit"
            );
            assert!(
                size > limit,
                "{what}: reported size {size} must exceed the limit {limit}"
            );
        }
        other => panic!("{what}: expected PayloadTooLarge, got {other}: {e}"),
    };
    let big = build(Message::builder("big").payload(vec![0xab_u8; limit + 1]));
    check(err(store.add(&big).await, "add over the limit"), "add");
    assert_absent(store, big.id, "too large").await;

    let small = msg("big");
    check(
        err(
            store.add_batch(&[small.clone(), big.clone()]).await,
            "add_batch over the limit",
        ),
        "add_batch",
    );
    assert_absent(store, small.id, "its batch failed").await;

    if caps.transactions {
        let mut tx = ok(f.tx_store.begin().await, "begin");
        check(err(tx.add(&big).await, "tx.add over the limit"), "tx.add");
        drop(tx);
        assert_absent(store, big.id, "too large").await;
    }

    let half = build(Message::builder("big").payload(vec![0xcd_u8; limit / 2]));
    add(store, &half).await;
    assert_eq!(
        get(store, half.id).await.message,
        half,
        "nothing is truncated"
    );
    assert_eq!(ok(store.stats().await, "stats").pending, 1);
}

/// Invalid fields (set through the public fields, bypassing the builder) fail with
/// `InvalidInput` at `add`, `add_batch` and `Transaction::add`; nothing is written. The rules
/// are the shared ones of `outbox_core::rules`, the same on every backend: names (topic,
/// header name) not empty; no NUL in any text (also header values and trace fields); at most
/// `MAX_FIELD_LEN` bytes (counted in bytes, not characters) for names, key and short fields.
pub async fn invalid_input<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let mut cases: Vec<(String, Message)> = Vec::new();
    let mut m = msg("t");
    m.topic = String::new();
    cases.push(("empty topic".to_owned(), m));
    let mut m = msg("t");
    m.key = Some("nul\0key".to_owned());
    cases.push(("NUL in key".to_owned(), m));
    let mut m = msg("t");
    m.headers.insert(String::new(), "v".to_owned());
    cases.push(("empty header name".to_owned(), m));
    let mut m = msg("t");
    m.topic = "t".repeat(outbox_core::MAX_FIELD_LEN + 1);
    cases.push(("topic over MAX_FIELD_LEN".to_owned(), m));
    // The shared rules (outbox_core::rules): the same refusals on every backend.
    for (what, name) in bad_names() {
        let mut m = msg("t");
        m.topic = name.clone();
        cases.push((format!("topic {what}"), m));
        let mut m = msg("t");
        m.headers.insert(name, "v".to_owned());
        cases.push((format!("header name {what}"), m));
    }
    let mut m = msg("t");
    m.key = Some(over_long_name("k"));
    cases.push(("key one byte over MAX_FIELD_LEN".to_owned(), m));
    let mut m = msg("t");
    m.headers.insert("h".to_owned(), "nul\0value".to_owned());
    cases.push(("NUL in a header value".to_owned(), m));
    let mut m = msg("t");
    m.content_type = Some("text/plain\0".to_owned());
    cases.push(("NUL in content_type".to_owned(), m));
    let mut m = msg("t");
    m.correlation_id = Some(over_long_name("c"));
    cases.push(("correlation_id one byte over MAX_FIELD_LEN".to_owned(), m));
    for field in ["traceparent", "tracestate", "baggage"] {
        let mut m = msg("t");
        let trace = &mut m.trace;
        let slot = match field {
            "traceparent" => &mut trace.traceparent,
            "tracestate" => &mut trace.tracestate,
            _ => &mut trace.baggage,
        };
        *slot = Some("a\0b".to_owned());
        cases.push((format!("NUL in {field}"), m));
    }
    let transactions = store.capabilities().transactions;
    for (what, bad) in &cases {
        assert_kind(
            store.add(bad).await,
            ErrorKind::InvalidInput,
            &format!("add ({what})"),
        );
        let good = msg("t");
        assert_kind(
            store.add_batch(&[good.clone(), bad.clone()]).await,
            ErrorKind::InvalidInput,
            &format!("add_batch ({what})"),
        );
        assert_absent(store, good.id, "its batch was invalid").await;
        if transactions {
            let mut tx = ok(f.tx_store.begin().await, "begin");
            assert_kind(
                tx.add(bad).await,
                ErrorKind::InvalidInput,
                &format!("tx.add ({what})"),
            );
            ok(tx.rollback().await, "rollback");
        }
        assert_absent(store, bad.id, what).await;
    }
    assert_eq!(ok(store.stats().await, "stats"), OutboxStats::default());
}

/// The longest names the shared rules allow (topic, key, header name, content type,
/// correlation id and reply-to of exactly `MAX_FIELD_LEN` bytes, in multi-byte characters)
/// and a long header value are stored and come back exactly, through `add`, `add_batch` and
/// (with transactions) `Transaction::add`, via `get` and `fetch_pending`.
pub async fn longest_names_round_trip<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let longest = |n: usize| {
        build(
            Message::builder(longest_name(&format!("topic-{n}-")))
                .key(longest_name(&format!("key-{n}-")))
                .header(
                    longest_name("header-a-"),
                    "ü".repeat(4 * outbox_core::MAX_FIELD_LEN),
                )
                .header(longest_name("header-b-"), longest_name("value-"))
                .content_type(longest_name("type/"))
                .correlation_id(longest_name("corr-"))
                .reply_to(longest_name("reply-"))
                .payload(vec![0xc3_u8, 0x28, 0x00]),
        )
    };
    let single = longest(0);
    add(store, &single).await;
    let batch = [longest(1), longest(2)];
    ok(store.add_batch(&batch).await, "add_batch(longest names)");
    let mut all = vec![single];
    all.extend(batch);
    if store.capabilities().transactions {
        let m = longest(3);
        let mut tx = ok(f.tx_store.begin().await, "begin");
        ok(tx.add(&m).await, "tx.add(longest names)");
        ok(tx.commit().await, "commit");
        all.push(m);
    }
    let shard_count = store.shard_count();
    for m in &all {
        check_fresh(&get(store, m.id).await, m, shard_count);
    }
    let fetched = fetch(store, Ordering::Unordered, BIG).await;
    assert_eq!(fetched.len(), all.len(), "every message is due");
    for stored in &fetched {
        let m = all
            .iter()
            .find(|m| m.id == stored.message.id)
            .unwrap_or_else(|| panic!("fetched an unknown message {}", stored.message.id));
        check_fresh(stored, m, shard_count);
    }
}

/// The shared rule for `last_error` (`outbox_core::rules::error_text`), the same on every
/// backend, retrying or parked: a NUL in the error text is kept as U+FFFD; a text of exactly
/// `MAX_LAST_ERROR` bytes is kept whole; a longer one is cut at a character boundary to at
/// most `MAX_LAST_ERROR` bytes ending in `...`, a prefix of the original.
pub async fn last_error_rule<S: TransactionalStore>(f: &Fixture<S>) {
    use outbox_core::rules::MAX_LAST_ERROR;
    let store = &*f.outbox;
    let exact = "ü".repeat(MAX_LAST_ERROR / 2);
    let long = format!("x{}", "ü".repeat(MAX_LAST_ERROR));
    for max_attempts in [5, 1] {
        let stored_error = |error: String| async move {
            let m = msg("errors");
            add(store, &m).await;
            let attempt = retry_after(&f.clock, Duration::from_secs(10), max_attempts, &error);
            ok(store.mark_failed(m.id, &attempt).await, "mark_failed");
            get(store, m.id)
                .await
                .last_error
                .unwrap_or_else(|| panic!("no last_error stored for {max_attempts} attempts"))
        };
        let how = if max_attempts == 1 {
            "parked"
        } else {
            "retrying"
        };
        assert_eq!(
            stored_error("broker\0down".to_owned()).await,
            "broker\u{fffd}down",
            "{how}: NUL is kept as U+FFFD"
        );
        assert_eq!(
            stored_error(exact.clone()).await,
            exact,
            "{how}: MAX_LAST_ERROR bytes are kept whole"
        );
        let cut = stored_error(long.clone()).await;
        assert!(
            cut.len() <= MAX_LAST_ERROR && cut.ends_with("..."),
            "{how}: a longer error is cut to MAX_LAST_ERROR bytes ending in ...: {} bytes",
            cut.len()
        );
        assert!(
            cut.len() > MAX_LAST_ERROR - 8 && long.starts_with(cut.trim_end_matches("...")),
            "{how}: the cut error is the start of the original"
        );
    }
}

/// `dispatched_since`: `None` (the backend cannot count) or the exact number of messages
/// dispatched at or after the instant; pending and parked messages never count.
pub async fn dispatched_since_counts<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let start = f.clock.now();
    if ok(store.dispatched_since(start).await, "dispatched_since").is_none() {
        return; // not supported by this backend: the default method
    }
    let early: Vec<Message> = (0..3).map(|_| msg("since")).collect();
    let late: Vec<Message> = (0..2).map(|_| msg("since")).collect();
    let pending = msg("since");
    let parked = msg("since");
    for m in early.iter().chain(&late).chain([&pending, &parked]) {
        add(store, m).await;
    }
    ok(
        store.mark_dispatched(&ids_of(&early)).await,
        "mark_dispatched",
    );
    f.clock.advance(Duration::from_secs(60));
    let middle = f.clock.now();
    ok(
        store.mark_dispatched(&ids_of(&late)).await,
        "mark_dispatched",
    );
    park(store, &f.clock, parked.id).await;
    f.clock.advance(Duration::from_secs(60));
    let count = |since| async move { ok(store.dispatched_since(since).await, "dispatched_since") };
    assert_eq!(count(start).await, Some(5), "dispatched since the start");
    assert_eq!(
        count(middle).await,
        Some(2),
        "dispatched at or after the middle"
    );
    assert_eq!(count(f.clock.now()).await, Some(0), "dispatched since now");
}

/// `list`: filters by status, topic and key, store sequence order, at most `limit`, 100 when 0.
pub async fn list_filters_and_order<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    let a = keyed("x", "k1");
    let b = keyed("y", "k1");
    let c = keyed("x", "k2");
    let d = keyed("x", "k1");
    let e = msg("x");
    for m in [&a, &b, &c, &d, &e] {
        add(store, m).await;
    }
    ok(store.mark_dispatched(&[b.id]).await, "mark_dispatched");
    park(store, &f.clock, c.id).await;
    let list = |status: Option<MessageStatus>, topic: Option<&str>, limit: usize| ListQuery {
        status,
        topic: topic.map(str::to_owned),
        key: None,
        limit,
    };
    let by_key = |key: &str, topic: Option<&str>, status: Option<MessageStatus>, limit| ListQuery {
        key: Some(key.to_owned()),
        ..list(status, topic, limit)
    };
    let cases = [
        (list(None, None, 0), vec![a.id, b.id, c.id, d.id, e.id]),
        (
            list(Some(MessageStatus::Pending), None, 0),
            vec![a.id, d.id, e.id],
        ),
        (list(Some(MessageStatus::Dispatched), None, 0), vec![b.id]),
        (list(None, Some("x"), 0), vec![a.id, c.id, d.id, e.id]),
        (list(Some(MessageStatus::Parked), Some("x"), 0), vec![c.id]),
        (list(Some(MessageStatus::Parked), Some("y"), 0), vec![]),
        (list(None, None, 2), vec![a.id, b.id]),
        (list(None, Some("x"), 1), vec![a.id]),
        (by_key("k1", None, None, 0), vec![a.id, b.id, d.id]),
        (by_key("k1", Some("x"), None, 0), vec![a.id, d.id]),
        (
            by_key("k1", None, Some(MessageStatus::Dispatched), 0),
            vec![b.id],
        ),
        (by_key("k2", None, None, 0), vec![c.id]),
        (by_key("k2", Some("y"), None, 0), vec![]),
        (by_key("k3", None, None, 0), vec![]),
        (by_key("k1", None, None, 1), vec![a.id]),
    ];
    for (q, expected) in cases {
        let got = ok(store.list(&q).await, "list");
        assert_eq!(ids(&got), expected, "list({q:?})");
    }
    let listed = ok(store.list(&list(None, None, 0)).await, "list");
    assert_eq!(
        listed[2],
        get(store, c.id).await,
        "list returns the full stored state"
    );

    let chunk = store.capabilities().max_batch.unwrap_or(usize::MAX).max(1);
    let more: Vec<Message> = (0..110).map(|_| msg("many")).collect();
    for part in more.chunks(chunk) {
        ok(store.add_batch(part).await, "add_batch");
    }
    let got = ok(
        store.list(&list(None, Some("many"), 0)).await,
        "list(limit 0)",
    );
    assert_eq!(got.len(), 100, "limit 0 means 100");
    assert_eq!(ids(&got), ids_of(&more[..100]), "store sequence order");
    let got = ok(
        store.list(&list(None, Some("many"), 105)).await,
        "list(limit 105)",
    );
    assert_eq!(got.len(), 105);
    let seen: HashSet<MessageId> = ids(&got).into_iter().collect();
    assert_eq!(seen.len(), 105);
}
