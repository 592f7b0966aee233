//! Inbox processing against the in-memory store and broker.
#![allow(clippy::unwrap_used)] // test helpers may panic

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use outbox_core::memory::{MemoryBroker, MemoryStore, MemoryTx};
use outbox_core::{
    Consumer, HandlerError, InboxEntry, InboxProcessor, InboxStore, Message, MessageHandler,
    MessageId, OutboxStore, ProcessOutcome, Producer, Transaction, async_trait,
};

const TOPIC: &str = "orders";

/// Writes a record per message; fails the first `fail_times[id]` calls for chosen ids; can add
/// a follow-up outbox message in the same transaction.
#[derive(Default)]
struct Billing {
    fail_times: Mutex<HashMap<MessageId, u32>>,
    calls: Arc<Mutex<HashMap<MessageId, u32>>>,
    follow_up: bool,
}

#[async_trait]
impl MessageHandler<MemoryTx> for Billing {
    async fn handle(&self, message: &Message, tx: &mut MemoryTx) -> Result<(), HandlerError> {
        *self.calls.lock().unwrap().entry(message.id).or_default() += 1;
        tx.put_record(format!("billing/{}", message.id), message.payload.clone());
        if self.follow_up {
            let reply = Message::builder("billing.done")
                .key(message.id.to_string())
                .build()?;
            tx.add(&reply).await?;
        }
        let mut fails = self.fail_times.lock().unwrap();
        match fails.get_mut(&message.id) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(HandlerError::new("card declined"))
            }
            _ => Ok(()),
        }
    }
}

async fn publish(broker: &MemoryBroker, n: usize) -> Vec<Message> {
    let producer = broker.producer();
    let mut out = Vec::new();
    for i in 0..n {
        let m = Message::builder(TOPIC)
            .key(format!("o{i}"))
            .payload(format!("order {i}"))
            .build()
            .unwrap();
        producer.send(&m).await.unwrap();
        out.push(m);
    }
    out
}

/// Process deliveries until the queue is empty.
async fn drain<H: MessageHandler<MemoryTx>>(
    p: &InboxProcessor<MemoryStore, H>,
    consumer: &dyn Consumer,
    broker: &MemoryBroker,
) -> Vec<ProcessOutcome> {
    let mut outcomes = Vec::new();
    while broker.queued(consumer_name()) > 0 {
        let d = consumer.receive().await.unwrap().unwrap();
        outcomes.push(p.process(consumer, &d).await.unwrap());
    }
    outcomes
}

fn consumer_name() -> &'static str {
    "billing"
}

#[tokio::test]
async fn each_message_handled_once_and_duplicates_acked_without_effect() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(consumer_name(), &[TOPIC]);
    let handler = Billing::default();
    let p = InboxProcessor::new(Arc::new(store.clone()), "billing", handler).expect("processor");
    let fresh = p.health();
    assert_eq!(
        (
            fresh.in_progress,
            fresh.last_handled_at,
            fresh.last_failure_at
        ),
        (0, None, None)
    );
    let sent = publish(&broker, 10).await;

    let before = chrono::Utc::now();
    drain(&p, &consumer, &broker).await;
    for m in &sent[..3] {
        broker.redeliver(consumer_name(), m.id).unwrap();
    }
    let outcomes = drain(&p, &consumer, &broker).await;

    assert_eq!(outcomes, vec![ProcessOutcome::Duplicate; 3]);
    let stats = p.stats();
    assert_eq!((stats.handled, stats.duplicates), (10, 3));
    let health = p.health();
    assert_eq!(health.handler_key, "billing");
    assert_eq!(health.totals, stats);
    assert_eq!(health.in_progress, 0, "nothing left in progress");
    assert!(health.last_handled_at.is_some_and(|t| t >= before));
    assert_eq!((health.last_failure_at, health.last_failure), (None, None));
    assert_eq!(store.record_count(), 10);
    assert_eq!(broker.unacked(consumer_name()), 0, "every delivery acked");
    for m in &sent {
        assert!(
            store
                .contains(&InboxEntry::new(m.id, "billing"))
                .await
                .unwrap()
        );
    }
}

