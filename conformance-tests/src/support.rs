//! Helpers shared by the cases.

use std::fmt::Debug;
use std::time::Duration;

use outbox_core::{
    Clock, DateTime, Error, ErrorKind, FailedAttempt, FailureOutcome, MAX_FIELD_LEN, Message,
    MessageBuilder, MessageId, MessageStatus, Ordering, OutboxStore, PendingQuery, Result,
    StoredMessage, Utc, add_duration, shard_for,
};

/// Enough for every fetch of the suite; small enough for any backend's integer types.
pub(crate) const BIG: usize = 10_000;

/// Every shard of `store`.
pub(crate) fn all_shards(store: &dyn OutboxStore) -> Vec<u32> {
    (0..store.shard_count()).collect()
}

/// `fetch_pending` over all shards.
pub(crate) async fn fetch(
    store: &dyn OutboxStore,
    ordering: Ordering,
    limit: usize,
) -> Vec<StoredMessage> {
    fetch_shards(store, all_shards(store), ordering, limit).await
}

/// `fetch_pending` over the given shards.
pub(crate) async fn fetch_shards(
    store: &dyn OutboxStore,
    shards: Vec<u32>,
    ordering: Ordering,
    limit: usize,
) -> Vec<StoredMessage> {
    let q = PendingQuery {
        shards,
        limit,
        ordering,
    };
    store
        .fetch_pending(&q)
        .await
        .unwrap_or_else(|e| panic!("fetch_pending({q:?}) failed: {e}"))
}

/// Ids of fetched messages.
pub(crate) fn ids(v: &[StoredMessage]) -> Vec<MessageId> {
    v.iter().map(|m| m.message.id).collect()
}

/// Ids of messages.
pub(crate) fn msg_ids(v: &[&Message]) -> Vec<MessageId> {
    v.iter().map(|m| m.id).collect()
}

/// A valid message on `topic`.
pub(crate) fn msg(topic: &str) -> Message {
    build(Message::builder(topic))
}

/// A valid message on `topic` with `key`.
pub(crate) fn keyed(topic: &str, key: &str) -> Message {
    build(Message::builder(topic).key(key))
}

/// Finish a builder the suite knows to be valid.
pub(crate) fn build(b: MessageBuilder) -> Message {
    b.build()
        .unwrap_or_else(|e| panic!("conformance suite built an invalid message: {e}"))
}

/// Unwrap `r`, naming the operation on failure.
pub(crate) fn ok<T>(r: Result<T>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("{what} failed: {e}"))
}

/// The error of `r`, which must have failed.
pub(crate) fn err<T: Debug>(r: Result<T>, what: &str) -> Error {
    match r {
        Ok(v) => panic!("{what} should have failed, but returned Ok({v:?})"),
        Err(e) => e,
    }
}

/// A name of exactly [`MAX_FIELD_LEN`] bytes (the longest every backend must store), starting
/// with `tag` and made mostly of two-byte characters, so it has fewer characters than bytes:
/// a backend that counts characters instead of bytes is caught by [`over_long_name`].
pub(crate) fn longest_name(tag: &str) -> String {
    let mut s = tag.to_owned();
    while s.len() + 'é'.len_utf8() <= MAX_FIELD_LEN {
        s.push('é');
    }
    while s.len() < MAX_FIELD_LEN {
        s.push('x');
    }
    s
}

/// A name one byte over [`MAX_FIELD_LEN`], in fewer than `MAX_FIELD_LEN` characters.
pub(crate) fn over_long_name(tag: &str) -> String {
    let s = format!("{}x", longest_name(tag));
    debug_assert!(s.len() == MAX_FIELD_LEN + 1 && s.chars().count() < MAX_FIELD_LEN);
    s
}

/// Names every backend must refuse with `InvalidInput`, each with a description: empty,
/// NUL inside, only NUL, one byte over [`MAX_FIELD_LEN`].
pub(crate) fn bad_names() -> Vec<(&'static str, String)> {
    vec![
        ("empty", String::new()),
        ("NUL inside", "a\0b".to_owned()),
        ("only NUL", "\0".to_owned()),
        ("one byte over MAX_FIELD_LEN", over_long_name("o")),
    ]
}

/// Assert that `r` failed with `kind`.
pub(crate) fn assert_kind<T: Debug>(r: Result<T>, kind: ErrorKind, what: &str) {
    let e = err(r, what);
    assert_eq!(e.kind(), kind, "{what}: wrong error kind: {e}");
}

/// Add one message.
pub(crate) async fn add(store: &dyn OutboxStore, m: &Message) {
    ok(store.add(m).await, &format!("add({})", m.id));
}

/// Read a message that must exist.
pub(crate) async fn get(store: &dyn OutboxStore, id: MessageId) -> StoredMessage {
    ok(store.get(id).await, &format!("get({id})"))
        .unwrap_or_else(|| panic!("message {id} should be stored, get returned None"))
}

/// Assert a message is not stored.
pub(crate) async fn assert_absent(store: &dyn OutboxStore, id: MessageId, why: &str) {
    let got = ok(store.get(id).await, &format!("get({id})"));
    assert!(
        got.is_none(),
        "message {id} should not be stored ({why}), but get returned {got:?}"
    );
}

/// Status of a stored message.
pub(crate) async fn status(store: &dyn OutboxStore, id: MessageId) -> MessageStatus {
    get(store, id).await.status
}

/// A failed attempt retried `after` from now, parking at `max_attempts`.
pub(crate) fn retry_after(
    clock: &dyn Clock,
    after: Duration,
    max_attempts: u32,
    error: &str,
) -> FailedAttempt {
    FailedAttempt {
        error: error.to_owned(),
        next_attempt_at: add_duration(clock.now(), after),
        max_attempts,
    }
}

/// Park a pending message with one failure at `max_attempts = 1`.
pub(crate) async fn park(store: &dyn OutboxStore, clock: &dyn Clock, id: MessageId) {
    let outcome = ok(
        store
            .mark_failed(
                id,
                &retry_after(clock, Duration::from_secs(60), 1, "parked by the suite"),
            )
            .await,
        "mark_failed(max_attempts = 1)",
    );
    assert_eq!(
        outcome,
        FailureOutcome::Parked { attempts: 1 },
        "a failure at max_attempts = 1 must park the message"
    );
}

/// `n` keys that land in `n` distinct shards (requires `n <= shard_count`).
pub(crate) fn keys_in_distinct_shards(
    prefix: &str,
    shard_count: u32,
    n: usize,
) -> Vec<(String, u32)> {
    let probe = MessageId::new();
    let mut out: Vec<(String, u32)> = Vec::new();
    for i in 0.. {
        if out.len() == n {
            break;
        }
        let key = format!("{prefix}-{i}");
        let shard = shard_for(Some(&key), &probe, shard_count);
        if out.iter().all(|(_, s)| *s != shard) {
            out.push((key, shard));
        }
        assert!(i < 100_000, "could not find {n} keys in distinct shards");
    }
    out
}

/// `t` plus `secs` seconds.
pub(crate) fn plus(t: DateTime<Utc>, secs: u64) -> DateTime<Utc> {
    add_duration(t, Duration::from_secs(secs))
}

/// `t` minus `secs` seconds.
pub(crate) fn minus(t: DateTime<Utc>, secs: i64) -> DateTime<Utc> {
    t - chrono::Duration::seconds(secs)
}
