//! Inbox cases: contract items 1–4 ("Inbox store" in DESIGN.md), the `# Behavior` sections of
//! [`InboxStore`] and of [`Transaction::inbox_insert`].

use std::sync::Arc;
use std::time::Duration;

use outbox_core::{
    ErrorKind, InboxEntry, InboxStore, InsertOutcome, MessageId, Transaction, TransactionalStore,
};

use crate::harness::Fixture;
use crate::support::{assert_absent, assert_kind, bad_names, err, longest_name, msg, ok};

async fn insert(inbox: &dyn InboxStore, e: &InboxEntry) -> InsertOutcome {
    ok(inbox.insert(e).await, &format!("inbox insert({e:?})"))
}

async fn contains(inbox: &dyn InboxStore, e: &InboxEntry) -> bool {
    ok(inbox.contains(e).await, &format!("inbox contains({e:?})"))
}

/// Items 1–2: the first insert of a pair returns `Inserted`, every later one `Duplicate`;
/// `contains` is true exactly after the first insert; the same message id with another handler
/// key is independent, and so is another id; an empty handler key fails with `InvalidInput`.
pub async fn first_insert_wins<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let id = MessageId::new();
    let e = InboxEntry::new(id, "billing");
    assert!(!contains(inbox, &e).await, "nothing inserted yet");
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Inserted);
    assert!(contains(inbox, &e).await);
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Duplicate);
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Duplicate);

    let other_handler = InboxEntry::new(id, "shipping");
    assert!(
        !contains(inbox, &other_handler).await,
        "handler keys are independent"
    );
    assert_eq!(insert(inbox, &other_handler).await, InsertOutcome::Inserted);
    assert_eq!(
        insert(inbox, &other_handler).await,
        InsertOutcome::Duplicate
    );
    let other_id = InboxEntry::new(MessageId::new(), "billing");
    assert_eq!(insert(inbox, &other_id).await, InsertOutcome::Inserted);
    let unicode = InboxEntry::new(id, "handler-ü-✓");
    assert_eq!(insert(inbox, &unicode).await, InsertOutcome::Inserted);
    assert_eq!(insert(inbox, &unicode).await, InsertOutcome::Duplicate);
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Duplicate);

    let empty = InboxEntry::new(MessageId::new(), "");
    assert_kind(
        inbox.insert(&empty).await,
        ErrorKind::InvalidInput,
        "insert with empty handler key",
    );
}

/// Item 1: 32 tasks insert the same pair at once; exactly one gets `Inserted`.
pub async fn concurrent_insert_one_winner<S: TransactionalStore>(f: &Fixture<S>) {
    const TASKS: usize = 32;
    let e = InboxEntry::new(MessageId::new(), "race");
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let handles: Vec<_> = (0..TASKS)
        .map(|_| {
            let inbox = f.inbox.clone();
            let barrier = barrier.clone();
            let e = e.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                ok(inbox.insert(&e).await, "concurrent inbox insert")
            })
        })
        .collect();
    let mut inserted = 0;
    for h in handles {
        if h.await.expect("insert task panicked") == InsertOutcome::Inserted {
            inserted += 1;
        }
    }
    assert_eq!(
        inserted, 1,
        "exactly one of {TASKS} concurrent inserts wins"
    );
    assert!(contains(&*f.inbox, &e).await);
}