#[tokio::test]
async fn handler_failure_redelivers_then_dead_letters_with_nothing_written() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(consumer_name(), &[TOPIC]);
    let sent = publish(&broker, 2).await;
    let handler = Billing::default();
    handler.fail_times.lock().unwrap().insert(sent[0].id, 100); // always fails
    handler.fail_times.lock().unwrap().insert(sent[1].id, 1); // fails once
    let p = InboxProcessor::new(Arc::new(store.clone()), "billing", handler)
        .expect("processor")
        .with_max_deliveries(3);

    let outcomes = drain(&p, &consumer, &broker).await;

    // nack puts a delivery back at the front, so each message is retried before the next.
    assert_eq!(
        outcomes,
        vec![
            ProcessOutcome::Retrying,
            ProcessOutcome::Retrying,
            ProcessOutcome::DeadLettered,
            ProcessOutcome::Retrying,
            ProcessOutcome::Handled,
        ]
    );
    let dead = broker.dead_letters(consumer_name());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0.id, sent[0].id);
    assert!(dead[0].1.contains("card declined"), "{}", dead[0].1);
    // The failed attempts rolled back: no record and no inbox entry for the dead message.
    assert_eq!(store.record(&format!("billing/{}", sent[0].id)), None);
    assert!(
        !store
            .contains(&InboxEntry::new(sent[0].id, "billing"))
            .await
            .unwrap()
    );
    assert!(store.record(&format!("billing/{}", sent[1].id)).is_some());
    let stats = p.stats();
    assert_eq!(
        (stats.handled, stats.retried, stats.dead_lettered),
        (1, 3, 1)
    );
    let health = p.health();
    assert!(health.last_failure_at.is_some());
    assert!(
        health
            .last_failure
            .as_deref()
            .is_some_and(|r| r.contains("card declined")),
        "{health:?}"
    );
}

#[tokio::test]
async fn messages_added_by_the_handler_commit_with_the_inbox_entry() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(consumer_name(), &[TOPIC]);
    let sent = publish(&broker, 2).await;
    let handler = Billing {
        follow_up: true,
        ..Billing::default()
    };
    handler.fail_times.lock().unwrap().insert(sent[0].id, 1);
    let calls = handler.calls.clone();
    let p = InboxProcessor::new(Arc::new(store.clone()), "billing", handler).expect("processor");

    drain(&p, &consumer, &broker).await;

    // The failed first attempt added a follow-up too, but rolled back: exactly one per message.
    let stats = store.stats().await.unwrap();
    assert_eq!(stats.pending, 2, "one follow-up per handled message");
    let calls = calls.lock().unwrap();
    assert_eq!(calls[&sent[0].id], 2);
    assert_eq!(calls[&sent[1].id], 1);
}

/// The in-memory consumer, failing its first `receive` calls with a chosen error.
#[derive(Debug)]
struct FlakyConsumer {
    inner: outbox_core::memory::MemoryConsumer,
    failures: Mutex<Vec<outbox_core::Error>>,
}

#[async_trait]
impl Consumer for FlakyConsumer {
    async fn receive(&self) -> outbox_core::Result<Option<outbox_core::Delivery>> {
        if let Some(e) = self.failures.lock().unwrap().pop() {
            return Err(e);
        }
        self.inner.receive().await
    }
    async fn ack(&self, d: &outbox_core::Delivery) -> outbox_core::Result<()> {
        self.inner.ack(d).await
    }
    async fn nack(&self, d: &outbox_core::Delivery) -> outbox_core::Result<()> {
        self.inner.nack(d).await
    }
    async fn dead_letter(&self, d: &outbox_core::Delivery, r: &str) -> outbox_core::Result<()> {
        self.inner.dead_letter(d, r).await
    }
}

