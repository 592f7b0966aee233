//! Transport cases: DESIGN.md "Transports" items 1–5, against a real broker.
//!
//! A transport crate implements [`TransportHarness`] for one isolated destination per case
//! (a fresh topic, or exchange + queue) and runs them with
//! [`Suite::transport`](crate::Suite::transport).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use outbox_core::{Consumer, Message, Producer, Result};

/// What a transport provides for one case. Every case gets a fresh harness from the
/// transport's setup function, with its own destination, so cases run in parallel.
#[async_trait]
pub trait TransportHarness: Send + Sync {
    /// The topic (routing key) of this case's destination. Messages built with it reach
    /// consumers from [`consumer`](Self::consumer).
    fn topic(&self) -> &str;

    /// A producer connected to the broker.
    fn producer(&self) -> Arc<dyn Producer>;

    /// A new consumer of this case's destination, in this case's consumer group / queue. It
    /// receives messages sent before it was created (from the earliest unacked one). Calling
    /// it again after dropping a consumer simulates a consumer restart: deliveries the
    /// dropped one never acked are delivered again. Consumers returned by one harness compete
    /// for the same messages.
    async fn consumer(&self) -> Result<Box<dyn Consumer>>;

    /// Messages that reached this case's dead-letter destination, with the recorded reason.
    /// Waits (bounded) until at least `expected` are there, then returns what it found.
    async fn dead_letters(&self, expected: usize) -> Result<Vec<(Message, String)>>;

    /// A producer pointed at an address where no broker listens, for the retryable-error
    /// case. `None`: the case does not apply (reported as ignored, with the reason).
    fn unreachable_producer(&self) -> Option<Arc<dyn Producer>> {
        None
    }

    /// A topic that no destination accepts (unroutable; unknown with auto-creation off), for
    /// the permanent-error case. `None`: the case does not apply (reported as ignored).
    fn unroutable_topic(&self) -> Option<String> {
        None
    }

    /// The largest message the broker accepts, in payload bytes, for the too-large case.
    /// `None`: the case does not apply (reported as ignored).
    fn max_message_size(&self) -> Option<usize> {
        None
    }

    /// Whether per-key order holds across several consumers of the destination (Kafka:
    /// each partition has one consumer; a queue shared by competing consumers: no). The
    /// end-to-end case checks per-key order only when `true`.
    fn per_key_order_across_consumers(&self) -> bool {
        false
    }

    /// The bound [`Producer::delivery_timeout`] of [`producer`](Self::producer) must keep,
    /// for the delivery-timeout case.
    ///
    /// - `Some(max)`: the transport holds sends after handing them to the broker (every
    ///   network broker); the producer must report `Some(d)` with `0 < d <= max`. Pass the
    ///   relay's `publish_timeout` you run with (its default is 10 s).
    /// - `None`: a send is complete or failed when the call returns and nothing stays
    ///   pending (the in-memory broker); the producer must report `None`.
    fn max_delivery_timeout(&self) -> Option<Duration>;
}

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;

use outbox_core::memory::{MemoryStore, MemoryTx};
use outbox_core::{
    Delivery, ErrorKind, HandlerError, InboxProcessor, MessageHandler, MessageId, MessageType,
    ProcessOutcome, Utc,
};

use crate::harness::{SetupContext, unavailable};

/// How long a case waits for one delivery before failing (group joins take seconds).
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(60);

/// Build the harness of `case` with the transport's `setup`; `Err(reason)` when the broker is
/// unavailable and [`REQUIRED_ENV`](crate::harness::REQUIRED_ENV) is not `1` (the runner
/// reports the case as ignored with that reason).
///
/// # Panics
/// On any other setup error, or when the broker is absent but required.
pub async fn setup<H, F, Fut>(case: &str, setup: F) -> std::result::Result<H, String>
where
    F: FnOnce(SetupContext) -> Fut,
    Fut: Future<Output = Result<H>>,
{
    setup(SetupContext::new(case))
        .await
        .map_err(|e| unavailable(case, "broker", e))
}

