//! Transaction cases: the `# Behavior` sections of [`Transaction`] and [`TransactionalStore`]
//! (outbox contract item 2 seen from the transaction's side, and the transaction contract
//! after a failure: `tx_*_aborts`, `tx_rollback_after_failure`,
//! `tx_inbox_duplicate_does_not_abort`). Every case needs `capabilities().transactions`
//! (the suite registers them only then).

use std::collections::BTreeSet;

use outbox_core::{
    Committed, Error, ErrorKind, InboxEntry, Message, MessageId, Ordering, OutboxStore,
    Transaction, TransactionalStore, shard_for,
};

use crate::harness::Fixture;
use crate::support::{
    BIG, assert_absent, err, fetch, get, ids, keyed, keys_in_distinct_shards, msg, msg_ids, ok,
};

fn shards_of(store: &dyn OutboxStore, messages: &[&Message]) -> BTreeSet<u32> {
    messages
        .iter()
        .map(|m| shard_for(m.key.as_deref(), &m.id, store.shard_count()))
        .collect()
}

/// `commit` returns `Committed` with the added ids in add order and their shards; a
/// transaction with only business writes commits with an empty `Committed`.
pub async fn commit_reports_ids_and_shards<S: TransactionalStore>(f: &Fixture<S>) {
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

/// Assert that `r` is the refusal of an aborted transaction (rule 2 of [`Transaction`]):
/// `InvalidInput`, not retryable, saying that an earlier error aborted it and naming that
/// error (`first`).
fn assert_refused<T: std::fmt::Debug>(r: outbox_core::Result<T>, first: &Error, what: &str) {
    let e = err(r, &format!("{what} on an aborted transaction"));
    assert_eq!(
        e.kind(),
        ErrorKind::InvalidInput,
        "{what} on an aborted transaction: wrong kind: {e}"
    );
    assert!(
        !e.is_retryable(),
        "{what} on an aborted transaction must not be retryable: {e}"
    );
    assert!(
        e.message().contains("aborted") && e.message().contains(first.message()),
        "{what} on an aborted transaction: the message must say an earlier error aborted it \
         and name that error ({first}), got: {e}"
    );
}

/// After the first error of `tx` (`first`): every further add, batch add and inbox insert is
/// refused, a caller write is refused or discarded, and `commit` is refused. Then nothing of
/// `staged` (ids that the transaction had staged), nor the record `record`, nor the inbox
/// entry `entry` (staged before the failure) is visible, and the store still works.
async fn assert_aborted<S: TransactionalStore>(
    f: &Fixture<S>,
    mut tx: S::Tx,
    first: &Error,
    staged: &[MessageId],
    record: &str,
    entry: &InboxEntry,
) {
    let store = &*f.outbox;
    let later = msg("tx-abort");
    assert_refused(tx.add(&later).await, first, "add");
    assert_refused(
        tx.add_batch(std::slice::from_ref(&later)).await,
        first,
        "add_batch",
    );
    let later_entry = InboxEntry::new(MessageId::new(), "abort-later");
    assert_refused(tx.inbox_insert(&later_entry).await, first, "inbox_insert");
    // A write of the caller's own data: refused where the handle reports errors, otherwise
    // staged and discarded with the rest (checked below).
    let late_record = format!("{record}-late");
    let _ = f.records.write(&mut tx, &late_record).await;
    assert_refused(tx.commit().await, first, "commit");

    for id in staged.iter().chain([&later.id]) {
        assert_absent(store, *id, "its transaction was aborted").await;
    }
    for key in [record, late_record.as_str()] {
        assert!(
            !ok(f.records.exists(key).await, "records.exists"),
            "business record {key:?} of an aborted transaction must not exist"
        );
    }
    assert!(
        !ok(f.inbox.contains(entry).await, "inbox.contains"),
        "the inbox entry of an aborted transaction must not be recorded"
    );
    assert_store_usable(f, staged, entry).await;
}

/// The store works after an aborted transaction (rule 5 of [`Transaction`]): a new
/// transaction commits the same ids and inbox entry, so the aborted one left nothing behind
/// (no id guard, no staged row).
async fn assert_store_usable<S: TransactionalStore>(
    f: &Fixture<S>,
    ids: &[MessageId],
    entry: &InboxEntry,
) {
    let store = &*f.outbox;
    let again: Vec<Message> = ids
        .iter()
        .map(|id| crate::support::build(Message::builder("tx-again").id(*id)))
        .collect();
    // A fresh record name: a case may call this more than once.
    let record = format!("after-abort-{}", MessageId::new());
    let mut tx = ok(
        f.tx_store.begin().await,
        "begin after an aborted transaction",
    );
    ok(
        f.records.write(&mut tx, &record).await,
        "write business record after an aborted transaction",
    );
    ok(
        tx.add_batch(&again).await,
        "add the aborted transaction's ids again",
    );
    assert_eq!(
        ok(tx.inbox_insert(entry).await, "inbox_insert again"),
        outbox_core::InsertOutcome::Inserted,
        "the aborted transaction's inbox entry must be free"
    );
    let committed = ok(tx.commit().await, "commit after an aborted transaction");
    assert_eq!(committed.ids, msg_ids(&again.iter().collect::<Vec<_>>()));
    for m in &again {
        assert_eq!(get(store, m.id).await.message, *m);
    }
    assert!(ok(f.records.exists(&record).await, "records.exists"));
    assert!(ok(f.inbox.contains(entry).await, "inbox.contains"));
}

/// An invalid message in `add` fails at once with `InvalidInput`; the transaction is
/// aborted: further adds, inbox inserts and `commit` are refused with `InvalidInput` naming
/// the first error, nothing of it is visible (not the valid message added before, not the
/// business record, not the inbox entry), and the store still works. Also with an invalid
/// message in the middle of an `add_batch`.
pub async fn failed_add_aborts<S: TransactionalStore>(f: &Fixture<S>) {
    for batch in [false, true] {
        let good = msg("tx-abort");
        let mut bad = msg("tx-abort");
        bad.topic = String::new();
        let entry = InboxEntry::new(MessageId::new(), "abort");
        let record = format!("abort-invalid-{batch}");
        let mut tx = ok(f.tx_store.begin().await, "begin");
        ok(
            f.records.write(&mut tx, &record).await,
            "write business record",
        );
        assert_eq!(
            ok(tx.inbox_insert(&entry).await, "inbox_insert"),
            outbox_core::InsertOutcome::Inserted
        );
        let first = if batch {
            err(
                tx.add_batch(&[good.clone(), bad.clone()]).await,
                "add_batch with an invalid message",
            )
        } else {
            ok(tx.add(&good).await, "add a valid message");
            err(tx.add(&bad).await, "add an invalid message")
        };
        assert_eq!(
            first.kind(),
            ErrorKind::InvalidInput,
            "invalid message: {first}"
        );
        assert_aborted(f, tx, &first, &[good.id, bad.id], &record, &entry).await;
    }
}

/// A duplicate id in a transaction aborts it. The same id added twice fails at the second
/// `add` with `AlreadyExists` on every backend, then the transaction is aborted as after any
/// failure. An id that is already stored fails at `add` when
/// [`Capabilities::duplicate_id_at_add`](outbox_core::Capabilities) is true (then aborted the
/// same way); when false (DynamoDB cannot read inside a transaction) the add succeeds and
/// `commit` fails with `AlreadyExists`. Either way nothing of the transaction is written, the
/// stored message is unchanged, and the store still works.
pub async fn duplicate_add_aborts<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;

    // The same id twice in one transaction.
    let good = msg("tx-dup");
    let entry = InboxEntry::new(MessageId::new(), "dup");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "dup-twice").await,
        "write business record",
    );
    ok(tx.inbox_insert(&entry).await, "inbox_insert");
    ok(tx.add(&good).await, "add");
    let first = err(tx.add(&good).await, "add of the same id twice");
    assert_eq!(first.kind(), ErrorKind::AlreadyExists, "{first}");
    assert_aborted(f, tx, &first, &[good.id], "dup-twice", &entry).await;

    // An id that is already stored (the first part stored `good`).
    let fresh = msg("tx-dup");
    let mut dup = good.clone();
    dup.payload = outbox_core::Bytes::from_static(b"changed");
    let entry = InboxEntry::new(MessageId::new(), "dup");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "dup-stored").await,
        "write business record",
    );
    ok(tx.inbox_insert(&entry).await, "inbox_insert");
    ok(tx.add(&fresh).await, "add");
    if store.capabilities().duplicate_id_at_add {
        let first = err(tx.add(&dup).await, "add of a stored id");
        assert_eq!(first.kind(), ErrorKind::AlreadyExists, "{first}");
        assert_aborted(f, tx, &first, &[fresh.id], "dup-stored", &entry).await;
    } else {
        ok(
            tx.add(&dup).await,
            "add of a stored id (the backend declares duplicate_id_at_add = false: found at commit)",
        );
        let e = err(
            tx.commit().await,
            "commit of a transaction adding a stored id",
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
        assert_absent(store, fresh.id, "its transaction failed").await;
        assert!(!ok(f.records.exists("dup-stored").await, "records.exists"));
        assert!(!ok(f.inbox.contains(&entry).await, "inbox.contains"));
        assert_store_usable(f, &[fresh.id], &entry).await;
    }
    assert_eq!(
        get(store, good.id).await.message.payload,
        good.payload,
        "the stored message must be unchanged"
    );
}