/// Items 1 and 3: 32 tasks each run a transaction that inserts the same pair and a business
/// record, and commit when `inbox_insert` says `Inserted`. Exactly one transaction commits as
/// the winner; the others see `Duplicate` (at insert) or `AlreadyExists` (at commit). Retryable
/// commit errors are retried, as the inbox processor does.
pub async fn concurrent_transactional_insert_one_winner<S: TransactionalStore + 'static>(
    f: &Fixture<S>,
) {
    const TASKS: usize = 32;
    let e = InboxEntry::new(MessageId::new(), "race-tx");
    let barrier = Arc::new(tokio::sync::Barrier::new(TASKS));
    let handles: Vec<_> = (0..TASKS)
        .map(|task| {
            let tx_store = f.tx_store.clone();
            let records = f.records.clone();
            let barrier = barrier.clone();
            let e = e.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                for _ in 0..50 {
                    let mut tx = ok(tx_store.begin().await, "begin");
                    if ok(tx.inbox_insert(&e).await, "tx.inbox_insert") == InsertOutcome::Duplicate
                    {
                        return false;
                    }
                    ok(
                        records.write(&mut tx, &format!("winner-{task}")).await,
                        "write record",
                    );
                    match tx.commit().await {
                        Ok(_) => return true,
                        Err(err) if err.kind() == ErrorKind::AlreadyExists => return false,
                        Err(err) if err.is_retryable() => continue,
                        Err(err) => panic!("commit failed: {err}"),
                    }
                }
                panic!("commit kept failing with retryable errors");
            })
        })
        .collect();
    let mut winners = Vec::new();
    for (task, h) in handles.into_iter().enumerate() {
        if h.await.expect("transaction task panicked") {
            winners.push(task);
        }
    }
    assert_eq!(
        winners.len(),
        1,
        "exactly one transaction wins, got {winners:?}"
    );
    for task in 0..TASKS {
        let exists = ok(
            f.records.exists(&format!("winner-{task}")).await,
            "records.exists",
        );
        assert_eq!(
            exists,
            winners.contains(&task),
            "only the winner's business record is committed (task {task})"
        );
    }
    assert!(contains(&*f.inbox, &e).await);
}

/// Item 3: an inbox insert inside a transaction is invisible before commit and visible after,
/// together with the caller's record and an outbox message of the same transaction.
pub async fn transactional_insert_commit<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let e = InboxEntry::new(MessageId::new(), "handler");
    let reply = msg("replies");
    let mut tx = ok(f.tx_store.begin().await, "begin");
    assert_eq!(
        ok(tx.inbox_insert(&e).await, "tx.inbox_insert"),
        InsertOutcome::Inserted
    );
    ok(
        f.records.write(&mut tx, "handled").await,
        "write business record",
    );
    ok(tx.add(&reply).await, "tx.add");
    assert!(
        !contains(inbox, &e).await,
        "an uncommitted inbox entry is invisible"
    );
    let committed = ok(tx.commit().await, "commit");
    assert_eq!(committed.ids, vec![reply.id]);
    assert!(
        contains(inbox, &e).await,
        "the inbox entry exists after commit"
    );
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Duplicate);
    assert!(ok(f.records.exists("handled").await, "records.exists"));
    assert!(ok(f.outbox.get(reply.id).await, "get").is_some());
}

/// Item 3: an inbox insert rolls back with its transaction (explicit rollback and drop),
/// together with the caller's record; the pair can be inserted afterwards.
pub async fn transactional_insert_rollback<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let e = InboxEntry::new(MessageId::new(), "handler");
    let reply = msg("replies");

    let mut tx = ok(f.tx_store.begin().await, "begin");
    assert_eq!(
        ok(tx.inbox_insert(&e).await, "tx.inbox_insert"),
        InsertOutcome::Inserted
    );
    ok(
        f.records.write(&mut tx, "rolled-back").await,
        "write business record",
    );
    ok(tx.add(&reply).await, "tx.add");
    ok(tx.rollback().await, "rollback");
    assert!(
        !contains(inbox, &e).await,
        "a rolled-back inbox entry does not exist"
    );

    let mut tx = ok(f.tx_store.begin().await, "begin");
    assert_eq!(
        ok(tx.inbox_insert(&e).await, "tx.inbox_insert"),
        InsertOutcome::Inserted
    );
    ok(
        f.records.write(&mut tx, "dropped").await,
        "write business record",
    );
    drop(tx);
    assert!(
        !contains(inbox, &e).await,
        "a dropped transaction's inbox entry does not exist"
    );

    for key in ["rolled-back", "dropped"] {
        assert!(
            !ok(f.records.exists(key).await, "records.exists"),
            "record {key:?} must not exist"
        );
    }
    assert_absent(&*f.outbox, reply.id, "its transaction rolled back").await;
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Inserted);
}