async fn receive(consumer: &dyn Consumer) -> Delivery {
    match tokio::time::timeout(RECEIVE_TIMEOUT, consumer.receive()).await {
        Ok(Ok(Some(d))) => d,
        Ok(Ok(None)) => panic!("consumer closed while a delivery was expected"),
        Ok(Err(e)) => panic!("receive failed: {e}"),
        Err(_) => panic!("no delivery within {RECEIVE_TIMEOUT:?}"),
    }
}

/// Whether anything arrives within `wait` (for checks that something is NOT delivered again).
async fn receive_nothing_within(consumer: &dyn Consumer, wait: Duration) -> Option<Delivery> {
    match tokio::time::timeout(wait, consumer.receive()).await {
        Ok(Ok(d)) => d,
        Ok(Err(e)) => panic!("receive failed: {e}"),
        Err(_) => None,
    }
}

fn message(h: &dyn TransportHarness, key: Option<&str>, body: &str) -> Message {
    let mut b = Message::builder(h.topic()).payload(body.as_bytes().to_vec());
    if let Some(k) = key {
        b = b.key(k);
    }
    b.build().expect("valid message")
}

/// Transport 2: every field survives the trip through the broker: id, topic, key, payload
/// (binary), application headers (unicode), content type, message type, correlation id,
/// reply-to, `created_at` (microseconds), `deliver_after`, trace context.
pub async fn round_trip_every_field(h: &dyn TransportHarness) {
    let full = Message::builder(h.topic())
        .key("order-42")
        .payload(vec![0u8, 159, 146, 150, 255, b'{', b'}'])
        .header("tenant", "acme")
        .header("note", "grüße, 東京 ✓")
        .content_type("application/octet-stream")
        .message_type(MessageType::Command)
        .correlation_id("corr-1")
        .reply_to("orders.replies")
        .created_at(Utc::now() - chrono::Duration::microseconds(1_234_567))
        .deliver_after(Utc::now() - chrono::Duration::seconds(1))
        .traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .tracestate("rojo=00f067aa0ba902b7")
        .baggage("userId=alice")
        .build()
        .expect("valid message");
    let minimal = message(h, None, "");
    let p = h.producer();
    p.send(&full).await.expect("send full");
    p.send(&minimal).await.expect("send minimal");
    let c = h.consumer().await.expect("consumer");
    let mut got = HashMap::new();
    for _ in 0..2 {
        let d = receive(c.as_ref()).await;
        assert_eq!(d.attempt, 1, "first delivery");
        c.ack(&d).await.expect("ack");
        got.insert(d.message.id, d.message);
    }
    assert_eq!(
        got.get(&full.id),
        Some(&full),
        "every field of the full message"
    );
    assert_eq!(got.get(&minimal.id), Some(&minimal), "the minimal message");
}

/// Transport 1, 2: per-key order: messages of one key, sent one after another, arrive in
/// order (across several keys interleaved).
pub async fn per_key_order(h: &dyn TransportHarness) {
    let p = h.producer();
    let mut sent: HashMap<String, Vec<MessageId>> = HashMap::new();
    for i in 0..60 {
        let key = format!("k{}", i % 5);
        let m = message(h, Some(&key), &format!("{i}"));
        p.send(&m).await.expect("send");
        sent.entry(key).or_default().push(m.id);
    }
    let c = h.consumer().await.expect("consumer");
    let mut got: HashMap<String, Vec<MessageId>> = HashMap::new();
    for _ in 0..60 {
        let d = receive(c.as_ref()).await;
        c.ack(&d).await.expect("ack");
        let key = d.message.key.clone().expect("key survives");
        got.entry(key).or_default().push(d.message.id);
    }
    assert_eq!(got, sent, "per-key order");
}