#[tokio::test(start_paused = true)]
async fn run_rides_out_retryable_receive_errors_and_stops_on_permanent_ones() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = FlakyConsumer {
        inner: broker.subscribe(consumer_name(), &[TOPIC]),
        failures: Mutex::new(vec![
            outbox_core::Error::unavailable("broker restarting"),
            outbox_core::Error::unavailable("broker restarting"),
        ]),
    };
    publish(&broker, 5).await;
    let p = InboxProcessor::new(Arc::new(store.clone()), "billing", Billing::default())
        .expect("processor");
    let shutdown = outbox_core::CancellationToken::new();
    let (stats, ()) = tokio::join!(p.run(&consumer, shutdown.clone()), async {
        while p.stats().handled < 5 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        shutdown.cancel();
    });
    assert_eq!(
        stats.unwrap().handled,
        5,
        "kept consuming after two retryable errors"
    );

    consumer
        .failures
        .lock()
        .unwrap()
        .push(outbox_core::Error::new(
            outbox_core::ErrorKind::InvalidInput,
            "not authorized",
        ));
    let err = p
        .run(&consumer, outbox_core::CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not authorized"), "{err}");
}

/// Records, per key, the order handlers ran in, and the most handlers running at once.
#[derive(Default)]
struct Recorder {
    order: Mutex<HashMap<String, Vec<MessageId>>>,
    running: std::sync::atomic::AtomicUsize,
    peak: std::sync::atomic::AtomicUsize,
}

/// The handler side of a shared [`Recorder`].
struct Rec(Arc<Recorder>);

#[async_trait]
impl MessageHandler<MemoryTx> for Rec {
    async fn handle(&self, message: &Message, tx: &mut MemoryTx) -> Result<(), HandlerError> {
        use std::sync::atomic::Ordering::SeqCst;
        let this = &self.0;
        let now = this.running.fetch_add(1, SeqCst) + 1;
        this.peak.fetch_max(now, SeqCst);
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let key = message.key.clone().unwrap_or_default();
        this.order
            .lock()
            .unwrap()
            .entry(key)
            .or_default()
            .push(message.id);
        tx.put_record(format!("r/{}", message.id), message.payload.clone());
        this.running.fetch_sub(1, SeqCst);
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_handles_keys_concurrently_and_each_key_in_order() {
    let store = MemoryStore::new();
    let broker = MemoryBroker::new();
    let consumer = broker.subscribe(consumer_name(), &[TOPIC]);
    let producer = broker.producer();
    let mut sent: HashMap<String, Vec<MessageId>> = HashMap::new();
    for i in 0..200 {
        let key = format!("k{}", i % 10);
        let m = Message::builder(TOPIC).key(key.clone()).build().unwrap();
        producer.send(&m).await.unwrap();
        sent.entry(key).or_default().push(m.id);
    }
    let recorder = Arc::new(Recorder::default());
    let p = InboxProcessor::new(Arc::new(store.clone()), "billing", Rec(recorder.clone()))
        .expect("processor")
        .with_concurrency(8);
    let shutdown = outbox_core::CancellationToken::new();
    let run = {
        let shutdown = shutdown.clone();
        async move { p.run(&consumer, shutdown).await }
    };
    let stop = async {
        while p_handled(&recorder) < 200 {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        shutdown.cancel();
    };
    let (stats, ()) = tokio::join!(run, stop);
    assert_eq!(stats.unwrap().handled, 200);
    assert_eq!(*recorder.order.lock().unwrap(), sent, "per-key order");
    let peak = recorder.peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!((2..=8).contains(&peak), "handlers at once: {peak}");
}

fn p_handled(r: &Recorder) -> usize {
    r.order.lock().unwrap().values().map(Vec::len).sum()
}

#[test]
fn empty_handler_key_is_refused_at_construction() {
    let Err(e) = InboxProcessor::new(Arc::new(MemoryStore::new()), "", Billing::default()) else {
        panic!("an empty handler key was accepted");
    };
    assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("handler key"), "{e}");
    // The shared name rule: NUL and over-long keys are refused too, the longest one accepted.
    let longest = "h".repeat(outbox_core::MAX_FIELD_LEN);
    for bad in ["h\0".to_owned(), format!("{longest}h")] {
        let Err(e) = InboxProcessor::new(Arc::new(MemoryStore::new()), bad, Billing::default())
        else {
            panic!("a handler key breaking the name rule was accepted");
        };
        assert_eq!(e.kind(), outbox_core::ErrorKind::InvalidInput, "{e}");
    }
    assert!(InboxProcessor::new(Arc::new(MemoryStore::new()), longest, Billing::default()).is_ok());
}