/// `Transaction::inbox_insert` of a pair that already has a live entry: `Duplicate` at insert
/// when `capabilities().inbox_duplicate_at_insert`, otherwise `Inserted` and the commit fails
/// with `AlreadyExists`, writing nothing of the transaction.
pub async fn transactional_duplicate<S: TransactionalStore>(f: &Fixture<S>) {
    let caps = f.outbox.capabilities();
    let inbox = &*f.inbox;
    let e = InboxEntry::new(MessageId::new(), "handler");
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Inserted);
    let reply = msg("replies");

    let mut tx = ok(f.tx_store.begin().await, "begin");
    ok(
        f.records.write(&mut tx, "second-run").await,
        "write business record",
    );
    ok(tx.add(&reply).await, "tx.add");
    let outcome = ok(tx.inbox_insert(&e).await, "tx.inbox_insert of a live pair");
    if caps.inbox_duplicate_at_insert {
        assert_eq!(
            outcome,
            InsertOutcome::Duplicate,
            "inbox_duplicate_at_insert: the duplicate shows at insert"
        );
        ok(tx.rollback().await, "rollback");
    } else {
        assert_eq!(
            outcome,
            InsertOutcome::Inserted,
            "without inbox_duplicate_at_insert the insert reports Inserted"
        );
        let e = err(
            tx.commit().await,
            "commit of a transaction with a duplicate inbox entry",
        );
        assert_eq!(e.kind(), ErrorKind::AlreadyExists, "{e}");
    }
    assert!(
        !ok(f.records.exists("second-run").await, "records.exists"),
        "nothing of the duplicate's transaction is written"
    );
    assert_absent(
        &*f.outbox,
        reply.id,
        "its transaction had a duplicate inbox entry",
    )
    .await;
    assert!(contains(inbox, &e).await, "the first entry is still there");
}

/// Item 4: an entry counts as present within the retention and as absent after it, whether
/// or not it was deleted: `contains` turns false and `insert` (and a transactional insert)
/// returns `Inserted` again. `retention()` is constant.
pub async fn retention_expiry<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let retention = inbox.retention();
    assert!(retention > Duration::ZERO, "retention must be positive");
    let margin = Duration::from_secs(1).min(retention / 2);
    let e = InboxEntry::new(MessageId::new(), "handler");
    let e_tx = InboxEntry::new(MessageId::new(), "handler");
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Inserted);
    assert_eq!(insert(inbox, &e_tx).await, InsertOutcome::Inserted);
    f.clock.advance(retention - margin);
    assert!(contains(inbox, &e).await, "live within the retention");
    assert_eq!(
        insert(inbox, &e).await,
        InsertOutcome::Duplicate,
        "live within the retention"
    );
    f.clock.advance(margin * 2);
    assert!(!contains(inbox, &e).await, "expired after the retention");
    assert_eq!(
        insert(inbox, &e).await,
        InsertOutcome::Inserted,
        "an expired entry counts as absent"
    );
    assert_eq!(
        insert(inbox, &e).await,
        InsertOutcome::Duplicate,
        "the new entry is live"
    );

    if f.outbox.capabilities().transactions {
        let mut tx = ok(f.tx_store.begin().await, "begin");
        assert_eq!(
            ok(
                tx.inbox_insert(&e_tx).await,
                "tx.inbox_insert of an expired pair"
            ),
            InsertOutcome::Inserted
        );
        ok(tx.commit().await, "commit over an expired inbox entry");
        assert!(contains(inbox, &e_tx).await);
        f.clock.advance(retention - margin);
        assert!(
            contains(inbox, &e_tx).await,
            "the transactional entry got a fresh window"
        );
    }
    assert_eq!(inbox.retention(), retention, "retention must be constant");
}