/// Transport 1: `send` returning `Ok` means the broker has the message: a consumer created
/// afterwards receives it; `send_batch` reports one confirmed result per message.
pub async fn confirmed_send_is_consumable(h: &dyn TransportHarness) {
    let p = h.producer();
    let one = message(h, Some("a"), "one");
    p.send(&one).await.expect("send");
    let batch: Vec<Message> = (0..20)
        .map(|i| message(h, Some(&format!("b{i}")), "batch"))
        .collect();
    let results = p.send_batch(&batch).await;
    assert_eq!(results.len(), batch.len(), "one result per message");
    for r in &results {
        r.as_ref().expect("batch send confirmed");
    }
    let c = h.consumer().await.expect("consumer");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..21 {
        let d = receive(c.as_ref()).await;
        c.ack(&d).await.expect("ack");
        ids.insert(d.message.id);
    }
    assert!(ids.contains(&one.id));
    for m in &batch {
        assert!(ids.contains(&m.id), "batch message {} delivered", m.id);
    }
}

/// Transport 5: `send_ordered` of a 500-message chain of one key: 500 `Ok` results, and a
/// consumer receives the chain complete and in order. An empty chain gives no results.
pub async fn send_ordered_chain_in_order(h: &dyn TransportHarness) {
    const CHAIN: usize = 500;
    let p = h.producer();
    assert!(
        p.send_ordered(&[]).await.is_empty(),
        "empty chain: no results"
    );
    let chain: Vec<Message> = (0..CHAIN)
        .map(|i| message(h, Some("chain"), &format!("{i:04}")))
        .collect();
    let results = p.send_ordered(&chain).await;
    assert_eq!(results.len(), CHAIN, "one result per message");
    for (i, r) in results.iter().enumerate() {
        if let Err(e) = r {
            panic!("message {i} of the chain failed: {e}");
        }
    }
    let c = h.consumer().await.expect("consumer");
    let mut got = Vec::with_capacity(CHAIN);
    for _ in 0..CHAIN {
        let d = receive(c.as_ref()).await;
        c.ack(&d).await.expect("ack");
        got.push(d.message.id);
    }
    let sent: Vec<MessageId> = chain.iter().map(|m| m.id).collect();
    assert_eq!(got, sent, "the chain arrives complete and in order");
}

/// Transport 3, 5: a chain with a message the broker can never accept in the middle
/// (unroutable where [`TransportHarness::unroutable_topic`] names one, else one byte over
/// [`TransportHarness::max_message_size`]): `Ok` for the 5 messages before it, a permanent
/// error for it, no result after it; the 5 arrive first and in order. (Messages after the
/// failed one may still arrive: each transport documents when.)
pub async fn send_ordered_stops_at_permanent_failure(h: &dyn TransportHarness) {
    const PREFIX: usize = 5;
    let poison = if let Some(topic) = h.unroutable_topic() {
        Message::builder(topic).key("chain").build()
    } else if let Some(limit) = h.max_message_size() {
        Message::builder(h.topic())
            .key("chain")
            .payload(vec![7u8; limit + 1])
            .build()
    } else {
        panic!(
            "transport_send_ordered_stops_at_permanent_failure needs an unroutable topic or a \
             size limit"
        );
    }
    .expect("valid message");
    let mut chain: Vec<Message> = (0..PREFIX)
        .map(|i| message(h, Some("chain"), &format!("before {i}")))
        .collect();
    chain.push(poison);
    chain.extend((0..PREFIX).map(|i| message(h, Some("chain"), &format!("after {i}"))));
    let p = h.producer();
    let results = p.send_ordered(&chain).await;
    assert_eq!(
        results.len(),
        PREFIX + 1,
        "results stop at the failed message: {results:?}"
    );
    for (i, r) in results[..PREFIX].iter().enumerate() {
        if let Err(e) = r {
            panic!("message {i} before the poison failed: {e}");
        }
    }
    let e = results[PREFIX]
        .as_ref()
        .expect_err("the poison message must fail");
    assert!(!e.is_retryable(), "permanent: {e}");
    let c = h.consumer().await.expect("consumer");
    let mut got = Vec::with_capacity(PREFIX);
    for _ in 0..PREFIX {
        let d = receive(c.as_ref()).await;
        c.ack(&d).await.expect("ack");
        got.push(d.message.id);
    }
    let sent: Vec<MessageId> = chain[..PREFIX].iter().map(|m| m.id).collect();
    assert_eq!(got, sent, "the confirmed prefix arrives first, in order");
}