/// An invalid inbox entry (empty handler key) in `inbox_insert` fails at once with
/// `InvalidInput` and aborts the transaction, as a failed `add` does.
pub async fn failed_inbox_insert_aborts<S: TransactionalStore>(f: &Fixture<S>) {
    let good = msg("tx-abort");
    let entry = InboxEntry::new(MessageId::new(), "abort");
    let bad = InboxEntry::new(MessageId::new(), "");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "abort-inbox").await,
        "write business record",
    );
    ok(tx.add(&good).await, "add");
    ok(tx.inbox_insert(&entry).await, "inbox_insert");
    let first = err(
        tx.inbox_insert(&bad).await,
        "inbox_insert with an empty handler key",
    );
    assert_eq!(
        first.kind(),
        ErrorKind::InvalidInput,
        "invalid inbox entry: {first}"
    );
    assert_aborted(f, tx, &first, &[good.id], "abort-inbox", &entry).await;
}

/// `rollback` succeeds on an aborted transaction (and so does dropping one); nothing of it is
/// visible, and the store still works.
pub async fn rollback_after_failure<S: TransactionalStore>(f: &Fixture<S>) {
    let store = &*f.outbox;
    for drop_it in [false, true] {
        let good = msg("tx-abort");
        let mut bad = msg("tx-abort");
        bad.key = Some("nul\0key".to_owned());
        let entry = InboxEntry::new(MessageId::new(), "rollback");
        let record = format!("abort-rollback-{drop_it}");
        let mut tx = ok(f.tx_store.begin().await, "begin");
        ok(
            f.records.write(&mut tx, &record).await,
            "write business record",
        );
        ok(tx.add(&good).await, "add");
        ok(tx.inbox_insert(&entry).await, "inbox_insert");
        let first = err(tx.add(&bad).await, "add with a NUL in the key");
        assert_eq!(first.kind(), ErrorKind::InvalidInput, "{first}");
        if drop_it {
            drop(tx);
        } else {
            ok(tx.rollback().await, "rollback of an aborted transaction");
        }
        assert_absent(store, good.id, "its transaction was rolled back").await;
        assert!(!ok(f.records.exists(&record).await, "records.exists"));
        assert!(!ok(f.inbox.contains(&entry).await, "inbox.contains"));
        assert_store_usable(f, &[good.id], &entry).await;
    }
}