/// Item 4: `purge_expired` deletes expired entries only, at most `limit` per call. Backends
/// that expire entries by themselves may delete nothing; live entries are never deleted and
/// expired ones stay absent either way.
pub async fn purge_expired<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let retention = inbox.retention();
    let margin = Duration::from_secs(1).min(retention / 4);
    let old: Vec<InboxEntry> = (0..5)
        .map(|i| InboxEntry::new(MessageId::new(), format!("h{i}")))
        .collect();
    for e in &old {
        assert_eq!(insert(inbox, e).await, InsertOutcome::Inserted);
    }
    f.clock.advance(retention / 2);
    let young = InboxEntry::new(MessageId::new(), "young");
    assert_eq!(insert(inbox, &young).await, InsertOutcome::Inserted);
    f.clock.advance(retention - retention / 2 + margin);
    // `old` expired `margin` ago; `young` has about half the retention left.
    let mut counts = Vec::new();
    loop {
        let n = ok(inbox.purge_expired(2).await, "purge_expired");
        assert!(n <= 2, "purge_expired deleted {n} with limit 2");
        counts.push(n);
        if n < 2 {
            break;
        }
        assert!(
            counts.len() <= 5,
            "purge_expired keeps returning the limit: {counts:?}"
        );
    }
    let total: u64 = counts.iter().sum();
    assert_eq!(
        total,
        5,
        "purge_expired must delete every expired entry (5), {limit} at most per call: {counts:?}",
        limit = 2
    );
    assert!(
        contains(inbox, &young).await,
        "a live entry is never purged"
    );
    assert_eq!(insert(inbox, &young).await, InsertOutcome::Duplicate);
    for e in &old {
        assert!(!contains(inbox, e).await, "expired entries stay absent");
    }
    assert_eq!(
        ok(inbox.purge_expired(100).await, "purge_expired"),
        0,
        "nothing left to purge"
    );
}

/// The shared rule for handler keys (`outbox_core::rules`), the same on every backend: an
/// empty key, a NUL in it or one over `MAX_FIELD_LEN` bytes fails with `InvalidInput` at
/// `insert`, `contains` and `Transaction::inbox_insert`, and nothing is stored (the message id
/// can still be inserted with a valid key, and that insert commits).
pub async fn invalid_handler_key<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let transactions = f.outbox.capabilities().transactions;
    let id = MessageId::new();
    for (what, key) in bad_names() {
        let bad = InboxEntry::new(id, key);
        assert_kind(
            inbox.insert(&bad).await,
            ErrorKind::InvalidInput,
            &format!("insert (handler key {what})"),
        );
        assert_kind(
            inbox.contains(&bad).await,
            ErrorKind::InvalidInput,
            &format!("contains (handler key {what})"),
        );
        if transactions {
            let mut tx = ok(f.tx_store.begin().await, "begin");
            assert_kind(
                tx.inbox_insert(&bad).await,
                ErrorKind::InvalidInput,
                &format!("tx.inbox_insert (handler key {what})"),
            );
            ok(tx.rollback().await, "rollback");
        }
    }
    let good = InboxEntry::new(id, "a");
    assert!(!contains(inbox, &good).await, "nothing was stored");
    assert_eq!(insert(inbox, &good).await, InsertOutcome::Inserted);
}

/// A handler key of exactly `MAX_FIELD_LEN` bytes (multi-byte characters) is stored and
/// deduplicated like any other, through `insert` and `Transaction::inbox_insert`; a key that
/// differs only in its last byte is independent.
pub async fn longest_handler_key<S: TransactionalStore>(f: &Fixture<S>) {
    let inbox = &*f.inbox;
    let id = MessageId::new();
    let key = longest_name("handler-");
    let e = InboxEntry::new(id, key.clone());
    assert!(!contains(inbox, &e).await, "nothing inserted yet");
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Inserted);
    assert!(
        contains(inbox, &e).await,
        "the longest handler key is stored"
    );
    assert_eq!(insert(inbox, &e).await, InsertOutcome::Duplicate);
    let mut other = key;
    other.pop();
    other.push('y');
    let sibling = InboxEntry::new(id, other);
    assert!(
        !contains(inbox, &sibling).await,
        "keys differ in the last byte"
    );
    assert_eq!(insert(inbox, &sibling).await, InsertOutcome::Inserted);
    if f.outbox.capabilities().transactions {
        let in_tx = InboxEntry::new(MessageId::new(), longest_name("tx-"));
        let mut tx = ok(f.tx_store.begin().await, "begin");
        assert_eq!(
            ok(
                tx.inbox_insert(&in_tx).await,
                "tx.inbox_insert(longest key)"
            ),
            InsertOutcome::Inserted
        );
        ok(tx.commit().await, "commit");
        assert!(
            contains(inbox, &in_tx).await,
            "committed with the longest key"
        );
        assert_eq!(insert(inbox, &in_tx).await, InsertOutcome::Duplicate);
    }
}