/// Transport 5 (and relay 9): [`Producer::delivery_timeout`] is what
/// [`TransportHarness::max_delivery_timeout`] says: a bound in `(0, max]` for a transport
/// that holds sends, `None` for one that holds nothing.
pub async fn delivery_timeout_bounded(h: &dyn TransportHarness) {
    let reported = h.producer().delivery_timeout();
    match h.max_delivery_timeout() {
        Some(max) => {
            let d = reported.unwrap_or_else(|| {
                panic!("the producer must bound how long a send can stay pending (max {max:?})")
            });
            assert!(
                !d.is_zero() && d <= max,
                "delivery timeout {d:?} must be in (0, {max:?}]"
            );
        }
        None => assert_eq!(
            reported, None,
            "a transport that holds no send reports no delivery timeout"
        ),
    }
}

/// Transport 3: a broker that cannot be reached gives a retryable `Unavailable` error (the
/// relay keeps the message pending and retries).
pub async fn unreachable_broker_is_retryable(h: &dyn TransportHarness) {
    let p = h
        .unreachable_producer()
        .expect("transport_unreachable_broker_is_retryable needs an unreachable producer");
    let m = message(h, Some("k"), "x");
    let res = tokio::time::timeout(Duration::from_secs(120), p.send(&m))
        .await
        .expect("send to an unreachable broker must fail in bounded time");
    let e = res.expect_err("send to an unreachable broker must fail");
    assert!(e.is_retryable(), "retryable: {e}");
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
}

/// Transport 3: a message nothing can route is a permanent error, never silently dropped.
pub async fn unroutable_is_permanent(h: &dyn TransportHarness) {
    let topic = h
        .unroutable_topic()
        .expect("transport_unroutable_is_permanent needs an unroutable topic");
    let m = Message::builder(topic)
        .key("k")
        .build()
        .expect("valid message");
    let e = h
        .producer()
        .send(&m)
        .await
        .expect_err("unroutable must fail");
    assert!(!e.is_retryable(), "permanent: {e}");
}

/// Transport 3: a message over the broker's limit is a permanent `PayloadTooLarge`.
pub async fn too_large_is_permanent(h: &dyn TransportHarness) {
    let limit = h
        .max_message_size()
        .expect("transport_too_large_is_permanent needs a size limit");
    let m = Message::builder(h.topic())
        .key("k")
        .payload(vec![7u8; limit + 1])
        .build()
        .expect("valid message");
    let e = h
        .producer()
        .send(&m)
        .await
        .expect_err("too large must fail");
    assert!(!e.is_retryable(), "permanent: {e}");
    assert!(
        matches!(e.kind(), ErrorKind::PayloadTooLarge { .. }),
        "PayloadTooLarge: {e}"
    );
    // The producer still works afterwards.
    h.producer()
        .send(&message(h, Some("k"), "small"))
        .await
        .expect("a normal send after the rejected one");
}

/// Transport 4: a nacked delivery comes again, with a greater attempt count.
pub async fn nack_redelivers(h: &dyn TransportHarness) {
    let m = message(h, Some("k"), "retry me");
    h.producer().send(&m).await.expect("send");
    let c = h.consumer().await.expect("consumer");
    let first = receive(c.as_ref()).await;
    assert_eq!((first.message.id, first.attempt), (m.id, 1));
    c.nack(&first).await.expect("nack");
    let second = receive(c.as_ref()).await;
    assert_eq!(second.message.id, m.id, "the same message again");
    assert!(second.attempt >= 2, "attempt counts up: {}", second.attempt);
    c.ack(&second).await.expect("ack");
}