/// `InsertOutcome::Duplicate` is not a failure (rule 4 of [`Transaction`]): after the same
/// entry twice in one transaction (`Inserted`, then `Duplicate` on every backend), the
/// transaction still adds and commits.
pub async fn inbox_duplicate_does_not_abort<S: TransactionalStore>(f: &Fixture<S>) {
    let entry = InboxEntry::new(MessageId::new(), "twice");
    let m = msg("tx-dup-inbox");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    assert_eq!(
        ok(tx.inbox_insert(&entry).await, "inbox_insert"),
        outbox_core::InsertOutcome::Inserted
    );
    assert_eq!(
        ok(
            tx.inbox_insert(&entry).await,
            "inbox_insert of the same entry"
        ),
        outbox_core::InsertOutcome::Duplicate
    );
    ok(tx.add(&m).await, "add after a Duplicate outcome");
    ok(
        f.records.write(&mut tx, "dup-inbox").await,
        "write business record",
    );
    let committed = ok(tx.commit().await, "commit after a Duplicate outcome");
    assert_eq!(committed.ids, vec![m.id]);
    assert_eq!(get(&*f.outbox, m.id).await.message, m);
    assert!(ok(f.records.exists("dup-inbox").await, "records.exists"));
    assert!(ok(f.inbox.contains(&entry).await, "inbox.contains"));
}