/// Transport 4: a delivery never acked (consumer crashed) is delivered to the next consumer;
/// an acked one is not.
pub async fn unacked_redelivered_after_restart(h: &dyn TransportHarness) {
    let done = message(h, Some("k"), "acked");
    let open = message(h, Some("k"), "never acked");
    let p = h.producer();
    p.send(&done).await.expect("send");
    p.send(&open).await.expect("send");
    {
        let c = h.consumer().await.expect("consumer");
        let d = receive(c.as_ref()).await;
        assert_eq!(d.message.id, done.id);
        c.ack(&d).await.expect("ack");
        let d = receive(c.as_ref()).await;
        assert_eq!(d.message.id, open.id);
        // dropped here without ack: the crash
    }
    let c = h.consumer().await.expect("restarted consumer");
    let d = receive(c.as_ref()).await;
    assert_eq!(
        d.message.id, open.id,
        "the unacked message comes again, the acked one not"
    );
    c.ack(&d).await.expect("ack");
}

/// Records one effect per handled message, and per key the payloads in handling order;
/// clones share the records.
#[derive(Clone, Default)]
struct CountingHandler {
    fail: bool,
    effects: Arc<Mutex<HashMap<MessageId, u32>>>,
    by_key: Arc<Mutex<HashMap<String, Vec<bytes::Bytes>>>>,
}

#[async_trait]
impl MessageHandler<MemoryTx> for CountingHandler {
    async fn handle(&self, message: &Message, tx: &mut MemoryTx) -> Result<(), HandlerError> {
        if self.fail {
            return Err(HandlerError::new("handler refused (test)"));
        }
        tx.put_record(format!("effect/{}", message.id), "done");
        if let Some(key) = &message.key {
            self.by_key
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key.clone())
                .or_default()
                .push(message.payload.clone());
        }
        *self
            .effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(message.id)
            .or_default() += 1;
        Ok(())
    }
}

/// Transport 4: behind `InboxProcessor`, a handler that keeps failing gets the message
/// redelivered and, on the N-th failure, dead-lettered with the error as reason; it is not
/// delivered again.
pub async fn dead_letter_after_n_failures(h: &dyn TransportHarness) {
    let m = message(h, Some("k"), "poison");
    h.producer().send(&m).await.expect("send");
    let handler = CountingHandler {
        fail: true,
        ..CountingHandler::default()
    };
    let p = InboxProcessor::new(Arc::new(MemoryStore::new()), "conformance", handler)
        .expect("processor")
        .with_max_deliveries(3);
    let c = h.consumer().await.expect("consumer");
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let d = receive(c.as_ref()).await;
        assert_eq!(d.message.id, m.id);
        outcomes.push(p.process(c.as_ref(), &d).await.expect("process"));
    }
    assert_eq!(
        outcomes,
        vec![
            ProcessOutcome::Retrying,
            ProcessOutcome::Retrying,
            ProcessOutcome::DeadLettered
        ]
    );
    let dead = h.dead_letters(1).await.expect("dead letters");
    assert_eq!(dead.len(), 1, "exactly one dead letter: {dead:?}");
    assert_eq!(dead[0].0.id, m.id, "the dead letter keeps the id");
    assert_eq!(dead[0].0.payload, m.payload, "and the payload");
    assert!(
        dead[0].1.contains("handler refused"),
        "reason: {}",
        dead[0].1
    );
    if let Some(d) = receive_nothing_within(c.as_ref(), Duration::from_secs(2)).await {
        panic!("dead-lettered message delivered again: {:?}", d.message.id);
    }
}

/// Transport 4 + inbox: a message published twice (a relay republishing after a crash) has
/// one effect behind the inbox; both deliveries are acked.
pub async fn inbox_suppresses_duplicate(h: &dyn TransportHarness) {
    let m = message(h, Some("k"), "once");
    let p = h.producer();
    p.send(&m).await.expect("send");
    p.send(&m).await.expect("send the duplicate");
    let handler = CountingHandler::default();
    let store = MemoryStore::new();
    let proc = InboxProcessor::new(Arc::new(store.clone()), "conformance", handler.clone())
        .expect("processor");
    let c = h.consumer().await.expect("consumer");
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        let d = receive(c.as_ref()).await;
        assert_eq!(d.message.id, m.id);
        outcomes.push(proc.process(c.as_ref(), &d).await.expect("process"));
    }
    assert_eq!(
        outcomes,
        vec![ProcessOutcome::Handled, ProcessOutcome::Duplicate]
    );
    assert_eq!(
        handler
            .effects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&m.id),
        Some(&1)
    );
    assert_eq!(store.record_count(), 1, "one effect");
    if let Some(d) = receive_nothing_within(c.as_ref(), Duration::from_secs(2)).await {
        panic!("acked delivery came again: {:?}", d.message.id);
    }
}

/// Transports end to end: 1,000 messages committed in an outbox (in-memory store), published
/// by a [`Relay`](outbox_core::Relay) through this transport, consumed by two competing
/// consumers behind an [`InboxProcessor`]: every message handled, each with exactly one
/// effect, nothing left pending; per-key order too where
/// [`TransportHarness::per_key_order_across_consumers`] says the transport keeps it.
pub async fn end_to_end_exactly_once(h: &dyn TransportHarness) {
    use outbox_core::Transaction as _;
    use outbox_core::memory::MemoryLock;
    use outbox_core::{CancellationToken, OutboxStore, Relay, RelayConfig, TransactionalStore};

    const TOTAL: usize = 1000;
    const KEYS: usize = 40;
    let outbox = MemoryStore::new();
    let mut sent = std::collections::HashSet::new();
    for chunk in 0..TOTAL / 100 {
        let mut tx = outbox.begin().await.expect("begin");
        for i in 0..100 {
            let n = chunk * 100 + i;
            // Payload: the message's position within its key, zero-padded to sort.
            let m = message(
                h,
                Some(&format!("key-{}", n % KEYS)),
                &format!("{:06}", n / KEYS),
            );
            sent.insert(m.id);
            tx.add(&m).await.expect("add");
        }
        tx.commit().await.expect("commit");
    }
    let started = std::time::Instant::now();
    let shutdown = CancellationToken::new();
    let relay = Relay::new(
        Arc::new(outbox.clone()),
        Arc::new(MemoryLock::default()),
        h.producer(),
        RelayConfig::default(),
    )
    .expect("relay");
    let relay_task = relay.spawn(shutdown.clone());

    let inbox = Arc::new(MemoryStore::new());
    let handler = CountingHandler::default();
    let processor =
        Arc::new(InboxProcessor::new(inbox.clone(), "e2e", handler.clone()).expect("processor"));
    let mut consumers: Vec<Arc<dyn Consumer>> = Vec::new();
    for _ in 0..2 {
        consumers.push(Arc::from(h.consumer().await.expect("consumer")));
    }
    let tasks: Vec<_> = consumers
        .into_iter()
        .map(|c| {
            let (processor, shutdown) = (processor.clone(), shutdown.clone());
            tokio::spawn(async move { processor.run(c.as_ref(), shutdown).await })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while processor.stats().handled < TOTAL as u64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    relay_task.await.expect("join relay").expect("relay run");
    for t in tasks {
        t.await.expect("join consumer").expect("consumer run");
    }

    let stats = processor.stats();
    eprintln!("end to end: {TOTAL} messages handled in {elapsed:?}; {stats:?}");
    assert_eq!(
        stats.handled, TOTAL as u64,
        "every message handled: {stats:?}"
    );
    assert_eq!(
        outbox.stats().await.expect("stats").pending,
        0,
        "nothing left pending"
    );
    let effects = handler.effects.lock().unwrap_or_else(|p| p.into_inner());
    assert_eq!(
        effects
            .keys()
            .copied()
            .collect::<std::collections::HashSet<_>>(),
        sent,
        "every sent message has an effect"
    );
    assert!(
        effects.values().all(|n| *n == 1),
        "each handled exactly once"
    );
    assert_eq!(
        inbox.record_count(),
        TOTAL,
        "one committed effect per message"
    );
    if h.per_key_order_across_consumers() {
        let by_key = handler.by_key.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(by_key.len(), KEYS);
        for (key, seen) in by_key.iter() {
            let mut sorted = seen.clone();
            sorted.sort();
            assert_eq!(seen, &sorted, "per-key order of {key}");
        }
    }
}
